//! Manifests: served by the gateway itself, byte-exact and digest-verified. Tags resolve
//! at the org's authority with a TTL; when the authority fails, the last known digest is
//! served and marked stale. Serving a manifest teaches the node where its layers live.

use std::sync::Arc;
use std::time::SystemTime;

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use serde::Deserialize;

use super::knowledge::Manifest;
use super::{Gateway, Scope, BACKEND_HEADER, STALE_HEADER};
use crate::api_error::ApiError;
use crate::model::{unix_ms, BackendIdx, Holding, TagRecord};
use crate::oci::{media, Digest, Reference, RepoName, Tag};
use crate::topology::Org;
use crate::upstream::{header_str, Call, Upstream, MAX_DOCUMENT_BYTES};

pub const DIGEST_HEADER: &str = "Docker-Content-Digest";

pub(super) async fn serve(
    s: &Scope<'_>,
    up: &Upstream,
    req: &HttpRequest,
    name: &RepoName,
    reference: Reference,
    head: bool,
) -> Result<HttpResponse, ApiError> {
    let gw = s.gw;
    let accept = accept_values(req);
    match reference {
        Reference::Digest(digest) => {
            let (manifest, backend) = by_digest(s, up, name, &digest, &accept).await?;
            gw.count_manifest(backend, false);
            Ok(respond(&manifest, gw.backend_id(backend), false))
        }
        Reference::Tag(tag) => {
            let resolved = resolve_tag(s, up, name, &tag).await?;
            let record = &resolved.record;
            let as_is =
                accepts(&accept, &record.media_type) || !media::is_index(&record.media_type);
            if as_is && head && gw.knowledge.manifest(&record.digest).is_none() {
                // A HEAD by tag needs no manifest bytes: the record has every header.
                return Ok(head_from_record(record, resolved.stale));
            }
            let (mut manifest, mut backend) =
                by_digest(s, up, name, &record.digest, &accept).await?;
            if !as_is {
                // A client that cannot take an index gets the manifest a registry would
                // give it: the index's linux/amd64 entry (or its first acceptable one).
                let child = platform_manifest(&manifest.bytes, &accept)
                    .ok_or_else(|| ApiError::ManifestUnknown(format!("{name}:{tag}")))?;
                (manifest, backend) = by_digest(s, up, name, &child, &accept).await?;
            }
            gw.count_manifest(backend, resolved.stale);
            Ok(respond(&manifest, gw.backend_id(backend), resolved.stale))
        }
    }
}

impl Gateway {
    pub(super) fn backend_id(&self, idx: BackendIdx) -> &str {
        &self.topology.backend(idx).id
    }

    fn count_manifest(&self, backend: BackendIdx, stale: bool) {
        let reason = if stale { "stale" } else { "holder" };
        self.metrics
            .decisions
            .with_label_values(&[self.backend_id(backend), "manifest", "gateway", reason])
            .inc();
    }
}

/// Every media type the client accepts, one per item (clients send several `Accept`
/// lines, some with comma-separated lists).
fn accept_values(req: &HttpRequest) -> Vec<String> {
    let mut out: Vec<String> = req
        .headers()
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    if out.is_empty() {
        out = media::ALL_MANIFESTS.iter().map(|s| s.to_string()).collect();
    }
    out
}

/// Whether the client's `Accept` list takes `media_type` (parameters and `*/*` understood).
fn accepts(accept: &[String], media_type: &str) -> bool {
    accept.iter().any(|a| {
        let a = a.split(';').next().unwrap_or("").trim();
        a == media_type || a == "*/*"
    })
}

/// The manifest of an index a single-manifest client should get: linux/amd64 (what
/// Docker Hub hands such clients), else the first entry of a type the client accepts;
/// attestations (platform unknown) never.
pub fn platform_manifest(index: &[u8], accept: &[String]) -> Option<Digest> {
    let doc = document(index)?;
    let usable: Vec<&Descriptor> = doc
        .manifests
        .iter()
        .filter(|d| d.media_type.as_deref().is_none_or(|m| accepts(accept, m)))
        .filter(|d| d.platform.as_ref().is_none_or(|p| p.os != "unknown"))
        .collect();
    let amd64 = usable.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    amd64
        .or(usable.first())
        .and_then(|d| Digest::parse(&d.digest).ok())
}

