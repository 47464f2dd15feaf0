//! Standard Webhooks symmetric signing (`v1`, HMAC-SHA256).
//!
//! Why this exact format: receivers verify with whatever Standard Webhooks
//! library they already use, so byte-for-byte compatibility with the
//! reference implementations matters more than anything else here; the unit
//! tests pin the published test vector.
//!
//! Invariants:
//! - A secret is `whsec_` + standard base64 of the raw key; the HMAC key is the
//!   *decoded* bytes, never the text.
//! - The signed content is exactly `{msg_id}.{timestamp}.{body}` over the
//!   bytes that go on the wire; the caller must sign what it sends and send
//!   what it signed.
//! - Secret material never appears in `Debug` output or error messages.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The prefix that marks a symmetric Standard Webhooks secret.
const PREFIX: &str = "whsec_";
/// Bytes of randomness in a generated secret (the spec asks for at least 24).
const GENERATED_LEN: usize = 32;
/// The spec's bounds on a symmetric key, in decoded bytes.
const MIN_LEN: usize = 24;
const MAX_LEN: usize = 64;

/// Why a `whsec_` string was not accepted. Never carries the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("webhook secret must start with `whsec_`")]
    MissingPrefix,
    #[error("webhook secret is not valid base64")]
    InvalidBase64,
    #[error("webhook secret must decode to {MIN_LEN}..={MAX_LEN} bytes, got {0}")]
    BadLength(usize),
}

/// A symmetric webhook signing secret in its `whsec_…` form.
///
/// Kept as the display string (what is stored and shown to the tenant once)
/// plus the decoded key (what the HMAC uses), so signing never re-decodes.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    text: String,
    key: Vec<u8>,
}

impl WebhookSecret {
    /// A fresh secret: `whsec_` + base64 of 32 bytes from the OS-seeded CSPRNG.
    pub fn generate() -> Self {
        let key: [u8; GENERATED_LEN] = rand::random();
        let text = format!("{PREFIX}{}", STANDARD.encode(key));
        Self {
            text,
            key: key.to_vec(),
        }
    }

    /// Accepts a stored or tenant-supplied `whsec_…` secret.
    ///
    /// The prefix is required: everything this issuer hands out has it, and
    /// requiring it keeps an asymmetric `whsk_` key or a stray token from
    /// silently being used as an HMAC key.
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let encoded = s.strip_prefix(PREFIX).ok_or(SecretError::MissingPrefix)?;
        // Tolerate missing padding: some tools strip it, and the decoded key
        // is what matters.
        let key = STANDARD
            .decode(encoded)
            .or_else(|_| {
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(encoded.trim_end_matches('='))
            })
            .map_err(|_| SecretError::InvalidBase64)?;
        if !(MIN_LEN..=MAX_LEN).contains(&key.len()) {
            return Err(SecretError::BadLength(key.len()));
        }
        Ok(Self {
            text: s.to_owned(),
            key,
        })
    }

    /// The `whsec_…` text, for storing or showing to the tenant once.
    /// Named so that every use of the secret is easy to find in review.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// One `v1,<base64>` signature with this secret.
    fn sign_one(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key)
            .expect("HMAC-SHA256 accepts keys of any length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug output ends up in logs and panics; never show key material.
        f.write_str("WebhookSecret(whsec_<redacted>)")
    }
}

/// The `webhook-signature` header value: one `v1,<sig>` per secret,
/// separated by single spaces.
///
/// Several secrets are passed during rotation so that a receiver holding
/// either the old or the new secret verifies the message. `msg_id` must not
/// contain `.` (the spec's delimiter); the issuer's ids never do. An empty
/// `secrets` slice yields an empty string, which no receiver will accept:
/// the sender refuses to send unsigned messages.
pub fn sign(secrets: &[&WebhookSecret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| s.sign_one(msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector of the reference libraries in
    // standard-webhooks/standard-webhooks (libraries/go/webhook_test.go,
    // TestWebhookSign), reproduced by every official implementation.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn reproduces_the_reference_test_vector() {
        let secret = WebhookSecret::parse(SPEC_SECRET).unwrap();
        assert_eq!(sign(&[&secret], SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
    }

    #[test]
    fn two_secrets_give_two_space_separated_entries_in_order() {
        let old = WebhookSecret::parse(SPEC_SECRET).unwrap();
        let new = WebhookSecret::generate();
        let header = sign(&[&old, &new], SPEC_ID, SPEC_TS, SPEC_BODY);
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2, "{header}");
        assert_eq!(parts[0], SPEC_SIG);
        assert!(parts[1].starts_with("v1,"));
        assert_ne!(parts[0], parts[1]);
        assert_eq!(parts[1], sign(&[&new], SPEC_ID, SPEC_TS, SPEC_BODY));
    }

    #[test]
    fn no_secrets_sign_nothing() {
        assert_eq!(sign(&[], SPEC_ID, SPEC_TS, SPEC_BODY), "");
    }

    #[test]
    fn signature_covers_id_timestamp_and_body() {
        let s = WebhookSecret::parse(SPEC_SECRET).unwrap();
        let base = sign(&[&s], SPEC_ID, SPEC_TS, SPEC_BODY);
        assert_ne!(base, sign(&[&s], "msg_other", SPEC_TS, SPEC_BODY));
        assert_ne!(base, sign(&[&s], SPEC_ID, SPEC_TS + 1, SPEC_BODY));
        assert_ne!(
            base,
            sign(&[&s], SPEC_ID, SPEC_TS, br#"{"test":2432232314}"#)
        );
    }

    #[test]
    fn generated_secrets_have_the_whsec_form_and_round_trip() {
        let s = WebhookSecret::generate();
        let text = s.expose();
        assert!(text.starts_with("whsec_"));
        // 32 bytes -> 44 base64 chars with one `=` of padding.
        assert_eq!(text.len(), "whsec_".len() + 44);
        assert!(text.ends_with('='));
        let parsed = WebhookSecret::parse(text).unwrap();
        assert_eq!(parsed, s);
        assert_eq!(parsed.key.len(), 32);
        assert_ne!(WebhookSecret::generate(), s);
    }

    #[test]
    fn parse_rejects_malformed_secrets() {
        assert_eq!(
            WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::MissingPrefix)
        );
        assert_eq!(
            WebhookSecret::parse("whsec_***"),
            Err(SecretError::InvalidBase64)
        );
        assert_eq!(
            WebhookSecret::parse("whsec_c2hvcnQ="),
            Err(SecretError::BadLength(5))
        );
        let too_long = format!("whsec_{}", STANDARD.encode([0u8; 65]));
        assert_eq!(
            WebhookSecret::parse(&too_long),
            Err(SecretError::BadLength(65))
        );
    }

    #[test]
    fn parse_tolerates_missing_padding() {
        let s = WebhookSecret::generate();
        let unpadded = s.expose().trim_end_matches('=');
        assert_eq!(WebhookSecret::parse(unpadded).unwrap().key, s.key);
    }

    #[test]
    fn debug_is_redacted() {
        let s = WebhookSecret::parse(SPEC_SECRET).unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("MfKQ9r8G"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
