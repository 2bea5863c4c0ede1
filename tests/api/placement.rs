//! Digest-aware placement: requests go to the backend that holds the digest.

use crate::clients::skopeo_pull;
use crate::helpers::{spawn_app, Config};
use crate::images;
use crate::registry::{Registry, Shape};

#[actix_web::test]
async fn every_request_goes_to_the_only_holder() {
    let holder = Registry::start(Shape::Anonymous, None);
    let empty = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "only-holder", "1.0", 3, 4096);
    holder.push(&image, "acme/app", "1.0");
    // The holder is second in policy order: only digests can find it.
    let app = spawn_app(
        &Config::new()
            .backend("empty", &empty, "direct")
            .backend("holder", &holder, "direct")
            .org("acme", &["empty", "holder"], "30s", &[]),
    )
    .await;
    let by_digest = format!("{}/acme/app@{}", app.host(), image.index.digest);
    let pulled = skopeo_pull(&by_digest, &work.path().join("out"));
    assert_eq!(pulled.top, image.index.digest);
    assert_eq!(pulled.blobs, image.all_digests());

    for p in &image.platforms {
        for digest in std::iter::once(&p.config.digest).chain(p.layers.iter().map(|l| &l.digest)) {
            let answer = app.get(&format!("/v2/acme/app/blobs/{digest}")).await;
            assert_eq!(answer.status, 307);
            assert_eq!(answer.backend(), "holder", "{digest}");
            let hits = empty.requests_naming(digest);
            assert!(
                hits.is_empty(),
                "the empty backend was asked for {digest}: {hits:?}"
            );
        }
        let answer = app
            .get(&format!("/v2/acme/app/manifests/{}", p.manifest.digest))
            .await;
        assert_eq!(answer.backend(), "holder");
    }
    // The only question the empty backend ever got was the index by digest, answered 404.
    let asked = empty.requests_naming("/v2/acme/app/");
    assert!(
        asked.iter().all(|l| l.contains(&image.index.digest)),
        "unexpected requests to the empty backend: {asked:?}"
    );
}

#[actix_web::test]
async fn unknown_holders_are_probed_and_remembered() {
    let a = Registry::start(Shape::Anonymous, None);
    let b = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "probe", "1.0", 2, 1024);
    b.push(&image, "acme/app", "1.0");
    let app = spawn_app(
        &Config::new()
            .backend("a", &a, "direct")
            // In another region: ranked after a whatever latencies the health checks
            // measure, so a's answer is always awaited (a probe still out when the best
            // holder is certain is dropped, and could not be counted).
            .backend_in("b", &b, "direct", "us")
            .org("acme", &["a", "b"], "30s", &[]),
    )
    .await;
    // No manifest was served: the gateway knows nothing and must probe.
    let layer = &image.platform("amd64").layers[0].digest;
    let (a_before, b_before) = (
        a.requests_naming(layer).len(),
        b.requests_naming(layer).len(),
    );
    for _ in 0..3 {
        let answer = app.get(&format!("/v2/acme/app/blobs/{layer}")).await;
        assert_eq!(answer.status, 307);
        assert_eq!(answer.backend(), "b");
    }
    assert_eq!(
        a.requests_naming(layer).len() - a_before,
        1,
        "a is probed once, then known to lack it"
    );
    assert_eq!(
        b.requests_naming(layer).len() - b_before,
        1,
        "b is probed once; the redirects that follow need no backend call"
    );
}

/// Many clients asking the same cold thing at once cost the backends one request.
#[actix_web::test]
async fn identical_cold_lookups_go_to_the_backends_once() {
    let a = Registry::start(Shape::Anonymous, None);
    let b = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "single-flight", "1.0", 1, 1024);
    a.push(&image, "acme/app", "1.0");
    b.push(&image, "acme/app", "1.0");
    let app = spawn_app(
        &Config::new()
            .backend("a", &a, "direct")
            // In another region: a is always the best-ranked (see below).
            .backend_in("b", &b, "direct", "us")
            .org("acme", &["a", "b"], "30s", &[]),
    )
    .await;
    let at_once = |path: String| {
        let app = &app;
        async move {
            let answers = futures_util::future::join_all((0..50).map(|_| app.get(&path))).await;
            answers.iter().map(|a| a.status).collect::<Vec<u16>>()
        }
    };
    let requests = |needle: &str| a.requests_naming(needle).len() + b.requests_naming(needle).len();

    // (Pushing left reads of its own in the access logs: count what the gateway adds.)
    let tag = "/v2/acme/app/manifests/1.0";
    let before = requests("/manifests/1.0");
    assert!(at_once(tag.into()).await.iter().all(|s| *s == 200));
    assert_eq!(requests("/manifests/1.0") - before, 1, "one tag resolution");

    let manifest = &image.platform("arm64").manifest.digest;
    let before = requests(manifest);
    let path = format!("/v2/acme/app/manifests/{manifest}");
    assert!(at_once(path).await.iter().all(|s| *s == 200));
    assert_eq!(requests(manifest) - before, 1, "one manifest fetch");

    // A blob nothing is known about (no manifest naming it was served): both are probed
    // at once, and the answer is certain when a, the best-ranked, says it holds it; b's
    // probe may be dropped before it is sent. Never more than one probe per backend.
    let layer = &image.platform("amd64").layers[0].digest;
    let before = (
        a.requests_naming(layer).len(),
        b.requests_naming(layer).len(),
    );
    let path = format!("/v2/acme/app/blobs/{layer}");
    assert!(at_once(path).await.iter().all(|s| *s == 307));
    let after = (
        a.requests_naming(layer).len(),
        b.requests_naming(layer).len(),
    );
    let probes = (after.0 - before.0, after.1 - before.1);
    assert!(
        probes.0 == 1 && probes.1 <= 1,
        "one probe of a and at most one of b, not {probes:?}"
    );
}

