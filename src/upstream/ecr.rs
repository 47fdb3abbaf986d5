//! Amazon ECR upstreams: registry credentials minted by GetAuthorizationToken through the AWS
//! credential chain (optionally assuming a role), cached until shortly before they expire with
//! one fetch at a time, and CreateRepository for pushes to repositories that do not exist yet.
//!
//! An ECR registry takes `Authorization: Basic base64(AWS:<token>)`. [`Ecr`] is the upstream's
//! [`CredentialProvider`]: the [`Authenticator`](super::auth::Authenticator) asks it for
//! credentials up front once it has seen the `Basic` challenge, and calls
//! [`CredentialProvider::refresh`] when the registry refuses them (401, 403, or 400 with an
//! expired-token message), then retries exactly once.
//!
//! The AWS SDK client is built on first use, not at start-up: building it reads the
//! environment and profile files, and a configuration error should surface on the first
//! request as an OCI error naming the cause, not as a start-up failure of every upstream.
//!
//! Secrets never leave this module except as [`Credentials`] (whose `Debug` redacts the
//! password): logs name AWS error codes and messages, [`Ecr`]'s `Debug` shows only settings.
//! The SDK itself logs whole responses at `trace` level, so never run `aws_smithy_runtime`
//! at `trace` in production.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_ecr::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ecr::types::{
    EncryptionConfiguration, EncryptionType, ImageScanningConfiguration, ImageTagMutability,
};
use base64::Engine;
use http::HeaderValue;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::auth::{CredentialProvider, Credentials};
use crate::config::{EcrConfig, Encryption, TagMutability};
use crate::error::UpstreamError;
use crate::flight::Flight;

/// Shortest time a token is used before it is fetched again: when `expiresAt` is absent,
/// already past on arrival (moto answers 2015-01-01) or very near, this keeps regcache from
/// calling GetAuthorizationToken per request. A token the registry refuses is replaced at
/// once, whatever this says.
pub const MIN_TOKEN_KEEP: Duration = Duration::from_secs(60);
/// Longest time a token is used, whatever `expiresAt` says (ECR's tokens last 12 hours).
const MAX_TOKEN_KEEP: Duration = Duration::from_secs(12 * 3600);
/// Largest head start on expiry: a token is replaced a tenth of its lifetime before it
/// expires, at most this long before.
const MAX_EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);

/// How long to use a token that arrived at `now` and expires at `expires_at`: until a tenth
/// of its remaining lifetime (at most [`MAX_EXPIRY_MARGIN`]) before it expires, and never
/// less than [`MIN_TOKEN_KEEP`] nor more than [`MAX_TOKEN_KEEP`].
fn keep_for(now: SystemTime, expires_at: Option<SystemTime>) -> Duration {
    let left = expires_at
        .and_then(|e| e.duration_since(now).ok())
        .unwrap_or_default();
    let margin = (left / 10).min(MAX_EXPIRY_MARGIN);
    (left - margin).clamp(MIN_TOKEN_KEEP, MAX_TOKEN_KEEP)
}

