//! Owns the small-layer image rows: an image of many layers of realistic sizes (1 KiB to
//! 5 MiB, log-uniform), pushed fresh for each server and round, then pulled by N `skopeo`
//! processes at once, cold and again warm, through each cache and from the upstream
//! directly: wall time until the last client is done, and the requests the upstream saw.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};

use crate::clients;
use crate::lab::{LOGIN, Lab, Server, random_blob};
use crate::report::{DIRECT, DISTRIBUTION, NGINX_PROXY, REGCACHE, Results};
use crate::support::image::skopeo_cmd;
use crate::support::peers::run_ok;

/// The upstream repository each server pulls its image from (one per server, so the
/// upstream's requests can be told apart; a new tag per round).
pub const REPOS: [(&str, &str); 4] = [
    (DIRECT, "bench/layers-direct"),
    (REGCACHE, "bench/layers-regcache"),
    (DISTRIBUTION, "bench/layers-distribution"),
    (NGINX_PROXY, "bench/layers-nginx"),
];

/// One `skopeo copy` may take this long at most.
const PULL_LIMIT: Duration = Duration::from_secs(900);

/// How the image is shaped and pulled.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Layers in the image.
    pub layers: usize,
    /// Smallest and largest layer, bytes.
    pub min: u64,
    /// Largest layer, bytes.
    pub max: u64,
    /// `skopeo` processes pulling at once.
    pub clients: usize,
}

impl Shape {
    /// The rows of the cold and the warm pull's times.
    pub fn rows(&self) -> (String, String) {
        (self.row("cold"), self.row("warm"))
    }

    /// Row names: `image of 200 layers, 16 clients, cold`.
    fn row(&self, what: &str) -> String {
        format!(
            "image of {} layers, {} clients, {what}",
            self.layers, self.clients
        )
    }
}

/// `n` layer sizes, log-uniform between `min` and `max` (many small layers, a few large
/// ones, as in real images); the same list for the same arguments.
pub fn layer_sizes(n: usize, min: u64, max: u64) -> Vec<u64> {
    let (lo, hi) = ((min.max(1) as f64).ln(), (max.max(min).max(1) as f64).ln());
    // A fixed xorshift sequence: every server and round pulls the same size mix.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            (lo + u * (hi - lo)).exp().round() as u64
        })
        .collect()
}

/// An image pushed to the upstream.
struct Pushed {
    /// Every blob (layers and config), to delete afterwards.
    blobs: Vec<String>,
}

/// Pushes an image of fresh random layers of `sizes` as `repo:tag`.
async fn push_image(lab: &Lab, repo: &str, tag: &str, sizes: &[u64]) -> anyhow::Result<Pushed> {
    let url = lab.upstream.url();
    let layers: Vec<(String, u64)> = futures_util::stream::iter(sizes.iter().copied())
        .map(|size| {
            let (http, url, token) = (lab.http.clone(), url.clone(), lab.push.clone());
            async move {
                let digest =
                    clients::push_blob(&http, &url, &token, repo, random_blob(size)).await?;
                anyhow::Ok((digest, size))
            }
        })
        .buffered(8)
        .try_collect()
        .await?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.0).collect::<Vec<_>>()},
    }))?;
    let config_len = config.len();
    let config_digest = clients::push_blob(&lab.http, &url, &lab.push, repo, config).await?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::lab::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_len},
        "layers": layers.iter().map(|(d, size)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": size,
        })).collect::<Vec<_>>(),
    }))?;
    clients::push_manifest(
        &lab.http,
        &url,
        &lab.push,
        repo,
        tag,
        crate::lab::OCI_MANIFEST,
        manifest,
    )
    .await?;
    let mut blobs: Vec<String> = layers.into_iter().map(|(d, _)| d).collect();
    blobs.push(config_digest);
    Ok(Pushed { blobs })
}

