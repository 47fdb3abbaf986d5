//! Push requests towards one upstream: the registry's upload and manifest endpoints with push
//! scope, bodies streamed through, authentication answered where a request can be repeated.

use http::{HeaderMap, Method, Response, StatusCode, header};
use url::Url;

use super::{Upstream, box_incoming};
use crate::body::Body;
use crate::error::UpstreamError;
use crate::reference::Repository;

/// Creates a repository that a push found missing (ECR with `create_repositories`).
#[async_trait::async_trait]
pub trait RepositoryCreator: Send + Sync + 'static {
    /// Creates `name` with the configured settings; an existing repository is success.
    async fn create_repository(&self, name: &str) -> Result<(), UpstreamError>;
}

/// Where a push request goes.
#[derive(Debug, Clone)]
pub enum PushTarget {
    /// A path and query on the upstream (`/v2/<repo>/blobs/uploads/`).
    Path(String),
    /// A URL the upstream handed out in a `Location` header.
    Url(Url),
}

impl Upstream {
    /// Whether a push that finds the repository missing may create it.
    pub fn creates_repositories(&self) -> bool {
        self.repository_creator.is_some()
    }

    /// Creates a missing repository (see [`RepositoryCreator`]).
    pub async fn create_repository(&self, repo: &Repository) -> Result<(), UpstreamError> {
        match &self.repository_creator {
            Some(c) => {
                tracing::info!(upstream = %self.name, repository = %repo, "creating missing repository");
                c.create_repository(repo.as_str()).await
            }
            None => Err(UpstreamError::Status(404)),
        }
    }

    /// Resolves an upstream `Location` (absolute or relative) against the registry.
    pub fn resolve_location(&self, location: &str) -> Result<Url, UpstreamError> {
        self.base
            .join(location)
            .map_err(|_| UpstreamError::Invalid("unusable Location from upstream".into()))
    }

    /// Sends a push request for `repo` with `pull,push` scope. A bodiless request answers one
    /// 401 challenge (or an ECR refusal) and is sent again; a request with a body is sent once,
    /// since its body cannot be replayed (the upload start before it has already settled the
    /// authentication scheme). `Authorization` goes only to the registry's own origin.
    pub async fn push(
        &self,
        method: &Method,
        repo: &Repository,
        target: &PushTarget,
        mut headers: HeaderMap,
        body: Option<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let scope = format!("repository:{repo}:pull,push");
        let url = match target {
            PushTarget::Path(p) => self.url(p)?,
            PushTarget::Url(u) => u.clone(),
        };
        let own_origin = url.origin() == self.base.origin();
        let Some(body) = body else {
            // Bodiless steps can be repeated: the shared exchange answers a challenge and a
            // refusal of the credentials with one refresh, with the usual timeouts. Only the
            // registry's own origin ever receives credentials.
            return if own_origin {
                self.exchange_url(method, &scope, &url, headers).await
            } else {
                headers.remove(header::AUTHORIZATION);
                Ok(self
                    .client
                    .send(method, &url, &headers)
                    .await?
                    .map(box_incoming))
            };
        };
        let mut auth = if own_origin {
            self.auth.header_for(&scope).await?
        } else {
            None
        };
        if auth.is_none() && own_origin {
            // The scheme is not known yet and the body cannot be sent twice: learn it from a
            // bodiless probe first (answered 401 with the challenge by registries that want
            // credentials, 200 by those that do not).
            let probe = self.url("/v2/")?;
            drop(
                self.exchange_url(&Method::GET, &scope, &probe, HeaderMap::new())
                    .await?,
            );
            auth = self.auth.header_for(&scope).await?;
        }
        if let Some(v) = &auth {
            headers.insert(header::AUTHORIZATION, v.clone());
        }
        let resp = self.client.send_body(method, &url, &headers, body).await?;
        if let (Some(sent), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) =
            (&auth, resp.status())
        {
            // This body is spent, but the next request should carry fresh credentials.
            let refreshed = match resp.headers().get(header::WWW_AUTHENTICATE) {
                Some(ch) => self
                    .auth
                    .on_challenge(ch, &scope, Some(sent))
                    .await
                    .map(|_| ()),
                None => self.auth.after_refusal(sent).await.map(|_| ()),
            };
            if let Err(e) = refreshed {
                tracing::debug!(error = %e, "could not refresh refused upstream credentials");
            }
        }
        Ok(resp.map(box_incoming))
    }
}
