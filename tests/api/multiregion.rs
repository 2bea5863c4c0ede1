//! Two regions behind one anycast address, on one machine: network namespaces for a router
//! (BIRD, AS 65000) with a client behind it and for the regions `eu` and `us`, each with a
//! regatta node bound to the anycast address, a `docker-registry` backend holding the same
//! image, Redis (primary in eu, replica in us), a Sentinel, and BIRD announcing the address
//! while `deploy/anycast/anycast-health.sh` finds the node's `/readyz` answering 200. A third
//! Sentinel, the witness, runs in the router's namespace.
//!
//! Every file of `deploy/anycast/` is used as it is; `deploy/MULTI-REGION.md` describes the
//! same steps. The figures the closing note needs are printed (`--nocapture`) as lines
//! starting `multiregion:`.
//!
//! Addresses: anycast 10.99.0.1/32 on each region's `lo`; links 10.99.1.0/24 (router .1, eu
//! .2), 10.99.2.0/24 (router .1, us .2), 10.99.3.0/24 (router .1, client .2). They exist
//! only inside the namespaces this test makes, which are deleted when it ends, failed or not.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clients::{read_layout, Pulled};
use crate::helpers::ADMIN_TOKEN;
use crate::images::{self, Image};
use crate::procs::{require, run, wait_until, Proc};
use crate::registry::{Registry, Shape};

const ANYCAST: &str = "10.99.0.1";
const EU: &str = "10.99.1.2";
const US: &str = "10.99.2.2";
const CLIENT: &str = "10.99.3.2";
const ROUTER: &str = "10.99.3.1";

fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/anycast")
        .join(name)
}

