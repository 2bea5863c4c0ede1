//! The shared store against real Redis: holder facts that expire one by one and stay
//! bounded, records that cannot poison a node, seeding and admin changes that are atomic,
//! change events on every Cluster shard, and Redis over TLS with passwords (standalone,
//! Sentinel, Cluster).

use std::process::Command;
use std::time::{Duration, Instant};

use awc::http::Method;
use futures_util::future::join_all;
use prometheus::{IntCounterVec, Opts};
use regatta::model::{unix_ms, Holding};
use regatta::oci::{Digest, RepoName};
use regatta::store::{
    RecordCheck, RecordLimits, RedisStore, RedisTarget, Store, MAX_FACTS_PER_DIGEST,
};
use serde_json::json;

use crate::cluster::{two_holders, two_nodes_agree_through};
use crate::helpers::{eventually, metric, spawn_app, Config, TestApp};
use crate::procs::run;
use crate::redis_server::{Redis, RedisCluster, RedisSentinel, Secured};

/// A backend URL nothing listens on: for tests about admin state, not about pulls.
const NOWHERE: &str = "http://127.0.0.1:9";

fn now_ms() -> u64 {
    unix_ms(std::time::SystemTime::now())
}

fn digest(fill: char) -> Digest {
    Digest::parse(&format!("sha256:{}", fill.to_string().repeat(64))).unwrap()
}

/// How many records of `kind` the node has skipped as invalid.
async fn invalid(node: &TestApp, kind: &str) -> f64 {
    metric(
        &node.metrics().await,
        "regatta_store_invalid_records_total",
        &[("kind", kind)],
    )
    .unwrap_or_else(|| panic!("no regatta_store_invalid_records_total{{kind=\"{kind}\"}}"))
}

/// A node whose backends answer nothing, with an admin listener; snapshots change only
/// through events (no periodic reload, no probes after the first).
fn admin_only(url: &str, ids: &[&str]) -> Config {
    let mut config = Config::new()
        .redis(url)
        .admin()
        .health("1h", 3)
        .refresh("1h");
    for id in ids {
        config = config.backend_at(id, NOWHERE, "direct", "eu");
    }
    config.org("acme", ids, "30s", &[])
}

async fn backend_view(node: &TestApp, id: &str) -> serde_json::Value {
    node.admin(Method::GET, &format!("/admin/v1/backends/{id}"), None)
        .await
        .json()
}

/// Records `fact` (backend, holding, TTL) about `digest` in `count` repositories
/// `<prefix>-<i>`, 100 writes at a time. The store gives up on a reply after 500 ms; on a
/// loaded machine a write is tried again (writing a fact twice is the same as once), since
/// what these tests check is what the facts become, not how fast Redis answered.
async fn record_per_repository(
    store: &RedisStore,
    digest: &Digest,
    prefix: &str,
    count: usize,
    (backend, holding, ttl): (&str, Holding, Duration),
) {
    for chunk in (0..count).collect::<Vec<_>>().chunks(100) {
        join_all(chunk.iter().map(|i| async move {
            let repo = RepoName::parse(&format!("{prefix}-{i}")).unwrap();
            let mut tries = 0;
            while let Err(e) = store
                .record_holding(&repo, digest, backend, holding, ttl)
                .await
            {
                tries += 1;
                assert!(
                    tries < 5,
                    "recording a fact in {repo} failed {tries} times: {e}"
                );
            }
        }))
        .await;
    }
}

