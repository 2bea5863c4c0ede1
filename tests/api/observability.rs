//! Metrics, dashboards, alert rules and request ids, checked with the real tools: promtool,
//! a Prometheus server scraping a node, and the node's own JSON log.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use awc::http::Method;
use serde_json::Value;

use crate::clients::skopeo_pull;
use crate::helpers::{spawn_app, wait_for_http, Config, NodeProcess};
use crate::images;
use crate::procs::{free_port, require, run_ok, wait_until, Proc};
use crate::registry::{Registry, Shape};

const DASHBOARDS: [&str; 3] = ["overview", "backends", "cluster"];

fn promtool_check_metrics(text: &str) {
    require("promtool");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every query of every panel, with Grafana's variables filled in as a dashboard would.
fn panel_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in DASHBOARDS {
        let path = format!("{}/dashboards/{name}.json", env!("CARGO_MANIFEST_DIR"));
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let vars: Vec<&str> = doc["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(
            vars.contains(&"datasource"),
            "{name}: no datasource variable"
        );
        for panel in doc["panels"].as_array().unwrap() {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{name}: panel uses the variable"
            );
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "30s")
                    .replace("$job", "regatta");
                out.push((
                    format!("{name} / {}", panel["title"].as_str().unwrap()),
                    expr,
                ));
            }
        }
    }
    out
}

struct Prometheus {
    port: u16,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        require("prometheus");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}/dashboards/alerts.yml\nscrape_configs:\n  - job_name: regatta\n    static_configs:\n      - targets: ['{target}']\n",
                env!("CARGO_MANIFEST_DIR")
            ),
        )
        .unwrap();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn("prometheus", cmd, &dir.path().join("prometheus.log"));
        wait_until("prometheus to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Prometheus {
            port,
            _dir: dir,
            _proc: proc,
        }
    }

    async fn query(&self, expr: &str) -> Value {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?{}",
            self.port,
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("query", expr)
                .finish()
        );
        let mut response = awc::Client::new().get(url).send().await.unwrap();
        response
            .json::<Value>()
            .limit(16 * 1024 * 1024)
            .await
            .unwrap()
    }
}

