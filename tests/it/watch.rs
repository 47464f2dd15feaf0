//! DESIGN §6 and §10, end to end: `WatchIssuance` and the events endpoint (JSON and SSE) send
//! the history after a sequence, then live events as they commit (across replicas through Redis,
//! in-process on the embedded default), and end after the outcome; resumption, heartbeats,
//! tenancy and scope.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use chrono::{DateTime, SecondsFormat, Utc};
use issuer::grpc::pb::{self, watch_issuance_response::Item};
use issuer_domain::model::Scope;
use serde_json::Value;
use tonic::{Code, Streaming};

use crate::helpers::{
    TestApp, TestDb, authed, create_body, embedded_settings, pg_settings, redis_url,
};

/// Upper bound of any single wait in this module: nothing hangs.
const WAIT: Duration = Duration::from_secs(5);
/// How soon a change made anywhere must reach a watcher.
const LIVE: Duration = Duration::from_secs(1);

async fn within<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
}

// ---------------------------------------------------------------------------------------------
// REST helpers.

async fn create(app: &TestApp, token: &str, label: &str) -> (String, String) {
    let key = format!(
        "{label}-{}",
        issuer_domain::ids::random_token(8).to_lowercase()
    );
    let res = within(WAIT, "create", app.create_rest(token, &create_body(&key))).await;
    assert_eq!(res.status(), 201);
    let issuance: Value = res.json().await.unwrap();
    let id = issuance["issuance_id"].as_str().unwrap().to_owned();
    (id, offer_path(app, &issuance))
}

/// The path (without the instance's base URL) of the offer JSON a wallet fetches, so that it
/// can be fetched through any instance.
fn offer_path(app: &TestApp, issuance: &Value) -> String {
    let uri = issuance["credential_offer_uri"].as_str().unwrap();
    let encoded = uri.split_once("credential_offer_uri=").unwrap().1;
    let url = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .unwrap()
        .into_owned();
    url.strip_prefix(&app.base)
        .unwrap_or_else(|| panic!("offer URL {url} is not under {}", app.base))
        .to_owned()
}

async fn fetch_offer(app: &TestApp, path: &str) {
    let res = within(WAIT, "fetch offer", app.http.get(app.url(path)).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "offer fetch through {}", app.base);
}

async fn cancel(app: &TestApp, token: &str, id: &str) {
    let res = within(
        WAIT,
        "cancel",
        app.http
            .post(app.url(&format!("/issuer/api/v1/issuances/{id}/cancel")))
            .bearer_auth(token)
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200, "cancel through {}", app.base);
}

fn events_url(app: &TestApp, id: &str) -> String {
    app.url(&format!("/issuer/api/v1/issuances/{id}/events"))
}

/// `GET .../events` as JSON with the raw query string `query` (may be empty).
async fn history(app: &TestApp, token: &str, id: &str, query: &str) -> reqwest::Response {
    within(
        WAIT,
        "events JSON",
        app.http
            .get(format!("{}{query}", events_url(app, id)))
            .bearer_auth(token)
            .send(),
    )
    .await
    .unwrap()
}

