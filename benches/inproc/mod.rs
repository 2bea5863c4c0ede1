//! Shared by the in-process benches (`gateway`, `cost`): a gateway with two backends, the
//! hub known to hold one layer and one manifest, behind the whole actix service, so that a
//! warm blob redirect and a cached manifest make no call to a store or a backend.

use std::sync::Arc;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::test::init_service;
use actix_web::web;

use regatta::config::Settings;
use regatta::gateway::Gateway;
use regatta::model::Holding;
use regatta::oci::{Digest, RepoName};
use regatta::startup::registry_app;
use regatta::store::MemoryStore;
use regatta::upstream::Upstream;

pub const LAYER: &str = "sha256:2b0ea5c1a1d9a9dbb4a5bd6f5c0b5d8e7f1a2b3c4d5e6f708192a3b4c5d6e7f8";

/// The settings of the in-process gateway; `extra` is appended (e.g. an `[access_log]`).
pub fn settings(extra: &str) -> Settings {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.toml");
    std::fs::write(
        &path,
        format!(
            r#"
        [server]
        listen = "127.0.0.1:0"
        region = "eu"
        [log]
        filter = "off"
        [[backends]]
        id = "hub"
        url = "http://127.0.0.1:9"
        region = "eu"
        delivery = "direct"
        [[backends]]
        id = "mirror"
        url = "http://127.0.0.1:9"
        region = "us"
        delivery = "direct"
        [[orgs]]
        name = "acme"
        backends = ["hub", "mirror"]
        {extra}
    "#
        ),
    )
    .unwrap();
    Settings::load(Some(&path), std::iter::empty()).unwrap()
}

/// The paths of the warm blob and the cached manifest.
pub struct Paths {
    pub blob: String,
    pub manifest: String,
}

/// The warm service.
pub struct Warm<S> {
    pub app: S,
    pub gateway: web::Data<Gateway>,
    pub paths: Paths,
}

/// Builds the service on `system` and warms it.
pub fn warm(
    system: &actix_web::rt::SystemRunner,
    settings: &Settings,
) -> Warm<
    impl Service<
        actix_http::Request,
        Response = ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
    >,
> {
    let gateway = web::Data::new(Gateway::new(
        settings,
        "bench".into(),
        Arc::new(MemoryStore::new()),
        Arc::new(regatta::metrics::Metrics::new()),
    ));
    let name = RepoName::parse("acme/app").unwrap();
    let layer = Digest::parse(LAYER).unwrap();
    let manifest_bytes = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:2b0ea5c1a1d9a9dbb4a5bd6f5c0b5d8e7f1a2b3c4d5e6f708192a3b4c5d6e7f8","size":2},"layers":[]}"#;
    let manifest_digest = Digest::compute(regatta::oci::Algorithm::Sha256, manifest_bytes);
    let app = system.block_on(async {
        // Warm: the hub is known to hold both, nothing needs a backend call.
        gateway
            .knowledge
            .learn(&name, &layer, 0, Holding::Has)
            .await;
        gateway
            .knowledge
            .learn(&name, &manifest_digest, 0, Holding::Has)
            .await;
        gateway
            .knowledge
            .keep_manifest(Arc::new(regatta::gateway::Manifest {
                digest: manifest_digest.clone(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes: bytes::Bytes::from_static(manifest_bytes),
                backend: "hub".into(),
            }));
        let upstream = Upstream::new(&settings.upstream, gateway.auth.clone());
        init_service(registry_app(gateway.clone(), upstream)).await
    });
    Warm {
        app,
        gateway,
        paths: Paths {
            blob: format!("/v2/acme/app/blobs/{LAYER}"),
            manifest: format!("/v2/acme/app/manifests/{manifest_digest}"),
        },
    }
}
