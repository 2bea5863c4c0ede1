//! The plain listener's front door (`src/front.rs`): warm redirects and cold blob GETs of
//! public orgs answered from the socket, everything else handed to actix on the same
//! connection, in order, with nothing lost.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{metric, spawn_app, Config, TestApp};
use crate::images;
use crate::registry::{Registry, Shape};

/// One response as read off the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads `n` responses (to GETs, or to HEADs when `head[i]`) from `conn`, within 10 s.
async fn read_responses(conn: &mut TcpStream, head: &[bool]) -> Vec<Wire> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got: Vec<u8> = Vec::new();
    let mut answers = Vec::new();
    while answers.len() < head.len() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(at)) = parsed.parse(&got) {
            let headers: Vec<(String, String)> = parsed
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map_or(0, |(_, v)| v.parse().unwrap());
            let length = if head[answers.len()] { 0 } else { length };
            if got.len() >= at + length {
                let status = parsed.code.unwrap();
                answers.push(Wire {
                    status,
                    headers,
                    body: got[at..at + length].to_vec(),
                });
                got.drain(..at + length);
                continue;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no complete answer {} in 10 s: {got:?}", answers.len()))
            .unwrap();
        assert!(
            n > 0,
            "the connection closed after {} answers: {:?}",
            answers.len(),
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
    answers
}

/// Reads until the peer closes the connection (within `within`); returns what came.
async fn read_to_close(conn: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(within, conn.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("the connection stayed open past {within:?}"))
        .unwrap();
    got
}

/// A node whose org's layer redirect is warm; returns the node, the backend, and the path.
async fn warm_node(config: Config) -> (TestApp, Registry, String, u64, tempfile::TempDir) {
    let backend = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "front", "1.0", 1, 1024);
    backend.push(&image, "acme/app", "1.0");
    let app = spawn_app(
        &config
            .backend("hub", &backend, "direct")
            .org("acme", &["hub"], "30s", &[])
            .admin(),
    )
    .await;
    let layer = &image.platform("amd64").layers[0];
    let path = format!("/v2/acme/app/blobs/{}", layer.digest);
    // A redirect decided while something changed (the first health probe) is not kept:
    // ask until one is answered from the warm cache.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let hits = redirect_hits(&app.metrics().await);
        assert_eq!(app.get(&path).await.status, 307);
        if redirect_hits(&app.metrics().await) > hits {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the redirect never became warm"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (app, backend, path, layer.size, work)
}

fn redirect_hits(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(r#"regatta_cache_lookups_total{cache="redirect",result="hit"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse().unwrap())
}

/// Pipelined requests on one connection: warm redirects first (the front door), then the
/// base route (actix, after the hand-over), then a warm redirect again (actix's own warm
/// path). Every answer arrives, in order, with the headers the App would give; a HEAD after
/// them is answered on the same connection.
#[actix_web::test]
async fn pipelined_requests_are_answered_in_order_by_front_door_and_actix() {
    let (app, backend, path, size, _work) = warm_node(Config::new()).await;
    let hits_before = redirect_hits(&app.metrics().await);
    let mut conn = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let requests = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nX-Request-Id: pipe-1\r\n\r\n\
         GET {path} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n\
         GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n\
         GET {path} HTTP/1.1\r\nHost: x\r\nX-Request-Id: pipe-4\r\n\r\n"
    );
    conn.write_all(requests.as_bytes()).await.unwrap();
    let mut answers = read_responses(&mut conn, &[false, false, false, false]).await;
    // (Not pipelined: actix-http's codec takes a HEAD that is followed by another request
    // in the same read for a GET, and drops the connection. Real clients do not pipeline.)
    let head = format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    answers.extend(read_responses(&mut conn, &[true]).await);
    let location = backend.url() + &path;
    for i in [0, 1, 3] {
        let a = &answers[i];
        assert_eq!(a.status, 307, "answer {i}: {a:?}");
        assert_eq!(a.header("location"), Some(location.as_str()), "answer {i}");
        assert_eq!(a.header("x-regatta-backend"), Some("hub"), "answer {i}");
        assert_eq!(a.header("content-length"), Some("0"), "answer {i}");
        assert!(a.body.is_empty());
    }
    assert_eq!(answers[0].header("x-request-id"), Some("pipe-1"));
    assert_eq!(answers[3].header("x-request-id"), Some("pipe-4"));
    let generated = answers[1].header("x-request-id").unwrap();
    assert!(
        generated.len() > 16 && generated.contains('-'),
        "{generated}"
    );
    assert_eq!(answers[2].status, 200);
    assert_eq!(answers[2].body, b"{}");
    assert_eq!(answers[4].status, 200, "HEAD of the blob: {:?}", answers[4]);
    assert_eq!(
        answers[4].header("content-length"),
        Some(size.to_string().as_str())
    );
    for a in &answers {
        assert_eq!(
            a.header("docker-distribution-api-version"),
            Some("registry/2.0")
        );
        assert!(a.header("date").is_some_and(|d| d.ends_with(" GMT")));
    }
    // Both warm paths count their hits alike.
    let hits = redirect_hits(&app.metrics().await) - hits_before;
    assert_eq!(hits, 3, "three warm redirects were answered");
}

/// What the front door does not serve reaches actix byte for byte, and actix judges it:
/// a malformed request after a warm one gets actix's 400, HTTP/1.0 and `Connection: close`
/// requests are answered and the connection closed as they ask, a query the front door
/// does not pass on still reaches the warm path.
#[actix_web::test]
async fn what_the_front_door_does_not_serve_reaches_actix_unchanged() {
    let (app, backend, path, _, _work) = warm_node(Config::new()).await;
    let location = backend.url() + &path;

    let mut conn = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let requests = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n");
    conn.write_all(requests.as_bytes()).await.unwrap();
    let answers = read_responses(&mut conn, &[false, false]).await;
    assert_eq!(answers[0].status, 307);
    assert_eq!(answers[1].status, 400, "{:?}", answers[1]);

    for (request, what) in [
        (format!("GET {path} HTTP/1.0\r\n\r\n"), "HTTP/1.0"),
        (
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            "Connection: close",
        ),
    ] {
        let mut conn = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let got = read_to_close(&mut conn, Duration::from_secs(10)).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 307") || text.starts_with("HTTP/1.0 307"),
            "{what}: {text}"
        );
        assert!(text.contains(&location), "{what}: {text}");
    }

    let mut conn = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let odd = format!("GET {path}?x=%22a%22&y=(1) HTTP/1.1\r\nHost: x\r\n\r\n");
    conn.write_all(odd.as_bytes()).await.unwrap();
    let answers = read_responses(&mut conn, &[false]).await;
    assert_eq!(answers[0].status, 307);
    assert_eq!(answers[0].header("location"), Some(location.as_str()));
}

/// A request head in pieces is answered once complete; a head that stops coming gets 408
/// after `server.request_head_timeout`; an idle connection closes after
/// `server.keep_alive`; a graceful stop closes idle connections at once.
#[actix_web::test]
async fn slow_and_idle_connections_are_timed_out() {
    let config = Config::new()
        .server_key(r#"keep_alive = "300ms""#)
        .server_key(r#"request_head_timeout = "400ms""#);
    let (app, _backend, path, _, _work) = warm_node(config).await;

    let mut conn = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let (first, rest) = request.split_at(20);
    conn.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.write_all(rest.as_bytes()).await.unwrap();
    let answers = read_responses(&mut conn, &[false]).await;
    assert_eq!(answers[0].status, 307);
    // Idle now: closed by the keep-alive timeout, with nothing more sent.
    let after = read_to_close(&mut conn, Duration::from_secs(10)).await;
    assert!(after.is_empty(), "{}", String::from_utf8_lossy(&after));

    let mut conn = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    conn.write_all(first.as_bytes()).await.unwrap();
    let got = read_to_close(&mut conn, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

/// A head timeout shorter than the keep-alive still applies: a head that stops coming gets
/// its 408 long before the connection's keep-alive would have ended it.
#[actix_web::test]
async fn a_stalled_head_times_out_before_a_longer_keep_alive() {
    let config = Config::new()
        .server_key(r#"keep_alive = "60s""#)
        .server_key(r#"request_head_timeout = "300ms""#);
    let (app, _backend, path, _, _work) = warm_node(config).await;
    let mut conn = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    // One warm answer first: the timer is then armed for the keep-alive.
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut conn, &[false]).await[0].status, 307);
    conn.write_all(&request.as_bytes()[..20]).await.unwrap();
    let got = read_to_close(&mut conn, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

/// A graceful stop closes idle connections at once: with a keep-alive of a minute and a
/// shutdown timeout of 30 s, an idle connection still open after 10 s fails the test.
#[actix_web::test]
async fn a_graceful_stop_closes_idle_connections() {
    let config = Config::new()
        .server_key(r#"keep_alive = "60s""#)
        .server_key(r#"shutdown_grace = "30s""#);
    let (app, _backend, path, _, _work) = warm_node(config).await;
    let mut conn = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut conn, &[false]).await[0].status, 307);
    let closed = read_to_close(&mut conn, Duration::from_secs(10));
    let (_, after) = futures_util::future::join(app.stop(), closed).await;
    assert!(after.is_empty(), "{}", String::from_utf8_lossy(&after));
}

/// Cold blob GETs of public orgs are answered by the front door (no hand-over to actix)
/// with what the App would give. Pipelined on one connection: a redirect (direct delivery),
/// a blob streamed through (proxy delivery: its bytes hash to its digest), an unknown blob's
/// OCI error, and the base route (actix's, after them); in order, with the request id, API
/// version and date headers, and each counted once in the request metrics.
#[actix_web::test]
async fn cold_blobs_of_public_orgs_are_answered_as_the_app_would() {
    let hub = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "cold", "1.0", 1, 4096);
    hub.push(&image, "acme/app", "1.0");
    hub.push(&image, "piped/app", "1.0");
    let app = spawn_app(
        &Config::new()
            .backend("hub", &hub, "direct")
            .backend("through", &hub, "proxy")
            .org("acme", &["hub"], "30s", &[])
            .org("piped", &["through"], "30s", &[])
            .admin(),
    )
    .await;
    let redirected = &image.platform("amd64").layers[0];
    let streamed = &image.platform("arm64").layers[0];
    let unknown = format!("sha256:{}", "0a".repeat(32));
    let mut conn = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let requests = format!(
        "GET /v2/acme/app/blobs/{} HTTP/1.1\r\nHost: x\r\nX-Request-Id: cold-1\r\n\r\n\
         GET /v2/piped/app/blobs/{} HTTP/1.1\r\nHost: x\r\nX-Request-Id: cold-2\r\n\r\n\
         GET /v2/acme/app/blobs/{unknown} HTTP/1.1\r\nHost: x\r\nX-Request-Id: cold-3\r\n\r\n\
         GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
        redirected.digest, streamed.digest
    );
    conn.write_all(requests.as_bytes()).await.unwrap();
    let answers = read_responses(&mut conn, &[false, false, false, false]).await;

    let location = format!("{}/v2/acme/app/blobs/{}", hub.url(), redirected.digest);
    assert_eq!(answers[0].status, 307, "{:?}", answers[0]);
    assert_eq!(answers[0].header("location"), Some(location.as_str()));
    assert_eq!(answers[0].header("x-regatta-backend"), Some("hub"));
    assert_eq!(answers[0].header("content-length"), Some("0"));

    assert_eq!(answers[1].status, 200, "{:?}", answers[1].headers);
    assert_eq!(answers[1].header("x-regatta-backend"), Some("through"));
    assert_eq!(
        answers[1].header("docker-content-digest"),
        Some(streamed.digest.as_str())
    );
    // The backend's length, as actix-http sends it for a proxied blob (not chunked).
    let length = streamed.size.to_string();
    assert_eq!(answers[1].header("content-length"), Some(length.as_str()));
    assert_eq!(answers[1].header("transfer-encoding"), None);
    assert_eq!(answers[1].body.len() as u64, streamed.size);
    assert_eq!(images::sha256(&answers[1].body), streamed.digest);

    assert_eq!(answers[2].status, 404, "{:?}", answers[2]);
    assert_eq!(answers[2].header("content-type"), Some("application/json"));
    let error: serde_json::Value = serde_json::from_slice(&answers[2].body).unwrap();
    assert_eq!(error["errors"][0]["code"], "BLOB_UNKNOWN", "{error}");

    assert_eq!((answers[3].status, &answers[3].body[..]), (200, &b"{}"[..]));
    for (i, a) in answers.iter().enumerate() {
        if i < 3 {
            let id = format!("cold-{}", i + 1);
            assert_eq!(a.header("x-request-id"), Some(id.as_str()), "answer {i}");
        }
        assert_eq!(
            a.header("docker-distribution-api-version"),
            Some("registry/2.0"),
            "answer {i}"
        );
        assert!(
            a.header("date").is_some_and(|d| d.ends_with(" GMT")),
            "answer {i}"
        );
    }

    let metrics = app.metrics().await;
    for (status, org) in [("307", "acme"), ("200", "piped"), ("404", "acme")] {
        let labels = [
            ("route", "blob"),
            ("method", "GET"),
            ("status", status),
            ("org", org),
        ];
        assert_eq!(
            metric(&metrics, "regatta_requests_total", &labels),
            Some(1.0),
            "blob GET {status} of {org} counted once"
        );
    }
}
