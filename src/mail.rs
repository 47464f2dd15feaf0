//! Offer emails (DESIGN §8). A create with `delivery: email` writes an email outbox row in its
//! own statement; the mailer on every replica claims due rows with a lease, sends the email over
//! SMTP (or writes it as an `.eml` file when no SMTP server is configured), and records the
//! attempt with an `email_sent` or `email_failed` event. While SMTP fails the email is retried on
//! a schedule; a permanent refusal ends it. A create never waits for SMTP, and an idempotent
//! replay writes no second row, so it never sends a second email.
//!
//! The email holds the deep link, a link to the landing page and the QR code as an inline PNG;
//! never a transaction code (that goes to the recipient another way), never payload values.

use std::{path::PathBuf, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use issuer_domain::{
    Error,
    lifecycle::{Command, EmailUpdate, Executed, OfferPhase},
    model::{Branding, EmailDelivery, EmailState, Issuance},
};
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Attachment, Mailbox, MultiPart, SinglePart, header::ContentType},
};

use crate::{app::App, landing::escape};

/// How long a claimed email stays with its mailer before another may take it; well above the
/// SMTP timeout, so a slow send is not taken over and sent twice.
const LEASE: chrono::Duration = chrono::Duration::minutes(5);
const CLAIM_BATCH: u32 = 32;
/// Emails in flight at once per replica.
const CONCURRENCY: usize = 8;
/// The inline QR image's Content-ID.
const QR_CID: &str = "offer-qr";

/// Where emails go: an SMTP server, or a directory of `.eml` files.
pub enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Dir(PathBuf),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The URL may hold a password.
            Transport::Smtp(_) => f.write_str("Smtp"),
            Transport::Dir(dir) => f.debug_tuple("Dir").field(dir).finish(),
        }
    }
}

/// Why an attempt failed: whether to retry, and a reason fit for the issuance history (no
/// address, no server text that might echo one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFailure {
    pub permanent: bool,
    pub reason: String,
}

#[derive(Debug)]
pub struct Mailer {
    pub transport: Transport,
    pub from: Mailbox,
    pub timeout: Duration,
    pub schedule: issuer_webhooks::RetrySchedule,
}

impl Mailer {
    pub fn from_settings(settings: &crate::Settings) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(settings.email_timeout_ms);
        let transport = match &settings.smtp_url {
            Some(url) => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
                    .map_err(|e| anyhow::anyhow!("ISSUER_SMTP_URL: {e}"))?
                    .timeout(Some(timeout))
                    .build(),
            ),
            None => Transport::Dir(
                settings
                    .mail_dir
                    .clone()
                    .unwrap_or_else(|| settings.data_dir.join("mail")),
            ),
        };
        let schedule = match &settings.email_retry_schedule {
            Some(s) => issuer_webhooks::RetrySchedule::parse(s)
                .map_err(|e| anyhow::anyhow!("ISSUER_EMAIL_RETRY_SCHEDULE: {e}"))?,
            None => issuer_webhooks::RetrySchedule::parse("30s,2m,10m,30m,1h,2h,4h")
                .map_err(|e| anyhow::anyhow!(e))?,
        };
        Ok(Self {
            transport,
            from: settings.smtp_from.parse()?,
            timeout,
            schedule,
        })
    }

    /// Sends one message, bounded by the timeout.
    pub async fn send(&self, message: Message, file_stem: &str) -> Result<(), SendFailure> {
        match &self.transport {
            Transport::Smtp(smtp) => {
                match tokio::time::timeout(self.timeout, smtp.send(message)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(classify(&e)),
                    Err(_) => Err(SendFailure {
                        permanent: false,
                        reason: "smtp: timed out".into(),
                    }),
                }
            }
            Transport::Dir(dir) => write_eml(dir, file_stem, &message.formatted())
                .await
                .map_err(|e| SendFailure {
                    permanent: false,
                    reason: format!("mail directory: {}", e.kind()),
                }),
        }
    }
}

/// SMTP replies are classified by code only: their text may echo the address.
fn classify(e: &lettre::transport::smtp::Error) -> SendFailure {
    let code = e.status().map(u16::from);
    if e.is_permanent() {
        SendFailure {
            permanent: true,
            reason: format!("smtp: refused ({})", code.unwrap_or(500)),
        }
    } else if e.is_transient() {
        SendFailure {
            permanent: false,
            reason: format!("smtp: temporarily refused ({})", code.unwrap_or(400)),
        }
    } else if e.is_timeout() {
        SendFailure {
            permanent: false,
            reason: "smtp: timed out".into(),
        }
    } else if e.is_client() {
        // A configuration problem (e.g. credentials but no AUTH offered): retried, since an
        // operator can fix it without the recipient doing anything.
        SendFailure {
            permanent: false,
            reason: "smtp: client configuration refused by the server".into(),
        }
    } else if e.is_tls() {
        SendFailure {
            permanent: false,
            reason: "smtp: TLS failed".into(),
        }
    } else {
        SendFailure {
            permanent: false,
            reason: "smtp: connection failed".into(),
        }
    }
}

