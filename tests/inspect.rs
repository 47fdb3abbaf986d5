//! `regcache ls` and `regcache stats` on a cache filled by real pulls through regcache, read
//! by the binary while no server runs.

mod fake;

use fake::*;
use regcache::media::OCI_MANIFEST;

fn run(cache: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
        .env_remove("REGCACHE_CONFIG")
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_and_stats_report_what_pulls_cached() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    let layers = [blob_of(300_000, 1), blob_of(200_000, 2)];
    let image = push_image(&up, "team/app", "1.0", &layers, OCI_MANIFEST);
    let r = client()
        .get(proxy.url("/v2/team/app/manifests/1.0"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Only the first layer is pulled: the image is listed as incomplete.
    for d in [&image.config, &image.layers[0]] {
        let r = client()
            .get(proxy.url(&format!("/v2/team/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        r.bytes().await.unwrap();
    }
    let dir = proxy.dir.clone();
    proxy.stop().await;
    let cache = dir.path();

    let table = run(cache, &["ls"]);
    let line = table
        .lines()
        .find(|l| l.starts_with("up/team/app"))
        .unwrap_or_else(|| panic!("no row for the image in:\n{table}"));
    assert!(line.contains("1.0"), "{line}");
    assert!(line.contains(&image.manifest_digest[..19]), "{line}");
    assert!(line.contains("(1 missing)"), "{line}");

    let rows: serde_json::Value = serde_json::from_str(&run(cache, &["ls", "--json"])).unwrap();
    let row = &rows[0];
    assert_eq!(row["repository"], "team/app");
    assert_eq!(row["digest"], image.manifest_digest.as_str());
    let config_len = std::fs::metadata(
        cache
            .join("blobs/sha256")
            .join(&image.config[7..9])
            .join(&image.config[7..]),
    )
    .unwrap()
    .len();
    let manifest_file = (OCI_MANIFEST.len() + 1 + image.manifest.len()) as u64;
    assert_eq!(row["size"], manifest_file + config_len + 300_000);
    assert_eq!(row["missing"], 1);

    let stats: serde_json::Value = serde_json::from_str(&run(cache, &["stats", "--json"])).unwrap();
    assert_eq!(stats["blobs"], 2);
    assert_eq!(stats["blob_bytes"], config_len + 300_000);
    assert_eq!(stats["manifests"], 1);
    assert_eq!(stats["repositories"], 1);
    let text = run(cache, &["stats"]);
    assert!(text.contains("blobs:         2"), "{text}");
}
