//! Private orgs: the gateway's own token service and users. A node serves a private org
//! `acme` (alice may pull it, bob may not) and a public org `pub` from the same backend;
//! real clients (skopeo, podman, docker, ctr) pull with credentials, anonymous and wrong
//! ones fail on `acme` and still work on `pub`, and nothing cached for `acme` ever reaches
//! a caller without a token that grants it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;

use crate::clients::{try_skopeo_pull_as, Containerd, Dockerd, Podman};
use crate::helpers::{spawn_app, Answer, Config, TestApp};
use crate::images::{self, Image};
use crate::procs::{require, run_ok};
use crate::registry::{Registry, Shape, TokenIssuer};

pub const SERVICE: &str = "regatta-test";
pub const ALICE: (&str, &str) = ("alice", "alice-s3cret");
pub const BOB: (&str, &str) = ("bob", "bob-hunter2");

/// A signing key made with `openssl genpkey` and a users file made with `htpasswd -B`, as
/// an operator makes them.
pub struct AuthFiles {
    _dir: tempfile::TempDir,
    pub key: PathBuf,
    pub users: PathBuf,
}

impl AuthFiles {
    pub fn new() -> AuthFiles {
        require("openssl");
        require("htpasswd");
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("token-key.pem");
        let mut genkey = Command::new("openssl");
        genkey
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
            ])
            .arg(&key);
        run_ok(genkey, Duration::from_secs(30));
        let users = dir.path().join("users.htpasswd");
        for (i, (user, password)) in [ALICE, BOB].into_iter().enumerate() {
            let mut add = Command::new("htpasswd");
            add.arg("-B").arg("-b");
            if i == 0 {
                add.arg("-c");
            }
            add.arg(&users).args([user, password]);
            run_ok(add, Duration::from_secs(30));
        }
        AuthFiles {
            _dir: dir,
            key,
            users,
        }
    }

    /// The signing key, for tests that forge or age tokens themselves.
    pub fn encoding_key(&self) -> jsonwebtoken::EncodingKey {
        jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(&self.key).unwrap()).unwrap()
    }
}

pub fn basic(user: &str, password: &str) -> String {
    let raw = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// `GET /token?service=...&scope=...` with Basic credentials when given.
pub async fn token_answer(app: &TestApp, creds: Option<(&str, &str)>, scopes: &[&str]) -> Answer {
    let mut query = format!("/token?service={SERVICE}");
    for s in scopes {
        query.push_str(&format!("&scope={}", urlencode(s)));
    }
    let auth = creds.map(|(u, p)| basic(u, p));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    app.request(awc::http::Method::GET, &query, &headers).await
}

/// A token for `scopes`, which must be granted (200).
pub async fn token(app: &TestApp, creds: Option<(&str, &str)>, scopes: &[&str]) -> String {
    let answer = token_answer(app, creds, scopes).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    answer.json()["token"].as_str().unwrap().to_owned()
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A GET (or HEAD) with `Authorization: Bearer TOKEN`.
pub async fn with_token(
    app: &TestApp,
    method: awc::http::Method,
    path: &str,
    token: &str,
) -> Answer {
    let bearer = format!("Bearer {token}");
    app.request(method, path, &[("authorization", &bearer)])
        .await
}

/// The claims of a token, unverified (the test reads what the gateway put in it).
fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

struct Fixture {
    _issuer: TokenIssuer,
    registry: Registry,
    files: AuthFiles,
    private: Image,
    public: Image,
    app: TestApp,
    work: tempfile::TempDir,
}

/// A node with the private org `acme` (alice: every repository; bob: only `other`) and the
/// public org `pub`, both on one backend of `shape` holding the same kind of image.
async fn fixture(shape: Shape) -> Fixture {
    let issuer = TokenIssuer::start().await;
    let registry = Registry::start(shape, Some(&issuer));
    let work = tempfile::tempdir().unwrap();
    let seed = format!("private-{shape:?}-{}", std::process::id()).to_lowercase();
    let private = images::multiarch(&work.path().join("private"), &seed, "1.0", 2, 64 * 1024);
    let public = images::multiarch(
        &work.path().join("public"),
        &format!("{seed}-pub"),
        "1.0",
        2,
        0,
    );
    registry.push(&private, "acme/app", "1.0");
    registry.push(&public, "pub/app", "1.0");
    let files = AuthFiles::new();
    let app = spawn_app(
        &Config::new()
            .auth(&files.key, &files.users)
            .backend("hub", &registry, "auto")
            .private_org("acme", &["hub"], &[("alice", &["*"]), ("bob", &["other"])])
            .org("pub", &["hub"], "30s", &[]),
    )
    .await;
    Fixture {
        _issuer: issuer,
        registry,
        files,
        private,
        public,
        app,
        work,
    }
}

fn assert_unauthorized(answer: &Answer, what: &str) {
    assert_eq!(
        answer.status,
        401,
        "{what}: {}",
        String::from_utf8_lossy(&answer.body)
    );
    if !answer.body.is_empty() {
        assert_eq!(answer.error_code(), "UNAUTHORIZED", "{what}");
    }
    let challenge = answer.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer realm=\"http://127.0.0.1:")
            && challenge.contains(&format!("service=\"{SERVICE}\"")),
        "{what}: challenge {challenge}"
    );
}

