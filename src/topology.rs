//! The backends and orgs a node serves, built once from validated settings.
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
    orgs: HashMap<String, Org>,
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
            })
            .collect();
        let index_of = |id: &str| {
            backends
                .iter()
                .position(|b| &*b.id == id)
                .expect("org backends validated against backend ids")
        };
        let orgs = settings
            .orgs
            .iter()
            .map(|o| {
                let org = Org {
                    name: o.name.clone(),
                    backends: o.backends.iter().map(|id| index_of(id)).collect(),
                    tag_ttl: o.tag_ttl,
                    prefixes: o
                        .prefixes
                        .iter()
                        .map(|(id, prefix)| (index_of(id), prefix.clone()))
                        .collect(),
                };
                (o.name.clone(), org)
            })
            .collect();
        Topology {
            region: settings.server.region.clone(),
            backends,
            orgs,
        }
    }

    pub fn org(&self, name: &str) -> Option<&Org> {
        self.orgs.get(name)
    }

    pub fn backend(&self, idx: BackendIdx) -> &Backend {
        &self.backends[idx]
    }
}
