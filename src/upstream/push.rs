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
        let mut auth = if own_origin {
            self.auth.header_for(&scope).await?
        } else {
            None
        };
        let Some(body) = body else {
            for attempt in 0..2 {
                match &auth {
                    Some(v) => headers.insert(header::AUTHORIZATION, v.clone()),
                    None => headers.remove(header::AUTHORIZATION),
                };
                let resp = self
                    .client
                    .send_body(method, &url, &headers, crate::body::empty())
                    .await?;
                if attempt == 0 && own_origin {
                    if resp.status() == StatusCode::UNAUTHORIZED {
                        if let Some(ch) = resp.headers().get(header::WWW_AUTHENTICATE) {
                            auth = Some(self.auth.on_challenge(ch, &scope, auth.as_ref()).await?);
                            continue;
                        }
                    }
                    if resp.status() == StatusCode::FORBIDDEN {
                        if let Some(sent) = &auth {
                            if let Some(fresh) = self.auth.after_refusal(sent).await? {
                                auth = Some(fresh);
                                continue;
                            }
                        }
                    }
                }
                return Ok(resp.map(box_incoming));
            }
            return Err(UpstreamError::Status(401));
        };
        if auth.is_none() && own_origin {
            // The scheme is not known yet and the body cannot be sent twice: learn it from a
            // bodiless probe first (answered 401 with the challenge by registries that want
            // credentials, 200 by those that do not).
            let probe = Box::pin(self.push(
                &Method::GET,
                repo,
                &PushTarget::Path("/v2/".into()),
                HeaderMap::new(),
                None,
            ))
            .await?;
            drop(probe);
            auth = self.auth.header_for(&scope).await?;
        }
        if let Some(v) = auth {
            headers.insert(header::AUTHORIZATION, v);
        }
        let resp = self.client.send_body(method, &url, &headers, body).await?;
        Ok(resp.map(box_incoming))
    }
}
