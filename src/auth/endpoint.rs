//! `/token`: the distribution token spec's endpoint. `GET` with optional Basic
//! credentials and `service`, `scope`, `account`; `POST` with the OAuth2 password grant
//! (containerd asks it first). Both answer the subset of the asked scope the caller may
//! have: an anonymous caller gets the public part, never an error. No refresh tokens.

use std::time::{Instant, SystemTime};

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError as _};
use base64::Engine as _;
use serde_json::json;

use super::{parse_scopes, Principal, Requested, ResourceActions, TokenService};
use crate::api_error::ApiError;
use crate::gateway::Gateway;
use crate::model::unix_ms;

/// What a token request asks, however it came.
struct TokenRequest {
    credentials: Option<(String, String)>,
    service: Option<String>,
    account: Option<String>,
    scopes: Vec<String>,
}

pub async fn token_get(req: HttpRequest, gw: web::Data<Gateway>) -> HttpResponse {
    let result = match basic_credentials(&req) {
        Ok(credentials) => {
            let mut request = TokenRequest {
                credentials,
                service: None,
                account: None,
                scopes: Vec::new(),
            };
            for (k, v) in url::form_urlencoded::parse(req.query_string().as_bytes()) {
                match &*k {
                    "service" => request.service = Some(v.into_owned()),
                    "account" => request.account = Some(v.into_owned()),
                    "scope" => request.scopes.push(v.into_owned()),
                    _ => {}
                }
            }
            issue(&gw, request, client(&req)).await
        }
        Err(e) => Err(e),
    };
    answer(&gw, &req, result)
}

pub async fn token_post(
    req: HttpRequest,
    gw: web::Data<Gateway>,
    body: web::Bytes,
) -> HttpResponse {
    let result = match post_request(&req, &body) {
        Ok(request) => issue(&gw, request, client(&req)).await,
        Err(e) => Err(e),
    };
    answer(&gw, &req, result)
}

fn post_request(req: &HttpRequest, body: &[u8]) -> Result<TokenRequest, ApiError> {
    let form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return Err(ApiError::InvalidRequest(
            "POST /token takes an application/x-www-form-urlencoded body".into(),
        ));
    }
    let mut grant = None;
    let (mut username, mut password) = (None, None);
    let mut request = TokenRequest {
        credentials: None,
        service: None,
        account: None,
        scopes: Vec::new(),
    };
    for (k, v) in url::form_urlencoded::parse(body) {
        match &*k {
            "grant_type" => grant = Some(v.into_owned()),
            "username" => username = Some(v.into_owned()),
            "password" => password = Some(v.into_owned()),
            "service" => request.service = Some(v.into_owned()),
            "scope" => request.scopes.push(v.into_owned()),
            _ => {}
        }
    }
    match grant.as_deref() {
        Some("password") => {}
        Some("refresh_token") => {
            return Err(ApiError::InvalidRequest(
                "unsupported_grant_type: this service issues no refresh tokens; use \
                 grant_type=password or GET /token"
                    .into(),
            ))
        }
        Some(other) => {
            let shown: String = other.chars().take(40).collect();
            return Err(ApiError::InvalidRequest(format!(
                "unsupported_grant_type '{shown}': use grant_type=password"
            )));
        }
        None => {
            return Err(ApiError::InvalidRequest(
                "grant_type is missing: use grant_type=password".into(),
            ))
        }
    }
    match (username, password) {
        (Some(u), Some(p)) => request.credentials = Some((u, p)),
        _ => {
            return Err(ApiError::InvalidRequest(
                "the password grant needs username and password".into(),
            ))
        }
    }
    Ok(request)
}

/// `Authorization: Basic ...`, if any; anything else in that header is refused.
fn basic_credentials(req: &HttpRequest) -> Result<Option<(String, String)>, ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        Err(ApiError::InvalidRequest(format!(
            "Authorization header: {why}"
        )))
    };
    let Ok(value) = value.to_str() else {
        return bad("not ASCII");
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return bad("expected 'Basic <base64 of user:password>'");
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return bad("the token endpoint takes Basic credentials");
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return bad("malformed Basic credentials (not base64)");
    };
    let Ok(text) = String::from_utf8(decoded) else {
        return bad("malformed Basic credentials (not UTF-8)");
    };
    let Some((user, password)) = text.split_once(':') else {
        return bad("malformed Basic credentials (no ':' between user and password)");
    };
    if user.is_empty() {
        return bad("malformed Basic credentials (empty user name)");
    }
    Ok(Some((user.to_owned(), password.to_owned())))
}

