//! Docker Engine, the client most users have: a `dockerd` of the test's own pulls through the
//! gateway by tag and by digest and runs what it pulled, over HTTP and over HTTPS (the node's
//! TLS listener), on every backend shape; with a backend stopped in the middle of a pull; and
//! in a two-region org.
//!
//! Over HTTPS: dockerd treats every 127.0.0.0/8 registry as insecure, and for those it speaks
//! TLS without verifying the certificate and never reads `certs.d` (moby's `newTLSConfig`
//! loads a host's CA only for secure registries). What these tests show over HTTPS is that
//! docker pulls through the TLS listener (which speaks nothing else); certificate
//! verification against the test CA is shown with crane and regctl (`matrix.rs`).

use std::time::Duration;

use crate::clients::Dockerd;
use crate::helpers::{spawn_app, spawn_tls_node, Config};
use crate::images::{self, Image};
use crate::procs::{run, wait_until};
use crate::registry::{Registry, Shape, TokenIssuer};
use crate::relay::SlowLink;

/// The image's ID (its config digest) and its repository digests (`name@digest`).
fn inspect(docker: &Dockerd, reference: &str) -> (String, Vec<String>) {
    let id = docker.run(&["image", "inspect", "--format", "{{.Id}}", reference]);
    let digests = docker.run(&[
        "image",
        "inspect",
        "--format",
        "{{range .RepoDigests}}{{println .}}{{end}}",
        reference,
    ]);
    (id, digests.lines().map(str::to_owned).collect())
}

/// `docker run --rm --network none REF`: what the container printed.
fn run_container(docker: &Dockerd, reference: &str) -> String {
    docker.run(&["run", "--rm", "--network", "none", reference])
}

/// Removes every image, so the next pull fetches every layer again.
fn remove_images(docker: &Dockerd) {
    docker.run(&["image", "prune", "--all", "--force"]);
}

fn daemon_log(docker: &Dockerd) -> String {
    std::fs::read_to_string(docker.dir.path().join("dockerd.log")).unwrap_or_default()
}

/// Fetches of the amd64 image's layers that reached `registry` or its CDN.
fn layer_fetches(registry: &Registry, image: &Image) -> usize {
    let cdn = registry.cdn_log();
    image
        .platform("amd64")
        .layers
        .iter()
        .map(|l| {
            let hex = l.digest.trim_start_matches("sha256:");
            let direct = registry
                .requests_naming(&l.digest)
                .iter()
                .filter(|line| line.contains("\"GET "))
                .count();
            direct + cdn.lines().filter(|line| line.contains(hex)).count()
        })
        .sum()
}

/// Pulls `host/acme/app` by tag and by digest (images removed in between, so every layer is
/// fetched again), checks the image docker stored and runs it.
fn pull_and_run(docker: &Dockerd, host: &str, image: &Image, seed: &str, what: &str) {
    let amd64 = image.platform("amd64");
    let by_tag = format!("{host}/acme/app:1.0");
    docker.run(&["pull", &by_tag]);
    let (id, digests) = inspect(docker, &by_tag);
    assert_eq!(
        id, amd64.config.digest,
        "{what}: the image is the amd64 config"
    );
    let repo_digest = format!("{host}/acme/app@{}", image.index.digest);
    assert!(
        digests.contains(&repo_digest),
        "{what}: docker recorded {digests:?}, not the pushed index {repo_digest}"
    );
    assert_eq!(
        run_container(docker, &by_tag),
        format!("{seed} amd64"),
        "{what}: the container ran the pulled image"
    );
    remove_images(docker);

    docker.run(&["pull", &repo_digest]);
    let (id, _) = inspect(docker, &repo_digest);
    assert_eq!(id, amd64.config.digest, "{what}: by digest");
    assert_eq!(run_container(docker, &repo_digest), format!("{seed} amd64"));
    remove_images(docker);
}

async fn docker_pulls_and_runs(shape: Shape) {
    let issuer = TokenIssuer::start().await;
    let registry = Registry::start(shape, Some(&issuer));
    let work = tempfile::tempdir().unwrap();
    let seed = format!("docker-{shape:?}-{}", std::process::id()).to_lowercase();
    let image = images::runnable(&work.path().join("image"), &seed, "1.0", 0);
    registry.push(&image, "acme/app", "1.0");
    let config = Config::new()
        .backend("hub", &registry, "auto")
        .org("acme", &["hub"], "30s", &[]);
    let app = spawn_app(&config).await;
    let (tls, _) = spawn_tls_node(work.path(), "regatta-tls", &config);
    let docker = Dockerd::start();

    let before = layer_fetches(&registry, &image);
    pull_and_run(&docker, &app.host(), &image, &seed, "HTTP");
    let after_http = layer_fetches(&registry, &image);
    pull_and_run(
        &docker,
        &format!("127.0.0.1:{}", tls.port),
        &image,
        &seed,
        "HTTPS",
    );
    let after_https = layer_fetches(&registry, &image);
    // Two pulls each way, every layer fetched each time (the gateway's proxy or resolve
    // fetches count for the shapes that go through it).
    let layers = image.platform("amd64").layers.len();
    assert!(
        after_http - before >= layers && after_https - after_http >= layers,
        "layers fetched: {before} -> {after_http} (HTTP) -> {after_https} (HTTPS)"
    );
}

