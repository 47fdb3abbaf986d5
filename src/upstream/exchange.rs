//! The authenticated exchange with the registry: answering its challenges and refreshing
//! refused credentials, and learning the authentication scheme before the first blob.

use http::{HeaderMap, Method, Response, StatusCode, header};
use url::Url;

use super::client;
use super::{MAX_ERROR_BODY, Upstream, box_incoming, read_capped};
use crate::body::{self, Body};
use crate::error::UpstreamError;
use crate::reference::Repository;

impl Upstream {
    /// Sends an authenticated, bodiless request for `repo` with pull scope.
    pub(super) async fn request(
        &self,
        method: &Method,
        repo: &Repository,
        path_and_query: &str,
        headers: HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        self.exchange(method, &scope, path_and_query, headers).await
    }

    /// Sends an authenticated, bodiless request (redirects followed). Answers one refusal:
    /// a 401 challenge (token dance, basic), or a 403 / 400-expired-token from an upstream
    /// whose credentials can be refreshed (ECR), with exactly one retry.
    pub(crate) async fn exchange(
        &self,
        method: &Method,
        scope: &str,
        path_and_query: &str,
        headers: HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        let url = self.url(path_and_query)?;
        self.exchange_url(method, scope, &url, headers).await
    }

    /// [`Upstream::exchange`] for a URL on the registry's own origin. GET and HEAD follow
    /// redirects; other methods are sent bodiless, without following.
    pub(crate) async fn exchange_url(
        &self,
        method: &Method,
        scope: &str,
        url: &Url,
        mut headers: HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        let url = url.clone();
        let mut auth = self.auth.header_for(scope).await?;
        // At most one answer to a challenge met without credentials (learning the scheme) and
        // one refresh of refused credentials: three sends in all.
        let mut learned = false;
        let mut refreshed = false;
        loop {
            match &auth {
                Some(v) => headers.insert(header::AUTHORIZATION, v.clone()),
                None => headers.remove(header::AUTHORIZATION),
            };
            let started = std::time::Instant::now();
            let sent = if *method == Method::GET || *method == Method::HEAD {
                self.client.send_following(method, &url, &headers).await
            } else {
                self.client.send(method, &url, &headers).await
            };
            self.stats.exchange(
                started.elapsed(),
                sent.as_ref().map(|r| r.status().as_u16()),
            );
            let resp = sent?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED {
                let may_answer = if auth.is_some() { !refreshed } else { !learned };
                if let (true, Some(ch)) = (may_answer, resp.headers().get(header::WWW_AUTHENTICATE))
                {
                    if auth.is_some() {
                        refreshed = true;
                    } else {
                        learned = true;
                    }
                    auth = Some(self.auth.on_challenge(ch, scope, auth.as_ref()).await?);
                    continue;
                }
            }
            let from_registry = resp
                .extensions()
                .get::<client::FromRedirectTarget>()
                .is_none();
            // Only credentials that can be refreshed make a refusal worth a second look;
            // anything else passes through untouched.
            if let (
                false,
                true,
                true,
                Some(sent),
                StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST,
            ) = (
                refreshed,
                from_registry,
                self.auth.may_refresh(),
                &auth,
                status,
            ) {
                let (parts, body) = resp.into_parts();
                let text = read_capped(body, MAX_ERROR_BODY, self.read_idle)
                    .await
                    .unwrap_or_default();
                let expired = String::from_utf8_lossy(&text)
                    .to_ascii_lowercase()
                    .contains("expired");
                if status == StatusCode::FORBIDDEN || expired {
                    if let Some(fresh) = self.auth.after_refusal(sent).await? {
                        refreshed = true;
                        auth = Some(fresh);
                        continue;
                    }
                }
                return Ok(Response::from_parts(parts, body::full(text)));
            }
            return Ok(resp.map(box_incoming));
        }
    }

    /// Before the first blob request (a cold blob right after start, with its manifest
    /// served from the cache): learns the authentication scheme from one bodiless
    /// `GET /v2/` and fetches the token for `repo`, so the blob is never sent without
    /// credentials only to be refused. Once per upstream; a failed probe leaves the old way
    /// (the blob request's own 401) in place.
    pub(super) async fn learn_scheme(&self, repo: &Repository) {
        if self.auth.scheme_known() {
            return;
        }
        self.scheme_probe
            .get_or_init(|| async {
                let Ok(url) = self.url("/v2/") else {
                    return;
                };
                let Ok(resp) = self
                    .client
                    .send(&Method::GET, &url, &HeaderMap::new())
                    .await
                else {
                    return;
                };
                if resp.status() != StatusCode::UNAUTHORIZED {
                    return;
                }
                if let Some(ch) = resp.headers().get(header::WWW_AUTHENTICATE) {
                    let scope = format!("repository:{repo}:pull");
                    if let Err(error) = self.auth.on_challenge(ch, &scope, None).await {
                        tracing::debug!(%error, upstream = %self.name, "scheme probe: no token");
                    }
                }
            })
            .await;
    }
}
