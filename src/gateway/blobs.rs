//! Blobs: the client is sent to the bytes, never given them by the gateway unless a
//! backend leaves no other way. Per backend: `direct` (307 to the backend's own URL),
//! `resolve` (307 to the pre-signed URL the backend redirects the gateway to), `proxy`
//! (streamed through), or `auto` (detected once from the backend's answers).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::body::SizedStream;
use actix_web::http::header;
use actix_web::http::header::HeaderValue;
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpResponse};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::{FutureExt as _, StreamExt as _};

use super::knowledge::Detected;
use super::manifests::DIGEST_HEADER;
use super::{Gateway, Scope, BACKEND_HEADER};
use crate::api_error::ApiError;
use crate::head_client::Answer as Probed;
use crate::model::{BackendIdx, Delivery, Holding};
use crate::oci::{Digest, RepoName};
use crate::topology::{Backend, Credentials, Org};
use crate::upstream::{header_str, Call, Response, Upstream, UpstreamError};

/// What a blob request brings besides its route: the same whether actix-web's `App` or the
/// front door (`crate::front`) read it.
pub struct Asked<'r> {
    /// The path as the client sent it.
    pub path: &'r str,
    /// The client's `Range`, passed on when the blob is streamed through.
    pub range: Option<&'r HeaderValue>,
    /// Owned handles, so that a probe can outlive the request.
    pub gw: &'r web::Data<Gateway>,
    pub up: &'r web::Data<Upstream>,
}

pub(crate) async fn serve(
    s: &Scope<'_>,
    req: &Asked<'_>,
    name: &RepoName,
    digest: &Digest,
    head: bool,
) -> Result<HttpResponse, ApiError> {
    let (gw, up) = (s.gw, &***req.up);
    let org = &*s.org;
    // Read before deciding: a decision made while something changed is not reused.
    let epoch = gw.knowledge.epoch();
    let learned = gw.knowledge.learned();
    let mut plan = s.digest_plan(name, digest).await;
    let mut probed: Vec<BackendIdx> = Vec::new();
    if !plan.probe_first.is_empty() {
        // The same blob asked at once by many clients is probed once. Whether this request
        // waited for another's probe or just missed one that ended after its plan was made,
        // what was learned is in a new plan; it probes only what is still unknown. (When
        // this node learned nothing at all since and nothing else changed, the plan stands.)
        let lead = gw.flights.join(format!("probe {name}@{digest}")).await;
        if gw.knowledge.learned() != learned || gw.knowledge.epoch() != epoch {
            plan = s.digest_plan(name, digest).await;
        }
        if lead.is_some() && !plan.probe_first.is_empty() {
            s.spend_cold()?;
            probed = probe(s, req, name, digest, &plan.probe_first).await;
            plan = s.digest_plan(name, digest).await;
        }
    }
    let mut tried: Vec<BackendIdx> = Vec::new();
    loop {
        let holders: Vec<BackendIdx> = plan
            .holders
            .iter()
            .copied()
            .filter(|b| !tried.contains(b))
            .collect();
        for b in holders {
            let outcome = if head {
                head_blob(gw, up, org, b, name, digest).await
            } else {
                deliver(gw, up, req, org, b, name, digest).await
            };
            match outcome {
                Ok(mut response) => {
                    let reason = match (tried.is_empty(), plan.region_chose) {
                        (false, _) => "failover",
                        (true, true) => "region",
                        (true, false) => "holder",
                    };
                    if !head {
                        // A private org's redirects are not kept for the warm path, which
                        // answers before any access check.
                        if response.status() == StatusCode::TEMPORARY_REDIRECT
                            && org.policy.access.is_public()
                        {
                            remember_redirect(gw, req, name, b, digest, &response, epoch);
                        }
                        count_decision(gw, b, reason);
                    }
                    response.extensions_mut().insert(super::Decision(reason));
                    return Ok(response);
                }
                Err(Failure::Missing) => {
                    gw.knowledge.learn(name, digest, b, Holding::Lacks).await;
                }
                Err(Failure::Broken(reason)) => {
                    tracing::warn!(backend = gw.backend_id(b), %name, %digest, %reason, "blob delivery failed; trying the next holder");
                }
            }
            tried.push(b);
        }
        // Every known holder failed: ask the backends nothing is known about yet.
        let unasked: Vec<BackendIdx> = plan
            .attempts()
            .filter(|b| !probed.contains(b) && !tried.contains(b))
            .collect();
        if unasked.is_empty() {
            break;
        }
        let answered = probe(s, req, name, digest, &unasked).await;
        if answered.is_empty() {
            break;
        }
        probed.extend(answered);
        plan = s.digest_plan(name, digest).await;
    }
    let unknown = ApiError::BlobUnknown(format!("{name}@{digest}"));
    Err(s.none_serves(&plan, name, digest, unknown))
}

