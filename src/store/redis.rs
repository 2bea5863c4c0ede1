//! The cluster store: Redis, standalone, Sentinel or Cluster, with TLS and passwords as
//! `store.url` says (`redis_target.rs`), and optionally a replica in the node's region
//! (`store.read_url`): record reads (snapshot, holders, tags) and the event subscription go
//! there while it answers and holds the cluster's data (the `@seeded` marker: an empty,
//! unsynced server would make every org vanish), to the primary for a second after it
//! fails; writes, scripts and leases always go to the primary.
//!
//! Key schema (every command and every script touches one key, so Cluster needs no
//! cross-slot command):
//! - `regatta:holdings:{<digest>}` ZSET of facts about one digest: member
//!   `<repo>|<backend>|has` or `<repo>|<backend>|lacks`, score = when the fact expires (Unix
//!   ms). Each write is one script: it drops the opposite fact, adds this one, trims facts
//!   that have expired or expire later than any fact could, keeps at most
//!   [`MAX_FACTS_PER_DIGEST`] (those expiring soonest go first) and sets the key to expire
//!   with its last fact. So facts expire one by one and no key grows without bound.
//! - `regatta:tags:{<repo>}` HASH, field `<tag>` = JSON `TagRecord`; the key expires with
//!   the stale-tag TTL, refreshed on write (only tags an authority resolved are written).
//! - `regatta:admin` HASH, field `<backend>` = JSON `AdminState` (operator decisions, no
//!   TTL). A change is one script that reads, changes and writes the field, so concurrent
//!   changes through different nodes are all kept.
//! - `regatta:health` HASH, field `<region>/<backend>` = JSON `{record, expires_ms}`: one
//!   region's view of one backend (the region of the nodes that probe it).
//! - `regatta:policies` HASH, field `<org>` = JSON `OrgPolicy`; field `@seeded` marks that
//!   the configuration seeded it once (written by the same script as the seeds, after
//!   them, so a seeding that fails halfway is retried).
//! - `regatta:robots` HASH, field `<robot name>` = JSON `RobotRecord` (its secret only as a
//!   SHA-256); created with HSETNX, revoked with HDEL, no TTL (expiry is in the record).
//! - `regatta:lease:<name>` STRING = holder node, `PX` = lease length.
//! - channel `regatta:events`: change notices; any message makes nodes reload their snapshot.
//!   Standalone and Sentinel: PUBLISH/SUBSCRIBE. Cluster: sharded SPUBLISH/SSUBSCRIBE
//!   (Redis 7), on whichever shard owns the channel, followed when the slot moves.
//!
//! Every record read goes through [`RecordCheck`]: a malformed or implausible one is
//! skipped and counted, never an error for the whole read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Once};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, PushKind, Script};
use serde::Serialize;
use tokio::sync::{broadcast, oneshot};

use super::checked::{Expiring, Kind, RecordCheck};
use super::redis_target::{RedisTarget, Shape};
use super::{corrupt, AdminChange, Store, StoreError, EVENT_RESYNC};
use crate::model::{
    unix_ms, AdminState, HealthKey, HealthRecord, Holding, OrgPolicy, RegionalHealth, RobotRecord,
    TagRecord,
};
use crate::oci::{Digest, RepoName, Tag};

const CHANNEL: &str = "regatta:events";
const ADMIN: &str = "regatta:admin";
const HEALTH: &str = "regatta:health";
const POLICIES: &str = "regatta:policies";
const ROBOTS: &str = "regatta:robots";
/// The field of `regatta:policies` that marks it seeded (no org name starts with `@`).
const SEEDED_FIELD: &str = "@seeded";
/// Where versions before the `@seeded` field marked seeding.
const LEGACY_SEEDED: &str = "regatta:policies:seeded";
/// The most facts one digest keeps; past it, those expiring soonest are dropped.
pub const MAX_FACTS_PER_DIGEST: usize = 10_000;
/// Redis calls give up quickly: a node must never stall on its store.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pauses before an admin write is tried again. Admin writes are rare and idempotent (each
/// sets a value), and an operator's drain should not fail on one slow reply or a cluster
/// slot on the move: with three attempts of at most `RESPONSE_TIMEOUT` each, a dead store
/// is still reported within two seconds.
const ADMIN_RETRY_PAUSES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(300)];