#[actix_web::test]
async fn private_org_pulls_with_users_and_public_org_stays_anonymous() {
    let f = fixture(Shape::TokenWithCdn).await;
    let host = f.app.host();
    let private_ref = format!("{host}/acme/app:1.0");
    let public_ref = format!("{host}/pub/app:1.0");

    // The node serves a private org: /v2/ starts every client's token flow.
    let base = f.app.get("/v2/").await;
    assert_unauthorized(&base, "/v2/ without a token");
    assert_eq!(
        base.header("www-authenticate"),
        Some(format!("Bearer realm=\"http://{host}/token\",service=\"{SERVICE}\"").as_str())
    );
    let manifest = f.app.get("/v2/acme/app/manifests/1.0").await;
    assert_unauthorized(&manifest, "anonymous manifest GET");
    assert!(manifest
        .header("www-authenticate")
        .unwrap()
        .contains("scope=\"repository:acme/app:pull\""));

    // Anonymous skopeo: refused, and says why.
    let err = try_skopeo_pull_as(&private_ref, &f.work.path().join("anon"), 0, None).unwrap_err();
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "anonymous skopeo: {err}"
    );
    // Wrong password, and a user without a grant on this repository: refused.
    let wrong = try_skopeo_pull_as(
        &private_ref,
        &f.work.path().join("wrong"),
        0,
        Some("alice:nope"),
    );
    assert!(wrong.is_err(), "a wrong password pulled a private image");
    let bob = try_skopeo_pull_as(
        &private_ref,
        &f.work.path().join("bob"),
        0,
        Some(&format!("{}:{}", BOB.0, BOB.1)),
    );
    assert!(bob.is_err(), "bob has no grant on acme/app but pulled it");

    // alice: everything arrives, digests as pushed.
    let pulled = try_skopeo_pull_as(
        &private_ref,
        &f.work.path().join("alice"),
        0,
        Some(&format!("{}:{}", ALICE.0, ALICE.1)),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pulled.top, f.private.index.digest, "skopeo: index digest");
    assert_eq!(pulled.blobs, f.private.all_digests(), "skopeo: every blob");

    // The public org: anonymous, and with credentials that do not verify, as anonymous.
    let anon = try_skopeo_pull_as(&public_ref, &f.work.path().join("pub-anon"), 0, None)
        .unwrap_or_else(|e| panic!("public org, anonymous: {e}"));
    assert_eq!(anon.blobs, f.public.all_digests());
    let wrong_creds = try_skopeo_pull_as(
        &public_ref,
        &f.work.path().join("pub-wrong"),
        0,
        Some("mallory:guess"),
    )
    .unwrap_or_else(|e| panic!("public org, wrong credentials: {e}"));
    assert_eq!(wrong_creds.blobs, f.public.all_digests());
    // ...and straight to the repository without any token at all.
    assert_eq!(f.app.get("/v2/pub/app/manifests/1.0").await.status, 200);

    // podman login + pull.
    let podman = Podman::new();
    podman.login(&host, ALICE.0, ALICE.1);
    let (id, digests) = podman.pull(&private_ref);
    assert_eq!(
        id,
        f.private.platform("amd64").config.digest,
        "podman: image id"
    );
    assert!(
        digests.contains(&f.private.index.digest)
            || digests.contains(&f.private.platform("amd64").manifest.digest),
        "podman recorded {digests:?}"
    );
    // The blobs came from the CDN. Its stand-in's URLs carry no signature, so the gateway
    // fetched them itself and streamed them: such a URL is never handed to a private org's
    // client (anyone could fetch it).
    let layer = &f.private.platform("amd64").layers[0].digest;
    assert!(f
        .registry
        .cdn_log()
        .contains(&layer.trim_start_matches("sha256:")[..16]));
}

