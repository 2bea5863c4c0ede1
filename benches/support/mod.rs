//! Shared by the benchmarks: a release-build regatta node as its own process, nginx
//! `return 307`, and wrk runs with their samples.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::helpers::NodeProcess;
use crate::procs::{free_port, require, run_ok, wait_until, Proc};

/// A release-build node with `extra` configuration, JSON logs at `warn`, its access log
/// off, and `LOAD_WORKERS` workers when that is set.
pub fn start_node(dir: &Path, name: &str, extra: &str) -> NodeProcess {
    start_node_logging(dir, name, "[access_log]\nenabled = false\n", extra)
}

/// The same with `access_log` as its `[access_log]` section (its default configuration when
/// empty: JSON lines on stderr, which the node's log file collects).
pub fn start_node_logging(dir: &Path, name: &str, access_log: &str, extra: &str) -> NodeProcess {
    start_node_under(&[], dir, name, access_log, extra)
}

/// The same run by `wrapper` (a profiler's command line).
pub fn start_node_under(
    wrapper: &[String],
    dir: &Path,
    name: &str,
    access_log: &str,
    extra: &str,
) -> NodeProcess {
    let workers = std::env::var("LOAD_WORKERS")
        .map(|w| format!("workers = {w}\n"))
        .unwrap_or_default();
    NodeProcess::start_under(
        wrapper,
        crate::procs::free_port(),
        dir,
        name,
        &format!(
            "region = \"eu\"\n{workers}[log]\nformat = \"json\"\nfilter = \"warn\"\n{access_log}{extra}"
        ),
        &[],
    )
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
pub struct Samples {
    pub rps: Vec<f64>,
    pub p50_ms: Vec<f64>,
    pub p99_ms: Vec<f64>,
}

/// A server stopped with SIGTERM (then SIGKILL after 10 s): an nginx master killed outright
/// leaves its workers running.
pub struct Graceful(pub Proc);

impl Drop for Graceful {
    fn drop(&mut self) {
        self.0.terminate();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.0.exited() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0.stop();
    }
}

/// nginx answering every request with `307 BACKEND$request_uri`, access log off.
pub fn start_nginx(dir: &Path, backend: &str) -> (Graceful, u16) {
    start_nginx_logging(dir, "nginx-307", backend, "off")
}

/// The same, named `name`, with `access_log` as its `access_log` directive (e.g. nginx's
/// default format to a file with its buffer: `/path buffer=64k`).
pub fn start_nginx_logging(
    dir: &Path,
    name: &str,
    backend: &str,
    access_log: &str,
) -> (Graceful, u16) {
    require("nginx");
    let port = free_port();
    let d = dir.display();
    let conf = dir.join(format!("{name}.conf"));
    let workers = std::env::var("LOAD_WORKERS").unwrap_or_else(|_| "auto".into());
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes {workers};\npid {d}/{name}.pid;\nerror_log {d}/{name}-error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {access_log};\n  client_body_temp_path {d}/nb;\n  proxy_temp_path {d}/np;\n  fastcgi_temp_path {d}/nf;\n  uwsgi_temp_path {d}/nu;\n  scgi_temp_path {d}/ns;\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{ return 307 {backend}$request_uri; }}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join(format!("{name}-error.log")));
    let proc = Proc::spawn("nginx", cmd, &dir.join(format!("{name}.out")));
    wait_until("nginx", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (Graceful(proc), port)
}

/// `"1.23ms"` -> 1.23
fn millis(text: &str) -> f64 {
    let (num, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

/// `wrk -t1 --latency` on `url`; adds req/s, p50 and p99 to `samples`. Any answer other
/// than 2xx/3xx fails the run.
pub fn wrk(url: &str, seconds: u64, connections: u64, samples: &mut Samples) {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
        "--latency",
        url,
    ]);
    let out = run_ok(cmd, Duration::from_secs(seconds + 60));
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => samples.rps.push(v.parse().unwrap()),
            ["50%", v] => samples.p50_ms.push(millis(v)),
            ["99%", v] => samples.p99_ms.push(millis(v)),
            _ => {}
        }
    }
    let non_3xx = out.lines().find(|l| l.contains("Non-2xx or 3xx"));
    assert!(
        non_3xx.is_none(),
        "{url} answered errors under load:\n{out}"
    );
}
