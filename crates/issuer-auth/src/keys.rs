//! ES256 (P-256) signing keys: generated, or read from PKCS#8 / SEC1 PEM; identified by their
//! RFC 7638 JWK thumbprint.

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A P-256 private key with its public JWK.
#[derive(Clone)]
pub struct SigningKey {
    pkcs8: Vec<u8>,
    x: String,
    y: String,
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn generate() -> Self {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .expect("P-256 key generation does not fail");
        Self::from_der(doc.as_ref()).expect("a generated key parses")
    }

    /// Reads a `PRIVATE KEY` (PKCS#8) or `EC PRIVATE KEY` (SEC1) PEM block.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let body: String = pem
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("-----"))
            .collect();
        if body.is_empty() {
            return Err("no PEM block found".into());
        }
        let der = STANDARD
            .decode(body)
            .map_err(|e| format!("PEM body is not base64: {e}"))?;
        Self::from_der(&der)
    }

    fn from_der(der: &[u8]) -> Result<Self, String> {
        let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| "not a P-256 private key (PKCS#8 or SEC1 DER)".to_string())?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| "key export failed".to_string())?;
        let point = pair.public_key().as_ref();
        // Uncompressed SEC1 point: 0x04 || x || y.
        if point.len() != 65 || point[0] != 4 {
            return Err("unexpected public key encoding".into());
        }
        let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&point[33..]);
        let thumbprint_input = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(thumbprint_input.as_bytes()));
        Ok(Self {
            pkcs8: pkcs8.as_ref().to_vec(),
            x,
            y,
            kid,
        })
    }

    pub fn to_pem(&self) -> String {
        let b64 = STANDARD.encode(&self.pkcs8);
        let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END PRIVATE KEY-----\n");
        out
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn encoding_key(&self) -> EncodingKey {
        EncodingKey::from_ec_der(&self.pkcs8)
    }

    pub fn decoding_key(&self) -> DecodingKey {
        DecodingKey::from_ec_components(&self.x, &self.y).expect("valid P-256 coordinates")
    }

    /// The public key as a JWK (no private part).
    pub fn public_jwk(&self) -> Value {
        json!({"kty": "EC", "crv": "P-256", "x": self.x, "y": self.y, "kid": self.kid, "alg": "ES256", "use": "sig"})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_keeps_the_key_id() {
        let k = SigningKey::generate();
        let again = SigningKey::from_pem(&k.to_pem()).unwrap();
        assert_eq!(k.kid(), again.kid());
        assert_eq!(k.public_jwk(), again.public_jwk());
        assert!(
            SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----")
                .is_err()
        );
    }
}
