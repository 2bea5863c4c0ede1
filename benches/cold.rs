//! Cold blob path: a blob nobody has asked the node for yet costs one backend round trip
//! (the probe) plus the gateway's own work. Measured against a direct HEAD of another fresh
//! blob on the same backend, in the same run, interleaved (regatta, direct, regatta, ...),
//! each over its own keep-alive connection, so that both sides pay the same backend work.
//!
//! Two backends: `hub` holds every blob, `mirror` (another registry, empty) is probed in
//! parallel and answers 404 (the bare forwarder, the floor, asks both too). Fresh digests: 2 platforms x `COLD_LAYERS` layers, each asked
//! once. The node runs its default configuration (access log on).
//!
//! Prints p50/p99 of each and the difference; asserts nothing about time.
//! Run: `cargo bench --bench cold`. Knobs: COLD_LAYERS (100), COLD_BACKENDS (2; 1 leaves
//! the mirror out of the org), COLD_PAUSE (seconds to wait before and after the regatta
//! pass, to attach a profiler to the node whose pid is printed), COLD_CALLGRIND=1 (the node
//! under valgrind's callgrind: prints the instructions per cold request, all threads, as a
//! count that the machine's noise does not move; its times are callgrind's).

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

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use registry::{Registry, Shape};
use support::{env_or, start_node_under};

/// One HTTP/1.1 keep-alive connection; `ask` sends a request without a body and reads the
/// answer's head (every answer measured here has an empty body).
struct Connection {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Connection {
    fn open(port: u16) -> Connection {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_nodelay(true).unwrap();
        Connection {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    /// The status and the time from sending to the end of the answer's head.
    fn ask(&mut self, method: &str, path: &str) -> (u16, Duration) {
        // One write, as HTTP clients send a head (`write!` on the socket would send each
        // piece of the format as a segment of its own and wake the server for each).
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: regatta-bench\r\n\r\n"
        );
        let started = Instant::now();
        self.stream.write_all(head.as_bytes()).unwrap();
        let mut status = 0;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            if status == 0 {
                status = line.split(' ').nth(1).unwrap().parse().unwrap();
            } else if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let elapsed = started.elapsed();
        if method != "HEAD" && length > 0 {
            let mut body = vec![0; length];
            std::io::Read::read_exact(&mut self.reader, &mut body).unwrap();
        }
        (status, elapsed)
    }
}

/// The floor a gateway can reach on this machine: a bare forwarder (tokio, no HTTP library,
/// no configuration, no logs, no cache) that answers each `GET` by sending a `HEAD` of the same
/// path to every one of `backends` at once, each over its own kept connection, and answering
/// 307 (or 404) from the first one's status; the others' answers are read after that, before
/// the next request (as regatta lets a probe that lost the race finish). It does what
/// regatta's cold path must do and nothing else; the difference between the two is what
/// regatta's own code costs.
/// Returns its port and its thread's `schedstat` file (its CPU time).
fn start_floor(backends: Vec<u16>) -> (u16, std::path::PathBuf) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let (tell, told) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // `/proc/thread-self` is `<pid>/task/<tid>`.
        let task = std::fs::read_link("/proc/thread-self").unwrap();
        tell.send(std::path::Path::new("/proc").join(task).join("schedstat"))
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(forward(client, backends.clone()));
            }
        });
    });
    (port, told.recv().unwrap())
}

/// Runs `callgrind_control <action> <pid>` (`-z` zeroes the counts, `-d` dumps them).
fn callgrind_control(action: &str, pid: u32) {
    let status = std::process::Command::new("callgrind_control")
        .args([action, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("callgrind_control runs");
    assert!(status.success(), "callgrind_control {action} {pid} failed");
}

/// The instructions a callgrind dump counted (its `totals:` line), waiting for the dump.
fn callgrind_total(file: &std::path::Path) -> u64 {
    let mut total = None;
    crate::procs::wait_until(
        &format!("callgrind's dump {}", file.display()),
        Duration::from_secs(30),
        || {
            total = std::fs::read_to_string(file).ok().and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("totals:"))
                    .and_then(|n| n.trim().parse().ok())
            });
            total.is_some()
        },
    );
    total.unwrap_or(0)
}

