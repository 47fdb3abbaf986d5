//! The bounded labels an answer is counted under: the cache result a handler marks or an
//! error stands for, and the reason an error ended a request.

use http::Response;

use super::CacheResult;
use crate::body::Body;
use crate::error::{Error, UpstreamError};

/// Marks a handler's answer with how its cache lookup ended.
pub fn mark(mut resp: Response<Body>, result: CacheResult) -> Response<Body> {
    resp.extensions_mut().insert(result);
    resp
}

/// The cache result an error stands for: a lookup that had to go upstream (or could not,
/// offline) and failed there was a miss. Other errors (bad requests, access) looked nothing up.
pub fn result_of_error(e: &Error) -> Option<CacheResult> {
    if let Error::Hinted(inner, _) = e {
        return result_of_error(inner);
    }
    matches!(e, Error::Upstream(..) | Error::Offline(_)).then_some(CacheResult::Miss)
}

/// A bounded label for an error a request ended in.
pub fn error_reason(e: &Error) -> &'static str {
    match e {
        Error::Hinted(inner, _) => error_reason(inner),
        Error::Route(_)
        | Error::Rewrite(crate::rewrite::RewriteError::Name(_))
        | Error::ManifestInvalid(_)
        | Error::ManifestNotAccepted(_)
        | Error::RangeNotSatisfiable(_)
        | Error::UploadOffset(..)
        | Error::HeadTooLarge(_)
        | Error::VersionNotSupported
        | Error::Malformed(_) => "bad_request",
        Error::TooManyDownloads => "too_many_downloads",
        Error::Rewrite(_) | Error::ManifestUnknown | Error::BlobUnknown | Error::UploadUnknown => {
            "not_found"
        }
        Error::Access(_) => "access",
        Error::Upstream(_, u) => upstream_reason(u),
        Error::Passthrough(..) => "upstream_status",
        Error::Offline(_) => "offline",
        Error::Internal(_) | Error::Io(_) => "internal",
    }
}

fn upstream_reason(u: &UpstreamError) -> &'static str {
    match u {
        UpstreamError::Status(404) => "not_found",
        UpstreamError::Status(_) => "upstream_status",
        UpstreamError::Unreachable(_) => "upstream_unreachable",
        UpstreamError::Timeout(_) => "upstream_timeout",
        UpstreamError::Auth(_) | UpstreamError::Denied(_) => "upstream_auth",
        UpstreamError::Invalid(_) => "upstream_invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_bounded_reasons() {
        assert_eq!(
            error_reason(&Error::Upstream(
                crate::error::Kind::Blob,
                UpstreamError::Unreachable("10.0.0.1 refused".into())
            )),
            "upstream_unreachable"
        );
        assert_eq!(
            error_reason(&Error::Internal("/secret/path".into())),
            "internal"
        );
        assert_eq!(
            result_of_error(&Error::Offline(crate::error::Kind::Blob)),
            Some(CacheResult::Miss)
        );
        assert_eq!(result_of_error(&Error::BlobUnknown), None);
    }
}
