//! The OID4VCI 1.0 protocol pieces that are pure functions of their inputs: validating `jwt` key
//! proofs (Appendix F.1, §8.2.1), issuing SD-JWT VCs (RFC 9901 with draft-ietf-oauth-sd-jwt-vc),
//! and building the metadata documents a wallet reads before it talks to us.
//!
//! Nothing here does IO — no clock reads, no network, no storage. Time comes in as an argument
//! and state the protocol needs to remember (which `c_nonce` values were issued and consumed,
//! which pre-authorized codes are spent) stays with the caller. That keeps every security check
//! in this crate reproducible in a unit test with a fixed `now`, and lets the HTTP layer decide
//! how to persist and serialise without this crate knowing about it.

pub mod metadata;
pub mod proof;
pub mod sdjwt;

pub mod flow;
#[cfg(test)]
mod proptests;
pub use flow::{WalletError, WalletService, WalletSettings};
pub use metadata::{
    CREDENTIAL_PAYLOAD_CLAIM, ConfigurationView, authorization_server_metadata,
    credential_issuer_metadata, credential_issuer_metadata_with_display, jwt_vc_issuer_metadata,
};
pub use proof::{
    MAX_PROOFS, PROOF_TYP, ProofError, ProofErrorCode, ProofPolicy, ValidProof, validate_proof,
    validate_proofs,
};
pub use sdjwt::{IssuedSdJwt, SD_JWT_VC_TYP, SdJwtError, SdJwtVcInput, issue_sd_jwt_vc};

/// JWK members that only a private (or symmetric) key has: `d` for EC/OKP/RSA, the RSA CRT
/// parameters (`p`, `q`, `dp`, `dq`, `qi`, `oth`) and `k` for `oct` keys. A key carrying any of
/// them was leaked by whoever sent it, so we never accept it nor copy it into a credential.
pub(crate) const PRIVATE_JWK_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