/// CPU time (user and kernel) from a `schedstat` file; zero where it cannot be read.
fn schedstat(file: &std::path::Path) -> Duration {
    let nanos = std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(nanos)
}

/// Reads one head (up to its blank line) into `buf`, returning its length.
async fn read_head(io: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end + 4);
        }
        let mut chunk = [0u8; 4096];
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn forward(mut client: tokio::net::TcpStream, backends: Vec<u16>) {
    use tokio::io::AsyncWriteExt;
    client.set_nodelay(true).unwrap();
    let mut upstreams = Vec::new();
    for &port in &backends {
        let upstream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        upstream.set_nodelay(true).unwrap();
        upstreams.push((port, upstream, Vec::new()));
    }
    let mut asked = Vec::new();
    while let Some(end) = read_head(&mut client, &mut asked).await {
        let head = String::from_utf8_lossy(&asked[..end]).into_owned();
        asked.drain(..end);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        for (port, upstream, _) in &mut upstreams {
            let probe = format!("HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
            upstream.write_all(probe.as_bytes()).await.unwrap();
        }
        let (first, upstream, answered) = &mut upstreams[0];
        let Some(end) = read_head(upstream, answered).await else {
            return;
        };
        let found = answered.starts_with(b"HTTP/1.1 200");
        answered.drain(..end);
        let answer = if found {
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{first}{path}\r\n\
                 Content-Length: 0\r\n\r\n"
            )
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
        };
        if client.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        for (_, upstream, answered) in &mut upstreams[1..] {
            let Some(end) = read_head(upstream, answered).await else {
                return;
            };
            answered.drain(..end);
        }
    }
}

/// Asks `subject` for the even digests of `digests` and the backend directly for the odd
/// ones, alternating; returns both sets of times, sorted.
fn interleaved(
    digests: &[String],
    direct: &mut Connection,
    mut subject: impl FnMut(&str) -> Duration,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut through, mut straight) = (Vec::new(), Vec::new());
    for (i, digest) in digests.iter().enumerate() {
        let path = format!("/v2/acme/app/blobs/{digest}");
        if i % 2 == 0 {
            through.push(subject(&path));
        } else {
            let (status, took) = direct.ask("HEAD", &path);
            assert_eq!(status, 200, "{path} on the backend");
            straight.push(took);
        }
    }
    through.sort();
    straight.sort();
    (through, straight)
}

