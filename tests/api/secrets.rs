//! A backend's secrets: credentials go only to token realms on the backend's own host or a
//! host listed for it (a realm elsewhere gets nothing, and the refusal is logged once), and
//! a backend on a private CA is reached over verified TLS through its `tls_ca`.

use std::time::Duration;

use crate::helpers::{spawn_app, Config, NodeProcess};
use crate::images::{self, sha256, OCI_INDEX};
use crate::procs::{ca_signed_cert, wait_until};
use crate::registry::{Registry, Shape, TokenIssuer, PASSWORD, USER};

fn credentials() -> String {
    format!("username = \"{USER}\"\npassword = \"{PASSWORD}\"\n")
}

/// GET `path` on a node; (status, `Docker-Content-Digest`).
async fn get_manifest(port: u16, path: &str) -> (u16, String) {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let mut answer = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .insert_header(("accept", OCI_INDEX))
        .send()
        .await
        .expect("the node answers");
    let _ = answer.body().await;
    let digest = answer
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (answer.status().as_u16(), digest)
}

#[actix_web::test]
async fn credentials_reach_only_token_realms_on_the_backends_host_or_listed_hosts() {
    // Three token-protected registries with the same account: one whose realm is on
    // another loopback address, the same again but listed in token_realm_hosts, and one
    // whose realm is on its own host (another port).
    let elsewhere = TokenIssuer::start_on("127.0.0.2").await;
    let listed = TokenIssuer::start_on("127.0.0.2").await;
    let own_host = TokenIssuer::start().await;
    let far = Registry::start(Shape::Token, Some(&elsewhere));
    let far_listed = Registry::start(Shape::Token, Some(&listed));
    let near = Registry::start(Shape::Token, Some(&own_host));
    let work = tempfile::tempdir().unwrap();
    let seed = format!("realms-{}", std::process::id());
    let image = images::multiarch(&work.path().join("image"), &seed, "1.0", 1, 4096);
    for registry in [&far, &far_listed, &near] {
        registry.push(&image, "acme/app", "1.0");
    }
    // The pushes authenticated with skopeo: count only what the gateway sends from here.
    let before = [
        elsewhere.credentials_seen(),
        listed.credentials_seen(),
        own_host.credentials_seen(),
    ];
    let issued_elsewhere = elsewhere.issued.load(std::sync::atomic::Ordering::SeqCst);

    let config = Config::new()
        .backend_at("far", &far.url(), "proxy", "eu")
        .backend_keys(&credentials())
        .backend_at("listed", &far_listed.url(), "proxy", "eu")
        .backend_keys(&format!(
            "{}token_realm_hosts = [\"127.0.0.2\"]\n",
            credentials()
        ))
        .backend_at("near", &near.url(), "proxy", "eu")
        .backend_keys(&credentials())
        .org("far", &["far"], "30s", &[("far", "acme")])
        .org("listed", &["listed"], "30s", &[("listed", "acme")])
        .org("near", &["near"], "30s", &[("near", "acme")]);
    let node = NodeProcess::start(work.path(), "realms", &config.render_without_server(), &[]);

    // A realm on another host: the call fails, and no credentials (nor any request for a
    // token with them) reach it.
    for _ in 0..2 {
        let (status, _) = get_manifest(node.port, "/v2/far/app/manifests/1.0").await;
        assert_eq!(status, 503, "a backend whose realm is refused cannot serve");
    }
    assert_eq!(
        elsewhere.credentials_seen(),
        before[0],
        "a realm on another host received credentials"
    );
    assert_eq!(
        elsewhere.issued.load(std::sync::atomic::Ordering::SeqCst),
        issued_elsewhere,
        "the refused realm was asked for a token at all"
    );

    // Listed, and on the backend's own host: served, with credentials.
    let (status, digest) = get_manifest(node.port, "/v2/listed/app/manifests/1.0").await;
    assert_eq!(
        (status, digest.as_str()),
        (200, image.index.digest.as_str())
    );
    assert!(
        listed.credentials_seen() > before[1],
        "listed realm: no credentials"
    );
    let (status, digest) = get_manifest(node.port, "/v2/near/app/manifests/1.0").await;
    assert_eq!(
        (status, digest.as_str()),
        (200, image.index.digest.as_str())
    );
    assert!(
        own_host.credentials_seen() > before[2],
        "own-host realm: no credentials"
    );

    // The refusal is logged, once for the backend and realm however often it happens.
    let refusals = || {
        std::fs::read_to_string(&node.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("credentials withheld from a token realm"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    wait_until("the refusal to be logged", Duration::from_secs(10), || {
        !refusals().is_empty()
    });
    let lines = refusals();
    assert_eq!(lines.len(), 1, "logged once: {lines:?}");
    assert!(
        lines[0].contains("far") && lines[0].contains(&format!("127.0.0.2:{}", elsewhere.port)),
        "{}",
        lines[0]
    );
    assert!(!lines[0].contains(PASSWORD), "{}", lines[0]);
}

#[actix_web::test]
async fn a_backend_on_a_private_ca_is_verified_with_its_tls_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_signed_cert(certs.path());
    let registry = Registry::start_tls(Shape::Anonymous, None, &cert, &key);
    assert!(registry.url().starts_with("https://"));
    let work = tempfile::tempdir().unwrap();
    let seed = format!("tls-ca-{}", std::process::id());
    let image = images::multiarch(&work.path().join("image"), &seed, "1.0", 1, 64 * 1024);
    registry.push(&image, "acme/app", "1.0");

    // The same registry twice: once trusting the test CA, once with the public roots only.
    let app = spawn_app(
        &Config::new()
            .backend_at("private", &registry.url(), "proxy", "eu")
            .backend_keys(&format!("tls_ca = \"{}\"\n", ca.display()))
            .backend_at("untrusted", &registry.url(), "proxy", "eu")
            .org("acme", &["private"], "30s", &[])
            .org("other", &["untrusted"], "30s", &[("untrusted", "acme")]),
    )
    .await;

    let manifest = app
        .request(
            awc::http::Method::GET,
            "/v2/acme/app/manifests/1.0",
            &[("accept", OCI_INDEX)],
        )
        .await;
    assert_eq!(
        manifest.status,
        200,
        "{}",
        String::from_utf8_lossy(&manifest.body)
    );
    assert_eq!(
        manifest.header("docker-content-digest"),
        Some(image.index.digest.as_str())
    );
    assert_eq!(manifest.backend(), "private");
    let layer = &image.platforms[0].layers[0].digest;
    let blob = app.get(&format!("/v2/acme/app/blobs/{layer}")).await;
    assert_eq!(blob.status, 200, "streamed through over TLS");
    assert_eq!(&sha256(&blob.body), layer);

    // Without the CA the certificate does not verify: nothing is served.
    let untrusted = app
        .request(
            awc::http::Method::GET,
            "/v2/other/app/manifests/1.0",
            &[("accept", OCI_INDEX)],
        )
        .await;
    assert_eq!(untrusted.status, 503, "an unverified backend served");
}
