//! The operator's API on its own listener, behind a bearer token: backends (health,
//! drain, weight), org policies, cache purges. Every change is written to the store,
//! announced to every node, applied here at once, and logged as one audit line.
//!
//! The OpenAPI description is `docs/admin-api.openapi.json`, served at
//! `/admin/v1/openapi.json`.

use std::sync::Arc;

use actix_web::body::{BoxBody, EitherBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::gateway::Gateway;
use crate::model::{Health, OrgPolicy, RobotRecord};
use crate::oci::{Digest, RepoName};
use crate::store::{AdminChange, EVENT_RESYNC};
use crate::topology::Org;

pub const OPENAPI: &str = include_str!("../docs/admin-api.openapi.json");

/// Published to every node when caches must forget something.
pub const EVENT_PURGE_PREFIX: &str = "purge ";

pub struct AdminToken(pub String);

pub fn configure(cfg: &mut web::ServiceConfig) {
    // Scraped by Prometheus without the token: the admin listener is an internal address.
    cfg.route("/metrics", web::get().to(metrics));
    cfg.service(
        web::scope("/admin/v1")
            .wrap(actix_web::middleware::from_fn(require_token))
            .route("/openapi.json", web::get().to(openapi))
            .route("/backends", web::get().to(list_backends))
            .route("/backends/{id}", web::get().to(get_backend))
            .route("/backends/{id}/drain", web::post().to(drain))
            .route("/backends/{id}/undrain", web::post().to(undrain))
            .route("/backends/{id}/weight", web::put().to(set_weight))
            .route("/orgs", web::get().to(list_orgs))
            .route("/orgs/{name}", web::get().to(get_org))
            .route("/orgs/{name}", web::put().to(put_org))
            .route("/orgs/{name}", web::delete().to(delete_org))
            .route("/robots", web::get().to(list_robots))
            .route("/robots", web::post().to(create_robot))
            .route("/robots/{name}", web::delete().to(revoke_robot))
            .route("/purge", web::post().to(purge))
            .route("/node", web::get().to(node))
            .route("/node/drain", web::post().to(node_drain))
            .route("/node/undrain", web::post().to(node_undrain)),
    );
}

use crate::secret::same_bytes as same_token;

async fn require_token(
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<EitherBody<BoxBody>>, actix_web::Error> {
    let expected = req
        .app_data::<web::Data<AdminToken>>()
        .map(|t| t.0.clone())
        .unwrap_or_default();
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if expected.is_empty() || !same_token(given.as_bytes(), expected.as_bytes()) {
        tracing::warn!(target: "regatta::audit", path = req.path(), peer = ?req.peer_addr(), "admin call refused: bad or missing token");
        let response = HttpResponse::Unauthorized()
            .insert_header(("WWW-Authenticate", "Bearer realm=\"regatta-admin\""))
            .json(json!({ "error": "a valid bearer token is required" }));
        return Ok(req.into_response(response).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": message.into() }))
}

fn unavailable(e: impl std::fmt::Display) -> HttpResponse {
    tracing::warn!(error = %e, "admin change refused: store unavailable");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the shared store is unavailable, nothing was changed: {e}"),
    )
}

fn audit(req: &HttpRequest, action: &str, subject: &str, detail: &str) {
    if let Some(gw) = req.app_data::<web::Data<Gateway>>() {
        gw.metrics.admin_changes.with_label_values(&[action]).inc();
    }
    tracing::info!(target: "regatta::audit", action, subject, detail, peer = ?req.peer_addr(), "admin change");
}

/// The Prometheus exposition, with state gauges read from the snapshot now.
async fn metrics(gw: web::Data<Gateway>) -> HttpResponse {
    let snapshot = gw.state.load();
    gw.metrics.clear_backend_health();
    for (b, live) in gw.topology.backends.iter().zip(&snapshot.backends) {
        // Every region's view; a backend no region has probed yet is presumed up here.
        let own = live
            .views
            .is_empty()
            .then_some((gw.topology.region.as_str(), live.health));
        let views = live.views.iter().map(|(r, rec)| (r.as_str(), rec.state));
        gw.metrics.set_backend(
            &b.id,
            &b.region,
            own.into_iter().chain(views),
            live.drained,
            live.latency_us as f64 / 1e6,
        );
    }
    for (name, org) in &snapshot.orgs {
        let available = org
            .backends
            .iter()
            .filter(|&&b| {
                !snapshot.backends[b].drained && snapshot.backends[b].health != Health::Down
            })
            .count();
        gw.metrics
            .org_available_backends
            .with_label_values(&[name])
            .set(available as i64);
    }
    gw.metrics
        .snapshot_age_seconds
        .set(gw.state.age().as_secs_f64());
    let errors = gw.store.error_count();
    let counted = gw.metrics.store_errors.get();
    if errors > counted {
        gw.metrics.store_errors.inc_by(errors - counted);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(gw.metrics.render())
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

#[derive(Serialize)]
struct BackendView {
    id: String,
    url: String,
    region: String,
    delivery: &'static str,
    health: Health,
    /// `draining` when drained, else the health state.
    status: &'static str,
    latency_ms: f64,
    weight: u32,
    drained: bool,
    checked_at_ms: Option<u64>,
    checked_by: Option<String>,
    reason: Option<String>,
    health_by_region: std::collections::BTreeMap<String, Health>,
}

fn backend_view(gw: &Gateway, idx: usize) -> BackendView {
    let b = gw.topology.backend(idx);
    let snapshot = gw.state.load();
    let live = &snapshot.backends[idx];
    let status = match (live.drained, live.health) {
        (true, _) => "draining",
        (false, Health::Up) => "up",
        (false, Health::Degraded) => "degraded",
        (false, Health::Down) => "down",
    };
    BackendView {
        id: b.id.to_string(),
        url: b.base.clone(),
        region: b.region.clone(),
        delivery: gw
            .knowledge
            .delivery(b.delivery, idx)
            .map_or("auto", |d| d.as_str()),
        health: live.health,
        status,
        latency_ms: live.latency_us as f64 / 1000.0,
        weight: live.weight,
        drained: live.drained,
        checked_at_ms: live.record.as_ref().map(|r| r.checked_at_ms),
        checked_by: live.record.as_ref().map(|r| r.node.clone()),
        reason: live
            .record
            .as_ref()
            .map(|r| r.reason.clone())
            .filter(|r| !r.is_empty()),
        health_by_region: live
            .views
            .iter()
            .map(|(region, record)| (region.clone(), record.state))
            .collect(),
    }
}

/// This node's readiness: what `/readyz` answers and why.
fn node_view(gw: &Gateway) -> serde_json::Value {
    let r = &gw.readiness;
    json!({
        "node": r.node_id,
        "ready": r.not_ready().is_none(),
        "reason": r.not_ready(),
        "drained": r.drained(),
        "shutting_down": r.shutting_down(),
        "drain_file": r.drain_file().map(|f| f.display().to_string()),
    })
}

async fn node(gw: web::Data<Gateway>) -> HttpResponse {
    HttpResponse::Ok().json(node_view(&gw))
}

/// Takes this node (only) out of rotation: `/readyz` answers 503 and whatever announces the
/// node (a load balancer, BGP) withdraws it; requests that still arrive are served.
async fn node_drain(req: HttpRequest, gw: web::Data<Gateway>) -> HttpResponse {
    if gw.readiness.set_drained(true) {
        audit(&req, "node-drain", &gw.readiness.node_id, "");
    }
    HttpResponse::Ok().json(node_view(&gw))
}

async fn node_undrain(req: HttpRequest, gw: web::Data<Gateway>) -> HttpResponse {
    if gw.readiness.set_drained(false) {
        audit(&req, "node-undrain", &gw.readiness.node_id, "");
    }
    HttpResponse::Ok().json(node_view(&gw))
}

async fn list_backends(gw: web::Data<Gateway>) -> HttpResponse {
    let all: Vec<BackendView> = (0..gw.topology.backends.len())
        .map(|i| backend_view(&gw, i))
        .collect();
    HttpResponse::Ok().json(json!({ "backends": all }))
}

fn backend_idx(gw: &Gateway, id: &str) -> Result<usize, Box<HttpResponse>> {
    gw.topology
        .index_of(id)
        .ok_or_else(|| Box::new(error(StatusCode::NOT_FOUND, format!("no backend '{id}'"))))
}

async fn get_backend(gw: web::Data<Gateway>, id: web::Path<String>) -> HttpResponse {
    match backend_idx(&gw, &id) {
        Ok(idx) => HttpResponse::Ok().json(backend_view(&gw, idx)),
        Err(r) => *r,
    }
}

/// Changes the backend's decision in the store in one atomic step (a change made through
/// another node meanwhile is kept), announces it, and applies the result locally.
async fn change_backend(
    req: &HttpRequest,
    gw: &Gateway,
    id: &str,
    action: &str,
    change: AdminChange,
) -> HttpResponse {
    let idx = match backend_idx(gw, id) {
        Ok(idx) => idx,
        Err(r) => return *r,
    };
    let state = match gw.store.update_admin_state(id, change).await {
        Ok(state) => state,
        Err(e) => return unavailable(e),
    };
    gw.state
        .apply_admin(idx, gw.topology.backend(idx).weight, &state);
    if let Err(e) = gw.store.publish(EVENT_RESYNC).await {
        tracing::warn!(error = %e, "change saved but not announced; nodes pick it up on their next refresh");
    }
    audit(req, action, id, &format!("{state:?}"));
    HttpResponse::Ok().json(backend_view(gw, idx))
}

async fn drain(req: HttpRequest, gw: web::Data<Gateway>, id: web::Path<String>) -> HttpResponse {
    change_backend(&req, &gw, &id, "drain", AdminChange::Drained(true)).await
}

async fn undrain(req: HttpRequest, gw: web::Data<Gateway>, id: web::Path<String>) -> HttpResponse {
    change_backend(&req, &gw, &id, "undrain", AdminChange::Drained(false)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    /// `null` returns to the configured weight.
    weight: Option<u32>,
}

async fn set_weight(
    req: HttpRequest,
    gw: web::Data<Gateway>,
    id: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let body: WeightBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be {{\"weight\": N}}: {e}"),
            )
        }
    };
    change_backend(
        &req,
        &gw,
        &id,
        "set-weight",
        AdminChange::Weight(body.weight),
    )
    .await
}

fn org_json(name: &str, policy: &OrgPolicy) -> serde_json::Value {
    let mut out = serde_json::to_value(policy).unwrap_or_else(|_| json!({}));
    out["name"] = json!(name);
    out
}

async fn list_orgs(gw: web::Data<Gateway>) -> HttpResponse {
    match gw.store.policies().await {
        Ok(all) => {
            let mut names: Vec<&String> = all.keys().collect();
            names.sort();
            let orgs: Vec<_> = names.into_iter().map(|n| org_json(n, &all[n])).collect();
            HttpResponse::Ok().json(json!({ "orgs": orgs }))
        }
        Err(e) => unavailable(e),
    }
}

async fn get_org(gw: web::Data<Gateway>, name: web::Path<String>) -> HttpResponse {
    match gw.store.policies().await {
        Ok(all) => match all.get(name.as_str()) {
            Some(p) => HttpResponse::Ok().json(org_json(&name, p)),
            None => error(StatusCode::NOT_FOUND, format!("no org '{name}'")),
        },
        Err(e) => unavailable(e),
    }
}

async fn put_org(
    req: HttpRequest,
    gw: web::Data<Gateway>,
    name: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let policy: OrgPolicy = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid org policy: {e}")),
    };
    if gw.topology.upstreams.group(&name).is_some() {
        return error(
            StatusCode::CONFLICT,
            format!("'{name}' names an upstream group of this node ([[upstreams]]); an org cannot have that name"),
        );
    }
    if let Err(reason) = Org::from_policy(&name, &policy, &gw.topology) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid org policy: {reason}"),
        );
    }
    if let Some(reason) = private_org_problem(&gw, &policy) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid org policy: {reason}"),
        );
    }
    if let Err(e) = gw.store.put_policy(&name, &policy).await {
        return unavailable(e);
    }
    announce_and_reload(&gw).await;
    audit(&req, "put-org", &name, &format!("{policy:?}"));
    HttpResponse::Ok().json(org_json(&name, &policy))
}

