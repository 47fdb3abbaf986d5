//! Owns the container image test: the Dockerfile is built for real, by the classic builder of Debian's docker.io, from the host binary with a debootstrapped Debian base lending its C libraries; the image is run as a non-root container in front of a real registry, pulled through with skopeo and dockerd, and its HEALTHCHECK must turn it healthy.
//!
//! No base image can be pulled here: the base is the host's Debian release made with
//! debootstrap ([`support::debian`], cached between runs) and `docker import`ed into a
//! private, plain `dockerd`. The build runs with no network at all. The container runs with
//! host networking to reach the loopback registry, a read-only root file system and no
//! capabilities (what `deploy/kubernetes` asks for), its cache in a named volume, its port
//! set only in its configuration file (named by REGCACHE_CONFIG).
//!
//! The image holds the binary this test was built with (a debug build under `cargo test`),
//! or the one `REGCACHE_IMAGE_BINARY` names (`.ci/test` passes the release binary): the size
//! of everything besides the binary is checked always, the whole image's size (at most
//! 40 MiB) when the binary is a release build.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use support::debian;
use support::image::{self, HELLO};
use support::peers::{Dockerd, require_binaries, require_peer, require_root, run_ok};
use support::registry::{Registry, RegistryAuth};

/// The image's cache directory and volume.
const CACHE_DIR: &str = "/var/cache/regcache";
/// Where the test mounts the configuration file.
const CONFIG_PATH: &str = "/etc/regcache/regcache.toml";
/// The user the image runs as.
const UID: &str = "10001";
/// The runtime image's size target with a release binary.
const IMAGE_MAX: u64 = 40 << 20;
/// The release binary's size target; the rest of the image gets what is left.
const BINARY_MAX: u64 = 25 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_image_runs_as_non_root_and_serves_pulls() {
    let started = Instant::now();
    require_peer!(require_root());
    require_peer!(require_binaries(&["docker-registry", "skopeo"]));
    let release = require_peer!(debian::host_debian_release());
    let base_tar = require_peer!(debian::base_rootfs_tar(&release).await);
    eprintln!("base root file system ready after {:?}", started.elapsed());
    let docker = require_peer!(Dockerd::start(&[], &[]).await);
    // Declared after the daemon, so it is dropped (and cleans up) before the daemon stops.
    let mut cleanup = DockerCleanup::new(&docker);

    let binary = image_binary();
    let image = build_runtime_image(&docker, &mut cleanup, &release, &base_tar, &binary).await;
    check_image_config(&docker, &image).await;
    check_image_size(&docker, &image, &binary).await;
    eprintln!("image built after {:?}", started.elapsed());

    // The upstream: a real registry holding a runnable image.
    let mut registry = Registry::start(RegistryAuth::None).await.unwrap();
    let hello = image::single_arch("1").unwrap();
    image::push(&hello, &format!("{}/team/hello:1", registry.host()), None)
        .await
        .unwrap();
    let manifest = hello.digest().to_string();
    let img = &hello.images[0];
    let blobs = [img.config.digest.clone(), img.layers[0].digest.clone()];

    let launch = Launch::new(&docker, &mut cleanup, &image, &registry.url());
    let first = launch.start(&mut cleanup, "a").await;
    eprintln!("container serving after {:?}", started.elapsed());
    assert_runs_as_non_root(&docker, &first).await;

    // skopeo through the container: the upstream's manifest digest, each blob fetched once.
    let pulled = tempfile::tempdir().unwrap();
    let reference = format!("{}/team/hello:1", launch.addr);
    let digests = image::skopeo_pull(&reference, &pulled.path().join("layout"), &[])
        .await
        .unwrap();
    assert_eq!(
        digests,
        [manifest.as_str()],
        "skopeo got the upstream manifest"
    );
    registry.settle_log().await;
    for blob in &blobs {
        assert_eq!(registry.blob_get_count(blob), 1, "{blob} fetched once");
    }

    // dockerd through the container, then it runs what it pulled: served from the cache.
    docker.docker_ok(&["pull", &reference]).await.unwrap();
    cleanup.images.push(reference.clone());
    let repo_digests = docker
        .docker_ok(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            &reference,
        ])
        .await
        .unwrap();
    assert!(
        repo_digests.contains(&manifest),
        "dockerd kept the manifest digest {manifest}: {repo_digests}"
    );
    let out = docker
        .docker_ok(&["run", "--rm", "--network", "none", &reference])
        .await
        .unwrap();
    assert_eq!(out.trim(), HELLO);
    registry.settle_log().await;
    for blob in &blobs {
        assert_eq!(
            registry.blob_get_count(blob),
            1,
            "{blob} served from the cache"
        );
    }
    assert_cached_in_volume(&docker, &launch.volume, &blobs).await;
    check_health(&docker, &first, &launch.addr).await;

    // SIGTERM to regcache as PID 1 ends it cleanly; a new container on the same volume
    // serves the cached image with the upstream gone.
    docker
        .docker_ok(&["stop", "--time", "30", &first])
        .await
        .unwrap();
    assert_eq!(inspect(&docker, &first, "{{.State.ExitCode}}").await, "0");
    registry.stop();
    launch.start(&mut cleanup, "b").await;
    let by_digest = format!("{}/team/hello@{manifest}", launch.addr);
    let again = image::skopeo_pull(&by_digest, &pulled.path().join("again"), &[])
        .await
        .unwrap();
    assert_eq!(again, [manifest.as_str()], "served from the volume");

    cleanup.run();
    let left = docker.docker_ok(&["ps", "--all", "--quiet"]).await.unwrap();
    assert_eq!(left.trim(), "", "no containers left");
    let left = docker.docker_ok(&["images", "--quiet"]).await.unwrap();
    assert_eq!(left.trim(), "", "no images left");
    let left = docker
        .docker_ok(&["volume", "ls", "--quiet"])
        .await
        .unwrap();
    assert_eq!(left.trim(), "", "no volumes left");
    eprintln!(
        "runtime_image_runs_as_non_root_and_serves_pulls took {:?}",
        started.elapsed()
    );
}

