//! Owns the Amazon ECR tests: regcache in front of ECR-style upstreams whose credentials come
//! from GetAuthorizationToken, served by moto (the real `aws-sdk-ecr` client against a local
//! ECR JSON API) or by a server that answers with AWS errors.
//!
//! - A real `docker-registry` with htpasswd auth, whose only user is `AWS` with moto's token
//!   as password, behind regcache; skopeo pulls two images sharing layers.
//! - The in-process fake registry in Basic mode refuses authenticated requests on demand
//!   (401, 403, 400 "expired"), to show one refresh and one retry.
//! - GetAuthorizationToken failures become OCI errors naming the AWS error code.
//! - CreateRepository settings, `role_arn` through STS, and `AWS_ENDPOINT_URL_ECR`.
//!
//! Every test is a plain `#[test]` that runs through [`moto::run`], which writes the hermetic
//! AWS environment (static keys, no instance metadata, no profiles) before any runtime starts.
//! Every log line of the process is captured; each test ends by checking that none holds the
//! token, the registry password or the AWS secret key.

mod fake;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use aws_config::{BehaviorVersion, Region};
use bytes::Bytes;
use regcache::config::{Config, EcrConfig, Encryption, TagMutability, UpstreamConfig};
use regcache::upstream::auth::CredentialProvider;
use regcache::upstream::ecr::{Ecr, MIN_TOKEN_KEEP};
use serde_json::Value;

use fake::{AuthMode, FakeUpstream, blob_of, push_image};
use support::image::{self, Layer, OciLayout};
use support::moto::{
    self, ACCESS_KEY_ID, ACCOUNT, AwsErrorServer, MOTO_PASSWORD, Moto, REGION, Relay, Reserved,
};
use support::peers::dead_port;
use support::proxy::{Proxy, Tap};
use support::registry::{Registry, RegistryAuth};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// ECR settings for account [`ACCOUNT`] in [`REGION`] with the API at `endpoint`.
fn ecr_settings(endpoint: &str) -> EcrConfig {
    EcrConfig {
        account_id: Some(ACCOUNT.into()),
        region: Some(REGION.into()),
        api_endpoint: Some(endpoint.parse().unwrap()),
        ..EcrConfig::default()
    }
}

/// One upstream `prod` (the default) at `registry_url`, made an ECR upstream by `ecr`.
fn prod_config(registry_url: &str, ecr: EcrConfig, cache_dir: &std::path::Path) -> Config {
    let mut up = UpstreamConfig::new("prod", registry_url.parse().unwrap());
    up.ecr = Some(ecr);
    let mut c = Config {
        cache_dir: cache_dir.to_owned(),
        default_upstream: "prod".into(),
        upstreams: vec![up],
        ..Config::default()
    };
    c.retry.backoff = regcache::units::HumanDuration(std::time::Duration::from_millis(10));
    c
}

/// GetAuthorizationToken calls that went through `tap` (by `X-Amz-Target`).
fn token_calls(tap: &Tap) -> usize {
    tap.requests()
        .iter()
        .filter(|r| {
            r.header_values("x-amz-target")
                .iter()
                .any(|t| t.ends_with(".GetAuthorizationToken"))
        })
        .count()
}

/// The ECR side of regcache's upstream `prod`.
fn prod_ecr(app: &regcache::app::App) -> Arc<Ecr> {
    app.upstream("prod")
        .expect("upstream prod")
        .ecr()
        .expect("prod is an ECR upstream")
        .clone()
}

/// Every captured log line so far holds no secret, and the capture works (the ECR token
/// cache logged its fetch).
#[track_caller]
fn assert_logs_clean() {
    let logs = moto::captured_logs();
    assert!(
        logs.contains("new ECR authorization token") || logs.contains("ECR API"),
        "log capture is empty or missed regcache's ECR lines"
    );
    moto::assert_no_secret(&logs, "the captured logs");
}

/// `{config, layers…}` of the image in `layout`.
fn blobs_of(layout: &OciLayout) -> BTreeSet<String> {
    layout
        .images
        .iter()
        .flat_map(|i| std::iter::once(i.config.digest.clone()).chain(i.layer_digests()))
        .collect()
}

