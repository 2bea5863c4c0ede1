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
        let mut req = self.client.request(method, self.url(path));
        for (k, v) in headers {
            req = req.append_header((*k, *v));
        }
        let mut resp = req.send().await.expect("gateway answers");
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
    text: String,
}

impl Config {
    pub fn new() -> Config {
        Config {
            text: "[server]\nlisten = \"127.0.0.1:0\"\nregion = \"eu\"\nworkers = 2\n[log]\nformat = \"pretty\"\nfilter = \"warn\"\n"
                .into(),
        }
    }

    /// A backend for `registry`, with credentials when its shape needs them.
    pub fn backend(mut self, id: &str, registry: &Registry, delivery: &str) -> Config {
        self.text.push_str(&format!(
            "[[backends]]\nid = \"{id}\"\nurl = \"{}\"\nregion = \"eu\"\ndelivery = \"{delivery}\"\n",
            registry.url()
        ));
        if registry.shape == Shape::Htpasswd || registry.shape == Shape::TokenWithCdn {
            self.text.push_str(&format!(
                "username = \"{USER}\"\npassword = \"{PASSWORD}\"\n"
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

pub async fn spawn_app(config: Config) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("regatta.toml");
    std::fs::write(&path, &config.text).unwrap();
    let settings = Settings::load(Some(&path), std::iter::empty())
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{}", config.text));
    regatta::telemetry::init(&settings.log);
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
