//! TLS for the registry listener: the rustls server configuration built from PEM files, and
//! re-read from them on SIGHUP without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::TlsAcceptor;

/// The TLS configuration served: built from PEM files at start-up and re-read from them by
/// [`Tls::reload`] (SIGHUP) without a restart.
#[derive(Debug)]
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    // Read (an `Arc` clone) once per handshake, replaced whole on reload; a std lock, never
    // held across an `.await`. Handshakes under way keep the configuration they started with.
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl Tls {
    /// Loads the certificate chain and key; the error names the file at fault.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Tls>, String> {
        let config = server_config(cert, key)?;
        Ok(Arc::new(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(config)),
        }))
    }

    /// Reads the files again and serves the new certificate to every later handshake. When the
    /// files do not make a valid configuration (unreadable, no certificate, a key that does
    /// not match) the current one stays and the error says why.
    pub fn reload(&self) -> Result<(), String> {
        let config = Arc::new(server_config(&self.cert, &self.key)?);
        // Writers replace the whole value, so a poisoned lock still holds a valid config.
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    /// The acceptor for one handshake, with the configuration current when it starts.
    pub(super) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// rustls' safe defaults: TLS 1.2 and 1.3 only, AEAD suites with forward secrecy (aws-lc-rs
/// provider), ALPN `h2` then `http/1.1`.
fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("tls.cert {}: no certificate found", cert.display()));
    }
    let key_path = key;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("tls: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        format!(
            "tls.cert {} with tls.key {}: {e}",
            cert.display(),
            key_path.display()
        )
    })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}
