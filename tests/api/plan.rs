//! The placement plan in real pulls: every route obeys region, drain, health and tag
//! authorities, and a backend that stalls never hangs a request.

use std::time::{Duration, Instant};

use awc::http::Method;

use crate::clients::skopeo_pull;
use crate::helpers::{eventually, spawn_app, Config, TestApp};
use crate::images::{self, Image};
use crate::redis_server::Redis;
use crate::registry::{Registry, Shape};
use crate::servers::Stall;

/// Access-log lines of blob reads for `digest` (GET or HEAD) on a registry.
fn blob_reads(registry: &Registry, digest: &str) -> Vec<String> {
    registry.requests_naming(&format!("/blobs/{digest}"))
}

/// Blob reads of every config and layer of `image` on `registry`, as (GETs, HEADs).
fn blob_traffic(registry: &Registry, image: &Image) -> (usize, usize) {
    let mut gets = 0;
    let mut heads = 0;
    for p in &image.platforms {
        for d in std::iter::once(&p.config.digest).chain(p.layers.iter().map(|l| &l.digest)) {
            for line in blob_reads(registry, d) {
                if line.contains("\"HEAD ") {
                    heads += 1;
                } else {
                    gets += 1;
                }
            }
        }
    }
    (gets, heads)
}

/// Configs and layers of every platform.
fn blob_digests(image: &Image) -> Vec<String> {
    image
        .platforms
        .iter()
        .flat_map(|p| std::iter::once(&p.config).chain(&p.layers))
        .map(|d| d.digest.clone())
        .collect()
}

/// A node in `region` over `eu1` (region eu) and `us1` (region us), org order eu1 first.
fn two_region_config(
    region: &str,
    eu1: &Registry,
    us1: &Registry,
    redis: Option<&Redis>,
) -> Config {
    let mut config = Config::new().region(region);
    if let Some(redis) = redis {
        config = config.redis(&redis.url());
    }
    config
        .backend_in("eu1", eu1, "direct", "eu")
        .backend_in("us1", us1, "direct", "us")
        .org("acme", &["eu1", "us1"], "30s", &[])
}

/// Pulls `image` by tag through `node` and checks that every config and layer came from
/// `home` and none from `away` (direct delivery: the client fetched them from the backend
/// it was sent to, so the backends' access logs show where each blob went).
async fn pull_stays_home(
    node: &TestApp,
    image: &Image,
    out: &std::path::Path,
    (home_id, home): (&str, &Registry),
    away: &Registry,
) {
    let (home_before, away_before) = (blob_traffic(home, image), blob_traffic(away, image));
    let pulled = skopeo_pull(&format!("{}/acme/app:1.0", node.host()), out);
    assert_eq!(pulled.top, image.index.digest);
    assert_eq!(pulled.blobs, image.all_digests());
    let (home_after, away_after) = (blob_traffic(home, image), blob_traffic(away, image));
    assert_eq!(
        away_after,
        away_before,
        "the other region's backend saw blob requests from this pull:\n{}",
        away.log()
    );
    let blobs = blob_digests(image);
    let fetched_home = home_after.0 - home_before.0;
    assert!(
        fetched_home >= blobs.len(),
        "every config and layer is fetched from {home_id}: {fetched_home} of {}",
        blobs.len()
    );
    println!(
        "pull through the {home_id} node: {} blob GETs in region, {} elsewhere ({}% in region); \
         blob HEADs added by probing: {}",
        fetched_home,
        away_after.0 - away_before.0,
        100 * fetched_home / fetched_home.max(1),
        home_after.1 - home_before.1,
    );
    for digest in &blobs {
        let answer = node.get(&format!("/v2/acme/app/blobs/{digest}")).await;
        assert_eq!(answer.status, 307);
        assert_eq!(answer.backend(), home_id, "{digest}");
    }
}