fn count_decision(gw: &Gateway, b: BackendIdx, reason: &str) {
    let backend = gw.topology.backend(b);
    let delivery = gw
        .knowledge
        .delivery(backend.delivery, b)
        .map_or("auto", |d| d.as_str());
    gw.metrics
        .decisions
        .with_label_values(&[&backend.id, "blob", delivery, reason])
        .inc();
}

/// Keeps a redirect for the warm path: as long as nothing changes, for at most a few
/// seconds, and never past the pre-signed URL's own lifetime.
fn remember_redirect(
    gw: &Gateway,
    req: &Asked<'_>,
    name: &RepoName,
    b: BackendIdx,
    digest: &Digest,
    response: &HttpResponse,
    epoch: u64,
) {
    let backend = gw.topology.backend(b);
    let delivery = gw
        .knowledge
        .delivery(backend.delivery, b)
        .unwrap_or(Delivery::Resolve);
    let good_for = match delivery {
        Delivery::Direct => Some(Duration::MAX),
        _ => gw.knowledge.resolved_remaining(b, digest),
    };
    let (Some(good_for), Some(location), Some(id)) = (
        good_for,
        response.headers().get(header::LOCATION),
        response.headers().get(BACKEND_HEADER),
    ) else {
        return;
    };
    let counters = (
        gw.metrics
            .decisions
            .with_label_values(&[&backend.id, "blob", delivery.as_str(), "cached"]),
        gw.metrics
            .requests
            .with_label_values(&["blob", "GET", "307", name.org()]),
    );
    // The warm path looks the redirect up by the routed path (`Gateway::route_path`): for
    // an upstream group that is the group's name and the repository, whatever the client
    // sent (`ns`, a host prefix, or nothing).
    let key = if gw.topology.upstreams.group(name.org()).is_some() {
        std::borrow::Cow::Owned(format!("/v2/{name}/blobs/{digest}"))
    } else {
        std::borrow::Cow::Borrowed(req.path)
    };
    gw.knowledge.keep_redirect(
        &key,
        epoch,
        (location.clone(), id.clone()),
        name.org().into(),
        counters,
        good_for,
    );
}

enum Failure {
    /// The backend says it does not have the blob.
    Missing,
    /// The backend failed to answer usefully.
    Broken(String),
}

/// Asks `backends` (in plan order, best first) whether they hold the blob, in parallel,
/// with a HEAD each, and learns from the answers. The wait ends as soon as the best holder
/// among them is certain: a positive answer from a backend whose better-ranked peers have
/// all answered. So a fast answer from a worse backend never beats the node's own region,
/// and a slow worse backend never delays the answer of a better one. Answers that arrived
/// by then are learned too; probes still out finish on their own (within the request
/// deadline), so their connections go back to the pool instead of being closed (a connect,
/// or a TLS handshake, for the next cold request) and what they say is learned. Returns the
/// backends that answered in time.
async fn probe(
    s: &Scope<'_>,
    req: &Asked<'_>,
    name: &RepoName,
    digest: &Digest,
    backends: &[BackendIdx],
) -> Vec<BackendIdx> {
    type Answer = (usize, BackendIdx, Result<Probed, UpstreamError>);
    let gw = s.gw;
    // Owned handles, so that a probe can outlive this request.
    let (gw_data, up) = (req.gw.clone(), req.up.clone());
    let mut answered = Vec::with_capacity(backends.len());
    let mut holdings: Vec<Option<Holding>> = vec![None; backends.len()];
    let mut answers: futures_util::stream::FuturesUnordered<LocalBoxFuture<'static, Answer>> =
        backends
            .iter()
            .enumerate()
            .map(|(rank, &b)| {
                let (gw, up, org) = (gw_data.clone(), up.clone(), s.org.clone());
                let (name, digest) = (name.clone(), digest.clone());
                async move {
                    let repo = org.backend_repo(b, &name);
                    let path = format!("/v2/{repo}/blobs/{digest}");
                    let backend = gw.topology.backend(b);
                    let answer = gw.probe(&up, backend, &path, &repo).await;
                    (rank, b, answer)
                }
                .boxed_local()
            })
            .collect();
    let best_holder_known =
        |holdings: &[Option<Holding>]| holdings.iter().map_while(|h| *h).any(|h| h == Holding::Has);
    while let Some((rank, b, answer)) = answers.next().await {
        answered.push(b);
        holdings[rank] = Some(learn_probe(gw, name, digest, b, &answer).await);
        if best_holder_known(&holdings) {
            while let Some(Some((rank, b, answer))) = answers.next().now_or_never() {
                answered.push(b);
                holdings[rank] = Some(learn_probe(gw, name, digest, b, &answer).await);
            }
            break;
        }
    }
    if !answers.is_empty() {
        let (name, digest, deadline) = (name.clone(), digest.clone(), gw.request_deadline);
        actix_web::rt::spawn(async move {
            let rest = async {
                while let Some((_, b, answer)) = answers.next().await {
                    learn_probe(&gw_data, &name, &digest, b, &answer).await;
                }
            };
            let _ = tokio::time::timeout(deadline, rest).await;
        });
    }
    answered
}

