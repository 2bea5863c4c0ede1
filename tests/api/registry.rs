//! Real backend registries: Debian's `docker-registry` (distribution 2.8) on random
//! loopback ports, in four shapes: anonymous; token-protected with the test token issuer;
//! token-protected with its `redirect` storage middleware and nginx over the storage root
//! standing in for a CDN; htpasswd.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine as _;
use serde_json::json;

use crate::images::{Artifact, Image};
use crate::procs::{free_port, require, run_ok, wait_until, Proc};

pub const USER: &str = "alice";
pub const PASSWORD: &str = "secret";
const SERVICE: &str = "regatta-test-registry";
const ISSUER: &str = "regatta-test-issuer";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Anonymous,
    Token,
    TokenWithCdn,
    Htpasswd,
}

impl Shape {
    pub fn needs_credentials_to_push(self) -> bool {
        self != Shape::Anonymous
    }
}

/// A token service in the test process, as Docker Hub's: anonymous clients get pull
/// tokens, alice/secret gets whatever she asks for, wrong credentials get 401.
pub struct TokenIssuer {
    /// The loopback address it listens on (the realm registries name).
    pub ip: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub issued: Arc<AtomicUsize>,
    /// Token requests that carried an `Authorization` header (credentials).
    pub with_credentials: Arc<AtomicUsize>,
    handle: actix_web::dev::ServerHandle,
}

struct IssuerKeys {
    key: jsonwebtoken::EncodingKey,
    cert_der_b64: String,
    issued: Arc<AtomicUsize>,
    with_credentials: Arc<AtomicUsize>,
}

impl TokenIssuer {
    pub async fn start() -> TokenIssuer {
        TokenIssuer::start_on("127.0.0.1").await
    }

    /// A token issuer on another loopback address (`127.0.0.2`), as a realm on a host
    /// other than the registry's.
    pub async fn start_on(ip: &str) -> TokenIssuer {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::procs::self_signed_cert(dir.path(), "regatta-test-token");
        let mut der = Command::new("openssl");
        der.args(["x509", "-outform", "DER", "-in"]).arg(&cert);
        let der = crate::procs::run(der, Duration::from_secs(30)).stdout;
        let issued = Arc::new(AtomicUsize::new(0));
        let with_credentials = Arc::new(AtomicUsize::new(0));
        let keys = web::Data::new(IssuerKeys {
            key: jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&key).unwrap()).unwrap(),
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(der),
            issued: issued.clone(),
            with_credentials: with_credentials.clone(),
        });
        let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(keys.clone())
                .route("/token", web::get().to(issue_get))
                .route("/token", web::post().to(issue_post))
                .route("/ready", web::get().to(HttpResponse::Ok))
        })
        .workers(2)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        crate::helpers::wait_for_http(&format!("http://{ip}:{port}/ready")).await;
        TokenIssuer {
            ip: ip.to_owned(),
            port,
            dir,
            issued,
            with_credentials,
            handle,
        }
    }

    /// Token requests so far that carried credentials.
    pub fn credentials_seen(&self) -> usize {
        self.with_credentials.load(Ordering::SeqCst)
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        actix_web::rt::spawn(async move { handle.stop(false).await });
    }
}

fn basic_credentials(req: &HttpRequest) -> Option<(String, String)> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

async fn issue_get(req: HttpRequest, keys: web::Data<IssuerKeys>) -> HttpResponse {
    if req.headers().contains_key("authorization") {
        keys.with_credentials.fetch_add(1, Ordering::SeqCst);
    }
    let scopes: Vec<String> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    issue(&keys, basic_credentials(&req), &scopes)
}

async fn issue_post(
    req: HttpRequest,
    keys: web::Data<IssuerKeys>,
    form: web::Bytes,
) -> HttpResponse {
    if req.headers().contains_key("authorization") || form.windows(9).any(|w| w == b"password=") {
        keys.with_credentials.fetch_add(1, Ordering::SeqCst);
    }
    let mut user = None;
    let mut password = None;
    let mut scopes = Vec::new();
    for (k, v) in url::form_urlencoded::parse(&form) {
        match &*k {
            "username" => user = Some(v.into_owned()),
            "password" => password = Some(v.into_owned()),
            "scope" => scopes.extend(v.split(' ').map(str::to_owned)),
            _ => {}
        }
    }
    issue(&keys, user.zip(password), &scopes)
}

