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

/// A Redis Cluster of three masters (no replicas) on random ports.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _dirs: Vec<tempfile::TempDir>,
    _procs: Vec<Proc>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        require("redis-server");
        require("redis-cli");
        let mut ports = Vec::new();
        let mut dirs = Vec::new();
        let mut procs = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let dir = tempfile::tempdir().unwrap();
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .arg("--dir")
            .arg(dir.path());
            procs.push(Proc::spawn(
                "redis-server",
                cmd,
                &dir.path().join("redis.log"),
            ));
            wait_until("a cluster node to listen", Duration::from_secs(20), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            ports.push(port);
            dirs.push(dir);
        }
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        crate::procs::run_ok(create, Duration::from_secs(60));
        let first = ports[0];
        wait_until("the cluster to report ok", Duration::from_secs(30), || {
            let mut info = Command::new("redis-cli");
            info.args(["-p", &first.to_string(), "cluster", "info"]);
            crate::procs::run(info, Duration::from_secs(10))
                .stdout
                .windows(16)
                .any(|w| w == b"cluster_state:ok")
        });
        RedisCluster {
            ports,
            _dirs: dirs,
            _procs: procs,
        }
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

/// A Redis master watched by one Sentinel.
pub struct RedisSentinel {
    pub master: Redis,
    pub sentinel_port: u16,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl RedisSentinel {
    pub fn start() -> RedisSentinel {
        let master = Redis::start();
        let dir = tempfile::tempdir().unwrap();
        let sentinel_port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "bind 127.0.0.1\nport {sentinel_port}\ndir {}\nsentinel monitor regatta 127.0.0.1 {} 1\n",
                dir.path().display(),
                master.port
            ),
        )
        .unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.arg(&conf).arg("--sentinel");
        let proc = Proc::spawn("redis-sentinel", cmd, &dir.path().join("sentinel.log"));
        wait_until(
            "the sentinel to know its master",
            Duration::from_secs(20),
            || {
                let mut ask = Command::new("redis-cli");
                ask.args([
                    "-p",
                    &sentinel_port.to_string(),
                    "sentinel",
                    "get-master-addr-by-name",
                    "regatta",
                ]);
                String::from_utf8_lossy(&crate::procs::run(ask, Duration::from_secs(10)).stdout)
                    .contains(&master.port.to_string())
            },
        );
        RedisSentinel {
            master,
            sentinel_port,
            _dir: dir,
            _proc: proc,
        }
    }

    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/regatta", self.sentinel_port)
    }
}
