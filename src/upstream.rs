//! Calls to backend registries: URLs, credentials, the Bearer challenge flow and token
//! caching. Redirects are never followed here: a backend's redirect is an answer the
//! caller inspects (that is how pre-signed blob URLs are resolved).
//!
//! One `Upstream` per worker thread (awc clients are not `Send`); the token and challenge
//! caches are shared by all workers through `AuthCache`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::{Method, StatusCode};
use base64::Engine as _;
use moka::sync::Cache;

use crate::config::UpstreamSettings;
use crate::model::BackendIdx;
use crate::topology::{Backend, Credentials};

pub type Response = awc::ClientResponse<actix_web::dev::Decompress<actix_web::dev::Payload>>;

pub const USER_AGENT: &str = concat!("regatta/", env!("CARGO_PKG_VERSION"));

/// Largest manifest or JSON document read from a backend (the spec's suggested limit).
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("backend {backend}: {reason}")]
    Unreachable { backend: Arc<str>, reason: String },
    #[error("backend {backend}: token service failed: {reason}")]
    Token { backend: Arc<str>, reason: String },
    #[error("backend {backend}: reading the response failed: {reason}")]
    Body { backend: Arc<str>, reason: String },
}

/// How a backend asked to be authenticated, learned from its first 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Tokens and challenges, shared by every worker of a node.
pub struct AuthCache {
    challenges: Cache<BackendIdx, Challenge>,
    tokens: Cache<(BackendIdx, String), (Arc<str>, Instant)>,
}

impl AuthCache {
    pub fn new() -> Self {
        AuthCache {
            challenges: Cache::builder()
                .time_to_live(Duration::from_secs(3600))
                .build(),
            tokens: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
        }
    }
}

impl Default for AuthCache {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Upstream {
    client: awc::Client,
    auth: Arc<AuthCache>,
    /// Longest wait for body bytes from a backend (see `UpstreamSettings::read_timeout`).
    read_timeout: Duration,
}

/// A request to a backend for one repository: the path after the base URL and the
/// headers to send.
pub struct Call<'a> {
    pub method: Method,
    pub path: String,
    /// Backend repository the call needs pull access to; `None` for `/v2/`.
    pub repo: Option<&'a str>,
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
    /// Leave the body as the backend sent it (blobs are passed through untouched).
    pub raw: bool,
}

impl<'a> Call<'a> {
    pub fn new(method: Method, path: String, repo: Option<&'a str>) -> Self {
        Call {
            method,
            path,
            repo,
            headers: Vec::new(),
            raw: false,
        }
    }

    pub fn header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl Upstream {
    pub fn new(settings: &UpstreamSettings, auth: Arc<AuthCache>) -> Self {
        // No pool-wide limit: a backend that stalls must not hold connections another
        // backend needs. Every call is bounded by the timeouts and the request deadline.
        let connector = awc::Connector::new()
            .timeout(settings.connect_timeout)
            .limit(0);
        let client = awc::Client::builder()
            .connector(connector)
            .timeout(settings.request_timeout)
            .disable_redirects()
            .no_default_headers()
            .add_default_header((header::USER_AGENT, USER_AGENT))
            .finish();
        Upstream {
            client,
            auth,
            read_timeout: settings.read_timeout,
        }
    }

    /// Longest wait for body bytes from a backend: the whole body of a document (manifest,
    /// token, list), or the gap between two chunks of a streamed blob.
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    /// Sends `call` to `backend`, answering its authentication challenge once when it
    /// asks for one. A 401 that survives the challenge is returned as is.
    pub async fn send(
        &self,
        backend: &Backend,
        call: &Call<'_>,
    ) -> Result<Response, UpstreamError> {
        let scope = call.repo.map(|r| format!("repository:{r}:pull"));
        let auth = self.authorization(backend, scope.as_deref(), false).await?;
        let response = self.send_once(backend, call, auth.as_ref()).await?;
        if response.status() != StatusCode::UNAUTHORIZED || backend.credentials_are_static() {
            return Ok(response);
        }
        let Some(challenge) = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge)
        else {
            return Ok(response);
        };
        let learned = self.auth.challenges.get(&backend.idx).as_ref() != Some(&challenge);
        self.auth.challenges.insert(backend.idx, challenge);
        // A token we sent may have been revoked early: fetch a fresh one and try once more.
        let retry = self
            .authorization(backend, scope.as_deref(), !learned)
            .await?;
        if retry.is_none() || retry == auth {
            return Ok(response);
        }
        self.send_once(backend, call, retry.as_ref()).await
    }

