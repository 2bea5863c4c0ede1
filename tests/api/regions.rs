//! Nodes in several regions sharing one Redis: each region judges backend health for
//! itself, and a node reads from a replica in its region (`store.read_url`) while writing
//! to the primary.

use std::time::Duration;

use awc::http::Method;

use crate::cluster::two_holders;
use crate::helpers::{eventually, metric, spawn_app, Config, TestApp};
use crate::procs::free_port;
use crate::redis_server::Redis;

/// What a node's admin API says of backend `id`: its health as the node goes by it, and
/// each region's view.
async fn health_of(node: &TestApp, id: &str) -> (String, serde_json::Value) {
    let listed = node
        .admin(Method::GET, "/admin/v1/backends", None)
        .await
        .json();
    let backend = listed["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap_or_else(|| panic!("{id} is listed: {listed}"))
        .clone();
    (
        backend["health"].as_str().unwrap().to_owned(),
        backend["health_by_region"].clone(),
    )
}

#[actix_web::test]
async fn each_region_judges_a_backend_for_itself() {
    let redis = Redis::start();
    let work = tempfile::tempdir().unwrap();
    let (a, b, image) = two_holders(work.path(), "regional-health", 1, 0);
    // b, in eu, is reachable from eu only: the us node is given an address where nothing
    // listens (as if a firewall between us and b dropped it). a is in a third region.
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    let node = |region: &str| {
        Config::new()
            .region(region)
            .redis(&redis.url())
            .admin()
            .health("100ms", 2)
    };
    let eu = spawn_app(
        &node("eu")
            .backend_in("b", &b, "direct", "eu")
            .backend_in("a", &a, "direct", "ap")
            .org("acme", &["b", "a"], "30s", &[]),
    )
    .await;
    let us = spawn_app(
        &node("us")
            .backend_at("b", &unreachable, "direct", "eu")
            .backend_in("a", &a, "direct", "ap")
            .org("acme", &["b", "a"], "30s", &[]),
    )
    .await;

    // Both regions probe b (the probe lease is per region), and every node sees both views.
    let both_views = serde_json::json!({"eu": "up", "us": "down"});
    for (name, node, own) in [("eu", &eu, "up"), ("us", &us, "down")] {
        eventually(
            &format!("the {name} node to see b up from eu and down from us"),
            Duration::from_secs(10),
            || async { health_of(node, "b").await == (own.to_owned(), both_views.clone()) },
        )
        .await;
    }
    let stored: std::collections::HashMap<String, String> =
        redis.query(redis::cmd("HGETALL").arg("regatta:health"));
    assert!(
        stored.contains_key("eu/b") && stored.contains_key("us/b"),
        "one record per (region, backend): {:?}",
        stored.keys()
    );

    // Each node ranks by its own region's view: eu sends b's blobs to b, us to a.
    let manifest = &image.platform("amd64").manifest.digest;
    let layer = &image.platform("amd64").layers[0].digest;
    for node in [&eu, &us] {
        let m = node
            .get(&format!("/v2/acme/app/manifests/{manifest}"))
            .await;
        assert_eq!(m.status, 200);
    }
    assert_eq!(eu.blob_backend("acme/app", layer).await, "b");
    assert_eq!(us.blob_backend("acme/app", layer).await, "a");

    // The metric carries the region whose nodes probed.
    let text = eu.metrics().await;
    for (from, want) in [("eu", 2.0), ("us", 0.0)] {
        assert_eq!(
            metric(
                &text,
                "regatta_backend_health",
                &[("backend", "b"), ("region", "eu"), ("probed_from", from)]
            ),
            Some(want),
            "b as probed from {from}:\n{text}"
        );
    }
}

#[actix_web::test]
async fn reads_go_to_the_regional_replica_and_fall_back_to_the_primary() {
    let mut primary = Redis::start();
    let mut replica = Redis::start_replica_of(&primary);
    let work = tempfile::tempdir().unwrap();
    let (a, b, image) = two_holders(work.path(), "read-replica", 1, 0);
    let backends = |config: Config| {
        config
            .admin()
            .backend_in("a", &a, "direct", "eu")
            .backend_in("b", &b, "direct", "us")
            .org("acme", &["a", "b"], "30s", &[])
    };
    // The reader sits by the replica; the writer has only the primary.
    let reader = spawn_app(&backends(
        Config::new()
            .redis_with(&primary.url(), &[("read_url", &replica.url())])
            .refresh("200ms"),
    ))
    .await;
    let writer = spawn_app(&backends(Config::new().redis(&primary.url()))).await;

    let manifest = &image.platform("amd64").manifest.digest;
    let layer = &image.platform("amd64").layers[0].digest;
    // Once the seeded policies have reached the replica, the reader's snapshot reloads
    // come from there.
    let reloads = replica.calls("hgetall");
    eventually(
        "the reader to reload from the replica",
        Duration::from_secs(10),
        || async { replica.calls("hgetall") > reloads },
    )
    .await;
    let holder_reads = replica.calls("zmscore");
    assert_eq!(
        reader
            .get(&format!("/v2/acme/app/manifests/{manifest}"))
            .await
            .status,
        200
    );
    assert!(
        replica.calls("zmscore") > holder_reads,
        "the reader asks the replica who holds a digest"
    );
    assert_eq!(reader.blob_backend("acme/app", layer).await, "a");
    let subscribers = |redis: &Redis| -> i64 {
        let reply: (String, i64) =
            redis.query(redis::cmd("PUBSUB").arg("NUMSUB").arg("regatta:events"));
        reply.1
    };
    // The reader listens at the replica (at the primary only until the replica held the
    // cluster's data), the writer at the primary.
    eventually(
        "the reader to listen at the replica, the writer at the primary",
        Duration::from_secs(10),
        || async { (subscribers(&replica), subscribers(&primary)) == (1, 1) },
    )
    .await;

    // A drain written through the writer reaches the reader through the replica: the
    // PUBLISH replicated, and the snapshot reloaded from there.
    let snapshot_reads = replica.calls("hgetall");
    let drained = writer
        .admin(Method::POST, "/admin/v1/backends/a/drain", None)
        .await;
    assert_eq!(drained.status, 200);
    eventually(
        "the reader to obey a drain made through the writer",
        Duration::from_secs(5),
        || async { reader.blob_backend("acme/app", layer).await == "b" },
    )
    .await;
    assert!(replica.calls("hgetall") > snapshot_reads);
    let on_primary: String = primary.query(redis::cmd("HGET").arg("regatta:admin").arg("a"));
    assert!(on_primary.contains("\"drained\":true"), "{on_primary}");

    // A read_url naming a server that holds nothing of the cluster (a replica still in its
    // first sync, a restarted server not yet following the primary) is not read from: the
    // node sees the orgs and the drain through the primary.
    let empty = Redis::start();
    let third = spawn_app(&backends(
        Config::new().redis_with(&primary.url(), &[("read_url", &empty.url())]),
    ))
    .await;
    eventually(
        "a node with an empty read_url to load the drain from the primary",
        Duration::from_secs(10),
        || async { third.blob_backend("acme/app", layer).await == "b" },
    )
    .await;
    assert_eq!(
        empty.calls("hgetall"),
        0,
        "no snapshot from an empty server"
    );
    drop(third);

    // Replica gone: reads and the subscription fall back to the primary.
    replica.kill();
    let undrained = writer
        .admin(Method::POST, "/admin/v1/backends/a/undrain", None)
        .await;
    assert_eq!(undrained.status, 200);
    eventually(
        "the reader, its replica gone, to obey an undrain through the primary",
        Duration::from_secs(10),
        || async { reader.blob_backend("acme/app", layer).await == "a" },
    )
    .await;
    eventually(
        "the reader to listen at the primary",
        Duration::from_secs(10),
        || async { subscribers(&primary) == 2 },
    )
    .await;
    // Changes made through the reader go to the primary.
    let weight = reader
        .admin(
            Method::PUT,
            "/admin/v1/backends/b/weight",
            Some(serde_json::json!({"weight": 7})),
        )
        .await;
    assert_eq!(
        weight.status,
        200,
        "{}",
        String::from_utf8_lossy(&weight.body)
    );

    // Primary gone as well (the replica back, following nothing): the reader keeps
    // serving from its snapshot and refuses changes it cannot write.
    replica.restart();
    primary.kill();
    assert_eq!(reader.blob_backend("acme/app", layer).await, "a");
    let refused = reader
        .admin(Method::POST, "/admin/v1/backends/a/drain", None)
        .await;
    assert_eq!(refused.status, 503, "an admin change without the primary");
    assert_eq!(reader.blob_backend("acme/app", layer).await, "a");
}
