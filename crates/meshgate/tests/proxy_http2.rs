//! meshgate's own HTTP/2 server codec through a real meshgate process: real clients (hyper's
//! HTTP/2 client) for streams, bodies, trailers and cancellation, and raw frames over TCP for
//! what RFC 9113 requires of malformed or abusive input.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::*;

fn config(port: u16, echo: &Echo) -> String {
    format!(
        r#"{gw}{se}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: echo
spec:
  hosts: ["*"]
  gateways: ["gw"]
  http:
  - route:
    - destination:
        host: echo.test
"#,
        gw = gateway("gw", port),
        se = service_entry("echo", "echo.test", &[(echo.port(), "v1")]),
    )
}

// ----- raw frames -----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A raw string literal: its length as a 7-bit-prefix integer (RFC 7541 §5.1), then itself.
fn string(out: &mut Vec<u8>, s: &str) {
    let mut len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s.as_bytes());
}

/// A header block of literals without indexing, with literal names (RFC 7541 §6.2.2).
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0);
        string(&mut out, name);
        string(&mut out, value);
    }
    out
}

fn request_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut fields = vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "echo.test"),
    ];
    fields.extend_from_slice(extra);
    block(&fields)
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// A client connection speaking raw frames: preface and empty SETTINGS already sent.
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    fn connect(port: u16) -> RawClient {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        stream.write_all(PREFACE).expect("preface");
        stream.write_all(&frame(SETTINGS, 0, 0, &[])).expect("settings");
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed the connection; what it answered is still read.
        let _ = self.stream.write_all(bytes);
    }

    /// The next frame, or `None` once the server closed the connection.
    fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16) | (usize::from(self.buf[1]) << 8) | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]),
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The first frame of `kind` (on `stream`, if given), skipping others.
    fn expect(&mut self, kind: u8, stream: Option<u32>) -> Frame {
        while let Some(f) = self.next() {
            if f.kind == kind && stream.is_none_or(|s| s == f.stream) {
                return f;
            }
        }
        panic!("connection closed before a frame of type {kind}");
    }

    /// The error code of the GOAWAY that ends the connection.
    fn goaway_code(&mut self) -> u32 {
        let f = self.expect(GOAWAY, None);
        u32::from_be_bytes([f.payload[4], f.payload[5], f.payload[6], f.payload[7]])
    }

    /// Whether the server answers a request on `stream` with a response (HEADERS).
    fn answers(&mut self, stream: u32) -> bool {
        self.send(&frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            stream,
            &request_block("/ok", &[]),
        ));
        while let Some(f) = self.next() {
            if f.stream == stream && f.kind == HEADERS {
                return true;
            }
            if f.kind == GOAWAY || (f.stream == stream && f.kind == RST_STREAM) {
                return false;
            }
        }
        false
    }
}

fn rst_code(f: &Frame) -> u32 {
    u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]])
}

const PROTOCOL_ERROR: u32 = 0x1;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const COMPRESSION_ERROR: u32 = 0x9;

#[test]
fn connection_errors_end_with_goaway_and_the_right_code() {
    let echo = Echo::start("h2");
    let port = free_port();
    let _proxy = Proxy::start(&config(port, &echo));

    // A stream id from the server's range.
    let mut c = RawClient::connect(port);
    c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 2, &request_block("/", &[])));
    assert_eq!(c.goaway_code(), PROTOCOL_ERROR);

    // A frame over the 16,384-octet maximum.
    let mut c = RawClient::connect(port);
    c.send(&frame(DATA, 0, 1, &vec![0; 16_385]));
    assert_eq!(c.goaway_code(), FRAME_SIZE_ERROR);

    // A header block that does not decode (index 0).
    let mut c = RawClient::connect(port);
    c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &[0x80]));
    assert_eq!(c.goaway_code(), COMPRESSION_ERROR);

    // A header block interrupted by another frame.
    let mut c = RawClient::connect(port);
    c.send(&frame(HEADERS, END_STREAM, 1, &request_block("/", &[])));
    c.send(&frame(PING, 0, 0, &[0; 8]));
    assert_eq!(c.goaway_code(), PROTOCOL_ERROR);

    // DATA on a stream both sides have closed (§5.1).
    let mut c = RawClient::connect(port);
    c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &request_block("/", &[])));
    while c.expect(DATA, Some(1)).flags & END_STREAM == 0 {}
    c.send(&frame(DATA, END_STREAM, 1, b"late"));
    assert_eq!(c.goaway_code(), STREAM_CLOSED);

    // A client that does not speak HTTP/2 after all.
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n").expect("write");
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    let mut kinds = Vec::new();
    while rest.len() >= 9 {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        kinds.push(rest[3]);
        rest.drain(..(9 + len).min(rest.len()));
    }
    assert_eq!(kinds.last(), Some(&GOAWAY), "frames before the close: {kinds:?}");
    assert_eq!(echo.count(), 1, "only the one valid request reached the upstream");
}

