//! Settings: the file named on the command line (or `config/default.toml`) plus
//! `REGATTA__SECTION__KEY` environment overrides, deserialized into typed structs and
//! validated once at boot. Every problem names its key and the reason.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::model::{Access, Delivery, Grant, OrgPolicy};
use crate::secret::{redact_url, Secret};

/// Where the default configuration lives when no file is named.
pub const DEFAULT_CONFIG: &str = "config/default.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    #[serde(default)]
    pub store: StoreSettings,
    #[serde(default)]
    pub upstream: UpstreamSettings,
    #[serde(default)]
    pub cache: CacheSettings,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub access_log: AccessLogSettings,
    #[serde(default)]
    pub tracing: TracingSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    #[serde(default)]
    pub health: HealthSettings,
    #[serde(default)]
    pub limits: LimitSettings,
    #[serde(default)]
    pub cluster: ClusterSettings,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub backends: Vec<BackendSettings>,
    #[serde(default)]
    pub orgs: Vec<OrgSettings>,
    /// Mirror mode: registries this node mirrors (`[[upstreams]]`), chosen per request by
    /// containerd's `ns` parameter, a host prefix in the path, or the default group.
    #[serde(default)]
    pub upstreams: Vec<UpstreamGroupSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address of the registry API listener, `host:port`; port 0 picks a free port.
    pub listen: String,
    /// Region this node runs in; placement prefers backends of the same region.
    #[serde(default = "default_region")]
    pub region: String,
    /// Worker threads; defaults to the number of cores.
    #[serde(default)]
    pub workers: Option<usize>,
    /// PEM certificate chain and private key: the registry API is served over HTTPS
    /// (clients other than loopback ones need it). Both or neither.
    #[serde(default)]
    pub tls_cert: Option<String>,
    #[serde(default)]
    pub tls_key: Option<String>,
    /// While this file exists the node reports not ready (`/readyz` 503): a sidecar's way
    /// to take the node out of rotation.
    #[serde(default)]
    pub drain_file: Option<std::path::PathBuf>,
    /// On SIGTERM (or Ctrl-C): `/readyz` answers 503 at once, the node keeps serving for
    /// this long (announcements are withdrawn, in-flight streams finish), then stops.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long an idle client connection is kept open for its next request.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// How long a client has, from a request's first byte, to send the whole request head
    /// (slow clients get 408).
    #[serde(default = "default_request_head_timeout", with = "humantime_serde")]
    pub request_head_timeout: Duration,
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(5)
}

fn default_request_head_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}

/// The gateway's own token service, for private orgs: users, signing keys, token lifetime.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// The token endpoint clients are sent to: this gateway's external URL plus `/token`
    /// (`https://cr.example.org/token`). Unset: built from each request's scheme and Host.
    pub realm: Option<String>,
    /// The service name in challenges and tokens; every node and region uses the same.
    pub service: String,
    /// PEM private key (PKCS#8 EC P-256 or Ed25519, or RSA) that signs tokens: the same
    /// file on every node and region, so any node accepts any node's tokens.
    pub signing_key: Option<String>,
    /// PEM keys whose tokens are still accepted (a rotation: the old key goes here).
    pub previous_keys: Vec<String>,
    /// An htpasswd file of bcrypt entries (`htpasswd -B`): the users.
    pub users_file: Option<String>,
    /// How long a token is good for.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// The files above as read at load time.
    #[serde(skip)]
    pub loaded: Option<std::sync::Arc<crate::auth::Loaded>>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            realm: None,
            service: "regatta".into(),
            signing_key: None,
            previous_keys: Vec::new(),
            users_file: None,
            token_ttl: Duration::from_secs(300),
            loaded: None,
        }
    }
}

/// Which store holds shared state (tag cache, digest holders, detected delivery modes).
#[derive(Clone, Default, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreSettings {
    /// In-process store: a single node, nothing shared, nothing kept across restarts.
    #[default]
    Memory,
    /// Redis shared by every node.
    Redis {
        /// `redis://[[user]:password@]host:port[/db]` (standalone),
        /// `redis+sentinel://[[user]:password@]host:port,host:port/master[/db]` (Sentinel;
        /// the password is the master's) or `redis+cluster://[[user]:password@]host:port,...`
        /// (Cluster, Redis 7+). `rediss`, `rediss+sentinel`, `rediss+cluster`: the same over
        /// TLS. A password with reserved characters is percent-encoded.
        url: String,
        /// PEM file of the certificate authorities trusted for Redis TLS instead of the
        /// public (webpki) roots.
        #[serde(default)]
        tls_ca: Option<String>,
        /// The password the Sentinels themselves require, when they do.
        #[serde(default)]
        sentinel_password: Option<String>,
        /// A replica in this node's region (`redis://` or `rediss://`, standalone, same
        /// password and `tls_ca` rules as `url`) that snapshot reloads, holder and tag
        /// reads and the event subscription use; writes still go to `url`. When it cannot
        /// be reached, reads go to `url`.
        #[serde(default)]
        read_url: Option<String>,
    },
}

impl fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSettings::Memory => f.write_str("Memory"),
            StoreSettings::Redis {
                url,
                tls_ca,
                sentinel_password,
                read_url,
            } => f
                .debug_struct("Redis")
                .field("url", &crate::store::redact(url))
                .field("read_url", &read_url.as_deref().map(crate::store::redact))
                .field("tls_ca", tls_ca)
                .field(
                    "sentinel_password",
                    &sentinel_password.as_ref().map(|_| "***"),
                )
                .finish(),
        }
    }
}

impl StoreSettings {
    /// The Redis these settings name (`None` for the memory store), with the CA bundle
    /// read; on error, the key at fault and why.
    pub fn redis_target(&self) -> Result<Option<crate::store::RedisTarget>, Problem> {
        let StoreSettings::Redis {
            url,
            tls_ca,
            sentinel_password,
            ..
        } = self
        else {
            return Ok(None);
        };
        let problem = |key: &str, reason: String| Problem {
            key: key.into(),
            reason,
        };
        let mut target =
            crate::store::RedisTarget::parse(url).map_err(|e| problem("store.url", e))?;
        target = Self::with_tls_ca(target, tls_ca)?;
        if let Some(password) = sentinel_password {
            target = target
                .with_sentinel_password(password.clone())
                .map_err(|e| problem("store.sentinel_password", e))?;
        }
        Ok(Some(target))
    }

