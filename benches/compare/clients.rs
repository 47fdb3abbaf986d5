//! Owns the client side of the comparison: tokens and pushes to the upstream, `curl`
//! processes for blob throughput, `wrk` (and a small client of its own for `HEAD`) for
//! manifest request rates, and in-process downloads
//! for cold misses (time to first byte) and the thundering herd (every body's SHA-256
//! checked).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The manifest types Docker 20.10 accepts, as one comma-separated header (Docker sends them
/// as separate `Accept` lines; `wrk` keeps one line per header name).
pub const DOCKER_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v1+prettyjws, application/json";

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A bearer token from the token server at `realm` for `scopes`, with Basic credentials.
pub async fn token(
    http: &reqwest::Client,
    realm: &str,
    service: &str,
    scopes: &[&str],
    credentials: (&str, &str),
) -> anyhow::Result<String> {
    let mut url = url::Url::parse(realm)?;
    url.query_pairs_mut().append_pair("service", service);
    for s in scopes {
        url.query_pairs_mut().append_pair("scope", s);
    }
    let r = http
        .get(url)
        .basic_auth(credentials.0, Some(credentials.1))
        .send()
        .await?;
    ensure!(r.status() == 200, "token server answered {}", r.status());
    let v: serde_json::Value = r.json().await?;
    v["token"]
        .as_str()
        .map(str::to_owned)
        .context("no `token` in the token answer")
}

/// Uploads `data` as a blob of `repo` (one monolithic `PUT`); returns its digest.
pub async fn push_blob(
    http: &reqwest::Client,
    registry: &str,
    token: &str,
    repo: &str,
    data: Vec<u8>,
) -> anyhow::Result<String> {
    let digest = sha256(&data);
    let r = http
        .post(format!("{registry}/v2/{repo}/blobs/uploads/"))
        .bearer_auth(token)
        .send()
        .await?;
    ensure!(r.status() == 202, "upload start answered {}", r.status());
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("upload start without Location")?;
    let mut url = url::Url::parse(registry)?.join(location)?;
    url.query_pairs_mut().append_pair("digest", &digest);
    let r = http
        .put(url)
        .bearer_auth(token)
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .await?;
    ensure!(r.status() == 201, "blob upload answered {}", r.status());
    Ok(digest)
}

/// Pushes a manifest of `media_type` as `repo:tag`.
pub async fn push_manifest(
    http: &reqwest::Client,
    registry: &str,
    token: &str,
    repo: &str,
    tag: &str,
    media_type: &str,
    body: Vec<u8>,
) -> anyhow::Result<()> {
    let r = http
        .put(format!("{registry}/v2/{repo}/manifests/{tag}"))
        .bearer_auth(token)
        .header("content-type", media_type)
        .body(body)
        .send()
        .await?;
    let status = r.status();
    ensure!(
        status == 201,
        "manifest push answered {status}: {}",
        r.text().await.unwrap_or_default()
    );
    Ok(())
}

/// `n` `curl` processes downloading `url` (HTTP/1.1, body to `/dev/null`) at once; the time
/// from the first start to the last exit. Each must get `200` and `size` bytes. `ca` is the
/// certificate to trust for HTTPS.
pub async fn curl_parallel(
    url: &str,
    n: usize,
    size: u64,
    ca: Option<&Path>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut children = Vec::with_capacity(n);
    for _ in 0..n {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-s", "--http1.1", "--noproxy", "*", "-o", "/dev/null"])
            .args(["-w", "%{http_code} %{size_download}"]);
        if let Some(ca) = ca {
            cmd.arg("--cacert").arg(ca);
        }
        cmd.arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        children.push(cmd.spawn().context("spawn curl")?);
    }
    let outputs =
        futures_util::future::join_all(children.into_iter().map(|c| c.wait_with_output())).await;
    let elapsed = started.elapsed();
    for out in outputs {
        let out = out?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.trim() == format!("200 {size}"),
            "curl got `{}` (want `200 {size}`), exit {}",
            text.trim(),
            out.status
        );
    }
    Ok(elapsed)
}

/// What `wrk --latency` reported.
#[derive(Debug, Clone, Copy)]
pub struct WrkResult {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Non-2xx/3xx answers plus socket errors.
    pub errors: u64,
}

/// Runs `wrk` (2 threads, `conns` connections, `secs` seconds, Docker's `Accept`) with `GET`
/// requests against `url`.
pub async fn wrk(url: &str, conns: usize, secs: u64) -> anyhow::Result<WrkResult> {
    let mut cmd = tokio::process::Command::new("wrk");
    cmd.arg(format!("-t{}", conns.min(2)))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .args(["--latency", "--timeout", "10s"])
        .arg("-H")
        .arg(format!("Accept: {DOCKER_ACCEPT}"));
    cmd.arg(url).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(secs + 30), cmd.output())
        .await
        .context("wrk did not finish")??;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_wrk(&text)
}

