//! Mirror mode: which upstream group (`[[upstreams]]`, e.g. `docker.io`, `ghcr.io`) a
//! request is for, decided from the request path and containerd's `ns` parameter.
//!
//! A group is served as an org named after the registry host whose repositories keep their
//! full name on its backends (`Org::upstream_group`): `docker.io/library/alpine` is
//! `library/alpine` there. A request names its group by, first match:
//! 1. the `ns` query parameter (containerd, and docker with the containerd image store, add
//!    `?ns=<registry host>` when they ask a mirror): a key into the configured groups, never
//!    dialled; an unknown one is a 404 at once, so the client falls back to its next host;
//! 2. a host prefix in the path (`/v2/docker.io/library/alpine/...`): podman
//!    `registries.conf` mirror locations with a path, containerd `override_path`;
//! 3. a path whose first segment is an org of this node belongs to that org;
//! 4. otherwise the default group, the path kept as sent (dockerd's `registry-mirrors`
//!    ask for `/v2/library/busybox/...`).
//!
//! Routing rewrites the path to `/v2/<group>/<repository>/...`, so route parsing,
//! placement, the caches and the shared tag records see one name per group and repository
//! (`library/alpine` of `docker.io` and of `ghcr.io` never mix).
//!
//! Pure: no I/O, no locks; the caller says which first segments are orgs.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::api_error::ApiError;
use crate::config::UpstreamGroupSettings;
use crate::model::OrgPolicy;

/// One configured upstream registry.
#[derive(Debug, Clone)]
pub struct UpstreamGroup {
    /// The registry host (`docker.io`): also the org name the group is served under.
    pub name: String,
    pub policy: OrgPolicy,
}

/// The configured groups and the host names that select them.
#[derive(Debug, Default)]
pub struct Upstreams {
    groups: Vec<UpstreamGroup>,
    /// Name or alias (lower case) -> index in `groups`.
    keys: HashMap<String, usize>,
    default: Option<usize>,
}

/// Where a request goes: the path to parse (rewritten for a group) and the group, if any.
#[derive(Debug, PartialEq, Eq)]
pub struct Routed<'p, 'u> {
    pub path: Cow<'p, str>,
    pub group: Option<&'u str>,
    /// What chose the group: `ns`, `prefix` or `default` (`-` for an org's request).
    pub via: &'static str,
}

/// Longest `ns` value echoed back in an error body.
const MAX_ECHOED_NS: usize = 100;

