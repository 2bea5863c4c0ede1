//! The access log: one structured line per registry API request (method, path, route kind,
//! org, status, backend, decision, duration, request id), JSON or logfmt.
//!
//! The request thread only fills an `Entry` (no formatting, no I/O) and offers it to a
//! bounded lock-free queue; a writer thread of its own drains the queue every few
//! milliseconds, formats the lines into one buffer and writes it with one call. When the
//! queue is full (the output cannot keep up) the line is dropped and counted in
//! `regatta_access_log_dropped_total`: a request never waits for its log line, and memory
//! never grows for it. The writer polls rather than being woken, so that offering a line
//! costs no system call.
//!
//! Architecture invariant: nothing on the request path formats or writes access log text.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::header::HeaderValue;
use actix_web::http::Method;
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

use crate::config::{AccessLogFormat, AccessLogSettings};

/// How often the writer drains the queue while lines keep coming.
const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// The longest pause between drains: each drain that finds nothing doubles the pause up to
/// this, so an idle node wakes its writer once a second, not 100 times.
const DRAIN_IDLE_MAX: Duration = Duration::from_secs(1);

/// A request's id: the client's own (a sane token) or one this node generated.
#[derive(Debug, Clone)]
pub enum RequestId {
    /// `<node seed>-<counter>`, in hex.
    Generated {
        seed: u64,
        n: u64,
    },
    Given(HeaderValue),
}

impl RequestId {
    /// Writes the id as text, without allocating for a generated one.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            RequestId::Generated { seed, n } => {
                hex_u64(out, *seed, 16);
                out.push(b'-');
                hex_u64(out, *n, 1);
            }
            RequestId::Given(v) => out.extend_from_slice(v.as_bytes()),
        }
    }

    /// The `X-Request-Id` header value.
    pub fn header_value(&self) -> HeaderValue {
        match self {
            RequestId::Generated { seed, n } => {
                // At most 16 + 1 + 16 hex digits and '-': built on the stack, copied once.
                let mut buf = [0u8; 33];
                let mut len = 0;
                for (value, width) in [(*seed, 16), (*n, 1)] {
                    if len > 0 {
                        buf[len] = b'-';
                        len += 1;
                    }
                    len += hex_into(&mut buf[len..], value, width);
                }
                HeaderValue::from_bytes(&buf[..len]).expect("hex is a valid header value")
            }
            RequestId::Given(v) => v.clone(),
        }
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Writes `n` in lower-case hex, at least `width` digits, at the start of `out`; returns
/// the digits written.
fn hex_into(out: &mut [u8], n: u64, width: usize) -> usize {
    let digits = (16 - (n.leading_zeros() as usize) / 4).max(width);
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        *slot = HEX_DIGITS[((n >> ((digits - 1 - i) * 4)) & 0xf) as usize];
    }
    digits
}

/// `n` in lower-case hex, at least `width` digits.
fn hex_u64(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut buf = [0u8; 16];
    let len = hex_into(&mut buf, n, width);
    out.extend_from_slice(&buf[..len]);
}

/// What one request's line says, as the request left it: owned, cheap to move (no text
/// is formatted on the request thread).
#[derive(Debug, Clone)]
pub struct Entry {
    pub at: SystemTime,
    pub method: Method,
    pub path: Arc<str>,
    /// `blob`, `manifest`, `tags`, `referrers`, `base`, `invalid`, `unknown`.
    pub route: &'static str,
    /// The org, when the path names one this node serves.
    pub org: Option<Arc<str>>,
    /// Mirror mode: the upstream group the request was routed to, and what chose it (`ns`,
    /// `prefix`, `default`; `-` for an org's request).
    pub ns: Option<Arc<str>>,
    pub via: &'static str,
    pub status: u16,
    /// The backend that served or was chosen (`X-Regatta-Backend`).
    pub backend: Option<HeaderValue>,
    /// Why that backend: `cached`, `holder`, `region`, `failover`, `stale`, or `-`.
    pub decision: &'static str,
    pub micros: u64,
    pub request_id: RequestId,
}