/// Writes the message whole or not at all: a temporary file renamed into place.
/// The directory and the file are the service user's only (0700, 0600): the message holds a
/// live offer link.
async fn write_eml(dir: &std::path::Path, stem: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir_owned = dir.to_owned();
    tokio::task::spawn_blocking(move || crate::app::private_dir(&dir_owned)).await??;
    let tmp = dir.join(format!(".{stem}.eml.tmp"));
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(&tmp).await?;
    tokio::io::AsyncWriteExt::write_all(&mut file, bytes).await?;
    file.sync_all().await?;
    drop(file);
    tokio::fs::rename(&tmp, dir.join(format!("{stem}.eml"))).await
}

/// What an offer email says.
pub struct OfferEmail<'a> {
    pub issuer_name: &'a str,
    pub branding: &'a Branding,
    pub credential_offer_uri: &'a str,
    pub landing_url: &'a str,
    pub expires_at: DateTime<Utc>,
    pub needs_tx_code: bool,
}

impl OfferEmail<'_> {
    pub fn subject(&self) -> String {
        format!("{} offers you a credential", self.issuer_name)
    }

    pub fn text(&self) -> String {
        let mut out = format!(
            "{name} offers you a credential.\n\n\
             To receive it, open this link on the phone where your wallet app is installed:\n\
             {link}\n\n\
             On a computer, open this page and scan the QR code with your wallet app:\n\
             {landing}\n\n\
             The offer is valid until {expiry}.\n",
            name = self.issuer_name,
            link = self.credential_offer_uri,
            landing = self.landing_url,
            expiry = self.expires_at.format("%-d %B %Y, %H:%M UTC"),
        );
        if self.needs_tx_code {
            out.push_str(&format!(
                "\nYour wallet will ask for a transaction code. {} sends it to you separately, \
                 never in this email.\n",
                self.issuer_name
            ));
        }
        if let Some(contact) = &self.branding.support_contact {
            out.push_str(&format!("\nQuestions? Contact {contact}.\n"));
        }
        out
    }

    pub fn html(&self) -> String {
        let name = escape(self.issuer_name);
        let logo = self
            .branding
            .logo_url
            .as_deref()
            .map(|url| {
                format!(
                    r#"<p><img src="{}" alt="{name}" style="max-height:56px;max-width:60%"></p>"#,
                    escape(url)
                )
            })
            .unwrap_or_default();
        let tx_code = if self.needs_tx_code {
            format!(
                "<p>Your wallet will ask for a transaction code. {name} sends it to you \
                 separately, never in this email.</p>"
            )
        } else {
            String::new()
        };
        let support = self
            .branding
            .support_contact
            .as_deref()
            .map(|c| {
                format!(
                    r#"<p style="color:#5b6475;font-size:14px">Questions? Contact <a href="{}">{}</a>.</p>"#,
                    escape(&crate::landing::contact_href(c)),
                    escape(c)
                )
            })
            .unwrap_or_default();
        format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{subject}</title></head>
<body style="margin:0;background:#f3f5f8;font:16px/1.5 Arial,Helvetica,sans-serif;color:#1d2330">
<div style="max-width:480px;margin:24px auto;padding:24px;background:#ffffff;border-radius:12px;text-align:center">
{logo}
<h1 style="font-size:22px">{subject}</h1>
<p>On the phone where your wallet app is installed:</p>
<p><a href="{link}" style="display:inline-block;padding:12px 24px;border-radius:8px;background:#1f5fd6;color:#ffffff;font-weight:bold;text-decoration:none">Open in wallet</a></p>
<p>On a computer, scan this code with your wallet app:</p>
<p><img src="cid:{QR_CID}" width="240" height="240" alt="QR code of the credential offer"></p>
<p>Or <a href="{landing}">open the offer page</a>.</p>
{tx_code}<p style="color:#5b6475;font-size:14px">The offer is valid until {expiry}.</p>
{support}
</div>
</body></html>
"#,
            subject = escape(&self.subject()),
            link = escape(self.credential_offer_uri),
            landing = escape(self.landing_url),
            expiry = self.expires_at.format("%-d %B %Y, %H:%M UTC"),
        )
    }

    /// The whole message: `multipart/alternative` of the text and a `multipart/related` HTML
    /// part holding the QR code as an inline PNG.
    pub fn message(&self, from: Mailbox, to: &str) -> Result<Message, Error> {
        let to: Mailbox = to
            .parse()
            .map_err(|_| Error::invalid_field("email", "is not a deliverable address"))?;
        let mut builder = Message::builder().from(from).to(to).subject(self.subject());
        if let Some(contact) = &self.branding.support_contact
            && let Ok(reply_to) = contact.parse::<Mailbox>()
        {
            builder = builder.reply_to(reply_to);
        }
        let png = crate::qr::png(self.credential_offer_uri, 480)?;
        let png_type = ContentType::parse("image/png").map_err(Error::internal)?;
        builder
            .multipart(
                MultiPart::alternative()
                    .singlepart(SinglePart::plain(self.text()))
                    .multipart(
                        MultiPart::related()
                            .singlepart(SinglePart::html(self.html()))
                            .singlepart(
                                Attachment::new_inline(QR_CID.to_owned()).body(png, png_type),
                            ),
                    ),
            )
            .map_err(Error::internal)
    }
}

