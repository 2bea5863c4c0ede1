//! The cluster store: Redis, standalone, Sentinel or Cluster.
//!
//! Key schema (every key is one slot, so Cluster needs no cross-slot commands):
//! - `regatta:holders:{<digest>}` HASH, field `<repo>|<backend>` = `has:<expires_ms>` or
//!   `lacks:<expires_ms>`; the key expires with the longest holder TTL.
//! - `regatta:tags:{<repo>}` HASH, field `<tag>` = JSON `TagRecord`; the key expires with
//!   the stale-tag TTL, refreshed on write.
//! - `regatta:admin` HASH, field `<backend>` = JSON `AdminState` (operator decisions, no TTL).
//! - `regatta:health` HASH, field `<backend>` = JSON `{record, expires_ms}`.
//! - `regatta:policies` HASH, field `<org>` = JSON `OrgPolicy`; `regatta:policies:seeded`
//!   marks that the configuration seeded it once.
//! - `regatta:lease:<name>` STRING = holder node, `PX` = lease length.
//! - channel `regatta:events`: change notices; any message makes nodes reload their snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot, OnceCell};

use super::{corrupt, Store, StoreError, EVENT_RESYNC};
use crate::model::{unix_ms, AdminState, HealthRecord, Holding, OrgPolicy, TagRecord};
use crate::oci::{Digest, RepoName, Tag};

const CHANNEL: &str = "regatta:events";
const ADMIN: &str = "regatta:admin";
const HEALTH: &str = "regatta:health";
const POLICIES: &str = "regatta:policies";
const SEEDED: &str = "regatta:policies:seeded";
/// Redis calls give up quickly: a node must never stall on its store.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where Redis is, parsed from `store.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Standalone(String),
    Sentinel { nodes: Vec<String>, master: String },
    Cluster { nodes: Vec<String> },
}

impl RedisTarget {
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("'{url}' is not a redis:// URL"))?;
        let hosts = |list: &str| -> Result<Vec<String>, String> {
            let nodes: Vec<String> = list
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{h}"))
                .collect();
            if nodes.is_empty() {
                return Err(format!("'{url}' names no host"));
            }
            Ok(nodes)
        };
        match scheme {
            "redis" => {
                redis::Client::open(url).map_err(|e| format!("'{url}': {e}"))?;
                Ok(RedisTarget::Standalone(url.to_owned()))
            }
            "redis+sentinel" => {
                let (list, master) = rest
                    .split_once('/')
                    .filter(|(_, m)| !m.is_empty())
                    .ok_or_else(|| {
                        format!(
                            "'{url}' needs the master name: redis+sentinel://host:port,.../master"
                        )
                    })?;
                Ok(RedisTarget::Sentinel {
                    nodes: hosts(list)?,
                    master: master.to_owned(),
                })
            }
            "redis+cluster" => Ok(RedisTarget::Cluster {
                nodes: hosts(rest.trim_end_matches('/'))?,
            }),
            other => Err(format!(
                "scheme '{other}' is not redis, redis+sentinel or redis+cluster"
            )),
        }
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The store. Its connections live on a runtime of their own (one thread), so Redis I/O
/// never depends on a busy or blocked HTTP worker; calls hop there and back.
pub struct RedisStore {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    shutdown: Option<oneshot::Sender<()>>,
    subscriber: Once,
}

struct Shared {
    target: RedisTarget,
    conn: OnceCell<Conn>,
    events: broadcast::Sender<String>,
    errors: AtomicU64,
}

enum Request {
    Cmd(Cmd),
    Pipe(redis::Pipeline),
}

#[derive(Serialize, Deserialize)]
struct Expiring<T> {
    record: T,
    expires_ms: u64,
}

