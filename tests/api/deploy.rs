//! deploy/, each artifact used for real: the image (deploy/Containerfile through
//! deploy/image/build.sh, with docker and with buildah) pushed, pulled through a node and run
//! as a gateway; the compose cluster up with docker-compose, pulled through, scraped by its
//! Prometheus and taken down; the Kubernetes manifests rendered per region, validated, and
//! their configuration checked by the binary.
//!
//! The image is built from the test binary the run already has (`--prebuilt`, a dynamically
//! linked debug build packaged with the libraries `ldd` lists): no second Rust build in CI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::clients::{skopeo_pull, Dockerd};
use crate::helpers::{spawn_app, Config, ADMIN_TOKEN};
use crate::images::{self, sha256};
use crate::procs::{free_port, require, run, run_ok, which};
use crate::registry::{skopeo_push, Registry, Shape};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The Kubernetes version the manifests are validated against.
const KUBERNETES: &str = "1.32.0";
const BUILD_LIMIT: Duration = Duration::from_secs(600);

/// `deploy/image/build.sh ARGS --prebuilt <test binary>` with `env`; returns its output.
fn build_sh(args: &[&str], env: &[(&str, String)]) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(format!("{REPO}/deploy/image/build.sh"))
        .args(args)
        .arg("--prebuilt")
        .arg(env!("CARGO_BIN_EXE_regatta"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    run_ok(cmd, BUILD_LIMIT)
}

/// The image, built by build.sh with docker and tagged `tag` (and pushed to `push`).
fn build_with_docker(docker: &Dockerd, tag: &str, push: Option<&str>) -> String {
    let mut args = vec!["--tag", tag];
    if let Some(registry) = push {
        args.extend(["--push", registry]);
    }
    build_sh(&args, &docker.env())
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{REPO}/{path}"))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// `yamllint -s` with deploy/'s settings.
fn yamllint(paths: &[&Path]) {
    require("yamllint");
    let mut cmd = Command::new("yamllint");
    cmd.args(["-s", "-c"])
        .arg(format!("{REPO}/deploy/.yamllint.yaml"))
        .args(paths);
    run_ok(cmd, Duration::from_secs(60));
}

/// The value of `docker inspect --format FORMAT TARGET`.
fn inspect(docker: &Dockerd, format: &str, target: &str) -> String {
    docker.run(&["inspect", "--format", format, target])
}

#[actix_web::test]
async fn the_image_is_pushed_pulled_through_a_node_and_runs_as_a_gateway() {
    let docker = Dockerd::start();
    let work = tempfile::tempdir().unwrap();

    // Build with deploy/image/build.sh and push to the registry the image is published on.
    let ops = Registry::start(Shape::Anonymous, None);
    let built = "regatta-test:build";
    build_with_docker(&docker, built, Some(&format!("{}/ops", ops.host())));
    let pushed_ref = format!("{}/ops/regatta:{VERSION}", ops.host());
    let built_id = inspect(&docker, "{{.Id}}", &pushed_ref);
    let pushed_digest = inspect(&docker, "{{index .RepoDigests 0}}", &pushed_ref)
        .rsplit_once('@')
        .unwrap()
        .1
        .to_owned();
    let labels: Value =
        serde_json::from_str(&inspect(&docker, "{{json .Config.Labels}}", &pushed_ref)).unwrap();
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{labels}"
    );
    let size: u64 = inspect(&docker, "{{.Size}}", &pushed_ref).parse().unwrap();
    println!(
        "figure: image built from the debug test binary: {:.1} MB",
        size as f64 / 1e6
    );

    // Pull it back through a regatta node, with nothing cached locally.
    let node = spawn_app(&Config::new().backend("ops", &ops, "direct").org(
        "ops",
        &["ops"],
        "30s",
        &[],
    ))
    .await;
    docker.run(&["rmi", built, &pushed_ref]);
    let through = format!("{}/ops/regatta:{VERSION}", node.host());
    let (id, digest) = docker.pull(&through);
    assert_eq!(
        digest, pushed_digest,
        "docker pull through the node: digest"
    );
    assert_eq!(id, built_id, "docker pull through the node: image id");

    // Run what was pulled as a gateway in front of a backend holding a multi-arch image.
    // The backend is named by a host name the container resolves from its /etc/hosts.
    let content = Registry::start(Shape::Anonymous, None);
    let image = images::multiarch(
        &work.path().join("image"),
        "containerised",
        "1.0",
        3,
        1 << 20,
    );
    content.push(&image, "acme/app", "1.0");
    let port = free_port();
    let admin_port = free_port();
    let config = work.path().join("regatta.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nregion = \"eu\"\nworkers = 2\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
             [[backends]]\nid = \"hub\"\nurl = \"http://backend.regatta.test:{}\"\ndelivery = \"proxy\"\n\
             [[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\n",
            content.port
        ),
    )
    .unwrap();
    let mount = format!("{}:/etc/regatta/regatta.toml:ro", config.display());
    let token = format!("REGATTA__ADMIN__TOKEN={ADMIN_TOKEN}");
    let grace = "REGATTA__SERVER__SHUTDOWN_GRACE=1s";
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(5))
        .finish();
    let started = Instant::now();
    docker.run(&[
        "run",
        "-d",
        "--name",
        "gateway",
        "--network",
        "host",
        "--read-only",
        "--user",
        "65532:65532",
        "--add-host",
        "backend.regatta.test:127.0.0.1",
        "-e",
        &token,
        "-e",
        grace,
        "-v",
        &mount,
        &through,
    ]);
    let answered = loop {
        let answer = client
            .get(format!("http://127.0.0.1:{port}/v2/"))
            .send()
            .await;
        if answer.is_ok_and(|r| r.status() == 200) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the containerised node never answered /v2/; its log:\n{}",
            docker.run(&["logs", "gateway"])
        );
        actix_web::rt::time::sleep(Duration::from_millis(5)).await;
    };
    println!(
        "figure: docker run to first answered /v2/: {} ms",
        answered.as_millis()
    );

    // It runs as the unprivileged user on a read-only root.
    assert_eq!(
        inspect(
            &docker,
            "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}",
            "gateway"
        ),
        "65532:65532 true"
    );
    let pid = inspect(&docker, "{{.State.Pid}}", "gateway");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(uid.split_whitespace().nth(1), Some("65532"), "{uid}");

    // skopeo and docker pull through the containerised node and get every digest.
    let reference = format!("127.0.0.1:{port}/acme/app:1.0");
    let pulled = skopeo_pull(&reference, &work.path().join("skopeo"));
    assert_eq!(pulled.top, image.index.digest, "skopeo: index digest");
    assert_eq!(pulled.blobs, image.all_digests(), "skopeo: every digest");
    let (id, digest) = docker.pull(&reference);
    assert_eq!(digest, image.index.digest, "docker: index digest");
    assert_eq!(
        id,
        image.platform("amd64").config.digest,
        "docker: the amd64 image"
    );
    let proxied = client
        .get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .send()
        .await
        .unwrap()
        .body()
        .limit(4 << 20)
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&proxied)
            .lines()
            .any(|l| l.starts_with("regatta_proxied_bytes_total{backend=\"hub\"}")),
        "the blobs were streamed from the backend named by host name"
    );

    // `docker stop` sends the image's stop signal (SIGTERM); the node serves out its grace
    // period (1s here) and exits cleanly, not killed.
    let stopping = Instant::now();
    docker.run(&["stop", "--time", "20", "gateway"]);
    let stopped = stopping.elapsed();
    assert_eq!(inspect(&docker, "{{.State.ExitCode}}", "gateway"), "0");
    assert!(
        stopped >= Duration::from_secs(1),
        "stopped in {stopped:?}: no grace period"
    );
    println!(
        "figure: docker stop with a 1s grace: {} ms",
        stopped.as_millis()
    );
}