/// KEYS[1] the digest's facts; ARGV: member to set, member to clear, its expiry, now, the
/// latest expiry a fact may have, the most facts kept (all times Unix ms).
static RECORD_HOLDING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key = KEYS[1]
local t = redis.call('TYPE', key)['ok']
if t ~= 'zset' and t ~= 'none' then redis.call('DEL', key) end
redis.call('ZREM', key, ARGV[2])
redis.call('ZADD', key, ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[4])
redis.call('ZREMRANGEBYSCORE', key, '(' .. ARGV[5], '+inf')
local extra = redis.call('ZCARD', key) - tonumber(ARGV[6])
if extra > 0 then redis.call('ZREMRANGEBYRANK', key, 0, extra - 1) end
local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if last[2] then
  redis.call('PEXPIREAT', key, string.format('%.0f', math.floor(tonumber(last[2]))))
end
return redis.call('ZCARD', key)
",
    )
});

/// KEYS[1] `regatta:admin`; ARGV: backend, `drained` or `weight`, the new value (`1`/`0`,
/// a weight, or empty for the configured weight). Returns the new state as JSON. A field
/// that is not a valid state is replaced, as is a key that is not a hash.
static UPDATE_ADMIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key = KEYS[1]
local t = redis.call('TYPE', key)['ok']
if t ~= 'hash' and t ~= 'none' then redis.call('DEL', key) end
local state = {drained = false}
local raw = redis.call('HGET', key, ARGV[1])
if raw then
  local ok, cur = pcall(cjson.decode, raw)
  if ok and type(cur) == 'table' then
    if type(cur.drained) == 'boolean' then state.drained = cur.drained end
    local w = cur.weight
    if type(w) == 'number' and w >= 0 and w <= 4294967295 and w % 1 == 0 then
      state.weight = w
    end
  end
end
if ARGV[2] == 'drained' then
  state.drained = (ARGV[3] == '1')
elseif ARGV[3] == '' then
  state.weight = nil
else
  state.weight = tonumber(ARGV[3])
end
local out = cjson.encode(state)
redis.call('HSET', key, ARGV[1], out)
return out
",
    )
});

/// KEYS[1] `regatta:policies`; ARGV: org, policy JSON, org, policy JSON, ... Writes each
/// org that is not there yet, then the marker, unless the marker is there already.
static SEED_POLICIES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key = KEYS[1]
local t = redis.call('TYPE', key)['ok']
if t ~= 'hash' and t ~= 'none' then redis.call('DEL', key) end
if redis.call('HEXISTS', key, '@seeded') == 1 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSETNX', key, ARGV[i], ARGV[i + 1]) end
redis.call('HSET', key, '@seeded', '1')
return 1
",
    )
});

/// KEYS[1] any key; deletes it and returns how many facts it held.
static PURGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key = KEYS[1]
local t = redis.call('TYPE', key)['ok']
local n = 0
if t == 'zset' then n = redis.call('ZCARD', key)
elseif t == 'hash' then n = redis.call('HLEN', key) end
redis.call('DEL', key)
return n
",
    )
});

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The store. Its connections live on a runtime of their own (one thread), so Redis I/O
/// never depends on a busy or blocked HTTP worker; calls hop there and back.
pub struct RedisStore {
    shared: Arc<Shared>,
    check: RecordCheck,
    runtime: tokio::runtime::Handle,
    shutdown: Option<oneshot::Sender<()>>,
    subscriber: Once,
}

struct Shared {
    /// `store.url`: every write, and reads while there is no replica to ask.
    primary: Endpoint,
    /// `store.read_url`: the replica in this node's region, asked for reads first.
    replica: Option<Replica>,
    events: broadcast::Sender<String>,
    errors: AtomicU64,
}

/// One Redis deployment and its (lazily made) connection.
struct Endpoint {
    target: RedisTarget,
    conn: ArcSwapOption<Conn>,
    connecting: tokio::sync::Mutex<()>,
}