    /// The regional replica reads go to (`store.read_url`), if one is set.
    pub fn redis_read_target(&self) -> Result<Option<crate::store::RedisTarget>, Problem> {
        let StoreSettings::Redis {
            url: primary,
            read_url: Some(url),
            tls_ca,
            ..
        } = self
        else {
            return Ok(None);
        };
        let problem = |reason: String| Problem {
            key: "store.read_url".into(),
            reason,
        };
        if primary.contains("+cluster://") {
            return Err(problem(
                "is for a standalone or Sentinel store.url (a Cluster spreads reads itself)".into(),
            ));
        }
        let target = crate::store::RedisTarget::parse(url).map_err(problem)?;
        if !matches!(target.shape, crate::store::RedisShape::Standalone { .. }) {
            return Err(problem(format!(
                "'{}' must name one server (redis:// or rediss://): a replica in this node's region",
                crate::store::redact(url)
            )));
        }
        Self::with_tls_ca(target, tls_ca).map(Some)
    }

    fn with_tls_ca(
        target: crate::store::RedisTarget,
        tls_ca: &Option<String>,
    ) -> Result<crate::store::RedisTarget, Problem> {
        let Some(path) = tls_ca else {
            return Ok(target);
        };
        let problem = |reason: String| Problem {
            key: "store.tls_ca".into(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| problem(format!("cannot read '{path}': {e}")))?;
        target
            .with_tls_ca(pem)
            .map_err(|e| problem(format!("'{path}' {e}")))
    }
}

/// OpenTelemetry traces. Off unless `otlp_endpoint` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSettings {
    /// Collector address: `http://host:4317` for gRPC, `http://host:4318` for HTTP.
    pub otlp_endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// Share of new traces recorded (a caller's sampled trace is always continued).
    pub sample_ratio: f64,
    pub service_name: String,
}

impl Default for TracingSettings {
    fn default() -> Self {
        TracingSettings {
            otlp_endpoint: None,
            protocol: OtlpProtocol::Grpc,
            sample_ratio: 1.0,
            service_name: "regatta".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    Grpc,
    Http,
}

/// The operator's API, on its own listener. Off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin listener, e.g. `127.0.0.1:5001`.
    pub listen: Option<String>,
    /// Bearer token every admin call must carry (required when `listen` is set).
    pub token: Option<Secret>,
}

/// Active health checks. One node of each region per interval probes each backend (a lease
/// per region and backend in the store); every node of that region goes by the result.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Time allowed for one probe.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive good probes that bring a down backend back up.
    pub rise: u32,
    /// Consecutive failed probes that take a backend down.
    pub fall: u32,
    /// A backend answering slower than this is degraded.
    #[serde(with = "humantime_serde")]
    pub degraded_latency: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
            rise: 2,
            fall: 3,
            degraded_latency: Duration::from_secs(1),
        }
    }
}

/// Per-client limits on the requests that cost backend round trips (cold lookups). Warm
/// answers are never limited.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Cold lookups (tag resolutions, manifest fetches, blob probes, tag lists, referrers)
    /// one client address may cause per second; 0 turns limiting off.
    pub cold_per_second: u32,
    /// How many it may cause at once before the rate applies.
    pub cold_burst: u32,
    /// Networks never limited (CIDR), e.g. a CI farm behind one NAT address.
    pub trusted: Vec<ipnet::IpNet>,
    /// Credentials that fail to verify at `/token`, per client address and minute, once
    /// `login_failure_burst` are spent; past it, logins answer 429 (public content is still
    /// served anonymously). 0 turns the limit off.
    pub login_failures_per_minute: u32,
    pub login_failure_burst: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            cold_per_second: 50,
            cold_burst: 500,
            trusted: Vec::new(),
            login_failures_per_minute: 30,
            login_failure_burst: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// Full reload of the shared state into the node's snapshot, besides pub/sub events.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// This node's name in leases, health records and logs; defaults to host:port.
    pub node_id: Option<String>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            refresh_interval: Duration::from_secs(5),
            node_id: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSettings {
    /// Time allowed to open a connection to a backend.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for a backend to answer with a response head.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest wait for body bytes: a whole manifest, token or list, or the gap between
    /// two chunks of a blob streamed through. A backend that stalls longer is abandoned
    /// (the next holder is tried, or the stream is ended).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Longest time the gateway works on one client request before answering 503: every
    /// backend, token and store call it makes for the request fits inside it.
    #[serde(with = "humantime_serde")]
    pub request_deadline: Duration,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(10),
            request_deadline: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Bytes of manifests kept in memory (manifests by digest are immutable).
    pub manifest_bytes: u64,
    /// Bytes of "backend B holds digest D" facts (and blob sizes) kept in memory.
    pub holder_bytes: u64,
    /// Bytes of "backend B lacks digest D" facts: kept apart, so that requests for invented
    /// names (which only ever learn "lacks") cannot push out what serves real pulls.
    pub lacks_bytes: u64,
    /// Bytes of tag records kept in memory.
    pub tag_bytes: u64,
    /// Bytes of pre-signed URLs and decided redirects kept in memory.
    pub url_bytes: u64,
    /// How long "backend B holds digest D" is remembered.
    #[serde(with = "humantime_serde")]
    pub holder_ttl: Duration,
    /// How long "backend B lacks digest D" is remembered; short, since pushes land later.
    #[serde(with = "humantime_serde")]
    pub lacks_ttl: Duration,
    /// Longest time a backend's pre-signed blob URL is reused; shorter when the URL says
    /// it expires sooner.
    #[serde(with = "humantime_serde")]
    pub resolve_ttl: Duration,
    /// How long the last known digest of a tag is kept to serve (marked stale) when the
    /// org's tag authority is down.
    #[serde(with = "humantime_serde")]
    pub stale_tag_ttl: Duration,
    /// How long a backend that failed to answer (connection refused, timeout) is passed
    /// over before it is tried again.
    #[serde(with = "humantime_serde")]
    pub failure_backoff: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            manifest_bytes: 64 * 1024 * 1024,
            holder_bytes: 64 * 1024 * 1024,
            lacks_bytes: 8 * 1024 * 1024,
            tag_bytes: 16 * 1024 * 1024,
            url_bytes: 32 * 1024 * 1024,
            holder_ttl: Duration::from_secs(24 * 3600),
            lacks_ttl: Duration::from_secs(30),
            resolve_ttl: Duration::from_secs(300),
            stale_tag_ttl: Duration::from_secs(7 * 24 * 3600),
            failure_backoff: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `json` (one object per line) or `pretty`.
    pub format: LogFormat,
    /// A tracing filter directive, e.g. `info,regatta=debug`; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Json,
            filter: "info".into(),
        }
    }
}

