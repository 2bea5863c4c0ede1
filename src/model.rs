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
