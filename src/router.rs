//! Pure parsing of `/v2` request paths and queries into validated routes; no I/O.
//!
//! Repository names contain slashes, so the path is split from the right: the last segment is
//! the reference or digest and the one before it names the route (`manifests`, `blobs`), or
//! the path ends in `/tags/list`.

use http::Method;

pub use crate::error::RouteError;
use crate::reference::{Digest, Reference, Repository};

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: the API version check.
    Base,
    /// `GET|HEAD /v2/<name>/manifests/<reference>`.
    Manifest {
        /// Repository as the client wrote it.
        name: Repository,
        /// Tag or digest.
        reference: Reference,
    },
    /// `GET|HEAD /v2/<name>/blobs/<digest>`.
    Blob {
        /// Repository as the client wrote it.
        name: Repository,
        /// Blob digest.
        digest: Digest,
    },
    /// `POST /v2/<name>/blobs/uploads/` (push): start an upload, mount a blob from another
    /// repository (`mount`, `from`) or upload it whole (`digest`).
    UploadStart {
        /// Repository as the client wrote it.
        name: Repository,
        /// `mount=`: blob to mount.
        mount: Option<Digest>,
        /// `from=`: repository to mount it from.
        from: Option<Repository>,
        /// `digest=`: monolithic upload of this blob.
        digest: Option<Digest>,
    },
    /// `PATCH|PUT|GET|DELETE /v2/<name>/blobs/uploads/<id>` (push).
    Upload {
        /// Repository as the client wrote it.
        name: Repository,
        /// regcache's upload id.
        id: String,
        /// `digest=` of a closing `PUT`.
        digest: Option<Digest>,
    },
    /// `PUT /v2/<name>/manifests/<reference>` (push).
    ManifestPut {
        /// Repository as the client wrote it.
        name: Repository,
        /// Tag or digest.
        reference: Reference,
    },
    /// `GET /v2/<name>/tags/list?n=&last=`.
    TagsList {
        /// Repository as the client wrote it.
        name: Repository,
        /// Page size asked for.
        n: Option<u32>,
        /// Last tag of the previous page.
        last: Option<String>,
    },
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The route.
    pub route: Route,
    /// True for `HEAD`.
    pub head: bool,
    /// containerd's `ns=<registry host>` query parameter.
    pub ns: Option<String>,
}

