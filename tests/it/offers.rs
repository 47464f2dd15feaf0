//! Offers reach recipients without the issuer's email: the QR endpoint for callers that show
//! the code themselves, and the landing page for the recipient's browser.

use std::time::Duration;

use reqwest::{StatusCode, header};
use serde_json::Value;

use crate::helpers::{TestApp, TestDb, create_body, pg_settings, redis_url};

/// Decodes a QR code from an image, as a phone would.
pub fn decode_qr(image: image::GrayImage) -> String {
    let mut prepared = rqrr::PreparedImage::prepare(image);
    let grids = prepared.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the image");
    grids[0].decode().expect("the QR code decodes").1
}

/// Rasterizes the SVG the service renders (one `<path>` of `M{x} {y}h{w}v{h}H{x}V{y}`
/// rectangles on a white `<rect>`) at 4 pixels per unit, and decodes it.
pub fn decode_svg_qr(svg: &str) -> String {
    let attr = |name: &str| -> u32 {
        svg.split(&format!(" {name}=\""))
            .nth(1)
            .and_then(|v| v.split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("svg has a numeric {name}"))
    };
    let (w, h) = (attr("width"), attr("height"));
    const SCALE: u32 = 4;
    let mut image = image::GrayImage::from_pixel(w * SCALE, h * SCALE, image::Luma([255]));
    let path = svg
        .split(" d=\"")
        .nth(1)
        .and_then(|d| d.split('"').next())
        .expect("svg has a path");
    for rect in path.split('M').filter(|r| !r.is_empty()) {
        let nums: Vec<u32> = rect
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let (x, y, rw, rh) = (nums[0], nums[1], nums[2], nums[3]);
        for py in y * SCALE..(y + rh) * SCALE {
            for px in x * SCALE..(x + rw) * SCALE {
                image.put_pixel(px, py, image::Luma([0]));
            }
        }
    }
    decode_qr(image)
}

async fn pg_app(db: &TestDb) -> TestApp {
    TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await
}

async fn create(app: &TestApp, token: &str, crid: &str) -> Value {
    let res = app.create_rest(token, &create_body(crid)).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    res.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qr_png_and_svg_decode_to_the_offer_uri() {
    let db = TestDb::new().await;
    let app = pg_app(&db).await;
    let (_, token) = app.tenant_token().await;
    let created = create(&app, &token, "qr-1").await;
    let id = created["issuance_id"].as_str().unwrap();
    let uri = created["credential_offer_uri"].as_str().unwrap();
    let qr = |query: &str| {
        app.http
            .get(app.url(&format!("/issuer/api/v1/issuances/{id}/qr{query}")))
            .bearer_auth(&token)
            .send()
    };

    let res = qr("").await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "image/png");
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
    let png = image::load_from_memory(&res.bytes().await.unwrap())
        .unwrap()
        .to_luma8();
    assert!(png.width() >= 320, "default size, got {}", png.width());
    assert_eq!(decode_qr(png), uri);

    let res = qr("?format=png&size=600").await.unwrap();
    let png = image::load_from_memory(&res.bytes().await.unwrap())
        .unwrap()
        .to_luma8();
    assert!(png.width() >= 600);
    assert_eq!(decode_qr(png), uri);

    let res = qr("?format=svg&size=400").await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "image/svg+xml");
    let svg = res.text().await.unwrap();
    assert_eq!(decode_svg_qr(&svg), uri);

    // Bad parameters: 400 problem+json naming the field.
    for (query, field) in [
        ("?format=gif", "format"),
        ("?size=12", "size"),
        ("?size=big", "size"),
    ] {
        let res = qr(query).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["errors"][0]["field"], field, "{query}: {body}");
    }

    // Another tenant's issuance is as unknown as a missing one.
    let (_, other) = app.tenant_token().await;
    for target in [id.to_owned(), uuid::Uuid::now_v7().to_string()] {
        let res = app
            .http
            .get(app.url(&format!("/issuer/api/v1/issuances/{target}/qr")))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
    }
    // Without a token: 401.
    let res = app
        .http
        .get(app.url(&format!("/issuer/api/v1/issuances/{id}/qr")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    // A closed offer has no QR code.
    assert_eq!(app.cancel_rest(&token, id).await.status(), StatusCode::OK);
    let res = qr("").await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "invalid_state", "{body}");
}

async fn brand(app: &TestApp, creds: &crate::helpers::Creds, name: &str, logo: Option<&str>) {
    issuer::admin::brand_tenant(
        &app.app,
        creds.tenant_id.parse().unwrap(),
        issuer_domain::model::Branding {
            display_name: Some(name.into()),
            logo_url: logo.map(Into::into),
            support_contact: Some("help@acme.example".into()),
        },
    )
    .await
    .unwrap();
}

fn offer_path(created: &Value) -> String {
    let uri = created["credential_offer_uri"].as_str().unwrap();
    let offer_id = uri.rsplit("%2F").next().unwrap();
    format!("/issuer/offer/{offer_id}")
}

