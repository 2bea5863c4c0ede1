//! The OCI distribution grammar and wire vocabulary: names, tags, digests, references,
//! media types and error codes. Pure types; no I/O.

mod digest;
mod name;

pub use digest::{Algorithm, Digest, DigestError};
pub use name::{NameError, RepoName, Tag, TagError};

/// A manifest reference from a URL: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

impl Reference {
    /// A reference with a ':' can only be a digest; anything else must be a tag.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if s.contains(':') {
            Ok(Reference::Digest(Digest::parse(s)?))
        } else {
            Ok(Reference::Tag(Tag::parse(s)?))
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

pub mod media {
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// What the gateway asks backends for when the client named nothing.
    pub const ALL_MANIFESTS: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

    /// Whether `media_type` names a list of manifests (OCI index, Docker manifest list).
    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_LIST
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_is_tag_or_digest() {
        assert!(matches!(Reference::parse("1.0"), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(Reference::parse(&d), Ok(Reference::Digest(_))));
        assert!(matches!(
            Reference::parse("sha256:zz"),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            Reference::parse("-bad"),
            Err(ReferenceError::Tag(_))
        ));
    }
}
