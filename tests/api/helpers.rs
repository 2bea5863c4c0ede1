//! Starting gateway nodes on port 0 and talking to them over HTTP.

use std::time::Duration;

use regatta::config::Settings;
use regatta::startup::Application;

use crate::registry::{Registry, Shape, PASSWORD, USER};

pub struct TestApp {
    pub port: u16,
    pub admin_port: Option<u16>,
    handles: Vec<actix_web::dev::ServerHandle>,
    pub client: awc::Client,
    _config_dir: tempfile::TempDir,
}

impl TestApp {
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(awc::http::Method::GET, path, &[]).await
    }

    pub async fn head(&self, path: &str) -> Answer {
        self.request(awc::http::Method::HEAD, path, &[]).await
    }

    pub async fn request(
        &self,
        method: awc::http::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        self.send(method, self.url(path), headers, None).await
    }

    /// A call to the admin API with the admin token.
    pub async fn admin(
        &self,
        method: awc::http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Answer {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        self.admin_as(method, path, body, Some(&auth)).await
    }

    /// A call to the admin API with the given `Authorization` (or none).
    pub async fn admin_as(
        &self,
        method: awc::http::Method,
        path: &str,
        body: Option<serde_json::Value>,
        authorization: Option<&str>,
    ) -> Answer {
        let url = format!("{}{path}", self.admin_url());
        let headers: Vec<(&str, &str)> = authorization
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        self.send(method, url, &headers, body).await
    }

    /// A GET of any URL with no extra headers.
    pub async fn send_raw(&self, url: &str) -> Answer {
        self.send(awc::http::Method::GET, url.to_owned(), &[], None)
            .await
    }

    /// The node's Prometheus exposition (admin listener).
    pub async fn metrics(&self) -> String {
        let answer = self
            .send_raw(&format!("{}/metrics", self.admin_url()))
            .await;
        String::from_utf8(answer.body).unwrap()
    }

    pub fn admin_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.admin_port.expect("node started with .admin()")
        )
    }

    /// The backend a node chooses for a blob GET now.
    pub async fn blob_backend(&self, repo: &str, digest: &str) -> String {
        let answer = self.get(&format!("/v2/{repo}/blobs/{digest}")).await;
        if answer.status != 307 && answer.status != 200 {
            let view = match self.admin_port {
                Some(_) => {
                    let listed = self
                        .admin(awc::http::Method::GET, "/admin/v1/backends", None)
                        .await;
                    String::from_utf8_lossy(&listed.body).into_owned()
                }
                None => String::new(),
            };
            panic!(
                "node {}: blob GET answered {}: {}\nbackends as this node sees them: {view}",
                self.port,
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
        answer.backend().to_owned()
    }

    async fn send(
        &self,
        method: awc::http::Method,
        url: String,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Answer {
        let build = || {
            let mut req = self.client.request(method.clone(), url.clone());
            for (k, v) in headers {
                req = req.append_header((*k, *v));
            }
            req
        };
        let send = |req: awc::ClientRequest| async {
            match &body {
                Some(b) => req.send_json(b).await,
                None => req.send().await,
            }
        };
        // A keep-alive connection the server closed between two calls: one retry.
        let mut resp = match send(build()).await {
            Ok(resp) => resp,
            Err(_) => send(build()).await.expect("gateway answers"),
        };
        let body = resp
            .body()
            .limit(64 * 1024 * 1024)
            .await
            .unwrap_or_default();
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: body.to_vec(),
        }
    }
}

impl TestApp {
    /// Stops the node's servers gracefully and waits until they have stopped.
    pub async fn stop(&self) {
        for handle in self.handles.clone() {
            handle.stop(true).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        for handle in self.handles.clone() {
            actix_web::rt::spawn(async move { handle.stop(false).await });
        }
    }
}

pub struct Answer {
    pub status: u16,
    pub headers: awc::http::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn backend(&self) -> &str {
        self.header("x-regatta-backend").unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The OCI error code of an error body.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// Builds gateway configuration text.
pub struct Config {
    region: String,
    /// More keys of the `[server]` section.
    server: String,
    sections: String,
    text: String,
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

impl Config {
    pub fn new() -> Config {
        Config {
            region: "eu".into(),
            server: String::new(),
            sections: "[log]\nformat = \"pretty\"\nfilter = \"warn,regatta::audit=info\"\n".into(),
            text: String::new(),
        }
    }

    /// Another key of the `[server]` section, e.g. `drain_file = "/path"`.
    pub fn server_key(mut self, line: &str) -> Config {
        self.server.push_str(line);
        self.server.push('\n');
        self
    }

    pub fn region(mut self, region: &str) -> Config {
        self.region = region.into();
        self
    }

    /// Logs in `format` (`json`, `pretty`) filtered by `filter` (instead of warnings only).
    pub fn log(mut self, format: &str, filter: &str) -> Config {
        let at = self.sections.find("[log]\n").expect("the log section");
        let end = self.sections[at..]
            .find("\n[")
            .map_or(self.sections.len(), |e| at + e + 1);
        self.sections.replace_range(
            at..end,
            &format!("[log]\nformat = \"{format}\"\nfilter = \"{filter}\"\n"),
        );
        self
    }

    /// Shared state in the Redis at `url`.
    pub fn redis(self, url: &str) -> Config {
        self.redis_with(url, &[])
    }

    /// Shared state in the Redis at `url`, with more `[store]` keys (`tls_ca`, ...).
    pub fn redis_with(mut self, url: &str, keys: &[(&str, &str)]) -> Config {
        self.sections
            .push_str(&format!("[store]\ntype = \"redis\"\nurl = \"{url}\"\n"));
        for (key, value) in keys {
            self.sections.push_str(&format!("{key} = {value:?}\n"));
        }
        self
    }

    /// An admin listener on a free port, with `ADMIN_TOKEN`.
    pub fn admin(mut self) -> Config {
        self.sections.push_str(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n"
        ));
        self
    }

    /// Health checks every `interval`, down after `fall` failures.
    pub fn health(mut self, interval: &str, fall: u32) -> Config {
        self.sections.push_str(&format!(
            "[health]\ninterval = \"{interval}\"\ntimeout = \"1s\"\nfall = {fall}\nrise = 2\n"
        ));
        self
    }

    /// Periodic full reload of the shared state.
    pub fn refresh(mut self, interval: &str) -> Config {
        self.sections
            .push_str(&format!("[cluster]\nrefresh_interval = \"{interval}\"\n"));
        self
    }

    /// Everything but `[server]`: the sections for a `NodeProcess`.
    pub fn render_without_server(&self) -> String {
        format!("{}{}", self.sections, self.text)
    }

    fn render(&self) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{}",
            self.server_sections("")
        )
    }

    /// Everything after `[server] listen`, with `server_keys` (e.g. `tls_cert = ...`) added
    /// to the server section: the configuration of a `NodeProcess`.
    pub fn server_sections(&self, server_keys: &str) -> String {
        format!(
            "region = \"{}\"\nworkers = 2\n{}{server_keys}{}{}",
            self.region, self.server, self.sections, self.text
        )
    }

    /// A backend for `registry`, with credentials when its shape needs them.
    pub fn backend(self, id: &str, registry: &Registry, delivery: &str) -> Config {
        self.backend_in(id, registry, delivery, "eu")
    }

    pub fn backend_in(self, id: &str, registry: &Registry, delivery: &str, region: &str) -> Config {
        let url = registry.url();
        self.backend_via(id, registry, &url, delivery, region)
    }

    /// A backend for `registry` reached at `url` (e.g. through a relay in front of it).
    pub fn backend_via(
        mut self,
        id: &str,
        registry: &Registry,
        url: &str,
        delivery: &str,
        region: &str,
    ) -> Config {
        self = self.backend_at(id, url, delivery, region);
        if registry.shape == Shape::Htpasswd || registry.shape == Shape::TokenWithCdn {
            self.text.push_str(&format!(
                "username = \"{USER}\"\npassword = \"{PASSWORD}\"\n"
            ));
        }
        self
    }

    /// A backend at any URL (a test server rather than a registry), anonymous.
    pub fn backend_at(mut self, id: &str, url: &str, delivery: &str, region: &str) -> Config {
        self.text.push_str(&format!(
            "[[backends]]\nid = \"{id}\"\nurl = \"{url}\"\nregion = \"{region}\"\ndelivery = \"{delivery}\"\n"
        ));
        self
    }

    /// Per-client limits on cold lookups.
    pub fn limits(mut self, per_second: u32, burst: u32, trusted: &[&str]) -> Config {
        let trusted: Vec<String> = trusted.iter().map(|t| format!("\"{t}\"")).collect();
        self.sections.push_str(&format!(
            "[limits]\ncold_per_second = {per_second}\ncold_burst = {burst}\ntrusted = [{}]\n",
            trusted.join(", ")
        ));
        self
    }

    /// Failed logins allowed per client at the token endpoint (instead of [`Config::limits`]).
    pub fn login_limit(mut self, per_minute: u32, burst: u32) -> Config {
        self.sections.push_str(&format!(
            "[limits]\nlogin_failures_per_minute = {per_minute}\nlogin_failure_burst = {burst}\n"
        ));
        self
    }

    /// TOML lines added to the backend configured last (credentials, `tls_ca`, ...).
    pub fn backend_keys(mut self, lines: &str) -> Config {
        let last_table = self
            .text
            .rfind("\n[")
            .map_or(&self.text[..], |i| &self.text[i + 1..]);
        assert!(
            last_table.starts_with("[[backends]]"),
            "backend_keys follows a backend"
        );
        self.text.push_str(lines);
        if !lines.ends_with('\n') {
            self.text.push('\n');
        }
        self
    }

    /// Names the tag authorities of an org added before.
    pub fn tag_authorities(mut self, org: &str, ids: &[&str]) -> Config {
        let at = format!("[[orgs]]\nname = \"{org}\"\n");
        assert!(self.text.contains(&at), "org {org} is configured first");
        let list: Vec<String> = ids.iter().map(|b| format!("\"{b}\"")).collect();
        self.text = self.text.replace(
            &at,
            &format!("{at}tag_authorities = [{}]\n", list.join(", ")),
        );
        self
    }

    /// Backend timeouts: the longest wait for body bytes and the per-request deadline.
    pub fn timeouts(mut self, read_timeout: &str, request_deadline: &str) -> Config {
        self.sections.push_str(&format!(
            "[upstream]\nread_timeout = \"{read_timeout}\"\nrequest_deadline = \"{request_deadline}\"\n"
        ));
        self
    }

    /// A mirror-mode upstream group (`[[upstreams]]`).
    pub fn upstream(
        mut self,
        name: &str,
        aliases: &[&str],
        backends: &[&str],
        default: bool,
    ) -> Config {
        let quoted = |list: &[&str]| {
            list.iter()
                .map(|b| format!("\"{b}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.text.push_str(&format!(
            "[[upstreams]]\nname = \"{name}\"\naliases = [{}]\nbackends = [{}]\ndefault = {default}\n",
            quoted(aliases),
            quoted(backends)
        ));
        self
    }

    /// The `[auth]` section: tokens signed with `signing_key`, users from `users_file`.
    pub fn auth(self, signing_key: &std::path::Path, users_file: &std::path::Path) -> Config {
        self.auth_rotating(signing_key, &[], users_file)
    }

    /// The same, still accepting tokens of `previous_keys` (a key rotation).
    pub fn auth_rotating(
        mut self,
        signing_key: &std::path::Path,
        previous_keys: &[&std::path::Path],
        users_file: &std::path::Path,
    ) -> Config {
        let previous: Vec<String> = previous_keys
            .iter()
            .map(|p| format!("\"{}\"", p.display()))
            .collect();
        self.sections.push_str(&format!(
            "[auth]\nservice = \"regatta-test\"\nsigning_key = \"{}\"\nprevious_keys = [{}]\nusers_file = \"{}\"\n",
            signing_key.display(),
            previous.join(", "),
            users_file.display()
        ));
        self
    }

    /// A private org: only `grants` (principal, repository globs) may pull it.
    pub fn private_org(
        mut self,
        name: &str,
        backends: &[&str],
        grants: &[(&str, &[&str])],
    ) -> Config {
        self = self.org(name, backends, "30s", &[]);
        self.text.push_str("access = \"private\"\n");
        for (principal, repositories) in grants {
            let list: Vec<String> = repositories.iter().map(|r| format!("\"{r}\"")).collect();
            self.text.push_str(&format!(
                "[[orgs.grants]]\nprincipal = \"{principal}\"\nrepositories = [{}]\n",
                list.join(", ")
            ));
        }
        self
    }

    pub fn org(
        mut self,
        name: &str,
        backends: &[&str],
        tag_ttl: &str,
        prefixes: &[(&str, &str)],
    ) -> Config {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        self.text.push_str(&format!(
            "[[orgs]]\nname = \"{name}\"\nbackends = [{}]\ntag_ttl = \"{tag_ttl}\"\n",
            list.join(", ")
        ));
        if !prefixes.is_empty() {
            self.text.push_str("[orgs.prefixes]\n");
            for (b, p) in prefixes {
                self.text.push_str(&format!("{b} = \"{p}\"\n"));
            }
        }
        self
    }
}

pub async fn spawn_app(config: &Config) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("regatta.toml");
    let text = config.render();
    std::fs::write(&path, &text).unwrap();
    let settings = Settings::load(Some(&path), std::iter::empty())
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}"));
    let _ = regatta::telemetry::init(&settings.log, &settings.tracing);
    let app = Application::build(settings).expect("gateway starts");
    let port = app.port();
    let admin_port = app.admin_addr().map(|a| a.port());
    let handles = app.handles();
    actix_web::rt::spawn(app.run_until_stopped());
    let app = TestApp {
        port,
        admin_port,
        handles,
        client: awc::Client::builder()
            .disable_redirects()
            .timeout(Duration::from_secs(60))
            .finish(),
        _config_dir: dir,
    };
    // The server starts when its future is first polled: wait for it to answer before a
    // test blocks this thread on a client process.
    wait_for_http(&app.url("/healthz")).await;
    app
}

/// Polls `url` until it answers 200, yielding to the runtime between tries.
pub async fn wait_for_http(url: &str) {
    let client = awc::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} did not come up"
        );
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `regatta serve` process serving `config` on its HTTPS listener (`server.tls_cert`)
/// with a self-signed certificate for 127.0.0.1 made in `dir/name`; returns the node and the
/// certificate, which clients trust as their CA.
pub fn spawn_tls_node(
    dir: &std::path::Path,
    name: &str,
    config: &Config,
) -> (NodeProcess, std::path::PathBuf) {
    let cert_dir = dir.join(name);
    std::fs::create_dir_all(&cert_dir).unwrap();
    let (cert, key) = crate::procs::self_signed_cert(&cert_dir, "127.0.0.1");
    let keys = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let node = NodeProcess::start(dir, name, &config.server_sections(&keys), &[]);
    (node, cert)
}