/// Learns what one probe answer says of backend `b`.
async fn learn_probe(
    gw: &Gateway,
    name: &RepoName,
    digest: &Digest,
    b: BackendIdx,
    answer: &Result<Probed, UpstreamError>,
) -> Holding {
    let holding = match answer {
        Ok(r) if r.status.is_success() || r.status.is_redirection() => {
            if r.status.is_success() {
                if let Some(size) = r.content_length {
                    gw.knowledge.learn_size(digest, size);
                }
            }
            Holding::Has
        }
        Ok(r) if r.status == StatusCode::NOT_FOUND => Holding::Lacks,
        Ok(r) => {
            tracing::warn!(backend = gw.backend_id(b), status = %r.status, "blob probe failed");
            Holding::Unknown
        }
        Err(e) => {
            tracing::warn!(backend = gw.backend_id(b), error = %e, "blob probe failed");
            Holding::Unknown
        }
    };
    gw.knowledge.learn(name, digest, b, holding).await;
    holding
}

/// A HEAD of the blob on backend `b`, with the gateway's credentials, through awc (its
/// `Location` is read when the size is behind a redirect).
async fn head_on(
    gw: &Gateway,
    up: &Upstream,
    org: &Org,
    b: BackendIdx,
    name: &RepoName,
    digest: &Digest,
) -> Result<Response, crate::upstream::UpstreamError> {
    let repo = org.backend_repo(b, name);
    let call = Call::new(
        Method::HEAD,
        format!("/v2/{repo}/blobs/{digest}"),
        Some(&repo),
    );
    gw.send(up, gw.topology.backend(b), &call).await
}

fn content_length(r: &Response) -> Option<u64> {
    header_str(r.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse().ok())
}

/// Blob HEAD, answered from the known size: pre-signed URLs are bound to GET, so they are
/// never touched for a HEAD.
async fn head_blob(
    gw: &Gateway,
    up: &Upstream,
    org: &Org,
    b: BackendIdx,
    name: &RepoName,
    digest: &Digest,
) -> Result<HttpResponse, Failure> {
    let size = match gw.knowledge.blob_size(digest) {
        Some(size) => size,
        None => {
            let size = size_from_backend(gw, up, org, b, name, digest).await?;
            gw.knowledge.learn_size(digest, size);
            size
        }
    };
    let empty = futures_util::stream::empty::<Result<Bytes, std::io::Error>>();
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/octet-stream"))
        .insert_header((DIGEST_HEADER, digest.as_str()))
        .insert_header((BACKEND_HEADER, gw.backend_id(b)))
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .body(SizedStream::new(size, empty)))
}

