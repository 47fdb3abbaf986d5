//! Owns the skopeo end-to-end tests: real `skopeo copy` pulls through an in-process regcache from a real token-auth registry (name forms, multi-arch, once-per-blob fetching, token reuse).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use support::image::{self, Layer, OciLayout};
use support::proxy::{Hub, Proxy};

/// Pulls `reference` (relative to the proxy, e.g. `hello:1`) with skopeo into `dir/<sub>`.
async fn pull(proxy: &Proxy, reference: &str, dir: &Path, sub: &str, extra: &[&str]) -> String {
    let dest = dir.join(sub);
    let got = image::skopeo_pull(&format!("{}/{reference}", proxy.host()), &dest, extra)
        .await
        .unwrap_or_else(|e| panic!("pull {reference} {extra:?}: {e:#}"));
    assert_eq!(
        got.len(),
        1,
        "{reference}: one entry in index.json: {got:?}"
    );
    got.into_iter().next().unwrap()
}

/// The bytes of blob `digest` in the OCI layout at `dir`.
fn layout_blob(dir: &Path, digest: &str) -> Vec<u8> {
    let (alg, hex) = digest.split_once(':').unwrap();
    std::fs::read(dir.join("blobs").join(alg).join(hex))
        .unwrap_or_else(|e| panic!("{digest} in {}: {e}", dir.display()))
}

/// `{digest: 1}` for every config and layer blob of every image in `layouts`.
fn once_each(layouts: &[&OciLayout]) -> BTreeMap<String, usize> {
    layouts
        .iter()
        .flat_map(|l| l.images.iter())
        .flat_map(|i| std::iter::once(i.config.digest.clone()).chain(i.layer_digests()))
        .map(|d| (d, 1))
        .collect()
}