/// After alice pulled (so manifests, tags, holders, pre-signed URLs are all cached), an
/// anonymous caller, a caller with a bad token and bob (no grant) get 401 for every path
/// of that image, by tag and digest, GET and HEAD; never bytes or a redirect.
#[actix_web::test]
async fn nothing_cached_for_a_private_org_reaches_a_caller_without_a_grant() {
    let f = fixture(Shape::TokenWithCdn).await;
    let scope = "repository:acme/app:pull";
    let alice = token(&f.app, Some(ALICE), &[scope]).await;
    assert_eq!(claims(&alice)["access"][0]["name"], "acme/app");
    let amd64 = f.private.platform("amd64");
    let mut paths = vec![
        "/v2/acme/app/manifests/1.0".to_owned(),
        format!("/v2/acme/app/manifests/{}", f.private.index.digest),
        format!("/v2/acme/app/manifests/{}", amd64.manifest.digest),
        format!("/v2/acme/app/blobs/{}", amd64.config.digest),
        "/v2/acme/app/tags/list".to_owned(),
        format!("/v2/acme/app/referrers/{}", f.private.index.digest),
    ];
    paths.extend(
        amd64
            .layers
            .iter()
            .map(|l| format!("/v2/acme/app/blobs/{}", l.digest)),
    );
    // Warm everything, twice (the second time from the caches).
    for _ in 0..2 {
        for path in &paths {
            let answer = with_token(&f.app, awc::http::Method::GET, path, &alice).await;
            assert!(
                matches!(answer.status, 200 | 307),
                "alice {path}: {} {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
    }
    let blob = with_token(&f.app, awc::http::Method::GET, &paths[6], &alice).await;
    assert_eq!(
        blob.status, 200,
        "a private blob behind an unsigned CDN URL is streamed"
    );
    assert!(blob.header("location").is_none());
    assert_eq!(
        format!("/v2/acme/app/blobs/{}", images::sha256(&blob.body)),
        paths[6]
    );

    let bob = token(&f.app, Some(BOB), &[scope]).await;
    assert_eq!(
        claims(&bob)["access"],
        serde_json::json!([]),
        "bob is granted nothing"
    );
    let anonymous = token(&f.app, None, &[scope]).await;
    let mut forged = alice.clone();
    forged.push('x');
    for path in &paths {
        for method in [awc::http::Method::GET, awc::http::Method::HEAD] {
            let plain = f.app.request(method.clone(), path, &[]).await;
            assert_unauthorized(&plain, &format!("anonymous {method} {path}"));
            assert!(plain.header("location").is_none());
            for (who, t) in [
                ("bob", &bob),
                ("anonymous token", &anonymous),
                ("forged token", &forged),
            ] {
                let answer = with_token(&f.app, method.clone(), path, t).await;
                assert_unauthorized(&answer, &format!("{who} {method} {path}"));
                assert!(
                    answer.header("location").is_none(),
                    "{who} {path}: a redirect"
                );
            }
            // Basic credentials straight on the repository are no token either.
            let basic_auth = basic(ALICE.0, ALICE.1);
            let answer = f
                .app
                .request(method.clone(), path, &[("authorization", &basic_auth)])
                .await;
            assert_unauthorized(&answer, &format!("Basic {method} {path}"));
        }
    }
    // The public org on the same backend still answers anyone.
    let public_blob = format!(
        "/v2/pub/app/blobs/{}",
        f.public.platform("amd64").config.digest
    );
    assert_eq!(f.app.get(&public_blob).await.status, 307);
}

/// Each malformed or unacceptable token request gets a 4xx with a body saying why; none
/// gets a 5xx. Tokens that expired, were tampered with, or were signed by another key are
/// refused on `/v2/` and on the private org, with the reason.
#[actix_web::test]
async fn token_endpoint_refuses_bad_requests_with_reasons() {
    let f = fixture(Shape::Anonymous).await;
    let app = &f.app;
    let good_scope = "repository:acme/app:pull";
    let check = |answer: &Answer, status: u16, needle: &str, what: &str| {
        assert_eq!(
            answer.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let message = answer.json()["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.contains(needle),
            "{what}: message '{message}' lacks '{needle}'"
        );
    };
    let get = |headers: Vec<(&'static str, String)>, query: String| async move {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        app.request(awc::http::Method::GET, &query, &headers).await
    };
    let q = format!("/token?service={SERVICE}&scope={}", urlencode(good_scope));

    let not_base64 = get(
        vec![("authorization", "Basic %%%not-base64".into())],
        q.clone(),
    )
    .await;
    check(&not_base64, 400, "not base64", "Basic not base64");
    let no_colon = base64::engine::general_purpose::STANDARD.encode("alice");
    let no_colon = get(
        vec![("authorization", format!("Basic {no_colon}"))],
        q.clone(),
    )
    .await;
    check(&no_colon, 400, "no ':'", "Basic without a colon");
    let bearer = get(vec![("authorization", "Bearer abc".into())], q.clone()).await;
    check(&bearer, 400, "Basic", "a Bearer header at /token");
    let wrong_password = token_answer(app, Some(("alice", "nope")), &[good_scope]).await;
    check(
        &wrong_password,
        401,
        "incorrect username or password",
        "wrong password, private scope",
    );
    let login_wrong = token_answer(app, Some(("alice", "nope")), &[]).await;
    check(
        &login_wrong,
        401,
        "incorrect",
        "wrong password, login (no scope)",
    );

    for bad in [
        "repository:acme/app",
        "repository:ACME/app:pull",
        "nonsense",
        "repository:acme/app:pu;ll",
    ] {
        let answer = token_answer(app, None, &[bad]).await;
        check(&answer, 400, "scope", &format!("scope {bad}"));
    }
    let many: Vec<String> = (0..33)
        .map(|i| format!("repository:pub/app{i}:pull"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    check(
        &token_answer(app, None, &many).await,
        400,
        "too many scopes",
        "33 scopes",
    );
    let other_service = get(
        vec![],
        format!("/token?service=elsewhere&scope={}", urlencode(good_scope)),
    )
    .await;
    check(&other_service, 400, "not 'elsewhere'", "wrong service");
    let account = get(
        vec![("authorization", basic(ALICE.0, ALICE.1))],
        format!("/token?account=bob&service={SERVICE}"),
    )
    .await;
    check(
        &account,
        400,
        "account",
        "account other than the credentials' user",
    );

    // POST: only the password grant; never a refresh token.
    let post = |body: &'static str, form: bool| async move {
        let mut req = app.client.post(app.url("/token"));
        if form {
            req = req.insert_header(("content-type", "application/x-www-form-urlencoded"));
        }
        let mut resp = req.send_body(body).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.body().await.unwrap().to_vec();
        Answer {
            status,
            headers: resp.headers().clone(),
            body,
        }
    };
    check(
        &post("grant_type=refresh_token&refresh_token=x", true).await,
        400,
        "no refresh tokens",
        "refresh grant",
    );
    check(
        &post("grant_type=client_credentials", true).await,
        400,
        "unsupported_grant_type",
        "other grant",
    );
    check(
        &post("grant_type=password&username=alice", true).await,
        400,
        "username and password",
        "no password",
    );
    check(
        &post("grant_type=password&username=alice&password=x", false).await,
        400,
        "x-www-form-urlencoded",
        "JSON body",
    );
    let granted = post(
        "grant_type=password&username=alice&password=alice-s3cret&service=regatta-test&scope=repository%3Aacme%2Fapp%3Apull&client_id=test",
        true,
    )
    .await;
    assert_eq!(
        granted.status,
        200,
        "{}",
        String::from_utf8_lossy(&granted.body)
    );
    let json = granted.json();
    assert_eq!(json["scope"], good_scope);
    assert!(json["access_token"].is_string() && json["expires_in"].as_u64() == Some(300));
    assert!(json.get("refresh_token").is_none());

    // GET answers: every field of the spec, the granted subset, no refresh token.
    let answer = token_answer(
        app,
        None,
        &["repository:pub/app:pull,push repository:acme/app:pull registry:catalog:*"],
    )
    .await;
    assert_eq!(answer.status, 200, "an anonymous partial grant is no error");
    let json = answer.json();
    for key in ["token", "access_token", "expires_in", "issued_at"] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    assert!(json.get("refresh_token").is_none());
    assert_eq!(json["token"], json["access_token"]);
    assert!(humantime::parse_rfc3339(json["issued_at"].as_str().unwrap()).is_ok());
    assert_eq!(
        claims(json["token"].as_str().unwrap())["access"],
        serde_json::json!([{ "type": "repository", "name": "pub/app", "actions": ["pull"] }]),
        "anonymous: the public repository, pull only; nothing of the private org"
    );

    // Tokens the gateway must refuse: expired, tampered, another key, another service.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let alice = token(app, Some(ALICE), &[good_scope]).await;
    let kid = jsonwebtoken::decode_header(&alice).unwrap().kid;
    let mint = |claims: serde_json::Value, key: &jsonwebtoken::EncodingKey| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = kid.clone();
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    };
    let access =
        serde_json::json!([{ "type": "repository", "name": "acme/app", "actions": ["pull"] }]);
    let expired = mint(
        serde_json::json!({ "iss": SERVICE, "aud": SERVICE, "sub": "alice", "iat": now - 900, "nbf": now - 900, "exp": now - 600, "access": access }),
        &f.files.encoding_key(),
    );
    let other_service = mint(
        serde_json::json!({ "iss": "elsewhere", "aud": "elsewhere", "sub": "alice", "exp": now + 300, "access": access }),
        &f.files.encoding_key(),
    );
    let stranger = AuthFiles::new();
    let foreign = mint(
        serde_json::json!({ "iss": SERVICE, "aud": SERVICE, "sub": "alice", "exp": now + 300, "access": access }),
        &stranger.encoding_key(),
    );
    let mut parts: Vec<String> = alice.split('.').map(str::to_owned).collect();
    let mut body = claims(&alice);
    body["sub"] = "root".into();
    parts[1] =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&body).unwrap());
    let tampered = parts.join(".");
    for (token, needle, what) in [
        (&expired, "expired", "expired token"),
        (
            &other_service,
            "another service",
            "token of another service",
        ),
        (&foreign, "signature", "token signed by another key"),
        (&tampered, "signature", "tampered token"),
        (&"garbage".to_owned(), "malformed", "not a JWT"),
    ] {
        for path in ["/v2/", "/v2/acme/app/manifests/1.0"] {
            let answer = with_token(app, awc::http::Method::GET, path, token).await;
            check(&answer, 401, needle, &format!("{what} on {path}"));
            assert!(answer
                .header("www-authenticate")
                .unwrap()
                .contains("error=\"invalid_token\""));
        }
    }
    // The genuine token works, on both.
    assert_eq!(
        with_token(app, awc::http::Method::GET, "/v2/", &alice)
            .await
            .status,
        200
    );
    assert_eq!(
        with_token(
            app,
            awc::http::Method::GET,
            "/v2/acme/app/manifests/1.0",
            &alice
        )
        .await
        .status,
        200
    );
}

/// docker login + docker pull and ctr --user (the POST password grant first) pull the
/// private org; a backend that allows anonymous reads is never a redirect target for it:
/// its blobs are streamed.
#[actix_web::test]
async fn docker_and_containerd_pull_a_private_org_with_credentials() {
    let registry = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let seed = format!("private-docker-{}", std::process::id());
    let image = images::runnable(&work.path().join("image"), &seed, "1.0", 0);
    registry.push(&image, "acme/app", "1.0");
    let files = AuthFiles::new();
    let app = spawn_app(
        &Config::new()
            .admin()
            .auth(&files.key, &files.users)
            .backend("hub", &registry, "auto")
            .private_org("acme", &["hub"], &[("alice", &["app"])]),
    )
    .await;
    let host = app.host();
    let reference = format!("{host}/acme/app:1.0");

    let docker = Dockerd::start();
    let mut denied = docker.cli();
    denied.args(["pull", &reference]);
    let out = crate::procs::run(denied, Duration::from_secs(120));
    assert!(
        !out.status.success(),
        "docker pulled a private image without logging in"
    );
    let mut login = docker.cli();
    login.args(["login", "-u", ALICE.0, "--password-stdin", &host]);
    login.stdin(std::process::Stdio::piped());
    let mut child = login
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), ALICE.1.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (id, digest) = docker.pull(&reference);
    assert_eq!(
        id,
        image.platform("amd64").config.digest,
        "docker: image id"
    );
    assert_eq!(digest, image.index.digest, "docker: repository digest");
    assert_eq!(
        docker.run(&["run", "--rm", "--network", "none", &reference]),
        format!("{seed} amd64")
    );
    let mut wrong_login = docker.cli();
    wrong_login.args(["login", "-u", ALICE.0, "-p", "nope", &host]);
    assert!(
        !crate::procs::run(wrong_login, Duration::from_secs(60))
            .status
            .success(),
        "docker login with a wrong password succeeded"
    );

    let token_posts = || async {
        crate::helpers::metric(
            &app.metrics().await,
            "regatta_requests_total",
            &[("route", "token"), ("method", "POST"), ("status", "200")],
        )
        .unwrap_or(0.0)
    };
    let posts_before = token_posts().await;
    let containerd = Containerd::start();
    let pulled = containerd.pull_as(&reference, Some(&format!("{}:{}", ALICE.0, ALICE.1)));
    assert_eq!(pulled.top, image.index.digest, "ctr: index digest");
    assert!(
        image.all_digests().is_subset(&pulled.blobs),
        "ctr content store lacks some of {:?}",
        image.all_digests()
    );
    let posts = token_posts().await;
    assert!(
        posts > posts_before,
        "containerd got its token with the POST password grant"
    );

    // The backend allows anonymous reads, yet the private org's blobs are streamed.
    let alice = token(&app, Some(ALICE), &["repository:acme/app:pull"]).await;
    let layer = &image.platform("amd64").layers[0].digest;
    let blob = with_token(
        &app,
        awc::http::Method::GET,
        &format!("/v2/acme/app/blobs/{layer}"),
        &alice,
    )
    .await;
    assert_eq!(blob.status, 200, "streamed, not redirected");
    assert!(blob.header("location").is_none());
    assert_eq!(crate::images::sha256(&blob.body), *layer);
}

