//! What a node has learned about backends and content: who holds which digest, what each
//! tag pointed at, manifests by digest, blob sizes, pre-signed URLs and detected delivery
//! modes. Local caches sit in front of the shared store; the store is asked only on a local
//! miss, and told whenever something new is learned.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use moka::sync::Cache;

use crate::config::CacheSettings;
use crate::model::{unix_ms, BackendIdx, Delivery, Holding, TagRecord};
use crate::oci::{Digest, RepoName, Tag};
use crate::store::{invalidate_where, Store, StoreError};
use crate::topology::Org;

/// A manifest as the backend sent it, verified against its digest.
#[derive(Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    /// Backend id that served it first.
    pub backend: Arc<str>,
}

/// What delivery a backend in `auto` mode turned out to need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Unknown,
    /// `/v2/` answered 200 without credentials.
    Anonymous,
    /// `/v2/` wants credentials; the first blob answer decides resolve or proxy.
    NeedsAuth,
    Resolve,
    Proxy,
}

impl Detected {
    fn to_u8(self) -> u8 {
        self as u8
    }
    fn from_u8(v: u8) -> Detected {
        match v {
            1 => Detected::Anonymous,
            2 => Detected::NeedsAuth,
            3 => Detected::Resolve,
            4 => Detected::Proxy,
            _ => Detected::Unknown,
        }
    }
}

/// Longest reuse of a decided redirect (a new holder in a better place is taken up after it).
const REDIRECT_REUSE: Duration = Duration::from_secs(10);

/// A decided blob redirect.
#[derive(Debug)]
pub struct Redirect {
    pub location: actix_web::http::header::HeaderValue,
    pub backend: actix_web::http::header::HeaderValue,
    /// The request path and the org, for the access log.
    pub path: Arc<str>,
    pub org: Arc<str>,
    /// What a reuse counts, resolved once: the decision and the request.
    pub decision: prometheus::IntCounter,
    pub requests: prometheus::IntCounter,
    epoch: u64,
    until: Instant,
}

type HolderKey = (RepoName, Digest, BackendIdx);

/// Who holds what, in two caches each bounded by bytes: facts that a backend holds a digest,
/// and facts that it lacks one. Requests for invented repository names only ever learn
/// "lacks", so they churn the small second cache and never push out what serves pulls.
struct Holders {
    has: Cache<HolderKey, Instant, foldhash::fast::RandomState>,
    lacks: Cache<HolderKey, Instant, foldhash::fast::RandomState>,
}

/// What one cache entry costs besides the bytes of its strings: the key and value structs,
/// moka's entry, node and index, and the allocator's rounding. Measured with
/// `cargo bench --bench memory` (resident memory per holder fact learned), so that the
/// `cache.*_bytes` budgets are what the node's memory really grows by.
const ENTRY_OVERHEAD: usize = 440;

/// The bytes a cache entry costs, for moka's weigher.
fn weight(bytes: usize) -> u32 {
    u32::try_from(bytes.saturating_add(ENTRY_OVERHEAD)).unwrap_or(u32::MAX)
}

// moka hands the weigher the key as stored.
#[allow(clippy::borrowed_box)]
fn redirect_weight(path: &Box<str>, r: &Arc<Redirect>) -> u32 {
    weight(2 * path.len() + r.location.len() + r.backend.len() + r.org.len())
}

fn holder_weight(k: &HolderKey, _: &Instant) -> u32 {
    weight(k.0.as_str().len() + k.1.as_str().len())
}

