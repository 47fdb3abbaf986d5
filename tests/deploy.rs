//! Owns the checks of `deploy/`: the systemd unit verifies, is sandboxed and runs regcache; the compose file and Kubernetes manifests agree with the Dockerfile and with a configuration regcache loads.
//!
//! kubectl is not available here, so the manifests are parsed (PyYAML, Debian python3-yaml)
//! and cross-checked: ports, probe paths, mount paths, user ids and sizes must match what
//! the image and regcache's configuration say.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use regcache::config::Config;
use serde_json::Value;

use support::peers::{ProcessGuard, Skip, require_binaries, tail_file};

/// Where the unit, the compose file and the manifests put the configuration file.
const CONFIG_PATH: &str = "/etc/regcache/regcache.toml";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Hard-links (or copies) the regcache binary to `to`.
fn place_binary(to: &Path) {
    let from = Path::new(env!("CARGO_BIN_EXE_regcache"));
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).unwrap();
    }
}

#[test]
fn systemd_unit_verifies_and_is_sandboxed() {
    let unit = repo().join("deploy/regcache.service");
    let text = fs::read_to_string(&unit).unwrap();
    if let Err(skip) = require_binaries(&["systemd-analyze"]) {
        skip.report();
        return;
    }
    // A root holding the unit, the binary its ExecStart names and systemd's own units, so
    // `verify` checks everything the unit refers to.
    let exec_start: Vec<&str> = directive(&text, "ExecStart")
        .expect("ExecStart=")
        .split_whitespace()
        .collect();
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join(exec_start[0].trim_start_matches('/'));
    fs::create_dir_all(bin.parent().unwrap()).unwrap();
    place_binary(&bin);
    let units = root.path().join("usr/lib/systemd");
    fs::create_dir_all(&units).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(&units)
        .status()
        .unwrap();
    assert!(copied.success(), "copy systemd's units");
    let etc = root.path().join("etc/systemd/system");
    fs::create_dir_all(&etc).unwrap();
    fs::copy(&unit, etc.join("regcache.service")).unwrap();
    let root_arg = format!("--root={}", root.path().display());

    // verify exits 0 on unknown keys and bad values, printing a warning: demand silence.
    let out = Command::new("systemd-analyze")
        .args(["verify", &root_arg, "regcache.service"])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");

    // Exposure 2.0 or less ("OK"); the unit rates 1.2 today.
    let out = Command::new("systemd-analyze")
        .args([
            "security",
            "--offline=true",
            "--threshold=20",
            &root_arg,
            "regcache.service",
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("<no overall line>");
    assert!(
        out.status.success(),
        "exposure above 2.0: {overall}\n{report}"
    );
    eprintln!("{}", overall.trim());

    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("DynamicUser", "yes"),
        ("CacheDirectory", "regcache"),
    ] {
        assert_eq!(directive(&text, key), Some(want), "{key}=");
    }

    // The command line is one regcache accepts: run it with the repository's example
    // config, the cache directory systemd would pass, and a loopback port.
    let cache = tempfile::tempdir().unwrap();
    let args: Vec<String> = exec_start[1..]
        .iter()
        .map(|a| match *a {
            "${CACHE_DIRECTORY}" => cache.path().display().to_string(),
            CONFIG_PATH => repo().join("config/regcache.toml").display().to_string(),
            other => other.to_string(),
        })
        .collect();
    assert!(
        exec_start.contains(&"${CACHE_DIRECTORY}") && exec_start.contains(&CONFIG_PATH),
        "{exec_start:?}"
    );
    let log = root.path().join("regcache.log");
    let log_file = fs::File::create(&log).unwrap();
    let mut process = ProcessGuard::spawn(
        "regcache",
        Command::new(env!("CARGO_BIN_EXE_regcache"))
            .args(&args)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("regcache ready")
    {
        assert!(
            process.exited().is_none() && Instant::now() < deadline,
            "regcache {args:?} did not start:\n{}",
            tail_file(&log, 20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    process.terminate(Duration::from_secs(10));
    assert!(
        cache.path().join("tmp").is_dir(),
        "cache made in ${{CACHE_DIRECTORY}}"
    );
}

/// The value of the last `Key=` line of a unit file.
fn directive<'t>(unit: &'t str, key: &str) -> Option<&'t str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .map(str::trim)
}

/// What the deploy files must agree with, read from the Dockerfile's runtime base stage.
#[derive(Debug)]
struct ImageFacts {
    port: u16,
    volume: String,
    uid: u64,
    gid: u64,
}

fn image_facts() -> ImageFacts {
    let text = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(i, rest)| (i.to_ascii_uppercase(), rest.trim().to_string()))
        .collect();
    let stages: Vec<&str> = instructions
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, rest)| rest.as_str())
        .collect();
    // The classic builder (Debian's docker.io) builds every stage up to the target: no stage
    // may need a compiler image or the network, and the default (last) target is the
    // runtime image, on nothing but the files gathered from RUNTIME_IMAGE.
    assert_eq!(
        stages,
        ["${RUNTIME_IMAGE} AS rootfs", "scratch AS runtime"],
        "{stages:?}"
    );
    let first = |name: &str| {
        instructions
            .iter()
            .find(|(i, _)| i == name)
            .map(|(_, rest)| rest.clone())
            .unwrap_or_else(|| panic!("no {name} in the Dockerfile"))
    };
    let volume: Vec<String> = serde_json::from_str(&first("VOLUME")).unwrap();
    let user = first("USER");
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    let env = first("ENV");
    assert_eq!(
        env,
        format!("REGCACHE_CACHE_DIR={}", volume[0]),
        "the cache is the volume"
    );
    assert!(
        first("HEALTHCHECK").contains(r#"["/usr/local/bin/regcache", "healthcheck""#),
        "the health check is regcache's own"
    );
    ImageFacts {
        port: first("EXPOSE").parse().unwrap(),
        volume: volume[0].clone(),
        uid: uid.parse().unwrap(),
        gid: gid.parse().unwrap(),
    }
}

/// A Python with PyYAML (Debian python3-yaml), or `Err(Skip)`.
fn yaml_python() -> Result<&'static str, Skip> {
    ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|python| {
            Command::new(python)
                .args(["-c", "import yaml"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or_else(|| Skip::new("no python3 with the yaml module (Debian package python3-yaml)"))
}

/// Every document of a YAML file (or of YAML text on stdin when `path` is `-`), as JSON.
fn yaml_documents(python: &str, path: &Path, stdin: Option<&[u8]>) -> Vec<Value> {
    use std::io::Write;
    let mut child = Command::new(python)
        .args([
            "-c",
            "import sys, json, yaml\n\
             src = sys.stdin if sys.argv[1] == '-' else open(sys.argv[1])\n\
             json.dump([d for d in yaml.safe_load_all(src) if d is not None], sys.stdout)",
        ])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Loads and validates a regcache configuration the way `regcache --config` does.
fn load_regcache_config(toml_text: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regcache.toml");
    fs::write(&file, toml_text).unwrap();
    Config::from_file(&file)
        .and_then(Config::validate)
        .unwrap_or_else(|e| panic!("config does not load: {e}\n{toml_text}"))
}

/// `--config PATH` from an argument list.
fn config_arg(args: &Value) -> String {
    let args: Vec<&str> = args
        .as_array()
        .expect("args list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    args[at + 1].to_string()
}

/// A Kubernetes quantity like `50Gi` in bytes (binary and decimal suffixes).
fn quantity_bytes(q: &str) -> u64 {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let n: u64 = n.parse().unwrap();
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        other => panic!("unknown quantity suffix {other}"),
    };
    n * factor
}

#[test]
fn kubernetes_manifests_agree_with_image_and_config() {
    let python = match yaml_python() {
        Ok(p) => p,
        Err(skip) => return skip.report(),
    };
    let image = image_facts();
    let dir = repo().join("deploy/kubernetes");
    let kustomization = &yaml_documents(python, &dir.join("kustomization.yaml"), None)[0];
    let mut listed: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let mut present: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    listed.sort();
    present.sort();
    assert_eq!(listed, present, "kustomization lists every manifest");
    let image_name = kustomization["images"][0]["name"].as_str().unwrap();

    let mut by_kind: BTreeMap<String, Value> = BTreeMap::new();
    for file in &present {
        for doc in yaml_documents(python, &dir.join(file), None) {
            let kind = doc["kind"].as_str().expect("kind").to_string();
            assert!(by_kind.insert(kind.clone(), doc).is_none(), "one {kind}");
        }
    }
    let get = |kind: &str| by_kind.get(kind).unwrap_or_else(|| panic!("no {kind}"));
    let (deployment, service, config_map, claim) = (
        get("Deployment"),
        get("Service"),
        get("ConfigMap"),
        get("PersistentVolumeClaim"),
    );

    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    for (k, v) in deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&labels[k], v, "selector matches the pod's labels");
    }
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "Service selects the pod");
    }
    let spec = &pod["spec"];
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["image"], image_name, "kustomize sets the image");

    // Security: non-root as the image's user, read-only root, nothing to escalate.
    let pod_security = &spec["securityContext"];
    assert_eq!(pod_security["runAsNonRoot"], true);
    assert_eq!(pod_security["runAsUser"], image.uid);
    assert_eq!(pod_security["runAsGroup"], image.gid);
    assert_eq!(pod_security["fsGroup"], image.gid, "the claim is writable");
    let security = &c["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));

    // The configuration: the ConfigMap holds the file --config names, and regcache loads it.
    let config_path = PathBuf::from(config_arg(&c["args"]));
    let volumes = spec["volumes"].as_array().unwrap();
    let mount = |volume: &Value| -> PathBuf {
        let name = &volume["name"];
        let m = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| &m["name"] == name)
            .unwrap_or_else(|| panic!("volume {name} is mounted"));
        PathBuf::from(m["mountPath"].as_str().unwrap())
    };
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == config_map["metadata"]["name"])
        .expect("the ConfigMap is a volume");
    assert_eq!(
        mount(config_volume).join(config_path.file_name().unwrap()),
        config_path,
        "--config names the file in the ConfigMap's mount"
    );
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let toml_text = config_map["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap key {key}"));
    let config = load_regcache_config(toml_text);

    // Cache: the claim is mounted on the image's volume, which is also cache_dir.
    let cache_volume = volumes
        .iter()
        .find(|v| v["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"])
        .expect("the claim is a volume");
    assert_eq!(mount(cache_volume), Path::new(&image.volume));
    assert_eq!(config.cache_dir, Path::new(&image.volume));
    let requested = quantity_bytes(
        claim["spec"]["resources"]["requests"]["storage"]
            .as_str()
            .unwrap(),
    );
    let max_size = config
        .cache
        .max_size
        .expect("cache.max_size bounds the cache")
        .0;
    assert!(
        max_size < requested,
        "max_size {max_size} fits the claim {requested}"
    );
    if claim["spec"]["accessModes"] == serde_json::json!(["ReadWriteOnce"]) {
        assert_eq!(deployment["spec"]["replicas"], 1);
        assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    }

    // Port: the one regcache listens on, the image exposes, the probes and the Service use.
    assert_eq!(config.listen.port(), image.port);
    let port = &c["ports"][0];
    assert_eq!(port["containerPort"], image.port);
    let port_name = &port["name"];
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == *port_name || get["port"] == image.port,
            "{probe} port {}",
            get["port"]
        );
    }
    let service_port = &service["spec"]["ports"][0];
    assert!(
        service_port["targetPort"] == *port_name || service_port["targetPort"] == image.port,
        "{service_port}"
    );
    assert_eq!(service_port["port"], image.port);
    assert!(
        spec["terminationGracePeriodSeconds"].as_u64().unwrap()
            > config.timeouts.shutdown_grace.0.as_secs(),
        "the pod outlives regcache's drain"
    );
}