/// A worse-ranked backend that never answers its probe does not delay a blob that a better
/// one holds: the wait ends when the best holder is certain, not when every probe is back.
#[actix_web::test]
async fn a_silent_lower_ranked_backend_does_not_delay_the_answer() {
    let a = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "silent", "1.0", 1, 1024);
    a.push(&image, "acme/app", "1.0");
    // Accepts connections (into the kernel's backlog) and never answers them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let app = spawn_app(
        &Config::new()
            .backend("a", &a, "direct")
            // In another region: ranked after a whatever latencies the health checks measure.
            .backend_at("silent", &silent_url, "direct", "us")
            .org("acme", &["a", "silent"], "30s", &[]),
    )
    .await;
    let layer = &image.platform("amd64").layers[0].digest;
    let a_before = a.requests_naming(layer).len();
    let started = std::time::Instant::now();
    let answer = app.get(&format!("/v2/acme/app/blobs/{layer}")).await;
    let took = started.elapsed();
    assert_eq!(answer.status, 307);
    assert_eq!(answer.backend(), "a");
    // The silent backend's probe would only end at the 30 s request timeout.
    assert!(
        took < std::time::Duration::from_secs(5),
        "the answer waited for the silent backend: {took:?}"
    );
    assert_eq!(
        a.requests_naming(layer).len() - a_before,
        1,
        "a was probed once"
    );
}

/// A probe still out when the best holder is certain is not cut off: it finishes on its own,
/// so its connection goes back to the pool. Twenty cold blobs, each probed on both backends,
/// cost the slower backend no new connection (cut off, each probe closed its connection and
/// the next opened another: a connect, or a TLS handshake, per cold blob).
#[actix_web::test]
async fn probes_that_lose_the_race_keep_their_connections() {
    let hub = Registry::start(Shape::Anonymous, None);
    let mirror = Registry::start(Shape::Anonymous, None);
    // The mirror's answers come through a link that delivers them in 50 ms ticks: its probe
    // is always still out when the hub answers.
    let mirror_port: u16 = mirror.url().rsplit(':').next().unwrap().parse().unwrap();
    let link = crate::relay::SlowLink::start(mirror_port, 1 << 20);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "race", "1.0", 10, 512);
    hub.push(&image, "acme/app", "1.0");
    let app = spawn_app(
        &Config::new()
            .backend("hub", &hub, "direct")
            // Another region: ranked after the hub whatever the health checks measure.
            .backend_at(
                "mirror",
                &format!("http://127.0.0.1:{}", link.port),
                "direct",
                "us",
            )
            .org("acme", &["hub", "mirror"], "30s", &[]),
    )
    .await;
    let blobs: Vec<&str> = ["amd64", "arm64"]
        .iter()
        .flat_map(|arch| {
            image
                .platform(arch)
                .layers
                .iter()
                .map(|l| l.digest.as_str())
        })
        .collect();
    // The first cold blob opens this worker's connection to the mirror if keep-warm has not.
    let first = app.get(&format!("/v2/acme/app/blobs/{}", blobs[0])).await;
    assert_eq!(first.status, 307);
    // Its probe of the mirror finishes in the background: wait for that before counting.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while link.relayed() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the mirror was never asked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let connections = link.accepted();
    for digest in &blobs[1..] {
        let relayed = link.relayed();
        let answer = app.get(&format!("/v2/acme/app/blobs/{digest}")).await;
        assert_eq!(answer.status, 307);
        assert_eq!(answer.backend(), "hub");
        // One probe at a time: let this one's answer arrive (a probe cut off never reads
        // it) so that the next finds the connection idle in the pool.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while link.relayed() == relayed && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let opened = link.accepted() - connections;
    // Two workers (a request may land on either) and the health prober: at most one new
    // connection each, never one per blob.
    assert!(
        opened <= 3,
        "{opened} new connections to the mirror for {} cold blobs",
        blobs.len() - 1
    );
}

/// Blob probes go out on connections each worker keeps (`head_client`). A backend that
/// closed them (here a restart, as after its idle timeout) costs a probe one retry on a
/// fresh connection, not an error: the next cold blobs are answered by that backend, its
/// log shows each probe, and it is not passed over as unreachable.
#[actix_web::test]
async fn a_probe_on_a_connection_the_backend_closed_is_sent_again() {
    let mut hub = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "closed", "1.0", 2, 256);
    hub.push(&image, "acme/app", "1.0");
    let app = spawn_app(&Config::new().backend("hub", &hub, "direct").org(
        "acme",
        &["hub"],
        "30s",
        &[],
    ))
    .await;
    let layers = &image.platform("amd64").layers;
    let first = app
        .get(&format!("/v2/acme/app/blobs/{}", layers[0].digest))
        .await;
    assert_eq!((first.status, first.backend()), (307, "hub"));
    // Every kept connection (both workers', from keep-warm and the first probe) is closed.
    hub.restart();
    for layer in [&layers[1], &image.platform("arm64").layers[0]] {
        let answer = app
            .get(&format!("/v2/acme/app/blobs/{}", layer.digest))
            .await;
        assert_eq!(
            (answer.status, answer.backend()),
            (307, "hub"),
            "{}: {}",
            layer.digest,
            String::from_utf8_lossy(&answer.body)
        );
        let probes = hub.requests_naming(&layer.digest);
        assert!(
            probes.iter().any(|line| line.contains("HEAD")),
            "the hub's log shows no probe of {}: {probes:?}",
            layer.digest
        );
    }
}