/// `clients` `skopeo copy` processes pulling `host/repo:tag` at once, each into its own
/// directory under `scratch` (removed afterwards); the time until the last one is done.
async fn pull(
    host: &str,
    repo: &str,
    tag: &str,
    clients: usize,
    creds: Option<(&str, &str)>,
    scratch: &Path,
) -> anyhow::Result<Duration> {
    let mut runs = Vec::with_capacity(clients);
    let mut keep = Vec::with_capacity(clients);
    for i in 0..clients {
        let (mut cmd, tmp) = skopeo_cmd()?;
        let dest = scratch.join(format!("pull-{i}"));
        let _ = std::fs::remove_dir_all(&dest);
        cmd.args(["copy", "--src-tls-verify=false", "--retry-times", "0"]);
        if let Some((user, password)) = creds {
            cmd.arg("--src-creds").arg(format!("{user}:{password}"));
        }
        cmd.arg(format!("docker://{host}/{repo}:{tag}"))
            .arg(format!("dir:{}", dest.display()));
        keep.push((tmp, dest));
        runs.push(async move { run_ok(&mut cmd, PULL_LIMIT).await });
    }
    let started = Instant::now();
    let outcomes = futures_util::future::join_all(runs).await;
    let elapsed = started.elapsed();
    for (_, dest) in &keep {
        let _ = std::fs::remove_dir_all(dest);
    }
    for outcome in outcomes {
        outcome.context("skopeo pull")?;
    }
    Ok(elapsed)
}

/// Requests the upstream logged for `repo` so far (any method and status).
fn upstream_requests(lab: &Lab, repo: &str) -> usize {
    let prefix = format!("/v2/{repo}/");
    lab.upstream
        .access_log()
        .iter()
        .filter(|e| e.path.starts_with(&prefix))
        .count()
}

/// The rows of one round: for the upstream directly and each cache, a fresh image pulled
/// cold and then warm. Every blob of it is deleted from every store afterwards.
pub async fn run(results: &mut Results, shape: Shape, lab: &Lab, caches: &[Server], round: usize) {
    let direct = Server {
        column: DIRECT,
        url: lab.upstream.url(),
        procs: None,
    };
    let sizes = layer_sizes(shape.layers, shape.min, shape.max);
    let (cold, warm) = shape.rows();
    let (cold_up, warm_up) = (
        shape.row("cold, upstream requests"),
        shape.row("warm, upstream requests"),
    );
    results.reserve(&cold, "s");
    results.reserve(&warm, "s");
    results.reserve(&cold_up, "count");
    results.reserve(&warm_up, "count");
    for srv in std::iter::once(&direct).chain(caches) {
        let Some((_, repo)) = REPOS.iter().find(|(c, _)| *c == srv.column) else {
            continue;
        };
        let tag = format!("r{round}");
        let image = match push_image(lab, repo, &tag, &sizes).await {
            Ok(i) => i,
            Err(e) => {
                results.fail(&cold, "s", srv.column, format!("push: {e:#}"));
                continue;
            }
        };
        let host = srv.url.trim_start_matches("http://");
        let creds = (srv.column == DIRECT).then_some(LOGIN);
        lab.upstream.settle_log().await;
        let before = upstream_requests(lab, repo);
        let mut counts = vec![before];
        for row in [&cold, &warm] {
            match pull(host, repo, &tag, shape.clients, creds, lab.scratch()).await {
                Ok(t) => results.add(row, "s", srv.column, t.as_secs_f64()),
                Err(e) => results.fail(row, "s", srv.column, format!("{e:#}")),
            }
            lab.upstream.settle_log().await;
            counts.push(upstream_requests(lab, repo));
        }
        results.add(
            &cold_up,
            "count",
            srv.column,
            (counts[1] - counts[0]) as f64,
        );
        results.add(
            &warm_up,
            "count",
            srv.column,
            (counts[2] - counts[1]) as f64,
        );
        lab.forget_all(&image.blobs);
    }
}
