//! Several nodes sharing one real Redis: drains reach every node, a dead backend is
//! failed over, a Redis outage is survived and converged from, regions are preferred.

use std::time::Duration;

use awc::http::Method;

use crate::clients::skopeo_pull;
use crate::helpers::{eventually, spawn_app, Config, TestApp};
use crate::images::{self, Image};
use crate::procs::wait_until;
use crate::redis_server::Redis;
use crate::registry::{Registry, Shape};

/// Two anonymous registries that both hold `image` as acme/app:1.0.
pub(crate) fn two_holders(
    work: &std::path::Path,
    seed: &str,
    layers: usize,
    bulk: usize,
) -> (Registry, Registry, Image) {
    let a = Registry::start(Shape::Anonymous, None);
    let b = Registry::start(Shape::Anonymous, None);
    let image = images::multiarch(&work.join("image"), seed, "1.0", layers, bulk);
    a.push(&image, "acme/app", "1.0");
    b.push(&image, "acme/app", "1.0");
    (a, b, image)
}

#[actix_web::test]
async fn a_drain_through_one_node_reaches_every_node() {
    let redis = Redis::start();
    let work = tempfile::tempdir().unwrap();
    let (a, b, image) = two_holders(work.path(), "drain", 1, 0);
    // a is in the nodes' region, so it is preferred whatever the probes measure.
    let config = Config::new()
        .redis(&redis.url())
        .admin()
        .backend_in("a", &a, "direct", "eu")
        .backend_in("b", &b, "direct", "us")
        .org("acme", &["a", "b"], "30s", &[]);
    let nodes: Vec<TestApp> = vec![
        spawn_app(&config).await,
        spawn_app(&config).await,
        spawn_app(&config).await,
    ];
    let layer = &image.platform("amd64").layers[0].digest;
    for node in &nodes {
        // Learn the holders through a manifest, as a client pull would.
        let m = node
            .get(&format!(
                "/v2/acme/app/manifests/{}",
                image.platform("amd64").manifest.digest
            ))
            .await;
        assert_eq!(m.status, 200);
        assert_eq!(node.blob_backend("acme/app", layer).await, "a");
    }

    let drained = nodes[0]
        .admin(Method::POST, "/admin/v1/backends/a/drain", None)
        .await;
    assert_eq!(drained.status, 200);
    assert_eq!(drained.json()["status"], "draining");
    for (i, node) in nodes.iter().enumerate() {
        eventually(
            &format!("node {i} to stop choosing a"),
            Duration::from_secs(10),
            || async { node.blob_backend("acme/app", layer).await == "b" },
        )
        .await;
        let listed = node
            .admin(Method::GET, "/admin/v1/backends", None)
            .await
            .json();
        assert_eq!(listed["backends"][0]["id"], "a");
        assert_eq!(
            listed["backends"][0]["drained"], true,
            "node {i} lists a as drained"
        );
    }

    let undrained = nodes[1]
        .admin(Method::POST, "/admin/v1/backends/a/undrain", None)
        .await;
    assert_eq!(undrained.status, 200);
    for (i, node) in nodes.iter().enumerate() {
        eventually(
            &format!("node {i} to choose a again"),
            Duration::from_secs(10),
            || async { node.blob_backend("acme/app", layer).await == "a" },
        )
        .await;
    }
}

#[actix_web::test]
async fn a_backend_killed_during_a_pull_is_failed_over_and_marked_down() {
    let redis = Redis::start();
    let work = tempfile::tempdir().unwrap();
    let (mut a, b, image) = two_holders(work.path(), "failover", 8, 512 * 1024);
    let node = spawn_app(
        &Config::new()
            .redis(&redis.url())
            .admin()
            .health("100ms", 2)
            .backend("a", &a, "direct")
            .backend("b", &b, "direct")
            .org("acme", &["a", "b"], "30s", &[]),
    )
    .await;
    let reference = format!("{}/acme/app:1.0", node.host());
    let out = work.path().join("out");
    // Real clients retry a failed layer; skopeo does so with --retry-times.
    let pull =
        std::thread::spawn(move || crate::clients::skopeo_pull_retrying(&reference, &out, 5));
    // Kill a as soon as clients start fetching layers from it.
    let first_layer = image.layer_digests()[0].clone();
    wait_until(
        "the first layer fetch from a",
        Duration::from_secs(60),
        || {
            a.log()
                .lines()
                .any(|l| l.contains("\"GET /v2/acme/app/blobs/sha256:"))
                || a.requests_naming(&first_layer).len() > 1
        },
    );
    a.stop();
    let pulled = pull.join().expect("the pull completes");
    assert_eq!(pulled.top, image.index.digest);
    assert_eq!(pulled.blobs, image.all_digests(), "every digest checks out");

    eventually("a to be marked down", Duration::from_secs(10), || async {
        let listed = node
            .admin(Method::GET, "/admin/v1/backends/a", None)
            .await
            .json();
        listed["status"] == "down"
    })
    .await;
    let layer = &image.platform("arm64").layers[3].digest;
    assert_eq!(node.blob_backend("acme/app", layer).await, "b");
}