fn respond(manifest: &Manifest, backend: &str, stale: bool) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response
        .extensions_mut()
        .insert(super::Decision(if stale { "stale" } else { "holder" }));
    response
        .insert_header((header::CONTENT_TYPE, manifest.media_type.as_str()))
        .insert_header((DIGEST_HEADER, manifest.digest.as_str()))
        .insert_header((BACKEND_HEADER, backend));
    if stale {
        response.insert_header((STALE_HEADER, "true"));
    }
    response.body(manifest.bytes.clone())
}

fn head_from_record(record: &TagRecord, stale: bool) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response
        .extensions_mut()
        .insert(super::Decision(if stale { "stale" } else { "holder" }));
    response
        .insert_header((header::CONTENT_TYPE, record.media_type.as_str()))
        .insert_header((DIGEST_HEADER, record.digest.as_str()))
        .insert_header((BACKEND_HEADER, record.backend.as_str()));
    if stale {
        response.insert_header((STALE_HEADER, "true"));
    }
    let empty = futures_util::stream::empty::<Result<Bytes, std::io::Error>>();
    response.body(SizedStream::new(record.size, empty))
}

struct Resolved {
    record: TagRecord,
    stale: bool,
}

/// The digest a tag points at: from a fresh cached record, else from the org's tag
/// authorities (the first usable one that answers decides), else the last known digest
/// marked stale when no authority could answer.
///
/// Tags are always resolved with every manifest type accepted, so the one record kept per
/// tag (on this node, in the store, as the stale fallback) is the full representation (an
/// index when there is one) whichever client asked first; `serve` hands a client that
/// cannot take an index its platform's manifest.
async fn resolve_tag(
    s: &Scope<'_>,
    up: &Upstream,
    name: &RepoName,
    tag: &Tag,
) -> Result<Resolved, ApiError> {
    let gw = s.gw;
    let org = &*s.org;
    let fresh_record = || async {
        let known = gw.knowledge.tag(name, tag).await;
        let fresh = known
            .as_ref()
            .is_some_and(|r| r.age(SystemTime::now()) < org.tag_ttl);
        (known, fresh)
    };
    let (mut known, fresh) = fresh_record().await;
    gw.metrics.hit("tag", fresh);
    if fresh {
        if let Some(record) = known {
            return Ok(Resolved {
                record,
                stale: false,
            });
        }
    }
    // The same tag asked at once by many clients goes to the authority once.
    // Leader or not, look again once in: a resolution that ended between the look above
    // and the join left its record.
    let _lead = gw.flights.join(format!("tag {name}:{tag}")).await;
    let (again, fresh) = fresh_record().await;
    if let (true, Some(record)) = (fresh, &again) {
        return Ok(Resolved {
            record: record.clone(),
            stale: false,
        });
    }
    known = again;
    s.spend_cold()?;
    let authorities = s.tag_plan();
    for &b in &authorities {
        match ask_authority(gw, up, org, b, name, tag).await {
            Ok(Some(record)) => {
                gw.knowledge
                    .learn(name, &record.digest, b, Holding::Has)
                    .await;
                gw.knowledge.learn_tag(name, tag, record.clone()).await;
                return Ok(Resolved {
                    record,
                    stale: false,
                });
            }
            Ok(None) => return Err(ApiError::ManifestUnknown(format!("{name}:{tag}"))),
            Err(reason) => {
                tracing::warn!(backend = gw.backend_id(b), %name, %tag, %reason, "tag authority failed");
            }
        }
    }
    if let Some(record) = known {
        tracing::warn!(
            %name, %tag, digest = %record.digest,
            age_s = record.age(SystemTime::now()).as_secs(),
            asked = authorities.len(),
            "serving the last known digest of a tag: no authority can answer"
        );
        gw.metrics
            .stale_serves
            .with_label_values(&[&org.name])
            .inc();
        return Ok(Resolved {
            record,
            stale: true,
        });
    }
    Err(ApiError::Unavailable(format!(
        "no tag authority of org '{}' can resolve {name}:{tag} now",
        org.name
    )))
}