/// Parses method, path and query. Query parameters other than `ns`, `n` and `last` are ignored.
pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<Parsed, RouteError> {
    let head = method == Method::HEAD;
    let read = method == Method::GET || head;
    let mut ns = None;
    let mut n = None;
    let mut last = None;
    let (mut digest_q, mut mount, mut from) = (None, None, None);
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "ns" => ns = Some(v.to_ascii_lowercase()),
            "n" => n = Some(v.parse::<u32>().map_err(|_| RouteError::Query("n"))?),
            "last" => last = Some(v.into_owned()),
            "digest" => digest_q = Some(v.parse::<Digest>()?),
            "mount" => mount = Some(v.parse::<Digest>()?),
            "from" => from = Some(v.parse::<Repository>()?),
            _ => {}
        }
    }
    let rest = match path.strip_prefix("/v2") {
        Some("") | Some("/") => {
            return if read {
                Ok(Parsed {
                    route: Route::Base,
                    head,
                    ns,
                })
            } else {
                Err(RouteError::MethodNotAllowed)
            };
        }
        Some(r) => r.strip_prefix('/').ok_or(RouteError::NotFound)?,
        None => return Err(RouteError::NotFound),
    };
    if rest == "_catalog" {
        return Err(RouteError::Unsupported(
            "the catalog is not offered by a pull-through cache",
        ));
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        let name: Repository = name.parse()?;
        if method != Method::GET {
            return Err(RouteError::MethodNotAllowed);
        }
        return Ok(Parsed {
            route: Route::TagsList { name, n, last },
            head,
            ns,
        });
    }
    if let Some((name, after)) = rest.split_once("/blobs/uploads") {
        let name: Repository = name.parse()?;
        let route = match after {
            "" | "/" if method == Method::POST => Route::UploadStart {
                name,
                mount,
                from,
                digest: digest_q,
            },
            "" | "/" => return Err(RouteError::MethodNotAllowed),
            id => {
                let id = id.strip_prefix('/').ok_or(RouteError::NotFound)?;
                if id.len() != 32
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(RouteError::UploadUnknown);
                }
                if ![Method::PATCH, Method::PUT, Method::GET, Method::DELETE].contains(method) {
                    return Err(RouteError::MethodNotAllowed);
                }
                Route::Upload {
                    name,
                    id: id.to_owned(),
                    digest: digest_q,
                }
            }
        };
        return Ok(Parsed { route, head, ns });
    }
    let (before, last_segment) = rest.rsplit_once('/').ok_or(RouteError::NotFound)?;
    let (name, kind) = before.rsplit_once('/').ok_or(RouteError::NotFound)?;
    let route = match kind {
        "manifests" => Route::Manifest {
            name: name.parse()?,
            reference: last_segment.parse()?,
        },
        "blobs" => Route::Blob {
            name: name.parse()?,
            digest: last_segment.parse()?,
        },
        _ => return Err(RouteError::NotFound),
    };
    if method == Method::PUT {
        if let Route::Manifest { name, reference } = route {
            return Ok(Parsed {
                route: Route::ManifestPut { name, reference },
                head,
                ns,
            });
        }
    }
    if !read {
        return Err(if method == Method::DELETE {
            RouteError::Unsupported("deleting through a cache is not supported")
        } else {
            RouteError::MethodNotAllowed
        });
    }
    Ok(Parsed { route, head, ns })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::ParseError;

    const D: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn get(path: &str) -> Result<Parsed, RouteError> {
        let (p, q) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        parse(&Method::GET, p, q)
    }

    #[test]
    fn table() {
        assert_eq!(get("/v2/").unwrap().route, Route::Base);
        assert_eq!(get("/v2").unwrap().route, Route::Base);
        let p = get("/v2/library/alpine/manifests/3.20").unwrap();
        assert_eq!(
            p.route,
            Route::Manifest {
                name: "library/alpine".parse().unwrap(),
                reference: "3.20".parse().unwrap()
            }
        );
        let p = get(&format!("/v2/a/manifests/b/blobs/{D}?ns=docker.io")).unwrap();
        assert_eq!(
            p.route,
            Route::Blob {
                name: "a/manifests/b".parse().unwrap(),
                digest: D.parse().unwrap()
            }
        );
        assert_eq!(p.ns.as_deref(), Some("docker.io"));
        let p = get("/v2/x/blobs/manifests/latest").unwrap();
        assert!(matches!(p.route, Route::Manifest { .. }));
        let p = get("/v2/a/b/tags/list?n=10&last=v1").unwrap();
        assert_eq!(
            p.route,
            Route::TagsList {
                name: "a/b".parse().unwrap(),
                n: Some(10),
                last: Some("v1".into())
            }
        );
        assert!(
            parse(&Method::HEAD, &format!("/v2/a/blobs/{D}"), None)
                .unwrap()
                .head
        );
    }

    #[test]
    fn push_routes() {
        let id = "0123456789abcdef0123456789abcdef";
        let p = parse(
            &Method::POST,
            "/v2/a/b/blobs/uploads/",
            Some(&format!("mount={D}&from=c/d")),
        )
        .unwrap();
        assert_eq!(
            p.route,
            Route::UploadStart {
                name: "a/b".parse().unwrap(),
                mount: Some(D.parse().unwrap()),
                from: Some("c/d".parse().unwrap()),
                digest: None
            }
        );
        let p = parse(
            &Method::PUT,
            &format!("/v2/a/blobs/uploads/{id}"),
            Some(&format!("digest={D}")),
        )
        .unwrap();
        assert_eq!(
            p.route,
            Route::Upload {
                name: "a".parse().unwrap(),
                id: id.into(),
                digest: Some(D.parse().unwrap())
            }
        );
        let p = parse(&Method::PUT, "/v2/a/manifests/v1", None).unwrap();
        assert!(matches!(p.route, Route::ManifestPut { .. }));
    }

    #[test]
    fn refusals() {
        assert_eq!(get("/v3/").unwrap_err(), RouteError::NotFound);
        assert_eq!(get("/v2x").unwrap_err(), RouteError::NotFound);
        assert_eq!(get("/v2/alpine").unwrap_err(), RouteError::NotFound);
        assert_eq!(get("/v2/alpine/foo/bar").unwrap_err(), RouteError::NotFound);
        assert!(matches!(
            get("/v2/_catalog"),
            Err(RouteError::Unsupported(_))
        ));
        assert!(matches!(
            get("/v2/../etc/manifests/latest"),
            Err(RouteError::Invalid(ParseError::Repository(_)))
        ));
        assert!(matches!(
            get("/v2/Alpine/manifests/latest"),
            Err(RouteError::Invalid(ParseError::Repository(_)))
        ));
        assert!(matches!(
            get("/v2/a/manifests/.bad"),
            Err(RouteError::Invalid(ParseError::Tag(_)))
        ));
        assert!(matches!(
            get("/v2/a/blobs/sha256:abc"),
            Err(RouteError::Invalid(ParseError::Digest(_)))
        ));
        assert!(matches!(
            get("/v2/a/blobs/latest"),
            Err(RouteError::Invalid(ParseError::Digest(_)))
        ));
        assert!(matches!(
            get("/v2/a%2F..%2Fb/manifests/x"),
            Err(RouteError::Invalid(_))
        ));
        assert_eq!(
            get("/v2/a/tags/list?n=x").unwrap_err(),
            RouteError::Query("n")
        );
        let long = format!("/v2/{}/manifests/x", "a".repeat(300));
        assert!(matches!(get(&long), Err(RouteError::Invalid(_))));
        assert!(matches!(
            parse(&Method::DELETE, "/v2/a/manifests/latest", None),
            Err(RouteError::Unsupported(_))
        ));
        assert_eq!(
            parse(&Method::PATCH, "/v2/a/blobs/uploads/not-ours", None).unwrap_err(),
            RouteError::UploadUnknown
        );
        assert_eq!(
            parse(&Method::GET, "/v2/a/blobs/uploads/", None).unwrap_err(),
            RouteError::MethodNotAllowed
        );
        assert!(matches!(
            parse(
                &Method::POST,
                "/v2/a/blobs/uploads/",
                Some("digest=sha256:12")
            ),
            Err(RouteError::Invalid(ParseError::Digest(_)))
        ));
        assert_eq!(
            parse(&Method::PATCH, "/v2/a/manifests/latest", None).unwrap_err(),
            RouteError::MethodNotAllowed
        );
        assert_eq!(
            parse(&Method::POST, "/v2/", None).unwrap_err(),
            RouteError::MethodNotAllowed
        );
    }
}