/// Decodes an `authorizationToken` (base64 of `user:password`, the user being `AWS`).
fn decode_token(token: &str) -> Result<Credentials, UpstreamError> {
    // The decoding errors are dropped on purpose: they can quote bytes of the token.
    let bad = |why: &str| UpstreamError::Auth(format!("ECR GetAuthorizationToken: {why}"));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .map_err(|_| bad("the authorization token is not base64"))?;
    let text = String::from_utf8(raw).map_err(|_| bad("the authorization token is not text"))?;
    let (username, password) = text
        .split_once(':')
        .ok_or_else(|| bad("the authorization token is not user:password"))?;
    if username.is_empty() || password.is_empty() {
        return Err(bad("the authorization token has an empty user or password"));
    }
    Ok(Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// AWS error codes that mean "this identity may not do that" rather than "who are you".
fn is_denied(code: &str) -> bool {
    code.starts_with("AccessDenied")
        || code == "UnauthorizedOperation"
        || code == "UnauthorizedException"
}

/// Maps an SDK failure of `operation` to an upstream error and logs it (the one place that
/// does). Clients see the AWS error code; the log also has AWS's message. Neither carries a
/// secret: the SDK's errors hold no credentials, and response bodies are never logged.
fn sdk_error<E>(operation: &'static str, err: SdkError<E>) -> UpstreamError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("UnknownError").to_owned();
            let message = service.err().message().unwrap_or("");
            let status = service.raw().status().as_u16();
            warn!(operation, code = %code, status, message, "ECR API refused the request");
            let detail = format!("ECR {operation} failed: {code}");
            if is_denied(&code) {
                UpstreamError::Denied(detail)
            } else if status == 429 || code.contains("Throttl") {
                // Not a credentials problem: the client should back off, not re-login.
                UpstreamError::Status(429)
            } else if status >= 500 {
                UpstreamError::Status(status)
            } else {
                UpstreamError::Auth(detail)
            }
        }
        SdkError::TimeoutError(_) => {
            warn!(operation, "ECR API did not answer in time");
            UpstreamError::Timeout(format!("ECR API {operation} did not answer in time"))
        }
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            warn!(operation, error = %DisplayErrorContext(&err), "ECR API did not answer in time");
            UpstreamError::Timeout(format!("ECR API {operation} did not answer in time"))
        }
        SdkError::DispatchFailure(d) if d.is_io() => {
            warn!(operation, error = %DisplayErrorContext(&err), "ECR API unreachable");
            UpstreamError::Unreachable(format!(
                "ECR API {operation}: {}",
                super::cause::classify(&err)
            ))
        }
        SdkError::DispatchFailure(_) => {
            // Loading or assuming credentials failed before anything was sent.
            warn!(operation, error = %DisplayErrorContext(&err), "no usable AWS credentials for ECR");
            UpstreamError::Auth(format!(
                "ECR {operation} failed: no usable AWS credentials (regcache's log says why)"
            ))
        }
        SdkError::ResponseError(_) => {
            // Not logged with its source: a half-parsed answer may quote the token.
            warn!(operation, "ECR API sent an unreadable answer");
            UpstreamError::Invalid(format!(
                "ECR {operation}: unreadable answer from the ECR API"
            ))
        }
        _ => {
            warn!(operation, error = %DisplayErrorContext(&err), "ECR request could not be made");
            UpstreamError::Auth(format!(
                "ECR {operation} failed: the request could not be made"
            ))
        }
    }
}

/// A decoded GetAuthorizationToken answer.
struct Token {
    credentials: Credentials,
    expires_at: Option<SystemTime>,
}

/// Where tokens come from: the ECR API, or a stand-in in unit tests.
#[async_trait::async_trait]
trait TokenSource: Send + Sync + 'static {
    /// Asks for a new token (one API call).
    async fn fetch(&self) -> Result<Token, UpstreamError>;
}

/// Settings of repositories created on first push.
#[derive(Debug, Clone)]
struct RepositorySettings {
    tag_mutability: TagMutability,
    scan_on_push: bool,
    encryption: Encryption,
    kms_key: Option<String>,
}

/// The ECR API of one upstream and its lazily built SDK client.
struct Api {
    account_id: String,
    region: String,
    role_arn: Option<String>,
    endpoint: Option<String>,
    create_repositories: bool,
    repositories: RepositorySettings,
    // Built by the first caller; concurrent first callers wait for that one build. Holds no
    // lock across `.await` besides the cell's own initialisation.
    client: OnceCell<aws_sdk_ecr::Client>,
}

impl Api {
    /// The SDK client, built on first use from the default AWS configuration chain with this
    /// upstream's region and endpoint override, and a role assumed through STS when set.
    async fn client(&self) -> &aws_sdk_ecr::Client {
        self.client
            .get_or_init(|| async {
                let timeouts = aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .operation_timeout(Duration::from_secs(30))
                    .build();
                let base = aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(self.region.clone()))
                    .timeout_config(timeouts)
                    .load()
                    .await;
                // The endpoint override is set on the ECR client only: STS (for role_arn)
                // keeps its own endpoint (or AWS_ENDPOINT_URL_STS). Without the override the
                // SDK honours AWS_ENDPOINT_URL_ECR and AWS_ENDPOINT_URL itself.
                let mut conf = aws_sdk_ecr::config::Builder::from(&base);
                if let Some(role) = &self.role_arn {
                    let assumed = aws_config::sts::AssumeRoleProvider::builder(role.clone())
                        .session_name("regcache")
                        .configure(&base)
                        .build()
                        .await;
                    conf = conf.credentials_provider(assumed);
                }
                if let Some(url) = &self.endpoint {
                    conf = conf.endpoint_url(url.clone());
                }
                debug!(
                    region = %self.region,
                    role = self.role_arn.as_deref().unwrap_or(""),
                    endpoint = self.endpoint.as_deref().unwrap_or("(default)"),
                    "ECR API client ready"
                );
                aws_sdk_ecr::Client::from_conf(conf.build())
            })
            .await
    }
}