#[actix_web::test]
async fn holder_facts_expire_one_by_one_and_a_digest_keeps_a_bounded_number() {
    let redis = Redis::start();
    let counter = IntCounterVec::new(Opts::new("invalid", "invalid"), &["kind"]).unwrap();
    let limits = RecordLimits {
        backends: vec!["a".into(), "b".into()],
        holder_ttl: Duration::from_secs(3600),
        lacks_ttl: Duration::from_secs(30),
        health_ttl: Duration::from_secs(60),
    };
    let store = RedisStore::new(
        RedisTarget::parse(&redis.url()).unwrap(),
        RecordCheck::new(limits, &counter),
    );
    let store = &store;
    let hot = &digest('1');
    let key = format!("regatta:holdings:{{{hot}}}");
    let zcard = |key: &str| redis.query::<u64>(redis::cmd("ZCARD").arg(key));
    let app = RepoName::parse("acme/app").unwrap();
    let hour = Duration::from_secs(3600);
    store
        .record_holding(&app, hot, "a", Holding::Has, hour)
        .await
        .unwrap();

    // A scanner asks for 2,000 invented repositories: each leaves a "lacks" fact.
    let lacks_ttl = Duration::from_millis(500);
    let written = Instant::now();
    let fact = ("b", Holding::Lacks, lacks_ttl);
    record_per_repository(store, hot, "acme/random", 2000, fact).await;
    let while_fresh = zcard(&key);
    let keys: u64 = redis.query(&redis::cmd("DBSIZE"));
    assert_eq!(keys, 1, "one key per digest, not one per fact");
    assert!(while_fresh > 1, "the lacks facts were written");
    let random = RepoName::parse("acme/random-7").unwrap();
    // The fact was written after `written`: a read that ended before `written + lacks_ttl`
    // must still see it (under load the read may end later, and then proves nothing).
    let read = store.holdings(&random, hot, &["a", "b"]).await.unwrap();
    if written.elapsed() < lacks_ttl {
        assert_eq!(read, [Holding::Unknown, Holding::Lacks]);
    }

    // Once they expire, the digest's next write sweeps them out: the key shrinks back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        store
            .record_holding(&app, hot, "a", Holding::Has, hour)
            .await
            .unwrap();
        let now = zcard(&key);
        if now == 1 {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "{now} facts still kept after the lacks TTL"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        store.holdings(&app, hot, &["a", "b"]).await.unwrap(),
        [Holding::Has, Holding::Unknown],
        "the long-lived fact stays"
    );
    assert_eq!(
        store.holdings(&random, hot, &["a", "b"]).await.unwrap(),
        [Holding::Unknown, Holding::Unknown],
        "an expired fact reads as unknown"
    );
    let pttl: i64 = redis.query(redis::cmd("PTTL").arg(&key));
    assert!(
        pttl > 0 && pttl <= hour.as_millis() as i64,
        "the key expires with its last fact: {pttl} ms"
    );

    // However many repositories truly hold one digest, its key keeps a bounded number.
    let shared = &digest('2');
    let shared_key = format!("regatta:holdings:{{{shared}}}");
    let many = MAX_FACTS_PER_DIGEST + 500;
    record_per_repository(store, shared, "acme/image", many, ("a", Holding::Has, hour)).await;
    let capped = zcard(&shared_key) as usize;
    assert_eq!(capped, MAX_FACTS_PER_DIGEST);
    println!(
        "holder facts of one digest: {while_fresh} while 2,000 lacks facts were fresh, \
         {after} after they expired; {capped} kept of {many} holders"
    );
    assert_eq!(
        counter.with_label_values(&["holder"]).get(),
        0,
        "nothing the store wrote itself counts as invalid"
    );
}

