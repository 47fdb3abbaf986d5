//! Typed errors of the request path and the ONE place that maps them to OCI JSON responses.

use std::borrow::Cow;

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::body::{self, Body};
use crate::reference::ParseError;
use crate::rewrite::RewriteError;

/// What was being fetched when an upstream failed; picks the OCI "unknown" code for a 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A manifest.
    Manifest,
    /// A blob.
    Blob,
    /// A tag list.
    Tags,
}

impl Kind {
    /// The OCI code for "not found" of this kind.
    fn unknown_code(self) -> &'static str {
        match self {
            Kind::Manifest => "MANIFEST_UNKNOWN",
            Kind::Blob => "BLOB_UNKNOWN",
            Kind::Tags => "NAME_UNKNOWN",
        }
    }
}

/// Why a request line was refused (the router's parse errors, defined here so the mapping
/// below needs nothing from the router).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No such route.
    #[error("unknown route")]
    NotFound,
    /// The route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The route is part of the API but not offered here (push, catalog, delete).
    #[error("{0}")]
    Unsupported(&'static str),
    /// A name, tag or digest in the path is malformed.
    #[error(transparent)]
    Invalid(#[from] ParseError),
    /// A query parameter is malformed.
    #[error("invalid query parameter {0}")]
    Query(&'static str),
    /// An upload id that regcache never handed out.
    #[error("upload unknown")]
    UploadUnknown,
    /// A manifest asked for by a reference that cannot name one (a malformed tag): no such
    /// manifest, as a registry answers.
    #[error("manifest unknown")]
    ManifestUnknown,
}

/// Why an upstream exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (after retries).
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// The upstream did not answer, or stalled mid-body, within the configured timeout;
    /// which upstream and which timeout.
    #[error("upstream timed out: {0}")]
    Timeout(String),
    /// The upstream answered with an error status.
    #[error("upstream answered {0}")]
    Status(u16),
    /// Authentication with the upstream failed (token realm refused us, no credentials).
    #[error("upstream authentication failed: {0}")]
    Auth(String),
    /// The upstream's identity provider denied access (e.g. an AWS `AccessDenied`); the text
    /// names the provider's error code, never a secret.
    #[error("upstream access denied: {0}")]
    Denied(String),
    /// The upstream sent something unacceptable: wrong digest, oversized manifest, short body,
    /// redirect loop.
    #[error("upstream sent an invalid response: {0}")]
    Invalid(String),
}

/// An upstream status that means it is unwell rather than answering: 5xx or 429.
pub fn failing_status(status: u16) -> bool {
    status >= 500 || status == 429
}

impl UpstreamError {
    /// The same error, naming upstream `name` in front of the description of a failure to
    /// get an answer (unreachable, timed out) that does not name it yet.
    pub fn at(self, name: &str) -> Self {
        let named = |why: String| {
            if why.starts_with(name) {
                why
            } else {
                format!("{name}: {why}")
            }
        };
        match self {
            UpstreamError::Unreachable(why) => UpstreamError::Unreachable(named(why)),
            UpstreamError::Timeout(why) => UpstreamError::Timeout(named(why)),
            other => other,
        }
    }

    /// The upstream is unhealthy (no connection, timeout, 5xx, 429): cached answers may
    /// stand in for it. A 404 or a refusal is an answer, not ill health.
    pub fn is_unhealthy(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_) | UpstreamError::Timeout(_) => true,
            UpstreamError::Status(s) => failing_status(*s),
            _ => false,
        }
    }
}

/// Why the client was refused (access control). The 401 challenge header that goes with
/// `Unauthenticated` is added where the answer is built, which knows the token realm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Push is switched off on this proxy.
    #[error("push is not enabled on this proxy")]
    PushDisabled,
    /// Deleting is switched off on this proxy.
    #[error("deletes are not enabled on this proxy")]
    DeleteDisabled,
    /// No credentials, or wrong ones: answered 401 with a challenge pointing at regcache's
    /// token endpoint.
    #[error("authentication required")]
    Unauthenticated,
    /// Valid credentials without the permission: answered 403.
    #[error("{0} is not allowed to do this")]
    Forbidden(String),
    /// Too many failed logins from the client's address: answered 429 with `Retry-After`.
    #[error("too many failed logins from this address; retry in {}s", .0.as_secs())]
    TooManyFailures(std::time::Duration),
}