/// A key rotation: node "new" signs with a new key and keeps the old one in
/// `previous_keys`; node "old" still has only the old key. The old node's tokens work on
/// the new node; the new node's do not work on the old one (roll `previous_keys` out first).
#[actix_web::test]
async fn a_rotated_signing_key_still_accepts_the_old_keys_tokens() {
    let registry = Registry::start(Shape::Anonymous, None);
    let work = tempfile::tempdir().unwrap();
    let image = images::multiarch(&work.path().join("image"), "rotation", "1.0", 1, 0);
    registry.push(&image, "acme/app", "1.0");
    let (old_files, new_files) = (AuthFiles::new(), AuthFiles::new());
    let node = |config: Config| {
        config
            .backend("hub", &registry, "auto")
            .private_org("acme", &["hub"], &[("alice", &["*"])])
    };
    let old = spawn_app(&node(Config::new().auth(&old_files.key, &old_files.users))).await;
    let new = spawn_app(&node(Config::new().auth_rotating(
        &new_files.key,
        &[&old_files.key],
        &old_files.users,
    )))
    .await;
    let scope = "repository:acme/app:pull";
    let path = "/v2/acme/app/manifests/1.0";
    let from_old = token(&old, Some(ALICE), &[scope]).await;
    let from_new = token(&new, Some(ALICE), &[scope]).await;
    assert_ne!(
        jsonwebtoken::decode_header(&from_old).unwrap().kid,
        jsonwebtoken::decode_header(&from_new).unwrap().kid,
        "the new node signs with the new key"
    );
    assert_eq!(
        with_token(&new, awc::http::Method::GET, path, &from_old)
            .await
            .status,
        200
    );
    assert_eq!(
        with_token(&new, awc::http::Method::GET, path, &from_new)
            .await
            .status,
        200
    );
    let refused = with_token(&old, awc::http::Method::GET, path, &from_new).await;
    assert_unauthorized(&refused, "the new key's token on a node without it");
    assert!(String::from_utf8_lossy(&refused.body).contains("key this registry does not know"));
}