/// Both regions hold the image; org order names eu1 first. A us node's pull goes to us1
/// for every blob, an eu node's to eu1.
async fn each_region_pulls_from_its_own_backend(redis: Option<&Redis>, seed: &str) {
    let eu1 = Registry::start(Shape::Anonymous, None);
    let us1 = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), seed, "1.0", 3, 2048);
    eu1.push(&image, "acme/app", "1.0");
    us1.push(&image, "acme/app", "1.0");
    let eu = spawn_app(&two_region_config("eu", &eu1, &us1, redis)).await;
    let us = spawn_app(&two_region_config("us", &eu1, &us1, redis)).await;
    // The eu node first: with a shared store, the us node then finds eu1 named as the
    // holder of every digest and must still find its own region's copies.
    let out = work.path();
    pull_stays_home(&eu, &image, &out.join("eu"), ("eu1", &eu1), &us1).await;
    pull_stays_home(&us, &image, &out.join("us"), ("us1", &us1), &eu1).await;
}

#[actix_web::test]
async fn each_region_pulls_from_its_own_backend_on_the_memory_store() {
    each_region_pulls_from_its_own_backend(None, "regions-memory").await;
}

#[actix_web::test]
async fn each_region_pulls_from_its_own_backend_through_redis() {
    let redis = Redis::start();
    each_region_pulls_from_its_own_backend(Some(&redis), "regions-redis").await;
}

/// Gateway requests for the org's repository in a backend's access log (health probes
/// ask `/v2/` only).
fn gateway_reads(registry: &Registry) -> Vec<String> {
    registry.requests_naming("/v2/acme/")
}