/// The access log: one line per registry API request, written off the request thread
/// (`crate::access_log`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogSettings {
    /// On by default, like nginx's.
    pub enabled: bool,
    /// `json` (one object per line) or `logfmt` (`key=value` pairs).
    pub format: AccessLogFormat,
    /// `-` for stderr (beside the other logs), or a file the lines are appended to.
    pub path: String,
    /// Lines held for the writer at most; when the output cannot keep up, further lines
    /// are dropped and counted (`regatta_access_log_dropped_total`), never waited for.
    pub buffer_lines: usize,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        AccessLogSettings {
            enabled: true,
            format: AccessLogFormat::Json,
            path: "-".into(),
            buffer_lines: 65_536,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    Json,
    Logfmt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSettings {
    /// Short name used in org policies, headers, metrics and logs.
    pub id: String,
    /// Base URL of the registry, e.g. `https://registry-1.docker.io`.
    pub url: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// How blobs reach clients: `auto`, `direct`, `resolve` or `proxy`.
    #[serde(default)]
    pub delivery: Delivery,
    /// Credentials for the backend: Basic, or the account for its token service.
    #[serde(default)]
    pub username: Option<String>,
    /// The password itself; or `password_file` (a file holding it, e.g. a mounted
    /// Kubernetes secret) or `password_env` (the environment variable holding it). After
    /// loading, `password` holds the value whichever way it was given.
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_file: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// A static bearer token sent as is (no token service round trip); or `token_file` /
    /// `token_env`, as for the password.
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<String>,
    #[serde(default)]
    pub token_env: Option<String>,
    /// Hosts besides the backend's own that may receive its credentials as a token realm
    /// (`auth.docker.io` for Docker Hub). `host` or `host:port`.
    #[serde(default)]
    pub token_realm_hosts: Vec<String>,
    /// A PEM bundle of CA certificates trusted for this backend (and its token realm and
    /// redirects) besides the public roots: a registry on a private CA.
    #[serde(default)]
    pub tls_ca: Option<String>,
    /// The certificates of `tls_ca`, read when the settings are loaded.
    #[serde(skip)]
    pub tls_ca_certs: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// Preference among otherwise equal backends; 0 means "only when nothing else can".
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// A blob the health check fetches through the real delivery path:
    /// `repository@sha256:...` as named on this backend.
    #[serde(default)]
    pub canary: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgSettings {
    /// The first path component this org serves: `acme` serves `acme/*`.
    pub name: String,
    /// Backend ids in order of preference among otherwise equal backends.
    pub backends: Vec<String>,
    /// The backends asked what a tag points at, in order (default: every backend). Leave
    /// out a mirror that may lag: it is then never asked for a tag.
    #[serde(default)]
    pub tag_authorities: Option<Vec<String>>,
    /// How long a tag's digest is trusted before asking the authority again.
    #[serde(default = "crate::model::default_tag_ttl", with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Per backend, the path that replaces the org name: `{ mirror = "acme-images" }` makes
    /// `acme/app` into `acme-images/app` on backend `mirror`.
    #[serde(default)]
    pub prefixes: BTreeMap<String, String>,
    /// `public` (anyone may pull; the default) or `private` (only the principals in
    /// `grants`, with tokens from this gateway's `/token`).
    #[serde(default)]
    pub access: Access,
    /// `[[orgs.grants]]`: `principal` (a user of `auth.users_file`, or `robot:<name>`) may
    /// pull the org's repositories matching `repositories` (globs, default `["*"]`).
    #[serde(default)]
    pub grants: Vec<Grant>,
}

impl OrgSettings {
    /// The policy this org seeds the store with.
    pub fn policy(&self) -> OrgPolicy {
        OrgPolicy {
            backends: self.backends.clone(),
            tag_authorities: self.tag_authorities.clone(),
            tag_ttl: self.tag_ttl,
            prefixes: self.prefixes.clone(),
            access: self.access,
            grants: self.grants.clone(),
        }
    }
}

/// One upstream registry of mirror mode (`[[upstreams]]`): served like an org whose
/// repositories keep their full name on the backends (`library/alpine` stays
/// `library/alpine`). Always public.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamGroupSettings {
    /// The registry's host name (`docker.io`): matched against `ns=` and a host prefix in
    /// the path (`/v2/docker.io/library/alpine/...`).
    pub name: String,
    /// Other host names (with a port when it is part of them) that select this group.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Backend ids in order of preference among otherwise equal backends.
    pub backends: Vec<String>,
    /// Serves requests that carry neither `ns` nor a host prefix (at most one group).
    #[serde(default)]
    pub default: bool,
    /// The backends asked what a tag points at, in order (default: every backend).
    #[serde(default)]
    pub tag_authorities: Option<Vec<String>>,
    /// How long a tag's digest is trusted before asking the authority again.
    #[serde(default = "crate::model::default_tag_ttl", with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Per backend, a path put in front of the repository on that backend:
    /// `{ harbor = "dockerhub-proxy" }` makes `library/alpine` into
    /// `dockerhub-proxy/library/alpine` there (a Harbor proxy-cache project).
    #[serde(default)]
    pub prefixes: BTreeMap<String, String>,
}

impl UpstreamGroupSettings {
    /// The group's serving policy, checked and served like an org's.
    pub fn policy(&self) -> OrgPolicy {
        OrgPolicy {
            backends: self.backends.clone(),
            tag_authorities: self.tag_authorities.clone(),
            tag_ttl: self.tag_ttl,
            prefixes: self.prefixes.clone(),
            // Mirror groups are public.
            access: crate::model::Access::Public,
            grants: Vec::new(),
        }
    }
}

fn default_region() -> String {
    "default".into()
}
fn default_weight() -> u32 {
    100
}

/// One problem in a configuration: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(String),
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl Settings {
    /// Reads `file` (or `config/default.toml` when it exists and no file is named), applies
    /// `REGATTA__*` overrides from `env`, reads credentials given as files or environment
    /// variables (`password_env` and `token_env` are looked up in `env` too), and validates
    /// the result.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let builder = config::Config::builder();
        let builder = match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::Load(format!(
                        "{}: no such file",
                        path.display()
                    )));
                }
                builder.add_source(config::File::from(path).required(true))
            }
            None => builder.add_source(config::File::with_name(DEFAULT_CONFIG).required(false)),
        };
        Self::build(builder, env)
    }

    /// The same as `load` for configuration text already in memory (TOML).
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let source = config::File::from_str(text, config::FileFormat::Toml);
        Self::build(config::Config::builder().add_source(source), env)
    }

    fn build(
        builder: config::ConfigBuilder<config::builder::DefaultState>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        let overrides: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("REGATTA__"))
            .map(|(k, v)| (indexed_env_key(k), v.clone()))
            .collect();
        let builder = builder.add_source(
            config::Environment::with_prefix("REGATTA")
                .prefix_separator("__")
                .separator("__")
                .source(Some(overrides)),
        );
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let mut settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Invalid(vec![problem_from_serde(&e)]))?;
        let mut problems = settings.read_backend_files(&env);
        problems.extend(settings.read_auth_files());
        problems.extend(settings.problems());
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Fills each backend's `password` and `token` from `*_file` / `*_env` and reads its
    /// `tls_ca` bundle. Each problem names the key it comes from.
    fn read_backend_files(&mut self, env: &BTreeMap<String, String>) -> Vec<Problem> {
        let mut out = Vec::new();
        for (i, b) in self.backends.iter_mut().enumerate() {
            let key = |field: &str| format!("backends[{i}].{field}");
            let sources = [
                (
                    "password",
                    &mut b.password,
                    &b.password_file,
                    &b.password_env,
                ),
                ("token", &mut b.token, &b.token_file, &b.token_env),
            ];
            for (name, value, file, var) in sources {
                let given = usize::from(value.is_some())
                    + usize::from(file.is_some())
                    + usize::from(var.is_some());
                if given > 1 {
                    out.push(Problem {
                        key: key(name),
                        reason: format!("set only one of {name}, {name}_file, {name}_env"),
                    });
                    continue;
                }
                if let Some(path) = file {
                    match read_small_file(path, MAX_SECRET_FILE_BYTES)
                        .and_then(|b| String::from_utf8(b).map_err(|_| "is not UTF-8".into()))
                    {
                        Ok(text) if !text.trim_end_matches(['\n', '\r']).is_empty() => {
                            *value = Some(Secret::new(text.trim_end_matches(['\n', '\r'])));
                        }
                        Ok(_) => out.push(Problem {
                            key: key(&format!("{name}_file")),
                            reason: format!("'{path}' is empty"),
                        }),
                        Err(e) => out.push(Problem {
                            key: key(&format!("{name}_file")),
                            reason: format!("'{path}': {e}"),
                        }),
                    }
                }
                if let Some(var) = var {
                    match env.get(var) {
                        Some(v) if !v.is_empty() => *value = Some(Secret::new(v.clone())),
                        _ => out.push(Problem {
                            key: key(&format!("{name}_env")),
                            reason: format!("environment variable '{var}' is not set"),
                        }),
                    }
                }
            }
            if let Some(path) = &b.tls_ca {
                match read_ca_bundle(path) {
                    Ok(certs) => b.tls_ca_certs = certs,
                    Err(reason) => out.push(Problem {
                        key: key("tls_ca"),
                        reason,
                    }),
                }
            }
        }
        out
    }

    /// What is allowed but unwise: printed by `check-config` and logged at startup.
    /// Reads and parses the signing keys and the users file into `auth.loaded`.
    fn read_auth_files(&mut self) -> Vec<Problem> {
        let mut out = Vec::new();
        let a = &self.auth;
        let mut read = |key: String, path: &str, limit: u64| -> Option<Vec<u8>> {
            match read_small_file(path, limit) {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    out.push(Problem {
                        key,
                        reason: format!("'{path}': {e}"),
                    });
                    None
                }
            }
        };
        let signing = a.signing_key.as_ref().and_then(|p| {
            Some((
                p.clone(),
                read("auth.signing_key".into(), p, MAX_SECRET_FILE_BYTES)?,
            ))
        });
        let previous: Vec<(String, String, Vec<u8>)> = a
            .previous_keys
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let key = format!("auth.previous_keys[{i}]");
                Some((key.clone(), p.clone(), read(key, p, MAX_SECRET_FILE_BYTES)?))
            })
            .collect();
        let users = a.users_file.as_ref().and_then(|p| {
            Some((
                p.clone(),
                read(
                    "auth.users_file".into(),
                    p,
                    crate::auth::USERS_FILE_LIMIT as u64,
                )?,
            ))
        });
        match crate::auth::Loaded::parse(signing, previous, users) {
            Ok(loaded) => self.auth.loaded = Some(std::sync::Arc::new(loaded)),
            Err(problems) => out.extend(
                problems
                    .into_iter()
                    .map(|(key, reason)| Problem { key, reason }),
            ),
        }
        out
    }

    pub fn warnings(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        // An org named `library` keeps Docker Hub's official images (`/v2/library/...`,
        // what dockerd's registry-mirrors ask for) away from a docker.io default group.
        let hub_default = self.upstreams.iter().any(|u| {
            u.default && (u.name == "docker.io" || u.aliases.iter().any(|a| a == "docker.io"))
        });
        if let Some(i) = self.orgs.iter().position(|o| o.name == "library") {
            if hub_default {
                out.push(Problem {
                    key: format!("orgs[{i}].name"),
                    reason: "org 'library' serves library/* itself: docker pulls of official \
                             images through registry-mirrors never reach the docker.io group"
                        .into(),
                });
            }
        }
        let users = self.auth.loaded.as_ref().map(|l| &l.users);
        for (i, org) in self.orgs.iter().enumerate() {
            for (j, grant) in org.grants.iter().enumerate() {
                let robot = grant
                    .principal
                    .starts_with(crate::model::ROBOT_PRINCIPAL_PREFIX);
                if !robot && !users.is_some_and(|u| u.contains(&grant.principal)) {
                    out.push(Problem {
                        key: format!("orgs[{i}].grants[{j}].principal"),
                        reason: format!(
                            "'{}' is not a user of auth.users_file: the grant has no effect",
                            grant.principal
                        ),
                    });
                }
            }
        }
        for (i, b) in self.backends.iter().enumerate() {
            let has_credentials = b.username.is_some() || b.token.is_some();
            if has_credentials && b.url.to_ascii_lowercase().starts_with("http://") {
                out.push(Problem {
                    key: format!("backends[{i}].url"),
                    reason: "credentials for this backend travel over plain http; \
                             use https (with tls_ca for a private CA)"
                        .into(),
                });
            }
        }
        out
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.server
            .listen
            .parse()
            .expect("validated in Settings::problems")
    }

    /// Every semantic problem in the settings; empty when they are usable.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut problem = |key: String, reason: String| out.push(Problem { key, reason });

        if self.server.listen.parse::<SocketAddr>().is_err() {
            problem(
                "server.listen".into(),
                format!(
                    "'{}' is not an address like 127.0.0.1:5000",
                    self.server.listen
                ),
            );
        }
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) | (None, Some(_)) => problem(
                "server.tls_key".into(),
                "tls_cert and tls_key go together".into(),
            ),
            (Some(cert), Some(key)) => {
                for (name, path) in [("server.tls_cert", cert), ("server.tls_key", key)] {
                    if !Path::new(path).is_file() {
                        problem(name.into(), format!("'{path}' is not a readable file"));
                    }
                }
            }
            (None, None) => {}
        }
        if self.server.keep_alive.is_zero() || self.server.keep_alive > Duration::from_secs(3600) {
            problem(
                "server.keep_alive".into(),
                "must be more than 0 and at most 1h".into(),
            );
        }
        if self.server.request_head_timeout.is_zero()
            || self.server.request_head_timeout > Duration::from_secs(300)
        {
            problem(
                "server.request_head_timeout".into(),
                "must be more than 0 and at most 5m".into(),
            );
        }
        if self.server.workers == Some(0) {
            problem("server.workers".into(), "must be at least 1".into());
        }
        // The region names this node's health records in the store and a metric label.
        if !is_identifier(&self.server.region) || self.server.region.len() > 64 {
            problem(
                "server.region".into(),
                format!("'{}' must be [a-z0-9_-]+, at most 64", self.server.region),
            );
        }
        if self.access_log.enabled && self.access_log.buffer_lines == 0 {
            problem(
                "access_log.buffer_lines".into(),
                "must be at least 1 (or set access_log.enabled = false)".into(),
            );
        }
        if let Err(p) = self.store.redis_target() {
            problem(p.key, p.reason);
        }
        if let Err(p) = self.store.redis_read_target() {
            problem(p.key, p.reason);
        }
        if let Some(listen) = &self.admin.listen {
            if listen.parse::<SocketAddr>().is_err() {
                problem(
                    "admin.listen".into(),
                    format!("'{listen}' is not an address like 127.0.0.1:5001"),
                );
            }
            match &self.admin.token {
                None => problem(
                    "admin.token".into(),
                    "required when admin.listen is set".into(),
                ),
                Some(t) if t.expose().len() < 16 => problem(
                    "admin.token".into(),
                    "must be at least 16 characters".into(),
                ),
                Some(_) => {}
            }
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            problem(
                "tracing.sample_ratio".into(),
                "must be between 0 and 1".into(),
            );
        }
        if let Some(endpoint) = &self.tracing.otlp_endpoint {
            if url::Url::parse(endpoint).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                problem(
                    "tracing.otlp_endpoint".into(),
                    format!("'{endpoint}' is not an http(s) URL"),
                );
            }
        }
        for (key, value) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.request_timeout", self.upstream.request_timeout),
            ("upstream.read_timeout", self.upstream.read_timeout),
            ("upstream.request_deadline", self.upstream.request_deadline),
        ] {
            if value < Duration::from_millis(10) {
                problem(key.into(), "must be at least 10ms".into());
            }
        }
        if self.health.interval < Duration::from_millis(50) {
            problem("health.interval".into(), "must be at least 50ms".into());
        }
        if self.health.rise == 0 || self.health.fall == 0 {
            problem(
                "health.rise".into(),
                "rise and fall must be at least 1".into(),
            );
        }
        for (key, value) in [
            ("cache.manifest_bytes", self.cache.manifest_bytes),
            ("cache.holder_bytes", self.cache.holder_bytes),
            ("cache.lacks_bytes", self.cache.lacks_bytes),
            ("cache.tag_bytes", self.cache.tag_bytes),
            ("cache.url_bytes", self.cache.url_bytes),
        ] {
            if value < 64 * 1024 {
                problem(key.into(), "must be at least 65536".into());
            }
        }

        let mut ids = std::collections::HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let key = |field: &str| format!("backends[{i}].{field}");
            if !is_identifier(&b.id) {
                problem(key("id"), format!("'{}' must be [a-z0-9_-]+", b.id));
            } else if !ids.insert(b.id.as_str()) {
                problem(
                    key("id"),
                    format!("'{}' is used by an earlier backend", b.id),
                );
            }
            match url::Url::parse(&b.url) {
                Ok(u) if !matches!(u.scheme(), "http" | "https") => problem(
                    key("url"),
                    format!("scheme '{}' is not http or https", u.scheme()),
                ),
                Ok(u) if !u.username().is_empty() || u.password().is_some() => problem(
                    key("url"),
                    "must not carry credentials (user:password@); use username with \
                     password, password_file or password_env, or token"
                        .into(),
                ),
                Ok(u) if u.query().is_some() || u.fragment().is_some() => {
                    problem(key("url"), "must not carry a query or fragment".into())
                }
                Ok(u) if u.path() != "/" => problem(
                    key("url"),
                    "must be the registry's root (the part before /v2/)".into(),
                ),
                Ok(_) => {}
                Err(e) => problem(
                    key("url"),
                    format!("'{}' is not a URL: {e}", redact_url(&b.url)),
                ),
            }
            for (j, host) in b.token_realm_hosts.iter().enumerate() {
                if !is_host_and_port(host) {
                    problem(
                        key(&format!("token_realm_hosts[{j}]")),
                        format!("'{host}' is not a host name or host:port"),
                    );
                }
            }
            if b.username.is_some() != b.password.is_some() {
                problem(key("password"), "username and password go together".into());
            }
            if b.token.is_some() && b.username.is_some() {
                problem(key("token"), "set either token or username/password".into());
            }
            if b.delivery == Delivery::Direct && (b.username.is_some() || b.token.is_some()) {
                problem(
                    key("delivery"),
                    "direct sends clients to the backend without credentials; \
                     a backend that needs credentials wants resolve or proxy"
                        .into(),
                );
            }
            if let Some(canary) = &b.canary {
                let ok = canary.split_once('@').is_some_and(|(repo, digest)| {
                    crate::oci::RepoName::parse(repo).is_ok()
                        && crate::oci::Digest::parse(digest).is_ok()
                });
                if !ok {
                    problem(
                        key("canary"),
                        format!("'{canary}' is not repository@digest"),
                    );
                }
            }
            if !is_identifier(&b.region) {
                problem(key("region"), format!("'{}' must be [a-z0-9_-]+", b.region));
            }
        }

        if let Some(realm) = &self.auth.realm {
            if url::Url::parse(realm).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                problem(
                    "auth.realm".into(),
                    format!("'{realm}' is not an http(s) URL"),
                );
            } else if realm.contains('"') {
                problem("auth.realm".into(), "must not contain '\"'".into());
            }
        }
        if self.auth.service.is_empty()
            || self.auth.service.len() > 255
            || !self
                .auth
                .service
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            problem(
                "auth.service".into(),
                "must be 1 to 255 printable characters without quotes".into(),
            );
        }
        if !(Duration::from_secs(10)..=Duration::from_secs(24 * 3600))
            .contains(&self.auth.token_ttl)
        {
            problem(
                "auth.token_ttl".into(),
                "must be between 10s and 24h".into(),
            );
        }
        let backend_ids: Vec<&str> = self.backends.iter().map(|b| b.id.as_str()).collect();
        let mut names = std::collections::HashSet::new();
        for (i, org) in self.orgs.iter().enumerate() {
            for (key, reason) in org.policy().problems(&org.name, &backend_ids) {
                problem(format!("orgs[{i}].{key}"), reason);
            }
            if org.access == Access::Private {
                if self.auth.signing_key.is_none() {
                    problem(
                        format!("orgs[{i}].access"),
                        "a private org needs auth.signing_key: its users pull with tokens \
                         this gateway signs"
                            .into(),
                    );
                }
                for id in &org.backends {
                    let direct = self
                        .backends
                        .iter()
                        .any(|b| &b.id == id && b.delivery == Delivery::Direct);
                    if direct {
                        problem(
                            format!("orgs[{i}].access"),
                            format!(
                                "backend '{id}' delivers blobs direct: clients would be sent to \
                                 a URL anyone can fetch without the gateway; a private org's \
                                 backends need resolve, proxy or auto"
                            ),
                        );
                    }
                }
            }
            if !names.insert(org.name.as_str()) {
                problem(
                    format!("orgs[{i}].name"),
                    format!("'{}' is used by an earlier org", org.name),
                );
            }
        }
        self.upstream_problems(&backend_ids, &mut out);
        out
    }

    /// Problems of `[[upstreams]]`: each group served like an org; names and aliases unique
    /// across groups and distinct from org names (a path's first segment must say which it
    /// is); at most one default group.
    fn upstream_problems(&self, backend_ids: &[&str], out: &mut Vec<Problem>) {
        let mut problem = |key: String, reason: String| out.push(Problem { key, reason });
        let mut keys: std::collections::HashMap<String, String> = self
            .orgs
            .iter()
            .enumerate()
            .map(|(i, o)| (o.name.clone(), format!("orgs[{i}]")))
            .collect();
        let mut default: Option<usize> = None;
        for (i, group) in self.upstreams.iter().enumerate() {
            for (key, reason) in group.policy().problems(&group.name, backend_ids) {
                let reason = if key == "name" {
                    format!("'{}' must be a registry host name without a port, in lower case (e.g. docker.io)", group.name)
                } else {
                    reason
                };
                problem(format!("upstreams[{i}].{key}"), reason);
            }
            let names = std::iter::once(("name".to_owned(), &group.name)).chain(
                group
                    .aliases
                    .iter()
                    .enumerate()
                    .map(|(j, a)| (format!("aliases[{j}]"), a)),
            );
            for (key, name) in names {
                let key = format!("upstreams[{i}].{key}");
                if key.contains("aliases")
                    && (!is_host_and_port(name) || name.to_ascii_lowercase() != *name)
                {
                    problem(
                        key.clone(),
                        format!("'{name}' is not a registry host name (with an optional port) in lower case"),
                    );
                }
                match keys.get(name.as_str()) {
                    Some(owner) => problem(key, format!("'{name}' is also the name of {owner}")),
                    None => {
                        keys.insert(name.clone(), format!("upstreams[{i}]"));
                    }
                }
            }
            if group.default {
                match default {
                    Some(first) => problem(
                        format!("upstreams[{i}].default"),
                        format!("upstreams[{first}] is the default group already; only one can be"),
                    ),
                    None => default = Some(i),
                }
            }
        }
    }
}

