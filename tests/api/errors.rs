//! Bad input and unknown content get OCI error bodies with the right status, never a 5xx.

use std::time::Duration;

use awc::http::Method;

use crate::helpers::{eventually, spawn_app, Config};
use crate::images;
use crate::registry::{Registry, Shape};

const ZERO: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

#[actix_web::test]
async fn bad_requests_get_oci_errors() {
    let registry = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "errors", "1.0", 1, 0);
    registry.push(&image, "acme/app", "1.0");
    let app = spawn_app(&Config::new().backend("hub", &registry, "direct").org(
        "acme",
        &["hub"],
        "30s",
        &[],
    ))
    .await;

    let base = app.get("/v2/").await;
    assert_eq!(base.status, 200);
    assert_eq!(
        base.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );

    #[rustfmt::skip]
    let cases: Vec<(Method, String, u16, &str)> = vec![
        (Method::GET, "/v2/other/app/manifests/1.0".into(), 403, "DENIED"),
        (Method::GET, format!("/v2/other/app/blobs/{ZERO}"), 403, "DENIED"),
        (Method::GET, "/v2/Acme/app/manifests/1.0".into(), 400, "NAME_INVALID"),
        (Method::GET, "/v2/acme/ap%20p/manifests/1.0".into(), 400, "NAME_INVALID"),
        (Method::GET, "/v2/app/manifests/1.0".into(), 400, "NAME_INVALID"),
        // Not a tag nor a digest: no such manifest (distribution's answer; conformance v1.1).
        (Method::GET, "/v2/acme/app/manifests/.bad".into(), 404, "MANIFEST_UNKNOWN"),
        (Method::GET, "/v2/acme/app/manifests/sha256:1234".into(), 400, "DIGEST_INVALID"),
        (Method::GET, "/v2/acme/app/blobs/sha256:ZZ".into(), 400, "DIGEST_INVALID"),
        (Method::GET, "/v2/acme/app/blobs/md5:abcd".into(), 400, "DIGEST_INVALID"),
        (Method::GET, "/v2/acme/app/manifests/2.0".into(), 404, "MANIFEST_UNKNOWN"),
        (Method::GET, format!("/v2/acme/app/manifests/{ZERO}"), 404, "MANIFEST_UNKNOWN"),
        (Method::GET, format!("/v2/acme/app/blobs/{ZERO}"), 404, "BLOB_UNKNOWN"),
        (Method::GET, "/v2/acme/nothing/tags/list".into(), 404, "NAME_UNKNOWN"),
        (Method::GET, "/v2/acme/app/tags/list?n=-1".into(), 400, "PAGINATION_NUMBER_INVALID"),
        (Method::GET, "/v2/acme/app/frobnicate/x".into(), 404, "NAME_UNKNOWN"),
        (Method::POST, "/v2/acme/app/blobs/uploads/".into(), 405, "UNSUPPORTED"),
        (Method::PUT, "/v2/acme/app/manifests/1.0".into(), 405, "UNSUPPORTED"),
        (Method::DELETE, format!("/v2/acme/app/manifests/{ZERO}"), 405, "UNSUPPORTED"),
        (Method::PATCH, "/v2/Bad/x/blobs/uploads/1".into(), 405, "UNSUPPORTED"),
    ];
    for (method, path, status, code) in cases {
        let answer = app.request(method.clone(), &path, &[]).await;
        assert_eq!(
            answer.status,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.error_code(), code, "{method} {path}");
        assert_eq!(
            answer.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
        assert_eq!(
            answer.header("docker-distribution-api-version"),
            Some("registry/2.0")
        );
    }
    // A HEAD of something unknown has no body but the right status.
    assert_eq!(
        app.head(&format!("/v2/acme/app/manifests/{ZERO}"))
            .await
            .status,
        404
    );
    assert_eq!(app.head("/v2/other/app/manifests/1.0").await.status, 403);
    assert_eq!(
        app.head("/v2/acme/app/manifests/.INVALID_MANIFEST_NAME")
            .await
            .status,
        404,
        "the conformance suite's HEAD of a reference that is no tag"
    );
}

