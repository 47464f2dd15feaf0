//! The client-credentials grant (RFC 6749 §4.4): a backend trades its client id and secret for
//! an access token of its tenant. The token endpoint (`rest/oauth.rs`) reads the form and the
//! `Authorization` header and renders the answer; the rules are here.

use std::sync::Arc;

use issuer_auth::{IssuedToken, SecretHasher, TokenService};
use issuer_domain::{
    Error, OAuthCode,
    model::Scope,
    ports::{Clock, Store},
    service::IssuanceService,
};

use crate::limits::{Class, Limits, Verdict};

/// Why a grant is not given.
#[derive(Debug)]
pub enum GrantError {
    /// An RFC 6749 §5.2 refusal.
    Refused {
        code: OAuthCode,
        description: String,
    },
    /// The client's budget is spent.
    RateLimited(Verdict),
    /// A store failure: 503 or 500, never the client's fault.
    Internal(Error),
}

impl From<Error> for GrantError {
    fn from(e: Error) -> Self {
        Self::Internal(e)
    }
}

fn refused(code: OAuthCode, description: impl Into<String>) -> GrantError {
    GrantError::Refused {
        code,
        description: description.into(),
    }
}

/// The client-credentials grant and the ports it needs.
pub struct ClientCredentials {
    pub store: Arc<dyn Store>,
    pub hasher: SecretHasher,
    pub tokens: Arc<TokenService>,
    pub clock: Arc<dyn Clock>,
    pub limits: Arc<Limits>,
    /// Tenants' own client budgets.
    pub issuances: Arc<IssuanceService>,
}

impl ClientCredentials {
    /// An access token for the client, with the requested scopes (a space-separated subset of
    /// the client's; all of them when `scope` is empty or absent).
    pub async fn grant(
        &self,
        client_id: &str,
        secret: &str,
        scope: Option<&str>,
    ) -> Result<IssuedToken, GrantError> {
        let client = self.store.find_client(client_id).await?;
        // Spent before the secret is checked: guessing a client's secret is as slow as its
        // budget.
        if let Some(verdict) = self
            .limits
            .client(
                &self.issuances,
                client_id,
                client.as_ref().map(|c| c.tenant_id),
            )
            .await
            && !verdict.allowed()
        {
            crate::limits::refused(Class::Token);
            return Err(GrantError::RateLimited(verdict));
        }
        // Hash even for unknown clients so timing does not tell which client ids exist.
        let stored = client
            .as_ref()
            .map(|c| c.secret_hash.as_str())
            .unwrap_or("v1$");
        let secret_ok = self.hasher.verify(secret, stored);
        let client = match client {
            Some(c) if secret_ok && c.active => c,
            _ => {
                tracing::info!(client_id = %client_id, "client authentication failed");
                return Err(refused(
                    OAuthCode::InvalidClient,
                    "client authentication failed",
                ));
            }
        };
        let scopes = match scope.map(str::trim).filter(|s| !s.is_empty()) {
            None => client.scopes.clone(),
            Some(requested) => {
                let requested = Scope::parse_list(requested)
                    .map_err(|m| refused(OAuthCode::InvalidScope, m))?;
                if let Some(s) = requested.iter().find(|s| !client.scopes.contains(s)) {
                    return Err(refused(
                        OAuthCode::InvalidScope,
                        format!("scope `{s}` is not granted to this client"),
                    ));
                }
                requested
            }
        };
        let issued = self.tokens.issue(
            client.tenant_id,
            &client.client_id,
            &scopes,
            self.clock.now(),
        );
        tracing::info!(tenant_id = %client.tenant_id, client_id = %client.client_id, "access token issued");
        Ok(issued)
    }
}
