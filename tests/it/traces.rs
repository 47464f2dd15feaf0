//! OpenTelemetry: the real binary exports spans over OTLP gRPC to a collector the test runs
//! (the collector's trace service from the published OTLP protos), continues the callers'
//! traces, and hands the trace on to webhook receivers.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::HeaderMap, routing::post};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::Span,
};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::helpers::{ServiceProcess, TestDb, create_body, create_request_pb, token_request};

/// What the collector received: every span with its resource's `service.name`.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text(v: &Option<AnyValue>) -> Option<String> {
    match v.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(&kv.value))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    async fn start(self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let router = tonic::service::Routes::new(TraceServiceServer::new(self)).into_axum_router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        endpoint
    }

    fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace_id)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Waits until the trace holds spans named as in `names`; returns the trace.
    async fn wait_for(&self, trace_id: &str, names: &[&str]) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.trace(trace_id);
            let have: HashSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
            if names.iter().all(|n| have.contains(n)) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id} lacks some of {names:?}; it has {have:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Every span of `trace` descends from the span with id `root` (the caller's).
fn assert_tree(trace: &[Span], root: &str) {
    let ids: HashSet<String> = trace.iter().map(|s| hex(&s.span_id)).collect();
    for s in trace {
        let parent = hex(&s.parent_span_id);
        assert!(
            parent == root || ids.contains(&parent),
            "span {} has parent {parent}, outside the trace",
            s.name
        );
    }
}

fn named<'a>(trace: &'a [Span], name: &str) -> &'a Span {
    trace
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name}"))
}

/// A webhook request as received: its `traceparent` header and its JSON body.
type Received = (Option<String>, Value);

