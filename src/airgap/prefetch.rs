//! `regcache prefetch`: warms the cache by sending regcache's own [`App`] the requests a
//! client pulling every platform sends (the tag with Docker's `Accept` lines, each child
//! manifest by digest, each blob read to the end), so routing, upstream auth, single flight,
//! verification and the on-disk layout are the serving code's own.
//!
//! Resumable: blobs already in the cache are counted and skipped, so a run after an
//! interrupted one fetches only what is still missing. A failed image is reported and the
//! others still run.
//!
//! With `--server URL` the same requests go to a running regcache through its registry API
//! instead, so a live cache is warmed by the server that owns it (each blob is read to the
//! end, so the server commits it).

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};

use super::name::{ImageName, PlatformFilter};
use super::oci::{self, Descriptor, Node};
use super::progress::{Progress, human_bytes};
use super::{AirgapError, DOCKER_ACCEPT, io_error};
use crate::app::App;
use crate::cache::inflight::FillState;
use crate::config::{AuthConfig, Config};
use crate::reference::{Algorithm, Digest, Reference, Repository};

/// What to prefetch.
#[derive(Debug, Clone)]
pub struct PrefetchArgs {
    /// Images as clients name them through regcache.
    pub images: Vec<ImageName>,
    /// Only these platforms of an index (all when empty).
    pub platforms: Vec<PlatformFilter>,
    /// Blob downloads at a time per image.
    pub jobs: usize,
    /// Also fetch each image's referrers (signatures, SBOMs, attestations) with their blobs.
    pub referrers: bool,
}

/// What one image took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Digest of the tag's (or digest's) manifest.
    pub digest: Option<Digest>,
    /// Manifests read (the top one and the children chosen).
    pub manifests: usize,
    /// Distinct blobs of those manifests.
    pub blobs: usize,
    /// Blobs downloaded by this run.
    pub fetched: usize,
    /// Bytes downloaded by this run.
    pub fetched_bytes: u64,
    /// Blobs that were already cached.
    pub cached: usize,
    /// Referrers of the image fetched with it (each counted in the figures above too).
    pub referrers: usize,
}

impl Summary {
    /// Adds what the referrers of the image took.
    fn add(&mut self, r: &Summary) {
        self.manifests += r.manifests;
        self.blobs += r.blobs;
        self.fetched += r.fetched;
        self.fetched_bytes += r.fetched_bytes;
        self.cached += r.cached;
        self.referrers += r.referrers;
    }
}

/// Runs the command: one result line per image on stdout, failures on stderr. `Ok(false)`
/// when an image failed; `Err` when regcache could not start.
pub async fn run(mut config: Config, args: PrefetchArgs) -> Result<bool, AirgapError> {
    if config.offline {
        return Err(AirgapError::Other(
            "prefetch fetches from the upstreams; it cannot run in offline mode".into(),
        ));
    }
    // Client authentication guards the listening server; these requests never leave the
    // process, so they are not subject to it.
    config.auth = AuthConfig::default();
    let app = App::new(config)
        .await
        .map_err(|e| AirgapError::Other(e.to_string()))?;
    let jobs = args.jobs.max(1);
    let mut failed = 0;
    for name in &args.images {
        let result = async {
            let r = name.resolve(&app.routing)?;
            let client = Client::new(Via::App(&app), r.request_name, &r.ns);
            image_with_referrers(&client, name, r.reference, &args, jobs).await
        }
        .await;
        match result {
            Ok(s) => println!(
                "{name}: {} ({}, {}: {} fetched, {} cached; {} downloaded; {})",
                s.digest.map(|d| d.to_string()).unwrap_or_default(),
                crate::units::count(s.manifests as u64, "manifest"),
                crate::units::count(s.blobs as u64, "blob"),
                s.fetched,
                s.cached,
                human_bytes(s.fetched_bytes),
                crate::units::count(s.referrers as u64, "referrer"),
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{name}: failed: {e}");
            }
        }
    }
    if failed > 0 {
        eprintln!(
            "prefetch: {failed} of {} images failed; run again to retry (what is cached is kept)",
            args.images.len()
        );
    }
    Ok(failed == 0)
}

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

/// Runs `prefetch --server`: like [`run`], through a running regcache's API.
pub async fn run_remote(server: &Server, args: PrefetchArgs) -> Result<bool, AirgapError> {
    let jobs = args.jobs.max(1);
    let mut failed = 0;
    for name in &args.images {
        let result = async {
            let (request_name, ns) = name.request_form(|_| false)?;
            let client = Client::new(Via::Server(server), request_name, &ns);
            image_with_referrers(&client, name, name.reference(), &args, jobs).await
        }
        .await;
        match result {
            Ok(s) => println!(
                "{name}: {} ({}, {} read through the server; {} transferred)",
                s.digest.map(|d| d.to_string()).unwrap_or_default(),
                crate::units::count(s.manifests as u64, "manifest"),
                crate::units::count(s.blobs as u64, "blob"),
                human_bytes(s.fetched_bytes)
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{name}: failed: {e}");
            }
        }
    }
    if failed > 0 {
        eprintln!(
            "prefetch: {failed} of {} images failed; run again to retry",
            args.images.len()
        );
    }
    Ok(failed == 0)
}

/// A manifest as regcache answered it.
struct Fetched {
    digest: Digest,
    media_type: String,
    body: Bytes,
}

/// Requests for one image, sent to the app or server as a client would send them.
struct Client<'a> {
    via: Via<'a>,
    name: Repository,
    query: String,
}

