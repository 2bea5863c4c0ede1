//! Cost per request, counted rather than timed: instructions (valgrind's callgrind) and heap
//! allocations (a counting allocator) per request through the whole actix service, in
//! process. Counts are stable on a noisy machine where seconds are not, so a change that adds
//! work to the warm path shows here even when wall-clock noise hides it.
//!
//! Counted: `App::call` of one request and the drop of its response (routing, extractors,
//! the handler, metrics, the request id, the access log record); for the front door,
//! `front::answer` (the head parsed, the whole answer written into a buffer, metrics, the
//! access log record). Not counted: reading and writing the socket, and for the App the
//! actix-http dispatcher around it, which the load bench and the perf profile in
//! BENCHMARKS.md cover.
//!
//! Run: `cargo bench --bench cost` (valgrind from Debian for the instruction counts; without
//! it only allocations are printed). Knobs: `COST_REQUESTS` (allocation sample, 10000),
//! `COST_INSTRUCTIONS=0` (allocations only: the CI smoke runs it that way, in debug).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::process::Command;

use actix_web::dev::Service;
use actix_web::test::TestRequest;
use futures_util::FutureExt as _;

mod inproc;

/// Counts the allocations made on the current thread (requests are served on one thread;
/// work handed to another thread is not the request's cost and is not counted).
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static ALLOCATED_BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count(size: usize) {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    let _ = ALLOCATED_BYTES.try_with(|c| c.set(c.get() + size as u64));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What is measured: a name, the path, the status it must answer, and the configuration
/// appended to the in-process gateway's.
struct Case {
    name: &'static str,
    /// Served by the plain listener's front door (`front::answer`) rather than the App.
    front: bool,
    path: fn(&inproc::Paths) -> String,
    status: u16,
    config: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "warm_blob_redirect, front door",
        front: true,
        path: |p| p.blob.clone(),
        status: 307,
        config: "[access_log]\npath = \"/dev/null\"",
    },
    Case {
        name: "warm_blob_redirect, App",
        front: false,
        path: |p| p.blob.clone(),
        status: 307,
        config: "[access_log]\npath = \"/dev/null\"",
    },
    Case {
        name: "warm_blob_redirect, App, no log",
        front: false,
        path: |p| p.blob.clone(),
        status: 307,
        config: "[access_log]\nenabled = false",
    },
    Case {
        name: "cached_manifest",
        front: false,
        path: |p| p.manifest.clone(),
        status: 200,
        config: "[access_log]\npath = \"/dev/null\"",
    },
    Case {
        name: "healthz (the stack's floor)",
        front: false,
        path: |_| "/healthz".into(),
        status: 200,
        config: "",
    },
];

/// One request through the service, answered and dropped. Never inlined: callgrind counts
/// the instructions of this function and what it calls (`--toggle-collect`).
#[inline(never)]
fn serve_one<S, B>(app: &S, request: actix_http::Request) -> u16
where
    S: Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse<B>,
        Error = actix_web::Error,
    >,
{
    let response = app
        .call(request)
        .now_or_never()
        .expect("a warm request is answered without waiting")
        .expect("the service answers");
    response.status().as_u16()
}

/// One request through the front door: its head parsed, its answer written into `out`.
#[inline(never)]
fn serve_front(gw: &regatta::gateway::Gateway, request: &[u8], out: &mut Vec<u8>) -> u16 {
    out.clear();
    match regatta::front::answer(request, gw, out) {
        Some(used) if used == request.len() && out.starts_with(b"HTTP/1.1 307 ") => 307,
        _ => 0,
    }
}

/// Serves `n` requests of `case`; returns allocations and bytes per request.
fn run(case: &Case, n: u64) -> (f64, f64) {
    let system = actix_web::rt::System::new();
    let settings = inproc::settings(case.config);
    let warm = inproc::warm(&system, &settings);
    let path = (case.path)(&warm.paths);
    system.block_on(async {
        let request = || TestRequest::get().uri(&path).to_request();
        // Lazily built state (metric series, cache internals) is not a request's cost; the
        // App's first answer also fills the redirect cache the front door reads.
        for _ in 0..100 {
            assert_eq!(serve_one(&warm.app, request()), case.status);
        }
        let wire = format!("GET {path} HTTP/1.1\r\nHost: registry.example\r\n\r\n");
        let mut out = Vec::with_capacity(1024);
        if case.front {
            for _ in 0..100 {
                assert_eq!(serve_front(&warm.gateway, wire.as_bytes(), &mut out), 307);
            }
        }
        let (mut allocations, mut bytes) = (0, 0);
        for _ in 0..n {
            let request = request();
            let (a0, b0) = (ALLOCATIONS.get(), ALLOCATED_BYTES.get());
            let status = if case.front {
                serve_front(&warm.gateway, wire.as_bytes(), &mut out)
            } else {
                serve_one(&warm.app, request)
            };
            allocations += ALLOCATIONS.get() - a0;
            bytes += ALLOCATED_BYTES.get() - b0;
            assert_eq!(status, case.status, "{}", case.name);
        }
        (allocations as f64 / n as f64, bytes as f64 / n as f64)
    })
}

/// Instructions callgrind counts inside `function` (and what it calls) while `n` requests
/// of case `index` are served.
fn instructions(index: usize, n: u64, function: &str) -> Option<u64> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("callgrind.out");
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--toggle-collect={function}"))
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(std::env::current_exe().unwrap())
        .env("COST_INNER", format!("{index}:{n}"))
        // Long enough for the access log writer to drain every line before the end.
        .env("COST_LINGER_MS", "200")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    assert!(status.success(), "valgrind run failed: {status}");
    let text = std::fs::read_to_string(&out).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("totals:").or(l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn main() {
    if let Ok(inner) = std::env::var("COST_INNER") {
        let (index, n) = inner.split_once(':').unwrap();
        run(&CASES[index.parse::<usize>().unwrap()], n.parse().unwrap());
        if let Some(ms) = std::env::var("COST_LINGER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        return;
    }
    let n: u64 = std::env::var("COST_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let wanted = !std::env::var("COST_INSTRUCTIONS").is_ok_and(|v| v == "0");
    let valgrind = wanted
        && Command::new("valgrind")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if wanted && !valgrind {
        eprintln!("valgrind is not installed (apt-get install valgrind): allocations only");
    }
    println!(
        "{:<32} {:>14} {:>14} {:>12}",
        "per request", "instructions", "allocations", "bytes"
    );
    for (index, case) in CASES.iter().enumerate() {
        let (allocations, bytes) = run(case, n);
        // The difference of two runs: start-up and the first requests cancel out.
        let per_request = |function: &str| {
            if !valgrind {
                return "-".to_owned();
            }
            let (few, many) = (1_000, 6_000);
            match (
                instructions(index, few, function),
                instructions(index, many, function),
            ) {
                (Some(a), Some(b)) => {
                    format!("{:.0}", b.saturating_sub(a) as f64 / (many - few) as f64)
                }
                _ => "?".into(),
            }
        };
        let per_request_thread = per_request(if case.front {
            "*serve_front*"
        } else {
            "*serve_one*"
        });
        println!(
            "{:<32} {:>14} {:>14.2} {:>12.0}",
            case.name, per_request_thread, allocations, bytes
        );
        if case.config.contains("/dev/null") && case.status == 307 {
            // The access log line's cost on its own thread: formatting and writing.
            println!(
                "{:<32} {:>14}",
                "  + access log writer, per line",
                per_request("*access_log*write_lines*")
            );
        }
    }
}