/// Resolves a tag at one backend: `Ok(None)` when it says the tag does not exist, `Err`
/// when it fails to answer.
async fn ask_authority(
    gw: &Gateway,
    up: &Upstream,
    org: &Org,
    b: BackendIdx,
    name: &RepoName,
    tag: &Tag,
) -> Result<Option<TagRecord>, String> {
    let backend = gw.topology.backend(b);
    let repo = org.backend_repo(b, name);
    // HEAD first: Docker Hub counts GETs as pulls, and the manifest is often cached already.
    let mut call = Call::new(
        Method::HEAD,
        format!("/v2/{repo}/manifests/{tag}"),
        Some(&repo),
    );
    for value in media::ALL_MANIFESTS {
        call = call.header(header::ACCEPT, HeaderValue::from_static(value));
    }
    let response = gw
        .send(up, backend, &call)
        .await
        .map_err(|e| e.to_string())?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Ok(None),
        other => return Err(format!("answered {other}")),
    }
    let headers = response.headers();
    let digest = header_str(
        headers,
        header::HeaderName::from_static("docker-content-digest"),
    )
    .and_then(|d| Digest::parse(d).ok());
    let media_type = header_str(headers, header::CONTENT_TYPE).map(str::to_owned);
    let size = header_str(headers, header::CONTENT_LENGTH).and_then(|l| l.parse::<u64>().ok());
    let record = |digest: Digest, media_type: String, size: u64| TagRecord {
        digest,
        media_type,
        size,
        backend: backend.id.to_string(),
        resolved_at_ms: unix_ms(SystemTime::now()),
    };
    if let (Some(digest), Some(media_type), Some(size)) = (digest, media_type, size) {
        return Ok(Some(record(digest, media_type, size)));
    }
    // The backend did not say which digest: fetch the manifest by tag and hash it.
    call.method = Method::GET;
    let fetched = fetch(gw, up, backend, &call, None).await?;
    match fetched {
        Fetched::Found(manifest) => {
            let r = record(
                manifest.digest.clone(),
                manifest.media_type.clone(),
                manifest.bytes.len() as u64,
            );
            warm(gw, b, name, &manifest).await;
            gw.knowledge.keep_manifest(Arc::new(manifest));
            Ok(Some(r))
        }
        Fetched::Missing => Ok(None),
    }
}

enum Fetched {
    Found(Manifest),
    Missing,
}

/// GETs a manifest and checks it: against `expected` when fetched by digest, else hashed
/// with sha256 to learn its digest.
async fn fetch(
    gw: &Gateway,
    up: &Upstream,
    backend: &crate::topology::Backend,
    call: &Call<'_>,
    expected: Option<&Digest>,
) -> Result<Fetched, String> {
    let mut response = gw
        .send(up, backend, call)
        .await
        .map_err(|e| e.to_string())?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Ok(Fetched::Missing),
        other => return Err(format!("answered {other}")),
    }
    let media_type = header_str(response.headers(), header::CONTENT_TYPE).map(str::to_owned);
    let bytes = match response.body().limit(MAX_DOCUMENT_BYTES).await {
        Ok(bytes) => bytes,
        Err(e) => {
            // Headers then silence: pass the backend over for a while, like one that does
            // not answer at all.
            if crate::upstream::timed_out(&e) {
                gw.knowledge.mark_unreachable(backend.idx);
            }
            return Err(format!("reading the manifest failed: {e}"));
        }
    };
    let digest = match expected {
        Some(d) if d.verifies(&bytes) => d.clone(),
        Some(d) => {
            return Err(format!(
                "manifest bytes do not match {d}: refusing to serve them"
            ))
        }
        None => Digest::compute(crate::oci::Algorithm::Sha256, &bytes),
    };
    let media_type = media_type
        .filter(|m| !m.is_empty() && m != "application/octet-stream")
        .or_else(|| document(&bytes).and_then(|d| d.media_type))
        .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
    Ok(Fetched::Found(Manifest {
        digest,
        media_type,
        bytes,
        backend: backend.id.clone(),
    }))
}