/// Tag, digest, tag list and referrers all answered by `backend`, none stale.
async fn every_route_served_by(
    node: &TestApp,
    image: &Image,
    tag: &str,
    sbom: &images::Artifact,
    backend: &str,
    out: &std::path::Path,
) {
    let by_tag = node
        .request(
            Method::GET,
            &format!("/v2/acme/app/manifests/{tag}"),
            &[("accept", images::OCI_INDEX)],
        )
        .await;
    assert_eq!(
        by_tag.status,
        200,
        "{}",
        String::from_utf8_lossy(&by_tag.body)
    );
    std::fs::create_dir_all(out).unwrap();
    assert_eq!(by_tag.header("x-regatta-stale"), None, "not stale");
    assert_eq!(
        by_tag.header("docker-content-digest"),
        Some(image.index.digest.as_str())
    );
    let pulled = skopeo_pull(&format!("{}/acme/app:{tag}", node.host()), &out.join("tag"));
    assert_eq!(pulled.blobs, image.all_digests());
    let pulled = skopeo_pull(
        &format!("{}/acme/app@{}", node.host(), image.index.digest),
        &out.join("digest"),
    );
    assert_eq!(pulled.blobs, image.all_digests());
    for digest in blob_digests(image) {
        assert_eq!(node.blob_backend("acme/app", &digest).await, backend);
    }
    let tags = node.get("/v2/acme/app/tags/list").await;
    assert_eq!(tags.status, 200);
    assert_eq!(tags.backend(), backend, "tags list");
    assert!(tags.json()["tags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t == tag));
    let subject = &image.platform("amd64").manifest.digest;
    let referrers = node.get(&format!("/v2/acme/app/referrers/{subject}")).await;
    assert_eq!(referrers.status, 200);
    assert_eq!(referrers.backend(), backend, "referrers");
    assert_eq!(
        referrers.json()["manifests"][0]["digest"],
        sbom.descriptor.digest
    );
}

#[actix_web::test]
async fn a_drained_or_down_authority_is_skipped_by_every_route() {
    let mut a = Registry::start(Shape::Anonymous, None);
    let b = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "drain-routes", "1.0", 2, 1024);
    let subject = image.platform("amd64").manifest.clone();
    let sbom = images::artifact(&subject, "application/vnd.regatta.test.sbom", b"{}");
    for r in [&a, &b] {
        r.push(&image, "acme/app", "1.0");
        r.push(&image, "acme/app", "2.0");
        r.push_artifact("acme/app", &sbom, &subject.digest).await;
    }
    let node = spawn_app(
        &Config::new()
            .admin()
            .health("200ms", 1)
            .backend("a", &a, "direct")
            .backend("b", &b, "direct")
            .org("acme", &["a", "b"], "30s", &[]),
    )
    .await;

    let drain = node
        .admin(Method::POST, "/admin/v1/backends/a/drain", None)
        .await;
    assert_eq!(drain.status, 200);
    let before = gateway_reads(&a).len();
    every_route_served_by(
        &node,
        &image,
        "1.0",
        &sbom,
        "b",
        &work.path().join("drained"),
    )
    .await;
    let asked: Vec<String> = gateway_reads(&a).split_off(before);
    assert!(
        asked.is_empty(),
        "the drained backend was asked for content: {asked:?}"
    );

    // Undrain: the authority answers for tags again.
    let undrain = node
        .admin(Method::POST, "/admin/v1/backends/a/undrain", None)
        .await;
    assert_eq!(undrain.status, 200);
    assert_eq!(node.get("/v2/acme/app/tags/list").await.backend(), "a");

    // Down by health: the process is gone and the probes say so.
    a.stop();
    eventually("a to be down", Duration::from_secs(20), || async {
        let listed = node.admin(Method::GET, "/admin/v1/backends", None).await;
        listed.json()["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == "a" && x["health"] == "down")
    })
    .await;
    // 2.0 was never resolved: it must come from the authority that is left.
    every_route_served_by(&node, &image, "2.0", &sbom, "b", &work.path().join("down")).await;
}

/// Seed 003 with `tag_authorities`: the mirror lags (it has an old digest under the tag)
/// and is never asked for a tag, whatever happens to the hub.
#[actix_web::test]
async fn a_backend_outside_the_tag_authorities_is_never_asked_for_a_tag() {
    let mut hub = Registry::start(Shape::Anonymous, None);
    let mirror = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let old = images::multiarch(&work.path().join("old"), "authority-old", "1.0", 1, 512);
    let new = images::multiarch(&work.path().join("new"), "authority-new", "1.0", 1, 512);
    hub.push(&new, "acme/app", "1.0");
    mirror.push(&old, "acme-images/app", "1.0");
    let config = Config::new()
        .backend("hub", &hub, "direct")
        .backend("mirror", &mirror, "direct")
        .org(
            "acme",
            &["hub", "mirror"],
            "1s",
            &[("mirror", "acme-images")],
        )
        .tag_authorities("acme", &["hub"]);
    let node = spawn_app(&config).await;
    let pulled = skopeo_pull(
        &format!("{}/acme/app:1.0", node.host()),
        &work.path().join("out"),
    );
    assert_eq!(pulled.top, new.index.digest);

    hub.stop();
    let accept = [("accept", images::OCI_INDEX)];
    eventually(
        "the tag's record to go stale (1 s TTL)",
        Duration::from_secs(10),
        || async {
            let answer = node
                .request(Method::GET, "/v2/acme/app/manifests/1.0", &accept)
                .await;
            answer.header("x-regatta-stale") == Some("true")
        },
    )
    .await;
    let answer = node
        .request(Method::GET, "/v2/acme/app/manifests/1.0", &accept)
        .await;
    assert_eq!(answer.header("x-regatta-stale"), Some("true"));
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("docker-content-digest"),
        Some(new.index.digest.as_str()),
        "served stale from the record, never the mirror's old digest"
    );

    // A node that never resolved the tag has no record: 503, not the mirror's tag.
    let fresh = spawn_app(&config).await;
    let answer = fresh
        .request(Method::GET, "/v2/acme/app/manifests/1.0", &accept)
        .await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.error_code(), "UNAVAILABLE");
    assert!(answer.header("retry-after").is_some());
    let asked = mirror.requests_naming("/manifests/1.0");
    assert!(
        asked.is_empty(),
        "the mirror was asked for the tag: {asked:?}"
    );
}

