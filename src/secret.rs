//! Secrets in memory: passwords and tokens that must never reach a log line, an error
//! message, an admin answer or a `Debug` dump. `Secret` has no `Display`, and its `Debug`
//! prints a fixed placeholder; the value is read only through `expose()`, at the one place
//! that sends it. `redact_url` is for every URL that is printed.

use std::fmt;

/// A password or token. Compares by value; prints as `Secret(***)`.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the request that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Constant-time comparison: the time taken does not depend on where the values differ.
pub fn same_bytes(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        diff |= (given.get(i).copied().unwrap_or(0) ^ e) as usize;
    }
    diff == 0
}

/// `url` with its user information replaced by `***` (`http://***@host/`: a user name
/// can be a token too); text that does not parse as a URL loses whatever stands between
/// `://` and an `@` in its authority.
pub fn redact_url(url: &str) -> String {
    if let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.username().is_empty() && parsed.password().is_none() {
            return url.to_owned();
        }
        if parsed.set_password(None).is_ok() && parsed.set_username("***").is_ok() {
            return parsed.to_string();
        }
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{:?}", Some(&s)), "Some(Secret(***))");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("http://alice:hunter2@registry.example:5000/"),
            "http://***@registry.example:5000/"
        );
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("http://127.0.0.1:5000"), "http://127.0.0.1:5000");
        // Not a URL the parser takes (bad port), still redacted.
        let bad = redact_url("http://alice:hunter2@host:99999999/x");
        assert!(!bad.contains("hunter2"), "{bad}");
        assert_eq!(bad, "http://***@host:99999999/x");
        assert_eq!(redact_url("no url here"), "no url here");
    }
}
