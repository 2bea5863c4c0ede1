//! The front door of the plain-HTTP registry listener: warm blob redirects answered straight
//! from the socket.
//!
//! A warm redirect (a blob whose holder and `Location` are already decided under the current
//! epoch) is the request a gateway serves millions of times a day. Through actix-web it costs
//! the HTTP/1 dispatcher, the `App` (routing, `HttpRequest`, extractors, middleware) and their
//! allocations: about twice the user-space time nginx spends on a `return 307`. So each
//! connection is read here first: every request that is a plain `GET` of a path in the warm
//! redirect cache is answered with the same bytes, headers, metrics and access log line as
//! the `App` would give it. The first request that is anything else (another route, a miss,
//! a body, `Expect`, `Upgrade`, `Connection: close`, HTTP/1.0, a malformed head) hands the
//! connection to actix-http for the rest of its life, with every byte read so far replayed
//! first; actix then answers it exactly as before (errors included). The TLS listener is
//! actix-http throughout.
//!
//! Timeouts are the ones actix is given: an idle connection closes after
//! `server.keep_alive`, a request head must arrive within `server.request_head_timeout` of
//! its first byte (else 408), and an idle connection closes at once when the server begins
//! a graceful stop.

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use actix_http::{HttpService, Protocol};
use actix_server::GracefulShutdownSignal;
use actix_service::{
    fn_factory, fn_service, map_config, IntoServiceFactory, Service, ServiceFactory,
    ServiceFactoryExt,
};
use actix_web::dev::AppConfig;
use actix_web::http::header::HeaderValue;
use actix_web::http::Method;
use actix_web::web;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use std::net::IpAddr;
use std::sync::Arc;

use actix_web::HttpResponse;

use crate::access_log::{Entry, RequestId, RequestIdText};
use crate::api_error::API_VERSION;
use crate::gateway::{Asked, Gateway, Redirect, Scope, BACKEND_HEADER};
use crate::oci::{Digest, RepoName};
use crate::route::{self, Route};
use crate::upstream::Upstream;

/// The connection timeouts (`server.keep_alive`, `server.request_head_timeout`): the same
/// for the front door and for actix.
#[derive(Clone, Copy)]
pub struct Timeouts {
    /// How long an idle connection stays open for its next request.
    pub keep_alive: Duration,
    /// How long a client has, from a request's first byte, to send the whole head.
    pub request_head: Duration,
}

/// A head not complete within this many bytes goes to actix (which answers 431 past its own
/// limit): a warm request is a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;
/// Headers looked at in a warm request; more goes to actix.
const MAX_HEADERS: usize = 32;

/// The registry service for one plain listener on one worker: the `App` that `app` builds,
/// behind an actix-http service configured as `HttpServer` would, and this front door before
/// it.
pub fn service<F, I, S, B>(
    gateway: web::Data<Gateway>,
    upstream: web::Data<Upstream>,
    addr: SocketAddr,
    shutdown: GracefulShutdownSignal,
    timeouts: Timeouts,
    app: F,
) -> impl ServiceFactory<TcpStream, Config = (), Response = (), Error = (), InitError = ()>
where
    F: Fn() -> I + Clone + 'static,
    I: IntoServiceFactory<S, actix_http::Request>,
    S: ServiceFactory<actix_http::Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<actix_http::Response<B>> + 'static,
    <S::Service as Service<actix_http::Request>>::Future: 'static,
    S::Service: 'static,
    B: actix_web::body::MessageBody + 'static,
{
    fn_factory(move || {
        let (gateway, upstream) = (gateway.clone(), upstream.clone());
        let (shutdown, app) = (shutdown.clone(), app.clone());
        async move {
            let actix_shutdown = shutdown.clone();
            let http = HttpService::<Rewind, _, _>::build()
                .keep_alive(timeouts.keep_alive)
                .client_request_timeout(timeouts.request_head)
                .local_addr(addr)
                .graceful_shutdown_signal(move || {
                    let signal = actix_shutdown.clone();
                    async move { signal.notified().await }
                })
                .finish(map_config(
                    app().into_factory().map_err(|e| e.into().error_response()),
                    // What `HttpServer` gives its App (plain HTTP, the listener's address
                    // as host). actix-web builds it with a crate-private constructor; this
                    // is its public, semver-exempt twin (pinned by Cargo.lock; an upgrade
                    // that drops it fails to compile, not at run time).
                    move |_| AppConfig::__priv_test_new(false, addr.to_string(), addr),
                ))
                .new_service(())
                .await
                .map_err(|_| tracing::error!("cannot start the registry service on a worker"))?;
            let http = Rc::new(http);
            Ok::<_, ()>(fn_service(move |io: TcpStream| {
                let (gateway, upstream) = (gateway.clone(), upstream.clone());
                let (shutdown, http) = (shutdown.clone(), http.clone());
                async move {
                    let peer = io.peer_addr().ok();
                    let backends = (&gateway, &upstream);
                    if let Some((io, read)) = front(io, backends, peer, &shutdown, timeouts).await {
                        let replayed = Rewind { read, io };
                        // actix answers (and logs) whatever the front door does not.
                        let _ = http.call((replayed, Protocol::Http1, peer)).await;
                    }
                    Ok::<(), ()>(())
                }
            }))
        }
    })
}