#[async_trait::async_trait]
impl TokenSource for Api {
    async fn fetch(&self) -> Result<Token, UpstreamError> {
        // `registryIds` is not sent: AWS deprecated it, the token works for every registry
        // the identity may use, whichever account it names.
        let out = self
            .client()
            .await
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| sdk_error("GetAuthorizationToken", e))?;
        let data = out.authorization_data().first().ok_or_else(|| {
            UpstreamError::Auth("ECR GetAuthorizationToken: no authorization data".into())
        })?;
        let token = data.authorization_token().ok_or_else(|| {
            UpstreamError::Auth("ECR GetAuthorizationToken: no authorization token".into())
        })?;
        Ok(Token {
            credentials: decode_token(token)?,
            expires_at: data
                .expires_at()
                .and_then(|t| SystemTime::try_from(*t).ok()),
        })
    }
}

/// The Amazon ECR side of one upstream: its registry credentials and its repository API.
///
/// Cheap to build (no I/O): the AWS SDK client is made on first use.
pub struct Ecr {
    api: Arc<Api>,
    source: Arc<dyn TokenSource>,
    // The upstream's one token (key `()`): a single fetch at a time, shared by every caller,
    // kept until `keep_for` says. A fetch runs on its own task, so a caller that goes away
    // does not cancel it.
    tokens: Flight<(), Credentials, UpstreamError>,
    fetches: Arc<AtomicU64>,
}

impl fmt::Debug for Ecr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ecr")
            .field("account_id", &self.api.account_id)
            .field("region", &self.api.region)
            .field("role_arn", &self.api.role_arn)
            .field("endpoint", &self.api.endpoint)
            .field("create_repositories", &self.api.create_repositories)
            .field("token_fetches", &self.token_fetches())
            .finish_non_exhaustive()
    }
}

impl Ecr {
    /// The ECR side of an upstream from its validated settings (`account_id` and `region`
    /// filled in by `Config::validate`). Does no I/O.
    pub fn new(cfg: &EcrConfig) -> Result<Self, String> {
        let account_id = cfg
            .account_id
            .clone()
            .ok_or("ecr.account_id is not set (configuration not validated)")?;
        let region = cfg
            .region
            .clone()
            .ok_or("ecr.region is not set (configuration not validated)")?;
        let api = Arc::new(Api {
            account_id,
            region,
            role_arn: cfg.role_arn.clone(),
            endpoint: cfg
                .api_endpoint
                .as_ref()
                .map(|u| u.as_str().trim_end_matches('/').to_owned()),
            create_repositories: cfg.create_repositories,
            repositories: RepositorySettings {
                tag_mutability: cfg.tag_mutability,
                scan_on_push: cfg.scan_on_push,
                encryption: cfg.encryption,
                kms_key: cfg.kms_key.clone(),
            },
            client: OnceCell::new(),
        });
        Ok(Ecr::with_source(api.clone(), api))
    }

    fn with_source(api: Arc<Api>, source: Arc<dyn TokenSource>) -> Self {
        Ecr {
            api,
            source,
            tokens: Flight::default(),
            fetches: Arc::default(),
        }
    }

    /// The AWS account that owns the registry.
    pub fn account_id(&self) -> &str {
        &self.api.account_id
    }

    /// The registry's AWS region.
    pub fn region(&self) -> &str {
        &self.api.region
    }

    /// Whether the operator turned on repository creation on first push
    /// (`ecr.create_repositories`).
    pub fn creates_repositories(&self) -> bool {
        self.api.create_repositories
    }

