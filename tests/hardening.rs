//! Hardening of the client side: slow clients, idle connections, oversized and ambiguous
//! request heads, the connection limit, the per-client download limit, and TLS (modern
//! versions only, certificate reload on SIGHUP in the real binary).

mod fake;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fake::*;
use regcache::units::{ByteSize, HumanDuration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Bound on any single wait in real time, so that a broken server fails the test instead of
/// hanging it. Never reached when things work.
const SAFETY: Duration = Duration::from_secs(20);

/// The same bound in tests on tokio's paused clock, where it costs no real time.
const PAUSED_BOUND: Duration = Duration::from_secs(600);

/// Writes `request` and reads until the server closes; the whole answer as text.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(SAFETY, s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// Status codes of every response in `text`, in order.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// Reads one response with a `Content-Length` body from a kept-alive connection.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        let n = tokio::time::timeout(SAFETY, s.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed mid-response: {:?}", text);
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------
// Timeouts (tokio's paused clock: hyper's timer is tokio's, so no real waiting).
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_slow_loris_is_cut_off_while_other_clients_are_served() {
    let up = FakeUpstream::start().await;
    let data = blob_of(300_000, 1);
    let d = up.add_blob(data.clone());
    let mut cfg = config_for(&up.url());
    cfg.limits.header_read_timeout = HumanDuration(Duration::from_secs(5));
    let proxy = Proxy::start(cfg).await;

    // Headers at one byte per second: 30 s for the whole head.
    let head = b"GET /v2/ HTTP/1.1\r\nHost: slow\r\n\r\n";
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let sent = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for b in head {
                if wr.write_all(&[*b]).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let reader = {
        let cut = cut.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            // Virtual time: the bound costs nothing and turns a hang into a failure.
            let closed = tokio::time::timeout(PAUSED_BOUND, rd.read_to_end(&mut out)).await;
            assert!(closed.is_ok(), "the slow client was never cut off");
            cut.store(true, Ordering::SeqCst);
            (started.elapsed(), out)
        })
    };

    // While it dribbles, a normal client pulls a blob through regcache.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!cut.load(Ordering::SeqCst), "cut off too early");
    let r = client()
        .get(proxy.url(&format!("/v2/lib/x/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &data);

    let (when, answer) = reader.await.unwrap();
    writer.abort();
    assert!(
        when >= Duration::from_secs(5) && when < Duration::from_secs(7),
        "cut off after {when:?}, header_read_timeout is 5s"
    );
    assert!(
        sent.load(Ordering::SeqCst) < head.len(),
        "the slow head was never completed"
    );
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "the slow request was not served"
    );
}

/// A proxy (and its upstream, kept alive with it) with `header_read_timeout` and
/// `idle_timeout` in seconds.
async fn timed_proxy(header_read: u64, idle: u64) -> (FakeUpstream, Proxy) {
    let up = FakeUpstream::start().await;
    let mut cfg = config_for(&up.url());
    cfg.limits.header_read_timeout = HumanDuration(Duration::from_secs(header_read));
    cfg.limits.idle_timeout = HumanDuration(Duration::from_secs(idle));
    let proxy = Proxy::start(cfg).await;
    (up, proxy)
}

/// One `GET /v2/` on `s`, answered 200.
async fn get_v2(s: &mut TcpStream) {
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(s).await.starts_with("HTTP/1.1 200"));
}

/// How long until the server closes `s` (on tokio's paused clock in these tests).
async fn closed_after(s: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(PAUSED_BOUND, s.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "never closed");
    started.elapsed()
}

#[tokio::test(start_paused = true)]
async fn idle_and_silent_connections_are_closed_http1_and_http2() {
    let (_up, proxy) = timed_proxy(10, 60).await;

    // Connected and silent: the protocol is not even known yet.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let t = closed_after(&mut silent).await;
    assert!(
        t >= Duration::from_secs(10) && t < Duration::from_secs(12),
        "{t:?}"
    );

    // HTTP/2 (prior knowledge): the preface and SETTINGS, then no stream at all.
    let mut h2 = TcpStream::connect(proxy.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // A GOAWAY at header_read_timeout; dropped after as long again if ignored.
    let t = closed_after(&mut h2).await;
    assert!(
        t >= Duration::from_secs(10) && t < Duration::from_secs(22),
        "{t:?}"
    );

    // HTTP/1.1 after one request: hyper's header_read_timeout applies to the next head too.
    let mut h1 = TcpStream::connect(proxy.addr).await.unwrap();
    get_v2(&mut h1).await;
    let t = closed_after(&mut h1).await;
    assert!(
        t >= Duration::from_secs(10) && t < Duration::from_secs(12),
        "{t:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn each_request_moves_an_http1_connections_deadline_on() {
    let (_up, proxy) = timed_proxy(10, 60).await;
    let mut h1 = TcpStream::connect(proxy.addr).await.unwrap();
    // Five requests 7 s apart: 35 s in all, each within 10 s of the one before.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(7)).await;
        get_v2(&mut h1).await;
    }
    // Then silence: closed 10 s after the last answer, not sooner.
    let t = closed_after(&mut h1).await;
    assert!(
        t >= Duration::from_secs(10) && t < Duration::from_secs(12),
        "{t:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_http2_connection_idle_after_a_request_is_closed_after_idle_timeout() {
    let (_up, proxy) = timed_proxy(600, 30).await;
    let mut raw = TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // One request on it (HEADERS on stream 1: GET /v2/ via HPACK static entries), then idle.
    let headers: &[u8] = &[
        0x82, // :method GET
        0x86, // :scheme http
        0x41, 0x01, b'x', // :authority x
        0x04, 0x04, b'/', b'v', b'2', b'/', // :path /v2/
    ];
    let mut frame = vec![0, 0, headers.len() as u8, 0x01, 0x05, 0, 0, 0, 1];
    frame.extend_from_slice(headers);
    raw.write_all(&frame).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(PAUSED_BOUND, raw.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "never closed");
    let t = started.elapsed();
    // At idle_timeout a GOAWAY; this client never acknowledges it (nor the PING that comes
    // with it), so the connection is dropped after another idle_timeout.
    assert!(
        t >= Duration::from_secs(30) && t < Duration::from_secs(62),
        "closed after {t:?}, idle_timeout is 30s"
    );
    // A HEADERS frame (type 1) answered stream 1, then came a GOAWAY (type 7).
    let types = frame_types(&got);
    let answered = types.iter().position(|t| *t == 1).expect("HEADERS");
    assert!(types[answered..].contains(&7), "{types:?}");
}

/// Frame types of an HTTP/2 byte stream from the server.
fn frame_types(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while b.len() >= 9 {
        let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
        out.push(b[3]);
        b = &b[(9 + len).min(b.len())..];
    }
    out
}

// ---------------------------------------------------------------------------------------
// Request heads.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn smuggling_inputs_get_400_and_nothing_after_them_is_served() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    let smuggled = "GET /v2/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "Content-Length then Transfer-Encoding",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "Transfer-Encoding then Content-Length",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 44\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "two different Content-Lengths",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!{smuggled}"
            ),
        ),
        (
            "Content-Length list",
            "POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!".into(),
        ),
        (
            "obs-fold",
            "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n".into(),
        ),
        (
            "space before the colon",
            "POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello".into(),
        ),
        (
            "a coding before chunked",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "chunked twice",
            format!(
                "POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            "POST /v2/ HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
        ),
        (
            "bare LF",
            format!("GET /v2/ HTTP/1.1\nHost: x\n\n{smuggled}"),
        ),
        (
            "two Hosts",
            "GET /v2/ HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".into(),
        ),
        ("no Host", "GET /v2/ HTTP/1.1\r\n\r\n".into()),
    ];
    for (what, request) in cases {
        let answer = exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(statuses(&answer), vec![400], "{what}: {answer}");
    }
    // regcache's own refusals carry an OCI body naming the reason.
    let answer = exchange(
        proxy.addr,
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(
        answer.contains("Content-Length and Transfer-Encoding together"),
        "{answer}"
    );
    assert!(answer.contains(r#""code":"UNSUPPORTED""#), "{answer}");
    assert_eq!(up.seen().len(), 0);
}

#[tokio::test]
async fn well_formed_requests_keep_their_connection() {
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(config_for(&up.url())).await;
    // Pipelined: a GET, a request with a body of known length whose bytes look like a request,
    // and a last GET. All three are answered on one connection.
    let body = "GET /v2/ HTTP/1.1\r\nHost: y\r\n\r\n";
    let pipelined = format!(
        "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n\
         PATCH /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}\
         GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let answer = exchange(proxy.addr, pipelined.as_bytes()).await;
    assert_eq!(statuses(&answer), vec![200, 405, 200], "{answer}");
    // A chunked body is accepted, but the connection closes after its answer: nothing that
    // follows is read as a request.
    let answer = exchange(
        proxy.addr,
        b"PATCH /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
          GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&answer), vec![405], "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"));
}

#[tokio::test]
async fn oversized_request_heads_get_431() {
    let up = FakeUpstream::start().await;
    let mut cfg = config_for(&up.url());
    cfg.limits.max_header_bytes = ByteSize(8 << 10);
    cfg.limits.max_headers = 20;
    let proxy = Proxy::start(cfg).await;
    let big = "a".repeat(20_000);
    let cases = [
        (
            "a long header",
            format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
        ),
        (
            "a long request line",
            format!("GET /v2/{big} HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
        (
            "many headers",
            format!(
                "GET /v2/ HTTP/1.1\r\nHost: x\r\n{}\r\n",
                "X-A: a\r\n".repeat(30)
            ),
        ),
    ];
    for (what, request) in cases {
        let answer = exchange(proxy.addr, request.as_bytes()).await;
        let status = statuses(&answer);
        assert!(
            status == vec![431] || status == vec![414],
            "{what}: {answer}"
        );
    }
    // Just under the limits is fine.
    let request = format!(
        "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n{}Connection: close\r\n\r\n",
        "a".repeat(6_000),
        "X-A: a\r\n".repeat(15)
    );
    assert_eq!(
        statuses(&exchange(proxy.addr, request.as_bytes()).await),
        vec![200]
    );
}

// ---------------------------------------------------------------------------------------
// Connections.
// ---------------------------------------------------------------------------------------

/// Soft limit on open files; raised (within the hard limit, with `prlimit`) to `want` when
/// lower. `Err` says why it cannot be.
fn ensure_open_files(want: u64) -> Result<(), String> {
    let read = || -> Option<(u64, String)> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let mut f = line.split_whitespace().skip(3);
        Some((f.next()?.parse().ok()?, f.next()?.to_owned()))
    };
    let (soft, hard) = read().ok_or("cannot read /proc/self/limits")?;
    if soft >= want {
        return Ok(());
    }
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={want}:{hard}"),
        ])
        .status()
        .map_err(|e| format!("prlimit: {e}"))?;
    match read() {
        Some((soft, _)) if status.success() && soft >= want => Ok(()),
        _ => Err(format!(
            "open files limit {soft} (hard {hard}) is below {want} and cannot be raised"
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_do_not_stop_a_pull() {
    // 1,000 connections cost 2,000 descriptors in this process (both ends).
    if let Err(why) = ensure_open_files(2_600) {
        println!("SKIPPED a_thousand_idle_connections_do_not_stop_a_pull: {why}");
        return;
    }
    let up = FakeUpstream::start().await;
    let data = blob_of(2_000_000, 7);
    let d = up.add_blob(data.clone());
    let proxy = Proxy::start(config_for(&up.url())).await;
    let mut idle = Vec::new();
    for i in 0..1000 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        if i % 2 == 1 {
            // Half of them start a request and stop mid-way.
            s.write_all(b"GET /v2/library/x/manifests/1 HTTP/1.1\r\nHo")
                .await
                .unwrap();
        }
        idle.push(s);
    }
    let r = tokio::time::timeout(
        SAFETY,
        client()
            .get(proxy.url(&format!("/v2/lib/x/blobs/{d}")))
            .send(),
    )
    .await
    .expect("the pull is served")
    .unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &data);
    // The idle connections were all still open during the pull: not one was dropped to make
    // room.
    let mut buf = [0u8; 16];
    for (i, s) in idle.iter().enumerate() {
        match s.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("idle connection {i} was not open: {other:?}"),
        }
    }
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_at_once() {
    let up = FakeUpstream::start().await;
    let mut cfg = config_for(&up.url());
    cfg.limits.max_connections = 3;
    let proxy = Proxy::start(cfg).await;
    // Three kept-alive connections, each answered once, so all three are open server-side.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
        open.push(s);
    }
    // A fourth is answered 503 and closed, without waiting for a slot.
    let mut extra = TcpStream::connect(proxy.addr).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(SAFETY, extra.read_to_end(&mut out))
        .await
        .expect("refused at once, not queued")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    // The open ones are still served.
    open[0]
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_response(&mut open[0])
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Once one closes, a new connection gets its slot (as soon as the server has seen the
    // close).
    drop(open.pop());
    let mut served = false;
    for _ in 0..400 {
        let answer = exchange(
            proxy.addr,
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        if answer.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(served, "a freed slot is reused");
}

// ---------------------------------------------------------------------------------------
// Downloads per client.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_download_limit_gets_429_until_one_finishes() {
    let up = FakeUpstream::start().await;
    let cached = blob_of(100_000, 1);
    let small = blob_of(10_000, 2);
    // Larger than the socket buffers, so its answer cannot finish while nobody reads it.
    let large = blob_of(48 << 20, 3);
    let fourth = blob_of(50_000, 4);
    let (dc, ds, dl, d4) = (
        up.add_blob(cached.clone()),
        up.add_blob(small.clone()),
        up.add_blob(large.clone()),
        up.add_blob(fourth.clone()),
    );
    let mut cfg = config_for(&up.url());
    cfg.limits.downloads_per_client = 2;
    let proxy = Proxy::start(cfg).await;
    let url = |d: &str| proxy.url(&format!("/v2/lib/x/blobs/{d}"));
    let c = client();
    let r = c.get(url(&dc)).send().await.unwrap();
    same(&r.bytes().await.unwrap(), &cached);
    until(|| proxy.app.client_downloads(LOCALHOST) == 0).await;

    // Two uncached downloads held open by the upstream.
    let gate = up.gate();
    let small_resp = c.get(url(&ds)).send().await.unwrap();
    let large_resp = c.get(url(&dl)).send().await.unwrap();
    assert_eq!(small_resp.status(), 200);
    assert_eq!(large_resp.status(), 200);
    assert_eq!(proxy.app.client_downloads(LOCALHOST), 2);

    // A third is refused with an OCI error ...
    let r = c.get(url(&d4)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
    // ... while a cache hit and a HEAD are not limited.
    let r = c.get(url(&dc)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &cached);
    let r = c.head(url(&d4)).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "HEAD while at the limit: {:?}",
        r.headers()
    );

    // The small one finishes; the large one stays unread, so it still holds its slot.
    drop(gate);
    up.ungate();
    same(&small_resp.bytes().await.unwrap(), &small);
    until(|| proxy.app.client_downloads(LOCALHOST) == 1).await;
    let r = c.get(url(&d4)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    same(&r.bytes().await.unwrap(), &fourth);
    same(&large_resp.bytes().await.unwrap(), &large);
    until(|| proxy.app.client_downloads(LOCALHOST) == 0).await;
}

// ---------------------------------------------------------------------------------------
// TLS.
// ---------------------------------------------------------------------------------------

fn der(pem: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(pem)
        .unwrap()
        .to_vec()
}

/// What a TLS client learns from one handshake with `addr`.
struct Handshake {
    cert: Vec<u8>,
    alpn: Option<Vec<u8>>,
    version: rustls::ProtocolVersion,
}

async fn handshake(
    addr: SocketAddr,
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Handshake {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio::time::timeout(SAFETY, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let (_, conn) = tls.get_ref();
    Handshake {
        cert: conn.peer_certificates().unwrap()[0].to_vec(),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: conn.protocol_version().unwrap(),
    }
}

/// `openssl s_client` offering only `args` (a version, a cipher list): whether a handshake
/// completed, and what it printed.
fn s_client(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let done = text.contains("Cipher is ") && !text.contains("Cipher is (NONE)");
    (done, text)
}

/// regcache's stdout lines, read by a thread.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    /// Waits (bounded) for a line containing `part`; the line.
    fn wait_for(&self, part: &str) -> String {
        let deadline = std::time::Instant::now() + SAFETY;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) if line.contains(part) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line with {part:?}: {e}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_a_bad_one_keeps_the_old() {
    if Command::new("openssl").arg("version").output().is_err() {
        println!(
            "SKIPPED sighup_reloads_the_certificate_and_a_bad_one_keeps_the_old: no openssl CLI (Debian package openssl) to make certificates"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates(dir.path(), &["one", "two"]);
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(dir.path().join("one.pem"), &cert).unwrap();
    std::fs::copy(dir.path().join("one.key"), &key).unwrap();
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ncache_dir = \"{}\"\nlog_format = \"json\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.path().join("cache").display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .arg("--config")
        .arg(&config)
        .env_remove("REGCACHE_LISTEN")
        .env_remove("REGCACHE_CACHE_DIR")
        .env_remove("REGCACHE_LOG_FORMAT")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Stopped by PID whatever happens below.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let pid = child.id().to_string();
    let mut child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let lines = Lines(rx);
    let ready: serde_json::Value = serde_json::from_str(&lines.wait_for("regcache ready")).unwrap();
    let addr: SocketAddr = ready["listen"].as_str().unwrap().parse().unwrap();
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    let (one, two) = (
        der(&dir.path().join("one.pem")),
        der(&dir.path().join("two.pem")),
    );

    // Modern defaults: TLS 1.3 and 1.2, ALPN h2.
    let h = handshake(addr, &ca, &[&rustls::version::TLS13]).await;
    assert!(h.cert == one);
    assert_eq!(h.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(h.version, rustls::ProtocolVersion::TLSv1_3);
    let h = handshake(addr, &ca, &[&rustls::version::TLS12]).await;
    assert_eq!(h.version, rustls::ProtocolVersion::TLSv1_2);
    // Older versions and non-AEAD suites are refused (the positive control shows the client
    // can talk to it at all).
    let (ok, text) = s_client(addr, &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]);
    assert!(ok, "{text}");
    let (ok, text) = s_client(
        addr,
        &[
            "-tls1_2",
            "-cipher",
            "AES128-SHA:ECDHE-RSA-AES128-SHA:@SECLEVEL=0",
        ],
    );
    assert!(!ok, "a CBC suite was accepted: {text}");
    let (ok, text) = s_client(addr, &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]);
    assert!(!ok, "TLS 1.1 was accepted: {text}");
    assert!(
        !text.contains("no protocols available"),
        "the client did not offer TLS 1.1: {text}"
    );

    // New files and SIGHUP: the new certificate is served, without a restart.
    std::fs::copy(dir.path().join("two.pem"), &cert).unwrap();
    std::fs::copy(dir.path().join("two.key"), &key).unwrap();
    hup();
    lines.wait_for("TLS certificate reloaded");
    assert!(handshake(addr, &ca, &[&rustls::version::TLS13]).await.cert == two);

    // A broken certificate file: the error is logged and the current certificate stays.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    hup();
    let line = lines.wait_for("reload failed");
    assert!(line.contains("tls.cert"), "{line}");
    assert!(handshake(addr, &ca, &[&rustls::version::TLS13]).await.cert == two);
    // A certificate with a key that does not match it: refused the same way.
    std::fs::copy(dir.path().join("one.pem"), &cert).unwrap();
    hup();
    lines.wait_for("reload failed");
    assert!(handshake(addr, &ca, &[&rustls::version::TLS13]).await.cert == two);

    // Still the same process, still serving.
    assert!(child.0.try_wait().unwrap().is_none(), "regcache exited");
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