fn client(req: &HttpRequest) -> Option<std::net::IpAddr> {
    req.peer_addr().map(|a| a.ip())
}

async fn issue(
    gw: &Gateway,
    request: TokenRequest,
    client: Option<std::net::IpAddr>,
) -> Result<HttpResponse, ApiError> {
    let tokens: &TokenService = &gw.tokens;
    if let Some(service) = &request.service {
        if *service != tokens.service {
            let shown: String = service.chars().take(80).collect();
            return Err(ApiError::InvalidRequest(format!(
                "this token service is '{}', not '{shown}'",
                tokens.service
            )));
        }
    }
    let requested = parse_scopes(request.scopes.iter().map(String::as_str))
        .map_err(ApiError::InvalidRequest)?;
    let snapshot = gw.state.load_full();
    let now = unix_ms(SystemTime::now());
    let principal = match &request.credentials {
        None => Principal::Anonymous,
        Some((user, password)) => {
            if let Some(account) = &request.account {
                if account != user {
                    return Err(ApiError::InvalidRequest(
                        "account does not match the credentials' user".into(),
                    ));
                }
            }
            // A client past its allowance of failed logins is not verified at all (no
            // password is checked for it) until the allowance returns.
            let blocked = gw.login_limiter.check(client, Instant::now()).err();
            let verified = match blocked {
                None => tokens.authenticate(&snapshot, user, password, now).await,
                Some(_) => None,
            };
            match verified {
                Some(p) => p,
                None => {
                    if blocked.is_none() {
                        let _ = gw.login_limiter.spend(client, Instant::now());
                    }
                    // Credentials that do not verify: anonymous for public content (mirror
                    // clients send whatever they have), refused for a login or anything
                    // private.
                    let private = requested.iter().any(|r| match r {
                        Requested::Repository { name, .. } => snapshot
                            .orgs
                            .get(name.org())
                            .is_some_and(|o| !o.policy.access.is_public()),
                        Requested::Other(_) => false,
                    });
                    if requested.is_empty() || private {
                        if let Some(wait) = blocked {
                            tracing::info!(user = %user, "token refused: too many failed logins");
                            return Err(ApiError::TooManyRequests(wait));
                        }
                        tracing::info!(user = %user, "token refused: credentials do not verify");
                        return Err(ApiError::Unauthorized {
                            message: "incorrect username or password".into(),
                            challenge: format!("Basic realm=\"{}\"", tokens.service),
                        });
                    }
                    Principal::Anonymous
                }
            }
        }
    };
    let mut access: Vec<ResourceActions> = Vec::new();
    for r in &requested {
        let Requested::Repository { name, actions } = r else {
            continue;
        };
        let wants_pull = actions.iter().any(|a| a == "pull" || a == "*");
        let listed = access.iter().any(|a| a.name == name.as_str());
        if wants_pull && !listed && tokens.may_pull(&snapshot, &principal, name, now) {
            access.push(ResourceActions {
                kind: "repository".into(),
                name: name.as_str().to_owned(),
                actions: vec!["pull".into()],
            });
        }
    }
    let scope: Vec<String> = access
        .iter()
        .map(|a| format!("repository:{}:pull", a.name))
        .collect();
    let (token, issued) = tokens.mint(&principal, access)?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({
            "token": token,
            "access_token": token,
            "expires_in": tokens.ttl.as_secs(),
            "issued_at": humantime::format_rfc3339_seconds(issued).to_string(),
            "scope": scope.join(" "),
        })))
}

/// The answer, counted as route `token`.
fn answer(gw: &Gateway, req: &HttpRequest, result: Result<HttpResponse, ApiError>) -> HttpResponse {
    let response = result.unwrap_or_else(|e| e.error_response());
    gw.metrics
        .requests
        .with_label_values(&[
            "token",
            crate::metrics::method_label(req.method()),
            response.status().as_str(),
            "-",
        ])
        .inc();
    response
}