    /// GetAuthorizationToken calls made so far (for tests and metrics).
    pub fn token_fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Creates repository `name` with the configured tag mutability, scan-on-push and
    /// encryption settings. A repository that already exists counts as success. Does not
    /// look at `create_repositories`: the caller decides (see [`Ecr::creates_repositories`]).
    pub async fn create_repository(&self, name: &str) -> Result<(), UpstreamError> {
        let s = &self.api.repositories;
        let encryption = EncryptionConfiguration::builder()
            .encryption_type(match s.encryption {
                Encryption::Aes256 => EncryptionType::Aes256,
                Encryption::Kms => EncryptionType::Kms,
            })
            .set_kms_key(s.kms_key.clone())
            .build()
            .map_err(|e| UpstreamError::Invalid(format!("ECR CreateRepository: {e}")))?;
        let sent = self
            .api
            .client()
            .await
            .create_repository()
            .registry_id(&self.api.account_id)
            .repository_name(name)
            .image_tag_mutability(match s.tag_mutability {
                TagMutability::Mutable => ImageTagMutability::Mutable,
                TagMutability::Immutable => ImageTagMutability::Immutable,
            })
            .image_scanning_configuration(
                ImageScanningConfiguration::builder()
                    .scan_on_push(s.scan_on_push)
                    .build(),
            )
            .encryption_configuration(encryption)
            .send()
            .await;
        match sent {
            Ok(_) => {
                info!(repository = name, "created ECR repository");
                Ok(())
            }
            Err(SdkError::ServiceError(e)) if e.err().is_repository_already_exists_exception() => {
                debug!(repository = name, "ECR repository already exists");
                Ok(())
            }
            Err(e) => Err(sdk_error("CreateRepository", e)),
        }
    }
}

#[async_trait::async_trait]
impl super::push::RepositoryCreator for Ecr {
    async fn create_repository(&self, name: &str) -> Result<(), UpstreamError> {
        Ecr::create_repository(self, name).await
    }
}

#[async_trait::async_trait]
impl CredentialProvider for Ecr {
    fn refreshes(&self) -> bool {
        true
    }

    /// The cached token, or a new one when it is due (one GetAuthorizationToken at a time;
    /// concurrent callers share it). Failures are not kept: the next request asks again.
    async fn credentials(&self) -> Result<Credentials, UpstreamError> {
        let source = self.source.clone();
        let fetches = self.fetches.clone();
        self.tokens
            .get((), move || async move {
                fetches.fetch_add(1, Ordering::Relaxed);
                let token = source.fetch().await?;
                let keep = keep_for(SystemTime::now(), token.expires_at);
                debug!(
                    keep_s = keep.as_secs(),
                    expired_on_arrival = token.expires_at.is_none_or(|e| e <= SystemTime::now()),
                    "new ECR authorization token"
                );
                Ok((token.credentials, Some(Instant::now() + keep)))
            })
            .await
    }