async fn page(app: &TestApp, path: &str) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let res = app.http.get(app.url(path)).send().await.unwrap();
    (
        res.status(),
        res.headers().clone(),
        res.text().await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_landing_page_shows_the_qr_and_the_wallet_link_and_nothing_personal() {
    let db = TestDb::new().await;
    let app = pg_app(&db).await;
    let (creds, token) = app.tenant_token().await;
    brand(
        &app,
        &creds,
        "Acme <Credentials>",
        Some("https://acme.example/logo.png"),
    )
    .await;
    let created = create(&app, &token, "landing-1").await;
    let uri = created["credential_offer_uri"].as_str().unwrap();

    let (status, headers, html) = page(&app, &offer_path(&created)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert!(
        headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    assert!(html.contains("Acme &lt;Credentials&gt; offers you a credential"));
    assert!(html.contains(r#"src="https://acme.example/logo.png""#));
    assert!(html.contains(r#"href="mailto:help@acme.example""#));
    assert!(html.contains(&format!(
        r#"<a class="button" href="{uri}">Open in wallet</a>"#
    )));
    let svg = &html[html.find("<svg").unwrap()..html.find("</svg>").unwrap() + 6];
    assert_eq!(decode_svg_qr(svg), uri);
    assert!(!html.contains("<script"), "works without JavaScript");
    for personal in ["Ada", "Lovelace", "ada@acme.example", "Jane Boss", "VATES"] {
        assert!(!html.contains(personal), "the page shows `{personal}`");
    }
    // Showing the page is not retrieving the offer: the history is unchanged.
    let id = created["issuance_id"].as_str().unwrap();
    let events = app.events_rest(&token, id).await;
    assert_eq!(events["events"].as_array().unwrap().len(), 1, "{events}");

    // Cancelled: the page says so and shows no link.
    assert_eq!(app.cancel_rest(&token, id).await.status(), StatusCode::OK);
    let (status, _, html) = page(&app, &offer_path(&created)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("This offer is no longer available"));
    assert!(!html.contains("openid-credential-offer"));

    // Unknown: a 404 page.
    let (status, headers, html) = page(&app, "/issuer/offer/nosuchoffer").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert!(html.contains("Offer not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_expiry_the_landing_page_says_so() {
    let db = TestDb::new().await;
    let app = pg_app(&db).await;
    let (_, token) = app.tenant_token().await;
    let mut body = create_body("landing-expiry");
    body["expires_in"] = 1.into();
    let res = app.create_rest(&token, &body).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = res.json().await.unwrap();
    let path = offer_path(&created);
    let (_, _, html) = page(&app, &path).await;
    assert!(html.contains("Open in wallet"));
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // Past its expiry, whether or not the sweeper has marked it yet.
    let (status, _, html) = page(&app, &path).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("This offer has expired"), "{html}");
    assert!(!html.contains("openid-credential-offer"));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let (_, _, html) = page(&app, &path).await;
    assert!(
        html.contains("This offer has expired"),
        "after the sweep: {html}"
    );
}

/// Runs headless Chromium (Debian `chromium`, installed by scripts/test.sh when missing) with a
/// profile of its own; returns stdout.
async fn chromium(profile: &std::path::Path, args: &[String]) -> String {
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .stdin(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("chromium finishes within a minute")
        .expect("chromium runs");
    assert!(out.status.success(), "chromium exited with {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_the_landing_page_shows_a_scannable_qr_and_the_wallet_link() {
    let db = TestDb::new().await;
    let app = pg_app(&db).await;
    let (creds, token) = app.tenant_token().await;
    brand(&app, &creds, "Acme Credentials", None).await;
    let mut body = create_body("landing-chromium");
    body["expires_in"] = 10.into();
    let res = app.create_rest(&token, &body).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = res.json().await.unwrap();
    let expires = std::time::Instant::now() + Duration::from_secs(10);
    let uri = created["credential_offer_uri"].as_str().unwrap();
    let url = app.url(&offer_path(&created));
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile");

    let shot = dir.path().join("landing.png");
    chromium(
        &profile,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=520,860".into(),
            url.clone(),
        ],
    )
    .await;
    let screenshot = image::open(&shot).expect("a screenshot").to_luma8();
    assert_eq!(
        decode_qr(screenshot),
        uri,
        "the rendered QR code scans to the offer"
    );
    if std::env::var_os("ISSUER_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(
            &shot,
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/landing-page.png"),
        )
        .unwrap();
    }

    let dom = chromium(&profile, &["--dump-dom".into(), url.clone()]).await;
    assert!(dom.contains("Acme Credentials offers you a credential"));
    assert!(dom.contains(">Open in wallet</a>"));
    assert!(dom.contains(&format!(r#"href="{uri}""#)));

    tokio::time::sleep_until((expires + Duration::from_millis(200)).into()).await;
    let dom = chromium(&profile, &["--dump-dom".into(), url]).await;
    assert!(dom.contains("This offer has expired"), "{dom}");
    assert!(!dom.contains("Open in wallet"));
}
