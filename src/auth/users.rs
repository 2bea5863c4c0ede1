//! Users from an htpasswd file of bcrypt entries (`htpasswd -B`). bcrypt is slow on
//! purpose; a verified username and password are remembered for a minute (by a SHA-256 of
//! both and the entry), so a client fetching a token per repository pays it once.

use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

/// How long a verified password is remembered.
const VERIFIED_FOR: Duration = Duration::from_secs(60);

pub struct Users {
    hashes: HashMap<String, String>,
    verified: moka::sync::Cache<[u8; 32], ()>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("count", &self.hashes.len())
            .finish_non_exhaustive()
    }
}

impl Users {
    pub fn empty() -> Users {
        Users::from_map(HashMap::new())
    }

    fn from_map(hashes: HashMap<String, String>) -> Users {
        Users {
            hashes,
            verified: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(VERIFIED_FOR)
                .build(),
        }
    }

    /// Parses `user:$2y$...` lines (blank lines and `#` comments are skipped); errors name
    /// the line.
    pub fn parse(text: &str) -> Result<Users, String> {
        let mut hashes = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("line {n}: not user:hash"))?;
            if user.is_empty() || user.contains('$') {
                return Err(format!("line {n}: '{user}' is not a user name (no '$')"));
            }
            if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
                return Err(format!(
                    "line {n}: user '{user}' has no bcrypt hash (make entries with htpasswd -B)"
                ));
            }
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(format!(
                    "line {n}: user '{user}' has a malformed bcrypt hash"
                ));
            }
            if hashes.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(format!("line {n}: user '{user}' is listed twice"));
            }
        }
        Ok(Users::from_map(hashes))
    }

    pub fn contains(&self, user: &str) -> bool {
        self.hashes.contains_key(user)
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    fn memo_key(user: &str, password: &str, hash: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [user, password, hash] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().into()
    }

    /// Whether `password` was verified as `user`'s within the last minute (no bcrypt).
    pub fn remembered(&self, user: &str, password: &str) -> bool {
        self.hashes.get(user).is_some_and(|hash| {
            self.verified
                .contains_key(&Self::memo_key(user, password, hash))
        })
    }

    /// Whether `password` is `user`'s. Costs a bcrypt verification unless remembered: run
    /// it off the HTTP workers (`web::block`).
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let Some(hash) = self.hashes.get(user) else {
            // As long as a real check, so timing does not tell which users exist.
            let _ = bcrypt::verify(password, &DUMMY_HASH);
            return false;
        };
        let key = Self::memo_key(user, password, hash);
        if self.verified.contains_key(&key) {
            return true;
        }
        let ok = bcrypt::verify(password, hash).unwrap_or(false);
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }
}

/// A bcrypt hash at htpasswd -B's default cost, checked against for unknown users.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| bcrypt::hash("regatta-unknown-user", 5).unwrap_or_default());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_entries_verify() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let users = Users::parse(&format!("# team\n\nalice:{hash}\n")).unwrap();
        assert!(!users.remembered("alice", "s3cret"));
        assert!(users.verify("alice", "s3cret"));
        assert!(users.remembered("alice", "s3cret"));
        assert!(!users.remembered("alice", "other"));
        assert!(!users.verify("alice", "wrong"));
        assert!(!users.verify("bob", "s3cret"));
        assert!(Users::parse("alice:{SHA}abc")
            .unwrap_err()
            .contains("htpasswd -B"));
        assert!(Users::parse("alice").unwrap_err().contains("line 1"));
        assert!(Users::parse(&format!("a:{hash}\na:{hash}"))
            .unwrap_err()
            .contains("twice"));
    }
}
