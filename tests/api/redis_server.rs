//! A real `redis-server` on a random loopback port, with an append-only file so that a
//! restart after a kill keeps what was written (as a production Redis would); optionally
//! with TLS and a password. Also a three-master Cluster and a Sentinel (with TLS and auth
//! when asked).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{free_port, require, wait_until, Proc};

/// TLS (a certificate for 127.0.0.1 signed by a test CA) and a password.
#[derive(Clone)]
pub struct Secured {
    pub password: String,
    /// The CA clients are told to trust.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Secured {
    /// A fresh CA and certificate in `dir`, and `password`.
    pub fn new(dir: &Path, password: &str) -> Secured {
        let (ca, cert, key) = crate::procs::ca_signed_cert(dir);
        Secured {
            password: password.into(),
            ca,
            cert,
            key,
        }
    }

    /// The `tls-*` options of a server (Redis or Sentinel) with this certificate.
    fn tls_options(&self, port: u16) -> Vec<String> {
        vec![
            "port 0".into(),
            format!("tls-port {port}"),
            format!("tls-cert-file {}", self.cert.display()),
            format!("tls-key-file {}", self.key.display()),
            format!("tls-ca-cert-file {}", self.ca.display()),
            "tls-auth-clients no".into(),
            "tls-replication yes".into(),
        ]
    }

    /// `redis-cli` with TLS and this password (through the environment, not argv).
    fn cli(&self, port: u16) -> Command {
        let mut cmd = Command::new("redis-cli");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--tls",
            "--cacert",
        ])
        .arg(&self.ca)
        .env("REDISCLI_AUTH", &self.password);
        cmd
    }
}

/// A TLS-capable client for the test's own commands.
fn client(url: &str, secured: Option<&Secured>) -> redis::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match secured {
        Some(s) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(&s.ca).unwrap()),
            },
        )
        .unwrap(),
        None => redis::Client::open(url).unwrap(),
    }
}