    /// The registry refused `rejected`. When it is the cached token, that token is dropped
    /// and a new one fetched; concurrent refusals of the same token share that one fetch, and
    /// a refusal of a token that was already replaced gets the replacement without a fetch.
    ///
    /// Always returns `Some`: the caller retries exactly once, so a retry costs at most one
    /// request. This holds even when the new token equals the refused one (ECR mints a new
    /// token per call; a server that hands out fixed tokens, like moto, or a refusal that was
    /// not about the token, such as IAM changes still propagating, can still succeed on
    /// retry). With such fixed tokens, a refusal that arrives after the replacement came in
    /// matches it and causes one more fetch, at most one per refused request.
    async fn refresh(&self, rejected: &HeaderValue) -> Result<Option<Credentials>, UpstreamError> {
        self.tokens
            .invalidate(&(), |c| c.basic_header().is_ok_and(|h| h == *rejected));
        debug!("ECR registry refused the token; getting a new one");
        self.credentials().await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn creds(password: &str) -> Credentials {
        Credentials {
            username: "AWS".into(),
            password: password.into(),
        }
    }

    #[test]
    fn tokens_decode_to_user_and_password() {
        // What moto answers: base64("AWS:123456789012-auth-token").
        let c = decode_token("QVdTOjEyMzQ1Njc4OTAxMi1hdXRoLXRva2Vu").unwrap();
        assert_eq!(c, creds("123456789012-auth-token"));
        // A password may itself hold colons; only the first one splits.
        let enc = base64::engine::general_purpose::STANDARD.encode("AWS:a:b=c");
        assert_eq!(decode_token(&enc).unwrap(), creds("a:b=c"));
    }

    #[test]
    fn malformed_tokens_are_typed_errors_that_do_not_quote_the_token() {
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        for (token, why) in [
            ("not base64 %%%".to_owned(), "not base64"),
            (b64(b"no-colon-secret"), "not user:password"),
            (b64(b"AWS:"), "empty"),
            (b64(b":secret"), "empty"),
            (b64(&[0xff, 0xfe, b':', b's']), "not text"),
        ] {
            match decode_token(&token) {
                Err(UpstreamError::Auth(m)) => {
                    assert!(m.contains(why), "{m}");
                    assert!(!m.contains("secret") && !m.contains(&token), "{m}");
                }
                other => panic!("{token}: {other:?}"),
            }
        }
    }

    #[test]
    fn tokens_are_kept_until_shortly_before_expiry_and_at_least_a_minute() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |n: u64| Duration::from_secs(n * 3600);
        let m = |n: u64| Duration::from_secs(n * 60);
        // ECR's 12 hours: replaced 5 minutes (the cap) before expiry.
        assert_eq!(keep_for(now, Some(now + h(12))), h(12) - m(5));
        // 10 minutes: a tenth (1 minute) early.
        assert_eq!(keep_for(now, Some(now + m(10))), m(9));
        // Already expired on arrival (moto: 2015-01-01), absent, or nearly over: a minute.
        let moto = SystemTime::UNIX_EPOCH + Duration::from_secs(1_420_070_400);
        assert_eq!(keep_for(now, Some(moto)), MIN_TOKEN_KEEP);
        assert_eq!(keep_for(now, None), MIN_TOKEN_KEEP);
        assert_eq!(keep_for(now, Some(now)), MIN_TOKEN_KEEP);
        assert_eq!(
            keep_for(now, Some(now + Duration::from_secs(30))),
            MIN_TOKEN_KEEP
        );
        // An absurd expiry is not believed.
        assert_eq!(keep_for(now, Some(now + h(1000))), MAX_TOKEN_KEEP);
    }

    #[test]
    fn access_denied_codes_are_told_apart() {
        assert!(is_denied("AccessDeniedException"));
        assert!(is_denied("AccessDenied"));
        assert!(!is_denied("UnrecognizedClientException"));
        assert!(!is_denied("ExpiredTokenException"));
    }

    /// Hands out `pw1`, `pw2`, … (or the same password every time), each after `delay`.
    struct FakeSource {
        calls: AtomicU64,
        fixed: bool,
        expires_in: Option<Duration>,
        delay: Duration,
        fail: Mutex<Option<UpstreamError>>,
    }

    impl FakeSource {
        fn new(fixed: bool, expires_in: Option<Duration>) -> Arc<Self> {
            Arc::new(FakeSource {
                calls: AtomicU64::new(0),
                fixed,
                expires_in,
                delay: Duration::from_millis(50),
                fail: Mutex::new(None),
            })
        }
    }

