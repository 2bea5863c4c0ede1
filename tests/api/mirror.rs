//! Mirror mode: one gateway serving several upstream registries (`[[upstreams]]`), each
//! stood in for by a local registry. Requests pick their group by containerd's `ns`
//! parameter, a host prefix in the path (podman mirrors, containerd `override_path`), or
//! fall to the default group (dockerd's `registry-mirrors`). Real clients pull through:
//! containerd with a `hosts.toml`, podman with a `registries.conf` mirror, and a dockerd
//! with `--registry-mirror`; every lookup that would leave the machine goes to a closed
//! local port instead.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::clients::{Containerd, Dockerd, Podman};
use crate::helpers::{spawn_app, wait_for_http, Config, NodeProcess};
use crate::images::{self, Image};
use crate::procs::{free_port, wait_until};
use crate::registry::{Registry, Shape, TokenIssuer};

const INDEX_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Stand-ins for two upstreams, `hub` for docker.io (the default group, with Docker Hub's
/// aliases) and `gh` for ghcr.io (streamed through the gateway), and `own` for the org
/// `acme`; and a work directory.
struct StandIns {
    hub: Registry,
    gh: Registry,
    own: Registry,
    work: tempfile::TempDir,
}

impl StandIns {
    fn start(hub: Registry) -> StandIns {
        StandIns {
            hub,
            gh: Registry::start(Shape::Anonymous, None),
            own: Registry::start(Shape::Anonymous, None),
            work: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self) -> Config {
        Config::new()
            .backend("hub", &self.hub, "auto")
            .backend("gh", &self.gh, "proxy")
            .backend("own", &self.own, "direct")
            .org("acme", &["own"], "30s", &[])
            .upstream(
                "docker.io",
                &["index.docker.io", "registry-1.docker.io"],
                &["hub"],
                true,
            )
            .upstream("ghcr.io", &[], &["gh"], false)
    }

    fn dir(&self, name: &str) -> std::path::PathBuf {
        self.work.path().join(name)
    }
}

/// The access log lines in a node's log (JSON, on stderr by default).
fn request_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "access")
        .collect()
}

/// Waits until the node's log has a request line for a path starting with `prefix`, then
/// returns every such line.
fn logged(log: &Path, prefix: &str) -> Vec<Value> {
    let matching = || -> Vec<Value> {
        request_lines(log)
            .into_iter()
            .filter(|v| v["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
            .collect()
    };
    wait_until(
        &format!("a log line for {prefix}"),
        Duration::from_secs(10),
        || !matching().is_empty(),
    );
    matching()
}

/// Asserts that every logged request for `prefix` was routed to `group` by `via`, that some
/// answered 200 or 307, and that those were served by `backend`.
fn assert_routed(log: &Path, prefix: &str, group: &str, via: &str, backend: &str) {
    let lines = logged(log, prefix);
    for line in &lines {
        assert_eq!(line["ns"], group, "{line}");
        assert_eq!(line["via"], via, "{line}");
    }
    let served: Vec<&Value> = lines
        .iter()
        .filter(|l| l["status"] == 200 || l["status"] == 307)
        .collect();
    assert!(!served.is_empty(), "nothing served for {prefix}: {lines:?}");
    for line in served {
        assert_eq!(line["backend"], backend, "{line}");
    }
}

/// A node process (its JSON request log readable by the test) with `config`.
async fn node(dir: &Path, config: Config) -> NodeProcess {
    let node = NodeProcess::start(
        dir,
        "regatta",
        &config.log("json", "warn,regatta=info").server_sections(""),
        &[],
    );
    wait_for_http(&format!("http://127.0.0.1:{}/healthz", node.port)).await;
    node
}

/// `hosts.toml` for `registry` sending every pull to the gateway as a mirror, and the
/// registry's own address to a closed local port (containerd falls back there when the
/// mirror fails: never to the real registry).
fn containerd_hosts(hosts: &Path, registry: &str, gateway_port: u16) {
    let dir = hosts.join(registry);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:{}\"\n\n[host.\"http://127.0.0.1:{gateway_port}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            free_port()
        ),
    )
    .unwrap();
}

