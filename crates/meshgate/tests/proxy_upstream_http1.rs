//! The HTTP/1.1 upstream side on the wire, through a real meshgate process: a scripted upstream
//! answers with exact bytes (chunked with extensions and trailers, read-to-close bodies,
//! interim 1xx responses, heads split across writes, `Connection: close`, an idle connection
//! closed by the upstream, malformed and oversized heads), and records the requests it got,
//! so request framing and connection reuse are checked where the upstream sees them.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;

/// An upstream that answers each request with the bytes its path asks for.
struct ScriptedUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Each request's head and body as received, in order.
    requests: Arc<Mutex<Vec<String>>>,
}

impl ScriptedUpstream {
    fn start() -> Self {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (a, r) = (accepted.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().take(200) {
                let Ok(stream) = stream else { return };
                a.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                std::thread::spawn(move || serve(stream, &r));
            }
        });
        ScriptedUpstream {
            addr,
            accepted,
            requests,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn last_request(&self) -> String {
        self.requests.lock().expect("lock").last().cloned().unwrap_or_default()
    }
}

/// Reads one request (head, then a Content-Length or chunked body) off `stream`.
fn read_request(stream: &mut StdStream, pending: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).ok().filter(|&n| n > 0)?;
        pending.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    pending.drain(..head_end);
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.starts_with("post /duplex ") || lower.starts_with("post /reject-early ") {
        // Answers from the head alone; `serve` reads the body while it responds, or never.
    } else if lower.contains("transfer-encoding: chunked") {
        // Up to the last chunk and the empty trailer section.
        loop {
            if let Some(i) = pending.windows(5).position(|w| w == b"0\r\n\r\n") {
                body = pending.drain(..i + 5).collect();
                break;
            }
            let n = stream.read(&mut chunk).ok().filter(|&n| n > 0)?;
            pending.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        while pending.len() < len {
            let n = stream.read(&mut chunk).ok().filter(|&n| n > 0)?;
            pending.extend_from_slice(&chunk[..n]);
        }
        body = pending.drain(..len).collect();
    }
    Some((head, body))
}

fn serve(mut stream: StdStream, requests: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut pending = Vec::new();
    while let Some((head, body)) = read_request(&mut stream, &mut pending) {
        let seen = format!("{head}{}", String::from_utf8_lossy(&body));
        requests.lock().expect("lock").push(seen.clone());
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let head_request = head.starts_with("HEAD ");
        let write = |s: &mut StdStream, bytes: &[u8]| s.write_all(bytes).is_ok();
        let ok = match path.as_str() {
            "/chunked" => write(
                &mut stream,
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n",
            ),
            "/interim" => write(
                &mut stream,
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
            ),
            "/split" => {
                let parts: [&[u8]; 4] = [b"HTTP/1.1 200 OK\r\ncontent-le", b"ngth: 12\r\n\r\nhel", b"lo wo", b"rld!"];
                parts.iter().all(|p| {
                    std::thread::sleep(Duration::from_millis(30));
                    write(&mut stream, p)
                })
            }
            "/no-content" => write(&mut stream, b"HTTP/1.1 204 No Content\r\n\r\n"),
            "/duplex" => {
                // Full duplex: the response starts before the request body is read, and ends
                // with what the body turned out to be.
                write(&mut stream, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\nstarted \r\n");
                let len: usize = head
                    .to_ascii_lowercase()
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut chunk = [0u8; 4096];
                while pending.len() < len {
                    match stream.read(&mut chunk) {
                        Ok(n) if n > 0 => pending.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let got: Vec<u8> = pending.drain(..len).collect();
                let tail = format!("got {} bytes", got.len());
                write(&mut stream, format!("{:X}\r\n{tail}\r\n0\r\n\r\n", tail.len()).as_bytes())
            }
            "/reject-early" => {
                // Refuses the body unread and closes, which resets the connection while the
                // proxy is still sending it.
                write(&mut stream, b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big\n");
                return;
            }
            "/close-delimited" => {
                write(&mut stream, b"HTTP/1.1 200 OK\r\n\r\nuntil the end");
                return;
            }
            "/conn-close" => {
                write(&mut stream, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
                return;
            }
            "/fin-after" => {
                // Closes the connection after answering, without saying so first.
                write(&mut stream, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            "/garbage" => write(&mut stream, b"SMTP ready\r\n\r\n"),
            "/two-lengths" => write(
                &mut stream,
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            ),
            "/te-and-cl" => write(
                &mut stream,
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            ),
            "/listed" => write(
                &mut stream,
                b"HTTP/1.1 200 OK\r\nconnection: keep-alive, x-private\r\nx-private: secret\r\nx-kept: yes\r\nkeep-alive: timeout=5\r\ncontent-length: 2\r\n\r\nok",
            ),
            "/huge-head" => {
                let big = "x".repeat(70 * 1024);
                write(&mut stream, format!("HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 2\r\n\r\nok").as_bytes())
            }
            "/short" => {
                write(&mut stream, b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabcd");
                return;
            }
            _ => {
                let len = seen.len();
                let mut out = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {len}\r\n\r\n");
                if !head_request {
                    out.push_str(&seen);
                }
                write(&mut stream, out.as_bytes())
            }
        };
        if !ok {
            return;
        }
    }
}

fn config(port: u16, upstream: u16) -> String {
    format!(
        r#"{gw}{se}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app}}
spec:
  hosts: ["*"]
  gateways: ["gw"]
  http:
  - route:
    - destination:
        host: app.test
"#,
        gw = gateway("gw", port),
        se = service_entry("app", "app.test", &[(upstream, "v1")]),
    )
}

async fn get_path(port: u16, path: &str) -> Reply {
    send(&client(false), get(port, path, "app.test", &[]))
        .await
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_framings_arrive_whole() {
    let upstream = ScriptedUpstream::start();
    let port = free_port();
    let _proxy = Proxy::start(&config(port, upstream.addr.port()));

    let r = get_path(port, "/chunked").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "hello world"),
        "chunk extensions skipped"
    );
    let r = get_path(port, "/interim").await;
    assert_eq!((r.status, r.body.as_str()), (200, "final"), "interim responses skipped");
    let r = get_path(port, "/split").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "hello world!"),
        "head and body across writes"
    );
    let r = get_path(port, "/close-delimited").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "until the end"),
        "body read to the close"
    );
    let r = get_path(port, "/no-content").await;
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    // Hop-by-hop fields, and those `Connection` lists, stop at the proxy.
    let r = get_path(port, "/listed").await;
    assert_eq!((r.status, r.header("x-kept")), (200, Some("yes")));
    for name in ["x-private", "connection", "keep-alive"] {
        assert!(r.header(name).is_none(), "{name} reached the client");
    }

    // The chunked body's trailers reach an HTTP/2 client.
    let h2 = client(true);
    let resp = h2
        .request(get(port, "/chunked", "app.test", &[("te", "trailers")]))
        .await
        .expect("h2 request");
    let collected = resp.into_body().collect().await.expect("h2 body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers.get("x-checksum").map(|v| v.as_bytes()), Some(&b"abc"[..]));
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"hello world"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_unless_the_upstream_ends_them() {
    let upstream = ScriptedUpstream::start();
    let port = free_port();
    let _proxy = Proxy::start(&config(port, upstream.addr.port()));

    for _ in 0..3 {
        assert_eq!(get_path(port, "/echo").await.status, 200);
    }
    let head = client(false)
        .request(
            http::Request::head(format!("http://127.0.0.1:{port}/echo"))
                .header("host", "app.test")
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("HEAD");
    assert_eq!(head.status(), 200);
    assert_eq!(get_path(port, "/no-content").await.status, 204);
    assert_eq!(get_path(port, "/chunked").await.body, "hello world");
    assert_eq!(
        upstream.accepted(),
        1,
        "keep-alive responses, HEAD, 204 and chunked share one connection"
    );

    assert_eq!(get_path(port, "/conn-close").await.body, "ok");
    assert_eq!(get_path(port, "/echo").await.status, 200);
    assert_eq!(upstream.accepted(), 2, "`connection: close` ends the connection");

    assert_eq!(get_path(port, "/close-delimited").await.body, "until the end");
    assert_eq!(get_path(port, "/echo").await.status, 200);
    assert_eq!(upstream.accepted(), 3, "a body read to the close ends the connection");

    // RFC 9112 §6.3: Transfer-Encoding wins over Content-Length, and the connection closes.
    assert_eq!(get_path(port, "/te-and-cl").await.body, "ok");
    assert_eq!(get_path(port, "/echo").await.status, 200);
    assert_eq!(
        upstream.accepted(),
        4,
        "a response with both framings ends the connection"
    );

    // The upstream closes an idle connection without a word: the next request notices and
    // goes out on a new one instead of failing.
    assert_eq!(get_path(port, "/fin-after").await.body, "ok");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = get_path(port, "/echo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(upstream.accepted(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_framed_for_the_upstream() {
    let upstream = ScriptedUpstream::start();
    let port = free_port();
    let _proxy = Proxy::start(&config(port, upstream.addr.port()));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");

    // A GET without a body goes without framing headers.
    assert_eq!(get_path(port, "/echo").await.status, 200);
    let seen = upstream.last_request().to_ascii_lowercase();
    assert!(seen.starts_with("get /echo http/1.1\r\n"), "{seen}");
    assert!(
        !seen.contains("content-length") && !seen.contains("transfer-encoding"),
        "{seen}"
    );
    assert!(seen.contains("host: app.test\r\n"), "{seen}");

    // A Content-Length body keeps its length.
    let (status, _, _) = raw_request(
        addr,
        "POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .expect("POST");
    assert_eq!(status, 200);
    let seen = upstream.last_request().to_ascii_lowercase();
    assert!(
        seen.contains("content-length: 5\r\n") && seen.ends_with("\r\n\r\nhello"),
        "{seen}"
    );

    // A chunked body stays chunked.
    let (status, _, _) = raw_request(
        addr,
        "POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .expect("chunked POST");
    assert_eq!(status, 200);
    let seen = upstream.last_request().to_ascii_lowercase();
    assert!(seen.contains("transfer-encoding: chunked\r\n"), "{seen}");
    assert!(!seen.contains("content-length"), "{seen}");
    let body = seen.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    assert!(
        body.contains("hello") && body.contains(" world") && body.ends_with("0\r\n\r\n"),
        "{body:?}"
    );

    // An HTTP/2 request body without a length goes chunked.
    let h2 = client(true);
    let req = http::Request::post(format!("http://127.0.0.1:{port}/echo"))
        .header("host", "app.test")
        .body(Full::new(Bytes::from_static(b"from h2")))
        .expect("request");
    let resp = h2.request(req).await.expect("h2 POST");
    assert_eq!(resp.status(), 200);
    let seen = upstream.last_request().to_ascii_lowercase();
    assert!(
        seen.ends_with("from h2") || seen.contains("from h2\r\n0\r\n\r\n"),
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_keeps_flowing_after_an_early_response() {
    let upstream = ScriptedUpstream::start();
    let port = free_port();
    let _proxy = Proxy::start(&config(port, upstream.addr.port()));
    // 16 MiB, more than loopback socket buffers hold, so the proxy must keep sending it
    // while it relays the response the upstream already started.
    let body = Bytes::from(vec![b'x'; 16 << 20]);
    let req = http::Request::post(format!("http://127.0.0.1:{port}/duplex"))
        .header("host", "app.test")
        .body(Full::new(body))
        .expect("request");
    let reply = tokio::time::timeout(Duration::from_secs(10), send(&client(false), req))
        .await
        .expect("no deadlock")
        .expect("POST");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "started got 16777216 bytes");
    // The connection finished its request cleanly, so it is reused.
    assert_eq!(get_path(port, "/echo").await.status, 200);
    assert_eq!(upstream.accepted(), 1);
}

/// An upstream that answers before reading a large body and resets the connection: its
/// answer still reaches the client (Envoy relays it too), and the connection is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_before_a_reset_reaches_the_client() {
    use std::io::{Read, Write};
    let upstream = ScriptedUpstream::start();
    let port = free_port();
    let _proxy = Proxy::start(&config(port, upstream.addr.port()));
    // A raw client that keeps sending its 8 MiB body while it reads, and ignores the write
    // error once the proxy stops reading (HTTP clients differ in which of the two they report).
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .write_all(
            format!(
                "POST /reject-early HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\r\n",
                8 << 20
            )
            .as_bytes(),
        )
        .expect("head");
    let mut writer = stream.try_clone().expect("clone");
    let sending = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..128 {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("too big") {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => received.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.starts_with("HTTP/1.1 413 ") && text.ends_with("too big\n"),
        "{text}"
    );
    drop(stream);
    let _ = sending.join();
    assert_eq!(get_path(port, "/echo").await.status, 200);
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_upstream_responses_fail_cleanly() {
    let upstream = ScriptedUpstream::start();
    let port = free_port();
    let proxy = Proxy::start(&config(port, upstream.addr.port()));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");

    let r = get_path(port, "/garbage").await;
    assert_eq!(r.status, 503, "not HTTP: {}", r.body);
    let r = get_path(port, "/huge-head").await;
    assert_eq!(r.status, 503, "head over the limit: {}", r.body);
    let r = get_path(port, "/two-lengths").await;
    assert_eq!(r.status, 503, "Content-Length values that disagree: {}", r.body);

    // A body cut short: the downstream connection ends before a whole response.
    let (status, _, body) = raw_get(addr, "/short", "app.test").expect("short");
    assert!(status == 0 || body.len() < 10, "{status} {body:?}");

    // The proxy keeps serving.
    assert_eq!(get_path(port, "/echo").await.status, 200);
    assert!(!proxy.log_text().contains("panicked"), "{}", proxy.log_text());
}
