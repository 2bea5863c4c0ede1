//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`), here so that the same
//! functions run under `cargo fuzz` and, over the corpus kept in `fuzz/corpus/<target>/`,
//! under plain `cargo test` (CI never builds the fuzzers). Each takes arbitrary bytes and
//! panics only when an invariant breaks: parsers never panic, what parses displays back to
//! itself, and numbers from outside stay within their bounds.
//!
//! Not an API: hidden from the docs and used by nothing on the request path.

use std::time::{Duration, UNIX_EPOCH};

use crate::config::Settings;
use crate::oci::{Algorithm, Digest, Reference, RepoName, Tag};
use crate::route::Route;
use crate::upstream::{self, Challenge};

/// A target: arbitrary bytes in, a panic when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target by name: the fuzz crate has one `fuzz_targets/<name>.rs` per entry.
pub const TARGETS: &[(&str, Target)] = &[
    ("route", route),
    ("oci", oci),
    ("challenge", challenge),
    ("backend_numbers", backend_numbers),
    ("manifest", manifest),
    ("config", config),
    ("token_request", token_request),
    ("front_head", front_head),
];

/// The front door's reading of a request head (`front::classify`): never a panic; a `GET`
/// it would answer is a complete HTTP/1.1 GET head of at most the bytes given, whose target
/// is the path and query it reports (an origin-form path, a query of plain bytes), and
/// nothing it let through carries a body, `Expect`, `Upgrade` or a `Connection` other than
/// keep-alive; one it may answer cold carries no `Range`, `If-Range` or trace context.
pub fn front_head(data: &[u8]) {
    use crate::front::{classify, Head};
    let Head::Get {
        used,
        path,
        query,
        request_id,
        cold,
    } = classify(data)
    else {
        return;
    };
    assert!(used <= data.len());
    assert!(path.starts_with('/') && !path.contains('?'));
    let head = &data[..used];
    assert!(head.ends_with(b"\n\n") || head.ends_with(b"\r\n\r\n"));
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    assert_eq!(req.parse(head), Ok(httparse::Status::Complete(used)));
    assert_eq!((req.method, req.version), (Some("GET"), Some(1)));
    let target = req.path.expect("a target");
    let expected = if query.is_empty() && !target.contains('?') {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    assert_eq!(target, expected);
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        assert!(
            !matches!(
                name.as_str(),
                "content-length" | "transfer-encoding" | "expect" | "upgrade"
            ),
            "{name} let through"
        );
        if name == "connection" {
            assert!(h.value.eq_ignore_ascii_case(b"keep-alive"));
        }
        if name == "x-request-id" {
            assert!(request_id.is_some());
        }
        if matches!(
            name.as_str(),
            "range" | "if-range" | "traceparent" | "tracestate"
        ) {
            assert!(!cold, "{name} let through to the cold path");
        }
    }
}

/// The token endpoint's inputs: the bytes as a `scope` list (parsed, or refused with a
/// reason; never more than `MAX_SCOPES`; every repository name valid) and as a bearer
/// token (verified or refused, never accepted: the key that would sign it is random).
pub fn token_request(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match crate::auth::parse_scopes([text]) {
        Ok(scopes) => {
            assert!(scopes.len() <= crate::auth::MAX_SCOPES);
            for s in scopes {
                if let crate::auth::Requested::Repository { name, actions } = s {
                    assert!(RepoName::parse(name.as_str()).is_ok());
                    assert!(!actions.is_empty());
                }
            }
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
    static KEYS: std::sync::OnceLock<crate::auth::KeySet> = std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("a key");
        use base64::Engine as _;
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(doc.as_ref())
        );
        let key = crate::auth::SigningKey::from_pem(pem.as_bytes()).expect("an Ed25519 key");
        crate::auth::KeySet::new(key, Vec::new())
    });
    assert!(
        keys.verify::<serde_json::Value>(text, "fuzz").is_err(),
        "a token nobody signed was accepted: {text:?}"
    );
}