#[actix_web::test]
async fn a_redis_outage_keeps_pulls_working_and_the_cluster_converges() {
    let mut redis = Redis::start();
    let work = tempfile::tempdir().unwrap();
    let (a, b, image) = two_holders(work.path(), "redis-outage", 2, 1024);
    let config = Config::new()
        .redis(&redis.url())
        .admin()
        .refresh("300ms")
        .backend("a", &a, "direct")
        .backend("b", &b, "direct")
        .org("acme", &["a", "b"], "30s", &[]);
    let n1 = spawn_app(&config).await;
    let n2 = spawn_app(&config).await;
    let layer = &image.platform("amd64").layers[1].digest;
    let index = format!("/v2/acme/app/manifests/{}", image.index.digest);
    assert_eq!(n1.get(&index).await.status, 200);
    assert_eq!(n2.get(&index).await.status, 200);

    // Before the outage: drain b everywhere.
    assert_eq!(
        n1.admin(Method::POST, "/admin/v1/backends/b/drain", None)
            .await
            .status,
        200
    );
    eventually("n2 to see b drained", Duration::from_secs(10), || async {
        n2.admin(Method::GET, "/admin/v1/backends/b", None)
            .await
            .json()["drained"]
            == true
    })
    .await;

    redis.kill();
    for (i, node) in [&n1, &n2].into_iter().enumerate() {
        let pulled = skopeo_pull(
            &format!("{}/acme/app:1.0", node.host()),
            &work.path().join(format!("during-{i}")),
        );
        assert_eq!(
            pulled.top, image.index.digest,
            "node {i} serves during the outage"
        );
        assert_eq!(pulled.blobs, image.all_digests());
        assert_eq!(
            node.blob_backend("acme/app", layer).await,
            "a",
            "the drain holds during the outage"
        );
    }
    // A change the store cannot take is refused, not half-made.
    let refused = n1
        .admin(Method::POST, "/admin/v1/backends/a/drain", None)
        .await;
    assert_eq!(refused.status, 503);
    assert_eq!(n1.blob_backend("acme/app", layer).await, "a");

    redis.restart();
    // Give both nodes time to reconnect and reload: the drain made before the outage is
    // still in force afterwards.
    eventually(
        "n2 to reload from the restarted redis",
        Duration::from_secs(15),
        || async { n2.admin(Method::GET, "/admin/v1/orgs", None).await.status == 200 },
    )
    .await;
    assert_eq!(n2.blob_backend("acme/app", layer).await, "a");
    assert_eq!(
        n2.admin(Method::GET, "/admin/v1/backends/b", None)
            .await
            .json()["drained"],
        true
    );

    // A change made after the outage reaches every node.
    assert_eq!(
        n1.admin(Method::POST, "/admin/v1/backends/b/undrain", None)
            .await
            .status,
        200
    );
    assert_eq!(
        n1.admin(Method::POST, "/admin/v1/backends/a/drain", None)
            .await
            .status,
        200
    );
    for (i, node) in [&n1, &n2].into_iter().enumerate() {
        eventually(
            &format!("node {i} to move to b"),
            Duration::from_secs(10),
            || async { node.blob_backend("acme/app", layer).await == "b" },
        )
        .await;
    }
}

#[actix_web::test]
async fn placement_prefers_holders_in_the_nodes_region() {
    let work = tempfile::tempdir().unwrap();
    let (us, eu, image) = two_holders(work.path(), "regions", 1, 0);
    let config = |region: &str| {
        Config::new()
            .region(region)
            .backend_in("us-mirror", &us, "direct", "us")
            .backend_in("eu-mirror", &eu, "direct", "eu")
            .org("acme", &["us-mirror", "eu-mirror"], "30s", &[])
    };
    let eu_node = spawn_app(&config("eu")).await;
    let us_node = spawn_app(&config("us")).await;
    for digest in image.layer_digests() {
        // Both are probed (nothing is known yet), both hold it: region decides.
        assert_eq!(eu_node.blob_backend("acme/app", &digest).await, "eu-mirror");
        assert_eq!(us_node.blob_backend("acme/app", &digest).await, "us-mirror");
    }
}