fn content_type(res: &reqwest::Response) -> String {
    res.headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// (sequence, type, status, reason) of a JSON event.
fn json_summary(e: &Value) -> (i64, String, String, String) {
    (
        e["sequence"].as_i64().unwrap(),
        e["type"].as_str().unwrap().to_owned(),
        e["status"].as_str().unwrap().to_owned(),
        e["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

fn summary(seq: i64, kind: &str, status: &str, reason: &str) -> (i64, String, String, String) {
    (seq, kind.into(), status.into(), reason.into())
}

/// The history of an issuance with events created(1), offer_retrieved(2), cancelled(3).
fn cancelled_history() -> Vec<(i64, String, String, String)> {
    vec![
        summary(1, "created", "pending", ""),
        summary(2, "offer_retrieved", "pending", ""),
        summary(3, "cancelled", "rejected", "cancelled"),
    ]
}

// ---------------------------------------------------------------------------------------------
// gRPC helpers.

type Watch = Streaming<pb::WatchIssuanceResponse>;

async fn watch(app: &TestApp, token: &str, id: &str, after: i64) -> Result<Watch, tonic::Status> {
    let mut client = within(WAIT, "gRPC connect", app.grpc()).await;
    within(
        WAIT,
        "WatchIssuance call",
        client.watch_issuance(authed(
            token,
            pb::WatchIssuanceRequest {
                issuance_id: id.to_owned(),
                after_sequence: after,
            },
        )),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// The next message of a watch within `limit`; `None` once the stream ended cleanly.
async fn next_item(w: &mut Watch, limit: Duration) -> Option<Item> {
    within(limit, "next WatchIssuance message", w.message())
        .await
        .expect("the stream fails no call")
        .map(|m| m.item.expect("a message carries an item"))
}

/// The next event, skipping heartbeats; `None` once the stream ended.
async fn next_event(w: &mut Watch, limit: Duration) -> Option<pb::IssuanceEvent> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_item(w, left).await {
            Some(Item::Event(e)) => return Some(e),
            Some(Item::Heartbeat(_)) => continue,
            None => return None,
        }
    }
}

/// Every remaining event, until the stream ends (which it must within `WAIT`).
async fn drain(w: &mut Watch) -> Vec<pb::IssuanceEvent> {
    let mut out = Vec::new();
    while let Some(e) = next_event(w, WAIT).await {
        out.push(e);
    }
    out
}

/// An event as (sequence, type, status, reason), in the REST words of the enums.
fn pb_summary(e: &pb::IssuanceEvent) -> (i64, String, String, String) {
    let word = |name: &str, prefix: &str| name[prefix.len()..].to_ascii_lowercase();
    (
        e.sequence,
        word(e.event_type().as_str_name(), "EVENT_TYPE_"),
        word(e.state().as_str_name(), "STATE_"),
        e.reason.clone(),
    )
}

/// A gRPC timestamp as the REST API renders times.
fn rfc3339(t: &Option<prost_types::Timestamp>) -> String {
    let t = t.as_ref().expect("timestamp is set");
    DateTime::<Utc>::from_timestamp(t.seconds, t.nanos as u32)
        .expect("valid timestamp")
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

// ---------------------------------------------------------------------------------------------
// SSE, parsed from the raw body.

/// One SSE frame (lines up to a blank line).
#[derive(Debug, Default, Clone)]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    comments: Vec<String>,
}

/// An SSE event with its data parsed, checked for consistency with `id:` and `event:`.
#[derive(Debug, Clone)]
struct SseEvent {
    id: i64,
    data: Value,
}

impl Frame {
    fn parse(text: &str) -> Self {
        let mut f = Frame::default();
        for line in text.lines() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix(':') {
                f.comments
                    .push(comment.strip_prefix(' ').unwrap_or(comment).to_owned());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "id" => f.id = Some(value),
                "event" => f.event = Some(value),
                "data" => f.data.push(value),
                other => panic!("unexpected SSE field {other:?} in {text:?}"),
            }
        }
        f
    }

    fn is_event(&self) -> bool {
        self.id.is_some() || self.event.is_some() || !self.data.is_empty()
    }

    fn event(&self) -> SseEvent {
        let id: i64 = self
            .id
            .as_deref()
            .expect("an event has an id")
            .parse()
            .unwrap();
        let data: Value = serde_json::from_str(&self.data.join("\n")).expect("data is JSON");
        assert_eq!(data["sequence"], id, "id: is the sequence: {self:?}");
        assert_eq!(
            data["type"].as_str(),
            self.event.as_deref(),
            "event: is the type: {self:?}"
        );
        SseEvent { id, data }
    }
}

struct Sse {
    res: reqwest::Response,
    buf: Vec<u8>,
}

/// Requests the SSE stream; `last_event_id` is sent as `Last-Event-ID`.
async fn sse_request(
    app: &TestApp,
    token: &str,
    id: &str,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut req = app
        .http
        .get(events_url(app, id))
        .bearer_auth(token)
        .header("accept", "text/event-stream");
    if let Some(last) = last_event_id {
        req = req.header("last-event-id", last);
    }
    within(WAIT, "SSE request", req.send()).await.unwrap()
}

impl Sse {
    async fn open(app: &TestApp, token: &str, id: &str, last_event_id: Option<&str>) -> Self {
        let res = sse_request(app, token, id, last_event_id).await;
        assert_eq!(res.status(), 200);
        assert!(
            content_type(&res).starts_with("text/event-stream"),
            "{:?}",
            res.headers()
        );
        Self {
            res,
            buf: Vec::new(),
        }
    }

    /// The next frame within `limit`; `None` once the body ended.
    async fn next_frame(&mut self, limit: Duration) -> Option<Frame> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let frame = Frame::parse(std::str::from_utf8(&raw).unwrap());
                if frame.is_event() || !frame.comments.is_empty() {
                    return Some(frame);
                }
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match within(left, "next SSE chunk", self.res.chunk())
                .await
                .expect("the SSE body fails no read")
            {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => {
                    assert!(
                        self.buf.iter().all(u8::is_ascii_whitespace),
                        "incomplete frame at the end: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    );
                    return None;
                }
            }
        }
    }

    /// The next event, skipping comments (heartbeats); `None` once the body ended.
    async fn next_event(&mut self, limit: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                Some(f) if f.is_event() => return Some(f.event()),
                Some(_) => continue,
                None => return None,
            }
        }
    }

    async fn drain(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event(WAIT).await {
            out.push(e);
        }
        out
    }
}