async fn size_from_backend(
    gw: &Gateway,
    up: &Upstream,
    org: &Org,
    b: BackendIdx,
    name: &RepoName,
    digest: &Digest,
) -> Result<u64, Failure> {
    let backend = gw.topology.backend(b);
    let response = head_on(gw, up, org, b, name, digest)
        .await
        .map_err(|e| Failure::Broken(e.to_string()))?;
    let status = response.status();
    if status == StatusCode::NOT_FOUND {
        return Err(Failure::Missing);
    }
    if status.is_success() {
        return content_length(&response)
            .ok_or_else(|| Failure::Broken("HEAD without Content-Length".into()));
    }
    if status.is_redirection() {
        // The size is behind the redirect: ask for one byte and read the total.
        let location = location(backend, &response)?;
        let mut ranged = up
            .get_absolute(backend, &location)
            .insert_header((header::RANGE, "bytes=0-0"))
            .send()
            .await
            .map_err(|e| Failure::Broken(e.to_string()))?;
        let total = header_str(ranged.headers(), header::CONTENT_RANGE)
            .and_then(|v| v.rsplit_once('/'))
            .and_then(|(_, total)| total.parse().ok())
            .or_else(|| {
                (ranged.status() == StatusCode::OK)
                    .then(|| content_length(&ranged))
                    .flatten()
            });
        let _ = ranged.body().limit(1).await;
        return total.ok_or_else(|| Failure::Broken("redirect target gave no size".into()));
    }
    Err(Failure::Broken(format!("HEAD answered {status}")))
}

/// Sends the client to the blob on backend `b`, by that backend's delivery mode.
async fn deliver(
    gw: &Gateway,
    up: &Upstream,
    req: &Asked<'_>,
    org: &Org,
    b: BackendIdx,
    name: &RepoName,
    digest: &Digest,
) -> Result<HttpResponse, Failure> {
    let backend = gw.topology.backend(b);
    let repo = org.backend_repo(b, name);
    let delivery = match gw.knowledge.delivery(backend.delivery, b) {
        Some(d) => d,
        None => match detect(gw, up, backend).await? {
            Detected::Anonymous => Delivery::Direct,
            // Needs credentials: the blob answer itself says resolve or proxy.
            _ => Delivery::Auto,
        },
    };
    // A private org's blob never goes to a URL anyone could fetch without the gateway:
    // it is streamed instead (and what that shows is not learnt as the backend's mode).
    let learn = backend.delivery == Delivery::Auto;
    let public = org.policy.access.is_public();
    let (delivery, learn) = match delivery {
        Delivery::Direct if !public => (Delivery::Proxy, false),
        d => (d, learn),
    };
    match delivery {
        Delivery::Direct => Ok(redirect(
            &crate::upstream::blob_url(&backend.base, &repo, digest),
            backend,
        )),
        Delivery::Resolve => {
            if let Some(url) = gw.knowledge.resolved(b, digest) {
                if public || carries_signature(&url) {
                    return Ok(redirect(&url, backend));
                }
            }
            let how = Fetch::PassRedirect {
                learn,
                signed_only: !public,
            };
            fetch_blob(gw, up, req, backend, &repo, digest, how).await
        }
        Delivery::Auto => {
            let how = Fetch::PassRedirect {
                learn,
                signed_only: !public,
            };
            fetch_blob(gw, up, req, backend, &repo, digest, how).await
        }
        Delivery::Proxy => fetch_blob(gw, up, req, backend, &repo, digest, Fetch::Stream).await,
    }
}

/// Detects how an `auto` backend must be reached: anonymous reads (direct), or credentials.
async fn detect(gw: &Gateway, up: &Upstream, backend: &Backend) -> Result<Detected, Failure> {
    if backend.credentials != Credentials::Anonymous {
        gw.knowledge
            .learn_detected(backend.idx, Detected::NeedsAuth);
        return Ok(Detected::NeedsAuth);
    }
    let call = Call::new(Method::GET, "/v2/".into(), None);
    let response = up
        .send_anonymous(backend, &call)
        .await
        .map_err(|e| Failure::Broken(e.to_string()))?;
    let detected = match response.status() {
        StatusCode::OK => Detected::Anonymous,
        StatusCode::UNAUTHORIZED => Detected::NeedsAuth,
        other => return Err(Failure::Broken(format!("/v2/ answered {other}"))),
    };
    tracing::info!(backend = &*backend.id, ?detected, "detected backend access");
    gw.knowledge.learn_detected(backend.idx, detected);
    Ok(detected)
}

