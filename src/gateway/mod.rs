//! The gateway's decisions for each route: which backend serves, how the client reaches
//! the bytes, and what the node learns on the way.
//!
//! `Gateway` is shared by every worker; `Upstream` (the backend client) is per worker.
//! Architecture invariant: handlers never hold a lock across an await, and a request whose
//! facts are all cached makes no call to the store or to a backend.

mod blobs;
mod knowledge;
mod listing;
mod manifests;

use std::sync::Arc;

use actix_web::http::Method;
use actix_web::HttpRequest;

/// Pure parsing of backend answers, for the fuzz targets (`crate::fuzzing`).
pub use blobs::{presigned_lifetime, Asked};
pub use knowledge::{Detected, Knowledge, Manifest, Redirect};
pub use manifests::{platform_manifest, references as manifest_references};

use crate::api_error::ApiError;
use crate::cluster::{ClusterState, Snapshot};
use crate::config::{CacheSettings, Settings};
use crate::metrics::Metrics;
use crate::model::{unix_ms, BackendIdx, Holding};
use crate::oci::{Digest, RepoName};
use crate::placement::{self, BackendView, DigestPlan};
use crate::route::Route;
use crate::store::Store;
use crate::topology::{Org, Topology};
use crate::upstream::{AuthCache, Upstream, UpstreamError};

pub const BACKEND_HEADER: actix_web::http::header::HeaderName =
    actix_web::http::header::HeaderName::from_static("x-regatta-backend");