impl<'a> Client<'a> {
    /// Requests for `name` (with `ns=` when set) through `via`.
    fn new(via: Via<'a>, name: Repository, ns: &Option<String>) -> Self {
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
    async fn fetch(
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

    async fn manifest(&self, reference: &Reference) -> Result<Fetched, AirgapError> {
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

    async fn blob(&self, digest: &Digest, progress: &Progress) -> Result<u64, AirgapError> {
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

/// Fetches one blob unless the cache has it. `Ok(true)` when it was downloaded.
async fn blob(client: &Client<'_>, d: &Descriptor, progress: &Progress) -> Result<bool, String> {
    // Only a local cache can be asked what it holds; a server is asked for every blob.
    let cached = match client.via {
        Via::App(app) => {
            let len = app
                .store
                .blob_len(&d.digest)
                .await
                .map_err(|e| format!("blob {}: {e}", d.digest))?;
            if len.is_some() {
                app.store.note_use(&d.digest).await;
            }
            len
        }
        Via::Server(_) => None,
    };
    let fetched = match cached {
        Some(len) => {
            progress.bytes(len);
            false
        }
        None => {
            let n = client
                .blob(&d.digest, progress)
                .await
                .map_err(|e| e.to_string())?;
            if n != d.size {
                return Err(format!(
                    "blob {}: {n} bytes, its manifest says {}",
                    d.digest, d.size
                ));
            }
            true
        }
    };
    progress.blob_done();
    Ok(fetched)
}

fn wanted(platforms: &[PlatformFilter], d: &Descriptor) -> bool {
    platforms.is_empty()
        || d.platform
            .as_ref()
            .is_none_or(|p| platforms.iter().any(|f| f.matches(p)))
}

/// Prefetches one image and, when `args.referrers`, its referrers.
async fn image_with_referrers(
    client: &Client<'_>,
    name: &ImageName,
    reference: Reference,
    args: &PrefetchArgs,
    jobs: usize,
) -> Result<Summary, AirgapError> {
    let mut s = image_via(client, name, reference, &args.platforms, jobs).await?;
    if let (true, Some(subject)) = (args.referrers, s.digest.clone()) {
        let found = referrers_via(client, name, &subject, &args.platforms, jobs).await?;
        s.add(&found);
    }
    Ok(s)
}

/// Prefetches the referrers of `subject` (signatures, SBOMs, attestations: what the
/// referrers API lists, from the upstream's API or its tag schema), each with its blobs.
async fn referrers_via(
    client: &Client<'_>,
    name: &ImageName,
    subject: &Digest,
    platforms: &[PlatformFilter],
    jobs: usize,
) -> Result<Summary, AirgapError> {
    let what = format!("referrers of {subject}");
    let (_, body) = client
        .fetch("referrers", &subject.to_string(), false, &what)
        .await?;
    let index: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| AirgapError::Fetch(format!("{what}: not an index: {e}")))?;
    let listed: Vec<Digest> = index["manifests"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|d| d["digest"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut total = Summary::default();
    for d in listed {
        let s = image_via(client, name, Reference::Digest(d), platforms, jobs).await?;
        total.add(&s);
        total.referrers += 1;
    }
    Ok(total)
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

/// Prefetches one image through `client`: its manifests first, then its blobs, `jobs` at a
/// time.
async fn image_via(
    client: &Client<'_>,
    name: &ImageName,
    reference: Reference,
    platforms: &[PlatformFilter],
    jobs: usize,
) -> Result<Summary, AirgapError> {
    let top = client.manifest(&reference).await?;
    let mut summary = Summary {
        digest: Some(top.digest.clone()),
        manifests: 1,
        ..Summary::default()
    };
    let mut blobs: Vec<Descriptor> = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(top, 0)];
    while let Some((m, depth)) = stack.pop() {
        match oci::parse_manifest(&m.media_type, &m.body)? {
            Node::Index(children) => {
                if depth >= oci::MAX_DEPTH {
                    return Err(AirgapError::Other(format!(
                        "{}: indexes nested deeper than {}",
                        m.digest,
                        oci::MAX_DEPTH
                    )));
                }
                let chosen: Vec<&Descriptor> =
                    children.iter().filter(|c| wanted(platforms, c)).collect();
                if chosen.is_empty() {
                    return Err(AirgapError::Other(format!(
                        "index {} has no manifest for {}",
                        m.digest,
                        platforms
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                for c in chosen {
                    let child = client
                        .manifest(&Reference::Digest(c.digest.clone()))
                        .await?;
                    summary.manifests += 1;
                    stack.push((child, depth + 1));
                }
            }
            node @ Node::Image { .. } => {
                for b in node.blobs() {
                    if seen.insert(b.digest.clone()) {
                        blobs.push(b.clone());
                    }
                }
            }
        }
    }
    summary.blobs = blobs.len();
    let total = blobs.iter().map(|b| b.size).sum();
    let progress = Progress::new(&name.to_string(), blobs.len(), total);
    // Polled together on this task (no spawn): the downloads themselves run detached inside
    // the app, and dropping this future only stops reading them.
    let results: Vec<(u64, Result<bool, String>)> = futures_util::stream::iter(&blobs)
        .map(|b| async { (b.size, blob(client, b, &progress).await) })
        .buffer_unordered(jobs)
        .collect()
        .await;
    progress.clear();
    let mut errors = Vec::new();
    for (size, r) in results {
        match r {
            Ok(true) => {
                summary.fetched += 1;
                summary.fetched_bytes += size;
            }
            Ok(false) => summary.cached += 1,
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(AirgapError::Other(format!(
            "{} of {} blobs failed: {}",
            errors.len(),
            blobs.len(),
            errors.join("; ")
        )));
    }
    Ok(summary)
}