/// regcache asked the token server once per repository scope and never more: its own
/// counter equals the number of token requests the server saw (since `reset_counts`), which
/// equals the number of distinct scopes asked for, which is `expected_scopes`.
fn assert_one_token_per_scope(hub: &Hub, proxy: &Proxy, expected_scopes: &[&str]) {
    let requests = hub.token.requests();
    let scopes: BTreeSet<String> = requests.iter().flat_map(|r| r.scopes.clone()).collect();
    let expected: BTreeSet<String> = expected_scopes.iter().map(|s| s.to_string()).collect();
    assert_eq!(scopes, expected, "scopes regcache asked for: {requests:#?}");
    assert_eq!(
        requests.len(),
        expected.len(),
        "one token request per scope: {requests:#?}"
    );
    assert!(requests.iter().all(|r| r.status == 200), "{requests:#?}");
    assert_eq!(
        proxy.token_fetches(),
        expected.len() as u64,
        "regcache's token_fetches() counts one per scope"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_single_arch_by_every_name_form_fetches_each_blob_once() {
    let started = Instant::now();
    let hub = Hub::start().await.unwrap();
    let hello1 = image::single_arch("1").unwrap();
    let new_layer = Layer::deterministic(300 * 1024, 2);
    let hello2 = image::single_arch_with_layers("2", std::slice::from_ref(&new_layer)).unwrap();
    let busybox = hello1.images[0].layers[0].digest.clone();
    assert_eq!(hello2.images[0].layers[0].digest, busybox, "shared layer");
    hub.push(&hello1, "library/hello:1").await.unwrap();
    hub.push(&hello2, "library/hello:2").await.unwrap();
    let upstream1 = hub.inspect_digest("library/hello:1").await.unwrap();
    let upstream2 = hub.inspect_digest("library/hello:2").await.unwrap();
    assert_eq!(upstream1, hello1.digest());
    assert_eq!(upstream2, hello2.digest());
    assert!(
        hub.blob_gets().await.is_empty(),
        "push + inspect GET no blobs"
    );
    hub.token.reset_counts();
    hub.registry.settle_log().await;
    let tag_gets_before = hub.registry.manifest_get_count("1");

    let proxy = Proxy::start(&hub.url()).await.unwrap();
    let out = tempfile::tempdir().unwrap();

    // Shorthand (Docker Hub rule: `hello` -> `library/hello`).
    let got = pull(&proxy, "hello:1", out.path(), "short", &[]).await;
    assert_eq!(got, upstream1, "shorthand pull keeps the upstream digest");
    assert_eq!(
        layout_blob(&out.path().join("short"), &got),
        hello1.images[0].manifest_bytes,
        "manifest bytes unchanged"
    );
    assert_eq!(hub.blob_gets().await, once_each(&[&hello1]));
    assert!(proxy.wait_idle().await, "downloads finished");
    let cached = proxy.cached_blobs();
    assert!(cached.contains(&busybox), "{cached:?}");
    assert!(
        cached.contains(&hello1.images[0].config.digest),
        "{cached:?}"
    );

    // Full name and upstream path prefix: same manifest, served from the cache.
    let got = pull(&proxy, "library/hello:1", out.path(), "full", &[]).await;
    assert_eq!(got, upstream1, "full-name pull");
    let got = pull(&proxy, "hub/library/hello:1", out.path(), "prefix", &[]).await;
    assert_eq!(got, upstream1, "prefix pull");
    let got = pull(&proxy, "hello:1", out.path(), "again", &[]).await;
    assert_eq!(got, upstream1, "repeat pull");
    assert_eq!(
        hub.blob_gets().await,
        once_each(&[&hello1]),
        "repeat pulls fetch no blob from upstream again"
    );
    assert_eq!(
        hub.registry.manifest_get_count("1") - tag_gets_before,
        1,
        "every name form shares one cached tag answer (tag_ttl 300 s)"
    );

    // hello:2 shares the busybox layer: only its config and new layer go upstream.
    let got = pull(&proxy, "hello:2", out.path(), "two", &[]).await;
    assert_eq!(got, upstream2);
    let gets = hub.blob_gets().await;
    assert_eq!(gets.get(&busybox), Some(&1), "shared layer not re-fetched");
    assert_eq!(gets.get(new_layer.digest()), Some(&1));
    assert_eq!(gets.get(&hello2.images[0].config.digest), Some(&1));
    assert_eq!(gets, once_each(&[&hello1, &hello2]), "nothing else fetched");
    let got = pull(&proxy, "library/hello:2", out.path(), "two-again", &[]).await;
    assert_eq!(got, upstream2);
    assert_eq!(hub.blob_gets().await, once_each(&[&hello1, &hello2]));

    assert!(proxy.wait_idle().await);
    let cached = proxy.cached_blobs();
    for d in once_each(&[&hello1, &hello2]).keys() {
        assert!(cached.contains(d), "{d} cached: {cached:?}");
    }
    assert_one_token_per_scope(&hub, &proxy, &["repository:library/hello:pull"]);
    eprintln!(
        "skopeo_single_arch_by_every_name_form_fetches_each_blob_once took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_multi_arch_per_platform_and_whole_index() {
    let started = Instant::now();
    let hub = Hub::start().await.unwrap();
    let multi = image::multi_arch("1").unwrap();
    hub.push(&multi, "library/multi:1").await.unwrap();
    let upstream_index = hub.inspect_digest("library/multi:1").await.unwrap();
    assert_eq!(upstream_index, multi.digest());
    let arm = multi.image("arm64").unwrap();
    let amd = multi.image("amd64").unwrap();
    hub.token.reset_counts();

    let proxy = Proxy::start(&hub.url()).await.unwrap();
    let out = tempfile::tempdir().unwrap();

    // The index through the proxy is byte-identical to upstream's.
    let raw = image::skopeo_inspect_raw(&format!("{}/multi:1", proxy.host()), &[])
        .await
        .unwrap();
    assert_eq!(image::sha256_digest(&raw), upstream_index);

    let got = pull(
        &proxy,
        "multi:1",
        out.path(),
        "arm",
        &["--override-arch", "arm64"],
    )
    .await;
    assert_eq!(
        got, arm.manifest.digest,
        "arm64 manifest chosen from the index"
    );
    let gets = hub.blob_gets().await;
    let expected_arm: BTreeMap<String, usize> = std::iter::once(arm.config.digest.clone())
        .chain(arm.layer_digests())
        .map(|d| (d, 1))
        .collect();
    assert_eq!(gets, expected_arm, "only arm64 blobs fetched, once");

    let got = pull(
        &proxy,
        "multi:1",
        out.path(),
        "amd",
        &["--override-arch", "amd64"],
    )
    .await;
    assert_eq!(
        got, amd.manifest.digest,
        "amd64 manifest chosen from the index"
    );
    assert_eq!(hub.blob_gets().await, once_each(&[&multi]));

    let got = pull(&proxy, "multi:1", out.path(), "all", &["--all"]).await;
    assert_eq!(got, upstream_index, "--all keeps the index digest");
    assert_eq!(
        layout_blob(&out.path().join("all"), &got),
        multi.index_bytes.clone().unwrap(),
        "index bytes unchanged"
    );
    for image in &multi.images {
        assert_eq!(
            layout_blob(&out.path().join("all"), &image.manifest.digest),
            image.manifest_bytes
        );
    }

    // Second round: everything from the cache.
    let got = pull(&proxy, "library/multi:1", out.path(), "all2", &["--all"]).await;
    assert_eq!(got, upstream_index);
    let got = pull(
        &proxy,
        "hub/library/multi:1",
        out.path(),
        "arm2",
        &["--override-arch", "arm64"],
    )
    .await;
    assert_eq!(got, arm.manifest.digest);
    assert_eq!(
        hub.blob_gets().await,
        once_each(&[&multi]),
        "second pulls fetch no blob upstream; each blob fetched once overall"
    );
    assert!(proxy.wait_idle().await);
    let cached = proxy.cached_blobs();
    for d in once_each(&[&multi]).keys() {
        assert!(cached.contains(d), "{d} cached: {cached:?}");
    }
    assert_one_token_per_scope(&hub, &proxy, &["repository:library/multi:pull"]);
    eprintln!(
        "skopeo_multi_arch_per_platform_and_whole_index took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_concurrent_pulls_share_tokens_and_blob_fetches() {
    let started = Instant::now();
    let hub = Hub::start().await.unwrap();
    let hello1 = image::single_arch("1").unwrap();
    let hello2 =
        image::single_arch_with_layers("2", &[Layer::deterministic(200 * 1024, 3)]).unwrap();
    let multi = image::multi_arch("1").unwrap();
    hub.push(&hello1, "library/hello:1").await.unwrap();
    hub.push(&hello2, "library/hello:2").await.unwrap();
    hub.push(&multi, "library/multi:1").await.unwrap();
    hub.token.reset_counts();

    let proxy = Proxy::start(&hub.url()).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    // Three cold pulls at once; the busybox layer is in all three images and both
    // repositories, config and tokens are wanted concurrently.
    let (a, b, c) = tokio::join!(
        pull(&proxy, "hello:1", out.path(), "a", &[]),
        pull(&proxy, "library/hello:2", out.path(), "b", &[]),
        pull(&proxy, "hub/library/multi:1", out.path(), "c", &["--all"]),
    );
    assert_eq!(
        (a.as_str(), b.as_str(), c.as_str()),
        (hello1.digest(), hello2.digest(), multi.digest())
    );
    let all = once_each(&[&hello1, &hello2, &multi]);
    assert_eq!(
        hub.blob_gets().await,
        all,
        "each distinct blob fetched from upstream exactly once"
    );
    // And again, concurrently: nothing new upstream, no new token.
    let (a, b, c) = tokio::join!(
        pull(&proxy, "library/hello:1", out.path(), "a2", &[]),
        pull(&proxy, "hello:2", out.path(), "b2", &[]),
        pull(&proxy, "multi:1", out.path(), "c2", &["--all"]),
    );
    assert_eq!(
        (a.as_str(), b.as_str(), c.as_str()),
        (hello1.digest(), hello2.digest(), multi.digest())
    );
    assert_eq!(hub.blob_gets().await, all);
    assert_one_token_per_scope(
        &hub,
        &proxy,
        &[
            "repository:library/hello:pull",
            "repository:library/multi:pull",
        ],
    );
    eprintln!(
        "skopeo_concurrent_pulls_share_tokens_and_blob_fetches took {:?}",
        started.elapsed()
    );
}
