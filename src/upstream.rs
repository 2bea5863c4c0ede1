//! Calls to backend registries: URLs, credentials, the Bearer challenge flow and token
//! caching. Redirects are never followed here: a backend's redirect is an answer the
//! caller inspects (that is how pre-signed blob URLs are resolved).
//!
//! One `Upstream` per worker thread (awc clients are not `Send`); the token and challenge
//! caches are shared by all workers through `AuthCache`.
//!
//! Credentials leave the node only for the backend itself or for a token realm on the
//! backend's own host or a host listed in its `token_realm_hosts`, and never from an https
//! backend to an http realm (`realm_may_receive_credentials`). Every number a backend sends
//! (token lifetimes here) is used with checked or saturating arithmetic.

use std::cell::RefCell;
use std::collections::HashMap;
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
    /// Realms refused credentials, so each refusal is logged once per backend and realm.
    refused_realms: Cache<(BackendIdx, String), ()>,
    /// Token fetches in flight, so that clients asking at once cost one fetch.
    flights: crate::flights::Flights,
}

/// Bytes of backend tokens kept (tokens are JWTs of a few KB, one per repository scope).
const TOKEN_BYTES: u64 = 16 * 1024 * 1024;

impl AuthCache {
    pub fn new() -> Self {
        AuthCache {
            challenges: Cache::builder()
                .time_to_live(Duration::from_secs(3600))
                .build(),
            tokens: Cache::builder()
                .max_capacity(TOKEN_BYTES)
                .weigher(|k: &(BackendIdx, String), v: &(Arc<str>, Instant)| {
                    u32::try_from(k.1.len() + v.0.len() + 440).unwrap_or(u32::MAX)
                })
                .time_to_live(Duration::from_secs(3600))
                .build(),
            refused_realms: Cache::builder().max_capacity(1024).build(),
            flights: crate::flights::Flights::default(),
        }
    }
}

impl Default for AuthCache {
    fn default() -> Self {
        Self::new()
    }
}

/// The most of a small answer's body `finish` reads (a `/v2/` body is `{}` or an error
/// document).
const FINISH_BODY_LIMIT: usize = 64 * 1024;

/// Reads a small answer's body to its end and drops it: only then does awc put the
/// connection back in its pool (an answer dropped unread closes it).
pub async fn finish(response: &mut Response) {
    let _ = response.body().limit(FINISH_BODY_LIMIT).await;
}