/// The `HEAD` counterpart of [`wrk`], which cannot take `HEAD` (wrk 4.1 waits for a body
/// after the headers): `conns` keep-alive connections, each sending `HEAD url` with Docker's
/// `Accept` and waiting for the answer's headers before the next, for `secs` seconds. Every
/// latency is kept, so the percentiles are exact.
pub async fn head_load(url: &str, conns: usize, secs: u64) -> anyhow::Result<WrkResult> {
    let u = url::Url::parse(url)?;
    let addr = format!(
        "{}:{}",
        u.host_str().context("host")?,
        u.port_or_known_default().context("port")?
    );
    let request = format!(
        "HEAD {} HTTP/1.1\r\nHost: {addr}\r\nAccept: {DOCKER_ACCEPT}\r\n\r\n",
        u.path()
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (addr, request) = (addr.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            let mut buf = vec![0u8; 16 * 1024];
            'connect: while Instant::now() < deadline {
                let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
                    errors += 1;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    if stream.write_all(request.as_bytes()).await.is_err() {
                        errors += 1;
                        continue 'connect;
                    }
                    let mut len = 0;
                    let end = loop {
                        match stream.read(&mut buf[len..]).await {
                            Ok(0) | Err(_) => {
                                errors += 1;
                                continue 'connect;
                            }
                            Ok(n) => len += n,
                        }
                        if let Some(i) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
                            break i;
                        }
                        if len == buf.len() {
                            errors += 1;
                            continue 'connect;
                        }
                    };
                    latencies.push(sent.elapsed());
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    if !head.starts_with("http/1.1 200") {
                        errors += 1;
                    }
                    if head.contains("\r\nconnection: close") {
                        continue 'connect;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.context("HEAD client panicked")?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(!latencies.is_empty(), "no HEAD request was answered");
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    Ok(WrkResult {
        rps: latencies.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
    })
}

/// Parses `wrk --latency` output (`Requests/sec:`, the `Latency Distribution` block, error
/// lines).
pub fn parse_wrk(text: &str) -> anyhow::Result<WrkResult> {
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["50%", v] => p50 = duration_ms(v),
            ["99%", v] => p99 = duration_ms(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                // `connect 0, read 0, write 0, timeout 0`
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    match (rps, p50, p99) {
        (Some(rps), Some(p50_ms), Some(p99_ms)) => Ok(WrkResult {
            rps,
            p50_ms,
            p99_ms,
            errors,
        }),
        _ => bail!("cannot read wrk output:\n{text}"),
    }
}

/// `812.00us`, `1.20ms`, `2.01s`, `1.5m` → milliseconds.
fn duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// The timing of one download, each from sending the request.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    /// Until the first body byte.
    pub first: Duration,
    /// Until the last body byte.
    pub total: Duration,
    /// Between the arrival of the last chunk and the one before it.
    pub last_gap: Duration,
}

/// One timed download of `url`, whose body must be `size` bytes.
pub async fn timed_get(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    size: u64,
) -> anyhow::Result<Timed> {
    let mut req = http.get(url);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let started = Instant::now();
    let mut r = req.send().await?;
    ensure!(r.status() == 200, "answered {}", r.status());
    let mut n = 0u64;
    let (mut first, mut previous, mut last) = (None, Duration::ZERO, Duration::ZERO);
    while let Some(chunk) = r.chunk().await? {
        let now = started.elapsed();
        first.get_or_insert(now);
        (previous, last) = (last, now);
        n += chunk.len() as u64;
    }
    ensure!(n == size, "got {n} of {size} bytes");
    Ok(Timed {
        first: first.unwrap_or_default(),
        total: started.elapsed(),
        // A body in one chunk has no wait before its last chunk.
        last_gap: if previous.is_zero() {
            Duration::ZERO
        } else {
            last - previous
        },
    })
}

/// `n` clients released together by a barrier, each downloading `url` and checking that its
/// body hashes to `digest`; the time from the release until the last body is complete.
pub async fn herd(
    http: &reqwest::Client,
    url: &str,
    n: usize,
    digest: &str,
) -> anyhow::Result<Duration> {
    // Every client and this task meet here, so the clock starts when the requests do.
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (http, url, digest, barrier) = (
            http.clone(),
            url.to_owned(),
            digest.to_owned(),
            barrier.clone(),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut r = http.get(&url).send().await?;
            ensure!(r.status() == 200, "answered {}", r.status());
            let mut h = Sha256::new();
            while let Some(chunk) = r.chunk().await? {
                h.update(&chunk);
            }
            let got = format!("sha256:{}", hex::encode(h.finalize()));
            ensure!(got == digest, "body hashes to {got}, want {digest}");
            Ok(())
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    for t in tasks {
        t.await.context("herd client panicked")??;
    }
    Ok(started.elapsed())
}