fn issue(keys: &IssuerKeys, creds: Option<(String, String)>, scopes: &[String]) -> HttpResponse {
    let authenticated = match &creds {
        Some((u, p)) if u == USER && p == PASSWORD => true,
        Some(_) => return HttpResponse::Unauthorized().body("bad credentials"),
        None => false,
    };
    let access: Vec<_> = scopes
        .iter()
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            let actions: Vec<&str> = actions
                .split(',')
                .filter(|a| authenticated || *a == "pull")
                .collect();
            Some(json!({ "type": kind, "name": name, "actions": actions }))
        })
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let n = keys.issued.fetch_add(1, Ordering::SeqCst);
    let claims = json!({
        "iss": ISSUER,
        "sub": creds.as_ref().map_or("", |(u, _)| u.as_str()),
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("token-{n}"),
        "access": access,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.x5c = Some(vec![keys.cert_der_b64.clone()]);
    let token = jsonwebtoken::encode(&header, &claims, &keys.key).unwrap();
    HttpResponse::Ok().json(json!({ "token": token, "access_token": token, "expires_in": 300 }))
}

/// A running registry. Its combined log is kept for assertions about what reached it.
pub struct Registry {
    pub shape: Shape,
    /// Served over HTTPS (`start_tls`).
    pub tls: bool,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub cdn_port: Option<u16>,
    /// The token issuer's URL (token shapes), where pushes get a push token.
    token_realm: Option<String>,
    proc: Proc,
    cdn: Option<Proc>,
}

impl Registry {
    pub fn start(shape: Shape, issuer: Option<&TokenIssuer>) -> Registry {
        Registry::start_with(shape, issuer, None)
    }

    /// A registry serving HTTPS with `cert` and `key` (PEM).
    pub fn start_tls(
        shape: Shape,
        issuer: Option<&TokenIssuer>,
        cert: &Path,
        key: &Path,
    ) -> Registry {
        Registry::start_with(shape, issuer, Some((cert, key)))
    }

    fn start_with(
        shape: Shape,
        issuer: Option<&TokenIssuer>,
        tls: Option<(&Path, &Path)>,
    ) -> Registry {
        require("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("storage");
        std::fs::create_dir_all(&root).unwrap();
        let port = free_port();
        let mut cdn_port = None;
        let mut token_realm = None;
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: regatta-test-secret\n",
            root.display()
        );
        if let Some((cert, key)) = tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        match shape {
            Shape::Anonymous => {}
            Shape::Token | Shape::TokenWithCdn => {
                let issuer = issuer.expect("token registries need the token issuer");
                token_realm = Some(format!("http://127.0.0.1:{}/token", issuer.port));
                yaml.push_str(&format!(
                    "auth:\n  token:\n    realm: http://{}:{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                    issuer.ip,
                    issuer.port,
                    issuer.cert().display()
                ));
                if shape == Shape::TokenWithCdn {
                    let p = free_port();
                    cdn_port = Some(p);
                    yaml.push_str(&format!(
                        "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: http://127.0.0.1:{p}/\n"
                    ));
                }
            }
            Shape::Htpasswd => {
                require("htpasswd");
                let mut cmd = Command::new("htpasswd");
                cmd.args(["-Bbn", USER, PASSWORD]);
                let line = run_ok(cmd, Duration::from_secs(30));
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, line).unwrap();
                yaml.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: regatta-test\n    path: {}\n",
                    file.display()
                ));
            }
        }
        let config = dir.path().join("config.yml");
        std::fs::write(&config, yaml).unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let proc = Proc::spawn("docker-registry", cmd, &dir.path().join("registry.log"));
        let cdn = cdn_port.map(|p| start_cdn(dir.path(), &root, p));
        let registry = Registry {
            shape,
            tls: tls.is_some(),
            port,
            dir,
            cdn_port,
            token_realm,
            proc,
            cdn,
        };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&self) {
        let ports: Vec<u16> = std::iter::once(self.port).chain(self.cdn_port).collect();
        for port in ports {
            wait_until(
                &format!("{:?} registry on port {port}", self.shape),
                Duration::from_secs(20),
                || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            );
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts the registry process again on the same port and storage, after `stop` (its
    /// log starts over).
    pub fn restart(&mut self) {
        self.proc.stop();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(self.dir.path().join("config.yml"));
        self.proc = Proc::spawn(
            "docker-registry",
            cmd,
            &self.dir.path().join("registry.log"),
        );
        self.wait_ready();
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Everything the registry logged, one request per access line.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// What the CDN stand-in served (nginx access log).
    pub fn cdn_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cdn-access.log")).unwrap_or_default()
    }

    /// Access-log lines of reads (GET, HEAD) whose request line names `needle`.
    pub fn requests_naming(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            // The access-log lines: `127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 ...`
            .filter(|l| l.contains("\"GET /") || l.contains("\"HEAD /"))
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    pub fn stop(&mut self) {
        self.proc.stop();
        if let Some(cdn) = &mut self.cdn {
            cdn.stop();
        }
    }

    fn creds_args(&self) -> Vec<String> {
        if self.shape.needs_credentials_to_push() {
            vec!["--dest-creds".into(), format!("{USER}:{PASSWORD}")]
        } else {
            vec![]
        }
    }

    /// Pushes every platform of `image` to `repo:tag` with skopeo, keeping digests.
    pub fn push(&self, image: &Image, repo: &str, tag: &str) {
        skopeo_push(image, &self.host(), repo, tag, &self.creds_args());
    }

    /// Pushes the `arch` platform of `image` alone (its manifest, config and layers) to
    /// `repo:tag` with skopeo, keeping digests.
    pub fn push_platform(&self, image: &Image, arch: &str, repo: &str, tag: &str) {
        require("skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args(["--override-arch", arch, "--override-os", "linux", "copy"])
            .args(["--preserve-digests", "--dest-tls-verify=false"])
            .args(self.creds_args())
            .arg(format!("oci:{}:{}", image.dir.display(), image.tag))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()));
        run_ok(cmd, Duration::from_secs(180));
    }

    /// The `Authorization` a push to `repo` needs: Basic for htpasswd, a push token from
    /// the issuer for token shapes, none for the anonymous registry.
    async fn push_authorization(&self, client: &awc::Client, repo: &str) -> Option<String> {
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        );
        match self.shape {
            Shape::Anonymous => None,
            Shape::Htpasswd => Some(basic),
            Shape::Token | Shape::TokenWithCdn => {
                let realm = self.token_realm.as_ref().unwrap();
                let mut answer = client
                    .get(format!(
                        "{realm}?service={SERVICE}&scope=repository:{repo}:pull,push"
                    ))
                    .insert_header(("authorization", basic))
                    .send()
                    .await
                    .unwrap();
                let doc: serde_json::Value = answer.json().await.unwrap();
                Some(format!("Bearer {}", doc["token"].as_str().unwrap()))
            }
        }
    }

    /// Uploads `blob` to `repo` (monolithic POST + PUT).
    pub async fn push_blob(&self, repo: &str, blob: &[u8]) {
        let client = push_client();
        let auth = self.push_authorization(&client, repo).await;
        let with_auth = |req: awc::ClientRequest| match &auth {
            Some(a) => req.insert_header(("authorization", a.as_str())),
            None => req,
        };
        let start = with_auth(client.post(format!("{}/v2/{repo}/blobs/uploads/", self.url())))
            .send()
            .await
            .unwrap();
        assert_eq!(start.status(), 202, "blob upload start");
        let location = start
            .headers()
            .get("location")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = with_auth(client.put(format!(
            "{location}{sep}digest={}",
            crate::images::sha256(blob)
        )))
        .insert_header(("content-type", "application/octet-stream"))
        .send_body(blob.to_vec())
        .await
        .unwrap();
        assert_eq!(put.status(), 201, "blob upload finish");
    }

    /// Puts `manifest` (of `media_type`) at `repo:reference` (a tag or its digest).
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        manifest: &[u8],
    ) {
        let client = push_client();
        let mut req = client
            .put(format!("{}/v2/{repo}/manifests/{reference}", self.url()))
            .insert_header(("content-type", media_type));
        if let Some(auth) = self.push_authorization(&client, repo).await {
            req = req.insert_header(("authorization", auth));
        }
        let put = req.send_body(manifest.to_vec()).await.unwrap();
        assert_eq!(put.status(), 201, "manifest push to {repo}:{reference}");
    }

    /// Pushes an artifact (its blobs, then its manifest by digest) and the referrers tag
    /// schema index for its subject.
    pub async fn push_artifact(&self, repo: &str, artifact: &Artifact, subject_digest: &str) {
        for blob in &artifact.blobs {
            self.push_blob(repo, blob).await;
        }
        self.push_manifest(
            repo,
            &artifact.descriptor.digest,
            crate::images::OCI_MANIFEST,
            &artifact.manifest,
        )
        .await;
        let mut entry = artifact.descriptor.json();
        entry["artifactType"] = json!(artifact.artifact_type);
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": crate::images::OCI_INDEX,
            "manifests": [entry],
        }))
        .unwrap();
        let tag = subject_digest.replace(':', "-");
        self.push_manifest(repo, &tag, crate::images::OCI_INDEX, &index)
            .await;
    }
}

/// Pushes every platform of `image` to `host/repo:tag` with skopeo (plain HTTP), keeping
/// digests; `creds` are skopeo's `--dest-creds` arguments or none.
pub fn skopeo_push(image: &Image, host: &str, repo: &str, tag: &str, creds: &[String]) {
    require("skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "copy",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--retry-times",
        "2",
    ])
    .args(creds)
    .arg(format!("oci:{}:{}", image.dir.display(), image.tag))
    .arg(format!("docker://{host}/{repo}:{tag}"));
    run_ok(cmd, Duration::from_secs(180));
}

fn push_client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish()
}

/// nginx serving `root` as static files on `port` (config and logs in `dir`): the
/// registry's storage root, which the redirect middleware points at.
pub fn start_cdn(dir: &std::path::Path, root: &std::path::Path, port: u16) -> Proc {
    require("nginx");
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "user root;\ndaemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/cdn-error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/cdn-access.log;\n  client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n    root {};\n    location / {{ default_type application/octet-stream; }}\n  }}\n}}\n",
            root.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("cdn-error.log"));
    Proc::spawn("nginx", cmd, &dir.join("nginx.out"))
}