    /// Sends `call` with no credentials at all (used to learn how a backend treats
    /// anonymous clients).
    pub async fn send_anonymous(
        &self,
        backend: &Backend,
        call: &Call<'_>,
    ) -> Result<Response, UpstreamError> {
        self.send_once(backend, call, None).await
    }

    /// A GET to a URL outside any backend's API (a pre-signed URL); no credentials.
    pub fn get_absolute(&self, url: &str) -> awc::ClientRequest {
        self.client.get(url).no_decompress()
    }

    async fn send_once(
        &self,
        backend: &Backend,
        call: &Call<'_>,
        auth: Option<&HeaderValue>,
    ) -> Result<Response, UpstreamError> {
        let url = format!("{}{}", backend.base, call.path);
        let request = || {
            let mut request = self.client.request(call.method.clone(), &url);
            for (name, value) in &call.headers {
                request = request.append_header((name.clone(), value.clone()));
            }
            if let Some(value) = auth {
                request = request.insert_header((header::AUTHORIZATION, value.clone()));
            }
            if call.raw {
                request = request.no_decompress();
            }
            request
        };
        let failed = |e: awc::error::SendRequestError| UpstreamError::Unreachable {
            backend: backend.id.clone(),
            reason: e.to_string(),
        };
        let span = tracing::info_span!(
            "backend_call",
            backend = &*backend.id,
            http.method = %call.method,
            http.target = %call.path,
        );
        let attempt = async {
            // The call's own span is the parent the backend sees in `traceparent`.
            let trace = crate::telemetry::trace_headers();
            let with_trace = |mut request: awc::ClientRequest| {
                for (k, v) in &trace {
                    request = request.insert_header((k.as_str(), v.as_str()));
                }
                request
            };
            // A document's body must arrive within the read timeout; a blob streamed
            // through (raw) is watched chunk by chunk instead (`gateway::blobs`).
            let bounded = |response: Response| {
                if call.raw {
                    response
                } else {
                    response.timeout(self.read_timeout)
                }
            };
            match with_trace(request()).send().await {
                Ok(response) => Ok(bounded(response)),
                // A pooled keep-alive connection the backend had already closed, or a
                // connection lost on the way: the calls are all GET or HEAD, so one retry on a
                // fresh connection is safe. A refused connection or a timeout is an answer.
                Err(e) if !is_definitive(&e) => {
                    tracing::debug!(backend = &*backend.id, error = %e, "retrying on a fresh connection");
                    with_trace(request())
                        .send()
                        .await
                        .map(bounded)
                        .map_err(failed)
                }
                Err(e) => Err(failed(e)),
            }
        };
        tracing::Instrument::instrument(attempt, span).await
    }

    /// The `Authorization` value for a call needing `scope`, if the backend wants one.
    async fn authorization(
        &self,
        backend: &Backend,
        scope: Option<&str>,
        refresh: bool,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        if let Credentials::StaticToken(token) = &backend.credentials {
            return Ok(bearer(token));
        }
        match self.auth.challenges.get(&backend.idx) {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(match &backend.credentials {
                Credentials::Basic { username, password } => basic(username, password),
                _ => None,
            }),
            Some(Challenge::Bearer { realm, service }) => {
                let scope = scope.unwrap_or("");
                let key = (backend.idx, scope.to_owned());
                if !refresh {
                    if let Some((token, until)) = self.auth.tokens.get(&key) {
                        if until > Instant::now() {
                            return Ok(bearer(&token));
                        }
                    }
                }
                let (token, lifetime) = tracing::Instrument::instrument(
                    self.fetch_token(backend, &realm, service.as_deref(), scope),
                    tracing::info_span!("token_fetch", backend = &*backend.id, scope),
                )
                .await?;
                self.auth
                    .tokens
                    .insert(key, (token.clone(), Instant::now() + lifetime));
                Ok(bearer(&token))
            }
        }
    }

