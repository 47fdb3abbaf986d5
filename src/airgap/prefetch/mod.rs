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

mod client;
mod image;

use super::AirgapError;
use super::name::{ImageName, PlatformFilter};
use super::progress::human_bytes;
use crate::app::App;
use crate::config::{AuthConfig, Config};
use crate::reference::Digest;
use client::Client;
pub use client::{Server, Via};
use image::image_with_referrers;

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