#[actix_web::test]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let mut a = Registry::start(Shape::Anonymous, None);
    let b = Registry::start(Shape::Anonymous, None);
    let mut dead = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(
        &work.path().join("image"),
        "observability",
        "1.0",
        3,
        32 * 1024,
    );
    a.push(&image, "acme/app", "1.0");
    b.push(&image, "acme/app", "1.0");
    let config = Config::new()
        .admin()
        .health("1h", 2)
        .backend("a", &a, "proxy")
        .backend("b", &b, "proxy")
        .backend("c", &dead, "direct")
        .org("acme", &["a", "b"], "1s", &[])
        .tag_authorities("acme", &["a"])
        .org("spare", &["c"], "30s", &[]);
    // c is dead before the node's first probe: its probes fail from the start.
    dead.stop();
    let node = spawn_app(&config).await;
    let prometheus = Prometheus::start(&format!("127.0.0.1:{}", node.admin_port.unwrap()));

    // Traffic: a pull (streamed through: proxy delivery), an admin drain and undrain, a
    // failover (a dies; the next layer request finds b), then stale tags.
    let reference = format!("{}/acme/app:1.0", node.host());
    let first = skopeo_pull(&reference, &work.path().join("first"));
    assert_eq!(first.top, image.index.digest);
    assert_eq!(
        node.admin(Method::POST, "/admin/v1/backends/b/drain", None)
            .await
            .status,
        200
    );
    assert_eq!(
        node.admin(Method::POST, "/admin/v1/backends/b/undrain", None)
            .await
            .status,
        200
    );
    a.stop();
    let layer = &image.platform("amd64").layers[1].digest;
    assert_eq!(
        node.blob_backend("acme/app", layer).await,
        "b",
        "failover to b"
    );
    std::thread::sleep(Duration::from_millis(1200)); // the tag TTL (1 s) runs out
    let second = skopeo_pull(&reference, &work.path().join("second"));
    assert_eq!(second.top, image.index.digest);
    assert_eq!(node.get("/v2/nobody/app/manifests/1.0").await.status, 403);

    let metrics = node
        .send_raw(&format!("{}/metrics", node.admin_url()))
        .await;
    assert_eq!(metrics.status, 200, "/metrics needs no token");
    let text = String::from_utf8(metrics.body).unwrap();
    promtool_check_metrics(&text);
    for name in [
        "regatta_requests_total",
        "regatta_decisions_total",
        "regatta_placement_duration_seconds_bucket",
        "regatta_backend_health",
        "regatta_stale_tag_serves_total",
        "regatta_proxied_bytes_total",
        "process_cpu_seconds_total",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }

    // Keep traffic flowing while the panels are read, so rates show what a live node does.
    let traffic = {
        let url = node.url(&format!("/v2/acme/app/blobs/{layer}"));
        let manifest = node.url(&format!("/v2/acme/app/manifests/{}", image.index.digest));
        actix_web::rt::spawn(async move {
            let client = awc::Client::new();
            loop {
                if let Ok(mut r) = client.get(&url).send().await {
                    let _ = r.body().limit(64 * 1024 * 1024).await;
                }
                let _ = client.head(&manifest).send().await;
                actix_web::rt::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut answers = Vec::new();
    for (panel, expr) in panel_queries() {
        let mut last = Value::Null;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let doc = prometheus.query(&expr).await;
            assert_eq!(doc["status"], "success", "{panel}: {expr}: {doc}");
            if doc["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                last = doc["data"]["result"].clone();
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{panel}: `{expr}` returned no data: {last}"
            );
            actix_web::rt::time::sleep(Duration::from_millis(500)).await;
        }
        answers.push(format!("{panel}: {last}"));
    }
    traffic.abort();
    println!(
        "dashboard queries and what they returned:\n{}",
        answers.join("\n")
    );

    // The alert rules load and evaluate in the same server.
    let rules = prometheus.query("ALERTS").await;
    assert_eq!(rules["status"], "success");
}

#[test]
fn alert_rules_pass_promtool() {
    require("promtool");
    let mut cmd = Command::new("promtool");
    cmd.args(["check", "rules"]).arg(format!(
        "{}/dashboards/alerts.yml",
        env!("CARGO_MANIFEST_DIR")
    ));
    let out = run_ok(cmd, Duration::from_secs(60));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[actix_web::test]
async fn request_ids_are_returned_and_logged() {
    let registry = Registry::start(Shape::Anonymous, None);
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(
        dir.path(),
        "regatta",
        &format!(
            "[log]\nformat = \"json\"\nfilter = \"info\"\n[[backends]]\nid = \"hub\"\nurl = \"{}\"\ndelivery = \"direct\"\n[[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\n",
            registry.url()
        ),
        &[],
    );
    let (port, log) = (node.port, node.log.clone());
    wait_for_http(&format!("http://127.0.0.1:{port}/healthz")).await;

    let client = awc::Client::new();
    let given = client
        .get(format!(
            "http://127.0.0.1:{port}/v2/acme/app/manifests/none"
        ))
        .insert_header(("X-Request-Id", "test-request-42"))
        .send()
        .await
        .unwrap();
    assert_eq!(given.status(), 404);
    assert_eq!(
        given.headers().get("x-request-id").unwrap(),
        "test-request-42"
    );
    let fresh = client
        .get(format!("http://127.0.0.1:{port}/v2/"))
        .send()
        .await
        .unwrap();
    let fresh_id = fresh
        .headers()
        .get("x-request-id")
        .expect("a generated id")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(fresh_id.len() >= 8);
    let bad = client
        .get(format!("http://127.0.0.1:{port}/v2/Bad/x/manifests/1"))
        .insert_header(("X-Request-Id", "spaces are not allowed"))
        .send()
        .await
        .unwrap();
    let bad_id = bad
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(bad_id, "spaces are not allowed");

    // A blob asked twice: placed by its holder first, then answered from the warm cache.
    let image = images::multiarch(&dir.path().join("image"), "access", "1.0", 1, 1024);
    registry.push(&image, "acme/app", "1.0");
    let blob = format!(
        "http://127.0.0.1:{port}/v2/acme/app/blobs/{}",
        image.platform("amd64").layers[0].digest
    );
    let no_follow = awc::Client::builder().disable_redirects().finish();
    for id in ["blob-cold", "blob-warm"] {
        let answer = no_follow
            .get(&blob)
            .insert_header(("X-Request-Id", id))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 307);
    }

    // One access log line per request, with what the request was and how it was answered.
    let path_of = |url: &str| url.split_once(&format!("{port}")).unwrap().1.to_owned();
    let expected = [
        (
            "test-request-42",
            "/v2/acme/app/manifests/none",
            "manifest",
            "acme",
            404,
            "-",
            "-",
        ),
        (fresh_id.as_str(), "/v2/", "base", "-", 200, "-", "-"),
        (
            bad_id.as_str(),
            "/v2/Bad/x/manifests/1",
            "invalid",
            "-",
            400,
            "-",
            "-",
        ),
        (
            "blob-cold",
            &path_of(&blob),
            "blob",
            "acme",
            307,
            "hub",
            "holder",
        ),
        (
            "blob-warm",
            &path_of(&blob),
            "blob",
            "acme",
            307,
            "hub",
            "cached",
        ),
    ];
    for (id, path, route, org, status, backend, decision) in expected {
        let mut found = None;
        wait_until(
            &format!("an access log line for {id}"),
            Duration::from_secs(10),
            || {
                found = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                    .find(|v| v["kind"] == "access" && v["request_id"] == id);
                found.is_some()
            },
        );
        let line = found.unwrap();
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["path"], path, "{line}");
        assert_eq!(line["route"], route, "{line}");
        assert_eq!(line["org"], org, "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["backend"], backend, "{line}");
        assert_eq!(line["decision"], decision, "{line}");
        assert!(line["micros"].is_u64(), "{line}");
        assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
    }
}

#[actix_web::test]
async fn access_log_in_logfmt_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let access = dir.path().join("access.log");
    let node = NodeProcess::start(
        dir.path(),
        "regatta",
        &format!(
            "[access_log]\nformat = \"logfmt\"\npath = \"{}\"\n\
             [[backends]]\nid = \"hub\"\nurl = \"http://127.0.0.1:9\"\ndelivery = \"direct\"\n\
             [[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\n",
            access.display()
        ),
        &[],
    );
    let url = format!("http://127.0.0.1:{}/v2/", node.port);
    wait_for_http(&url).await;
    let answer = awc::Client::new()
        .get(&url)
        .insert_header(("X-Request-Id", "logfmt-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let mut line = String::new();
    wait_until("the logfmt line", Duration::from_secs(10), || {
        line = std::fs::read_to_string(&access)
            .unwrap_or_default()
            .lines()
            .find(|l| l.ends_with("request_id=logfmt-1"))
            .unwrap_or_default()
            .to_owned();
        !line.is_empty()
    });
    for pair in [
        "kind=access",
        "method=GET",
        "path=/v2/",
        "route=base",
        "org=-",
        "status=200",
        "backend=-",
        "decision=-",
    ] {
        assert!(line.split(' ').any(|p| p == pair), "{pair} in {line}");
    }
    // The node's own log (stderr) does not carry the access lines.
    let own = std::fs::read_to_string(&node.log).unwrap();
    assert!(!own.contains("logfmt-1"), "{own}");
}

/// Each request a backend saw: `METHOD /path` and its `traceparent`.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

/// A backend that answers every blob and remembers the `traceparent` of every request.
struct RecordingBackend {
    port: u16,
    seen: Seen,
    handle: actix_web::dev::ServerHandle,
}

impl RecordingBackend {
    async fn start() -> RecordingBackend {
        use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
        let seen: Seen = Default::default();
        let record = seen.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = HttpServer::new(move || {
            let record = record.clone();
            App::new().default_service(web::to(move |req: HttpRequest| {
                let record = record.clone();
                async move {
                    let traceparent = req
                        .headers()
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    record
                        .lock()
                        .unwrap()
                        .push((format!("{} {}", req.method(), req.path()), traceparent));
                    if req.path() == "/v2/" {
                        return HttpResponse::Ok().json(serde_json::json!({}));
                    }
                    HttpResponse::Ok()
                        .content_type("application/octet-stream")
                        .body("recorded blob")
                }
            }))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        wait_for_http(&format!("http://127.0.0.1:{port}/v2/")).await;
        RecordingBackend { port, seen, handle }
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        actix_web::rt::spawn(async move { handle.stop(false).await });
    }
}

#[actix_web::test]
async fn a_request_is_traced_to_the_collector_and_continued_at_the_backend() {
    let mut collector = fake_opentelemetry_collector::FakeCollectorServer::start()
        .await
        .unwrap();
    let backend = RecordingBackend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(
        dir.path(),
        "regatta",
        &format!(
            "[log]\nformat = \"json\"\nfilter = \"warn\"\n[tracing]\notlp_endpoint = \"{}\"\nprotocol = \"grpc\"\n[health]\ninterval = \"1h\"\n[[backends]]\nid = \"rec\"\nurl = \"http://127.0.0.1:{}\"\ndelivery = \"proxy\"\n[[orgs]]\nname = \"acme\"\nbackends = [\"rec\"]\n",
            collector.endpoint(),
            backend.port
        ),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let port = node.port;
    wait_for_http(&format!("http://127.0.0.1:{port}/healthz")).await;
    backend.seen.lock().unwrap().clear();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let digest = "sha256:8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4";
    let mut response = awc::Client::new()
        .get(format!(
            "http://127.0.0.1:{port}/v2/acme/app/blobs/{digest}"
        ))
        .insert_header(("traceparent", format!("00-{trace_id}-{caller_span}-01")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.body().await.unwrap(), "recorded blob");

    // The backend calls made for this request (not the health prober's own, which start
    // traces of their own) carried the same trace, each with its own parent span.
    let seen: Vec<_> = backend
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(call, _)| call.contains("/blobs/"))
        .cloned()
        .collect();
    assert!(!seen.is_empty());
    for (call, traceparent) in &seen {
        let traceparent = traceparent
            .as_deref()
            .unwrap_or_else(|| panic!("{call} carried no traceparent"));
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts[1], trace_id, "{call}: {traceparent}");
        assert_ne!(
            parts[2], caller_span,
            "{call}: the gateway's own span is the parent"
        );
    }

    // The spans of that request reached the collector: request, placement, backend calls.
    let mut spans = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        spans.extend(
            collector
                .exported_spans(1, Duration::from_millis(500))
                .await,
        );
        let names: Vec<&str> = spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .map(|s| s.name.as_str())
            .collect();
        if ["request", "placement", "backend_call"]
            .iter()
            .all(|n| names.contains(n))
        {
            break;
        }
    }
    let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let request = ours
        .iter()
        .find(|s| s.name == "request")
        .unwrap_or_else(|| {
            panic!(
                "no request span among {:?}",
                ours.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(
        request.parent_span_id, caller_span,
        "the caller's trace is continued"
    );
    let placement = ours
        .iter()
        .find(|s| s.name == "placement")
        .expect("a placement span");
    assert_eq!(placement.parent_span_id, request.span_id);
    let calls: Vec<_> = ours.iter().filter(|s| s.name == "backend_call").collect();
    assert!(!calls.is_empty(), "backend call spans");
    for call in calls {
        assert_eq!(
            call.parent_span_id, request.span_id,
            "backend calls are children of the request"
        );
        let traceparents: Vec<String> = seen.iter().filter_map(|(_, t)| t.clone()).collect();
        assert!(
            traceparents.iter().any(|t| t.contains(&call.span_id)),
            "the backend saw span {} as its parent: {traceparents:?}",
            call.span_id
        );
    }
}

#[actix_web::test]
async fn traces_reach_an_otlp_http_receiver() {
    require("python3");
    let mut probe = Command::new("python3");
    probe.args(["-c", "import oteltap"]);
    assert!(
        crate::procs::run(probe, Duration::from_secs(30))
            .status
            .success(),
        "the oteltap Python package is not installed: run scripts/test.sh, which installs it"
    );
    let dir = tempfile::tempdir().unwrap();
    let tap_port = free_port();
    let mut tap = Command::new("python3");
    tap.args(["-u", "-m", "oteltap", "--port", &tap_port.to_string()]);
    let tap_log = dir.path().join("oteltap.ndjson");
    let _tap = Proc::spawn("oteltap", tap, &tap_log);
    wait_until("oteltap to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", tap_port)).is_ok()
    });
    let registry = Registry::start(Shape::Anonymous, None);
    let node = NodeProcess::start(
        dir.path(),
        "regatta",
        &format!(
            "[log]\nformat = \"json\"\nfilter = \"warn\"\n[tracing]\notlp_endpoint = \"http://127.0.0.1:{tap_port}\"\nprotocol = \"http\"\n[health]\ninterval = \"1h\"\n[[backends]]\nid = \"hub\"\nurl = \"{}\"\ndelivery = \"direct\"\n[[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\n",
            registry.url()
        ),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    wait_for_http(&format!("http://127.0.0.1:{}/healthz", node.port)).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let answer = awc::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/v2/acme/app/manifests/1.0",
            node.port
        ))
        .insert_header(("traceparent", format!("00-{trace_id}-{caller_span}-01")))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404, "the registry has no such tag");
    wait_until(
        "the request span at the OTLP/HTTP receiver",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&tap_log)
                .unwrap_or_default()
                .lines()
                .any(|line| {
                    serde_json::from_str::<Value>(line).is_ok_and(|span| {
                        span["traceId"] == trace_id
                            && span["name"] == "request"
                            && span["parentSpanId"] == caller_span
                    })
                })
        },
    );
}

