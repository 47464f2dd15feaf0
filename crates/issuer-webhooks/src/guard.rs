//! SSRF guard: which destinations a webhook may be sent to (DESIGN §9).
//!
//! Webhook URLs are chosen by tenants, and the deliveries leave from inside
//! our network, so without a guard a tenant could make the issuer POST to
//! cloud metadata, a sidecar admin port or anything else on the private
//! network. The guard refuses every address that is not ordinary public
//! unicast, unless an operator explicitly allow-lists a network
//! ([`ALLOW_NETWORKS_ENV`], meant for tests and on-premises receivers).
//!
//! Invariants:
//! - The check that counts is the one at **connect time**, on every address
//!   DNS returned ([`GuardedResolver`]); the registration-time check in
//!   [`NetworkPolicy::check_url`] is a courtesy that gives early feedback and
//!   cannot be relied on (DNS may change; rebinding is an attack).
//! - reqwest does not call the resolver for IP-literal hosts, so a literal is
//!   judged by [`NetworkPolicy::check_url`], which the sender calls before
//!   every attempt.
//! - IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4)
//!   are judged by that IPv4 address, so `::ffff:127.0.0.1` is loopback.
//! - Plain `http` is for allow-listed networks only: every address it goes to
//!   must be allow-listed, so that tenant traffic to the public internet is
//!   always encrypted.
//! - Errors name the host, never the resolved addresses: they are shown to
//!   tenants, and internal addresses are not theirs to learn.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Environment variable holding the comma-separated allow-listed CIDRs.
pub const ALLOW_NETWORKS_ENV: &str = "ISSUER_WEBHOOK_ALLOW_NETWORKS";

/// Why a destination was refused. Shown to tenants, so it names hosts and
/// address classes but never the addresses a hostname resolved to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("webhook URL is not a valid absolute URL")]
    InvalidUrl,
    #[error("webhook URL scheme `{0}` is not supported: use https")]
    UnsupportedScheme(String),
    #[error("plain http is only allowed to allow-listed networks: use https")]
    PlainHttpNotAllowed,
    #[error("webhook URL must not contain a username or password")]
    UserInfo,
    #[error("webhook URL has no host")]
    MissingHost,
    #[error("destination {host} is not allowed ({reason} address)")]
    RefusedAddress { host: String, reason: &'static str },
    #[error("destination {host} does not resolve to any allowed address")]
    RefusedHost { host: String },
}

/// An IP network in CIDR notation, e.g. `127.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network `addr/prefix`; host bits of `addr` are cleared so that
    /// `127.0.0.1/8` means `127.0.0.0/8`.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        let max = max_prefix(addr);
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than /{max}"));
        }
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from_bits(a.to_bits() & mask32(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() & mask128(prefix))),
        };
        Ok(Self { network, prefix })
    }

    /// `addr/prefix`, or a bare address meaning a single host.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP network (expected e.g. 10.0.0.0/8)"))?;
        let prefix = match prefix {
            // Digits only: `u8::from_str` would also take `+8`.
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .map_err(|_| format!("`{s}` has an invalid prefix length"))?,
            Some(_) => return Err(format!("`{s}` has an invalid prefix length")),
            None => max_prefix(addr),
        };
        Self::new(addr, prefix).map_err(|e| format!("`{s}`: {e}"))
    }

    /// Whether `ip` lies in this network. An IPv4 network never contains an
    /// IPv6 address and vice versa; callers canonicalise mapped forms first.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => a.to_bits() & mask32(self.prefix) == n.to_bits(),
            (IpAddr::V6(n), IpAddr::V6(a)) => a.to_bits() & mask128(self.prefix) == n.to_bits(),
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask32(prefix: u8) -> u32 {
    // `checked_shl` because shifting a u32 by 32 is an overflow, and /0 is valid.
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// Which destinations deliveries may reach: public unicast always, plus the
/// explicitly allow-listed networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    allow: Vec<Cidr>,
}

