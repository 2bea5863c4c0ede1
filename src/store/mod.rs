//! Shared state behind one small trait: which backends hold which digests, and the last
//! digest each tag resolved to. A single node uses [`MemoryStore`]; a cluster shares the
//! same facts through Redis.
//!
//! Nodes keep their own caches in front of the store (see `knowledge.rs`); the store is
//! consulted on a local miss and written when something new is learned.

mod memory;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use memory::MemoryStore;

use crate::oci::{Digest, RepoName, Tag};
use crate::placement::Holding;

/// What a tag pointed at when it was last resolved at its authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// Backend id that answered as the authority.
    pub backend: String,
    /// When it was resolved, in milliseconds since the Unix epoch.
    pub resolved_at_ms: u64,
}

impl TagRecord {
    pub fn age(&self, now: SystemTime) -> Duration {
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        Duration::from_millis(now_ms.saturating_sub(self.resolved_at_ms))
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
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
}
