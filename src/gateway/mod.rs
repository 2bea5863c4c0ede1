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

pub use knowledge::{Detected, Knowledge, Manifest};

use crate::api_error::ApiError;
use crate::cluster::{ClusterState, Snapshot};
use crate::config::{CacheSettings, Settings};
use crate::metrics::Metrics;
use crate::placement::{self, BackendView, Candidate, Health};
use crate::route::Route;
use crate::store::Store;
use crate::topology::{Org, Topology};
use crate::upstream::{AuthCache, Upstream, UpstreamError};

pub const BACKEND_HEADER: &str = "X-Regatta-Backend";
pub const STALE_HEADER: &str = "X-Regatta-Stale";

pub struct Gateway {
    pub topology: Arc<Topology>,
    pub cache: CacheSettings,
    pub knowledge: Knowledge,
    pub auth: Arc<AuthCache>,
    pub state: Arc<ClusterState>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
}

impl Gateway {
    pub fn new(settings: &Settings, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Gateway {
        let topology = Arc::new(Topology::from_settings(settings));
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        Gateway {
            knowledge: Knowledge::new(
                &settings.cache,
                topology.backends.iter().map(|b| b.id.clone()).collect(),
                store.clone(),
                epoch.clone(),
            ),
            state: Arc::new(ClusterState::new(
                Snapshot::from_config(&topology, settings),
                epoch,
            )),
            topology,
            cache: settings.cache.clone(),
            auth: Arc::new(AuthCache::new()),
            store,
            metrics,
        }
    }

    /// The org serving `name`, or 403 for a name outside every org.
    fn org(&self, name: &crate::oci::RepoName) -> Result<Arc<Org>, ApiError> {
        self.state
            .load()
            .orgs
            .get(name.org())
            .cloned()
            .ok_or_else(|| ApiError::Denied(name.org().to_owned()))
    }

    /// The placement view of an org's backends, in policy order: the cluster snapshot,
    /// plus this node's own passive failure signal.
    fn views<'a>(&'a self, snapshot: &Snapshot, org: &Org) -> Vec<BackendView<'a>> {
        let now_ms = crate::store::unix_ms(std::time::SystemTime::now());
        org.backends
            .iter()
            .map(|&idx| {
                let b = self.topology.backend(idx);
                let live = &snapshot.backends[idx];
                let health = if self.knowledge.is_down(idx, now_ms) {
                    Health::Down
                } else {
                    live.health
                };
                BackendView {
                    idx,
                    region: &b.region,
                    health,
                    drained: live.drained,
                    latency_us: live.latency_us,
                    weight: live.weight,
                }
            })
            .collect()
    }

    /// Org backends ordered for `digest` in `name`, with what is known of each holding it.
    async fn candidates(
        &self,
        org: &Org,
        name: &crate::oci::RepoName,
        digest: &crate::oci::Digest,
    ) -> Vec<Candidate> {
        let holdings = tracing::Instrument::instrument(
            self.knowledge.holdings(org, name, digest),
            tracing::info_span!("placement", org = %org.name, digest = %digest),
        )
        .await;
        let known = holdings.contains(&placement::Holding::Has);
        self.metrics.hit("holder", known);
        let timer = self.metrics.placement_seconds.start_timer();
        let snapshot = self.state.load();
        let ranked = placement::rank(
            &self.topology.region,
            &self.views(&snapshot, org),
            &holdings,
        );
        timer.observe_duration();
        ranked
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
        match &result {
            Err(UpstreamError::Unreachable { .. }) => {
                tracing::warn!(
                    backend = &*backend.id,
                    "backend unreachable; passing it over for a while"
                );
                self.knowledge.mark_unreachable(backend.idx);
            }
            Ok(r) if !r.status().is_server_error() => self.knowledge.mark_reachable(backend.idx),
            _ => {}
        }
        result
    }
}

impl Gateway {
    /// The error when no backend could serve `digest`: unknown when every backend of the
    /// org says it lacks it, unavailable when some could not be asked.
    async fn none_serves(
        &self,
        org: &Org,
        name: &crate::oci::RepoName,
        digest: &crate::oci::Digest,
        unknown: ApiError,
    ) -> ApiError {
        let holdings = self.knowledge.holdings(org, name, digest).await;
        if holdings.iter().all(|h| *h == placement::Holding::Lacks) {
            unknown
        } else {
            let snapshot = self.state.load();
            let views = self.views(&snapshot, org);
            let seen: Vec<String> = views
                .iter()
                .zip(&holdings)
                .map(|(v, h)| {
                    format!(
                        "{}: {h:?} {:?} drained={}",
                        self.topology.backend(v.idx).id,
                        v.health,
                        v.drained
                    )
                })
                .collect();
            tracing::warn!(%name, %digest, backends = ?seen, "no backend can serve");
            ApiError::Unavailable(format!(
                "no backend of org '{}' can serve {name}@{digest} now",
                org.name
            ))
        }
    }
}

/// Answers one registry API request.
pub async fn handle(
    gw: &Gateway,
    up: &Upstream,
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
        Route::Base => Ok(actix_web::HttpResponse::Ok()
            .content_type("application/json")
            .body("{}")),
        Route::Manifest { name, reference } => {
            manifests::serve(gw, up, req, &name, reference, head).await
        }
        Route::Blob { name, digest } => blobs::serve(gw, up, req, &name, &digest, head).await,
        Route::Tags { name } => listing::tags(gw, up, req, &name).await,
        Route::Referrers { name, digest } => listing::referrers(gw, up, req, &name, &digest).await,
    }
}
