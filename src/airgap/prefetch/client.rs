//! Where prefetch requests go (the in-process [`App`] or a running regcache) and the client
//! that sends one image's requests there as a pulling client would.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};

use crate::airgap::progress::Progress;
use crate::airgap::{AirgapError, DOCKER_ACCEPT, io_error};
use crate::app::App;
use crate::cache::inflight::FillState;
use crate::config::Config;
use crate::reference::{Algorithm, Digest, Reference, Repository};

/// Where the requests go.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    /// regcache's own [`App`], in this process, on the cache folder.
    App(&'a Arc<App>),
    /// A running regcache, through its registry API.
    Server(&'a Server),
}

/// A running regcache reached over HTTP(S).
pub struct Server {
    http: crate::upstream::client::HttpClient,
    base: url::Url,
}

impl Server {
    /// The regcache at `base` (`http://host:port`), with the configured timeouts and retries.
    pub fn new(base: url::Url, config: &Config) -> Result<Self, AirgapError> {
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(AirgapError::Other(format!(
                "--server {base}: expected http://HOST:PORT or https://HOST:PORT"
            )));
        }
        let http = crate::upstream::client::HttpClient::new(
            None,
            config.timeouts.connect.0,
            config.timeouts.response.0,
            config.retry.clone(),
        )
        .map_err(|e| AirgapError::Other(e.to_string()))?
        .named("regcache server");
        Ok(Server { http, base })
    }
}

/// A manifest as regcache answered it.
pub(super) struct Fetched {
    pub(super) digest: Digest,
    pub(super) media_type: String,
    pub(super) body: Bytes,
}

/// Requests for one image, sent to the app or server as a client would send them.
pub(super) struct Client<'a> {
    pub(super) via: Via<'a>,
    name: Repository,
    query: String,
}

impl<'a> Client<'a> {
    /// Requests for `name` (with `ns=` when set) through `via`.
    pub(super) fn new(via: Via<'a>, name: Repository, ns: &Option<String>) -> Self {
        Client {
            via,
            name,
            query: ns_query(ns),
        }
    }
}

/// The OCI error body's first message, or the status alone.
fn answer_error(what: &str, status: StatusCode, body: &[u8]) -> AirgapError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let e = &v["errors"][0];
    let text = match (e["code"].as_str(), e["message"].as_str()) {
        (Some(code), Some(message)) => format!("{status} {code}: {message}"),
        _ => status.to_string(),
    };
    AirgapError::Fetch(format!("{what}: {text}"))
}

impl Client<'_> {
    fn get(
        &self,
        kind: &str,
        reference: &str,
        accept: bool,
    ) -> Result<Request<Empty<Bytes>>, AirgapError> {
        let mut req = Request::builder().method(Method::GET).uri(format!(
            "/v2/{}/{kind}/{reference}{}",
            self.name, self.query
        ));
        if accept {
            for a in DOCKER_ACCEPT {
                req = req.header(header::ACCEPT, a);
            }
        }
        req.body(Empty::new())
            .map_err(|e| AirgapError::Other(format!("request for {reference}: {e}")))
    }

    /// Sends a request and returns the answer, whatever its status.
    async fn send(
        &self,
        req: Request<Empty<Bytes>>,
    ) -> Result<http::Response<crate::body::Body>, AirgapError> {
        match self.via {
            Via::App(app) => Ok(app.handle(req).await),
            Via::Server(server) => {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let url = server
                    .base
                    .join(path)
                    .map_err(|e| AirgapError::Other(format!("{path}: {e}")))?;
                let resp = server
                    .http
                    .send(req.method(), &url, req.headers())
                    .await
                    .map_err(|e| AirgapError::Fetch(e.to_string()))?;
                Ok(resp.map(crate::upstream::box_incoming))
            }
        }
    }

    /// `GET /v2/<name>/<kind>/<reference>`, read whole; an error unless it succeeded.
    pub(super) async fn fetch(
        &self,
        kind: &str,
        reference: &str,
        accept: bool,
        what: &str,
    ) -> Result<(http::response::Parts, Bytes), AirgapError> {
        let resp = self.send(self.get(kind, reference, accept)?).await?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(io_error(what.to_owned()))?
            .to_bytes();
        if !parts.status.is_success() {
            return Err(answer_error(what, parts.status, &body));
        }
        Ok((parts, body))
    }

    pub(super) async fn manifest(&self, reference: &Reference) -> Result<Fetched, AirgapError> {
        let what = format!("manifest {reference}");
        let (parts, body) = self
            .fetch("manifests", &reference.to_string(), true, &what)
            .await?;
        let text = |name| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let algorithm = match reference {
            Reference::Digest(d) => d.algorithm(),
            Reference::Tag(_) => text("docker-content-digest")
                .parse::<Digest>()
                .map_or(Algorithm::Sha256, |d| d.algorithm()),
        };
        let digest = Digest::of(algorithm, &body);
        if let Reference::Digest(want) = reference {
            if *want != digest {
                return Err(AirgapError::Corrupt(vec![format!(
                    "{what}: content hashes to {digest}"
                )]));
            }
        }
        Ok(Fetched {
            digest,
            media_type: text(header::CONTENT_TYPE.as_str()),
            body,
        })
    }

    pub(super) async fn blob(
        &self,
        digest: &Digest,
        progress: &Progress,
    ) -> Result<u64, AirgapError> {
        let what = format!("blob {digest}");
        let resp = self
            .send(self.get("blobs", &digest.to_string(), false)?)
            .await?;
        let (parts, mut body) = resp.into_parts();
        if !parts.status.is_success() {
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(answer_error(&what, parts.status, &body));
        }
        // regcache holds the last byte back until the blob is verified, then makes it
        // durable and commits it: the run is done with a blob once it is committed.
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(io_error(what.clone()))?;
            if let Some(data) = frame.data_ref() {
                n += data.len() as u64;
                progress.bytes(data.len() as u64);
            }
        }
        drop(body);
        // A server holds the last byte back until the blob is verified; here the download
        // can be watched to its commit.
        let Via::App(app) = self.via else {
            return Ok(n);
        };
        if let Some(FillState::Failed(e)) = app.inflight.settled(digest).await {
            return Err(io_error(what)(std::io::Error::other(format!(
                "not cached: {e}"
            ))));
        }
        Ok(n)
    }
}

fn ns_query(ns: &Option<String>) -> String {
    match ns {
        Some(ns) => format!(
            "?{}",
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("ns", ns)
                .finish()
        ),
        None => String::new(),
    }
}
