//! Keeping on when the upstream is gone: offline mode serves only the cache and contacts no
//! upstream, tag lists fall back to the cache, immutable tags are never revalidated.

mod fake;

use std::sync::Arc;
use std::time::Duration;

use fake::*;
use regcache::media::{DOCKER_V2, OCI_INDEX, OCI_MANIFEST};

#[tokio::test]
async fn offline_mode_serves_the_cache_and_never_contacts_the_upstream() {
    let up = FakeUpstream::start().await;
    let img = push_image(&up, "library/app", "1.0", &[blob_of(5000, 1)], OCI_MANIFEST);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    // Warm the cache online.
    let online = Proxy::start_in(config_for(&up.url()), dir.clone()).await;
    let c = client();
    let r = c
        .get(online.url("/v2/library/app/manifests/1.0"))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for d in std::iter::once(&img.config).chain(&img.layers) {
        let r = c
            .get(online.url(&format!("/v2/library/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        r.bytes().await.unwrap();
    }
    client()
        .get(online.url("/v2/library/app/tags/list"))
        .send()
        .await
        .unwrap();
    online.stop().await;

    let mut cfg = config_for(&up.url());
    cfg.offline = true;
    let proxy = Proxy::start_in(cfg, dir.clone()).await;
    let before = up.seen().len();
    // By tag, also for a client whose Accept differs from the one that filled the cache.
    for accept in [
        vec![OCI_MANIFEST],
        vec![OCI_INDEX, OCI_MANIFEST, DOCKER_V2],
        vec![],
    ] {
        let mut b = c.get(proxy.url("/v2/library/app/manifests/1.0"));
        for a in &accept {
            b = b.header("Accept", *a);
        }
        let r = b.send().await.unwrap();
        assert_eq!(r.status(), 200, "{accept:?}");
        assert_eq!(
            r.headers()["docker-content-digest"],
            img.manifest_digest.as_str()
        );
    }
    let r = c
        .get(proxy.url(&format!(
            "/v2/library/app/manifests/{}",
            img.manifest_digest
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(proxy.url(&format!("/v2/library/app/blobs/{}", img.layers[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(proxy.url("/v2/library/app/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["1.0"]));
    // A miss is a 404 that names offline mode.
    for path in [
        "/v2/library/app/manifests/2.0".to_string(),
        format!("/v2/library/app/blobs/{}", sha(b"never cached")),
        format!("/v2/library/app/manifests/{}", sha(b"never cached either")),
    ] {
        let r = c.get(proxy.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(
            v["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("offline mode"),
            "{v}"
        );
    }
    // A client without a matching cached type still never gets one it did not accept.
    let r = c
        .get(proxy.url("/v2/library/app/manifests/1.0"))
        .header("Accept", DOCKER_V2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        up.seen().len(),
        before,
        "offline mode contacted the upstream"
    );
}

#[tokio::test]
async fn tag_lists_fall_back_to_the_cache_when_the_upstream_is_down() {
    let up = FakeUpstream::start().await;
    for t in ["a", "b", "c"] {
        push_image(&up, "team/app", t, &[blob_of(10, 2)], OCI_MANIFEST);
    }
    let proxy = Proxy::start(config_for(&up.url())).await;
    let c = client();
    for t in ["a", "c"] {
        let r = c
            .get(proxy.url(&format!("/v2/team/app/manifests/{t}")))
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    up.set_down(true);
    let r = c
        .get(proxy.url("/v2/team/app/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("warning").is_some());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "c"]));
    let r = c
        .get(proxy.url("/v2/team/app/tags/list?n=1&last=a"))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["c"]));
    // Nothing cached for a repository: the upstream's failure is reported.
    let r = c
        .get(proxy.url("/v2/team/other/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test(start_paused = true)]
async fn immutable_tags_are_never_revalidated() {
    let up = FakeUpstream::start().await;
    push_image(&up, "team/app", "v1.2.3", &[blob_of(10, 3)], OCI_MANIFEST);
    push_image(&up, "team/app", "latest", &[blob_of(10, 4)], OCI_MANIFEST);
    let mut cfg = config_for(&up.url());
    cfg.upstreams[0].immutable_tags = vec!["v*.*.*".into()];
    cfg.upstreams[0].tag_ttl = Some(regcache::units::HumanDuration(Duration::from_secs(60)));
    let proxy = Proxy::start(cfg).await;
    let get = |tag: &'static str| {
        client()
            .get(proxy.url(&format!("/v2/team/app/manifests/{tag}")))
            .header("Accept", OCI_MANIFEST)
            .send()
    };
    assert_eq!(get("v1.2.3").await.unwrap().status(), 200);
    assert_eq!(get("latest").await.unwrap().status(), 200);
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(get("v1.2.3").await.unwrap().status(), 200);
    assert_eq!(get("latest").await.unwrap().status(), 200);
    assert_eq!(
        up.count("HEAD", "/manifests/v1.2.3"),
        0,
        "an immutable tag was revalidated"
    );
    assert_eq!(up.count("HEAD", "/manifests/latest"), 1);
}
