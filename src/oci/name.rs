//! Repository names and tags, with the grammar of the OCI distribution spec.
//!
//! A `RepoName` also knows its org: the first path component, which selects the policy
//! that serves it (`acme/app` belongs to org `acme`).

use std::fmt;

/// Longest repository name accepted; clients cap `host/name` at 255 characters.
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag the spec allows.
pub const MAX_TAG_LEN: usize = 128;

/// Shared text: a clone (a cache key) costs no allocation.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RepoName(std::sync::Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("repository name component '{0}' does not match [a-z0-9]+((.|_|__|-+)[a-z0-9]+)*")]
    BadComponent(String),
    #[error("repository name needs an org and a repository: <org>/<repository>")]
    NoOrg,
}

impl RepoName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        for component in s.split('/') {
            if !is_component(component) {
                return Err(NameError::BadComponent(component.to_owned()));
            }
        }
        if !s.contains('/') {
            return Err(NameError::NoOrg);
        }
        Ok(RepoName(s.into()))
    }

    /// The first path component: the org whose policy serves this repository.
    pub fn org(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(org, _)| org)
    }

    /// Everything after the org: `app` in `acme/app`, `tools/lint` in `acme/tools/lint`.
    pub fn path_in_org(&self) -> &str {
        self.0.split_once('/').map_or("", |(_, rest)| rest)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_component(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or any number of '-'.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoName({})", self.0)
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Tag(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tag '{0}' does not match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
pub struct TagError(pub String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, TagError> {
        let bytes = s.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
        let rest_ok = bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if first_ok && rest_ok && bytes.len() <= MAX_TAG_LEN {
            Ok(Tag(s.into()))
        } else {
            Err(TagError(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names() {
        for name in [
            "acme/app",
            "acme/tools/lint",
            "a/b",
            "my-org/my__app",
            "org/a.b_c--d",
            "org0/x1",
            "acme/a---b",
        ] {
            assert!(RepoName::parse(name).is_ok(), "{name}");
        }
        let n = RepoName::parse("acme/tools/lint").unwrap();
        assert_eq!(n.org(), "acme");
        assert_eq!(n.path_in_org(), "tools/lint");
    }

    #[test]
    fn rejects_bad_names() {
        let cases = [
            ("", NameError::Empty),
            ("app", NameError::NoOrg),
            ("Acme/app", NameError::BadComponent("Acme".into())),
            ("acme//app", NameError::BadComponent("".into())),
            ("acme/app/", NameError::BadComponent("".into())),
            ("acme/-app", NameError::BadComponent("-app".into())),
            ("acme/a___b", NameError::BadComponent("a___b".into())),
            ("acme/a._b", NameError::BadComponent("a._b".into())),
            ("acme/app.", NameError::BadComponent("app.".into())),
            ("acme/ap p", NameError::BadComponent("ap p".into())),
        ];
        for (input, want) in cases {
            assert_eq!(RepoName::parse(input).unwrap_err(), want, "{input:?}");
        }
        let long = format!("acme/{}", "a".repeat(MAX_NAME_LEN));
        assert_eq!(RepoName::parse(&long).unwrap_err(), NameError::TooLong);
    }

    #[test]
    fn tags_follow_the_grammar() {
        for tag in [
            "1.0",
            "latest",
            "_x",
            "v1.2.3-rc.1",
            "A_b",
            &"a".repeat(128),
        ] {
            assert!(Tag::parse(tag).is_ok(), "{tag}");
        }
        for tag in ["", ".hidden", "-x", "a:b", "a/b", &"a".repeat(129), "ü"] {
            assert!(Tag::parse(tag).is_err(), "{tag}");
        }
    }
}