/// Digest of the manifest `registry` serves for `name:tag`, read straight from it with the
/// credentials moto's token decodes to.
async fn upstream_digest(registry: &Registry, name: &str, tag: &str) -> String {
    let resp = fake::client()
        .get(format!("{}/v2/{name}/manifests/{tag}", registry.url()))
        .basic_auth("AWS", Some(MOTO_PASSWORD))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "upstream manifest {name}:{tag}");
    image::sha256_digest(&resp.bytes().await.unwrap())
}

#[test]
fn skopeo_pulls_through_an_ecr_upstream_with_one_token_call() {
    moto::run(async {
        let started = Instant::now();
        let moto = Moto::start().await.unwrap();
        let tap = Tap::start(moto.addr()).await.unwrap();
        let registry = Registry::start(RegistryAuth::Htpasswd {
            user: "AWS".into(),
            password: MOTO_PASSWORD.into(),
        })
        .await
        .unwrap();
        let shared = [
            Layer::deterministic(256 * 1024, 0xEC01),
            Layer::deterministic(128 * 1024, 0xEC02),
        ];
        let new_layer = Layer::deterministic(192 * 1024, 0xEC03);
        let v10 = image::single_arch_with_layers("1.0", &shared).unwrap();
        let v11 = image::single_arch_with_layers(
            "1.1",
            &[shared[0].clone(), shared[1].clone(), new_layer.clone()],
        )
        .unwrap();
        for (layout, name) in [(&v10, "my-app:1.0"), (&v11, "my-app:1.1")] {
            let dest = format!("{}/{name}", registry.host());
            let pushed = image::push(layout, &dest, Some(("AWS", MOTO_PASSWORD)))
                .await
                .unwrap();
            assert_eq!(pushed, layout.digest());
        }
        let upstream10 = upstream_digest(&registry, "my-app", "1.0").await;
        let upstream11 = upstream_digest(&registry, "my-app", "1.1").await;
        registry.settle_log().await;
        assert!(
            blobs_of(&v10)
                .iter()
                .all(|d| registry.blob_get_count(d) == 0),
            "pushing fetched no blob"
        );
        let requests_before = registry.access_log().len();

        let cache = tempfile::tempdir().unwrap();
        let config = prod_config(
            &registry.url(),
            ecr_settings(&format!("http://{}", tap.host())),
            cache.path(),
        );
        let proxy = Proxy::start_with(config).await.unwrap();
        let out = tempfile::tempdir().unwrap();

        // my-app:1.0, four blobs, through the short name prod/my-app.
        let pull_started = Instant::now();
        let got = image::skopeo_pull(
            &format!("{}/prod/my-app:1.0", proxy.host()),
            &out.path().join("10"),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(
            got,
            vec![upstream10.clone()],
            "digest as upstream serves it"
        );
        assert_eq!(upstream10, v10.digest());
        assert!(proxy.wait_idle().await);
        registry.settle_log().await;
        for d in blobs_of(&v10) {
            assert_eq!(registry.blob_get_count(&d), 1, "{d} fetched once");
        }
        let upstream_requests = registry.access_log().len() - requests_before;
        assert_eq!(
            token_calls(&tap),
            1,
            "one GetAuthorizationToken for a whole pull of {upstream_requests} upstream requests"
        );
        assert!(
            upstream_requests > blobs_of(&v10).len(),
            "{upstream_requests}"
        );
        let ecr = prod_ecr(&proxy.app);
        assert_eq!(ecr.token_fetches(), 1);

        // my-app:1.1 shares three blobs: only its config and new layer go upstream, and the
        // token (expired on arrival, so kept for the minimum interval) is reused.
        let got = image::skopeo_pull(
            &format!("{}/prod/my-app:1.1", proxy.host()),
            &out.path().join("11"),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(got, vec![upstream11.clone()]);
        assert_eq!(upstream11, v11.digest());
        assert!(proxy.wait_idle().await);
        registry.settle_log().await;
        for d in blobs_of(&v10).union(&blobs_of(&v11)) {
            assert_eq!(
                registry.blob_get_count(d),
                1,
                "{d} fetched once over both pulls"
            );
        }
        assert!(blobs_of(&v11).contains(new_layer.digest()));
        let within = pull_started.elapsed();
        assert!(
            within < MIN_TOKEN_KEEP,
            "both pulls within {MIN_TOKEN_KEEP:?}: {within:?}"
        );
        assert_eq!(
            token_calls(&tap),
            1,
            "no further call within {MIN_TOKEN_KEEP:?}"
        );
        assert_eq!(ecr.token_fetches(), 1);

        moto::assert_no_secret(&format!("{ecr:?}"), "Ecr's Debug");
        assert_logs_clean();
        eprintln!(
            "skopeo_pulls_through_an_ecr_upstream_with_one_token_call took {:?}",
            started.elapsed()
        );
    });
}

/// The fake registry in Basic mode with moto's credentials, an image `my-app:1.0` of four
/// layers, and regcache in front with its token calls counted by a tap before moto.
struct RefusalRig {
    _moto: Moto,
    tap: Tap,
    fake: FakeUpstream,
    proxy: fake::Proxy,
    layers: Vec<(String, Bytes)>,
}

impl RefusalRig {
    async fn start() -> RefusalRig {
        let moto = Moto::start().await.unwrap();
        let tap = Tap::start(moto.addr()).await.unwrap();
        let fake = FakeUpstream::start().await;
        fake.set_auth(AuthMode::Basic {
            user: "AWS".into(),
            pass: MOTO_PASSWORD.into(),
        });
        let bodies: Vec<Bytes> = (0..4u8)
            .map(|i| blob_of(48 * 1024 + i as usize, 0xA0 + i))
            .collect();
        let image = push_image(&fake, "my-app", "1.0", &bodies, OCI_MANIFEST);
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let config = prod_config(
            &fake.url(),
            ecr_settings(&format!("http://{}", tap.host())),
            dir.path(),
        );
        let proxy = fake::Proxy::start_in(config, dir).await;
        RefusalRig {
            _moto: moto,
            tap,
            fake,
            proxy,
            layers: image.layers.into_iter().zip(bodies).collect(),
        }
    }

    async fn get(&self, path: &str) -> (u16, Bytes) {
        let r = fake::client()
            .get(self.proxy.url(path))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.bytes().await.unwrap())
    }

    async fn blob(&self, i: usize) -> (u16, Bytes) {
        self.get(&format!("/v2/prod/my-app/blobs/{}", self.layers[i].0))
            .await
    }
}

/// A registry that refuses the ECR credentials once with `status` gets one token refresh and
/// one retry, and the client its blob; one that keeps refusing gets one refresh too, and the
/// client `forever` (status, OCI code).
async fn refused_token(status: u16, forever: (u16, &str)) {
    let rig = RefusalRig::start().await;
    // The first request learns the Basic challenge and fetches the token.
    let (s, _) = rig.get("/v2/prod/my-app/manifests/1.0").await;
    assert_eq!(s, 200);
    assert_eq!(token_calls(&rig.tap), 1);

    rig.fake.refuse_authenticated(status, 1);
    let (s, body) = rig.blob(0).await;
    assert_eq!(s, 200, "{status} once: retried with a fresh token");
    fake::same(&body, &rig.layers[0].1);
    assert_eq!(
        rig.fake.blob_gets(&rig.layers[0].0),
        2,
        "refused, then retried"
    );
    assert_eq!(
        token_calls(&rig.tap),
        2,
        "{status} once: exactly one refresh"
    );
    let sent: Vec<_> = rig
        .fake
        .seen()
        .into_iter()
        .filter(|s| s.path.ends_with(&rig.layers[0].0))
        .map(|s| s.authorization.is_some())
        .collect();
    assert_eq!(sent, [true, true], "both tries carried the ECR credentials");

    rig.fake.refuse_authenticated(status, u64::MAX);
    let (s, body) = rig.blob(1).await;
    let v: Value = serde_json::from_slice(&body).expect("an OCI error body");
    assert_eq!(
        (s, v["errors"][0]["code"].as_str()),
        (forever.0, Some(forever.1)),
        "{v}"
    );
    assert_eq!(rig.fake.blob_gets(&rig.layers[1].0), 2, "one retry only");
    assert_eq!(
        token_calls(&rig.tap),
        3,
        "{status} for good: still one refresh"
    );

    rig.fake.refuse_authenticated(status, 0);
    let (s, body) = rig.blob(1).await;
    assert_eq!(s, 200, "accepted again");
    fake::same(&body, &rig.layers[1].1);
    assert_eq!(token_calls(&rig.tap), 3, "the cached token is used");
    assert_eq!(prod_ecr(&rig.proxy.app).token_fetches(), 3);
    assert_logs_clean();
}

#[test]
fn a_401_refusal_causes_one_refresh_and_one_retry() {
    moto::run(refused_token(401, (401, "UNAUTHORIZED")));
}

#[test]
fn a_403_refusal_causes_one_refresh_and_one_retry() {
    moto::run(refused_token(403, (403, "DENIED")));
}

#[test]
fn a_400_expired_token_causes_one_refresh_and_one_retry() {
    // distribution maps an unknown 400 to 502; the body says why.
    moto::run(refused_token(400, (502, "UNKNOWN")));
}

/// regcache in front of the fake (Basic auth) with the ECR API at `endpoint`: the status and
/// OCI error of a manifest GET.
async fn manifest_error(endpoint: &str) -> (u16, Value, FakeUpstream) {
    let fake = FakeUpstream::start().await;
    fake.set_auth(AuthMode::Basic {
        user: "AWS".into(),
        pass: MOTO_PASSWORD.into(),
    });
    push_image(&fake, "my-app", "1.0", &[blob_of(1024, 1)], OCI_MANIFEST);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = prod_config(&fake.url(), ecr_settings(endpoint), dir.path());
    let proxy = fake::Proxy::start_in(config, dir).await;
    let resp = fake::client()
        .get(proxy.url("/v2/prod/my-app/manifests/1.0"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    let v = serde_json::from_slice(&body).expect("an OCI error body");
    (status, v, fake)
}

#[test]
fn get_authorization_token_failures_become_oci_errors_naming_the_cause() {
    moto::run(async {
        let started = Instant::now();
        // An AWS error response: AccessDenied is DENIED, anything else UNAUTHORIZED, and the
        // AWS error code is the detail.
        for (code, want_status, want_code) in [
            ("AccessDeniedException", 403, "DENIED"),
            ("UnrecognizedClientException", 401, "UNAUTHORIZED"),
        ] {
            let api = AwsErrorServer::start(
                400,
                code,
                "User: arn:aws:iam::123456789012:user/ci is not authorized to perform: ecr:GetAuthorizationToken",
            )
            .await
            .unwrap();
            let (status, v, fake) = manifest_error(&api.url()).await;
            let e = &v["errors"][0];
            assert_eq!(
                (status, e["code"].as_str()),
                (want_status, Some(want_code)),
                "{v}"
            );
            assert_eq!(
                e["detail"].as_str(),
                Some(format!("ECR GetAuthorizationToken failed: {code}").as_str()),
                "{v}"
            );
            assert_eq!(api.calls(), 1, "an AWS client error is not retried");
            assert!(
                fake.seen().iter().all(|s| s.authorization.is_none()),
                "nothing was sent to the registry with credentials"
            );
            let logs = moto::captured_logs();
            assert!(
                logs.contains(&format!("code={code}")),
                "the log names {code}"
            );
        }

        // The ECR API unreachable: a gateway error, with the cause in regcache's log.
        let down = format!("http://127.0.0.1:{}", dead_port());
        let (status, v, _) = manifest_error(&down).await;
        assert_eq!(status, 502, "{v}");
        assert_eq!(v["errors"][0]["code"], "UNKNOWN", "{v}");
        assert!(
            v["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("unreachable")),
            "{v}"
        );
        assert!(moto::captured_logs().contains("ECR API unreachable"));

        // moto itself stopped after a first token: the cached token keeps working.
        let mut moto = Moto::start().await.unwrap();
        let rig_endpoint = moto.url();
        let fake = FakeUpstream::start().await;
        fake.set_auth(AuthMode::Basic {
            user: "AWS".into(),
            pass: MOTO_PASSWORD.into(),
        });
        let img = push_image(&fake, "my-app", "1.0", &[blob_of(2048, 2)], OCI_MANIFEST);
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let config = prod_config(&fake.url(), ecr_settings(&rig_endpoint), dir.path());
        let proxy = fake::Proxy::start_in(config, dir).await;
        let client = fake::client();
        let get = |path: String| {
            let c = client.clone();
            async move {
                c.get(path)
                    .header("accept", OCI_MANIFEST)
                    .send()
                    .await
                    .unwrap()
            }
        };
        assert_eq!(
            get(proxy.url("/v2/prod/my-app/manifests/1.0"))
                .await
                .status(),
            200
        );
        moto.stop();
        let r = get(proxy.url(&format!("/v2/prod/my-app/blobs/{}", img.layers[0]))).await;
        assert_eq!(
            r.status(),
            200,
            "served with the cached token while moto is down"
        );
        assert_eq!(prod_ecr(&proxy.app).token_fetches(), 1);

        assert_logs_clean();
        eprintln!(
            "get_authorization_token_failures_become_oci_errors_naming_the_cause took {:?}",
            started.elapsed()
        );
    });
}

/// A plain SDK client for moto at `url`, to look at what regcache did.
async fn moto_client(url: &str) -> aws_sdk_ecr::Client {
    let base = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .load()
        .await;
    aws_sdk_ecr::Client::from_conf(
        aws_sdk_ecr::config::Builder::from(&base)
            .endpoint_url(url)
            .build(),
    )
}

#[test]
fn create_repository_applies_the_configured_settings() {
    moto::run(async {
        let moto = Moto::start().await.unwrap();
        let kms_key = "arn:aws:kms:us-east-1:123456789012:key/regcache-test";
        let strict = Ecr::new(&EcrConfig {
            create_repositories: true,
            tag_mutability: TagMutability::Immutable,
            scan_on_push: true,
            encryption: Encryption::Kms,
            kms_key: Some(kms_key.into()),
            ..ecr_settings(&moto.url())
        })
        .unwrap();
        strict.create_repository("team/strict").await.unwrap();
        strict
            .create_repository("team/strict")
            .await
            .expect("an existing repository is success");

        // Through regcache's upstream (the push path's entry point), with the defaults.
        let cache = tempfile::tempdir().unwrap();
        let config = prod_config(
            "https://123456789012.dkr.ecr.us-east-1.amazonaws.com",
            EcrConfig {
                create_repositories: true,
                ..ecr_settings(&moto.url())
            },
            cache.path(),
        );
        let proxy = Proxy::start_with(config).await.unwrap();
        let upstream = proxy.app.upstream("prod").unwrap();
        assert!(upstream.creates_repositories());
        upstream
            .create_repository(&"team/plain".parse().unwrap())
            .await
            .unwrap();

        let client = moto_client(&moto.url()).await;
        let repos = client
            .describe_repositories()
            .repository_names("team/strict")
            .repository_names("team/plain")
            .send()
            .await
            .unwrap();
        let by_name = |n: &str| {
            repos
                .repositories()
                .iter()
                .find(|r| r.repository_name() == Some(n))
                .unwrap_or_else(|| panic!("{n} in DescribeRepositories"))
                .clone()
        };
        let strict_repo = by_name("team/strict");
        assert_eq!(
            strict_repo.image_tag_mutability().map(|m| m.as_str()),
            Some("IMMUTABLE")
        );
        assert_eq!(
            strict_repo
                .image_scanning_configuration()
                .map(|c| c.scan_on_push()),
            Some(true)
        );
        let enc = strict_repo.encryption_configuration().unwrap();
        assert_eq!(enc.encryption_type().as_str(), "KMS");
        assert_eq!(enc.kms_key(), Some(kms_key));
        let plain = by_name("team/plain");
        assert_eq!(
            plain.image_tag_mutability().map(|m| m.as_str()),
            Some("MUTABLE")
        );
        assert_eq!(
            plain
                .image_scanning_configuration()
                .map(|c| c.scan_on_push()),
            Some(false)
        );
        assert_eq!(
            plain
                .encryption_configuration()
                .map(|e| e.encryption_type().as_str()),
            Some("AES256")
        );
        assert_eq!(
            strict.token_fetches(),
            0,
            "creating needs no registry token"
        );

        // Not turned on: the upstream offers no repository creation.
        let cache2 = tempfile::tempdir().unwrap();
        let off = Proxy::start_with(prod_config(
            "https://123456789012.dkr.ecr.us-east-1.amazonaws.com",
            ecr_settings(&moto.url()),
            cache2.path(),
        ))
        .await
        .unwrap();
        assert!(!off.app.upstream("prod").unwrap().creates_repositories());
        moto::assert_no_secret(&moto::captured_logs(), "the captured logs");
    });
}

#[test]
fn role_arn_is_assumed_through_sts_before_calling_ecr() {
    moto::run(async {
        let moto = Moto::start().await.unwrap();
        let tap = Tap::start(moto.addr()).await.unwrap();
        // AWS_ENDPOINT_URL_STS points at this relay (see support::moto).
        let sts = Relay::start(Reserved::Sts, moto.addr()).unwrap();
        let role = "arn:aws:iam::123456789012:role/regcache-pull";
        let ecr = Ecr::new(&EcrConfig {
            role_arn: Some(role.into()),
            ..ecr_settings(&format!("http://{}", tap.host()))
        })
        .unwrap();
        let c = ecr.credentials().await.unwrap();
        assert_eq!(c.username, "AWS");
        assert!(c.password == MOTO_PASSWORD, "moto's token decoded");
        assert_eq!(sts.count("Action=AssumeRole"), 1, "one AssumeRole call");
        assert_eq!(
            sts.count("arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fregcache-pull"),
            1
        );
        assert!(
            sts.text().contains(ACCESS_KEY_ID),
            "AssumeRole is signed with the environment's key"
        );
        let ecr_calls: Vec<_> = tap
            .requests()
            .into_iter()
            .filter(|r| {
                r.header_values("x-amz-target")
                    .iter()
                    .any(|t| t.ends_with(".GetAuthorizationToken"))
            })
            .collect();
        assert_eq!(ecr_calls.len(), 1);
        let signed = ecr_calls[0].header_values("authorization").join(" ");
        assert!(signed.contains("Credential="), "signed: SigV4");
        assert!(
            !signed.contains(ACCESS_KEY_ID),
            "GetAuthorizationToken is signed with the assumed role's key, not the base key"
        );
        // A second caller uses the cached token: no STS or ECR call.
        ecr.credentials().await.unwrap();
        assert_eq!(sts.count("Action=AssumeRole"), 1);
        assert_eq!(token_calls(&tap), 1);
        moto::assert_no_secret(&format!("{ecr:?}"), "Ecr's Debug");
        assert_logs_clean();
    });
}

#[test]
fn aws_endpoint_url_ecr_is_honoured_without_api_endpoint() {
    moto::run(async {
        let moto = Moto::start().await.unwrap();
        // AWS_ENDPOINT_URL_ECR points at this relay (see support::moto).
        let relay = Relay::start(Reserved::EcrEnv, moto.addr()).unwrap();
        let ecr = Ecr::new(&EcrConfig {
            api_endpoint: None,
            ..ecr_settings("http://unused.invalid")
        })
        .unwrap();
        let c = ecr.credentials().await.unwrap();
        assert!(c.password == MOTO_PASSWORD, "moto's token decoded");
        assert_eq!(relay.count("GetAuthorizationToken"), 1);
        assert_logs_clean();
    });
}

/// `[auth]` with push on for the htpasswd user `ci` (password `ci-pass`), the file kept in `dir`.
fn push_auth(dir: &std::path::Path) -> regcache::config::AuthConfig {
    use std::io::Write;
    let path = dir.join("htpasswd");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "ci:{}", bcrypt::hash("ci-pass", 4).unwrap()).unwrap();
    regcache::config::AuthConfig {
        htpasswd: Some(path),
        push: true,
        push_users: Vec::new(),
        anonymous_pull: true,
        ..regcache::config::AuthConfig::default()
    }
}

#[test]
fn a_push_to_a_missing_repository_creates_it_with_the_configured_settings() {
    moto::run(async {
        let moto = Moto::start().await.unwrap();
        let fake = FakeUpstream::start().await;
        fake.set_auth(AuthMode::Basic {
            user: "AWS".into(),
            pass: MOTO_PASSWORD.into(),
        });
        fake.missing_once("team/new");
        let dir = tempfile::tempdir().unwrap();
        let kms_key = "arn:aws:kms:us-east-1:123456789012:key/regcache-push";
        let mut config = prod_config(
            &fake.url(),
            EcrConfig {
                create_repositories: true,
                tag_mutability: TagMutability::Immutable,
                scan_on_push: true,
                encryption: Encryption::Kms,
                kms_key: Some(kms_key.into()),
                ..ecr_settings(&moto.url())
            },
            &dir.path().join("cache"),
        );
        config.auth = push_auth(dir.path());
        let proxy = Proxy::start_with(config).await.unwrap();
        let r = fake::client()
            .post(format!("{}/v2/prod/team/new/blobs/uploads/", proxy.url()))
            .basic_auth("ci", Some("ci-pass"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "created, then the upload started");
        assert!(
            r.headers()["location"]
                .to_str()
                .unwrap()
                .starts_with("/v2/prod/team/new/blobs/uploads/")
        );
        assert_eq!(
            fake.count("POST", "/v2/team/new/blobs/uploads/"),
            3,
            "anonymous try, refused as missing, retried after CreateRepository"
        );
        let repos = moto_client(&moto.url())
            .await
            .describe_repositories()
            .repository_names("team/new")
            .send()
            .await
            .unwrap();
        let repo = &repos.repositories()[0];
        assert_eq!(
            repo.image_tag_mutability().map(|m| m.as_str()),
            Some("IMMUTABLE")
        );
        assert_eq!(
            repo.image_scanning_configuration()
                .map(|c| c.scan_on_push()),
            Some(true)
        );
        let enc = repo.encryption_configuration().unwrap();
        assert_eq!(enc.encryption_type().as_str(), "KMS");
        assert_eq!(enc.kms_key(), Some(kms_key));
        assert_logs_clean();
    });
}

#[test]
fn skopeo_pushes_through_an_ecr_upstream_and_pulls_back_from_cache() {
    moto::run(async {
        let moto = Moto::start().await.unwrap();
        let registry = Registry::start(RegistryAuth::Htpasswd {
            user: "AWS".into(),
            password: MOTO_PASSWORD.into(),
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = prod_config(
            &registry.url(),
            ecr_settings(&moto.url()),
            &dir.path().join("cache"),
        );
        config.auth = push_auth(dir.path());
        let proxy = Proxy::start_with(config).await.unwrap();
        let img = image::single_arch_with_layers("2.0", &[Layer::deterministic(150_000, 0xEC10)])
            .unwrap();
        let pushed = image::push(
            &img,
            &format!("docker://{}/prod/my-app:2.0", proxy.host()),
            Some(("ci", "ci-pass")),
        )
        .await
        .unwrap();
        assert_eq!(pushed, img.digest());
        assert_eq!(
            upstream_digest(&registry, "my-app", "2.0").await,
            img.digest()
        );
        let out = tempfile::tempdir().unwrap();
        image::skopeo_pull(
            &format!("docker://{}/prod/my-app:2.0", proxy.host()),
            &out.path().join("oci"),
            &[],
        )
        .await
        .unwrap();
        registry.settle_log().await;
        assert!(
            blobs_of(&img)
                .iter()
                .all(|d| registry.blob_get_count(d) == 0),
            "the pull after the push was served from the cache"
        );
        assert_eq!(prod_ecr(&proxy.app).token_fetches(), 1);
        assert_logs_clean();
    });
}