/// A request id shown in a span, formatted only when the span is recorded.
pub struct RequestIdText<'a>(pub &'a RequestId);

impl std::fmt::Display for RequestIdText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = Vec::with_capacity(40);
        self.0.write_to(&mut text);
        f.write_str(std::str::from_utf8(&text).unwrap_or("-"))
    }
}

/// The sending half, shared by every worker.
pub struct AccessLog {
    queue: Option<Sender<Entry>>,
    dropped: prometheus::IntCounter,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The writer, woken before its pause ends when the queue is a quarter full (a burst
    /// after a quiet spell) and when the log closes; a request never wakes it otherwise.
    wake: Option<std::thread::Thread>,
    wake_at: usize,
}

impl AccessLog {
    /// The access log `settings` describe; `None` when it is off. Output: stderr (`-`) or
    /// a file opened for appending.
    pub fn start(
        settings: &AccessLogSettings,
        dropped: prometheus::IntCounter,
    ) -> std::io::Result<Option<AccessLog>> {
        if !settings.enabled {
            return Ok(None);
        }
        let sink: Box<dyn Write + Send> = match settings.path.as_str() {
            "-" | "" => Box::new(std::io::stderr()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        Ok(Some(AccessLog::with_sink(
            settings.format,
            settings.buffer_lines,
            sink,
            dropped,
        )))
    }

    /// An access log writing to `sink`, holding at most `capacity` lines for it.
    pub fn with_sink(
        format: AccessLogFormat,
        capacity: usize,
        sink: Box<dyn Write + Send>,
        dropped: prometheus::IntCounter,
    ) -> AccessLog {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        let writer = std::thread::Builder::new()
            .name("regatta-access-log".into())
            .spawn(move || write_lines(rx, format, sink))
            .map_err(|e| eprintln!("regatta: cannot start the access log writer: {e}"))
            .ok();
        AccessLog {
            queue: writer.as_ref().map(|_| tx),
            dropped,
            wake: writer.as_ref().map(|w| w.thread().clone()),
            wake_at: (capacity / 4).max(1),
            writer: std::sync::Mutex::new(writer),
        }
    }

    /// Offers a line to the writer; when its queue is full the line is dropped and counted.
    pub fn log(&self, entry: Entry) {
        let offered = match &self.queue {
            Some(queue) => queue.try_send(entry).map(|()| queue.len()),
            None => Err(TrySendError::Disconnected(entry)),
        };
        match offered {
            Ok(queued) if queued >= self.wake_at => self.wake_writer(),
            Ok(_) => {}
            Err(_) => self.dropped.inc(),
        }
    }

    fn wake_writer(&self) {
        if let Some(writer) = &self.wake {
            writer.unpark();
        }
    }

    /// Writes what is queued and stops the writer (the node stops).
    pub fn close(&mut self) {
        self.queue = None;
        self.wake_writer();
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread: drains the queue every `DRAIN_EVERY` while lines keep coming, one
/// write per batch; each drain that finds nothing doubles the pause (up to `DRAIN_IDLE_MAX`).
/// Ends when every sender is gone and the queue is empty. Never inlined: `cargo bench --bench
/// cost` counts the writer's instructions per line by this function's name.
#[inline(never)]
fn write_lines(rx: Receiver<Entry>, format: AccessLogFormat, mut sink: Box<dyn Write + Send>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut pause = DRAIN_EVERY;
    loop {
        let mut open = true;
        let mut lines = 0usize;
        loop {
            match rx.try_recv() {
                Ok(entry) => {
                    lines += 1;
                    format_line(&mut buf, format, &entry);
                    if buf.len() >= 60 * 1024 {
                        flush(&mut sink, &mut buf);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        flush(&mut sink, &mut buf);
        if !open {
            return;
        }
        pause = if lines == 0 {
            (pause * 2).min(DRAIN_IDLE_MAX)
        } else {
            DRAIN_EVERY
        };
        std::thread::park_timeout(pause);
    }
}

fn flush(sink: &mut Box<dyn Write + Send>, buf: &mut Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    // A log that cannot be written is not worth failing or blocking requests for.
    let _ = sink.write_all(buf).and_then(|_| sink.flush());
    buf.clear();
}

/// Appends one line for `e` to `out`.
pub fn format_line(out: &mut Vec<u8>, format: AccessLogFormat, e: &Entry) {
    let backend = e.backend.as_ref().and_then(|v| v.to_str().ok());
    let (mut status, mut micros) = ([0u8; 20], [0u8; 20]);
    let status = decimal(&mut status, u64::from(e.status));
    let micros = decimal(&mut micros, e.micros);
    match format {
        AccessLogFormat::Json => {
            // The keys are fixed: written as literal fragments, only values are escaped. The
            // time and a request id (hex, or a client's id of `[A-Za-z0-9._-]`) need none.
            out.extend_from_slice(b"{\"time\":\"");
            rfc3339_millis(out, e.at);
            out.extend_from_slice(b"\",\"kind\":\"access\",\"method\":");
            json_string(out, e.method.as_str());
            out.extend_from_slice(b",\"path\":");
            json_string(out, &e.path);
            out.extend_from_slice(b",\"route\":");
            json_string(out, e.route);
            out.extend_from_slice(b",\"org\":");
            json_string(out, e.org.as_deref().unwrap_or("-"));
            out.extend_from_slice(b",\"ns\":");
            json_string(out, e.ns.as_deref().unwrap_or("-"));
            out.extend_from_slice(b",\"via\":");
            json_string(out, e.via);
            out.extend_from_slice(b",\"status\":");
            out.extend_from_slice(status.as_bytes());
            out.extend_from_slice(b",\"backend\":");
            json_string(out, backend.unwrap_or("-"));
            out.extend_from_slice(b",\"decision\":");
            json_string(out, e.decision);
            out.extend_from_slice(b",\"micros\":");
            out.extend_from_slice(micros.as_bytes());
            out.extend_from_slice(b",\"request_id\":\"");
            e.request_id.write_to(out);
            out.extend_from_slice(b"\"}\n");
        }
        AccessLogFormat::Logfmt => {
            let mut id = Vec::with_capacity(40);
            e.request_id.write_to(&mut id);
            let id = std::str::from_utf8(&id).unwrap_or("-");
            let mut time = Vec::with_capacity(24);
            rfc3339_millis(&mut time, e.at);
            let time = std::str::from_utf8(&time).unwrap_or("-");
            let fields: [(&str, Value<'_>); 13] = [
                ("time", Value::Text(time)),
                ("kind", Value::Text("access")),
                ("method", Value::Text(e.method.as_str())),
                ("path", Value::Text(&e.path)),
                ("route", Value::Text(e.route)),
                ("org", Value::Text(e.org.as_deref().unwrap_or("-"))),
                ("ns", Value::Text(e.ns.as_deref().unwrap_or("-"))),
                ("via", Value::Text(e.via)),
                ("status", Value::Number(status)),
                ("backend", Value::Text(backend.unwrap_or("-"))),
                ("decision", Value::Text(e.decision)),
                ("micros", Value::Number(micros)),
                ("request_id", Value::Text(id)),
            ];
            for (i, (key, value)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                out.extend_from_slice(key.as_bytes());
                out.push(b'=');
                match value {
                    Value::Text(t) => logfmt_value(out, t),
                    Value::Number(n) => out.extend_from_slice(n.as_bytes()),
                }
            }
            out.push(b'\n');
        }
    }
}

/// `n` in decimal, in `buf`.
fn decimal(buf: &mut [u8; 20], mut n: u64) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[at..]).unwrap_or("0")
}

enum Value<'a> {
    Text(&'a str),
    Number(&'a str),
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Almost every value needs no escape: checked without branching per byte (the loop
    // vectorizes), then copied whole.
    let plain = !bytes.iter().fold(false, |any, &b| {
        any | (b == b'"') | (b == b'\\') | (b < 0x20)
    });
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' || b == b'\\' || b < 0x20 {
            out.extend_from_slice(&bytes[start..i]);
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[(b >> 4) as usize]);
                    out.push(HEX[(b & 0xf) as usize]);
                }
            }
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A logfmt value: bare when it can be, else quoted with `"` and `\` escaped.
fn logfmt_value(out: &mut Vec<u8>, s: &str) {
    let bare = !s.is_empty()
        && s.bytes()
            .all(|b| b > b' ' && b != b'"' && b != b'=' && b != b'\\' && b < 0x7f);
    if bare {
        out.extend_from_slice(s.as_bytes());
    } else {
        json_string(out, s);
    }
}

/// `2026-12-03T13:04:05.123Z`. The text up to the second is kept from the line before
/// when the second is the same (lines come in bursts).
fn rfc3339_millis(out: &mut Vec<u8>, at: SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, Vec<u8>)> = const {
            std::cell::RefCell::new((u64::MAX, Vec::new()))
        };
    }
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            let (days, rest) = (secs / 86_400, secs % 86_400);
            let (y, m, d) = civil_from_days(days as i64);
            text.clear();
            let _ = write!(
                text,
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.",
                rest / 3600,
                rest % 3600 / 60,
                rest % 60
            );
            *second = secs;
        }
        out.extend_from_slice(text);
    });
    let millis = since.subsec_millis();
    out.extend_from_slice(&[
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
    ]);
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};

    fn entry(n: u64) -> Entry {
        Entry {
            at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            method: Method::GET,
            path: "/v2/acme/app/blobs/sha256:ab".into(),
            route: "blob",
            org: Some("acme".into()),
            ns: None,
            via: "-",
            status: 307,
            backend: Some(HeaderValue::from_static("hub")),
            decision: "cached",
            micros: 12,
            request_id: RequestId::Generated { seed: 0xabc, n },
        }
    }

    #[test]
    fn json_lines_carry_every_field() {
        let mut out = Vec::new();
        format_line(&mut out, AccessLogFormat::Json, &entry(0x2a));
        let line = String::from_utf8(out).unwrap();
        assert!(line.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/v2/acme/app/blobs/sha256:ab");
        assert_eq!(v["route"], "blob");
        assert_eq!(v["org"], "acme");
        assert_eq!(v["ns"], "-");
        assert_eq!(v["via"], "-");
        assert_eq!(v["status"], 307);
        assert_eq!(v["backend"], "hub");
        assert_eq!(v["decision"], "cached");
        assert_eq!(v["micros"], 12);
        assert_eq!(v["request_id"], "0000000000000abc-2a");

        // What a client sent is escaped: the line stays one JSON document.
        let mut e = entry(1);
        e.path = "/v2/a\"b\\c\u{1}\n/ü".into();
        let mut out = Vec::new();
        format_line(&mut out, AccessLogFormat::Json, &e);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(line.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["path"], "/v2/a\"b\\c\u{1}\n/ü");
    }

    #[test]
    fn logfmt_lines_quote_what_needs_it() {
        let mut e = entry(1);
        e.path = "/v2/a b/\"x\"".into();
        e.org = None;
        e.backend = None;
        e.request_id = RequestId::Given(HeaderValue::from_static("req-7"));
        let mut out = Vec::new();
        format_line(&mut out, AccessLogFormat::Logfmt, &e);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "time=2023-11-14T22:13:20.123Z kind=access method=GET path=\"/v2/a b/\\\"x\\\"\" \
             route=blob org=- ns=- via=- status=307 backend=- decision=cached micros=12 request_id=req-7\n"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_675), (2023, 11, 14));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    /// A sink whose writes wait until it is opened, and that keeps what it was given.
    #[derive(Clone, Default)]
    struct Gate {
        state: Arc<(Mutex<GateState>, Condvar)>,
    }

    #[derive(Default)]
    struct GateState {
        open: bool,
        /// A write is waiting for the gate.
        waiting: bool,
        written: Vec<u8>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cond) = &*self.state;
            let mut state = lock.lock().unwrap();
            state.waiting = true;
            cond.notify_all();
            let mut state = cond.wait_while(state, |s| !s.open).unwrap();
            state.written.extend_from_slice(buf);
            cond.notify_all();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Gate {
        /// A gate open from the start: a sink that only records.
        fn opened() -> Gate {
            let gate = Gate::default();
            gate.state.0.lock().unwrap().open = true;
            gate
        }

        /// Waits (up to 10 s) until `lines` lines were written; returns how many were.
        fn wait_for(&self, lines: usize) -> usize {
            let (lock, cond) = &*self.state;
            let count = |s: &GateState| s.written.iter().filter(|&&b| b == b'\n').count();
            let (state, _) = cond
                .wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(10), |s| {
                    count(s) < lines
                })
                .unwrap();
            count(&state)
        }
    }

    /// An access log of JSON lines holding at most `capacity`, written to `gate`, and its
    /// dropped-lines counter.
    fn log_into(gate: &Gate, capacity: usize) -> (AccessLog, prometheus::IntCounter) {
        let dropped = prometheus::IntCounter::new("dropped", "dropped").unwrap();
        let log = AccessLog::with_sink(
            AccessLogFormat::Json,
            capacity,
            Box::new(gate.clone()),
            dropped.clone(),
        );
        (log, dropped)
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_never_blocks() {
        let gate = Gate::default();
        let (mut log, dropped) = log_into(&gate, 8);
        // The first line reaches the writer, which then blocks on the closed sink.
        log.log(entry(0));
        {
            let (lock, cond) = &*gate.state;
            let (_state, timeout) = cond
                .wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(10), |s| {
                    !s.waiting
                })
                .unwrap();
            assert!(!timeout.timed_out(), "the writer never wrote");
        }
        // Its output blocked: 1000 more lines return at once; the queue keeps 8.
        let started = std::time::Instant::now();
        for n in 1..=1000 {
            log.log(entry(n));
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "logging waited for a blocked output: {:?}",
            started.elapsed()
        );
        assert_eq!(dropped.get(), 1000 - 8);
        // Opened again: every line not counted as dropped is written, once.
        {
            let (lock, cond) = &*gate.state;
            lock.lock().unwrap().open = true;
            cond.notify_all();
        }
        log.close();
        let written = String::from_utf8(gate.state.0.lock().unwrap().written.clone()).unwrap();
        let ids: Vec<String> = written
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["request_id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(ids.len() as u64 + dropped.get(), 1001, "{ids:?}");
        assert_eq!(ids[0], "0000000000000abc-0");
        assert_eq!(ids[1], "0000000000000abc-1");
    }

    #[test]
    fn a_writer_idling_after_a_quiet_spell_writes_the_next_line_and_stops_on_close() {
        let sink = Gate::opened();
        let (mut log, dropped) = log_into(&sink, 64);
        log.log(entry(0));
        assert_eq!(sink.wait_for(1), 1, "the first line was not written");
        // Drains that find nothing lengthen the writer's pause; a line still gets written.
        for round in 1..=3 {
            std::thread::sleep(DRAIN_EVERY * 5);
            log.log(entry(round));
            assert_eq!(
                sink.wait_for(round as usize + 1),
                round as usize + 1,
                "a line after a quiet spell was not written"
            );
        }
        // A burst after a quiet spell (more than a quarter of the queue wakes the writer):
        // every line written, none dropped.
        std::thread::sleep(DRAIN_EVERY * 15);
        for n in 4..44 {
            log.log(entry(n));
        }
        assert_eq!(
            sink.wait_for(44),
            44,
            "a burst after a quiet spell was lost"
        );
        // Closing wakes an idling writer, which ends.
        std::thread::sleep(DRAIN_EVERY * 5);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            log.close();
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "closing did not stop an idling writer"
        );
        assert_eq!(dropped.get(), 0);
    }
}