pub struct Upstream {
    client: awc::Client,
    /// Blob probes and their kept connections (`head_client`).
    heads: crate::head_client::HeadClient,
    /// Clients of backends that trust a CA of their own (`tls_ca`), made on first use.
    tls_clients: RefCell<HashMap<BackendIdx, awc::Client>>,
    settings: UpstreamSettings,
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
        Upstream {
            client: make_client(settings, None),
            heads: crate::head_client::HeadClient::new(settings),
            tls_clients: RefCell::new(HashMap::new()),
            settings: settings.clone(),
            auth,
            read_timeout: settings.read_timeout,
        }
    }

    /// The client for calls to `backend` and to URLs it sends the gateway to: the shared
    /// one, or one trusting the backend's own CA.
    fn client(&self, backend: &Backend) -> awc::Client {
        let Some(tls) = &backend.tls else {
            return self.client.clone();
        };
        self.tls_clients
            .borrow_mut()
            .entry(backend.idx)
            .or_insert_with(|| make_client(&self.settings, Some(tls.clone())))
            .clone()
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
        let challenge = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok());
        match self
            .answer_challenge(backend, challenge, scope.as_deref(), auth.as_ref())
            .await?
        {
            Some(retry) => self.send_once(backend, call, Some(&retry)).await,
            None => Ok(response),
        }
    }

    /// After a 401 carrying `challenge` to a call that sent `sent`: the credentials to try
    /// once more with, if any. The challenge is learned; a token we sent may have been
    /// revoked early, so a fresh one is fetched; a call that went without one (the challenge
    /// was not known yet when it left) takes whatever token another call fetched meanwhile.
    async fn answer_challenge(
        &self,
        backend: &Backend,
        challenge: Option<&str>,
        scope: Option<&str>,
        sent: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let Some(challenge) = challenge.and_then(parse_challenge) else {
            return Ok(None);
        };
        let learned = self.auth.challenges.get(&backend.idx).as_ref() != Some(&challenge);
        self.auth.challenges.insert(backend.idx, challenge);
        let refresh = sent.is_some() && !learned;
        let retry = self.authorization(backend, scope, refresh).await?;
        Ok(retry.filter(|r| Some(r) != sent))
    }

    /// A blob probe: `HEAD {path}` on `backend` (for repository `repo`) on this worker's
    /// kept connections (`head_client`), with the credentials `send` would use, answering
    /// the backend's challenge once as `send` does.
    pub async fn probe(
        &self,
        backend: &Backend,
        path: &str,
        repo: &str,
    ) -> Result<crate::head_client::Answer, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        let auth = self.authorization(backend, Some(&scope), false).await?;
        let span = tracing::info_span!(
            "backend_call",
            backend = &*backend.id,
            http.method = "HEAD",
            http.target = path,
        );
        let attempt = |auth: Option<HeaderValue>| {
            let call = async move {
                let trace = crate::telemetry::trace_headers();
                self.heads
                    .head(backend, path, auth.as_ref(), &trace)
                    .await
                    .map_err(|reason| UpstreamError::Unreachable {
                        backend: backend.id.clone(),
                        reason,
                    })
            };
            tracing::Instrument::instrument(call, span.clone())
        };
        let answer = attempt(auth.clone()).await?;
        if answer.status != StatusCode::UNAUTHORIZED || backend.credentials_are_static() {
            return Ok(answer);
        }
        let challenge = answer.challenge.as_deref();
        match self
            .answer_challenge(backend, challenge, Some(&scope), auth.as_ref())
            .await?
        {
            Some(retry) => attempt(Some(retry)).await,
            None => Ok(answer),
        }
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

    /// Opens (or keeps open) this worker's pooled connections to `backend` (awc's and the
    /// blob probes') with an anonymous `GET /v2/` and `HEAD /v2/`, and learns the backend's authentication challenge from a 401, so that the
    /// first real call neither connects nor makes the extra round trip that discovers the
    /// challenge. Fetches no token.
    pub async fn keep_warm(&self, backend: &Backend) {
        // The probes' own kept connection too (its answer, 200 or 401, does not matter).
        let _ = self.heads.head(backend, "/v2/", None, &[]).await;
        let call = Call::new(Method::GET, "/v2/".into(), None);
        let Ok(mut response) = self.send_once(backend, &call, None).await else {
            return;
        };
        // Dropped unread, the connection was closed, and the next cold request paid a
        // connect (and the backend an accept) on the critical path.
        finish(&mut response).await;
        if response.status() != StatusCode::UNAUTHORIZED || backend.credentials_are_static() {
            return;
        }
        let challenge = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge);
        if let Some(challenge) = challenge {
            if self.auth.challenges.get(&backend.idx).as_ref() != Some(&challenge) {
                self.auth.challenges.insert(backend.idx, challenge);
            }
        }
    }

    /// A GET to a URL outside any backend's API that `backend` sent the gateway to (a
    /// pre-signed URL); no credentials.
    pub fn get_absolute(&self, backend: &Backend, url: &str) -> awc::ClientRequest {
        self.client(backend).get(url).no_decompress()
    }

    async fn send_once(
        &self,
        backend: &Backend,
        call: &Call<'_>,
        auth: Option<&HeaderValue>,
    ) -> Result<Response, UpstreamError> {
        let url = format!("{}{}", backend.base, call.path);
        let client = self.client(backend);
        let request = || {
            let mut request = client.request(call.method.clone(), &url);
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
            return Ok(bearer(token.expose()));
        }
        match self.auth.challenges.get(&backend.idx) {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(match &backend.credentials {
                Credentials::Basic { username, password } => basic(username, password.expose()),
                _ => None,
            }),
            Some(Challenge::Bearer { realm, service }) => {
                let scope = scope.unwrap_or("");
                let key = (backend.idx, scope.to_owned());
                let cached = || {
                    self.auth
                        .tokens
                        .get(&key)
                        .filter(|(_, until)| *until > Instant::now())
                        .map(|(token, _)| token)
                };
                if !refresh {
                    if let Some(token) = cached() {
                        return Ok(bearer(&token));
                    }
                }
                // Many requests needing the same new token fetch it once.
                let flight = format!("token {} {scope}", backend.idx);
                // Leader or not, look again once in (a fetch may have ended between the
                // look above and the join), unless the cached token is the rejected one.
                let lead = self.auth.flights.join(flight).await;
                if !refresh || lead.is_none() {
                    if let Some(token) = cached() {
                        return Ok(bearer(&token));
                    }
                }
                let (token, lifetime) = tracing::Instrument::instrument(
                    self.fetch_token(backend, &realm, service.as_deref(), scope),
                    tracing::info_span!("token_fetch", backend = &*backend.id, scope),
                )
                .await?;
                // `lifetime` is capped (`token_lifetime`): the sum cannot overflow.
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
        let shown = crate::secret::redact_url(realm);
        let mut url =
            url::Url::parse(realm).map_err(|e| token_error(format!("realm '{shown}': {e}")))?;
        let credentials = match &backend.credentials {
            Credentials::Basic { username, password } => basic(username, password.expose()),
            _ => None,
        };
        if credentials.is_some() {
            if let Err(reason) =
                realm_may_receive_credentials(&backend.base, &url, &backend.token_realm_hosts)
            {
                let first = self
                    .auth
                    .refused_realms
                    .entry((backend.idx, realm.to_owned()))
                    .or_insert(())
                    .is_fresh();
                if first {
                    tracing::warn!(backend = &*backend.id, realm = %shown, %reason, "credentials withheld from a token realm");
                }
                return Err(token_error(format!(
                    "credentials withheld from token realm '{shown}': {reason}"
                )));
            }
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            if !scope.is_empty() {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.client(backend).get(url.as_str());
        if let Some(value) = credentials {
            request = request.insert_header((header::AUTHORIZATION, value));
        }
        let response = request
            .send()
            .await
            .map_err(|e| token_error(e.to_string()))?;
        if !response.status().is_success() {
            return Err(token_error(format!(
                "{shown} answered {}",
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
        Ok((token.into(), token_lifetime(body.expires_in.as_ref())))
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
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    /// Any JSON value: a token service that sends a negative, fractional, huge or quoted
    /// number must not make the whole answer unreadable (`token_lifetime` decides).
    pub expires_in: Option<serde_json::Value>,
}

/// Longest a token is reused, whatever lifetime its service states (the token cache keeps
/// nothing longer either).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// How long to reuse a token: its stated lifetime (60 s when unstated or unusable, as the
/// token spec says) less a margin, so that no request carries a token about to expire;
/// at least 1 s, at most `MAX_TOKEN_LIFETIME`.
pub fn token_lifetime(expires_in: Option<&serde_json::Value>) -> Duration {
    let stated = match expires_in {
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i.max(0) as u64))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.max(0.0) as u64)
            }),
        Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    let secs = stated.unwrap_or(60).clamp(1, MAX_TOKEN_LIFETIME.as_secs());
    let margin = (secs / 10).clamp(1, 30);
    Duration::from_secs(secs.saturating_sub(margin).max(1))
}

/// Whether a token realm may receive `backend_base`'s credentials: only on the backend's
/// own host (any port) or a host in `extra_hosts` (`host`, or `host:port` for that port
/// only), and never over http when the backend is https.
pub fn realm_may_receive_credentials(
    backend_base: &str,
    realm: &url::Url,
    extra_hosts: &[String],
) -> Result<(), String> {
    let backend = url::Url::parse(backend_base).map_err(|e| format!("backend URL: {e}"))?;
    match (backend.scheme(), realm.scheme()) {
        ("https", "https") | ("http", "http" | "https") => {}
        ("https", "http") => return Err("the realm is plain http and the backend https".into()),
        (_, other) => return Err(format!("scheme '{other}' is not http or https")),
    }
    let Some(host) = realm.host_str().filter(|h| !h.is_empty()) else {
        return Err("the realm names no host".into());
    };
    if backend.host_str() == Some(host) {
        return Ok(());
    }
    let listed = extra_hosts.iter().any(|entry| {
        let Ok(allowed) = url::Url::parse(&format!("http://{entry}/")) else {
            return false;
        };
        allowed.host_str() == Some(host)
            && allowed
                .port()
                .is_none_or(|port| realm.port_or_known_default() == Some(port))
    });
    if listed {
        Ok(())
    } else {
        Err(format!(
            "host '{host}' is neither the backend's host nor in its token_realm_hosts"
        ))
    }
}

/// An awc client with the gateway's timeouts, trusting `tls` when given (the public roots
/// otherwise).
fn make_client(settings: &UpstreamSettings, tls: Option<Arc<rustls::ClientConfig>>) -> awc::Client {
    // No pool-wide limit: a backend that stalls must not hold connections another backend
    // needs. Every call is bounded by the timeouts and the request deadline.
    let mut connector = awc::Connector::new()
        .timeout(settings.connect_timeout)
        .limit(0);
    if let Some(tls) = tls {
        connector = connector.rustls_0_23(tls);
    }
    awc::Client::builder()
        .connector(connector)
        .timeout(settings.request_timeout)
        .disable_redirects()
        .no_default_headers()
        .add_default_header((header::USER_AGENT, USER_AGENT))
        .finish()
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

/// The URL of a blob on a backend: what a `direct` client is sent to. `repo` and `digest`
/// are validated names, so the result stays on the backend's scheme, host and port.
pub fn blob_url(base: &str, repo: &str, digest: &crate::oci::Digest) -> String {
    format!("{base}/v2/{repo}/blobs/{digest}")
}

/// The absolute URL a backend's redirect (`Location`, absolute or relative) points at:
/// resolved against the backend's base URL as a browser would, never pasted onto it.
pub fn redirect_target(base: &str, location: &str) -> Result<String, String> {
    let base = url::Url::parse(&format!("{base}/")).map_err(|e| e.to_string())?;
    base.join(location).map(String::from).map_err(|e| {
        let shown = crate::secret::redact_url(location);
        format!("bad Location '{shown}': {e}")
    })
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

    fn lifetime(json: &str) -> Duration {
        let body: TokenResponse = serde_json::from_str(json).unwrap();
        token_lifetime(body.expires_in.as_ref())
    }

    #[test]
    fn token_lifetime_keeps_a_margin() {
        assert_eq!(lifetime("{}"), Duration::from_secs(54));
        assert_eq!(lifetime(r#"{"expires_in": 300}"#), Duration::from_secs(270));
        assert_eq!(
            lifetime(r#"{"expires_in": 3600}"#),
            Duration::from_secs(3570)
        );
        assert_eq!(lifetime(r#"{"expires_in": 1}"#), Duration::from_secs(1));
    }

    #[test]
    fn token_lifetime_survives_extreme_values() {
        let cap = MAX_TOKEN_LIFETIME - Duration::from_secs(30);
        for (json, want) in [
            (r#"{"expires_in": 18446744073709551615}"#, cap),
            (r#"{"expires_in": 1e300}"#, cap),
            (r#"{"expires_in": 99999999999999999999999}"#, cap),
            (r#"{"expires_in": -5}"#, Duration::from_secs(1)),
            (
                r#"{"expires_in": -9223372036854775808}"#,
                Duration::from_secs(1),
            ),
            (r#"{"expires_in": 0}"#, Duration::from_secs(1)),
            (r#"{"expires_in": 12.7}"#, Duration::from_secs(11)),
            (r#"{"expires_in": "300"}"#, Duration::from_secs(270)),
            (r#"{"expires_in": "soon"}"#, Duration::from_secs(54)),
            (r#"{"expires_in": null}"#, Duration::from_secs(54)),
            (r#"{"expires_in": [1]}"#, Duration::from_secs(54)),
        ] {
            let got = lifetime(json);
            assert_eq!(got, want, "{json}");
            // The cache adds it to now: that must not overflow.
            assert!(Instant::now().checked_add(got).is_some());
        }
    }

    fn realm_ok(backend: &str, realm: &str, hosts: &[&str]) -> bool {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        realm_may_receive_credentials(backend, &url::Url::parse(realm).unwrap(), &hosts).is_ok()
    }

    #[test]
    fn credentials_go_only_to_the_backends_own_or_listed_realms() {
        // The backend's own host, any port and path.
        assert!(realm_ok(
            "http://127.0.0.1:5000",
            "http://127.0.0.1:6000/token",
            &[]
        ));
        assert!(realm_ok(
            "https://reg.example",
            "https://REG.example/token",
            &[]
        ));
        assert!(realm_ok(
            "http://reg.example",
            "https://reg.example/token",
            &[]
        ));
        // Another host, unless listed.
        assert!(!realm_ok(
            "http://127.0.0.1:5000",
            "http://127.0.0.2:5000/token",
            &[]
        ));
        assert!(!realm_ok(
            "https://registry-1.docker.io",
            "https://auth.docker.io/token",
            &[]
        ));
        assert!(realm_ok(
            "https://registry-1.docker.io",
            "https://auth.docker.io/token",
            &["auth.docker.io"]
        ));
        // A listed host:port allows that port only.
        assert!(realm_ok(
            "http://a",
            "http://127.0.0.2:7000/t",
            &["127.0.0.2:7000"]
        ));
        assert!(!realm_ok(
            "http://a",
            "http://127.0.0.2:7001/t",
            &["127.0.0.2:7000"]
        ));
        assert!(realm_ok("https://a", "https://b/t", &["b:443"]));
        // A look-alike is not the host.
        assert!(!realm_ok(
            "https://reg.example",
            "https://reg.example.evil/t",
            &[]
        ));
        assert!(!realm_ok(
            "https://reg.example",
            "https://evil/t?reg.example",
            &[]
        ));
        assert!(!realm_ok("http://[::1]:5000", "http://[::2]:5000/t", &[]));
        assert!(realm_ok("http://[::1]:5000", "http://[::1]:6000/t", &[]));
        // Never from https down to http, even on the same or a listed host.
        assert!(!realm_ok(
            "https://reg.example",
            "http://reg.example/token",
            &[]
        ));
        assert!(!realm_ok("https://a", "http://b/token", &["b"]));
        assert!(!realm_ok("https://a", "ftp://a/token", &[]));
    }

    /// Every `Location` the gateway sends a client for a blob: `blob_url` for `direct`
    /// backends, `redirect_target` for a URL a backend redirected the gateway to.
    mod locations {
        use proptest::prelude::*;

        use super::super::{blob_url, redirect_target};
        use crate::oci::{Digest, RepoName};

        fn backend_base() -> impl Strategy<Value = String> {
            let host = prop_oneof![
                Just("127.0.0.1".to_owned()),
                Just("[::1]".to_owned()),
                Just("registry-1.docker.io".to_owned()),
                "[a-z][a-z0-9-]{0,8}(\\.[a-z]{2,4}){0,2}",
            ];
            let port = prop_oneof![Just(String::new()), (1u16..).prop_map(|p| format!(":{p}"))];
            // Only what configuration accepts: a label such as `xn--` is no host (IDNA).
            (prop_oneof![Just("http"), Just("https")], host, port)
                .prop_map(|(scheme, host, port)| format!("{scheme}://{host}{port}"))
                .prop_filter("a URL configuration accepts", |base| {
                    url::Url::parse(base).is_ok()
                })
        }

        fn repo() -> impl Strategy<Value = RepoName> {
            proptest::collection::vec("[a-z0-9]{1,6}([._-][a-z0-9]{1,4}){0,2}", 2..5)
                .prop_filter_map("a valid name", |parts| {
                    RepoName::parse(&parts.join("/")).ok()
                })
        }

        fn digest() -> impl Strategy<Value = Digest> {
            "[0-9a-f]{64}".prop_map(|hex| Digest::parse(&format!("sha256:{hex}")).unwrap())
        }

        /// What a backend might put in `Location`: anything, and pieces that URL parsers
        /// treat specially (scheme-relative, backslashes, user information, dot segments).
        fn location() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                Just("/"),
                Just("//"),
                Just("\\"),
                Just("@"),
                Just(":"),
                Just("?"),
                Just("#"),
                Just(".."),
                Just("."),
                Just("%2f"),
                Just("%40"),
                Just(" "),
                Just("\t"),
                Just("http:"),
                Just("https:"),
                Just("https://"),
                Just("evil.example"),
                Just("127.0.0.2:8080"),
                Just("[::2]"),
                Just("cdn"),
                Just("x"),
                Just("user:pass"),
                Just("blobs/sha256/ab/data"),
            ];
            prop_oneof![
                any::<String>(),
                proptest::collection::vec(piece, 0..8).prop_map(|p| p.concat()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn direct_locations_stay_on_the_backend(
                base in backend_base(),
                repo in repo(),
                digest in digest(),
            ) {
                let backend = url::Url::parse(&base).unwrap();
                let location = url::Url::parse(&blob_url(&base, repo.as_str(), &digest)).unwrap();
                prop_assert_eq!(location.scheme(), backend.scheme());
                prop_assert_eq!(location.host_str(), backend.host_str());
                prop_assert_eq!(location.port_or_known_default(), backend.port_or_known_default());
                prop_assert!(location.username().is_empty() && location.password().is_none());
                prop_assert_eq!(location.path(), format!("/v2/{repo}/blobs/{digest}"));
                prop_assert!(location.query().is_none() && location.fragment().is_none());
            }

            #[test]
            fn resolved_locations_point_at_the_backend_or_where_it_said(
                base in backend_base(),
                raw in location(),
            ) {
                let backend = url::Url::parse(&base).unwrap();
                let Ok(target) = redirect_target(&base, &raw) else {
                    return Ok(());
                };
                let target = url::Url::parse(&target).expect("an absolute URL");
                // Where the same Location leads from a stand-in base of the same scheme:
                // whether the backend's answer names a host of its own.
                let probe = url::Url::parse(&format!("{}://regatta-probe.invalid/", backend.scheme()))
                    .unwrap()
                    .join(&raw)
                    .expect("resolves from the backend, so from the probe too");
                if probe.host_str() == Some("regatta-probe.invalid") {
                    prop_assert_eq!(target.scheme(), backend.scheme());
                    prop_assert_eq!(target.host_str(), backend.host_str());
                    prop_assert_eq!(target.port_or_known_default(), backend.port_or_known_default());
                    prop_assert!(target.username().is_empty() && target.password().is_none());
                } else {
                    prop_assert_eq!(target.host_str(), probe.host_str(), "{:?}", raw);
                    prop_assert_eq!(target.port(), probe.port());
                }
            }
        }
    }
}