impl Holders {
    fn new(settings: &CacheSettings) -> Holders {
        Holders {
            // A fast hasher, as for `redirects`: every cold blob looks up and records here.
            has: Cache::builder()
                .max_capacity(settings.holder_bytes)
                .weigher(holder_weight)
                .time_to_live(settings.holder_ttl)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            lacks: Cache::builder()
                .max_capacity(settings.lacks_bytes)
                .weigher(holder_weight)
                .time_to_live(settings.lacks_ttl)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    fn get(&self, key: &HolderKey) -> Option<(Holding, Instant)> {
        let now = Instant::now();
        let has = self.has.get(key).filter(|until| *until > now);
        let lacks = self.lacks.get(key).filter(|until| *until > now);
        match (has, lacks) {
            (Some(until), _) => Some((Holding::Has, until)),
            (None, Some(until)) => Some((Holding::Lacks, until)),
            (None, None) => None,
        }
    }

    fn insert(&self, key: HolderKey, holding: Holding, until: Instant) {
        match holding {
            Holding::Has => {
                self.lacks.invalidate(&key);
                self.has.insert(key, until);
            }
            Holding::Lacks => {
                self.has.invalidate(&key);
                self.lacks.insert(key, until);
            }
            Holding::Unknown => {}
        }
    }

    fn forget_digest(&self, digest: &Digest) {
        invalidate_where(&self.has, |k| &k.1 == digest);
        invalidate_where(&self.lacks, |k| &k.1 == digest);
    }
}

/// A store write queued by a request.
type Write = (
    &'static str,
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>,
);

/// Facts waiting to be written to the store, at most.
const WRITE_QUEUE: usize = 10_000;
/// Store writes in flight at once.
const WRITES_IN_FLIGHT: usize = 32;

/// How long the writer gathers writes before looking at the queue again while busy.
const WRITE_TICK: Duration = Duration::from_millis(5);

/// Drains the write queue on a thread of its own (the workers' runtimes are busy with
/// requests and may be gone when a write finishes); ends when the node drops its sender.
///
/// Idle, it waits on the queue, and the first write wakes it. Busy, it takes what the queue
/// holds every `WRITE_TICK` without waiting on it, so that a request queuing a fact does not
/// wake this thread: a wake-up per cold request is a cross-core signal, and the other core
/// is often the one serving the client or the backend.
fn start_writer(quiet: Arc<AtomicU64>) -> tokio::sync::mpsc::Sender<Write> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Write>(WRITE_QUEUE);
    let spawned = std::thread::Builder::new()
        .name("regatta-store-writes".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the store writer; facts stay local");
                    return;
                }
            };
            let run = |(what, write): Write| {
                let quiet = quiet.clone();
                async move {
                    if let Err(e) = write.await {
                        quiet.store(
                            unix_ms(SystemTime::now()) + STORE_QUIET_MS,
                            Ordering::Relaxed,
                        );
                        tracing::debug!(error = %e, what, "store write failed");
                    }
                }
            };
            runtime.block_on(async move {
                let mut in_flight = futures_util::stream::FuturesUnordered::new();
                let mut open = true;
                while open || !in_flight.is_empty() {
                    if open && in_flight.is_empty() {
                        match rx.recv().await {
                            Some(write) => in_flight.push(run(write)),
                            None => open = false,
                        }
                    }
                    while open && in_flight.len() < WRITES_IN_FLIGHT {
                        match rx.try_recv() {
                            Ok(write) => in_flight.push(run(write)),
                            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                                open = false;
                            }
                        }
                    }
                    let tick = tokio::time::sleep(WRITE_TICK);
                    tokio::pin!(tick);
                    loop {
                        tokio::select! {
                            done = futures_util::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => {
                                if done.is_none() {
                                    break;
                                }
                            }
                            () = &mut tick => break,
                        }
                    }
                }
            });
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the store writer thread; facts stay local");
    }
    tx
}

/// How long the store is left alone after a failed call.
const STORE_QUIET_MS: u64 = 1_000;

pub struct Knowledge {
    store: Arc<dyn Store>,
    holder_ttl: Duration,
    lacks_ttl: Duration,
    stale_tag_ttl: Duration,
    holders: Holders,
    tags: Cache<(RepoName, Tag), TagRecord>,
    manifests: Cache<Digest, Arc<Manifest>>,
    sizes: Cache<Digest, u64>,
    resolved: Cache<(BackendIdx, Digest), (Arc<str>, Instant)>,
    detected: Vec<AtomicU8>,
    /// Blob redirects already decided, by request path, each valid for the epoch it was
    /// decided in: the warm path answers from here without parsing or placement.
    redirects: Cache<Box<str>, Arc<Redirect>, foldhash::fast::RandomState>,
    /// Shared with the cluster snapshot: any change that could alter a decision bumps it.
    epoch: Arc<AtomicU64>,
    /// Holder facts this node has recorded (`learned`): a plan made before it last moved
    /// may miss one, a plan made since has every fact there is locally.
    learned: AtomicU64,
    /// Until when (Unix ms) the store is left alone after failing.
    store_quiet_until: Arc<AtomicU64>,
    /// Facts on their way to the store (bounded), and how many were dropped.
    writes: tokio::sync::mpsc::Sender<Write>,
    writes_dropped: prometheus::IntCounter,
    /// Per backend, until when (Unix ms) it counts as down after failing to answer.
    down_until: Vec<AtomicU64>,
    failure_backoff: Duration,
    /// Backend ids by index: the store is keyed by the stable id, not the index (which
    /// can differ between nodes' configurations).
    ids: Vec<Arc<str>>,
}

