//! `HEAD` requests to backends on connections a worker keeps for them: the blob probes of
//! the cold path and the keep-warm call that holds those connections open.
//!
//! A probe is the one backend call every cold blob makes, and its answer is a status and
//! a length. Through awc it cost more than the rest of the gateway's cold work together
//! (a request builder, header maps, the pool's bookkeeping, and a client codec that spawns
//! a date task per request: about 34,000 instructions a probe, BENCHMARKS.md); here it is
//! one buffer written and one head parsed with httparse. HTTP/1.1 only (ALPN says so on
//! TLS), one request per connection at a time, no body (a `HEAD` answer has none).
//!
//! Idle connections are kept per backend, at most `MAX_IDLE`, for at most `KEEP_IDLE`. One
//! with anything to read when taken (an answer nobody asked for, or the backend's close) is
//! dropped; one that fails before any answer comes costs one retry on a fresh connection
//! (the request is a `HEAD`: safe to send twice). Every exchange is bounded by the upstream
//! request timeout, every connect and TLS handshake by the connect timeout.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderValue;
use actix_web::http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::UpstreamSettings;
use crate::model::BackendIdx;
use crate::topology::Backend;

/// Idle connections kept per backend and worker.
const MAX_IDLE: usize = 16;
/// How long an idle connection is kept (below the idle timeouts registries use).
const KEEP_IDLE: Duration = Duration::from_secs(15);
/// Longest answer head read.
const MAX_HEAD: usize = 16 * 1024;

/// What a backend answered to a `HEAD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub content_length: Option<u64>,
    /// `WWW-Authenticate`, on a 401.
    pub challenge: Option<String>,
}

