//! archeio (the redirector behind registry.k8s.io) and regatta side by side, on the same
//! machine, backend and load.
//!
//! archeio runs unchanged: `UPSTREAM_REGISTRY_ENDPOINT` is a local `docker-registry` holding
//! the image, `UPSTREAM_REGISTRY_PATH` is empty, and `DEFAULT_AWS_BASE_URL` (the bucket a
//! client outside every cloud range is sent to; loopback is outside them) is a local nginx
//! serving the same blobs at `/containers/images/<digest>`, the layout archeio expects of its
//! buckets. A warm blob request is then archeio's production fast path: client-IP lookup, a
//! cached HEAD result, a 307 to the bucket. regatta (release build, memory store) fronts the
//! same registry with `delivery = "direct"` and is warmed by a real pull.
//!
//! Measured in interleaved rounds with the same wrk load: the same warm blob path and the
//! same manifest path on each (archeio answers a manifest with a 307 to the upstream,
//! regatta with the manifest itself), nginx `return 307` on the blob path as the reference,
//! and a skopeo pull through each (digests checked). Prints req/s, p50/p99 and the ratios;
//! asserts nothing about time.
//!
//! Run: `bash benches/archeio/run.sh` (builds archeio from a checkout of
//! kubernetes/registry.k8s.io named by `ARCHEIO_SRC`, or takes `ARCHEIO_BIN`).
//! Knobs: LOAD_ROUNDS (3), LOAD_SECONDS (5), LOAD_CONNECTIONS (32), LOAD_WORKERS,
//! PULL_ROUNDS (5).

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

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use procs::{free_port, require, wait_until, Proc};
use registry::{Registry, Shape};
use support::{env_or, median, start_nginx, start_node, wrk, Samples};

/// archeio on a free port (it listens on every interface; only loopback is ever asked).
fn start_archeio(dir: &Path, upstream: &str, bucket: &str) -> (Proc, u16) {
    let bin = std::env::var("ARCHEIO_BIN").unwrap_or_else(|_| "archeio".into());
    let port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.env("PORT", port.to_string())
        .env("UPSTREAM_REGISTRY_ENDPOINT", upstream)
        .env("UPSTREAM_REGISTRY_PATH", "")
        .env("DEFAULT_AWS_BASE_URL", bucket);
    if let Ok(workers) = std::env::var("LOAD_WORKERS") {
        cmd.env("GOMAXPROCS", workers);
    }
    let proc = Proc::spawn("archeio", cmd, &dir.join("archeio.log"));
    wait_until("archeio", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (proc, port)
}

/// One skopeo pull of every platform through `host`; its duration, digests checked.
fn pull(host: &str, image: &images::Image, out: &Path) -> Duration {
    let started = Instant::now();
    let pulled = clients::skopeo_pull(&format!("{host}/acme/app:1.0"), out);
    let took = started.elapsed();
    assert_eq!(pulled.top, image.index.digest, "pull through {host}");
    assert_eq!(pulled.blobs, image.all_digests(), "pull through {host}");
    took
}

/// The `Location` of one GET of `url` (wrk does not follow redirects; this shows where).
fn location(url: &str) -> String {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        url,
    ]);
    procs::run_ok(cmd, Duration::from_secs(30))
}

