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

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use issuer_coordination::{
    events::News,
    ratelimit::{Quota, RateLimiter},
};
use issuer_domain::{
    Error,
    ids::{IssuanceId, TenantId},
    lifecycle::{Command, EmailUpdate, Executed, Lifecycle, OfferPhase},
    model::{Branding, EmailDelivery, EmailState, Issuance, Tenant},
    ports::{Clock, Store},
    service::OfferLinks,
};
use issuer_webhooks::RetrySchedule;
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Attachment, Mailbox, MultiPart, SinglePart, header::ContentType},
};
use tokio::sync::broadcast;

use crate::html::{contact_href, escape};

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

/// Sends messages: over SMTP, or into a directory of `.eml` files.
#[derive(Debug)]
pub struct Mailer {
    pub transport: Transport,
    pub from: Mailbox,
    pub timeout: Duration,
    pub schedule: RetrySchedule,
}

impl Mailer {
    pub fn from_settings(settings: &crate::config::Settings) -> anyhow::Result<Self> {
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
}

/// Where the mailer hands its messages.
#[async_trait]
pub trait MailTransport: Send + Sync + 'static {
    /// Sends one message; `file_stem` names it where it becomes a file.
    async fn send(&self, message: Message, file_stem: &str) -> Result<(), SendFailure>;
}