/// What a connection's next buffered request is.
enum Next<'g> {
    /// A warm redirect, answered into the output; `usize` bytes of input consumed.
    Answered(usize),
    /// A cold blob `GET` of a public org, whose head is `usize` bytes: the front door asks
    /// the backends.
    Cold(usize, Box<Cold<'g>>),
    /// The head is not complete yet.
    Partial,
    /// Anything else: actix's to serve.
    Other,
}

/// A cold blob `GET` the front door answers: everything it needs, owned, so that the
/// connection's buffer is free while the backends are asked.
struct Cold<'g> {
    scope: Scope<'g>,
    name: RepoName,
    digest: Digest,
    /// The path as sent.
    path: Box<str>,
    group: Option<&'g str>,
    via: &'static str,
    id: RequestId,
    started: Instant,
}

/// Serves warm redirects on `io` until it closes (`None`) or a request needs actix: then
/// the connection and every byte read but not answered are returned.
async fn front(
    mut io: TcpStream,
    (gw, up): (&web::Data<Gateway>, &web::Data<Upstream>),
    peer: Option<SocketAddr>,
    shutdown: &GracefulShutdownSignal,
    timeouts: Timeouts,
) -> Option<(TcpStream, BytesMut)> {
    let client = peer.map(|p| p.ip());
    let mut read = BytesMut::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let stopping = shutdown.notified();
    tokio::pin!(stopping);
    // When the bytes being parsed arrived: the start of their requests' durations, and of
    // the idle time after them (one clock read per wake-up, however many requests).
    let mut woke = Instant::now();
    let mut idle_since = woke;
    let mut head_since: Option<Instant> = None;
    // One timer per connection, moved only when it fires early: a request costs a clock
    // read, not a timer insertion.
    let mut armed = woke + timeouts.keep_alive;
    let timer = tokio::time::sleep_until(armed.into());
    tokio::pin!(timer);
    loop {
        loop {
            match next(&read, woke, gw, client, &mut out) {
                Next::Answered(used) => {
                    read.advance(used);
                    head_since = None;
                    idle_since = woke;
                }
                Next::Cold(used, cold) => {
                    read.advance(used);
                    // Answers to the requests before it go first.
                    if !out.is_empty() {
                        if io.write_all(&out).await.is_err() {
                            return None;
                        }
                        out.clear();
                    }
                    if !answer_cold(&mut io, gw, up, *cold, &mut out).await {
                        return None;
                    }
                    out.clear();
                    head_since = None;
                    // Requests pipelined behind it start now, as does the idle time.
                    woke = Instant::now();
                    idle_since = woke;
                }
                Next::Partial => break,
                Next::Other => {
                    if !out.is_empty() && io.write_all(&out).await.is_err() {
                        return None;
                    }
                    return Some((io, read));
                }
            }
        }
        if !out.is_empty() {
            if io.write_all(&out).await.is_err() {
                return None;
            }
            out.clear();
        }
        if read.len() > MAX_HEAD {
            return Some((io, read));
        }
        if !read.is_empty() && head_since.is_none() {
            head_since = Some(woke);
        }
        let deadline = match head_since {
            Some(at) => at + timeouts.request_head,
            None => idle_since + timeouts.keep_alive,
        };
        // Deadlines move later as requests come (the timer is moved when it fires), but a
        // head timeout shorter than the keep-alive can move one earlier.
        if deadline < armed {
            armed = deadline;
            timer.as_mut().reset(armed.into());
        }
        tokio::select! {
            biased;
            got = io.read_buf(&mut read) => match got {
                Ok(0) | Err(_) => return None,
                Ok(_) => woke = Instant::now(),
            },
            () = &mut timer => {
                if Instant::now() < deadline {
                    armed = deadline;
                    timer.as_mut().reset(armed.into());
                } else {
                    if head_since.is_some() {
                        let _ = io.write_all(REQUEST_TIMEOUT).await;
                    }
                    return None;
                }
            }
            () = &mut stopping, if read.is_empty() => return None,
        }
    }
}

