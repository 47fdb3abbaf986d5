//! Owns the Debian base root file system for image tests: the host's release, the mirror apt uses, and a `debootstrap --variant=minbase` kept as a tar between runs.
//!
//! No base image can be pulled on the test machine, so image tests `docker import` this tar.
//! It is the host's own release because the host-built regcache links against the host's
//! glibc. The tar lives under `CARGO_TARGET_TMPDIR/test-cache/`: only the first run
//! downloads (about 40 MB from the mirror, a minute and a half here), later runs reuse it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};

use super::peers::{Skip, require_binaries, require_root, run_ok, tail_file, unmount_under};

/// Longest a first-run debootstrap may take.
const DEBOOTSTRAP_LIMIT: Duration = Duration::from_secs(600);

/// The host's Debian codename (`bookworm`). `Err(Skip)` on another distribution: no
/// debootstrapped base would match the host binary's glibc.
pub fn host_debian_release() -> Result<String, Skip> {
    let text = fs::read_to_string("/etc/os-release")
        .map_err(|e| Skip::new(format!("/etc/os-release: {e}")))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim_matches('"').to_string())
    };
    match (field("ID="), field("VERSION_CODENAME=")) {
        (Some(id), Some(codename)) if id == "debian" && !codename.is_empty() => Ok(codename),
        (id, _) => Err(Skip::new(format!(
            "host is {id:?}, not Debian: no debootstrapped base would match the host binary's glibc"
        ))),
    }
}

/// The mirror apt uses for `release` (deb822 `.sources` or one-line `.list` entries), else
/// Debian's default.
pub fn debian_mirror(release: &str) -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    let usable = |uri: &str| {
        ["http://", "https://", "file:/"]
            .iter()
            .any(|scheme| uri.starts_with(scheme))
    };
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        if name.ends_with(".sources") {
            for paragraph in text.split("\n\n") {
                let fields: BTreeMap<String, String> = paragraph
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let has = |key: &str, word: &str| {
                    fields
                        .get(key)
                        .is_some_and(|v| v.split_whitespace().any(|w| w == word))
                };
                if has("types", "deb")
                    && has("suites", release)
                    && fields.get("enabled").is_none_or(|v| v != "no")
                {
                    if let Some(uri) = fields
                        .get("uris")
                        .and_then(|v| v.split_whitespace().find(|u| usable(u)))
                    {
                        return uri.to_string();
                    }
                }
            }
        } else if name.ends_with(".list") {
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or_default();
                let mut words = line.split_whitespace();
                if words.next() != Some("deb") {
                    continue;
                }
                let mut rest: Vec<&str> = words.collect();
                if rest.first().is_some_and(|w| w.starts_with('[')) {
                    let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
                    rest.drain(..=end);
                }
                if let [uri, suite, ..] = rest[..] {
                    if suite == release && usable(uri) {
                        return uri.to_string();
                    }
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// The cached `debootstrap --variant=minbase` root file system of `release` as a tar, made
/// on the first run. `Err(Skip)` when debootstrap is missing or fails (no mirror reachable).
pub async fn base_rootfs_tar(release: &str) -> Result<PathBuf, Skip> {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-cache");
    let tar = cache.join(format!("debootstrap-{release}.tar"));
    if tar.is_file() {
        return Ok(tar);
    }
    require_root()?;
    require_binaries(&["debootstrap", "tar"])?;
    fs::create_dir_all(&cache).map_err(|e| Skip::new(format!("{}: {e}", cache.display())))?;
    let work = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(&cache)
        .map_err(|e| Skip::new(format!("tempdir: {e}")))?;
    let root = work.path().join("root");
    let log = work.path().join("debootstrap.log");
    let mirror = debian_mirror(release);
    eprintln!(
        "debootstrap {release} from {mirror} (first run; cached as {})",
        tar.display()
    );
    let made = debootstrap(release, &root, &mirror, &log).await;
    // debootstrap mounts /proc and /sys inside the target; a killed run can leave them.
    let left = unmount_under(work.path());
    if !left.is_empty() {
        let kept = work.keep();
        panic!(
            "mounts left under {} ({left:?}); not removing it",
            kept.display()
        );
    }
    if let Err(e) = made {
        return Err(Skip::new(format!(
            "debootstrap of {release} from {mirror} failed: {e:#}; log tail:\n{}",
            tail_file(&log, 15)
        )));
    }
    // Package files and indexes are not needed in the base: about 80 MB less.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        if let Ok(entries) = fs::read_dir(root.join(dir)) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
    let partial = work.path().join("rootfs.tar");
    run_ok(
        tokio::process::Command::new("tar")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&partial)
            .arg("."),
        Duration::from_secs(120),
    )
    .await
    .map_err(|e| Skip::new(format!("tar of the debootstrapped root: {e:#}")))?;
    fs::rename(&partial, &tar).map_err(|e| Skip::new(format!("{}: {e}", tar.display())))?;
    Ok(tar)
}

/// `debootstrap --variant=minbase RELEASE ROOT MIRROR`, output to `log`.
async fn debootstrap(release: &str, root: &Path, mirror: &str, log: &Path) -> anyhow::Result<()> {
    let out = fs::File::create(log)?;
    let mut cmd = tokio::process::Command::new("debootstrap");
    cmd.args(["--variant=minbase", release])
        .arg(root)
        .arg(mirror)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawn debootstrap")?;
    match tokio::time::timeout(DEBOOTSTRAP_LIMIT, child.wait()).await {
        Ok(status) => {
            let status = status?;
            if !status.success() {
                bail!("debootstrap exited with {status}");
            }
            Ok(())
        }
        Err(_) => {
            child.kill().await?;
            bail!("debootstrap did not finish within {DEBOOTSTRAP_LIMIT:?}")
        }
    }
}
