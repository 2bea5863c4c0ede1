//! The vocabulary every other module speaks: backends by index, their health and delivery,
//! what is known about a backend holding a digest, org policy, and the records nodes share.
//!
//! Architecture invariant: this module imports nothing from the crate but the OCI grammar
//! (`oci`, itself a leaf), so configuration, the store, placement and the gateway can all
//! depend on it without depending on each other.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::oci::Digest;

/// A backend's position in the node's configuration; the request path addresses backends
/// by index, the store and headers by id.
pub type BackendIdx = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Degraded,
    Down,
}

/// What the node knows about one backend holding one digest in one repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holding {
    Has,
    Lacks,
    Unknown,
}

/// How a blob GET reaches the bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Detected from the backend's `/v2/` and first blob answers.
    #[default]
    Auto,
    /// 307 to the backend's own blob URL; the backend must allow anonymous reads.
    Direct,
    /// The gateway asks the backend (with its credentials) and 307s the client to the
    /// pre-signed URL the backend redirects to.
    Resolve,
    /// The gateway streams the blob through itself.
    Proxy,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Auto => "auto",
            Delivery::Direct => "direct",
            Delivery::Resolve => "resolve",
            Delivery::Proxy => "proxy",
        }
    }
}

/// An org's serving policy: the same type in the configuration file, the admin API and
/// the store. [`OrgPolicy::problems`] is the one place it is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgPolicy {
    /// Backend ids in order of preference among otherwise equal backends.
    pub backends: Vec<String>,
    /// The backends trusted to say what a tag points at, in the order they are asked;
    /// `None`: every backend of the org, in order. A mirror that may lag is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_authorities: Option<Vec<String>>,
    /// How long a tag's digest is trusted before asking the authority again (`30s`).
    #[serde(default = "default_tag_ttl", with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Per backend id, the path that replaces the org name on that backend.
    #[serde(default)]
    pub prefixes: BTreeMap<String, String>,
    /// Who may pull: anyone (`public`, the default) or only the principals in `grants`.
    #[serde(default, skip_serializing_if = "Access::is_public")]
    pub access: Access,
    /// Pull grants of a private org, to users and robots, by repository glob.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<Grant>,
}

/// Whether an org's content is served to anyone or only to principals granted `pull`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Public,
    Private,
}

impl Access {
    pub fn is_public(&self) -> bool {
        *self == Access::Public
    }
}

/// `pull` on the org's repositories matching `repositories` (globs under the org: `*`,
/// `app`, `team/*`), for a user of the users file or `robot:<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub principal: String,
    #[serde(default = "every_repository")]
    pub repositories: Vec<String>,
}

fn every_repository() -> Vec<String> {
    vec!["*".into()]
}

/// The grant principal naming robot `name`.
pub const ROBOT_PRINCIPAL_PREFIX: &str = "robot:";

/// Most grants one org may carry, and most globs one grant or robot may carry.
pub const MAX_GRANTS: usize = 256;
pub const MAX_GLOBS: usize = 64;

/// Whether `glob` matches `text`: `*` stands for any run of characters, `/` included;
/// everything else matches itself.
pub fn glob_matches(glob: &str, text: &str) -> bool {
    let (g, t) = (glob.as_bytes(), text.as_bytes());
    // Iterative wildcard matching with one backtrack point: linear in practice, never
    // exponential, whatever the glob.
    let (mut gi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ti));
            gi += 1;
        } else if gi < g.len() && g[gi] == t[ti] {
            gi += 1;
            ti += 1;
        } else if let Some((sg, st)) = star {
            gi = sg + 1;
            ti = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

/// Why `glob` cannot name repositories, if it cannot: repository-name characters and `*`.
pub fn glob_problem(glob: &str) -> Option<String> {
    if glob.is_empty() || glob.len() > 255 {
        return Some(format!("'{glob}' must be 1 to 255 characters"));
    }
    let ok = glob.bytes().all(|b| {
        b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || matches!(b, b'.' | b'_' | b'-' | b'/' | b'*')
    });
    (!ok).then(|| format!("'{glob}' may hold only a-z, 0-9, '.', '_', '-', '/' and '*'"))
}

/// Why `name` cannot be a robot's name, if it cannot.
pub fn robot_name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    (!ok).then(|| format!("robot name '{name}' must be 1 to 64 of [a-z0-9_-]"))
}

/// A robot account: a random secret (kept only as its SHA-256), the repositories it may
/// pull (globs over whole names, `acme/*`), and when it stops working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RobotRecord {
    pub name: String,
    /// Hex SHA-256 of the secret. The secret is 256 random bits, so a fast hash is as
    /// strong as a slow one here, and token requests stay cheap.
    pub secret_sha256: String,
    pub repositories: Vec<String>,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

