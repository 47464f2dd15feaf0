//! Identifier newtypes. Random identifiers that a caller could guess an issuance by
//! (offer ids, pre-authorized codes, client secrets) carry at least 128 bits from the OS RNG.

use std::{fmt, str::FromStr};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new time-ordered (UUIDv7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A tenant: an organisation whose backends issue credentials.
    TenantId
);
uuid_id!(
    /// An issuance: one credential offer and its lifecycle.
    IssuanceId
);

/// `len` random bytes from the OS RNG, base64url without padding.
pub fn random_token(len: usize) -> String {
    let mut buf = vec![0u8; len];
    rand::rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// The public id of a credential offer, in the offer URL. Independent of the issuance id.
pub fn new_offer_id() -> String {
    random_token(18)
}

/// Whether `s` can be an offer id at all (base64url, as [`new_offer_id`] makes them); anything
/// else is unknown without asking the store.
pub fn is_offer_id(s: &str) -> bool {
    s.len() == 24
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A pre-authorized code (256 bits); only its hash is stored.
pub fn new_pre_authorized_code() -> String {
    random_token(32)
}

/// A numeric transaction code (6 digits, uniform). Short enough to type; guessing is bounded
/// by the attempt cap, not by its length.
pub fn new_tx_code() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..6)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_new_offer_id_makes_can_be_an_offer_id() {
        for _ in 0..100 {
            assert!(is_offer_id(&new_offer_id()));
        }
        for bad in [
            "",
            "short",
            "a\0bcdefghijklmnopqrstuvw",
            "abcdefghijklmnopqrstuvw=",
            "é",
        ] {
            assert!(!is_offer_id(bad), "{bad:?}");
        }
    }
}
