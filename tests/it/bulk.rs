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

/// 100 batches of the same 20 keys (each in another order) arrive together, spread over the
/// `replicas` (sharing Postgres and Redis, or the embedded default's one instance): each key
/// is created exactly once, and every other answer is a replay of that issuance.
async fn concurrent_duplicate_batches(replicas: &[&TestApp]) {
    const KEYS: usize = 20;
    const BATCHES: usize = 100;
    let creds = replicas[0].provision(&Scope::ALL).await;
    let keys: Vec<String> = (0..KEYS).map(|k| format!("dup-{k}")).collect();
    let per_replica = BATCHES / replicas.len();
    // Each replica is its own audience: a token from each.
    let tokens = futures::future::join_all(replicas.iter().map(|app| app.token(&creds))).await;
    let races = replicas
        .iter()
        .zip(&tokens)
        .enumerate()
        .map(|(r, (app, token))| {
            let requests = (0..per_replica)
                .map(|b| {
                    let mut items: Vec<Value> = keys.iter().map(|k| create_body(k)).collect();
                    items.rotate_left((r * per_replica + b) % KEYS);
                    crate::helpers::raw_json_post(BATCH, token, &json!({ "issuances": items }))
                })
                .collect();
            crate::helpers::race_http1(app.addr, requests)
        });
    let answers: Vec<(u16, String)> = futures::future::join_all(races)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(answers.len(), BATCHES);
    let mut created: std::collections::HashMap<String, String> = Default::default();
    let mut replayed: Vec<(String, String)> = Vec::new();
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        for r in answer["results"].as_array().unwrap() {
            let key = r["issuance"]["client_request_id"]
                .as_str()
                .unwrap()
                .to_owned();
            let id = r["issuance"]["issuance_id"].as_str().unwrap().to_owned();
            match r["status"].as_u64() {
                Some(201) => assert!(
                    created.insert(key.clone(), id).is_none(),
                    "{key} was created twice"
                ),
                Some(200) => replayed.push((key, id)),
                other => panic!("unexpected item status {other:?}: {r}"),
            }
        }
    }
    assert_eq!(created.len(), KEYS, "every key is created once");
    assert_eq!(replayed.len(), KEYS * (BATCHES - 1));
    for (key, id) in replayed {
        assert_eq!(
            created[&key], id,
            "a replay of {key} carries the created issuance"
        );
    }
    assert_eq!(replicas[0].count_issuances(&creds).await, KEYS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_batches_across_two_replicas() {
    let db = TestDb::new().await;
    let a = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let b = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    concurrent_duplicate_batches(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_batches_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    concurrent_duplicate_batches(&[&app]).await;
}

/// The items of an import: `n` keys, a bad item at 10 and, last, a repeat of the first.
fn import_items(n: usize) -> Vec<issuer::grpc::pb::CreateIssuanceRequest> {
    use crate::helpers::create_request_pb;
    let mut items: Vec<_> = (0..n - 1)
        .map(|i| {
            let mut body = create_body(&format!("imp-{i}"));
            if i == 10 {
                body["payload"]["mandatee"]["email"] = json!("not an address");
            }
            create_request_pb(&body)
        })
        .collect();
    items.push(items[0].clone());
    items
}

/// `ImportIssuances`: a stream cut after some answers and then sent again from the start gets
/// replays for what was done and creates the rest, one issuance per key; answers come in
/// input order with their index; a bad item fails alone.
async fn import_stream_cut_and_resumed(app: &TestApp) {
    use issuer::grpc::pb::import_issuances_response::Outcome;

    use crate::helpers::authed;

    const N: usize = 600;
    const CUT: usize = 250;
    let (creds, token) = app.tenant_token().await;
    let mut grpc = app.grpc().await;

    let res = grpc
        .import_issuances(authed(&token, futures::stream::iter(import_items(N))))
        .await
        .expect("ImportIssuances");
    let batch_id = res
        .metadata()
        .get("batch-id")
        .expect("the stream's batch id")
        .to_str()
        .unwrap()
        .to_owned();
    let mut answers = res.into_inner();
    let mut first = Vec::new();
    while first.len() < CUT {
        first.push(answers.message().await.unwrap().expect("an answer"));
    }
    // The client goes away midway.
    drop(answers);
    for (i, a) in first.iter().enumerate() {
        assert_eq!(a.index, i as i64, "answers come in input order");
        match (&a.outcome, i) {
            (Some(Outcome::Error(e)), 10) => {
                assert_eq!(e.field_violations[0].field, "payload.mandatee.email")
            }
            (Some(Outcome::Issuance(issuance)), _) => {
                assert_ne!(i, 10);
                assert_eq!(issuance.client_request_id, format!("imp-{i}"));
                assert_eq!(issuance.batch_id, batch_id);
                assert!(!a.replayed);
            }
            other => panic!("item {i}: {other:?}"),
        }
    }

    // The whole input again.
    let mut answers = grpc
        .import_issuances(authed(&token, futures::stream::iter(import_items(N))))
        .await
        .expect("ImportIssuances again")
        .into_inner();
    let mut second = Vec::new();
    while let Some(a) = answers.message().await.expect("the stream ends cleanly") {
        second.push(a);
    }
    assert_eq!(second.len(), N, "one answer per item");
    let mut ids = std::collections::HashMap::new();
    for (i, a) in second.iter().enumerate() {
        assert_eq!(a.index, i as i64, "answers come in input order");
        match &a.outcome {
            Some(Outcome::Error(e)) => {
                assert_eq!(i, 10, "only the bad item fails: {e:?}");
                assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
            }
            Some(Outcome::Issuance(issuance)) => {
                if i < CUT {
                    assert!(a.replayed, "item {i} was done before the cut");
                    let Some(Outcome::Issuance(before)) = &first[i].outcome else {
                        unreachable!()
                    };
                    assert_eq!(issuance.issuance_id, before.issuance_id);
                }
                let id = ids
                    .entry(issuance.client_request_id.clone())
                    .or_insert_with(|| issuance.issuance_id.clone());
                assert_eq!(*id, issuance.issuance_id, "one issuance per key");
            }
            None => panic!("item {i} has no outcome"),
        }
    }
    assert!(
        second[N - 1].replayed,
        "a key repeated in the stream replays"
    );
    assert_eq!(app.count_issuances(&creds).await, N - 2);

    // A client that may not create is refused before anything is read.
    let reader = app.provision(&[Scope::IssuanceRead]).await;
    let reader = app.token(&reader).await;
    let err = grpc
        .import_issuances(authed(&reader, futures::stream::iter(import_items(3))))
        .await
        .expect_err("no issuance:write");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_stream_cut_and_resumed_on_postgres() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    import_stream_cut_and_resumed(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_stream_cut_and_resumed_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    import_stream_cut_and_resumed(&app).await;
}

/// Runs `issuer import` against `app` with `creds`; its exit code and JSON summary.
async fn run_import(
    app: &TestApp,
    creds: &crate::helpers::Creds,
    file: &std::path::Path,
) -> (i32, Value) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_issuer"))
        .env_clear()
        .env("ISSUER_URL", &app.base)
        .env("ISSUER_CLIENT_ID", &creds.client_id)
        .env("ISSUER_CLIENT_SECRET", &creds.client_secret)
        .env("ISSUER_LOG_LEVEL", "warn")
        .args(["import", file.to_str().unwrap(), "--progress", "lines"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .unwrap();
    let summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON summary ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code().unwrap(), summary)
}

fn results_of(file: &std::path::Path) -> Vec<Value> {
    let mut name = file.file_name().unwrap().to_os_string();
    name.push(".results.jsonl");
    std::fs::read_to_string(file.with_file_name(name))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(line, status)` of each result, and each success's key.
fn lines_and_statuses(results: &[Value]) -> Vec<(u64, u64)> {
    results
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["status"].as_u64().unwrap()))
        .collect()
}

/// `issuer import` on a CSV and a JSONL file with good and bad lines, run twice: the first run
/// creates the good lines and reports each bad one with its problem; the second replays the
/// good ones; both exit 1 (some lines failed) and leave one issuance per good key.
async fn import_command_runs_twice(app: &TestApp) {
    let creds = app.provision(&Scope::ALL).await;
    let dir = tempfile::tempdir().unwrap();
    let body = |key: &str| {
        let mut b = create_body(key);
        b["delivery"] = json!("qr");
        b
    };

    // CSV: the header is line 1; a bad address, then a record with a cell too many.
    let csv = dir.path().join("staff.csv");
    let power = r#""[{""type"": ""Domain"", ""domain"": ""DOME"", ""function"": ""Onboarding"", ""action"": [""Execute""]}]""#;
    let row = |key: &str, email: &str| {
        format!(
            "{key},learcredential.employee.sd.1,qr,VATES-B12345678,Acme Corp,Jane Boss,boss@acme.example,ES,Ada,Lovelace,{email},{power}\n"
        )
    };
    let mut text = String::from(
        "client_request_id,credential_configuration_id,delivery,payload.mandator.organizationIdentifier,\
         payload.mandator.organization,payload.mandator.commonName,payload.mandator.email,\
         payload.mandator.country,payload.mandatee.firstName,payload.mandatee.lastName,\
         payload.mandatee.email,payload.power\n",
    );
    text += &row("csv-1", "ada@acme.example");
    text += &row("csv-2", "not an address");
    text += &row("csv-3", "grace@acme.example");
    text += &row("csv-4", "alan@acme.example").replace('\n', ",extra\n");
    text += &row("csv-5", "alan@acme.example");
    std::fs::write(&csv, text).unwrap();

    // JSONL: not JSON, a field of the wrong type, a blank line, an unknown delivery word.
    let jsonl = dir.path().join("staff.jsonl");
    let mut wrong_type = body("jl-3");
    wrong_type["expires_in"] = json!("soon");
    let mut unknown = body("jl-5");
    unknown["delivery"] = json!("pigeon");
    let lines = [
        body("jl-1").to_string(),
        "{not json".to_owned(),
        wrong_type.to_string(),
        String::new(),
        body("jl-4").to_string(),
        unknown.to_string(),
        body("jl-6").to_string(),
    ];
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();

    for run in 0..2 {
        let good = if run == 0 { 201 } else { 200 };
        let (code, summary) = run_import(app, &creds, &csv).await;
        assert_eq!(code, 1, "some lines failed: {summary}");
        assert_eq!(summary["failed"], 2, "{summary}");
        let results = results_of(&csv);
        assert_eq!(
            lines_and_statuses(&results),
            [(2, good), (3, 400), (4, good), (5, 400), (6, good)],
            "run {run}: {results:?}"
        );
        assert_eq!(
            results[1]["problem"]["errors"][0]["field"],
            "payload.mandatee.email"
        );
        assert_eq!(results[3]["client_request_id"], "csv-4");
        assert!(
            results[0]["credential_offer_uri"]
                .as_str()
                .unwrap()
                .starts_with("openid-credential-offer://")
        );

        let (code, summary) = run_import(app, &creds, &jsonl).await;
        assert_eq!(code, 1, "some lines failed: {summary}");
        let results = results_of(&jsonl);
        assert_eq!(
            lines_and_statuses(&results),
            [
                (1, good),
                (2, 400),
                (3, 400),
                (5, good),
                (6, 400),
                (7, good)
            ],
            "run {run}: {results:?}"
        );
        assert_eq!(results[2]["problem"]["errors"][0]["field"], "expires_in");
        assert_eq!(
            results[4]["problem"]["code"], "invalid_request",
            "the service refused it"
        );
    }
    assert_eq!(
        app.count_issuances(&creds).await,
        6,
        "one issuance per good line"
    );

    // The README's example files import cleanly.
    for example in ["staff.csv", "staff.jsonl"] {
        let file = dir.path().join(example);
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        std::fs::copy(source.join(example), &file).unwrap();
        let (code, summary) = run_import(app, &creds, &file).await;
        assert_eq!(code, 0, "{example}: {summary}");
        assert_eq!(summary["failed"], 0, "{example}: {summary}");
    }
    assert_eq!(app.count_issuances(&creds).await, 11);

    // Wrong credentials: nothing runs, exit 2.
    let wrong = crate::helpers::Creds {
        client_secret: "wrong".into(),
        ..creds.clone()
    };
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_issuer"))
        .env_clear()
        .env("ISSUER_URL", &app.base)
        .env("ISSUER_CLIENT_ID", &wrong.client_id)
        .env("ISSUER_CLIENT_SECRET", &wrong.client_secret)
        .args(["import", jsonl.to_str().unwrap(), "--progress", "none"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_command_runs_twice_on_postgres() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    import_command_runs_twice(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_command_runs_twice_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    import_command_runs_twice(&app).await;
}

/// Calls of Lua scripts and `EXISTS` (the lock's and the rate limiter's commands) a Redis has
/// served since its statistics were last reset, and resets them.
async fn script_calls(redis: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(redis)
        .await
        .unwrap();
    info.lines()
        .filter(|l| {
            ["cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_exists:"]
                .iter()
                .any(|c| l.starts_with(c))
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A batch takes the idempotency locks of all its items in one round trip (and releases them
/// in one): a batch of 300 costs Redis as many calls as a batch of 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_takes_its_locks_in_one_round_trip() {
    let redis = crate::idempotency::RedisProcess::start().await;
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis.url()))).await;
    let (_, token) = app.tenant_token().await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let post = |prefix: &'static str, n: usize| {
        let items: Vec<Value> = (0..n)
            .map(|i| create_body(&format!("{prefix}-{i}")))
            .collect();
        let (app, token) = (&app, &token);
        async move {
            let res = batch(app, token, &json!({ "issuances": items })).await;
            assert_eq!(res.status(), StatusCode::OK);
            let answer: Value = res.json().await.unwrap();
            assert!(statuses(&answer).iter().all(|s| *s == 201), "{answer}");
        }
    };
    // Loads the scripts, so that every call below is one EVALSHA.
    post("warm", 1).await;
    script_calls(&mut conn).await;
    post("small", 10).await;
    let small = script_calls(&mut conn).await;
    post("large", 300).await;
    let large = script_calls(&mut conn).await;
    assert_eq!(
        large, small,
        "a batch of 300 took {large} Redis calls, a batch of 10 took {small}"
    );
    assert!(small <= 3, "rate limit, acquire, release: {small} calls");
}