/// A webhook receiver that keeps each request's `traceparent` and body.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: String) -> &'static str {
    let tp = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    r.got
        .lock()
        .unwrap()
        .push((tp, serde_json::from_str(&body).unwrap_or(Value::Null)));
    "ok"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_grpc_and_webhooks_share_the_callers_trace_in_the_otlp_export() {
    let db = TestDb::new().await;
    let collector = Collector::default();
    let endpoint = collector.clone().start().await;
    let receiver = Receiver::default();
    let hooks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", hooks.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(hooks, app).await });

    let mut service = ServiceProcess::start(
        &db.url,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("ISSUER_WEBHOOK_ALLOW_NETWORKS", "127.0.0.0/8"),
            ("ISSUER_LOG_LEVEL", "info"),
            ("ISSUER_LOG_FORMAT", "json"),
        ],
        true,
    )
    .await;
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut lines = tokio::io::BufReader::new(service.child.stdout.take().unwrap()).lines();
    tokio::spawn({
        let logs = logs.clone();
        async move {
            while let Ok(Some(line)) = lines.next_line().await {
                logs.lock().unwrap().push(line);
            }
        }
    });
    let creds = service
        .provision("issuance:write,issuance:read,webhooks:manage")
        .await;
    let http = reqwest::Client::new();

    // The token request, traced by the caller: its log line carries the caller's trace id.
    let token_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = token_request(&http, &service.base, &creds)
        .header(
            "traceparent",
            format!("00-{token_trace}-00f067aa0ba902b7-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let token = res.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = http
        .post(format!("{}/issuer/api/v1/webhook-endpoints", service.base))
        .bearer_auth(&token)
        .json(&json!({"url": hook_url, "event_types": ["issuance.created"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{:?}", res.text().await);

    // A REST create in the caller's trace.
    let rest_trace = "0af7651916cd43dd8448eb211c80319c";
    let rest_parent = "b7ad6b7169203331";
    let res = http
        .post(format!("{}/issuer/api/v1/issuances", service.base))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{rest_trace}-{rest_parent}-01"))
        .json(&create_body("traced-rest"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();

    // A gRPC create in another trace, given in the metadata.
    let grpc_trace = "5d4e3c2b1a0918273645546372819000";
    let grpc_parent = "1122334455667788";
    let channel = tonic::transport::Channel::from_shared(service.base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = issuer::grpc::pb::issuance_service_client::IssuanceServiceClient::new(channel);
    let mut req = tonic::Request::new(create_request_pb(&create_body("traced-grpc")));
    let md = req.metadata_mut();
    md.insert("authorization", format!("Bearer {token}").parse().unwrap());
    md.insert(
        "traceparent",
        format!("00-{grpc_trace}-{grpc_parent}-01").parse().unwrap(),
    );
    grpc.create_issuance(req).await.expect("gRPC create");

    // The REST trace: the server span under the caller's span, with the store and Redis
    // below it, then the webhook attempt.
    let trace = collector
        .wait_for(
            rest_trace,
            &[
                "POST /issuer/api/v1/issuances",
                "store.insert_issuances",
                "redis.lock.acquire",
                "redis.lock.release",
                "webhook.deliver",
            ],
        )
        .await;
    assert_tree(&trace, rest_parent);
    let server = named(&trace, "POST /issuer/api/v1/issuances");
    assert_eq!(hex(&server.parent_span_id), rest_parent);
    assert_eq!(
        attr(&server.attributes, "http.response.status_code").as_deref(),
        Some("201")
    );
    assert_eq!(
        attr(&server.attributes, "http.route").as_deref(),
        Some("/issuer/api/v1/issuances")
    );
    let store = named(&trace, "store.insert_issuances");
    assert_eq!(
        attr(&store.attributes, "db.system").as_deref(),
        Some("postgresql")
    );
    assert_eq!(
        attr(&named(&trace, "redis.lock.acquire").attributes, "db.system").as_deref(),
        Some("redis")
    );

    // The webhook the create caused reached the receiver in the same trace: its traceparent
    // names the attempt's span.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (tp, payload) = loop {
        if let Some(got) = receiver.got.lock().unwrap().first().cloned() {
            break got;
        }
        assert!(Instant::now() < deadline, "no webhook arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(payload["data"]["issuance_id"], created["issuance_id"]);
    let tp = tp.expect("the webhook carries a traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(
        parts[1], rest_trace,
        "the webhook continues the create's trace"
    );
    let attempt = named(&trace, "webhook.deliver");
    assert_eq!(parts[2], hex(&attempt.span_id));
    assert_eq!(
        attr(&attempt.attributes, "http.response.status_code").as_deref(),
        Some("200")
    );

    // The gRPC trace likewise.
    let trace = collector
        .wait_for(
            grpc_trace,
            &[
                "issuer.v1.IssuanceService/CreateIssuance",
                "store.insert_issuances",
                "redis.lock.acquire",
            ],
        )
        .await;
    assert_tree(&trace, grpc_parent);
    let server = named(&trace, "issuer.v1.IssuanceService/CreateIssuance");
    assert_eq!(hex(&server.parent_span_id), grpc_parent);
    assert_eq!(
        attr(&server.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        attr(&server.attributes, "rpc.grpc.status_code").as_deref(),
        Some("0")
    );

    // Resource and privacy: every span says it is the issuer, and no attribute or span event
    // holds a payload value or an address.
    let spans = collector.spans.lock().unwrap().clone();
    assert!(spans.iter().all(|(service, _)| service == "issuer"));
    let secrets = [
        "Ada",
        "Lovelace",
        "ada@acme.example",
        "boss@acme.example",
        "Jane Boss",
        "VATES-B12345678",
        &token,
        &creds.client_secret,
    ];
    for (_, s) in &spans {
        let values = s
            .attributes
            .iter()
            .chain(s.events.iter().flat_map(|e| e.attributes.iter()))
            .filter_map(|kv| text(&kv.value));
        for v in values {
            for secret in secrets {
                assert!(!v.contains(secret), "span {} holds {secret:?}: {v}", s.name);
            }
        }
    }
    // No probe traffic, no trace per background poll: every exported trace began with a
    // request or a webhook attempt.
    assert!(
        spans.iter().all(|(_, s)| !s.name.starts_with("store.ping")),
        "readiness pings are not traced"
    );

    // Logs written inside a traced request carry its trace and span ids.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = logs.lock().unwrap().iter().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["message"] == "access token issued"
                    && v["trace_id"] == token_trace
                    && v["span_id"].as_str().is_some_and(|s| s.len() == 16)
            })
        });
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with the token request's trace id: {:?}",
            logs.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
