//! Owns the in-process Docker-Hub-style token server (RS256 JWT bearer tokens accepted by docker-registry's `auth: token:`), with request counters.
//!
//! The signing key and a self-signed certificate (keyUsage digitalSignature) are made with the
//! `openssl` CLI in a temp dir; tokens are signed with aws-lc-rs (`RSA_PKCS1_SHA256`) and carry
//! the certificate in the JWT header's `x5c`. The server is a hyper 1 HTTP/1 server on
//! `127.0.0.1:0`, spawned on the current tokio runtime, serving `GET /token` (query `service`,
//! `scope`…, Basic credentials optional) and the OAuth2 `POST /token` form
//! (`grant_type=password`, as containerd sends when it has credentials).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};

use super::peers::run_ok;
use super::registry::RegistryAuth;

/// Token server settings.
#[derive(Debug, Clone)]
pub struct TokenServerConfig {
    /// Expected `service` (becomes the token's `aud`; the registry's `service`).
    pub service: String,
    /// `iss` of issued tokens (the registry's `issuer`).
    pub issuer: String,
    /// When set, requests must carry these Basic (or OAuth2 form) credentials; wrong ones
    /// always get 401.
    pub credentials: Option<(String, String)>,
    /// With `credentials` set: requests without any credentials still get a token, limited to
    /// `pull` (like Docker Hub's anonymous access) instead of a 401.
    pub allow_anonymous_pull: bool,
    /// `expires_in` of issued tokens, seconds (also sets `exp`).
    pub expires_in: u64,
}

impl Default for TokenServerConfig {
    fn default() -> Self {
        TokenServerConfig {
            service: "regcache-e2e-registry".to_string(),
            issuer: "regcache-e2e-token-issuer".to_string(),
            credentials: None,
            allow_anonymous_pull: false,
            expires_in: 300,
        }
    }
}

/// One access grant: `{type, name, actions}` of the JWT `access` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Resource type, normally `repository`.
    pub kind: String,
    /// Resource name, e.g. `library/busybox`.
    pub name: String,
    /// Granted actions, e.g. `["pull", "push"]`.
    pub actions: Vec<String>,
}

/// What the server saw in one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// Path of the request (normally `/token`).
    pub path: String,
    /// The `service` parameter, if given.
    pub service: Option<String>,
    /// Every requested scope as sent, e.g. `repository:library/x:pull,push`.
    pub scopes: Vec<String>,
    /// Whether the request carried an `Authorization` header.
    pub had_authorization: bool,
    /// User name from Basic credentials or the POST form, if any.
    pub username: Option<String>,
    /// Status the server answered.
    pub status: u16,
}

#[derive(Debug)]
struct Signer {
    key: aws_lc_rs::signature::RsaKeyPair,
    cert_der_b64: String,
}

#[derive(Debug)]
struct State {
    config: TokenServerConfig,
    signer: Signer,
    requests: Mutex<Vec<TokenRequest>>,
}