/// What [`fetch_blob`] does with a backend that answers the blob GET with a redirect.
#[derive(Clone, Copy)]
enum Fetch {
    /// Send the client there (a pre-signed URL: `resolve`, or `auto` learning that it is
    /// `resolve` when `learn`). With `signed_only` (a private org), only a URL that carries
    /// a signature is passed on; any other is followed and streamed, since anyone could
    /// fetch it without the gateway.
    PassRedirect { learn: bool, signed_only: bool },
    /// `proxy`: every byte goes through the gateway, so the gateway follows the redirect
    /// itself (without its credentials, as a client would) and streams what it finds.
    Stream,
}

/// GETs the blob with the gateway's credentials, without following a redirect: a redirect
/// is a pre-signed URL to send the client to (or, for `proxy`, to fetch and stream); a 200
/// is streamed through.
async fn fetch_blob(
    gw: &Gateway,
    up: &Upstream,
    req: &Asked<'_>,
    backend: &Backend,
    repo: &str,
    digest: &Digest,
    how: Fetch,
) -> Result<HttpResponse, Failure> {
    let auto = matches!(how, Fetch::PassRedirect { learn: true, .. });
    let mut call = Call::new(
        Method::GET,
        format!("/v2/{repo}/blobs/{digest}"),
        Some(repo),
    );
    call.raw = true;
    if let Some(range) = req.range {
        call = call.header(header::RANGE, range.clone());
    }
    let mut response = gw
        .send(up, backend, &call)
        .await
        .map_err(|e| Failure::Broken(e.to_string()))?;
    let mut status = response.status();
    if status.is_redirection() {
        let url = location(backend, &response)?;
        let follow = match how {
            Fetch::Stream => true,
            Fetch::PassRedirect { signed_only, .. } => signed_only && !carries_signature(&url),
        };
        if !follow {
            let url: Arc<str> = url.into();
            if let Some(good_for) =
                presigned_lifetime(&url, gw.cache.resolve_ttl, SystemTime::now())
            {
                gw.knowledge
                    .learn_resolved(backend.idx, digest, url.clone(), good_for);
            }
            if auto {
                gw.knowledge.learn_detected(backend.idx, Detected::Resolve);
            }
            return Ok(redirect(&url, backend));
        }
        if auto {
            gw.knowledge.learn_detected(backend.idx, Detected::Resolve);
        }
        let mut get = up.get_absolute(backend, &url);
        if let Some(range) = req.range {
            get = get.insert_header((header::RANGE, range.clone()));
        }
        response = get
            .send()
            .await
            .map_err(|e| Failure::Broken(format!("blob redirect target: {e}")))?;
        status = response.status();
        if status != StatusCode::OK && status != StatusCode::PARTIAL_CONTENT {
            return Err(Failure::Broken(format!(
                "blob redirect target answered {status}"
            )));
        }
    } else {
        if status == StatusCode::NOT_FOUND {
            return Err(Failure::Missing);
        }
        if status != StatusCode::OK && status != StatusCode::PARTIAL_CONTENT {
            return Err(Failure::Broken(format!("blob GET answered {status}")));
        }
        if auto {
            gw.knowledge.learn_detected(backend.idx, Detected::Proxy);
        }
    }
    // Commit to this backend only once its bytes flow: one that sends headers and then
    // stalls is passed over for the next holder.
    let idle = up.read_timeout();
    let first = match tokio::time::timeout(idle, response.next()).await {
        Ok(Some(Ok(chunk))) => Some(chunk),
        Ok(None) => None,
        Ok(Some(Err(e))) => return Err(Failure::Broken(format!("blob body failed: {e}"))),
        Err(_) => {
            gw.knowledge.mark_unreachable(backend.idx);
            return Err(Failure::Broken(format!(
                "no blob bytes within {}ms",
                idle.as_millis()
            )));
        }
    };
    Ok(stream(gw, response, first, idle, backend, digest))
}

