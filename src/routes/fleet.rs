//! `GET|HEAD /_regcache/fleet/blobs/<digest>`: the peer endpoint other replicas stream a blob
//! from, at any offset (`Range: bytes=N-`), from the local file or the download under way
//! (the same tail reader local clients follow). Only with the shared peer token; only
//! digests; never starts a download.

use std::sync::Arc;

use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

use crate::app::App;
use crate::body::{self, Body};
use crate::cache::inflight::FillState;
use crate::cache::tail::{Tail, file_stream};
use crate::fleet::Fleet;
use crate::fleet::peer::{LENGTH, OFFSET, PATH};
use crate::reference::Digest;

fn refusal(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let payload = serde_json::json!({"errors": [{"code": code, "message": message}]});
    let mut r = body::json(payload.to_string(), false);
    *r.status_mut() = status;
    r
}

/// The first byte asked for by a `Range: bytes=N-` header (0 without one); `None` for any
/// other range.
fn offset(headers: &HeaderMap) -> Option<u64> {
    let Some(v) = headers.get(header::RANGE) else {
        return Some(0);
    };
    v.to_str()
        .ok()?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

fn answer(from: u64, total: Option<u64>, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = if from == 0 {
        StatusCode::OK
    } else {
        StatusCode::PARTIAL_CONTENT
    };
    let h = r.headers_mut();
    h.insert(OFFSET, HeaderValue::from(from));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(total) = total {
        h.insert(LENGTH, HeaderValue::from(total));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(total - from));
        if from > 0 {
            body::set_header(
                &mut r,
                header::CONTENT_RANGE,
                &format!("bytes {from}-{}/{total}", total.saturating_sub(1)),
            );
        }
    }
    r
}

