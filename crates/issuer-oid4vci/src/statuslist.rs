//! Publishing status lists: the Status List Token of the IETF Token Status List
//! (draft-ietf-oauth-status-list), in its JWT form.
//!
//! A list of `size` entries of 2 bits each is a byte array where entry `i` sits in byte `i / 4`
//! at bit offset `2 * (i % 4)`, counted from the least significant bit; the array is
//! compressed with DEFLATE in the ZLIB format and base64url-encoded as `lst`. The token is a JWT
//! with `typ: statuslist+jwt` whose `sub` is the URL it is served at, signed with the key that
//! signs the credentials (its `kid` is published in the issuer's JWKS).
//!
//! Building is a pure function of the list's non-valid entries, the time and the key, so a
//! replica rebuilds a list from the store whenever it changed without any state of its own.

use std::io::Write;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use flate2::{Compression, write::ZlibEncoder};
use jsonwebtoken::{Algorithm, Header};
use serde_json::json;
use sha2::{Digest, Sha256};

/// The `typ` header (and, after `application/`, the media type) of a Status List Token.
pub const STATUS_LIST_TYP: &str = "statuslist+jwt";
/// Bits per entry: room for valid, invalid (revoked) and suspended.
pub const BITS: u8 = 2;

/// Where the list `list_id` of the issuer `credential_issuer` is served: the `uri` credentials
/// name and the token's `sub`.
pub fn status_list_uri(credential_issuer: &str, list_id: uuid::Uuid) -> String {
    format!(
        "{}/status-lists/{list_id}",
        credential_issuer.trim_end_matches('/')
    )
}

/// The byte array of a list of `size` entries with `entries` (`(idx, value)`) set; entries out
/// of range are ignored (a store never holds them).
pub fn pack(size: i64, entries: &[(i64, u8)]) -> Vec<u8> {
    let mut bytes = vec![0u8; usize::try_from(size).unwrap_or(0).div_ceil(4)];
    set_entries(&mut bytes, size, entries);
    bytes
}

/// Sets `entries` (`(idx, value)`) in a packed list of `size` entries, the others staying as
/// they are; entries out of range are ignored.
pub fn set_entries(packed: &mut [u8], size: i64, entries: &[(i64, u8)]) {
    for &(idx, value) in entries {
        if !(0..size).contains(&idx) {
            continue;
        }
        let i = idx as usize;
        if let Some(byte) = packed.get_mut(i / 4) {
            let shift = 2 * (i % 4);
            *byte = (*byte & !(0b11 << shift)) | ((value & 0b11) << shift);
        }
    }
}

/// `lst`: the packed bytes, ZLIB-compressed, base64url without padding.
pub fn encode_lst(packed: &[u8]) -> String {
    // Lists are mostly zeros: the fastest level compresses them almost as well as the best.
    let mut z = ZlibEncoder::new(
        Vec::with_capacity(packed.len() / 64 + 64),
        Compression::fast(),
    );
    z.write_all(packed).expect("writing to a Vec cannot fail");
    URL_SAFE_NO_PAD.encode(z.finish().expect("writing to a Vec cannot fail"))
}

/// A signed Status List Token and what an HTTP cache needs to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusListToken {
    pub jwt: String,
    /// A weak entity tag over the list's content and the token's validity: equal tags mean
    /// the same statuses in a token valid as long.
    pub etag: String,
    /// A digest of the packed statuses: a rebuild with an equal digest changed nothing.
    pub content_digest: [u8; 32],
    pub iat: DateTime<Utc>,
    pub exp: DateTime<Utc>,
}

/// What goes into a Status List Token.
#[derive(Debug, Clone, Copy)]
pub struct StatusListInput<'a> {
    /// The Credential Issuer Identifier (`iss`).
    pub issuer: &'a str,
    /// The URL the token is served at (`sub`), as credentials name it in `status_list.uri`.
    pub uri: &'a str,
    /// The list's statuses, as [`pack`] lays them out.
    pub packed: &'a [u8],
    pub iat: DateTime<Utc>,
    pub exp: DateTime<Utc>,
    /// Seconds a relying party may cache the token before fetching it again (`ttl`).
    pub ttl_secs: u64,
}