pub struct Redis {
    pub port: u16,
    pub secured: Option<Secured>,
    /// The master's port, for a replica.
    replica_of: Option<u16>,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(None, None)
    }

    /// A server that speaks only TLS and requires `secured`'s password.
    pub fn start_secured(secured: &Secured) -> Redis {
        Redis::start_with(Some(secured.clone()), None)
    }

    /// A replica of `master`, once it has synchronised.
    pub fn start_replica_of(master: &Redis) -> Redis {
        let replica = Redis::start_with(master.secured.clone(), Some(master.port));
        wait_until("the replica to sync", Duration::from_secs(20), || {
            replica
                .info("replication")
                .contains("master_link_status:up")
        });
        replica
    }

    fn start_with(secured: Option<Secured>, replica_of: Option<u16>) -> Redis {
        require("redis-server");
        let mut redis = Redis {
            port: free_port(),
            secured,
            replica_of,
            dir: tempfile::tempdir().unwrap(),
            proc: None,
        };
        redis.restart();
        redis
    }

    /// A section of `INFO`.
    pub fn info(&self, section: &str) -> String {
        self.query(redis::cmd("INFO").arg(section))
    }

    /// Starts (again) on the same port and data directory.
    pub fn restart(&mut self) {
        let mut options = vec![
            "bind 127.0.0.1".to_owned(),
            "save \"\"".into(),
            "appendonly yes".into(),
            "appendfsync always".into(),
            format!("dir {}", self.dir.path().display()),
        ];
        match &self.secured {
            Some(s) => {
                options.extend(s.tls_options(self.port));
                options.push(format!("requirepass {}", s.password));
            }
            None => options.push(format!("port {}", self.port)),
        }
        if let Some(master) = self.replica_of {
            options.push(format!("replicaof 127.0.0.1 {master}"));
            if let Some(s) = &self.secured {
                options.push(format!("masterauth {}", s.password));
            }
        }
        let conf = self.dir.path().join("redis.conf");
        std::fs::write(&conf, options.join("\n") + "\n").unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.arg(&conf);
        self.proc = Some(Proc::spawn(
            "redis-server",
            cmd,
            &self.dir.path().join("redis.log"),
        ));
        wait_until(
            "redis-server to answer PING",
            Duration::from_secs(20),
            || {
                self.client()
                    .get_connection_with_timeout(Duration::from_millis(200))
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

    /// The URL a node is given: `rediss://:password@...` when secured.
    pub fn url(&self) -> String {
        match &self.secured {
            Some(s) => format!("rediss://:{}@127.0.0.1:{}", s.password, self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn client(&self) -> redis::Client {
        client(&self.url(), self.secured.as_ref())
    }

    /// Runs one command from the test (writing garbage, reading what nodes wrote).
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut conn = self.client().get_connection().unwrap();
        cmd.query(&mut conn)
            .unwrap_or_else(|e| panic!("redis {cmd:?}: {e}"))
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

    /// Calls of one command (lower case, e.g. `hgetall`) the server has processed.
    pub fn calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.info("commandstats")
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Commands the server has processed, not counting the INFO calls that ask.
    pub fn commands_processed(&self) -> u64 {
        self.info("commandstats")
            .lines()
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

/// A Redis Cluster of three masters (no replicas) on random ports, optionally speaking
/// only TLS with a password. A slot whose master is gone does not stop the others
/// (`cluster-require-full-coverage no`).
pub struct RedisCluster {
    pub ports: Vec<u16>,
    pub secured: Option<Secured>,
    _dirs: Vec<tempfile::TempDir>,
    _procs: Vec<Proc>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(None)
    }

    pub fn start_secured(secured: &Secured) -> RedisCluster {
        RedisCluster::start_with(Some(secured.clone()))
    }

    fn start_with(secured: Option<Secured>) -> RedisCluster {
        require("redis-server");
        require("redis-cli");
        let mut cluster = RedisCluster {
            ports: Vec::new(),
            secured,
            _dirs: Vec::new(),
            _procs: Vec::new(),
        };
        for _ in 0..3 {
            let port = free_port();
            let dir = tempfile::tempdir().unwrap();
            let mut options = vec![
                "bind 127.0.0.1".to_owned(),
                "save \"\"".into(),
                "cluster-enabled yes".into(),
                "cluster-config-file nodes.conf".into(),
                "cluster-require-full-coverage no".into(),
                format!("dir {}", dir.path().display()),
            ];
            match &cluster.secured {
                Some(s) => {
                    options.extend(s.tls_options(port));
                    options.push("tls-cluster yes".into());
                    options.push(format!("requirepass {}", s.password));
                    options.push(format!("masterauth {}", s.password));
                }
                None => options.push(format!("port {port}")),
            }
            let conf = dir.path().join("redis.conf");
            std::fs::write(&conf, options.join("\n") + "\n").unwrap();
            let mut cmd = Command::new("redis-server");
            cmd.arg(&conf);
            cluster._procs.push(Proc::spawn(
                "redis-server",
                cmd,
                &dir.path().join("redis.log"),
            ));
            wait_until("a cluster node to listen", Duration::from_secs(20), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            cluster.ports.push(port);
            cluster._dirs.push(dir);
        }
        let mut create = cluster.redis_cli(cluster.ports[0]);
        create.args(["--cluster", "create"]);
        for p in &cluster.ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        crate::procs::run_ok(create, Duration::from_secs(60));
        wait_until("the cluster to report ok", Duration::from_secs(30), || {
            let mut info = cluster.redis_cli(cluster.ports[0]);
            info.args(["cluster", "info"]);
            crate::procs::run(info, Duration::from_secs(10))
                .stdout
                .windows(16)
                .any(|w| w == b"cluster_state:ok")
        });
        cluster
    }

    pub fn url(&self) -> String {
        self.url_naming(&self.ports)
    }

    /// A URL that lists only the nodes on `ports`.
    pub fn url_naming(&self, ports: &[u16]) -> String {
        let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        match &self.secured {
            Some(s) => format!("rediss+cluster://:{}@{}", s.password, hosts.join(",")),
            None => format!("redis+cluster://{}", hosts.join(",")),
        }
    }

    /// `redis-cli` for the node on `port` (TLS and password when secured).
    fn redis_cli(&self, port: u16) -> Command {
        match &self.secured {
            Some(s) => s.cli(port),
            None => {
                let mut cmd = Command::new("redis-cli");
                cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
                cmd
            }
        }
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let mut cmd = self.redis_cli(port);
        cmd.args(args);
        crate::procs::run_ok(cmd, Duration::from_secs(10))
            .trim()
            .to_owned()
    }

    /// The slot of `key` (or channel).
    pub fn slot(&self, key: &str) -> u16 {
        self.cli(self.ports[0], &["cluster", "keyslot", key])
            .parse()
            .unwrap()
    }

    /// The port of the master that owns `slot`, as the master on `asked` sees it.
    fn owner_seen_by(&self, asked: u16, slot: u16) -> Option<u16> {
        // `<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slots>...`
        self.cli(asked, &["cluster", "nodes"])
            .lines()
            .find_map(|l| {
                let fields: Vec<&str> = l.split(' ').collect();
                let covers = fields.iter().skip(8).any(|f| slot_in(f, slot));
                let port = fields.get(1)?.split('@').next()?.rsplit(':').next()?;
                covers.then(|| port.parse().ok()).flatten()
            })
    }

    /// The port of the master that owns `slot` now.
    pub fn owner(&self, slot: u16) -> u16 {
        self.owner_seen_by(self.ports[0], slot)
            .unwrap_or_else(|| panic!("no master owns slot {slot}"))
    }

    /// Moves an empty slot to the master on `port` (every master is told).
    pub fn move_slot(&self, slot: u16, port: u16) {
        let count = self.cli(
            self.owner(slot),
            &["cluster", "countkeysinslot", &slot.to_string()],
        );
        assert_eq!(
            count, "0",
            "slot {slot} holds keys; only empty slots are moved"
        );
        let id = self.cli(port, &["cluster", "myid"]);
        // The new owner first, then the others.
        for p in std::iter::once(port).chain(self.ports.iter().copied().filter(|&p| p != port)) {
            self.cli(p, &["cluster", "setslot", &slot.to_string(), "node", &id]);
        }
        wait_until(
            "every master to agree on the slot's owner",
            Duration::from_secs(10),
            || {
                self.ports
                    .iter()
                    .all(|&p| self.owner_seen_by(p, slot) == Some(port))
            },
        );
    }
}

/// Whether a `cluster nodes` slot field (`N` or `A-B`) covers `slot`.
fn slot_in(field: &str, slot: u16) -> bool {
    match field.split_once('-') {
        Some((a, b)) => match (a.parse::<u16>(), b.parse::<u16>()) {
            (Ok(a), Ok(b)) => a <= slot && slot <= b,
            _ => false,
        },
        None => field.parse::<u16>() == Ok(slot),
    }
}

/// A Redis master watched by one Sentinel, with a replica to fail over to when asked.
pub struct RedisSentinel {
    pub master: Redis,
    pub replica: Option<Redis>,
    pub sentinel_port: u16,
    sentinel_password: Option<String>,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl RedisSentinel {
    pub fn start() -> RedisSentinel {
        RedisSentinel::start_with(Redis::start(), None, None)
    }

    /// The master and the Sentinel speak only TLS (`secured`'s certificate); the master
    /// requires `secured`'s password, the Sentinel `sentinel_password`.
    pub fn start_secured(secured: &Secured, sentinel_password: &str) -> RedisSentinel {
        RedisSentinel::start_with(Redis::start_secured(secured), None, Some(sentinel_password))
    }

    /// A master with one replica, both known to the Sentinel.
    pub fn start_with_replica() -> RedisSentinel {
        let master = Redis::start();
        let replica = Redis::start_replica_of(&master);
        let sentinel = RedisSentinel::start_with(master, Some(replica), None);
        let port = sentinel.replica.as_ref().unwrap().port.to_string();
        wait_until(
            "the sentinel to know the replica",
            Duration::from_secs(20),
            || {
                sentinel
                    .ask(&["sentinel", "replicas", "regatta"])
                    .contains(&port)
            },
        );
        sentinel
    }

    fn start_with(
        master: Redis,
        replica: Option<Redis>,
        sentinel_password: Option<&str>,
    ) -> RedisSentinel {
        let dir = tempfile::tempdir().unwrap();
        let sentinel_port = free_port();
        let mut conf = vec![
            "bind 127.0.0.1".to_owned(),
            format!("dir {}", dir.path().display()),
        ];
        match &master.secured {
            Some(s) => conf.extend(s.tls_options(sentinel_port)),
            None => conf.push(format!("port {sentinel_port}")),
        }
        if let Some(p) = sentinel_password {
            conf.push(format!("requirepass {p}"));
        }
        conf.push(format!(
            "sentinel monitor regatta 127.0.0.1 {} 1",
            master.port
        ));
        if let Some(s) = &master.secured {
            conf.push(format!("sentinel auth-pass regatta {}", s.password));
        }
        let path = dir.path().join("sentinel.conf");
        std::fs::write(&path, conf.join("\n") + "\n").unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.arg(&path).arg("--sentinel");
        let proc = Proc::spawn("redis-sentinel", cmd, &dir.path().join("sentinel.log"));
        let sentinel = RedisSentinel {
            master,
            replica,
            sentinel_port,
            sentinel_password: sentinel_password.map(str::to_owned),
            _dir: dir,
            _proc: proc,
        };
        let port = sentinel.master.port.to_string();
        wait_until(
            "the sentinel to know its master",
            Duration::from_secs(20),
            || {
                sentinel
                    .ask(&["sentinel", "get-master-addr-by-name", "regatta"])
                    .contains(&port)
            },
        );
        sentinel
    }

    /// What the Sentinel answers to `args` (empty when it cannot be asked).
    fn ask(&self, args: &[&str]) -> String {
        let mut cmd = match (&self.master.secured, &self.sentinel_password) {
            (Some(s), password) => {
                let mut cmd = s.cli(self.sentinel_port);
                match password {
                    Some(p) => cmd.env("REDISCLI_AUTH", p),
                    None => cmd.env_remove("REDISCLI_AUTH"),
                };
                cmd
            }
            (None, _) => {
                let mut cmd = Command::new("redis-cli");
                cmd.args(["-p", &self.sentinel_port.to_string()]);
                cmd
            }
        };
        cmd.args(args);
        String::from_utf8_lossy(&crate::procs::run(cmd, Duration::from_secs(10)).stdout)
            .into_owned()
    }

    /// Makes the Sentinel promote the replica, and waits until it is the master and the
    /// old master follows it (writes the old master took in between would be lost: that
    /// is Redis's asynchronous replication, not something a client can repair). The old
    /// master is turned into a replica here, as the Sentinel would do on its next check
    /// (up to 10 s later).
    pub fn fail_over(&self) -> &Redis {
        let replica = self.replica.as_ref().expect("started with a replica");
        let port = replica.port.to_string();
        // A Sentinel refuses to promote a replica whose last INFO is older than 5 s
        // (NOGOODSLAVE), and asks replicas only every 10 s: ask again until it agrees.
        let mut answer = String::new();
        wait_until(
            "the sentinel to accept a failover",
            Duration::from_secs(30),
            || {
                answer = self.ask(&["sentinel", "failover", "regatta"]);
                answer.contains("OK") || !answer.contains("NOGOODSLAVE")
            },
        );
        assert!(answer.contains("OK"), "sentinel failover: {answer}");
        wait_until(
            "the replica to be the master",
            Duration::from_secs(30),
            || {
                self.ask(&["sentinel", "get-master-addr-by-name", "regatta"])
                    .contains(&port)
                    && replica.info("replication").contains("role:master")
            },
        );
        self.master
            .query::<()>(redis::cmd("REPLICAOF").arg("127.0.0.1").arg(replica.port));
        replica
    }

    /// The URL a node is given (the master's password in it when secured; the Sentinel's
    /// own password goes in `store.sentinel_password`).
    pub fn url(&self) -> String {
        match &self.master.secured {
            Some(s) => format!(
                "rediss+sentinel://:{}@127.0.0.1:{}/regatta",
                s.password, self.sentinel_port
            ),
            None => format!("redis+sentinel://127.0.0.1:{}/regatta", self.sentinel_port),
        }
    }
}
