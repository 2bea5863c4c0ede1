//! Robot accounts across a cluster: two nodes sharing a Redis and a signing key. A robot
//! made with `regatta admin robot create` on one node pulls through the other with skopeo;
//! a token either node mints works on both; revoking the robot through the admin API stops
//! its secret and its tokens on every node within a second; an expired robot stops too.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::clients::try_skopeo_pull_as;
use crate::helpers::{eventually, spawn_app, Config, ADMIN_TOKEN};
use crate::images;
use crate::private::{token, token_answer, with_token, AuthFiles, ALICE};
use crate::procs::run;
use crate::redis_server::Redis;
use crate::registry::{Registry, Shape};

const SCOPE: &str = "repository:acme/app:pull";
const MANIFEST: &str = "/v2/acme/app/manifests/1.0";

#[actix_web::test]
async fn a_robot_pulls_on_every_node_until_revoked() {
    let redis = Redis::start();
    let registry = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let seed = format!("robots-{}", std::process::id());
    let image = images::multiarch(&work.path().join("image"), &seed, "1.0", 2, 0);
    registry.push(&image, "acme/app", "1.0");
    registry.push(&image, "acme/other", "1.0");
    let files = AuthFiles::new();
    let config = Config::new()
        .admin()
        .redis(&redis.url())
        .auth(&files.key, &files.users)
        .backend("hub", &registry, "auto")
        .private_org("acme", &["hub"], &[("alice", &["*"])]);
    let n1 = spawn_app(&config).await;
    let n2 = spawn_app(&config).await;

    // One key on every node: a token minted by node 1 is accepted by node 2, and back.
    let t1 = token(&n1, Some(ALICE), &[SCOPE]).await;
    assert_eq!(
        with_token(&n2, awc::http::Method::GET, MANIFEST, &t1)
            .await
            .status,
        200
    );
    let t2 = token(&n2, Some(ALICE), &[SCOPE]).await;
    assert_eq!(
        with_token(&n1, awc::http::Method::GET, MANIFEST, &t2)
            .await
            .status,
        200
    );

    // The admin command creates a robot on node 1 and shows its secret once.
    let admin = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
        cmd.arg("admin")
            .arg("--url")
            .arg(n1.admin_url())
            .args(args)
            .env("REGATTA_ADMIN_TOKEN", ADMIN_TOKEN);
        run(cmd, Duration::from_secs(30))
    };
    let out = admin(&[
        "robot",
        "create",
        "ci",
        "--repository",
        "acme/app",
        "--expires-in",
        "1h",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let (username, secret) = (field("username:"), field("secret:"));
    assert_eq!(username, "robot$ci");
    let listed = admin(&["robot", "list"]);
    let listing = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listing.contains("robot$ci") && listing.contains("acme/app"),
        "{listing}"
    );
    assert!(!listing.contains(&secret), "the listing shows the secret");
    let stored: String = redis.query(redis::cmd("HGET").arg("regatta:robots").arg("ci"));
    assert!(
        !stored.contains(&secret),
        "the store holds the secret itself: {stored}"
    );
    assert!(
        admin(&["robot", "create", "ci", "--repository", "acme/app"])
            .status
            .code()
            != Some(0),
        "a second robot ci"
    );

    // skopeo pulls with the robot's secret through node 2.
    let creds = format!("{username}:{secret}");
    let robot = Some((username.as_str(), secret.as_str()));
    eventually(
        "node 2 to know the robot",
        Duration::from_secs(1),
        || async { token_answer(&n2, robot, &[]).await.status == 200 },
    )
    .await;
    let reference = format!("{}/acme/app:1.0", n2.host());
    let pulled = try_skopeo_pull_as(&reference, &work.path().join("robot"), 0, Some(&creds))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pulled.top, image.index.digest);
    assert_eq!(pulled.blobs, image.all_digests());
    // Its globs bound it: acme/other is not granted.
    let other = token_answer(&n2, robot, &["repository:acme/other:pull"]).await;
    assert_eq!(other.status, 200);
    let t = other.json()["token"].as_str().unwrap().to_owned();
    let path = "/v2/acme/other/manifests/1.0";
    assert_eq!(
        with_token(&n2, awc::http::Method::GET, path, &t)
            .await
            .status,
        401
    );

    // A token minted before the revocation, on each node.
    let before = [
        token(&n1, robot, &[SCOPE]).await,
        token(&n2, robot, &[SCOPE]).await,
    ];
    for (node, t) in [(&n1, &before[1]), (&n2, &before[0])] {
        assert_eq!(
            with_token(node, awc::http::Method::GET, MANIFEST, t)
                .await
                .status,
            200
        );
    }
    let revoked = Instant::now();
    let answer = n1
        .admin(awc::http::Method::DELETE, "/admin/v1/robots/ci", None)
        .await;
    assert_eq!(answer.status, 204);
    for (name, node) in [("node 1", &n1), ("node 2", &n2)] {
        eventually(
            &format!("{name} to refuse the revoked robot"),
            Duration::from_secs(1),
            || async {
                let secret_refused = token_answer(node, robot, &[SCOPE]).await.status == 401;
                let mut tokens_refused = true;
                for t in &before {
                    tokens_refused &= with_token(node, awc::http::Method::GET, MANIFEST, t)
                        .await
                        .status
                        == 401;
                }
                secret_refused && tokens_refused
            },
        )
        .await;
    }
    eprintln!(
        "robot revocation seen on both nodes after {:?}",
        revoked.elapsed()
    );
    assert!(try_skopeo_pull_as(&reference, &work.path().join("revoked"), 0, Some(&creds)).is_err());
    assert_eq!(
        n2.admin(awc::http::Method::DELETE, "/admin/v1/robots/ci", None)
            .await
            .status,
        404
    );

    // Bad requests are refused with a reason; a robot with an expiry stops by itself.
    let bad = n2
        .admin(
            awc::http::Method::POST,
            "/admin/v1/robots",
            Some(serde_json::json!({"name": "Bad Name", "repositories": ["acme/*"]})),
        )
        .await;
    assert_eq!(bad.status, 400, "{}", String::from_utf8_lossy(&bad.body));
    let made = n2
        .admin(
            awc::http::Method::POST,
            "/admin/v1/robots",
            Some(serde_json::json!({"name": "short", "repositories": ["acme/*"], "expires_in": "2s"})),
        )
        .await;
    assert_eq!(made.status, 201, "{}", String::from_utf8_lossy(&made.body));
    let short_secret = made.json()["secret"].as_str().unwrap().to_owned();
    let short = Some(("robot$short", short_secret.as_str()));
    eventually(
        "node 1 to know robot short",
        Duration::from_secs(1),
        || async { token_answer(&n1, short, &[SCOPE]).await.status == 200 },
    )
    .await;
    let t = token(&n1, short, &[SCOPE]).await;
    assert_eq!(
        with_token(&n1, awc::http::Method::GET, MANIFEST, &t)
            .await
            .status,
        200
    );
    eventually("robot short to expire", Duration::from_secs(5), || async {
        token_answer(&n1, short, &[SCOPE]).await.status == 401
            && with_token(&n2, awc::http::Method::GET, MANIFEST, &t)
                .await
                .status
                == 401
    })
    .await;
}