/// A password guesser is slowed: past the allowed failed logins, `/token` answers 429 with
/// `Retry-After` for a login or a private scope, even to the right password (which is not
/// checked meanwhile); public content is still served anonymously to the same client.
#[actix_web::test]
async fn failed_logins_past_the_allowance_are_refused_with_429() {
    let files = AuthFiles::new();
    let app = spawn_app(
        &Config::new()
            .auth(&files.key, &files.users)
            .login_limit(1, 3)
            .backend_at("hub", "http://127.0.0.1:9", "proxy", "eu")
            .private_org("acme", &["hub"], &[("alice", &["*"])])
            .org("pub", &["hub"], "30s", &[]),
    )
    .await;
    let private = "repository:acme/app:pull";
    let public = "repository:pub/app:pull";
    // The right password works, and does not count.
    for _ in 0..5 {
        token(&app, Some(ALICE), &[private]).await;
    }
    for guess in 0..3 {
        let answer =
            token_answer(&app, Some(("alice", &format!("guess-{guess}"))), &[private]).await;
        assert_eq!(answer.status, 401, "guess {guess}");
        assert_eq!(answer.error_code(), "UNAUTHORIZED", "guess {guess}");
    }
    for (what, creds) in [
        ("a fourth guess", ("alice", "guess-3")),
        ("the right password", ALICE),
    ] {
        let answer = token_answer(&app, Some(creds), &[private]).await;
        assert_eq!(
            answer.status,
            429,
            "{what}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.error_code(), "TOOMANYREQUESTS", "{what}");
        let wait: u64 = answer.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&wait), "{what}: Retry-After {wait}");
    }
    // Public content: served as anonymous to the same client, wrong credentials or not.
    let answer = token_answer(&app, Some(("alice", "guess-4")), &[public]).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(
        claims(answer.json()["token"].as_str().unwrap())["access"][0]["name"],
        "pub/app"
    );
}