fn sse_summary(e: &SseEvent) -> (i64, String, String, String) {
    json_summary(&e.data)
}

// ---------------------------------------------------------------------------------------------
// 1. Across replicas.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_through_replica_b_reaches_a_watcher_on_replica_a_within_a_second() {
    let db = TestDb::new().await;
    let a = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let b = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let creds = a.provision(&Scope::ALL).await;
    // Each instance only accepts tokens issued under its own public URL.
    let token_a = a.token(&creds).await;
    let token_b = b.token(&creds).await;
    let (id, offer) = create(&a, &token_a, "two-replicas").await;

    let mut w = watch(&a, &token_a, &id, 0).await.unwrap();
    let first = next_event(&mut w, WAIT).await.expect("the history");
    assert_eq!(pb_summary(&first), summary(1, "created", "pending", ""));
    assert_eq!(first.issuance_id, id);

    // The wallet fetches the offer through B: A's watcher sees it live.
    fetch_offer(&b, &offer).await;
    let fetched = Instant::now();
    let retrieved = next_event(&mut w, WAIT)
        .await
        .expect("offer_retrieved arrives on A");
    let latency = fetched.elapsed();
    assert_eq!(
        pb_summary(&retrieved),
        summary(2, "offer_retrieved", "pending", "")
    );
    assert!(
        latency < LIVE,
        "offer_retrieved reached A after {latency:?}"
    );

    // Cancelled through B: A's watcher gets the outcome within a second, then the stream ends.
    cancel(&b, &token_b, &id).await;
    let cancelled_at = Instant::now();
    let outcome = next_event(&mut w, WAIT)
        .await
        .expect("cancelled arrives on A");
    let latency = cancelled_at.elapsed();
    assert_eq!(
        pb_summary(&outcome),
        summary(3, "cancelled", "rejected", "cancelled")
    );
    assert_eq!(outcome.issuance_id, id);
    assert!(outcome.occurred_at.is_some());
    assert!(latency < LIVE, "cancelled reached A after {latency:?}");
    assert!(
        next_item(&mut w, WAIT).await.is_none(),
        "the stream ends after the outcome"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Resumption.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_a_sequence_and_ends_at_the_outcome() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let (id, offer) = create(&app, &token, "resume").await;
    fetch_offer(&app, &offer).await;
    cancel(&app, &token, &id).await;
    let all = cancelled_history();

    let mut w = watch(&app, &token, &id, 1).await.unwrap();
    let got: Vec<_> = drain(&mut w).await.iter().map(pb_summary).collect();
    assert_eq!(got, all[1..], "after 1");

    let mut w = watch(&app, &token, &id, 2).await.unwrap();
    let got: Vec<_> = drain(&mut w).await.iter().map(pb_summary).collect();
    assert_eq!(got, all[2..], "after 2");

    // After the outcome: nothing, at once.
    let started = Instant::now();
    let mut w = watch(&app, &token, &id, 3).await.unwrap();
    assert!(next_item(&mut w, WAIT).await.is_none(), "after 3");
    assert!(
        started.elapsed() < LIVE,
        "resuming after the outcome ends at once, not after {:?}",
        started.elapsed()
    );

    let mut w = watch(&app, &token, &id, 0).await.unwrap();
    let got: Vec<_> = drain(&mut w).await.iter().map(pb_summary).collect();
    assert_eq!(got, all, "after 0");
}