/// `route::parse` on a request path: `None` exactly for paths outside `/v2`, a route that
/// renders back to a path parsing to the same route, or a 4xx OCI error. With a query
/// (`path?query`), mirror mode's routing of it too (`mirror_route`).
pub fn route(data: &[u8]) {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = input.split_once('?').unwrap_or((input, ""));
    mirror_route(path, query);
    let under_v2 = path == "/v2" || path.starts_with("/v2/");
    match crate::route::parse(path) {
        None => assert!(!under_v2, "{path:?} is under /v2 but parsed to nothing"),
        Some(Ok(route)) => {
            assert!(under_v2);
            let again = render_route(&route);
            let reparsed = crate::route::parse(&again)
                .unwrap_or_else(|| panic!("{again:?} (from {path:?}) is not under /v2"))
                .unwrap_or_else(|e| panic!("{again:?} (from {path:?}) does not parse: {e}"));
            assert_eq!(reparsed, route, "{path:?} -> {again:?}");
        }
        Some(Err(e)) => {
            assert!(under_v2);
            let code = e.code();
            assert!(
                matches!(
                    code,
                    "NAME_INVALID"
                        | "TAG_INVALID"
                        | "DIGEST_INVALID"
                        | "NAME_UNKNOWN"
                        // A manifest reference that is neither tag nor digest names no
                        // manifest (404, as distribution answers).
                        | "MANIFEST_UNKNOWN"
                        | "UNSUPPORTED"
                ),
                "{path:?}: unexpected {code}"
            );
            let status = actix_web::ResponseError::status_code(&e);
            assert!(
                status.is_client_error(),
                "{path:?}: {status} for client input"
            );
        }
    }
}

/// Mirror mode's routing with two groups (docker.io the default, ghcr.io) and an org
/// `acme`: an error only for an `ns` naming no group (a 404), a group's path is `/v2/<group>`
/// or under it and parses (when it does) to a name in that group; otherwise the path is
/// left as sent.
fn mirror_route(path: &str, query: &str) {
    static UPSTREAMS: std::sync::OnceLock<crate::mirror::Upstreams> = std::sync::OnceLock::new();
    let upstreams = UPSTREAMS.get_or_init(|| {
        let text = "[server]\nlisten = \"127.0.0.1:0\"\n\
            [[backends]]\nid = \"hub\"\nurl = \"http://127.0.0.1:1\"\n\
            [[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\n\
            [[upstreams]]\nname = \"docker.io\"\naliases = [\"index.docker.io\"]\nbackends = [\"hub\"]\ndefault = true\n\
            [[upstreams]]\nname = \"ghcr.io\"\nbackends = [\"hub\"]\n";
        let settings = Settings::from_toml(text, []).expect("the fuzz configuration is valid");
        crate::mirror::Upstreams::from_settings(&settings.upstreams)
    });
    let ns = crate::mirror::ns_param(query);
    match upstreams.route(path, ns.as_deref(), |first| first == "acme") {
        Err(e) => {
            let ns = ns
                .as_deref()
                .unwrap_or_else(|| panic!("{path:?}: {e} without ns"));
            assert!(upstreams.group(ns).is_none(), "{path:?} ns={ns:?}: {e}");
            assert_eq!(e.code(), "NAME_UNKNOWN");
            assert_eq!(actix_web::ResponseError::status_code(&e), 404);
        }
        Ok(routed) => match routed.group {
            None => assert_eq!(routed.path, path),
            Some(group) => {
                let under = format!("/v2/{group}");
                assert!(
                    routed.path == under || routed.path.starts_with(&format!("{under}/")),
                    "{path:?} -> {routed:?}"
                );
                if let Some(Ok(route)) = crate::route::parse(&routed.path) {
                    if let Some(name) = route.name() {
                        assert_eq!(name.org(), group, "{path:?} -> {routed:?}");
                    }
                }
            }
        },
    }
}

/// The path a route is requested by.
fn render_route(route: &Route) -> String {
    match route {
        Route::Base => "/v2/".into(),
        Route::Manifest { name, reference } => format!("/v2/{name}/manifests/{reference}"),
        Route::Blob { name, digest } => format!("/v2/{name}/blobs/{digest}"),
        Route::Tags { name } => format!("/v2/{name}/tags/list"),
        Route::Referrers { name, digest } => format!("/v2/{name}/referrers/{digest}"),
    }
}