/// A kept connection: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl Io for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Io for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Whether nothing waits to be read on an idle connection: no bytes (an answer nobody
/// asked for, as a server's 408 before it closes) and no close. Asks the socket itself
/// (`MSG_PEEK`, non-blocking): the runtime's readiness may not have seen them yet.
fn quiet(io: &dyn Io) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(io.tcp()).peek(&mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

struct Kept {
    io: Box<dyn Io>,
    since: Instant,
}

/// Where a backend's requests go, read once from its base URL.
struct Target {
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    /// The base URL's path, prepended to every request path.
    prefix: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
}

/// One worker's `HEAD` client (not `Send`, like the worker's awc client).
pub struct HeadClient {
    idle: RefCell<HashMap<BackendIdx, Vec<Kept>>>,
    targets: RefCell<HashMap<BackendIdx, Rc<Target>>>,
    connect_timeout: Duration,
    timeout: Duration,
}

/// Why a `HEAD` got no answer.
#[derive(Debug)]
struct Failed {
    reason: String,
    /// Nothing at all came back: on a reused connection, the backend had closed it.
    silent: bool,
}

impl Failed {
    fn new(reason: impl Into<String>) -> Failed {
        Failed {
            reason: reason.into(),
            silent: false,
        }
    }
}

impl HeadClient {
    pub fn new(settings: &UpstreamSettings) -> HeadClient {
        HeadClient {
            idle: RefCell::new(HashMap::new()),
            targets: RefCell::new(HashMap::new()),
            connect_timeout: settings.connect_timeout,
            timeout: settings.request_timeout,
        }
    }

    /// `HEAD {path}` on `backend` with `extra` header lines (each `name: value\r\n`), on a
    /// kept connection when there is one. `Err` carries why no answer came.
    pub async fn head(
        &self,
        backend: &Backend,
        path: &str,
        authorization: Option<&HeaderValue>,
        extra: &[(String, String)],
    ) -> Result<Answer, String> {
        let target = self.target(backend)?;
        let mut request = Vec::with_capacity(256);
        request.extend_from_slice(b"HEAD ");
        request.extend_from_slice(target.prefix.as_bytes());
        request.extend_from_slice(path.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        request.extend_from_slice(target.authority.as_bytes());
        request.extend_from_slice(b"\r\nuser-agent: ");
        request.extend_from_slice(crate::upstream::USER_AGENT.as_bytes());
        if let Some(value) = authorization {
            request.extend_from_slice(b"\r\nauthorization: ");
            request.extend_from_slice(value.as_bytes());
        }
        for (name, value) in extra {
            request.extend_from_slice(b"\r\n");
            request.extend_from_slice(name.as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(value.as_bytes());
        }
        request.extend_from_slice(b"\r\n\r\n");
        let work = async {
            if let Some(mut io) = self.take(backend.idx) {
                match exchange(&mut io, &request).await {
                    Ok((answer, keep)) => {
                        if keep {
                            self.put(backend.idx, io);
                        }
                        return Ok(answer);
                    }
                    // The backend closed the kept connection: once more on a fresh one.
                    Err(e) if e.silent => {}
                    Err(e) => return Err(e.reason),
                }
            }
            let mut io = self.connect(&target).await?;
            let (answer, keep) = exchange(&mut io, &request).await.map_err(|e| e.reason)?;
            if keep {
                self.put(backend.idx, io);
            }
            Ok(answer)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {}ms", self.timeout.as_millis())),
        }
    }

    fn target(&self, backend: &Backend) -> Result<Rc<Target>, String> {
        if let Some(target) = self.targets.borrow().get(&backend.idx) {
            return Ok(target.clone());
        }
        let target = Rc::new(Target::of(backend)?);
        self.targets
            .borrow_mut()
            .insert(backend.idx, target.clone());
        Ok(target)
    }

    /// The most recently used idle connection still young enough and quiet: one that has
    /// something to read (an answer nobody asked for, as a server's 408 before it closes)
    /// or was closed is dropped.
    fn take(&self, idx: BackendIdx) -> Option<Box<dyn Io>> {
        let mut idle = self.idle.borrow_mut();
        let kept = idle.get_mut(&idx)?;
        while let Some(k) = kept.pop() {
            if k.since.elapsed() < KEEP_IDLE && quiet(&*k.io) {
                return Some(k.io);
            }
        }
        None
    }

    fn put(&self, idx: BackendIdx, io: Box<dyn Io>) {
        let mut idle = self.idle.borrow_mut();
        let kept = idle.entry(idx).or_default();
        if kept.len() >= MAX_IDLE {
            kept.remove(0);
        }
        kept.push(Kept {
            io,
            since: Instant::now(),
        });
    }

    async fn connect(&self, target: &Target) -> Result<Box<dyn Io>, String> {
        let connect = TcpStream::connect((target.host.as_str(), target.port));
        let tcp = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(format!("Failed to connect to host: {e}")),
            Err(_) => {
                return Err(format!(
                    "connect timed out after {}ms",
                    self.connect_timeout.as_millis()
                ))
            }
        };
        let _ = tcp.set_nodelay(true);
        let Some((connector, name)) = &target.tls else {
            return Ok(Box::new(tcp));
        };
        let handshake = connector.connect(name.clone(), tcp);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(Ok(tls)) => Ok(Box::new(tls)),
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err(format!(
                "TLS handshake timed out after {}ms",
                self.connect_timeout.as_millis()
            )),
        }
    }
}

impl Target {
    fn of(backend: &Backend) -> Result<Target, String> {
        let url = url::Url::parse(&backend.base)
            .map_err(|e| format!("base URL '{}': {e}", backend.base))?;
        let host = url
            .host_str()
            .ok_or_else(|| format!("base URL '{}' has no host", backend.base))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| format!("base URL '{}' has no port", backend.base))?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        // `host_str` keeps an IPv6 literal's brackets; a socket address and a server name
        // have none.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let tls = match url.scheme() {
            "http" => None,
            "https" => {
                let mut config = match &backend.tls {
                    Some(config) => (**config).clone(),
                    None => (*crate::topology::public_roots()).clone(),
                };
                // This client speaks HTTP/1.1 only.
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let name = rustls_pki_types::ServerName::try_from(bare.to_owned())
                    .map_err(|e| format!("'{host}' is not a TLS server name: {e}"))?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
            other => return Err(format!("base URL scheme '{other}' is not http or https")),
        };
        Ok(Target {
            host: bare.to_owned(),
            port,
            authority,
            prefix: url.path().trim_end_matches('/').to_owned(),
            tls,
        })
    }
}