impl Knowledge {
    pub fn new(
        settings: &CacheSettings,
        ids: Vec<Arc<str>>,
        store: Arc<dyn Store>,
        epoch: Arc<AtomicU64>,
        writes_dropped: prometheus::IntCounter,
    ) -> Self {
        let quiet = Arc::new(AtomicU64::new(0));
        Knowledge {
            store,
            holder_ttl: settings.holder_ttl,
            lacks_ttl: settings.lacks_ttl,
            stale_tag_ttl: settings.stale_tag_ttl,
            holders: Holders::new(settings),
            tags: Cache::builder()
                .max_capacity(settings.tag_bytes)
                .weigher(|k: &(RepoName, Tag), r: &TagRecord| {
                    weight(
                        k.0.as_str().len()
                            + k.1.as_str().len()
                            + r.media_type.len()
                            + r.backend.len()
                            + r.digest.as_str().len(),
                    )
                })
                .time_to_live(settings.stale_tag_ttl)
                .build(),
            manifests: Cache::builder()
                .max_capacity(settings.manifest_bytes)
                .weigher(|_, m: &Arc<Manifest>| m.bytes.len().try_into().unwrap_or(u32::MAX))
                .build(),
            sizes: Cache::builder()
                .max_capacity(settings.holder_bytes / 4)
                .weigher(|k: &Digest, _: &u64| weight(k.as_str().len()))
                .time_to_live(settings.holder_ttl)
                .build(),
            resolved: Cache::builder()
                .max_capacity(settings.url_bytes / 2)
                .weigher(|k: &(BackendIdx, Digest), v: &(Arc<str>, Instant)| {
                    weight(k.1.as_str().len() + v.0.len())
                })
                .time_to_live(settings.resolve_ttl)
                .build(),
            detected: ids.iter().map(|_| AtomicU8::new(0)).collect(),
            down_until: ids.iter().map(|_| AtomicU64::new(0)).collect(),
            store_quiet_until: quiet.clone(),
            writes: start_writer(quiet),
            writes_dropped,
            // A fast hasher: this lookup is most of what a warm redirect costs.
            redirects: Cache::builder()
                .max_capacity(settings.url_bytes / 2)
                .weigher(redirect_weight)
                .time_to_live(REDIRECT_REUSE)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            epoch,
            learned: AtomicU64::new(0),
            failure_backoff: settings.failure_backoff,
            ids,
        }
    }

    /// For each of the org's backends (policy order), whether it holds `digest` in `name`.
    pub async fn holdings(&self, org: &Org, name: &RepoName, digest: &Digest) -> Vec<Holding> {
        let mut out = Vec::with_capacity(org.backends.len());
        let mut missing = false;
        for &b in &org.backends {
            let local = self.holders.get(&(name.clone(), digest.clone(), b));
            match local {
                Some((holding, _)) => out.push(holding),
                _ => {
                    missing = true;
                    out.push(Holding::Unknown);
                }
            }
        }
        // A known local holder is enough to serve: the store is asked only when this node
        // knows of none, so warm requests never wait on it.
        if missing && !out.contains(&Holding::Has) {
            self.fill_from_store(org, name, digest, &mut out).await;
        }
        out
    }

    async fn fill_from_store(
        &self,
        org: &Org,
        name: &RepoName,
        digest: &Digest,
        out: &mut [Holding],
    ) {
        if !self.store_usable() {
            return;
        }
        let ids: Vec<&str> = org.backends.iter().map(|&b| &*self.ids[b]).collect();
        match self.store.holdings(name, digest, &ids).await {
            Ok(shared) => {
                for ((slot, &b), holding) in out.iter_mut().zip(&org.backends).zip(shared) {
                    if *slot == Holding::Unknown && holding != Holding::Unknown {
                        *slot = holding;
                        self.remember_locally(name, digest, b, holding);
                    }
                }
            }
            Err(e) => self.store_failed("holder lookup", &e),
        }
    }

    /// Whether to ask or tell the store about holders and tags: never when it shares
    /// nothing with other nodes, and not for a moment after a failure (a dead store must
    /// not add its timeout to every request).
    fn store_usable(&self) -> bool {
        self.store.shares_knowledge()
            && self.store_quiet_until.load(Ordering::Relaxed) <= unix_ms(SystemTime::now())
    }

