//! An upstream that sends a manifest with `Content-Encoding: gzip`: regcache decodes it within
//! `cache.max_manifest_size` and serves (and caches) the JSON; a manifest too large once
//! decoded, or in an encoding regcache does not decode, is refused with a 502 naming why,
//! and nothing is cached.

mod fake;

use std::convert::Infallible;
use std::io::Write;

use bytes::Bytes;
use http::header;

const MT: &str = "application/vnd.oci.image.manifest.v1+json";

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn manifest() -> String {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MT,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", "1".repeat(64)), "size": 2},
        "layers": [],
    })
    .to_string()
}

/// A registry whose manifests (by tag) come encoded: `gz` gzip, `br` marked brotli, `bomb`
/// gzip of 8 MiB of spaces.
async fn encoding_upstream() -> String {
    use hyper::service::service_fn;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    let json = manifest();
                    let (body, encoding, digest) = if path.ends_with("/manifests/gz") {
                        (gz(json.as_bytes()), "gzip", fake::sha(json.as_bytes()))
                    } else if path.ends_with("/manifests/br") {
                        (json.clone().into_bytes(), "br", fake::sha(json.as_bytes()))
                    } else if path.ends_with("/manifests/bomb") {
                        let big = vec![b' '; 8 << 20];
                        (gz(&big), "gzip", fake::sha(&big))
                    } else {
                        let mut r = http::Response::new(http_body_util::Full::new(Bytes::new()));
                        *r.status_mut() = http::StatusCode::NOT_FOUND;
                        return Ok::<_, Infallible>(r);
                    };
                    let mut r = http::Response::new(http_body_util::Full::new(Bytes::from(body)));
                    let h = r.headers_mut();
                    h.insert(header::CONTENT_TYPE, MT.parse().unwrap());
                    h.insert(header::CONTENT_ENCODING, encoding.parse().unwrap());
                    h.insert("docker-content-digest", digest.parse().unwrap());
                    Ok(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

async fn detail(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.unwrap();
    v["errors"][0]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_gzip_manifest_is_decoded_and_other_encodings_are_refused() {
    let url = encoding_upstream().await;
    let mut cfg = fake::config_for(&url);
    cfg.retry.attempts = 1;
    let proxy = fake::Proxy::start(cfg).await;
    let c = fake::client();
    let json = manifest();

    let r = c
        .get(proxy.url("/v2/lib/app/manifests/gz"))
        .header(header::ACCEPT, MT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get(header::CONTENT_ENCODING).is_none());
    assert_eq!(r.headers()[header::CONTENT_TYPE], MT);
    let d = r.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(d, fake::sha(json.as_bytes()));
    assert_eq!(r.bytes().await.unwrap(), json.as_bytes());
    // Cached as JSON: by digest from the cache, the same bytes.
    let r = c
        .get(proxy.url(&format!("/v2/lib/app/manifests/{d}")))
        .header(header::ACCEPT, MT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), json.as_bytes());

    let r = c
        .get(proxy.url("/v2/lib/app/manifests/br"))
        .header(header::ACCEPT, MT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let why = detail(r).await;
    assert!(why.contains("Content-Encoding br"), "{why}");

    let r = c
        .get(proxy.url("/v2/lib/app/manifests/bomb"))
        .header(header::ACCEPT, MT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let why = detail(r).await;
    assert!(why.contains("max_manifest_size"), "{why}");
    let cached: Vec<_> = fake::files_under(&proxy.app.config.cache_dir.join("manifests"));
    assert_eq!(
        cached.len(),
        1,
        "only the decoded manifest is cached: {cached:?}"
    );
}
