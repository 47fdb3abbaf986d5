//! Where an upstream redirect may lead: a pure classification of addresses (loopback,
//! link-local, private, cloud metadata) with the rule that decides, and the connector used
//! for every redirect hop off the registry's origin, which resolves the name itself, drops
//! the addresses the rule refuses, connects only to what is left and checks the address
//! actually connected.
//!
//! A faulty or hostile registry (or a CDN it hands off to) could otherwise point regcache at
//! the instance metadata service or an internal admin port, and regcache would stream the
//! answer to the client.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What kind of network an address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Reachable on the internet.
    Public,
    /// This host (127.0.0.0/8, ::1).
    Loopback,
    /// The link (169.254.0.0/16, fe80::/10).
    LinkLocal,
    /// Private networks (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7).
    Private,
    /// A cloud instance metadata service (169.254.169.254, fd00:ec2::254).
    Metadata,
    /// Never a server: unspecified, multicast, broadcast.
    Unusable,
}

const EC2_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Classifies one address. IPv4-mapped IPv6 addresses are classified as the IPv4 address.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let first = v6.segments()[0];
            if v6 == EC2_METADATA_V6 {
                AddressClass::Metadata
            } else if v6.is_loopback() {
                AddressClass::Loopback
            } else if v6.is_unspecified() || v6.is_multicast() {
                AddressClass::Unusable
            } else if first & 0xffc0 == 0xfe80 {
                AddressClass::LinkLocal
            } else if first & 0xfe00 == 0xfc00 {
                AddressClass::Private
            } else {
                AddressClass::Public
            }
        }
    }
}

fn classify_v4(v4: Ipv4Addr) -> AddressClass {
    let [a, b, ..] = v4.octets();
    if v4 == METADATA_V4 {
        AddressClass::Metadata
    } else if v4.is_loopback() {
        AddressClass::Loopback
    } else if v4.is_link_local() {
        AddressClass::LinkLocal
    } else if v4.is_private() || (a == 100 && (64..128).contains(&b)) {
        AddressClass::Private
    } else if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() || a == 0 {
        AddressClass::Unusable
    } else {
        AddressClass::Public
    }
}

