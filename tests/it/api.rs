//! The management API over REST and gRPC (DESIGN §3, §4, §5): the documented create response,
//! equal views over both transports, listing and paging, the wallet's credential offer, and
//! validation errors that write nothing.

use chrono::{DateTime, SecondsFormat, Utc};
use issuer::grpc::pb::{self, issuance::State};
use percent_encoding::percent_decode_str;
use reqwest::{Response, StatusCode, header};
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{
    Creds, TestApp, TestDb, authed, create_body, create_request_pb, pg_settings, redis_url,
};

const OFFER_PREFIX: &str = "openid-credential-offer://?credential_offer_uri=";
const PRE_AUTH_GRANT: &str = "urn:ietf:params:oauth:grant-type:pre-authorized_code";
const CONFIG_ID: &str = "learcredential.employee.sd.1";

/// A fresh database, an instance on it, and a tenant with every scope. Keep the `TestDb`.
async fn setup() -> (TestDb, TestApp, Creds, String) {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (creds, token) = app.tenant_token().await;
    (db, app, creds, token)
}

async fn json_of(res: Response) -> Value {
    let text = res.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn content_type(res: &Response) -> String {
    res.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn str_field<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("`{k}` is not a string in {v}"))
}

/// Creates over REST and returns the 201 body.
async fn create_ok(app: &TestApp, token: &str, crid: &str) -> Value {
    let res = app.create_rest(token, &create_body(crid)).await;
    assert_eq!(res.status(), StatusCode::CREATED, "create {crid}");
    json_of(res).await
}

fn rfc3339(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

fn ts_to_chrono(t: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
    let t = t.as_ref().expect("timestamp is set");
    DateTime::from_timestamp(t.seconds, t.nanos as u32).expect("valid timestamp")
}

/// The percent-decoded `credential_offer_uri` parameter of an offer deep link.
fn offer_url(offer_uri: &str) -> String {
    let encoded = offer_uri
        .strip_prefix(OFFER_PREFIX)
        .unwrap_or_else(|| panic!("{offer_uri} does not start with {OFFER_PREFIX}"));
    percent_decode_str(encoded)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

fn offer_id(offer_uri: &str) -> String {
    let url = offer_url(offer_uri);
    url.rsplit('/').next().unwrap().to_owned()
}

/// Asserts that a REST issuance and a gRPC issuance show the same fields.
fn assert_same_issuance(rest: &Value, grpc: &pb::Issuance) {
    assert_eq!(str_field(rest, "issuance_id"), grpc.issuance_id);
    assert_eq!(str_field(rest, "client_request_id"), grpc.client_request_id);
    assert_eq!(
        str_field(rest, "credential_configuration_id"),
        grpc.credential_configuration_id
    );
    assert_eq!(
        str_field(rest, "status"),
        grpc.state().as_str_name()[6..].to_lowercase()
    );
    #[allow(deprecated)]
    let words = (grpc.status.as_str(), grpc.delivery.as_str());
    assert_eq!(
        words,
        (str_field(rest, "status"), str_field(rest, "delivery")),
        "the deprecated words are still filled in"
    );
    assert_eq!(rest["reason"].as_str().unwrap_or_default(), grpc.reason);
    assert_eq!(
        str_field(rest, "credential_offer_uri"),
        grpc.credential_offer_uri
    );
    assert_eq!(
        str_field(rest, "delivery"),
        grpc.delivery_method().as_str_name()["DELIVERY_METHOD_".len()..].to_lowercase()
    );
    for (name, ts) in [
        ("expires_at", &grpc.expires_at),
        ("created_at", &grpc.created_at),
        ("updated_at", &grpc.updated_at),
    ] {
        let rest_time = rfc3339(str_field(rest, name));
        let grpc_time = ts_to_chrono(ts);
        assert_eq!(
            rest_time.timestamp(),
            grpc_time.timestamp(),
            "{name}: seconds differ"
        );
        // REST shows milliseconds; gRPC may carry more precision of the same instant.
        assert_eq!(
            str_field(rest, name),
            grpc_time.to_rfc3339_opts(SecondsFormat::Millis, true),
            "{name}"
        );
    }
}

fn collect_keys(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                out.push(k.clone());
                collect_keys(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_keys(x, out)),
        _ => {}
    }
}

/// Moves an issuance out of `pending` directly in the database (no public operation does so yet).
async fn set_status(db: &TestDb, issuance_id: &str, status: &str, reason: &str) {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let id: uuid::Uuid = issuance_id.parse().unwrap();
    let done = sqlx::query("UPDATE issuances SET status = $1, reason = $2 WHERE id = $3")
        .bind(status)
        .bind(reason)
        .bind(id)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1);
}