const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// What the first buffered request is, as far as the front door is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum Head<'a> {
    /// A plain HTTP/1.1 `GET` the front door may answer: its head is `used` bytes, its
    /// target `path` and `query` (without `?`), and the client's `X-Request-Id`. `cold`:
    /// it carries nothing a cold blob's answer depends on beyond its path (no `Range` or
    /// `If-Range`, no trace context to continue), so the front door may ask the backends
    /// for it; a warm redirect ignores those headers (a 307 is the answer to any of them).
    Get {
        used: usize,
        path: &'a str,
        query: &'a str,
        request_id: Option<&'a [u8]>,
        cold: bool,
    },
    /// The head is not complete yet.
    Partial,
    /// Anything else (another method or version, a body, `Expect`, `Upgrade`, a
    /// `Connection` other than keep-alive, an odd query, a malformed head): actix's.
    Other,
}

/// Reads the first request head in `read` (`fuzzing::front_head` holds its invariants).
pub fn classify(read: &[u8]) -> Head<'_> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(read) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Other,
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return Head::Other;
    }
    let Some(target) = req.path else {
        return Head::Other;
    };
    let mut request_id = None;
    let mut cold = true;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"x-request-id") {
            request_id = Some(h.value);
        } else if name.eq_ignore_ascii_case(b"range")
            || name.eq_ignore_ascii_case(b"if-range")
            || name.eq_ignore_ascii_case(b"traceparent")
            || name.eq_ignore_ascii_case(b"tracestate")
        {
            cold = false;
        } else if name.eq_ignore_ascii_case(b"connection") {
            if !h.value.eq_ignore_ascii_case(b"keep-alive") {
                return Head::Other;
            }
        } else if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Head::Other;
        }
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) if query.bytes().all(plain_query_byte) => (path, query),
        Some(_) => return Head::Other,
        None => (target, ""),
    };
    if !path.starts_with('/') {
        return Head::Other;
    }
    Head::Get {
        used,
        path,
        query,
        request_id,
        cold,
    }
}

/// Answers the first request in `read` into `out` when it is a warm redirect; returns the
/// bytes of `read` it used (what a connection does per request; `benches/cost.rs` counts it).
pub fn answer(read: &[u8], gw: &Gateway, out: &mut Vec<u8>) -> Option<usize> {
    match next(read, Instant::now(), gw, None, out) {
        Next::Answered(used) => Some(used),
        Next::Cold(..) | Next::Partial | Next::Other => None,
    }
}