/// Sends `request` and reads the answer's head; says whether the connection may be kept.
async fn exchange(io: &mut Box<dyn Io>, request: &[u8]) -> Result<(Answer, bool), Failed> {
    let silent = |reason: String| Failed {
        reason,
        silent: true,
    };
    // (A TLS stream may hold written bytes back until flushed.)
    let sent = async {
        io.write_all(request).await?;
        io.flush().await
    };
    sent.await
        .map_err(|e| silent(format!("sending the request failed: {e}")))?;
    let mut got: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 2048];
        let n = match io.read(&mut chunk).await {
            Ok(0) if got.is_empty() => return Err(silent("connection closed".into())),
            Ok(0) => return Err(Failed::new("connection closed mid-answer")),
            Ok(n) => n,
            Err(e) if got.is_empty() => return Err(silent(format!("reading failed: {e}"))),
            Err(e) => return Err(Failed::new(format!("reading failed: {e}"))),
        };
        got.extend_from_slice(&chunk[..n]);
        if let Some(parsed) = parse(&got)? {
            return Ok(parsed);
        }
        if got.len() > MAX_HEAD {
            return Err(Failed::new("answer head too large"));
        }
    }
}

/// The answer in `got` once its head is complete, and whether its connection may be kept:
/// HTTP/1.1, no `Connection: close`, nothing after the head (a `HEAD` answer has no body).
fn parse(got: &[u8]) -> Result<Option<(Answer, bool)>, Failed> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let used = match response.parse(got) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Failed::new(format!("unreadable answer: {e}"))),
    };
    let code = response.code.unwrap_or(0);
    // An interim answer (100 Continue) is not the answer; none is expected for a HEAD.
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|s| !s.is_informational())
        .ok_or_else(|| Failed::new(format!("unexpected status {code}")))?;
    let mut answer = Answer {
        status,
        content_length: None,
        challenge: None,
    };
    let mut keep = response.version == Some(1) && used == got.len();
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            answer.content_length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok());
        } else if h.name.eq_ignore_ascii_case("connection") {
            keep &= !h.value.eq_ignore_ascii_case(b"close");
        } else if h.name.eq_ignore_ascii_case("www-authenticate") && answer.challenge.is_none() {
            // The first challenge, as `Upstream::send` reads it.
            answer.challenge = std::str::from_utf8(h.value).ok().map(str::to_owned);
        }
    }
    Ok(Some((answer, keep)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend_at(port: u16) -> Backend {
        Backend {
            idx: 0,
            id: "b".into(),
            base: format!("http://127.0.0.1:{port}"),
            region: "eu".into(),
            delivery: crate::model::Delivery::Direct,
            credentials: crate::topology::Credentials::Anonymous,
            weight: 1,
            canary: None,
            token_realm_hosts: Vec::new(),
            tls: None,
        }
    }

    /// Reads one request head from `io`.
    async fn read_request(io: &mut TcpStream) -> String {
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if io.read(&mut byte).await.unwrap_or(0) == 0 {
                break;
            }
            got.push(byte[0]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// A kept connection is used again; one on which the server wrote an answer nobody
    /// asked for (a 408 before closing) is dropped rather than read as the next answer, and
    /// so is one the server closed: the next request goes out on a fresh connection.
    #[tokio::test]
    async fn kept_connections_are_reused_only_while_quiet() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Loopback delivers what the server writes (no Nagle: `TCP_NODELAY`), and its close,
        // before `write` returns: once told, the client's socket holds them.
        let (told_408, heard_408) = tokio::sync::oneshot::channel();
        let (kept, heard_kept) = tokio::sync::oneshot::channel();
        let (told_closed, heard_closed) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            // First connection: two answers, then an unsolicited 408 (kept open: a client
            // that read on would take it for the next answer).
            let (mut first, _) = listener.accept().await.unwrap();
            first.set_nodelay(true).unwrap();
            let io = &mut first;
            for status in ["200 OK", "404 Not Found"] {
                let asked = read_request(io).await;
                assert!(asked.starts_with("HEAD /v2/"), "{asked}");
                let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 7\r\n\r\n");
                io.write_all(answer.as_bytes()).await.unwrap();
            }
            // Once the client has read the second answer and kept the connection.
            heard_kept.await.unwrap();
            io.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
                .await
                .unwrap();
            told_408.send(()).unwrap();
            // Second connection: one answer, then closed while kept.
            let (mut io, _) = listener.accept().await.unwrap();
            io.set_nodelay(true).unwrap();
            read_request(&mut io).await;
            io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n")
                .await
                .unwrap();
            drop(io);
            told_closed.send(()).unwrap();
            // Third connection.
            let (mut io, _) = listener.accept().await.unwrap();
            read_request(&mut io).await;
            io.write_all(b"HTTP/1.1 404 Not Found\r\n\r\n")
                .await
                .unwrap();
            read_request(&mut io).await;
            drop(first);
        });
        let client = HeadClient::new(&UpstreamSettings::default());
        let backend = backend_at(port);
        let ask = |path: &'static str| {
            let (client, backend) = (&client, &backend);
            async move { client.head(backend, path, None, &[]).await.unwrap() }
        };
        let first = ask("/v2/a").await;
        assert_eq!(
            (first.status, first.content_length),
            (StatusCode::OK, Some(7))
        );
        let second = ask("/v2/b").await;
        assert_eq!(second.status, StatusCode::NOT_FOUND, "the kept connection");
        kept.send(()).unwrap();
        heard_408.await.unwrap();
        let third = ask("/v2/c").await;
        assert_eq!(
            (third.status, third.content_length),
            (StatusCode::OK, Some(9)),
            "a fresh connection, not the 408"
        );
        heard_closed.await.unwrap();
        let fourth = ask("/v2/d").await;
        assert_eq!(
            fourth.status,
            StatusCode::NOT_FOUND,
            "a fresh connection's answer"
        );
        drop(client);
        server.abort();
    }

    #[test]
    fn answer_heads_are_read_and_judged_for_keeping() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nDocker-Content-Digest: x\r\n\r\n";
        let (answer, keep) = parse(ok).unwrap().unwrap();
        assert_eq!(
            (answer.status, answer.content_length, keep),
            (StatusCode::OK, Some(1234), true)
        );
        assert!(parse(&ok[..20]).unwrap().is_none());
        let challenge =
            b"HTTP/1.1 401 Unauthorized\r\nWww-Authenticate: Bearer realm=\"r\"\r\n\r\n";
        let (answer, _) = parse(challenge).unwrap().unwrap();
        assert_eq!(answer.challenge.as_deref(), Some("Bearer realm=\"r\""));
        let two = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"r\"\r\nWWW-Authenticate: Basic realm=\"b\"\r\n\r\n";
        let (answer, _) = parse(two).unwrap().unwrap();
        assert_eq!(
            answer.challenge.as_deref(),
            Some("Bearer realm=\"r\""),
            "the first challenge, as `send` reads it"
        );
        for (not_kept, why) in [
            (
                &b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n"[..],
                "close",
            ),
            (b"HTTP/1.0 200 OK\r\n\r\n", "HTTP/1.0"),
            (b"HTTP/1.1 200 OK\r\n\r\nstray", "bytes after the head"),
        ] {
            let (_, keep) = parse(not_kept).unwrap().unwrap();
            assert!(!keep, "{why}");
        }
        for broken in [&b"garbage\r\n\r\n"[..], b"HTTP/1.1 100 Continue\r\n\r\n"] {
            assert!(parse(broken).is_err());
        }
    }
}
