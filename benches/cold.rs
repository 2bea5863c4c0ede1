//! Cold blob path: a blob nobody has asked the node for yet costs one backend round trip
//! (the probe) plus the gateway's own work. Measured against a direct HEAD of another fresh
//! blob on the same backend, in the same run, interleaved (regatta, direct, regatta, ...),
//! each over its own keep-alive connection, so that both sides pay the same backend work.
//!
//! Two backends: `hub` holds every blob, `mirror` (another registry, empty) is probed in
//! parallel and answers 404. Fresh digests: 2 platforms x `COLD_LAYERS` layers, each asked
//! once. The node runs its default configuration (access log on).
//!
//! Prints p50/p99 of each and the difference; asserts nothing about time.
//! Run: `cargo bench --bench cold`. Knobs: COLD_LAYERS (100), COLD_BACKENDS (2; 1 leaves
//! the mirror out of the org).

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
use support::{env_or, start_node_logging};

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
        let started = Instant::now();
        write!(
            self.stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: regatta-bench\r\n\r\n"
        )
        .unwrap();
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
    let node =
        start_node_logging(
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
    // Untimed: both connections and the node's own connections to the backends open.
    let (warm_up, measured) = blobs.split_at(8.min(blobs.len() / 4));
    for (i, digest) in warm_up.iter().enumerate() {
        let path = format!("/v2/acme/app/blobs/{digest}");
        if i % 2 == 0 {
            assert_eq!(gateway.ask("GET", &path).0, 307);
        } else {
            assert_eq!(direct.ask("HEAD", &path).0, 200);
        }
    }
    let (mut through, mut straight) = (Vec::new(), Vec::new());
    for (i, digest) in measured.iter().enumerate() {
        let path = format!("/v2/acme/app/blobs/{digest}");
        if i % 2 == 0 {
            let (status, took) = gateway.ask("GET", &path);
            assert_eq!(status, 307, "{path} through regatta");
            through.push(took);
        } else {
            let (status, took) = direct.ask("HEAD", &path);
            assert_eq!(status, 200, "{path} on the backend");
            straight.push(took);
        }
    }
    through.sort();
    straight.sort();
    let (t50, t99) = (percentile(&through, 0.5), percentile(&through, 0.99));
    let (s50, s99) = (percentile(&straight, 0.5), percentile(&straight, 0.99));
    println!(
        "\ncold blob, {} fresh digests each way, interleaved",
        through.len()
    );
    println!("{:<34} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!(
        "{:<34} {:>10.3} {:>10.3}",
        "regatta GET (probe + 307)", t50, t99
    );
    println!(
        "{:<34} {:>10.3} {:>10.3}",
        "direct HEAD on the backend", s50, s99
    );
    println!(
        "{:<34} {:>10.3} {:>10.3}",
        "regatta - direct",
        t50 - s50,
        t99 - s99
    );
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
