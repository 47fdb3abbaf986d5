//! The access checks of one request: who it comes from (authenticated once) and whether it
//! may pull, push or delete a repository at the upstream it is routed to.

use std::net::IpAddr;

use http::{HeaderMap, header};

use super::{Access, Denied, Identity, Need, Principal};
use crate::reference::Repository;
use crate::rewrite::Target;

/// The access checks of one request. Credentials are verified on first need and the outcome
/// kept, so a request that is checked twice counts one failed login at most.
pub struct Caller<'a> {
    pub(super) access: &'a Access,
    pub(super) headers: &'a HeaderMap,
    pub(super) client: IpAddr,
    pub(super) principal: tokio::sync::OnceCell<Result<Principal, Denied>>,
}

impl Caller<'_> {
    async fn principal(&self) -> Result<&Principal, Denied> {
        self.principal
            .get_or_init(|| self.access.verify(self.headers, self.client, true))
            .await
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Who the request comes from; an anonymous token counts, no credentials do not.
    pub async fn identify(&self) -> Result<&Identity, Denied> {
        self.principal().await.map(|p| &p.identity)
    }

    /// Whether the request may do `need` on `name` (as the client wrote it), routed to
    /// `target` (the upstream and its name for the repository). A pull anonymous clients may
    /// do ignores whatever `Authorization` it carries (Docker sends Docker Hub credentials to
    /// mirrors).
    pub async fn require(
        &self,
        need: Need,
        name: &Repository,
        target: &Target,
    ) -> Result<(), Denied> {
        self.decide(need, name, target, true).await
    }

    /// Like [`Caller::require`] for a request that has another way to go: true when it
    /// carries credentials that allow `need`; refusals are not logged.
    pub async fn permits(&self, need: Need, name: &Repository, target: &Target) -> bool {
        self.headers.contains_key(header::AUTHORIZATION)
            && self.decide(need, name, target, false).await.is_ok()
    }

    /// Whether the request must identify itself before a listing filtered by access: it
    /// carries no credentials and anonymous clients may pull nothing anywhere, so it is
    /// challenged (and comes back with credentials) instead of getting an empty list.
    pub fn must_identify_to_list(&self) -> bool {
        !self.headers.contains_key(header::AUTHORIZATION)
            && !self.access.policy.anonymous_pulls_somewhere()
    }

    /// Whether the client's identity may pull `target`, by the rules alone: the scope of an
    /// issued token is not consulted (a catalog token names the catalog, not repositories).
    /// Refusals are not logged; for listings filtered by access.
    pub async fn may_pull(&self, target: &Target) -> bool {
        let policy = &self.access.policy;
        let (upstream, repository) = (target.upstream, target.repository.as_str());
        if policy.allows(&Identity::Anonymous, Need::Pull, upstream, repository) {
            return true;
        }
        match self.principal().await {
            Ok(p) => policy.allows(&p.identity, Need::Pull, upstream, repository),
            Err(_) => false,
        }
    }

    async fn decide(
        &self,
        need: Need,
        name: &Repository,
        target: &Target,
        log: bool,
    ) -> Result<(), Denied> {
        let policy = &self.access.policy;
        if need == Need::Push && !policy.push_enabled() {
            return Err(Denied::PushDisabled);
        }
        if need == Need::Delete && !policy.delete_enabled() {
            return Err(Denied::DeleteDisabled);
        }
        let (upstream, repository) = (target.upstream, target.repository.as_str());
        if need == Need::Pull && policy.allows(&Identity::Anonymous, need, upstream, repository) {
            return Ok(());
        }
        let p = self.principal().await?;
        let allowed = policy.allows(&p.identity, need, upstream, repository);
        let in_scope = p
            .scope
            .as_ref()
            .is_none_or(|s| s.iter().any(|g| g.covers(name, need)));
        match (&p.identity, allowed) {
            (_, true) if in_scope => Ok(()),
            // Allowed, but the token was not issued for this: the challenge sends the client
            // back to the token endpoint.
            (Identity::Named(_), true) => Err(Denied::Unauthenticated),
            (Identity::Anonymous, _) => Err(Denied::Unauthenticated),
            (Identity::Named(who), false) => {
                if log {
                    tracing::info!(
                        user = %who,
                        upstream = %self.access.routing.name(upstream),
                        repository,
                        action = need.as_str(),
                        "access denied"
                    );
                }
                Err(Denied::Forbidden(who.clone()))
            }
        }
    }
}
