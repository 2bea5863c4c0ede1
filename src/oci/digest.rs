//! Content digests (`algorithm:hex`) as the OCI distribution spec defines them.
//!
//! Only the registered algorithms `sha256` and `sha512` are accepted: a digest the gateway
//! cannot verify is a digest it must not serve.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated digest. The string form is kept so that formatting it costs nothing on the
/// request path, and shared, so that a clone (a cache key) costs no allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    text: std::sync::Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest has no ':' between algorithm and encoded part")]
    MissingSeparator,
    #[error("digest algorithm '{0}' is not supported (sha256, sha512)")]
    UnsupportedAlgorithm(String),
    #[error("digest algorithm '{0}' is malformed")]
    MalformedAlgorithm(String),
    #[error("{algorithm} digest must be {expected} lowercase hex characters")]
    BadEncoding {
        algorithm: &'static str,
        expected: usize,
    },
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let (alg, encoded) = s.split_once(':').ok_or(DigestError::MissingSeparator)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other if is_algorithm_grammar(other) => {
                return Err(DigestError::UnsupportedAlgorithm(other.to_owned()))
            }
            other => return Err(DigestError::MalformedAlgorithm(other.to_owned())),
        };
        let lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        if encoded.len() != algorithm.hex_len() || !encoded.as_bytes().iter().all(lower_hex) {
            return Err(DigestError::BadEncoding {
                algorithm: algorithm.as_str(),
                expected: algorithm.hex_len(),
            });
        }
        Ok(Digest {
            algorithm,
            text: s.into(),
        })
    }

    /// The digest of `bytes` under `algorithm`.
    pub fn compute(algorithm: Algorithm, bytes: &[u8]) -> Self {
        let hex = match algorithm {
            Algorithm::Sha256 => hex::encode(Sha256::digest(bytes)),
            Algorithm::Sha512 => hex::encode(Sha512::digest(bytes)),
        };
        Digest {
            algorithm,
            text: format!("{}:{hex}", algorithm.as_str()).into(),
        }
    }

    /// Whether `bytes` hash to this digest.
    pub fn verifies(&self, bytes: &[u8]) -> bool {
        Digest::compute(self.algorithm, bytes) == *self
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn hex(&self) -> &str {
        &self.text[self.algorithm.as_str().len() + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// `[a-z0-9]+([+._-][a-z0-9]+)*`
fn is_algorithm_grammar(s: &str) -> bool {
    !s.is_empty()
        && s.split(['+', '.', '_', '-']).all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.text)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn computes_known_answer() {
        assert_eq!(
            Digest::compute(Algorithm::Sha256, b"").as_str(),
            EMPTY_SHA256
        );
        let d = Digest::compute(Algorithm::Sha512, b"");
        assert!(d.as_str().starts_with("sha512:cf83e1357eefb8bd"));
        assert!(d.verifies(b""));
        assert!(!d.verifies(b"x"));
    }

    #[test]
    fn parses_valid_digests() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.hex().len(), 64);
        assert_eq!(d.to_string(), EMPTY_SHA256);
        let sha512 = format!("sha512:{}", "a".repeat(128));
        assert_eq!(
            Digest::parse(&sha512).unwrap().algorithm(),
            Algorithm::Sha512
        );
    }

    #[test]
    fn rejects_malformed_digests() {
        let cases = [
            ("sha256", DigestError::MissingSeparator),
            ("md5:abc", DigestError::UnsupportedAlgorithm("md5".into())),
            (
                "SHA256:abc",
                DigestError::MalformedAlgorithm("SHA256".into()),
            ),
            (":abc", DigestError::MalformedAlgorithm("".into())),
            (
                "sha256:abc",
                DigestError::BadEncoding {
                    algorithm: "sha256",
                    expected: 64,
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Digest::parse(input).unwrap_err(), want, "{input}");
        }
        let upper = EMPTY_SHA256.to_uppercase().replace("SHA256", "sha256");
        assert!(
            Digest::parse(&upper).is_err(),
            "uppercase hex is not canonical"
        );
        let short512 = format!("sha512:{}", "a".repeat(64));
        assert!(Digest::parse(&short512).is_err());
    }
}
