//! The recipient's landing page, `GET /issuer/offer/{offer_id}`: server-rendered HTML that
//! works without JavaScript. On a desktop the recipient scans the QR code with a phone; on the
//! phone itself the button opens the wallet through the deep link. It shows the issuer as the
//! tenant brands it and where the offer stands, and nothing from the credential's payload.

use axum::{
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use issuer_domain::{
    ErrorCode,
    service::{Landing, OfferState},
};

use super::{ApiError, AppState};
use crate::html::{contact_href, escape};

/// No script, no third-party requests except the tenant's logo, no framing.
const CSP: &str = "default-src 'none'; img-src https: data:; style-src 'unsafe-inline'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[utoipa::path(
    get,
    path = "/issuer/offer/{offer_id}",
    operation_id = "offer_page",
    tag = "oid4vci",
    params(("offer_id" = String, Path, description = "From the `credential_offer_uri`")),
    responses(
        (status = 200, description = "The recipient's page: QR code and wallet link", body = String, content_type = "text/html"),
        (status = 404, description = "Unknown offer", body = String, content_type = "text/html"),
        (status = 429, description = "`rate_limited`: the client address's budget is spent (`Retry-After`)", body = super::apidoc::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`", body = super::apidoc::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn page(
    State(app): State<AppState>,
    Path(offer_id): Path<String>,
) -> Result<Response, ApiError> {
    let (status, html) = match app.issuances.landing(&offer_id).await {
        Ok(landing) => {
            let qr = match &landing.offer {
                OfferState::Open {
                    credential_offer_uri,
                    ..
                } => {
                    Some(crate::qr::image(credential_offer_uri, 280, crate::qr::Format::Svg).await?)
                }
                _ => None,
            };
            let qr = qr.as_deref().map(String::from_utf8_lossy);
            (StatusCode::OK, render(&landing, qr.as_deref())?)
        }
        Err(e) if e.code == ErrorCode::NotFound => (StatusCode::NOT_FOUND, not_found()),
        Err(e) => return Err(e.into()),
    };
    Ok((
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page embeds a live offer: no cache may keep it.
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        html,
    )
        .into_response())
}

/// The page; `qr` is the offer's QR code as an SVG document when the offer is open.
fn render(landing: &Landing, qr: Option<&str>) -> Result<String, issuer_domain::Error> {
    let name = escape(&landing.issuer_name);
    let logo = landing
        .branding
        .logo_url
        .as_deref()
        .map(|url| format!(r#"<img class="logo" src="{}" alt="{name}">"#, escape(url)))
        .unwrap_or_default();
    let support = landing
        .branding
        .support_contact
        .as_deref()
        .map(|c| {
            format!(
                r#"<p class="support">Questions? Contact <a href="{}">{}</a>.</p>"#,
                escape(&contact_href(c)),
                escape(c)
            )
        })
        .unwrap_or_default();
    let (title, body) = match &landing.offer {
        OfferState::Open {
            credential_offer_uri,
            expires_at,
            needs_tx_code,
        } => {
            let svg =
                qr.ok_or_else(|| issuer_domain::Error::internal("no QR code for an open offer"))?;
            // Inline: drop the XML prolog, which is not allowed inside HTML.
            let svg = svg.find("<svg").map_or(svg, |i| &svg[i..]);
            let tx_code = if *needs_tx_code {
                format!(
                    "<p>Your wallet will ask for a transaction code. {name} sends it to you \
                     separately, never with this link.</p>"
                )
            } else {
                String::new()
            };
            (
                format!("{name} offers you a credential"),
                format!(
                    r#"<p>On a computer, scan this code with the wallet app on your phone.</p>
<div class="qr" role="img" aria-label="QR code of the credential offer">{svg}</div>
<p>On your phone, open the offer in your wallet app:</p>
<p><a class="button" href="{link}">Open in wallet</a></p>
{tx_code}<p class="expiry">This offer is valid until {expiry}.</p>"#,
                    link = escape(credential_offer_uri),
                    expiry = expires_at.format("%-d %B %Y, %H:%M UTC"),
                ),
            )
        }
        OfferState::Expired => (
            "This offer has expired".to_owned(),
            format!("<p>Ask {name} to send you a new one.</p>"),
        ),
        OfferState::Used => (
            "This offer has already been used".to_owned(),
            format!(
                "<p>The credential has been issued to a wallet. If that was not you, \
                 contact {name}.</p>"
            ),
        ),
        OfferState::Withdrawn => (
            "This offer is no longer available".to_owned(),
            format!("<p>{name} has withdrawn it. Ask {name} if you still need the credential.</p>"),
        ),
    };
    Ok(page_html(
        &title,
        &format!("{logo}\n<h1>{title}</h1>\n{body}\n{support}"),
    ))
}

fn not_found() -> String {
    page_html(
        "Offer not found",
        "<h1>Offer not found</h1>\n<p>Check that the link is complete, or ask the sender for a \
         new one.</p>",
    )
}

fn page_html(title: &str, main: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>
body {{ margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d2330; background: #f3f5f8; }}
main {{ max-width: 30rem; margin: 2rem auto; padding: 2rem; background: #fff;
       border-radius: 12px; box-shadow: 0 1px 4px rgba(0, 0, 0, .08); text-align: center; }}
h1 {{ font-size: 1.4rem; margin: .5rem 0 1rem; }}
.logo {{ max-height: 56px; max-width: 60%; }}
.qr svg {{ width: 280px; max-width: 100%; height: auto; }}
.button {{ display: inline-block; padding: .8rem 1.6rem; border-radius: 8px; background: #1f5fd6;
          color: #fff; font-weight: 600; text-decoration: none; }}
.expiry, .support {{ color: #5b6475; font-size: .9rem; }}
</style>
</head>
<body>
<main>
{main}
</main>
</body>
</html>
"#
    )
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use issuer_domain::model::Branding;

    use super::*;

    fn landing(offer: OfferState) -> Landing {
        Landing {
            issuer_name: "Acme <Corp> & \"Sons\"".into(),
            branding: Branding {
                display_name: None,
                logo_url: Some("https://acme.example/logo.png?a=1&b=2".into()),
                support_contact: Some("help@acme.example".into()),
            },
            offer,
        }
    }

    #[test]
    fn open_offer_has_the_qr_the_link_and_escaped_branding() {
        let uri = "openid-credential-offer://?credential_offer_uri=https%3A%2F%2Fi.example%2Fo";
        let qr = crate::qr::svg(uri, 280).unwrap();
        let html = render(
            &landing(OfferState::Open {
                credential_offer_uri: uri.into(),
                expires_at: Utc.with_ymd_and_hms(2026, 12, 1, 9, 30, 0).unwrap(),
                needs_tx_code: true,
            }),
            Some(&qr),
        )
        .unwrap();
        assert!(html.contains("<svg"), "inline QR");
        assert!(!html.contains("<?xml"));
        assert!(html.contains(&format!(r#"href="{uri}""#)));
        assert!(html.contains("Acme &lt;Corp&gt; &amp; &quot;Sons&quot;"));
        assert!(!html.contains("<Corp>"));
        assert!(html.contains(r#"src="https://acme.example/logo.png?a=1&amp;b=2""#));
        assert!(html.contains(r#"href="mailto:help@acme.example""#));
        assert!(html.contains("1 December 2026, 09:30 UTC"));
        assert!(html.contains("transaction code"));
        assert!(!html.contains("<script"));
    }

    #[test]
    fn closed_offers_say_why_and_show_no_link() {
        for (offer, says) in [
            (OfferState::Expired, "has expired"),
            (OfferState::Used, "already been used"),
            (OfferState::Withdrawn, "no longer available"),
        ] {
            let html = render(&landing(offer), None).unwrap();
            assert!(html.contains(says), "{says}");
            assert!(!html.contains("openid-credential-offer"));
            assert!(!html.contains("<svg"));
        }
    }
}
