//! Offer emails over real SMTP: an aiosmtpd server process per test stores what it receives in
//! a Maildir, which the tests read back and take apart like a mail client would.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use issuer::{Settings, config::Secret};
use mailparse::MailHeaderMap;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    helpers::{TestApp, TestDb, create_body, embedded_settings, pg_settings, redis_url},
    offers::decode_qr,
};

/// An SMTP server (Debian `python3-aiosmtpd`) that files every message into a Maildir.
struct SmtpSink {
    child: Child,
    maildir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl SmtpSink {
    async fn start(port: u16, maildir: &Path) -> Self {
        // Debian's interpreter: the one that has the aiosmtpd package. `-n`: stay root rather
        // than switch to `nobody`, who could not write the Maildir.
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("aiosmtpd runs (scripts/test.sh installs python3-aiosmtpd)");
        let deadline = Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            maildir: maildir.to_path_buf(),
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every message file under `dir` (a Maildir's `new/` and `cur/`, or a directory of `.eml`).
fn messages(dir: &Path) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    for sub in [dir.join("new"), dir.join("cur"), dir.to_path_buf()] {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let is_message = if sub == dir {
                name.ends_with(".eml")
            } else {
                !name.starts_with('.')
            };
            if path.is_file() && is_message {
                found.push(std::fs::read(&path).unwrap());
            }
        }
    }
    found
}

async fn wait_for_messages(dir: &Path, n: usize, within: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + within;
    loop {
        let found = messages(dir);
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a recipient's mail client makes of an offer email.
struct Received {
    to: String,
    subject: String,
    text: String,
    html: String,
    qr: String,
}

fn open(raw: &[u8]) -> Received {
    let mail = mailparse::parse_mail(raw).expect("a parseable message");
    assert_eq!(mail.ctype.mimetype, "multipart/alternative");
    let mut parts = Vec::new();
    fn walk<'a>(p: &'a mailparse::ParsedMail<'a>, out: &mut Vec<&'a mailparse::ParsedMail<'a>>) {
        out.push(p);
        for s in &p.subparts {
            walk(s, out);
        }
    }
    walk(&mail, &mut parts);
    let find = |mime: &str| {
        let found: Vec<_> = parts.iter().filter(|p| p.ctype.mimetype == mime).collect();
        assert_eq!(found.len(), 1, "one {mime} part");
        *found[0]
    };
    assert!(
        parts
            .iter()
            .any(|p| p.ctype.mimetype == "multipart/related"),
        "the HTML and its image are related"
    );
    let png = find("image/png");
    assert_eq!(
        png.headers.get_first_value("Content-ID").as_deref(),
        Some("<offer-qr>")
    );
    let image = image::load_from_memory(&png.get_body_raw().unwrap())
        .unwrap()
        .to_luma8();
    Received {
        to: mail.headers.get_first_value("To").unwrap(),
        subject: mail.headers.get_first_value("Subject").unwrap(),
        text: find("text/plain").get_body().unwrap(),
        html: find("text/html").get_body().unwrap(),
        qr: decode_qr(image),
    }
}

fn email_body(crid: &str, to: &str) -> Value {
    let mut body = create_body(crid);
    body["delivery"] = json!("email");
    body["email"] = json!(to);
    body
}

async fn get(app: &TestApp, token: &str, id: &str) -> Value {
    app.get_rest(token, id).await.json().await.unwrap()
}

async fn event_types(app: &TestApp, token: &str, id: &str) -> Vec<String> {
    app.events_rest(token, id).await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

fn smtp_settings(db: &TestDb, port: u16) -> Settings {
    Settings {
        smtp_url: Some(Secret::new(format!("smtp://127.0.0.1:{port}"))),
        smtp_from: "Acme Credentials <no-reply@issuer.example>".into(),
        email_timeout_ms: 2_000,
        email_retry_schedule: Some(
            "300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,1s,1s,1s,1s,1s,1s,1s,1s".into(),
        ),
        ..pg_settings(&db.url, Some(&redis_url()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_create_sends_one_email_with_both_parts_and_a_qr_of_the_offer() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sink = SmtpSink::start(port, &dir.path().join("Maildir")).await;
    let app = TestApp::spawn(smtp_settings(&db, port)).await;
    let (_, token) = app.tenant_token().await;

    // An address that would smuggle a header is refused at create; nothing is sent for it.
    for bad in [
        "ada@acme.example\r\nBcc: eve@evil.example",
        "ada@acme.example\nBcc: eve@evil.example",
        "Ada <ada@acme.example>",
    ] {
        let res = app
            .create_rest(&token, &email_body("bad-address", bad))
            .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], "email", "{problem}");
    }

    let body = email_body("mail-1", "ada@acme.example");
    let res = app.create_rest(&token, &body).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = res.json().await.unwrap();
    let id = created["issuance_id"].as_str().unwrap();
    let uri = created["credential_offer_uri"].as_str().unwrap();
    // Replays, before and after the email went out, send nothing more.
    for _ in 0..3 {
        let res = app.create_rest(&token, &body).await;
        assert_eq!(res.status(), StatusCode::OK);
    }

    let found = wait_for_messages(&sink.maildir, 1, Duration::from_secs(15)).await;
    assert_eq!(found.len(), 1, "one email");
    for _ in 0..2 {
        assert_eq!(
            app.create_rest(&token, &body).await.status(),
            StatusCode::OK
        );
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let found = messages(&sink.maildir);
    assert_eq!(found.len(), 1, "replays send no second email");

    let mail = open(&found[0]);
    assert_eq!(mail.to, "ada@acme.example");
    assert!(
        mail.subject.contains("offers you a credential"),
        "{}",
        mail.subject
    );
    let offer_id = uri.rsplit("%2F").next().unwrap();
    let landing = format!("{}/issuer/offer/{offer_id}", app.base);
    for part in [&mail.text, &mail.html] {
        assert!(part.contains(uri), "the deep link is in the part");
        assert!(part.contains(&landing), "the landing link is in the part");
        for personal in ["Lovelace", "VATES", "Jane Boss"] {
            assert!(!part.contains(personal), "no payload value ({personal})");
        }
    }
    assert_eq!(mail.qr, uri, "the inline QR code is the offer");

    let issuance = get(&app, &token, id).await;
    assert_eq!(issuance["email_delivery"]["state"], "sent", "{issuance}");
    assert_eq!(issuance["email_delivery"]["attempts"], 1);
    assert!(issuance["email_delivery"]["sent_at"].is_string());
    assert_eq!(
        event_types(&app, &token, id).await,
        vec!["created", "email_sent"]
    );
    drop(sink);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_smtp_down_the_create_answers_and_the_email_arrives_once_smtp_is_back() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let app = TestApp::spawn(smtp_settings(&db, port)).await;
    let (_, token) = app.tenant_token().await;

    // Nothing listens on the SMTP port: the create answers all the same.
    let res = app
        .create_rest(&token, &email_body("mail-down", "ada@acme.example"))
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = res.json().await.unwrap();
    let id = created["issuance_id"].as_str().unwrap().to_owned();
    assert_eq!(created["email_delivery"]["state"], "pending", "{created}");

    // Attempts fail and are recorded.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let failed = event_types(&app, &token, &id)
            .await
            .iter()
            .filter(|t| *t == "email_failed")
            .count();
        if failed >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no failed attempts recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let issuance = get(&app, &token, &id).await;
    assert_eq!(issuance["email_delivery"]["state"], "pending", "{issuance}");
    assert_eq!(
        issuance["email_delivery"]["last_error"],
        "smtp: connection failed"
    );
    assert!(issuance["email_delivery"]["next_attempt_at"].is_string());

    // SMTP comes back: the next attempt delivers, once.
    let sink = SmtpSink::start(port, &dir.path().join("Maildir")).await;
    let found = wait_for_messages(&sink.maildir, 1, Duration::from_secs(15)).await;
    assert_eq!(found.len(), 1);
    assert_eq!(open(&found[0]).to, "ada@acme.example");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(messages(&sink.maildir).len(), 1, "sent once");

    let types = event_types(&app, &token, &id).await;
    let failed = types.iter().filter(|t| *t == "email_failed").count();
    assert!(failed >= 2, "{types:?}");
    assert_eq!(types.first().map(String::as_str), Some("created"));
    assert_eq!(
        types.last().map(String::as_str),
        Some("email_sent"),
        "{types:?}"
    );
    let issuance = get(&app, &token, &id).await;
    assert_eq!(issuance["email_delivery"]["state"], "sent");
    assert_eq!(
        issuance["email_delivery"]["attempts"],
        json!(failed + 1),
        "{issuance}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_smtp_the_embedded_default_writes_eml_files() {
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(embedded_settings(data.path())).await;
    let (_, token) = app.tenant_token().await;
    // An offer with a transaction code: the code is never in the email.
    let mut body = email_body("mail-eml", "ada@acme.example");
    body["tx_code"] = json!(true);
    let res = app.create_rest(&token, &body).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = res.json().await.unwrap();
    let tx_code = created["tx_code"].as_str().expect("a tx_code").to_owned();
    let mail_dir = data.path().join("mail");
    let found = wait_for_messages(&mail_dir, 1, Duration::from_secs(15)).await;
    assert_eq!(found.len(), 1, "one .eml file in {}", mail_dir.display());
    let raw = String::from_utf8_lossy(&found[0]).into_owned();
    let mail = open(&found[0]);
    assert_eq!(mail.to, "ada@acme.example");
    assert_eq!(mail.qr, created["credential_offer_uri"].as_str().unwrap());
    assert!(
        mail.text.contains("transaction code"),
        "says one will be asked for"
    );
    for place in [&raw, &mail.text, &mail.html] {
        assert!(
            !place.contains(&tx_code),
            "the transaction code is not in the email"
        );
    }
    let id = created["issuance_id"].as_str().unwrap();
    assert_eq!(
        get(&app, &token, id).await["email_delivery"]["state"],
        "sent"
    );
    // The file holds a live offer link: the service user's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&mail_dir), 0o700);
    for entry in std::fs::read_dir(&mail_dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}
