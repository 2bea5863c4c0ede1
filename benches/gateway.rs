//! Criterion benches of the request path, in process: the placement decision, a whole warm
//! blob redirect and a cached manifest through the actix service, and the grammar parsers.
//! Run: `cargo bench --bench gateway`.

use actix_web::dev::Service;
use actix_web::test::TestRequest;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use regatta::model::{Health, Holding};
use regatta::oci::{Digest, Reference, RepoName};
use regatta::placement::{plan_digest, BackendView};

mod inproc;
use inproc::LAYER;

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

fn service(c: &mut Criterion) {
    let system = actix_web::rt::System::new();
    let warm = inproc::warm(&system, &inproc::settings(""));
    let (app, blob_uri, manifest_uri) = (&warm.app, &warm.paths.blob, &warm.paths.manifest);
    let mut group = c.benchmark_group("service");
    group.bench_function("warm_blob_redirect", |b| {
        b.iter(|| {
            system.block_on(async {
                let response = app
                    .call(TestRequest::get().uri(blob_uri).to_request())
                    .await
                    .unwrap();
                assert_eq!(response.status(), 307);
            })
        })
    });
    // The same request through the plain listener's front door: head parsed, answer
    // written (the App's answer above has warmed the redirect cache it reads).
    let wire = format!("GET {blob_uri} HTTP/1.1\r\nHost: registry.example\r\n\r\n");
    let mut out = Vec::with_capacity(1024);
    group.bench_function("warm_blob_redirect_front_door", |b| {
        b.iter(|| {
            out.clear();
            let used = regatta::front::answer(wire.as_bytes(), &warm.gateway, &mut out);
            assert_eq!(used, Some(wire.len()));
        })
    });
    group.bench_function("cached_manifest", |b| {
        b.iter(|| {
            system.block_on(async {
                let response = app
                    .call(TestRequest::get().uri(manifest_uri).to_request())
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