struct Replica {
    endpoint: Endpoint,
    /// Until when (ms since `since`) reads skip the replica after it failed one.
    skip_until_ms: AtomicU64,
    /// Until when (ms since `since`) the replica counts as holding the cluster's data.
    synced_until_ms: AtomicU64,
    since: std::time::Instant,
}

/// How long reads go to the primary after the replica failed one, and how long a replica
/// found holding the cluster's data is trusted before it is asked again.
const REPLICA_BACKOFF: Duration = Duration::from_secs(1);

impl Replica {
    fn now_ms(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }

    fn usable(&self) -> bool {
        self.now_ms() >= self.skip_until_ms.load(Ordering::Relaxed)
    }

    fn failed(&self) {
        self.skip_for(REPLICA_BACKOFF);
    }

    fn skip_for(&self, pause: Duration) {
        let until = self.now_ms() + pause.as_millis() as u64;
        self.skip_until_ms.store(until, Ordering::Relaxed);
    }

    /// Whether the replica holds the cluster's data: the marker the one-time seeding
    /// writes. A replica still in its first sync, or a restarted server that is not yet
    /// following the primary, is empty: reading it would make every org vanish from the
    /// snapshot. Asked at most once per [`REPLICA_BACKOFF`] while the answer is yes.
    async fn synced(&self) -> bool {
        if self.now_ms() < self.synced_until_ms.load(Ordering::Relaxed) {
            return true;
        }
        let ask = redis::cmd("HEXISTS")
            .arg(POLICIES)
            .arg(SEEDED_FIELD)
            .clone();
        let marked = self
            .endpoint
            .exec(Request::Cmd(ask))
            .await
            .map(|v| i64::from_redis_value(v).unwrap_or(0));
        match marked {
            Ok(1) => {
                let until = self.now_ms() + REPLICA_BACKOFF.as_millis() as u64;
                self.synced_until_ms.store(until, Ordering::Relaxed);
                true
            }
            Ok(_) => {
                // Typically a sync about to finish: ask again soon.
                tracing::debug!("the replica holds no cluster data yet; reading at the primary");
                self.skip_for(REPLICA_BACKOFF / 5);
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "regional replica unreachable; reading at the primary");
                self.failed();
                false
            }
        }
    }
}

#[derive(Clone)]
enum Request {
    Cmd(Cmd),
    Pipe(redis::Pipeline),
    Script {
        script: &'static Script,
        key: String,
        args: Vec<Vec<u8>>,
    },
}

impl RedisStore {
    pub fn new(target: RedisTarget, check: RecordCheck) -> RedisStore {
        RedisStore::with_replica(target, None, check)
    }