/// Streams a backend's blob answer to the client, starting with the `first` chunk already
/// read. A backend that then sends nothing for `idle` ends the stream (the client sees a
/// short body and retries): nothing waits on a stalled backend forever.
fn stream(
    gw: &Gateway,
    response: Response,
    first: Option<Bytes>,
    idle: Duration,
    backend: &Backend,
    digest: &Digest,
) -> HttpResponse {
    let mut out = HttpResponse::build(response.status());
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_RANGE,
        header::ACCEPT_RANGES,
        header::ETAG,
    ] {
        if let Some(v) = response.headers().get(&name) {
            out.insert_header((name, v.clone()));
        }
    }
    out.insert_header((DIGEST_HEADER, digest.as_str()))
        .insert_header((BACKEND_HEADER, &*backend.id));
    if let Some(len) = content_length(&response) {
        out.no_chunking(len);
    }
    let proxied = gw.metrics.proxied_bytes.with_label_values(&[&backend.id]);
    let id = backend.id.clone();
    let rest = futures_util::stream::unfold(Some(response), move |state| {
        let id = id.clone();
        async move {
            let mut response = state?;
            match tokio::time::timeout(idle, response.next()).await {
                Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(response))),
                Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e.to_string())), None)),
                Ok(None) => None,
                Err(_) => {
                    tracing::warn!(
                        backend = &*id,
                        idle_ms = idle.as_millis() as u64,
                        "backend stalled mid-blob; ending the stream"
                    );
                    let stalled =
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "backend stalled");
                    Some((Err(stalled), None))
                }
            }
        }
    });
    let body = futures_util::stream::iter(first.map(Ok)).chain(rest);
    out.streaming(body.inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            proxied.inc_by(bytes.len() as u64);
        }
    }))
}

fn redirect(url: &str, backend: &Backend) -> HttpResponse {
    HttpResponse::TemporaryRedirect()
        .insert_header((header::LOCATION, url))
        .insert_header((BACKEND_HEADER, &*backend.id))
        .finish()
}

/// The absolute URL a backend redirected to.
fn location(backend: &Backend, response: &Response) -> Result<String, Failure> {
    let raw = header_str(response.headers(), header::LOCATION)
        .ok_or_else(|| Failure::Broken("redirect without Location".into()))?;
    crate::upstream::redirect_target(&backend.base, raw).map_err(Failure::Broken)
}

/// Whether `url` carries a signature that makes it good only for whoever it was made for:
/// S3 and ECR (`X-Amz-Signature`), CloudFront as used by Quay (`Signature`), Google Cloud
/// Storage (`X-Goog-Signature`), Azure SAS as used by GHCR (`sig`), Docker Hub's Cloudflare
/// (`verify`), Akamai tokens (`hdnts`, `__token__`). A private org's clients are sent only
/// to such URLs.
pub fn carries_signature(url: &str) -> bool {
    const SIGNATURES: [&str; 7] = [
        "x-amz-signature",
        "signature",
        "x-goog-signature",
        "sig",
        "verify",
        "hdnts",
        "__token__",
    ];
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    parsed
        .query_pairs()
        .any(|(k, v)| !v.is_empty() && SIGNATURES.iter().any(|s| k.eq_ignore_ascii_case(s)))
}

/// How long a pre-signed URL may be handed out: `cap`, or less when the URL says it
/// expires sooner (S3 `X-Amz-Date` + `X-Amz-Expires`, CloudFront/GCS `Expires`). Half of
/// the remaining lifetime is kept in reserve for the client's own fetch. `None`: don't cache.
pub fn presigned_lifetime(url: &str, cap: Duration, now: SystemTime) -> Option<Duration> {
    let parsed = url::Url::parse(url).ok()?;
    let now_s = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    let mut remaining: Option<u64> = None;
    let mut amz_date = None;
    let mut amz_expires = None;
    for (k, v) in parsed.query_pairs() {
        match k.to_ascii_lowercase().as_str() {
            "x-amz-date" => amz_date = parse_amz_date(&v),
            "x-amz-expires" => amz_expires = v.parse::<u64>().ok(),
            "expires" => remaining = v.parse::<u64>().ok().map(|at| at.saturating_sub(now_s)),
            _ => {}
        }
    }
    if let (Some(signed), Some(expires)) = (amz_date, amz_expires) {
        // Both come from the backend: a huge X-Amz-Expires must not overflow.
        remaining = Some(signed.saturating_add(expires).saturating_sub(now_s));
    }
    let good_for = match remaining {
        Some(secs) => Duration::from_secs(secs / 2).min(cap),
        None => cap,
    };
    (good_for >= Duration::from_secs(1)).then_some(good_for)
}

