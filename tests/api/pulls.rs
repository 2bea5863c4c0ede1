//! Every stock client pulls through every backend shape and gets exactly what was pushed.

use std::sync::atomic::Ordering;

use crate::clients::{skopeo_pull, Containerd, Podman};
use crate::helpers::{spawn_app, Config};
use crate::images::{self, sha256};
use crate::registry::{Registry, Shape, TokenIssuer};

/// What a blob GET through the gateway must look like for each backend shape.
fn check_blob_delivery(
    shape: Shape,
    registry: &Registry,
    answer: &crate::helpers::Answer,
    digest: &str,
) {
    assert_eq!(answer.backend(), "hub");
    match shape {
        Shape::Anonymous => {
            assert_eq!(
                answer.status, 307,
                "anonymous backend: redirect straight to it"
            );
            let location = answer.header("location").unwrap();
            assert!(location.starts_with(&registry.url()), "{location}");
            assert!(
                location.ends_with(&format!("/v2/acme/app/blobs/{digest}")),
                "{location}"
            );
        }
        Shape::TokenWithCdn => {
            assert_eq!(
                answer.status, 307,
                "token backend with a CDN: redirect to the CDN"
            );
            let location = answer.header("location").unwrap();
            let cdn = format!(
                "http://127.0.0.1:{}/docker/registry/v2/blobs/",
                registry.cdn_port.unwrap()
            );
            assert!(
                location.starts_with(&cdn),
                "{location} should point at the CDN {cdn}"
            );
        }
        Shape::Token | Shape::Htpasswd => {
            assert_eq!(
                answer.status, 200,
                "credentialed backend without CDN: streamed through"
            );
            assert_eq!(
                sha256(&answer.body),
                digest,
                "proxied bytes hash to the digest"
            );
            assert_eq!(answer.header("docker-content-digest"), Some(digest));
        }
    }
}

async fn every_client_pulls_through(shape: Shape) {
    let issuer = TokenIssuer::start().await;
    let registry = Registry::start(shape, Some(&issuer));
    let work = tempfile::tempdir().unwrap();
    let seed = format!("{shape:?}-{}", std::process::id()).to_lowercase();
    let image = images::multiarch(&work.path().join("image"), &seed, "1.0", 3, 256 * 1024);
    registry.push(&image, "acme/app", "1.0");
    let app = spawn_app(&Config::new().backend("hub", &registry, "auto").org(
        "acme",
        &["hub"],
        "30s",
        &[],
    ))
    .await;
    let reference = format!("{}/acme/app:1.0", app.host());
    let tokens_before = issuer.issued.load(Ordering::SeqCst);

    let pulled = skopeo_pull(&reference, &work.path().join("skopeo"));
    assert_eq!(pulled.top, image.index.digest, "skopeo: index digest");
    assert_eq!(
        pulled.blobs,
        image.all_digests(),
        "skopeo: every manifest, config and layer"
    );

    let (id, digests) = Podman::new().pull(&reference);
    assert_eq!(
        id,
        image.platform("amd64").config.digest,
        "podman: image id is the amd64 config"
    );
    assert!(
        digests.contains(&image.index.digest)
            || digests.contains(&image.platform("amd64").manifest.digest),
        "podman recorded {digests:?}"
    );

    let pulled = Containerd::start().pull(&reference);
    assert_eq!(pulled.top, image.index.digest, "ctr: index digest");
    let missing: Vec<_> = image
        .all_digests()
        .difference(&pulled.blobs)
        .cloned()
        .collect();
    assert!(missing.is_empty(), "ctr content store lacks {missing:?}");

    if matches!(shape, Shape::Token | Shape::TokenWithCdn) {
        // Clients never see the backend's tokens; the gateway fetched one for its scope
        // and reused it (a burst of first requests may race to fetch a second).
        let fetched = issuer.issued.load(Ordering::SeqCst) - tokens_before;
        assert!(
            (1..=2).contains(&fetched),
            "gateway fetched {fetched} tokens for three pulls"
        );
    }

    let layer = image.platform("arm64").layers[2].digest.clone();
    let answer = app.get(&format!("/v2/acme/app/blobs/{layer}")).await;
    check_blob_delivery(shape, &registry, &answer, &layer);
    let head = app.head(&format!("/v2/acme/app/blobs/{layer}")).await;
    assert_eq!(head.status, 200);
    let size = image.platform("arm64").layers[2].size.to_string();
    assert_eq!(
        head.header("content-length"),
        Some(size.as_str()),
        "blob HEAD gives the size"
    );
    if shape == Shape::TokenWithCdn {
        assert!(
            registry
                .cdn_log()
                .contains(&layer.trim_start_matches("sha256:")[..16]),
            "clients fetched the layers from the CDN"
        );
    }
}

