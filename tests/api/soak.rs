//! Chaos soak: two nodes on Redis behind a Sentinel (with a replica), two backends holding
//! the same image, skopeo pulls and wrk load through the nodes, while the backends are
//! killed and restarted, Redis fails over and a node restarts. Every pull must complete (a
//! client retries through the other node, as behind a load balancer) with every digest
//! right. CI runs it for `REGATTA_SOAK_SECS` (default 40); longer by hand:
//! `REGATTA_SOAK_SECS=1800 cargo test --test api soak -- --nocapture`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clients::try_skopeo_pull;
use crate::helpers::NodeProcess;
use crate::images;
use crate::procs::{require, run};
use crate::redis_server::RedisSentinel;
use crate::registry::{Registry, Shape};

/// Resident memory of a process, in MiB.
fn rss_mib(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A number wrk printed after `label`, e.g. `Non-2xx or 3xx responses: 12`.
fn wrk_count(output: &str, label: &str) -> u64 {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.trim_end_matches(',').parse().ok())
        .unwrap_or(0)
}

#[actix_web::test]
async fn chaos_soak_loses_no_pull_and_serves_no_wrong_digest() {
    require("wrk");
    let secs: u64 = std::env::var("REGATTA_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let sentinel = RedisSentinel::start_with_replica();
    let mut a = Registry::start(Shape::Anonymous, None);
    let mut b = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "soak", "1.0", 3, 64 * 1024);
    a.push(&image, "acme/app", "1.0");
    b.push(&image, "acme/app", "1.0");
    let sections = format!(
        "[store]\ntype = \"redis\"\nurl = \"{}\"\n[health]\ninterval = \"300ms\"\ntimeout = \"1s\"\nfall = 2\nrise = 1\n\
         [log]\nformat = \"json\"\nfilter = \"warn\"\n[limits]\ncold_per_second = 0\n\
         [[backends]]\nid = \"a\"\nurl = \"{}\"\ndelivery = \"direct\"\n\
         [[backends]]\nid = \"b\"\nurl = \"{}\"\ndelivery = \"direct\"\n\
         [[orgs]]\nname = \"acme\"\nbackends = [\"a\", \"b\"]\ntag_ttl = \"2s\"\n",
        sentinel.url(),
        a.url(),
        b.url()
    );
    let mut nodes = vec![
        NodeProcess::start(work.path(), "soak-0", &sections, &[]),
        NodeProcess::start(work.path(), "soak-1", &sections, &[]),
    ];
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let rss_start: Vec<f64> = nodes.iter().map(|n| rss_mib(n.proc.pid())).collect();
    let deadline = Instant::now() + Duration::from_secs(secs);

    // Load on a warm blob path of node 1 (node 0 is the one restarted).
    let layer = image.platform("amd64").layers[0].digest.clone();
    let mut wrk = std::process::Command::new("wrk");
    wrk.args(["-t1", "-c4", &format!("-d{secs}s")]).arg(format!(
        "http://127.0.0.1:{}/v2/acme/app/blobs/{layer}",
        ports[1]
    ));
    let load = std::thread::spawn(move || run(wrk, Duration::from_secs(secs + 60)));

    // Pulls, one after another, alternating nodes; a failed pull is retried once through
    // the other node.
    let done = Arc::new(AtomicBool::new(false));
    let (pulls, failed, wrong) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let puller = {
        let (done, pulls, failed, wrong) =
            (done.clone(), pulls.clone(), failed.clone(), wrong.clone());
        let (dir, want, ports) = (
            work.path().join("pulls"),
            image.all_digests(),
            ports.clone(),
        );
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut i = 0usize;
            while !done.load(Ordering::SeqCst) {
                let attempt = |port: u16, n: usize| {
                    let out = dir.join(format!("pull-{i}-{n}"));
                    std::fs::create_dir_all(&out).unwrap();
                    try_skopeo_pull(&format!("127.0.0.1:{port}/acme/app:1.0"), &out, 3)
                };
                let result = attempt(ports[i % 2], 0).or_else(|_| attempt(ports[(i + 1) % 2], 1));
                match result {
                    Ok(pulled) if pulled.blobs == want => {}
                    Ok(pulled) => {
                        wrong.fetch_add(1, Ordering::SeqCst);
                        failures.push(format!("pull {i}: digests {:?}", pulled.blobs));
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        failures.push(format!("pull {i}: {e}"));
                    }
                }
                pulls.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
            failures
        })
    };

    // The chaos, spread over the run. The schedule is by the clock on purpose: this is a
    // soak, not a wait for a condition.
    let step = Duration::from_secs(secs / 5).max(Duration::from_secs(3));
    let mut events = Vec::new();
    let mut round = 0;
    while Instant::now() + step < deadline {
        std::thread::sleep(step / 2);
        match round % 4 {
            0 => {
                a.stop();
                std::thread::sleep(step / 2);
                a.restart();
                events.push("backend a killed and restarted");
            }
            1 if round < 4 => {
                sentinel.fail_over();
                events.push("redis failed over to the replica");
            }
            2 => {
                let port = nodes[0].port;
                nodes.remove(0);
                nodes.insert(
                    0,
                    NodeProcess::start_on(
                        port,
                        work.path(),
                        &format!("soak-0-{round}"),
                        &sections,
                        &[],
                    ),
                );
                events.push("node 0 restarted");
            }
            _ => {
                b.stop();
                std::thread::sleep(step / 2);
                b.restart();
                events.push("backend b killed and restarted");
            }
        }
        round += 1;
    }
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    done.store(true, Ordering::SeqCst);
    let failures = puller.join().expect("the pull loop ends");
    let load = load.join().expect("wrk ends");
    let wrk_out = String::from_utf8_lossy(&load.stdout).into_owned();
    let rss_end: Vec<f64> = nodes.iter().map(|n| rss_mib(n.proc.pid())).collect();

    println!(
        "soak {secs}s: {} pulls, {} failed after a retry, {} with wrong digests; chaos: {events:?}",
        pulls.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        wrong.load(Ordering::SeqCst)
    );
    println!(
        "wrk on node 1: {} requests, non-2xx/3xx {}, socket errors: {}",
        wrk_out
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("?"),
        wrk_count(&wrk_out, "Non-2xx or 3xx responses:"),
        wrk_out
            .lines()
            .find(|l| l.contains("Socket errors"))
            .unwrap_or("none")
            .trim()
    );
    println!("rss per node, start -> end (MiB): {rss_start:?} -> {rss_end:?} (node 0 restarted)");
    assert!(pulls.load(Ordering::SeqCst) > 0, "no pull ran");
    assert!(
        failures.is_empty(),
        "pulls failed or got wrong digests:\n{}",
        failures.join("\n")
    );
    assert_eq!(
        wrk_count(&wrk_out, "Non-2xx or 3xx responses:"),
        0,
        "the warm path answered errors:\n{wrk_out}"
    );
}
