//! Owns the access-log tests: the real `regcache` binary with JSON logs at `trace`, client
//! credentials (htpasswd) and upstream credentials (token realm), one `regcache::access_log`
//! event per request with its fields, and not one secret anywhere in the log. Also checks
//! that `admin_listen` is wired up in the binary.

mod fake;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use fake::*;
use serde_json::Value;

const UPSTREAM_USER: &str = "robot";
const UPSTREAM_PASSWORD: &str = "upstream-Pa55-7f1e9c";
const CLIENT_USER: &str = "ci";
const CLIENT_PASSWORD: &str = "client-Pa55-2b8d4a";
const WRONG_PASSWORD: &str = "wrong-Pa55-90cc11";

struct Binary {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Binary {
    fn start(config: &std::path::Path) -> Binary {
        Binary::start_at(config, "trace")
    }

    /// The binary with `RUST_LOG` at `level`.
    fn start_at(config: &std::path::Path, level: &str) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_regcache"))
            .env_remove("REGCACHE_LISTEN")
            .env_remove("REGCACHE_CACHE_DIR")
            .env_remove("REGCACHE_LOG_FORMAT")
            .env("REGCACHE_CONFIG", config)
            .env("REGCACHE_TEST_UPSTREAM_PASSWORD", UPSTREAM_PASSWORD)
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Binary {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the JSON line whose `message` is `message`.
    fn wait_for(&mut self, message: &str) -> Value {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no {message:?} line; got {:#?}", self.seen));
            self.seen.push(line.clone());
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == message {
                return v;
            }
        }
    }

    /// Stops the process with SIGTERM and returns everything it wrote.
    fn stop(mut self) -> Vec<String> {
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        assert!(self.child.wait().unwrap().success());
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        self.seen
    }
}

fn basic(user: &str, password: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {b64}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_access_event_per_request_and_no_secret_in_a_trace_log() {
    let up = FakeUpstream::start().await;
    up.set_auth(AuthMode::Bearer {
        creds: Some((UPSTREAM_USER.into(), UPSTREAM_PASSWORD.into())),
    });
    let layer = blob_of(200_000, 9);
    let img = push_image(
        &up,
        "team/app",
        "1",
        std::slice::from_ref(&layer),
        "application/vnd.oci.image.manifest.v1+json",
    );
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let mut f = std::fs::File::create(&htpasswd).unwrap();
    writeln!(
        f,
        "{CLIENT_USER}:{}",
        bcrypt::hash(CLIENT_PASSWORD, 4).unwrap()
    )
    .unwrap();
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
cache_dir = "{cache}"
default_upstream = "up"
log_format = "json"

[auth]
htpasswd = "{htpasswd}"
anonymous_pull = false

[[upstream]]
name = "up"
url = "{url}"
username = "{UPSTREAM_USER}"
password_env = "REGCACHE_TEST_UPSTREAM_PASSWORD"
"#,
            cache = dir.path().join("cache").display(),
            htpasswd = htpasswd.display(),
            url = up.url(),
        ),
    )
    .unwrap();
    let mut bin = Binary::start(&config);
    let ready = bin.wait_for("regcache ready");
    let listen = ready["listen"].as_str().unwrap().to_owned();
    let admin = ready["admin_listen"].as_str().unwrap().to_owned();
    let url = |path: &str| format!("http://{listen}{path}");

