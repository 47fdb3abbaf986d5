//! Amazon ECR in a build without the `ecr` cargo feature: an [`Ecr`] that cannot exist.
//!
//! Configuration validation refuses `[upstream.ecr]` in such a build, naming the key, so the
//! upstream code never meets an ECR upstream; [`Ecr::new`] says the same should a
//! configuration arrive unvalidated. Being an empty enum, [`Ecr`] keeps the upstream code
//! identical in both builds without a value that could pretend to be an ECR client.

use http::HeaderValue;

use super::auth::{CredentialProvider, Credentials};
use crate::config::EcrConfig;
use crate::error::UpstreamError;

/// An ECR upstream's credentials and repository creation: uninhabited in this build.
#[derive(Debug)]
pub enum Ecr {}

impl Ecr {
    /// Always refused in this build.
    pub fn new(_cfg: &EcrConfig) -> Result<Self, String> {
        Err(crate::config::ECR_NOT_BUILT.to_owned())
    }

    /// Whether pushes create missing repositories.
    pub fn creates_repositories(&self) -> bool {
        match *self {}
    }

    /// GetAuthorizationToken calls made.
    pub fn token_fetches(&self) -> u64 {
        match *self {}
    }
}

#[async_trait::async_trait]
impl super::push::RepositoryCreator for Ecr {
    async fn create_repository(&self, _name: &str) -> Result<(), UpstreamError> {
        match *self {}
    }
}

#[async_trait::async_trait]
impl CredentialProvider for Ecr {
    async fn credentials(&self) -> Result<Credentials, UpstreamError> {
        match *self {}
    }

    async fn refresh(&self, _rejected: &HeaderValue) -> Result<Option<Credentials>, UpstreamError> {
        match *self {}
    }
}
