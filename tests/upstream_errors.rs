//! Owns the tests of upstream failures as clients and operators see them: the 502/504 body
//! names the upstream and the cause (connection refused, TLS failure, timeout), never its
//! address; and an upstream marked down is probed until it is up again, with no client
//! traffic. DNS failures are covered by `upstream::cause`'s unit test: every resolver on
//! this machine is reached over the network, so none can be provoked here hermetically.

mod fake;

use std::time::Duration;

use fake::*;
use regcache::units::HumanDuration;
use serde_json::Value;

/// A loopback port nothing listens on.
fn dead_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// GETs a manifest through the proxy; returns the status and the first error's detail.
async fn pull_error(proxy: &Proxy, path: &str) -> (u16, String) {
    let r = client().get(proxy.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    (
        status,
        v["errors"][0]["detail"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn named(name: &str, url: &str) -> regcache::config::Config {
    let mut cfg = config_for(url);
    cfg.upstreams[0].name = name.into();
    cfg.default_upstream = name.into();
    cfg
}

#[tokio::test]
async fn a_refused_connection_names_the_upstream_and_the_cause() {
    let dead = dead_port();
    let proxy = Proxy::start(named("mirror", &format!("http://{dead}"))).await;
    let (status, detail) = pull_error(&proxy, "/v2/team/app/manifests/1").await;
    assert_eq!(status, 502);
    assert_eq!(detail, "mirror: connection refused");
    assert!(!detail.contains(&dead.port().to_string()));
    let h = proxy.app.upstream("mirror").unwrap().stats().health();
    let logged = h.last_error.unwrap().1;
    assert_eq!(logged, "upstream unreachable: mirror: connection refused");
}

#[tokio::test]
async fn tls_spoken_to_a_plain_http_upstream_names_the_tls_failure() {
    let up = FakeUpstream::start().await;
    let url = up.url().replace("http://", "https://");
    let proxy = Proxy::start(named("mirror", &url)).await;
    let (status, detail) = pull_error(&proxy, "/v2/team/app/manifests/1").await;
    assert_eq!(status, 502);
    assert!(
        detail.starts_with("mirror: TLS handshake failed: "),
        "{detail}"
    );
    assert!(detail.contains("plain HTTP"), "{detail}");
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_a_timeout_naming_it() {
    // Accepts connections and reads nothing, answers nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            open.push(s);
        }
    });
    let mut cfg = named("slow", &format!("http://{addr}"));
    cfg.timeouts.response = HumanDuration(Duration::from_millis(300));
    let proxy = Proxy::start(cfg).await;
    let (status, detail) = pull_error(&proxy, "/v2/team/app/manifests/1").await;
    assert_eq!(status, 504);
    assert_eq!(detail, "slow: no answer within 300ms (timeouts.response)");
    held.abort();
}

#[tokio::test]
async fn a_down_upstream_is_probed_back_up_without_client_traffic() {
    let dead = dead_port();
    let mut cfg = named("mirror", &format!("http://{dead}"));
    cfg.retry.attempts = 1;
    cfg.retry.probe_backoff = HumanDuration(Duration::from_millis(50));
    cfg.retry.probe_backoff_max = HumanDuration(Duration::from_millis(200));
    let proxy = Proxy::start(cfg).await;
    proxy.app.start_health_probes();
    let (status, _) = pull_error(&proxy, "/v2/team/app/manifests/1").await;
    assert_eq!(status, 502);
    let stats = proxy.app.upstream("mirror").unwrap().stats().clone();
    assert_eq!(stats.health().state(), "down");
    let first_check = stats.health().last_checked.unwrap();

    // Still down: probes keep checking it (the time of the last check moves on).
    until(|| stats.health().last_checked.unwrap() > first_check).await;
    assert_eq!(stats.health().state(), "down");

    // It comes back on the same address; no client asks anything through the proxy.
    let up = FakeUpstream::start_on(&dead.to_string()).await;
    until(|| stats.health().state() == "up").await;
    let probes = up.seen().iter().filter(|s| s.path == "/v2/").count();
    assert!(probes >= 1, "probed its /v2/");
    assert_eq!(up.count("GET", "/manifests/"), 0, "no client traffic");

    let r = client().get(proxy.url("/readyz")).send().await.unwrap();
    let report: Value = r.json().await.unwrap();
    let u = &report["upstreams"][0];
    assert_eq!(u["state"], "up", "{report}");
    assert!(u["last_checked_unix"].as_f64().unwrap() > 1.6e9, "{u}");
    assert!(
        u["last_checked_age_seconds"].as_f64().unwrap() >= 0.0,
        "{u}"
    );
    let page = client()
        .get(proxy.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<th>last checked</th>"), "{page}");
}
