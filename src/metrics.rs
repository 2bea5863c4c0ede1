//! Every Prometheus metric regatta exports, declared in one place and passed to the code
//! that counts (no counters as globals). Gauges that describe state (backend health, drains,
//! snapshot age, store errors) are read from the snapshot when `/metrics` is scraped.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::model::Health;

pub struct Metrics {
    registry: Registry,
    /// Requests by route, method, status and org.
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    /// Where manifests and blobs were sent: backend, delivery, reason.
    pub decisions: IntCounterVec,
    pub placement_seconds: Histogram,
    pub backend_health: IntGaugeVec,
    pub backend_drained: IntGaugeVec,
    pub backend_latency_seconds: GaugeVec,
    pub org_available_backends: IntGaugeVec,
    pub probe_seconds: HistogramVec,
    pub probe_failures: IntCounterVec,
    pub admin_changes: IntCounterVec,
    /// Cache lookups by cache (holder, tag, manifest, redirect) and result (hit, miss).
    pub cache: IntCounterVec,
    pub stale_serves: IntCounterVec,
    pub store_errors: IntCounter,
    /// Learned facts not written to the store because its write queue was full.
    pub store_writes_dropped: IntCounter,
    /// Access log lines dropped because the writer could not keep up.
    pub access_log_dropped: IntCounter,
    /// Records read from the shared store and skipped as invalid, by kind (admin, health,
    /// policy, tag, holder).
    pub store_invalid_records: IntCounterVec,
    pub snapshot_age_seconds: Gauge,
    pub proxied_bytes: IntCounterVec,
    /// Resolved once for the warm path.
    pub redirect_hits: IntCounter,
    pub redirect_misses: IntCounter,
    pub blob_seconds: Histogram,
}

/// The `action` label values of `regatta_admin_changes_total`.
pub const ADMIN_ACTIONS: &[&str] = &[
    "drain",
    "undrain",
    "set-weight",
    "put-org",
    "delete-org",
    "purge",
    "node-drain",
    "node-undrain",
];