/// Answers the first buffered request into `out` when it is a warm redirect; says so when
/// it is a cold blob the front door may answer.
fn next<'g>(
    read: &[u8],
    started: Instant,
    gw: &'g Gateway,
    client: Option<IpAddr>,
    out: &mut Vec<u8>,
) -> Next<'g> {
    if read.is_empty() {
        return Next::Partial;
    }
    let (used, path, query, given_id, cold) = match classify(read) {
        Head::Get {
            used,
            path,
            query,
            request_id,
            cold,
        } => (used, path, query, request_id, cold),
        Head::Partial => return Next::Partial,
        Head::Other => return Next::Other,
    };
    let Ok(routed) = gw.route_parts(path, query) else {
        return Next::Other;
    };
    let Some(hit) = gw.knowledge.redirect(&routed.path) else {
        if !cold {
            return Next::Other;
        }
        let Some(Ok(Route::Blob { name, digest })) = route::parse(&routed.path) else {
            return Next::Other;
        };
        // A private org's requests (an access check first) and a name outside every org
        // (its error) are actix's.
        let Some(scope) = Scope::public(gw, &name, client) else {
            return Next::Other;
        };
        gw.metrics.redirect_misses.inc();
        return Next::Cold(
            used,
            Box::new(Cold {
                scope,
                name,
                digest,
                path: path.into(),
                group: routed.group,
                via: routed.via,
                id: request_id(given_id),
                started,
            }),
        );
    };
    let id = request_id(given_id);
    let at = SystemTime::now();
    out.extend_from_slice(b"HTTP/1.1 307 Temporary Redirect\r\ncontent-length: 0\r\nlocation: ");
    out.extend_from_slice(hit.location.as_bytes());
    out.extend_from_slice(b"\r\nx-regatta-backend: ");
    out.extend_from_slice(hit.backend.as_bytes());
    out.extend_from_slice(b"\r\nx-request-id: ");
    id.write_to(out);
    out.extend_from_slice(b"\r\ndocker-distribution-api-version: registry/2.0\r\ndate: ");
    write_date(out, at);
    out.extend_from_slice(b"\r\n\r\n");
    served_warm(gw, &hit, id, routed.group, routed.via, started, at);
    Next::Answered(used)
}

/// Query bytes the front door passes on as they are (an `ns=` value, `&`, escapes); any
/// other query goes to actix, which judges it.
fn plain_query_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%' | b'=' | b'&' | b'+')
}

/// The metrics and access log line of a warm redirect, wherever it was answered.
pub fn served_warm(
    gw: &Gateway,
    hit: &Redirect,
    id: RequestId,
    group: Option<&str>,
    via: &'static str,
    started: Instant,
    at: SystemTime,
) {
    gw.metrics.redirect_hits.inc();
    hit.decision.inc();
    hit.requests.inc();
    let elapsed = started.elapsed();
    gw.metrics.blob_seconds.observe(elapsed.as_secs_f64());
    if let Some(log) = &gw.access_log {
        log.log(Entry {
            at,
            method: Method::GET,
            path: hit.path.clone(),
            route: "blob",
            org: Some(hit.org.clone()),
            ns: group.map(|_| hit.org.clone()),
            via,
            status: 307,
            backend: Some(hit.backend.clone()),
            decision: "cached",
            micros: elapsed.as_micros() as u64,
            request_id: id,
        });
    }
}

/// One answer as its metrics and access log line see it.
pub struct Served<'a> {
    pub method: &'a Method,
    /// The path as sent.
    pub path: &'a str,
    /// `blob`, `manifest`, `tags`, `referrers`, `base`, `invalid`, `unknown`.
    pub route: &'static str,
    /// The org label: the org or upstream group the request is for, `-` for none.
    pub org: &'a str,
    pub group: Option<&'a str>,
    pub via: &'static str,
    pub response: &'a HttpResponse,
    pub started: Instant,
    pub id: RequestId,
}

/// The metrics and access log line of every answer but a warm redirect ([`served_warm`]),
/// whether actix-web's `App` or the front door gave it.
pub fn served(gw: &Gateway, s: Served<'_>) {
    let status = s.response.status();
    let method = crate::metrics::method_label(s.method);
    gw.metrics
        .requests
        .with_label_values(&[s.route, method, status.as_str(), s.org])
        .inc();
    let elapsed = s.started.elapsed();
    gw.metrics
        .request_seconds
        .with_label_values(&[s.route])
        .observe(elapsed.as_secs_f64());
    if let Some(log) = &gw.access_log {
        let decision = s
            .response
            .extensions()
            .get::<crate::gateway::Decision>()
            .map_or("-", |d| d.0);
        log.log(Entry {
            at: SystemTime::now(),
            method: s.method.clone(),
            path: s.path.into(),
            route: s.route,
            org: (s.org != "-").then(|| s.org.into()),
            ns: s.group.map(Arc::from),
            via: s.via,
            status: status.as_u16(),
            backend: s.response.headers().get(BACKEND_HEADER).cloned(),
            decision,
            micros: elapsed.as_micros() as u64,
            request_id: s.id,
        });
    }
}