#[actix_web::test]
async fn garbage_in_shared_state_is_skipped_counted_and_never_blocks_the_cluster() {
    let redis = Redis::start();
    let work = tempfile::tempdir().unwrap();
    let (a, b, image) = two_holders(work.path(), "garbage", 2, 1024);
    let config = Config::new()
        .redis(&redis.url())
        .admin()
        .refresh("200ms")
        .backend("a", &a, "direct")
        .backend("b", &b, "direct")
        .org("acme", &["a", "b"], "30s", &[]);
    let n1 = spawn_app(&config).await;
    let n2 = spawn_app(&config).await;
    for kind in ["admin", "health", "policy", "tag", "holder"] {
        assert_eq!(invalid(&n2, kind).await, 0.0, "{kind} counts from 0");
    }
    // n1 learns the tag and the holders, and writes them to the store.
    let pulled = crate::clients::skopeo_pull(
        &format!("{}/acme/app:1.0", n1.host()),
        &work.path().join("first"),
    );
    assert_eq!(pulled.top, image.index.digest);

    // Then someone writes garbage into everything the nodes read.
    let now = now_ms();
    let hset = |key: &str, field: &[u8], value: &[u8]| {
        redis.query::<()>(redis::cmd("HSET").arg(key).arg(field).arg(value));
    };
    hset("regatta:admin", b"b", br#"{"drained":"yes"}"#);
    hset("regatta:admin", b"ghost", br#"{"drained":true}"#);
    hset("regatta:admin", b"\xff\xfe", b"x");
    hset("regatta:health", b"eu/a", b"not json");
    let future_probe = json!({"record": {"state": "down", "latency_us": 1, "ok_streak": 0,
        "fail_streak": 9, "checked_at_ms": now + 3_600_000, "node": "evil"},
        "expires_ms": now + 7_200_000});
    hset(
        "regatta:health",
        b"eu/b",
        future_probe.to_string().as_bytes(),
    );
    hset("regatta:policies", b"zeta", br#"{"backends":["ghost"]}"#);
    hset("regatta:policies", b"broken", b"{");
    let layer = &image.platform("amd64").layers[0].digest;
    let forged_tag = json!({"digest": layer, "media_type": "text/html\r\nX-Evil: 1",
        "size": 5, "backend": "a", "resolved_at_ms": now + 86_400_000});
    hset(
        "regatta:tags:{acme/app}",
        b"1.0",
        forged_tag.to_string().as_bytes(),
    );
    let holdings = format!("regatta:holdings:{{{layer}}}");
    redis.query::<()>(redis::cmd("DEL").arg(&holdings));
    redis.query::<()>(
        redis::cmd("ZADD")
            .arg(&holdings)
            .arg("+inf")
            .arg("acme/app|a|has")
            .arg(now + 10_000)
            .arg("acme/app|b|has")
            .arg(now + 10_000)
            .arg("acme/app|b|lacks"),
    );

    // n2 has learned nothing yet: it reads the forged holder facts and the forged tag.
    let chosen = n2.blob_backend("acme/app", layer).await;
    assert!(chosen == "a" || chosen == "b", "{chosen}");
    let by_tag = n2.get("/v2/acme/app/manifests/1.0").await;
    assert_eq!(by_tag.status, 200);
    assert_eq!(
        by_tag.header("docker-content-digest"),
        Some(image.index.digest.as_str()),
        "the tag was resolved at its authority, not taken from the forged record"
    );
    for node in [&n1, &n2] {
        for kind in ["admin", "health", "policy"] {
            eventually(
                &format!("node {} to count an invalid {kind} record", node.port),
                Duration::from_secs(10),
                || async { invalid(node, kind).await > 0.0 },
            )
            .await;
        }
    }
    assert!(invalid(&n2, "tag").await >= 1.0);
    assert!(
        invalid(&n2, "holder").await >= 2.0,
        "a forged expiry and has+lacks"
    );

    // The cluster keeps serving,
    let pulled = crate::clients::skopeo_pull(
        &format!("{}/acme/app:1.0", n2.host()),
        &work.path().join("second"),
    );
    assert_eq!(pulled.top, image.index.digest);
    assert_eq!(pulled.blobs, image.all_digests());
    // drains work (b's own record was garbage: the drain replaces it),
    let drained = n1
        .admin(Method::POST, "/admin/v1/backends/b/drain", None)
        .await;
    assert_eq!(
        drained.status,
        200,
        "{}",
        String::from_utf8_lossy(&drained.body)
    );
    for node in [&n1, &n2] {
        eventually(
            "b to be drained everywhere",
            Duration::from_secs(10),
            || async {
                backend_view(node, "b").await["drained"] == true
                    && node.blob_backend("acme/app", layer).await == "a"
            },
        )
        .await;
    }
    let repaired: String = redis.query(redis::cmd("HGET").arg("regatta:admin").arg("b"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&repaired).unwrap(),
        json!({"drained": true})
    );
    // and a new org is served by every node.
    let put = n1
        .admin(
            Method::PUT,
            "/admin/v1/orgs/beta",
            Some(json!({"backends": ["a", "b"]})),
        )
        .await;
    assert_eq!(put.status, 200, "{}", String::from_utf8_lossy(&put.body));
    eventually("n2 to serve beta", Duration::from_secs(10), || async {
        n2.get("/v2/beta/app/manifests/1.0").await.error_code() == "MANIFEST_UNKNOWN"
    })
    .await;
    assert_eq!(
        n2.get("/v2/zeta/app/manifests/1.0").await.error_code(),
        "DENIED",
        "an org no node can serve stays unknown"
    );
}

#[actix_web::test]
async fn seeding_writes_the_policies_and_its_mark_in_one_step() {
    let redis = Redis::start();
    // A key of the wrong type where the policies go: the write of the policies fails
    // where the older code had already set its "seeded" mark for good.
    redis.query::<()>(redis::cmd("SET").arg("regatta:policies").arg("garbage"));
    let config = admin_only(&redis.url(), &["a"]);
    let n1 = spawn_app(&config).await;
    // Until seeded, the key is not a hash: read without panicking.
    let seeded = || -> std::collections::HashMap<String, String> {
        let mut conn = redis.client().get_connection().unwrap();
        redis::cmd("HGETALL")
            .arg("regatta:policies")
            .query(&mut conn)
            .unwrap_or_default()
    };
    crate::procs::wait_until("the policies and the mark", Duration::from_secs(10), || {
        let hash = seeded();
        hash.contains_key("acme") && hash.get("@seeded").map(String::as_str) == Some("1")
    });
    let listed = n1.admin(Method::GET, "/admin/v1/orgs", None).await.json();
    assert_eq!(listed["orgs"][0]["name"], "acme", "{listed}");

    // Seeding happens once in the store's life: an org the admin deleted stays deleted
    // when another node boots with the same configuration.
    let deleted = n1.admin(Method::DELETE, "/admin/v1/orgs/acme", None).await;
    assert_eq!(deleted.status, 204);
    let n2 = spawn_app(&config).await;
    eventually(
        "n2 to take the store's policies over its configuration",
        Duration::from_secs(10),
        || async { n2.get("/v2/acme/app/manifests/1.0").await.error_code() == "DENIED" },
    )
    .await;
    assert!(!seeded().contains_key("acme"));
}

#[actix_web::test]
async fn concurrent_admin_changes_through_two_nodes_are_all_kept() {
    let redis = Redis::start();
    let ids: Vec<String> = (0..16).map(|i| format!("b{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let config = admin_only(&redis.url(), &ids);
    let n1 = spawn_app(&config).await;
    let n2 = spawn_app(&config).await;
    let expected =
        |round: usize, i: usize| json!({"drained": round % 2 == 0, "weight": round * 100 + i});
    let rounds = 10;
    let mut lost = Vec::new();
    for round in 0..rounds {
        // Every backend at once: n1 flips its drain while n2 sets its weight.
        let action = if round % 2 == 0 { "drain" } else { "undrain" };
        let mut calls = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (n1, n2) = (&n1, &n2);
            calls.push(Box::pin(async move {
                n1.admin(
                    Method::POST,
                    &format!("/admin/v1/backends/{id}/{action}"),
                    None,
                )
                .await
            })
                as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>);
            calls.push(Box::pin(async move {
                n2.admin(
                    Method::PUT,
                    &format!("/admin/v1/backends/{id}/weight"),
                    Some(json!({"weight": round * 100 + i})),
                )
                .await
            }));
        }
        for answer in join_all(calls).await {
            assert_eq!(
                answer.status,
                200,
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
        }
        let stored: std::collections::HashMap<String, String> =
            redis.query(redis::cmd("HGETALL").arg("regatta:admin"));
        for (i, id) in ids.iter().enumerate() {
            let got: serde_json::Value = serde_json::from_str(&stored[*id]).unwrap();
            if got != expected(round, i) {
                lost.push(format!(
                    "round {round}: {id} is {got}, not {}",
                    expected(round, i)
                ));
            }
        }
    }
    assert!(lost.is_empty(), "changes lost:\n{}", lost.join("\n"));
    for (i, id) in ids.iter().enumerate() {
        let want = expected(rounds - 1, i);
        for node in [&n1, &n2] {
            eventually(
                &format!("node {} to show {id} as {want}", node.port),
                Duration::from_secs(10),
                || async {
                    let view = backend_view(node, id).await;
                    view["drained"] == want["drained"] && view["weight"] == want["weight"]
                },
            )
            .await;
        }
    }
}

#[actix_web::test]
async fn change_events_reach_every_node_whichever_shard_owns_them() {
    let cluster = RedisCluster::start();
    let ports = cluster.ports.clone();
    let channel = cluster.slot("regatta:events");
    // n1 knows one master only; n2's list starts with an address nothing answers on, and
    // neither is told which master owns the channel.
    let dead = crate::procs::free_port();
    let n1 = spawn_app(&admin_only(&cluster.url_naming(&ports[..1]), &["a", "b"])).await;
    let n2 = spawn_app(&admin_only(
        &cluster.url_naming(&[dead, ports[2]]),
        &["a", "b"],
    ))
    .await;
    for (round, &owner) in ports.iter().enumerate() {
        if cluster.owner(channel) != owner {
            cluster.move_slot(channel, owner);
        }
        let drain = round % 2 == 0;
        let action = if drain { "drain" } else { "undrain" };
        let answer = n1
            .admin(
                Method::POST,
                &format!("/admin/v1/backends/a/{action}"),
                None,
            )
            .await;
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        eventually(
            &format!("n2 to hear the {action} with the channel on port {owner}"),
            Duration::from_secs(15),
            || async { backend_view(&n2, "a").await["drained"] == drain },
        )
        .await;
        let weight = 10 + round;
        let answer = n2
            .admin(
                Method::PUT,
                "/admin/v1/backends/b/weight",
                Some(json!({ "weight": weight })),
            )
            .await;
        assert_eq!(answer.status, 200);
        eventually(
            &format!("n1 to hear weight {weight} with the channel on port {owner}"),
            Duration::from_secs(15),
            || async { backend_view(&n1, "b").await["weight"] == weight },
        )
        .await;
    }
}

#[actix_web::test]
async fn nodes_agree_through_redis_over_tls_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let secured = Secured::new(dir.path(), "tls-store-password");
    let redis = Redis::start_secured(&secured);
    // The server really insists on both: no password, no entry; no TLS, no answer.
    let refused = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{}", redis.port),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&secured.ca).unwrap()),
        },
    )
    .unwrap()
    .get_connection()
    .and_then(|mut c| redis::cmd("SET").arg("k").arg("v").query::<()>(&mut c));
    assert!(
        refused.is_err_and(|e| e.to_string().contains("NOAUTH")),
        "an unauthenticated client is refused"
    );
    let plain = redis::Client::open(format!(
        "redis://:tls-store-password@127.0.0.1:{}",
        redis.port
    ))
    .unwrap()
    .get_connection_with_timeout(Duration::from_secs(2))
    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
    assert!(plain.is_err(), "plain text is refused");

    let ca = secured.ca.to_str().unwrap();
    two_nodes_agree_through(&redis.url(), &[("tls_ca", ca)], "redis-tls").await;
    let seeded: u64 = redis.query(redis::cmd("HLEN").arg("regatta:policies"));
    assert!(seeded >= 2, "the nodes wrote their policies over TLS");

    // Without the CA the node does not trust the server's certificate: every store call
    // fails, and is counted.
    let untrusting = spawn_app(&admin_only(&redis.url(), &["a"])).await;
    eventually(
        "store errors to be counted",
        Duration::from_secs(10),
        || async {
            metric(
                &untrusting.metrics().await,
                "regatta_store_errors_total",
                &[],
            )
            .is_some_and(|n| n > 0.0)
        },
    )
    .await;
}

#[actix_web::test]
async fn nodes_agree_through_a_tls_sentinel_with_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let secured = Secured::new(dir.path(), "master-password");
    let sentinel = RedisSentinel::start_secured(&secured, "sentinel-password");
    let ca = secured.ca.to_str().unwrap();
    two_nodes_agree_through(
        &sentinel.url(),
        &[("tls_ca", ca), ("sentinel_password", "sentinel-password")],
        "redis-tls-sentinel",
    )
    .await;
    assert!(
        sentinel.master.commands_processed() > 0,
        "the master behind the sentinel was used"
    );
}

#[actix_web::test]
async fn a_node_follows_its_master_through_a_sentinel_failover() {
    let sentinel = RedisSentinel::start_with_replica();
    let node = spawn_app(&admin_only(&sentinel.url(), &["a", "b"])).await;
    let drain = |id: &'static str| {
        let node = &node;
        async move {
            node.admin(
                Method::POST,
                &format!("/admin/v1/backends/{id}/drain"),
                None,
            )
            .await
            .status
        }
    };
    assert_eq!(drain("a").await, 200);
    let master = sentinel.fail_over();
    // The node's connection still reaches the old master, now a replica that refuses
    // writes: a change may be refused (503, nothing changed) until the node has asked the
    // Sentinel again.
    eventually(
        "a drain to be taken by the new master",
        Duration::from_secs(20),
        || async { drain("b").await == 200 },
    )
    .await;
    let stored: std::collections::HashMap<String, String> =
        master.query(redis::cmd("HGETALL").arg("regatta:admin"));
    for id in ["a", "b"] {
        let state: serde_json::Value = serde_json::from_str(&stored[id]).unwrap();
        assert_eq!(state["drained"], true, "{id} on the new master: {stored:?}");
    }
    assert_eq!(backend_view(&node, "b").await["drained"], true);
}

