//! Request budgets (DESIGN §12, §14): what one caller may cost the service per second.
//!
//! - Each API client has a budget on the management API (REST and gRPC alike) and on the
//!   token endpoint, where it is spent before the secret is checked, so that guessing one
//!   client's secret is as slow as its budget. A tenant may have its own (`issuer tenant
//!   limits`).
//! - Each client address has a budget on the unauthenticated endpoints (token, offer, nonce,
//!   credential, notification, landing page), and so does a management call whose token does
//!   not verify. The address is the connection's peer, or the last entry of the header the
//!   trusted proxy sets (`ISSUER_CLIENT_IP_HEADER`); IPv6 addresses count per /64.
//!
//! Budgets live in Redis when it is configured (shared by every replica), else in-process
//! (see `issuer_coordination::ratelimit`). The middleware that spends them is in `server.rs`;
//! each transport renders a refusal: a 429 in the endpoint's own error format
//! (problem+json `rate_limited`, or an OAuth error body on the OAuth and OID4VCI endpoints)
//! with `Retry-After` and the IETF `RateLimit-Policy` / `RateLimit` fields
//! (draft-ietf-httpapi-ratelimit-headers), or `RESOURCE_EXHAUSTED` with `RetryInfo` over
//! gRPC. Management responses carry the fields on success too.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use issuer_coordination::ratelimit::{Decision, Quota, RateLimiter};
use issuer_domain::{ids::TenantId, service::IssuanceService};

use crate::config::Settings;

/// Which budget a request spends, by the endpoint it calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `/issuer/api/v1/...` and `issuer.v1.IssuanceService`: the caller's API client.
    Management,
    /// `POST /issuer/oauth/token`: the address here, the client in the grant.
    Token,
    /// The wallet's and the recipient's endpoints: the address.
    Public,
}

impl Class {
    pub fn of(path: &str) -> Option<Self> {
        if path.starts_with("/issuer.v1.IssuanceService/")
            || (path.starts_with("/issuer/api/v1/") && path != crate::wire::OPENAPI_PATH)
        {
            Some(Self::Management)
        } else if path == "/issuer/oauth/token" {
            Some(Self::Token)
        } else if path.starts_with("/issuer/oid4vci/")
            || path.starts_with("/issuer/offer/")
            || path.starts_with("/issuer/status-lists/")
        {
            Some(Self::Public)
        } else {
            None
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Management => "management",
            Self::Token => "token",
            Self::Public => "public",
        }
    }
}

/// The outcome of spending one request from a budget.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    /// `client` or `ip`: the policy's name in the RateLimit fields.
    pub policy: &'static str,
    pub quota: Quota,
    pub decision: Decision,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.decision.allowed
    }

    pub fn retry_after_secs(&self) -> u64 {
        self.decision.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }

    /// `RateLimit-Policy`, `RateLimit` and, when refused, `Retry-After`.
    pub fn write_headers(&self, h: &mut HeaderMap) {
        let policy = format!(
            "\"{}\";q={};w={}",
            self.policy,
            self.quota.burst,
            self.quota.window_secs()
        );
        let reset = self.decision.reset.as_secs_f64().ceil() as u64;
        let state = format!(
            "\"{}\";r={};t={reset}",
            self.policy, self.decision.remaining
        );
        for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
        if !self.decision.allowed {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(self.retry_after_secs()),
            );
        }
    }

    /// What a refusal says.
    pub fn message(&self) -> String {
        format!(
            "too many requests: the {} budget of {}/s (burst {}) is spent; retry in {} s",
            self.policy,
            self.quota.per_sec,
            self.quota.burst,
            self.retry_after_secs()
        )
    }
}

/// The service's budgets and where they are kept.
pub struct Limits {
    limiter: Arc<dyn RateLimiter>,
    /// `None`: unlimited.
    client: Option<Quota>,
    ip: Option<Quota>,
    ip_header: Option<HeaderName>,
}

impl Limits {
    pub fn new(settings: &Settings, limiter: Arc<dyn RateLimiter>) -> Self {
        let quota = |per_sec, burst| (per_sec > 0).then_some(Quota { per_sec, burst });
        Self {
            limiter,
            client: quota(
                settings.rate_limit_client_per_sec,
                settings.rate_limit_client_burst,
            ),
            ip: quota(settings.rate_limit_ip_per_sec, settings.rate_limit_ip_burst),
            ip_header: (!settings.client_ip_header.is_empty())
                .then(|| HeaderName::from_bytes(settings.client_ip_header.as_bytes()).ok())
                .flatten(),
        }
    }

