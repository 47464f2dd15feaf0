//! Provisioning of tenants and API clients, used by the CLI and by the embedded default's
//! first start. Client secrets are returned once and only their peppered hash is stored.

use issuer_auth::{generate_client_id, generate_client_secret};
use issuer_domain::{
    Error,
    ids::TenantId,
    model::{ApiClient, Branding, RateLimit, Scope, Tenant},
};
use serde::Serialize;

use crate::app::App;

#[derive(Debug, Clone, Serialize)]
pub struct ClientCredentials {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
    pub scopes: String,
}

pub async fn create_tenant(app: &App, name: &str) -> Result<Tenant, Error> {
    let name = name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(Error::invalid_field("name", "must be 1 to 200 characters"));
    }
    // Names reach email headers, HTML and logs: a line break could forge any of them.
    if name.chars().any(char::is_control) {
        return Err(Error::invalid_field(
            "name",
            "must not contain control characters (line breaks, tabs, ...)",
        ));
    }
    let tenant = Tenant::new(name, app.clock.now());
    app.store.insert_tenant(&tenant).await?;
    tracing::info!(tenant_id = %tenant.id, "tenant created");
    Ok(tenant)
}

/// Sets how the tenant appears to recipients (emails, landing page).
pub async fn brand_tenant(app: &App, tenant: TenantId, branding: Branding) -> Result<(), Error> {
    branding.validate()?;
    if !app.store.update_tenant_branding(tenant, &branding).await? {
        return Err(Error::not_found("tenant"));
    }
    app.issuances.forget_tenant(tenant);
    tracing::info!(tenant_id = %tenant, "tenant branding updated");
    Ok(())
}

/// Sets (or with `None` clears) the rate limit of each of the tenant's API clients.
pub async fn limit_tenant(
    app: &App,
    tenant: TenantId,
    limit: Option<RateLimit>,
) -> Result<(), Error> {
    if !app.store.update_tenant_rate_limit(tenant, limit).await? {
        return Err(Error::not_found("tenant"));
    }
    app.issuances.forget_tenant(tenant);
    tracing::info!(tenant_id = %tenant, ?limit, "tenant rate limit updated");
    Ok(())
}

pub async fn create_client(
    app: &App,
    tenant: TenantId,
    scopes: &[Scope],
) -> Result<ClientCredentials, Error> {
    if app.store.get_tenant(tenant).await?.is_none() {
        return Err(Error::not_found("tenant"));
    }
    if scopes.is_empty() {
        return Err(Error::invalid_field("scopes", "name at least one scope"));
    }
    let secret = generate_client_secret();
    let client = ApiClient {
        tenant_id: tenant,
        client_id: generate_client_id(),
        secret_hash: app.hasher.hash(&secret),
        scopes: scopes.to_vec(),
        active: true,
        created_at: app.clock.now(),
    };
    app.store.insert_client(&client).await?;
    tracing::info!(tenant_id = %tenant, client_id = %client.client_id, "api client created");
    Ok(ClientCredentials {
        tenant_id: tenant.to_string(),
        client_id: client.client_id,
        client_secret: secret,
        scopes: Scope::join(scopes),
    })
}

/// Replaces a client's secret; the old one stops working at once.
pub async fn rotate_secret(
    app: &App,
    tenant: TenantId,
    client_id: &str,
) -> Result<ClientCredentials, Error> {
    let client = app
        .store
        .find_client(client_id)
        .await?
        .filter(|c| c.tenant_id == tenant)
        .ok_or_else(|| Error::not_found("client"))?;
    let secret = generate_client_secret();
    if !app
        .store
        .update_client_secret(tenant, client_id, &app.hasher.hash(&secret))
        .await?
    {
        return Err(Error::not_found("client"));
    }
    tracing::info!(tenant_id = %tenant, client_id, "client secret rotated");
    Ok(ClientCredentials {
        tenant_id: tenant.to_string(),
        client_id: client.client_id,
        client_secret: secret,
        scopes: Scope::join(&client.scopes),
    })
}

/// On the first start of an empty database, creates a tenant and a client with every scope.
/// Returns their credentials, which the caller prints once.
pub async fn bootstrap_if_empty(app: &App) -> Result<Option<ClientCredentials>, Error> {
    if app.store.count_tenants().await? > 0 {
        return Ok(None);
    }
    let tenant = create_tenant(app, "default").await?;
    create_client(app, tenant.id, &Scope::ALL).await.map(Some)
}