#[actix_web::test]
async fn nodes_agree_through_a_tls_cluster_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let secured = Secured::new(dir.path(), "cluster-password");
    let cluster = RedisCluster::start_secured(&secured);
    let ca = secured.ca.to_str().unwrap();
    two_nodes_agree_through(&cluster.url(), &[("tls_ca", ca)], "redis-tls-cluster").await;
}

#[test]
fn redis_passwords_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let check = |store: &str| {
        let path = dir.path().join("regatta.toml");
        std::fs::write(
            &path,
            format!("[server]\nlisten = \"127.0.0.1:0\"\n[store]\ntype = \"redis\"\n{store}"),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
        cmd.arg("check-config").arg(&path);
        let out = run(cmd, Duration::from_secs(30));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains("hunter2"), "a password was printed:\n{text}");
        (out.status.success(), text)
    };
    let (ok, text) = check("url = \"redis://:hunter2@127.0.0.1:notaport\"\n");
    assert!(
        !ok && text.contains("store.url") && text.contains(":***@"),
        "{text}"
    );
    let (ok, text) =
        check("url = \"rediss://:hunter2@127.0.0.1\"\ntls_ca = \"/nonexistent.pem\"\n");
    assert!(!ok && text.contains("store.tls_ca"), "{text}");
    let (ok, text) =
        check("url = \"redis://:hunter2@127.0.0.1\"\nsentinel_password = \"hunter2\"\n");
    assert!(!ok && text.contains("store.sentinel_password"), "{text}");
    let (cert, _key) = crate::procs::self_signed_cert(dir.path(), "127.0.0.1");
    let (ok, text) = check(&format!(
        "url = \"rediss+sentinel://:hunter2@127.0.0.1:26379/main\"\ntls_ca = {:?}\nsentinel_password = \"s\"\n",
        cert.display().to_string()
    ));
    assert!(ok, "a TLS Sentinel configuration is accepted:\n{text}");
}
