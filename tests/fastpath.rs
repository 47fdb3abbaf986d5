//! The plain-HTTP/1.1 loop on a real socket: keep-alive and pipelined requests, cached blobs
//! and ranges sent with sendfile, HEAD, `Connection: close`, and a request with a body on the
//! same connection handed over to hyper mid-stream.

mod fake;

use fake::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads one response (status, headers, body by Content-Length or chunked) off `s`.
async fn response(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    head: bool,
) -> (u16, String, Vec<u8>) {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 65536];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    buf.drain(..head_end);
    let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
    let lower = text.to_ascii_lowercase();
    let len = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse::<usize>().unwrap());
    if head {
        return (status, text, Vec::new());
    }
    let body = match len {
        Some(n) => {
            while buf.len() < n {
                let mut chunk = vec![0u8; 1 << 20];
                let r = s.read(&mut chunk).await.unwrap();
                assert!(r > 0, "closed mid-body");
                buf.extend_from_slice(&chunk[..r]);
            }
            buf.drain(..n).collect()
        }
        None => {
            assert!(lower.contains("transfer-encoding: chunked"), "{text}");
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    let mut chunk = [0u8; 65536];
                    let r = s.read(&mut chunk).await.unwrap();
                    assert!(r > 0);
                    buf.extend_from_slice(&chunk[..r]);
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16)
                        .unwrap();
                buf.drain(..line_end + 2);
                while buf.len() < size + 2 {
                    let mut chunk = [0u8; 65536];
                    let r = s.read(&mut chunk).await.unwrap();
                    assert!(r > 0);
                    buf.extend_from_slice(&chunk[..r]);
                }
                body.extend(buf.drain(..size));
                buf.drain(..2);
                if size == 0 {
                    break body;
                }
            }
        }
    };
    (status, text, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_pipelining_ranges_and_a_handover_on_one_connection() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    let data = blob_of(3 * 1024 * 1024 + 5, 9);
    let d = up.add_blob(data.clone());
    // Cached through an ordinary client first.
    let r = client()
        .get(proxy.url(&format!("/v2/lib/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    same(&r.bytes().await.unwrap(), &data);

    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = Vec::new();
    // Three pipelined requests in one write: a whole cached blob, a range of it, a HEAD.
    let reqs = format!(
        "GET /v2/lib/app/blobs/{d} HTTP/1.1\r\nHost: t\r\n\r\n\
         GET /v2/lib/app/blobs/{d} HTTP/1.1\r\nHost: t\r\nRange: bytes=1000-1999\r\n\r\n\
         HEAD /v2/lib/app/blobs/{d} HTTP/1.1\r\nHost: t\r\n\r\n"
    );
    s.write_all(reqs.as_bytes()).await.unwrap();
    let (status, head, body) = response(&mut s, &mut buf, false).await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("docker-content-digest: {d}")),
        "{head}"
    );
    same(&body, &data);
    let (status, head, body) = response(&mut s, &mut buf, false).await;
    assert_eq!(status, 206, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-range: bytes 1000-1999/{}", data.len()))
    );
    same(&body, &data[1000..2000]);
    let (status, head, _) = response(&mut s, &mut buf, true).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {}", data.len())),
        "{head}"
    );
    // A miss is streamed (the 404 has a JSON body).
    s.write_all(b"GET /v2/lib/app/manifests/nope HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = response(&mut s, &mut buf, false).await;
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("MANIFEST_UNKNOWN"));
    // A request with a body on the same connection goes to hyper, which answers it, and the
    // connection carries on.
    s.write_all(
        b"POST /v2/lib/app/blobs/uploads/ HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    let (status, head, _) = response(&mut s, &mut buf, false).await;
    // Push is not enabled in this configuration: hyper's answer is the OCI refusal.
    assert_eq!(status, 405, "{head}");
    s.write_all(
        format!("GET /v2/lib/app/blobs/{d} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (status, _, body) = response(&mut s, &mut buf, false).await;
    assert_eq!(status, 200);
    same(&body, &data);
    // Connection: close is honoured.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty() && buf.is_empty());
    assert_eq!(up.blob_gets(&d), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_heads_and_smuggling_shapes_are_refused() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    // A head beyond the limit: 431 and closed.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let big = format!("GET /v2/ HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70 * 1024));
    let _ = s.write_all(big.as_bytes()).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // Conflicting framing goes to hyper, which refuses it.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    proxy.stop().await;
}
