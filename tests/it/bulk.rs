//! Batch creates over REST: every item answered as its own create would be, in input order,
//! recorded with the batch; whole-request problems as one problem. On Postgres + Redis and on
//! the embedded default.

use issuer_domain::model::Scope;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestDb, create_body, embedded_settings, pg_settings, redis_url};

const BATCH: &str = "/issuer/api/v1/issuances/batch";

async fn batch(app: &TestApp, token: &str, body: &Value) -> reqwest::Response {
    app.http
        .post(app.url(BATCH))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn listed(app: &TestApp, token: &str, batch_id: &str) -> Vec<String> {
    let page: Value = app
        .http
        .get(app.url(&format!("/issuer/api/v1/issuances?batch_id={batch_id}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut keys: Vec<String> = page["issuances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["client_request_id"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

fn statuses(answer: &Value) -> Vec<u64> {
    answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!(r["index"], i, "results come in input order");
            r["status"].as_u64().unwrap()
        })
        .collect()
}

/// Good items, a bad one, and keys repeated inside the batch (same body, other body); then the
/// same batch again, which replays what was created.
async fn items_answer_alone_and_in_order(app: &TestApp) {
    let (_, token) = app.tenant_token().await;
    let mut bad = create_body("bulk-bad");
    bad["payload"]["mandatee"]["email"] = json!("not an address");
    let mut other_b = create_body("bulk-b");
    other_b["expires_in"] = json!(600);
    let mut with_code = create_body("bulk-c");
    with_code["tx_code"] = json!(true);
    let body = json!({"issuances": [
        create_body("bulk-a"), bad, create_body("bulk-b"), create_body("bulk-a"), other_b, with_code,
    ]});

    let res = batch(app, &token, &body).await;
    assert_eq!(res.status(), StatusCode::OK);
    let first: Value = res.json().await.unwrap();
    assert_eq!(statuses(&first), [201, 400, 201, 200, 422, 201]);
    let r = &first["results"];
    assert_eq!(r[0]["issuance"]["client_request_id"], "bulk-a");
    assert_eq!(
        r[3]["issuance"]["issuance_id"], r[0]["issuance"]["issuance_id"],
        "a repeated key replays its first occurrence"
    );
    assert_eq!(r[1]["problem"]["code"], "invalid_request");
    assert_eq!(
        r[1]["problem"]["errors"][0]["field"],
        "payload.mandatee.email"
    );
    assert_eq!(r[4]["problem"]["code"], "idempotency_key_reused");
    assert!(r[5]["issuance"]["tx_code"].is_string(), "{}", r[5]);
    assert!(r[0]["issuance"].get("tx_code").is_none());
    let batch_id = first["batch_id"].as_str().unwrap();
    assert_eq!(r[0]["issuance"]["batch_id"], batch_id);
    assert_eq!(
        listed(app, &token, batch_id).await,
        ["bulk-a", "bulk-b", "bulk-c"]
    );

    // The same batch again: replays, no new issuance, no second transaction code.
    let again: Value = batch(app, &token, &body).await.json().await.unwrap();
    assert_eq!(statuses(&again), [200, 400, 200, 200, 422, 200]);
    assert_eq!(
        again["results"][0]["issuance"]["issuance_id"],
        r[0]["issuance"]["issuance_id"]
    );
    assert!(again["results"][5]["issuance"].get("tx_code").is_none());
    let second = again["batch_id"].as_str().unwrap();
    assert_ne!(second, batch_id);
    assert!(
        listed(app, &token, second).await.is_empty(),
        "replays keep their batch"
    );
    assert_eq!(listed(app, &token, batch_id).await.len(), 3);
}

/// Problems of the whole request are one problem: scope, shape, count, size.
async fn whole_request_problems_are_one_problem(app: &TestApp) {
    let (_, token) = app.tenant_token().await;
    let reader = app.provision(&[Scope::IssuanceRead]).await;
    let reader = app.token(&reader).await;
    let res = batch(app, &reader, &json!({"issuances": [create_body("nope")]})).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);

    for body in [
        json!({"issuances": []}),
        json!({"issuances": "x"}),
        json!([create_body("x")]),
        json!({"issuances": [create_body("a"), create_body("b"), create_body("c"), create_body("d")]}),
    ] {
        let res = batch(app, &token, &body).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{body}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], "issuances", "{problem}");
    }
    // Above the batch's own limit (and above the single create's, which does not apply).
    let big = "x".repeat(90 * 1024);
    let mut item = create_body("big");
    item["payload"]["mandatee"]["lastName"] = json!(big);
    let res = batch(app, &token, &json!({"issuances": [item]})).await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let mut small = create_body("fits");
    small["payload"]["mandatee"]["lastName"] = json!("y".repeat(70 * 1024));
    let fits: Value = batch(app, &token, &json!({"issuances": [small]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        fits["results"][0]["status"], 400,
        "a body above ISSUER_MAX_BODY_BYTES reaches the batch; the schema refuses the name"
    );
}

fn three_items(mut s: issuer::Settings) -> issuer::Settings {
    s.batch_max_items = 3;
    s.batch_max_bytes = 80 * 1024;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_items_answer_alone_and_in_order_on_postgres() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    items_answer_alone_and_in_order(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_items_answer_alone_and_in_order_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    items_answer_alone_and_in_order(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_whole_request_problems_on_postgres() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(three_items(pg_settings(&db.url, Some(&redis_url())))).await;
    whole_request_problems_are_one_problem(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_whole_request_problems_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(three_items(embedded_settings(dir.path()))).await;
    whole_request_problems_are_one_problem(&app).await;
}

/// `BatchCreateIssuances`: the same answers in gRPC's terms, including an item refused before
/// it reaches the use case (its enum and its deprecated word disagree).
async fn grpc_batch_answers_every_item(app: &TestApp) {
    use issuer::grpc::pb::{self, batch_item_result::Outcome};

    use crate::helpers::{authed, create_request_pb};

    let (_, token) = app.tenant_token().await;
    let mut grpc = app.grpc().await;
    let mut bad = create_body("g-bad");
    bad["payload"]["mandatee"]["email"] = json!("not an address");
    #[allow(deprecated)]
    let clash = pb::CreateIssuanceRequest {
        delivery: "qr".into(),
        delivery_method: pb::DeliveryMethod::Link as i32,
        ..create_request_pb(&create_body("g-clash"))
    };
    let request = pb::BatchCreateIssuancesRequest {
        issuances: vec![
            create_request_pb(&create_body("g-a")),
            create_request_pb(&bad),
            create_request_pb(&create_body("g-a")),
            clash,
        ],
    };
    let answer = grpc
        .batch_create_issuances(authed(&token, request.clone()))
        .await
        .expect("BatchCreateIssuances")
        .into_inner();
    let r = &answer.results;
    assert_eq!(
        r.iter().map(|x| x.index).collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "in input order"
    );
    let Some(Outcome::Issuance(a)) = &r[0].outcome else {
        panic!("{:?}", r[0]);
    };
    assert!(!r[0].replayed);
    assert_eq!(a.batch_id, answer.batch_id);
    let Some(Outcome::Error(e)) = &r[1].outcome else {
        panic!("{:?}", r[1]);
    };
    assert_eq!(
        (e.code, e.reason.as_str()),
        (tonic::Code::InvalidArgument as i32, "INVALID_REQUEST")
    );
    assert_eq!(e.field_violations[0].field, "payload.mandatee.email");
    let Some(Outcome::Issuance(again)) = &r[2].outcome else {
        panic!("{:?}", r[2]);
    };
    assert!(r[2].replayed);
    assert_eq!(again.issuance_id, a.issuance_id);
    let Some(Outcome::Error(e)) = &r[3].outcome else {
        panic!("{:?}", r[3]);
    };
    assert_eq!(e.field_violations[0].field, "delivery_method");

    let listed = grpc
        .list_issuances(authed(
            &token,
            pb::ListIssuancesRequest {
                batch_id: answer.batch_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.issuances.len(), 1);

    // The whole call again: replays; and an empty call is one error.
    let replay = grpc
        .batch_create_issuances(authed(&token, request))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.results[0].replayed);
    let err = grpc
        .batch_create_issuances(authed(&token, pb::BatchCreateIssuancesRequest::default()))
        .await
        .expect_err("no items");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_batch_answers_every_item_on_postgres() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    grpc_batch_answers_every_item(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_batch_answers_every_item_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    grpc_batch_answers_every_item(&app).await;
}
