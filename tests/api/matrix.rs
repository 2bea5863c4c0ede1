//! The client matrix beyond skopeo, podman and ctr: crane (go-containerregistry) and regctl
//! (regclient) pull by tag and by digest, read manifests and tags, and copy to OCI layouts,
//! over HTTP and over HTTPS trusting only the test CA, on every backend shape; ORAS (Python)
//! pulls artifacts and a referrer.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::clients::{Crane, Regctl, Transport};
use crate::helpers::{spawn_app, spawn_tls_node, Config};
use crate::images::{self, sha256, Image};
use crate::procs::{require, run_ok, self_signed_cert};
use crate::registry::{Registry, Shape, TokenIssuer};

/// Every crane and regctl operation against `host`, checked against what was pushed.
///
/// `downgrade`: blobs are redirected from this HTTPS node to a plain-HTTP backend or CDN,
/// which regctl refuses ("redirect from an https to non-https server is not allowed") while
/// crane and docker follow it; its copies are then checked to fail for that reason alone.
fn go_clients_agree(
    host: &str,
    transport: Transport,
    image: &Image,
    out: &Path,
    what: &str,
    downgrade: bool,
) {
    let by_tag = format!("{host}/acme/app:1.0");
    let by_digest = format!("{host}/acme/app@{}", image.index.digest);
    let tags: BTreeSet<String> = ["1.0", "2.0"].map(String::from).into();

    let crane = Crane::new(transport);
    assert_eq!(
        crane.digest(&by_tag),
        image.index.digest,
        "{what}: crane digest"
    );
    assert_eq!(
        sha256(&crane.manifest(&by_tag)),
        image.index.digest,
        "{what}: crane manifest is byte-exact"
    );
    assert_eq!(
        sha256(&crane.manifest(&format!(
            "{host}/acme/app@{}",
            image.platform("arm64").manifest.digest
        ))),
        image.platform("arm64").manifest.digest,
        "{what}: crane manifest by digest"
    );
    assert_eq!(
        crane.ls(&format!("{host}/acme/app")),
        tags,
        "{what}: crane ls"
    );
    for (n, reference) in [&by_tag, &by_digest].into_iter().enumerate() {
        let pulled = crane.pull(reference, &out.join(format!("crane-{n}")));
        assert_eq!(
            pulled.top, image.index.digest,
            "{what}: crane pull {reference}"
        );
        assert_eq!(
            pulled.blobs,
            image.all_digests(),
            "{what}: crane pull {reference}"
        );
    }

    let regctl = Regctl::new(host, transport);
    assert_eq!(
        regctl.tags(&format!("{host}/acme/app")),
        tags,
        "{what}: regctl tag ls"
    );
    assert_eq!(
        regctl.digest(&by_tag),
        image.index.digest,
        "{what}: regctl digest"
    );
    assert_eq!(
        sha256(&regctl.manifest(&by_tag)),
        image.index.digest,
        "{what}: regctl manifest get is byte-exact"
    );
    if downgrade {
        let target = format!("ocidir://{}:copied", out.join("regctl-refused").display());
        let refused = regctl.run(&["image", "copy", &by_tag, &target]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains("redirect from an https to non-https"),
            "{what}: regctl followed a redirect from https to http: {stderr}"
        );
        return;
    }
    for (n, reference) in [&by_tag, &by_digest].into_iter().enumerate() {
        let copied = regctl.copy_to_layout(reference, &out.join(format!("regctl-{n}")));
        assert_eq!(
            copied.top, image.index.digest,
            "{what}: regctl image copy {reference}"
        );
        assert_eq!(
            copied.blobs,
            image.all_digests(),
            "{what}: regctl image copy {reference}"
        );
    }
}