impl RedisStore {
    pub fn new(target: RedisTarget) -> RedisStore {
        let (shutdown, stopped) = oneshot::channel::<()>();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("regatta-redis".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for redis I/O");
                let _ = handle_tx.send(runtime.handle().clone());
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .expect("spawn the redis I/O thread");
        let runtime = handle_rx.recv().expect("the redis I/O thread starts");
        RedisStore {
            shared: Arc::new(Shared {
                target,
                conn: OnceCell::new(),
                events: broadcast::channel(256).0,
                errors: AtomicU64::new(0),
            }),
            runtime,
            shutdown: Some(shutdown),
            subscriber: Once::new(),
        }
    }

    async fn exec(&self, request: Request) -> Result<redis::Value, StoreError> {
        let shared = self.shared.clone();
        let call = self
            .runtime
            .spawn(async move { shared.exec(request).await });
        let joined = tracing::Instrument::instrument(call, tracing::info_span!("redis")).await;
        let result = joined.unwrap_or_else(|e| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "redis task failed",
                e.to_string(),
            )))
        });
        result.map_err(|e| {
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            StoreError::Unavailable(e.to_string())
        })
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let value = self.exec(Request::Cmd(cmd.clone())).await?;
        T::from_redis_value(value).map_err(|e| corrupt("reply", e))
    }

    async fn hash_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<HashMap<String, T>, StoreError> {
        let raw: HashMap<String, String> = self.query(redis::cmd("HGETALL").arg(key)).await?;
        raw.into_iter()
            .map(|(field, json)| {
                serde_json::from_str(&json)
                    .map(|v| (field.clone(), v))
                    .map_err(|e| corrupt(format!("{key}/{field}"), e))
            })
            .collect()
    }

    async fn hset_json<T: Serialize>(
        &self,
        key: &str,
        field: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(value).map_err(|e| corrupt(key, e))?;
        self.query::<()>(redis::cmd("HSET").arg(key).arg(field).arg(json))
            .await
    }

    /// Relays `regatta:events` into the local channel, reconnecting with backoff; each
    /// (re)subscription is followed by a resync, so nothing missed while away stays missed.
    fn start_subscriber(&self) {
        let shared = self.shared.clone();
        self.runtime.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match subscribe_once(&shared.target, &shared.events).await {
                    Ok(()) => {
                        tracing::warn!("redis event subscription ended; reconnecting");
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "redis event subscription failed");
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl Shared {
    async fn connect(target: &RedisTarget) -> redis::RedisResult<Conn> {
        match target {
            RedisTarget::Standalone(url) => {
                let client = redis::Client::open(url.as_str())?;
                Ok(Conn::Single(
                    client.get_connection_manager_lazy(manager_config())?,
                ))
            }
            RedisTarget::Sentinel { .. } => {
                let client = master_client(target).await?;
                Ok(Conn::Single(
                    client.get_connection_manager_lazy(manager_config())?,
                ))
            }
            RedisTarget::Cluster { nodes } => {
                let client = redis::cluster::ClusterClient::builder(nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(1)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    async fn exec(&self, request: Request) -> redis::RedisResult<redis::Value> {
        let conn = self
            .conn
            .get_or_try_init(|| Self::connect(&self.target))
            .await?;
        match (conn.clone(), request) {
            (Conn::Single(mut c), Request::Cmd(cmd)) => cmd.query_async(&mut c).await,
            (Conn::Single(mut c), Request::Pipe(p)) => p.query_async(&mut c).await,
            (Conn::Cluster(mut c), Request::Cmd(cmd)) => cmd.query_async(&mut c).await,
            (Conn::Cluster(mut c), Request::Pipe(p)) => p.query_async(&mut c).await,
        }
    }
}

async fn subscribe_once(
    target: &RedisTarget,
    events: &broadcast::Sender<String>,
) -> redis::RedisResult<()> {
    let client = match target {
        RedisTarget::Standalone(url) => redis::Client::open(url.as_str())?,
        RedisTarget::Sentinel { .. } => master_client(target).await?,
        // Cluster PUBLISH reaches subscribers on every node; any node will do.
        RedisTarget::Cluster { nodes } => redis::Client::open(nodes[0].as_str())?,
    };
    let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
    pubsub.subscribe(CHANNEL).await?;
    tracing::info!("subscribed to redis events");
    let _ = events.send(EVENT_RESYNC.to_owned());
    let mut messages = pubsub.into_on_message();
    while let Some(msg) = messages.next().await {
        if let Ok(payload) = msg.get_payload::<String>() {
            let _ = events.send(payload);
        }
    }
    Ok(())
}

async fn master_client(target: &RedisTarget) -> redis::RedisResult<redis::Client> {
    let RedisTarget::Sentinel { nodes, master } = target else {
        unreachable!("only called for Sentinel targets")
    };
    let mut sentinel = redis::sentinel::SentinelClient::build(
        nodes.clone(),
        master.clone(),
        None,
        redis::sentinel::SentinelServerType::Master,
    )?;
    sentinel.async_get_client().await
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(2))
}

fn holders_key(digest: &Digest) -> String {
    format!("regatta:holders:{{{digest}}}")
}

fn tags_key(repo: &RepoName) -> String {
    format!("regatta:tags:{{{repo}}}")
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn error_count(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }

    async fn holdings(
        &self,
        repo: &RepoName,
        digest: &Digest,
        backends: &[&str],
    ) -> Result<Vec<Holding>, StoreError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(holders_key(digest));
        for b in backends {
            cmd.arg(format!("{repo}|{b}"));
        }
        let values: Vec<Option<String>> = self.query(&cmd).await?;
        let now = now_ms();
        Ok(values
            .into_iter()
            .map(|v| {
                let parsed =
                    v.as_deref()
                        .and_then(|v| v.split_once(':'))
                        .and_then(|(what, until)| {
                            let until: u64 = until.parse().ok()?;
                            (until > now).then_some(what)
                        });
                match parsed {
                    Some("has") => Holding::Has,
                    Some("lacks") => Holding::Lacks,
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
        let what = match holding {
            Holding::Has => "has",
            Holding::Lacks => "lacks",
            Holding::Unknown => return Ok(()),
        };
        let key = holders_key(digest);
        let value = format!("{what}:{}", now_ms() + ttl.as_millis() as u64);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&key)
            .arg(format!("{repo}|{backend}"))
            .arg(value)
            .ignore();
        // The key lives as long as its longest-lived field could.
        pipe.cmd("EXPIRE")
            .arg(&key)
            .arg(ttl.as_secs().max(1))
            .arg("GT")
            .ignore();
        pipe.cmd("EXPIRE")
            .arg(&key)
            .arg(ttl.as_secs().max(1))
            .arg("NX")
            .ignore();
        self.exec(Request::Pipe(pipe)).await.map(|_| ())
    }

    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<TagRecord>, StoreError> {
        let key = tags_key(repo);
        let raw: Option<String> = self
            .query(redis::cmd("HGET").arg(&key).arg(tag.as_str()))
            .await?;
        raw.map(|json| serde_json::from_str(&json).map_err(|e| corrupt(format!("{key}/{tag}"), e)))
            .transpose()
    }

    async fn record_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let key = tags_key(repo);
        self.hset_json(&key, tag.as_str(), record).await?;
        self.query::<()>(redis::cmd("EXPIRE").arg(&key).arg(keep.as_secs().max(1)))
            .await
    }

    async fn purge(
        &self,
        digest: Option<&Digest>,
        tags_of: Option<&RepoName>,
    ) -> Result<u64, StoreError> {
        let mut gone = 0u64;
        if let Some(digest) = digest {
            let key = holders_key(digest);
            gone += self.query::<u64>(redis::cmd("HLEN").arg(&key)).await?;
            self.query::<()>(redis::cmd("DEL").arg(&key)).await?;
        }
        if let Some(repo) = tags_of {
            let key = tags_key(repo);
            gone += self.query::<u64>(redis::cmd("HLEN").arg(&key)).await?;
            self.query::<()>(redis::cmd("DEL").arg(&key)).await?;
        }
        Ok(gone)
    }

    async fn admin_states(&self) -> Result<HashMap<String, AdminState>, StoreError> {
        self.hash_json(ADMIN).await
    }

    async fn set_admin_state(&self, backend: &str, state: &AdminState) -> Result<(), StoreError> {
        self.hset_json(ADMIN, backend, state).await
    }

    async fn health(&self) -> Result<HashMap<String, HealthRecord>, StoreError> {
        let now = now_ms();
        let all: HashMap<String, Expiring<HealthRecord>> = self.hash_json(HEALTH).await?;
        Ok(all
            .into_iter()
            .filter(|(_, e)| e.expires_ms > now)
            .map(|(k, e)| (k, e.record))
            .collect())
    }

    async fn set_health(
        &self,
        backend: &str,
        record: &HealthRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let value = Expiring {
            record,
            expires_ms: now_ms() + ttl.as_millis() as u64,
        };
        self.hset_json(HEALTH, backend, &value).await
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let got: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(format!("regatta:lease:{name}"))
                    .arg(holder)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64),
            )
            .await?;
        Ok(got.is_some())
    }

    async fn policies(&self) -> Result<HashMap<String, OrgPolicy>, StoreError> {
        self.hash_json(POLICIES).await
    }

    async fn seed_policies(&self, seeds: &[(String, OrgPolicy)]) -> Result<(), StoreError> {
        let first: Option<String> = self
            .query(redis::cmd("SET").arg(SEEDED).arg("1").arg("NX"))
            .await?;
        if first.is_none() {
            return Ok(());
        }
        for (org, policy) in seeds {
            let json = serde_json::to_string(policy).map_err(|e| corrupt(POLICIES, e))?;
            self.query::<()>(redis::cmd("HSETNX").arg(POLICIES).arg(org).arg(json))
                .await?;
        }
        Ok(())
    }

    async fn put_policy(&self, org: &str, policy: &OrgPolicy) -> Result<(), StoreError> {
        self.hset_json(POLICIES, org, policy).await
    }

    async fn delete_policy(&self, org: &str) -> Result<bool, StoreError> {
        let removed: u64 = self
            .query(redis::cmd("HDEL").arg(POLICIES).arg(org))
            .await?;
        Ok(removed > 0)
    }

    async fn publish(&self, event: &str) -> Result<(), StoreError> {
        self.query::<()>(redis::cmd("PUBLISH").arg(CHANNEL).arg(event))
            .await
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        let receiver = self.shared.events.subscribe();
        self.subscriber.call_once(|| self.start_subscriber());
        receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379/0"),
            Ok(RedisTarget::Standalone("redis://127.0.0.1:6379/0".into()))
        );
        assert_eq!(
            RedisTarget::parse("redis+sentinel://a:26379,b:26379/main"),
            Ok(RedisTarget::Sentinel {
                nodes: vec!["redis://a:26379".into(), "redis://b:26379".into()],
                master: "main".into()
            })
        );
        assert_eq!(
            RedisTarget::parse("redis+cluster://a:7000,b:7001"),
            Ok(RedisTarget::Cluster {
                nodes: vec!["redis://a:7000".into(), "redis://b:7001".into()]
            })
        );
        assert!(RedisTarget::parse("redis+sentinel://a:26379").is_err());
        assert!(RedisTarget::parse("http://x").is_err());
        assert!(RedisTarget::parse("localhost:6379").is_err());
    }
}