#[async_trait]
impl MailTransport for Mailer {
    /// Sends one message, bounded by the timeout.
    async fn send(&self, message: Message, file_stem: &str) -> Result<(), SendFailure> {
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
    tokio::task::spawn_blocking(move || crate::files::private_dir(&dir_owned)).await??;
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
                    escape(&contact_href(c)),
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

/// What the mailer needs of the outbox: due emails, what they are about, and a place to record
/// each attempt.
#[async_trait]
pub trait EmailOutbox: Send + Sync + 'static {
    /// Takes up to `limit` due emails, leased until `lease_until`.
    async fn claim(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<EmailDelivery>, Error>;
    async fn issuance(&self, tenant: TenantId, id: IssuanceId) -> Result<Option<Issuance>, Error>;
    async fn tenant(&self, id: TenantId) -> Result<Option<Tenant>, Error>;
    /// Records an attempt's outcome through the lifecycle (its event and the outbox row).
    async fn record(
        &self,
        issuance: Issuance,
        update: EmailUpdate,
        now: DateTime<Utc>,
    ) -> Result<Executed, Error>;
}

/// The outbox in the store, attempts recorded by the lifecycle.
pub struct StoreOutbox {
    pub store: Arc<dyn Store>,
    pub lifecycle: Lifecycle,
}

#[async_trait]
impl EmailOutbox for StoreOutbox {
    async fn claim(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<EmailDelivery>, Error> {
        self.store.claim_emails(now, lease_until, limit).await
    }

    async fn issuance(&self, tenant: TenantId, id: IssuanceId) -> Result<Option<Issuance>, Error> {
        self.store.get_issuance(tenant, id).await
    }

    async fn tenant(&self, id: TenantId) -> Result<Option<Tenant>, Error> {
        self.store.get_tenant(id).await
    }

    async fn record(
        &self,
        issuance: Issuance,
        update: EmailUpdate,
        now: DateTime<Utc>,
    ) -> Result<Executed, Error> {
        let (tenant, id) = (issuance.tenant_id, issuance.id);
        self.lifecycle
            .execute(
                tenant,
                id,
                Some(issuance),
                &Command::EmailOutcome(update),
                now,
            )
            .await
    }
}

/// How fast emails may go out, shared by the replicas: the SMTP relay's own limits would
/// otherwise refuse a bulk create's emails, or mark the sender as a spammer.
pub struct Pace {
    pub limiter: Arc<dyn RateLimiter>,
    pub quota: Quota,
}

impl Pace {
    /// Waits until one more email may go out.
    async fn wait(&self) {
        loop {
            let decision = self.limiter.check("smtp", self.quota).await;
            if decision.allowed {
                return;
            }
            tokio::time::sleep(decision.retry_after.max(Duration::from_millis(1))).await;
        }
    }
}

/// The mailer: drains the outbox on every replica.
pub struct MailWorker {
    pub outbox: Arc<dyn EmailOutbox>,
    pub transport: Arc<dyn MailTransport>,
    /// `ISSUER_SMTP_MAX_PER_SEC`; `None`: unpaced.
    pub pace: Option<Pace>,
    pub from: Mailbox,
    pub schedule: RetrySchedule,
    pub clock: Arc<dyn Clock>,
    pub links: OfferLinks,
}

impl MailWorker {
    /// Drains the outbox until `stop` turns true, then lets the sends under way finish. `news`
    /// announces new events (new emails among them); retries come due on the poll.
    pub async fn run(
        self: Arc<Self>,
        mut news: broadcast::Receiver<News>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        while !*stop.borrow() {
            let free = permits.available_permits().min(CLAIM_BATCH as usize) as u32;
            let now = self.clock.now();
            let claimed = if free == 0 {
                Vec::new()
            } else {
                match self.outbox.claim(now, now + LEASE, free).await {
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
                let me = self.clone();
                tokio::spawn(async move {
                    me.attempt(delivery).await;
                    drop(permit);
                });
            }
            if full {
                continue;
            }
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

    /// One attempt of one email, recorded whatever happens; returns what was recorded.
    #[tracing::instrument(
        name = "email.send",
        skip_all,
        fields(tenant_id = %delivery.tenant_id, issuance_id = %delivery.issuance_id, attempt = delivery.attempts + 1)
    )]
    pub async fn attempt(&self, delivery: EmailDelivery) -> Option<EmailState> {
        let (tenant_id, issuance_id) = (delivery.tenant_id, delivery.issuance_id);
        let issuance = match self.outbox.issuance(tenant_id, issuance_id).await {
            Ok(Some(i)) => i,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e.chain(), %issuance_id, "loading an issuance to email failed; the lease will expire");
                return None;
            }
        };
        // Over already: leaving `pending` cancels the email (an expired offer is swept soon, a
        // redeemed one is issued soon); until then the row waits out its lease.
        if issuance.offer_phase(self.clock.now()) != OfferPhase::Open {
            return None;
        }
        let outcome = match self.compose(&issuance).await {
            Ok(message) => {
                if let Some(pace) = &self.pace {
                    pace.wait().await;
                }
                let stem = format!(
                    "{}-{}",
                    self.clock.now().format("%Y%m%dT%H%M%S"),
                    issuance.id
                );
                self.transport.send(message, &stem).await
            }
            Err(e) if e.code == issuer_domain::ErrorCode::InvalidRequest => Err(SendFailure {
                permanent: true,
                reason: "the recipient address is not deliverable".into(),
            }),
            Err(e) => {
                tracing::error!(error = %e.chain(), %issuance_id, "composing an offer email failed; the lease will expire");
                return None;
            }
        };
        let now = self.clock.now();
        let update = self.outcome(&delivery, outcome, now);
        let state = update.state;
        crate::metrics::email_attempt(match state {
            EmailState::Sent => "sent",
            EmailState::Pending => "retry",
            EmailState::Failed | EmailState::Cancelled => "failed",
        });
        match self.outbox.record(issuance, update, now).await {
            Ok(Executed::Applied(_)) => {
                tracing::info!(%tenant_id, %issuance_id, state = state.as_str(), attempt = delivery.attempts + 1, "offer email attempt recorded");
                Some(state)
            }
            Ok(_) => {
                tracing::info!(%tenant_id, %issuance_id, "another mailer took the email over; this attempt's outcome is dropped");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e.chain(), %issuance_id, "recording an email attempt failed; the lease will expire");
                None
            }
        }
    }

    /// What an attempt's result means for the outbox row: sent, retried later, or given up.
    fn outcome(
        &self,
        delivery: &EmailDelivery,
        sent: Result<(), SendFailure>,
        now: DateTime<Utc>,
    ) -> EmailUpdate {
        let failure = match sent {
            Ok(()) => {
                return EmailUpdate {
                    claimed_until: delivery.next_attempt_at,
                    state: EmailState::Sent,
                    next_attempt_at: None,
                    error: None,
                };
            }
            Err(failure) => failure,
        };
        let attempts = u32::try_from(delivery.attempts + 1).unwrap_or(u32::MAX);
        let next = (!failure.permanent)
            .then(|| self.schedule.next_delay(attempts, None, rand::random()))
            .flatten();
        EmailUpdate {
            claimed_until: delivery.next_attempt_at,
            state: if next.is_some() {
                EmailState::Pending
            } else {
                EmailState::Failed
            },
            next_attempt_at: next.map(|delay| {
                now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1))
            }),
            error: Some(failure.reason),
        }
    }

    async fn compose(&self, issuance: &Issuance) -> Result<Message, Error> {
        let tenant = self
            .outbox
            .tenant(issuance.tenant_id)
            .await?
            .ok_or_else(|| Error::internal("the issuance's tenant is gone"))?;
        let issuer_name = tenant
            .branding
            .display_name
            .clone()
            .unwrap_or_else(|| tenant.name.clone());
        let uri = self.links.credential_offer_uri(&issuance.offer_id);
        let landing = self.links.landing_url(&issuance.offer_id);
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
        email.message(self.from.clone(), to)
    }
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

/// The mailer against fake ports: what it records for each way an attempt can go.
#[cfg(test)]
mod worker_tests {
    use std::sync::Mutex;