#[actix_web::test]
async fn docker_pulls_and_runs_from_an_anonymous_backend() {
    docker_pulls_and_runs(Shape::Anonymous).await;
}

#[actix_web::test]
async fn docker_pulls_and_runs_from_a_token_backend() {
    docker_pulls_and_runs(Shape::Token).await;
}

#[actix_web::test]
async fn docker_pulls_and_runs_from_a_token_backend_with_cdn() {
    docker_pulls_and_runs(Shape::TokenWithCdn).await;
}

#[actix_web::test]
async fn docker_pulls_and_runs_from_an_htpasswd_backend() {
    docker_pulls_and_runs(Shape::Htpasswd).await;
}

/// Two backends hold the image; the first is reached through a slow link that is cut while
/// docker is downloading a layer from it. docker retries the layer, the gateway (whose
/// health checks saw the backend go) sends it to the second, and the pull completes.
#[actix_web::test]
async fn docker_pull_survives_a_backend_stopped_mid_pull() {
    let mut first = Registry::start(Shape::Anonymous, None);
    let second = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let seed = format!("midpull-{}", std::process::id());
    let image = images::runnable(&work.path().join("image"), &seed, "1.0", 8 << 20);
    first.push(&image, "acme/app", "1.0");
    second.push(&image, "acme/app", "1.0");
    let link = SlowLink::start(first.port, 2 << 20);
    let app = spawn_app(
        &Config::new()
            .health("100ms", 1)
            .backend_via(
                "first",
                &first,
                &format!("http://127.0.0.1:{}", link.port),
                "direct",
                "eu",
            )
            .backend("second", &second, "direct")
            .org("acme", &["first", "second"], "30s", &[]),
    )
    .await;
    let docker = Dockerd::start();
    let reference = format!("{}/acme/app:1.0", app.host());
    let mut pull = docker.cli();
    pull.args(["pull", &reference]);
    let pulling = std::thread::spawn(move || run(pull, Duration::from_secs(180)));

    // Past the manifests, the config and the busybox layer: the 8 MiB layer is under way.
    wait_until("docker to be mid-layer", Duration::from_secs(60), || {
        link.relayed() > 3 << 20 || pulling.is_finished()
    });
    assert!(!pulling.is_finished(), "the pull ended before the cut");
    link.cut();
    first.stop();
    let out = pulling.join().unwrap();
    assert!(
        out.status.success(),
        "docker pull failed after the cut:\n{}{}\ndockerd log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon_log(&docker)
    );
    let (id, _) = inspect(&docker, &reference);
    assert_eq!(id, image.platform("amd64").config.digest);
    assert_eq!(run_container(&docker, &reference), format!("{seed} amd64"));
    let bulk = &image.platform("amd64").layers[1].digest;
    let from_second: Vec<_> = second
        .requests_naming(bulk)
        .into_iter()
        .filter(|l| l.contains("\"GET "))
        .collect();
    assert!(
        !from_second.is_empty(),
        "the interrupted layer was fetched again from the second backend"
    );
    let answer = app.get(&format!("/v2/acme/app/blobs/{bulk}")).await;
    assert_eq!(answer.backend(), "second");
}

/// A node in region eu, an org whose policy lists a us backend first and an eu backend
/// second, both holding the image: docker's layers come from the eu backend.
#[actix_web::test]
async fn docker_layers_come_from_the_nodes_region() {
    let us = Registry::start(Shape::Anonymous, None);
    let eu = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let seed = format!("regions-{}", std::process::id());
    let image = images::runnable(&work.path().join("image"), &seed, "1.0", 0);
    us.push(&image, "acme/app", "1.0");
    eu.push(&image, "acme/app", "1.0");
    let app = spawn_app(
        &Config::new()
            .region("eu")
            .backend_in("us-hub", &us, "direct", "us")
            .backend_in("eu-hub", &eu, "direct", "eu")
            .org("acme", &["us-hub", "eu-hub"], "30s", &[]),
    )
    .await;
    let docker = Dockerd::start();
    let reference = format!("{}/acme/app:1.0", app.host());
    docker.run(&["pull", &reference]);
    assert_eq!(run_container(&docker, &reference), format!("{seed} amd64"));

    let amd64 = image.platform("amd64");
    for digest in
        std::iter::once(&amd64.config.digest).chain(amd64.layers.iter().map(|l| &l.digest))
    {
        let got = |r: &Registry| -> Vec<String> {
            r.requests_naming(digest)
                .into_iter()
                .filter(|l| l.contains("\"GET "))
                .collect()
        };
        assert!(
            got(&us).is_empty(),
            "{digest} was fetched from the us backend: {:?}",
            got(&us)
        );
        assert!(
            !got(&eu).is_empty(),
            "{digest} was not fetched from the eu backend"
        );
        let answer = app.get(&format!("/v2/acme/app/blobs/{digest}")).await;
        assert_eq!(answer.backend(), "eu-hub", "{digest}");
    }
}