fn main() {
    require("wrk");
    require("curl");
    let rounds = env_or("LOAD_ROUNDS", 3);
    let seconds = env_or("LOAD_SECONDS", 5);
    let connections = env_or("LOAD_CONNECTIONS", 32);
    let pull_rounds = env_or("PULL_ROUNDS", 5);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();

    let registry = Registry::start(Shape::Anonymous, None);
    let image = images::multiarch(&dir.join("image"), "archeio", "1.0", 3, 64 * 1024);
    registry.push(&image, "acme/app", "1.0");
    let backend = registry.url();

    // The bucket: every blob of the image at /containers/images/<digest>.
    let bucket_root = dir.join("bucket");
    let objects = bucket_root.join("containers/images");
    std::fs::create_dir_all(&objects).unwrap();
    for digest in image.all_digests() {
        let hex = digest.trim_start_matches("sha256:");
        std::fs::copy(
            image.dir.join("blobs/sha256").join(hex),
            objects.join(&digest),
        )
        .unwrap();
    }
    let bucket_dir = dir.join("bucket-nginx");
    std::fs::create_dir_all(&bucket_dir).unwrap();
    let bucket_port = free_port();
    let _bucket = registry::start_cdn(&bucket_dir, &bucket_root, bucket_port);
    wait_until("the bucket", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", bucket_port)).is_ok()
    });
    let bucket = format!("http://127.0.0.1:{bucket_port}");
    let (_archeio, archeio_port) = start_archeio(dir, &backend, &bucket);
    let node = start_node(
        dir,
        "regatta",
        &format!(
            "[[backends]]\nid = \"hub\"\nurl = \"{backend}\"\nregion = \"eu\"\ndelivery = \"direct\"\n[[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\n"
        ),
    );
    let (_nginx, nginx_port) = start_nginx(dir, &backend);
    let hosts = [
        ("regatta", format!("127.0.0.1:{}", node.port)),
        ("archeio", format!("127.0.0.1:{archeio_port}")),
    ];

    // Warm both with a real pull (regatta learns tag, manifests and holders; archeio caches
    // the bucket's answers), then time pulls through each, alternated.
    let mut pulls: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (name, host) in &hosts {
        pull(host, &image, &dir.join(format!("warm-{name}")));
    }
    for round in 0..pull_rounds {
        for (name, host) in &hosts {
            let out = dir.join(format!("pull-{name}-{round}"));
            let took = pull(host, &image, &out);
            pulls.entry(name).or_default().push(took.as_secs_f64());
        }
    }

    let blob = format!(
        "/v2/acme/app/blobs/{}",
        image.platform("amd64").layers[2].digest
    );
    let manifest = format!(
        "/v2/acme/app/manifests/{}",
        image.platform("amd64").manifest.digest
    );
    let targets: Vec<(&str, u16, &str)> = vec![
        ("regatta blob", node.port, &blob),
        ("archeio blob", archeio_port, &blob),
        ("nginx-307 blob", nginx_port, &blob),
        ("regatta manifest", node.port, &manifest),
        ("archeio manifest", archeio_port, &manifest),
    ];
    println!("what each answers:");
    for (name, port, path) in &targets {
        println!(
            "  {name:<17} {}",
            location(&format!("http://127.0.0.1:{port}{path}"))
        );
    }
    let mut results: BTreeMap<&str, Samples> = BTreeMap::new();
    for round in 0..rounds {
        for (name, port, path) in &targets {
            wrk(
                &format!("http://127.0.0.1:{port}{path}"),
                seconds,
                connections,
                results.entry(name).or_default(),
            );
            eprintln!(
                "round {} {name}: {:.0} req/s",
                round + 1,
                results[name].rps.last().unwrap()
            );
        }
    }

    println!("\n{rounds} interleaved rounds of {seconds}s, {connections} connections, wrk -t1");
    println!(
        "{:<17} {:>12} {:>10} {:>10}",
        "server, path", "req/s", "p50 ms", "p99 ms"
    );
    let mut rps = BTreeMap::new();
    for (name, _, _) in &targets {
        let s = results.get_mut(name).unwrap();
        let (r, p50, p99) = (
            median(&mut s.rps),
            median(&mut s.p50_ms),
            median(&mut s.p99_ms),
        );
        rps.insert(*name, r);
        println!("{name:<17} {r:>12.0} {p50:>10.3} {p99:>10.3}");
    }
    println!(
        "blob:     regatta / archeio = {:.2}, archeio / nginx-307 = {:.2}",
        rps["regatta blob"] / rps["archeio blob"],
        rps["archeio blob"] / rps["nginx-307 blob"]
    );
    println!(
        "manifest: regatta / archeio = {:.2} (archeio redirects, regatta serves the bytes)",
        rps["regatta manifest"] / rps["archeio manifest"]
    );
    let (r, a) = (
        median(pulls.get_mut("regatta").unwrap()),
        median(pulls.get_mut("archeio").unwrap()),
    );
    println!(
        "skopeo pull (median of {pull_rounds}): regatta {r:.3} s, archeio {a:.3} s, ratio {:.2}",
        r / a
    );
}