#[actix_web::test]
async fn a_dead_backend_is_a_503_with_retry_after() {
    let mut registry = Registry::start(Shape::Anonymous, None);
    let app = spawn_app(&Config::new().backend("hub", &registry, "direct").org(
        "acme",
        &["hub"],
        "30s",
        &[],
    ))
    .await;
    registry.stop();
    let answer = app.get("/v2/acme/app/manifests/1.0").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.error_code(), "UNAVAILABLE");
    assert_eq!(answer.header("retry-after"), Some("5"));
    let answer = app.get(&format!("/v2/acme/app/blobs/{ZERO}")).await;
    assert_eq!(
        answer.status,
        503,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
}

#[actix_web::test]
async fn cold_lookups_are_limited_per_client_and_warm_answers_never() {
    let hub = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "limits", "1.0", 1, 256);
    hub.push(&image, "acme/app", "1.0");
    let config = |trusted: &[&str]| {
        Config::new()
            .limits(1, 5, trusted)
            .backend("hub", &hub, "direct")
            .org("acme", &["hub"], "30s", &[])
    };
    let node = spawn_app(&config(&[])).await;
    // Warm: a manifest (one cold fetch) teaches the node where its layers are.
    let manifest = format!(
        "/v2/acme/app/manifests/{}",
        image.platform("amd64").manifest.digest
    );
    assert_eq!(node.get(&manifest).await.status, 200);
    let layer = format!(
        "/v2/acme/app/blobs/{}",
        image.platform("amd64").layers[0].digest
    );
    assert_eq!(node.get(&layer).await.status, 307);

    // Invented digests: each is a cold lookup; the allowance (a burst of 5) runs out.
    let unknown = |i: usize| format!("/v2/acme/app/manifests/sha256:{i:064x}");
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(node.get(&unknown(i)).await.status);
    }
    assert_eq!(statuses[..4], [404, 404, 404, 404], "{statuses:?}");
    assert_eq!(statuses[6..], [429, 429, 429, 429], "{statuses:?}");
    let limited = node.get(&unknown(99)).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.error_code(), "TOOMANYREQUESTS");
    assert!(limited.header("retry-after").is_some());

    // Warm answers are never limited.
    for _ in 0..20 {
        assert_eq!(node.get(&manifest).await.status, 200);
        assert_eq!(node.get(&layer).await.status, 307);
    }

    // A trusted network is not limited at all.
    let trusting = spawn_app(&config(&["127.0.0.0/8"])).await;
    for i in 0..20 {
        assert_eq!(trusting.get(&unknown(i)).await.status, 404);
    }
}

/// One of two backends stopped: before the health checks hold it down, a digest the running
/// backend lacks is a 503 (the stopped one might hold it); once they do, it is unknown, a
/// 404, as a registry with a replica down answers (the OCI conformance suite asks this).
#[actix_web::test]
async fn a_digest_the_running_backend_lacks_is_a_404_once_the_other_is_down() {
    let mut stopped = Registry::start(Shape::Anonymous, None);
    let running = Registry::start(Shape::Anonymous, None);
    let app = spawn_app(
        &Config::new()
            .admin()
            .health("1s", 2)
            .backend("stopped", &stopped, "direct")
            .backend("running", &running, "direct")
            .org("acme", &["stopped", "running"], "30s", &[]),
    )
    .await;
    stopped.stop();
    let blob = format!("/v2/acme/app/blobs/{ZERO}");
    let manifest = format!("/v2/acme/app/manifests/{ZERO}");
    assert_eq!(app.get(&blob).await.status, 503, "not yet known down");
    eventually(
        "the node to see the backend down",
        Duration::from_secs(20),
        || async {
            let view = app
                .admin(Method::GET, "/admin/v1/backends/stopped", None)
                .await;
            view.json()["status"] == "down"
        },
    )
    .await;
    for path in [&blob, &manifest] {
        let answer = app.get(path).await;
        assert_eq!(
            answer.status,
            404,
            "{path}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_ne!(answer.error_code(), "UNAVAILABLE");
        assert_eq!(app.head(path).await.status, 404, "HEAD {path}");
    }
}
