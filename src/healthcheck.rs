//! `regcache healthcheck`: asks a running regcache's `GET /healthz`, found through the same
//! configuration it serves with, and turns the answer into an exit code (container health
//! checks, scripts).
//!
//! The probe goes to `admin_listen` when it is set (plain HTTP), else to `listen`, over TLS
//! when `[tls]` is configured (that listener then speaks TLS only). A wildcard address is
//! reached on loopback. Over TLS the server must present the certificate in `tls.cert`:
//! the probe pins it instead of checking a name, since the name in the certificate is the
//! one clients use, not `127.0.0.1`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Config;

/// Most bytes of the answer read to find its status line.
const MAX_HEAD: usize = 8 * 1024;

/// Where the probe goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The address connected to (a wildcard listen address turned into loopback).
    pub addr: SocketAddr,
    /// The configuration key the address came from: `admin_listen` or `listen`.
    pub key: &'static str,
    /// Whether that listener speaks TLS.
    pub tls: bool,
}

impl Target {
    /// `admin_listen` when set (plain HTTP), else `listen` (TLS when `[tls]` is set).
    pub fn of(config: &Config) -> Target {
        let (addr, key, tls) = match config.admin_listen {
            Some(a) => (a, "admin_listen", false),
            None => (config.listen, "listen", config.tls.is_some()),
        };
        Target {
            addr: reachable(addr),
            key,
            tls,
        }
    }

    /// `http://…/healthz` or `https://…/healthz`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/healthz", self.addr)
    }
}

/// A listen address as a client reaches it: the unspecified address becomes loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// Probes the regcache `config` describes. `Ok` with a one-line description when it answers
/// `200`; `Err` with a one-line reason otherwise (nothing listening, timeout, TLS failure,
/// another status).
pub async fn probe(config: &Config, timeout: Duration) -> Result<String, String> {
    let target = Target::of(config);
    let url = target.url();
    let tls = match (&config.tls, target.tls) {
        (Some(t), true) => Some(client_config(&t.cert)?),
        _ => None,
    };
    let exchange = async {
        let tcp = TcpStream::connect(target.addr)
            .await
            .map_err(|e| format!("cannot connect to {} ({}): {e}", target.addr, target.key))?;
        match tls {
            None => ask(tcp, target.addr).await,
            Some(cfg) => {
                let name = ServerName::IpAddress(target.addr.ip().into());
                let stream = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", target.addr))?;
                ask(stream, target.addr).await
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(format!("unhealthy: {url}: no answer within {timeout:?}")),
        Ok(Err(reason)) => Err(format!("unhealthy: {url}: {reason}")),
        Ok(Ok(200)) => Ok(format!("healthy: {url} answered 200")),
        Ok(Ok(status)) => Err(format!("unhealthy: {url} answered {status}")),
    }
}

/// `text` on one line: its non-blank lines, trimmed, joined with ` | ` (a multi-line
/// configuration error in a health check's one-line report).
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Sends `GET /healthz` and returns the status code of the answer.
async fn ask<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddr,
) -> Result<u16, String> {
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: regcache-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        if head.len() >= MAX_HEAD {
            return Err("no status line in the answer".into());
        }
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err("connection closed before an answer".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    status_of(&head).ok_or_else(|| "the answer is not HTTP".into())
}

/// The status code of an HTTP/1 status line (`HTTP/1.1 200 OK`).
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    let code = parts.next()?;
    (version.starts_with("HTTP/1.") && code.len() == 3)
        .then(|| code.parse().ok())
        .flatten()
}

/// A TLS client that accepts exactly the end-entity certificate of `cert` (PEM), with the
/// handshake signatures checked as usual.
fn client_config(cert: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let unhealthy = |e: String| format!("unhealthy: tls.cert {}: {e}", cert.display());
    let leaf = CertificateDer::pem_file_iter(cert)
        .map_err(|e| unhealthy(e.to_string()))?
        .next()
        .ok_or_else(|| unhealthy("no certificate found".into()))?
        .map_err(|e| unhealthy(e.to_string()))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let verifier = PinnedCert {
        leaf,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| unhealthy(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts the server when it presents `leaf` itself (and proves it holds its key).
#[derive(Debug)]
struct PinnedCert {
    leaf: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the one in tls.cert".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsConfig;

    #[test]
    fn admin_listen_wins_and_wildcards_become_loopback() {
        let mut c = Config {
            listen: "0.0.0.0:5000".parse().unwrap(),
            ..Config::default()
        };
        assert_eq!(
            Target::of(&c),
            Target {
                addr: "127.0.0.1:5000".parse().unwrap(),
                key: "listen",
                tls: false
            }
        );
        c.tls = Some(TlsConfig {
            cert: "c.pem".into(),
            key: "k.pem".into(),
        });
        assert_eq!(Target::of(&c).url(), "https://127.0.0.1:5000/healthz");
        c.admin_listen = Some("[::]:9090".parse().unwrap());
        let t = Target::of(&c);
        assert_eq!((t.key, t.tls), ("admin_listen", false));
        assert_eq!(t.url(), "http://[::1]:9090/healthz");
        c.admin_listen = Some("10.1.2.3:9090".parse().unwrap());
        assert_eq!(Target::of(&c).addr, "10.1.2.3:9090".parse().unwrap());
    }

    #[test]
    fn reasons_fit_on_one_line() {
        assert_eq!(
            one_line("parse error at line 1\n  |\n1 | listen = \"x\"\n\ninvalid\n"),
            "parse error at line 1 | | | 1 | listen = \"x\" | invalid"
        );
        assert_eq!(one_line("fine"), "fine");
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_of(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_of(b"HTTP/1.1 404\r\n"), Some(404));
        for bad in [
            &b"SSH-2.0-x\r\n"[..],
            b"HTTP/1.1 2000 x\r\n",
            b"\r\n",
            b"HTTP/2 200\r\n",
        ] {
            assert_eq!(status_of(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