/// CPU time all threads of process `pid` have used (user and kernel), from
/// `/proc/<pid>/task/*/schedstat`; zero where that cannot be read.
fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .map(|t| schedstat(&t.path().join("schedstat")))
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let layers = env_or("COLD_LAYERS", 100) as usize;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let hub = Registry::start(Shape::Anonymous, None);
    let mirror = Registry::start(Shape::Anonymous, None);
    let image = images::multiarch(&dir.join("image"), "cold", "1.0", layers, 0);
    hub.push(&image, "acme/app", "1.0");
    // COLD_BACKENDS=1: the hub alone (one probe per blob instead of two).
    let both = env_or("COLD_BACKENDS", 2) > 1;
    // COLD_CALLGRIND=1: the node runs under callgrind, which counts the instructions of the
    // regatta pass (all its threads); times in that run are callgrind's, not the node's.
    let callgrind = env_or("COLD_CALLGRIND", 0) == 1;
    let wrapper: Vec<String> = if callgrind {
        crate::procs::require("valgrind");
        crate::procs::require("callgrind_control");
        let out = dir.join("callgrind.%p");
        ["valgrind", "--tool=callgrind", "--dump-instr=no"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("--callgrind-out-file={}", out.display())])
            .collect()
    } else {
        Vec::new()
    };
    let node =
        start_node_under(
            &wrapper,
            dir,
            "regatta",
            "",
            &format!(
            "[[backends]]\nid = \"hub\"\nurl = \"{}\"\nregion = \"eu\"\ndelivery = \"direct\"\n\
             [[backends]]\nid = \"mirror\"\nurl = \"{}\"\nregion = \"eu\"\ndelivery = \"direct\"\n\
             [[orgs]]\nname = \"acme\"\nbackends = [{}]\n",
            hub.url(),
            mirror.url(),
            if both { "\"hub\", \"mirror\"" } else { "\"hub\"" }
        ),
        );
    let hub_port: u16 = hub.url().rsplit(':').next().unwrap().parse().unwrap();
    let mut blobs: Vec<String> = ["amd64", "arm64"]
        .iter()
        .flat_map(|arch| image.platform(arch).layers.iter().map(|l| l.digest.clone()))
        .collect();
    blobs.sort();
    blobs.dedup();
    let mut gateway = Connection::open(node.port);
    let mut direct = Connection::open(hub_port);
    // The forwarder asks what the node's org has: the hub, and the mirror when both.
    let mirror_port: u16 = mirror.url().rsplit(':').next().unwrap().parse().unwrap();
    let floor_backends = if both {
        vec![hub_port, mirror_port]
    } else {
        vec![hub_port]
    };
    let (floor_port, floor_cpu_file) = start_floor(floor_backends);
    let mut floor = Connection::open(floor_port);
    // Untimed: both connections and the node's own connections to the backends open.
    let (warm_up, measured) = blobs.split_at(8.min(blobs.len() / 4));
    for (i, digest) in warm_up.iter().enumerate() {
        let path = format!("/v2/acme/app/blobs/{digest}");
        match i % 3 {
            0 => assert_eq!(gateway.ask("GET", &path).0, 307),
            1 => assert_eq!(direct.ask("HEAD", &path).0, 200),
            _ => assert_eq!(floor.ask("GET", &path).0, 307),
        }
    }
    // COLD_PAUSE=N: wait N seconds before and after the regatta pass, so that a profiler
    // (`strace -c -f -p`, `perf record -p`, `callgrind_control -z`/`-d`) can be attached to
    // the node and read for that pass alone. Keep N under `server.keep_alive` (5 s).
    let pause = env_or("COLD_PAUSE", 0);
    if pause > 0 {
        eprintln!("node pid {:?}; measuring in {pause} s", node.proc.pid());
        std::thread::sleep(Duration::from_secs(pause));
    }
    // Two passes over fresh digests, each interleaving its subject with a direct HEAD (so
    // that every subject request has the same spacing): regatta first, then the floor.
    let (regatta_half, floor_half) = measured.split_at(measured.len() / 2);
    let mut through_paths = Vec::new();
    let pid = node.proc.pid().unwrap();
    if callgrind {
        callgrind_control("-z", pid);
    }
    let cpu_before = cpu_time(pid);
    let (through, straight) = interleaved(regatta_half, &mut direct, |path| {
        let (status, took) = gateway.ask("GET", path);
        assert_eq!(status, 307, "{path} through regatta");
        through_paths.push(path.to_string());
        took
    });
    let node_cpu = cpu_time(pid).saturating_sub(cpu_before);
    let instructions = callgrind.then(|| {
        callgrind_control("-d", pid);
        callgrind_total(&dir.join(format!("callgrind.{pid}.1")))
    });
    if pause > 0 {
        eprintln!("regatta pass measured; going on in {pause} s");
        std::thread::sleep(Duration::from_secs(pause));
    }
    let floor_before = schedstat(&floor_cpu_file);
    let (bare, straight_too) = interleaved(floor_half, &mut direct, |path| {
        let (status, took) = floor.ask("GET", path);
        assert_eq!(status, 307, "{path} through the bare forwarder");
        took
    });
    let floor_cpu = schedstat(&floor_cpu_file).saturating_sub(floor_before);
    let p = |v: &[Duration]| (percentile(v, 0.5), percentile(v, 0.99));
    let ((t50, t99), (s50, s99)) = (p(&through), p(&straight));
    let ((f50, f99), (d50, d99)) = (p(&bare), p(&straight_too));
    println!(
        "\ncold blob, {} fresh digests each way and pass, interleaved",
        through.len()
    );
    println!("{:<34} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    for (name, p50, p99) in [
        ("regatta GET (probe + 307)", t50, t99),
        ("direct HEAD on the backend", s50, s99),
        ("regatta - direct", t50 - s50, t99 - s99),
        ("bare forwarder GET (HEAD + 307)", f50, f99),
        ("direct HEAD, same pass", d50, d99),
        ("bare forwarder - direct", f50 - d50, f99 - d99),
    ] {
        println!("{name:<34} {p50:>10.3} {p99:>10.3}");
    }
    if let Some(total) = instructions {
        println!(
            "{:<34} {:>10.0}   (callgrind: the times above are not the node's)",
            "node instructions per cold request",
            total as f64 / through.len() as f64
        );
    }
    for (name, cpu, n) in [
        ("node CPU per cold request, ms", node_cpu, through.len()),
        ("forwarder CPU per request, ms", floor_cpu, bare.len()),
    ] {
        println!("{name:<34} {:>10.3}", cpu.as_secs_f64() * 1000.0 / n as f64);
    }
    // The hop alone: the same blobs again, now warm (no backend round trip), on the
    // connection the cold requests used (actix-web's, since the front door handed it over at
    // the first cold blob) and on a fresh one the front door keeps.
    let mut fresh = Connection::open(node.port);
    let (mut actix_warm, mut front_warm) = (Vec::new(), Vec::new());
    for (i, path) in through_paths.iter().enumerate() {
        let (on, into) = if i % 2 == 0 {
            (&mut gateway, &mut actix_warm)
        } else {
            (&mut fresh, &mut front_warm)
        };
        let (status, took) = on.ask("GET", path);
        assert_eq!(status, 307, "{path} warm");
        into.push(took);
    }
    // And after 1 ms of idleness each (the node's worker asleep): what waking it costs.
    let mut idle_warm = Vec::new();
    for path in &through_paths {
        std::thread::sleep(Duration::from_millis(1));
        let (status, took) = fresh.ask("GET", path);
        assert_eq!(status, 307, "{path} warm after idling");
        idle_warm.push(took);
    }
    actix_warm.sort();
    front_warm.sort();
    idle_warm.sort();
    for (name, samples) in [
        ("regatta warm 307, actix-web", &actix_warm),
        ("regatta warm 307, front door", &front_warm),
        ("  the same after 1 ms idle", &idle_warm),
    ] {
        println!(
            "{:<34} {:>10.3} {:>10.3}",
            name,
            percentile(samples, 0.5),
            percentile(samples, 0.99)
        );
    }
    // Where the difference is: the node's own measure of each cold answer (its access log's
    // `micros`, from the request handed to the App to the answer), so what remains of the
    // client's time is the hops to and from the node.
    std::thread::sleep(Duration::from_millis(100));
    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
    let mut inside: Vec<Duration> = log
        .lines()
        .filter(|l| l.contains(r#""kind":"access""#) && l.contains(r#""decision":"holder""#))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["micros"].as_u64())
        .map(Duration::from_micros)
        .collect();
    inside.sort();
    if !inside.is_empty() {
        println!(
            "{:<34} {:>10.3} {:>10.3}",
            "regatta, as the node measures it",
            percentile(&inside, 0.5),
            percentile(&inside, 0.99)
        );
    }
}
