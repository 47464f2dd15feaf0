//! The wallet's side of an issuance over OID4VCI 1.0: the protocol pieces, and the use case that
//! drives them.
//!
//! - `proof`, `sdjwt`, `metadata`: pure functions of their inputs. Validating `jwt` key proofs
//!   (Appendix F.1, §8.2.1), issuing SD-JWT VCs (RFC 9901 with draft-ietf-oauth-sd-jwt-vc), and
//!   the metadata documents a wallet reads first. Time comes in as an argument, so every
//!   security check here is reproducible in a unit test with a fixed `now`.
//! - `flow`: the wallet flow (redeem the code, nonces, issue the credential, notifications).
//!   It does IO only through the domain's ports (`Store`, `Clock`, `EventNotifier`), never
//!   through a driver.

pub mod dpop;
pub mod metadata;
pub mod proof;
pub mod sdjwt;
pub mod statuslist;

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
