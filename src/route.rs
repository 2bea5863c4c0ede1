//! Parsing request paths of the distribution API into typed routes.
//!
//! Repository names contain slashes, so the operation is found from the end of the path:
//! `/v2/<name>/manifests/<reference>`, `/v2/<name>/blobs/<digest>`, `/v2/<name>/tags/list`,
//! `/v2/<name>/referrers/<digest>`.

use crate::api_error::ApiError;
use crate::oci::{Digest, Reference, ReferenceError, RepoName};

#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Base,
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    Blob {
        name: RepoName,
        digest: Digest,
    },
    Tags {
        name: RepoName,
    },
    Referrers {
        name: RepoName,
        digest: Digest,
    },
}

impl Route {
    pub fn name(&self) -> Option<&RepoName> {
        match self {
            Route::Base => None,
            Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::Tags { name }
            | Route::Referrers { name, .. } => Some(name),
        }
    }

    /// A low-cardinality label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::Tags { .. } => "tags",
            Route::Referrers { .. } => "referrers",
        }
    }
}

/// `None` when the path is not under `/v2`; otherwise the route or the OCI error that
/// explains why the path is wrong.
pub fn parse(path: &str) -> Option<Result<Route, ApiError>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Ok(Route::Base));
    }
    let rest = rest.strip_prefix('/')?;
    Some(parse_repo_path(rest))
}

fn parse_repo_path(rest: &str) -> Result<Route, ApiError> {
    let unknown = || ApiError::NameUnknown(format!("no such API path: /v2/{rest}"));
    if rest.contains("/blobs/uploads") {
        return Err(ApiError::Unsupported(
            "this registry is read-only: push to a backend registry".into(),
        ));
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Route::Tags {
            name: RepoName::parse(name)?,
        });
    }
    // The operation keyword is the second-to-last segment.
    let (head, arg) = rest.rsplit_once('/').ok_or_else(unknown)?;
    let (name, op) = head.rsplit_once('/').ok_or_else(unknown)?;
    match op {
        "manifests" => {
            let name = RepoName::parse(name)?;
            // A reference that is neither a tag nor a digest names no manifest: 404, as the
            // distribution registry answers and the conformance suite (v1.1) requires.
            let reference = Reference::parse(arg).map_err(|e| match e {
                ReferenceError::Tag(e) => ApiError::ManifestUnknown(format!("{arg} ({e})")),
                digest => ApiError::from(digest),
            })?;
            Ok(Route::Manifest { name, reference })
        }
        "blobs" => {
            let name = RepoName::parse(name)?;
            Ok(Route::Blob {
                name,
                digest: Digest::parse(arg)?,
            })
        }
        "referrers" => {
            let name = RepoName::parse(name)?;
            Ok(Route::Referrers {
                name,
                digest: Digest::parse(arg)?,
            })
        }
        _ => Err(unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn ok(path: &str) -> Route {
        parse(path).unwrap().unwrap()
    }

    fn err_code(path: &str) -> &'static str {
        parse(path).unwrap().unwrap_err().code()
    }

    #[test]
    fn parses_every_route() {
        assert_eq!(ok("/v2/"), Route::Base);
        assert_eq!(ok("/v2"), Route::Base);
        assert_eq!(ok("/v2/acme/app/manifests/1.0").kind(), "manifest");
        assert_eq!(
            ok(&format!("/v2/acme/app/manifests/{D}")).kind(),
            "manifest"
        );
        assert_eq!(
            ok(&format!("/v2/acme/deep/app/blobs/{D}"))
                .name()
                .unwrap()
                .as_str(),
            "acme/deep/app"
        );
        assert_eq!(ok("/v2/acme/app/tags/list").kind(), "tags");
        assert_eq!(
            ok(&format!("/v2/acme/app/referrers/{D}")).kind(),
            "referrers"
        );
        // A repository may itself be called "manifests".
        assert_eq!(
            ok("/v2/acme/manifests/manifests/1")
                .name()
                .unwrap()
                .as_str(),
            "acme/manifests"
        );
        assert!(parse("/healthz").is_none());
    }

    #[test]
    fn bad_paths_get_oci_errors() {
        assert_eq!(err_code("/v2/ACME/app/manifests/1.0"), "NAME_INVALID");
        assert_eq!(err_code("/v2/app/manifests/1.0"), "NAME_INVALID");
        assert_eq!(err_code("/v2/acme/app/manifests/-bad"), "MANIFEST_UNKNOWN");
        assert_eq!(
            err_code("/v2/acme/app/manifests/sha256:123"),
            "DIGEST_INVALID"
        );
        assert_eq!(err_code("/v2/acme/app/blobs/sha256:xyz"), "DIGEST_INVALID");
        assert_eq!(err_code("/v2/acme/app/blobs/md5:abc"), "DIGEST_INVALID");
        assert_eq!(err_code("/v2/acme/app/blobs/uploads/"), "UNSUPPORTED");
        assert_eq!(err_code("/v2/acme/app/whatever/x"), "NAME_UNKNOWN");
        assert_eq!(err_code("/v2/acme"), "NAME_UNKNOWN");
    }
}