/// Every error a request can end in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed or unknown request line.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// No upstream for the name.
    #[error(transparent)]
    Rewrite(#[from] RewriteError),
    /// The manifest is not known here or upstream.
    #[error("manifest unknown")]
    ManifestUnknown,
    /// The manifest exists but in a media type the client did not accept.
    #[error("manifest media type {0} is not accepted by the client")]
    ManifestNotAccepted(String),
    /// The blob is not known here or upstream.
    #[error("blob unknown")]
    BlobUnknown,
    /// A `Range` that lies outside the blob.
    #[error("range not satisfiable for a blob of {0} bytes")]
    RangeNotSatisfiable(u64),
    /// An upstream fault while fetching `Kind`. The request log prints only this error's own
    /// text, so it repeats the upstream's reason.
    #[error("{1}")]
    Upstream(Kind, #[source] UpstreamError),
    /// Not in the cache, and the upstream may not be contacted (offline mode).
    #[error("not cached, and regcache is in offline mode")]
    Offline(Kind),
    /// A pushed manifest that cannot be accepted.
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    /// The client may not do this.
    #[error(transparent)]
    Access(#[from] Denied),
    /// An upload id that is unknown or expired.
    #[error("blob upload unknown")]
    UploadUnknown,
    /// An upstream's error answer to a push, passed back as it came (status, type, body).
    #[error("upstream answered {0}")]
    Passthrough(u16, Option<String>, bytes::Bytes),
    /// The client already has as many uncached blob downloads under way as it may.
    #[error("too many concurrent downloads from this client")]
    TooManyDownloads,
    /// A request whose framing or routing headers are ambiguous (RFC 9112 section 6.3:
    /// `Content-Length` with `Transfer-Encoding`, a second `Host`, ...).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A request head larger than the limits allow (431).
    #[error("request header fields too large: {0}")]
    HeadTooLarge(&'static str),
    /// A request in an HTTP version regcache does not speak (505).
    #[error("HTTP version not supported")]
    VersionNotSupported,
    /// An upload chunk that does not start where the upload stands (sent twice, or out of
    /// order): the upload's offset, and why.
    #[error("upload chunk refused: {1}")]
    UploadOffset(u64, String),
    /// A fault inside regcache; the text is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
    /// A disk or other I/O fault inside regcache, with its cause kept; logged, never sent.
    #[error("internal I/O error: {0}")]
    Io(#[source] std::io::Error),
    /// An error answered as it is, with a hint for the operator as its detail.
    #[error("{0} ({1})")]
    Hinted(Box<Error>, String),
}

impl crate::flight::FlightError for UpstreamError {
    fn aborted() -> Self {
        UpstreamError::Invalid("upstream exchange aborted".into())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

impl Error {
    /// The HTTP status and OCI error code of this error. Cheap: nothing is formatted or
    /// allocated, so callers may ask before deciding whether to log or answer.
    pub fn status_code(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            Error::Route(r) => match r {
                RouteError::NotFound => (S::NOT_FOUND, "NOT_FOUND"),
                RouteError::MethodNotAllowed | RouteError::Unsupported(_) => {
                    (S::METHOD_NOT_ALLOWED, "UNSUPPORTED")
                }
                RouteError::Invalid(p) => (
                    S::BAD_REQUEST,
                    match p {
                        ParseError::Repository(_) => "NAME_INVALID",
                        ParseError::Tag(_) => "TAG_INVALID",
                        ParseError::Digest(_) => "DIGEST_INVALID",
                    },
                ),
                RouteError::UploadUnknown => (S::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"),
                RouteError::ManifestUnknown => (S::NOT_FOUND, "MANIFEST_UNKNOWN"),
                RouteError::Query(_) => (S::BAD_REQUEST, "PAGINATION_NUMBER_INVALID"),
            },
            Error::Rewrite(RewriteError::UnknownNamespace(_)) => (S::NOT_FOUND, "NAME_UNKNOWN"),
            Error::Rewrite(RewriteError::Name(_)) => (S::BAD_REQUEST, "NAME_INVALID"),
            Error::ManifestUnknown | Error::ManifestNotAccepted(_) => {
                (S::NOT_FOUND, "MANIFEST_UNKNOWN")
            }
            Error::BlobUnknown => (S::NOT_FOUND, "BLOB_UNKNOWN"),
            Error::RangeNotSatisfiable(_) => (S::RANGE_NOT_SATISFIABLE, "RANGE_INVALID"),
            Error::Upstream(kind, u) => match u {
                UpstreamError::Status(404) => (S::NOT_FOUND, kind.unknown_code()),
                UpstreamError::Status(401) | UpstreamError::Auth(_) => {
                    (S::UNAUTHORIZED, "UNAUTHORIZED")
                }
                UpstreamError::Status(403) | UpstreamError::Denied(_) => (S::FORBIDDEN, "DENIED"),
                UpstreamError::Status(429) => (S::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
                UpstreamError::Status(_)
                | UpstreamError::Unreachable(_)
                | UpstreamError::Invalid(_) => (S::BAD_GATEWAY, "UNKNOWN"),
                UpstreamError::Timeout(_) => (S::GATEWAY_TIMEOUT, "UNKNOWN"),
            },
            Error::Access(d) => match d {
                Denied::PushDisabled | Denied::DeleteDisabled => {
                    (S::METHOD_NOT_ALLOWED, "UNSUPPORTED")
                }
                Denied::Unauthenticated => (S::UNAUTHORIZED, "UNAUTHORIZED"),
                Denied::Forbidden(_) => (S::FORBIDDEN, "DENIED"),
                Denied::TooManyFailures(_) => (S::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
            },
            Error::Offline(kind) => (S::NOT_FOUND, kind.unknown_code()),
            Error::ManifestInvalid(_) => (S::BAD_REQUEST, "MANIFEST_INVALID"),
            Error::UploadUnknown => (S::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"),
            Error::UploadOffset(..) => (S::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID"),
            Error::Passthrough(status, _, _) => {
                (S::from_u16(*status).unwrap_or(S::BAD_GATEWAY), "UNKNOWN")
            }
            Error::TooManyDownloads => (S::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
            Error::Malformed(_) => (S::BAD_REQUEST, "UNSUPPORTED"),
            Error::HeadTooLarge(_) => (S::REQUEST_HEADER_FIELDS_TOO_LARGE, "UNSUPPORTED"),
            Error::VersionNotSupported => (S::HTTP_VERSION_NOT_SUPPORTED, "UNSUPPORTED"),
            Error::Internal(_) | Error::Io(_) => (S::INTERNAL_SERVER_ERROR, "UNKNOWN"),
            Error::Hinted(inner, _) => inner.status_code(),
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.status_code().0
    }

    /// The message and detail of the OCI error body: what a client may read, never internals
    /// (addresses, paths). Built only when the answer is.
    fn message(&self) -> (Cow<'static, str>, Option<String>) {
        let fixed = |m: &'static str| (Cow::Borrowed(m), None);
        match self {
            Error::Route(r) => match r {
                RouteError::NotFound => fixed("unknown route"),
                RouteError::MethodNotAllowed => fixed("method not allowed on this route"),
                RouteError::Unsupported(why) => fixed(why),
                RouteError::Invalid(p) => (p.to_string().into(), None),
                RouteError::UploadUnknown => fixed("blob upload unknown to registry"),
                RouteError::ManifestUnknown => fixed("manifest unknown"),
                RouteError::Query(q) => (format!("invalid query parameter {q}").into(), None),
            },
            Error::Rewrite(RewriteError::UnknownNamespace(ns)) => (
                "no upstream is configured for this registry".into(),
                Some(format!("ns={ns}")),
            ),
            Error::Rewrite(RewriteError::Name(m)) => (m.clone().into(), None),
            Error::ManifestUnknown => fixed("manifest unknown"),
            Error::ManifestNotAccepted(mt) => (
                "manifest found, but in a media type the Accept header does not allow".into(),
                Some(mt.clone()),
            ),
            Error::BlobUnknown => fixed("blob unknown to registry"),
            Error::RangeNotSatisfiable(len) => (
                "requested range not satisfiable".into(),
                Some(format!("blob size {len}")),
            ),
            Error::Upstream(kind, u) => match u {
                UpstreamError::Status(404) => fixed(match kind {
                    Kind::Manifest => "manifest unknown",
                    Kind::Blob => "blob unknown to registry",
                    Kind::Tags => "repository name not known to registry",
                }),
                UpstreamError::Status(401) => (
                    "the upstream registry refused access".into(),
                    Some("upstream answered 401".into()),
                ),
                UpstreamError::Status(403) => (
                    "the upstream registry denied access".into(),
                    Some("upstream answered 403".into()),
                ),
                UpstreamError::Status(429) => fixed("the upstream registry is rate limiting"),
                UpstreamError::Status(s) => (
                    "the upstream registry failed".into(),
                    Some(format!("upstream answered {s}")),
                ),
                UpstreamError::Auth(why) => (
                    "authentication with the upstream registry failed".into(),
                    Some(why.clone()),
                ),
                UpstreamError::Denied(why) => (
                    "the upstream registry's identity provider denied access".into(),
                    Some(why.clone()),
                ),
                // The details name the configured upstream and the cause (DNS, refused, TLS,
                // timeout), never credentials, addresses or a URL's path and query.
                UpstreamError::Unreachable(why) => (
                    "the upstream registry is unreachable".into(),
                    Some(why.clone()),
                ),
                UpstreamError::Timeout(why) => {
                    ("the upstream registry timed out".into(), Some(why.clone()))
                }
                UpstreamError::Invalid(why) => (
                    "the upstream registry sent an invalid response".into(),
                    Some(why.clone()),
                ),
            },
            Error::Access(d) => fixed(match d {
                Denied::PushDisabled => "push is not enabled on this proxy",
                Denied::DeleteDisabled => "deletes are not enabled on this proxy",
                Denied::Unauthenticated => "authentication required",
                Denied::Forbidden(_) => "requested access to the resource is denied",
                Denied::TooManyFailures(_) => {
                    "too many failed logins from this address; try again later"
                }
            }),
            Error::Offline(_) => (
                "not in the cache, and regcache is in offline mode: no upstream is contacted"
                    .into(),
                Some("offline mode".into()),
            ),
            Error::ManifestInvalid(why) => ("manifest invalid".into(), Some(why.clone())),
            Error::UploadUnknown => fixed("blob upload unknown to registry"),
            Error::UploadOffset(_, why) => (
                "the chunk does not start where the upload stands".into(),
                Some(why.clone()),
            ),
            Error::Passthrough(..) => fixed("the upstream registry refused the request"),
            Error::TooManyDownloads => fixed("too many concurrent blob downloads from this client"),
            Error::Malformed(why) => ("malformed request".into(), Some((*why).into())),
            Error::HeadTooLarge(why) => (
                "request header fields too large".into(),
                Some((*why).into()),
            ),
            Error::VersionNotSupported => fixed("HTTP version not supported"),
            Error::Internal(_) | Error::Io(_) => fixed("internal error"),
            Error::Hinted(inner, hint) => (inner.message().0, Some(hint.clone())),
        }
    }

    /// The OCI JSON response for this error; HEAD answers carry no body.
    pub fn into_response(self, head: bool) -> Response<Body> {
        if let Error::Passthrough(status, content_type, body) = &self {
            // The upstream's own error (e.g. ECR's TAG_INVALID) reaches the client intact.
            let mut resp = Response::new(if head {
                body::empty()
            } else {
                body::full(body.clone())
            });
            *resp.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            let ct = content_type.as_deref().unwrap_or("application/json");
            if let Ok(v) = HeaderValue::from_str(ct) {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            return resp;
        }
        let (status, code) = self.status_code();
        let (message, detail) = self.message();
        let payload = json!({
            "errors": [{ "code": code, "message": message, "detail": detail }]
        })
        .to_string();
        let mut resp = body::json(payload, head);
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
        if let Error::RangeNotSatisfiable(total) = self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        if let Error::UploadOffset(offset, _) = self {
            // Where the upload stands, as registries answer it (`0-0` for an empty one).
            let range = format!("0-{}", offset.saturating_sub(1));
            if let Ok(v) = HeaderValue::from_str(&range) {
                h.insert(header::RANGE, v);
            }
        }
        if let Error::Access(Denied::TooManyFailures(wait)) = self {
            // Whole seconds, rounded up, so a client that waits that long is let in.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(e: Error) -> (StatusCode, serde_json::Value) {
        let r = e.into_response(false);
        let s = r.status();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        (s, serde_json::from_slice(&b).unwrap())
    }

    #[tokio::test]
    async fn oci_bodies() {
        let (s, v) = body_json(Error::BlobUnknown).await;
        assert_eq!(s, 404);
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        let (s, v) = body_json(Error::Upstream(Kind::Manifest, UpstreamError::Status(404))).await;
        assert_eq!(s, 404);
        assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
        let (s, v) = body_json(Error::Internal("/secret/path: EIO".into())).await;
        assert_eq!(s, 500);
        assert!(!v.to_string().contains("secret"));
        let (s, v) = body_json(Error::Upstream(
            Kind::Blob,
            UpstreamError::Unreachable("hub: connection refused".into()),
        ))
        .await;
        assert_eq!(s, 502);
        assert_eq!(v["errors"][0]["detail"], "hub: connection refused");
        assert_eq!(
            UpstreamError::Timeout("stalled".into()).at("hub"),
            UpstreamError::Timeout("hub: stalled".into())
        );
        assert_eq!(
            UpstreamError::Unreachable("hub: refused".into()).at("hub"),
            UpstreamError::Unreachable("hub: refused".into())
        );
        let (s, v) = body_json(Error::TooManyDownloads).await;
        assert_eq!(s, 429);
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
        let (s, v) = body_json(Error::Malformed("two Host headers")).await;
        assert_eq!(s, 400);
        assert_eq!(v["errors"][0]["detail"], "two Host headers");
        let r = Error::RangeNotSatisfiable(10).into_response(false);
        assert_eq!(r.status(), 416);
        assert_eq!(r.headers()["content-range"], "bytes */10");
        let r = Error::Access(Denied::TooManyFailures(std::time::Duration::from_millis(
            1500,
        )))
        .into_response(false);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
    }

    #[tokio::test]
    async fn status_agrees_with_the_answer_and_sources_are_kept() {
        let cases = [
            Error::Route(RouteError::Query("n")),
            Error::Rewrite(RewriteError::UnknownNamespace("x.io".into())),
            Error::ManifestNotAccepted("a/b".into()),
            Error::Upstream(Kind::Tags, UpstreamError::Status(404)),
            Error::Upstream(
                Kind::Blob,
                UpstreamError::Timeout("hub: read timeout".into()),
            ),
            Error::Hinted(Box::new(Error::BlobUnknown), "a hint".into()),
            Error::Access(Denied::Unauthenticated),
            Error::Offline(Kind::Blob),
            Error::Passthrough(409, None, bytes::Bytes::from_static(b"{}")),
            Error::Internal("x".into()),
        ];
        for e in cases {
            let (status, code) = e.status_code();
            assert_eq!(e.status(), status);
            let text = format!("{e:?}");
            let (s, v) = body_json(e).await;
            assert_eq!(s, status, "{text}");
            if s != 409 {
                assert_eq!(v["errors"][0]["code"], code, "{text}");
            }
        }
        let e = Error::Upstream(Kind::Manifest, UpstreamError::Timeout("hub: 30s".into()));
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("upstream timed out: hub: 30s"));
        let e = Error::from(std::io::Error::other("/cache/blobs: EIO"));
        assert_eq!(
            e.status_code(),
            (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN")
        );
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("/cache/blobs: EIO"));
        let (_, v) = body_json(e).await;
        assert!(!v.to_string().contains("/cache"), "no path sent: {v}");
    }
}
