//! Token signing keys: a PEM private key (EC P-256, Ed25519 or RSA) signs the tokens this
//! node issues; it and the previous keys of a rotation verify tokens any node issued.
//! Each key is named in the token header by `kid`, a fingerprint of its public half.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::KeyPair as _;
use serde::{de::DeserializeOwned, Serialize};

/// One key pair: what signs, what verifies, and its name.
pub struct SigningKey {
    pub kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// The key in a PEM file: PKCS#8 (`openssl genpkey`) EC P-256 or Ed25519, or RSA
    /// (PKCS#8 or PKCS#1).
    pub fn from_pem(pem: &[u8]) -> Result<SigningKey, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::PrivateKeyDer;
        let der = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| format!("holds no PEM private key ({e})"))?;
        let rng = ring::rand::SystemRandom::new();
        let (algorithm, encoding, public) = match &der {
            PrivateKeyDer::Pkcs8(k) => {
                let bytes = k.secret_pkcs8_der();
                if let Ok(pair) = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(bytes)
                {
                    (
                        Algorithm::EdDSA,
                        EncodingKey::from_ed_der(bytes),
                        pair.public_key().as_ref().to_vec(),
                    )
                } else if let Ok(pair) = ring::signature::EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    bytes,
                    &rng,
                ) {
                    (
                        Algorithm::ES256,
                        EncodingKey::from_ec_der(bytes),
                        pair.public_key().as_ref().to_vec(),
                    )
                } else if let Ok(pair) = ring::signature::RsaKeyPair::from_pkcs8(bytes) {
                    (
                        Algorithm::RS256,
                        EncodingKey::from_rsa_pem(pem).map_err(|e| e.to_string())?,
                        pair.public().as_ref().to_vec(),
                    )
                } else {
                    return Err("is not an EC P-256, Ed25519 or RSA (2048+ bits) key".into());
                }
            }
            PrivateKeyDer::Pkcs1(k) => {
                let pair = ring::signature::RsaKeyPair::from_der(k.secret_pkcs1_der())
                    .map_err(|e| format!("is not a usable RSA key: {e}"))?;
                (
                    Algorithm::RS256,
                    EncodingKey::from_rsa_der(k.secret_pkcs1_der()),
                    pair.public().as_ref().to_vec(),
                )
            }
            PrivateKeyDer::Sec1(_) => {
                return Err("is an EC key in SEC1 form: convert it with \
                     `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.p8`"
                    .into())
            }
            _ => return Err("is not a key type regatta can sign with".into()),
        };
        let decoding = match algorithm {
            Algorithm::EdDSA => DecodingKey::from_ed_der(&public),
            Algorithm::ES256 => DecodingKey::from_ec_der(&public),
            _ => DecodingKey::from_rsa_der(&public),
        };
        let kid = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&public))[..16].to_owned();
        Ok(SigningKey {
            kid,
            algorithm,
            encoding,
            decoding,
        })
    }
}

/// Why a token was not accepted. The text is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token was signed by a key this registry does not know")]
    UnknownKey,
    #[error("the token was issued for another service")]
    WrongService,
    #[error("the token is not valid yet")]
    NotYetValid,
}

/// The current key (signs and verifies) and the previous ones (verify only).
#[derive(Debug)]
pub struct KeySet {
    current: SigningKey,
    previous: Vec<SigningKey>,
}

/// Clock difference between nodes tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

impl KeySet {
    pub fn new(current: SigningKey, previous: Vec<SigningKey>) -> KeySet {
        KeySet { current, previous }
    }

    pub fn sign<C: Serialize>(&self, claims: &C) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(self.current.algorithm);
        header.kid = Some(self.current.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &self.current.encoding)
    }

    /// The claims of `token` when one of the keys signed it for `service` and it is
    /// within its lifetime.
    pub fn verify<C: DeserializeOwned>(&self, token: &str, service: &str) -> Result<C, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| header.kid.as_deref() == Some(k.kid.as_str()))
            .ok_or(TokenError::UnknownKey)?;
        if header.alg != key.algorithm {
            return Err(TokenError::BadSignature);
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[service]);
        validation.set_issuer(&[service]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        match jsonwebtoken::decode::<C>(token, &key.decoding, &validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                jsonwebtoken::errors::ErrorKind::InvalidAudience
                | jsonwebtoken::errors::ErrorKind::InvalidIssuer => TokenError::WrongService,
                _ => TokenError::Malformed,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::{json, Value};

    fn pem(der: &[u8]) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        )
        .into_bytes()
    }

    fn ec_key() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        SigningKey::from_pem(&pem(doc.as_ref())).unwrap()
    }

    fn ed_key() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        SigningKey::from_pem(&pem(doc.as_ref())).unwrap()
    }

    fn claims(service: &str, exp_offset: i64) -> Value {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        json!({ "iss": service, "aud": service, "sub": "alice", "exp": now + exp_offset, "nbf": now - 1 })
    }

    #[test]
    fn tokens_verify_across_a_rotation_and_nothing_else_does() {
        let old = KeySet::new(ec_key(), Vec::new());
        let old_token = old.sign(&claims("svc", 300)).unwrap();
        let fresh = ed_key();
        let fresh_kid = fresh.kid.clone();
        // The old key moved to previous_keys: its tokens still verify, new ones are EdDSA.
        let old_again = {
            let KeySet { current, .. } = old;
            current
        };
        let rotated = KeySet::new(fresh, vec![old_again]);
        let v: Value = rotated.verify(&old_token, "svc").unwrap();
        assert_eq!(v["sub"], "alice");
        let new_token = rotated.sign(&claims("svc", 300)).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&new_token)
                .unwrap()
                .kid
                .as_deref(),
            Some(fresh_kid.as_str())
        );
        assert!(rotated.verify::<Value>(&new_token, "svc").is_ok());

        let expired = rotated.sign(&claims("svc", -120)).unwrap();
        assert_eq!(
            rotated.verify::<Value>(&expired, "svc").unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(
            rotated.verify::<Value>(&new_token, "other").unwrap_err(),
            TokenError::WrongService
        );
        let (head, rest) = new_token.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let forged_body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(
                &json!({"iss":"svc","aud":"svc","sub":"root","exp":4_000_000_000u64}),
            )
            .unwrap(),
        );
        let tampered = format!("{head}.{forged_body}.{sig}");
        assert_eq!(
            rotated.verify::<Value>(&tampered, "svc").unwrap_err(),
            TokenError::BadSignature
        );
        let stranger = KeySet::new(ec_key(), Vec::new())
            .sign(&claims("svc", 300))
            .unwrap();
        assert_eq!(
            rotated.verify::<Value>(&stranger, "svc").unwrap_err(),
            TokenError::UnknownKey
        );
        assert_eq!(
            rotated.verify::<Value>("not-a-jwt", "svc").unwrap_err(),
            TokenError::Malformed
        );
    }

    #[test]
    fn keys_that_cannot_sign_are_refused_with_a_reason() {
        assert!(SigningKey::from_pem(b"nothing here")
            .unwrap_err()
            .contains("PEM"));
        let sec1 = b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----\n";
        let err = SigningKey::from_pem(sec1).unwrap_err();
        assert!(err.contains("SEC1") || err.contains("PEM"), "{err}");
    }
}