/// Builds and signs (ES256, the key's `kid`) a Status List Token.
#[tracing::instrument(name = "statuslist.build", skip_all, fields(bytes = input.packed.len()))]
pub fn build_token(
    input: &StatusListInput,
    key: &issuer_auth::SigningKey,
) -> Result<StatusListToken, String> {
    let content_digest = digest(input.packed);
    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some(STATUS_LIST_TYP.into());
    header.kid = Some(key.kid().into());
    let claims = json!({
        "iss": input.issuer,
        "sub": input.uri,
        "iat": input.iat.timestamp(),
        "exp": input.exp.timestamp(),
        "ttl": input.ttl_secs,
        "status_list": {"bits": BITS, "lst": encode_lst(input.packed)},
    });
    let jwt = jsonwebtoken::encode(&header, &claims, &key.encoding_key())
        .map_err(|e| format!("signing the status list failed: {e}"))?;
    Ok(StatusListToken {
        etag: etag(&content_digest, input.exp),
        jwt,
        content_digest,
        iat: input.iat,
        exp: input.exp,
    })
}

/// A digest of packed statuses: equal digests, equal statuses.
pub fn digest(packed: &[u8]) -> [u8; 32] {
    Sha256::digest(packed).into()
}

fn etag(content_digest: &[u8; 32], exp: DateTime<Utc>) -> String {
    format!(
        "W/\"{}.{}\"",
        URL_SAFE_NO_PAD.encode(&content_digest[..12]),
        exp.timestamp()
    )
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use flate2::read::ZlibDecoder;

    use super::*;

    fn inflate(lst: &str) -> Vec<u8> {
        let mut out = Vec::new();
        ZlibDecoder::new(&URL_SAFE_NO_PAD.decode(lst).unwrap()[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn packing_follows_the_drafts_two_bit_example() {
        // draft-ietf-oauth-status-list §4.1, the 2-bit example: statuses 1,2,0,3,0,1,0,1,1,2,3,3
        // are the bytes c9 44 f9.
        let statuses = [1u8, 2, 0, 3, 0, 1, 0, 1, 1, 2, 3, 3];
        let entries: Vec<(i64, u8)> = statuses
            .iter()
            .enumerate()
            .map(|(i, &s)| (i as i64, s))
            .collect();
        assert_eq!(pack(12, &entries), [0xc9, 0x44, 0xf9]);
        assert_eq!(
            inflate(&encode_lst(&[0xc9, 0x44, 0xf9])),
            [0xc9, 0x44, 0xf9]
        );
        // The draft's own encoding of those bytes decodes to them.
        assert_eq!(inflate("eNo76fITAAPfAgc"), [0xc9, 0x44, 0xf9]);
    }

    #[test]
    fn entries_out_of_range_are_ignored_and_sizes_round_up() {
        assert_eq!(pack(5, &[(4, 1), (5, 2), (-1, 1), (8, 1)]), [0, 1]);
        assert_eq!(pack(0, &[]), Vec::<u8>::new());
    }

    #[test]
    fn changes_overwrite_entries_in_place() {
        let mut packed = pack(8, &[(0, 1), (1, 2), (5, 1)]);
        set_entries(&mut packed, 8, &[(1, 0), (5, 2), (6, 1)]);
        assert_eq!(packed, pack(8, &[(0, 1), (5, 2), (6, 1)]));
    }

    #[test]
    fn the_token_is_signed_typed_and_carries_its_list() {
        let key = issuer_auth::SigningKey::generate();
        let iat = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let input = StatusListInput {
            issuer: "https://issuer.example/issuer",
            uri: "https://issuer.example/issuer/status-lists/l1",
            packed: &pack(16, &[(3, 1), (9, 2)]),
            iat,
            exp: iat + chrono::Duration::hours(24),
            ttl_secs: 300,
        };
        let token = build_token(&input, &key).unwrap();
        let header = jsonwebtoken::decode_header(&token.jwt).unwrap();
        assert_eq!(header.typ.as_deref(), Some("statuslist+jwt"));
        assert_eq!(header.kid.as_deref(), Some(key.kid()));
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let claims =
            jsonwebtoken::decode::<serde_json::Value>(&token.jwt, &key.decoding_key(), &validation)
                .unwrap()
                .claims;
        assert_eq!(claims["sub"], input.uri);
        assert_eq!(claims["ttl"], 300);
        assert_eq!(claims["status_list"]["bits"], 2);
        let bytes = inflate(claims["status_list"]["lst"].as_str().unwrap());
        assert_eq!(bytes, input.packed);
        assert_eq!(bytes[0] >> 6, 1, "entry 3");
        assert_eq!((bytes[2] >> 2) & 3, 2, "entry 9");
        // The tag follows content and validity, not the signature.
        let again = build_token(&input, &key).unwrap();
        assert_ne!(again.jwt, token.jwt);
        assert_eq!(again.etag, token.etag);
        let changed = build_token(
            &StatusListInput {
                packed: &pack(16, &[(3, 1)]),
                ..input
            },
            &key,
        )
        .unwrap();
        assert_ne!(changed.etag, token.etag);
    }
}