    /// Asks the backend's token service for a token, with the backend's credentials when
    /// it has them (anonymous otherwise, as Docker Hub and GHCR allow for public images).
    async fn fetch_token(
        &self,
        backend: &Backend,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(Arc<str>, Duration), UpstreamError> {
        let token_error = |reason: String| UpstreamError::Token {
            backend: backend.id.clone(),
            reason,
        };
        let mut url =
            url::Url::parse(realm).map_err(|e| token_error(format!("realm '{realm}': {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            if !scope.is_empty() {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.client.get(url.as_str());
        if let Credentials::Basic { username, password } = &backend.credentials {
            if let Some(value) = basic(username, password) {
                request = request.insert_header((header::AUTHORIZATION, value));
            }
        }
        let response = request
            .send()
            .await
            .map_err(|e| token_error(e.to_string()))?;
        if !response.status().is_success() {
            return Err(token_error(format!(
                "{} answered {}",
                realm,
                response.status()
            )));
        }
        let mut response = response.timeout(self.read_timeout);
        let body: TokenResponse = response
            .json()
            .limit(64 * 1024)
            .await
            .map_err(|e| token_error(format!("unreadable token response: {e}")))?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| token_error("token response has no token".into()))?;
        Ok((token.into(), token_lifetime(body.expires_in)))
    }
}

/// Whether reading a body failed because the backend stopped sending within the read
/// timeout (as opposed to a broken connection or a body too large).
pub fn timed_out(e: &awc::error::PayloadError) -> bool {
    matches!(e, awc::error::PayloadError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

/// Whether a failed call says the backend cannot be reached (as opposed to a connection that
/// broke and may work again at once).
fn is_definitive(e: &awc::error::SendRequestError) -> bool {
    use awc::error::{ConnectError, SendRequestError};
    match e {
        SendRequestError::Timeout => true,
        SendRequestError::Connect(ConnectError::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
        ),
        SendRequestError::Connect(ConnectError::Disconnected) => false,
        SendRequestError::Connect(_) => true,
        _ => false,
    }
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// How long to reuse a token: its stated lifetime (60 s when unstated, as the token spec
/// says) less a margin, so that no request carries a token about to expire.
fn token_lifetime(expires_in: Option<u64>) -> Duration {
    let secs = expires_in.unwrap_or(60).max(1);
    let margin = (secs / 10).clamp(1, 30);
    Duration::from_secs(secs.saturating_sub(margin).max(1))
}

impl Backend {
    fn credentials_are_static(&self) -> bool {
        matches!(self.credentials, Credentials::StaticToken(_))
    }
}

fn bearer(token: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("Bearer {token}")).ok()
}

fn basic(username: &str, password: &str) -> Option<HeaderValue> {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    HeaderValue::from_str(&format!("Basic {encoded}")).ok()
}

/// Parses a `WWW-Authenticate` value: `Basic realm="x"` or
/// `Bearer realm="https://auth/token",service="registry",scope="..."`.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, params) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    for (key, val) in auth_params(params) {
        match key.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(val),
            "service" => service = Some(val),
            _ => {}
        }
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
    })
}

/// `key="quoted, value",key2=token` pairs.
fn auth_params(mut s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        let Some((key, rest)) = s.split_once('=') else {
            return out;
        };
        let key = key.trim().to_owned();
        let rest = rest.trim_start();
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            out.push((key, value));
            s = &quoted[end.min(quoted.len())..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            out.push((key, rest[..end].trim().to_owned()));
            s = &rest[end..];
        }
    }
}

/// A header's value when it is present and visible ASCII.
pub fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        let c = parse_challenge(r#"bearer realm="http://127.0.0.1:1/token?a=b,c", service=reg"#);
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/token?a=b,c".into(),
                service: Some("reg".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge("Bearer service=x"),
            None,
            "realm is required"
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn token_lifetime_keeps_a_margin() {
        assert_eq!(token_lifetime(None), Duration::from_secs(54));
        assert_eq!(token_lifetime(Some(300)), Duration::from_secs(270));
        assert_eq!(token_lifetime(Some(3600)), Duration::from_secs(3570));
        assert_eq!(token_lifetime(Some(1)), Duration::from_secs(1));
    }
}
