//! Tags resolve at the org's authority: a stale mirror never serves an old digest for a tag,
//! and when the authority is down the last known digest is served and marked stale.

use std::time::Duration;

use crate::clients::skopeo_pull;
use crate::helpers::{spawn_app, Config};
use crate::images;
use crate::registry::{Registry, Shape};

/// Seed 003: the tag moved on the authority while the mirror still has the old digest.
#[actix_web::test]
async fn stale_mirror_never_serves_an_old_tag() {
    let hub = Registry::start(Shape::Anonymous, None);
    let mirror = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let old = images::multiarch(&work.path().join("old"), "stale-old", "1.0", 2, 1024);
    let new = images::multiarch(&work.path().join("new"), "stale-new", "1.0", 2, 1024);
    hub.push(&old, "acme/app", "1.0");
    mirror.push(&old, "acme-images/app", "1.0");
    hub.push(&new, "acme/app", "1.0");

    let app = spawn_app(
        &Config::new()
            .backend("hub", &hub, "direct")
            // In another region: ranked after the hub whatever latencies the health checks
            // measure. (Ranked first, it would be probed for the new digests, answer 404,
            // and the assertions below could not tell that from a stale tag served.)
            .backend_in("mirror", &mirror, "direct", "us")
            .org(
                "acme",
                &["hub", "mirror"],
                "30s",
                &[("mirror", "acme-images")],
            )
            .tag_authorities("acme", &["hub"]),
    )
    .await;
    let pulled = skopeo_pull(
        &format!("{}/acme/app:1.0", app.host()),
        &work.path().join("out"),
    );
    assert_eq!(
        pulled.top, new.index.digest,
        "the tag resolves to the authority's new digest"
    );
    assert_eq!(pulled.blobs, new.all_digests());

    for digest in new.all_digests() {
        let hits = mirror.requests_naming(&digest);
        assert!(
            hits.is_empty(),
            "the mirror was asked for {digest}: {hits:?}"
        );
    }
    let tag_hits = mirror.requests_naming("/manifests/1.0");
    assert!(
        tag_hits.is_empty(),
        "the mirror was asked for the tag: {tag_hits:?}"
    );
}

#[actix_web::test]
async fn authority_down_serves_the_last_known_digest_marked_stale() {
    let mut hub = Registry::start(Shape::Anonymous, None);
    let mirror = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "authority-down", "1.0", 2, 1024);
    hub.push(&image, "acme/app", "1.0");
    mirror.push(&image, "acme-images/app", "1.0");
    let app = spawn_app(
        &Config::new()
            .backend("hub", &hub, "direct")
            .backend("mirror", &mirror, "direct")
            .org(
                "acme",
                &["hub", "mirror"],
                "1s",
                &[("mirror", "acme-images")],
            )
            // The mirror may lag: it is never asked for a tag.
            .tag_authorities("acme", &["hub"]),
    )
    .await;
    let reference = format!("{}/acme/app:1.0", app.host());
    let first = skopeo_pull(&reference, &work.path().join("first"));
    assert_eq!(first.top, image.index.digest);

    hub.stop();
    // The tag's TTL (1 s) has to run out for the authority to be asked again.
    std::thread::sleep(Duration::from_millis(1500));

    let accept = [("accept", images::OCI_INDEX)];
    let answer = app
        .request(
            awc::http::Method::GET,
            "/v2/acme/app/manifests/1.0",
            &accept,
        )
        .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.header("x-regatta-stale"), Some("true"));
    assert_eq!(
        answer.header("docker-content-digest"),
        Some(image.index.digest.as_str())
    );

    let second = skopeo_pull(&reference, &work.path().join("second"));
    assert_eq!(
        second.top, image.index.digest,
        "pull by tag succeeds from the cached digest"
    );
    assert_eq!(second.blobs, image.all_digests());
    for layer in image.layer_digests() {
        let answer = app.get(&format!("/v2/acme/app/blobs/{layer}")).await;
        assert_eq!(answer.status, 307);
        assert_eq!(
            answer.backend(),
            "mirror",
            "with the hub down, blobs come from the mirror"
        );
    }
}

/// What a client that accepts only single-platform manifests and one that accepts an
/// index each get for the same tag.
async fn representation(node: &crate::helpers::TestApp, accept: &[&str]) -> (String, String) {
    let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
    let answer = node
        .request(
            awc::http::Method::GET,
            "/v2/acme/app/manifests/1.0",
            &headers,
        )
        .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let digest = answer.header("docker-content-digest").unwrap().to_owned();
    assert_eq!(
        images::sha256(&answer.body),
        digest,
        "the body is that digest"
    );
    (digest, answer.header("content-type").unwrap().to_owned())
}

#[actix_web::test]
async fn each_client_gets_the_representation_it_accepts_whoever_asked_first() {
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "by-accept", "1.0", 1, 256);
    let hub = crate::servers::AcceptHub::start(&image);
    let single: &[&str] = &[images::OCI_MANIFEST];
    let multi: &[&str] = &[images::OCI_INDEX, images::OCI_MANIFEST];
    let amd64 = (
        image.platform("amd64").manifest.digest.clone(),
        images::OCI_MANIFEST.to_owned(),
    );
    let index = (image.index.digest.clone(), images::OCI_INDEX.to_owned());
    let redis = crate::redis_server::Redis::start();
    let config = |shared: bool| {
        let config = if shared {
            Config::new().redis(&redis.url())
        } else {
            Config::new()
        };
        config
            .backend_at("hub", &hub.url(), "direct", "eu")
            .org("acme", &["hub"], "30s", &[])
    };

    // One node, single-manifest client first, then the other order on a fresh node.
    let node = spawn_app(&config(false)).await;
    assert_eq!(representation(&node, single).await, amd64);
    assert_eq!(representation(&node, multi).await, index);
    let node = spawn_app(&config(false)).await;
    assert_eq!(representation(&node, multi).await, index);
    assert_eq!(representation(&node, single).await, amd64);

    // Two nodes sharing Redis: the tag record one node wrote serves the other's clients.
    let first = spawn_app(&config(true)).await;
    let second = spawn_app(&config(true)).await;
    assert_eq!(representation(&first, single).await, amd64);
    assert_eq!(representation(&second, multi).await, index);
    assert_eq!(representation(&second, single).await, amd64);
    assert_eq!(representation(&first, multi).await, index);
}
