//! The embedded store: a single node's shared state in process memory, bounded in size.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::sync::Cache;

use super::{Store, StoreError, TagRecord};
use crate::oci::{Digest, RepoName, Tag};
use crate::placement::Holding;

type HolderKey = (RepoName, Digest, Box<str>);

pub struct MemoryStore {
    holdings: Cache<HolderKey, (Holding, Instant)>,
    tags: Cache<(RepoName, Tag), (TagRecord, Instant)>,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            holdings: Cache::new(1_000_000),
            tags: Cache::new(100_000),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn holdings(
        &self,
        repo: &RepoName,
        digest: &Digest,
        backends: &[&str],
    ) -> Result<Vec<Holding>, StoreError> {
        let now = Instant::now();
        Ok(backends
            .iter()
            .map(|b| {
                match self
                    .holdings
                    .get(&(repo.clone(), digest.clone(), (*b).into()))
                {
                    Some((holding, until)) if until > now => holding,
                    _ => Holding::Unknown,
                }
            })
            .collect())
    }

    async fn record_holding(
        &self,
        repo: &RepoName,
        digest: &Digest,
        backend: &str,
        holding: Holding,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.holdings.insert(
            (repo.clone(), digest.clone(), backend.into()),
            (holding, Instant::now() + ttl),
        );
        Ok(())
    }

    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<TagRecord>, StoreError> {
        Ok(self
            .tags
            .get(&(repo.clone(), tag.clone()))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(record, _)| record))
    }

    async fn record_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
        keep: Duration,
    ) -> Result<(), StoreError> {
        self.tags.insert(
            (repo.clone(), tag.clone()),
            (record.clone(), Instant::now() + keep),
        );
        Ok(())
    }
}
