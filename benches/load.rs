//! Load benchmark: one regatta node (release build, memory store, holder knowledge warmed by a
//! real skopeo pull) against nginx `return 307` and the seed's Caddy facade
//! (`redir BACKEND{uri} 307`) on the same machine, driven by wrk on the same warm blob URL
//! with the same connections and duration, in interleaved rounds. A Redis-backed node runs in
//! the same rounds, and the Redis commands it sent meanwhile are counted.
//!
//! Two fair pairs: with access logs off (regatta's off, nginx `access_log off`), and with
//! each server's default access log on (regatta's JSON lines on stderr, collected in a file;
//! nginx's default `combined` format to a file with `buffer=64k`).
//!
//! Prints requests/s and p50/p99 per server and the ratios; asserts nothing about time.
//! Run: `bash benches/load/run.sh` (installs wrk, nginx, caddy) or `cargo bench --bench load`.
//! Knobs: LOAD_ROUNDS (3), LOAD_SECONDS (5), LOAD_CONNECTIONS (64), LOAD_TARGETS (a comma
//! list of the servers to drive, all when unset).

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
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use procs::{free_port, require, run_ok, wait_until, Proc};
use registry::{Registry, Shape};
use support::{
    env_or, median, start_nginx, start_nginx_logging, start_node, start_node_logging, wrk, Samples,
};

struct Target {
    name: &'static str,
    port: u16,
    path: String,
}

fn start_caddy(dir: &Path, backend: &str) -> (Proc, u16) {
    require("caddy");
    let port = free_port();
    let file = dir.join("Caddyfile");
    std::fs::write(
        &file,
        format!("{{\n  admin off\n  auto_https off\n}}\nhttp://127.0.0.1:{port} {{\n  redir {backend}{{uri}} 307\n}}\n"),
    )
    .unwrap();
    let mut cmd = Command::new("caddy");
    cmd.args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&file)
        .env("HOME", dir);
    if let Ok(workers) = std::env::var("LOAD_WORKERS") {
        cmd.env("GOMAXPROCS", workers);
    }
    let proc = Proc::spawn("caddy", cmd, &dir.join("caddy.out"));
    wait_until("caddy", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (proc, port)
}

fn main() {
    require("wrk");
    let rounds = env_or("LOAD_ROUNDS", 3);
    let seconds = env_or("LOAD_SECONDS", 5);
    let connections = env_or("LOAD_CONNECTIONS", 64);
    let only = std::env::var("LOAD_TARGETS").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|t| t.trim() == name))
    };
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();

    let registry = Registry::start(Shape::Anonymous, None);
    let image = images::multiarch(&dir.join("image"), "load", "1.0", 3, 64 * 1024);
    registry.push(&image, "acme/app", "1.0");
    let backend = registry.url();
    let org = format!(
        "[[backends]]\nid = \"hub\"\nurl = \"{backend}\"\nregion = \"eu\"\ndelivery = \"direct\"\n[[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\n"
    );
    let memory_node = start_node(dir, "regatta", &org);
    let logging_node = start_node_logging(dir, "regatta-log", "", &org);
    let redis = redis_server::Redis::start();
    let redis_node = start_node(
        dir,
        "regatta-redis",
        &format!("[store]\ntype = \"redis\"\nurl = \"{}\"\n[health]\ninterval = \"1h\"\n[cluster]\nrefresh_interval = \"1h\"\n{org}", redis.url()),
    );
    // Warm both nodes with a real pull: tag, manifests and layer holders are then known.
    for node in [&memory_node, &logging_node, &redis_node] {
        let mut pull = Command::new("skopeo");
        pull.args([
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
        ])
        .arg(format!("docker://127.0.0.1:{}/acme/app:1.0", node.port))
        .arg(format!(
            "oci:{}:warm",
            dir.join(format!("warm-{}", node.port)).display()
        ));
        run_ok(pull, Duration::from_secs(120));
    }
    let (_nginx, nginx_port) = start_nginx(dir, &backend);
    let (_nginx_log, nginx_log_port) = start_nginx_logging(
        dir,
        "nginx-log",
        &backend,
        &format!("{}/nginx-access.log combined buffer=64k", dir.display()),
    );
    let caddy = wanted("caddy-facade").then(|| start_caddy(dir, &backend));
    let caddy_port = caddy.as_ref().map_or(0, |c| c.1);

    let path = format!(
        "/v2/acme/app/blobs/{}",
        image.platform("amd64").layers[2].digest
    );
    let mut targets = vec![
        Target {
            name: "regatta",
            port: memory_node.port,
            path: path.clone(),
        },
        Target {
            name: "regatta+log",
            port: logging_node.port,
            path: path.clone(),
        },
        Target {
            name: "nginx+log",
            port: nginx_log_port,
            path: path.clone(),
        },
        Target {
            name: "regatta+redis",
            port: redis_node.port,
            path: path.clone(),
        },
        Target {
            name: "nginx-307",
            port: nginx_port,
            path: path.clone(),
        },
        Target {
            name: "caddy-facade",
            port: caddy_port,
            path: path.clone(),
        },
    ];
    // The HTTP stack's own ceiling: the same node answering its trivial /healthz.
    if std::env::var("LOAD_BASELINE").is_ok() {
        targets.push(Target {
            name: "regatta-healthz",
            port: memory_node.port,
            path: "/healthz".into(),
        });
    }
    targets.retain(|t| wanted(t.name));
    let mut results: BTreeMap<&str, Samples> = BTreeMap::new();
    let redis_before = redis.settled_commands();
    let mut redis_during = 0;
    for round in 0..rounds {
        for t in &targets {
            let before = (t.name == "regatta+redis").then(|| redis.commands_processed());
            wrk(
                &format!("http://127.0.0.1:{}{}", t.port, t.path),
                seconds,
                connections,
                results.entry(t.name).or_default(),
            );
            if let Some(before) = before {
                redis_during += redis.commands_processed() - before;
            }
            eprintln!(
                "round {} {}: {:.0} req/s",
                round + 1,
                t.name,
                results[t.name].rps.last().unwrap()
            );
        }
    }
    let _ = redis_before;

    println!("\nwarm blob redirect, {rounds} interleaved rounds of {seconds}s, {connections} connections, wrk -t1");
    println!(
        "{:<15} {:>12} {:>10} {:>10}",
        "server", "req/s", "p50 ms", "p99 ms"
    );
    let mut rps = BTreeMap::new();
    for t in &targets {
        let s = results.get_mut(t.name).unwrap();
        let (r, p50, p99) = (
            median(&mut s.rps),
            median(&mut s.p50_ms),
            median(&mut s.p99_ms),
        );
        rps.insert(t.name, r);
        println!("{:<15} {:>12.0} {:>10.3} {:>10.3}", t.name, r, p50, p99);
    }
    for (a, b) in [
        ("regatta", "nginx-307"),
        ("regatta+log", "nginx+log"),
        ("regatta", "caddy-facade"),
        ("regatta+redis", "nginx-307"),
    ] {
        if let (Some(x), Some(y)) = (rps.get(a), rps.get(b)) {
            println!("{:<28} = {:.2}", format!("{a} / {b}"), x / y);
        }
    }
    let lines = std::fs::read_to_string(&logging_node.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(r#""kind":"access""#))
        .count();
    println!("access log lines written by regatta+log: {lines}");
    println!("redis commands during the regatta+redis runs: {redis_during}");
}
