//! The lifecycle without a wallet: cancellation, expiry on time by the sweeper, the event log,
//! and the payload purge when an issuance leaves `pending`.

use std::time::Duration;

use issuer::grpc::pb::{self, CancelIssuanceRequest};
use issuer_domain::{
    ids::{IssuanceId, TenantId},
    model::{IssuanceStatus, Scope},
};
use serde_json::Value;
use tonic::Code;

use crate::helpers::{TestApp, TestDb, authed, create_body, pg_settings, redis_url};

async fn created(app: &TestApp, token: &str, body: &Value) -> Value {
    let res = app.create_rest(token, body).await;
    assert_eq!(res.status(), 201);
    res.json().await.unwrap()
}

fn offer_url(issuance: &Value) -> String {
    let uri = issuance["credential_offer_uri"].as_str().unwrap();
    let encoded = uri.split_once("credential_offer_uri=").unwrap().1;
    percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

fn ids(creds: &crate::helpers::Creds, issuance: &Value) -> (TenantId, IssuanceId) {
    (
        creds.tenant_id.parse().unwrap(),
        issuance["issuance_id"].as_str().unwrap().parse().unwrap(),
    )
}

async fn event_kinds(app: &TestApp, tenant: TenantId, id: IssuanceId) -> Vec<String> {
    app.app
        .store
        .list_events(tenant, id, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind.as_str().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_rejects_the_issuance_kills_the_offer_and_purges_the_payload() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (creds, token) = app.tenant_token().await;
    let issuance = created(&app, &token, &create_body("cancel-1")).await;
    let id = issuance["issuance_id"].as_str().unwrap();
    let offer = offer_url(&issuance);
    assert_eq!(app.http.get(&offer).send().await.unwrap().status(), 200);

    let res = app.cancel_rest(&token, id).await;
    assert_eq!(res.status(), 200);
    let cancelled: Value = res.json().await.unwrap();
    assert_eq!(
        (cancelled["status"].as_str(), cancelled["reason"].as_str()),
        (Some("rejected"), Some("cancelled"))
    );
    let read: Value = app.get_rest(&token, id).await.json().await.unwrap();
    assert_eq!(read, cancelled);
    assert_eq!(
        app.http.get(&offer).send().await.unwrap().status(),
        404,
        "the offer is gone"
    );

    let (tenant, iid) = ids(&creds, &issuance);
    let row = app
        .app
        .store
        .get_issuance(tenant, iid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.payload, None, "the payload is purged once terminal");
    assert_eq!(
        event_kinds(&app, tenant, iid).await,
        ["created", "offer_retrieved", "cancelled"]
    );

    // Cancelling again is idempotent.
    let again = app.cancel_rest(&token, id).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap(), cancelled);
    assert_eq!(
        event_kinds(&app, tenant, iid).await.len(),
        3,
        "no second event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_over_grpc_and_its_refusals() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let issuance = created(&app, &token, &create_body("cancel-grpc")).await;
    let id = issuance["issuance_id"].as_str().unwrap().to_owned();
    let mut grpc = app.grpc().await;

    let msg = grpc
        .cancel_issuance(authed(
            &token,
            CancelIssuanceRequest {
                issuance_id: id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (msg.state(), msg.reason.as_str()),
        (pb::issuance::State::Rejected, "cancelled")
    );

    // Another tenant cannot cancel it, and cannot tell it exists.
    let (_, other) = app.tenant_token().await;
    let err = grpc
        .cancel_issuance(authed(
            &other,
            CancelIssuanceRequest {
                issuance_id: id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let res = app.cancel_rest(&other, id).await;
    assert_eq!(res.status(), 404);

    // Read-only clients cannot cancel.
    let reader = app.provision(&[Scope::IssuanceRead]).await;
    let reader_token = app.token(&reader).await;
    let mine = created(&app, &token, &create_body("cancel-scope")).await;
    let err = grpc
        .cancel_issuance(authed(
            &reader_token,
            CancelIssuanceRequest {
                issuance_id: mine["issuance_id"].as_str().unwrap().to_owned(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuance_expires_on_time_with_nobody_reading_it() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (creds, token) = app.tenant_token().await;
    let mut body = create_body("expires-fast");
    body["expires_in"] = 2.into();
    let issuance = created(&app, &token, &body).await;
    let (tenant, id) = ids(&creds, &issuance);

    // Watch the row, not the API, so that no read can be what triggers the expiry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let row = loop {
        let row = app
            .app
            .store
            .get_issuance(tenant, id)
            .await
            .unwrap()
            .unwrap();
        if row.status != IssuanceStatus::Pending || tokio::time::Instant::now() > deadline {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        row.status,
        IssuanceStatus::Rejected,
        "expired within 5 s of creation"
    );
    assert_eq!(row.reason.map(|r| r.as_str()), Some("expired"));
    assert_eq!(row.payload, None);
    assert_eq!(event_kinds(&app, tenant, id).await, ["created", "expired"]);

    let read: Value = app
        .get_rest(&token, &id.to_string())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (read["status"].as_str(), read["reason"].as_str()),
        (Some("rejected"), Some("expired"))
    );
    assert_eq!(
        app.http
            .get(offer_url(&issuance))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // An expired issuance cannot be cancelled.
    let res = app.cancel_rest(&token, id).await;
    assert_eq!(res.status(), 409);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "invalid_state");
    let err = app
        .grpc()
        .await
        .cancel_issuance(authed(
            &token,
            CancelIssuanceRequest {
                issuance_id: id.to_string(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_expires_too() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(crate::helpers::embedded_settings(dir.path())).await;
    let (creds, token) = app.tenant_token().await;
    let mut body = create_body("expires-embedded");
    body["expires_in"] = 1.into();
    let issuance = created(&app, &token, &body).await;
    let (tenant, id) = ids(&creds, &issuance);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app
        .app
        .store
        .get_issuance(tenant, id)
        .await
        .unwrap()
        .unwrap()
        .status
        == IssuanceStatus::Pending
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not expired within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = app
        .app
        .store
        .get_issuance(tenant, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.status, row.reason.map(|r| r.as_str())),
        (IssuanceStatus::Rejected, Some("expired"))
    );
}