impl NetworkPolicy {
    /// Parses the [`ALLOW_NETWORKS_ENV`] value: comma-separated CIDRs
    /// (`127.0.0.0/8,::1/128`). Empty or blank allows no extra networks.
    pub fn parse(s: &str) -> Result<Self, String> {
        let allow = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(Cidr::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{ALLOW_NETWORKS_ENV}: {e}"))?;
        Ok(Self { allow })
    }

    /// Reads [`ALLOW_NETWORKS_ENV`]; unset means no allow-list.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(ALLOW_NETWORKS_ENV) {
            Ok(v) => Self::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("{ALLOW_NETWORKS_ENV} is not valid UTF-8"))
            }
        }
    }

    /// A policy that allows exactly the given networks besides public unicast.
    pub fn with_allowed(allow: Vec<Cidr>) -> Self {
        Self { allow }
    }

    /// The allow-listed networks.
    pub fn allow_list(&self) -> &[Cidr] {
        &self.allow
    }

    /// Whether `ip` is inside an allow-listed network. An IPv4-mapped address
    /// is the same destination as its IPv4 address, so it is matched both ways.
    pub fn is_allow_listed(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        self.allow
            .iter()
            .any(|c| c.contains(ip) || c.contains(canonical))
    }

    /// Whether a delivery may connect to `ip`.
    ///
    /// The allow-list is matched against the address itself (and the IPv4 of a
    /// mapped address), never against an IPv4 embedded by NAT64 or 6to4:
    /// those reach the IPv4 host through a gateway, and allow-listing
    /// `127.0.0.0/8` for a local test receiver must not open the gateway's
    /// loopback.
    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        self.is_allow_listed(ip) || refusal_reason(ip).is_none()
    }

    /// Judges one address, with the reason for a refusal.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), GuardError> {
        if self.is_allowed(ip) {
            return Ok(());
        }
        Err(GuardError::RefusedAddress {
            host: ip.to_canonical().to_string(),
            reason: refusal_reason(ip).unwrap_or("non-public"),
        })
    }

    /// Validates a webhook URL, at registration and before every attempt.
    ///
    /// - `https` always; `http` only to allow-listed networks (an IP literal
    ///   must be allow-listed now; a hostname is accepted if there is an
    ///   allow-list at all, and then every address it resolves to must be
    ///   allow-listed at connect time).
    /// - No userinfo: credentials in URLs end up in logs, and receivers
    ///   authenticate us by signature, not the other way round.
    /// - IP-literal hosts are judged here and now. The URL parser normalises
    ///   exotic spellings (`http://2130706433/`, `0x7f.1`) to the address they
    ///   mean, so the judgement is on the real destination.
    pub fn check_url(&self, url: &str) -> Result<Url, GuardError> {
        let url = Url::parse(url.trim()).map_err(|_| GuardError::InvalidUrl)?;
        self.check_parsed_url(&url)?;
        Ok(url)
    }

    /// [`check_url`](Self::check_url) for an already parsed URL.
    pub fn check_parsed_url(&self, url: &Url) -> Result<(), GuardError> {
        let plain_http = match url.scheme() {
            "https" => false,
            "http" => true,
            other => return Err(GuardError::UnsupportedScheme(other.to_owned())),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(GuardError::UserInfo);
        }
        let Some(ip) = ip_literal_host(url)? else {
            // A hostname: nothing to judge until it resolves; but with no
            // allow-list no address could ever satisfy plain http, so say so now.
            if plain_http && self.allow.is_empty() {
                return Err(GuardError::PlainHttpNotAllowed);
            }
            return Ok(());
        };
        if plain_http {
            if self.is_allow_listed(ip) {
                return Ok(());
            }
            // A refused class is the more useful message ("loopback").
            self.check_ip(ip)?;
            return Err(GuardError::PlainHttpNotAllowed);
        }
        self.check_ip(ip)
    }
}

/// The host of an http(s) URL as an IP address, `None` for a hostname.
///
/// For the special schemes the URL parser has already normalised every IPv4
/// spelling to dotted decimal and put IPv6 in brackets, and a host that
/// parses as IPv4 is never kept as a domain, so parsing `host_str` is exact.
fn ip_literal_host(url: &Url) -> Result<Option<IpAddr>, GuardError> {
    let host = url.host_str().ok_or(GuardError::MissingHost)?;
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<Ipv6Addr>()
            .map(|a| Some(IpAddr::V6(a)))
            .map_err(|_| GuardError::InvalidUrl);
    }
    Ok(host.parse::<Ipv4Addr>().ok().map(IpAddr::V4))
}