/// Answers a cold blob `GET` on `io` as the `App` would (the same gateway function, span,
/// deadline, headers, metrics and access log line); `false` when the connection cannot go
/// on (the client left, or a streamed body broke off).
async fn answer_cold(
    io: &mut TcpStream,
    gw: &web::Data<Gateway>,
    up: &web::Data<Upstream>,
    cold: Cold<'_>,
    out: &mut Vec<u8>,
) -> bool {
    let span = tracing::info_span!(
        "request",
        request_id = %RequestIdText(&cold.id),
        http.method = "GET",
        http.target = &*cold.path,
    );
    let asked = Asked {
        path: &cold.path,
        range: None,
        gw,
        up,
    };
    let work = crate::gateway::get_public_blob(&cold.scope, &asked, &cold.name, &cold.digest);
    let mut response = match tracing::Instrument::instrument(work, span).await {
        Ok(response) => response,
        Err(e) => actix_web::ResponseError::error_response(&e),
    };
    response
        .headers_mut()
        .insert(crate::startup::REQUEST_ID_HEADER, cold.id.header_value());
    served(
        gw,
        Served {
            method: &Method::GET,
            path: &cold.path,
            route: "blob",
            org: cold.group.unwrap_or(cold.name.org()),
            group: cold.group,
            via: cold.via,
            response: &response,
            started: cold.started,
            id: cold.id,
        },
    );
    write_response(io, response, out).await
}

/// Writes an `App`'s answer as HTTP/1.1 on a kept-alive connection: its status and headers,
/// `Docker-Distribution-API-Version` and `Date`, and its body (sized, or chunked when its
/// length is unknown).
async fn write_response(io: &mut TcpStream, response: HttpResponse, out: &mut Vec<u8>) -> bool {
    use actix_web::body::{BodySize, MessageBody};
    use actix_web::http::header;
    let status = response.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let headers = response.headers();
    for (name, value) in headers.iter() {
        if matches!(
            *name,
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION | header::DATE
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(API_VERSION.0) {
        out.extend_from_slice(b"docker-distribution-api-version: registry/2.0\r\n");
    }
    out.extend_from_slice(b"date: ");
    write_date(out, SystemTime::now());
    // A stream of known length (a blob proxied with the backend's `Content-Length`, which
    // actix-http would send too) goes out raw with that length; one of unknown length is
    // chunked.
    let declared = (!response.head().chunked())
        .then(|| header_u64(headers, header::CONTENT_LENGTH))
        .flatten();
    let body = response.into_body();
    // The body's length when it has one, and whether it goes out chunked.
    let (length, chunked) = match (body.size(), declared) {
        (BodySize::None, _) => {
            out.extend_from_slice(b"\r\n\r\n");
            (None, false)
        }
        (BodySize::Sized(len), _) | (BodySize::Stream, Some(len)) => {
            out.extend_from_slice(b"\r\ncontent-length: ");
            out.extend_from_slice(len.to_string().as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            (Some(len), false)
        }
        (BodySize::Stream, None) => {
            out.extend_from_slice(b"\r\ntransfer-encoding: chunked\r\n\r\n");
            (None, true)
        }
    };
    // A body in one piece (an error's JSON, an empty redirect) goes out with its head.
    let mut body = match body.try_into_bytes() {
        Ok(bytes) => {
            out.extend_from_slice(&bytes);
            return io.write_all(out).await.is_ok();
        }
        Err(body) => body,
    };
    if io.write_all(out).await.is_err() {
        return false;
    }
    let mut sent: u64 = 0;
    loop {
        let chunk = std::future::poll_fn(|cx| Pin::new(&mut body).poll_next(cx)).await;
        let bytes = match chunk {
            None => break,
            Some(Ok(bytes)) => bytes,
            // A backend that broke off mid-blob: the client sees a short body and retries.
            Some(Err(_)) => return false,
        };
        if bytes.is_empty() {
            continue;
        }
        sent += bytes.len() as u64;
        if length.is_some_and(|len| sent > len) {
            // More than the length said: the connection cannot go on in step.
            return false;
        }
        let written = if chunked {
            // One write per chunk: its size line, the bytes and the line end.
            out.clear();
            out.extend_from_slice(format!("{:x}\r\n", bytes.len()).as_bytes());
            out.extend_from_slice(&bytes);
            out.extend_from_slice(b"\r\n");
            io.write_all(out).await
        } else {
            io.write_all(&bytes).await
        };
        if written.is_err() {
            return false;
        }
    }
    match length {
        // Fewer bytes than the length said: close, so the client sees a short body.
        Some(len) => sent == len,
        None => !chunked || io.write_all(b"0\r\n\r\n").await.is_ok(),
    }
}

/// A header's value as a number.
fn header_u64(
    headers: &actix_web::http::header::HeaderMap,
    name: actix_web::http::header::HeaderName,
) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// The client's `X-Request-Id` when it is a sane token, else a fresh one.
pub fn request_id(given: Option<&[u8]>) -> RequestId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(bytes) = given {
        let sane = !bytes.is_empty()
            && bytes.len() <= 128
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if sane {
            if let Ok(value) = HeaderValue::from_bytes(bytes) {
                return RequestId::Given(value);
            }
        }
    }
    let seed = *SEED.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        nanos ^ (u64::from(std::process::id()) << 32)
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    RequestId::Generated { seed, n }
}

/// `Date` in IMF-fixdate, formatted once per second per thread.
fn write_date(out: &mut Vec<u8>, at: SystemTime) {
    thread_local! {
        static LAST: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((u64::MAX, [0; 29])) };
    }
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != secs {
            let text = httpdate::fmt_http_date(at);
            if text.len() == 29 {
                last.1.copy_from_slice(text.as_bytes());
                last.0 = secs;
            } else {
                out.extend_from_slice(text.as_bytes());
                return;
            }
        }
        out.extend_from_slice(&last.1);
    });
}