    use chrono::TimeZone;
    use issuer_domain::{
        lifecycle::Refused,
        model::{Delivery, IssuanceStatus, PRE_AUTHORIZED_CODE_GRANT},
    };

    use super::*;
    use crate::test_support::FixedClock;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap()
    }

    fn issuance(email: &str) -> Issuance {
        Issuance {
            tenant_id: TenantId::new(),
            id: IssuanceId::new(),
            client_request_id: "crid".into(),
            request_fingerprint: "fp".into(),
            credential_configuration_id: "cfg".into(),
            status: IssuanceStatus::Pending,
            reason: None,
            version: 1,
            batch_id: None,
            payload: Some(serde_json::json!({})),
            delivery: Delivery::Email,
            email: Some(email.into()),
            grant_type: PRE_AUTHORIZED_CODE_GRANT.into(),
            offer_id: "offer-1".into(),
            pre_authorized_code_hash: "h".into(),
            pre_authorized_code_sealed: "s".into(),
            tx_code_hash: None,
            tx_code_failures: 0,
            code_redeemed_at: None,
            notification_id: None,
            offer_retrieved_at: None,
            credential: None,
            expires_at: t0() + chrono::Duration::hours(1),
            created_at: t0(),
            updated_at: t0(),
        }
    }

    fn delivery(i: &Issuance, attempts: i64) -> EmailDelivery {
        EmailDelivery {
            tenant_id: i.tenant_id,
            issuance_id: i.id,
            state: EmailState::Pending,
            attempts,
            next_attempt_at: t0() + LEASE,
            last_error: None,
            sent_at: None,
            created_at: t0(),
            updated_at: t0(),
        }
    }

    struct FakeOutbox {
        issuance: Issuance,
        /// Whether the lease is still this mailer's when it records.
        lease_held: bool,
        recorded: Mutex<Vec<EmailUpdate>>,
    }

    #[async_trait]
    impl EmailOutbox for FakeOutbox {
        async fn claim(
            &self,
            _: DateTime<Utc>,
            _: DateTime<Utc>,
            _: u32,
        ) -> Result<Vec<EmailDelivery>, Error> {
            Ok(Vec::new())
        }

        async fn issuance(&self, _: TenantId, id: IssuanceId) -> Result<Option<Issuance>, Error> {
            Ok((id == self.issuance.id).then(|| self.issuance.clone()))
        }

        async fn tenant(&self, id: TenantId) -> Result<Option<Tenant>, Error> {
            Ok(Some(Tenant {
                id,
                ..Tenant::new("Acme", t0())
            }))
        }

        async fn record(
            &self,
            issuance: Issuance,
            update: EmailUpdate,
            _: DateTime<Utc>,
        ) -> Result<Executed, Error> {
            if !self.lease_held {
                return Ok(Executed::Refused(issuance, Refused::EmailLeaseLost));
            }
            self.recorded.lock().unwrap().push(update);
            Ok(Executed::Applied(issuance))
        }
    }

    /// Answers every send with `answer` and counts the sends.
    struct FakeTransport {
        answer: Result<(), SendFailure>,
        sent: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl MailTransport for FakeTransport {
        async fn send(&self, message: Message, _: &str) -> Result<(), SendFailure> {
            let text = String::from_utf8_lossy(&message.formatted()).into_owned();
            self.sent.lock().unwrap().push(text);
            self.answer.clone()
        }
    }

    fn worker(
        issuance: &Issuance,
        answer: Result<(), SendFailure>,
        lease_held: bool,
        now: DateTime<Utc>,
    ) -> (MailWorker, Arc<FakeOutbox>, Arc<FakeTransport>) {
        let outbox = Arc::new(FakeOutbox {
            issuance: issuance.clone(),
            lease_held,
            recorded: Mutex::new(Vec::new()),
        });
        let transport = Arc::new(FakeTransport {
            answer,
            sent: Mutex::new(Vec::new()),
        });
        let worker = MailWorker {
            outbox: outbox.clone(),
            transport: transport.clone(),
            pace: None,
            from: "Issuer <no-reply@i.example>".parse().unwrap(),
            schedule: RetrySchedule::parse("30s,2m").unwrap(),
            clock: Arc::new(FixedClock(now)),
            links: OfferLinks::new("https://i.example"),
        };
        (worker, outbox, transport)
    }

    fn transient() -> Result<(), SendFailure> {
        Err(SendFailure {
            permanent: false,
            reason: "smtp: temporarily refused (451)".into(),
        })
    }

    #[tokio::test]
    async fn a_sent_email_is_recorded_sent_under_its_lease() {
        let i = issuance("ada@example.org");
        let (w, outbox, transport) = worker(&i, Ok(()), true, t0());
        assert_eq!(w.attempt(delivery(&i, 0)).await, Some(EmailState::Sent));
        let sent = transport.sent.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert!(sent[0].contains("ada@example.org"));
        assert!(sent[0].contains("https://i.example/issuer/offer/offer-1"));
        let recorded = outbox.recorded.lock().unwrap();
        assert_eq!(
            recorded[0],
            EmailUpdate {
                claimed_until: t0() + LEASE,
                state: EmailState::Sent,
                next_attempt_at: None,
                error: None,
            }
        );
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_on_the_schedule_until_it_is_used_up() {
        let i = issuance("ada@example.org");
        let (w, outbox, _) = worker(&i, transient(), true, t0());
        assert_eq!(w.attempt(delivery(&i, 1)).await, Some(EmailState::Pending));
        let retry = outbox.recorded.lock().unwrap()[0].clone();
        let due = retry.next_attempt_at.expect("a retry is scheduled") - t0();
        // The second retry of "30s,2m", with at most 10 % jitter either way.
        assert!(
            (108..=132).contains(&due.num_seconds()),
            "retried after {due}"
        );
        assert_eq!(
            retry.error.as_deref(),
            Some("smtp: temporarily refused (451)")
        );
        // Every retry used: given up.
        assert_eq!(w.attempt(delivery(&i, 2)).await, Some(EmailState::Failed));
        assert_eq!(outbox.recorded.lock().unwrap()[1].next_attempt_at, None);
    }

    #[tokio::test]
    async fn a_permanent_refusal_or_an_undeliverable_address_ends_it_at_once() {
        let i = issuance("ada@example.org");
        let refused = Err(SendFailure {
            permanent: true,
            reason: "smtp: refused (550)".into(),
        });
        let (w, _, _) = worker(&i, refused, true, t0());
        assert_eq!(w.attempt(delivery(&i, 0)).await, Some(EmailState::Failed));

        let bad = issuance("ada@example.org\r\nBcc: eve@example.org");
        let (w, outbox, transport) = worker(&bad, Ok(()), true, t0());
        assert_eq!(w.attempt(delivery(&bad, 0)).await, Some(EmailState::Failed));
        assert!(transport.sent.lock().unwrap().is_empty(), "nothing sent");
        assert_eq!(
            outbox.recorded.lock().unwrap()[0].error.as_deref(),
            Some("the recipient address is not deliverable")
        );
    }

    /// Refuses the first `refusals` checks, then admits; counts the checks.
    struct FakeLimiter {
        refusals: u32,
        checks: Mutex<u32>,
    }

    #[async_trait]
    impl RateLimiter for FakeLimiter {
        async fn check(&self, key: &str, quota: Quota) -> issuer_coordination::ratelimit::Decision {
            assert_eq!((key, quota.per_sec), ("smtp", 10));
            let mut checks = self.checks.lock().unwrap();
            *checks += 1;
            issuer_coordination::ratelimit::Decision {
                allowed: *checks > self.refusals,
                remaining: 0,
                retry_after: std::time::Duration::from_millis(5),
                reset: std::time::Duration::from_millis(5),
            }
        }
    }

    #[tokio::test]
    async fn an_email_waits_for_the_shared_pace_before_it_is_sent() {
        let i = issuance("ada@example.org");
        let (mut w, outbox, transport) = worker(&i, Ok(()), true, t0());
        let limiter = Arc::new(FakeLimiter {
            refusals: 2,
            checks: Mutex::new(0),
        });
        w.pace = Some(Pace {
            limiter: limiter.clone(),
            quota: Quota {
                per_sec: 10,
                burst: 10,
            },
        });
        assert_eq!(w.attempt(delivery(&i, 0)).await, Some(EmailState::Sent));
        assert_eq!(
            *limiter.checks.lock().unwrap(),
            3,
            "refused twice, then admitted"
        );
        assert_eq!(transport.sent.lock().unwrap().len(), 1);
        assert_eq!(outbox.recorded.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_closed_offer_is_not_emailed_and_a_lost_lease_records_nothing() {
        let i = issuance("ada@example.org");
        let (w, outbox, transport) = worker(&i, Ok(()), true, t0() + chrono::Duration::hours(2));
        assert_eq!(w.attempt(delivery(&i, 0)).await, None, "expired");
        assert!(transport.sent.lock().unwrap().is_empty());
        assert!(outbox.recorded.lock().unwrap().is_empty());

        let (w, outbox, transport) = worker(&i, Ok(()), false, t0());
        assert_eq!(w.attempt(delivery(&i, 0)).await, None, "taken over");
        assert_eq!(transport.sent.lock().unwrap().len(), 1);
        assert!(outbox.recorded.lock().unwrap().is_empty());
    }
}