/// Drains the email outbox until `stop` turns true, then lets the sends under way finish.
pub async fn run(app: Arc<App>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut news = app.hub.subscribe();
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    while !*stop.borrow() {
        let free = permits.available_permits().min(CLAIM_BATCH as usize) as u32;
        let now = app.clock.now();
        let claimed = if free == 0 {
            Vec::new()
        } else {
            match app.store.claim_emails(now, now + LEASE, free).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e.chain(), "claiming emails failed");
                    Vec::new()
                }
            }
        };
        let full = claimed.len() as u32 == free && free > 0;
        for delivery in claimed {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let app = app.clone();
            tokio::spawn(async move {
                attempt(&app, delivery).await;
                drop(permit);
            });
        }
        if full {
            continue;
        }
        // New creates announce themselves; retries come due on the poll.
        let woken = tokio::select! {
            _ = news.recv() => true,
            _ = stop.changed() => false,
            _ = tokio::time::sleep(Duration::from_millis(500)) => false,
        };
        if woken {
            // Coalesce a burst of announcements (most are not emails) into one claim.
            tokio::time::sleep(Duration::from_millis(20)).await;
            while news.try_recv().is_ok() {}
        }
    }
    let _ = permits.acquire_many(CONCURRENCY as u32).await;
}

/// One attempt of one email, recorded whatever happens.
#[tracing::instrument(
    name = "email.send",
    skip_all,
    fields(tenant_id = %delivery.tenant_id, issuance_id = %delivery.issuance_id, attempt = delivery.attempts + 1)
)]
async fn attempt(app: &App, delivery: EmailDelivery) {
    let (tenant_id, issuance_id) = (delivery.tenant_id, delivery.issuance_id);
    let issuance = match app.store.get_issuance(tenant_id, issuance_id).await {
        Ok(Some(i)) => i,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e.chain(), %issuance_id, "loading an issuance to email failed; the lease will expire");
            return;
        }
    };
    // Over already: leaving `pending` cancels the email (an expired offer is swept soon, a
    // redeemed one is issued soon); until then the row waits out its lease.
    if issuance.offer_phase(app.clock.now()) != OfferPhase::Open {
        return;
    }
    let outcome = match compose(app, &issuance).await {
        Ok(message) => {
            let stem = format!(
                "{}-{}",
                app.clock.now().format("%Y%m%dT%H%M%S"),
                issuance.id
            );
            app.mailer.send(message, &stem).await
        }
        Err(e) if e.code == issuer_domain::ErrorCode::InvalidRequest => Err(SendFailure {
            permanent: true,
            reason: "the recipient address is not deliverable".into(),
        }),
        Err(e) => {
            tracing::error!(error = %e.chain(), %issuance_id, "composing an offer email failed; the lease will expire");
            return;
        }
    };
    let now = app.clock.now();
    let update = match outcome {
        Ok(()) => EmailUpdate {
            claimed_until: delivery.next_attempt_at,
            state: EmailState::Sent,
            next_attempt_at: None,
            error: None,
        },
        Err(failure) => {
            let attempts = u32::try_from(delivery.attempts + 1).unwrap_or(u32::MAX);
            let next = (!failure.permanent)
                .then(|| {
                    app.mailer
                        .schedule
                        .next_delay(attempts, None, rand::random())
                })
                .flatten();
            match next {
                Some(delay) => EmailUpdate {
                    claimed_until: delivery.next_attempt_at,
                    state: EmailState::Pending,
                    next_attempt_at: Some(
                        now + chrono::Duration::from_std(delay)
                            .unwrap_or(chrono::Duration::hours(1)),
                    ),
                    error: Some(failure.reason),
                },
                None => EmailUpdate {
                    claimed_until: delivery.next_attempt_at,
                    state: EmailState::Failed,
                    next_attempt_at: None,
                    error: Some(failure.reason),
                },
            }
        }
    };
    let state = update.state;
    crate::metrics::email_attempt(match state {
        EmailState::Sent => "sent",
        EmailState::Pending => "retry",
        EmailState::Failed | EmailState::Cancelled => "failed",
    });
    match app
        .lifecycle
        .execute(
            tenant_id,
            issuance_id,
            Some(issuance),
            &Command::EmailOutcome(update),
            now,
        )
        .await
    {
        Ok(Executed::Applied(_)) => {
            tracing::info!(%tenant_id, %issuance_id, state = state.as_str(), attempt = delivery.attempts + 1, "offer email attempt recorded");
        }
        Ok(_) => {
            tracing::info!(%tenant_id, %issuance_id, "another mailer took the email over; this attempt's outcome is dropped");
        }
        Err(e) => {
            tracing::warn!(error = %e.chain(), %issuance_id, "recording an email attempt failed; the lease will expire");
        }
    }
}

