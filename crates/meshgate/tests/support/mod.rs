//! End-to-end test support: real echo upstreams on loopback, a real `meshgate proxy` process,
//! and clients that talk to it over real sockets.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A free loopback port for a listener meshgate binds later.
///
/// Ports come from 20000..32000, below Linux's ephemeral range (32768 and up): a port the
/// kernel handed out for `:0` could be taken again by any test's outgoing connection before
/// meshgate binds it, while a port below that range is only ever taken by an explicit bind.
/// The start is spread by process id so parallel test processes rarely probe the same ports,
/// and each port is checked by binding it.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = std::process::id().wrapping_mul(2_654_435_761) ^ nanos;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
        let port = (FIRST + seed.wrapping_add(n.wrapping_mul(7)) % SPAN) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000..32000")
}

/// A unique scratch folder under the system temp dir.
pub fn scratch_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "meshgate-test-{}-{}-{}",
        name,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// An echo upstream: answers every request with a JSON description of what it received
/// (the body's first 64 KiB included as `body`).
///
/// Paths with special meaning: `/delay/MS` answers after MS milliseconds; `/status/NNN`
/// answers with that status; `/bytes/N` streams N
/// bytes; `/trailers` answers with `grpc-status: 0` trailers; an `Upgrade: websocket` request
/// is switched and every byte is echoed back; `/reset-on/NAME` resets the connection (TCP RST)
/// when this echo is called NAME. `/retry...` simulates failing tries as the Gateway API
/// conformance echo does: per `uuid`, the first `succeedAfter` requests wait `delayRetry` (e.g.
/// `300ms`) and then fail with status `responseCode`, or with a connection reset when no
/// `responseCode` is given; later ones are echoed.
pub struct Echo {
    pub name: String,
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
}

/// Per-server state the echo handlers share.
struct EchoState {
    name: String,
    requests: Arc<AtomicUsize>,
    /// `/retry` failures so far, by `uuid`.
    retry_attempts: Mutex<HashMap<String, u32>>,
}

/// The echo's error: hyper closes the connection without a response, and the connection's
/// [`ResettingStream`] then resets it.
type EchoError = Box<dyn std::error::Error + Send + Sync>;

/// A TCP stream closed with RST (`SO_LINGER` 0) instead of FIN when `reset` is set before it
/// is dropped.
struct ResettingStream {
    io: tokio::net::TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettingStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.io.set_zero_linger();
        }
    }
}

impl tokio::io::AsyncRead for ResettingStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ResettingStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Echo {
    /// Starts the server on its own thread (so it works from sync and async tests alike).
    pub fn start(name: &str) -> Echo {
        let std_listener = StdListener::bind("127.0.0.1:0").expect("bind echo");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(EchoState {
            name: name.to_string(),
            requests: requests.clone(),
            retry_attempts: Mutex::default(),
        });
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = state.clone();
                    let reset = Arc::new(AtomicBool::new(false));
                    let io = ResettingStream {
                        io: stream,
                        reset: reset.clone(),
                    };
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| echo(req, state.clone(), reset.clone()));
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(io), svc)
                            .await;
                    });
                }
            });
        });
        Echo {
            name: name.to_string(),
            addr,
            requests,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// The value of query parameter `name`.
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|p| p.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
}

