//! Building and running a node: the store, the shared gateway state, the registry API
//! listener, the admin listener, and the background tasks (snapshot refresher, health
//! prober). Port 0 works: bound addresses are exposed so tests can start nodes freely.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::dev::{Server, ServerHandle};
use actix_web::http::header::{self, HeaderName};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::DefaultHeaders;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

use crate::access_log::{RequestId, RequestIdText};
use crate::admin::{self, AdminToken};
use crate::api_error::{ApiError, API_VERSION};
use crate::config::{HealthSettings, Settings, UpstreamSettings};
use crate::gateway::{self, Gateway};
use crate::store::{MemoryStore, RecordCheck, RecordLimits, RedisStore, Store};
use crate::upstream::Upstream;
use crate::{cluster, health, route};

pub struct Application {
    server: Server,
    admin: Option<(Server, SocketAddr)>,
    addr: SocketAddr,
    gateway: web::Data<Gateway>,
    background: Background,
}

struct Background {
    seeds: Vec<(String, crate::model::OrgPolicy)>,
    refresh_interval: std::time::Duration,
    health: HealthSettings,
    upstream: UpstreamSettings,
    node_id: String,
}

impl Application {
    /// Binds the listeners and prepares the servers; nothing is served until `run_until_stopped`.
    pub fn build(settings: Settings) -> anyhow::Result<Application> {
        // Several crates link rustls; choose its crypto once per process (a second call
        // finds it chosen and changes nothing).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let store: Arc<dyn Store> = match settings.store.redis_target() {
            Err(problem) => anyhow::bail!("{problem}"),
            Ok(None) => Arc::new(MemoryStore::new()),
            Ok(Some(target)) => Arc::new(RedisStore::with_replica(
                target,
                settings
                    .store
                    .redis_read_target()
                    .map_err(|problem| anyhow::anyhow!("{problem}"))?,
                RecordCheck::new(record_limits(&settings), &metrics.store_invalid_records),
            )),
        };
        let listener = TcpListener::bind(settings.listen_addr())
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.server.listen))?;
        let addr = listener.local_addr()?;
        let node_id = settings
            .cluster
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", hostname(), addr.port()));
        let gateway = web::Data::new(Gateway::new(&settings, node_id.clone(), store, metrics));
        let upstream_settings = settings.upstream.clone();
        let auth = gateway.auth.clone();
        let api_gateway = gateway.clone();
        let keep_warm_every = settings
            .health
            .interval
            .clamp(std::time::Duration::from_secs(1), KEEP_WARM_AT_MOST);
        // Runs on each worker: its own backend client, its connections kept warm.
        let worker_app = move || {
            let upstream = web::Data::new(Upstream::new(&upstream_settings, auth.clone()));
            keep_connections_warm(api_gateway.clone(), upstream.clone(), keep_warm_every);
            let gateway = api_gateway.clone();
            let app_upstream = upstream.clone();
            let app = move || registry_app_sharing(gateway.clone(), app_upstream.clone());
            (upstream, app)
        };
        // After the grace period, requests still in flight get as long again to finish.
        let stop_within = settings.server.shutdown_grace.as_secs().max(1);
        let timeouts = crate::front::Timeouts {
            keep_alive: settings.server.keep_alive,
            request_head: settings.server.request_head_timeout,
        };
        let server = match (&settings.server.tls_cert, &settings.server.tls_key) {
            (Some(cert), Some(key)) => {
                let mut server = HttpServer::new(move || worker_app().1())
                    .keep_alive(timeouts.keep_alive)
                    .client_request_timeout(timeouts.request_head)
                    .listen_rustls_0_23(listener, tls_config(cert, key)?)?;
                if let Some(workers) = settings.server.workers {
                    server = server.workers(workers);
                }
                server.disable_signals().shutdown_timeout(stop_within).run()
            }
            // Plain HTTP: warm redirects and cold blob GETs of public orgs are answered by
            // the front door (`front`), the rest by the same App behind actix-http.
            _ => {
                let mut builder = actix_server::Server::build();
                let shutdown = builder.graceful_shutdown_signal();
                let gateway = gateway.clone();
                builder = builder.listen("regatta-registry", listener, move || {
                    let (upstream, app) = worker_app();
                    crate::front::service(
                        gateway.clone(),
                        upstream,
                        addr,
                        shutdown.clone(),
                        timeouts,
                        app,
                    )
                })?;
                if let Some(workers) = settings.server.workers {
                    builder = builder.workers(workers);
                }
                builder
                    .disable_signals()
                    .shutdown_timeout(stop_within)
                    .run()
            }
        };

        let admin = match (&settings.admin.listen, &settings.admin.token) {
            (Some(listen), Some(token)) => {
                let listener = TcpListener::bind(listen)
                    .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (admin): {e}"))?;
                let admin_addr = listener.local_addr()?;
                let token = web::Data::new(AdminToken(token.expose().to_owned()));
                let admin_gateway = gateway.clone();
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(admin_gateway.clone())
                        .app_data(token.clone())
                        .configure(admin::configure)
                })
                .workers(1)
                .listen(listener)?
                .disable_signals()
                .run();
                Some((server, admin_addr))
            }
            _ => None,
        };
        Ok(Application {
            server,
            admin,
            addr,
            background: Background {
                seeds: cluster::config_policies(&settings),
                refresh_interval: settings.cluster.refresh_interval,
                health: settings.health.clone(),
                upstream: settings.upstream.clone(),
                node_id,
            },
            gateway,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, a)| *a)
    }

    /// On SIGTERM or SIGINT: report not ready at once, keep serving for `grace` (so that
    /// load balancers and BGP withdraw the node before it stops answering), then stop the
    /// servers gracefully (in-flight requests get as long again to finish).
    pub fn stop_on_signals(&self, grace: std::time::Duration) {
        let gateway = self.gateway.clone();
        let handles = self.handles();
        actix_web::rt::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            gateway.readiness.begin_shutdown();
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: not ready now, serving until the grace period ends"
            );
            actix_web::rt::time::sleep(grace).await;
            tracing::info!("grace period over; stopping");
            for handle in handles {
                handle.stop(true).await;
            }
        });
    }

    /// Handles to stop the servers from elsewhere (registry API first).
    pub fn handles(&self) -> Vec<ServerHandle> {
        std::iter::once(self.server.handle())
            .chain(self.admin.as_ref().map(|(s, _)| s.handle()))
            .collect()
    }

    /// Serves until the servers are stopped. The background tasks (snapshot refresher,
    /// health prober) run on a thread of their own, so a busy worker never delays them.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let gw = self.gateway.clone().into_inner();
        let bg = self.background;
        tracing::info!(node = %bg.node_id, store = gw.store.kind(), "node starting");
        // Stopped when this future ends or is dropped unfinished (a runtime that goes away
        // first, as a test's does): the arbiter's tasks hold the gateway, its store
        // connections and their reconnect loops.
        let background = StopOnDrop(actix_rt::Arbiter::new());
        background.0.spawn_fn(move || {
            let refresher_gw = gw.clone();
            let (state, topology, store) =
                (gw.state.clone(), gw.topology.clone(), gw.store.clone());
            actix_web::rt::spawn(async move {
                cluster::run_refresher(state, topology, store, bg.seeds, bg.refresh_interval, |e| {
                    admin::apply_event(&refresher_gw, e)
                })
                .await
            });
            let users_gw = gw.clone();
            actix_web::rt::spawn(async move { users_gw.tokens.watch_users(USERS_CHECK).await });
            let upstream = Upstream::new(&bg.upstream, gw.auth.clone());
            actix_web::rt::spawn(health::run_prober(gw, upstream, bg.health, bg.node_id));
        });
        let result = match self.admin {
            Some((admin, _)) => futures_util::future::try_join(self.server, admin)
                .await
                .map(|_| ()),
            None => self.server.await,
        };
        drop(background);
        result
    }
}