/// Whether a redirect may connect to `target`, given the addresses the upstream registry
/// itself has. Public addresses are fine. An internal address is allowed only when the
/// upstream lives in the same kind of network (a registry on a private network handing off
/// to storage next to it); loopback only to the upstream's own address, since any other
/// loopback address is another service on this host. Metadata services and unusable
/// addresses never (a `redirect_hosts` entry is the only way to reach them).
pub fn permits(target: IpAddr, upstream: &[IpAddr]) -> bool {
    match classify(target) {
        AddressClass::Public => true,
        AddressClass::Metadata | AddressClass::Unusable => false,
        AddressClass::Loopback => upstream.iter().any(|u| canonical(*u) == canonical(target)),
        class @ (AddressClass::LinkLocal | AddressClass::Private) => {
            upstream.iter().any(|u| classify(*u) == class)
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The redirect rule of one upstream.
#[derive(Debug, Clone)]
pub struct RedirectPolicy {
    /// The registry's host (a name or an address literal) and port.
    upstream_host: String,
    upstream_port: u16,
    /// Host patterns (`*` globs) redirects may go to whatever they resolve to.
    allowed_hosts: Vec<String>,
}

impl RedirectPolicy {
    /// The rule for an upstream at `base` with the configured `redirect_hosts`.
    pub fn new(base: &url::Url, redirect_hosts: &[String]) -> Self {
        RedirectPolicy {
            upstream_host: base
                .host_str()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            upstream_port: base.port_or_known_default().unwrap_or(443),
            // Lowercased once here: hosts are compared without case.
            allowed_hosts: redirect_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        }
    }

    /// A rule that allows only public addresses (no upstream known).
    pub fn public_only() -> Self {
        RedirectPolicy {
            upstream_host: String::new(),
            upstream_port: 0,
            allowed_hosts: Vec::new(),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.allowed_hosts
            .iter()
            .any(|p| crate::config::glob_match(p, &host))
    }

    /// The upstream's own addresses (resolved now: they may change over time).
    async fn upstream_addresses(&self) -> Vec<IpAddr> {
        if self.upstream_host.is_empty() {
            return Vec::new();
        }
        if let Ok(ip) = self.upstream_host.parse::<IpAddr>() {
            return vec![ip];
        }
        match tokio::net::lookup_host((self.upstream_host.as_str(), self.upstream_port)).await {
            Ok(addrs) => addrs.map(|a| a.ip()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A redirect refused by the rule.
/// The addresses themselves go to the log only, never into an answer.
#[derive(Debug, thiserror::Error)]
#[error(
    "redirect to {host} refused: it leads only to internal addresses (allow it with redirect_hosts)"
)]
pub struct Refused {
    host: String,
}

/// The TCP connector for redirect hops: resolves the host itself, keeps only the addresses
/// the rule permits, connects to those by address (so nothing re-resolves the name in
/// between) and checks the peer address of the connection it got.
/// Without a policy it is the plain connector (for the registry's own origin).
#[derive(Clone)]
pub struct GuardedConnector {
    inner: HttpConnector,
    policy: Option<std::sync::Arc<RedirectPolicy>>,
}

impl GuardedConnector {
    /// Wraps `inner` (already configured with timeouts) with `policy`.
    pub fn new(inner: HttpConnector, policy: RedirectPolicy) -> Self {
        GuardedConnector {
            inner,
            policy: Some(std::sync::Arc::new(policy)),
        }
    }

    /// `inner` unchanged: for requests to the registry itself.
    pub fn unguarded(inner: HttpConnector) -> Self {
        GuardedConnector {
            inner,
            policy: None,
        }
    }

    async fn connect(mut self, dst: Uri) -> Result<TokioIo<TcpStream>, BoxError> {
        use tower_service::Service;
        let Some(policy) = self.policy.clone() else {
            return Ok(self.inner.call(dst).await?);
        };
        let host = dst
            .host()
            .ok_or("redirect URL without a host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let https = dst.scheme_str() == Some("https");
        let port = dst.port_u16().unwrap_or(if https { 443 } else { 80 });
        let resolved: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await?
                .map(|a| a.ip())
                .collect(),
        };
        let any_host = policy.host_allowed(&host);
        let upstream = if any_host {
            Vec::new()
        } else {
            policy.upstream_addresses().await
        };
        let allowed = |ip: IpAddr| any_host || permits(ip, &upstream);
        let usable: Vec<IpAddr> = resolved.iter().copied().filter(|ip| allowed(*ip)).collect();
        if usable.is_empty() {
            let shown = resolved
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            tracing::warn!(%host, addresses = %shown, "upstream redirect to an internal address refused");
            return Err(Box::new(Refused { host }));
        }
        let mut last: Option<BoxError> = None;
        for ip in usable {
            let by_address = Uri::builder()
                .scheme(if https { "https" } else { "http" })
                .authority(SocketAddr::new(ip, port).to_string())
                .path_and_query("/")
                .build()?;
            match self.inner.call(by_address).await {
                Ok(stream) => {
                    // The connection is to the address asked for; checked again so that no
                    // change in how the connector resolves can slip past the rule.
                    let peer = stream.inner().peer_addr()?.ip();
                    if !allowed(peer) {
                        tracing::warn!(%host, address = %peer, "upstream redirect connected to an internal address; refused");
                        return Err(Box::new(Refused { host }));
                    }
                    return Ok(stream);
                }
                Err(e) => last = Some(Box::new(e)),
            }
        }
        Err(last.unwrap_or_else(|| "no address to connect to".into()))
    }
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        Box::pin(self.clone().connect(dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classification_table() {
        use AddressClass::*;
        for (addr, want) in [
            ("8.8.8.8", Public),
            ("2001:4860::1", Public),
            ("127.0.0.1", Loopback),
            ("127.0.0.2", Loopback),
            ("::1", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("169.254.1.1", LinkLocal),
            ("169.254.169.254", Metadata),
            ("::ffff:169.254.169.254", Metadata),
            ("fd00:ec2::254", Metadata),
            ("fe80::1", LinkLocal),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("192.168.0.1", Private),
            ("100.64.0.1", Private),
            ("fd12::1", Private),
            ("0.0.0.0", Unusable),
            ("::", Unusable),
            ("224.0.0.1", Unusable),
            ("255.255.255.255", Unusable),
        ] {
            assert_eq!(classify(ip(addr)), want, "{addr}");
        }
    }

    #[test]
    fn rule_table() {
        let public = [ip("203.0.113.7")];
        let loopback = [ip("127.0.0.1")];
        let private = [ip("10.0.0.5")];
        for (target, upstream, want) in [
            ("198.51.100.1", &public[..], true),
            ("169.254.169.254", &public[..], false),
            ("fd00:ec2::254", &public[..], false),
            ("169.254.10.10", &public[..], false),
            ("fe80::1", &public[..], false),
            ("10.0.0.6", &public[..], false),
            ("127.0.0.1", &public[..], false),
            ("::1", &public[..], false),
            // A loopback upstream may redirect to itself, not to other local services.
            ("127.0.0.1", &loopback[..], true),
            ("::ffff:127.0.0.1", &loopback[..], true),
            ("127.0.0.2", &loopback[..], false),
            ("::1", &loopback[..], false),
            ("10.0.0.6", &loopback[..], false),
            // A registry on a private network may hand off to storage next to it.
            ("10.0.0.6", &private[..], true),
            ("192.168.1.1", &private[..], true),
            ("169.254.169.254", &private[..], false),
            ("127.0.0.1", &private[..], false),
            ("0.0.0.0", &loopback[..], false),
            ("8.8.8.8", &[][..], true),
            ("10.0.0.1", &[][..], false),
        ] {
            assert_eq!(
                permits(ip(target), upstream),
                want,
                "{target} from {upstream:?}"
            );
        }
    }

    #[test]
    fn allowed_hosts_are_globs() {
        let p = RedirectPolicy::new(
            &"https://registry.example:5000".parse().unwrap(),
            &["storage.internal".into(), "*.blob.internal".into()],
        );
        assert!(p.host_allowed("storage.internal"));
        assert!(p.host_allowed("Storage.Internal"));
        assert!(p.host_allowed("eu.blob.internal"));
        assert!(!p.host_allowed("evil.example"));
        assert_eq!(p.upstream_host, "registry.example");
        assert_eq!(p.upstream_port, 5000);
    }
}
