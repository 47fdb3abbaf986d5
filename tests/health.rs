//! Owns the `/healthz` and `/readyz` tests: alive always; ready while the cache takes a test
//! write (503 when its staging folder is gone or its filesystem turned read-only); each
//! upstream's state reported, a down upstream never making regcache unready.

mod fake;

use std::path::{Path, PathBuf};
use std::process::Command;

use fake::*;
use serde_json::Value;

async fn get_json(url: &str) -> (u16, Value) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    assert_eq!(
        r.headers()["content-type"],
        "application/json",
        "{url} answers JSON"
    );
    (status, r.json().await.unwrap())
}

fn upstream<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {report}"))
}

#[tokio::test]
async fn healthz_is_alive_and_readyz_reports_upstreams_without_depending_on_them() {
    let up = FakeUpstream::start().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = config_for(&up.url());
    cfg.upstreams.push(regcache::config::UpstreamConfig::new(
        "gone",
        format!("http://{dead}").parse().unwrap(),
    ));
    cfg.timeouts.connect = regcache::units::HumanDuration(std::time::Duration::from_secs(2));
    let proxy = Proxy::start(cfg).await;

    let (status, body) = get_json(&proxy.url("/healthz")).await;
    assert_eq!((status, body), (200, serde_json::json!({"status": "ok"})));

    let (status, report) = get_json(&proxy.url("/readyz")).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["status"], "ready");
    assert_eq!(report["cache"]["writable"], true);
    assert_eq!(
        upstream(&report, "up")["state"],
        "unknown",
        "never asked yet"
    );
    assert_eq!(upstream(&report, "gone")["reachable"], Value::Null);

    // One pull through each upstream: the fake answers, the other cannot be reached.
    let img = push_image(
        &up,
        "team/app",
        "1",
        &[blob_of(100, 1)],
        "application/vnd.oci.image.manifest.v1+json",
    );
    let r = client()
        .get(proxy.url("/v2/team/app/manifests/1"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(proxy.url(&format!("/v2/gone/team/app/blobs/{}", img.layers[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);

    let (status, report) = get_json(&proxy.url("/readyz")).await;
    assert_eq!(
        status, 200,
        "a down upstream does not make regcache unready: {report}"
    );
    let ok = upstream(&report, "up");
    assert_eq!(ok["state"], "up", "{ok}");
    assert_eq!(ok["reachable"], true);
    assert_eq!(ok["last_status"], 200);
    assert!(ok["last_success_unix"].as_f64().unwrap() > 1.6e9, "{ok}");
    assert_eq!(ok["last_error"], Value::Null);
    let down = upstream(&report, "gone");
    assert_eq!(down["state"], "down", "{down}");
    assert_eq!(down["reachable"], false);
    assert_eq!(down["last_success_unix"], Value::Null);
    let error = down["last_error"].as_str().unwrap();
    assert!(error.contains("unreachable"), "{error}");
    assert!(down["last_error_age_seconds"].as_f64().unwrap() >= 0.0);

    // HEAD answers the same status without a body.
    let r = client().head(proxy.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn readyz_is_503_while_the_cache_cannot_take_a_write() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    let tmp = proxy.dir.path().join("tmp");
    assert_eq!(get_json(&proxy.url("/readyz")).await.0, 200);
    // Where downloads are staged is now a file: nothing can be written there (root or not).
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a folder").unwrap();
    let (status, report) = get_json(&proxy.url("/readyz")).await;
    assert_eq!(status, 503, "{report}");
    assert_eq!(report["status"], "unready");
    assert_eq!(report["cache"]["writable"], false);
    let error = report["cache"]["error"].as_str().unwrap();
    assert!(error.contains("Not a directory"), "{error}");
    assert!(
        !error.contains(proxy.dir.path().to_str().unwrap()),
        "no path in {error}"
    );
    // Alive all the same.
    assert_eq!(get_json(&proxy.url("/healthz")).await.0, 200);
    // Repaired: ready again, and the check leaves nothing behind.
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    assert_eq!(get_json(&proxy.url("/readyz")).await.0, 200);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
}

/// A tmpfs mounted for one test and lazily unmounted when dropped (also on panic).
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount() -> Result<Tmpfs, String> {
        let parent = tempfile::tempdir().map_err(|e| e.to_string())?;
        let dir = parent.path().join("cache");
        std::fs::create_dir(&dir).map_err(|e| e.to_string())?;
        run(
            "mount",
            &["-t", "tmpfs", "-o", "size=16m", "tmpfs", path(&dir)],
        )?;
        Ok(Tmpfs {
            dir,
            _parent: parent,
        })
    }

    fn remount(&self, mode: &str) -> Result<(), String> {
        run(
            "mount",
            &["-o", &format!("remount,{mode}"), path(&self.dir)],
        )
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", path(&self.dir)]);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[tokio::test]
async fn readyz_is_503_when_the_cache_filesystem_turns_read_only() {
    let fs = match Tmpfs::mount() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!(
                "SKIPPED readyz_is_503_when_the_cache_filesystem_turns_read_only: cannot mount a tmpfs here ({why})"
            );
            return;
        }
    };
    let up = FakeUpstream::start().await;
    let mut cfg = config_for(&up.url());
    cfg.cache_dir = fs.dir.clone();
    let proxy = Proxy::start(cfg).await;
    assert_eq!(get_json(&proxy.url("/readyz")).await.0, 200);
    fs.remount("ro").unwrap();
    let (status, report) = get_json(&proxy.url("/readyz")).await;
    assert_eq!(status, 503, "{report}");
    let error = report["cache"]["error"].as_str().unwrap();
    assert!(error.contains("Read-only file system"), "{error}");
    fs.remount("rw").unwrap();
    assert_eq!(get_json(&proxy.url("/readyz")).await.0, 200);
    proxy.stop().await;
}
