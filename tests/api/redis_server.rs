//! A real `redis-server` on a random loopback port, with an append-only file so that a
//! restart after a kill keeps what was written (as a production Redis would).

use std::process::Command;
use std::time::Duration;

use crate::procs::{free_port, require, wait_until, Proc};

pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Redis {
    pub fn start() -> Redis {
        require("redis-server");
        let mut redis = Redis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            proc: None,
        };
        redis.restart();
        redis
    }

    /// Starts (again) on the same port and data directory.
    pub fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path());
        self.proc = Some(Proc::spawn(
            "redis-server",
            cmd,
            &self.dir.path().join("redis.log"),
        ));
        let url = self.url();
        wait_until(
            "redis-server to answer PING",
            Duration::from_secs(20),
            || {
                redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                    .is_ok()
            },
        );
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Waits until no command arrives for 300 ms (writes a node does off the request path
    /// have landed) and returns the count then.
    pub fn settled_commands(&self) -> u64 {
        let mut last = self.commands_processed();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.commands_processed();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// Commands the server has processed, not counting the INFO calls that ask.
    pub fn commands_processed(&self) -> u64 {
        let mut conn = redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut conn)
            .unwrap();
        info.lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter(|l| !l.starts_with("info:"))
            .filter_map(|l| {
                l.split_once("calls=")?
                    .1
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }
}