#[test]
fn the_image_builds_with_buildah() {
    require("buildah");
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage.conf");
    std::fs::write(
        &storage,
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/root\"\nrunroot = \"{0}/run\"\n",
            work.path().display()
        ),
    )
    .unwrap();
    let env = [("CONTAINERS_STORAGE_CONF", storage.display().to_string())];
    let tag = "localhost/regatta-test:buildah";
    build_sh(&["--builder", "buildah", "--tag", tag], &env);

    // The image's configuration, and the binary inside its layers.
    let layout = work.path().join("layout");
    let mut push = Command::new("buildah");
    push.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(["push", tag])
        .arg(format!("oci:{}:built", layout.display()));
    run_ok(push, BUILD_LIMIT);
    let blob = |digest: &str| {
        std::fs::read(
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let config: Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532");
    assert_eq!(c["Entrypoint"], json!(["/usr/local/bin/regatta"]));
    assert_eq!(c["StopSignal"], "SIGTERM");
    assert_eq!(c["Labels"]["org.opencontainers.image.version"], VERSION);

    let binary = std::fs::read(env!("CARGO_BIN_EXE_regatta")).unwrap();
    let mut found = BTreeMap::new();
    for layer in manifest["layers"].as_array().unwrap() {
        let bytes = blob(layer["digest"].as_str().unwrap());
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut content = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
            found.insert(path.trim_start_matches("./").to_owned(), content);
        }
    }
    assert_eq!(
        found.get("usr/local/bin/regatta").map(|b| sha256(b)),
        Some(sha256(&binary)),
        "the binary is in the image, byte for byte"
    );
    assert_eq!(
        found.get("etc/regatta/regatta.toml").map(Vec::as_slice),
        Some(read("deploy/image/regatta.toml").as_bytes())
    );
}

