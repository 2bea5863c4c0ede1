//! The node's snapshot of what the cluster agrees on: backend health, admin decisions and
//! org policy. Readers load it whole (ArcSwap); the refresher replaces it whole when the
//! store announces a change and on a fixed interval.
//!
//! Architecture invariant: the request path reads health and policy only from here and
//! never waits on the store for them. When the store is unreachable the last snapshot
//! stays in force and the refresher keeps retrying.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::config::Settings;
use crate::model::{AdminState, Health, HealthRecord, OrgPolicy, RegionalHealth, RobotRecord};
use crate::store::{Store, StoreError};
use crate::topology::{Org, Topology};

/// One backend as the cluster sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendLive {
    pub health: Health,
    pub latency_us: u32,
    pub drained: bool,
    pub weight: u32,
    /// The health record this node goes by: its own region's, else (none probed from
    /// here yet) the most recent one from another region; `None` when no node has
    /// probed it recently.
    pub record: Option<HealthRecord>,
    /// Every region's record in force, by region (what `regatta_backend_health` shows).
    pub views: Vec<(String, HealthRecord)>,
}

impl BackendLive {
    /// Sets `region`'s view and recomputes what this node (in `own`) goes by.
    fn set_view(&mut self, own: &str, region: &str, record: HealthRecord) {
        match self.views.iter_mut().find(|(r, _)| r == region) {
            Some((_, current)) => *current = record,
            None => {
                self.views.push((region.to_owned(), record));
                self.views.sort_by(|a, b| a.0.cmp(&b.0));
            }
        }
        self.record = in_force(own, &self.views).cloned();
        self.health = self.record.as_ref().map_or(Health::Up, |r| r.state);
        self.latency_us = self.record.as_ref().map_or(0, |r| r.latency_us);
    }
}

/// The view a node in region `own` ranks a backend by: its own region's, falling back to
/// the most recently checked other region's only while its own has none.
fn in_force<'a>(own: &str, views: &'a [(String, HealthRecord)]) -> Option<&'a HealthRecord> {
    views
        .iter()
        .find(|(r, _)| r == own)
        .or_else(|| views.iter().max_by_key(|(_, rec)| rec.checked_at_ms))
        .map(|(_, rec)| rec)
}

#[derive(Debug)]
pub struct Snapshot {
    /// By backend index.
    pub backends: Vec<BackendLive>,
    pub orgs: HashMap<String, Arc<Org>>,
    /// Whether any org is private (then `/v2/` asks for a token).
    pub any_private: bool,
    /// Robot accounts by name.
    pub robots: Arc<HashMap<String, RobotRecord>>,
    pub loaded_at: Instant,
}

impl Snapshot {
    /// What a node knows before it has read the store: configured weights and orgs, every
    /// backend presumed up.
    pub fn from_config(topology: &Topology, settings: &Settings) -> Snapshot {
        let policies = config_policies(settings);
        Snapshot::build(
            topology,
            &HashMap::new(),
            &RegionalHealth::new(),
            &policies.into_iter().collect(),
            HashMap::new(),
        )
    }

    pub fn build(
        topology: &Topology,
        admin: &HashMap<String, AdminState>,
        health: &RegionalHealth,
        policies: &HashMap<String, OrgPolicy>,
        robots: HashMap<String, RobotRecord>,
    ) -> Snapshot {
        let mut backends: Vec<BackendLive> = topology
            .backends
            .iter()
            .map(|b| {
                let decision = admin.get(&*b.id).cloned().unwrap_or_default();
                BackendLive {
                    health: Health::Up,
                    latency_us: 0,
                    drained: decision.drained,
                    weight: decision.weight.unwrap_or(b.weight),
                    record: None,
                    views: Vec::new(),
                }
            })
            .collect();
        for (key, record) in health {
            if let Some(b) = topology.backends.iter().find(|b| *b.id == key.backend) {
                backends[b.idx].set_view(&topology.region, &key.region, record.clone());
            }
        }
        let mut orgs = HashMap::new();
        for (name, policy) in policies {
            match Org::from_policy(name, policy, topology) {
                Ok(org) => {
                    orgs.insert(name.clone(), Arc::new(org));
                }
                Err(reason) => {
                    tracing::warn!(org = %name, %reason, "ignoring an org policy this node cannot serve")
                }
            }
        }
        // Mirror mode's groups come from this node's configuration and take their names
        // over from any org policy (the configuration check and the admin API refuse such
        // an org; a policy written by a node configured otherwise may still exist).
        for group in topology.upstreams.groups() {
            if orgs.contains_key(&group.name) {
                tracing::warn!(org = %group.name, "an org policy has the name of an upstream group; serving the group");
            }
            match Org::upstream_group(&group.name, &group.policy, topology) {
                Ok(org) => {
                    orgs.insert(group.name.clone(), Arc::new(org));
                }
                Err(reason) => {
                    tracing::warn!(upstream = %group.name, %reason, "ignoring an upstream group this node cannot serve")
                }
            }
        }
        Snapshot {
            backends,
            any_private: orgs.values().any(|o| !o.policy.access.is_public()),
            orgs,
            robots: Arc::new(robots),
            loaded_at: Instant::now(),
        }
    }
}