/// An arbiter stopped when dropped.
struct StopOnDrop(actix_rt::Arbiter);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// What a record read from the shared store may hold, from this node's configuration.
fn record_limits(settings: &Settings) -> RecordLimits {
    RecordLimits {
        backends: settings.backends.iter().map(|b| b.id.clone()).collect(),
        holder_ttl: settings.cache.holder_ttl,
        lacks_ttl: settings.cache.lacks_ttl,
        // The prober keeps a record for three intervals; nodes may run other intervals.
        health_ttl: (settings.health.interval * 30).max(std::time::Duration::from_secs(60)),
    }
}

/// How often `auth.users_file` is checked for changes (a `stat`; read only when changed).
const USERS_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Longest gap between two keep-warm calls of a worker to a backend (awc closes a pooled
/// connection idle for 15 s).
const KEEP_WARM_AT_MOST: std::time::Duration = std::time::Duration::from_secs(10);

/// On the current worker: connects to every backend now (and learns its challenge), then
/// again every `every`, so that a cold request finds an open connection.
fn keep_connections_warm(
    gw: web::Data<Gateway>,
    up: web::Data<Upstream>,
    every: std::time::Duration,
) {
    actix_web::rt::spawn(async move {
        loop {
            let calls = gw.topology.backends.iter().map(|b| up.keep_warm(b));
            futures_util::future::join_all(calls).await;
            actix_web::rt::time::sleep(every).await;
        }
    });
}

/// The registry API as an actix `App` (one per worker): exposed so benchmarks can drive the
/// whole service in process.
pub fn registry_app(
    gateway: web::Data<Gateway>,
    upstream: Upstream,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    registry_app_sharing(gateway, web::Data::new(upstream))
}

/// The same with a backend client the caller keeps too.
fn registry_app_sharing(
    gateway: web::Data<Gateway>,
    upstream: web::Data<Upstream>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(gateway)
        .app_data(upstream)
        .wrap(DefaultHeaders::new().add(API_VERSION))
        .route(
            "/healthz",
            web::get().to(|| async { HttpResponse::Ok().body("ok") }),
        )
        .route("/readyz", web::get().to(readyz))
        .route("/token", web::get().to(crate::auth::token_get))
        .route("/token", web::post().to(crate::auth::token_post))
        .default_service(web::to(dispatch))
}

/// `GET /readyz`: 200 while this node should receive traffic, 503 (with the reason) while
/// it is drained, has a drain file, or is shutting down. `/healthz` stays liveness.
async fn readyz(gw: web::Data<Gateway>) -> HttpResponse {
    match gw.readiness.not_ready() {
        None => HttpResponse::Ok().body("ready"),
        Some(reason) => HttpResponse::ServiceUnavailable().body(reason),
    }
}

/// The TLS configuration of the registry API from PEM files.
fn tls_config(cert: &str, key: &str) -> anyhow::Result<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("server.tls_cert '{cert}': {e}"))?;
    if chain.is_empty() {
        anyhow::bail!("server.tls_cert '{cert}': no certificate in the file");
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("server.tls_key '{key}': {e}"))?;
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("server.tls_cert/tls_key do not form a usable pair: {e}"))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "regatta".into())
}

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The client's `X-Request-Id` when it is a sane token, else a fresh one.
fn request_id(req: &HttpRequest) -> RequestId {
    crate::front::request_id(req.headers().get(REQUEST_ID_HEADER).map(|v| v.as_bytes()))
}