    // Docker's way in: a regcache token for the client's credentials, then Bearer requests.
    let r = client()
        .get(url(
            "/auth/token?service=regcache&scope=repository:team/app:pull",
        ))
        .header("Authorization", basic(CLIENT_USER, CLIENT_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token: Value = r.json().await.unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {token}");
    let manifest = client()
        .get(url("/v2/team/app/manifests/1"))
        .header("Authorization", &bearer)
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200);
    let manifest_id = manifest.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    manifest.bytes().await.unwrap();
    let mut blob_ids = Vec::new();
    for _ in 0..2 {
        let r = client()
            .get(url(&format!("/v2/team/app/blobs/{}", img.layers[0])))
            .header("Authorization", basic(CLIENT_USER, CLIENT_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        blob_ids.push(r.headers()["x-request-id"].to_str().unwrap().to_owned());
        same(&r.bytes().await.unwrap(), &layer);
    }
    let denied = client()
        .get(url("/v2/team/app/manifests/1"))
        .header("Authorization", basic(CLIENT_USER, WRONG_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    let denied_id = denied.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(up.tokens_issued() >= 1, "the upstream token dance happened");

    // The operator endpoints live on the admin listener only.
    let r = client().get(url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("regcache_http_requests_total")
    );

    let log = bin.stop();
    let events: Vec<Value> = log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&Value> = events
        .iter()
        .filter(|e| e["target"] == "regcache::access_log")
        .collect();
    assert_eq!(
        access.len(),
        6,
        "token, manifest, two blobs, the refusal, /metrics: {access:#?}"
    );
    let by_id = |id: &str| {
        let found: Vec<&&Value> = access.iter().filter(|e| e["request_id"] == id).collect();
        assert_eq!(found.len(), 1, "one event for {id}: {access:#?}");
        *found[0]
    };
    let m = by_id(&manifest_id);
    assert_eq!(m["method"], "GET");
    assert_eq!(m["path"], "/v2/team/app/manifests/1");
    assert_eq!(m["status"], 200);
    assert_eq!(m["bytes"], img.manifest.len() as u64);
    assert_eq!(m["cache"], "miss");
    assert_eq!(m["upstream"], "up");
    assert_eq!(m["complete"], true);
    assert!(m["duration_ms"].as_f64().unwrap() >= 0.0);
    let cold = by_id(&blob_ids[0]);
    let warm = by_id(&blob_ids[1]);
    assert_eq!(
        (&cold["cache"], &cold["bytes"]),
        (&Value::from("miss"), &Value::from(layer.len()))
    );
    assert_eq!(
        (&warm["cache"], &warm["bytes"]),
        (&Value::from("hit"), &Value::from(layer.len()))
    );
    let refused: Vec<_> = access.iter().filter(|e| e["status"] == 401).collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["cache"], "none");
    let token_event: Vec<_> = access
        .iter()
        .filter(|e| e["path"] == "/auth/token")
        .collect();
    assert_eq!(token_event.len(), 1, "the query string is not logged");

    // Not one secret, in any form, anywhere in the log.
    let text = log.join("\n");
    let upstream_tokens: Vec<String> = (1..=up.tokens_issued())
        .map(|n| format!("tok-{n}"))
        .collect();
    let mut secrets = vec![
        ("the upstream password", UPSTREAM_PASSWORD.to_owned()),
        ("the client password", CLIENT_PASSWORD.to_owned()),
        ("a wrong client password", WRONG_PASSWORD.to_owned()),
        (
            "the client's Basic header",
            basic(CLIENT_USER, CLIENT_PASSWORD),
        ),
        ("the wrong Basic header", basic(CLIENT_USER, WRONG_PASSWORD)),
        (
            "regcache's Basic header upstream",
            basic(UPSTREAM_USER, UPSTREAM_PASSWORD),
        ),
        ("the regcache-issued token", token.clone()),
    ];
    for t in upstream_tokens {
        secrets.push(("an upstream token", format!("\"{t}\"")));
        secrets.push(("an upstream token", format!("Bearer {t}")));
    }
    for (what, secret) in &secrets {
        assert!(!text.contains(secret.as_str()), "the log contains {what}");
    }
    // The log is not quiet: trace events of the HTTP stack and the refused login are in it.
    assert!(
        log.len() > 5 * access.len(),
        "trace logging was on: {} lines",
        log.len()
    );
    let refusal: Vec<_> = events
        .iter()
        .filter(|e| e["message"] == "client authentication failed" && e["user"] == CLIENT_USER)
        .collect();
    assert_eq!(
        refusal.len(),
        1,
        "the refused login is logged, by user name only"
    );
    // Below `info`, a line logged while a request is served names the request.
    assert_eq!(refusal[0]["span"]["name"], "request", "{:#?}", refusal[0]);
    assert_eq!(refusal[0]["span"]["request_id"], denied_id.as_str());
    assert_eq!(refusal[0]["span"]["path"], "/v2/team/app/manifests/1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_info_a_failed_request_is_logged_with_its_id_and_no_span() {
    let up = FakeUpstream::start().await;
    up.set_down(true);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ncache_dir = \"{cache}\"\ndefault_upstream = \"up\"\n\
             log_format = \"json\"\n\n[[upstream]]\nname = \"up\"\nurl = \"{url}\"\n",
            cache = dir.path().join("cache").display(),
            url = up.url(),
        ),
    )
    .unwrap();
    let mut bin = Binary::start_at(&config, "info");
    let ready = bin.wait_for("regcache ready");
    let listen = ready["listen"].as_str().unwrap().to_owned();
    let missing = up.add_blob(blob_of(1000, 4));
    let path = format!("/v2/team/app/blobs/{missing}");
    let r = client()
        .get(format!("http://{listen}{path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let failed = bin.wait_for("request failed");
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["request_id"], id.as_str(), "{failed:#?}");
    assert_eq!(failed["method"], "GET");
    assert_eq!(failed["path"], path.as_str());
    assert!(failed["error"].as_str().is_some_and(|e| !e.is_empty()));
    let log = bin.stop();
    for line in &log {
        let e: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(e.get("span").is_none(), "no request span at info: {line}");
    }
    assert!(
        log.iter()
            .any(|l| l.contains("\"regcache::access_log\"") && l.contains(&id)),
        "the access line names the same request"
    );
}