impl BackendLive {
    /// What placement weighs of this backend (latency by bucket, as placement sees it).
    fn weighed(&self) -> (Health, bool, u32, u32) {
        (
            self.health,
            self.drained,
            self.weight,
            self.latency_us / crate::placement::LATENCY_BUCKET_US,
        )
    }
}

impl Snapshot {
    /// True when every decision made under `self` would be made the same under `other`:
    /// same health, drains, weights, latency buckets and org policies. Only a change that
    /// could alter a decision moves the epoch (and so drops the decided redirects).
    pub fn decides_like(&self, other: &Snapshot) -> bool {
        self.backends.len() == other.backends.len()
            && self
                .backends
                .iter()
                .zip(&other.backends)
                .all(|(a, b)| a.weighed() == b.weighed())
            && self.orgs.len() == other.orgs.len()
            && self
                .orgs
                .iter()
                .all(|(name, org)| other.orgs.get(name).is_some_and(|o| o.policy == org.policy))
    }
}

/// The configured orgs as policies: what seeds an empty store.
pub fn config_policies(settings: &Settings) -> Vec<(String, OrgPolicy)> {
    settings
        .orgs
        .iter()
        .map(|o| (o.name.clone(), o.policy()))
        .collect()
}

pub struct ClusterState {
    snapshot: ArcSwap<Snapshot>,
    /// When the snapshot was last reloaded from the store (Unix ms).
    reloaded_ms: AtomicU64,
    /// Bumped whenever the snapshot changes in a way that could alter a decision; cached
    /// decisions made under an older epoch are not reused.
    epoch: Arc<AtomicU64>,
}

impl ClusterState {
    pub fn new(initial: Snapshot, epoch: Arc<AtomicU64>) -> ClusterState {
        ClusterState {
            snapshot: ArcSwap::from_pointee(initial),
            reloaded_ms: AtomicU64::new(crate::model::unix_ms(std::time::SystemTime::now())),
            epoch,
        }
    }

    /// Time since the snapshot was last reloaded from the store.
    pub fn age(&self) -> Duration {
        let now = crate::model::unix_ms(std::time::SystemTime::now());
        Duration::from_millis(now.saturating_sub(self.reloaded_ms.load(Ordering::Relaxed)))
    }

    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::Release);
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn load_full(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Applies a health record this node just produced (its region's view, `region`
    /// being this node's), without waiting for the store.
    pub fn apply_health(&self, backend: usize, region: &str, record: HealthRecord) {
        let before = self.snapshot.load().backends[backend].weighed();
        self.snapshot.rcu(|current| {
            let mut backends = current.backends.clone();
            backends[backend].set_view(region, region, record.clone());
            Arc::new(Snapshot {
                backends,
                orgs: current.orgs.clone(),
                any_private: current.any_private,
                robots: current.robots.clone(),
                loaded_at: current.loaded_at,
            })
        });
        if self.snapshot.load().backends[backend].weighed() != before {
            self.bump();
        }
    }

    /// Applies an admin decision this node just made, without waiting for the store.
    pub fn apply_admin(&self, backend: usize, configured_weight: u32, state: &AdminState) {
        let before = self.snapshot.load().backends[backend].weighed();
        self.snapshot.rcu(|current| {
            let mut backends = current.backends.clone();
            backends[backend].drained = state.drained;
            backends[backend].weight = state.weight.unwrap_or(configured_weight);
            Arc::new(Snapshot {
                backends,
                orgs: current.orgs.clone(),
                any_private: current.any_private,
                robots: current.robots.clone(),
                loaded_at: current.loaded_at,
            })
        });
        if self.snapshot.load().backends[backend].weighed() != before {
            self.bump();
        }
    }

    /// Reads everything shared from the store and swaps in a new snapshot.
    pub async fn reload(&self, topology: &Topology, store: &dyn Store) -> Result<(), StoreError> {
        // A change applied here while the store was being read (an admin call on this node,
        // a probe result) must not be undone by the older read: swap only if the snapshot is
        // still the one the read started from, else read again.
        for _ in 0..3 {
            let base = self.snapshot.load_full();
            let admin = store.admin_states().await?;
            let health = store.health().await?;
            let policies = store.policies().await?;
            let robots = store.robots().await?;
            let next = Arc::new(Snapshot::build(
                topology, &admin, &health, &policies, robots,
            ));
            let orgs = next.orgs.len();
            let changed = !next.decides_like(&base);
            let previous = self.snapshot.compare_and_swap(&base, next);
            if Arc::ptr_eq(&previous, &base) {
                if changed {
                    self.bump();
                }
                self.reloaded_ms.store(
                    crate::model::unix_ms(std::time::SystemTime::now()),
                    Ordering::Relaxed,
                );
                if base.orgs.len() != orgs {
                    tracing::info!(orgs, "org policies changed");
                }
                return Ok(());
            }
        }
        // Changing faster than it can be read: the next event or tick reloads.
        Ok(())
    }
}

/// The configured orgs whose policy in the store is not the file's: policies are seeded
/// into an empty store only, so an edit to the file of a running cluster (say, making an
/// org private) does nothing until it is made through the admin API. Each is named with
/// how it differs.
pub fn policy_drift<'a>(
    seeds: &'a [(String, OrgPolicy)],
    stored: &HashMap<String, OrgPolicy>,
) -> Vec<(&'a str, &'static str)> {
    seeds
        .iter()
        .filter_map(|(org, policy)| match stored.get(org) {
            None => Some((
                org.as_str(),
                "deleted in the cluster, still in this node's configuration",
            )),
            Some(current) if current != policy => Some((
                org.as_str(),
                "the cluster's policy differs from this node's configuration",
            )),
            Some(_) => None,
        })
        .collect()
}

