//! Criterion benches of the request path, in process: the placement decision, a whole warm
//! blob redirect and a cached manifest through the actix service, and the grammar parsers.
//! Run: `cargo bench --bench gateway`.

use std::sync::Arc;

use actix_web::dev::Service;
use actix_web::test::{init_service, TestRequest};
use actix_web::web;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use regatta::config::Settings;
use regatta::gateway::Gateway;
use regatta::model::{Health, Holding};
use regatta::oci::{Digest, Reference, RepoName};
use regatta::placement::{plan_digest, BackendView};
use regatta::startup::registry_app;
use regatta::store::MemoryStore;
use regatta::upstream::Upstream;

const LAYER: &str = "sha256:2b0ea5c1a1d9a9dbb4a5bd6f5c0b5d8e7f1a2b3c4d5e6f708192a3b4c5d6e7f8";

fn placement(c: &mut Criterion) {
    let regions = ["eu", "us", "ap"];
    let mut group = c.benchmark_group("placement");
    for n in [10usize, 100, 1000] {
        let views: Vec<BackendView<'_>> = (0..n)
            .map(|i| BackendView {
                idx: i,
                region: regions[i % 3],
                health: if i % 17 == 0 {
                    Health::Degraded
                } else {
                    Health::Up
                },
                failing: false,
                drained: i % 23 == 0,
                latency_us: ((i * 7919) % 50_000) as u32,
                weight: 50 + (i % 4) as u32 * 25,
            })
            .collect();
        // Holder knowledge: most backends known to hold or lack the digest, some not asked.
        let holdings: Vec<Holding> = (0..n)
            .map(|i| match i % 5 {
                0 => Holding::Lacks,
                1 => Holding::Unknown,
                _ => Holding::Has,
            })
            .collect();
        group.bench_with_input(BenchmarkId::new("plan_digest", n), &n, |b, _| {
            b.iter(|| {
                plan_digest(
                    "eu",
                    std::hint::black_box(&views),
                    std::hint::black_box(&holdings),
                )
            })
        });
    }
    group.finish();
}

fn parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.bench_function("repo_name", |b| {
        b.iter(|| RepoName::parse(std::hint::black_box("acme/team/app-server")).unwrap())
    });
    group.bench_function("reference_tag", |b| {
        b.iter(|| Reference::parse(std::hint::black_box("v1.24.3-alpine")).unwrap())
    });
    group.bench_function("digest", |b| {
        b.iter(|| Digest::parse(std::hint::black_box(LAYER)).unwrap())
    });
    let path = format!("/v2/acme/team/app-server/blobs/{LAYER}");
    group.bench_function("route", |b| {
        b.iter(|| {
            regatta::route::parse(std::hint::black_box(&path))
                .unwrap()
                .unwrap()
        })
    });
    group.finish();
}

fn settings() -> Settings {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.toml");
    std::fs::write(
        &path,
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
    "#,
    )
    .unwrap();
    Settings::load(Some(&path), std::iter::empty()).unwrap()
}

fn service(c: &mut Criterion) {
    let system = actix_web::rt::System::new();
    let settings = settings();
    let gateway = web::Data::new(Gateway::new(
        &settings,
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
    let blob_uri = format!("/v2/acme/app/blobs/{LAYER}");
    let manifest_uri = format!("/v2/acme/app/manifests/{manifest_digest}");
    let mut group = c.benchmark_group("service");
    group.bench_function("warm_blob_redirect", |b| {
        b.iter(|| {
            system.block_on(async {
                let response = app
                    .call(TestRequest::get().uri(&blob_uri).to_request())
                    .await
                    .unwrap();
                assert_eq!(response.status(), 307);
            })
        })
    });
    group.bench_function("cached_manifest", |b| {
        b.iter(|| {
            system.block_on(async {
                let response = app
                    .call(TestRequest::get().uri(&manifest_uri).to_request())
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            })
        })
    });
    group.finish();
}

criterion_group!(benches, placement, parsing, service);
criterion_main!(benches);
