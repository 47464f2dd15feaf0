//! Secrets derived from the server secret: the pepper for client-secret hashes and the key that
//! seals pre-authorized codes at rest.

use aws_lc_rs::aead::{AES_256_GCM, Aad, Nonce, RandomizedNonceKey};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use issuer_domain::{Error, ids::random_token, ports::CodeSealer};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The one configured server secret. Never printed.
#[derive(Clone)]
pub struct ServerSecret(Vec<u8>);

impl std::fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerSecret(**redacted**)")
    }
}

impl ServerSecret {
    pub const MIN_LEN: usize = 32;

    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, String> {
        let bytes = bytes.into();
        if bytes.len() < Self::MIN_LEN {
            return Err(format!(
                "the server secret must be at least {} bytes",
                Self::MIN_LEN
            ));
        }
        Ok(Self(bytes))
    }

    /// A fresh random secret, base64url (for first starts of the embedded default).
    pub fn generate_text() -> String {
        random_token(32)
    }

    /// A 256-bit key for one purpose, named by `label`; distinct labels give independent keys.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Peppered HMAC-SHA256 of client secrets. Secrets are 256-bit random values, so a fast keyed
/// hash is enough: there is nothing to brute-force, and a stolen table is useless without the
/// pepper.
#[derive(Clone)]
pub struct SecretHasher {
    pepper: [u8; 32],
}

impl SecretHasher {
    pub fn new(secret: &ServerSecret) -> Self {
        Self {
            pepper: secret.derive("issuer/client-secret-pepper/v1"),
        }
    }

    fn mac(&self, secret: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.pepper).expect("HMAC takes any key length");
        mac.update(secret.as_bytes());
        mac
    }

    pub fn hash(&self, secret: &str) -> String {
        format!(
            "v1${}",
            URL_SAFE_NO_PAD.encode(self.mac(secret).finalize().into_bytes())
        )
    }

    /// Constant-time comparison against a stored hash.
    pub fn verify(&self, secret: &str, stored: &str) -> bool {
        let Some(encoded) = stored.strip_prefix("v1$") else {
            return false;
        };
        let Ok(expected) = URL_SAFE_NO_PAD.decode(encoded) else {
            return false;
        };
        self.mac(secret).verify_slice(&expected).is_ok()
    }
}

/// `cli_` + 96 random bits: public, but still unguessable.
pub fn generate_client_id() -> String {
    format!("cli_{}", random_token(12))
}

/// `cs_` + 256 random bits.
pub fn generate_client_secret() -> String {
    format!("cs_{}", random_token(32))
}

/// AES-256-GCM with random nonces; output is base64url(nonce || ciphertext || tag).
pub struct AesSealer {
    key: RandomizedNonceKey,
    mac_key: [u8; 32],
}

impl AesSealer {
    const NONCE_LEN: usize = 12;

    pub fn new(secret: &ServerSecret) -> Self {
        let key = secret.derive("issuer/offer-code-seal/v1");
        Self {
            key: RandomizedNonceKey::new(&AES_256_GCM, &key).expect("a 32-byte AES-256 key"),
            mac_key: secret.derive("issuer/code-digest/v1"),
        }
    }
}

impl CodeSealer for AesSealer {
    fn seal(&self, plaintext: &str) -> String {
        let mut buf = plaintext.as_bytes().to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::empty(), &mut buf)
            .expect("AES-GCM sealing does not fail");
        let mut out = nonce.as_ref().to_vec();
        out.extend_from_slice(&buf);
        URL_SAFE_NO_PAD.encode(out)
    }

    fn digest(&self, value: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.mac_key).expect("HMAC takes any key length");
        mac.update(value.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    fn open(&self, sealed: &str) -> Result<String, Error> {
        let bytes = URL_SAFE_NO_PAD.decode(sealed).map_err(Error::internal)?;
        if bytes.len() < Self::NONCE_LEN {
            return Err(Error::internal("sealed value too short"));
        }
        let (nonce, rest) = bytes.split_at(Self::NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| Error::internal("bad nonce"))?;
        let mut rest = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::empty(), &mut rest)
            .map_err(|_| Error::internal("sealed value does not open with the server secret"))?;
        String::from_utf8(plain.to_vec()).map_err(Error::internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> ServerSecret {
        ServerSecret::new(s.repeat(32)).unwrap()
    }

    #[test]
    fn hashes_verify_only_with_the_same_pepper() {
        let h = SecretHasher::new(&secret("a"));
        let stored = h.hash("cs_secret");
        assert!(h.verify("cs_secret", &stored));
        assert!(!h.verify("cs_other", &stored));
        assert!(!SecretHasher::new(&secret("b")).verify("cs_secret", &stored));
        assert!(!h.verify("cs_secret", "garbage"));
    }

    #[test]
    fn sealed_codes_open_only_with_the_same_secret() {
        let s = AesSealer::new(&secret("a"));
        let sealed = s.seal("code-123");
        assert_ne!(s.seal("code-123"), sealed, "random nonces");
        assert_eq!(s.open(&sealed).unwrap(), "code-123");
        assert!(AesSealer::new(&secret("b")).open(&sealed).is_err());
    }

    #[test]
    fn short_server_secrets_are_refused() {
        assert!(ServerSecret::new("short").is_err());
    }
}