impl RobotRecord {
    /// Every problem with this record: `(field, reason)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(why) = robot_name_problem(&self.name) {
            out.push(("name".into(), why));
        }
        if self.secret_sha256.len() != 64
            || !self.secret_sha256.bytes().all(|b| b.is_ascii_hexdigit())
        {
            out.push(("secret_sha256".into(), "is not a hex SHA-256".into()));
        }
        if self.repositories.is_empty() || self.repositories.len() > MAX_GLOBS {
            out.push((
                "repositories".into(),
                format!("needs 1 to {MAX_GLOBS} globs"),
            ));
        }
        for (j, glob) in self.repositories.iter().enumerate() {
            if let Some(why) = glob_problem(glob) {
                out.push((format!("repositories[{j}]"), why));
            }
        }
        if self.description.len() > 1024 {
            out.push(("description".into(), "is longer than 1024 bytes".into()));
        }
        out
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

pub fn default_tag_ttl() -> Duration {
    Duration::from_secs(30)
}

impl OrgPolicy {
    /// Every problem with this policy for org `name` on a node whose backends are
    /// `backend_ids`: `(key relative to the org, reason)`; empty when it can be served.
    pub fn problems(&self, name: &str, backend_ids: &[&str]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !is_org_name(name) {
            out.push((
                "name".into(),
                format!("'{name}' is not a repository name component"),
            ));
        }
        if self.backends.is_empty() {
            out.push(("backends".into(), "needs at least one backend".into()));
        }
        for (j, id) in self.backends.iter().enumerate() {
            if !backend_ids.contains(&id.as_str()) {
                out.push((
                    format!("backends[{j}]"),
                    format!("no backend has id '{id}'"),
                ));
            }
            if self.backends[..j].contains(id) {
                out.push((format!("backends[{j}]"), format!("'{id}' is listed twice")));
            }
        }
        if let Some(authorities) = &self.tag_authorities {
            if authorities.is_empty() {
                out.push((
                    "tag_authorities".into(),
                    "needs at least one backend (leave it out to use every backend)".into(),
                ));
            }
            for (j, id) in authorities.iter().enumerate() {
                if !self.backends.contains(id) {
                    out.push((
                        format!("tag_authorities[{j}]"),
                        format!("'{id}' is not one of this org's backends"),
                    ));
                }
                if authorities[..j].contains(id) {
                    out.push((
                        format!("tag_authorities[{j}]"),
                        format!("'{id}' is listed twice"),
                    ));
                }
            }
        }
        if self.tag_ttl.is_zero() {
            out.push(("tag_ttl".into(), "must be longer than 0s".into()));
        }
        if self.grants.len() > MAX_GRANTS {
            out.push(("grants".into(), format!("at most {MAX_GRANTS} grants")));
        }
        for (j, grant) in self.grants.iter().enumerate() {
            let key = format!("grants[{j}]");
            match grant.principal.strip_prefix(ROBOT_PRINCIPAL_PREFIX) {
                Some(robot) => {
                    if let Some(why) = robot_name_problem(robot) {
                        out.push((format!("{key}.principal"), why));
                    }
                }
                None => {
                    let p = &grant.principal;
                    if p.is_empty()
                        || p.len() > 255
                        || p.contains([':', '$'])
                        || p.chars().any(char::is_control)
                    {
                        out.push((
                            format!("{key}.principal"),
                            format!("'{p}' is not a user name (no ':' or '$') or robot:<name>"),
                        ));
                    }
                }
            }
            if grant.repositories.is_empty() || grant.repositories.len() > MAX_GLOBS {
                out.push((
                    format!("{key}.repositories"),
                    format!("needs 1 to {MAX_GLOBS} globs"),
                ));
            }
            for (k, glob) in grant.repositories.iter().enumerate() {
                if let Some(why) = glob_problem(glob) {
                    out.push((format!("{key}.repositories[{k}]"), why));
                }
            }
        }
        if self.access == Access::Public && !self.grants.is_empty() {
            out.push((
                "grants".into(),
                "grants apply to private orgs only (set access = \"private\")".into(),
            ));
        }
        for (backend, prefix) in &self.prefixes {
            let key = format!("prefixes.{backend}");
            if !self.backends.contains(backend) {
                out.push((
                    key.clone(),
                    format!("'{backend}' is not one of this org's backends"),
                ));
            }
            if crate::oci::RepoName::parse(&format!("{prefix}/x")).is_err() {
                out.push((key, format!("'{prefix}' is not a repository path")));
            }
        }
        out
    }

    /// Whether `principal` (a user name, or `robot:<name>`) is granted pull on the
    /// repository `path_in_org` of this org by one of its grants.
    pub fn grants_pull(&self, principal: &str, path_in_org: &str) -> bool {
        self.grants.iter().any(|g| {
            g.principal == principal && g.repositories.iter().any(|r| glob_matches(r, path_in_org))
        })
    }

    /// The tag authorities in the order they are asked.
    pub fn authorities(&self) -> &[String] {
        self.tag_authorities.as_deref().unwrap_or(&self.backends)
    }
}

fn is_org_name(name: &str) -> bool {
    !name.contains('/') && crate::oci::RepoName::parse(&format!("{name}/x")).is_ok()
}

/// An operator's decisions about a backend. They have no expiry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminState {
    #[serde(default)]
    pub drained: bool,
    /// Overrides the configured weight.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// Whose view of a backend's health a record is: probes run per (region, backend), since a