/// Every registry API request: an id (returned as `X-Request-Id`, on every log line of the
/// request and in its access log line), the answer, its metrics and its access log line.
async fn dispatch(
    req: HttpRequest,
    gw: web::Data<Gateway>,
    up: web::Data<Upstream>,
) -> HttpResponse {
    let started = std::time::Instant::now();
    let id = request_id(&req);
    // Mirror mode: the upstream group this request is for (the path as sent otherwise).
    let routed = gw.route_path(&req);
    let (group, via) = match &routed {
        Ok(r) => (r.group, r.via),
        Err(_) => (None, "ns"),
    };
    // The warm path: a blob redirect already decided under the current epoch, its metrics
    // resolved and its header values built when it was decided.
    let warm = match &routed {
        Ok(r) if req.method() == Method::GET => gw.knowledge.redirect(&r.path),
        _ => None,
    };
    if let Some(hit) = warm {
        let mut response = HttpResponse::new(StatusCode::TEMPORARY_REDIRECT);
        let headers = response.headers_mut();
        headers.insert(header::LOCATION, hit.location.clone());
        headers.insert(gateway::BACKEND_HEADER, hit.backend.clone());
        headers.insert(REQUEST_ID_HEADER, id.header_value());
        let at = std::time::SystemTime::now();
        crate::front::served_warm(&gw, &hit, id, group, via, started, at);
        return response;
    }
    if req.method() == Method::GET {
        gw.metrics.redirect_misses.inc();
    }
    let span = tracing::info_span!(
        "request",
        request_id = %RequestIdText(&id),
        http.method = %req.method(),
        http.target = req.path(),
    );
    crate::telemetry::continue_trace(&span, req.headers());
    let (route, result) = match routed {
        Ok(routed) => {
            tracing::Instrument::instrument(answer(&req, &routed.path, &gw, &up), span.clone())
                .await
        }
        Err(e) => (route_kind(req.path()), Err(e)),
    };
    let mut response = match result {
        Ok(response) => response,
        Err(e) => actix_web::ResponseError::error_response(&e),
    };
    response
        .headers_mut()
        .insert(REQUEST_ID_HEADER, id.header_value());
    crate::front::served(
        &gw,
        crate::front::Served {
            method: req.method(),
            path: req.path(),
            route,
            org: group.unwrap_or_else(|| org_label(&gw, req.path())),
            group,
            via,
            response: &response,
            started,
            id,
        },
    );
    response
}

