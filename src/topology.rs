//! The backends a node can reach, built once from validated settings, and orgs built from
//! their policies (which can change at runtime; see `cluster.rs`).
//!
//! Backends are addressed by index everywhere on the request path; the string id is for
//! headers, logs and the shared store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Delivery, Settings};
use crate::oci::RepoName;

pub type BackendIdx = usize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Basic { username: String, password: String },
    StaticToken(String),
}

#[derive(Debug)]
pub struct Backend {
    pub idx: BackendIdx,
    pub id: Arc<str>,
    /// Base URL without a trailing slash: `http://127.0.0.1:5001`.
    pub base: String,
    pub region: String,
    pub delivery: Delivery,
    pub credentials: Credentials,
    pub weight: u32,
    /// Canary blob for health checks: (repository on this backend, digest).
    pub canary: Option<(String, String)>,
}

#[derive(Debug)]
pub struct Org {
    pub name: String,
    /// Backends in policy order; the first that answers is the tag authority.
    pub backends: Vec<BackendIdx>,
    pub tag_ttl: Duration,
    /// Per backend index, the path that replaces the org name on that backend.
    prefixes: HashMap<BackendIdx, String>,
}

impl Org {
    /// An org from its stored policy; fails when the policy names a backend this node does
    /// not have or is malformed.
    pub fn from_policy(
        name: &str,
        policy: &crate::store::OrgPolicy,
        topology: &Topology,
    ) -> Result<Org, String> {
        if crate::oci::RepoName::parse(&format!("{name}/x")).is_err() || name.contains('/') {
            return Err(format!("'{name}' is not a repository name component"));
        }
        if policy.backends.is_empty() {
            return Err("needs at least one backend".into());
        }
        let index_of = |id: &str| {
            topology
                .backends
                .iter()
                .position(|b| &*b.id == id)
                .ok_or_else(|| format!("no backend has id '{id}'"))
        };
        let mut backends = Vec::new();
        for id in &policy.backends {
            let idx = index_of(id)?;
            if backends.contains(&idx) {
                return Err(format!("backend '{id}' is listed twice"));
            }
            backends.push(idx);
        }
        let tag_ttl = humantime::parse_duration(&policy.tag_ttl)
            .map_err(|e| format!("tag_ttl '{}': {e}", policy.tag_ttl))?;
        let mut prefixes = HashMap::new();
        for (id, prefix) in &policy.prefixes {
            let idx = index_of(id)?;
            if !backends.contains(&idx) {
                return Err(format!(
                    "prefix for '{id}', which is not one of the org's backends"
                ));
            }
            if crate::oci::RepoName::parse(&format!("{prefix}/x")).is_err() {
                return Err(format!("prefix '{prefix}' is not a repository path"));
            }
            prefixes.insert(idx, prefix.clone());
        }
        Ok(Org {
            name: name.to_owned(),
            backends,
            tag_ttl,
            prefixes,
        })
    }

    /// The repository path on `backend` for gateway repository `name`.
    pub fn backend_repo(&self, backend: BackendIdx, name: &RepoName) -> String {
        match self.prefixes.get(&backend) {
            Some(prefix) => format!("{prefix}/{}", name.path_in_org()),
            None => name.as_str().to_owned(),
        }
    }
}

#[derive(Debug)]
pub struct Topology {
    pub region: String,
    pub backends: Vec<Backend>,
}

impl Topology {
    pub fn from_settings(settings: &Settings) -> Topology {
        let backends: Vec<Backend> = settings
            .backends
            .iter()
            .enumerate()
            .map(|(idx, b)| Backend {
                idx,
                id: b.id.as_str().into(),
                base: b.url.trim_end_matches('/').to_owned(),
                region: b.region.clone(),
                delivery: b.delivery,
                credentials: match (&b.username, &b.password, &b.token) {
                    (Some(u), Some(p), _) => Credentials::Basic {
                        username: u.clone(),
                        password: p.clone(),
                    },
                    (_, _, Some(t)) => Credentials::StaticToken(t.clone()),
                    _ => Credentials::Anonymous,
                },
                weight: b.weight,
                canary: b
                    .canary
                    .as_ref()
                    .and_then(|c| c.split_once('@'))
                    .map(|(r, d)| (r.to_owned(), d.to_owned())),
            })
            .collect();
        Topology {
            region: settings.server.region.clone(),
            backends,
        }
    }

    pub fn index_of(&self, id: &str) -> Option<BackendIdx> {
        self.backends.iter().position(|b| &*b.id == id)
    }

    pub fn backend(&self, idx: BackendIdx) -> &Backend {
        &self.backends[idx]
    }
}
