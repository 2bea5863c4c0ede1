//! The gateway's own authentication, for private orgs: who the caller is (users from an
//! htpasswd file, robot accounts from the store), what they may pull, the tokens that say
//! so (JWTs signed with a key every node shares), and the checks on the request path.
//!
//! Architecture invariant: the request path decides access from the token and the node's
//! snapshot (org policies, robots) only; it never waits on the store. A private org's
//! request is checked before anything cached for it is read.

mod endpoint;
mod keys;
mod scope;
mod users;

use std::time::{Duration, SystemTime};

use actix_web::http::header;
use actix_web::HttpRequest;
use serde::{Deserialize, Serialize};

pub use endpoint::{token_get, token_post};
pub use keys::{KeySet, SigningKey, TokenError};
pub use scope::{parse as parse_scopes, Requested, MAX_SCOPES};
pub use users::Users;

use crate::api_error::ApiError;
use crate::cluster::Snapshot;
use crate::config::AuthSettings;
use crate::model::{glob_matches, unix_ms, RobotRecord, ROBOT_PRINCIPAL_PREFIX};
use crate::oci::RepoName;
use crate::topology::Org;

/// The most of a users file read (as at load time).
pub const USERS_FILE_LIMIT: usize = 16 * 1024 * 1024;

/// The login name of robot `name`: `robot$name` (a `:` cannot be in a Basic user name).
pub const ROBOT_LOGIN_PREFIX: &str = "robot$";

/// The files named in `[auth]`, read and parsed at load time.
#[derive(Debug)]
pub struct Loaded {
    pub keys: Option<KeySet>,
    pub users: std::sync::Arc<Users>,
}

impl Loaded {
    /// Parses what the settings named: `(path, bytes)` of the signing key, `(key, path,
    /// bytes)` of each previous key, `(path, bytes)` of the users file. Problems name
    /// their key.
    pub fn parse(
        signing: Option<(String, Vec<u8>)>,
        previous: Vec<(String, String, Vec<u8>)>,
        users: Option<(String, Vec<u8>)>,
    ) -> Result<Loaded, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let current = signing.and_then(|(path, pem)| match SigningKey::from_pem(&pem) {
            Ok(k) => Some(k),
            Err(e) => {
                problems.push(("auth.signing_key".to_owned(), format!("'{path}' {e}")));
                None
            }
        });
        let previous: Vec<SigningKey> = previous
            .into_iter()
            .filter_map(|(key, path, pem)| match SigningKey::from_pem(&pem) {
                Ok(k) => Some(k),
                Err(e) => {
                    problems.push((key, format!("'{path}' {e}")));
                    None
                }
            })
            .collect();
        let users = match users {
            None => Users::empty(),
            Some((path, bytes)) => match String::from_utf8(bytes)
                .map_err(|_| "is not UTF-8".to_owned())
                .and_then(|t| Users::parse(&t))
            {
                Ok(u) => u,
                Err(e) => {
                    problems.push(("auth.users_file".to_owned(), format!("'{path}': {e}")));
                    Users::empty()
                }
            },
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Loaded {
            keys: current.map(|c| KeySet::new(c, previous)),
            users: std::sync::Arc::new(users),
        })
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    User(String),
    Robot(String),
}

impl Principal {
    /// The token subject: `""`, the user name, or `robot$name`.
    fn subject(&self) -> String {
        match self {
            Principal::Anonymous => String::new(),
            Principal::User(u) => u.clone(),
            Principal::Robot(r) => format!("{ROBOT_LOGIN_PREFIX}{r}"),
        }
    }

    fn from_subject(sub: &str) -> Principal {
        if sub.is_empty() {
            Principal::Anonymous
        } else if let Some(robot) = sub.strip_prefix(ROBOT_LOGIN_PREFIX) {
            Principal::Robot(robot.to_owned())
        } else {
            Principal::User(sub.to_owned())
        }
    }
}

/// One resource and the actions granted on it, as the token spec's `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceActions {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// The claims of a regatta token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    #[serde(default)]
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    #[serde(default)]
    pub nbf: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default)]
    pub jti: String,
    #[serde(default)]
    pub access: Vec<ResourceActions>,
}

impl Claims {
    fn grants_pull(&self, name: &RepoName) -> bool {
        self.access.iter().any(|a| {
            a.kind == "repository"
                && a.name == name.as_str()
                && a.actions.iter().any(|x| x == "pull")
        })
    }
}

/// The token service and the access checks, shared by every worker.
pub struct TokenService {
    keys: Option<std::sync::Arc<Loaded>>,
    /// The users of `auth.users_file`, replaced when the file changes (`watch_users`).
    users: Option<arc_swap::ArcSwap<Users>>,
    users_file: Option<String>,
    realm: Option<String>,
    pub service: String,
    pub ttl: Duration,
}