/// A connection handed to actix: the bytes the front door read but did not answer come
/// first, then the socket.
pub struct Rewind {
    read: BytesMut,
    io: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_gets_are_the_front_doors() {
        let get =
            b"GET /v2/a/b/blobs/sha256:aa HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-1\r\n\r\nGET";
        assert_eq!(
            classify(get),
            Head::Get {
                used: get.len() - 3,
                path: "/v2/a/b/blobs/sha256:aa",
                query: "",
                request_id: Some(&b"r-1"[..]),
                cold: true,
            }
        );
        let ns =
            b"GET /v2/library/x/blobs/d?ns=docker.io HTTP/1.1\r\nConnection: Keep-Alive\r\n\r\n";
        assert!(matches!(
            classify(ns),
            Head::Get {
                path: "/v2/library/x/blobs/d",
                query: "ns=docker.io",
                ..
            }
        ));
        for warm_only in [
            &b"GET /v2/a/b/blobs/d HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n"[..],
            b"GET /v2/a/b/blobs/d HTTP/1.1\r\nIf-Range: \"x\"\r\n\r\n",
            b"GET /v2/a/b/blobs/d HTTP/1.1\r\ntraceparent: 00-ab-cd-01\r\n\r\n",
            b"GET /v2/a/b/blobs/d HTTP/1.1\r\nTraceState: k=v\r\n\r\n",
        ] {
            assert!(
                matches!(classify(warm_only), Head::Get { cold: false, .. }),
                "{}",
                String::from_utf8_lossy(warm_only)
            );
        }
        assert_eq!(classify(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"), Head::Partial);
        assert_eq!(classify(b"GE"), Head::Partial);
        for other in [
            &b"HEAD /v2/ HTTP/1.1\r\n\r\n"[..],
            b"GET /v2/ HTTP/1.0\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"GET http://a/v2/ HTTP/1.1\r\n\r\n",
            b"GET /v2/?q=\"x\" HTTP/1.1\r\n\r\n",
            b"GARBAGE\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert_eq!(
                classify(other),
                Head::Other,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn dates_are_imf_fixdate() {
        let mut out = Vec::new();
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        write_date(&mut out, at);
        write_date(&mut out, at + Duration::from_millis(300));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Tue, 14 Nov 2023 22:13:20 GMTTue, 14 Nov 2023 22:13:20 GMT"
        );
    }
}