/// The stalled backend is first in policy order, in the node's region (so no probe latency
/// measured under load can rank the good one ahead), and looks like it holds everything.
fn stalled_first(stall: &Stall, good: &Registry, delivery: &str) -> Config {
    Config::new()
        .timeouts("1s", "20s")
        .backend_at("stall", &stall.url(), delivery, "eu")
        .backend_in("good", good, delivery, "us")
        .org("acme", &["stall", "good"], "30s", &[])
}

#[actix_web::test]
async fn a_backend_that_stalls_after_its_headers_is_abandoned_for_the_next() {
    let stall = Stall::start();
    let good = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "stall-first", "1.0", 2, 4096);
    good.push(&image, "acme/app", "1.0");

    // A proxied blob: the stalled backend is asked first, then the good one streams it.
    let proxy = spawn_app(&stalled_first(&stall, &good, "proxy")).await;
    let layer = &image.platform("amd64").layers[0].digest;
    let answer = proxy.get(&format!("/v2/acme/app/blobs/{layer}")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.backend(), "good");
    assert_eq!(&images::sha256(&answer.body), layer);
    assert_eq!(stall.stalled(), 1, "the stalled backend was tried first");

    // A pull by digest: the index is asked of the stalled backend first.
    let node = spawn_app(&stalled_first(&stall, &good, "direct")).await;
    let pulled = skopeo_pull(
        &format!("{}/acme/app@{}", node.host(), image.index.digest),
        &work.path().join("out"),
    );
    assert_eq!(pulled.blobs, image.all_digests());
    assert!(
        stall.stalled() >= 2,
        "the manifest was tried on the stalled backend"
    );
    eventually(
        "every stalled connection closed by the gateway",
        Duration::from_secs(10),
        || async { stall.closed() == stall.stalled() },
    )
    .await;
}

#[actix_web::test]
async fn requests_to_a_stalled_org_end_by_the_deadline_and_others_keep_pulling() {
    let stall = Stall::start();
    let good = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "stall-org", "1.0", 3, 8192);
    good.push(&image, "acme/app", "1.0");
    // The read timeout is longer than the deadline: only the deadline ends these requests.
    let deadline = Duration::from_secs(2);
    let node = spawn_app(
        &Config::new()
            .timeouts("30s", "2s")
            .backend_at("stall", &stall.url(), "direct", "eu")
            .backend("good", &good, "direct")
            .org("slow", &["stall"], "30s", &[])
            .org("acme", &["good"], "30s", &[]),
    )
    .await;

    let reference = format!("{}/acme/app:1.0", node.host());
    let out = work.path().join("out");
    let pull = std::thread::spawn(move || skopeo_pull(&reference, &out));

    let client = awc::Client::builder()
        .connector(awc::Connector::new().limit(0))
        .timeout(Duration::from_secs(60))
        .finish();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let url = node.url(&format!("/v2/slow/app/manifests/{digest}"));
    let requests = (0..200).map(|_| {
        let (client, url) = (&client, &url);
        async move {
            let started = Instant::now();
            let status = client.get(url).send().await.map(|r| r.status().as_u16());
            (status, started.elapsed())
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    for (status, took) in &answers {
        assert_eq!(status.as_ref().ok(), Some(&503), "{status:?}");
        // Ended by the deadline, with room for a loaded machine; never left hanging.
        assert!(*took < deadline + Duration::from_secs(8), "took {took:?}");
    }
    let slowest = answers.iter().map(|(_, t)| *t).max().unwrap();
    println!("200 requests to a stalled org: slowest answered in {slowest:?}");

    let pulled = pull.join().expect("the healthy org's pull completes");
    assert_eq!(pulled.top, image.index.digest);
    assert_eq!(pulled.blobs, image.all_digests());
    let again = skopeo_pull(
        &format!("{}/acme/app:1.0", node.host()),
        &work.path().join("again"),
    );
    assert_eq!(again.blobs, image.all_digests());
    eventually(
        "every stalled connection closed by the gateway",
        Duration::from_secs(10),
        || async { stall.closed() == stall.stalled() },
    )
    .await;
    assert!(stall.stalled() >= 1);
}