    #[async_trait::async_trait]
    impl TokenSource for FakeSource {
        async fn fetch(&self) -> Result<Token, UpstreamError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.delay).await;
            if let Some(e) = self.fail.lock().unwrap().clone() {
                return Err(e);
            }
            let pw = if self.fixed {
                "pw".to_owned()
            } else {
                format!("pw{n}")
            };
            Ok(Token {
                credentials: creds(&pw),
                expires_at: self.expires_in.map(|d| SystemTime::now() + d),
            })
        }
    }

    fn ecr_with(source: Arc<FakeSource>) -> Arc<Ecr> {
        let cfg = EcrConfig {
            account_id: Some("123456789012".into()),
            region: Some("us-east-1".into()),
            ..EcrConfig::default()
        };
        let real = Ecr::new(&cfg).unwrap();
        Arc::new(Ecr::with_source(real.api, source))
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_on_arrival_token_is_fetched_once_per_minimum_interval() {
        let source = FakeSource::new(false, None);
        let ecr = ecr_with(source.clone());
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let e = ecr.clone();
            tasks.push(tokio::spawn(async move { e.credentials().await }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), creds("pw1"));
        }
        assert_eq!(
            source.calls.load(Ordering::SeqCst),
            1,
            "one fetch for 20 callers"
        );
        tokio::time::advance(MIN_TOKEN_KEEP - Duration::from_secs(1)).await;
        assert_eq!(ecr.credentials().await.unwrap(), creds("pw1"));
        assert_eq!(ecr.token_fetches(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(ecr.credentials().await.unwrap(), creds("pw2"));
        assert_eq!(ecr.token_fetches(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_twelve_hour_token_is_replaced_five_minutes_before_expiry() {
        let source = FakeSource::new(false, Some(Duration::from_secs(12 * 3600)));
        let ecr = ecr_with(source.clone());
        assert_eq!(ecr.credentials().await.unwrap(), creds("pw1"));
        tokio::time::advance(Duration::from_secs(12 * 3600 - 5 * 60 - 10)).await;
        assert_eq!(ecr.credentials().await.unwrap(), creds("pw1"));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(ecr.credentials().await.unwrap(), creds("pw2"));
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_refusals_of_one_token_cause_one_fetch() {
        let source = FakeSource::new(false, Some(Duration::from_secs(12 * 3600)));
        let ecr = ecr_with(source.clone());
        let first = ecr.credentials().await.unwrap();
        let refused = first.basic_header().unwrap();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (e, r) = (ecr.clone(), refused.clone());
            tasks.push(tokio::spawn(async move { e.refresh(&r).await }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), Some(creds("pw2")));
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // A late refusal of the replaced token gets the replacement, no fetch.
        assert_eq!(ecr.refresh(&refused).await.unwrap(), Some(creds("pw2")));
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // A refusal of the current token replaces it.
        let current = creds("pw2").basic_header().unwrap();
        assert_eq!(ecr.refresh(&current).await.unwrap(), Some(creds("pw3")));
        assert_eq!(ecr.token_fetches(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_fixed_token_is_fetched_again_and_offered_for_one_retry() {
        let source = FakeSource::new(true, None);
        let ecr = ecr_with(source.clone());
        let c = ecr.credentials().await.unwrap();
        let again = ecr.refresh(&c.basic_header().unwrap()).await.unwrap();
        assert_eq!(again, Some(c));
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        // The fresh copy is cached as usual.
        ecr.credentials().await.unwrap();
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_shared_by_concurrent_callers_and_not_kept() {
        let source = FakeSource::new(false, None);
        *source.fail.lock().unwrap() = Some(UpstreamError::Denied(
            "ECR GetAuthorizationToken failed: AccessDeniedException".into(),
        ));
        let ecr = ecr_with(source.clone());
        let (a, b) = tokio::join!(ecr.credentials(), ecr.credentials());
        assert!(matches!(a, Err(UpstreamError::Denied(_))), "{a:?}");
        assert_eq!(a, b);
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        *source.fail.lock().unwrap() = None;
        assert_eq!(ecr.credentials().await.unwrap(), creds("pw2"));
    }

    #[tokio::test(start_paused = true)]
    async fn debug_output_shows_settings_and_never_the_token() {
        let ecr = ecr_with(FakeSource::new(true, None));
        let c = ecr.credentials().await.unwrap();
        let shown = format!("{ecr:?} {c:?}");
        assert!(
            shown.contains("123456789012") && shown.contains("us-east-1"),
            "{shown}"
        );
        assert!(!shown.contains("\"pw\""), "{shown}");
        let header = c.basic_header().unwrap();
        assert!(header.is_sensitive());
    }

    #[test]
    fn construction_needs_a_validated_config_and_does_no_io() {
        assert!(Ecr::new(&EcrConfig::default()).is_err());
        let ecr = Ecr::new(&EcrConfig {
            account_id: Some("123456789012".into()),
            region: Some("eu-west-1".into()),
            api_endpoint: Some("http://127.0.0.1:9/".parse().unwrap()),
            create_repositories: true,
            ..EcrConfig::default()
        })
        .unwrap();
        assert_eq!(ecr.account_id(), "123456789012");
        assert_eq!(ecr.region(), "eu-west-1");
        assert!(ecr.creates_repositories());
        assert_eq!(ecr.api.endpoint.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(ecr.token_fetches(), 0);
    }
}