/// Keeps the snapshot current: reload on every change event and every `interval`; on
/// failure keep the last snapshot and retry with backoff.
pub async fn run_refresher(
    state: Arc<ClusterState>,
    topology: Arc<Topology>,
    store: Arc<dyn Store>,
    seeds: Vec<(String, OrgPolicy)>,
    interval: Duration,
    on_event: impl Fn(&str),
) {
    let mut events = store.subscribe();
    let mut seeded = false;
    let mut healthy = true;
    loop {
        if !seeded {
            match store.seed_policies(&seeds).await {
                Ok(()) => {
                    seeded = true;
                    if let Ok(stored) = store.policies().await {
                        for (org, how) in policy_drift(&seeds, &stored) {
                            tracing::warn!(
                                org = %org,
                                "org {org}: {how}; the cluster's policy applies (the file \
                                 seeds an empty store only): change it with \
                                 `regatta admin put-org`"
                            );
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot seed org policies yet"),
            }
        }
        let wait = match state.reload(&topology, &*store).await {
            Ok(()) => {
                if !healthy {
                    tracing::info!("store reachable again; snapshot reloaded");
                    healthy = true;
                }
                interval
            }
            Err(e) => {
                if healthy {
                    tracing::warn!(error = %e, "store unreachable; serving from the last snapshot");
                    healthy = false;
                }
                interval.min(Duration::from_millis(500))
            }
        };
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => on_event(&event),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => events = store.subscribe(),
                // Missed some: the reload below catches up on everything but purges,
                // which expire on their own.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HealthKey;
    use crate::store::MemoryStore;

    fn settings() -> Settings {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("regatta.toml");
        std::fs::write(
            &path,
            r#"
            [server]
            listen = "127.0.0.1:0"
            [[backends]]
            id = "a"
            url = "http://127.0.0.1:1"
            [[backends]]
            id = "b"
            url = "http://127.0.0.1:2"
            [[orgs]]
            name = "acme"
            backends = ["a", "b"]
            "#,
        )
        .unwrap();
        Settings::load(Some(&path), []).unwrap()
    }

    fn health(state: Health, latency_us: u32) -> HealthRecord {
        HealthRecord {
            state,
            latency_us,
            ok_streak: 1,
            fail_streak: 0,
            checked_at_ms: 1,
            reason: String::new(),
            node: "n".into(),
        }
    }

    #[tokio::test]
    async fn a_configuration_the_cluster_no_longer_follows_is_named() {
        let settings = settings();
        let seeds = config_policies(&settings);
        let store = MemoryStore::new();
        store.seed_policies(&seeds).await.unwrap();
        let stored = store.policies().await.unwrap();
        assert!(policy_drift(&seeds, &stored).is_empty(), "just seeded");

        let (org, mut policy) = seeds[0].clone();
        policy.tag_authorities = Some(vec!["a".into()]);
        store.put_policy(&org, &policy).await.unwrap();
        let stored = store.policies().await.unwrap();
        assert_eq!(
            policy_drift(&seeds, &stored),
            [(
                org.as_str(),
                "the cluster's policy differs from this node's configuration"
            )]
        );
        store.delete_policy(&org).await.unwrap();
        let stored = store.policies().await.unwrap();
        assert_eq!(
            policy_drift(&seeds, &stored),
            [(
                org.as_str(),
                "deleted in the cluster, still in this node's configuration"
            )]
        );
    }

    #[tokio::test]
    async fn the_epoch_moves_only_when_a_decision_could_change() {
        let settings = settings();
        let topology = Topology::from_settings(&settings);
        let store = MemoryStore::new();
        store
            .seed_policies(&config_policies(&settings))
            .await
            .unwrap();
        let epoch = Arc::new(AtomicU64::new(0));
        let state = ClusterState::new(Snapshot::from_config(&topology, &settings), epoch.clone());
        let epoch_after = |what: &str, want: u64| {
            assert_eq!(epoch.load(Ordering::Acquire), want, "{what}");
        };
        let ttl = Duration::from_secs(60);

        state.reload(&topology, &store).await.unwrap();
        epoch_after("a reload that finds what the node already had", 0);
        store
            .set_health(
                &HealthKey::new(&topology.region, "a"),
                &health(Health::Up, 1_000),
                ttl,
            )
            .await
            .unwrap();
        state.reload(&topology, &store).await.unwrap();
        epoch_after("a probe that changes nothing placement weighs", 0);
        state.apply_health(0, &topology.region, health(Health::Up, 1_500));
        epoch_after("a probe applied locally, latency in the same bucket", 0);

        store
            .update_admin_state("b", crate::store::AdminChange::Drained(true))
            .await
            .unwrap();
        state.reload(&topology, &store).await.unwrap();
        epoch_after("a drain", 1);
        state.apply_health(0, &topology.region, health(Health::Down, 1_500));
        epoch_after("a health state flip", 2);
        state.apply_health(0, &topology.region, health(Health::Down, 90_000));
        epoch_after("a latency bucket change", 3);
        let mut policy = config_policies(&settings).remove(0).1;
        policy.tag_authorities = Some(vec!["a".into()]);
        store.put_policy("acme", &policy).await.unwrap();
        state.reload(&topology, &store).await.unwrap();
        epoch_after("a policy change", 4);
    }

    #[tokio::test]
    async fn a_node_goes_by_its_own_regions_view_else_another_regions() {
        let settings = settings();
        let topology = Topology::from_settings(&settings);
        let own = topology.region.clone();
        let store = MemoryStore::new();
        store
            .seed_policies(&config_policies(&settings))
            .await
            .unwrap();
        let state = ClusterState::new(
            Snapshot::from_config(&topology, &settings),
            Arc::new(AtomicU64::new(0)),
        );
        let ttl = Duration::from_secs(60);
        let at = |state: Health, checked_at_ms: u64| HealthRecord {
            checked_at_ms,
            ..health(state, 1_000)
        };
        let seen = |state: &ClusterState| {
            let snapshot = state.load();
            (
                snapshot.backends[0].health,
                snapshot.backends[0].views.len(),
            )
        };

        // Only another region has probed `a`: its view is all this node has.
        store
            .set_health(&HealthKey::new("far", "a"), &at(Health::Down, 10), ttl)
            .await
            .unwrap();
        state.reload(&topology, &store).await.unwrap();
        assert_eq!(seen(&state), (Health::Down, 1));

        // Among other regions, the most recent view.
        store
            .set_health(&HealthKey::new("near", "a"), &at(Health::Up, 20), ttl)
            .await
            .unwrap();
        state.reload(&topology, &store).await.unwrap();
        assert_eq!(seen(&state), (Health::Up, 2));

        // Its own region's view wins, however old, and whatever the others say.
        store
            .set_health(&HealthKey::new("near", "a"), &at(Health::Up, 40), ttl)
            .await
            .unwrap();
        store
            .set_health(&HealthKey::new(&own, "a"), &at(Health::Down, 30), ttl)
            .await
            .unwrap();
        state.reload(&topology, &store).await.unwrap();
        assert_eq!(seen(&state), (Health::Down, 3));
        state.apply_health(0, &own, at(Health::Up, 50));
        assert_eq!(seen(&state), (Health::Up, 3));
        assert_eq!(
            state.load().backends[1].views.len(),
            0,
            "b was never probed"
        );
    }
}