/// The test's namespaces, deleted when dropped (declared before every process, so they
/// go last, after the processes in them are killed).
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn create(prefix: &str, roles: &[&str]) -> Namespaces {
        let mut made = Namespaces { names: Vec::new() };
        for role in roles {
            let name = format!("{prefix}-{role}");
            sh(&["ip", "netns", "add", &name]);
            made.names.push(name.clone());
            sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        }
        made
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// On a failure, prints the end of every log under a directory (the test's work directory
/// goes with the test).
struct LogsOnFailure<'a>(&'a Path);

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.0)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("==> {} <==", log.display());
            for line in &lines[lines.len().saturating_sub(25)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs a short command and panics with its output unless it succeeds.
fn sh(args: &[&str]) -> String {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]);
    let out = run(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

fn run_in(ns: &str, args: &[&str]) -> Output {
    run(in_ns(ns, args), Duration::from_secs(30))
}

/// A veth pair between two namespaces, addressed and up.
fn link(a: &str, a_dev: &str, a_addr: &str, b: &str, b_dev: &str, b_addr: &str) {
    sh(&[
        "ip", "-n", a, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b,
    ]);
    for (ns, dev, addr) in [(a, a_dev, a_addr), (b, b_dev, b_addr)] {
        sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
}

/// Where the router's kernel sends the anycast address now (the next hop), if anywhere.
fn route_via(router: &str) -> Option<String> {
    let out = sh(&[
        "ip",
        "-n",
        router,
        "route",
        "show",
        &format!("{ANYCAST}/32"),
    ]);
    let mut words = out.split_whitespace();
    words.find(|w| *w == "via")?;
    words.next().map(str::to_owned)
}

/// Polls the router's route until it points at `via`; returns how long that took.
fn route_moves_to(router: &str, via: &str, since: Instant, limit: Duration) -> Duration {
    loop {
        if route_via(router).as_deref() == Some(via) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "the route to {ANYCAST} did not move to {via} within {limit:?} (now {:?})",
            route_via(router)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One region's processes.
struct Region {
    ns: String,
    addr: &'static str,
    name: &'static str,
    dir: PathBuf,
    redis: Option<Proc>,
    sentinel: Option<Proc>,
    registry: Option<Proc>,
    bird: Option<Proc>,
    node: Option<Proc>,
    checker: Option<Proc>,
}

impl Region {
    fn new(ns: &str, name: &'static str, addr: &'static str, work: &Path) -> Region {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Region {
            ns: ns.to_owned(),
            addr,
            name,
            dir,
            redis: None,
            sentinel: None,
            registry: None,
            bird: None,
            node: None,
            checker: None,
        }
    }

    fn spawn(&self, what: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = in_ns(&self.ns, args);
        cmd.envs(env.iter().copied());
        let log = self.dir.join(format!("{what}.log"));
        // A restart keeps the earlier log beside the new one.
        if log.exists() {
            std::fs::rename(&log, self.dir.join(format!("{what}.before-restart.log"))).unwrap();
        }
        Proc::spawn(what, cmd, &log)
    }

    fn log(&self, what: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{what}.log"))).unwrap_or_default()
    }

    fn start_redis(&mut self) {
        // Redis rewrites its configuration when a Sentinel reconfigures it: a copy, kept
        // across restarts as a host would keep it.
        let conf = self.dir.join("redis.conf");
        if !conf.exists() {
            std::fs::copy(deploy_file(&format!("redis-{}.conf", self.name)), &conf).unwrap();
        }
        let dir = self.dir.join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        self.redis = Some(self.spawn(
            "redis",
            &[
                "redis-server",
                conf.to_str().unwrap(),
                "--dir",
                dir.to_str().unwrap(),
            ],
            &[],
        ));
        let addr = self.addr;
        wait_until("redis to answer", Duration::from_secs(20), || {
            self.redis_cli(addr, 6379, &["ping"]).contains("PONG")
        });
    }

    fn redis_cli(&self, host: &str, port: u16, args: &[&str]) -> String {
        let port = port.to_string();
        let mut all = vec!["redis-cli", "-h", host, "-p", &port];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&run_in(&self.ns, &all).stdout).into_owned()
    }

    fn start_sentinel(&mut self) {
        self.sentinel = Some(start_sentinel(self.spawner(), &self.dir));
    }

    fn spawner(&self) -> impl Fn(&str, &[&str]) -> Proc + '_ {
        move |what, args| self.spawn(what, args, &[])
    }

    fn start_registry(&mut self, storage: &Path) {
        let config = self.dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}:5002\n  secret: regatta-test-secret\n",
                storage.display(),
                self.addr
            ),
        )
        .unwrap();
        self.registry = Some(self.spawn(
            "registry",
            &["docker-registry", "serve", config.to_str().unwrap()],
            &[],
        ));
        self.wait_http(&format!("http://{}:5002/v2/", self.addr));
    }

    fn start_bird(&mut self) {
        let conf = deploy_file(&format!("bird-{}.conf", self.name));
        self.bird = Some(start_bird(self.spawner(), &conf, &self.dir));
    }

    fn bird_socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    fn start_node(&mut self) {
        let conf = deploy_file(&format!("regatta-{}.toml", self.name));
        self.node = Some(self.spawn(
            "node",
            &[
                env!("CARGO_BIN_EXE_regatta"),
                "serve",
                "--config",
                conf.to_str().unwrap(),
            ],
            &[("REGATTA__ADMIN__TOKEN", ADMIN_TOKEN)],
        ));
        self.wait_http(&format!("http://{ANYCAST}:5000/readyz"));
    }

    fn start_checker(&mut self) {
        let socket = self.bird_socket();
        self.checker = Some(self.spawn(
            "anycast-health",
            &[deploy_file("anycast-health.sh").to_str().unwrap()],
            &[
                ("READYZ_URL", &format!("http://{ANYCAST}:5000/readyz")),
                ("BIRD_SOCKET", socket.to_str().unwrap()),
            ],
        ));
    }

    /// Polls `url` from inside the region until it answers 200.
    fn wait_http(&self, url: &str) {
        wait_until(
            &format!("{url} in {}", self.name),
            Duration::from_secs(30),
            || {
                run_in(
                    &self.ns,
                    &["curl", "-fsS", "-o", "/dev/null", "-m", "1", url],
                )
                .status
                .success()
            },
        );
    }

    /// `regatta admin ...` run in the region against its node, as an operator would.
    fn admin(&self, args: &[&str]) -> Output {
        let mut all = vec![env!("CARGO_BIN_EXE_regatta"), "admin"];
        all.extend_from_slice(args);
        let mut cmd = in_ns(&self.ns, &all);
        cmd.env("REGATTA_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("REGATTA_ADMIN_URL");
        run(cmd, Duration::from_secs(30))
    }

    /// What the region's node says of a backend (its admin API, as JSON).
    fn backend(&self, id: &str) -> serde_json::Value {
        let out = run_in(
            &self.ns,
            &[
                "curl",
                "-fsS",
                "-m",
                "2",
                "-H",
                &format!("Authorization: Bearer {ADMIN_TOKEN}"),
                &format!("http://127.0.0.1:5001/admin/v1/backends/{id}"),
            ],
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("backend {id}: {e} {out:?}"))
    }

    /// The registry API requests this region's node has answered.
    fn served(&self) -> f64 {
        let out = run_in(
            &self.ns,
            &["curl", "-fsS", "-m", "2", "http://127.0.0.1:5001/metrics"],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("regatta_requests_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Blob GETs the client sent to this region's registry (redirected there by a node).
    fn client_blob_gets(&self) -> usize {
        self.log("registry")
            .lines()
            .filter(|l| l.starts_with(CLIENT) && l.contains("\"GET /v2/acme/app/blobs/"))
            .count()
    }

    /// Kills every process of the region (SIGKILL, by PID) and reaps them.
    fn lose(&mut self) {
        for proc in [
            &mut self.checker,
            &mut self.bird,
            &mut self.node,
            &mut self.registry,
            &mut self.redis,
            &mut self.sentinel,
        ] {
            if let Some(mut p) = proc.take() {
                p.stop();
            }
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // The checker first, so it does not flap the route while the rest goes.
        self.lose();
    }
}

fn start_sentinel(spawn: impl Fn(&str, &[&str]) -> Proc, dir: &Path) -> Proc {
    // Sentinel rewrites its configuration: each one gets a copy.
    let conf = dir.join("sentinel.conf");
    if !conf.exists() {
        std::fs::copy(deploy_file("sentinel.conf"), &conf).unwrap();
    }
    spawn(
        "sentinel",
        &[
            "redis-server",
            conf.to_str().unwrap(),
            "--sentinel",
            "--dir",
            dir.to_str().unwrap(),
        ],
    )
}

fn start_bird(spawn: impl Fn(&str, &[&str]) -> Proc, conf: &Path, dir: &Path) -> Proc {
    let socket = dir.join("bird.ctl");
    let pid = dir.join("bird.pid");
    spawn(
        "bird",
        &[
            "bird",
            "-f",
            "-c",
            conf.to_str().unwrap(),
            "-s",
            socket.to_str().unwrap(),
            "-P",
            pid.to_str().unwrap(),
        ],
    )
}

/// A skopeo pull from the client's namespace through the anycast address.
fn pull(client_ns: &str, reference: &str, out: &Path) -> Result<(Pulled, usize), String> {
    let _ = std::fs::remove_dir_all(out);
    let cmd = in_ns(
        client_ns,
        &[
            "skopeo",
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--retry-times",
            "3",
            &format!("docker://{ANYCAST}:5000/{reference}"),
            &format!("oci:{}:pulled", out.display()),
        ],
    );
    let output = run(cmd, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let retries = stderr.matches("retrying in").count();
    if !output.status.success() {
        return Err(format!("skopeo pull of {reference} failed: {stderr}"));
    }
    Ok((read_layout(out), retries))
}

/// Pulls in a loop on a thread (alternating by tag and by digest) until stopped; counts
/// the pulls that completed, failed, and the transfers skopeo retried.
struct PullLoop {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    tally: Arc<Mutex<Tally>>,
}

#[derive(Default, Debug, Clone)]
struct Tally {
    completed: usize,
    failed: Vec<String>,
    retries: usize,
}

impl PullLoop {
    fn start(client_ns: &str, image: &Image, work: &Path) -> PullLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (ns, want, out) = (client_ns.to_owned(), image.all_digests(), work.join("loop"));
        let references = [
            "acme/app:1.0".to_owned(),
            format!("acme/app@{}", image.index.digest),
        ];
        let thread = {
            let (stop, tally) = (stop.clone(), tally.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    let reference = &references[n % 2];
                    n += 1;
                    let result = pull(&ns, reference, &out);
                    let mut t = tally.lock().unwrap();
                    match result {
                        Ok((pulled, retries)) if pulled.blobs == want => {
                            t.completed += 1;
                            t.retries += retries;
                        }
                        Ok((pulled, _)) => t
                            .failed
                            .push(format!("{reference}: wrong blobs {:?}", pulled.blobs)),
                        Err(e) => t.failed.push(e),
                    }
                }
            })
        };
        PullLoop {
            stop,
            thread: Some(thread),
            tally,
        }
    }

    fn completed(&self) -> usize {
        self.tally.lock().unwrap().completed
    }

    fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("the pull loop ends");
        }
        self.tally.lock().unwrap().clone()
    }
}