/// Names, tags, digests and references: whatever parses is the input itself, keeps the
/// grammar's bounds, and parses again to an equal value.
pub fn oci(data: &[u8]) {
    let computed = Digest::compute(Algorithm::Sha256, data);
    assert!(computed.verifies(data));
    assert_eq!(Digest::parse(computed.as_str()).as_ref(), Ok(&computed));

    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = RepoName::parse(s) {
        assert_eq!(name.as_str(), s);
        assert!(s.len() <= 255, "longer than the name limit");
        assert!(!name.org().is_empty() && !name.path_in_org().is_empty());
        assert_eq!(format!("{}/{}", name.org(), name.path_in_org()), s);
        assert!(s.bytes().all(|b| b.is_ascii_graphic()), "{s:?}");
        assert_eq!(RepoName::parse(&name.to_string()).as_ref(), Ok(&name));
    }
    if let Ok(tag) = Tag::parse(s) {
        assert_eq!(tag.as_str(), s);
        assert!(
            !s.is_empty() && s.len() <= 128,
            "outside the tag length limits"
        );
        assert!(!s.contains([':', '/', '@']), "{s:?}");
        assert_eq!(Tag::parse(&tag.to_string()).as_ref(), Ok(&tag));
    }
    if let Ok(digest) = Digest::parse(s) {
        assert_eq!(digest.as_str(), s);
        let want = match digest.algorithm() {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        };
        assert_eq!(digest.hex().len(), want);
        let rebuilt = format!("{}:{}", digest.algorithm().as_str(), digest.hex());
        assert_eq!(rebuilt, s);
        assert_eq!(Digest::parse(&digest.to_string()).as_ref(), Ok(&digest));
    }
    match Reference::parse(s) {
        Ok(Reference::Tag(t)) => assert_eq!(t.as_str(), s),
        Ok(Reference::Digest(d)) => assert_eq!(d.as_str(), s),
        Err(_) => {}
    }
}

/// `WWW-Authenticate` values: no panic; a parsed challenge rendered again parses to the
/// same challenge; a realm allowed to receive an https backend's credentials is https and
/// on that backend's host or a listed one.
pub fn challenge(data: &[u8]) {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let Some(parsed) = upstream::parse_challenge(value) else {
        return;
    };
    let rendered = render_challenge(&parsed);
    assert_eq!(
        upstream::parse_challenge(&rendered).as_ref(),
        Some(&parsed),
        "{value:?} -> {rendered:?}"
    );
    if let Challenge::Bearer { realm, .. } = &parsed {
        let Ok(url) = url::Url::parse(realm) else {
            return;
        };
        let listed = ["auth.registry.example".to_string()];
        if upstream::realm_may_receive_credentials("https://registry.example", &url, &listed)
            .is_ok()
        {
            assert_eq!(url.scheme(), "https", "{realm:?}");
            let host = url.host_str().unwrap_or("");
            assert!(
                host == "registry.example" || host == "auth.registry.example",
                "{realm:?} got credentials"
            );
        }
    }
}

fn render_challenge(c: &Challenge) -> String {
    let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    match c {
        Challenge::Basic => "Basic realm=\"x\"".into(),
        Challenge::Bearer { realm, service } => {
            let mut out = format!("Bearer realm=\"{}\"", quote(realm));
            if let Some(service) = service {
                out.push_str(&format!(",service=\"{}\"", quote(service)));
            }
            out
        }
    }
}

/// Numbers a backend sends: a token answer's `expires_in` and a pre-signed URL's expiry.
/// Lifetimes stay within their bounds and can be added to the clock without overflow.
pub fn backend_numbers(data: &[u8]) {
    if let Ok(answer) = serde_json::from_slice::<upstream::TokenResponse>(data) {
        let lifetime = upstream::token_lifetime(answer.expires_in.as_ref());
        assert!(lifetime >= Duration::from_secs(1));
        assert!(lifetime <= upstream::MAX_TOKEN_LIFETIME);
        assert!(std::time::Instant::now().checked_add(lifetime).is_some());
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cap = Duration::from_secs(300);
    for now in [
        UNIX_EPOCH,
        UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 / 2),
    ] {
        for url in [text.to_owned(), format!("https://cdn.example/blob?{text}")] {
            if let Some(good_for) = crate::gateway::presigned_lifetime(&url, cap, now) {
                assert!(
                    good_for >= Duration::from_secs(1) && good_for <= cap,
                    "{url:?}"
                );
            }
        }
    }
}

