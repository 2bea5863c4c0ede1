//! Readiness: `/readyz` takes a node out of rotation on a node drain, a drain file or a
//! shutdown, while the node keeps serving what still reaches it; SIGTERM waits out the
//! grace period so a running pull completes.

use std::process::Command;
use std::time::Duration;

use awc::http::Method;

use crate::clients::skopeo_pull;
use crate::helpers::{spawn_app, wait_for_http, Config, NodeProcess, ADMIN_TOKEN};
use crate::images;
use crate::procs::{run, wait_until};
use crate::registry::{Registry, Shape};

#[actix_web::test]
async fn readiness_follows_the_node_drain_and_the_drain_file() {
    let hub = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "readiness", "1.0", 1, 256);
    hub.push(&image, "acme/app", "1.0");
    let drain_file = work.path().join("drain");
    let node = spawn_app(
        &Config::new()
            .server_key(&format!("drain_file = \"{}\"", drain_file.display()))
            .admin()
            .backend("hub", &hub, "direct")
            .org("acme", &["hub"], "30s", &[]),
    )
    .await;
    let ready = || async {
        let answer = node.get("/readyz").await;
        (
            answer.status,
            String::from_utf8_lossy(&answer.body).into_owned(),
        )
    };
    assert_eq!(ready().await, (200, "ready".into()));

    // A node drain through the admin API: not ready, still serving.
    let drained = node.admin(Method::POST, "/admin/v1/node/drain", None).await;
    assert_eq!(drained.status, 200);
    assert_eq!(drained.json()["ready"], false);
    assert_eq!(ready().await, (503, "drained by an operator".into()));
    assert_eq!(node.get("/healthz").await.status, 200, "still alive");
    let pulled = skopeo_pull(
        &format!("{}/acme/app:1.0", node.host()),
        &work.path().join("drained"),
    );
    assert_eq!(
        pulled.blobs,
        image.all_digests(),
        "a drained node still serves"
    );
    let undrained = node
        .admin(Method::POST, "/admin/v1/node/undrain", None)
        .await;
    assert_eq!(undrained.json()["ready"], true);
    assert_eq!(ready().await.0, 200);

    // The same from the command line.
    let admin = |action: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
        cmd.args(["admin", "node", action])
            .env("REGATTA_ADMIN_URL", node.admin_url())
            .env("REGATTA_ADMIN_TOKEN", ADMIN_TOKEN);
        let out = run(cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(admin("drain")["reason"], "drained by an operator");
    assert_eq!(ready().await.0, 503);
    assert_eq!(admin("undrain")["ready"], true);
    assert_eq!(ready().await.0, 200);

    // A sidecar's drain file.
    std::fs::write(&drain_file, "").unwrap();
    assert_eq!(ready().await, (503, "drain file present".into()));
    std::fs::remove_file(&drain_file).unwrap();
    assert_eq!(ready().await.0, 200);
}

#[actix_web::test]
async fn sigterm_reports_not_ready_at_once_and_finishes_a_running_pull() {
    let hub = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    // Proxied blobs: the pull needs the node until its last byte.
    let image = images::multiarch(&work.path().join("image"), "sigterm", "1.0", 3, 2 << 20);
    hub.push(&image, "acme/app", "1.0");
    let mut node = NodeProcess::start(
        work.path(),
        "regatta-sigterm",
        &format!(
            "shutdown_grace = \"4s\"\n[log]\nformat = \"json\"\nfilter = \"info\"\n\
             [[backends]]\nid = \"hub\"\nurl = \"{}\"\ndelivery = \"proxy\"\n\
             [[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\n",
            hub.url()
        ),
        &[],
    );
    let base = format!("http://127.0.0.1:{}", node.port);
    wait_for_http(&format!("{base}/readyz")).await;

    let reference = format!("127.0.0.1:{}/acme/app:1.0", node.port);
    let out = work.path().join("out");
    let pull = std::thread::spawn(move || skopeo_pull(&reference, &out));
    wait_until(
        "the pull to reach the backend",
        Duration::from_secs(30),
        || !hub.requests_naming("/manifests/").is_empty(),
    );
    node.proc.terminate();

    let client = awc::Client::new();
    let status = |path: &'static str| {
        let client = &client;
        let url = format!("{base}{path}");
        async move {
            client
                .get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        }
    };
    crate::helpers::eventually("/readyz to say 503", Duration::from_secs(2), || async {
        status("/readyz").await == Some(503)
    })
    .await;
    assert_eq!(
        status("/v2/").await,
        Some(200),
        "serving during the grace period"
    );

    let pulled = pull.join().expect("the running pull completes");
    assert_eq!(pulled.blobs, image.all_digests());
    wait_until("the node to exit", Duration::from_secs(30), || {
        node.proc.exited()
    });
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(log.contains("shutting down"), "{log}");
}