/// The binary to put in the image: `REGCACHE_IMAGE_BINARY`, else this build's regcache.
fn image_binary() -> PathBuf {
    match std::env::var_os("REGCACHE_IMAGE_BINARY") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(path.is_file(), "REGCACHE_IMAGE_BINARY {}", path.display());
            path
        }
        None => PathBuf::from(env!("CARGO_BIN_EXE_regcache")),
    }
}

/// Imports the Debian base and builds the Dockerfile's default target from `binary` with
/// the classic builder (`DOCKER_BUILDKIT=0`, as Debian's docker.io without buildx) and
/// `--network none`. Returns the image's tag.
async fn build_runtime_image(
    docker: &Dockerd,
    cleanup: &mut DockerCleanup<'_>,
    release: &str,
    base_tar: &Path,
    binary: &Path,
) -> String {
    let base = format!("regcache-test/debian:{release}");
    let tag = "regcache-test/runtime:latest".to_string();
    cleanup.images.push(base.clone());
    cleanup.images.push(tag.clone());
    docker
        .docker_ok(&["import", &base_tar.to_string_lossy(), &base])
        .await
        .unwrap();
    let context = tempfile::Builder::new()
        .prefix("regcache-image-context-")
        .tempdir()
        .unwrap();
    let in_context = context.path().join("regcache");
    if fs::hard_link(binary, &in_context).is_err() {
        fs::copy(binary, &in_context).unwrap();
    }
    let mut build = docker.docker_cmd();
    build.env("DOCKER_BUILDKIT", "0").args([
        "build",
        "--network",
        "none",
        "--file",
        &repo().join("Dockerfile").to_string_lossy(),
        "--build-arg",
        &format!("RUNTIME_IMAGE={base}"),
        "--build-arg",
        "BINARY=regcache",
        "--tag",
        &tag,
        &context.path().to_string_lossy(),
    ]);
    run_ok(&mut build, Duration::from_secs(300)).await.unwrap();
    tag
}

/// Checks what the image declares: user, volume, port, entry point, cache dir, and a health
/// check that is regcache's own command.
async fn check_image_config(docker: &Dockerd, image: &str) {
    let out = docker
        .docker_ok(&["image", "inspect", "--format", "{{json .Config}}", image])
        .await
        .unwrap();
    let config: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        config["User"],
        format!("{UID}:{UID}"),
        "numeric non-root user"
    );
    assert!(config["Volumes"].get(CACHE_DIR).is_some(), "{config:#}");
    assert!(
        config["ExposedPorts"].get("5000/tcp").is_some(),
        "{config:#}"
    );
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/regcache"])
    );
    let cache_env = format!("REGCACHE_CACHE_DIR={CACHE_DIR}");
    assert!(
        config["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| *e == cache_env.as_str()),
        "{config:#}"
    );
    let test = &config["Healthcheck"]["Test"];
    let test: Vec<&str> = test
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        test[..3],
        ["CMD", "/usr/local/bin/regcache", "healthcheck"],
        "HEALTHCHECK runs regcache healthcheck: {test:?}"
    );
}

