//! Listings: tags (from the org's authority, paginated as the client asks) and referrers
//! (the backend's referrers API, or the OCI referrers tag schema where the backend has none).

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Gateway, Scope, BACKEND_HEADER};
use crate::api_error::ApiError;
use crate::oci::{media, Digest, RepoName};
use crate::upstream::{header_str, Call, Upstream, MAX_DOCUMENT_BYTES};

#[derive(Deserialize)]
struct TagsQuery {
    n: Option<String>,
    last: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct TagList {
    name: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

pub(super) async fn tags(
    s: &Scope<'_>,
    up: &Upstream,
    req: &HttpRequest,
    name: &RepoName,
) -> Result<HttpResponse, ApiError> {
    let gw = s.gw;
    let org = &*s.org;
    let query = actix_web::web::Query::<TagsQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::PaginationInvalid(e.to_string()))?
        .into_inner();
    let n = match &query.n {
        Some(n) => Some(n.parse::<u32>().map_err(|_| {
            ApiError::PaginationInvalid(format!("n='{n}' is not a non-negative integer"))
        })?),
        None => None,
    };
    let mut params = url::form_urlencoded::Serializer::new(String::new());
    if let Some(n) = n {
        params.append_pair("n", &n.to_string());
    }
    if let Some(last) = &query.last {
        params.append_pair("last", last);
    }
    let params = params.finish();
    let mut failures = Vec::new();
    s.spend_cold()?;
    // The tag namespace is the authorities' to tell, like a single tag.
    for b in s.tag_plan() {
        let backend = gw.topology.backend(b);
        let repo = org.backend_repo(b, name);
        let path = if params.is_empty() {
            format!("/v2/{repo}/tags/list")
        } else {
            format!("/v2/{repo}/tags/list?{params}")
        };
        let call = Call::new(Method::GET, path, Some(&repo));
        let mut response = match gw.send(up, backend, &call).await {
            Ok(r) => r,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(ApiError::NameUnknown(name.to_string())),
            other => {
                failures.push(format!("{} answered {other}", backend.id));
                continue;
            }
        }
        let backend_has_more = response.headers().contains_key(header::LINK);
        let mut list: TagList = match response.json().limit(MAX_DOCUMENT_BYTES).await {
            Ok(list) => list,
            Err(e) => {
                failures.push(format!("{}: unreadable tag list: {e}", backend.id));
                continue;
            }
        };
        list.name = org.client_repo(name).to_owned();
        // Paginate here too: some backends ignore `n` and `last`, and list tags in storage
        // order rather than the lexical order the spec asks for.
        let tags = list.tags.get_or_insert_with(Vec::new);
        tags.sort();
        if let Some(last) = &query.last {
            tags.retain(|t| t > last);
        }
        let mut more = backend_has_more;
        if let Some(n) = n {
            more |= tags.len() > n as usize;
            tags.truncate(n as usize);
        }
        let mut out = HttpResponse::Ok();
        out.insert_header((BACKEND_HEADER, &*backend.id));
        if let (true, Some(n), Some(last)) = (more, n, tags.last()) {
            let next = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("n", &n.to_string())
                .append_pair("last", last)
                .finish();
            out.insert_header((
                header::LINK,
                format!("</v2/{name}/tags/list?{next}>; rel=\"next\""),
            ));
        }
        return Ok(out.json(list));
    }
    tracing::warn!(%name, ?failures, "no backend could list tags");
    Err(ApiError::Unavailable(format!(
        "no backend of org '{}' could list tags",
        org.name
    )))
}

#[derive(Deserialize)]
struct ReferrersQuery {
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
}

pub(super) async fn referrers(
    s: &Scope<'_>,
    up: &Upstream,
    req: &HttpRequest,
    name: &RepoName,
    digest: &Digest,
) -> Result<HttpResponse, ApiError> {
    let gw = s.gw;
    let org = &*s.org;
    let artifact_type = actix_web::web::Query::<ReferrersQuery>::from_query(req.query_string())
        .map(|q| q.into_inner().artifact_type)
        .unwrap_or(None);
    s.spend_cold()?;
    // Referrers live beside the digest they refer to: ask where the digest is.
    let plan = s.digest_plan(name, digest).await;
    for b in plan.attempts() {
        let backend = gw.topology.backend(b);
        let repo = org.backend_repo(b, name);
        let found = match referrers_api(gw, up, backend, &repo, digest).await {
            Some(found) => Some(found),
            None => referrers_tag(gw, up, backend, &repo, digest).await,
        };
        if let Some(manifests) = found {
            return Ok(index_response(
                manifests,
                artifact_type.as_deref(),
                Some(&backend.id),
            ));
        }
    }
    // The spec: never 404 for a well-formed request; no referrers is an empty index.
    Ok(index_response(Vec::new(), artifact_type.as_deref(), None))
}

fn index_response(
    mut manifests: Vec<Value>,
    artifact_type: Option<&str>,
    backend: Option<&str>,
) -> HttpResponse {
    let mut out = HttpResponse::Ok();
    if let Some(wanted) = artifact_type {
        manifests.retain(|m| m.get("artifactType").and_then(Value::as_str) == Some(wanted));
        out.insert_header(("OCI-Filters-Applied", "artifactType"));
    }
    if let Some(id) = backend {
        out.insert_header((BACKEND_HEADER, id));
    }
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": manifests,
    });
    out.content_type(media::OCI_INDEX).body(body.to_string())
}

/// The backend's own referrers API; `None` when it has none or answers nothing usable.
async fn referrers_api(
    gw: &Gateway,
    up: &Upstream,
    backend: &crate::topology::Backend,
    repo: &str,
    digest: &Digest,
) -> Option<Vec<Value>> {
    let call = Call::new(
        Method::GET,
        format!("/v2/{repo}/referrers/{digest}"),
        Some(repo),
    );
    let mut response = gw.send(up, backend, &call).await.ok()?;
    let is_index = header_str(response.headers(), header::CONTENT_TYPE)
        .is_some_and(|t| t.starts_with(media::OCI_INDEX));
    if response.status() != StatusCode::OK || !is_index {
        return None;
    }
    manifests_of(&response.body().limit(MAX_DOCUMENT_BYTES).await.ok()?)
}

/// The referrers tag schema: an index tagged `<alg>-<hex>` in the same repository.
async fn referrers_tag(
    gw: &Gateway,
    up: &Upstream,
    backend: &crate::topology::Backend,
    repo: &str,
    digest: &Digest,
) -> Option<Vec<Value>> {
    let tag = format!("{}-{}", digest.algorithm().as_str(), digest.hex());
    let call = Call::new(
        Method::GET,
        format!("/v2/{repo}/manifests/{tag}"),
        Some(repo),
    )
    .header(header::ACCEPT, HeaderValue::from_static(media::OCI_INDEX));
    let mut response = gw.send(up, backend, &call).await.ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    manifests_of(&response.body().limit(MAX_DOCUMENT_BYTES).await.ok()?)
}

fn manifests_of(bytes: &[u8]) -> Option<Vec<Value>> {
    let doc: Value = serde_json::from_slice(bytes).ok()?;
    Some(doc.get("manifests")?.as_array()?.clone())
}
