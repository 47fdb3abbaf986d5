//! Upstream redirects to internal addresses are refused before any connection is made, by
//! address after DNS, unless `redirect_hosts` allows the host. Every address used is on
//! loopback: 127.0.0.2 stands in for an internal service the upstream on 127.0.0.1 must not
//! reach.

mod fake;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use fake::*;

/// A listener that counts the connections it sees and answers none of them.
async fn sentinel(bind: &str) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = l.accept().await {
            s.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, seen)
}

async fn refused_with_reason(r: reqwest::Response) {
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    let detail = v["errors"][0]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("refused"), "{v}");
}

#[tokio::test]
async fn a_redirect_to_another_loopback_address_is_never_connected() {
    let up = FakeUpstream::start().await;
    let data = blob_of(5000, 1);
    let d = up.add_blob(data);
    let (internal, seen) = sentinel("127.0.0.2:0").await;
    up.redirect_blobs_to(&format!("http://{internal}"));
    let proxy = Proxy::start(config_for(&up.url())).await;
    let r = proxy.get_blob(&d).await;
    refused_with_reason(r).await;
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "the internal address saw a connection"
    );
    assert!(!proxy.blob_path(&d).exists());
    // Refused once, not retried as if the connection had failed.
    assert_eq!(up.count("GET", "/blobs/"), 1);
}

#[tokio::test]
async fn a_name_is_checked_by_the_addresses_it_resolves_to() {
    // The upstream is on 127.0.0.2; `localhost` resolves to 127.0.0.1 (and perhaps ::1),
    // loopback addresses other than the upstream's own.
    let up = FakeUpstream::start_on("127.0.0.2:0").await;
    let data = blob_of(5000, 2);
    let d = up.add_blob(data);
    let (internal, seen) = sentinel("127.0.0.1:0").await;
    up.redirect_blobs_to(&format!("http://localhost:{}", internal.port()));
    let proxy = Proxy::start(config_for(&up.url())).await;
    let r = proxy.get_blob(&d).await;
    refused_with_reason(r).await;
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "the internal address saw a connection"
    );
}

#[tokio::test]
async fn redirect_hosts_allow_an_internal_storage_host() {
    let up = FakeUpstream::start().await;
    let cdn = FakeUpstream::start_on("127.0.0.2:0").await;
    let data = blob_of(5000, 3);
    let d = up.add_blob(data.clone());
    cdn.add_blob(data.clone());
    up.redirect_blobs_to(&cdn.url());
    let mut cfg = config_for(&up.url());
    cfg.upstreams[0].redirect_hosts = vec!["127.0.0.*".into()];
    let proxy = Proxy::start(cfg).await;
    let r = proxy.get_blob(&d).await;
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &data);
    assert_eq!(cdn.count("GET", "/cdn/"), 1);
}

#[tokio::test]
async fn a_redirect_to_the_upstreams_own_address_is_followed() {
    // A registry on this host that redirects to another port of itself (its own storage).
    let up = FakeUpstream::start().await;
    let cdn = FakeUpstream::start().await;
    let data = blob_of(5000, 4);
    let d = up.add_blob(data.clone());
    cdn.add_blob(data.clone());
    up.redirect_blobs_to(&cdn.url());
    let proxy = Proxy::start(config_for(&up.url())).await;
    let r = proxy.get_blob(&d).await;
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &data);
}

#[test]
fn redirect_hosts_is_a_configuration_key() {
    let c = regcache::config::Config::from_toml(
        "[[upstream]]\nname = \"r\"\nurl = \"https://r.example\"\nredirect_hosts = [\"s3.internal\"]\n",
    )
    .unwrap();
    assert_eq!(
        c.upstreams[0].redirect_hosts,
        vec!["s3.internal".to_owned()]
    );
}