/// The image is the binary plus at most `IMAGE_MAX - BINARY_MAX` of everything else; with a
/// release binary, at most `IMAGE_MAX` in all.
async fn check_image_size(docker: &Dockerd, image: &str, binary: &Path) {
    let size: u64 = docker
        .docker_ok(&["image", "inspect", "--format", "{{.Size}}", image])
        .await
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let binary_size = fs::metadata(binary).unwrap().len();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "image {:.1} MiB: binary {} {:.1} MiB, the rest {:.1} MiB",
        mib(size),
        binary.display(),
        mib(binary_size),
        mib(size.saturating_sub(binary_size))
    );
    assert!(
        size.saturating_sub(binary_size) <= IMAGE_MAX - BINARY_MAX,
        "the image besides the binary is {:.1} MiB",
        mib(size - binary_size)
    );
    if binary_size <= BINARY_MAX {
        assert!(size <= IMAGE_MAX, "image {:.1} MiB", mib(size));
    } else if std::env::var_os("REGCACHE_IMAGE_BINARY").is_some() {
        panic!(
            "the release binary is {:.1} MiB, over {} MiB",
            mib(binary_size),
            BINARY_MAX >> 20
        );
    } else {
        eprintln!(
            "note: a {:.0} MiB test build is in the image; the 40 MiB total is checked with \
             REGCACHE_IMAGE_BINARY=target/release/regcache",
            mib(binary_size)
        );
    }
}

/// How the test runs the image: as the README says (named cache volume, config mounted and
/// named by REGCACHE_CONFIG), plus a read-only root file system, no capabilities and no
/// privilege escalation. Host networking reaches the loopback registry; the listen address
/// is in the config file only, where the health check must find it too.
struct Launch<'a> {
    docker: &'a Dockerd,
    image: String,
    volume: String,
    addr: String,
    _config_dir: tempfile::TempDir,
    config_file: PathBuf,
}