#[test]
fn malformed_requests_are_reset_and_the_connection_keeps_serving() {
    let echo = Echo::start("h2");
    let port = free_port();
    let _proxy = Proxy::start(&config(port, &echo));
    let mut c = RawClient::connect(port);
    let cases: [(&str, Vec<u8>); 6] = [
        ("upper-case name", request_block("/", &[("X-Upper", "1")])),
        (
            "connection-specific field",
            request_block("/", &[("connection", "close")]),
        ),
        ("TE other than trailers", request_block("/", &[("te", "gzip")])),
        (
            "no :path",
            block(&[(":method", "GET"), (":scheme", "http"), (":authority", "a")]),
        ),
        (
            "pseudo-header after a regular field",
            block(&[(":method", "GET"), ("x-a", "1"), (":scheme", "http"), (":path", "/")]),
        ),
        ("value with surrounding space", request_block("/", &[("x-a", " 1")])),
    ];
    let mut id = 1;
    for (what, block) in &cases {
        c.send(&frame(HEADERS, END_STREAM | END_HEADERS, id, block));
        let f = c.expect(RST_STREAM, Some(id));
        assert_eq!(rst_code(&f), PROTOCOL_ERROR, "{what}");
        id += 2;
    }
    assert_eq!(echo.count(), 0, "no malformed request reached the upstream");
    // A content-length the body does not match.
    c.send(&frame(
        HEADERS,
        END_HEADERS,
        id,
        &request_block("/", &[("content-length", "10")]),
    ));
    c.send(&frame(DATA, END_STREAM, id, b"short"));
    assert_eq!(
        rst_code(&c.expect(RST_STREAM, Some(id))),
        PROTOCOL_ERROR,
        "content-length"
    );
    id += 2;
    assert!(c.answers(id), "the connection still serves");
}

#[test]
fn ping_settings_and_window_updates_are_answered() {
    let echo = Echo::start("h2");
    let port = free_port();
    let _proxy = Proxy::start(&config(port, &echo));
    let mut c = RawClient::connect(port);
    let settings = c.expect(SETTINGS, None);
    assert_eq!(settings.flags, 0, "the server's own SETTINGS come first");
    // MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE and MAX_HEADER_LIST_SIZE are announced.
    let ids: Vec<u16> = settings
        .payload
        .chunks(6)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .collect();
    assert_eq!(ids, [3, 4, 6]);
    assert_eq!(c.expect(SETTINGS, None).flags, 1, "our SETTINGS are acknowledged");
    c.send(&frame(PING, 0, 0, b"12345678"));
    let pong = c.expect(PING, None);
    assert_eq!((pong.flags, &pong.payload[..]), (1, &b"12345678"[..]));
    // A window of 1 octet: the 2-octet body "ok" comes one octet per WINDOW_UPDATE.
    c.send(&frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 1]));
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &request_block("/bytes/2", &[]),
    ));
    c.expect(HEADERS, Some(1));
    let first = c.expect(DATA, Some(1));
    assert_eq!((first.payload.len(), first.flags), (1, 0));
    c.send(&frame(WINDOW_UPDATE, 0, 1, &1u32.to_be_bytes()));
    let second = c.expect(DATA, Some(1));
    assert_eq!((second.payload.len(), second.flags), (1, END_STREAM));
    // A zero increment on a stream resets it; on the connection it ends it.
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        3,
        &request_block("/delay/500", &[]),
    ));
    c.send(&frame(WINDOW_UPDATE, 0, 3, &0u32.to_be_bytes()));
    assert_eq!(rst_code(&c.expect(RST_STREAM, Some(3))), PROTOCOL_ERROR);
    c.send(&frame(WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes()));
    assert_eq!(c.goaway_code(), PROTOCOL_ERROR);
}