impl Drop for PullLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Measures how long a drain of `us-registry` made through one node (the first namespace)
/// takes to show on the other, `rounds` times (drain, undrain, ...): one process holds a
/// keep-alive connection to each node's admin API (made inside each namespace with setns),
/// times from just before the change is sent until the other node lists it. Prints seconds
/// as JSON.
const PROPAGATION: &str = r#"
import ctypes, http.client, json, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def enter(ns):
    fd = os.open("/run/netns/" + ns, os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns " + ns)
    os.close(fd)
def admin(ns):
    enter(ns)
    conn = http.client.HTTPConnection("127.0.0.1", 5001, timeout=5)
    conn.connect()
    return conn
change_ns, watch_ns, token, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
changer, watcher = admin(change_ns), admin(watch_ns)
auth = {"Authorization": "Bearer " + token}
def drained_on_watcher():
    watcher.request("GET", "/admin/v1/backends/us-registry", headers=auth)
    r = watcher.getresponse()
    return json.loads(r.read())["drained"]
took = []
for i in range(rounds):
    want = i % 2 == 0
    started = time.monotonic()
    changer.request("POST", "/admin/v1/backends/us-registry/" + ("drain" if want else "undrain"), headers=auth)
    r = changer.getresponse()
    r.read()
    if r.status != 200:
        sys.exit("change %d answered %d" % (i, r.status))
    while drained_on_watcher() != want:
        if time.monotonic() - started > 5:
            sys.exit("change %d did not reach %s within 5 s" % (i, watch_ns))
    took.append(time.monotonic() - started)
print(json.dumps(took))
"#;

/// `rounds` drain changes made through the node in `change_ns`, each timed until the node
/// in `watch_ns` lists it: (p50, max) in seconds.
fn propagation(change_ns: &str, watch_ns: &str, rounds: usize) -> (f64, f64) {
    let mut cmd = Command::new("python3");
    let rounds_arg = rounds.to_string();
    cmd.args([
        "-c",
        PROPAGATION,
        change_ns,
        watch_ns,
        ADMIN_TOKEN,
        &rounds_arg,
    ]);
    let out = run(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut took: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    took.sort_by(f64::total_cmp);
    assert_eq!(took.len(), rounds);
    let (p50, max) = (percentile(&took, 0.5), took[took.len() - 1]);
    assert!(
        max < 1.0,
        "a drain took {max} s to reach the node in {watch_ns}"
    );
    (p50, max)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank]
}

#[test]
fn two_regions_behind_one_anycast_address() {
    for tool in [
        "ip",
        "bird",
        "birdc",
        "curl",
        "redis-server",
        "redis-cli",
        "docker-registry",
        "skopeo",
        "python3",
    ] {
        require(tool);
    }
    assert_eq!(
        sh(&["id", "-u"]).trim(),
        "0",
        "network namespaces need root: run scripts/test.sh as root (CI does)"
    );
    let work = tempfile::tempdir().unwrap();
    let _logs = LogsOnFailure(work.path());

    // The image, pushed once on loopback; both regions' registries serve a copy of that
    // registry's storage, so they hold the same bytes under the same digests.
    let image = images::multiarch(&work.path().join("image"), "multiregion", "1.0", 4, 1 << 20);
    let mut seed = Registry::start(Shape::Anonymous, None);
    seed.push(&image, "acme/app", "1.0");
    seed.stop();
    let storage = |name: &str| {
        let to = work.path().join(format!("{name}-storage"));
        sh(&[
            "cp",
            "-a",
            seed.dir.path().join("storage").to_str().unwrap(),
            to.to_str().unwrap(),
        ]);
        to
    };
    let (eu_storage, us_storage) = (storage("eu"), storage("us"));

    // Namespaces first: they are dropped (deleted) after every process below.
    let prefix = format!("rg{}", std::process::id());
    let namespaces = Namespaces::create(&prefix, &["rt", "eu", "us", "cl"]);
    let [rt, eu_ns, us_ns, cl] = [0, 1, 2, 3].map(|i| namespaces.names[i].clone());
    link(
        &rt,
        "eu0",
        "10.99.1.1/24",
        &eu_ns,
        "rt0",
        &format!("{EU}/24"),
    );
    link(
        &rt,
        "us0",
        "10.99.2.1/24",
        &us_ns,
        "rt0",
        &format!("{US}/24"),
    );
    link(
        &rt,
        "cl0",
        &format!("{ROUTER}/24"),
        &cl,
        "rt0",
        &format!("{CLIENT}/24"),
    );
    sh(&[
        "ip",
        "netns",
        "exec",
        &rt,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    for (ns, gateway) in [(&eu_ns, "10.99.1.1"), (&us_ns, "10.99.2.1"), (&cl, ROUTER)] {
        sh(&["ip", "-n", ns, "route", "add", "default", "via", gateway]);
    }
    for ns in [&eu_ns, &us_ns] {
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ANYCAST}/32"),
            "dev",
            "lo",
        ]);
    }

    // The router and the witness Sentinel.
    let router_dir = work.path().join("router");
    std::fs::create_dir_all(&router_dir).unwrap();
    let router_spawn = |what: &str, args: &[&str]| {
        Proc::spawn(
            what,
            in_ns(&rt, args),
            &router_dir.join(format!("{what}.log")),
        )
    };
    let _router_bird = start_bird(router_spawn, &deploy_file("bird-router.conf"), &router_dir);
    let _witness = start_sentinel(router_spawn, &router_dir);

    let mut eu = Region::new(&eu_ns, "eu", EU, work.path());
    let mut us = Region::new(&us_ns, "us", US, work.path());
    eu.start_redis();
    us.start_redis();
    wait_until("the us replica to sync", Duration::from_secs(30), || {
        us.redis_cli(US, 6379, &["info", "replication"])
            .contains("master_link_status:up")
    });
    eu.start_sentinel();
    us.start_sentinel();
    let master_by_sentinels = |region: &Region| {
        region.redis_cli(
            ROUTER,
            26379,
            &["sentinel", "get-master-addr-by-name", "regatta"],
        )
    };
    wait_until(
        "the three Sentinels to know each other",
        Duration::from_secs(30),
        || {
            eu.redis_cli(ROUTER, 26379, &["sentinel", "master", "regatta"])
                .lines()
                .skip_while(|l| *l != "num-other-sentinels")
                .nth(1)
                == Some("2")
        },
    );
    eu.start_registry(&eu_storage);
    us.start_registry(&us_storage);
    eu.start_bird();
    us.start_bird();
    eu.start_node();
    us.start_node();
    eu.start_checker();
    us.start_checker();
    route_moves_to(&rt, EU, Instant::now(), Duration::from_secs(30));

    // 1. eu answers, every blob from the eu backend.
    let out = work.path().join("pulled");
    let (eu_served, us_served) = (eu.served(), us.served());
    let (pulled, _) = pull(&cl, "acme/app:1.0", &out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pulled.top, image.index.digest);
    assert_eq!(pulled.blobs, image.all_digests());
    assert!(eu.served() > eu_served, "the eu node answered");
    assert_eq!(us.served(), us_served, "the us node was not asked");
    let blobs = image.all_digests().len() - 3; // the index and two manifests come from nodes
    assert_eq!(
        eu.client_blob_gets(),
        blobs,
        "every blob from the eu backend"
    );
    assert_eq!(us.client_blob_gets(), 0);

    // 2. A node drain on eu moves the route to us; pulls keep completing.
    let pulls = PullLoop::start(&cl, &image, work.path());
    wait_until("a pull before the drain", Duration::from_secs(60), || {
        pulls.completed() >= 1
    });
    let drain_started = Instant::now();
    let drained = eu.admin(&["node", "drain"]);
    assert!(drained.status.success(), "{drained:?}");
    // Within a second: one check of anycast-health.sh (0.2 s) and a BGP withdraw.
    let drain_move = route_moves_to(&rt, US, drain_started, Duration::from_secs(1));
    let us_blobs = us.client_blob_gets();
    let us_served = us.served();
    let before = pulls.completed();
    wait_until("two pulls through us", Duration::from_secs(60), || {
        pulls.completed() >= before + 2
    });
    assert!(
        us.served() > us_served,
        "the us node answers while eu is drained"
    );
    assert!(
        us.client_blob_gets() >= us_blobs + blobs,
        "blobs come from the us backend"
    );
    let undrain_started = Instant::now();
    assert!(eu.admin(&["node", "undrain"]).status.success());
    let undrain_move = route_moves_to(&rt, EU, undrain_started, Duration::from_secs(5));
    let before = pulls.completed();
    wait_until("a pull through eu again", Duration::from_secs(60), || {
        pulls.completed() > before
    });
    let drain_tally = pulls.finish();
    assert!(
        drain_tally.failed.is_empty(),
        "pulls failed across a node drain: {:?}",
        drain_tally.failed
    );
    let eu_served = eu.served();
    pull(&cl, "acme/app:1.0", &out).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        eu.served() > eu_served,
        "eu answers again after the undrain"
    );

    // 3. Backend drains made through the us node reach the eu node (written to the primary
    // in eu, published there), and the other way (heard through the us replica): 20 each.
    let (p50, max) = propagation(&us_ns, &eu_ns, 20);
    let (back_p50, back_max) = propagation(&eu_ns, &us_ns, 20);

    // 4. Region loss: every process of eu is killed. Pulls by tag and digest keep
    // completing through us; the Sentinels promote the us replica and admin changes
    // through the us node work again.
    let pulls = PullLoop::start(&cl, &image, work.path());
    wait_until("a pull before the loss", Duration::from_secs(60), || {
        pulls.completed() >= 1
    });
    let lost = Instant::now();
    eu.lose();
    let loss_move = route_moves_to(&rt, US, lost, Duration::from_secs(10));
    let weight = |region: &Region, value: &str| region.admin(&["weight", "eu-registry", value]);
    let mut refused = 0;
    let admin_back = loop {
        let answer = weight(&us, "50");
        if answer.status.success() {
            break lost.elapsed();
        }
        refused += 1;
        assert!(
            lost.elapsed() < Duration::from_secs(60),
            "admin changes through us never worked again: {}",
            String::from_utf8_lossy(&answer.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        master_by_sentinels(&us).contains(US),
        "the Sentinels name the us replica the master"
    );
    let before = pulls.completed();
    wait_until("pulls after the failover", Duration::from_secs(60), || {
        pulls.completed() >= before + 2
    });
    let loss_tally = pulls.finish();
    assert!(
        loss_tally.failed.is_empty(),
        "pulls failed during the region loss: {:?}",
        loss_tally.failed
    );

    // 5. eu returns: its Redis first (the Sentinels make it a replica of us), then the rest;
    // its node resyncs (it sees the change made while it was gone) and is announced again.
    eu.start_redis();
    wait_until("eu's Redis to follow us", Duration::from_secs(60), || {
        let info = eu.redis_cli(EU, 6379, &["info", "replication"]);
        info.contains("role:slave") && info.contains("master_link_status:up")
    });
    eu.start_sentinel();
    eu.start_registry(&eu_storage);
    eu.start_bird();
    eu.start_node();
    let returned = Instant::now();
    eu.start_checker();
    let return_move = route_moves_to(&rt, EU, returned, Duration::from_secs(30));
    let eu_registry = eu.backend("eu-registry");
    assert_eq!(
        eu_registry["weight"], 50,
        "the returned node resynced: {eu_registry}"
    );
    assert!(weight(&eu, "default").status.success(), "admin through eu");
    let eu_served = eu.served();
    let eu_blobs = eu.client_blob_gets();
    let (pulled, _) = pull(&cl, &format!("acme/app@{}", image.index.digest), &out)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pulled.blobs, image.all_digests());
    assert!(eu.served() > eu_served, "eu answers again");
    assert_eq!(
        eu.client_blob_gets(),
        eu_blobs + blobs,
        "from the eu backend"
    );

    // 6. SIGTERM on the eu node under a running pull: the pull completes, and the route was
    // withdrawn before the process exited.
    let reference = "acme/app:1.0".to_owned();
    let (ns, sig_out) = (cl.clone(), work.path().join("sigterm"));
    let running = std::thread::spawn(move || pull(&ns, &reference, &sig_out));
    wait_until("the pull to fetch from eu", Duration::from_secs(60), || {
        eu.client_blob_gets() > eu_blobs + blobs
    });
    let terminated = Instant::now();
    eu.node.as_ref().unwrap().terminate();
    let mut exited_after = None;
    let sigterm_move = loop {
        if route_via(&rt).as_deref() == Some(US) {
            break terminated.elapsed();
        }
        if exited_after.is_none() && eu.node.as_mut().unwrap().exited() {
            exited_after = Some(terminated.elapsed());
        }
        assert!(
            terminated.elapsed() < Duration::from_secs(1),
            "the route was not withdrawn within a second of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(
        exited_after.is_none(),
        "the node exited ({exited_after:?}) before its route was withdrawn"
    );
    let (pulled, _) = running
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the pull under SIGTERM: {e}"));
    assert_eq!(pulled.blobs, image.all_digests());
    wait_until("the eu node to exit", Duration::from_secs(30), || {
        eu.node.as_mut().unwrap().exited()
    });
    let exited = terminated.elapsed();
    assert!(sigterm_move < exited);
    assert!(eu.log("node").contains("shutting down"));

    println!(
        "multiregion: image {} blobs; route move on node drain {:.1} ms, on undrain {:.1} ms, \
         on region loss {:.1} ms, on eu's return {:.1} ms (from its node starting), on SIGTERM \
         {:.1} ms (node exited after {:.0} ms)",
        image.all_digests().len(),
        ms(drain_move),
        ms(undrain_move),
        ms(loss_move),
        ms(return_move),
        ms(sigterm_move),
        ms(exited)
    );
    println!(
        "multiregion: drain propagation over 20 changes: us->eu p50 {:.1} ms, max {:.1} ms; \
         eu->us (through the replica) p50 {:.1} ms, max {:.1} ms",
        p50 * 1e3,
        max * 1e3,
        back_p50 * 1e3,
        back_max * 1e3
    );
    println!(
        "multiregion: node drain: {} pulls completed, {} failed, {} transfers retried",
        drain_tally.completed,
        drain_tally.failed.len(),
        drain_tally.retries
    );
    println!(
        "multiregion: region loss: {} pulls completed, {} failed, {} transfers retried; admin \
         changes refused {refused} times, working again after {:.0} ms",
        loss_tally.completed,
        loss_tally.failed.len(),
        loss_tally.retries,
        ms(admin_back)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
