//! Machine-to-machine authentication: ES256 signing keys, RFC 9068 JWT access tokens (issue and
//! verify, algorithm pinned, `iss`/`aud` exact, `typ: at+jwt`, known `kid`), the JWKS that
//! publishes the keys, client-secret hashing with a server pepper, and sealing of codes that
//! must be shown again (the pre-authorized code of an offer).
//!
//! Every derived secret comes from one server secret (`ServerSecret`) by HMAC with a distinct
//! label, so one configured value covers all of them and none can stand in for another.

mod keys;
mod secrets;
mod tokens;

pub use keys::SigningKey;
pub use secrets::{
    AesSealer, SecretHasher, ServerSecret, generate_client_id, generate_client_secret,
};
pub use tokens::{IssuedToken, TokenError, TokenService, WalletGrant};