/// Why `ip` is not ordinary public unicast, or `None` when it is.
///
/// Policy-independent: the allow-list is applied on top by
/// [`NetworkPolicy::is_allowed`]. IPv6 forms that embed an IPv4 address are
/// judged by the embedded address.
pub fn refusal_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => v4_reason(a),
        IpAddr::V6(a) => v6_reason(a),
    }
}

/// IPv4 ranges that are never a tenant's public receiver. First match wins,
/// so specific entries (metadata) come before the ranges that contain them.
const V4_REFUSED: &[([u8; 4], u8, &str)] = &[
    ([169, 254, 169, 254], 32, "cloud metadata"),
    ([0, 0, 0, 0], 32, "unspecified"),
    ([255, 255, 255, 255], 32, "broadcast"),
    ([0, 0, 0, 0], 8, "this-network"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([10, 0, 0, 0], 8, "private"),
    ([172, 16, 0, 0], 12, "private"),
    ([192, 168, 0, 0], 16, "private"),
    ([100, 64, 0, 0], 10, "shared (CGNAT)"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([192, 0, 0, 0], 24, "IETF protocol assignment"),
    ([192, 0, 2, 0], 24, "documentation"),
    ([198, 51, 100, 0], 24, "documentation"),
    ([203, 0, 113, 0], 24, "documentation"),
    ([198, 18, 0, 0], 15, "benchmarking"),
    ([192, 88, 99, 0], 24, "6to4 relay anycast"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([240, 0, 0, 0], 4, "reserved"),
];

/// IPv6 ranges refused outright. The IPv4-embedding prefixes are handled
/// separately in [`v6_reason`].
const V6_REFUSED: &[(u128, u8, &str)] = &[
    (0, 128, "unspecified"),
    (1, 128, "loopback"),
    // fd00:ec2::254, the AWS IMDS IPv6 endpoint (inside fc00::/7 too).
    (
        0xfd00_0ec2_0000_0000_0000_0000_0000_0254,
        128,
        "cloud metadata",
    ),
    (0xfc00 << 112, 7, "private (unique local)"),
    (0xfe80 << 112, 10, "link-local"),
    (0xfec0 << 112, 10, "site-local"),
    (0xff00 << 112, 8, "multicast"),
    (0x2001_0db8 << 96, 32, "documentation"),
    (0x3fff << 112, 20, "documentation"),
    // Teredo tunnels to an IPv4 host we cannot judge reliably.
    (0x2001_0000 << 96, 32, "Teredo"),
    (0x2001_0002 << 96, 48, "benchmarking"),
    (0x2001_0010 << 96, 28, "ORCHID"),
    (0x2001_0020 << 96, 28, "ORCHID"),
    (0x0100 << 112, 64, "discard-only"),
    // RFC 8215 local-use NAT64: translates into the operator's own network.
    (0x0064_ff9b_0001 << 80, 48, "local-use NAT64"),
    (0x5f00 << 112, 16, "SRv6 SID"),
];

fn v4_reason(a: Ipv4Addr) -> Option<&'static str> {
    V4_REFUSED.iter().find_map(|(net, prefix, reason)| {
        let net = u32::from_be_bytes(*net);
        (a.to_bits() & mask32(*prefix) == net).then_some(*reason)
    })
}

fn v6_reason(a: Ipv6Addr) -> Option<&'static str> {
    let bits = a.to_bits();
    if let Some(reason) = V6_REFUSED
        .iter()
        .find_map(|(net, prefix, reason)| (bits & mask128(*prefix) == *net).then_some(*reason))
    {
        return Some(reason);
    }
    embedded_v4(a).and_then(v4_reason)
}

/// The IPv4 address an IPv6 address stands for, if it is one of the
/// transition forms that carry one. Each of these ends up talking to that
/// IPv4 host, so it must pass the IPv4 rules.
fn embedded_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = a.to_bits();
    let low32 = Ipv4Addr::from_bits(bits as u32);
    let top96 = bits >> 32;
    match top96 {
        // ::ffff:a.b.c.d, IPv4-mapped: the same socket on a dual-stack host.
        0xffff => Some(low32),
        // ::a.b.c.d, deprecated IPv4-compatible (:: and ::1 matched earlier).
        0 => Some(low32),
        // ::ffff:0:a.b.c.d, SIIT IPv4-translated.
        0xffff_0000 => Some(low32),
        // 64:ff9b::a.b.c.d, well-known NAT64 prefix.
        0x0064_ff9b_0000_0000_0000_0000 => Some(low32),
        // 2002:AABB:CCDD::/48, 6to4: the IPv4 is bits 16..48.
        _ if bits >> 112 == 0x2002 => Some(Ipv4Addr::from_bits((bits >> 80) as u32)),
        _ => None,
    }
}

