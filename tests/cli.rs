//! The `regcache` binary: embedded defaults, config errors naming the key, env overrides,
//! options after the command, `check-config`, log colours only on a terminal, the open-file
//! limit raised at start, and graceful shutdown on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn regcache() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_regcache"));
    c.env_remove("REGCACHE_CONFIG")
        .env_remove("REGCACHE_LISTEN")
        .env_remove("REGCACHE_CACHE_DIR")
        .env_remove("REGCACHE_LOG_FORMAT");
    c
}

#[test]
fn an_invalid_config_fails_at_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[upstream]]\nname = \"x\"\nurl = \"gopher://h\"\n",
            "upstream[0].url",
        ),
        ("[cache]\ntag_ttl = \"soon\"\n", "tag_ttl"),
        ("listen_addr = \"0.0.0.0:1\"\n", "listen_addr"),
        ("default_upstream = \"nope\"\n", "default_upstream"),
    ];
    for (text, key) in cases {
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, text).unwrap();
        let out = regcache().arg("--config").arg(&f).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{key} not named in: {err}");
    }
    let out = regcache()
        .args(["--config", "/nonexistent/regcache.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/regcache.toml"));
}

#[test]
fn no_arguments_runs_the_embedded_default_and_sigterm_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    // Only the listen address is overridden (by environment), to keep the port OS-chosen.
    let mut child = regcache()
        .current_dir(dir.path())
        .env("REGCACHE_LISTEN", "127.0.0.1:0")
        .env("REGCACHE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready: serde_json::Value = loop {
        let line = lines.next().expect("exited before ready").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "regcache ready" {
            break v;
        }
    };
    assert_eq!(ready["default_upstream"], "docker.io");
    assert!(
        ready["upstreams"]
            .as_str()
            .unwrap()
            .contains("docker.io=https://registry-1.docker.io/")
    );
    assert_eq!(ready["cache_dir"], "regcache-data");
    assert!(dir.path().join("regcache-data/blobs").is_dir());
    let addr = ready["listen"].as_str().unwrap().to_owned();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("docker-distribution-api-version: registry/2.0")
    );

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM received")),
        "{rest:?}"
    );
}