#[test]
fn header_blocks_may_continue_and_oversized_ones_get_431() {
    let echo = Echo::start("h2");
    let port = free_port();
    let _proxy = Proxy::start(&config(port, &echo));
    let mut c = RawClient::connect(port);
    let block = request_block("/split", &[("x-long", &"v".repeat(100))]);
    let (a, b) = block.split_at(block.len() / 2);
    c.send(&frame(HEADERS, END_STREAM, 1, a));
    c.send(&frame(CONTINUATION, END_HEADERS, 1, b));
    assert!(c.expect(HEADERS, Some(1)).flags & END_HEADERS != 0);
    // 64 KiB of fields, past the 60 KiB list limit, over several CONTINUATIONs.
    let big: Vec<(String, String)> = (0..64).map(|i| (format!("x-{i}"), "v".repeat(1000))).collect();
    let fields: Vec<(&str, &str)> = big.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let block = request_block("/big", &fields);
    let mut chunks = block.chunks(16_000).peekable();
    c.send(&frame(HEADERS, END_STREAM, 3, chunks.next().expect("chunk")));
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() { END_HEADERS } else { 0 };
        c.send(&frame(CONTINUATION, flags, 3, chunk));
    }
    let response = c.expect(HEADERS, Some(3));
    assert!(
        response.payload.windows(3).any(|w| w == b"431"),
        "431 Request Header Fields Too Large"
    );
    assert!(c.answers(5), "the connection still serves");
    assert_eq!(echo.count(), 2);
}

// ----- real clients -----