/// `/retry` of the conformance echo: `Some(status)` to fail with, `Some(None)` to reset the
/// connection, `None` to answer normally.
async fn retry_failure(state: &EchoState, query: &str) -> Option<Option<u16>> {
    let uuid = query_param(query, "uuid").unwrap_or("");
    let succeed_after: u32 = query_param(query, "succeedAfter")?.parse().ok()?;
    let fail = {
        let mut attempts = state.retry_attempts.lock().unwrap_or_else(|p| p.into_inner());
        let n = attempts.entry(uuid.to_string()).or_insert(0);
        let fail = *n < succeed_after;
        if fail {
            *n += 1;
        }
        fail
    };
    if !fail {
        return None;
    }
    if let Some(ms) = query_param(query, "delayRetry").and_then(|d| d.strip_suffix("ms")) {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    Some(query_param(query, "responseCode").and_then(|c| c.parse().ok()))
}

async fn echo(
    mut req: Request<Incoming>,
    state: Arc<EchoState>,
    reset: Arc<AtomicBool>,
) -> Result<Response<BoxBody>, EchoError> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let name = state.name.clone();
    let path = req.uri().path().to_string();
    if path.strip_prefix("/reset-on/") == Some(name.as_str()) {
        reset.store(true, Ordering::SeqCst);
        return Err("reset requested".into());
    }
    if path.starts_with("/retry") {
        match retry_failure(&state, req.uri().query().unwrap_or("")).await {
            None => {}
            Some(Some(code)) => {
                return Ok(Response::builder()
                    .status(code)
                    .header("x-echo-name", name.as_str())
                    .body(Full::new(Bytes::from_static(b"failed try")).boxed())
                    .expect("response"));
            }
            Some(None) => {
                reset.store(true, Ordering::SeqCst);
                return Err("reset requested".into());
            }
        }
    }
    if req.headers().get("upgrade").is_some() {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let resp = Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("x-echo-name", name.as_str())
            .body(Full::new(Bytes::new()).boxed())
            .expect("response");
        return Ok(resp);
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let code: u16 = code.parse().unwrap_or(500);
        return Ok(Response::builder()
            .status(code)
            .header("x-echo-name", name.as_str())
            .body(Full::new(Bytes::new()).boxed())
            .expect("response"));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let total: u64 = n.parse().unwrap_or(0);
        let resp = Response::builder()
            .header("content-length", total.to_string())
            .header("x-echo-name", name.as_str())
            .body(BodyExt::boxed(sized_body(total)))
            .expect("response");
        return Ok(resp);
    }
    let mut headers = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .and_modify(|e: &mut String| {
                e.push(',');
                e.push_str(&String::from_utf8_lossy(v.as_bytes()));
            })
            .or_insert_with(|| String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let version = format!("{:?}", req.version());
    // Count the body without keeping it, so huge uploads stay flat in memory.
    let mut body = req.into_body();
    let mut body_len: u64 = 0;
    let mut body_start = Vec::new();
    let mut trailers = BTreeMap::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_len += d.len() as u64;
                    let room = (64 * 1024usize).saturating_sub(body_start.len());
                    body_start.extend_from_slice(&d[..d.len().min(room)]);
                }
                if let Some(t) = f.trailers_ref() {
                    for (k, v) in t {
                        trailers.insert(k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned());
                    }
                }
            }
            Err(_) => break,
        }
    }
    let json = serde_json::json!({
        "name": name, "method": method, "uri": uri, "path": path, "version": version,
        "headers": headers, "body_len": body_len, "trailers": trailers,
        "body": String::from_utf8_lossy(&body_start),
    });
    let data = Bytes::from(json.to_string());
    if path == "/trailers" {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        t.insert("grpc-message", http::HeaderValue::from_static("ok"));
        let body = FrameIter(vec![Frame::data(data), Frame::trailers(t)].into_iter());
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .header("x-echo-name", name.as_str())
            .body(BodyExt::boxed(body))
            .expect("response"));
    }
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("x-echo-name", name.as_str())
        .header("x-upstream-only", "1")
        .body(Full::new(data).boxed())
        .expect("response"))
}

/// A body yielding frames from an iterator, so tests need no stream crate.
pub struct FrameIter<I>(pub I);

impl<I: Iterator<Item = Frame<Bytes>> + Unpin> hyper::body::Body for FrameIter<I> {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.get_mut().0.next().map(Ok))
    }
}

/// `total` bytes of `x`, in 64 KiB frames, generated lazily.
pub fn sized_body(total: u64) -> FrameIter<impl Iterator<Item = Frame<Bytes>> + Unpin + Send + Sync + 'static> {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut left = total;
    FrameIter(std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(chunk.len() as u64) as usize;
        left -= n as u64;
        Some(Frame::data(chunk.slice(..n)))
    }))
}