async fn rest_list(app: &TestApp, token: &str, query: &[(&str, &str)]) -> Response {
    let query = serde_urlencoded::to_string(query).unwrap();
    app.http
        .get(app.url(&format!("/issuer/api/v1/issuances?{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

fn ids_of(list: &Value) -> Vec<String> {
    list["issuances"]
        .as_array()
        .unwrap_or_else(|| panic!("no `issuances` array in {list}"))
        .iter()
        .map(|i| str_field(i, "issuance_id").to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A. Create, read, list, offer
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_create_returns_201_with_location_and_documented_fields() {
    let (_db, app, _creds, token) = setup().await;
    let before = Utc::now();
    let res = app.create_rest(&token, &create_body("doc-fields-1")).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(
        content_type(&res).starts_with("application/json"),
        "{}",
        content_type(&res)
    );
    let location = res
        .headers()
        .get(header::LOCATION)
        .expect("Location header")
        .to_str()
        .unwrap()
        .to_owned();
    let body = json_of(res).await;

    let id = str_field(&body, "issuance_id");
    uuid::Uuid::parse_str(id).expect("issuance_id is a UUID");
    assert_eq!(
        location,
        format!("{}/issuer/api/v1/issuances/{id}", app.base)
    );
    assert_eq!(body["client_request_id"], "doc-fields-1");
    assert_eq!(body["credential_configuration_id"], CONFIG_ID);
    assert_eq!(body["status"], "pending");
    assert!(
        str_field(&body, "credential_offer_uri").starts_with(OFFER_PREFIX),
        "{}",
        body["credential_offer_uri"]
    );

    for name in ["expires_at", "created_at", "updated_at"] {
        let s = str_field(&body, name);
        assert!(s.ends_with('Z'), "{name} = {s} is not UTC with Z");
        rfc3339(s);
    }
    let created = rfc3339(str_field(&body, "created_at"));
    let expires = rfc3339(str_field(&body, "expires_at"));
    assert!(
        created >= before - chrono::Duration::seconds(5)
            && created <= Utc::now() + chrono::Duration::seconds(5),
        "created_at {created} is not now"
    );
    assert_eq!(body["updated_at"], body["created_at"]);
    let ttl = (expires - created).num_seconds();
    assert!(
        (24 * 3600 - 60..=24 * 3600 + 60).contains(&ttl),
        "expires_at is {ttl}s after created_at, not about 24h"
    );
    let ahead = (expires - Utc::now()).num_seconds();
    assert!(
        (24 * 3600 - 120..=24 * 3600 + 60).contains(&ahead),
        "expires_at is {ahead}s ahead, not about 24h"
    );

    // The Location resolves to the same issuance.
    let res = app
        .http
        .get(&location)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(json_of(res).await, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_create_response_keys_are_snake_case() {
    let (_db, app, _creds, token) = setup().await;
    let body = create_ok(&app, &token, "snake-1").await;
    let mut keys = Vec::new();
    collect_keys(&body, &mut keys);
    for required in [
        "issuance_id",
        "client_request_id",
        "credential_configuration_id",
        "status",
        "credential_offer_uri",
        "expires_at",
        "created_at",
        "updated_at",
    ] {
        assert!(keys.iter().any(|k| k == required), "{required} missing");
    }
    for k in &keys {
        let snake = k.starts_with(|c: char| c.is_ascii_lowercase())
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        assert!(snake, "response key `{k}` is not snake_case");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_offer_uri_encodes_the_offer_endpoint_url() {
    let (_db, app, _creds, token) = setup().await;
    let body = create_ok(&app, &token, "offer-uri-1").await;
    let uri = str_field(&body, "credential_offer_uri");
    let encoded = uri.strip_prefix(OFFER_PREFIX).unwrap();
    // Percent-encoded: no raw reserved characters of the inner URL remain.
    assert!(
        !encoded.contains(':') && !encoded.contains('/'),
        "{encoded} is not percent-encoded"
    );
    let url = offer_url(uri);
    let prefix = format!("{}/issuer/oid4vci/v1/credential-offer/", app.base);
    let id = url
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{url} does not start with {prefix}"));
    assert!(
        id.len() >= 22
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "offer id {id:?} is not a >=128-bit URL-safe token"
    );
    assert_ne!(id, str_field(&body, "issuance_id"));
    assert!(!id.contains(str_field(&body, "issuance_id")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_created_issuance_reads_the_same_over_grpc() {
    let (_db, app, _creds, token) = setup().await;
    let rest = create_ok(&app, &token, "rest-then-grpc").await;
    let mut grpc = app.grpc().await;
    let got = grpc
        .get_issuance(authed(
            &token,
            pb::GetIssuanceRequest {
                issuance_id: str_field(&rest, "issuance_id").to_owned(),
            },
        ))
        .await
        .expect("GetIssuance")
        .into_inner();
    assert_eq!(got.state(), State::Pending);
    assert_eq!(got.client_request_id, "rest-then-grpc");
    assert_eq!(
        got.expires_at.as_ref().unwrap().seconds,
        rfc3339(str_field(&rest, "expires_at")).timestamp()
    );
    assert_same_issuance(&rest, &got);
}

/// Clients of before the enums still create with the deprecated `delivery` word; a word at
/// odds with `delivery_method` is refused and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_create_accepts_the_deprecated_delivery_word() {
    let (_db, app, _creds, token) = setup().await;
    let mut grpc = app.grpc().await;
    #[allow(deprecated)]
    let request = |crid: &str, word: &str, method: pb::DeliveryMethod| pb::CreateIssuanceRequest {
        delivery: word.into(),
        delivery_method: method as i32,
        ..create_request_pb(&create_body(crid))
    };
    let created = grpc
        .create_issuance(authed(
            &token,
            request("word-qr", "qr", pb::DeliveryMethod::Unspecified),
        ))
        .await
        .expect("create with the deprecated word")
        .into_inner();
    assert_eq!(created.delivery_method(), pb::DeliveryMethod::Qr);
    let err = grpc
        .create_issuance(authed(
            &token,
            request("word-clash", "qr", pb::DeliveryMethod::Link),
        ))
        .await
        .expect_err("the word and the enum disagree");
    assert_eq!(err.code(), Code::InvalidArgument);
    let bad = err.get_details_bad_request().expect("BadRequest");
    assert_eq!(bad.field_violations[0].field, "delivery_method");
    let listed = grpc
        .list_issuances(authed(
            &token,
            pb::ListIssuancesRequest {
                client_request_id: "word-clash".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("ListIssuances")
        .into_inner();
    assert!(listed.issuances.is_empty(), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_created_issuance_reads_the_same_over_rest() {
    let (_db, app, _creds, token) = setup().await;
    let mut grpc = app.grpc().await;
    let res = grpc
        .create_issuance(authed(
            &token,
            create_request_pb(&create_body("grpc-then-rest")),
        ))
        .await
        .expect("CreateIssuance");
    assert_eq!(
        res.metadata()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("false")
    );
    let created = res.into_inner();
    assert_eq!(created.state(), State::Pending);
    assert_eq!(created.client_request_id, "grpc-then-rest");
    assert_eq!(created.credential_configuration_id, CONFIG_ID);
    assert!(created.credential_offer_uri.starts_with(OFFER_PREFIX));

    let res = app.get_rest(&token, &created.issuance_id).await;
    assert_eq!(res.status(), StatusCode::OK);
    let rest = json_of(res).await;
    assert_same_issuance(&rest, &created);

    // And gRPC reads back what it created.
    let again = grpc
        .get_issuance(authed(
            &token,
            pb::GetIssuanceRequest {
                issuance_id: created.issuance_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_list_filters_by_status_and_client_request_id() {
    let (db, app, _creds, token) = setup().await;
    let a = create_ok(&app, &token, "filter-a").await;
    let b = create_ok(&app, &token, "filter-b").await;
    let c = create_ok(&app, &token, "filter-c").await;
    set_status(&db, str_field(&b, "issuance_id"), "rejected", "cancelled").await;
    let id = |v: &Value| str_field(v, "issuance_id").to_owned();

    let list = |q: Vec<(&'static str, &'static str)>| {
        let app = &app;
        let token = &token;
        async move {
            let res = rest_list(app, token, &q).await;
            assert_eq!(res.status(), StatusCode::OK, "{q:?}");
            json_of(res).await
        }
    };

    let all = list(vec![]).await;
    assert_eq!(ids_of(&all), vec![id(&c), id(&b), id(&a)]);

    let pending = list(vec![("status", "pending")]).await;
    assert_eq!(ids_of(&pending), vec![id(&c), id(&a)]);
    assert!(
        pending["issuances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] == "pending")
    );

    let rejected = list(vec![("status", "rejected")]).await;
    assert_eq!(ids_of(&rejected), vec![id(&b)]);
    assert_eq!(rejected["issuances"][0]["status"], "rejected");
    assert_eq!(rejected["issuances"][0]["reason"], "cancelled");

    assert_eq!(
        ids_of(&list(vec![("status", "accepted")]).await),
        Vec::<String>::new()
    );

    let by_key = list(vec![("client_request_id", "filter-a")]).await;
    assert_eq!(ids_of(&by_key), vec![id(&a)]);
    assert_eq!(by_key["issuances"][0], a);

    let both = list(vec![
        ("client_request_id", "filter-b"),
        ("status", "pending"),
    ])
    .await;
    assert_eq!(ids_of(&both), Vec::<String>::new());

    let unknown = list(vec![("client_request_id", "no-such-key")]).await;
    assert_eq!(ids_of(&unknown), Vec::<String>::new());
    assert!(unknown["next_page_token"].is_null());

    let res = rest_list(&app, &token, &[("status", "bogus")]).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(content_type(&res), "application/problem+json");
    let problem = json_of(res).await;
    assert_eq!(problem["code"], "invalid_request");
    assert_eq!(problem["errors"][0]["field"], "status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_list_filters_by_status_and_client_request_id() {
    let (db, app, _creds, token) = setup().await;
    let a = create_ok(&app, &token, "gfilter-a").await;
    let b = create_ok(&app, &token, "gfilter-b").await;
    let c = create_ok(&app, &token, "gfilter-c").await;
    set_status(&db, str_field(&b, "issuance_id"), "rejected", "cancelled").await;
    let id = |v: &Value| str_field(v, "issuance_id").to_owned();
    let mut grpc = app.grpc().await;

    let mut list = async |status: State, crid: &str| {
        grpc.list_issuances(authed(
            &token,
            pb::ListIssuancesRequest {
                page_size: 0,
                page_token: String::new(),
                state: status as i32,
                client_request_id: crid.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_or_else(|s| panic!("ListIssuances({status:?}, {crid:?}): {s:?}"))
        .into_inner()
    };
    let ids = |r: &pb::ListIssuancesResponse| {
        r.issuances
            .iter()
            .map(|i| i.issuance_id.clone())
            .collect::<Vec<_>>()
    };

    let all = list(State::Unspecified, "").await;
    assert_eq!(ids(&all), vec![id(&c), id(&b), id(&a)]);
    assert_eq!(all.next_page_token, "");

    let pending = list(State::Pending, "").await;
    assert_eq!(ids(&pending), vec![id(&c), id(&a)]);
    assert!(
        pending
            .issuances
            .iter()
            .all(|i| i.state() == State::Pending)
    );

    let rejected = list(State::Rejected, "").await;
    assert_eq!(ids(&rejected), vec![id(&b)]);
    assert_eq!(rejected.issuances[0].state(), State::Rejected);
    assert_eq!(rejected.issuances[0].reason, "cancelled");

    assert!(list(State::Accepted, "").await.issuances.is_empty());

    let by_key = list(State::Unspecified, "gfilter-a").await;
    assert_eq!(ids(&by_key), vec![id(&a)]);
    assert_same_issuance(&a, &by_key.issuances[0]);

    assert!(list(State::Pending, "gfilter-b").await.issuances.is_empty());
    assert!(
        list(State::Unspecified, "no-such-key")
            .await
            .issuances
            .is_empty()
    );

    // Clients of before the enums filter by the deprecated word; both at odds is refused.
    #[allow(deprecated)]
    let by_word = |word: &str, state: State| pb::ListIssuancesRequest {
        status: word.into(),
        state: state as i32,
        ..Default::default()
    };
    let legacy = grpc
        .list_issuances(authed(&token, by_word("rejected", State::Unspecified)))
        .await
        .expect("list by the deprecated status word")
        .into_inner();
    assert_eq!(ids(&legacy), vec![id(&b)]);
    let both = grpc
        .list_issuances(authed(&token, by_word("rejected", State::Rejected)))
        .await
        .expect("both saying the same");
    assert_eq!(ids(&both.into_inner()), vec![id(&b)]);
    let err = grpc
        .list_issuances(authed(&token, by_word("rejected", State::Pending)))
        .await
        .expect_err("the enum and the word disagree");
    assert_eq!(err.code(), Code::InvalidArgument);
    let violations = err
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations;
    assert_eq!(violations[0].field, "state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_list_pages_newest_first_without_repeats() {
    let (_db, app, _creds, token) = setup().await;
    let mut created = Vec::new();
    for n in 0..5 {
        let body = create_ok(&app, &token, &format!("page-{n}")).await;
        created.push(str_field(&body, "issuance_id").to_owned());
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut token_param: Option<String> = None;
    for _ in 0..10 {
        let mut q = vec![("page_size", "2".to_owned())];
        if let Some(t) = &token_param {
            q.push(("page_token", t.clone()));
        }
        let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let res = rest_list(&app, &token, &q).await;
        assert_eq!(res.status(), StatusCode::OK);
        let page = json_of(res).await;
        let ids = ids_of(&page);
        page_sizes.push(ids.len());
        seen.extend(ids);
        match &page["next_page_token"] {
            Value::Null => {
                token_param = None;
                break;
            }
            Value::String(t) if t.is_empty() => {
                token_param = None;
                break;
            }
            Value::String(t) => token_param = Some(t.clone()),
            other => panic!("next_page_token is {other}"),
        }
    }
    assert!(token_param.is_none(), "paging did not end");
    assert_eq!(page_sizes, vec![2, 2, 1]);
    assert_eq!(seen, newest_first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_list_pages_newest_first_without_repeats() {
    let (_db, app, _creds, token) = setup().await;
    let mut grpc = app.grpc().await;
    let mut created = Vec::new();
    for n in 0..5 {
        let i = grpc
            .create_issuance(authed(
                &token,
                create_request_pb(&create_body(&format!("gpage-{n}"))),
            ))
            .await
            .unwrap()
            .into_inner();
        created.push(i.issuance_id);
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut page_token = String::new();
    let mut ended = false;
    for _ in 0..10 {
        let page = grpc
            .list_issuances(authed(
                &token,
                pb::ListIssuancesRequest {
                    page_size: 2,
                    page_token: page_token.clone(),
                    client_request_id: String::new(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        page_sizes.push(page.issuances.len());
        seen.extend(page.issuances.into_iter().map(|i| i.issuance_id));
        if page.next_page_token.is_empty() {
            ended = true;
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(ended, "paging did not end");
    assert_eq!(page_sizes, vec![2, 2, 1]);
    assert_eq!(seen, newest_first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_list_refuses_a_bad_page_token() {
    let (_db, app, _creds, token) = setup().await;
    create_ok(&app, &token, "bad-token-1").await;
    for bad in ["not-a-token!", "AAAA", "eHh4"] {
        let res = rest_list(&app, &token, &[("page_token", bad)]).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "page_token {bad}");
        assert_eq!(content_type(&res), "application/problem+json");
        let problem = json_of(res).await;
        assert_eq!(problem["code"], "invalid_request");
        assert_eq!(problem["errors"][0]["field"], "page_token", "{problem}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_list_refuses_a_bad_page_token() {
    let (_db, app, _creds, token) = setup().await;
    create_ok(&app, &token, "gbad-token-1").await;
    let mut grpc = app.grpc().await;
    for bad in ["not-a-token!", "AAAA", "eHh4"] {
        let err = grpc
            .list_issuances(authed(
                &token,
                pb::ListIssuancesRequest {
                    page_size: 2,
                    page_token: bad.into(),
                    client_request_id: String::new(),
                    ..Default::default()
                },
            ))
            .await
            .expect_err("a bad page token is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "page_token {bad}");
        let fields: Vec<String> = err
            .get_details_bad_request()
            .expect("BadRequest details")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, vec!["page_token"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_endpoint_serves_the_credential_offer() {
    let (_db, app, _creds, token) = setup().await;
    let body = create_ok(&app, &token, "offer-json-1").await;
    let url = offer_url(str_field(&body, "credential_offer_uri"));
    // Unauthenticated, as a wallet fetches it.
    let res = app.http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(content_type(&res).starts_with("application/json"));
    assert_eq!(
        res.headers()
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let offer = json_of(res).await;
    assert_eq!(offer["credential_issuer"], format!("{}/issuer", app.base));
    assert_eq!(offer["credential_configuration_ids"], json!([CONFIG_ID]));
    let grant = &offer["grants"][PRE_AUTH_GRANT];
    assert!(grant.is_object(), "no pre-authorized grant in {offer}");
    // OID4VCI 1.0 §4.1.1 spells the member `pre-authorized_code`.
    let code = grant["pre-authorized_code"]
        .as_str()
        .unwrap_or_else(|| panic!("no pre-authorized_code string in {grant}"));
    assert!(code.len() >= 22, "code {code:?} is too short");
    assert_ne!(code, offer_id(str_field(&body, "credential_offer_uri")));
    assert_ne!(code, str_field(&body, "issuance_id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_endpoint_returns_the_same_code_on_every_fetch() {
    let (_db, app, _creds, token) = setup().await;
    let body = create_ok(&app, &token, "offer-again-1").await;
    let other = create_ok(&app, &token, "offer-again-2").await;
    let code_of = async |issuance: &Value| {
        let url = offer_url(str_field(issuance, "credential_offer_uri"));
        let res = app.http.get(&url).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()
                .get(header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok()),
            Some("no-store")
        );
        let offer = json_of(res).await;
        str_field(&offer["grants"][PRE_AUTH_GRANT], "pre-authorized_code").to_owned()
    };
    let first = code_of(&body).await;
    let second = code_of(&body).await;
    assert_eq!(first, second);
    assert_ne!(first, code_of(&other).await, "codes differ per issuance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_endpoint_unknown_offer_is_404_problem() {
    let (_db, app, _creds, token) = setup().await;
    create_ok(&app, &token, "offer-404-1").await;
    let url = app.url("/issuer/oid4vci/v1/credential-offer/AAAAAAAAAAAAAAAAAAAAAAAA");
    let res = app.http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(content_type(&res), "application/problem+json");
    let problem = json_of(res).await;
    assert_eq!(problem["status"], 404);
    assert_eq!(problem["code"], "not_found");
}

// ---------------------------------------------------------------------------------------------
// B. Bad input: 400 problem+json / INVALID_ARGUMENT with field paths; nothing is written
// ---------------------------------------------------------------------------------------------

/// Posts `bad` and expects a 400 naming exactly `fields`, no write, and then a 201 for
/// `corrected` (sent with the same `client_request_id` when it has one).
async fn assert_rest_rejects(
    app: &TestApp,
    creds: &Creds,
    token: &str,
    bad: &Value,
    fields: &[&str],
    corrected: &Value,
) {
    let res = app.create_rest(token, bad).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{bad}");
    assert_eq!(content_type(&res), "application/problem+json");
    let problem = json_of(res).await;
    assert_eq!(problem["code"], "invalid_request", "{problem}");
    assert_eq!(problem["status"], 400);
    let got: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors[] in {problem}"))
        .iter()
        .map(|e| {
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
            str_field(e, "field")
        })
        .collect();
    assert_eq!(got, fields, "{problem}");
    assert_eq!(
        app.count_issuances(creds).await,
        0,
        "a rejected create wrote"
    );

    let res = app.create_rest(token, corrected).await;
    assert_eq!(res.status(), StatusCode::CREATED, "corrected retry");
    let created = json_of(res).await;
    assert_eq!(created["client_request_id"], corrected["client_request_id"]);
    assert_eq!(app.count_issuances(creds).await, 1);
}

/// The gRPC counterpart of `assert_rest_rejects`.
async fn assert_grpc_rejects(
    app: &TestApp,
    creds: &Creds,
    token: &str,
    bad: &Value,
    fields: &[&str],
    corrected: &Value,
) {
    let mut grpc = app.grpc().await;
    let err = grpc
        .create_issuance(authed(token, create_request_pb(bad)))
        .await
        .expect_err("invalid create is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
    let got: Vec<String> = err
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(got, fields);
    let info = err.get_details_error_info().expect("ErrorInfo details");
    assert_eq!(info.reason, "INVALID_REQUEST");
    assert_eq!(
        app.count_issuances(creds).await,
        0,
        "a rejected create wrote"
    );

    let ok = grpc
        .create_issuance(authed(token, create_request_pb(corrected)))
        .await
        .expect("corrected retry")
        .into_inner();
    assert_eq!(
        ok.client_request_id,
        str_field(corrected, "client_request_id")
    );
    assert_eq!(app.count_issuances(creds).await, 1);
}

fn unknown_configuration(crid: &str) -> Value {
    let mut b = create_body(crid);
    b["credential_configuration_id"] = json!("no.such.configuration");
    b
}

fn missing_org_identifier(crid: &str) -> Value {
    let mut b = create_body(crid);
    b["payload"]["mandator"]
        .as_object_mut()
        .unwrap()
        .remove("organizationIdentifier");
    b
}

fn malformed_email(crid: &str) -> Value {
    let mut b = create_body(crid);
    b["delivery"] = json!("email");
    b["email"] = json!("ada at acme.example");
    b
}

fn email_delivery_without_email(crid: &str) -> Value {
    let mut b = create_body(crid);
    b["delivery"] = json!("email");
    b
}

fn with_email(crid: &str) -> Value {
    let mut b = create_body(crid);
    b["delivery"] = json!("email");
    b["email"] = json!("ada@acme.example");
    b
}

fn wrong_grant_type(crid: &str) -> Value {
    let mut b = create_body(crid);
    b["grant_type"] = json!("authorization_code");
    b
}

/// A schema-valid payload of about `bytes` bytes (many 128-character actions).
fn big_body(crid: &str, bytes: usize) -> Value {
    let mut b = create_body(crid);
    let action = "a".repeat(128);
    let n = bytes / (action.len() + 3);
    b["payload"]["power"][0]["action"] = json!(vec![action; n]);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_rejects_unknown_credential_configuration() {
    let (_db, app, creds, token) = setup().await;
    let c = "bad-config-1";
    assert_rest_rejects(
        &app,
        &creds,
        &token,
        &unknown_configuration(c),
        &["credential_configuration_id"],
        &create_body(c),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rejects_unknown_credential_configuration() {
    let (_db, app, creds, token) = setup().await;
    let c = "bad-config-1";
    assert_grpc_rejects(
        &app,
        &creds,
        &token,
        &unknown_configuration(c),
        &["credential_configuration_id"],
        &create_body(c),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_rejects_missing_mandator_organization_identifier() {
    let (_db, app, creds, token) = setup().await;
    let c = "missing-org-1";
    assert_rest_rejects(
        &app,
        &creds,
        &token,
        &missing_org_identifier(c),
        &["payload.mandator.organizationIdentifier"],
        &create_body(c),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rejects_missing_mandator_organization_identifier() {
    let (_db, app, creds, token) = setup().await;
    let c = "missing-org-1";
    assert_grpc_rejects(
        &app,
        &creds,
        &token,
        &missing_org_identifier(c),
        &["payload.mandator.organizationIdentifier"],
        &create_body(c),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_rejects_malformed_email() {
    let (_db, app, creds, token) = setup().await;
    let c = "bad-email-1";
    assert_rest_rejects(
        &app,
        &creds,
        &token,
        &malformed_email(c),
        &["email"],
        &with_email(c),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rejects_malformed_email() {
    let (_db, app, creds, token) = setup().await;
    let c = "bad-email-1";
    assert_grpc_rejects(
        &app,
        &creds,
        &token,
        &malformed_email(c),
        &["email"],
        &with_email(c),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_rejects_email_delivery_without_email() {
    let (_db, app, creds, token) = setup().await;
    let c = "no-email-1";
    assert_rest_rejects(
        &app,
        &creds,
        &token,
        &email_delivery_without_email(c),
        &["email"],
        &with_email(c),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rejects_email_delivery_without_email() {
    let (_db, app, creds, token) = setup().await;
    let c = "no-email-1";
    assert_grpc_rejects(
        &app,
        &creds,
        &token,
        &email_delivery_without_email(c),
        &["email"],
        &with_email(c),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_rejects_wrong_grant_type() {
    let (_db, app, creds, token) = setup().await;
    let c = "bad-grant-1";
    let mut corrected = create_body(c);
    corrected["grant_type"] = json!(PRE_AUTH_GRANT);
    assert_rest_rejects(
        &app,
        &creds,
        &token,
        &wrong_grant_type(c),
        &["grant_type"],
        &corrected,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rejects_wrong_grant_type() {
    let (_db, app, creds, token) = setup().await;
    let c = "bad-grant-1";
    let mut corrected = create_body(c);
    corrected["grant_type"] = json!(PRE_AUTH_GRANT);
    assert_grpc_rejects(
        &app,
        &creds,
        &token,
        &wrong_grant_type(c),
        &["grant_type"],
        &corrected,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_rejects_empty_client_request_id() {
    let (_db, app, creds, token) = setup().await;
    assert_rest_rejects(
        &app,
        &creds,
        &token,
        &create_body(""),
        &["client_request_id"],
        &create_body("now-not-empty"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rejects_empty_client_request_id() {
    let (_db, app, creds, token) = setup().await;
    assert_grpc_rejects(
        &app,
        &creds,
        &token,
        &create_body(""),
        &["client_request_id"],
        &create_body("now-not-empty"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_rejects_256_char_client_request_id_and_accepts_255() {
    let (_db, app, creds, token) = setup().await;
    let long = "k".repeat(256);
    let max = "k".repeat(255);
    assert_rest_rejects(
        &app,
        &creds,
        &token,
        &create_body(&long),
        &["client_request_id"],
        &create_body(&max),
    )
    .await;
    let list = json_of(rest_list(&app, &token, &[("client_request_id", &max)]).await).await;
    assert_eq!(list["issuances"][0]["client_request_id"], max.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rejects_256_char_client_request_id_and_accepts_255() {
    let (_db, app, creds, token) = setup().await;
    assert_grpc_rejects(
        &app,
        &creds,
        &token,
        &create_body(&"k".repeat(256)),
        &["client_request_id"],
        &create_body(&"k".repeat(255)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_rejects_malformed_json() {
    let (_db, app, creds, token) = setup().await;
    let res = app
        .http
        .post(app.url("/issuer/api/v1/issuances"))
        .bearer_auth(&token)
        .header(header::CONTENT_TYPE, "application/json")
        .body(r#"{"client_request_id": "bad-json-1", "credential_configuration_id": "#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(content_type(&res), "application/problem+json");
    let problem = json_of(res).await;
    assert_eq!(problem["code"], "invalid_request", "{problem}");
    assert_eq!(problem["status"], 400);
    assert_eq!(app.count_issuances(&creds).await, 0);

    let res = app.create_rest(&token, &create_body("bad-json-1")).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(app.count_issuances(&creds).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_rejects_a_body_over_the_size_limit() {
    let (_db, app, creds, token) = setup().await;
    let limit = app.app.settings.max_body_bytes;
    assert_eq!(limit, 64 * 1024, "the default limit");
    let big = big_body("too-big-1", 100 * 1024);
    let bytes = serde_json::to_vec(&big).unwrap();
    assert!(bytes.len() > limit && bytes.len() < 110 * 1024);

    let res = app
        .http
        .post(app.url("/issuer/api/v1/issuances"))
        .bearer_auth(&token)
        .header(header::CONTENT_TYPE, "application/json")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(content_type(&res), "application/problem+json");
    let problem = json_of(res).await;
    assert_eq!(problem["code"], "payload_too_large", "{problem}");
    assert_eq!(problem["status"], 413);
    assert_eq!(app.count_issuances(&creds).await, 0);

    // The same request under the limit is valid: only the size was refused.
    let res = app
        .create_rest(&token, &big_body("too-big-1", 40 * 1024))
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(app.count_issuances(&creds).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rejects_a_message_over_the_size_limit() {
    let (_db, app, creds, token) = setup().await;
    let mut grpc = app.grpc().await;
    let err = grpc
        .create_issuance(authed(
            &token,
            create_request_pb(&big_body("too-big-1", 100 * 1024)),
        ))
        .await
        .expect_err("an oversized message is refused");
    // Refused for its size (tonic's transport limit says OUT_OF_RANGE; the service's own
    // mapping of `payload_too_large` says RESOURCE_EXHAUSTED), not for its content.
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert_eq!(app.count_issuances(&creds).await, 0);

    let ok = grpc
        .create_issuance(authed(
            &token,
            create_request_pb(&big_body("too-big-1", 40 * 1024)),
        ))
        .await
        .expect("the same request under the limit is accepted")
        .into_inner();
    assert_eq!(ok.client_request_id, "too-big-1");
    assert_eq!(app.count_issuances(&creds).await, 1);
}

/// NUL characters cannot be stored (Postgres refuses them in text and jsonb): a payload string
/// or a list filter holding one is an invalid request naming the field, not a server error.
/// Found by schemathesis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_are_invalid_requests_not_server_errors() {
    let (_db, app, creds, token) = setup().await;
    let mut body = create_body("nul-in-payload");
    body["payload"]["mandatee"]["firstName"] = "Ada\u{0}".into();
    let res = app.create_rest(&token, &body).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let problem = json_of(res).await;
    assert_eq!(
        problem["errors"][0]["field"], "payload.mandatee.firstName",
        "{problem}"
    );

    let err = app
        .grpc()
        .await
        .create_issuance(authed(&token, create_request_pb(&body)))
        .await
        .expect_err("the NUL is refused over gRPC too");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let res = rest_list(&app, &token, &[("client_request_id", "a\u{0}b")]).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let problem = json_of(res).await;
    assert_eq!(
        problem["errors"][0]["field"], "client_request_id",
        "{problem}"
    );
    let res = rest_list(&app, &token, &[("client_request_id", "é")]).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    for path in [
        "/issuer/oid4vci/v1/credential-offer/a%00b",
        "/issuer/offer/a%00b",
        "/issuer/offer/AAAAAAAAAAAAAAAAAAAAAA%00A",
    ] {
        let res = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
    }

    // Nothing was written, and the corrected request creates.
    assert_eq!(app.count_issuances(&creds).await, 0);
    body["payload"]["mandatee"]["firstName"] = "Ada".into();
    assert_eq!(
        app.create_rest(&token, &body).await.status(),
        StatusCode::CREATED
    );
}