/// Why a response's backend was chosen (`holder`, `region`, `failover`, `stale`), kept in
/// the response's extensions for the access log.
#[derive(Debug, Clone, Copy)]
pub struct Decision(pub &'static str);
pub const STALE_HEADER: &str = "X-Regatta-Stale";

pub struct Gateway {
    pub topology: Arc<Topology>,
    pub cache: CacheSettings,
    /// Longest time spent on one client request (`upstream.request_deadline`).
    pub request_deadline: std::time::Duration,
    pub knowledge: Knowledge,
    pub auth: Arc<AuthCache>,
    /// This gateway's own token service and access checks (private orgs).
    pub tokens: crate::auth::TokenService,
    pub state: Arc<ClusterState>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// One line per request, written off the request thread; `None` when turned off.
    pub access_log: Option<crate::access_log::AccessLog>,
    /// Whether this node should receive traffic (`/readyz`).
    pub readiness: crate::readiness::Readiness,
    /// Cold lookups in flight, so identical ones go to the backends once.
    flights: crate::flights::Flights,
    /// Per-client allowance of cold lookups.
    limiter: crate::limits::ColdLimiter,
    /// Failed logins per client at the token endpoint.
    pub login_limiter: crate::limits::ColdLimiter,
}

impl Gateway {
    pub fn new(
        settings: &Settings,
        node_id: String,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Gateway {
        let topology = Arc::new(Topology::from_settings(settings));
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        metrics.prime(
            topology
                .backends
                .iter()
                .map(|b| (&*b.id, b.delivery.as_str())),
            settings
                .orgs
                .iter()
                .map(|o| o.name.as_str())
                .chain(settings.upstreams.iter().map(|u| u.name.as_str())),
        );
        let access_log =
            crate::access_log::AccessLog::start(&settings.access_log, metrics.access_log_dropped.clone())
                .unwrap_or_else(|e| {
                    tracing::error!(path = %settings.access_log.path, error = %e, "cannot open the access log; it is off");
                    None
                });
        Gateway {
            knowledge: Knowledge::new(
                &settings.cache,
                topology.backends.iter().map(|b| b.id.clone()).collect(),
                store.clone(),
                epoch.clone(),
                metrics.store_writes_dropped.clone(),
            ),
            state: Arc::new(ClusterState::new(
                Snapshot::from_config(&topology, settings),
                epoch,
            )),
            topology,
            cache: settings.cache.clone(),
            request_deadline: settings.upstream.request_deadline,
            auth: Arc::new(AuthCache::new()),
            tokens: crate::auth::TokenService::new(&settings.auth),
            store,
            metrics,
            flights: crate::flights::Flights::default(),
            readiness: crate::readiness::Readiness::new(
                node_id,
                settings.server.drain_file.clone(),
            ),
            limiter: crate::limits::ColdLimiter::new(&settings.limits),
            login_limiter: crate::limits::ColdLimiter::login_failures(&settings.limits),
            access_log,
        }
    }
}

/// One request's view of the node: the snapshot, loaded once, and the org the request's
/// repository belongs to. Every plan the request executes is made from it.
pub(crate) struct Scope<'g> {
    pub gw: &'g Gateway,
    pub snapshot: Arc<Snapshot>,
    pub org: Arc<Org>,
    /// The client's address, for its allowance of cold lookups.
    client: Option<std::net::IpAddr>,
}

impl<'g> Scope<'g> {
    /// The scope of a request for `name`, or 403 for a name outside every org, or 401 for
    /// a private org's name without a token that grants pulling it. The access check comes
    /// first: nothing cached for a private org is read before it.
    fn new(gw: &'g Gateway, name: &RepoName, req: &HttpRequest) -> Result<Scope<'g>, ApiError> {
        let snapshot = gw.state.load_full();
        let org = snapshot
            .orgs
            .get(name.org())
            .cloned()
            .ok_or_else(|| ApiError::Denied(name.org().to_owned()))?;
        gw.tokens.check_pull(&snapshot, &org, name, req)?;
        Ok(Scope {
            gw,
            snapshot,
            org,
            client: req.peer_addr().map(|a| a.ip()),
        })
    }

    /// The scope of a request for `name` in a public org (no access check to make), or
    /// `None` when the name is in no org or in a private one.
    pub(crate) fn public(
        gw: &'g Gateway,
        name: &RepoName,
        client: Option<std::net::IpAddr>,
    ) -> Option<Scope<'g>> {
        let snapshot = gw.state.load_full();
        let org = snapshot.orgs.get(name.org()).cloned()?;
        org.policy.access.is_public().then_some(Scope {
            gw,
            snapshot,
            org,
            client,
        })
    }

    /// Charges the client one cold lookup (a call this request must make to the backends),
    /// or refuses with 429 when its allowance is spent.
    fn spend_cold(&self) -> Result<(), ApiError> {
        self.gw
            .limiter
            .spend(self.client, std::time::Instant::now())
            .map_err(ApiError::TooManyRequests)
    }

    /// What placement weighs about `backends`: the snapshot plus this node's own passive
    /// failure signal, read now (a backend that failed during this request counts).
    fn views(&self, backends: &[BackendIdx]) -> Vec<BackendView<'g>> {
        let now_ms = unix_ms(std::time::SystemTime::now());
        backends
            .iter()
            .map(|&idx| {
                let live = &self.snapshot.backends[idx];
                BackendView {
                    idx,
                    region: &self.gw.topology.backend(idx).region,
                    health: live.health,
                    failing: self.gw.knowledge.is_down(idx, now_ms),
                    drained: live.drained,
                    latency_us: live.latency_us,
                    weight: live.weight,
                }
            })
            .collect()
    }

    /// The plan for `digest` in `name`, from what is known now of who holds it.
    async fn digest_plan(&self, name: &RepoName, digest: &Digest) -> DigestPlan {
        let holdings = tracing::Instrument::instrument(
            self.gw.knowledge.holdings(&self.org, name, digest),
            tracing::info_span!("placement", org = %self.org.name, digest = %digest),
        )
        .await;
        self.gw
            .metrics
            .hit("holder", holdings.contains(&Holding::Has));
        let timer = self.gw.metrics.placement_seconds.start_timer();
        let plan = placement::plan_digest(
            &self.gw.topology.region,
            &self.views(&self.org.backends),
            &holdings,
        );
        timer.observe_duration();
        plan
    }

    /// The org's tag authorities to ask now, in order.
    fn tag_plan(&self) -> Vec<BackendIdx> {
        placement::plan_tag(&self.views(&self.org.tag_authorities))
    }

    /// The error when no backend could serve `digest`: unknown when every backend of the
    /// org says it lacks it, unavailable when some could not be asked.
    fn none_serves(
        &self,
        plan: &DigestPlan,
        name: &RepoName,
        digest: &Digest,
        unknown: ApiError,
    ) -> ApiError {
        if plan.nobody_has_it() {
            return unknown;
        }
        let seen: Vec<String> = plan
            .assessed
            .iter()
            .map(|a| {
                format!(
                    "{}: {:?}, {}",
                    self.gw.topology.backend(a.backend).id,
                    a.holding,
                    a.excluded.map_or("usable".to_owned(), |e| format!("{e:?}")),
                )
            })
            .collect();
        tracing::warn!(%name, %digest, backends = ?seen, "no backend can serve");
        ApiError::Unavailable(format!(
            "no backend of org '{}' can serve {name}@{digest} now",
            self.org.name
        ))
    }
}

impl Gateway {
    /// Sends a call to a backend and notes whether it could be reached at all.
    async fn send(
        &self,
        up: &Upstream,
        backend: &crate::topology::Backend,
        call: &crate::upstream::Call<'_>,
    ) -> Result<crate::upstream::Response, UpstreamError> {
        let result = up.send(backend, call).await;
        self.note_reach(backend, result.as_ref().map(|r| r.status()));
        result
    }