#[actix_web::test]
async fn anonymous_backend_serves_skopeo_podman_and_containerd() {
    every_client_pulls_through(Shape::Anonymous).await;
}

#[actix_web::test]
async fn token_backend_serves_skopeo_podman_and_containerd() {
    every_client_pulls_through(Shape::Token).await;
}

#[actix_web::test]
async fn token_backend_with_cdn_serves_skopeo_podman_and_containerd() {
    every_client_pulls_through(Shape::TokenWithCdn).await;
}

#[actix_web::test]
async fn htpasswd_backend_serves_skopeo_podman_and_containerd() {
    every_client_pulls_through(Shape::Htpasswd).await;
}

/// The registry API over HTTPS (`server.tls_cert`/`tls_key`): skopeo pulls every digest.
#[actix_web::test]
async fn skopeo_pulls_over_https() {
    let registry = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "https", "1.0", 2, 4096);
    registry.push(&image, "acme/app", "1.0");
    let config =
        Config::new()
            .backend("hub", &registry, "direct")
            .org("acme", &["hub"], "30s", &[]);
    let (node, _) = crate::helpers::spawn_tls_node(work.path(), "regatta-tls", &config);
    // --src-tls-verify=false: the certificate is self-signed; the connection is TLS.
    let pulled = skopeo_pull(
        &format!("127.0.0.1:{}/acme/app:1.0", node.port),
        &work.path().join("out"),
    );
    assert_eq!(pulled.top, image.index.digest);
    assert_eq!(pulled.blobs, image.all_digests());
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(
        !log.contains("invalid Header"),
        "clients spoke TLS to a TLS listener:\n{log}"
    );
}

/// Many requests needing the same backend token at once cost one token fetch.
#[actix_web::test]
async fn concurrent_cold_requests_share_one_backend_token() {
    let issuer = TokenIssuer::start().await;
    let registry = Registry::start(Shape::Token, Some(&issuer));
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "one-token", "1.0", 2, 256);
    registry.push(&image, "acme/app", "1.0");
    let app = spawn_app(&Config::new().backend("hub", &registry, "proxy").org(
        "acme",
        &["hub"],
        "30s",
        &[],
    ))
    .await;
    let before = issuer.issued.load(Ordering::SeqCst);
    // Forty different manifests (no single-flight of the manifest itself applies), all
    // needing a pull token for acme/app, asked of a node that has no token yet.
    let answers = futures_util::future::join_all((0..40).map(|i| {
        let digest = if i == 0 {
            image.platform("amd64").manifest.digest.clone()
        } else {
            format!("sha256:{i:064x}")
        };
        let app = &app;
        async move {
            app.get(&format!("/v2/acme/app/manifests/{digest}"))
                .await
                .status
        }
    }))
    .await;
    assert_eq!(answers[0], 200);
    assert!(answers[1..].iter().all(|s| *s == 404), "{answers:?}");
    assert_eq!(
        issuer.issued.load(Ordering::SeqCst) - before,
        1,
        "one token for acme/app, shared by every request"
    );
}
