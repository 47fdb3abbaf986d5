//! Every request refused at the framing level on a plain HTTP/1 connection (NUL bytes, bad
//! `Content-Length`, obs-fold, bad versions, oversized heads, smuggling shapes, `Host`
//! faults) is answered with an OCI JSON error body naming the reason, not an empty body, and
//! the connection is closed.

mod fake;

use std::net::SocketAddr;
use std::time::Duration;

use fake::*;
use regcache::units::ByteSize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn framing_refusals_carry_an_oci_body() {
    let up = FakeUpstream::start().await;
    let mut cfg = config_for(&up.url());
    cfg.limits.max_header_bytes = ByteSize(8 << 10);
    cfg.limits.max_headers = 20;
    let proxy = Proxy::start(cfg).await;
    let big = "a".repeat(20_000);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("NUL in a header value", b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".to_vec(), 400),
        ("NUL in the target", b"GET /v2/\0 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        ("obs-fold", b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n".to_vec(), 400),
        ("space before the colon", b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello".to_vec(), 400),
        ("Content-Length list", b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!".to_vec(), 400),
        ("negative Content-Length", b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(), 400),
        ("Content-Length and Transfer-Encoding", b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("two different Content-Lengths", b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(), 400),
        ("a coding before chunked", b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("bare LF", b"GET /v2/ HTTP/1.1\nHost: x\n\n".to_vec(), 400),
        ("two Hosts", b"GET /v2/ HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".to_vec(), 400),
        ("no Host", b"GET /v2/ HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("HTTP/1.2", b"GET /v2/ HTTP/1.2\r\nHost: x\r\n\r\n".to_vec(), 505),
        ("HTTP/3.0", b"GET /v2/ HTTP/3.0\r\nHost: x\r\n\r\n".to_vec(), 505),
        ("a long header", format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").into_bytes(), 431),
        ("many headers", format!("GET /v2/ HTTP/1.1\r\nHost: x\r\n{}\r\n", "X-A: a\r\n".repeat(30)).into_bytes(), 431),
    ];
    for (what, request, status) in cases {
        let answer = exchange(proxy.addr, &request).await;
        println!("{what}: {}", answer.lines().next().unwrap_or_default());
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {answer}"
        );
        let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("content-type: application/json"),
            "{what}: {head}"
        );
        assert!(head.contains("connection: close"), "{what}: {head}");
        let v: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body:?}"));
        assert!(v["errors"][0]["code"].is_string(), "{what}: {body}");
        assert!(
            v["errors"][0]["detail"].is_string() || status == 505,
            "{what}: {body}"
        );
    }
    assert_eq!(up.seen().len(), 0);
}