    /// Spends one request of an API client's budget: its tenant's own when it has one.
    /// `None` when clients are unlimited.
    pub async fn client(
        &self,
        tenants: &IssuanceService,
        client_id: &str,
        tenant: Option<TenantId>,
    ) -> Option<Verdict> {
        let default = self.client?;
        let quota = match tenant {
            Some(t) => match tenants.tenant(t).await {
                Ok(t) => t.client_rate_limit.map_or(default, |l| Quota {
                    per_sec: l.per_sec,
                    burst: l.burst,
                }),
                Err(_) => default,
            },
            None => default,
        };
        let decision = self.limiter.check(&format!("c:{client_id}"), quota).await;
        Some(Verdict {
            policy: "client",
            quota,
            decision,
        })
    }

    /// Spends one request of a client address's budget; `None` when addresses are unlimited.
    pub async fn address(&self, ip: IpAddr) -> Option<Verdict> {
        let quota = self.ip?;
        let decision = self.limiter.check(&format!("ip:{ip}"), quota).await;
        Some(Verdict {
            policy: "ip",
            quota,
            decision,
        })
    }

    /// The client's address: from the trusted proxy's header when configured (its last
    /// entry, the one that proxy added), else the connection's peer; IPv6 per /64, since one
    /// host holds a whole /64.
    pub fn client_ip(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> IpAddr {
        let forwarded = self.ip_header.as_ref().and_then(|name| {
            let value = headers.get_all(name).iter().next_back()?.to_str().ok()?;
            let last = value.rsplit(',').next()?.trim();
            last.parse::<IpAddr>()
                .ok()
                .or_else(|| last.parse::<SocketAddr>().ok().map(|a| a.ip()))
        });
        match forwarded.or(peer) {
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
            Some(v4) => v4,
            None => IpAddr::from([0, 0, 0, 0]),
        }
    }
}

/// Counts a refusal for `issuer_rate_limited_total{class}`.
pub fn refused(class: Class) {
    metrics::counter!("issuer_rate_limited_total", "class" => class.label()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use issuer_coordination::ratelimit::LocalLimiter;

    fn limits(header: &str) -> Limits {
        Limits::new(
            &Settings {
                client_ip_header: header.into(),
                ..Settings::default()
            },
            Arc::new(LocalLimiter::new()),
        )
    }

    #[test]
    fn classes_follow_the_paths() {
        assert_eq!(
            Class::of("/issuer/api/v1/issuances"),
            Some(Class::Management)
        );
        assert_eq!(
            Class::of("/issuer.v1.IssuanceService/GetIssuance"),
            Some(Class::Management)
        );
        assert_eq!(Class::of("/issuer/api/v1/openapi.json"), None);
        assert_eq!(Class::of("/issuer/oauth/token"), Some(Class::Token));
        assert_eq!(Class::of("/issuer/oid4vci/v1/nonce"), Some(Class::Public));
        assert_eq!(Class::of("/issuer/offer/abc"), Some(Class::Public));
        assert_eq!(Class::of("/issuer/status-lists/l"), Some(Class::Public));
        assert_eq!(Class::of("/healthz"), None);
    }

    #[test]
    fn the_address_comes_from_the_trusted_header_only_when_configured() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 10.0.0.7".parse().unwrap());
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let peer = Some(addr);
        assert_eq!(limits("").client_ip(&h, peer), addr);
        assert_eq!(
            limits("x-forwarded-for").client_ip(&h, peer),
            "10.0.0.7".parse::<IpAddr>().unwrap(),
            "the entry the trusted proxy appended, not one the client wrote"
        );
        h.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(limits("x-forwarded-for").client_ip(&h, peer), addr);
    }

    #[test]
    fn ipv6_addresses_count_per_64() {
        let l = limits("");
        let a = l.client_ip(
            &HeaderMap::new(),
            Some("2001:db8:1:2:aaaa::1".parse().unwrap()),
        );
        let b = l.client_ip(
            &HeaderMap::new(),
            Some("2001:db8:1:2:bbbb::9".parse().unwrap()),
        );
        assert_eq!(a, b);
        assert_eq!(a, "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let mapped = l.client_ip(&HeaderMap::new(), Some("::ffff:192.0.2.5".parse().unwrap()));
        assert_eq!(mapped, "192.0.2.5".parse::<IpAddr>().unwrap());
    }
}