/// The image's default configuration and the compose cluster's pass `regatta check-config`.
#[test]
fn the_shipped_configurations_pass_check_config() {
    for file in ["deploy/image/regatta.toml", "deploy/compose/regatta.toml"] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
        cmd.env_clear()
            .arg("check-config")
            .arg(format!("{REPO}/{file}"));
        // The compose file gives the admin token through the environment.
        if file.contains("compose") {
            cmd.env("REGATTA__ADMIN__TOKEN", ADMIN_TOKEN);
        }
        run_ok(cmd, Duration::from_secs(30));
    }
}

struct Compose {
    project: String,
    env: Vec<(&'static str, String)>,
}

impl Compose {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["--no-ansi", "-p", &self.project, "-f"])
            .arg(format!("{REPO}/deploy/compose/compose.yaml"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        run_ok(self.cmd(args), BUILD_LIMIT)
    }

    fn logs(&self) -> String {
        String::from_utf8_lossy(&run(self.cmd(&["logs", "--no-color"]), BUILD_LIMIT).stdout)
            .into_owned()
    }
}

#[actix_web::test]
async fn the_compose_cluster_serves_pulls_is_scraped_and_goes_away() {
    require("docker-compose");
    let docker = Dockerd::start();
    let work = tempfile::tempdir().unwrap();

    // The regatta image, and stand-ins for the public images (nothing can be pulled here):
    // Debian's binaries in FROM scratch images, named through compose.yaml's variables.
    build_with_docker(&docker, "regatta-test:compose", None);
    let redis = which("redis-server");
    let prometheus = which("prometheus");
    let registry = which("docker-registry");
    docker.standin_image(
        "regatta-standin/redis:debian",
        &redis.display().to_string(),
        "/usr/local/bin/redis-server",
        &[],
    );
    docker.standin_image(
        "regatta-standin/prometheus:debian",
        &prometheus.display().to_string(),
        "/bin/prometheus",
        &["/bin/prometheus"],
    );
    docker.standin_image(
        "regatta-standin/registry:debian",
        &registry.display().to_string(),
        "/bin/registry",
        &["/bin/registry"],
    );

    let nodes: Vec<(&str, u16, u16)> = ["EU1", "EU2", "US1"]
        .into_iter()
        .map(|n| (n, free_port(), free_port()))
        .collect();
    let (redis_port, backend_port, prometheus_port) = (free_port(), free_port(), free_port());
    let targets = work.path().join("targets.yml");
    std::fs::write(
        &targets,
        format!(
            "- targets: [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n  labels: {{region: eu}}\n\
             - targets: [\"127.0.0.1:{}\"]\n  labels: {{region: us}}\n",
            nodes[0].2, nodes[1].2, nodes[2].2
        ),
    )
    .unwrap();
    let mut env = docker.env();
    env.extend([
        ("REGATTA_IMAGE", "regatta-test:compose".to_owned()),
        ("REDIS_IMAGE", "regatta-standin/redis:debian".to_owned()),
        (
            "PROMETHEUS_IMAGE",
            "regatta-standin/prometheus:debian".to_owned(),
        ),
        (
            "REGISTRY_IMAGE",
            "regatta-standin/registry:debian".to_owned(),
        ),
        ("REDIS_PORT", redis_port.to_string()),
        ("BACKEND_PORT", backend_port.to_string()),
        ("PROMETHEUS_PORT", prometheus_port.to_string()),
        ("PROMETHEUS_TARGETS", targets.display().to_string()),
        ("REGATTA_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
    ]);
    for (name, port, admin) in &nodes {
        env.push((leak(format!("{name}_PORT")), port.to_string()));
        env.push((leak(format!("{name}_ADMIN_PORT")), admin.to_string()));
    }
    let compose = Compose {
        project: format!("regattatest{}", std::process::id()),
        env,
    };

    compose.run(&["up", "-d", "--no-build"]);
    let listening = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    let deadline = Instant::now() + Duration::from_secs(60);
    for port in [backend_port, prometheus_port]
        .into_iter()
        .chain(nodes.iter().map(|n| n.1))
    {
        while !listening(port) {
            assert!(
                Instant::now() < deadline,
                "port {port} never listened; compose logs:\n{}",
                compose.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // Push to the example backend, pull through every node.
    let image = images::multiarch(&work.path().join("image"), "compose", "1.0", 2, 1 << 18);
    skopeo_push(
        &image,
        &format!("127.0.0.1:{backend_port}"),
        "demo/app",
        "1.0",
        &[],
    );
    for (name, port, _) in &nodes {
        let pulled = skopeo_pull(
            &format!("127.0.0.1:{port}/demo/app:1.0"),
            &work.path().join(format!("pulled-{name}")),
        );
        assert_eq!(pulled.top, image.index.digest, "{name}: index digest");
        assert_eq!(pulled.blobs, image.all_digests(), "{name}: every digest");
    }

    // Prometheus scrapes every node and has loaded the alert rules.
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(5))
        .finish();
    let api = |path: &str| format!("http://127.0.0.1:{prometheus_port}/api/v1/{path}");
    let expected: BTreeSet<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.2)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    loop {
        if let Ok(mut r) = client
            .get(api("query"))
            .query(&[("query", "up{job=\"regatta\"}")])
            .unwrap()
            .send()
            .await
        {
            last = r.json().await.unwrap_or_default();
            let up: BTreeSet<String> = last["data"]["result"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["value"][1] == "1")
                .filter_map(|s| s["metric"]["instance"].as_str().map(str::to_owned))
                .collect();
            if up == expected {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw every node up; last answer: {last}\ncompose logs:\n{}",
            compose.logs()
        );
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    }
    let rules: Value = client
        .get(api("rules"))
        .send()
        .await
        .unwrap()
        .json()
        .limit(4 << 20)
        .await
        .unwrap();
    let loaded: BTreeSet<&str> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["name"].as_str())
        .collect();
    let alerts = &yaml_docs(&read("dashboards/alerts.yml"))[0];
    let defined: BTreeSet<&str> = alerts["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(loaded, defined, "Prometheus loaded dashboards/alerts.yml");

    // `down` leaves no container, volume or process behind.
    let ids = compose.run(&["ps", "-q"]);
    let pids: Vec<String> = ids
        .split_whitespace()
        .map(|id| inspect(&docker, "{{.State.Pid}}", id))
        .collect();
    assert_eq!(pids.len(), 6, "six containers ran: {ids}");
    compose.run(&["down", "-v"]);
    let label = format!("label=com.docker.compose.project={}", compose.project);
    assert_eq!(docker.run(&["ps", "-aq", "--filter", &label]), "");
    assert_eq!(docker.run(&["volume", "ls", "-q", "--filter", &label]), "");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived docker-compose down"
        );
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The compose file with every profile (Grafana's too, which the cluster test leaves off):
/// valid for docker-compose, every file it mounts exists, and it lints clean.
#[test]
fn the_compose_file_is_valid_with_every_profile() {
    require("docker-compose");
    let file = format!("{REPO}/deploy/compose/compose.yaml");
    let mut cmd = Command::new("docker-compose");
    cmd.args(["-f", &file, "--profile", "grafana", "config"]);
    let config = yaml_docs(&run_ok(cmd, Duration::from_secs(60))).remove(0);
    let services = config["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "redis",
            "registry",
            "eu-1",
            "eu-2",
            "us-1",
            "prometheus",
            "grafana"
        ])
    );
    for (name, service) in services {
        assert_eq!(service["network_mode"], "host", "{name}");
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('/') {
                assert!(Path::new(source).exists(), "{name} mounts {source}");
            }
        }
    }
    yamllint(&[Path::new(&format!("{REPO}/deploy"))]);
}

/// One rendered overlay, as a cluster would receive it.
struct Rendered {
    docs: Vec<Value>,
}

impl Rendered {
    fn one(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }
}

fn is_subset(small: &Value, big: &Value) -> bool {
    small
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| big.get(k) == Some(v))
}

#[test]
fn the_kubernetes_manifests_validate_and_configure_every_region() {
    require("kustomize");
    require("kubernetes-validate");
    require("promtool");
    let work = tempfile::tempdir().unwrap();
    let alerts = yaml_docs(&read("dashboards/alerts.yml")).remove(0);
    for region in ["eu", "us"] {
        let mut build = Command::new("kustomize");
        build
            .arg("build")
            .arg(format!("{REPO}/deploy/kubernetes/overlays/{region}"));
        let text = run_ok(build, Duration::from_secs(60));
        let file = work.path().join(format!("{region}.yaml"));
        std::fs::write(&file, &text).unwrap();

        // Schemas of a current Kubernetes, strictly; only the Prometheus Operator's own
        // kinds have none there (they are checked below against what they refer to).
        let mut validate = Command::new("kubernetes-validate");
        validate.args(["-k", KUBERNETES, "--strict"]).arg(&file);
        let out = run(validate, Duration::from_secs(120));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{region}: kubernetes-validate:\n{said}"
        );
        for line in said.lines().filter(|l| !l.starts_with("INFO")) {
            assert!(
                line.starts_with("WARN")
                    && (line.contains("kind ServiceMonitor ")
                        || line.contains("kind PrometheusRule ")),
                "{region}: {line}"
            );
        }
        assert_eq!(said.matches("passed for resource").count(), 8, "{said}");
        yamllint(&[&file]);

        let rendered = Rendered {
            docs: yaml_docs(&text),
        };
        let deployment = rendered.one("Deployment", "regatta");
        let spec = &deployment["spec"];
        assert_eq!(spec["replicas"], 3);
        let pod = &spec["template"]["spec"];
        let pod_labels = &spec["template"]["metadata"]["labels"];
        assert!(is_subset(&spec["selector"]["matchLabels"], pod_labels));
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert!(!pod["topologySpreadConstraints"]
            .as_array()
            .unwrap()
            .is_empty());
        let container = &pod["containers"][0];
        assert_eq!(
            container["image"],
            format!("cr.example.org/ops/regatta:{VERSION}")
        );
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        for kind in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(container["resources"][kind][resource].is_string());
            }
        }
        let port_of = |name: &str| {
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
                .as_u64()
                .unwrap()
        };

        // The configuration as a pod sees it: the ConfigMap's file, and the environment
        // built from the overlay, the Secret and the pod's own name.
        let config_map = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v["configMap"]["name"].as_str())
            .unwrap();
        let toml = rendered.one("ConfigMap", config_map)["data"]["regatta.toml"]
            .as_str()
            .unwrap();
        let config_file = work.path().join(format!("{region}.toml"));
        std::fs::write(&config_file, toml).unwrap();
        let mut env = BTreeMap::new();
        for var in container["env"].as_array().unwrap() {
            let name = var["name"].as_str().unwrap().to_owned();
            let value = if let Some(v) = var["value"].as_str() {
                v.to_owned()
            } else if let Some(r) = var["valueFrom"].get("secretKeyRef") {
                let secret = rendered.one("Secret", r["name"].as_str().unwrap());
                let encoded = secret["data"][r["key"].as_str().unwrap()]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: no such key in the Secret"));
                use base64::Engine as _;
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .unwrap(),
                )
                .unwrap()
            } else {
                assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
                "regatta-5d8f7b9c4-x2x7q".to_owned()
            };
            env.insert(name, value);
        }
        assert_eq!(env["REGATTA__SERVER__REGION"], region);
        let check = |env: &BTreeMap<String, String>| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
            cmd.env_clear()
                .envs(env)
                .arg("check-config")
                .arg(&config_file);
            run(cmd, Duration::from_secs(30))
        };
        let out = check(&env);
        assert!(
            out.status.success(),
            "{region}: regatta check-config:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The Secret is what completes it: without the admin token the file is refused.
        let mut without = env.clone();
        without.remove("REGATTA__ADMIN__TOKEN");
        assert!(!check(&without).status.success());
        for port in ["registry", "admin"] {
            let listen = format!("listen = \"0.0.0.0:{}\"", port_of(port));
            assert!(
                toml.contains(&listen),
                "{region}: no {listen} for port {port}"
            );
        }

        // Every Service selects the pods and targets a named container port.
        for service in rendered.all("Service") {
            assert!(is_subset(&service["spec"]["selector"], pod_labels));
            for p in service["spec"]["ports"].as_array().unwrap() {
                port_of(p["targetPort"].as_str().unwrap());
            }
        }
        let api = rendered.one("Service", "regatta");
        assert_eq!(api["spec"]["type"], "LoadBalancer");
        assert_eq!(api["spec"]["externalTrafficPolicy"], "Local");
        assert_eq!(api["spec"]["ports"][0]["targetPort"], "registry");

        // The ServiceMonitor scrapes /metrics on the internal Service's admin port.
        let admin = rendered.one("Service", "regatta-admin");
        assert_eq!(admin["spec"]["type"], "ClusterIP");
        let monitor = rendered.one("ServiceMonitor", "regatta");
        assert!(is_subset(
            &monitor["spec"]["selector"]["matchLabels"],
            &admin["metadata"]["labels"]
        ));
        assert!(!is_subset(
            &monitor["spec"]["selector"]["matchLabels"],
            &api["metadata"]["labels"]
        ));
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["path"], "/metrics");
        assert_eq!(admin["spec"]["ports"][0]["name"], endpoint["port"]);
        assert_eq!(admin["spec"]["ports"][0]["targetPort"], "admin");

        // Disruption budget and autoscaler act on these pods.
        let pdb = rendered.one("PodDisruptionBudget", "regatta");
        assert!(is_subset(
            &pdb["spec"]["selector"]["matchLabels"],
            pod_labels
        ));
        let hpa = rendered.one("HorizontalPodAutoscaler", "regatta");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "regatta");
        assert_eq!(hpa["spec"]["minReplicas"], 3);

        // The PrometheusRule is dashboards/alerts.yml, and promtool accepts it.
        let rule = rendered.one("PrometheusRule", "regatta");
        assert_eq!(rule["spec"]["groups"], alerts["groups"]);
        let rules_file = work.path().join(format!("{region}-rules.yml"));
        std::fs::write(&rules_file, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
        let mut promtool = Command::new("promtool");
        promtool.args(["check", "rules"]).arg(&rules_file);
        run_ok(promtool, Duration::from_secs(30));
    }
}