    fn store_failed(&self, what: &str, e: &crate::store::StoreError) {
        let until = unix_ms(SystemTime::now()) + STORE_QUIET_MS;
        let previous = self.store_quiet_until.swap(until, Ordering::Relaxed);
        if previous <= unix_ms(SystemTime::now()) {
            tracing::warn!(error = %e, what, "store call failed; using local knowledge only for a moment");
        }
    }

    /// Queues a fact for the store, off the request path. When the queue is full (the
    /// store cannot keep up) the fact is dropped and counted: it is only a hint to other
    /// nodes, and a request must never wait for it or grow memory for it.
    fn write_behind<F>(&self, what: &'static str, write: F)
    where
        F: std::future::Future<Output = Result<(), crate::store::StoreError>> + Send + 'static,
    {
        if !self.store_usable() {
            return;
        }
        if self.writes.try_send((what, Box::pin(write))).is_err() {
            self.writes_dropped.inc();
        }
    }

    fn remember_locally(
        &self,
        name: &RepoName,
        digest: &Digest,
        backend: BackendIdx,
        holding: Holding,
    ) {
        let key = (name.clone(), digest.clone(), backend);
        let known = self.holders.get(&key).map(|(h, _)| h);
        self.remember_known(key, known, holding);
    }

    /// Records `holding` for `key`, whose local fact was `known`.
    fn remember_known(
        &self,
        key: (RepoName, Digest, BackendIdx),
        known: Option<Holding>,
        holding: Holding,
    ) {
        let ttl = self.ttl_for(holding);
        let path = (known != Some(holding)).then(|| blob_path(&key.0, &key.1));
        self.holders.insert(key, holding, Instant::now() + ttl);
        self.learned.fetch_add(1, Ordering::Release);
        // A redirect decided from another fact is not reused.
        if let Some(path) = path {
            self.redirects.invalidate(path.as_str());
        }
    }

    /// How many holder facts this node has recorded so far (see the field).
    pub fn learned(&self) -> u64 {
        self.learned.load(Ordering::Acquire)
    }

    fn ttl_for(&self, holding: Holding) -> Duration {
        match holding {
            Holding::Lacks => self.lacks_ttl,
            _ => self.holder_ttl,
        }
    }

    /// Records what a probe or a served request showed, locally and in the shared store.
    pub async fn learn(
        &self,
        name: &RepoName,
        digest: &Digest,
        backend: BackendIdx,
        holding: Holding,
    ) {
        if holding == Holding::Unknown {
            return;
        }
        let now = Instant::now();
        let key = (name.clone(), digest.clone(), backend);
        let local = self.holders.get(&key);
        // Skip the store write when the local fact is already known and fresh.
        if let Some((known, until)) = local {
            if known == holding && until > now + self.ttl_for(holding) / 2 {
                return;
            }
        }
        self.remember_known(key, local.map(|(h, _)| h), holding);
        let (store, name, digest, id, ttl) = (
            self.store.clone(),
            name.clone(),
            digest.clone(),
            self.ids[backend].clone(),
            self.ttl_for(holding),
        );
        self.write_behind("record holder", async move {
            store
                .record_holding(&name, &digest, &id, holding, ttl)
                .await
        });
    }

    /// The last resolution of a tag, from this node or the store.
    pub async fn tag(&self, name: &RepoName, tag: &Tag) -> Option<TagRecord> {
        if let Some(record) = self.tags.get(&(name.clone(), tag.clone())) {
            return Some(record);
        }
        if !self.store_usable() {
            return None;
        }
        match self.store.tag(name, tag).await {
            Ok(Some(record)) => {
                self.tags
                    .insert((name.clone(), tag.clone()), record.clone());
                Some(record)
            }
            Ok(None) => None,
            Err(e) => {
                self.store_failed("tag lookup", &e);
                None
            }
        }
    }

    pub async fn learn_tag(&self, name: &RepoName, tag: &Tag, record: TagRecord) {
        self.tags
            .insert((name.clone(), tag.clone()), record.clone());
        let (store, name, tag, keep) = (
            self.store.clone(),
            name.clone(),
            tag.clone(),
            self.stale_tag_ttl,
        );
        self.write_behind("record tag", async move {
            store.record_tag(&name, &tag, &record, keep).await
        });
    }

    pub fn manifest(&self, digest: &Digest) -> Option<Arc<Manifest>> {
        self.manifests.get(digest)
    }

    pub fn keep_manifest(&self, manifest: Arc<Manifest>) {
        self.manifests.insert(manifest.digest.clone(), manifest);
    }

    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        self.sizes.get(digest)
    }

    pub fn learn_size(&self, digest: &Digest, size: u64) {
        self.sizes.insert(digest.clone(), size);
    }