/// A reqwest DNS resolver that applies the [`NetworkPolicy`] to every
/// address it returns, so the connection can only go where the guard agrees,
/// whatever DNS said at registration time.
///
/// Two modes, because reqwest does not tell a resolver the URL scheme (the
/// sender uses one client per scheme):
/// - [`new`](Self::new) (https): refused addresses are dropped; the lookup
///   fails if none remain.
/// - [`allow_listed_only`](Self::allow_listed_only) (plain http): the lookup
///   fails unless **every** address is allow-listed, so a name cannot mix an
///   allow-listed address with a public one and leak plain-text traffic.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<NetworkPolicy>,
    allow_listed_only: bool,
}

impl GuardedResolver {
    pub fn new(policy: Arc<NetworkPolicy>) -> Self {
        Self {
            policy,
            allow_listed_only: false,
        }
    }

    pub fn allow_listed_only(policy: Arc<NetworkPolicy>) -> Self {
        Self {
            policy,
            allow_listed_only: true,
        }
    }

    /// Resolves `host` and applies the policy; the port of the returned
    /// addresses is 0 (reqwest substitutes the URL's).
    pub async fn lookup(&self, host: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(ResolveError::Dns)?
            .collect();
        if found.is_empty() {
            return Err(ResolveError::Dns(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no addresses found for {host}"),
            )));
        }
        let total = found.len();
        let permitted: Vec<SocketAddr> = found
            .into_iter()
            .filter(|a| {
                if self.allow_listed_only {
                    self.policy.is_allow_listed(a.ip())
                } else {
                    self.policy.is_allowed(a.ip())
                }
            })
            .collect();
        let refused = total - permitted.len();
        if permitted.is_empty() || (self.allow_listed_only && refused > 0) {
            // Addresses go to the operator's log only, never into the error.
            tracing::debug!(host, refused, total, "webhook destination refused by guard");
            return Err(ResolveError::Refused(GuardError::RefusedHost {
                host: host.to_owned(),
            }));
        }
        if refused > 0 {
            tracing::debug!(
                host,
                refused,
                total,
                "dropped refused addresses for webhook destination"
            );
        }
        Ok(permitted)
    }
}