/// Manifest and index bytes as warming reads them: every digest learned is a valid digest
/// named by a descriptor of the document, and the platform manifest picked for a
/// single-manifest client is one of the index's entries.
pub fn manifest(data: &[u8]) {
    let references = crate::gateway::manifest_references(data);
    let named = named_digests(data);
    for (digest, _size) in &references {
        assert_eq!(Digest::parse(digest.as_str()).as_ref(), Ok(digest));
        assert!(
            named.iter().any(|(_, d)| d == digest.as_str()),
            "{digest} is not named by the document"
        );
    }
    for accept in [
        &[crate::oci::media::OCI_MANIFEST.to_owned()][..],
        &[crate::oci::media::DOCKER_MANIFEST.to_owned()][..],
        &["*/*".to_owned()][..],
    ] {
        if let Some(child) = crate::gateway::platform_manifest(data, accept) {
            assert!(
                named
                    .iter()
                    .any(|(field, d)| *field == "manifests" && d == child.as_str()),
                "{child} is not an entry of the index"
            );
        }
    }
}

/// (field, digest) of every descriptor in `config`, `layers` and `manifests`, read as
/// plain JSON: an oracle independent of the typed parsing.
fn named_digests(data: &[u8]) -> Vec<(&'static str, String)> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else {
        return Vec::new();
    };
    let digest_of = |v: &serde_json::Value| v.get("digest")?.as_str().map(str::to_owned);
    let mut out = Vec::new();
    if let Some(config) = doc.get("config").and_then(digest_of) {
        out.push(("config", config));
    }
    for field in ["layers", "manifests"] {
        for entry in doc
            .get(field)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(d) = digest_of(entry) {
                out.push((field, d));
            }
        }
    }
    out
}

/// A configuration file: no panic; settings that load have no problems, make a topology,
/// and show none of their secrets in `Debug`.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Reading files named by arbitrary input would make the run depend on this machine.
    if text.contains("_file") || text.contains("tls_ca") {
        return;
    }
    let Ok(settings) = Settings::from_toml(text, []) else {
        return;
    };
    assert!(settings.problems().is_empty());
    let _ = settings.warnings();
    let topology = crate::topology::Topology::from_settings(&settings);
    assert_eq!(topology.backends.len(), settings.backends.len());

    let mut cleared = settings.clone();
    let mut secrets = Vec::new();
    for b in &mut cleared.backends {
        secrets.extend(b.password.take().map(|s| s.expose().to_owned()));
        secrets.extend(b.token.take().map(|s| s.expose().to_owned()));
    }
    secrets.extend(cleared.admin.token.take().map(|s| s.expose().to_owned()));
    let shown = format!("{settings:?}{topology:?}");
    let baseline = format!(
        "{cleared:?}{:?}",
        crate::topology::Topology::from_settings(&cleared)
    );
    for secret in secrets {
        // Too short to tell apart from the rest of the dump, or part of the placeholder.
        if secret.len() < 4 || "Some(Secret(***))".contains(&secret) {
            continue;
        }
        assert!(
            shown.matches(&secret).count() <= baseline.matches(&secret).count(),
            "Debug shows the secret {secret:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Every file of every target's corpus, through the target: what `cargo fuzz` found
    /// once (and what it was seeded with) keeps passing without building the fuzzers.
    #[test]
    fn corpus_replays_through_every_target() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        for (name, target) in TARGETS {
            let source = root.join("fuzz_targets").join(format!("{name}.rs"));
            assert!(source.is_file(), "{} is missing", source.display());
            let dir = root.join("corpus").join(name);
            let files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            assert!(!files.is_empty(), "{}: empty corpus", dir.display());
            for file in files {
                let data = std::fs::read(&file).unwrap();
                let run = std::panic::catch_unwind(|| target(&data));
                assert!(run.is_ok(), "{name}: {} breaks the target", file.display());
            }
        }
    }
}