    /// A pre-signed URL for the blob on `backend`, while it is still good.
    pub fn resolved(&self, backend: BackendIdx, digest: &Digest) -> Option<Arc<str>> {
        self.resolved
            .get(&(backend, digest.clone()))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(url, _)| url)
    }

    /// How much longer a cached pre-signed URL for the blob on `backend` may be handed out.
    pub fn resolved_remaining(&self, backend: BackendIdx, digest: &Digest) -> Option<Duration> {
        let (_, until) = self.resolved.get(&(backend, digest.clone()))?;
        until.checked_duration_since(Instant::now())
    }

    pub fn learn_resolved(
        &self,
        backend: BackendIdx,
        digest: &Digest,
        url: Arc<str>,
        good_for: Duration,
    ) {
        self.resolved
            .insert((backend, digest.clone()), (url, Instant::now() + good_for));
    }

    pub fn detected(&self, backend: BackendIdx) -> Detected {
        Detected::from_u8(self.detected[backend].load(Ordering::Relaxed))
    }

    pub fn learn_detected(&self, backend: BackendIdx, detected: Detected) {
        if self.detected[backend].swap(detected.to_u8(), Ordering::Relaxed) != detected.to_u8() {
            self.bump();
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::Release);
    }

    /// A redirect decided for `path` that still holds.
    pub fn redirect(&self, path: &str) -> Option<Arc<Redirect>> {
        let hit = self.redirects.get(path)?;
        (hit.epoch == self.epoch() && hit.until > Instant::now()).then_some(hit)
    }

    /// Remembers the redirect decided for `path` under `epoch` (read before deciding), for
    /// at most `good_for`: its `Location` and `X-Regatta-Backend` values, and the org.
    pub fn keep_redirect(
        &self,
        path: &str,
        epoch: u64,
        (location, backend): (
            actix_web::http::header::HeaderValue,
            actix_web::http::header::HeaderValue,
        ),
        org: Arc<str>,
        counters: (prometheus::IntCounter, prometheus::IntCounter),
        good_for: Duration,
    ) {
        let until = Instant::now() + good_for.min(REDIRECT_REUSE);
        self.redirects.insert(
            path.into(),
            Arc::new(Redirect {
                location,
                backend,
                path: path.into(),
                org,
                decision: counters.0,
                requests: counters.1,
                epoch,
                until,
            }),
        );
    }

    /// Forgets holders of `digest` (every repository), its manifest and pre-signed URLs,
    /// and `repo`'s tag resolutions, on this node.
    pub fn purge(&self, digest: Option<&Digest>, repo: Option<&RepoName>) {
        self.bump();
        if let Some(digest) = digest {
            self.holders.forget_digest(digest);
            invalidate_where(&self.resolved, |k| &k.1 == digest);
            self.manifests.invalidate(digest);
        }
        if let Some(repo) = repo {
            invalidate_where(&self.tags, |k| &k.0 == repo);
        }
    }

    /// A backend that could not be reached counts as down for a while, so that requests
    /// go to the next holder instead of waiting on it again.
    pub fn mark_unreachable(&self, backend: BackendIdx) {
        let now = unix_ms(SystemTime::now());
        let until = now + self.failure_backoff.as_millis() as u64;
        // Only a backend that was usable until now changes a decision.
        if self.down_until[backend].swap(until, Ordering::Relaxed) <= now {
            self.bump();
        }
    }

    pub fn mark_reachable(&self, backend: BackendIdx) {
        if self.down_until[backend].load(Ordering::Relaxed) != 0 {
            self.down_until[backend].store(0, Ordering::Relaxed);
            self.bump();
        }
    }

    pub fn is_down(&self, backend: BackendIdx, now_ms: u64) -> bool {
        self.down_until[backend].load(Ordering::Relaxed) > now_ms
    }

    /// The delivery a backend uses now: configured, or detected so far.
    pub fn delivery(&self, configured: Delivery, backend: BackendIdx) -> Option<Delivery> {
        match configured {
            Delivery::Auto => match self.detected(backend) {
                Detected::Anonymous => Some(Delivery::Direct),
                Detected::Resolve => Some(Delivery::Resolve),
                Detected::Proxy => Some(Delivery::Proxy),
                Detected::Unknown | Detected::NeedsAuth => None,
            },
            other => Some(other),
        }
    }
}

/// The request path of a blob GET, as the redirect cache keys it.
pub fn blob_path(name: &RepoName, digest: &Digest) -> String {
    format!("/v2/{name}/blobs/{digest}")
}
