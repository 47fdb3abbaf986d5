//! Pure: the `WWW-Authenticate` challenge regcache answers a refused registry request with,
//! and the token scope it names, taken from the parsed route (what a client that follows the
//! token protocol literally must ask the realm for before retrying).

use crate::router::Route;

/// The scope a route needs: `pull` to read, `pull,push` to write (and `pull` on the source
/// repository of a cross-repository mount), `delete` to delete, `registry:catalog:*` for the
/// catalog. `None` for the API version check.
pub fn scope(route: &Route) -> Option<String> {
    let repo = |name: &dyn std::fmt::Display, actions: &str| format!("repository:{name}:{actions}");
    Some(match route {
        Route::Base => return None,
        Route::Manifest { name, .. }
        | Route::Blob { name, .. }
        | Route::TagsList { name, .. }
        | Route::Referrers { name, .. } => repo(name, "pull"),
        Route::UploadStart {
            name,
            from: Some(from),
            mount: Some(_),
            ..
        } if from != name => format!("{} {}", repo(name, "pull,push"), repo(from, "pull")),
        Route::UploadStart { name, .. }
        | Route::Upload { name, .. }
        | Route::ManifestPut { name, .. } => repo(name, "pull,push"),
        Route::ManifestDelete { name, .. } | Route::BlobDelete { name, .. } => repo(name, "delete"),
        Route::Catalog { .. } => "registry:catalog:*".to_owned(),
    })
}

/// A `Bearer` challenge pointing at `realm`; `insufficient`: the request carried a token
/// that is valid but does not cover `scope`.
pub fn bearer(realm: &str, service: &str, scope: Option<&str>, insufficient: bool) -> String {
    let mut v = format!("Bearer realm=\"{realm}\",service=\"{service}\"");
    if let Some(s) = scope {
        v.push_str(&format!(",scope=\"{s}\""));
    }
    if insufficient {
        v.push_str(",error=\"insufficient_scope\"");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::parse;
    use http::Method;

    const D: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn scope_of(method: Method, path: &str, query: Option<&str>) -> Option<String> {
        scope(&parse(&method, path, query).unwrap().route)
    }

    #[test]
    fn scopes_by_route() {
        let id = "0123456789abcdef0123456789abcdef";
        for (method, path, query, want) in [
            (Method::GET, "/v2/".to_owned(), None, None),
            (
                Method::GET,
                "/v2/a/b/manifests/v1".to_owned(),
                None,
                Some("repository:a/b:pull"),
            ),
            (
                Method::HEAD,
                format!("/v2/a/blobs/{D}"),
                None,
                Some("repository:a:pull"),
            ),
            (
                Method::GET,
                "/v2/a/tags/list".to_owned(),
                None,
                Some("repository:a:pull"),
            ),
            (
                Method::POST,
                "/v2/a/blobs/uploads/".to_owned(),
                None,
                Some("repository:a:pull,push"),
            ),
            (
                Method::PATCH,
                format!("/v2/a/blobs/uploads/{id}"),
                None,
                Some("repository:a:pull,push"),
            ),
            (
                Method::PUT,
                "/v2/a/manifests/v1".to_owned(),
                None,
                Some("repository:a:pull,push"),
            ),
            (
                Method::DELETE,
                format!("/v2/a/manifests/{D}"),
                None,
                Some("repository:a:delete"),
            ),
            (
                Method::GET,
                format!("/v2/a/referrers/{D}"),
                None,
                Some("repository:a:pull"),
            ),
            (
                Method::GET,
                "/v2/_catalog".to_owned(),
                None,
                Some("registry:catalog:*"),
            ),
        ] {
            assert_eq!(scope_of(method, &path, query).as_deref(), want, "{path}");
        }
        let mount = format!("mount={D}&from=c/d");
        assert_eq!(
            scope_of(Method::POST, "/v2/a/b/blobs/uploads/", Some(&mount)).as_deref(),
            Some("repository:a/b:pull,push repository:c/d:pull")
        );
    }

    #[test]
    fn challenge_values() {
        assert_eq!(
            bearer("http://h/auth/token", "regcache", None, false),
            "Bearer realm=\"http://h/auth/token\",service=\"regcache\""
        );
        assert_eq!(
            bearer(
                "http://h/auth/token",
                "regcache",
                Some("repository:a:pull,push"),
                true
            ),
            "Bearer realm=\"http://h/auth/token\",service=\"regcache\",\
             scope=\"repository:a:pull,push\",error=\"insufficient_scope\""
        );
    }
}