/// One HTTP/2 connection (h2c with prior knowledge) to the proxy.
async fn h2_connection<B>(port: u16) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_streams_with_bodies_on_one_connection() {
    let echo = Echo::start("h2");
    let port = free_port();
    let _proxy = Proxy::start(&config(port, &echo));
    let mut sender = h2_connection(port).await;
    let mut calls = Vec::new();
    for i in 0..100u64 {
        sender.ready().await.expect("ready");
        // Bodies from empty to 200 KiB: several windows' worth in flight at once.
        let len = i * 2048;
        let req = http::Request::post(format!("http://echo.test/echo/{i}"))
            .body(sized_body(len))
            .expect("request");
        let call = sender.send_request(req);
        calls.push(tokio::spawn(async move {
            let resp = call.await.expect("response");
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let j: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(j["body_len"], len, "stream {i}");
            assert_eq!(j["path"], format!("/echo/{i}"));
        }));
    }
    for call in calls {
        call.await.expect("stream");
    }
    assert_eq!(echo.count(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_flat_memory() {
    const SIZE: u64 = 256 << 20;
    let echo = Echo::start("h2");
    let port = free_port();
    let proxy = Proxy::start(&config(port, &echo));
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    stream_both_ways(&h2, port, SIZE, false, sized_body).await;
    let peak = peak_rss_kib(proxy.child.id());
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB after moving 512 MiB over HTTP/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_is_logged_dc_and_others_carry_on() {
    let echo = Echo::start("h2");
    let port = free_port();
    let dir = scratch_dir("h2-dc");
    let log = dir.join("access.log");
    let proxy = Proxy::start_with(&config(port, &echo), &["--access-log", log.to_str().expect("utf-8")]);
    let mut sender = h2_connection(port).await;
    let slow = sender.send_request(
        http::Request::get("http://echo.test/delay/300")
            .body(sized_body(0))
            .expect("request"),
    );
    // Dropping the response future resets the stream (RST_STREAM CANCEL).
    assert!(tokio::time::timeout(Duration::from_millis(50), slow).await.is_err());
    let ok = sender
        .send_request(
            http::Request::get("http://echo.test/ok")
                .body(sized_body(0))
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(ok.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(text.contains("\"GET /delay/300 HTTP/2\" 0 DC "), "{text}");
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    assert!(
        metrics.contains("meshgate_response_flags_total{flag=\"DC\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hyper_http2_server_is_still_available() {
    let echo = Echo::start("h2");
    let port = free_port();
    let _proxy = Proxy::start_with(&config(port, &echo), &["--http2-server", "hyper"]);
    let r = send(&client(true), get(port, "/h2", "echo.test", &[]))
        .await
        .expect("h2c request");
    assert_eq!(r.status, 200);
}

#[test]
fn sigterm_sends_goaway_and_lets_streams_in_flight_finish() {
    let echo = Echo::start("h2");
    let port = free_port();
    let proxy = Proxy::start(&config(port, &echo));
    let mut c = RawClient::connect(port);
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &request_block("/delay/400", &[]),
    ));
    std::thread::sleep(Duration::from_millis(100));
    std::process::Command::new("kill")
        .args(["-TERM", &proxy.child.id().to_string()])
        .status()
        .expect("kill");
    // GOAWAY first: NO_ERROR, and stream 1 is the last one the proxy will process (§6.8).
    let goaway = c.expect(GOAWAY, None);
    assert_eq!(&goaway.payload[..8], &[0, 0, 0, 1, 0, 0, 0, 0]);
    // A stream opened after it is refused; the one in flight is answered.
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        3,
        &request_block("/late", &[]),
    ));
    let mut answered = false;
    let mut refused = false;
    while let Some(f) = c.next() {
        match (f.kind, f.stream) {
            (HEADERS, 1) => answered = true,
            (RST_STREAM, 3) => refused = rst_code(&f) == 0x7,
            (DATA, 1) if f.flags & END_STREAM != 0 => {}
            _ => {}
        }
    }
    assert!(answered, "the stream in flight got its response");
    assert!(refused, "the stream opened after GOAWAY was refused (REFUSED_STREAM)");
    assert_eq!(echo.count(), 1);
}

#[test]
fn an_idle_connection_is_sent_goaway_and_closed_but_not_while_a_stream_is_open() {
    let echo = Echo::start("h2");
    let port = free_port();
    let _proxy = Proxy::start_with(&config(port, &echo), &["--idle-timeout", "1s"]);
    let mut c = RawClient::connect(port);
    // A stream open for longer than the timeout keeps the connection.
    let started = Instant::now();
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &request_block("/delay/1600", &[]),
    ));
    c.expect(HEADERS, Some(1));
    assert!(started.elapsed() >= Duration::from_millis(1600));
    // Idle from here: GOAWAY (NO_ERROR, last stream 1) after 1 s, at most a timer tick late.
    let idle = Instant::now();
    let goaway = c.expect(GOAWAY, None);
    let waited = idle.elapsed();
    assert_eq!(&goaway.payload[..8], &[0, 0, 0, 1, 0, 0, 0, 0]);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(2500),
        "GOAWAY after {waited:?}"
    );
    // A stream the client opens after it: refused cleanly (safe to retry), not lost.
    c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        3,
        &request_block("/late", &[]),
    ));
    let refused = c.expect(RST_STREAM, Some(3));
    assert_eq!(rst_code(&refused), 0x7, "REFUSED_STREAM");
    // Then the connection closes, after Envoy's 5 s drain time.
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let draining = Instant::now();
    assert!(c.next().is_none(), "the connection closes after GOAWAY");
    let drained = idle.elapsed();
    assert!(
        drained >= Duration::from_secs(5) && drained < Duration::from_secs(8),
        "closed {drained:?} after going idle ({:?} after the refusal)",
        draining.elapsed()
    );
    assert_eq!(echo.count(), 1);
}

#[test]
fn a_client_that_never_sends_the_preface_is_disconnected() {
    let echo = Echo::start("h2");
    let port = free_port();
    let _proxy = Proxy::start_with(&config(port, &echo), &["--request-headers-timeout", "1s"]);
    // TLS clients choose HTTP/2 by ALPN before any frame; over h2c the preface's first octets
    // choose it. Either way the rest of the preface must follow in time.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    stream.write_all(&PREFACE[..8]).expect("partial preface");
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(2500),
        "closed after {waited:?}"
    );
    // Whatever came first, it was no response: only the server's SETTINGS preface.
    assert!(rest.len() < 64, "{} bytes", rest.len());
}
