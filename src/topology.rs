//! The backends a node can reach, built once from validated settings, and orgs built from
//! their policies (which can change at runtime; see `cluster.rs`).
//!
//! Backends are addressed by index everywhere on the request path; the string id is for
//! headers, logs and the shared store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Settings;
pub use crate::model::BackendIdx;
use crate::model::{Delivery, OrgPolicy};
use crate::oci::RepoName;
use crate::secret::Secret;

/// A backend's credentials. Their `Debug` shows no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Basic { username: String, password: Secret },
    StaticToken(Secret),
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
    /// Hosts besides the backend's own that may receive its credentials as a token realm.
    pub token_realm_hosts: Vec<String>,
    /// TLS trust for this backend when it names a CA bundle (`tls_ca`): the public roots
    /// plus that bundle. `None`: the public roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug)]
pub struct Org {
    pub name: String,
    /// Backends in policy order (the last tie-breaker of placement).
    pub backends: Vec<BackendIdx>,
    /// The backends asked what a tag points at, in order.
    pub tag_authorities: Vec<BackendIdx>,
    pub tag_ttl: Duration,
    /// The policy this org was built from (what changed when a new one arrives).
    pub policy: OrgPolicy,
    /// Per backend index, the path that replaces the org name on that backend.
    prefixes: HashMap<BackendIdx, String>,
    /// An upstream group of mirror mode (`[[upstreams]]`): its name is a registry host
    /// (`docker.io`) that is not part of repository names on its backends.
    pub upstream_group: bool,
}

impl Org {
    /// An org from its policy; fails when the policy names a backend this node does not
    /// have or is malformed (the same check as the configuration file and the admin API).
    pub fn from_policy(name: &str, policy: &OrgPolicy, topology: &Topology) -> Result<Org, String> {
        let ids: Vec<&str> = topology.backends.iter().map(|b| &*b.id).collect();
        let problems = policy.problems(name, &ids);
        if !problems.is_empty() {
            let text: Vec<String> = problems.iter().map(|(k, r)| format!("{k}: {r}")).collect();
            return Err(text.join("; "));
        }
        let index = |id: &String| {
            topology
                .index_of(id)
                .expect("checked by OrgPolicy::problems")
        };
        Ok(Org {
            name: name.to_owned(),
            backends: policy.backends.iter().map(index).collect(),
            tag_authorities: policy.authorities().iter().map(index).collect(),
            tag_ttl: policy.tag_ttl,
            prefixes: policy
                .prefixes
                .iter()
                .map(|(id, prefix)| (index(id), prefix.clone()))
                .collect(),
            policy: policy.clone(),
            upstream_group: false,
        })
    }

    /// An upstream group of mirror mode from its policy: an org named after the registry
    /// host whose repositories keep their full name on its backends.
    pub fn upstream_group(
        name: &str,
        policy: &OrgPolicy,
        topology: &Topology,
    ) -> Result<Org, String> {
        Ok(Org {
            upstream_group: true,
            ..Org::from_policy(name, policy, topology)?
        })
    }

    /// The repository path on `backend` for gateway repository `name`. In an upstream
    /// group the group's name is not part of it: `docker.io/library/alpine` is
    /// `library/alpine` (or `<prefix>/library/alpine`) on the backend.
    pub fn backend_repo(&self, backend: BackendIdx, name: &RepoName) -> String {
        match (self.prefixes.get(&backend), self.upstream_group) {
            (Some(prefix), _) => format!("{prefix}/{}", name.path_in_org()),
            (None, true) => name.path_in_org().to_owned(),
            (None, false) => name.as_str().to_owned(),
        }
    }

    /// The repository name as a client of this org or group calls it (tag lists).
    pub fn client_repo<'n>(&self, name: &'n RepoName) -> &'n str {
        if self.upstream_group {
            name.path_in_org()
        } else {
            name.as_str()
        }
    }
}

#[derive(Debug)]
pub struct Topology {
    pub region: String,
    pub backends: Vec<Backend>,
    /// Mirror mode's upstream groups and the names that select them.
    pub upstreams: crate::mirror::Upstreams,
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
                token_realm_hosts: b.token_realm_hosts.clone(),
                tls: (!b.tls_ca_certs.is_empty()).then(|| tls_trusting(&b.tls_ca_certs)),
            })
            .collect();
        Topology {
            region: settings.server.region.clone(),
            backends,
            upstreams: crate::mirror::Upstreams::from_settings(&settings.upstreams),
        }
    }

    pub fn index_of(&self, id: &str) -> Option<BackendIdx> {
        self.backends.iter().position(|b| &*b.id == id)
    }

    pub fn backend(&self, idx: BackendIdx) -> &Backend {
        &self.backends[idx]
    }
}

/// A TLS client configuration trusting the public (webpki) roots and `extra` CAs, with the
/// ALPN protocols awc offers by default.
/// The TLS configuration of a backend that names no CA bundle: the public roots.
pub fn public_roots() -> Arc<rustls::ClientConfig> {
    static PUBLIC: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    PUBLIC.get_or_init(|| tls_trusting(&[])).clone()
}

fn tls_trusting(extra: &[rustls_pki_types::CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // Each was checked when the settings were loaded (`backends[].tls_ca`).
    let (_added, _unusable) = roots.add_parsable_certificates(extra.iter().cloned());
    // The provider is named here rather than taken from the process default, which may
    // not be installed yet when settings are turned into a topology.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}