async fn go_clients_on(shape: Shape) {
    let issuer = TokenIssuer::start().await;
    let registry = Registry::start(shape, Some(&issuer));
    let work = tempfile::tempdir().unwrap();
    let seed = format!("go-{shape:?}-{}", std::process::id()).to_lowercase();
    let image = images::multiarch(&work.path().join("image"), &seed, "1.0", 2, 64 * 1024);
    registry.push(&image, "acme/app", "1.0");
    registry.push(&image, "acme/app", "2.0");
    let config = Config::new()
        .backend("hub", &registry, "auto")
        .org("acme", &["hub"], "30s", &[]);
    let app = spawn_app(&config).await;
    let (tls, ca) = spawn_tls_node(work.path(), "regatta-tls", &config);
    let tls_host = format!("127.0.0.1:{}", tls.port);
    let http = work.path().join("http");
    go_clients_agree(&app.host(), Transport::Http, &image, &http, "HTTP", false);
    let https = Transport::Https { ca: &ca };
    // Anonymous backends get direct redirects and the CDN shape pre-signed ones, both to
    // plain HTTP here; the credentialed shapes are streamed through the node.
    let downgrade = matches!(shape, Shape::Anonymous | Shape::TokenWithCdn);
    let out = work.path().join("https");
    go_clients_agree(&tls_host, https, &image, &out, "HTTPS", downgrade);

    if downgrade {
        // The remedy README gives: stream that backend's blobs to TLS clients. A backend
        // that itself redirects (the CDN shape) is followed by the gateway, so regctl, which
        // refuses an https -> http redirect, gets every blob over the node's TLS too.
        let proxied =
            Config::new()
                .backend("hub", &registry, "proxy")
                .org("acme", &["hub"], "30s", &[]);
        let (node, ca) = spawn_tls_node(work.path(), "regatta-tls-proxy", &proxied);
        let host = format!("127.0.0.1:{}", node.port);
        let out = work.path().join("https-proxy");
        let https = Transport::Https { ca: &ca };
        let cdn_before = registry.cdn_log().lines().count();
        go_clients_agree(&host, https, &image, &out, "HTTPS, proxy", false);
        if shape == Shape::TokenWithCdn {
            assert!(
                registry.cdn_log().lines().count() > cdn_before,
                "the gateway fetched the proxied blobs from the CDN"
            );
        }
    }

    // The HTTPS clients verified the certificate: with another CA they refuse the node.
    let other_dir = work.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let (other_ca, _) = self_signed_cert(&other_dir, "127.0.0.1");
    let other = Transport::Https { ca: &other_ca };
    let reference = format!("{tls_host}/acme/app:1.0");
    let refused = Crane::new(other).run(&["digest", &reference]);
    assert!(
        !refused.status.success(),
        "crane trusted a certificate it has no CA for"
    );
    let refused = Regctl::new(&tls_host, other).run(&["image", "digest", &reference]);
    assert!(
        !refused.status.success(),
        "regctl trusted a certificate it has no CA for"
    );
}

#[actix_web::test]
async fn crane_and_regctl_through_an_anonymous_backend() {
    go_clients_on(Shape::Anonymous).await;
}

#[actix_web::test]
async fn crane_and_regctl_through_a_token_backend() {
    go_clients_on(Shape::Token).await;
}

#[actix_web::test]
async fn crane_and_regctl_through_a_token_backend_with_cdn() {
    go_clients_on(Shape::TokenWithCdn).await;
}

#[actix_web::test]
async fn crane_and_regctl_through_an_htpasswd_backend() {
    go_clients_on(Shape::Htpasswd).await;
}

/// ORAS pulls an artifact by tag, lists the referrers of an image through the gateway and
/// pulls the referrer by digest: the files it writes are the payloads pushed.
#[actix_web::test]
async fn oras_pulls_an_artifact_and_a_referrer() {
    require("python3");
    let issuer = TokenIssuer::start().await;
    let registry = Registry::start(Shape::Token, Some(&issuer));
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "oras", "1.0", 1, 0);
    registry.push(&image, "acme/app", "1.0");
    let notes = images::standalone_artifact("application/vnd.regatta.test.notes", b"{\"notes\":1}");
    for blob in &notes.blobs {
        registry.push_blob("acme/app", blob).await;
    }
    registry
        .push_manifest("acme/app", "notes", images::OCI_MANIFEST, &notes.manifest)
        .await;
    let subject = image.platform("amd64").manifest.clone();
    let sbom = images::artifact(
        &subject,
        "application/vnd.regatta.test.sbom",
        b"{\"sbom\":2}",
    );
    registry
        .push_artifact("acme/app", &sbom, &subject.digest)
        .await;
    let app = spawn_app(&Config::new().backend("hub", &registry, "auto").org(
        "acme",
        &["hub"],
        "30s",
        &[],
    ))
    .await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api/scripts/oras_pull.py");
    let out = work.path().join("oras");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args([&app.host(), "acme/app", "notes", &subject.digest])
        .arg(&out);
    let printed = run_ok(cmd, Duration::from_secs(120));
    let result: Value = serde_json::from_str(printed.trim())
        .unwrap_or_else(|e| panic!("oras_pull.py printed no JSON ({e}): {printed}"));

    let referrers = result["referrers"].as_array().unwrap();
    assert_eq!(referrers.len(), 1, "{result}");
    assert_eq!(referrers[0]["digest"], sbom.descriptor.digest);
    assert_eq!(
        referrers[0]["artifactType"],
        "application/vnd.regatta.test.sbom"
    );
    assert_eq!(
        std::fs::read(out.join("tag/payload.json")).unwrap(),
        b"{\"notes\":1}",
        "the artifact pulled by tag: {result}"
    );
    assert_eq!(
        std::fs::read(out.join("referrer-0/payload.json")).unwrap(),
        b"{\"sbom\":2}",
        "the referrer pulled by digest: {result}"
    );
}