impl TokenService {
    pub fn new(settings: &AuthSettings) -> TokenService {
        TokenService {
            keys: settings.loaded.clone(),
            users: settings
                .loaded
                .as_ref()
                .map(|l| arc_swap::ArcSwap::new(l.users.clone())),
            users_file: settings.users_file.clone(),
            realm: settings.realm.clone(),
            service: settings.service.clone(),
            ttl: settings.token_ttl,
        }
    }

    /// Reads `auth.users_file` again whenever it changes (checked every `every`): added
    /// users can log in, removed ones lose access at once (every pull checks the user is
    /// still listed). A file that does not parse leaves the users as they were and is
    /// reported; runs until the node stops.
    pub async fn watch_users(&self, every: Duration) {
        let (Some(path), Some(users)) = (self.users_file.as_deref(), self.users.as_ref()) else {
            return;
        };
        let stamp = |path: &str| {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        };
        let mut seen = stamp(path);
        loop {
            tokio::time::sleep(every).await;
            let now = stamp(path);
            if now == seen {
                continue;
            }
            seen = now;
            let parsed = std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    if bytes.len() > USERS_FILE_LIMIT {
                        return Err(format!("larger than {USERS_FILE_LIMIT} bytes"));
                    }
                    String::from_utf8(bytes).map_err(|_| "is not UTF-8".to_owned())
                })
                .and_then(|text| Users::parse(&text));
            match parsed {
                Ok(fresh) => {
                    tracing::info!(users = fresh.len(), file = path, "users file reloaded");
                    users.store(std::sync::Arc::new(fresh));
                }
                Err(e) => tracing::error!(
                    file = path,
                    error = %e,
                    "auth.users_file changed but cannot be used; the users stay as they were"
                ),
            }
        }
    }

    /// Whether this node can sign tokens (has `auth.signing_key`).
    pub fn issues_tokens(&self) -> bool {
        self.key_set().is_some()
    }

    fn key_set(&self) -> Option<&KeySet> {
        self.keys.as_ref().and_then(|l| l.keys.as_ref())
    }

    fn users(&self) -> Option<std::sync::Arc<Users>> {
        self.users.as_ref().map(|u| u.load_full())
    }

    /// Where clients get tokens: the configured realm, else this request's own origin.
    pub fn realm(&self, req: &HttpRequest) -> String {
        if let Some(realm) = &self.realm {
            return realm.clone();
        }
        let info = req.connection_info();
        let host = info.host();
        // The Host header is the client's: keep it only when it is a plain host[:port].
        let sane = !host.is_empty()
            && host.len() <= 255
            && host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
            });
        let host = if sane {
            host.to_owned()
        } else {
            req.app_config().host().to_owned()
        };
        format!("{}://{host}/token", info.scheme())
    }

    /// The `WWW-Authenticate` value sending a client to the token service.
    pub fn challenge(&self, req: &HttpRequest, scope: Option<&str>, error: Option<&str>) -> String {
        let mut out = format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            self.realm(req),
            self.service
        );
        if let Some(scope) = scope {
            out.push_str(&format!(",scope=\"{scope}\""));
        }
        if let Some(error) = error {
            out.push_str(&format!(",error=\"{error}\""));
        }
        out
    }

    /// The bearer token a request carries, verified; `None` when it carries none.
    fn bearer(&self, req: &HttpRequest) -> Option<Result<Claims, TokenError>> {
        let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        Some(match self.key_set() {
            Some(keys) => keys.verify(token.trim(), &self.service),
            None => Err(TokenError::UnknownKey),
        })
    }

    /// `GET /v2/`: open on a node that serves only public orgs; otherwise a valid token
    /// of this service (any principal, anonymous included) is needed, else 401 with the
    /// challenge that starts a client's token flow (and `docker login`'s check).
    pub fn check_base(&self, snapshot: &Snapshot, req: &HttpRequest) -> Result<(), ApiError> {
        if !snapshot.any_private {
            return Ok(());
        }
        match self.bearer(req) {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(ApiError::Unauthorized {
                message: e.to_string(),
                challenge: self.challenge(req, None, Some("invalid_token")),
            }),
            None => Err(ApiError::Unauthorized {
                message: "this registry serves private orgs: get a token first".into(),
                challenge: self.challenge(req, None, None),
            }),
        }
    }

    /// A request for repository `name` of `org`: a public org serves anyone (whatever
    /// credentials come with the request); a private one needs a token granting pull on
    /// `name` to a principal the current policy still allows.
    pub fn check_pull(
        &self,
        snapshot: &Snapshot,
        org: &Org,
        name: &RepoName,
        req: &HttpRequest,
    ) -> Result<(), ApiError> {
        if org.policy.access.is_public() {
            return Ok(());
        }
        let scope = format!("repository:{name}:pull");
        match self.bearer(req) {
            None => Err(ApiError::Unauthorized {
                message: format!("{name} is private: pull it with credentials"),
                challenge: self.challenge(req, Some(&scope), None),
            }),
            Some(Err(e)) => Err(ApiError::Unauthorized {
                message: e.to_string(),
                challenge: self.challenge(req, Some(&scope), Some("invalid_token")),
            }),
            Some(Ok(claims)) => {
                let principal = Principal::from_subject(&claims.sub);
                let now = unix_ms(SystemTime::now());
                if claims.grants_pull(name) && self.may_pull(snapshot, &principal, name, now) {
                    Ok(())
                } else {
                    Err(ApiError::Unauthorized {
                        message: format!("the token does not grant pull on {name}"),
                        challenge: self.challenge(req, Some(&scope), Some("insufficient_scope")),
                    })
                }
            }
        }
    }

    /// Who `user` with `password` is, if they verify: a robot (`robot$name`, from the
    /// snapshot, not expired) or a user of the users file. A user's bcrypt check runs on
    /// the blocking pool, never on an HTTP worker (a high cost would stall the warm path).
    pub async fn authenticate(
        &self,
        snapshot: &Snapshot,
        user: &str,
        password: &str,
        now_ms: u64,
    ) -> Option<Principal> {
        if let Some(name) = user.strip_prefix(ROBOT_LOGIN_PREFIX) {
            let robot = snapshot.robots.get(name)?;
            let given = robot_secret_hash(password);
            let ok = !robot.expired(now_ms)
                && crate::secret::same_bytes(given.as_bytes(), robot.secret_sha256.as_bytes());
            return ok.then(|| Principal::Robot(name.to_owned()));
        }
        let users = self.users()?;
        if users.remembered(user, password) {
            return Some(Principal::User(user.to_owned()));
        }
        let (u, p) = (user.to_owned(), password.to_owned());
        let ok = actix_web::web::block(move || users.verify(&u, &p))
            .await
            .unwrap_or(false);
        ok.then(|| Principal::User(user.to_owned()))
    }

    /// Whether `principal` may pull `name` under the current snapshot.
    pub fn may_pull(
        &self,
        snapshot: &Snapshot,
        principal: &Principal,
        name: &RepoName,
        now_ms: u64,
    ) -> bool {
        let Some(org) = snapshot.orgs.get(name.org()) else {
            return false;
        };
        if org.policy.access.is_public() {
            return true;
        }
        match principal {
            Principal::Anonymous => false,
            Principal::User(u) => {
                self.users().is_some_and(|users| users.contains(u))
                    && org.policy.grants_pull(u, name.path_in_org())
            }
            Principal::Robot(r) => match snapshot.robots.get(r) {
                Some(robot) if !robot.expired(now_ms) => {
                    robot
                        .repositories
                        .iter()
                        .any(|g| glob_matches(g, name.as_str()))
                        || org.policy.grants_pull(
                            &format!("{ROBOT_PRINCIPAL_PREFIX}{r}"),
                            name.path_in_org(),
                        )
                }
                _ => false,
            },
        }
    }

    /// Signs a token for `principal` granting `access`; returns it with its issue time.
    fn mint(
        &self,
        principal: &Principal,
        access: Vec<ResourceActions>,
    ) -> Result<(String, SystemTime), ApiError> {
        let keys = self.key_set().ok_or_else(|| {
            ApiError::NameUnknown("this registry issues no tokens (no auth.signing_key)".into())
        })?;
        let now = SystemTime::now();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            iss: self.service.clone(),
            sub: principal.subject(),
            aud: self.service.clone(),
            exp: secs + self.ttl.as_secs(),
            nbf: secs.saturating_sub(1),
            iat: secs,
            jti: random_token(16),
            access,
        };
        let token = keys
            .sign(&claims)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("signing a token: {e}")))?;
        Ok((token, now))
    }
}

/// The hex SHA-256 a robot's secret is kept as.
pub fn robot_secret_hash(secret: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(secret.as_bytes()))
}

/// `bytes` random bytes from the system's generator, base64url without padding.
pub fn random_token(bytes: usize) -> String {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .expect("the system random generator works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// A new robot: its record (secret kept hashed) and the secret, shown once.
pub fn new_robot(
    name: &str,
    repositories: Vec<String>,
    expires_at_ms: Option<u64>,
    description: String,
) -> (RobotRecord, String) {
    let secret = format!("rgt_{}", random_token(32));
    let record = RobotRecord {
        name: name.to_owned(),
        secret_sha256: robot_secret_hash(&secret),
        repositories,
        created_at_ms: unix_ms(SystemTime::now()),
        expires_at_ms,
        description,
    };
    (record, secret)
}
