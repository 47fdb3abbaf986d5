//! Registry routes: `App::handle`, the request pipeline (parse → resolve once into a
//! [`Target`] → check access once → route function → error mapping → access log), and the
//! route modules, one function per route, each shaping its HTTP answer from validated names.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{HeaderValue, Request, Response, header};

use crate::access::{Caller, ClientAddr, Denied, Need, SERVICE, TOKEN_PATH};
use crate::access_log::RequestRecord;
use crate::app::App;
use crate::body::{self, Body};
use crate::error::Error;
use crate::media::Accept;
use crate::metrics::CacheKind;
use crate::reference::{Digest, Reference, Repository};
use crate::rewrite;
use crate::router::{self, Route};

pub mod admin;
pub mod blobs;
pub mod catalog;
pub mod challenge;
pub mod delete;
pub mod fleet;
pub mod manifests;
pub mod push;
pub mod referrers;
pub mod tags;
mod token;

/// The request id header, taken from the client when sane and always sent back.
const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// The digest of a manifest or blob answer.
pub(crate) const DOCKER_CONTENT_DIGEST: header::HeaderName =
    header::HeaderName::from_static("docker-content-digest");

/// Names the content of a blob or manifest answer: `Docker-Content-Digest`, and the digest
/// quoted as its `ETag` (written once, without the formatting machinery: every hit sends
/// both).
pub(crate) fn set_digest_headers(r: &mut http::Response<crate::body::Body>, digest: &Digest) {
    let mut etag = String::with_capacity(80);
    etag.push('"');
    digest.push_to(&mut etag);
    etag.push('"');
    crate::body::set_header(r, DOCKER_CONTENT_DIGEST, &etag[1..etag.len() - 1]);
    crate::body::set_header(r, header::ETAG, &etag);
}

/// Marks an answer served from the cache after the upstream could not confirm it.
pub(crate) const STALE: HeaderValue =
    HeaderValue::from_static("110 regcache \"Response is Stale\"");

/// A registry request resolved once: the upstream it goes to, the repository's name there,
/// and the name the client used. The reference (tag, digest, upload id) stays with the route.
pub struct Target {
    /// The repository as the client wrote it: access rules match it, and the `Location`s
    /// and `Link`s sent back use it.
    pub name: Repository,
    /// The upstream (its index in the configuration) and the repository's name there.
    pub routed: rewrite::Target,
}

impl Target {
    /// Index of the upstream in the configuration.
    pub fn upstream(&self) -> usize {
        self.routed.upstream
    }

    /// The repository's name at the upstream.
    pub fn repository(&self) -> &Repository {
        &self.routed.repository
    }
}

/// The access a route asks of its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asks {
    /// Pull.
    Pull,
    /// Push.
    Push,
    /// Delete (refused with `405` while deletes are off).
    Delete,
    /// A blob `HEAD`: a client that may push is asking whether the upstream repository has
    /// the blob; any other client needs pull and is answered from the cache.
    PushOrPull,
}

/// What `route` asks of the client.
fn asks(route: &Route, head: bool) -> Asks {
    match route {
        Route::Blob { .. } if head => Asks::PushOrPull,
        Route::Base
        | Route::Catalog { .. }
        | Route::Manifest { .. }
        | Route::Blob { .. }
        | Route::TagsList { .. }
        | Route::Referrers { .. } => Asks::Pull,
        Route::UploadStart { .. } | Route::Upload { .. } | Route::ManifestPut { .. } => Asks::Push,
        Route::ManifestDelete { .. } | Route::BlobDelete { .. } => Asks::Delete,
    }
}

/// The repository a route names, as the client wrote it (none for the base route and the
/// catalog).
fn repository_of(route: &Route) -> Option<&Repository> {
    match route {
        Route::Base | Route::Catalog { .. } => None,
        Route::Manifest { name, .. }
        | Route::Blob { name, .. }
        | Route::UploadStart { name, .. }
        | Route::Upload { name, .. }
        | Route::ManifestPut { name, .. }
        | Route::TagsList { name, .. }
        | Route::ManifestDelete { name, .. }
        | Route::BlobDelete { name, .. }
        | Route::Referrers { name, .. } => Some(name),
    }
}