/// A running token server; its accept loop and connections are aborted on drop.
#[derive(Debug)]
pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<State>,
    dir: tempfile::TempDir,
    cert_pem: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl TokenServer {
    /// Starts a token server with [`TokenServerConfig::default`] (no credentials required).
    pub async fn start() -> anyhow::Result<TokenServer> {
        TokenServer::start_with(TokenServerConfig::default()).await
    }

    /// Generates the key and certificate, binds `127.0.0.1:0` and spawns the server on the
    /// current tokio runtime.
    pub async fn start_with(config: TokenServerConfig) -> anyhow::Result<TokenServer> {
        let dir = tempfile::Builder::new()
            .prefix("regcache-token-")
            .tempdir()
            .context("tempdir")?;
        let (signer, cert_pem) = make_signer(dir.path()).await?;
        let state = Arc::new(State {
            config,
            signer,
            requests: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(listener, state.clone()));
        Ok(TokenServer {
            addr,
            state,
            dir,
            cert_pem,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint, `http://127.0.0.1:PORT/token` (the registry's `realm`).
    pub fn realm(&self) -> String {
        format!("{}/token", self.url())
    }

    /// The expected `service` / token audience.
    pub fn service(&self) -> &str {
        &self.state.config.service
    }

    /// The `iss` of issued tokens.
    pub fn issuer(&self) -> &str {
        &self.state.config.issuer
    }

    /// PEM file with the signing certificate, for the registry's `rootcertbundle`.
    pub fn root_cert_bundle(&self) -> &Path {
        &self.cert_pem
    }

    /// The registry auth mode that trusts this server.
    pub fn registry_auth(&self) -> RegistryAuth {
        RegistryAuth::Token {
            realm: self.realm(),
            service: self.service().to_string(),
            issuer: self.issuer().to_string(),
            root_cert_bundle: self.cert_pem.clone(),
        }
    }

    /// Everything requested so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Number of requests so far (any path, any outcome).
    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Number of requests that asked for exactly this scope string
    /// (e.g. `repository:library/x:pull`).
    pub fn scope_count(&self, scope: &str) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.scopes.iter().any(|s| s == scope))
            .count()
    }

    /// Number of requests that asked for any scope on repository `name`.
    pub fn repository_request_count(&self, name: &str) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| {
                r.scopes
                    .iter()
                    .filter_map(|s| parse_scope(s))
                    .any(|a| a.kind == "repository" && a.name == name)
            })
            .count()
    }

    /// Number of requests that carried an `Authorization` header.
    pub fn authorized_request_count(&self) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.had_authorization)
            .count()
    }

    /// Forgets the recorded requests.
    pub fn reset_counts(&self) {
        self.state.requests.lock().unwrap().clear();
    }

    /// Signs a token for `subject` with the given grants, valid for `expires_in` seconds from
    /// now (for tests that present tokens directly).
    pub fn issue(&self, subject: &str, access: &[Access], expires_in: u64) -> String {
        sign_token(&self.state, subject, access, expires_in)
    }

    /// Stops serving (aborts the accept loop and its connections).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn make_signer(dir: &Path) -> anyhow::Result<(Signer, PathBuf)> {
    let key_pem = dir.join("key.pem");
    let cert_pem = dir.join("cert.pem");
    let key_der = dir.join("key.pk8.der");
    let cert_der = dir.join("cert.der");
    let limit = Duration::from_secs(30);
    run_ok(
        tokio::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
            .arg(&key_pem)
            .arg("-out")
            .arg(&cert_pem)
            .args([
                "-days",
                "2",
                "-subj",
                "/CN=regcache-e2e-token-signer",
                "-addext",
                "keyUsage=critical,digitalSignature",
            ]),
        limit,
    )
    .await
    .context("openssl req (generate token signing key + certificate)")?;
    run_ok(
        tokio::process::Command::new("openssl")
            .args(["pkcs8", "-topk8", "-nocrypt", "-in"])
            .arg(&key_pem)
            .args(["-outform", "DER", "-out"])
            .arg(&key_der),
        limit,
    )
    .await
    .context("openssl pkcs8")?;
    run_ok(
        tokio::process::Command::new("openssl")
            .args(["x509", "-in"])
            .arg(&cert_pem)
            .args(["-outform", "DER", "-out"])
            .arg(&cert_der),
        limit,
    )
    .await
    .context("openssl x509 -outform DER")?;
    let key = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&fs::read(&key_der)?)
        .map_err(|e| anyhow!("parse PKCS#8 RSA key: {e}"))?;
    let cert_der_b64 = STANDARD.encode(fs::read(&cert_der)?);
    Ok((Signer { key, cert_der_b64 }, cert_pem))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `secs` since the epoch as RFC 3339 UTC (`2024-01-02T03:04:05Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = regcache::access_log::line::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Parses a scope `type:name:actions` (the name may itself contain `:`, e.g. a port).
pub fn parse_scope(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some(Access {
        kind: kind.to_string(),
        name: name.to_string(),
        actions: actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// Merges the requested scopes into grants, keeping only `pull` when `pull_only`.
fn grants(scopes: &[String], pull_only: bool) -> Vec<Access> {
    let mut merged: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for access in scopes.iter().filter_map(|s| parse_scope(s)) {
        let actions = merged.entry((access.kind, access.name)).or_default();
        for a in access.actions {
            if (!pull_only || a == "pull") && !actions.contains(&a) {
                actions.push(a);
            }
        }
    }
    merged
        .into_iter()
        .map(|((kind, name), actions)| Access {
            kind,
            name,
            actions,
        })
        .collect()
}

fn sign_token(state: &State, subject: &str, access: &[Access], expires_in: u64) -> String {
    let now = now_secs();
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "RS256",
        "x5c": [state.signer.cert_der_b64],
    });
    let jti = format!("{:032x}", rand_u128());
    let claims = serde_json::json!({
        "iss": state.config.issuer,
        "sub": subject,
        "aud": state.config.service,
        "exp": now + expires_in,
        "nbf": now.saturating_sub(10),
        "iat": now,
        "jti": jti,
        "access": access.iter().map(|a| serde_json::json!({
            "type": a.kind,
            "name": a.name,
            "actions": a.actions,
        })).collect::<Vec<_>>(),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
    );
    let mut sig = vec![0u8; state.signer.key.public_modulus_len()];
    state
        .signer
        .key
        .sign(
            &aws_lc_rs::signature::RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            signing_input.as_bytes(),
            &mut sig,
        )
        .expect("RSA sign");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn rand_u128() -> u128 {
    let mut buf = [0u8; 16];
    aws_lc_rs::rand::fill(&mut buf).expect("random bytes");
    u128::from_le_bytes(buf)
}

async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(state: &State, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let auth_header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut params: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    if method == Method::POST {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        params.extend(url::form_urlencoded::parse(&body).into_owned());
    }
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let service = param("service");
    let scopes: Vec<String> = params
        .iter()
        .filter(|(n, _)| n == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();

    // Credentials: Basic header, or the OAuth2 password-grant form.
    let mut creds: Option<(String, String)> = auth_header.as_deref().and_then(|h| {
        let (scheme, value) = h.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = String::from_utf8(STANDARD.decode(value.trim()).ok()?).ok()?;
        let (u, p) = decoded.split_once(':')?;
        Some((u.to_string(), p.to_string()))
    });
    if creds.is_none() && method == Method::POST {
        if let (Some(u), Some(p)) = (param("username"), param("password")) {
            creds = Some((u, p));
        }
    }

    let mut record = TokenRequest {
        method: method.to_string(),
        path: path.clone(),
        service: service.clone(),
        scopes: scopes.clone(),
        had_authorization: auth_header.is_some(),
        username: creds.as_ref().map(|(u, _)| u.clone()),
        status: 200,
    };

    let response = (|| {
        if path != "/token" {
            return json_response(
                StatusCode::NOT_FOUND,
                serde_json::json!({"details": "not found"}),
            );
        }
        if method != Method::GET && method != Method::POST {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"details": "method not allowed"}),
            );
        }
        if method == Method::POST {
            let grant = param("grant_type").unwrap_or_default();
            if grant != "password" {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "unsupported_grant_type"}),
                );
            }
        }
        if let Some(s) = &service {
            if s != &state.config.service {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"details": format!("unknown service {s}")}),
                );
            }
        }
        let pull_only = match (&state.config.credentials, &creds) {
            (None, _) => false,
            (Some(expected), Some(given)) if expected == given => false,
            (Some(_), None) if state.config.allow_anonymous_pull => true,
            _ => {
                let mut resp = json_response(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"details": "incorrect username or password"}),
                );
                resp.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Basic realm=\"regcache-e2e-token\""),
                );
                return resp;
            }
        };
        let subject = if pull_only {
            String::new()
        } else {
            creds.as_ref().map(|(u, _)| u.clone()).unwrap_or_default()
        };
        let token = sign_token(
            state,
            &subject,
            &grants(&scopes, pull_only),
            state.config.expires_in,
        );
        json_response(
            StatusCode::OK,
            serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": state.config.expires_in,
                "issued_at": rfc3339(now_secs()),
            }),
        )
    })();
    record.status = response.status().as_u16();
    state.requests.lock().unwrap().push(record);
    response
}