#[actix_web::test]
async fn warm_blob_redirects_send_no_command_to_redis() {
    let redis = Redis::start();
    let work = tempfile::tempdir().unwrap();
    let (a, b, image) = two_holders(work.path(), "warm", 2, 0);
    let node = spawn_app(
        &Config::new()
            .redis(&redis.url())
            .admin()
            .health("1h", 3)
            .refresh("1h")
            .backend("a", &a, "direct")
            .backend("b", &b, "direct")
            .org("acme", &["a", "b"], "30s", &[]),
    )
    .await;
    // The background tasks have done their first round (one probe per backend, one
    // reload) before counting starts; their next round is an hour away.
    eventually(
        "the first health probes",
        Duration::from_secs(10),
        || async {
            let listed = node
                .admin(Method::GET, "/admin/v1/backends", None)
                .await
                .json();
            listed["backends"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["checked_at_ms"].is_u64())
        },
    )
    .await;
    let layers = image.layer_digests();
    // Warm up: a pull by tag teaches the node the tag, the manifests and the holders.
    let pulled = skopeo_pull(
        &format!("{}/acme/app:1.0", node.host()),
        &work.path().join("warm"),
    );
    assert_eq!(pulled.top, image.index.digest);
    for digest in &layers {
        // Both hold every layer; which one placement prefers (latency may decide) does
        // not matter here, only that the answer is a redirect to a holder.
        let chosen = node.blob_backend("acme/app", digest).await;
        assert!(chosen == "a" || chosen == "b", "{chosen}");
    }
    let before = redis.settled_commands();
    let mut redirects = 0;
    for i in 0..10_000 {
        let digest = &layers[i % layers.len()];
        let answer = node.get(&format!("/v2/acme/app/blobs/{digest}")).await;
        assert_eq!(answer.status, 307);
        redirects += 1;
    }
    let during = redis.commands_processed() - before;
    println!("redis commands during {redirects} warm blob redirects: {during}");
    assert_eq!(during, 0, "warm redirects must not touch redis");
}

/// Two nodes on the store at `url` (with more `[store]` keys): a drain through one reaches
/// the other, and a pull through the other gets every digest.
pub(crate) async fn two_nodes_agree_through(url: &str, store_keys: &[(&str, &str)], seed: &str) {
    let work = tempfile::tempdir().unwrap();
    let (a, b, image) = two_holders(work.path(), seed, 2, 1024);
    let config = Config::new()
        .redis_with(url, store_keys)
        .admin()
        .backend_in("a", &a, "direct", "eu")
        .backend_in("b", &b, "direct", "us")
        .org("acme", &["a", "b"], "30s", &[]);
    let n1 = spawn_app(&config).await;
    let n2 = spawn_app(&config).await;
    let pulled = skopeo_pull(
        &format!("{}/acme/app:1.0", n2.host()),
        &work.path().join("out"),
    );
    assert_eq!(pulled.top, image.index.digest);
    assert_eq!(pulled.blobs, image.all_digests());
    let layer = &image.platform("amd64").layers[0].digest;
    // n1 served nothing yet: it finds the holder n2 learned in the store, probing nobody.
    let probes = || a.requests_naming(layer).len() + b.requests_naming(layer).len();
    let before = probes();
    assert_eq!(n1.blob_backend("acme/app", layer).await, "a");
    assert_eq!(
        probes(),
        before,
        "n1 probed a backend instead of asking the store"
    );
    assert_eq!(
        n1.admin(Method::POST, "/admin/v1/backends/a/drain", None)
            .await
            .status,
        200
    );
    eventually("n2 to stop choosing a", Duration::from_secs(10), || async {
        n2.blob_backend("acme/app", layer).await == "b"
    })
    .await;
}

#[actix_web::test]
async fn nodes_agree_through_redis_cluster() {
    let cluster = crate::redis_server::RedisCluster::start();
    two_nodes_agree_through(&cluster.url(), &[], "redis-cluster").await;
}

#[actix_web::test]
async fn nodes_agree_through_redis_sentinel() {
    let sentinel = crate::redis_server::RedisSentinel::start();
    two_nodes_agree_through(&sentinel.url(), &[], "redis-sentinel").await;
    assert!(
        sentinel.master.commands_processed() > 0,
        "the master behind the sentinel was used"
    );
}