/// Checks that the client may do what the route asks on `target`, and returns the access
/// granted: for [`Asks::PushOrPull`], push when the client may push, else pull.
async fn grant(caller: &Caller<'_>, asks: Asks, target: &Target) -> Result<Need, Denied> {
    let need = match asks {
        Asks::Pull => Need::Pull,
        Asks::Push => Need::Push,
        Asks::Delete => Need::Delete,
        Asks::PushOrPull
            if caller
                .permits(Need::Push, &target.name, &target.routed)
                .await =>
        {
            return Ok(Need::Push);
        }
        Asks::PushOrPull => Need::Pull,
    };
    caller.require(need, &target.name, &target.routed).await?;
    Ok(need)
}

impl App {
    /// The client's `X-Request-Id` when it is a sane token (a load balancer's), else a new
    /// one.
    fn request_id(&self, headers: &http::HeaderMap) -> String {
        let given = headers
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                (1..=64).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            });
        match given {
            Some(v) => v.to_owned(),
            None => format!(
                "{}-{}",
                self.request_id_prefix,
                self.next_request_id.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// Answers one request. Never fails: every error becomes an OCI JSON response.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let id = self.request_id(req.headers());
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let head = method == http::Method::HEAD;
        // Only the Host is kept: the challenge realm is built for the rare 401 alone.
        let host = req.headers().get(header::HOST).cloned();
        // With the method and path of the record, what names the scope in a challenge.
        let query = req.uri().query().map(str::to_owned);
        let authorization = req.headers().get(header::AUTHORIZATION).cloned();
        // At `debug`, every line logged while the request is served names it; at `info` the
        // span is not made (it cost a tenth of a cached hit) and the failure line names it.
        let span = tracing::debug_span!("request", request_id = %id, %method, path = %path);
        let mut record = RequestRecord::new(id.clone(), method, path);
        let mut pulled = None;
        let result = {
            use tracing::Instrument;
            self.route(req, &mut record, &mut pulled)
                .instrument(span.clone())
                .await
        };
        let cache_result = match &result {
            Ok(r) => r.extensions().get::<crate::metrics::CacheResult>().copied(),
            Err(e) => crate::metrics::result_of_error(e),
        };
        if let (Ok(r), Some(name)) = (&result, pulled) {
            if r.status().is_success() {
                crate::flight::lock(&self.metrics.pulls).record(&name);
            }
        }
        let mut error_reason = None;
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                error_reason = Some(crate::metrics::error_reason(&e));
                let e = match e {
                    Error::Rewrite(crate::rewrite::RewriteError::UnknownNamespace(ns)) => {
                        crate::hints::warn_unknown_namespace(&ns);
                        let hint = crate::hints::unknown_namespace(&ns);
                        Error::Hinted(
                            Box::new(Error::Rewrite(
                                crate::rewrite::RewriteError::UnknownNamespace(ns),
                            )),
                            hint,
                        )
                    }
                    e => e,
                };
                if e.status().is_server_error() {
                    if span.is_disabled() {
                        tracing::warn!(
                            request_id = %id,
                            method = %record.method,
                            path = %record.path,
                            error = %e,
                            "request failed"
                        );
                    } else {
                        tracing::warn!(parent: &span, error = %e, "request failed");
                    }
                }
                let challenge = matches!(e, Error::Access(Denied::Unauthenticated));
                let mut r = e.into_response(head);
                if challenge {
                    // Point clients at regcache's own token endpoint (never the upstream's).
                    let realm = self.token_realm(host.as_ref());
                    let asked = (&record.method, record.path.as_str(), query.as_deref());
                    let value = self.challenge(&realm, asked, authorization.as_ref());
                    body::set_header(&mut r, header::WWW_AUTHENTICATE, &value);
                }
                r
            }
        };
        resp.headers_mut().insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
        body::set_header(&mut resp, X_REQUEST_ID, &id);
        // Counts the request and writes its access-log line once the body has been sent.
        self.metrics
            .finish(record, cache_result, error_reason, resp)
    }

    /// Routes one request, noting in `record` what it was for (route, cache kind, upstream)
    /// and in `pulled` the repository of a manifest asked for by tag.
    async fn route<B>(
        self: &Arc<Self>,
        req: Request<B>,
        record: &mut RequestRecord,
        pulled: &mut Option<String>,
    ) -> Result<Response<Body>, Error>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let client = req.extensions().get::<ClientAddr>().copied();
        if let Some(f) = &self.fleet
            && req.uri().path().starts_with(crate::fleet::peer::PATH)
        {
            record.route = "fleet_peer";
            return Ok(
                fleet::peer_blob(self, f, req.method(), req.uri().path(), req.headers()).await,
            );
        }
        if self.config.admin_listen.is_none()
            && let Some(e) = admin::Endpoint::parse(req.method(), req.uri().path())
        {
            record.route = e.label();
            if e == admin::Endpoint::Status && self.access.challenges() {
                // The page names repositories: it needs an identified client.
                match self.access.caller(req.headers(), client).identify().await {
                    Err(Denied::Unauthenticated) => return Ok(admin::basic_challenge()),
                    Err(d) => return Err(d.into()),
                    Ok(_) => {}
                }
            }
            return Ok(admin::answer(self, e, req.method() == http::Method::HEAD).await);
        }
        if req.uri().path() == TOKEN_PATH && req.method() == http::Method::GET {
            record.route = "token";
            return self.token(req.headers(), req.uri().query(), client).await;
        }
        let parsed = router::parse(req.method(), req.uri().path(), req.uri().query())?;
        (record.route, record.kind) = match &parsed.route {
            Route::Base => ("base", None),
            Route::Manifest {
                reference: Reference::Tag(_),
                ..
            } => ("manifest", Some(CacheKind::Tag)),
            Route::Manifest { .. } => ("manifest", Some(CacheKind::Manifest)),
            Route::Blob { .. } => ("blob", Some(CacheKind::Blob)),
            Route::UploadStart { .. } | Route::Upload { .. } => ("upload", None),
            Route::ManifestPut { .. } => ("manifest_put", None),
            Route::TagsList { .. } => ("tags_list", None),
            Route::ManifestDelete { .. } | Route::BlobDelete { .. } => ("delete", None),
            Route::Referrers { .. } => ("referrers", None),
            Route::Catalog { .. } => ("catalog", None),
        };
        let (parts, body) = req.into_parts();
        let body: Body =
            http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(body, |e| {
                std::io::Error::other(e.into())
            }));
        let req = Request::from_parts(parts, ());
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        // The client's `Authorization` is read only by the access checks and never
        // forwarded: upstream requests are built from scratch with regcache's own credentials.
        let caller = self.access.caller(req.headers(), client);
        let head = parsed.head;
        let Some(name) = repository_of(&parsed.route) else {
            return match parsed.route {
                Route::Catalog { n, last } => {
                    if caller.must_identify_to_list() {
                        caller.identify().await?;
                    }
                    catalog::catalog(self, &caller, host, parsed.ns.as_deref(), n, last, head).await
                }
                _ => self.base(&caller, head).await,
            };
        };
        let target = Target {
            routed: self.routing.resolve(name, host, parsed.ns.as_deref())?,
            name: name.clone(),
        };
        let upstream = &self.upstreams[target.upstream()].name;
        record.upstream = Some(upstream.clone());
        // Checked once, against the upstream and repository the request is routed to.
        let granted = grant(&caller, asks(&parsed.route, head), &target).await?;
        if let Route::Manifest {
            reference: Reference::Tag(_),
            ..
        } = &parsed.route
        {
            *pulled = Some(format!("{upstream}/{}", target.repository()));
        }
        // Every arm but the manifest one is boxed. Their futures are 4.6 to 5.9 KB, against
        // 2.3 KB for a manifest. Inline, the largest would set the size of this future and of
        // the three around it, and each level is copied whole on every request: a manifest
        // hit spent about 5% of its CPU in that `memmove`. One allocation per blob, upload,
        // tag list, delete or referrers request costs less.
        match parsed.route {
            // Answered above: they name no repository.
            Route::Base | Route::Catalog { .. } => self.base(&caller, head).await,
            Route::Manifest { reference, .. } => {
                let accept = Accept::from_headers(req.headers());
                manifests::manifest(self, &target, &reference, &accept, head)
                    .await
                    .map_err(|e| {
                        let u = &self.config.upstreams[target.upstream()];
                        crate::hints::one_component_name(
                            e,
                            &u.name,
                            target.repository(),
                            u.is_docker_hub(),
                        )
                    })
            }
            Route::Blob { digest, .. } if granted == Need::Push => {
                // A pushing client asks whether the upstream repository has the blob; the
                // cache cannot answer that.
                Box::pin(push::blob_exists(self, &target, &digest)).await
            }
            Route::Blob { digest, .. } => {
                // Two `Range` headers are refused: answering from either one would be a guess.
                let mut ranges = req.headers().get_all(header::RANGE).iter();
                let range = match (ranges.next(), ranges.next()) {
                    (Some(_), Some(_)) => {
                        return Err(Error::Malformed("more than one Range header"));
                    }
                    (first, _) => first.and_then(|v| v.to_str().ok()).map(str::to_owned),
                };
                // Set by the server for every connection; absent when `handle` is called
                // directly, and then no per-client limit applies.
                let client = client.map(|c| c.0.ip());
                Box::pin(blobs::blob(
                    self,
                    target.upstream(),
                    target.repository(),
                    &digest,
                    range.as_deref(),
                    head,
                    client,
                ))
                .await
            }
            Route::UploadStart {
                mount,
                from,
                digest,
                ..
            } => {
                let mount = match (mount, from) {
                    (Some(d), Some(from)) => {
                        self.mount_source(&caller, &target, d, from, host, parsed.ns.as_deref())
                            .await
                    }
                    _ => None,
                };
                Box::pin(push::start(
                    self,
                    &target,
                    mount,
                    digest,
                    req.headers(),
                    body,
                ))
                .await
            }
            Route::Upload { id, digest, .. } => {
                Box::pin(push::continue_upload(
                    self,
                    req.method(),
                    &target,
                    &id,
                    digest,
                    req.headers(),
                    body,
                ))
                .await
            }
            Route::ManifestPut { reference, .. } => {
                Box::pin(push::put_manifest(
                    self,
                    &target,
                    &reference,
                    req.headers(),
                    body,
                ))
                .await
            }
            Route::TagsList { n, last, .. } => {
                Box::pin(tags::tags(self, &target, parsed.ns.as_deref(), n, last)).await
            }
            Route::ManifestDelete { reference, .. } => {
                Box::pin(delete::delete(
                    self,
                    &target,
                    delete::What::Manifest(reference),
                ))
                .await
            }
            Route::BlobDelete { digest, .. } => {
                Box::pin(delete::delete(self, &target, delete::What::Blob(digest))).await
            }
            Route::Referrers {
                digest,
                artifact_type,
                ..
            } => {
                Box::pin(referrers::referrers(
                    self,
                    &target,
                    &digest,
                    artifact_type,
                    head,
                ))
                .await
            }
        }
    }

    /// The `WWW-Authenticate` value for a refused request: the scope its route needs, and
    /// `insufficient_scope` when it carried a valid token that does not cover it.
    fn challenge(
        &self,
        realm: &str,
        (method, path, query): (&http::Method, &str, Option<&str>),
        authorization: Option<&HeaderValue>,
    ) -> String {
        let scope = router::parse(method, path, query)
            .ok()
            .and_then(|p| challenge::scope(&p.route));
        let insufficient =
            scope.is_some() && authorization.is_some_and(|v| self.access.holds_issued_token(v));
        challenge::bearer(realm, SERVICE, scope.as_deref(), insufficient)
    }

    /// `GET /v2/`: the API version check.
    async fn base(&self, caller: &Caller<'_>, head: bool) -> Result<Response<Body>, Error> {
        if self.access.challenges() {
            // So that `docker login` checks the password and `docker push` sends a token;
            // clients without credentials get an anonymous token from the realm and pull
            // with it where that is allowed.
            caller.identify().await?;
        }
        Ok(body::json("{}", head))
    }

    /// The source of a cross-repository mount, passed on only when it lives on the same
    /// upstream as `target` and the client may pull it; otherwise the client uploads the blob.
    async fn mount_source(
        &self,
        caller: &Caller<'_>,
        target: &Target,
        digest: Digest,
        from: Repository,
        host: Option<&str>,
        ns: Option<&str>,
    ) -> Option<(Digest, Repository)> {
        let source = self
            .routing
            .resolve(&from, host, ns)
            .ok()
            .filter(|f| f.upstream == target.upstream())?;
        caller
            .permits(Need::Pull, &from, &source)
            .await
            .then_some((digest, source.repository))
    }
}
