//! Pull benchmark: `skopeo copy` of a 10-layer image straight from the backend and through a
//! release-build regatta node, alternated, printing the median of each and their ratio
//! (target: at most 1.10). Asserts nothing about time.
//! Run: `cargo bench --bench pull`. Knobs: PULL_ROUNDS (5), PULL_LAYER_KIB (1024).

#![allow(dead_code)]

#[path = "../tests/api/clients.rs"]
mod clients;
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
mod support;

use std::time::{Duration, Instant};

use procs::{require, run_ok};
use registry::{Registry, Shape};
use support::{env_or, median, start_node};

fn pull(reference: &str, out: &std::path::Path) -> Duration {
    let started = Instant::now();
    let mut cmd = std::process::Command::new("skopeo");
    cmd.args([
        "copy",
        "--src-tls-verify=false",
        "--override-arch",
        "amd64",
        "--override-os",
        "linux",
    ])
    .arg(format!("docker://{reference}"))
    .arg(format!("oci:{}:pulled", out.display()));
    run_ok(cmd, Duration::from_secs(300));
    started.elapsed()
}

fn main() {
    require("skopeo");
    let rounds = env_or("PULL_ROUNDS", 5);
    let layer_kib = env_or("PULL_LAYER_KIB", 1024) as usize;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let registry = Registry::start(Shape::Anonymous, None);
    let image = images::multiarch(
        &dir.join("image"),
        "pull-bench",
        "1.0",
        10,
        layer_kib * 1024,
    );
    registry.push(&image, "acme/app", "1.0");
    let node = start_node(
        dir,
        "regatta",
        &format!(
            "[[backends]]\nid = \"hub\"\nurl = \"{}\"\nregion = \"eu\"\ndelivery = \"direct\"\n[[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\n",
            registry.url()
        ),
    );
    let direct = format!("{}/acme/app:1.0", registry.host());
    let gateway = format!("127.0.0.1:{}/acme/app:1.0", node.port);
    // One untimed pull each: caches on both sides as they are in steady use.
    pull(&direct, &dir.join("warm-direct"));
    pull(&gateway, &dir.join("warm-gateway"));
    let (mut straight, mut through) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let a = pull(&direct, &dir.join(format!("direct-{round}")));
        let b = pull(&gateway, &dir.join(format!("gateway-{round}")));
        let pulled = clients::read_layout(&dir.join(format!("gateway-{round}")));
        assert!(pulled
            .blobs
            .contains(&image.platform("amd64").config.digest));
        eprintln!(
            "round {}: direct {:.3}s, through regatta {:.3}s",
            round + 1,
            a.as_secs_f64(),
            b.as_secs_f64()
        );
        straight.push(a.as_secs_f64());
        through.push(b.as_secs_f64());
    }
    let (s, t) = (median(&mut straight), median(&mut through));
    println!(
        "\nskopeo pull of a 10-layer image ({} KiB layers), {rounds} alternated rounds",
        layer_kib
    );
    println!("straight from the backend: {:.3} s (median)", s);
    println!("through regatta:           {:.3} s (median)", t);
    println!("through / straight         = {:.3}", t / s);
}
