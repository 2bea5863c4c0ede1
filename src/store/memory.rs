//! The embedded store: a single node's shared state in process memory, bounded in size.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::sync::Cache;
use tokio::sync::broadcast;

use super::{invalidate_where, AdminChange, Store, StoreError};
use crate::model::{
    AdminState, HealthKey, HealthRecord, Holding, OrgPolicy, RegionalHealth, RobotRecord, TagRecord,
};
use crate::oci::{Digest, RepoName, Tag};

type HolderKey = (RepoName, Digest, Box<str>);

pub struct MemoryStore {
    holdings: Cache<HolderKey, (Holding, Instant)>,
    tags: Cache<(RepoName, Tag), (TagRecord, Instant)>,
    shared: Mutex<Shared>,
    events: broadcast::Sender<String>,
}

#[derive(Default)]
struct Shared {
    admin: HashMap<String, AdminState>,
    health: HashMap<HealthKey, (HealthRecord, Instant)>,
    policies: HashMap<String, OrgPolicy>,
    robots: HashMap<String, RobotRecord>,
    seeded: bool,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            holdings: Cache::new(1_000_000),
            tags: Cache::new(100_000),
            shared: Mutex::new(Shared::default()),
            events: broadcast::channel(64).0,
        }
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn shares_knowledge(&self) -> bool {
        false
    }

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

    async fn purge(
        &self,
        digest: Option<&Digest>,
        tags_of: Option<&RepoName>,
    ) -> Result<u64, StoreError> {
        let mut gone = 0;
        if let Some(digest) = digest {
            gone += invalidate_where(&self.holdings, |k| &k.1 == digest);
        }
        if let Some(repo) = tags_of {
            gone += invalidate_where(&self.tags, |k| &k.0 == repo);
        }
        Ok(gone)
    }

    async fn admin_states(&self) -> Result<HashMap<String, AdminState>, StoreError> {
        Ok(self.shared().admin.clone())
    }

    async fn update_admin_state(
        &self,
        backend: &str,
        change: AdminChange,
    ) -> Result<AdminState, StoreError> {
        let mut shared = self.shared();
        let state = shared.admin.entry(backend.to_owned()).or_default();
        change.apply(state);
        Ok(state.clone())
    }

    async fn health(&self) -> Result<RegionalHealth, StoreError> {
        let now = Instant::now();
        Ok(self
            .shared()
            .health
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(k, (r, _))| (k.clone(), r.clone()))
            .collect())
    }

    async fn set_health(
        &self,
        key: &HealthKey,
        record: &HealthRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.shared()
            .health
            .insert(key.clone(), (record.clone(), Instant::now() + ttl));
        Ok(())
    }

    async fn try_lease(
        &self,
        _name: &str,
        _holder: &str,
        _ttl: Duration,
    ) -> Result<bool, StoreError> {
        // One node: it always holds every lease.
        Ok(true)
    }

    async fn policies(&self) -> Result<HashMap<String, OrgPolicy>, StoreError> {
        Ok(self.shared().policies.clone())
    }

    async fn seed_policies(&self, seeds: &[(String, OrgPolicy)]) -> Result<(), StoreError> {
        let mut shared = self.shared();
        if !shared.seeded {
            shared.seeded = true;
            for (org, policy) in seeds {
                shared
                    .policies
                    .entry(org.clone())
                    .or_insert_with(|| policy.clone());
            }
        }
        Ok(())
    }

    async fn put_policy(&self, org: &str, policy: &OrgPolicy) -> Result<(), StoreError> {
        self.shared()
            .policies
            .insert(org.to_owned(), policy.clone());
        Ok(())
    }

    async fn delete_policy(&self, org: &str) -> Result<bool, StoreError> {
        Ok(self.shared().policies.remove(org).is_some())
    }

    async fn robots(&self) -> Result<HashMap<String, RobotRecord>, StoreError> {
        Ok(self.shared().robots.clone())
    }

    async fn create_robot(&self, record: &RobotRecord) -> Result<bool, StoreError> {
        let mut shared = self.shared();
        if shared.robots.contains_key(&record.name) {
            return Ok(false);
        }
        shared.robots.insert(record.name.clone(), record.clone());
        Ok(true)
    }

    async fn delete_robot(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.shared().robots.remove(name).is_some())
    }

    async fn publish(&self, event: &str) -> Result<(), StoreError> {
        let _ = self.events.send(event.to_owned());
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }
}