/// A `regatta serve` process (the binary under test) with the given configuration sections
/// after `[server] listen`, its log in `dir`.
pub struct NodeProcess {
    pub port: u16,
    pub log: std::path::PathBuf,
    pub proc: crate::procs::Proc,
}

impl NodeProcess {
    pub fn start(
        dir: &std::path::Path,
        name: &str,
        sections: &str,
        env: &[(&str, &str)],
    ) -> NodeProcess {
        NodeProcess::start_on(crate::procs::free_port(), dir, name, sections, env)
    }

    /// The same on a given port (a node restarted where clients know it).
    pub fn start_on(
        port: u16,
        dir: &std::path::Path,
        name: &str,
        sections: &str,
        env: &[(&str, &str)],
    ) -> NodeProcess {
        NodeProcess::start_under(&[], port, dir, name, sections, env)
    }

    /// The same run by `wrapper` (a profiler's command line, the node's after it; none:
    /// the node itself).
    pub fn start_under(
        wrapper: &[String],
        port: u16,
        dir: &std::path::Path,
        name: &str,
        sections: &str,
        env: &[(&str, &str)],
    ) -> NodeProcess {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{sections}"),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let node = env!("CARGO_BIN_EXE_regatta");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = std::process::Command::new(program);
                cmd.args(args).arg(node);
                cmd
            }
            None => std::process::Command::new(node),
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .envs(env.iter().copied());
        let proc = crate::procs::Proc::spawn(name, cmd, &log);
        crate::procs::wait_until(
            &format!("{name} to listen"),
            Duration::from_secs(30),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        NodeProcess { port, log, proc }
    }
}

/// Polls `check` until it holds, failing the test after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of the series `name` with all `labels` in a Prometheus exposition.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (series, value) = match rest.strip_prefix('{') {
            Some(labelled) => labelled.rsplit_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}