/// A running `meshgate proxy` process; killed on drop.
pub struct Proxy {
    pub child: Child,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Proxy {
    /// Writes `yaml` to a scratch folder and starts meshgate on it, waiting for `/ready`.
    pub fn start(yaml: &str) -> Proxy {
        Self::start_with(yaml, &[])
    }

    pub fn start_with(yaml: &str, extra_args: &[&str]) -> Proxy {
        let dir = scratch_dir("proxy");
        let config = dir.join("config.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let proxy = Self::spawn(&config, extra_args);
        proxy.wait_ready();
        proxy
    }

    /// Starts meshgate without waiting (for tests of start-up failures).
    pub fn spawn(config: &Path, extra_args: &[&str]) -> Proxy {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = config.with_extension("log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args(["proxy", "--config"])
            .arg(config)
            .args([
                "--bind-address",
                "127.0.0.1",
                "--workers",
                "1",
                "--admin-addr",
                &admin.to_string(),
            ])
            .args(extra_args)
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("spawn meshgate");
        Proxy {
            child,
            admin,
            config: config.to_path_buf(),
            log,
        }
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((200, _, _)) = raw_get(self.admin, "/ready", "admin") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("meshgate did not become ready; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let (status, _, body) = raw_get(self.admin, path, "admin").expect("admin request");
        (status, body)
    }

    pub fn config_version(&self) -> u64 {
        let (_, metrics) = self.admin_get("/stats/prometheus");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("meshgate_config_version "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Rewrites the config file and waits until the proxy reports a newer config version.
    pub fn reload_with(&self, yaml: &str) {
        let before = self.config_version();
        std::fs::write(&self.config, yaml).expect("rewrite config");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.config_version() > before {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("config was not reloaded within 5 s; log:\n{}", self.log_text());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status, lower-cased headers and body of a response read off a raw socket.
pub type RawResponse = (u16, Vec<(String, String)>, String);

/// A minimal blocking HTTP/1.1 GET with `Connection: close`: (status, headers, body).
pub fn raw_get(addr: SocketAddr, path: &str, host: &str) -> std::io::Result<RawResponse> {
    raw_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
}

/// Sends raw bytes and parses the (single) response; a closed connection without a response
/// is reported as status 0.
pub fn raw_request(addr: SocketAddr, request: &str) -> std::io::Result<RawResponse> {
    let mut stream = StdStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    Ok(parse_response(&buf))
}

pub fn parse_response(buf: &[u8]) -> RawResponse {
    let text = String::from_utf8_lossy(buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (0, Vec::new(), String::new());
    };
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    (status, headers, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A pooled async HTTP client (HTTP/1.1, or h2c prior knowledge with `http2`).
pub fn client(
    http2: bool,
) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http()
}

/// A response read whole.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The echo upstream's name that served the request.
    pub fn served_by(&self) -> String {
        self.header("x-echo-name").unwrap_or("").to_string()
    }
}

/// Sends `req` with `client` and reads the whole response.
pub async fn send(
    client: &hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Reply, String> {
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Builds a GET to the proxy's `port` with a Host header and extra headers.
pub fn get(port: u16, path: &str, host: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(format!("http://127.0.0.1:{port}{path}")).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

/// A ServiceEntry giving `host` one static loopback endpoint per (port, labels).
pub fn service_entry(name: &str, host: &str, endpoints: &[(u16, &str)]) -> String {
    let mut eps = String::new();
    for (port, version) in endpoints {
        eps.push_str(&format!(
            "  - address: 127.0.0.1\n    ports:\n      http: {port}\n    labels:\n      version: {version}\n"
        ));
    }
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\nspec:\n  hosts:\n  - {host}\n  resolution: STATIC\n  ports:\n  - number: 80\n    name: http\n    protocol: HTTP\n  endpoints:\n{eps}---\n"
    )
}

/// A Gateway on `port` for all hosts, selected by the default `istio: ingressgateway` label.
pub fn gateway(name: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\nspec:\n  selector:\n    istio: ingressgateway\n  servers:\n  - port:\n      number: {port}\n      name: http\n      protocol: HTTP\n    hosts:\n    - \"*\"\n---\n"
    )
}

/// Meshgate's GatewayClass and an `edge` Gateway in namespace `apps` with one HTTP listener.
pub fn edge_gateway(port: u16) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: meshgate}}
spec:
  controllerName: meshgate.io/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: apps}}
spec:
  gatewayClassName: meshgate
  listeners:
  - {{name: http, port: {port}, protocol: HTTP}}
---
"#
    )
}

/// Runs `meshgate analyze PATH`: its exit code and standard output.
pub fn analyze(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .arg("analyze")
        .arg(path)
        .output()
        .expect("run meshgate analyze");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `python3 -m http.server` serving `dir` on `port`: an upstream whose answers a test changes
/// by adding and removing files (a missing file is a 404), or kills to make it go away.
pub fn file_server(port: u16, dir: &Path) -> Child {
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 http.server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// One call to a Kong Admin API: (status, the JSON body or Null). `content_type` is the
/// body's; `token` is sent as `Kong-Admin-Token`.
pub fn admin_call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let token = token.map(|t| format!("Kong-Admin-Token: {t}\r\n")).unwrap_or_default();
    let (status, _, text) = raw_request(
        admin,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\n{token}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .expect("admin call");
    (status, serde_json::from_str(&text).unwrap_or_default())
}

/// A meshgate process serving a Kong Admin API on `database` and a Kong proxy listener (and,
/// with `tls`, a TLS one).
pub struct KongNode {
    pub proxy: Proxy,
    pub admin: SocketAddr,
    pub gateway: SocketAddr,
    pub tls_gateway: Option<SocketAddr>,
}

impl KongNode {
    pub fn start(database: &str, tls: bool) -> KongNode {
        let addr = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().expect("addr") };
        let (admin, gateway) = (addr(), addr());
        let tls_gateway = tls.then(addr);
        let mut args = vec![
            "--admin-api".to_string(),
            admin.to_string(),
            "--admin-api-database".to_string(),
            database.to_string(),
            "--listen".to_string(),
            gateway.to_string(),
        ];
        if let Some(tls_gateway) = tls_gateway {
            args.extend(["--listen-tls".to_string(), tls_gateway.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        KongNode {
            proxy: Proxy::start_with("", &args),
            admin,
            gateway,
            tls_gateway,
        }
    }
}

/// Streams `size` bytes up (`/upload`, the echo counts them) and `size` bytes down
/// (`/bytes/N`, counted here without holding them), through the proxy on `port`.
/// `declare_length` sends the upload's `content-length`.
pub async fn stream_both_ways<C, B>(
    client: &hyper_util::client::legacy::Client<C, B>,
    port: u16,
    size: u64,
    declare_length: bool,
    body: fn(u64) -> B,
) where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let mut up = Request::post(format!("http://127.0.0.1:{port}/upload")).header("host", "echo.test");
    if declare_length {
        up = up.header("content-length", size.to_string());
    }
    let resp = client
        .request(up.body(body(size)).expect("request"))
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let echoed = resp.into_body().collect().await.expect("body").to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&echoed).expect("json");
    assert_eq!(j["body_len"], size);

    let down = Request::get(format!("http://127.0.0.1:{port}/bytes/{size}"))
        .header("host", "echo.test")
        .body(body(0))
        .expect("request");
    let resp = client.request(down).await.expect("download");
    assert_eq!(resp.status(), 200);
    assert_eq!(body_len(resp.into_body()).await, size);
}

/// Reads a process's peak resident memory (VmHWM) in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Reads a response body to its end, frame by frame (never holding it whole), and counts it.
pub async fn body_len(mut body: hyper::body::Incoming) -> u64 {
    use http_body_util::BodyExt;
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.expect("frame").data_ref() {
            total += d.len() as u64;
        }
    }
    total
}
