//! Owns the checks of `deploy/fleet/`: the compose fleet (three replicas, SeaweedFS, nginx
//! round robin) and the Kubernetes fleet (three replicas advertising their pod IP from the
//! downward API, a Service, the peer-token Secret, an IRSA service account) agree with each
//! other and with configurations regcache loads.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use regcache::config::Config;
use serde_json::Value;
use support::peers::{Skip, require_peer};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/fleet")
}

/// Every YAML document of `path` as JSON, through PyYAML (Debian python3-yaml).
fn yaml(path: &Path) -> Result<Vec<Value>, Skip> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml\n\
             json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Skip::new(format!("python3: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No module named 'yaml'") {
            return Err(Skip::new(
                "python3 has no yaml module (Debian python3-yaml)",
            ));
        }
        panic!("{} is not valid YAML: {err}", path.display());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("JSON from PyYAML"))
}

/// The configuration `text` as regcache loads and validates it. Validation reads the peer
/// token file, which exists only where the file is deployed: a stand-in is validated and
/// the path the file names is kept.
#[track_caller]
fn load(text: &str, what: &str) -> Config {
    let mut cfg: Config = toml::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    let token = tempfile::NamedTempFile::new().unwrap();
    fs::write(token.path(), "0123456789abcdef0123456789abcdef\n").unwrap();
    let named = cfg
        .fleet
        .as_mut()
        .map(|f| std::mem::replace(&mut f.peer_token_file, token.path().to_path_buf()));
    let mut cfg = cfg.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
    if let (Some(f), Some(named)) = (cfg.fleet.as_mut(), named) {
        f.peer_token_file = named;
    }
    cfg
}

#[test]
fn compose_fleet_has_three_replicas_a_store_and_a_round_robin_balancer() {
    let compose = &require_peer!(yaml(&dir().join("docker-compose.yml")), "compose")[0];
    let services = compose["services"].as_object().expect("services");
    let replicas: Vec<&String> = services
        .keys()
        .filter(|k| k.starts_with("regcache-"))
        .collect();
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    assert!(services.contains_key("seaweedfs") && services.contains_key("balancer"));
    let nginx = fs::read_to_string(dir().join("nginx.conf")).unwrap();
    let stores: std::collections::BTreeSet<String> = replicas
        .iter()
        .map(|name| {
            let s = &services[name.as_str()];
            let env = &s["environment"];
            for k in [
                "AWS_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_REGION",
            ] {
                assert!(env[k].is_string(), "{name}: {k}");
            }
            assert_eq!(env["AWS_ALLOW_HTTP"], "true", "{name}");
            assert_eq!(
                env["AWS_ACCESS_KEY_ID"], services["seaweedfs"]["environment"]["AWS_ACCESS_KEY_ID"],
                "{name} signs as the store's identity"
            );
            let mount = s["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .find(|v| v.ends_with(":/etc/regcache/regcache.toml:ro"))
                .unwrap_or_else(|| panic!("{name} mounts its config"));
            let file = mount.split(':').next().unwrap();
            let cfg = load(&fs::read_to_string(dir().join(file)).unwrap(), file);
            let fleet = cfg
                .fleet
                .as_ref()
                .unwrap_or_else(|| panic!("{file} has [fleet]"));
            assert_eq!(
                fleet.advertise.as_str().trim_end_matches('/'),
                format!("http://{name}:5000"),
                "{file}: advertise names its own service"
            );
            assert_eq!(
                fleet.peer_token_file,
                PathBuf::from(s["secrets"][0]["target"].as_str().unwrap()),
                "{file}: the peer token is the mounted secret"
            );
            assert!(
                nginx.contains(&format!("server {name}:5000")),
                "nginx balances over {name}"
            );
            fleet.store.to_string()
        })
        .collect();
    assert_eq!(stores.len(), 1, "one bucket for all: {stores:?}");
    assert!(
        !nginx.contains("ip_hash") && !nginx.contains("least_conn"),
        "round robin"
    );
    assert!(
        nginx.contains("proxy_request_buffering off") && nginx.contains("client_max_body_size 0")
    );
    // The compose tool's own validation, where it is installed (Debian docker-compose).
    if support::peers::which("docker-compose").is_some() {
        let token = dir().join("peer-token");
        let made = !token.exists();
        if made {
            fs::write(&token, "test-token\n").unwrap();
        }
        let out = Command::new("docker-compose")
            .arg("-f")
            .arg(dir().join("docker-compose.yml"))
            .args(["config", "-q"])
            .output()
            .unwrap();
        if made {
            let _ = fs::remove_file(&token);
        }
        assert!(
            out.status.success(),
            "docker-compose config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn kubernetes_fleet_advertises_the_pod_ip_and_shares_the_peer_token() {
    let k = dir().join("kubernetes");
    let kust = &require_peer!(yaml(&k.join("kustomization.yaml")), "kustomization")[0];
    let mut docs = Vec::new();
    for r in kust["resources"].as_array().unwrap() {
        docs.extend(yaml(&k.join(r.as_str().unwrap())).unwrap());
    }
    let find = |kind: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("a {kind}"))
    };
    let deploy = find("Deployment");
    assert_eq!(deploy["spec"]["replicas"], 3);
    let pod = &deploy["spec"]["template"]["spec"];
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let service = find("Service");
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the Service selects the pods");
    }
    // advertise from the pod IP: the downward API into the init container that renders
    // the configuration.
    let init = &pod["initContainers"][0];
    let env = init["env"].as_array().unwrap();
    let pod_ip = env
        .iter()
        .find(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP")
        .expect("POD_IP from the downward API");
    assert_eq!(pod_ip["name"], "POD_IP");
    let script = init["command"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap();
    assert!(script.contains("s/POD_IP/${POD_IP}/"), "{script}");
    let cm = find("ConfigMap");
    let template = cm["data"]["regcache.toml.template"].as_str().unwrap();
    let rendered = template.replace("POD_IP", "10.1.2.3");
    let cfg = load(&rendered, "the rendered ConfigMap");
    let fleet = cfg.fleet.as_ref().expect("[fleet]");
    let port = pod["containers"][0]["ports"][0]["containerPort"]
        .as_u64()
        .unwrap();
    assert_eq!(fleet.advertise.as_str(), format!("http://10.1.2.3:{port}/"));
    assert_eq!(cfg.listen.port() as u64, port);
    assert!(fleet.store.to_string().starts_with("s3://"));
    // The peer token Secret is mounted where peer_token_file points.
    let secret = find("Secret");
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    let key = secret["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == secret_name)
        .expect("a volume of the peer token Secret");
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == vol["name"])
        .expect("the Secret is mounted");
    assert_eq!(
        fleet.peer_token_file,
        Path::new(mount["mountPath"].as_str().unwrap()).join(&key)
    );
    // The rendered file lands where regcache reads it.
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        script.ends_with(&format!("> {}", args[1])),
        "{script} writes {}",
        args[1]
    );
    // IRSA: the pods run as a service account annotated with the role.
    let sa = find("ServiceAccount");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            .as_str()
            .is_some_and(|a| a.starts_with("arn:aws:iam::"))
    );
    // A store outage keeps pods ready: /readyz is the readiness probe.
    assert_eq!(
        pod["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/readyz"
    );
}
