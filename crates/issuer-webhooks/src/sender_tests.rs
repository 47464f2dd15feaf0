//! The sender against real local HTTP receivers.
//!
//! Each receiver is a raw tokio listener that counts connections and records
//! requests, so "refused" can be checked as "no socket was ever opened", not
//! merely "no request was parsed".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Delivery, NetworkPolicy, Outcome, Sender, WebhookSecret};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    delay: Duration,
}

fn reply(status: u16) -> Reply {
    Reply {
        status,
        ..Reply::default()
    }
}

struct Receiver {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Receiver {
    async fn start(bind: &str, reply: Reply) -> Option<Self> {
        // Binding ::1 fails on hosts without IPv6; callers skip that case.
        let listener = TcpListener::bind(bind).await.ok()?;
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (r, reply) = (r.clone(), reply.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, r, reply).await;
                });
            }
        });
        Some(Self {
            addr,
            connections,
            requests,
        })
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// Minimal HTTP/1.1: one request per connection, body by content-length.
async fn serve(
    mut stream: TcpStream,
    out: Arc<Mutex<Vec<Recorded>>>,
    reply: Reply,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut start = lines.next().unwrap_or_default().split(' ');
    let method = start.next().unwrap_or_default().to_owned();
    let path = start.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    out.lock().unwrap().push(Recorded {
        method,
        path,
        headers,
        body,
    });
    tokio::time::sleep(reply.delay).await;
    let mut resp = format!(
        "HTTP/1.1 {} X\r\ncontent-length: 0\r\nconnection: close\r\n",
        reply.status
    );
    for (n, v) in &reply.headers {
        resp.push_str(&format!("{n}: {v}\r\n"));
    }
    resp.push_str("\r\n");
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

fn loopback_policy() -> NetworkPolicy {
    NetworkPolicy::parse("127.0.0.0/8").unwrap()
}

fn sender(policy: NetworkPolicy) -> Sender {
    Sender::new(policy, Duration::from_secs(5))
}

fn delivery(url: String) -> Delivery {
    Delivery {
        url,
        msg_id: "msg_01HZX3Y0TEST".into(),
        body: br#"{"type":"issuance.completed","data":{"sequence":1}}"#.to_vec(),
        secrets: vec![WebhookSecret::generate()],
        traceparent: None,
    }
}

/// Verifies one `v1,` entry exactly as a receiver would, independently of
/// the crate's signing code.
fn verify(secret: &WebhookSecret, id: &str, ts: &str, body: &[u8], sig: &str) -> bool {
    let key = STANDARD
        .decode(secret.expose().strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let Some(b64) = sig.strip_prefix("v1,") else {
        return false;
    };
    let Ok(raw) = STANDARD.decode(b64) else {
        return false;
    };
    mac.verify_slice(&raw).is_ok()
}

#[tokio::test]
async fn a_200_is_delivered_with_verifiable_standard_webhooks_headers() {
    let rx = Receiver::start("127.0.0.1:0", reply(200)).await.unwrap();
    let old = WebhookSecret::generate();
    let new = WebhookSecret::generate();
    let mut d = delivery(rx.url());
    d.secrets = vec![old.clone(), new.clone()];
    d.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());

    let before = chrono::Utc::now().timestamp();
    let a = sender(loopback_policy()).send(&d).await;
    let after = chrono::Utc::now().timestamp();

    assert_eq!(a.outcome, Outcome::Delivered, "{a:?}");
    assert_eq!(a.status, Some(200));
    assert_eq!(a.error, None);
    assert_eq!(a.retry_after, None);
    assert!(a.latency < Duration::from_secs(5));

    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/hook");
    assert_eq!(r.body, d.body, "the exact bytes are sent");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("webhook-id"), Some("msg_01HZX3Y0TEST"));
    assert_eq!(
        r.header("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert!(
        r.header("user-agent")
            .is_some_and(|ua| ua.starts_with("issuer-webhooks/")),
        "{:?}",
        r.header("user-agent")
    );
    let ts = r.header("webhook-timestamp").unwrap();
    let ts_n: i64 = ts.parse().unwrap();
    assert!(
        (before..=after).contains(&ts_n),
        "{ts_n} not in {before}..={after}"
    );

    // Rotation: one entry per secret, each verifiable on its own.
    let sigs: Vec<&str> = r.header("webhook-signature").unwrap().split(' ').collect();
    assert_eq!(sigs.len(), 2, "{sigs:?}");
    assert!(verify(&old, "msg_01HZX3Y0TEST", ts, &r.body, sigs[0]));
    assert!(verify(&new, "msg_01HZX3Y0TEST", ts, &r.body, sigs[1]));
    assert!(!verify(&new, "msg_01HZX3Y0TEST", ts, &r.body, sigs[0]));
    assert!(!verify(&old, "msg_other", ts, &r.body, sigs[0]));
}

#[tokio::test]
async fn a_500_is_retried() {
    let rx = Receiver::start("127.0.0.1:0", reply(500)).await.unwrap();
    let a = sender(loopback_policy()).send(&delivery(rx.url())).await;
    assert_eq!(a.outcome, Outcome::Retry);
    assert_eq!(a.status, Some(500));
    assert_eq!(a.error.as_deref(), Some("HTTP 500"));
}

#[tokio::test]
async fn a_410_means_gone() {
    let rx = Receiver::start("127.0.0.1:0", reply(410)).await.unwrap();
    let a = sender(loopback_policy()).send(&delivery(rx.url())).await;
    assert_eq!(a.outcome, Outcome::Gone);
    assert_eq!(a.status, Some(410));
}

#[tokio::test]
async fn other_4xx_are_retried() {
    for status in [400, 404, 408, 429] {
        let rx = Receiver::start("127.0.0.1:0", reply(status)).await.unwrap();
        let a = sender(loopback_policy()).send(&delivery(rx.url())).await;
        assert_eq!(a.outcome, Outcome::Retry, "{status}");
        assert_eq!(a.status, Some(status));
    }
}

#[tokio::test]
async fn a_redirect_is_a_failed_attempt_and_is_not_followed() {
    let target = Receiver::start("127.0.0.1:0", reply(200)).await.unwrap();
    let mut r = reply(302);
    r.headers.push(("location", target.url()));
    let rx = Receiver::start("127.0.0.1:0", r).await.unwrap();

    let a = sender(loopback_policy()).send(&delivery(rx.url())).await;
    assert_eq!(a.outcome, Outcome::Retry, "{a:?}");
    assert_eq!(a.status, Some(302));
    assert!(a.error.as_deref().unwrap().contains("redirect"), "{a:?}");
    assert_eq!(rx.requests().len(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(target.connections(), 0, "the redirect target was contacted");
}

#[tokio::test]
async fn retry_after_seconds_are_reported() {
    let mut r = reply(503);
    r.headers.push(("retry-after", "7".into()));
    let rx = Receiver::start("127.0.0.1:0", r).await.unwrap();
    let a = sender(loopback_policy()).send(&delivery(rx.url())).await;
    assert_eq!(a.outcome, Outcome::Retry);
    assert_eq!(a.status, Some(503));
    assert_eq!(a.retry_after, Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn a_slow_receiver_times_out_and_is_retried() {
    let mut r = reply(200);
    r.delay = Duration::from_secs(3);
    let rx = Receiver::start("127.0.0.1:0", r).await.unwrap();
    let s = Sender::new(loopback_policy(), Duration::from_millis(300));
    let a = s.send(&delivery(rx.url())).await;
    assert_eq!(a.outcome, Outcome::Retry, "{a:?}");
    assert_eq!(a.status, None);
    let err = a.error.unwrap();
    assert!(err.starts_with("timeout"), "{err}");
    assert!(!err.contains("127.0.0.1"), "errors carry no URL: {err}");
    assert!(a.latency >= Duration::from_millis(300) && a.latency < Duration::from_secs(3));
}

#[tokio::test]
async fn a_closed_port_is_a_retryable_connection_failure() {
    // Bind then drop to get a port nobody listens on.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let a = sender(loopback_policy())
        .send(&delivery(format!("http://127.0.0.1:{port}/")))
        .await;
    assert_eq!(a.outcome, Outcome::Retry, "{a:?}");
    assert!(a.error.unwrap().starts_with("connection failed"));
}

#[tokio::test]
async fn without_an_allow_list_local_destinations_are_refused_before_connecting() {
    let v4 = Receiver::start("127.0.0.1:0", reply(200)).await.unwrap();
    // Same port on ::1 when the host has IPv6, so `localhost` resolving to
    // either address would be seen.
    let v6_same_port = Receiver::start(&format!("[::1]:{}", v4.port()), reply(200)).await;
    let v6 = Receiver::start("[::1]:0", reply(200)).await;
    let s = sender(NetworkPolicy::parse("").unwrap());

    let mut urls = vec![
        format!("http://127.0.0.1:{}/", v4.port()),
        format!("http://[::ffff:127.0.0.1]:{}/", v4.port()),
        format!("https://127.0.0.1:{}/", v4.port()),
        // Plain http without an allow-list.
        format!("http://localhost:{}/", v4.port()),
    ];
    match &v6 {
        Some(v6) => urls.push(format!("http://[::1]:{}/", v6.port())),
        None => urls.push("http://[::1]:9/".to_owned()),
    }
    // IP literals and plain http: the URL itself is refused.
    for url in &urls {
        let a = s.send(&delivery(url.clone())).await;
        assert_eq!(a.outcome, Outcome::Refused, "{url}: {a:?}");
        assert_eq!(a.status, None);
        assert!(a.error.is_some(), "{url}");
    }

    // Hostnames are refused by the resolver, and look like a name that does not resolve at
    // all: the same text and retries, so that endpoints cannot probe internal names.
    for url in [
        format!("https://localhost:{}/", v4.port()),
        "https://no-such-host.invalid/".to_owned(),
    ] {
        let a = s.send(&delivery(url.clone())).await;
        assert_eq!(a.outcome, Outcome::Retry, "{url}: {a:?}");
        assert_eq!(a.status, None);
        assert_eq!(
            a.error.as_deref(),
            Some(crate::sender::UNREACHABLE),
            "{url}"
        );
    }

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(v4.connections(), 0, "a refused destination was contacted");
    if let Some(v6) = &v6 {
        assert_eq!(v6.connections(), 0, "a refused destination was contacted");
    }
    if let Some(v6) = &v6_same_port {
        assert_eq!(v6.connections(), 0, "a refused destination was contacted");
    }
}

#[tokio::test]
async fn plain_http_to_a_hostname_needs_every_address_allow_listed() {
    let rx = Receiver::start("127.0.0.1:0", reply(200)).await.unwrap();
    let url = format!("http://localhost:{}/hook", rx.port());

    // Allow-list that does not cover loopback: refused at connect time.
    let a = sender(NetworkPolicy::parse("10.0.0.0/8").unwrap())
        .send(&delivery(url.clone()))
        .await;
    assert_eq!(a.outcome, Outcome::Retry, "{a:?}");
    assert_eq!(a.error.as_deref(), Some(crate::sender::UNREACHABLE));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.connections(), 0);

    // Loopback in both families allow-listed: delivered.
    let a = sender(NetworkPolicy::parse("127.0.0.0/8,::1/128").unwrap())
        .send(&delivery(url))
        .await;
    assert_eq!(a.outcome, Outcome::Delivered, "{a:?}");
    assert_eq!(rx.requests().len(), 1);
}

#[tokio::test]
async fn invalid_urls_are_refused() {
    let s = sender(loopback_policy());
    for url in [
        "ftp://127.0.0.1/",
        "http://user:pw@127.0.0.1:1/",
        "not a url",
        "http://10.0.0.1/",
        "http://8.8.8.8/",
    ] {
        let a = s.send(&delivery(url.to_owned())).await;
        assert_eq!(a.outcome, Outcome::Refused, "{url}: {a:?}");
        assert!(!a.error.unwrap().contains("pw"));
    }
}
