//! The one place where failures become HTTP: OCI error codes, statuses and JSON bodies.
//!
//! 5xx bodies stay opaque; their cause goes to the log.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::oci::{DigestError, NameError, ReferenceError, TagError};

pub const API_VERSION: (&str, &str) = ("Docker-Distribution-API-Version", "registry/2.0");

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid repository name: {0}")]
    NameInvalid(#[from] NameError),
    #[error("invalid tag: {0}")]
    TagInvalid(#[from] TagError),
    #[error("invalid digest: {0}")]
    DigestInvalid(#[from] DigestError),
    #[error("repository name not known to registry: {0}")]
    NameUnknown(String),
    #[error("requested access to '{0}' is denied: this registry does not serve that org")]
    Denied(String),
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("blob unknown to registry: {0}")]
    BlobUnknown(String),
    #[error("invalid pagination parameter: {0}")]
    PaginationInvalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("no backend can serve this request now: {0}")]
    Unavailable(String),
    #[error("too many requests that need the backends from this client; retry in {}s", retry_secs(.0))]
    TooManyRequests(std::time::Duration),
    /// No token, or one that does not grant what the request needs: 401 with the
    /// `WWW-Authenticate` challenge that tells the client where to get one.
    #[error("authentication required: {message}")]
    Unauthorized { message: String, challenge: String },
    /// A token request the token service cannot take (malformed credentials or scope,
    /// another service, an unsupported grant).
    #[error("invalid token request: {0}")]
    InvalidRequest(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<ReferenceError> for ApiError {
    fn from(e: ReferenceError) -> Self {
        match e {
            ReferenceError::Tag(e) => ApiError::TagInvalid(e),
            ReferenceError::Digest(e) => ApiError::DigestInvalid(e),
        }
    }
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NameInvalid(_) => "NAME_INVALID",
            ApiError::TagInvalid(_) => "TAG_INVALID",
            ApiError::DigestInvalid(_) => "DIGEST_INVALID",
            ApiError::NameUnknown(_) => "NAME_UNKNOWN",
            ApiError::Denied(_) => "DENIED",
            ApiError::ManifestUnknown(_) => "MANIFEST_UNKNOWN",
            ApiError::BlobUnknown(_) => "BLOB_UNKNOWN",
            ApiError::PaginationInvalid(_) => "PAGINATION_NUMBER_INVALID",
            ApiError::Unsupported(_) => "UNSUPPORTED",
            ApiError::Unavailable(_) => "UNAVAILABLE",
            ApiError::TooManyRequests(_) => "TOOMANYREQUESTS",
            ApiError::Unauthorized { .. } => "UNAUTHORIZED",
            ApiError::InvalidRequest(_) => "INVALID_REQUEST",
            ApiError::Internal(_) => "UNKNOWN",
        }
    }

    /// The message a client sees; internal causes are not disclosed.
    fn message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }
}

/// Whole seconds to wait, at least one.
fn retry_secs(wait: &std::time::Duration) -> u64 {
    wait.as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
        .max(1)
}

/// Seconds a client should wait before retrying when no backend can serve.
pub const RETRY_AFTER_SECS: u32 = 5;

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NameInvalid(_)
            | ApiError::TagInvalid(_)
            | ApiError::DigestInvalid(_)
            | ApiError::PaginationInvalid(_)
            | ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Denied(_) => StatusCode::FORBIDDEN,
            ApiError::NameUnknown(_) | ApiError::ManifestUnknown(_) | ApiError::BlobUnknown(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = ?self, "request failed");
        }
        let body = json!({
            "errors": [{ "code": self.code(), "message": self.message(), "detail": null }]
        });
        let mut response = HttpResponse::build(status);
        response.insert_header(API_VERSION);
        match self {
            ApiError::Unavailable(_) => {
                response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()));
            }
            ApiError::Unsupported(_) => {
                response.insert_header((header::ALLOW, HeaderValue::from_static("GET, HEAD")));
            }
            ApiError::TooManyRequests(wait) => {
                response.insert_header((header::RETRY_AFTER, retry_secs(wait).to_string()));
            }
            ApiError::Unauthorized { challenge, .. } => {
                if let Ok(value) = HeaderValue::from_str(challenge) {
                    response.insert_header((header::WWW_AUTHENTICATE, value));
                }
            }
            _ => {}
        }
        response.json(body)
    }
}