/// A manifest by digest: from the cache when a backend of this org is known to hold it,
/// else fetched in plan order (a GET costs what a HEAD probe would), trying the next
/// backend when one fails or lacks it.
pub(super) async fn by_digest(
    s: &Scope<'_>,
    up: &Upstream,
    name: &RepoName,
    digest: &Digest,
    accept: &[String],
) -> Result<(Arc<Manifest>, BackendIdx), ApiError> {
    let gw = s.gw;
    let org = &*s.org;
    let mut plan = s.digest_plan(name, digest).await;
    let cached = cached_manifest(gw, &plan, digest);
    gw.metrics.hit("manifest", cached.is_some());
    if let Some(hit) = cached {
        return Ok(hit);
    }
    // The same manifest asked at once by many clients is fetched once.
    // Leader or not, look again once in: a fetch that ended between the look above and
    // the join left the manifest in the cache.
    let _lead = gw.flights.join(format!("manifest {name}@{digest}")).await;
    plan = s.digest_plan(name, digest).await;
    if let Some(hit) = cached_manifest(gw, &plan, digest) {
        return Ok(hit);
    }
    s.spend_cold()?;
    let mut failures = 0u32;
    for b in plan.attempts() {
        let backend = gw.topology.backend(b);
        let repo = org.backend_repo(b, name);
        let mut call = Call::new(
            Method::GET,
            format!("/v2/{repo}/manifests/{digest}"),
            Some(&repo),
        );
        // By digest the content is pinned: accept every manifest type as well as what the
        // client named, or the registry answers 404 for types the client did not name.
        for m in accept
            .iter()
            .map(String::as_str)
            .chain(media::ALL_MANIFESTS)
        {
            if let Ok(v) = HeaderValue::from_str(m) {
                call = call.header(header::ACCEPT, v);
            }
        }
        match fetch(gw, up, backend, &call, Some(digest)).await {
            Ok(Fetched::Found(manifest)) => {
                gw.knowledge.learn(name, digest, b, Holding::Has).await;
                warm(gw, b, name, &manifest).await;
                let manifest = Arc::new(manifest);
                gw.knowledge.keep_manifest(manifest.clone());
                return Ok((manifest, b));
            }
            Ok(Fetched::Missing) => {
                gw.knowledge.learn(name, digest, b, Holding::Lacks).await;
            }
            Err(reason) => {
                failures += 1;
                tracing::warn!(backend = &*backend.id, %name, %digest, %reason, "manifest fetch failed");
            }
        }
    }
    tracing::debug!(failures, "no backend could serve the manifest");
    // Explain with what was learned on the way.
    let plan = s.digest_plan(name, digest).await;
    let unknown = ApiError::ManifestUnknown(format!("{name}@{digest}"));
    Err(s.none_serves(&plan, name, digest, unknown))
}

/// Cached bytes are verified and cost no backend a request: they are served whenever a
/// backend of this org is known to hold the digest, even one drained or down now.
fn cached_manifest(
    gw: &Gateway,
    plan: &crate::placement::DigestPlan,
    digest: &Digest,
) -> Option<(Arc<Manifest>, BackendIdx)> {
    let manifest = gw.knowledge.manifest(digest)?;
    let holder = plan.holders.first().copied().or_else(|| {
        plan.assessed
            .iter()
            .find(|a| a.holding == Holding::Has)
            .map(|a| a.backend)
    })?;
    Some((manifest, holder))
}

/// A manifest or index as JSON, or `None`. JSON is UTF-8: bytes that are not (even inside a
/// field the typed parse would skip) are no document to learn from. Found by fuzzing: the
/// typed parse skipped an invalid string in `annotations` that a full JSON parse refuses.
fn document(bytes: &[u8]) -> Option<Document> {
    serde_json::from_str(std::str::from_utf8(bytes).ok()?).ok()
}

#[derive(Deserialize)]
struct Document {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    digest: String,
    size: Option<u64>,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

/// The backend that served a manifest holds what it references: remember the config,
/// layers and child manifests there, and their sizes (blob HEADs are answered from them).
async fn warm(gw: &Gateway, backend: BackendIdx, name: &RepoName, manifest: &Manifest) {
    for (digest, size) in references(&manifest.bytes) {
        if let Some(size) = size {
            gw.knowledge.learn_size(&digest, size);
        }
        gw.knowledge
            .learn(name, &digest, backend, Holding::Has)
            .await;
    }
}

/// What warming learns from a manifest or index: the digests it references (config,
/// layers, child manifests) with their stated sizes. Bytes that are not such a document
/// teach nothing; a descriptor whose digest does not parse is skipped. Pure.
pub fn references(bytes: &[u8]) -> Vec<(Digest, Option<u64>)> {
    let Some(doc) = document(bytes) else {
        return Vec::new();
    };
    doc.config
        .iter()
        .chain(&doc.layers)
        .chain(&doc.manifests)
        .filter_map(|d| Some((Digest::parse(&d.digest).ok()?, d.size)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (`fuzz/corpus/manifest/invalid-utf8-in-a-skipped-field`): a manifest
    /// whose `annotations` hold bytes that are not UTF-8 taught holders although it is not
    /// JSON.
    #[test]
    fn bytes_that_are_not_json_teach_nothing() {
        let good = br#"{"schemaVersion":2,"config":{"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1},"layers":[]}"#;
        assert_eq!(references(good).len(), 1);
        let mut bad = good[..good.len() - 1].to_vec();
        bad.extend_from_slice(b",\"annotations\":{\"k\":\"\xff\xfe\"}}");
        assert!(references(&bad).is_empty());
    }
}