    /// A store that writes to `target` and reads from `replica` (a server in this node's
    /// region) while it answers, from `target` when it does not.
    pub fn with_replica(
        target: RedisTarget,
        replica: Option<RedisTarget>,
        check: RecordCheck,
    ) -> RedisStore {
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
                primary: Endpoint::new(target),
                replica: replica.map(|target| Replica {
                    endpoint: Endpoint::new(target),
                    skip_until_ms: AtomicU64::new(0),
                    synced_until_ms: AtomicU64::new(0),
                    since: std::time::Instant::now(),
                }),
                events: broadcast::channel(256).0,
                errors: AtomicU64::new(0),
            }),
            check,
            runtime,
            shutdown: Some(shutdown),
            subscriber: Once::new(),
        }
    }

    fn cluster(&self) -> bool {
        self.shared.primary.target.shape == Shape::Cluster
    }

    /// Runs `request` on the store's runtime, returning Redis's own error.
    async fn exec_raw(&self, request: Request) -> redis::RedisResult<redis::Value> {
        self.on_runtime(request, false).await
    }

    /// Runs a read: at the replica when there is one that answers, else at the primary.
    async fn read_raw(&self, request: Request) -> redis::RedisResult<redis::Value> {
        self.on_runtime(request, true).await
    }

    async fn on_runtime(&self, request: Request, read: bool) -> redis::RedisResult<redis::Value> {
        let shared = self.shared.clone();
        let call = self.runtime.spawn(async move {
            if read {
                shared.read(request).await
            } else {
                shared.primary.exec(request).await
            }
        });
        let joined = tracing::Instrument::instrument(call, tracing::info_span!("redis")).await;
        joined.unwrap_or_else(|e| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "redis task failed",
                e.to_string(),
            )))
        })
    }

    fn failed(&self, e: redis::RedisError) -> StoreError {
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
        StoreError::Unavailable(e.to_string())
    }

    async fn exec(&self, request: Request) -> Result<redis::Value, StoreError> {
        self.exec_raw(request).await.map_err(|e| self.failed(e))
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let value = self.exec(Request::Cmd(cmd.clone())).await?;
        T::from_redis_value(value).map_err(|e| corrupt("reply", e))
    }

    async fn script<T: FromRedisValue>(
        &self,
        script: &'static Script,
        key: &str,
        args: Vec<Vec<u8>>,
    ) -> Result<T, StoreError> {
        let value = self
            .exec(Request::Script {
                script,
                key: key.to_owned(),
                args,
            })
            .await?;
        T::from_redis_value(value).map_err(|e| corrupt(key, e))
    }

    /// Runs an idempotent admin write, trying it again after a pause while the store is
    /// unavailable (see [`ADMIN_RETRY_PAUSES`]).
    async fn patiently<T, F, Fut>(&self, mut write: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        for pause in ADMIN_RETRY_PAUSES {
            match write().await {
                Err(StoreError::Unavailable(reason)) => {
                    tracing::debug!(%reason, ?pause, "admin write not answered; trying again");
                    tokio::time::sleep(pause).await;
                }
                done => return done,
            }
        }
        write().await
    }

    /// Every field of the hash `key` whose name is text. A key of another type is one
    /// invalid record of `kind` and reads as empty.
    async fn hash_fields(
        &self,
        key: &str,
        kind: Kind,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let reply = self
            .read_raw(Request::Cmd(redis::cmd("HGETALL").arg(key).clone()))
            .await;
        let value = match reply {
            Ok(v) => v,
            Err(e) if e.code() == Some("WRONGTYPE") => {
                self.check.reject(kind, key, b"", "the key is not a hash");
                return Ok(Vec::new());
            }
            Err(e) => return Err(self.failed(e)),
        };
        let raw: HashMap<Vec<u8>, Vec<u8>> =
            FromRedisValue::from_redis_value(value).map_err(|e| corrupt(key, e))?;
        Ok(raw
            .into_iter()
            .filter_map(|(field, value)| match String::from_utf8(field) {
                Ok(field) => Some((field, value)),
                Err(e) => {
                    let at = format!("{key}/{}", String::from_utf8_lossy(e.as_bytes()));
                    self.check
                        .reject(kind, &at, &value, "the field name is not text");
                    None
                }
            })
            .collect())
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

    /// Relays change events into the local channel, reconnecting with backoff; each
    /// (re)subscription is followed by a resync, so nothing missed while away stays missed.
    fn start_subscriber(&self) {
        let shared = self.shared.clone();
        self.runtime.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let started = std::time::Instant::now();
                let primary = &shared.primary.target;
                let replica = match primary.shape {
                    Shape::Cluster => None,
                    _ => shared.usable_replica().await,
                };
                let never = std::future::pending::<()>;
                let outcome = match (replica, &primary.shape) {
                    (_, Shape::Cluster) => subscribe_sharded(primary, &shared.events).await,
                    // Redis passes PUBLISH on to replicas: listen in this region, and at
                    // the primary while the replica cannot be reached or has not synced
                    // (moving back to the replica once it can be used).
                    (Some(replica), _) => {
                        let target = &replica.endpoint.target;
                        match subscribe_once(target, &shared.events, never()).await {
                            Ok(()) => Ok(()),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot subscribe at the replica; subscribing at the primary");
                                subscribe_once(primary, &shared.events, shared.replica_usable())
                                    .await
                            }
                        }
                    }
                    (None, _) if shared.replica.is_some() => {
                        subscribe_once(primary, &shared.events, shared.replica_usable()).await
                    }
                    (None, _) => subscribe_once(primary, &shared.events, never()).await,
                };
                match outcome {
                    Ok(()) => {
                        tracing::warn!("redis event subscription ended; reconnecting");
                        // A subscription that keeps ending at once backs off like a failure.
                        if started.elapsed() > Duration::from_secs(10) {
                            backoff = Duration::from_millis(100);
                        }
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
    /// The replica, when there is one that answered lately and holds the cluster's data.
    async fn usable_replica(&self) -> Option<&Replica> {
        let replica = self.replica.as_ref().filter(|r| r.usable())?;
        replica.synced().await.then_some(replica)
    }

    /// Resolves once the replica can be used again (checked every second).
    async fn replica_usable(&self) {
        loop {
            tokio::time::sleep(REPLICA_BACKOFF).await;
            if self.usable_replica().await.is_some() {
                tracing::info!("replica usable again; moving the event subscription there");
                return;
            }
        }
    }

    /// A read at the replica, falling back to the primary when the replica fails (a
    /// wrong-type answer is about the data, not the server, and is returned as it is).
    async fn read(&self, request: Request) -> redis::RedisResult<redis::Value> {
        if let Some(replica) = self.usable_replica().await {
            match replica.endpoint.exec(request.clone()).await {
                Err(e) if e.code() != Some("WRONGTYPE") => {
                    // At most once per REPLICA_BACKOFF: the replica is skipped meanwhile.
                    tracing::warn!(error = %e, "regional replica read failed; reading at the primary");
                    replica.failed();
                }
                answer => return answer,
            }
        }
        self.primary.exec(request).await
    }
}

impl Endpoint {
    fn new(target: RedisTarget) -> Endpoint {
        Endpoint {
            target,
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    async fn connect(target: &RedisTarget) -> redis::RedisResult<Conn> {
        match target.shape {
            Shape::Standalone { .. } => Ok(Conn::Single(
                target
                    .client()?
                    .get_connection_manager_lazy(manager_config())?,
            )),
            Shape::Sentinel { .. } => {
                let client = tokio::time::timeout(
                    CONNECT_TIMEOUT * 3,
                    target.sentinel()?.async_get_client(),
                )
                .await
                .map_err(|_| timed_out("asking the sentinels for the master"))??;
                Ok(Conn::Single(
                    client.get_connection_manager_lazy(manager_config())?,
                ))
            }
            Shape::Cluster => {
                let client = target
                    .cluster()?
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(1)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    async fn conn(&self) -> redis::RedisResult<Conn> {
        if let Some(conn) = self.conn.load_full() {
            return Ok((*conn).clone());
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(conn) = self.conn.load_full() {
            return Ok((*conn).clone());
        }
        let conn = Self::connect(&self.target).await?;
        self.conn.store(Some(Arc::new(conn.clone())));
        Ok(conn)
    }

    async fn exec(&self, request: Request) -> redis::RedisResult<redis::Value> {
        let conn = self.conn().await?;
        let result = match (conn, request) {
            (Conn::Single(mut c), Request::Cmd(cmd)) => cmd.query_async(&mut c).await,
            (Conn::Single(mut c), Request::Pipe(p)) => p.query_async(&mut c).await,
            (Conn::Cluster(mut c), Request::Cmd(cmd)) => cmd.query_async(&mut c).await,
            (Conn::Cluster(mut c), Request::Pipe(p)) => p.query_async(&mut c).await,
            (conn, Request::Script { script, key, args }) => {
                let mut call = script.key(key);
                for arg in args {
                    call.arg(arg);
                }
                match conn {
                    Conn::Single(mut c) => call.invoke_async(&mut c).await,
                    Conn::Cluster(mut c) => call.invoke_async(&mut c).await,
                }
            }
        };
        // Behind Sentinel the master moves: a lost connection or a write refused by what
        // is now a replica sends the next call back to the Sentinels.
        if let (Shape::Sentinel { .. }, Err(e)) = (&self.target.shape, &result) {
            if e.is_io_error() || e.is_connection_dropped() || e.code() == Some("READONLY") {
                self.conn.store(None);
            }
        }
        result
    }
}

fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "timed out", what.to_owned()))
}

/// Standalone and Sentinel: SUBSCRIBE on the (current) master.
/// Ends (`Ok`) when the connection does, or when `until` resolves.
async fn subscribe_once(
    target: &RedisTarget,
    events: &broadcast::Sender<String>,
    until: impl std::future::Future<Output = ()>,
) -> redis::RedisResult<()> {
    let client = match target.shape {
        Shape::Sentinel { .. } => {
            tokio::time::timeout(CONNECT_TIMEOUT * 3, target.sentinel()?.async_get_client())
                .await
                .map_err(|_| timed_out("asking the sentinels for the master"))??
        }
        _ => target.client()?,
    };
    let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| timed_out("connecting for events"))??;
    pubsub.subscribe(CHANNEL).await?;
    tracing::info!("subscribed to redis events");
    let _ = events.send(EVENT_RESYNC.to_owned());
    let mut messages = pubsub.into_on_message();
    tokio::pin!(until);
    loop {
        tokio::select! {
            msg = messages.next() => match msg {
                Some(msg) => {
                    if let Ok(payload) = msg.get_payload::<String>() {
                        let _ = events.send(payload);
                    }
                }
                None => return Ok(()),
            },
            () = &mut until => return Ok(()),
        }
    }
}

/// Cluster: SSUBSCRIBE through a cluster connection of its own (RESP3), which finds the
/// shard that owns the channel from any listed node and follows the slot when it moves.
/// Every (re)subscription confirmed is followed by a resync.
async fn subscribe_sharded(
    target: &RedisTarget,
    events: &broadcast::Sender<String>,
) -> redis::RedisResult<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = target
        .cluster()?
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(tx)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .build()?;
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT * 3, client.get_async_connection())
        .await
        .map_err(|_| timed_out("connecting to the cluster for events"))??;
    tokio::time::timeout(CONNECT_TIMEOUT * 3, conn.ssubscribe(CHANNEL))
        .await
        .map_err(|_| timed_out("subscribing to events"))??;
    tracing::info!("subscribed to redis events (sharded)");
    while let Some(push) = rx.recv().await {
        match push.kind {
            PushKind::SSubscribe => {
                let _ = events.send(EVENT_RESYNC.to_owned());
            }
            PushKind::SMessage => {
                if let Some(payload) = push
                    .data
                    .get(1)
                    .and_then(|v| String::from_redis_value(v.clone()).ok())
                {
                    let _ = events.send(payload);
                }
            }
            // The server drops a sharded subscription when its slot moves, and a node may
            // go for good (a failover): start over from a fresh view of the cluster.
            PushKind::SUnsubscribe | PushKind::Disconnection => break,
            _ => {}
        }
    }
    drop(conn);
    Ok(())
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(2))
}

fn holdings_key(digest: &Digest) -> String {
    format!("regatta:holdings:{{{digest}}}")
}

fn tags_key(repo: &RepoName) -> String {
    format!("regatta:tags:{{{repo}}}")
}

fn fact(repo: &RepoName, backend: &str, holding: Holding) -> String {
    let what = match holding {
        Holding::Has => "has",
        _ => "lacks",
    };
    format!("{repo}|{backend}|{what}")
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
        if backends.is_empty() {
            return Ok(Vec::new());
        }
        let key = holdings_key(digest);
        let mut cmd = redis::cmd("ZMSCORE");
        cmd.arg(&key);
        for b in backends {
            cmd.arg(fact(repo, b, Holding::Has))
                .arg(fact(repo, b, Holding::Lacks));
        }
        let scores: Vec<Option<f64>> = match self.read_raw(Request::Cmd(cmd)).await {
            Ok(v) => FromRedisValue::from_redis_value(v).map_err(|e| corrupt(&key, e))?,
            Err(e) if e.code() == Some("WRONGTYPE") => {
                self.check
                    .reject(Kind::Holder, &key, b"", "the key is not a sorted set");
                vec![None; backends.len() * 2]
            }
            Err(e) => return Err(self.failed(e)),
        };
        let now = now_ms();
        Ok(backends
            .iter()
            .zip(scores.chunks(2))
            .map(|(b, pair)| {
                let fresh = |score: Option<f64>, holding: Holding| {
                    score.is_some_and(|s| {
                        let member = fact(repo, b, holding);
                        self.check
                            .holder_until(&key, &member, holding == Holding::Lacks, s, now)
                            == Some(true)
                    })
                };
                let has = fresh(pair.first().copied().flatten(), Holding::Has);
                let lacks = fresh(pair.get(1).copied().flatten(), Holding::Lacks);
                match (has, lacks) {
                    (true, false) => Holding::Has,
                    (false, true) => Holding::Lacks,
                    (true, true) => {
                        // One write replaces the other: both at once is not our writing.
                        let member = format!("{repo}|{b}");
                        self.check.reject(
                            Kind::Holder,
                            &format!("{key}/{member}"),
                            b"has+lacks",
                            "holds and lacks at once",
                        );
                        Holding::Unknown
                    }
                    (false, false) => Holding::Unknown,
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
        let clear = match holding {
            Holding::Has => Holding::Lacks,
            Holding::Lacks => Holding::Has,
            Holding::Unknown => return Ok(()),
        };
        let now = now_ms();
        let until = now.saturating_add(ttl.as_millis().max(1) as u64);
        let latest = now.saturating_add(self.check.longest_holder_fact().as_millis() as u64);
        let args = vec![
            fact(repo, backend, holding).into_bytes(),
            fact(repo, backend, clear).into_bytes(),
            until.to_string().into_bytes(),
            now.to_string().into_bytes(),
            latest.to_string().into_bytes(),
            MAX_FACTS_PER_DIGEST.to_string().into_bytes(),
        ];
        self.script::<u64>(&RECORD_HOLDING, &holdings_key(digest), args)
            .await
            .map(|_| ())
    }

    async fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<TagRecord>, StoreError> {
        let key = tags_key(repo);
        let reply = self
            .read_raw(Request::Cmd(
                redis::cmd("HGET").arg(&key).arg(tag.as_str()).clone(),
            ))
            .await;
        let raw: Option<Vec<u8>> = match reply {
            Ok(v) => FromRedisValue::from_redis_value(v).map_err(|e| corrupt(&key, e))?,
            Err(e) if e.code() == Some("WRONGTYPE") => {
                self.check
                    .reject(Kind::Tag, &key, b"", "the key is not a hash");
                None
            }
            Err(e) => return Err(self.failed(e)),
        };
        Ok(raw.and_then(|raw| self.check.tag(&key, tag.as_str(), &raw, now_ms())))
    }

    async fn record_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let key = tags_key(repo);
        let json = serde_json::to_string(record).map_err(|e| corrupt(&key, e))?;
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&key)
            .arg(tag.as_str())
            .arg(json)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(keep.as_secs().max(1))
            .ignore();
        self.exec(Request::Pipe(pipe)).await.map(|_| ())
    }

    async fn purge(
        &self,
        digest: Option<&Digest>,
        tags_of: Option<&RepoName>,
    ) -> Result<u64, StoreError> {
        let mut gone = 0u64;
        if let Some(digest) = digest {
            gone += self
                .script::<u64>(&PURGE, &holdings_key(digest), Vec::new())
                .await?;
        }
        if let Some(repo) = tags_of {
            gone += self
                .script::<u64>(&PURGE, &tags_key(repo), Vec::new())
                .await?;
        }
        Ok(gone)
    }

    async fn admin_states(&self) -> Result<HashMap<String, AdminState>, StoreError> {
        Ok(self
            .hash_fields(ADMIN, Kind::Admin)
            .await?
            .into_iter()
            .filter_map(|(id, raw)| Some((id.clone(), self.check.admin(ADMIN, &id, &raw)?)))
            .collect())
    }

    async fn update_admin_state(
        &self,
        backend: &str,
        change: AdminChange,
    ) -> Result<AdminState, StoreError> {
        let (field, value) = match change {
            AdminChange::Drained(d) => ("drained", if d { "1" } else { "0" }.to_owned()),
            AdminChange::Weight(w) => ("weight", w.map(|w| w.to_string()).unwrap_or_default()),
        };
        let args = vec![
            backend.as_bytes().to_vec(),
            field.as_bytes().to_vec(),
            value.into_bytes(),
        ];
        let json: String = self
            .patiently(|| self.script(&UPDATE_ADMIN, ADMIN, args.clone()))
            .await?;
        serde_json::from_str(&json).map_err(|e| corrupt(ADMIN, e))
    }

    async fn health(&self) -> Result<RegionalHealth, StoreError> {
        let now = now_ms();
        Ok(self
            .hash_fields(HEALTH, Kind::Health)
            .await?
            .into_iter()
            .filter_map(|(field, raw)| self.check.health(HEALTH, &field, &raw, now))
            .collect())
    }

    async fn set_health(
        &self,
        key: &HealthKey,
        record: &HealthRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let value = Expiring {
            record,
            expires_ms: now_ms() + ttl.as_millis() as u64,
        };
        let field = format!("{}/{}", key.region, key.backend);
        self.hset_json(HEALTH, &field, &value).await
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
        Ok(self
            .hash_fields(POLICIES, Kind::Policy)
            .await?
            .into_iter()
            .filter(|(org, _)| org != SEEDED_FIELD)
            .filter_map(|(org, raw)| Some((org.clone(), self.check.policy(POLICIES, &org, &raw)?)))
            .collect())
    }

    async fn seed_policies(&self, seeds: &[(String, OrgPolicy)]) -> Result<(), StoreError> {
        // A store seeded by an older version keeps what the admin API made of it.
        let legacy: Option<String> = self.query(redis::cmd("GET").arg(LEGACY_SEEDED)).await?;
        let mut args = Vec::new();
        if legacy.is_none() {
            for (org, policy) in seeds {
                args.push(org.clone().into_bytes());
                args.push(serde_json::to_vec(policy).map_err(|e| corrupt(POLICIES, e))?);
            }
        }
        let first: u64 = self.script(&SEED_POLICIES, POLICIES, args).await?;
        if first == 1 {
            tracing::info!(
                orgs = seeds.len(),
                "seeded org policies from the configuration"
            );
        }
        Ok(())
    }

    async fn put_policy(&self, org: &str, policy: &OrgPolicy) -> Result<(), StoreError> {
        self.patiently(|| self.hset_json(POLICIES, org, policy))
            .await
    }

    async fn delete_policy(&self, org: &str) -> Result<bool, StoreError> {
        if org == SEEDED_FIELD {
            return Ok(false);
        }
        let removed: u64 = self
            .query(redis::cmd("HDEL").arg(POLICIES).arg(org))
            .await?;
        Ok(removed > 0)
    }

    async fn robots(&self) -> Result<HashMap<String, RobotRecord>, StoreError> {
        Ok(self
            .hash_fields(ROBOTS, Kind::Robot)
            .await?
            .into_iter()
            .filter_map(|(name, raw)| Some((name.clone(), self.check.robot(ROBOTS, &name, &raw)?)))
            .collect())
    }

    async fn create_robot(&self, record: &RobotRecord) -> Result<bool, StoreError> {
        let json = serde_json::to_string(record).map_err(|e| corrupt(ROBOTS, e))?;
        let created: u64 = self
            .query(redis::cmd("HSETNX").arg(ROBOTS).arg(&record.name).arg(json))
            .await?;
        Ok(created == 1)
    }

    async fn delete_robot(&self, name: &str) -> Result<bool, StoreError> {
        let removed: u64 = self.query(redis::cmd("HDEL").arg(ROBOTS).arg(name)).await?;
        Ok(removed > 0)
    }

    async fn publish(&self, event: &str) -> Result<(), StoreError> {
        let command = if self.cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let publish = redis::cmd(command).arg(CHANNEL).arg(event).clone();
        self.patiently(|| self.query::<()>(&publish)).await
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        let receiver = self.shared.events.subscribe();
        self.subscriber.call_once(|| self.start_subscriber());
        receiver
    }
}