/// backend reachable from one region may not be from another.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HealthKey {
    /// The region of the nodes that probed it.
    pub region: String,
    pub backend: String,
}

impl HealthKey {
    pub fn new(region: &str, backend: &str) -> HealthKey {
        HealthKey {
            region: region.to_owned(),
            backend: backend.to_owned(),
        }
    }
}

/// Health records in force, by (probing region, backend).
pub type RegionalHealth = std::collections::HashMap<HealthKey, HealthRecord>;

/// The shared result of active health checks on one backend, from one region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub state: Health,
    /// Smoothed probe latency in microseconds.
    pub latency_us: u32,
    pub ok_streak: u32,
    pub fail_streak: u32,
    pub checked_at_ms: u64,
    /// Why the last probe failed; empty when it succeeded.
    #[serde(default)]
    pub reason: String,
    /// Node that ran the last probe.
    pub node: String,
}

/// What a tag pointed at when it was last resolved at its authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// Backend id that answered as the authority.
    pub backend: String,
    /// When it was resolved, in milliseconds since the Unix epoch.
    pub resolved_at_ms: u64,
}

impl TagRecord {
    pub fn age(&self, now: SystemTime) -> Duration {
        Duration::from_millis(unix_ms(now).saturating_sub(self.resolved_at_ms))
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> OrgPolicy {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn durations_are_written_as_people_write_them() {
        let p = policy(r#"{"backends":["a"],"tag_ttl":"2m"}"#);
        assert_eq!(p.tag_ttl, Duration::from_secs(120));
        let back = serde_json::to_value(&p).unwrap();
        assert_eq!(back["tag_ttl"], "2m");
        assert!(back.get("tag_authorities").is_none());
        let err = serde_json::from_str::<OrgPolicy>(r#"{"backends":["a"],"tag_ttl":"soon"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
    }

    #[test]
    fn authorities_default_to_every_backend() {
        let p = policy(r#"{"backends":["hub","mirror"]}"#);
        assert_eq!(p.authorities(), ["hub", "mirror"]);
        let p = policy(r#"{"backends":["hub","mirror"],"tag_authorities":["hub"]}"#);
        assert_eq!(p.authorities(), ["hub"]);
    }

    #[test]
    fn globs_match_as_written() {
        for (glob, text, want) in [
            ("*", "app", true),
            ("*", "team/app", true),
            ("app", "app", true),
            ("app", "app2", false),
            ("team/*", "team/app", true),
            ("team/*", "teams/app", false),
            ("*-ci", "build-ci", true),
            ("*-ci", "build-cd", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("", "", true),
        ] {
            assert_eq!(glob_matches(glob, text), want, "{glob} ~ {text}");
        }
    }

    #[test]
    fn private_orgs_carry_checked_grants() {
        let p = policy(
            r#"{"backends":["hub"],"access":"private","grants":[
                {"principal":"alice"},
                {"principal":"robot:ci","repositories":["app","team/*"]}]}"#,
        );
        assert!(p.problems("acme", &["hub"]).is_empty());
        assert!(p.grants_pull("alice", "deep/app"));
        assert!(p.grants_pull("robot:ci", "team/x"));
        assert!(!p.grants_pull("robot:ci", "other"));
        assert!(!p.grants_pull("bob", "app"));
        let bad = policy(
            r#"{"backends":["hub"],"access":"private","grants":[
                {"principal":"robot:Bad Name"},{"principal":"a:b"},
                {"principal":"alice","repositories":["UPPER"]}]}"#,
        );
        let keys: Vec<String> = bad
            .problems("acme", &["hub"])
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [
                "grants[0].principal",
                "grants[1].principal",
                "grants[2].repositories[0]"
            ]
        );
        let public_with_grants = policy(r#"{"backends":["hub"],"grants":[{"principal":"alice"}]}"#);
        assert_eq!(public_with_grants.problems("acme", &["hub"])[0].0, "grants");
        // A public policy is stored exactly as before access existed.
        let public = policy(r#"{"backends":["hub"]}"#);
        let json = serde_json::to_value(&public).unwrap();
        assert!(json.get("access").is_none() && json.get("grants").is_none());
    }

    #[test]
    fn problems_name_their_key() {
        let p = policy(
            r#"{"backends":["hub","ghost","hub"],"tag_authorities":["mirror"],
                "tag_ttl":"0s","prefixes":{"other":"x"}}"#,
        );
        let keys: Vec<String> = p
            .problems("Acme", &["hub", "mirror"])
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for want in [
            "name",
            "backends[1]",
            "backends[2]",
            "tag_authorities[0]",
            "tag_ttl",
            "prefixes.other",
        ] {
            assert!(keys.iter().any(|k| k == want), "missing {want} in {keys:?}");
        }
        let good = policy(r#"{"backends":["hub","mirror"],"tag_authorities":["hub"]}"#);
        assert!(good.problems("acme", &["hub", "mirror"]).is_empty());
    }
}
