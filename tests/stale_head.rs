//! A stale tag asked for by many clients at once is revalidated with one upstream `HEAD`
//! (Docker Hub counts every `HEAD` against the pull limit's request budget).

mod fake;

use std::sync::Arc;
use std::time::Duration;

use fake::*;
use regcache::media::OCI_MANIFEST;
use regcache::units::HumanDuration;
use tokio::sync::Barrier;

const CLIENTS: usize = 20;

#[tokio::test(start_paused = true)]
async fn concurrent_clients_on_a_stale_tag_share_one_head() {
    let up = FakeUpstream::start().await;
    let img = push_image(
        &up,
        "library/app",
        "latest",
        &[blob_of(10, 1)],
        OCI_MANIFEST,
    );
    let mut cfg = config_for(&up.url());
    cfg.cache.tag_ttl = HumanDuration(Duration::from_secs(60));
    let proxy = Proxy::start(cfg).await;
    let url = proxy.url("/v2/library/app/manifests/latest");
    let get = {
        let url = url.clone();
        move || {
            let url = url.clone();
            async move {
                let r = client()
                    .get(&url)
                    .header("Accept", OCI_MANIFEST)
                    .send()
                    .await
                    .unwrap();
                let digest = r
                    .headers()
                    .get("docker-content-digest")
                    .map(|v| v.to_str().unwrap().to_owned());
                let stale = r.headers().get("warning").is_some();
                let status = r.status().as_u16();
                let body = r.bytes().await.unwrap();
                (status, digest, stale, sha(&body))
            }
        }
    };
    let want = (
        200,
        Some(img.manifest_digest.clone()),
        false,
        img.manifest_digest.clone(),
    );
    // The tag is cached, then its TTL runs out.
    assert_eq!(get().await, want);
    assert_eq!(up.count("HEAD", "/manifests/latest"), 0);
    tokio::time::advance(Duration::from_secs(61)).await;

    // The upstream holds every manifest HEAD until the test lets it answer.
    let gate = up.gate_manifest_heads();
    let barrier = Arc::new(Barrier::new(CLIENTS + 1));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (barrier, get) = (barrier.clone(), get.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                get().await
            })
        })
        .collect();
    barrier.wait().await;
    // Every client is waiting on the revalidation under way before the upstream answers.
    until(|| proxy.app.tag_checks_waiting() == CLIENTS).await;
    assert_eq!(up.count("HEAD", "/manifests/latest"), 1);
    gate.add_permits(CLIENTS);
    for c in clients {
        assert_eq!(c.await.unwrap(), want);
    }
    assert_eq!(up.count("HEAD", "/manifests/latest"), 1);
    assert_eq!(up.count("GET", "/manifests/"), 1);
    assert_eq!(proxy.app.tag_checks_waiting(), 0);
}