/// The route label of a path as sent (for a request refused before it was routed).
fn route_kind(path: &str) -> &'static str {
    match route::parse(path) {
        Some(Ok(route)) => route.kind(),
        _ => "invalid",
    }
}

/// The org a path names, when it is one this node serves (bounded label values).
fn org_label<'a>(gw: &Gateway, path: &'a str) -> &'a str {
    let org = path
        .strip_prefix("/v2/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("");
    if !org.is_empty() && gw.state.load().orgs.contains_key(org) {
        org
    } else {
        "-"
    }
}

/// The answer to a request whose path (`path`, rewritten for an upstream group in mirror
/// mode) is parsed into a route.
async fn answer(
    req: &HttpRequest,
    path: &str,
    gw: &web::Data<Gateway>,
    up: &web::Data<Upstream>,
) -> (&'static str, Result<HttpResponse, ApiError>) {
    let Some(parsed) = route::parse(path) else {
        return (
            "unknown",
            Err(ApiError::NameUnknown(format!(
                "no such path: {}",
                req.path()
            ))),
        );
    };
    match parsed {
        Ok(route) => {
            let kind = route.kind();
            let work = gateway::handle(gw, up, req, route);
            (kind, gateway::within_deadline(gw, work).await)
        }
        // A write to a malformed path is still first of all a write.
        Err(_) if !matches!(*req.method(), Method::GET | Method::HEAD) => (
            "invalid",
            Err(ApiError::Unsupported(format!(
                "{} is not supported: this registry is read-only (GET and HEAD)",
                req.method()
            ))),
        ),
        Err(e) => ("invalid", Err(e)),
    }
}