#[test]
fn gc_removes_what_was_unused_for_long_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let blobs = cache.join("blobs/sha256/ab");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(cache.join("tmp")).unwrap();
    let old = blobs.join(format!("ab{}", "0".repeat(62)));
    let new = blobs.join(format!("ab{}", "1".repeat(62)));
    std::fs::write(&old, vec![0u8; 1000]).unwrap();
    std::fs::write(&new, vec![0u8; 10]).unwrap();
    // A download another regcache has under way must survive a gc run.
    std::fs::write(cache.join("tmp/in-progress.part"), b"x").unwrap();
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 86400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    let out = regcache()
        .args([
            "--cache-dir",
            cache.to_str().unwrap(),
            "gc",
            "--max-age",
            "30d",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("removed 1 file unused for 30d, freed 1000 B, kept 1 file"),
        "{text}"
    );
    assert!(!old.exists() && new.exists());
    assert!(cache.join("tmp/in-progress.part").exists());
    // Not a cache folder: a clear error, not a new folder.
    let out = regcache()
        .args([
            "--cache-dir",
            dir.path().join("nope").to_str().unwrap(),
            "gc",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!dir.path().join("nope").exists());
}

#[test]
fn gc_removes_tag_records_whose_manifest_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    for d in ["blobs", "manifests", "tmp"] {
        std::fs::create_dir_all(cache.join(d)).unwrap();
    }
    let hex = "c".repeat(64);
    let manifest = cache.join("manifests/sha256/cc").join(&hex);
    std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
    std::fs::write(&manifest, b"application/vnd.oci.image.manifest.v1+json\n{}").unwrap();
    let tags = cache.join("tags/up/team/app/_tags");
    std::fs::create_dir_all(&tags).unwrap();
    let kept = tags.join("1@1f");
    let dangling = tags.join("2@1f");
    std::fs::write(
        &kept,
        format!("sha256:{hex} application/vnd.oci.image.manifest.v1+json\n"),
    )
    .unwrap();
    std::fs::write(
        &dangling,
        format!(
            "sha256:{} application/vnd.oci.image.manifest.v1+json\n",
            "d".repeat(64)
        ),
    )
    .unwrap();
    // Options after the command, as well as before it.
    let out = regcache()
        .args(["gc", "--cache-dir", cache.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("removed 0 files unused for 30d, freed 0 B, kept 1 file; removed 1 tag record whose manifest was gone"),
        "{text}"
    );
    assert!(kept.exists() && !dangling.exists());
    let out = regcache()
        .args(["ls", "--cache-dir", cache.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tags: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags, ["1"]);
}

#[test]
fn check_config_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, "file-secret-4711\n").unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let hash = bcrypt::hash("pw", 4).unwrap();
    std::fs::write(&htpasswd, format!("alice:{hash}\n")).unwrap();
    let token_hash = "0123456789abcdef".repeat(4);
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        format!(
            r#"default_upstream = "mine"
[auth]
htpasswd = "{}"
[[auth.token]]
name = "ci"
token_sha256 = "{token_hash}"
[[upstream]]
name = "mine"
url = "https://registry.example"
username = "robot"
password = "inline-secret-0815"
[[upstream]]
name = "other"
url = "https://other.example"
username = "robot"
password_file = "{}"
"#,
            htpasswd.display(),
            password_file.display()
        ),
    )
    .unwrap();
    let out = regcache()
        .args(["check-config", "-c", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for secret in [
        "inline-secret-0815",
        "file-secret-4711",
        &token_hash,
        &hash[7..],
    ] {
        assert!(!text.contains(secret), "{secret} printed: {text}");
    }
    assert!(text.contains("password = \"<redacted>\""), "{text}");
    assert!(text.contains("token_sha256 = \"<redacted>\""), "{text}");
    assert!(text.contains(&format!("password_file = \"{}\"", password_file.display())));
    // Defaults are filled in.
    let shown: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(shown["timeouts"]["connect"].as_str(), Some("10s"), "{text}");
    assert_eq!(
        shown["retry"]["probe_backoff"].as_str(),
        Some("5s"),
        "{text}"
    );

    // What start-up would refuse is refused with exit code 2, naming the key.
    std::fs::remove_file(&password_file).unwrap();
    let out = regcache()
        .args(["check-config", "-c", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstream[1].password_file"), "{err}");
    std::fs::write(&f, "[cache]\ntag_ttl = \"soon\"\n").unwrap();
    let out = regcache()
        .args(["check-config", "-c", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tag_ttl"));
}

#[test]
fn pretty_logs_are_not_coloured_when_not_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = regcache()
        .current_dir(dir.path())
        .env("REGCACHE_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = loop {
        let line = lines.next().expect("exited before ready").unwrap();
        if line.contains("regcache ready") {
            break line;
        }
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert!(!ready.contains('\x1b'), "colour codes in a pipe: {ready:?}");
    assert!(ready.contains(" INFO "), "{ready}");
}

/// Starts the server under `sh -c "<limits>; exec regcache …"` with an upstream at a dead
/// loopback port; returns its JSON log lines up to `regcache ready`.
fn lines_until_ready(limits: &str) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ncache_dir = {:?}\ndefault_upstream = \"up\"\n\
             [[upstream]]\nname = \"up\"\nurl = \"http://127.0.0.1:9\"\n",
            dir.path().join("cache")
        ),
    )
    .unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("{limits} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_regcache"))
        .args(["--log-format", "json", "--config"])
        .arg(&config)
        .env_remove("REGCACHE_CONFIG")
        .env_remove("REGCACHE_LISTEN")
        .env_remove("REGCACHE_CACHE_DIR")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let ready = v["message"] == "regcache ready";
        seen.push(v);
        if ready {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.last()
            .is_some_and(|v| v["message"] == "regcache ready"),
        "never ready: {seen:?}"
    );
    seen
}

#[test]
fn the_soft_open_file_limit_is_raised_and_a_short_hard_limit_is_named() {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    match hard {
        Some(h) if h > 1024 => {
            let lines = lines_until_ready("ulimit -Sn 1024");
            let raised = lines
                .iter()
                .find(|v| v["message"] == "open-file limit raised to the hard limit")
                .unwrap_or_else(|| panic!("no line says the limit was raised: {lines:?}"));
            assert_eq!(raised["from"], "Some(1024)");
            assert_eq!(raised["to"], format!("Some({h})"));
        }
        _ => println!("SKIPPED raising the soft limit: the hard open-file limit is {hard:?}"),
    }
    // A hard limit of 1000 cannot hold the default 8192 connections: said, naming the key.
    if hard.is_some_and(|h| h < 1000) {
        println!("SKIPPED the short-limit warning: the hard open-file limit is {hard:?}");
        return;
    }
    let lines = lines_until_ready("ulimit -n 1000");
    let warned = lines
        .iter()
        .find(|v| v["level"] == "WARN" && v["max_connections"] == 8192)
        .unwrap_or_else(|| panic!("no warning about the limit: {lines:?}"));
    assert_eq!(warned["open_files"], "Some(1000)");
    assert!(
        warned["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_connections")
    );
    assert!(
        !lines
            .iter()
            .any(|v| v["message"] == "open-file limit raised to the hard limit")
    );
}
