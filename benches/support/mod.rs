//! Shared by the load and pull benchmarks: a release-build regatta node as its own process.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::procs::{free_port, wait_until, Proc};

pub struct Node {
    pub port: u16,
    _proc: Proc,
}

impl Node {
    /// Starts `regatta serve` with `extra` configuration (backends, orgs, store) under `dir`.
    pub fn start(dir: &Path, name: &str, extra: &str) -> Node {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nregion = \"eu\"\n{workers}[log]\nformat = \"json\"\nfilter = \"warn\"\n{extra}",
                workers = std::env::var("LOAD_WORKERS").map(|w| format!("workers = {w}\n")).unwrap_or_default(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
        cmd.arg("serve").arg("--config").arg(&config);
        let proc = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")));
        wait_until(
            &format!("{name} to listen"),
            Duration::from_secs(30),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        Node { port, _proc: proc }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
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