#[actix_web::test]
async fn requests_choose_their_upstream_group() {
    let up = StandIns::start(Registry::start(Shape::Anonymous, None));
    let (hub, gh, own) = (&up.hub, &up.gh, &up.own);
    // The same repository name in both upstreams, with different content.
    let from_hub = images::multiarch(&up.dir("hub"), "mirror-hub", "1.0", 2, 0);
    let from_gh = images::multiarch(&up.dir("gh"), "mirror-gh", "1.0", 2, 0);
    let from_own = images::multiarch(&up.dir("own"), "mirror-own", "1.0", 1, 0);
    hub.push(&from_hub, "library/alpine", "1.0");
    gh.push(&from_gh, "library/alpine", "1.0");
    own.push(&from_own, "acme/app", "1.0");
    // Health probes only at start: a later probe that moved a latency bucket would make
    // the warm-path counts below miss for a reason of its own.
    let app = spawn_app(&up.config().admin().health("1h", 3)).await;
    let accept = [("accept", INDEX_TYPES)];
    let manifest = |path: &'static str| {
        let app = &app;
        async move { app.request(awc::http::Method::GET, path, &accept).await }
    };

    // ns, a host prefix (name or alias), or nothing: each names its group.
    for (path, image, backend) in [
        (
            "/v2/library/alpine/manifests/1.0?ns=docker.io",
            &from_hub,
            "hub",
        ),
        (
            "/v2/library/alpine/manifests/1.0?ns=registry-1.docker.io",
            &from_hub,
            "hub",
        ),
        (
            "/v2/library/alpine/manifests/1.0?ns=ghcr.io",
            &from_gh,
            "gh",
        ),
        (
            "/v2/docker.io/library/alpine/manifests/1.0",
            &from_hub,
            "hub",
        ),
        (
            "/v2/index.docker.io/library/alpine/manifests/1.0",
            &from_hub,
            "hub",
        ),
        ("/v2/ghcr.io/library/alpine/manifests/1.0", &from_gh, "gh"),
        // containerd with override_path sends both.
        (
            "/v2/ghcr.io/library/alpine/manifests/1.0?ns=ghcr.io",
            &from_gh,
            "gh",
        ),
        ("/v2/library/alpine/manifests/1.0", &from_hub, "hub"),
    ] {
        let answer = manifest(path).await;
        assert_eq!(
            answer.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(
            answer.header("docker-content-digest"),
            Some(image.index.digest.as_str()),
            "{path}"
        );
        assert_eq!(images::sha256(&answer.body), image.index.digest, "{path}");
        assert_eq!(answer.backend(), backend, "{path}");
    }
    // An org of the node is still the org's; ns naming a group takes the path from it.
    let answer = manifest("/v2/acme/app/manifests/1.0").await;
    assert_eq!(
        answer.header("docker-content-digest"),
        Some(from_own.index.digest.as_str())
    );
    assert_eq!(answer.backend(), "own");
    let answer = manifest("/v2/acme/app/manifests/1.0?ns=ghcr.io").await;
    assert_eq!(answer.status, 404, "ghcr.io has no acme/app");

    // An unknown ns: a 404 with an OCI body at once, no backend asked.
    let before: usize = [&hub, &gh, &own]
        .iter()
        .map(|r| r.requests_naming("/v2/").len())
        .sum();
    let started = Instant::now();
    let answer = manifest("/v2/library/alpine/manifests/1.0?ns=quay.io").await;
    let took = started.elapsed();
    assert_eq!(answer.status, 404);
    assert_eq!(answer.error_code(), "NAME_UNKNOWN");
    assert!(
        took < Duration::from_millis(500),
        "unknown ns took {took:?}"
    );
    let after: usize = [&hub, &gh, &own]
        .iter()
        .map(|r| r.requests_naming("/v2/").len())
        .sum();
    assert_eq!(before, after, "a backend was asked about an unknown ns");
    // Unknown content in a group: 404, so a client falls back.
    let answer = manifest("/v2/library/nothing/manifests/latest?ns=docker.io").await;
    assert_eq!(answer.status, 404);
    assert!(
        answer.error_code().ends_with("_UNKNOWN"),
        "{}",
        answer.error_code()
    );

    // Manifest HEAD, by tag and by digest, carries the digest and the length.
    for path in [
        "/v2/library/alpine/manifests/1.0?ns=ghcr.io".to_owned(),
        format!(
            "/v2/library/alpine/manifests/{}?ns=ghcr.io",
            from_gh.index.digest
        ),
        format!(
            "/v2/docker.io/library/alpine/manifests/{}",
            from_hub.index.digest
        ),
    ] {
        let answer = app.request(awc::http::Method::HEAD, &path, &accept).await;
        assert_eq!(answer.status, 200, "{path}");
        let want = if path.contains("ghcr") {
            &from_gh
        } else {
            &from_hub
        };
        assert_eq!(
            answer.header("docker-content-digest"),
            Some(want.index.digest.as_str()),
            "{path}"
        );
        assert_eq!(
            answer.header("content-length"),
            Some(want.index.size.to_string().as_str()),
            "{path}"
        );
    }

    // Blobs: each group's own, twice (the second from the warm redirect cache), never the
    // other group's.
    let hub_layer = &from_hub.platform("amd64").layers[0].digest;
    let gh_layer = &from_gh.platform("amd64").layers[0].digest;
    let warm_hits = || async {
        let text = app.metrics().await;
        let hits = [("cache", "redirect"), ("result", "hit")];
        crate::helpers::metric(&text, "regatta_cache_lookups_total", &hits).unwrap_or(0.0)
    };
    let hits_before = warm_hits().await;
    for _ in 0..2 {
        let answer = app
            .get(&format!(
                "/v2/library/alpine/blobs/{hub_layer}?ns=docker.io"
            ))
            .await;
        assert_eq!(answer.status, 307);
        assert_eq!(answer.backend(), "hub");
        assert!(
            answer.header("location").unwrap().starts_with(&hub.url()),
            "{:?}",
            answer.header("location")
        );
        let answer = app
            .get(&format!("/v2/library/alpine/blobs/{gh_layer}?ns=ghcr.io"))
            .await;
        assert_eq!(answer.status, 200, "gh streams (proxy)");
        assert_eq!(answer.backend(), "gh");
        assert_eq!(images::sha256(&answer.body), *gh_layer);
        let answer = app
            .get(&format!("/v2/library/alpine/blobs/{hub_layer}?ns=ghcr.io"))
            .await;
        assert_eq!(
            answer.status, 404,
            "ghcr.io does not have docker.io's layer"
        );
        let answer = app
            .get(&format!("/v2/library/alpine/blobs/{gh_layer}"))
            .await;
        assert_eq!(
            answer.status, 404,
            "docker.io (the default) does not have ghcr.io's layer"
        );
    }
    // Once docker.io's redirect is warm, every way of naming docker.io's repository finds
    // it (one routed path), and ns=ghcr.io on the same path still does not.
    let hub_blob = format!("/v2/library/alpine/blobs/{hub_layer}");
    let last = std::cell::Cell::new(hits_before);
    crate::helpers::eventually("a warm redirect", Duration::from_secs(10), || async {
        let answer = app.get(&format!("{hub_blob}?ns=docker.io")).await;
        assert_eq!(answer.status, 307);
        let now = warm_hits().await;
        now > last.replace(now)
    })
    .await;
    let mut hits = last.get();
    for path in [
        hub_blob.clone(),
        format!("{hub_blob}?ns=index.docker.io"),
        format!("/v2/index.docker.io/library/alpine/blobs/{hub_layer}"),
        format!("/v2/docker.io/library/alpine/blobs/{hub_layer}"),
    ] {
        let answer = app.get(&path).await;
        assert_eq!((answer.status, answer.backend()), (307, "hub"), "{path}");
        let now = warm_hits().await;
        assert_eq!(now, hits + 1.0, "{path} was not answered warm");
        hits = now;
        let other = app.get(&format!("{hub_blob}?ns=ghcr.io")).await;
        assert_eq!(other.status, 404, "ns=ghcr.io after {path}");
    }

    // Tag lists name the repository as the client does.
    let answer = app.get("/v2/library/alpine/tags/list?ns=ghcr.io").await;
    let list = answer.json();
    assert_eq!(list["name"], "library/alpine");
    assert_eq!(list["tags"], serde_json::json!(["1.0"]));

    // Metrics carry the group as the org.
    let metrics_app = spawn_app(&up.config().admin()).await;
    metrics_app
        .get("/v2/library/alpine/manifests/1.0?ns=ghcr.io")
        .await;
    let text = metrics_app.metrics().await;
    let count = crate::helpers::metric(
        &text,
        "regatta_requests_total",
        &[("route", "manifest"), ("status", "200"), ("org", "ghcr.io")],
    );
    assert_eq!(count, Some(1.0), "{text}");

    // A group's cached tag is purged by its routed name; the next request asks the
    // backend again.
    let tag_heads = || {
        gh.requests_naming("/v2/library/alpine/manifests/1.0")
            .iter()
            .filter(|l| l.contains("\"HEAD "))
            .count()
    };
    let before = tag_heads();
    metrics_app
        .get("/v2/ghcr.io/library/alpine/manifests/1.0")
        .await;
    assert_eq!(tag_heads(), before, "the tag was resolved already");
    let purged = metrics_app
        .admin(
            awc::http::Method::POST,
            "/admin/v1/purge",
            Some(serde_json::json!({ "repository": "ghcr.io/library/alpine" })),
        )
        .await;
    assert_eq!(
        purged.status,
        200,
        "{}",
        String::from_utf8_lossy(&purged.body)
    );
    let answer = metrics_app
        .get("/v2/library/alpine/manifests/1.0?ns=ghcr.io")
        .await;
    assert_eq!(answer.status, 200);
    wait_until(
        "the purged tag to be resolved again",
        Duration::from_secs(10),
        || tag_heads() > before,
    );

    // An org cannot take a group's name through the admin API either.
    let refused = metrics_app
        .admin(
            awc::http::Method::PUT,
            "/admin/v1/orgs/docker.io",
            Some(serde_json::json!({ "backends": ["own"] })),
        )
        .await;
    assert_eq!(
        refused.status,
        409,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
}

#[actix_web::test]
async fn containerd_pulls_docker_io_and_ghcr_io_through_its_mirror() {
    let up = StandIns::start(Registry::start(Shape::Anonymous, None));
    let (hub, gh) = (&up.hub, &up.gh);
    let from_hub = images::multiarch(&up.dir("hub"), "ctr-hub", "1.0", 2, 1 << 20);
    let from_gh = images::multiarch(&up.dir("gh"), "ctr-gh", "1.0", 2, 1 << 20);
    hub.push(&from_hub, "library/mirrored", "1.0");
    gh.push(&from_gh, "owner/tool", "1.0");
    let node = node(up.work.path(), up.config()).await;
    let hosts = up.dir("hosts");
    containerd_hosts(&hosts, "docker.io", node.port);
    containerd_hosts(&hosts, "ghcr.io", node.port);

    let containerd = Containerd::start();
    let pulled = containerd.pull_with_hosts("docker.io/library/mirrored:1.0", &hosts);
    assert_eq!(pulled.top, from_hub.index.digest);
    for digest in from_hub.all_digests() {
        assert!(pulled.blobs.contains(&digest), "{digest} did not arrive");
    }
    assert_routed(&node.log, "/v2/library/mirrored/", "docker.io", "ns", "hub");
    let layer = &from_hub.platform("amd64").layers[1].digest;
    assert!(
        hub.requests_naming(layer)
            .iter()
            .any(|l| l.contains("\"GET ")),
        "the docker.io stand-in served the layer"
    );

    let pulled = containerd.pull_with_hosts("ghcr.io/owner/tool:1.0", &hosts);
    assert_eq!(pulled.top, from_gh.index.digest);
    for digest in from_gh.all_digests() {
        assert!(pulled.blobs.contains(&digest), "{digest} did not arrive");
    }
    assert_routed(&node.log, "/v2/owner/tool/", "ghcr.io", "ns", "gh");
    assert!(
        hub.requests_naming("owner/tool").is_empty(),
        "the docker.io stand-in was asked for ghcr.io's image"
    );

    // A registry the gateway does not mirror: a 404 at once, and containerd moves on to
    // the registry's own address (a closed port here) and fails there.
    containerd_hosts(&hosts, "quay.io", node.port);
    let started = Instant::now();
    let out = containerd.try_pull_with_hosts("quay.io/owner/other:1.0", &hosts);
    assert!(
        !out.status.success(),
        "quay.io is not mirrored, yet the pull succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connection refused"),
        "containerd did not fall back: {stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let refused = logged(&node.log, "/v2/owner/other/");
    assert!(
        refused
            .iter()
            .all(|l| l["status"] == 404 && l["ns"] == "-" && l["via"] == "ns"),
        "{refused:?}"
    );
    let slowest = refused
        .iter()
        .filter_map(|l| l["micros"].as_u64())
        .max()
        .unwrap();
    assert!(slowest < 100_000, "an unknown ns took {slowest} µs");
    assert!(
        [hub, gh]
            .iter()
            .all(|r| r.requests_naming("owner/other").is_empty()),
        "a backend was asked about quay.io's image"
    );
}

#[actix_web::test]
async fn podman_pulls_through_a_host_prefixed_mirror() {
    let up = StandIns::start(Registry::start(Shape::Anonymous, None));
    let (hub, gh) = (&up.hub, &up.gh);
    let from_hub = images::runnable(&up.dir("hub"), "podman-hub", "1.0", 0);
    let from_gh = images::runnable(&up.dir("gh"), "podman-gh", "1.0", 0);
    hub.push(&from_hub, "library/mirrored", "1.0");
    gh.push(&from_gh, "owner/tool", "1.0");
    let node = node(up.work.path(), up.config()).await;
    let gateway = format!("127.0.0.1:{}", node.port);
    let closed = format!("127.0.0.1:{}", free_port());
    let podman = Podman::with_registries(&format!(
        "unqualified-search-registries = []\n\
         [[registry]]\nprefix = \"docker.io\"\nlocation = \"{closed}\"\ninsecure = true\n\
         [[registry.mirror]]\nlocation = \"{gateway}/docker.io\"\ninsecure = true\n\
         [[registry]]\nprefix = \"ghcr.io\"\nlocation = \"{closed}\"\ninsecure = true\n\
         [[registry.mirror]]\nlocation = \"{gateway}/ghcr.io\"\ninsecure = true\n"
    ));

    for (reference, image, prefix, group, backend) in [
        (
            "docker.io/library/mirrored:1.0",
            &from_hub,
            "/v2/docker.io/library/mirrored/",
            "docker.io",
            "hub",
        ),
        (
            "ghcr.io/owner/tool:1.0",
            &from_gh,
            "/v2/ghcr.io/owner/tool/",
            "ghcr.io",
            "gh",
        ),
    ] {
        let (id, digests) = podman.pull(reference);
        assert_eq!(id, image.platform("amd64").config.digest, "{reference}");
        assert!(
            digests.contains(&image.index.digest),
            "{reference}: podman recorded {digests:?}, not {}",
            image.index.digest
        );
        assert_routed(&node.log, prefix, group, "prefix", backend);
    }
}

#[actix_web::test]
async fn dockerd_pulls_busybox_through_its_registry_mirror() {
    // The docker.io stand-in has Docker Hub's shape: token auth and blobs on a CDN.
    let issuer = TokenIssuer::start().await;
    let up = StandIns::start(Registry::start(Shape::TokenWithCdn, Some(&issuer)));
    let hub = &up.hub;
    let seed = format!("busybox-{}", std::process::id());
    let busybox: Image = images::runnable(&up.dir("busybox"), &seed, "latest", 0);
    hub.push(&busybox, "library/busybox", "latest");
    let node = node(up.work.path(), up.config()).await;
    let docker = Dockerd::start_with(&[
        "--registry-mirror",
        &format!("http://127.0.0.1:{}", node.port),
    ]);
    let amd64 = busybox.platform("amd64");

    for name in ["busybox", "library/busybox"] {
        docker.run(&["pull", name]);
        let id = docker.run(&["image", "inspect", "--format", "{{.Id}}", name]);
        assert_eq!(id, amd64.config.digest, "{name}");
        let digests = docker.run(&[
            "image",
            "inspect",
            "--format",
            "{{range .RepoDigests}}{{println .}}{{end}}",
            name,
        ]);
        let want = format!("busybox@{}", busybox.index.digest);
        assert!(digests.lines().any(|d| d == want), "{name}: {digests}");
        assert_eq!(
            docker.run(&["run", "--rm", "--network", "none", name]),
            format!("{seed} amd64"),
            "{name}: the container ran the pulled image"
        );
        docker.run(&["image", "rm", name]);
    }
    // dockerd sent neither ns nor a prefix: the default group served it.
    assert_routed(
        &node.log,
        "/v2/library/busybox/",
        "docker.io",
        "default",
        "hub",
    );
    let manifests = logged(&node.log, "/v2/library/busybox/manifests/");
    assert!(
        manifests.len() >= 2,
        "two pulls asked the mirror: {manifests:?}"
    );
    // Every layer of both pulls came through the stand-in's CDN (the pre-signed URL the
    // gateway resolved), none from anywhere else.
    let cdn = hub.cdn_log();
    for layer in &amd64.layers {
        let hex = layer.digest.trim_start_matches("sha256:");
        let fetched = cdn.lines().filter(|l| l.contains(hex)).count();
        assert!(
            fetched >= 2,
            "{} fetched {fetched} times from the CDN",
            layer.digest
        );
    }
}