/// The `method` label of a request: only the methods a read-only registry serves, so a
/// client inventing methods cannot add series.
pub fn method_label(method: &actix_web::http::Method) -> &'static str {
    match *method {
        actix_web::http::Method::GET => "GET",
        actix_web::http::Method::HEAD => "HEAD",
        actix_web::http::Method::POST => "POST",
        _ => "other",
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! register {
            ($metric:expr) => {{
                let m = $metric.expect("metric definitions are valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let request_seconds: HistogramVec = register!(HistogramVec::new(
            HistogramOpts::new(
                "regatta_request_duration_seconds",
                "Time to answer a registry API request"
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"]
        ));
        let cache: IntCounterVec = register!(IntCounterVec::new(
            Opts::new(
                "regatta_cache_lookups_total",
                "Cache lookups by cache and result"
            ),
            &["cache", "result"]
        ));
        let metrics = Metrics {
            redirect_hits: cache.with_label_values(&["redirect", "hit"]),
            redirect_misses: cache.with_label_values(&["redirect", "miss"]),
            blob_seconds: request_seconds.with_label_values(&["blob"]),
            requests: register!(IntCounterVec::new(
                Opts::new("regatta_requests_total", "Registry API requests by route, method, status and org"),
                &["route", "method", "status", "org"]
            )),
            request_seconds,
            decisions: register!(IntCounterVec::new(
                Opts::new(
                    "regatta_decisions_total",
                    "Where manifests and blobs were sent: backend, kind, delivery and reason (holder, failover, stale, cached)"
                ),
                &["backend", "kind", "delivery", "reason"]
            )),
            placement_seconds: register!(Histogram::with_opts(
                HistogramOpts::new("regatta_placement_duration_seconds", "Time to rank the backends for one digest")
                    .buckets(LATENCY_BUCKETS.to_vec())
            )),
            backend_health: register!(IntGaugeVec::new(
                Opts::new(
                    "regatta_backend_health",
                    "Backend health as the nodes of region probed_from see it (region: the backend's): 2 up, 1 degraded, 0 down"
                ),
                &["backend", "region", "probed_from"]
            )),
            backend_drained: register!(IntGaugeVec::new(
                Opts::new("regatta_backend_drained", "1 while an operator has drained the backend"),
                &["backend"]
            )),
            backend_latency_seconds: register!(GaugeVec::new(
                Opts::new("regatta_backend_latency_seconds", "Smoothed probe latency of the backend"),
                &["backend"]
            )),
            org_available_backends: register!(IntGaugeVec::new(
                Opts::new(
                    "regatta_org_available_backends",
                    "Backends of the org that are neither down nor drained"
                ),
                &["org"]
            )),
            probe_seconds: register!(HistogramVec::new(
                HistogramOpts::new("regatta_probe_duration_seconds", "Health probe duration by backend")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["backend"]
            )),
            probe_failures: register!(IntCounterVec::new(
                Opts::new("regatta_probe_failures_total", "Failed health probes by backend"),
                &["backend"]
            )),
            admin_changes: register!(IntCounterVec::new(
                Opts::new("regatta_admin_changes_total", "Admin changes made through this node (drain, undrain, ...)"),
                &["action"]
            )),
            cache,
            stale_serves: register!(IntCounterVec::new(
                Opts::new(
                    "regatta_stale_tag_serves_total",
                    "Tags served from the last known digest because the org's authority failed"
                ),
                &["org"]
            )),
            store_errors: register!(IntCounter::new(
                "regatta_store_errors_total",
                "Failed calls to the shared store (Redis)"
            )),
            store_writes_dropped: register!(IntCounter::new(
                "regatta_store_writes_dropped_total",
                "Learned facts (holders, tags) not shared through the store because its write queue was full"
            )),
            access_log_dropped: register!(IntCounter::new(
                "regatta_access_log_dropped_total",
                "Access log lines dropped because the output could not keep up (requests never wait for their line)"
            )),
            store_invalid_records: register!(IntCounterVec::new(
                Opts::new(
                    "regatta_store_invalid_records_total",
                    "Records read from the shared store and skipped as malformed or implausible, by kind"
                ),
                &["kind"]
            )),
            snapshot_age_seconds: register!(Gauge::new(
                "regatta_snapshot_age_seconds",
                "Time since this node last reloaded the cluster snapshot from the store"
            )),
            proxied_bytes: register!(IntCounterVec::new(
                Opts::new("regatta_proxied_bytes_total", "Blob bytes streamed through the gateway by backend"),
                &["backend"]
            )),
            registry,
        };
        for kind in crate::store::RecordKind::ALL {
            metrics
                .store_invalid_records
                .with_label_values(&[kind.as_str()]);
        }
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            metrics
                .registry
                .register(Box::new(process))
                .expect("process metrics register once");
        }
        metrics
    }

    /// Creates, at 0, every labelled series the dashboards and alert rules read, so that
    /// they show 0 rather than "no data" and `increase()` sees the first event.
    pub fn prime<'a>(
        &self,
        backends: impl IntoIterator<Item = (&'a str, &'a str)>,
        orgs: impl IntoIterator<Item = &'a str>,
    ) {
        for (id, delivery) in backends {
            self.probe_failures.with_label_values(&[id]);
            self.proxied_bytes.with_label_values(&[id]);
            self.decisions
                .with_label_values(&[id, "blob", delivery, "failover"]);
        }
        for org in orgs {
            self.stale_serves.with_label_values(&[org]);
        }
        for action in ADMIN_ACTIONS {
            self.admin_changes.with_label_values(&[action]);
        }
    }

    pub fn hit(&self, cache: &str, hit: bool) {
        self.cache
            .with_label_values(&[cache, if hit { "hit" } else { "miss" }])
            .inc();
    }

    /// Sets one backend's gauges: `views` is each region's view of its health (this
    /// node's region's first when it has none, so every backend has a series).
    pub fn set_backend<'a>(
        &self,
        id: &str,
        region: &str,
        views: impl IntoIterator<Item = (&'a str, Health)>,
        drained: bool,
        latency_s: f64,
    ) {
        for (probed_from, health) in views {
            let value = match health {
                Health::Up => 2,
                Health::Degraded => 1,
                Health::Down => 0,
            };
            self.backend_health
                .with_label_values(&[id, region, probed_from])
                .set(value);
        }
        self.backend_drained
            .with_label_values(&[id])
            .set(drained as i64);
        self.backend_latency_seconds
            .with_label_values(&[id])
            .set(latency_s);
    }

    /// Forgets every backend health series (before setting them again from a snapshot,
    /// so a region whose view expired leaves no series behind).
    pub fn clear_backend_health(&self) {
        self.backend_health.reset();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