// ---------------------------------------------------------------------------------------------
// 3. Tenancy and scope.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_refuses_other_tenants_malformed_ids_and_missing_scope() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let (id, _) = create(&app, &token, "tenancy").await;
    let (_, other) = app.tenant_token().await;

    let err = watch(&app, &other, &id, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let res = history(&app, &other, &id, "").await;
    assert_eq!(res.status(), 404);
    let res = sse_request(&app, &other, &id, None).await;
    assert_eq!(res.status(), 404);
    assert!(
        !content_type(&res).starts_with("text/event-stream"),
        "no stream is opened"
    );

    // A malformed id, and a well-formed one that does not exist.
    let unknown = issuer_domain::ids::IssuanceId::new().to_string();
    for bad in ["not-an-id", unknown.as_str()] {
        let err = watch(&app, &token, bad, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{bad}: {err:?}");
        assert_eq!(history(&app, &token, bad, "").await.status(), 404, "{bad}");
        assert_eq!(
            sse_request(&app, &token, bad, None).await.status(),
            404,
            "{bad}"
        );
    }

    let writer = app.provision(&[Scope::IssuanceWrite]).await;
    let writer_token = app.token(&writer).await;
    let (mine, _) = create(&app, &writer_token, "no-read-scope").await;
    let err = watch(&app, &writer_token, &mine, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let res = history(&app, &writer_token, &mine, "").await;
    assert_eq!(res.status(), 403);
    assert_eq!(
        res.json::<Value>().await.unwrap()["code"],
        "insufficient_scope"
    );
    assert_eq!(
        sse_request(&app, &writer_token, &mine, None).await.status(),
        403
    );

    // No token at all.
    let mut client = app.grpc().await;
    let err = within(
        WAIT,
        "unauthenticated watch",
        client.watch_issuance(pb::WatchIssuanceRequest {
            issuance_id: id.clone(),
            after_sequence: 0,
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. Heartbeats.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_receive_heartbeats_and_stay_live() {
    let db = TestDb::new().await;
    let mut settings = pg_settings(&db.url, Some(&redis_url()));
    settings.watch_heartbeat_secs = 1;
    let app = TestApp::spawn(settings).await;
    let (_, token) = app.tenant_token().await;
    let (id, _) = create(&app, &token, "heartbeat").await;

    let mut w = watch(&app, &token, &id, 0).await.unwrap();
    let mut sse = Sse::open(&app, &token, &id, None).await;
    match next_item(&mut w, WAIT).await {
        Some(Item::Event(e)) => assert_eq!(e.event_type(), pb::EventType::Created),
        other => panic!("expected the created event, got {other:?}"),
    }
    assert_eq!(
        sse_summary(&sse.next_event(WAIT).await.unwrap()),
        summary(1, "created", "pending", "")
    );

    // gRPC: Heartbeat messages, about a second apart.
    let opened = Instant::now();
    let mut beats = Vec::new();
    while beats.len() < 2 {
        match next_item(&mut w, Duration::from_secs(3)).await {
            Some(Item::Heartbeat(h)) => {
                assert!(h.at.is_some(), "a heartbeat carries its time");
                beats.push(opened.elapsed());
            }
            other => panic!("expected a heartbeat within 3 s, got {other:?}"),
        }
    }
    assert!(
        beats[1] - beats[0] >= Duration::from_millis(500),
        "heartbeats follow the interval: {beats:?}"
    );

    // SSE: `: heartbeat` comment lines.
    let frame = sse
        .next_frame(Duration::from_secs(3))
        .await
        .expect("the SSE stream stays open");
    assert!(!frame.is_event(), "no event happened: {frame:?}");
    assert_eq!(frame.comments, ["heartbeat"]);

    // Both streams are still live after idling.
    cancel(&app, &token, &id).await;
    assert_eq!(
        pb_summary(&next_event(&mut w, WAIT).await.unwrap()),
        summary(2, "cancelled", "rejected", "cancelled")
    );
    assert!(next_item(&mut w, WAIT).await.is_none());
    assert_eq!(
        sse.drain()
            .await
            .iter()
            .map(sse_summary)
            .collect::<Vec<_>>(),
        [summary(2, "cancelled", "rejected", "cancelled")]
    );
}

// ---------------------------------------------------------------------------------------------
// 5. SSE.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_the_same_events_as_grpc() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let (id, offer) = create(&app, &token, "sse-same").await;

    let mut w = watch(&app, &token, &id, 0).await.unwrap();
    let mut sse = Sse::open(&app, &token, &id, None).await;
    // Both have delivered the history before anything changes, so the rest is live.
    assert_eq!(next_event(&mut w, WAIT).await.unwrap().sequence, 1);
    let first = sse.next_event(WAIT).await.unwrap();
    assert_eq!(first.id, 1);
    fetch_offer(&app, &offer).await;
    cancel(&app, &token, &id).await;

    let mut grpc_events = vec![];
    grpc_events.extend(drain(&mut w).await);
    let mut sse_events = vec![first];
    sse_events.extend(sse.drain().await);

    let all = cancelled_history();
    assert_eq!(sse_events.iter().map(sse_summary).collect::<Vec<_>>(), all);
    assert_eq!(
        grpc_events.iter().map(pb_summary).collect::<Vec<_>>(),
        all[1..]
    );
    for (s, g) in sse_events[1..].iter().zip(&grpc_events) {
        assert_eq!(s.data["issuance_id"], g.issuance_id);
        assert_eq!(
            s.data["occurred_at"].as_str().unwrap(),
            rfc3339(&g.occurred_at)
        );
    }
    // And the same as the JSON history.
    let res = history(&app, &token, &id, "").await;
    assert_eq!(res.status(), 200);
    let json: Value = res.json().await.unwrap();
    let listed: Vec<Value> = json["events"].as_array().unwrap().clone();
    assert_eq!(
        listed,
        sse_events
            .iter()
            .map(|e| e.data.clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_reconnects_with_last_event_id_without_gap_or_repeat() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let (id, offer) = create(&app, &token, "sse-resume").await;

    let mut sse = Sse::open(&app, &token, &id, None).await;
    let first = sse.next_event(WAIT).await.unwrap();
    assert_eq!(sse_summary(&first), summary(1, "created", "pending", ""));
    drop(sse);

    // While disconnected.
    fetch_offer(&app, &offer).await;
    cancel(&app, &token, &id).await;

    let mut sse = Sse::open(&app, &token, &id, Some(&first.id.to_string())).await;
    let got: Vec<_> = sse.drain().await.iter().map(sse_summary).collect();
    assert_eq!(
        got,
        cancelled_history()[1..],
        "exactly 2 and 3, then the end"
    );

    // Reconnecting after the outcome ends at once with nothing.
    let mut sse = Sse::open(&app, &token, &id, Some("3")).await;
    assert!(sse.next_frame(WAIT).await.is_none());
}

// ---------------------------------------------------------------------------------------------
// 6. JSON history.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_history_in_order_after_a_sequence() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let (id, offer) = create(&app, &token, "json-history").await;

    let res = history(&app, &token, &id, "").await;
    assert_eq!(res.status(), 200);
    assert!(content_type(&res).starts_with("application/json"));
    let json: Value = res.json().await.unwrap();
    let events = json["events"].as_array().unwrap();
    assert_eq!(
        events.iter().map(json_summary).collect::<Vec<_>>(),
        [summary(1, "created", "pending", "")]
    );
    assert!(
        events[0]["reason"].is_null(),
        "no reason while pending: {}",
        events[0]
    );

    fetch_offer(&app, &offer).await;
    cancel(&app, &token, &id).await;
    let json: Value = history(&app, &token, &id, "").await.json().await.unwrap();
    let events = json["events"].as_array().unwrap();
    assert_eq!(
        events.iter().map(json_summary).collect::<Vec<_>>(),
        cancelled_history()
    );
    for e in events {
        assert_eq!(e["issuance_id"], id.as_str());
        let at = e["occurred_at"].as_str().unwrap();
        assert!(
            DateTime::parse_from_rfc3339(at).is_ok() && at.ends_with('Z'),
            "{at}"
        );
    }
    let times: Vec<&str> = events
        .iter()
        .map(|e| e["occurred_at"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    let json: Value = history(&app, &token, &id, "?after=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        json["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(json_summary)
            .collect::<Vec<_>>(),
        cancelled_history()[2..]
    );
    let json: Value = history(&app, &token, &id, "?after=3")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(json["events"], serde_json::json!([]));

    let res = history(&app, &token, &id, "?after=x").await;
    assert_eq!(res.status(), 400);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["code"], "invalid_request", "{problem}");
    assert_eq!(problem["errors"][0]["field"], "after", "{problem}");
}

// ---------------------------------------------------------------------------------------------
// 7. The embedded default, and the sweeper's outcome.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_streams_a_live_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(dir.path())).await;
    let (_, token) = app.tenant_token().await;
    let (id, _) = create(&app, &token, "embedded").await;

    let mut w = watch(&app, &token, &id, 0).await.unwrap();
    let mut sse = Sse::open(&app, &token, &id, None).await;
    assert_eq!(
        pb_summary(&next_event(&mut w, WAIT).await.unwrap()),
        summary(1, "created", "pending", "")
    );
    assert_eq!(sse.next_event(WAIT).await.unwrap().id, 1);

    cancel(&app, &token, &id).await;
    let cancelled_at = Instant::now();
    let outcome = next_event(&mut w, WAIT).await.expect("the live cancel");
    assert!(
        cancelled_at.elapsed() < LIVE,
        "after {:?}",
        cancelled_at.elapsed()
    );
    assert_eq!(
        pb_summary(&outcome),
        summary(2, "cancelled", "rejected", "cancelled")
    );
    assert!(next_item(&mut w, WAIT).await.is_none(), "the stream ends");
    assert_eq!(
        sse.drain()
            .await
            .iter()
            .map(sse_summary)
            .collect::<Vec<_>>(),
        [summary(2, "cancelled", "rejected", "cancelled")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_the_sweeper_expire_the_issuance() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let mut body = create_body("watch-expiry");
    body["expires_in"] = 2.into();
    let res = app.create_rest(&token, &body).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["issuance_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let opened = Instant::now();
    let mut w = watch(&app, &token, &id, 0).await.unwrap();
    assert_eq!(
        next_event(&mut w, WAIT).await.unwrap().event_type(),
        pb::EventType::Created
    );
    // Heartbeats are 15 s apart by default, so only a live announcement arrives in time.
    let outcome = next_event(&mut w, WAIT)
        .await
        .expect("expired within 5 s of the watch opening");
    assert_eq!(
        pb_summary(&outcome),
        summary(2, "expired", "rejected", "expired")
    );
    assert!(
        opened.elapsed() >= LIVE,
        "the expiry came live, not in the history ({:?})",
        opened.elapsed()
    );
    assert!(next_item(&mut w, WAIT).await.is_none(), "the stream ends");
}

/// A resume point past the end of the log (a client's stale or made-up sequence) must not hide
/// the events still to come: the stream continues from the real end and still ends at the
/// outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_past_the_end_still_delivers_the_outcome() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let (_, token) = app.tenant_token().await;
    let created: Value = app
        .create_rest(&token, &create_body("watch-past-end"))
        .await
        .json()
        .await
        .unwrap();
    let id = created["issuance_id"].as_str().unwrap().to_owned();
    let mut stream = app
        .grpc()
        .await
        .watch_issuance(authed(
            &token,
            pb::WatchIssuanceRequest {
                issuance_id: id.clone(),
                after_sequence: 5,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let res = app.cancel_rest(&token, id).await;
    assert_eq!(res.status(), 200);
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the outcome arrives")
        .unwrap()
        .expect("a message");
    match msg.item {
        Some(Item::Event(e)) => {
            assert_eq!((e.sequence, e.event_type()), (2, pb::EventType::Cancelled))
        }
        other => panic!("expected the cancelled event, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("ends");
    assert!(matches!(end, Ok(None)), "the stream ends after the outcome");
}
