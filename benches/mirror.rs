//! Criterion benches of mirror mode, in process: the routing decision alone, and a whole warm
//! blob redirect through the actix service for each way a request names its upstream group
//! (`ns`, host prefix, default group) beside an org's request, on a node with groups and on
//! one without (what routing costs a node that does not use mirror mode).
//! Run: `cargo bench --bench mirror`.

use std::sync::Arc;

use actix_web::dev::Service;
use actix_web::test::{init_service, TestRequest};
use actix_web::web;
use criterion::{criterion_group, criterion_main, Criterion};

use regatta::config::Settings;
use regatta::gateway::Gateway;
use regatta::model::Holding;
use regatta::oci::{Digest, RepoName};
use regatta::startup::registry_app;
use regatta::store::MemoryStore;
use regatta::upstream::Upstream;

const LAYER: &str = "sha256:2b0ea5c1a1d9a9dbb4a5bd6f5c0b5d8e7f1a2b3c4d5e6f708192a3b4c5d6e7f8";

const NODE: &str = r#"
    [server]
    listen = "127.0.0.1:0"
    region = "eu"
    [log]
    filter = "off"
    [health]
    interval = "1h"
    [[backends]]
    id = "hub"
    url = "http://127.0.0.1:9"
    region = "eu"
    delivery = "direct"
    [[orgs]]
    name = "acme"
    backends = ["hub"]
"#;

const GROUPS: &str = r#"
    [[upstreams]]
    name = "docker.io"
    aliases = ["index.docker.io", "registry-1.docker.io"]
    backends = ["hub"]
    default = true
    [[upstreams]]
    name = "ghcr.io"
    backends = ["hub"]
"#;

fn settings(groups: bool) -> Settings {
    let text = if groups {
        format!("{NODE}{GROUPS}")
    } else {
        NODE.to_owned()
    };
    Settings::from_toml(&text, []).unwrap()
}

fn routing(c: &mut Criterion) {
    let settings = settings(true);
    let upstreams = regatta::mirror::Upstreams::from_settings(&settings.upstreams);
    let mut group = c.benchmark_group("mirror_route");
    for (name, path, ns) in [
        ("ns", "/v2/library/alpine/blobs/x", Some("docker.io")),
        ("prefix", "/v2/docker.io/library/alpine/blobs/x", None),
        ("default", "/v2/library/alpine/blobs/x", None),
        ("org", "/v2/acme/app/blobs/x", None),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                upstreams
                    .route(std::hint::black_box(path), ns, |first| first == "acme")
                    .unwrap()
            })
        });
    }
    group.finish();
}

fn warm_redirects(c: &mut Criterion) {
    let system = actix_web::rt::System::new();
    let mut group = c.benchmark_group("mirror_warm_blob_redirect");
    for groups in [false, true] {
        let settings = settings(groups);
        let gateway = web::Data::new(Gateway::new(
            &settings,
            "bench".into(),
            Arc::new(MemoryStore::new()),
            Arc::new(regatta::metrics::Metrics::new()),
        ));
        let layer = Digest::parse(LAYER).unwrap();
        let app = system.block_on(async {
            // The holder is known, so the first request decides without a backend call.
            for name in ["acme/app", "docker.io/library/alpine"] {
                let name = RepoName::parse(name).unwrap();
                gateway
                    .knowledge
                    .learn(&name, &layer, 0, Holding::Has)
                    .await;
            }
            let upstream = Upstream::new(&settings.upstream, gateway.auth.clone());
            init_service(registry_app(gateway.clone(), upstream)).await
        });
        let mut cases = vec![("org", format!("/v2/acme/app/blobs/{LAYER}"))];
        if groups {
            cases.extend([
                (
                    "ns",
                    format!("/v2/library/alpine/blobs/{LAYER}?ns=docker.io"),
                ),
                (
                    "prefix",
                    format!("/v2/docker.io/library/alpine/blobs/{LAYER}"),
                ),
                ("default", format!("/v2/library/alpine/blobs/{LAYER}")),
            ]);
        }
        let node = if groups { "with_groups" } else { "no_groups" };
        for (case, uri) in cases {
            let get = || async {
                let response = app
                    .call(TestRequest::get().uri(&uri).to_request())
                    .await
                    .unwrap();
                assert_eq!(response.status(), 307, "{uri}");
            };
            system.block_on(get());
            group.bench_function(format!("{node}/{case}"), |b| {
                b.iter(|| system.block_on(get()))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, routing, warm_redirects);
criterion_main!(benches);