/// `registry.example.com`, `10.0.0.1:5000`, `[::1]:443`: a host with an optional port and
/// nothing else.
fn is_host_and_port(s: &str) -> bool {
    !s.is_empty()
        && !s.contains(['/', '@', '?', '#', ' '])
        && url::Url::parse(&format!("http://{s}/")).is_ok_and(|u| u.host_str().is_some())
}

/// Longest secret file read (`password_file`, `token_file`).
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;
/// Longest CA bundle read (`tls_ca`); the public root store is about 250 KiB.
const MAX_CA_BUNDLE_BYTES: u64 = 4 * 1024 * 1024;

/// The contents of a regular file of at most `limit` bytes (a path naming a device or a
/// huge file is refused rather than read forever).
fn read_small_file(path: &str, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("is larger than {limit} bytes"));
    }
    Ok(bytes)
}

/// The certificates of a PEM bundle, each one usable as a trust anchor.
fn read_ca_bundle(path: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let bytes = read_small_file(path, MAX_CA_BUNDLE_BYTES).map_err(|e| format!("'{path}': {e}"))?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("'{path}': {e}"))?;
    if certs.is_empty() {
        return Err(format!("'{path}' holds no PEM certificate"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots
            .add(cert.clone())
            .map_err(|e| format!("'{path}': a certificate is not usable as a CA: {e}"))?;
    }
    Ok(certs)
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The config crate reports deserialization errors as text with the key in it; keep the
/// key separate when it can be found so the report reads like the others.
fn problem_from_serde(e: &config::ConfigError) -> Problem {
    let text = e.to_string();
    if let Some((reason, rest)) = text.split_once(" for key `") {
        if let Some((key, _)) = rest.split_once('`') {
            // A mistyped secret must not be echoed back.
            let secret = key.ends_with("password") || key.ends_with("token");
            return Problem {
                key: key.to_owned(),
                reason: if secret {
                    "must be a string (value not shown)".into()
                } else {
                    reason.to_owned()
                },
            };
        }
    }
    Problem {
        key: "(file)".into(),
        reason: text,
    }
}

/// `REGATTA__BACKENDS__0__PASSWORD` names `backends[0].password`: a numeric segment indexes
/// the list before it. (The config crate would read `backends.0` as a table key and replace the
/// file's whole list with a table.) This is how a Kubernetes Secret sets one backend's
/// credentials through the environment.
fn indexed_env_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    for (i, segment) in key.split("__").enumerate() {
        if i > 0 && !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(segment);
            out.push(']');
        } else {
            if i > 0 {
                out.push_str("__");
            }
            out.push_str(segment);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("regatta.toml");
        std::fs::write(&path, toml).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Settings::load(Some(&path), env)
    }

    const GOOD: &str = r#"
        [server]
        listen = "127.0.0.1:0"
        region = "eu"
        [[backends]]
        id = "hub"
        url = "http://127.0.0.1:5001"
        region = "eu"
        delivery = "resolve"
        username = "alice"
        password = "secret"
        [[backends]]
        id = "mirror"
        url = "http://127.0.0.1:5002"
        [[orgs]]
        name = "acme"
        backends = ["hub", "mirror"]
        tag_ttl = "30s"
        [orgs.prefixes]
        mirror = "acme-images"
    "#;

    #[test]
    fn loads_a_good_file() {
        let s = load_str(GOOD, &[]).unwrap();
        assert_eq!(s.backends[0].delivery, Delivery::Resolve);
        assert_eq!(s.backends[1].delivery, Delivery::Auto);
        assert_eq!(s.orgs[0].tag_ttl, Duration::from_secs(30));
        assert_eq!(s.orgs[0].prefixes["mirror"], "acme-images");
        assert_eq!(s.cache.lacks_ttl, Duration::from_secs(30));
    }

    #[test]
    fn environment_overrides_the_file() {
        let s = load_str(
            GOOD,
            &[
                ("REGATTA__SERVER__REGION", "us"),
                ("REGATTA__CACHE__LACKS_TTL", "5s"),
            ],
        )
        .unwrap();
        assert_eq!(s.server.region, "us");
        assert_eq!(s.cache.lacks_ttl, Duration::from_secs(5));
    }

    #[test]
    fn environment_sets_one_entry_of_a_list() {
        let s = load_str(
            GOOD,
            &[
                ("REGATTA__BACKENDS__1__USERNAME", "bot"),
                ("REGATTA__BACKENDS__1__PASSWORD", "from-a-secret"),
                ("REGATTA__BACKENDS__0__PASSWORD", "rotated"),
            ],
        )
        .unwrap();
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.backends[0].id, "hub");
        assert_eq!(s.backends[0].username.as_deref(), Some("alice"));
        assert_eq!(
            s.backends[0].password.as_ref().map(|p| p.expose()),
            Some("rotated")
        );
        assert_eq!(s.backends[0].delivery, Delivery::Resolve);
        assert_eq!(s.backends[1].id, "mirror");
        assert_eq!(s.backends[1].username.as_deref(), Some("bot"));
        assert_eq!(
            s.backends[1].password.as_ref().map(|p| p.expose()),
            Some("from-a-secret")
        );
        assert_eq!(s.orgs[0].backends, ["hub", "mirror"]);
    }

    #[test]
    fn names_every_problem_with_its_key() {
        let bad = r#"
            [server]
            listen = "nowhere"
            tls_cert = "/nonexistent/cert.pem"
            [[backends]]
            id = "hub"
            url = "ftp://x"
            username = "alice"
            [[backends]]
            id = "hub"
            url = "http://127.0.0.1:1/v2/"
            [[orgs]]
            name = "Acme"
            backends = ["hub", "ghost"]
            [orgs.prefixes]
            other = "x"
        "#;
        let ConfigError::Invalid(problems) = load_str(bad, &[]).unwrap_err() else {
            panic!("expected Invalid")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "server.listen",
            "server.tls_key",
            "backends[0].url",
            "backends[0].password",
            "backends[1].id",
            "backends[1].url",
            "orgs[0].name",
            "orgs[0].backends[1]",
            "orgs[0].prefixes.other",
        ] {
            assert!(keys.contains(&want), "missing {want} in {problems:?}");
        }
    }

    #[test]
    fn upstream_groups_are_checked() {
        let text = r#"
            [server]
            listen = "127.0.0.1:0"
            [[backends]]
            id = "hub"
            url = "http://127.0.0.1:1"
            [[orgs]]
            name = "acme"
            backends = ["hub"]
            [[upstreams]]
            name = "docker.io"
            aliases = ["acme", "Index.Docker.io", "with/path"]
            backends = ["hub", "ghost"]
            default = true
            [[upstreams]]
            name = "registry.local:5000"
            aliases = ["docker.io"]
            backends = ["hub"]
            default = true
        "#;
        let ConfigError::Invalid(problems) = load_str(text, &[]).unwrap_err() else {
            panic!("expected Invalid")
        };
        let found = |key: &str, words: &str| {
            problems
                .iter()
                .any(|p| p.key == key && p.reason.contains(words))
        };
        for (key, words) in [
            ("upstreams[0].backends[1]", "no backend has id 'ghost'"),
            ("upstreams[0].aliases[0]", "orgs[0]"),
            ("upstreams[0].aliases[1]", "lower case"),
            ("upstreams[0].aliases[2]", "host name"),
            ("upstreams[1].name", "without a port"),
            ("upstreams[1].aliases[0]", "upstreams[0]"),
            ("upstreams[1].default", "upstreams[0] is the default"),
        ] {
            assert!(found(key, words), "no {key} ({words}) in {problems:#?}");
        }
        let good = r#"
            [server]
            listen = "127.0.0.1:0"
            [[backends]]
            id = "hub"
            url = "http://127.0.0.1:1"
            [[upstreams]]
            name = "docker.io"
            aliases = ["index.docker.io", "registry-1.docker.io"]
            backends = ["hub"]
            default = true
            [upstreams.prefixes]
            hub = "dockerhub-proxy"
        "#;
        let settings = load_str(good, &[]).unwrap();
        assert_eq!(settings.upstreams[0].aliases.len(), 2);
        assert!(settings.upstreams[0].default);
        assert!(settings.warnings().is_empty());
        let shadowed = format!("{good}\n[[orgs]]\nname = \"library\"\nbackends = [\"hub\"]\n");
        let warnings = load_str(&shadowed, &[]).unwrap().warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].key, "orgs[0].name");
    }

    #[test]
    fn type_errors_name_the_key() {
        let bad = GOOD.replace("delivery = \"resolve\"", "delivery = \"teleport\"");
        let err = load_str(&bad, &[]).unwrap_err().to_string();
        assert!(
            err.contains("delivery") && err.contains("teleport"),
            "{err}"
        );
        let bad = GOOD.replace("tag_ttl = \"30s\"", "tag_ttl = \"soon\"");
        let err = load_str(&bad, &[]).unwrap_err().to_string();
        assert!(err.contains("tag_ttl") && err.contains("soon"), "{err}");
    }

    #[test]
    fn shipped_configs_are_valid() {
        for file in ["config/default.toml", "config/example.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            if let Err(e) = Settings::load(Some(&path), []) {
                panic!("{file}: {e}");
            }
        }
    }

    #[test]
    fn secrets_come_from_files_or_the_environment_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "from-a-file-s3cret\n").unwrap();
        let text = format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            [admin]
            listen = "127.0.0.1:0"
            token = "admin-token-0123456789-s3cret"
            [[backends]]
            id = "a"
            url = "https://a.example"
            username = "alice"
            password_file = "{}"
            [[backends]]
            id = "b"
            url = "https://b.example"
            token_env = "B_TOKEN"
            token_realm_hosts = ["auth.b.example", "10.0.0.1:8443", "[::1]:5000"]
            [[backends]]
            id = "c"
            url = "https://c.example"
            username = "carol"
            password = "inline-s3cret"
        "#,
            file.display()
        );
        let env = [("B_TOKEN".to_string(), "from-env-s3cret".to_string())];
        let s = Settings::from_toml(&text, env).unwrap();
        assert_eq!(
            s.backends[0].password.as_ref().map(Secret::expose),
            Some("from-a-file-s3cret"),
            "the file's trailing newline is not part of the password"
        );
        assert_eq!(
            s.backends[1].token.as_ref().map(Secret::expose),
            Some("from-env-s3cret")
        );
        let debug = format!("{s:?}");
        for secret in [
            "from-a-file-s3cret",
            "from-env-s3cret",
            "inline-s3cret",
            "admin-token-0123456789-s3cret",
        ] {
            assert!(!debug.contains(secret), "Debug shows {secret}: {debug}");
        }
        let topology = crate::topology::Topology::from_settings(&s);
        let debug = format!("{topology:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(
            s.warnings().is_empty(),
            "https backends: {:?}",
            s.warnings()
        );
    }

    #[test]
    fn credentials_in_urls_and_bad_secret_sources_are_refused() {
        let text = r#"
            [server]
            listen = "127.0.0.1:0"
            [[backends]]
            id = "a"
            url = "https://alice:url-s3cret@a.example"
            [[backends]]
            id = "b"
            url = "http://alice:url-s3cret@b.example:99999999"
            [[backends]]
            id = "c"
            url = "https://c.example"
            username = "carol"
            password = "x"
            password_env = "C_PASSWORD"
            [[backends]]
            id = "d"
            url = "https://d.example"
            token_env = "NOT_SET_ANYWHERE"
            token_realm_hosts = ["https://auth.example/token", ""]
            [[backends]]
            id = "e"
            url = "https://e.example"
            username = "erin"
            password_file = "/nonexistent/password"
            tls_ca = "/nonexistent/ca.pem"
        "#;
        let ConfigError::Invalid(problems) = Settings::from_toml(text, []).unwrap_err() else {
            panic!("expected Invalid")
        };
        let shown = format!("{problems:?}");
        assert!(!shown.contains("url-s3cret"), "{shown}");
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "backends[0].url",
            "backends[1].url",
            "backends[2].password",
            "backends[3].token_env",
            "backends[3].token_realm_hosts[0]",
            "backends[3].token_realm_hosts[1]",
            "backends[4].password_file",
            "backends[4].tls_ca",
        ] {
            assert!(keys.contains(&want), "missing {want} in {problems:?}");
        }
        let url = problems
            .iter()
            .find(|p| p.key == "backends[0].url")
            .unwrap();
        assert!(url.reason.contains("credentials"), "{url}");

        let redis = "[server]\nlisten = \"127.0.0.1:0\"\n[store]\ntype = \"redis\"\nurl = \"http://:redis-s3cret@127.0.0.1:6379\"\n";
        let err = Settings::from_toml(redis, []).unwrap_err().to_string();
        assert!(
            err.contains("store.url") && !err.contains("redis-s3cret"),
            "{err}"
        );
        // The regional replica is one server; a bad region is named.
        let replica = "[server]\nlisten = \"127.0.0.1:0\"\nregion = \"EU West\"\n[store]\ntype = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nread_url = \"redis+sentinel://:redis-s3cret@127.0.0.1:26379/m\"\n";
        let err = Settings::from_toml(replica, []).unwrap_err().to_string();
        assert!(
            err.contains("store.read_url")
                && err.contains("server.region")
                && !err.contains("redis-s3cret"),
            "{err}"
        );
        let clustered = replica.replace(
            "redis://127.0.0.1:6379",
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
        );
        let err = Settings::from_toml(&clustered, []).unwrap_err().to_string();
        assert!(err.contains("Cluster"), "{err}");
        let fine = replica.replace("EU West", "eu-west").replace(
            "redis+sentinel://:redis-s3cret@127.0.0.1:26379/m",
            "redis://127.0.0.1:6380",
        );
        assert!(Settings::from_toml(&fine, []).is_ok());

        // A mistyped secret is not echoed back either.
        let typed = "[server]\nlisten = \"127.0.0.1:0\"\n[[backends]]\nid = \"a\"\nurl = \"https://a\"\nusername = \"u\"\npassword = [\"918273645\"]\n";
        let err = Settings::from_toml(typed, []).unwrap_err().to_string();
        assert!(!err.contains("918273645"), "{err}");
    }

    #[test]
    fn secret_files_must_be_small_regular_files() {
        let text = "[server]\nlisten = \"127.0.0.1:0\"\n[[backends]]\nid = \"a\"\nurl = \"https://a\"\nusername = \"u\"\npassword_file = \"/dev/zero\"\ntls_ca = \"/dev/zero\"\n";
        let ConfigError::Invalid(problems) = Settings::from_toml(text, []).unwrap_err() else {
            panic!("expected Invalid")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"backends[0].password_file"), "{problems:?}");
        assert!(keys.contains(&"backends[0].tls_ca"), "{problems:?}");
    }

    #[test]
    fn a_ca_bundle_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca.pem");
        std::fs::write(&bundle, "not a certificate\n").unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[[backends]]\nid = \"a\"\nurl = \"https://a\"\ntls_ca = \"{}\"\n",
            bundle.display()
        );
        let ConfigError::Invalid(problems) = Settings::from_toml(&text, []).unwrap_err() else {
            panic!("expected Invalid")
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "backends[0].tls_ca");
    }

    #[test]
    fn credentials_over_plain_http_are_a_warning() {
        let s = load_str(GOOD, &[]).unwrap();
        let warnings = s.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].key, "backends[0].url");
        assert!(warnings[0].reason.contains("plain http"), "{}", warnings[0]);
    }

    #[test]
    fn missing_file_is_reported() {
        let err = Settings::load(Some(Path::new("/nonexistent/regatta.toml")), []).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/regatta.toml"),
            "{err}"
        );
    }
}