/// Answers a peer request for `path` (which starts with [`PATH`]).
pub async fn peer_blob(
    app: &Arc<App>,
    fleet: &Fleet,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Response<Body> {
    if !fleet.authorized(headers) {
        return refusal(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "the peer token is required",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "GET or HEAD only",
        );
    }
    let head = method == Method::HEAD;
    let Some(digest) = path
        .strip_prefix(PATH)
        .and_then(|d| d.parse::<Digest>().ok())
    else {
        return refusal(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "not a digest");
    };
    let Some(from) = offset(headers) else {
        return refusal(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "RANGE_INVALID",
            "only bytes=N- ranges",
        );
    };
    let unknown = || refusal(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "not here");
    let stats = fleet.stats().clone();
    let counted = move |r: std::io::Result<bytes::Bytes>| {
        if let Ok(b) = &r {
            stats.peer_served(b.len() as u64);
        }
        r
    };
    match app.store.open_blob_file(&digest).await {
        Ok(Some((file, total))) => {
            if from > total {
                return refusal(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "RANGE_INVALID",
                    "past the end",
                );
            }
            let body = if head {
                body::empty()
            } else {
                body::stream(file_stream(Arc::new(file), from, total - from).map(counted))
            };
            return answer(from, Some(total), body);
        }
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(%error, %digest, "peer request: cannot read the local blob");
            return unknown();
        }
    }
    let Some(fill) = app.inflight.get(&digest) else {
        return unknown();
    };
    let mut rx = fill.subscribe();
    let state = match rx.wait_for(|s| !matches!(s, FillState::Connecting)).await {
        Ok(s) => s.clone(),
        Err(_) => return unknown(),
    };
    let total = match state {
        FillState::Streaming { len, .. } => len,
        FillState::Verified { len } | FillState::Complete { len } => Some(len),
        FillState::Failed(_) | FillState::Connecting => return unknown(),
    };
    if total.is_some_and(|t| from > t) {
        return refusal(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "RANGE_INVALID",
            "past the end",
        );
    }
    let body = if head {
        body::empty()
    } else {
        body::stream(
            Tail::new(fill, app.store.clone(), from, None)
                .into_stream()
                .map(counted),
        )
    };
    answer(from, total, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::FsStore;
    use crate::config::{Config, FleetConfig};
    use http::Request;
    use http_body_util::BodyExt;

    async fn app() -> (tempfile::TempDir, Arc<App>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).await.unwrap());
        let config = FleetConfig {
            store: "s3://bucket/p".parse().unwrap(),
            advertise: "http://127.0.0.1:1".parse().unwrap(),
            peer_token_file: "/nonexistent".into(),
            lease_ttl: crate::units::HumanDuration(std::time::Duration::from_secs(15)),
        };
        let fleet = Fleet::with_store(
            Arc::new(object_store::memory::InMemory::new()),
            &config,
            "peer-secret",
            None,
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        fleet.check().await.unwrap();
        let app = App::with_fleet(Config::default(), store, Some(fleet)).unwrap();
        (dir, app)
    }

    async fn get(
        app: &Arc<App>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut req = Request::get(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .handle(
                req.body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap(),
            )
            .await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, headers, body)
    }

    #[tokio::test]
    async fn the_peer_endpoint_needs_the_token_and_serves_only_digests_it_holds() {
        let (_dir, app) = app().await;
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let d = Digest::sha256(&data);
        let staged = app.store.staging_path("t");
        std::fs::write(&staged, &data).unwrap();
        app.store.commit_blob(&d, &staged).await.unwrap();
        let path = format!("{PATH}{d}");
        let auth = ("authorization", "Bearer peer-secret");

        for wrong in [
            vec![],
            vec![("authorization", "Bearer peer-secre")],
            vec![("authorization", "Basic cGVlci1zZWNyZXQ=")],
        ] {
            let (status, _, body) = get(&app, &path, &wrong).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong:?}");
            assert!(String::from_utf8_lossy(&body).contains("UNAUTHORIZED"));
        }
        let (status, h, body) = get(&app, &path, &[auth]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, data);
        assert_eq!(h[&LENGTH], "5000");
        let (status, h, body) = get(&app, &path, &[auth, ("range", "bytes=1200-")]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(h[&OFFSET], "1200");
        assert_eq!(body, &data[1200..]);
        assert_eq!(app.fleet().unwrap().stats().peer_bytes().0, 5000 + 3800);

        // A digest this replica neither holds nor downloads; names and URLs are no digests.
        let other = Digest::sha256(b"other");
        let (status, _, _) = get(&app, &format!("{PATH}{other}"), &[auth]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        for bad in [
            "library/alpine",
            "https:%2F%2Fregistry-1.docker.io",
            "sha256:zz",
        ] {
            let (status, _, _) = get(&app, &format!("{PATH}{bad}"), &[auth]).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        }
        // Nothing was fetched or started.
        assert_eq!(app.downloads_in_flight(), 0);

        // A hit through the registry API makes no store request.
        let before = app.fleet().unwrap().stats().requests_total();
        let (status, _, body) = get(&app, &format!("/v2/library/x/blobs/{d}"), &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, data);
        assert_eq!(app.fleet().unwrap().stats().requests_total(), before);
    }

    #[tokio::test]
    async fn metrics_readiness_and_the_status_page_show_the_fleet() {
        let (_dir, app) = app().await;
        let (_, _, metrics) = get(&app, "/metrics", &[]).await;
        let metrics = String::from_utf8(metrics).unwrap();
        for line in [
            "regcache_fleet_store_requests_total{op=\"put_create\"} 12",
            "regcache_fleet_store_requests_total{op=\"get\"} 0",
            "regcache_fleet_store_bytes_total{direction=\"read\"} 0",
            "regcache_fleet_peer_bytes_total{direction=\"served\"} 0",
            "regcache_fleet_leases_total{result=\"taken_over\"} 0",
            "regcache_fleet_store_up 1",
            "regcache_fleet_degraded_transitions_total 0",
        ] {
            assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
        }
        let (status, _, ready) = get(&app, "/readyz", &[]).await;
        assert_eq!(status, StatusCode::OK);
        let ready = String::from_utf8(ready).unwrap();
        assert!(ready.contains("\"summary\":\"fleet: ok\""), "{ready}");
        let (_, _, page) = get(&app, "/status", &[]).await;
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains("<h2>Fleet</h2>"), "{page}");
        assert!(
            page.contains("id=\"fleet-state\" class=\"up\">fleet: ok"),
            "{page}"
        );
    }

    #[tokio::test]
    async fn a_degraded_replica_stays_ready() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).await.unwrap());
        let config = FleetConfig {
            store: "s3://bucket/p".parse().unwrap(),
            advertise: "http://127.0.0.1:1".parse().unwrap(),
            peer_token_file: "/nonexistent".into(),
            lease_ttl: crate::units::HumanDuration(std::time::Duration::from_secs(15)),
        };
        // Nothing listens on port 9 of loopback: every request is refused.
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("bucket")
            .with_endpoint("http://127.0.0.1:9")
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .unwrap();
        let fleet = Fleet::with_store(
            Arc::new(s3),
            &config,
            "peer-secret",
            None,
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        fleet
            .check()
            .await
            .expect("an unreachable store is not refused");
        let app = App::with_fleet(Config::default(), store, Some(fleet)).unwrap();
        let (status, _, ready) = get(&app, "/readyz", &[]).await;
        assert_eq!(status, StatusCode::OK);
        let ready = String::from_utf8(ready).unwrap();
        assert!(
            ready.contains("degraded: object store unreachable"),
            "{ready}"
        );
        let (_, _, metrics) = get(&app, "/metrics", &[]).await;
        let metrics = String::from_utf8(metrics).unwrap();
        assert!(metrics.contains("regcache_fleet_store_up 0"), "{metrics}");
        assert!(
            metrics.contains("regcache_fleet_degraded_transitions_total 1"),
            "{metrics}"
        );
    }
}