#[test]
fn compose_file_agrees_with_image_and_config() {
    let python = match yaml_python() {
        Ok(p) => p,
        Err(skip) => return skip.report(),
    };
    let image = image_facts();
    let deploy = repo().join("deploy");
    let file = deploy.join("docker-compose.yml");
    let compose = &yaml_documents(python, &file, None)[0];

    // The compose tool's own validation, where it is installed (Debian docker-compose).
    match support::peers::which("docker-compose") {
        Some(tool) => {
            let out = Command::new(tool)
                .arg("--file")
                .arg(&file)
                .arg("config")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "docker-compose config: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let resolved = &yaml_documents(python, Path::new("-"), Some(&out.stdout))[0];
            assert!(resolved["services"]["regcache"].is_object(), "{resolved}");
        }
        None => eprintln!("note: docker-compose is not installed; its validation is not run"),
    }

    let service = &compose["services"]["regcache"];
    let context = deploy.join(service["build"]["context"].as_str().unwrap());
    assert!(
        context.join("Dockerfile").is_file(),
        "build context is the repository"
    );
    assert_eq!(service["read_only"], true);
    assert_eq!(service["cap_drop"], serde_json::json!(["ALL"]));
    let default_port = Config::default().listen.port();
    assert_eq!(default_port, image.port);
    let ports: Vec<&str> = service["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(ports, [format!("{default_port}:{}", image.port)]);

    assert!(
        service.get("command").is_none(),
        "the config is named by REGCACHE_CONFIG, which the health check reads too"
    );
    let config_path = service["environment"]["REGCACHE_CONFIG"]
        .as_str()
        .expect("environment REGCACHE_CONFIG")
        .to_string();
    let mut mounts: BTreeMap<String, String> = BTreeMap::new();
    for spec in service["volumes"].as_array().unwrap() {
        let parts: Vec<&str> = spec.as_str().unwrap().split(':').collect();
        mounts.insert(parts[1].to_string(), parts[0].to_string());
    }
    let volume = &mounts[&image.volume];
    assert!(
        compose["volumes"].get(volume).is_some(),
        "the cache is the named volume {volume}"
    );
    let source = deploy.join(&mounts[&config_path]);
    load_regcache_config(&fs::read_to_string(&source).unwrap());
}

/// `GET path` over HTTP/1.0 (the body ends at close, never chunked); `(status, body)`.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// A Prometheus HTTP API query; its `data`.
fn prometheus_api(addr: &str, path: &str, query: Option<&str>) -> Value {
    let path = match query {
        Some(q) => format!(
            "{path}?query={}",
            url::form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
        ),
        None => path.to_string(),
    };
    let (status, body) = http_get(addr, &path).unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    assert_eq!(status, 200, "{path}: {body}");
    assert_eq!(v["status"], "success", "{path}: {body}");
    v["data"].clone()
}

/// Polls `check` every 200 ms until it gives a value, for at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every metric name a PromQL expression mentions (`regcache_…`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("regcache_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Every PromQL expression of the Grafana dashboard: panel targets and template queries.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(q) = var["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    exprs
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    if let Err(skip) = require_binaries(&["promtool"]) {
        skip.report();
        return;
    }
    let dir = repo().join("deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The rule files' metric names are ones regcache exports (checked against a real scrape
    // in `prometheus_scrapes_regcache_with_the_rules_and_the_dashboard_queries`).
    let rules = fs::read_to_string(dir.join("alerts.yml")).unwrap();
    assert!(metric_names(&rules).len() >= 5, "{rules}");
}

/// The real Prometheus (Debian's package) scrapes a real regcache with the alert rules
/// loaded: the target is up, every rule evaluates without error, the upstream-down alert
/// goes pending for an unreachable upstream, and every query of the Grafana dashboard runs
/// and names only metrics regcache exports.
#[test]
fn prometheus_scrapes_regcache_with_the_rules_and_the_dashboard_queries() {
    if let Err(skip) = require_binaries(&["prometheus"]) {
        skip.report();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, dead, prom_port) = (free(), free(), free());
    let regcache_addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("regcache.toml");
    fs::write(
        &config,
        format!(
            "listen = \"{regcache_addr}\"\ncache_dir = \"{}\"\ndefault_upstream = \"hub\"\n\
             [cache]\nmax_size = \"1GiB\"\n[[upstream]]\nname = \"hub\"\nurl = \"http://127.0.0.1:{dead}\"\n",
            dir.path().join("cache").display()
        ),
    )
    .unwrap();
    let regcache_log = dir.path().join("regcache.log");
    let _regcache = ProcessGuard::spawn(
        "regcache",
        Command::new(env!("CARGO_BIN_EXE_regcache"))
            .arg("--config")
            .arg(&config)
            .env_remove("REGCACHE_LISTEN")
            .env_remove("REGCACHE_CONFIG")
            .stdout(fs::File::create(&regcache_log).unwrap())
            .stderr(Stdio::null()),
    )
    .unwrap();
    wait_for("regcache serving", Duration::from_secs(30), || {
        http_get(&regcache_addr, "/v2/")
            .ok()
            .filter(|(s, _)| *s == 200)
    });
    // A miss whose upstream cannot be reached: a 502, and the upstream marked unreachable.
    let (status, _) = http_get(&regcache_addr, "/v2/library/alpine/manifests/3").unwrap();
    assert_eq!(status, 502);

    let prom_config = dir.path().join("prometheus.yml");
    fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: regcache\n    static_configs:\n      - targets: ['{regcache_addr}']\n",
            repo().join("deploy/prometheus/alerts.yml").display()
        ),
    )
    .unwrap();
    let prom_addr = format!("127.0.0.1:{prom_port}");
    let prom_log = dir.path().join("prometheus.log");
    let _prometheus = ProcessGuard::spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&prom_log).unwrap()),
    )
    .unwrap();
    let limit = Duration::from_secs(60);
    wait_for("Prometheus ready", limit, || {
        http_get(&prom_addr, "/-/ready")
            .ok()
            .filter(|(s, _)| *s == 200)
    });
    wait_for("regcache scraped and up", limit, || {
        let data = prometheus_api(&prom_addr, "/api/v1/query", Some("up{job=\"regcache\"}"));
        (data["result"][0]["value"][1] == "1").then_some(())
    });
    // Every rule evaluated, none with an error.
    let rules = wait_for("every rule evaluated", limit, || {
        let data = prometheus_api(&prom_addr, "/api/v1/rules", None);
        let rules: Vec<Value> = data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.len() == 4
            && rules.iter().all(|r| {
                !r["lastEvaluation"]
                    .as_str()
                    .unwrap_or("0001")
                    .starts_with("0001")
            });
        evaluated.then_some(rules)
    });
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule:#}");
    }
    wait_for("RegcacheUpstreamDown pending for hub", limit, || {
        let data = prometheus_api(&prom_addr, "/api/v1/alerts", None);
        data["alerts"]
            .as_array()?
            .iter()
            .any(|a| {
                a["labels"]["alertname"] == "RegcacheUpstreamDown"
                    && a["labels"]["upstream"] == "hub"
                    && a["state"] == "pending"
            })
            .then_some(())
    });

    // The dashboard: every query runs in the real Prometheus, and every metric it names is
    // one Prometheus scraped from regcache.
    let scraped: BTreeSet<String> =
        prometheus_api(&prom_addr, "/api/v1/label/__name__/values", None)
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect();
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(repo().join("deploy/grafana/regcache.json")).unwrap(),
    )
    .unwrap();
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let rules_text = fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let mut named = metric_names(&rules_text);
    for expr in &exprs {
        let found = metric_names(expr);
        assert!(!found.is_empty(), "no regcache metric in {expr}");
        named.extend(found);
        if expr.starts_with("label_values(") {
            continue;
        }
        let runnable = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        prometheus_api(&prom_addr, "/api/v1/query", Some(&runnable));
    }
    let unknown: Vec<&String> = named.iter().filter(|n| !scraped.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "dashboard or rules name metrics regcache does not export: {unknown:?}\nscraped: {scraped:?}"
    );
}