/// `20240102T030405Z` as Unix seconds.
fn parse_amz_date(s: &str) -> Option<u64> {
    if s.len() != 16 || !s.ends_with('Z') || s.as_bytes()[8] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    Some(days_from_civil(y as i64, m, d)? * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u64, d: u64) -> Option<u64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_signed_urls_count_as_signed() {
        for signed in [
            "https://prod.s3.amazonaws.com/x/data?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20231114T221320Z&X-Amz-Expires=1200&X-Amz-Signature=ab12",
            "https://cdn.quay.io/sha256/ab/x?Expires=1700000000&Signature=Zm9v&Key-Pair-Id=K1",
            "https://storage.googleapis.com/b/x?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=ab12",
            "https://pkg-containers.githubusercontent.com/ghcr1/blobs/sha256:ab?se=2026-12-03T15%3A00%3A00Z&sig=Zm9v&sv=2019-12-12",
            "https://production.cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/sha256/ab/x/data?verify=1700000000-Zm9v",
        ] {
            assert!(carries_signature(signed), "{signed}");
        }
        for unsigned in [
            "http://127.0.0.1:5001/docker/registry/v2/blobs/sha256/ab/x/data",
            "https://cdn.example.org/x?Expires=1700000000",
            "https://cdn.example.org/x?sig=",
            "https://cdn.example.org/x?signature_hint=1",
            "not a url?sig=1",
        ] {
            assert!(!carries_signature(unsigned), "{unsigned}");
        }
    }

    #[test]
    fn presigned_lifetimes() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let cap = Duration::from_secs(300);
        assert_eq!(presigned_lifetime("http://cdn/x", cap, now), Some(cap));
        let expires = format!("http://cdn/x?Expires={}", 1_700_000_000 + 120);
        assert_eq!(
            presigned_lifetime(&expires, cap, now),
            Some(Duration::from_secs(60))
        );
        let past = format!("http://cdn/x?Expires={}", 1_700_000_000 - 5);
        assert_eq!(presigned_lifetime(&past, cap, now), None);
        // 2023-11-14T22:13:20Z is 1_700_000_000.
        let s3 = "http://s3/x?X-Amz-Date=20231114T221320Z&X-Amz-Expires=1200";
        assert_eq!(
            presigned_lifetime(s3, cap, now),
            Some(Duration::from_secs(300))
        );
        let s3_short = "http://s3/x?X-Amz-Date=20231114T221320Z&X-Amz-Expires=60";
        assert_eq!(
            presigned_lifetime(s3_short, cap, now),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn presigned_lifetimes_survive_extreme_values() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let cap = Duration::from_secs(300);
        let max = u64::MAX;
        for (url, want) in [
            (
                format!("http://s3/x?X-Amz-Date=20231114T221320Z&X-Amz-Expires={max}"),
                Some(cap),
            ),
            (
                format!("http://s3/x?X-Amz-Date=99991231T235959Z&X-Amz-Expires={max}"),
                Some(cap),
            ),
            (
                "http://s3/x?X-Amz-Date=20231114T221320Z&X-Amz-Expires=1".into(),
                None,
            ),
            // Before 1970: not a date it can use, so only the cap applies.
            (
                "http://s3/x?X-Amz-Date=00000101T000000Z&X-Amz-Expires=60".into(),
                Some(cap),
            ),
            (
                "http://s3/x?X-Amz-Date=20231114T221320Z&X-Amz-Expires=-1".into(),
                Some(cap),
            ),
            (format!("http://cdn/x?Expires={max}"), Some(cap)),
            (
                "http://cdn/x?Expires=99999999999999999999999".into(),
                Some(cap),
            ),
            ("http://cdn/x?Expires=0".into(), None),
        ] {
            assert_eq!(presigned_lifetime(&url, cap, now), want, "{url}");
        }
        let far = UNIX_EPOCH + Duration::from_secs(i64::MAX as u64 / 2);
        let url = format!("http://s3/x?X-Amz-Date=20231114T221320Z&X-Amz-Expires={max}");
        assert_eq!(presigned_lifetime(&url, cap, far), Some(cap));
    }

    #[test]
    fn amz_dates() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("20231114T221320Z"), Some(1_700_000_000));
        assert_eq!(parse_amz_date("2023-11-14"), None);
    }
}