/// Why this node cannot serve `policy` as a private org, if it cannot (the same rules as
/// the configuration check).
fn private_org_problem(gw: &Gateway, policy: &OrgPolicy) -> Option<String> {
    if policy.access.is_public() {
        return None;
    }
    if !gw.tokens.issues_tokens() {
        return Some("access: a private org needs auth.signing_key on every node".into());
    }
    policy.backends.iter().find_map(|id| {
        let b = gw.topology.index_of(id).map(|i| gw.topology.backend(i))?;
        (b.delivery == crate::model::Delivery::Direct).then(|| {
            format!(
                "access: backend '{id}' delivers blobs direct, to a URL anyone can fetch \
                 without the gateway; a private org's backends need resolve, proxy or auto"
            )
        })
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRobot {
    name: String,
    /// Globs over whole repository names (`acme/*`).
    repositories: Vec<String>,
    /// How long the robot works (`90d`); forever when absent.
    #[serde(default, with = "humantime_serde")]
    expires_in: Option<std::time::Duration>,
    #[serde(default)]
    description: String,
}

fn robot_json(r: &RobotRecord) -> serde_json::Value {
    let now = crate::model::unix_ms(std::time::SystemTime::now());
    json!({
        "name": r.name,
        "username": format!("{}{}", crate::auth::ROBOT_LOGIN_PREFIX, r.name),
        "repositories": r.repositories,
        "description": r.description,
        "created_at_ms": r.created_at_ms,
        "expires_at_ms": r.expires_at_ms,
        "expired": r.expired(now),
    })
}

async fn list_robots(gw: web::Data<Gateway>) -> HttpResponse {
    match gw.store.robots().await {
        Ok(all) => {
            let mut robots: Vec<&RobotRecord> = all.values().collect();
            robots.sort_by(|a, b| a.name.cmp(&b.name));
            let robots: Vec<_> = robots.into_iter().map(robot_json).collect();
            HttpResponse::Ok().json(json!({ "robots": robots }))
        }
        Err(e) => unavailable(e),
    }
}

/// Creates a robot and answers its secret, the only time it is shown.
async fn create_robot(req: HttpRequest, gw: web::Data<Gateway>, body: web::Bytes) -> HttpResponse {
    let new: NewRobot = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid robot: {e}")),
    };
    let expires_at_ms = match new.expires_in {
        None => None,
        Some(d) if d.is_zero() => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid robot: expires_in must be longer than 0s",
            )
        }
        Some(d) => Some(
            crate::model::unix_ms(std::time::SystemTime::now())
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        ),
    };
    let (record, secret) =
        crate::auth::new_robot(&new.name, new.repositories, expires_at_ms, new.description);
    if let Some((field, why)) = record.problems().first() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid robot: {field}: {why}"),
        );
    }
    match gw.store.create_robot(&record).await {
        Ok(true) => {}
        Ok(false) => {
            return error(
                StatusCode::CONFLICT,
                format!("robot '{}' exists; revoke it first", record.name),
            )
        }
        Err(e) => return unavailable(e),
    }
    announce_and_reload(&gw).await;
    audit(
        &req,
        "create-robot",
        &record.name,
        &record.repositories.join(","),
    );
    let mut out = robot_json(&record);
    out["secret"] = json!(secret);
    HttpResponse::Created().json(out)
}