impl<'a> Launch<'a> {
    fn new(
        docker: &'a Dockerd,
        cleanup: &mut DockerCleanup<'_>,
        image: &str,
        upstream: &str,
    ) -> Launch<'a> {
        let dir = tempfile::Builder::new()
            .prefix("regcache-image-config-")
            .tempdir()
            .unwrap();
        let config_file = dir.path().join("regcache.toml");
        let addr = format!("127.0.0.1:{}", support::peers::free_port());
        fs::write(
            &config_file,
            format!(
                "listen = \"{addr}\"\ndefault_upstream = \"local\"\n\n[[upstream]]\nname = \"local\"\nurl = \"{upstream}\"\n"
            ),
        )
        .unwrap();
        let volume = format!("regcache-test-cache-{}", std::process::id());
        cleanup.volumes.push(volume.clone());
        Launch {
            docker,
            image: image.to_string(),
            volume,
            addr,
            _config_dir: dir,
            config_file,
        }
    }

    /// Starts container `regcache-test-<pid>-<suffix>` and waits until it serves `/v2/`.
    async fn start(&self, cleanup: &mut DockerCleanup<'_>, suffix: &str) -> String {
        let name = format!("regcache-test-{}-{suffix}", std::process::id());
        cleanup.containers.push(name.clone());
        self.docker
            .docker_ok(&[
                "run",
                "--detach",
                "--name",
                &name,
                "--network",
                "host",
                "--read-only",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "--volume",
                &format!("{}:{CACHE_DIR}", self.volume),
                "--volume",
                &format!("{}:{CONFIG_PATH}:ro", self.config_file.display()),
                "--env",
                &format!("REGCACHE_CONFIG={CONFIG_PATH}"),
                "--health-interval",
                "1s",
                &self.image,
            ])
            .await
            .unwrap();
        self.wait_for_v2(&name).await;
        name
    }

    /// Waits (≤ 30 s) until `GET /v2/` answers 200; fails with the container's log when it
    /// exits or never answers.
    async fn wait_for_v2(&self, container: &str) {
        let url = format!("http://{}/v2/", self.addr);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_status(&url).await == Some(200) {
                return;
            }
            let state = inspect(self.docker, container, "{{.State.Status}}").await;
            if state != "running" || Instant::now() > deadline {
                let logs = self.docker.docker(&["logs", container]).await.unwrap();
                panic!(
                    "container {container} is {state} and {url} does not answer 200; log:\n{}{}",
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The configured user, and the real, effective, saved and file-system ids of regcache's
/// own process as the host kernel sees them (the image has no shell to ask inside).
async fn assert_runs_as_non_root(docker: &Dockerd, container: &str) {
    let user = inspect(docker, container, "{{.Config.User}}").await;
    assert_eq!(user, format!("{UID}:{UID}"));
    let pid = inspect(docker, container, "{{.State.Pid}}").await;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for field in ["Uid:", "Gid:"] {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        let ids: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert_eq!(ids, [UID; 4], "regcache's {line}");
    }
}

/// The blobs are committed in the named volume, owned by the image's user.
async fn assert_cached_in_volume(docker: &Dockerd, volume: &str, blobs: &[String]) {
    use std::os::unix::fs::MetadataExt;
    let mountpoint = docker
        .docker_ok(&["volume", "inspect", "--format", "{{.Mountpoint}}", volume])
        .await
        .unwrap();
    let mountpoint = PathBuf::from(mountpoint.trim());
    for blob in blobs {
        let hex = blob.strip_prefix("sha256:").unwrap();
        let path = mountpoint.join("blobs/sha256").join(&hex[..2]).join(hex);
        // Committed right after the last byte is served: wait (≤ 10 s) for the rename.
        let deadline = Instant::now() + Duration::from_secs(10);
        let meta = loop {
            if let Ok(meta) = fs::metadata(&path) {
                break meta;
            }
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(meta.uid().to_string(), UID, "{} owner", path.display());
    }
}

/// The image's own health check: `regcache healthcheck` run inside finds the port in the
/// config file and says so, and dockerd's HEALTHCHECK turns the container healthy.
async fn check_health(docker: &Dockerd, container: &str, addr: &str) {
    let out = docker
        .docker(&["exec", container, "/usr/local/bin/regcache", "healthcheck"])
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "healthcheck in the container: {out:?}"
    );
    assert_eq!(
        said.trim(),
        format!("healthy: http://{addr}/healthz answered 200")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = inspect(docker, container, "{{json .State.Health}}").await;
        let state: Value = serde_json::from_str(&health).unwrap();
        if state["Status"] == "healthy" {
            let log = state["Log"].as_array().unwrap();
            let last = &log[log.len() - 1];
            assert_eq!(last["ExitCode"], 0, "{health}");
            assert!(
                last["Output"]
                    .as_str()
                    .unwrap()
                    .contains("healthy: http://"),
                "{health}"
            );
            return;
        }
        assert!(Instant::now() < deadline, "never healthy: {health}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes the test's containers, volumes and images from its dockerd, also when the test
/// fails half-way.
struct DockerCleanup<'a> {
    docker: &'a Dockerd,
    containers: Vec<String>,
    volumes: Vec<String>,
    images: Vec<String>,
}

impl<'a> DockerCleanup<'a> {
    fn new(docker: &'a Dockerd) -> Self {
        DockerCleanup {
            docker,
            containers: Vec::new(),
            volumes: Vec::new(),
            images: Vec::new(),
        }
    }

    /// Containers first (they hold the volume and the images), then volumes, then images,
    /// then the untagged stage images a build left.
    fn run(&mut self) {
        let batches = [
            (
                vec!["rm", "--force", "--volumes"],
                std::mem::take(&mut self.containers),
            ),
            (
                vec!["volume", "rm", "--force"],
                std::mem::take(&mut self.volumes),
            ),
            (vec!["rmi", "--force"], std::mem::take(&mut self.images)),
        ];
        for (command, names) in batches {
            if names.is_empty() {
                continue;
            }
            let status = self
                .docker
                .docker_blocking_cmd()
                .args(command)
                .args(&names)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("clean-up of {names:?} did not succeed: {status:?}");
            }
        }
        // The classic builder keeps each finished stage (`rootfs`) as an untagged image.
        let status = self
            .docker
            .docker_blocking_cmd()
            .args(["image", "prune", "--force"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("clean-up of untagged images did not succeed: {status:?}");
        }
    }
}

impl Drop for DockerCleanup<'_> {
    fn drop(&mut self) {
        self.run();
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `docker inspect --format FORMAT container`, trimmed.
async fn inspect(docker: &Dockerd, container: &str, format: &str) -> String {
    docker
        .docker_ok(&["inspect", "--format", format, container])
        .await
        .unwrap()
        .trim()
        .to_string()
}

/// Status of a plain GET, or `None` when nothing answers.
async fn http_status(url: &str) -> Option<u16> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}
