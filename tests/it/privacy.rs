//! No credential attribute or email address reaches the logs: the real binary runs the whole
//! flow — create (also a refused one), offer, token, nonce, credential, notification — with
//! debug logging, and its captured output is searched for every personal value of the payload.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    walkthrough::{free_port, issuer, start_with},
    wallet::client::{HolderKey, discover, pre_authorized_code, proof, request_v1, resolve_offer},
};

/// Values that identify the recipient or the organisation's people.
const PERSONAL: [&str; 6] = [
    "Quintessa",
    "Zebulon",
    "quintessa.zebulon@privacy.example",
    "Ignatius Boss",
    "ignatius@privacy.example",
    "EMP-991-SECRET",
];

fn payload() -> Value {
    json!({
        "mandator": {
            "organizationIdentifier": "VATES-B99999999",
            "organization": "Privacy Corp",
            "commonName": "Ignatius Boss",
            "email": "ignatius@privacy.example",
            "country": "ES"
        },
        "mandatee": {
            "firstName": "Quintessa",
            "lastName": "Zebulon",
            "email": "quintessa.zebulon@privacy.example",
            "employeeId": "EMP-991-SECRET"
        },
        "power": [{"function": "Onboarding", "action": ["Execute"]}]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_hold_no_personal_data_from_the_payload() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = issuer(dir.path(), port);
    cmd.env("ISSUER_LOG_LEVEL", "debug");
    let (service, first, rest) = start_with(cmd);
    let file = std::fs::read_to_string(dir.path().join("data/bootstrap-credentials.env")).unwrap();
    let creds: Vec<(String, String)> = file
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let get = |name: &str| creds.iter().find(|(k, _)| k == name).unwrap().1.clone();
    let base = get("ISSUER_URL");
    let http = reqwest::Client::new();

    let token: Value = http
        .post(format!("{base}/issuer/oauth/token"))
        .basic_auth(get("ISSUER_CLIENT_ID"), Some(get("ISSUER_CLIENT_SECRET")))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_owned();

    // A refused create: its error names fields, never values.
    let mut bad = payload();
    bad["mandatee"]["email"] = json!("Quintessa Zebulon <quintessa.zebulon@privacy.example>");
    let res = http
        .post(format!("{base}/issuer/api/v1/issuances"))
        .bearer_auth(&token)
        .json(&json!({"client_request_id": "privacy-1", "credential_configuration_id": "learcredential.employee.sd.1",
                      "payload": bad, "delivery": "email", "email": "quintessa.zebulon@privacy.example"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);

    let created: Value = http
        .post(format!("{base}/issuer/api/v1/issuances"))
        .bearer_auth(&token)
        .json(&json!({"client_request_id": "privacy-1", "credential_configuration_id": "learcredential.employee.sd.1",
                      "payload": payload(), "delivery": "email", "email": "quintessa.zebulon@privacy.example"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let offer = resolve_offer(&http, created["credential_offer_uri"].as_str().unwrap()).await;
    let issuer_meta = discover(&http, offer["credential_issuer"].as_str().unwrap()).await;
    let access = issuer_meta
        .access_token(&http, &pre_authorized_code(&offer))
        .await;
    let nonce = issuer_meta.nonce(&http).await;
    let key = HolderKey::generate();
    let request = request_v1(&proof(&key, &issuer_meta.credential_issuer, &nonce));
    let res = issuer_meta
        .credential_request(&http, &access, &request)
        .await;
    assert_eq!(res.status(), 200);
    let credential: Value = res.json().await.unwrap();
    let res = http
        .post(&issuer_meta.notification_endpoint)
        .bearer_auth(&access)
        .json(&json!({"notification_id": credential["notification_id"], "event": "credential_accepted"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);

    drop(service);
    let mut log = first.join("\n");
    while let Ok(line) = rest.recv_timeout(Duration::from_secs(2)) {
        log.push('\n');
        log.push_str(&line);
    }
    assert!(
        log.contains("credential issued"),
        "the flow's logs were captured:\n{log}"
    );
    assert!(log.contains("DEBUG"), "debug logging was on");
    let lower = log.to_lowercase();
    for value in PERSONAL {
        assert!(
            !lower.contains(&value.to_lowercase()),
            "`{value}` appears in the logs:\n{}",
            log.lines()
                .filter(|l| l.to_lowercase().contains(&value.to_lowercase()))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
