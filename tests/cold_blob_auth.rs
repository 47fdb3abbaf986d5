//! The first cold blob after start goes to an authenticating upstream with credentials: the
//! scheme is learned once per upstream from a bodiless `GET /v2/`, so no blob request is
//! ever sent without them only to be refused with a 401.

mod fake;

use fake::*;

#[tokio::test]
async fn the_first_cold_blob_carries_a_token() {
    let up = FakeUpstream::start().await;
    up.set_auth(AuthMode::Bearer { creds: None });
    let data = blob_of(10_000, 7);
    let d = up.add_blob(data.clone());
    let proxy = Proxy::start(config_for(&up.url())).await;
    let r = proxy.get_blob(&d).await;
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &data);
    let seen = up.seen();
    for s in &seen {
        println!("{} {} auth={}", s.method, s.path, s.authorization.is_some());
    }
    let blob_requests: Vec<_> = seen.iter().filter(|s| s.path.contains("/blobs/")).collect();
    assert_eq!(
        blob_requests.len(),
        1,
        "one blob request, not a refused one first"
    );
    assert!(
        blob_requests[0].authorization.is_some(),
        "the blob request carried the token"
    );
    assert_eq!(
        seen.iter().filter(|s| s.path == "/v2/").count(),
        1,
        "one probe of /v2/"
    );
    assert_eq!(up.tokens_issued(), 1);

    // A second cold blob does not probe again.
    let d2 = up.add_blob(blob_of(5_000, 8));
    let r = proxy.get_blob(&d2).await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.seen().iter().filter(|s| s.path == "/v2/").count(), 1);
    assert!(
        up.seen()
            .iter()
            .all(|s| !s.path.contains("/blobs/") || s.authorization.is_some())
    );
}

#[tokio::test]
async fn a_basic_auth_upstream_gets_credentials_on_the_first_blob() {
    let up = FakeUpstream::start().await;
    up.set_auth(AuthMode::Basic {
        user: "u".into(),
        pass: "p".into(),
    });
    let d = up.add_blob(blob_of(3_000, 9));
    let mut cfg = config_for(&up.url());
    cfg.upstreams[0].username = Some("u".into());
    cfg.upstreams[0].password = Some("p".into());
    let proxy = Proxy::start(cfg).await;
    let r = proxy.get_blob(&d).await;
    assert_eq!(r.status(), 200);
    let blobs: Vec<_> = up
        .seen()
        .into_iter()
        .filter(|s| s.path.contains("/blobs/"))
        .collect();
    assert_eq!(blobs.len(), 1);
    assert!(blobs[0].authorization.is_some());
}