impl Upstreams {
    /// The groups of validated settings (names and aliases are unique there; the first
    /// default wins should they not be).
    pub fn from_settings(settings: &[UpstreamGroupSettings]) -> Upstreams {
        let mut out = Upstreams::default();
        for (i, group) in settings.iter().enumerate() {
            out.groups.push(UpstreamGroup {
                name: group.name.clone(),
                policy: group.policy(),
            });
            for key in std::iter::once(&group.name).chain(&group.aliases) {
                out.keys.entry(key.to_ascii_lowercase()).or_insert(i);
            }
            if group.default && out.default.is_none() {
                out.default = Some(i);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub fn groups(&self) -> &[UpstreamGroup] {
        &self.groups
    }

    /// The group a host name (name or alias, any case) selects.
    pub fn group(&self, host: &str) -> Option<&UpstreamGroup> {
        let index = match self.keys.get(host) {
            Some(i) => Some(i),
            None if host.bytes().any(|b| b.is_ascii_uppercase()) => {
                self.keys.get(&host.to_ascii_lowercase())
            }
            None => None,
        }?;
        Some(&self.groups[*index])
    }

    /// The path `path` (`/v2/...`) is served as, given the request's `ns` parameter and
    /// which names are orgs of this node; a 404 for an `ns` naming no group (unless the
    /// path belongs to an org). Paths outside `/v2/<something>` are left as they are.
    pub fn route<'p>(
        &self,
        path: &'p str,
        ns: Option<&str>,
        is_org: impl Fn(&str) -> bool,
    ) -> Result<Routed<'p, '_>, ApiError> {
        let unchanged = Routed::as_sent(path);
        if self.groups.is_empty() {
            return Ok(unchanged);
        }
        let rest = match path.strip_prefix("/v2/") {
            Some(rest) if !rest.is_empty() => rest,
            _ => return Ok(unchanged),
        };
        let (first, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let prefixed = self.group(first);
        if let Some(ns) = ns {
            return match self.group(ns) {
                // containerd with `override_path` sends both: the prefix is not part of
                // the repository.
                Some(group) => match prefixed {
                    Some(p) if p.name == group.name => Ok(group.serve(path, first, tail, "ns")),
                    _ => Ok(group.serve_whole(rest, "ns")),
                },
                None if is_org(first) => Ok(unchanged),
                None => Err(ApiError::NameUnknown(format!(
                    "this gateway mirrors no registry '{}' (ns); configure it in [[upstreams]]",
                    echo(ns)
                ))),
            };
        }
        if let Some(group) = prefixed {
            return Ok(group.serve(path, first, tail, "prefix"));
        }
        if is_org(first) {
            return Ok(unchanged);
        }
        match self.default {
            Some(i) => Ok(self.groups[i].serve_whole(rest, "default")),
            None => Ok(unchanged),
        }
    }
}

impl<'p> Routed<'p, '_> {
    /// A request served as sent: an org's, or any when no group is configured.
    pub fn as_sent(path: &'p str) -> Self {
        Routed {
            path: Cow::Borrowed(path),
            group: None,
            via: "-",
        }
    }
}

impl UpstreamGroup {
    /// `path` was `/v2/<first>/<tail>` with `first` naming this group.
    fn serve<'p>(
        &self,
        path: &'p str,
        first: &str,
        tail: &str,
        via: &'static str,
    ) -> Routed<'p, '_> {
        let path = if first == self.name {
            Cow::Borrowed(path)
        } else {
            Cow::Owned(format!("/v2/{}/{tail}", self.name))
        };
        Routed {
            path,
            group: Some(&self.name),
            via,
        }
    }

    /// `rest` (after `/v2/`) is a repository path of this group as sent.
    fn serve_whole<'p>(&self, rest: &str, via: &'static str) -> Routed<'p, '_> {
        Routed {
            path: Cow::Owned(format!("/v2/{}/{rest}", self.name)),
            group: Some(&self.name),
            via,
        }
    }
}

/// The `ns` parameter of a query string, percent-decoded.
pub fn ns_param(query: &str) -> Option<Cow<'_, str>> {
    if !query.contains("ns=") {
        return None;
    }
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v)
}