async fn revoke_robot(
    req: HttpRequest,
    gw: web::Data<Gateway>,
    name: web::Path<String>,
) -> HttpResponse {
    match gw.store.delete_robot(&name).await {
        Ok(true) => {
            announce_and_reload(&gw).await;
            audit(&req, "revoke-robot", &name, "");
            HttpResponse::NoContent().finish()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no robot '{name}'")),
        Err(e) => unavailable(e),
    }
}

async fn delete_org(
    req: HttpRequest,
    gw: web::Data<Gateway>,
    name: web::Path<String>,
) -> HttpResponse {
    match gw.store.delete_policy(&name).await {
        Ok(true) => {
            announce_and_reload(&gw).await;
            audit(&req, "delete-org", &name, "");
            HttpResponse::NoContent().finish()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no org '{name}'")),
        Err(e) => unavailable(e),
    }
}

async fn announce_and_reload(gw: &Gateway) {
    if let Err(e) = gw.store.publish(EVENT_RESYNC).await {
        tracing::warn!(error = %e, "change saved but not announced");
    }
    if let Err(e) = gw.state.reload(&gw.topology, &*gw.store).await {
        tracing::warn!(error = %e, "change saved but this node could not reload yet");
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Forget which backends hold this digest (every repository), its cached manifest
    /// and its pre-signed URLs.
    #[serde(default)]
    pub digest: Option<Digest>,
    /// Forget this repository's tag resolutions.
    #[serde(default)]
    pub repository: Option<String>,
}

async fn purge(req: HttpRequest, gw: web::Data<Gateway>, body: web::Bytes) -> HttpResponse {
    let request: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid purge request: {e}"),
            )
        }
    };
    let repo = match request
        .repository
        .as_deref()
        .map(RepoName::parse)
        .transpose()
    {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("repository: {e}")),
    };
    if request.digest.is_none() && repo.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "name a digest, a repository, or both",
        );
    }
    let removed = match gw.store.purge(request.digest.as_ref(), repo.as_ref()).await {
        Ok(n) => n,
        Err(e) => return unavailable(e),
    };
    gw.knowledge.purge(request.digest.as_ref(), repo.as_ref());
    let event = format!(
        "{EVENT_PURGE_PREFIX}{}",
        serde_json::to_string(&request).unwrap_or_default()
    );
    if let Err(e) = gw.store.publish(&event).await {
        tracing::warn!(error = %e, "purge done here but not announced to other nodes");
    }
    audit(
        &req,
        "purge",
        request.repository.as_deref().unwrap_or(""),
        &format!("{:?}", request.digest),
    );
    HttpResponse::Ok().json(json!({ "removed": removed }))
}

/// Applies a purge another node announced.
pub fn apply_event(gw: &Arc<Gateway>, event: &str) {
    if let Some(json) = event.strip_prefix(EVENT_PURGE_PREFIX) {
        if let Ok(request) = serde_json::from_str::<PurgeRequest>(json) {
            let repo = request
                .repository
                .as_deref()
                .and_then(|r| RepoName::parse(r).ok());
            gw.knowledge.purge(request.digest.as_ref(), repo.as_ref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(same_token(b"secret-token-123", b"secret-token-123"));
        assert!(!same_token(b"secret-token-124", b"secret-token-123"));
        assert!(!same_token(b"secret-token-12", b"secret-token-123"));
        assert!(!same_token(b"secret-token-1234", b"secret-token-123"));
        assert!(!same_token(b"", b"secret-token-123"));
    }

    #[test]
    fn openapi_document_is_json() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    }
}