async fn compose(app: &App, issuance: &Issuance) -> Result<Message, Error> {
    let tenant = app
        .store
        .get_tenant(issuance.tenant_id)
        .await?
        .ok_or_else(|| Error::internal("the issuance's tenant is gone"))?;
    let issuer_name = tenant
        .branding
        .display_name
        .clone()
        .unwrap_or_else(|| tenant.name.clone());
    let uri = app.issuances.credential_offer_uri(issuance);
    let landing = format!(
        "{}/issuer/offer/{}",
        app.settings.public_url, issuance.offer_id
    );
    let email = OfferEmail {
        issuer_name: &issuer_name,
        branding: &tenant.branding,
        credential_offer_uri: &uri,
        landing_url: &landing,
        expires_at: issuance.expires_at,
        needs_tx_code: issuance.tx_code_hash.is_some(),
    };
    let to = issuance
        .email
        .as_deref()
        .ok_or_else(|| Error::invalid_field("email", "is missing"))?;
    email.message(app.mailer.from.clone(), to)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn email(branding: &Branding, needs_tx_code: bool) -> OfferEmail<'_> {
        OfferEmail {
            issuer_name: "Acme <Corp>",
            branding,
            credential_offer_uri: "openid-credential-offer://?credential_offer_uri=https%3A%2F%2Fi.example%2Fo%2F1",
            landing_url: "https://i.example/issuer/offer/1",
            expires_at: Utc.with_ymd_and_hms(2026, 12, 1, 9, 30, 0).unwrap(),
            needs_tx_code,
        }
    }

    #[test]
    fn both_parts_carry_the_links_and_the_html_escapes_branding() {
        let branding = Branding {
            support_contact: Some("help@acme.example".into()),
            ..Branding::default()
        };
        let e = email(&branding, true);
        for part in [e.text(), e.html()] {
            assert!(part.contains("openid-credential-offer://?credential_offer_uri="));
            assert!(part.contains("https://i.example/issuer/offer/1"));
            assert!(part.contains("1 December 2026, 09:30 UTC"));
            assert!(part.contains("transaction code"));
            assert!(part.contains("help@acme.example"));
        }
        assert!(e.html().contains("Acme &lt;Corp&gt;"));
        assert!(e.html().contains("cid:offer-qr"));
    }

    #[test]
    fn header_injection_through_the_address_is_refused() {
        let branding = Branding::default();
        let e = email(&branding, false);
        let from: Mailbox = "Issuer <no-reply@i.example>".parse().unwrap();
        for bad in [
            "ada@example.org\r\nBcc: eve@example.org",
            "ada@example.org\nBcc: eve@example.org",
            "not an address",
        ] {
            assert!(e.message(from.clone(), bad).is_err(), "{bad:?}");
        }
        let raw =
            String::from_utf8(e.message(from, "ada@example.org").unwrap().formatted()).unwrap();
        assert!(raw.contains("To: ada@example.org"));
        assert!(raw.contains("multipart/alternative"));
        assert!(raw.contains("multipart/related"));
        assert!(raw.contains("Content-ID: <offer-qr>"));
    }
}