fn echo(ns: &str) -> String {
    if ns.len() <= MAX_ECHOED_NS {
        return ns.to_owned();
    }
    let mut end = MAX_ECHOED_NS;
    while !ns.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &ns[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams() -> Upstreams {
        let text = r#"
            [server]
            listen = "127.0.0.1:0"
            [[backends]]
            id = "hub"
            url = "http://127.0.0.1:1"
            [[backends]]
            id = "gh"
            url = "http://127.0.0.1:2"
            [[orgs]]
            name = "acme"
            backends = ["hub"]
            [[upstreams]]
            name = "docker.io"
            aliases = ["index.docker.io", "registry-1.docker.io"]
            backends = ["hub"]
            default = true
            [[upstreams]]
            name = "ghcr.io"
            backends = ["gh"]
        "#;
        let settings = crate::config::Settings::from_toml(text, []).unwrap();
        Upstreams::from_settings(&settings.upstreams)
    }

    type Outcome = Result<(String, Option<String>, &'static str), String>;

    fn route(path: &str, ns: Option<&str>) -> Outcome {
        upstreams()
            .route(path, ns, |first| first == "acme")
            .map(|r| (r.path.into_owned(), r.group.map(str::to_owned), r.via))
            .map_err(|e| e.code().to_owned())
    }

    fn to(path: &str, group: &str, via: &'static str) -> Outcome {
        Ok((path.to_owned(), Some(group.to_owned()), via))
    }

    fn org(path: &str) -> Outcome {
        Ok((path.to_owned(), None, "-"))
    }

    #[test]
    fn first_match_wins() {
        let m = "/manifests/latest";
        let cases = [
            // ns names a group, by name or alias, in any case.
            (
                "/v2/library/alpine/manifests/latest",
                Some("docker.io"),
                to(
                    &format!("/v2/docker.io/library/alpine{m}"),
                    "docker.io",
                    "ns",
                ),
            ),
            (
                "/v2/library/alpine/manifests/latest",
                Some("Registry-1.Docker.IO"),
                to(
                    &format!("/v2/docker.io/library/alpine{m}"),
                    "docker.io",
                    "ns",
                ),
            ),
            (
                "/v2/owner/tool/manifests/latest",
                Some("ghcr.io"),
                to(&format!("/v2/ghcr.io/owner/tool{m}"), "ghcr.io", "ns"),
            ),
            // ns beats an org: the repository is the upstream's.
            (
                "/v2/acme/app/manifests/latest",
                Some("ghcr.io"),
                to(&format!("/v2/ghcr.io/acme/app{m}"), "ghcr.io", "ns"),
            ),
            // ns and the same group's prefix (containerd override_path): one prefix.
            (
                "/v2/index.docker.io/library/alpine/manifests/latest",
                Some("docker.io"),
                to(
                    &format!("/v2/docker.io/library/alpine{m}"),
                    "docker.io",
                    "ns",
                ),
            ),
            // An unknown ns: the org's path still is the org's; anything else 404.
            (
                "/v2/acme/app/manifests/latest",
                Some("quay.io"),
                org("/v2/acme/app/manifests/latest"),
            ),
            (
                "/v2/library/alpine/manifests/latest",
                Some("quay.io"),
                Err("NAME_UNKNOWN".into()),
            ),
            // A host prefix, alias made canonical.
            (
                "/v2/docker.io/library/alpine/manifests/latest",
                None,
                to(
                    &format!("/v2/docker.io/library/alpine{m}"),
                    "docker.io",
                    "prefix",
                ),
            ),
            (
                "/v2/index.docker.io/library/alpine/manifests/latest",
                None,
                to(
                    &format!("/v2/docker.io/library/alpine{m}"),
                    "docker.io",
                    "prefix",
                ),
            ),
            (
                "/v2/ghcr.io/owner/tool/manifests/latest",
                None,
                to(&format!("/v2/ghcr.io/owner/tool{m}"), "ghcr.io", "prefix"),
            ),
            // An org.
            (
                "/v2/acme/app/manifests/latest",
                None,
                org("/v2/acme/app/manifests/latest"),
            ),
            // The default group, library/ kept as sent.
            (
                "/v2/library/busybox/manifests/latest",
                None,
                to(
                    &format!("/v2/docker.io/library/busybox{m}"),
                    "docker.io",
                    "default",
                ),
            ),
            (
                "/v2/someone/app/manifests/latest",
                None,
                to(
                    &format!("/v2/docker.io/someone/app{m}"),
                    "docker.io",
                    "default",
                ),
            ),
            // Not a repository path: left alone.
            ("/v2/", Some("docker.io"), org("/v2/")),
            ("/v2", None, org("/v2")),
            ("/healthz", None, org("/healthz")),
        ];
        for (path, ns, want) in cases {
            assert_eq!(route(path, ns), want, "{path} ns={ns:?}");
        }
    }

    #[test]
    fn without_a_default_other_names_stay_outside() {
        let mut u = upstreams();
        u.default = None;
        let r = u
            .route("/v2/someone/app/manifests/1", None, |_| false)
            .unwrap();
        assert_eq!(r.path, "/v2/someone/app/manifests/1");
        assert_eq!(r.group, None);
    }

    #[test]
    fn no_groups_no_change_and_ns_ignored() {
        let u = Upstreams::default();
        let r = u
            .route("/v2/library/a/manifests/1", Some("docker.io"), |_| false)
            .unwrap();
        assert_eq!(r.path, "/v2/library/a/manifests/1");
        assert!(matches!(r.path, Cow::Borrowed(_)));
    }

    #[test]
    fn ns_is_read_from_the_query() {
        assert_eq!(ns_param("ns=docker.io").as_deref(), Some("docker.io"));
        assert_eq!(
            ns_param("n=1&ns=registry.local%3A5000").as_deref(),
            Some("registry.local:5000")
        );
        assert_eq!(ns_param("n=1&last=x").as_deref(), None);
        assert_eq!(ns_param("").as_deref(), None);
    }

    #[test]
    fn a_long_ns_is_not_echoed_whole() {
        let long = "é".repeat(200);
        let err = upstreams()
            .route("/v2/a/b/manifests/1", Some(&long), |_| false)
            .unwrap_err();
        assert!(err.to_string().len() < 300, "{err}");
    }
}
