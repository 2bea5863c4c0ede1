//! Memory benchmark: a node's resident memory with many holder facts learned, and while it
//! answers a flood of requests for invented names in a served org (each a cold lookup that
//! a backend answers 404). Prints RSS figures; asserts nothing about them.
//!
//! Run: `cargo bench --bench memory` (`MEMORY_FACTS`, default 1,000,000; `MEMORY_REQUESTS`,
//! default 1,000,000). The backend is a tiny in-process HTTP server on loopback that answers
//! every request 404 at once, so the figures are the gateway's own.

use std::sync::Arc;
use std::time::Instant;

use actix_web::dev::Service;
use actix_web::test::{init_service, TestRequest};
use actix_web::web;

use regatta::config::Settings;
use regatta::gateway::Gateway;
use regatta::model::Holding;
use regatta::oci::{Algorithm, Digest, RepoName};
use regatta::startup::registry_app;
use regatta::store::MemoryStore;
use regatta::upstream::Upstream;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident set size of this process, in MiB (Linux).
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A backend that answers every request `404` with a body, keeping connections alive.
fn not_found_backend() -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut out = stream;
                let body = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#;
                let answer = format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            if out.write_all(answer.as_bytes()).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    port
}

fn settings(port: u16) -> Settings {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.toml");
    std::fs::write(
        &path,
        format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            [log]
            filter = "off"
            [limits]
            cold_per_second = 0
            [[backends]]
            id = "hub"
            url = "http://127.0.0.1:{port}"
            delivery = "direct"
            [[backends]]
            id = "mirror"
            url = "http://127.0.0.1:{port}"
            delivery = "direct"
            [[orgs]]
            name = "acme"
            backends = ["hub", "mirror"]
            "#
        ),
    )
    .unwrap();
    Settings::load(Some(&path), std::iter::empty()).unwrap()
}

fn digest(i: u64, salt: &str) -> Digest {
    Digest::compute(Algorithm::Sha256, format!("{salt}{i}").as_bytes())
}

fn main() {
    let facts = env_or("MEMORY_FACTS", 1_000_000);
    let requests = env_or("MEMORY_REQUESTS", 1_000_000);
    let system = actix_web::rt::System::new();
    let settings = settings(not_found_backend());
    let gateway = web::Data::new(Gateway::new(
        &settings,
        "memory-bench".into(),
        Arc::new(MemoryStore::new()),
        Arc::new(regatta::metrics::Metrics::new()),
    ));
    let start = rss_mib();
    println!("rss at start: {start:.1} MiB");

    // Holder facts, as pulls of many images would teach them: 1,000 repositories.
    let names: Vec<RepoName> = (0..1000)
        .map(|i| RepoName::parse(&format!("acme/app{i}")).unwrap())
        .collect();
    let began = Instant::now();
    system.block_on(async {
        for i in 0..facts {
            let name = &names[(i % 1000) as usize];
            gateway
                .knowledge
                .learn(name, &digest(i, "layer"), (i % 2) as usize, Holding::Has)
                .await;
        }
    });
    let learned = rss_mib();
    println!(
        "rss after {facts} holder facts: {learned:.1} MiB (+{:.1} MiB, {:.0} bytes a fact, {:.1} s)",
        learned - start,
        (learned - start) * 1024.0 * 1024.0 / facts as f64,
        began.elapsed().as_secs_f64()
    );

    // Invented names in a served org: every request is a cold manifest lookup (a GET to
    // each backend, both answer 404), then a 404 to the client.
    let app = system.block_on(async {
        let upstream = Upstream::new(&settings.upstream, gateway.auth.clone());
        init_service(registry_app(gateway.clone(), upstream)).await
    });
    let began = Instant::now();
    let step = (requests / 4).max(1);
    system.block_on(async {
        for i in 0..requests {
            let uri = format!("/v2/acme/random{i:x}/manifests/{}", digest(i, "invented"));
            let response = app
                .call(TestRequest::get().uri(&uri).to_request())
                .await
                .unwrap();
            assert_eq!(response.status(), 404);
            if (i + 1) % step == 0 {
                println!(
                    "rss after {} requests for invented names: {:.1} MiB ({:.0} req/s)",
                    i + 1,
                    rss_mib(),
                    (i + 1) as f64 / began.elapsed().as_secs_f64()
                );
            }
        }
    });
    println!(
        "rss at the end: {:.1} MiB (budgets: holders {} MiB, lacks {} MiB, tags {} MiB, urls {} MiB, manifests {} MiB)",
        rss_mib(),
        settings.cache.holder_bytes >> 20,
        settings.cache.lacks_bytes >> 20,
        settings.cache.tag_bytes >> 20,
        settings.cache.url_bytes >> 20,
        settings.cache.manifest_bytes >> 20,
    );
}
