//! Shared state behind one small trait: digest holders and tag records (what nodes learn),
//! admin decisions, backend health and org policy (what nodes must agree on), leases, and
//! a change feed. A single node uses [`MemoryStore`]; a cluster shares it through
//! [`RedisStore`].
//!
//! Nodes keep their own caches and a snapshot in front of the store: the request path reads
//! health and policy only from the snapshot, and asks the store for holders only when the
//! node knows of none.

mod checked;
mod memory;
mod redis;
mod redis_target;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

pub use self::checked::{
    is_media_type, Kind as RecordKind, RecordCheck, RecordLimits, MAX_CLOCK_SKEW,
};
pub use self::memory::MemoryStore;
pub use self::redis::{RedisStore, MAX_FACTS_PER_DIGEST};
pub use self::redis_target::{redact, RedisTarget, Shape as RedisShape};

use crate::model::{
    AdminState, HealthKey, HealthRecord, Holding, OrgPolicy, RegionalHealth, RobotRecord, TagRecord,
};
use crate::oci::{Digest, RepoName, Tag};

/// Published when shared state changes, so every node reloads its snapshot at once.
pub const EVENT_RESYNC: &str = "resync";

/// One operator change to a backend's [`AdminState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminChange {
    Drained(bool),
    /// `None` returns to the configured weight.
    Weight(Option<u32>),
}

impl AdminChange {
    pub fn apply(self, state: &mut AdminState) {
        match self {
            AdminChange::Drained(drained) => state.drained = drained,
            AdminChange::Weight(weight) => state.weight = weight,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store returned malformed data for {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short name for logs: `memory`, `redis`.
    fn kind(&self) -> &'static str;

    /// Whether holder and tag facts written here reach other nodes. The embedded store
    /// serves one node, whose own caches already hold what it learned: writing them there
    /// too would only double the memory they take.
    fn shares_knowledge(&self) -> bool {
        true
    }

    /// Calls that failed since start.
    fn error_count(&self) -> u64 {
        0
    }

    /// For each backend id, what is known about it holding `digest` in `repo`.
    async fn holdings(
        &self,
        repo: &RepoName,
        digest: &Digest,
        backends: &[&str],
    ) -> Result<Vec<Holding>, StoreError>;

    /// Remembers what a probe or a served request showed, for `ttl`.
    async fn record_holding(
        &self,
        repo: &RepoName,
        digest: &Digest,
        backend: &str,
        holding: Holding,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<TagRecord>, StoreError>;

    /// Remembers a tag's resolution for `keep` (long: it is what a stale serve falls back on).
    async fn record_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
        keep: Duration,
    ) -> Result<(), StoreError>;

    /// Forgets holders of `digest` (every repository) and, with `tags_of`, that
    /// repository's tag records (`None` digest: only tags). Returns how many facts went.
    async fn purge(
        &self,
        digest: Option<&Digest>,
        tags_of: Option<&RepoName>,
    ) -> Result<u64, StoreError>;

    async fn admin_states(&self) -> Result<HashMap<String, AdminState>, StoreError>;
    /// Changes one field of a backend's admin state in one atomic step (concurrent changes
    /// through other nodes, to this backend or another, are kept) and returns the result.
    async fn update_admin_state(
        &self,
        backend: &str,
        change: AdminChange,
    ) -> Result<AdminState, StoreError>;

    /// Every health record in force, from every region.
    async fn health(&self) -> Result<RegionalHealth, StoreError>;
    /// Shares one region's view of one backend.
    async fn set_health(
        &self,
        key: &HealthKey,
        record: &HealthRecord,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Takes the lease `name` for `ttl` unless another holder has it.
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError>;

    async fn policies(&self) -> Result<HashMap<String, OrgPolicy>, StoreError>;
    /// Writes the configured policies once in the store's life: later boots leave what the
    /// admin API made of them alone.
    async fn seed_policies(&self, seeds: &[(String, OrgPolicy)]) -> Result<(), StoreError>;
    async fn put_policy(&self, org: &str, policy: &OrgPolicy) -> Result<(), StoreError>;
    async fn delete_policy(&self, org: &str) -> Result<bool, StoreError>;

    /// Robot accounts by name (records that do not check out are skipped).
    async fn robots(&self) -> Result<HashMap<String, RobotRecord>, StoreError>;
    /// Creates robot `record.name`; false (and nothing written) when it exists already.
    async fn create_robot(&self, record: &RobotRecord) -> Result<bool, StoreError>;
    async fn delete_robot(&self, name: &str) -> Result<bool, StoreError>;

    /// Tells every node that shared state changed.
    async fn publish(&self, event: &str) -> Result<(), StoreError>;
    /// Change events from every node (and a resync after a reconnect).
    fn subscribe(&self) -> broadcast::Receiver<String>;
}

pub fn corrupt(key: impl Into<String>, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.into(),
        reason: e.to_string(),
    }
}

/// Drops every entry of a local cache whose key matches, returning how many went (admin
/// purges; never on the request path).
pub(crate) fn invalidate_where<K, V, S>(
    cache: &moka::sync::Cache<K, V, S>,
    matches: impl Fn(&K) -> bool,
) -> u64
where
    K: std::hash::Hash + Eq + Send + Sync + Clone + 'static,
    V: Clone + Send + Sync + 'static,
    S: std::hash::BuildHasher + Clone + Send + Sync + 'static,
{
    let keys: Vec<K> = cache
        .iter()
        .filter(|(k, _)| matches(k))
        .map(|(k, _)| (*k).clone())
        .collect();
    for key in &keys {
        cache.invalidate(key);
    }
    keys.len() as u64
}