/// Whether `text` (Prometheus exposition) has a series `name` with all `labels`, at `value`.
fn has_series(text: &str, name: &str, labels: &[(&str, &str)], value: &str) -> bool {
    text.lines().any(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('{'))
            .is_some_and(|rest| {
                labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                    && rest.ends_with(&format!("}} {value}"))
            })
    })
}

#[actix_web::test]
async fn series_exist_from_startup_and_clients_cannot_add_any() {
    let hub = Registry::start(Shape::Anonymous, None);
    let node = spawn_app(&Config::new().admin().backend("hub", &hub, "direct").org(
        "acme",
        &["hub"],
        "30s",
        &[],
    ))
    .await;
    let metrics = || async {
        let answer = node
            .send_raw(&format!("{}/metrics", node.admin_url()))
            .await;
        String::from_utf8(answer.body).unwrap()
    };
    let text = metrics().await;
    let expected: &[(&str, &[(&str, &str)])] = &[
        ("regatta_admin_changes_total", &[("action", "drain")]),
        ("regatta_admin_changes_total", &[("action", "put-org")]),
        ("regatta_probe_failures_total", &[("backend", "hub")]),
        ("regatta_proxied_bytes_total", &[("backend", "hub")]),
        ("regatta_stale_tag_serves_total", &[("org", "acme")]),
        (
            "regatta_decisions_total",
            &[("backend", "hub"), ("reason", "failover")],
        ),
    ];
    for (name, labels) in expected {
        assert!(
            has_series(&text, name, labels, "0"),
            "{name}{labels:?} is not at 0 before any event:\n{text}"
        );
    }

    let request_series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("regatta_requests_total{"))
            .count()
    };
    let before = request_series(&metrics().await);
    for i in 0..300 {
        let method = Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        let answer = node
            .request(method, "/v2/acme/app/manifests/1.0", &[])
            .await;
        assert_eq!(answer.status, 405);
    }
    let text = metrics().await;
    assert!(
        request_series(&text) <= before + 1,
        "invented methods added series: {} before, {} after",
        before,
        request_series(&text)
    );
    assert!(has_series(
        &text,
        "regatta_requests_total",
        &[("method", "other"), ("status", "405")],
        "300"
    ));
}