    /// A blob probe (`Upstream::probe`), noting whether the backend could be reached.
    async fn probe(
        &self,
        up: &Upstream,
        backend: &crate::topology::Backend,
        path: &str,
        repo: &str,
    ) -> Result<crate::head_client::Answer, UpstreamError> {
        let result = up.probe(backend, path, repo).await;
        self.note_reach(backend, result.as_ref().map(|a| a.status));
        result
    }

    /// Notes what a call to `backend` showed of its reachability: unreachable (passed over
    /// for `failure_backoff`), or reachable when it answered anything but a server error.
    fn note_reach(
        &self,
        backend: &crate::topology::Backend,
        answer: Result<actix_web::http::StatusCode, &UpstreamError>,
    ) {
        match answer {
            Err(UpstreamError::Unreachable { .. }) => {
                tracing::warn!(
                    backend = &*backend.id,
                    "backend unreachable; passing it over for a while"
                );
                self.knowledge.mark_unreachable(backend.idx);
            }
            Ok(status) if !status.is_server_error() => self.knowledge.mark_reachable(backend.idx),
            _ => {}
        }
    }
}

impl Gateway {
    /// Where a request goes in mirror mode: its path rewritten for an upstream group (by
    /// `ns`, a host prefix or the default group), or as sent when it is an org's or no
    /// group is configured. Costs nothing when no group is configured.
    pub fn route_path<'r>(
        &'r self,
        req: &'r HttpRequest,
    ) -> Result<crate::mirror::Routed<'r, 'r>, ApiError> {
        self.route_parts(req.path(), req.query_string())
    }

    /// The same from a request's path and query string as sent.
    pub fn route_parts<'p>(
        &self,
        path: &'p str,
        query: &str,
    ) -> Result<crate::mirror::Routed<'p, '_>, ApiError> {
        let upstreams = &self.topology.upstreams;
        if upstreams.is_empty() {
            return Ok(crate::mirror::Routed::as_sent(path));
        }
        let ns = crate::mirror::ns_param(query);
        let snapshot = self.state.load();
        upstreams.route(path, ns.as_deref(), |first| {
            snapshot
                .orgs
                .get(first)
                .is_some_and(|org| !org.upstream_group)
        })
    }
}

/// `work` within the request deadline (`upstream.request_deadline`), else 503.
pub async fn within_deadline<F>(gw: &Gateway, work: F) -> Result<actix_web::HttpResponse, ApiError>
where
    F: std::future::Future<Output = Result<actix_web::HttpResponse, ApiError>>,
{
    match tokio::time::timeout(gw.request_deadline, work).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                deadline_ms = gw.request_deadline.as_millis() as u64,
                "request deadline passed; backends too slow"
            );
            Err(ApiError::Unavailable(
                "the backends did not answer within the request deadline".into(),
            ))
        }
    }
}

/// A blob `GET` of a public org as the front door reads it (`crate::front`): the same
/// answer as [`handle`] gives it, within the request deadline.
pub(crate) async fn get_public_blob(
    scope: &Scope<'_>,
    asked: &Asked<'_>,
    name: &RepoName,
    digest: &Digest,
) -> Result<actix_web::HttpResponse, ApiError> {
    within_deadline(scope.gw, blobs::serve(scope, asked, name, digest, false)).await
}

/// Answers one registry API request.
pub async fn handle(
    gw: &actix_web::web::Data<Gateway>,
    up: &actix_web::web::Data<Upstream>,
    req: &HttpRequest,
    route: Route,
) -> Result<actix_web::HttpResponse, ApiError> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return Err(ApiError::Unsupported(format!(
                "{} is not supported: this registry is read-only (GET and HEAD)",
                req.method()
            )))
        }
    };
    match route {
        Route::Base => {
            gw.tokens.check_base(&gw.state.load(), req)?;
            Ok(actix_web::HttpResponse::Ok()
                .content_type("application/json")
                .body("{}"))
        }
        Route::Manifest { name, reference } => {
            let scope = Scope::new(gw, &name, req)?;
            manifests::serve(&scope, up, req, &name, reference, head).await
        }
        Route::Blob { name, digest } => {
            let scope = Scope::new(gw, &name, req)?;
            let asked = Asked {
                path: req.path(),
                range: req.headers().get(actix_web::http::header::RANGE),
                gw,
                up,
            };
            blobs::serve(&scope, &asked, &name, &digest, head).await
        }
        Route::Tags { name } => listing::tags(&Scope::new(gw, &name, req)?, up, req, &name).await,
        Route::Referrers { name, digest } => {
            let scope = Scope::new(gw, &name, req)?;
            listing::referrers(&scope, up, req, &name, &digest).await
        }
    }
}