/// A failed guarded lookup: either DNS itself failed (worth retrying) or the
/// guard refused every address (do not retry until the URL changes).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("DNS lookup failed: {0}")]
    Dns(std::io::Error),
    #[error(transparent)]
    Refused(GuardError),
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = this.lookup(&host).await?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn none() -> NetworkPolicy {
        NetworkPolicy::parse("").unwrap()
    }

    fn loopback_allowed() -> NetworkPolicy {
        NetworkPolicy::parse("127.0.0.0/8,::1/128").unwrap()
    }

    #[test]
    fn every_refused_class_is_refused_without_an_allow_list() {
        let p = none();
        let refused = [
            // loopback
            "127.0.0.1",
            "127.255.255.254",
            "::1",
            // unspecified
            "0.0.0.0",
            "::",
            // private
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "fc00::1",
            "fdff:ffff::1",
            // link-local
            "169.254.1.1",
            "fe80::1",
            "febf::1",
            // CGNAT
            "100.64.0.1",
            "100.127.255.255",
            // metadata
            "169.254.169.254",
            "fd00:ec2::254",
            // multicast
            "224.0.0.1",
            "239.255.255.250",
            "ff02::1",
            "ff0e::1",
            // broadcast
            "255.255.255.255",
            // documentation / benchmarking
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.255",
            "2001:db8::1",
            "2001:2::1",
            // this network, reserved
            "0.1.2.3",
            "240.0.0.1",
            "250.1.2.3",
            // IETF protocol assignments (incl. NAT64 discovery)
            "192.0.0.170",
            // IPv4-mapped / compatible / translated
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::ffff:0:127.0.0.1",
            // NAT64 embedding refused IPv4
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            // 6to4 embedding refused IPv4 (2002:7f00:0001:: -> 127.0.0.1)
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            // Teredo
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            // site-local, discard
            "fec0::1",
            "100::1",
        ];
        for a in refused {
            assert!(!p.is_allowed(ip(a)), "{a} should be refused");
            assert!(refusal_reason(ip(a)).is_some(), "{a} should have a reason");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        let p = none();
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001:81b::200e",
            // mapped / NAT64 / 6to4 forms of a public IPv4 are public
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(p.is_allowed(ip(a)), "{a} should be allowed");
        }
    }

    #[test]
    fn embedded_forms_are_judged_by_their_ipv4() {
        assert_eq!(refusal_reason(ip("::ffff:127.0.0.1")), Some("loopback"));
        assert_eq!(refusal_reason(ip("64:ff9b::a00:1")), Some("private"));
        assert_eq!(
            refusal_reason(ip("2002:a9fe:a9fe::")),
            Some("cloud metadata")
        );
        assert_eq!(refusal_reason(ip("::ffff:8.8.8.8")), None);
    }

    #[test]
    fn allow_list_permits_its_networks_only() {
        let p = loopback_allowed();
        assert!(p.is_allowed(ip("127.0.0.1")));
        assert!(p.is_allowed(ip("127.1.2.3")));
        assert!(p.is_allowed(ip("::1")));
        // The mapped form is the same destination as 127.0.0.1.
        assert!(p.is_allowed(ip("::ffff:127.0.0.1")));
        // NAT64 / 6to4 reach it through a gateway: not covered.
        assert!(!p.is_allowed(ip("64:ff9b::7f00:1")));
        assert!(!p.is_allowed(ip("2002:7f00:1::1")));
        // Everything else is still refused.
        assert!(!p.is_allowed(ip("10.0.0.1")));
        assert!(!p.is_allowed(ip("169.254.169.254")));
        assert!(!p.is_allowed(ip("fe80::1")));
        assert!(p.is_allowed(ip("8.8.8.8")));
    }

    #[test]
    fn policy_parsing() {
        assert_eq!(none().allow_list(), &[]);
        assert_eq!(NetworkPolicy::parse(" , ").unwrap().allow_list(), &[]);
        let p = NetworkPolicy::parse(" 127.0.0.0/8 , ::1/128,10.1.2.3").unwrap();
        let shown: Vec<String> = p.allow_list().iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["127.0.0.0/8", "::1/128", "10.1.2.3/32"]);
        for bad in [
            "127.0.0.0/33",
            "::1/129",
            "localhost",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "1.2.3/8",
        ] {
            let err = NetworkPolicy::parse(bad).unwrap_err();
            assert!(err.contains(ALLOW_NETWORKS_ENV), "{err}");
        }
    }

    #[test]
    fn cidr_contains_and_masks_host_bits() {
        let c = Cidr::parse("192.168.1.77/16").unwrap();
        assert_eq!(c.to_string(), "192.168.0.0/16");
        assert!(c.contains(ip("192.168.200.1")));
        assert!(!c.contains(ip("192.169.0.1")));
        assert!(!c.contains(ip("::ffff:192.168.0.1")));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("255.255.255.255")));
        assert!(!all.contains(ip("::1")));
        let all6 = Cidr::parse("::/0").unwrap();
        assert!(all6.contains(ip("::1")));
        let one = Cidr::parse("fd00::1/128").unwrap();
        assert!(one.contains(ip("fd00::1")));
        assert!(!one.contains(ip("fd00::2")));
    }

    #[test]
    fn urls_need_https_unless_the_literal_is_allow_listed() {
        let p = none();
        assert!(p.check_url("https://example.com/hook").is_ok());
        assert!(p.check_url("https://8.8.8.8/hook").is_ok());
        assert!(p.check_url("https://[2606:4700:4700::1111]:8443/").is_ok());
        assert_eq!(
            p.check_url("http://example.com/hook"),
            Err(GuardError::PlainHttpNotAllowed)
        );
        assert_eq!(
            p.check_url("http://8.8.8.8/hook"),
            Err(GuardError::PlainHttpNotAllowed)
        );
        assert_eq!(
            p.check_url("ftp://example.com/"),
            Err(GuardError::UnsupportedScheme("ftp".into()))
        );
        assert_eq!(p.check_url("not a url"), Err(GuardError::InvalidUrl));
        assert_eq!(p.check_url("/relative"), Err(GuardError::InvalidUrl));

        let l = loopback_allowed();
        assert!(l.check_url("http://127.0.0.1:8080/hook").is_ok());
        assert!(l.check_url("http://[::1]:8080/hook").is_ok());
        // A hostname is judged at connect time, where all its addresses must be allow-listed.
        assert!(l.check_url("http://localhost:8080/hook").is_ok());
        // Allow-listing loopback does not open plain http to the internet.
        assert_eq!(
            l.check_url("http://8.8.8.8/"),
            Err(GuardError::PlainHttpNotAllowed)
        );
        assert!(matches!(
            l.check_url("http://10.0.0.1/"),
            Err(GuardError::RefusedAddress {
                reason: "private",
                ..
            })
        ));
    }

    #[test]
    fn urls_with_userinfo_are_refused() {
        for p in [none(), loopback_allowed()] {
            assert_eq!(
                p.check_url("https://user:pw@example.com/"),
                Err(GuardError::UserInfo)
            );
            assert_eq!(
                p.check_url("https://user@example.com/"),
                Err(GuardError::UserInfo)
            );
            assert_eq!(
                p.check_url("https://:pw@example.com/"),
                Err(GuardError::UserInfo)
            );
            assert_eq!(
                p.check_url("http://user@127.0.0.1/"),
                Err(GuardError::UserInfo)
            );
        }
    }

    #[test]
    fn ip_literal_hosts_are_judged_at_registration() {
        let p = none();
        for (url, reason) in [
            ("https://10.0.0.1/", "private"),
            ("http://[::1]/", "loopback"),
            ("http://[::ffff:127.0.0.1]/", "loopback"),
            ("http://0.0.0.0/", "unspecified"),
            (
                "https://169.254.169.254/latest/meta-data/",
                "cloud metadata",
            ),
            ("https://[fd00:ec2::254]/", "cloud metadata"),
            ("https://[64:ff9b::a00:1]/", "private"),
            // Alternative spellings of 127.0.0.1 are normalised by the parser.
            ("https://2130706433/", "loopback"),
            ("https://0x7f.1/", "loopback"),
            ("https://127.1/", "loopback"),
            ("https://127.0.0.1./", "loopback"),
        ] {
            match p.check_url(url) {
                Err(GuardError::RefusedAddress { reason: r, .. }) => assert_eq!(r, reason, "{url}"),
                other => panic!("{url}: expected refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn errors_name_the_host_not_resolved_addresses() {
        let e = GuardError::RefusedHost {
            host: "internal.example".into(),
        };
        assert_eq!(
            e.to_string(),
            "destination internal.example does not resolve to any allowed address"
        );
    }

    #[tokio::test]
    async fn resolver_refuses_a_name_that_resolves_to_loopback() {
        let r = GuardedResolver::new(Arc::new(none()));
        match r.lookup("localhost").await {
            Err(ResolveError::Refused(GuardError::RefusedHost { host })) => {
                assert_eq!(host, "localhost");
            }
            other => panic!("expected refusal, got {other:?}"),
        }
        let allowed = GuardedResolver::allow_listed_only(Arc::new(loopback_allowed()));
        let addrs = allowed.lookup("localhost").await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        // Only 127/8 allow-listed: if localhost also resolves to ::1, the strict
        // (http) mode refuses the name, while https mode keeps the v4 address.
        let v4_only = Arc::new(NetworkPolicy::parse("127.0.0.0/8").unwrap());
        let lenient = GuardedResolver::new(v4_only.clone())
            .lookup("localhost")
            .await
            .unwrap();
        assert!(lenient.iter().all(|a| a.is_ipv4()));
        let strict = GuardedResolver::allow_listed_only(v4_only)
            .lookup("localhost")
            .await;
        if lenient.len() < addrs.len() {
            assert!(matches!(strict, Err(ResolveError::Refused(_))));
        } else {
            assert!(strict.is_ok());
        }
    }
}