/// `auth.users_file` is read again when it changes: a user added can log in, a user
/// removed loses access at once (with a token still in hand), and a file that does not
/// parse leaves the users as they were.
#[actix_web::test]
async fn the_users_file_is_reloaded_when_it_changes() {
    let f = fixture(Shape::Anonymous).await;
    let app = &f.app;
    let carol = ("carol", "carol-pa55");
    let manifest = "/v2/acme/app/manifests/1.0";
    let scope = "repository:acme/app:pull";
    assert_eq!(token_answer(app, Some(carol), &[]).await.status, 401);
    let alices = token(app, Some(ALICE), &[scope]).await;
    let pulled = with_token(app, awc::http::Method::GET, manifest, &alices).await;
    assert_eq!(pulled.status, 200);

    let mut add = Command::new("htpasswd");
    add.args(["-B", "-b"])
        .arg(&f.files.users)
        .args([carol.0, carol.1]);
    run_ok(add, Duration::from_secs(30));
    let mut remove = Command::new("htpasswd");
    remove.arg("-D").arg(&f.files.users).arg(ALICE.0);
    run_ok(remove, Duration::from_secs(30));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while token_answer(app, Some(carol), &[]).await.status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "carol, added to the users file, cannot log in after 10 s"
        );
        // Each refused login counts against this client's allowance (burst 10).
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Alice's token is still signed and unexpired; she is no longer a user.
    let refused = with_token(app, awc::http::Method::GET, manifest, &alices).await;
    assert_unauthorized(&refused, "a removed user's token");
    assert_eq!(token_answer(app, Some(ALICE), &[scope]).await.status, 401);

    // A broken file: reported, and the users stay as they were for the next checks.
    std::fs::write(&f.files.users, "this is not an htpasswd file\n").unwrap();
    let watch_until = std::time::Instant::now() + Duration::from_millis(2500);
    while std::time::Instant::now() < watch_until {
        assert_eq!(
            token_answer(app, Some(carol), &[]).await.status,
            200,
            "carol lost access to a broken users file"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(token_answer(app, Some(BOB), &[]).await.status, 200);
}
