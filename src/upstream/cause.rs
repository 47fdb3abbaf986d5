//! Why an upstream exchange got no answer, in words an operator can act on: a DNS failure,
//! a refused or reset connection, a connect timeout, a TLS failure with its reason. Read from
//! the HTTP client's error chain; the text names the configured upstream (and the host name
//! that failed to resolve), never credentials, tokens, addresses or a URL's path and query.

use std::error::Error as StdError;
use std::fmt;
use std::io;

use url::Url;

/// What stopped an exchange before any answer came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The host name did not resolve; the resolver's words.
    Dns(String),
    /// Nothing listens on the port (TCP RST to the SYN).
    Refused,
    /// The connection was reset or closed before an answer.
    Reset,
    /// No TCP connection within `timeouts.connect`.
    ConnectTimeout,
    /// The TLS handshake failed; rustls's reason.
    Tls(String),
    /// Anything else; the innermost error's words.
    Other(String),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Dns(why) => write!(f, "DNS lookup failed: {why}"),
            Cause::Refused => f.write_str("connection refused"),
            Cause::Reset => f.write_str("connection reset before an answer"),
            Cause::ConnectTimeout => f.write_str("connect timed out"),
            Cause::Tls(why) if why.contains("InvalidContentType") => write!(
                f,
                "TLS handshake failed: {why} (the server may speak plain HTTP: use an http:// URL)"
            ),
            Cause::Tls(why) => write!(f, "TLS handshake failed: {why}"),
            Cause::Other(why) => f.write_str(why),
        }
    }
}

/// The next error down the chain. An `io::Error` wrapping another error is looked into:
/// its `source` skips the wrapped error itself, and hyper-rustls wraps tokio-rustls's
/// `io::Error` (which wraps the `rustls::Error`) in one more.
fn beneath<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    match e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
        Some(inner) => Some(inner as &(dyn StdError + 'static)),
        None => e.source(),
    }
}

/// Classifies an error chain from the HTTP client.
pub fn classify(error: &(dyn StdError + 'static)) -> Cause {
    let mut innermost = error.to_string();
    let mut dns = false;
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Cause::Tls(t.to_string());
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => return Cause::Refused,
                io::ErrorKind::TimedOut => return Cause::ConnectTimeout,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe => return Cause::Reset,
                _ => {}
            }
        }
        // hyper-util's connector says "dns error" and keeps the resolver's words beneath.
        if e.to_string().starts_with("dns error") {
            dns = true;
        }
        let text = e.to_string();
        if !text.is_empty() {
            innermost = text;
        }
        next = beneath(e);
    }
    if dns {
        Cause::Dns(innermost)
    } else {
        Cause::Other(innermost)
    }
}

/// `<upstream>: <cause>` for a request to `url` that got no answer. The host appears only
/// when its name failed to resolve: clients see this text, and the address an upstream is
/// reached at is the operator's business (the status page shows it).
pub fn describe(upstream: &str, url: &Url, cause: &Cause) -> String {
    let what = match cause {
        Cause::Dns(why) => format!(
            "DNS lookup of {} failed: {why}",
            url.host_str().unwrap_or_default()
        ),
        other => other.to_string(),
    };
    named(upstream, what)
}

/// `<upstream>: <what>`, or `what` alone when there is no name.
pub fn named(upstream: &str, what: impl fmt::Display) -> String {
    if upstream.is_empty() {
        what.to_string()
    } else {
        format!("{upstream}: {what}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a message and a source, as hyper and its connectors build them.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<dyn StdError + Send + Sync>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl StdError for Layer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn StdError + 'static))
        }
    }

    fn chain(outer: &'static str, middle: &'static str, inner: io::Error) -> Layer {
        Layer(outer, Some(Box::new(Layer(middle, Some(Box::new(inner))))))
    }

    #[test]
    fn causes_from_client_error_chains() {
        // The shape hyper-util gives a failed lookup: the DNS error is only in the words.
        let dns = chain(
            "client error (Connect)",
            "dns error",
            io::Error::other("failed to lookup address information: Name or service not known"),
        );
        assert_eq!(
            classify(&dns),
            Cause::Dns("failed to lookup address information: Name or service not known".into())
        );
        let refused = chain(
            "client error (Connect)",
            "tcp connect error",
            io::Error::from(io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(classify(&refused), Cause::Refused);
        let timeout = chain(
            "client error (Connect)",
            "tcp connect error",
            io::Error::new(io::ErrorKind::TimedOut, "connect timeout"),
        );
        assert_eq!(classify(&timeout), Cause::ConnectTimeout);
        // hyper-rustls wraps tokio-rustls's `io::Error`, which wraps the rustls error.
        let tls = Layer(
            "client error (Connect)",
            Some(Box::new(io::Error::other(io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            )))),
        );
        let cause = classify(&tls);
        assert!(
            matches!(&cause, Cause::Tls(why) if why.contains("UnknownIssuer")),
            "{cause:?}"
        );
        let other = Layer("client error (SendRequest)", None);
        assert_eq!(
            classify(&other),
            Cause::Other("client error (SendRequest)".into())
        );
    }

    #[test]
    fn descriptions_name_the_upstream_never_the_url() {
        let url = Url::parse("https://user:secret@registry.example:8443/v2/a/b?token=abc").unwrap();
        assert_eq!(
            describe("mine", &url, &Cause::Refused),
            "mine: connection refused"
        );
        assert_eq!(
            describe(
                "mine",
                &url,
                &Cause::Dns("Name or service not known".into())
            ),
            "mine: DNS lookup of registry.example failed: Name or service not known"
        );
        assert_eq!(
            describe("", &url, &Cause::ConnectTimeout),
            "connect timed out"
        );
        for cause in [Cause::Refused, Cause::Tls("x".into()), Cause::Reset] {
            let text = describe("mine", &url, &cause);
            assert!(
                !text.contains("secret") && !text.contains("token") && !text.contains("8443"),
                "{text}"
            );
        }
    }
}
