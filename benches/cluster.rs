//! Drain propagation: how long after an admin drain on one node every node of a
//! three-node cluster (one real Redis) has stopped choosing the drained backend.
//! Prints p50 / p99 / max over 50 drains and 50 undrains; asserts nothing about time.
//!
//! Run: `cargo bench --bench cluster` (needs redis-server and docker-registry, which
//! `scripts/test.sh` installs).

// The fixtures are shared with the integration tests; not every helper is used here.
#![allow(dead_code)]

#[path = "../tests/api/helpers.rs"]
mod helpers;
#[path = "../tests/api/images.rs"]
mod images;
#[path = "../tests/api/procs.rs"]
mod procs;
#[path = "../tests/api/redis_server.rs"]
mod redis_server;
#[path = "../tests/api/registry.rs"]
mod registry;

use std::time::{Duration, Instant};

use awc::http::Method;

use helpers::{spawn_app, Config};
use registry::{Registry, Shape};

const ROUNDS: usize = 50;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    actix_web::rt::System::new().block_on(async {
        let redis = redis_server::Redis::start();
        let a = Registry::start(Shape::Anonymous, None);
        let b = Registry::start(Shape::Anonymous, None);
        let config = Config::new()
            .redis(&redis.url())
            .admin()
            .backend("a", &a, "direct")
            .backend("b", &b, "direct")
            .org("acme", &["a", "b"], "30s", &[]);
        let nodes = vec![spawn_app(&config).await, spawn_app(&config).await, spawn_app(&config).await];
        let mut samples = Vec::with_capacity(ROUNDS * 2);
        for round in 0..ROUNDS * 2 {
            let drain = round % 2 == 0;
            let action = if drain { "drain" } else { "undrain" };
            let changer = &nodes[round % nodes.len()];
            let started = Instant::now();
            let answer = changer.admin(Method::POST, &format!("/admin/v1/backends/a/{action}"), None).await;
            assert_eq!(answer.status, 200);
            for node in &nodes {
                loop {
                    let seen = node.admin(Method::GET, "/admin/v1/backends/a", None).await.json();
                    if seen["drained"] == drain {
                        break;
                    }
                    assert!(started.elapsed() < Duration::from_secs(30), "a change never arrived");
                }
            }
            samples.push(started.elapsed());
        }
        samples.sort();
        println!(
            "drain propagation to 3 nodes over {} changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            samples.len(),
            percentile(&samples, 50.0).as_secs_f64() * 1e3,
            percentile(&samples, 99.0).as_secs_f64() * 1e3,
            samples.last().unwrap().as_secs_f64() * 1e3,
        );
    });
}
