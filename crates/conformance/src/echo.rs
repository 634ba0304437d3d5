//! Echo backends with the behaviour of the conformance suite's `echo-basic` server (README §4):
//! the JSON echo, `delay`, `X-Echo-Set-Header`, `/retry/` attempt counting with TCP resets,
//! a WebSocket echo on `/ws`, an h2c-only listener, and a request log for mirror checks.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::websocket;

/// One echo identity: the namespace and pod name it reports, the request-URIs it served, and
/// the per-`uuid` attempt counters of the retry simulation.
pub struct Echo {
    pub namespace: String,
    pub pod: String,
    log: Mutex<Vec<String>>,
    retry_attempts: Mutex<HashMap<String, u64>>,
    /// Local address of the HTTP echo (echo-basic's HTTP_PORT 3000).
    pub http_addr: SocketAddr,
    /// Local address of the h2c-only echo (echo-basic's H2C_PORT 3001).
    pub h2c_addr: SocketAddr,
}

impl Echo {
    /// Starts both listeners of one identity on loopback.
    pub async fn start(namespace: &str, pod_name_prefix: &str) -> anyhow::Result<Arc<Echo>> {
        let http = TcpListener::bind("127.0.0.1:0").await.context("bind echo listener")?;
        let h2c = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind h2c echo listener")?;
        let echo = Arc::new(Echo {
            namespace: namespace.to_string(),
            pod: format!("{pod_name_prefix}-{}-{}", random_name(9), random_name(5)),
            log: Mutex::new(Vec::new()),
            retry_attempts: Mutex::new(HashMap::new()),
            http_addr: http.local_addr()?,
            h2c_addr: h2c.local_addr()?,
        });
        tokio::spawn(serve_http(http, echo.clone()));
        tokio::spawn(serve_h2c(h2c, echo.clone()));
        Ok(echo)
    }

    /// How many requests with exactly this request-URI this identity has echoed.
    pub fn served_count(&self, request_uri: &str) -> usize {
        self.log
            .lock()
            .map(|log| log.iter().filter(|u| *u == request_uri).count())
            .unwrap_or(0)
    }

    fn record(&self, request_uri: &str) {
        if let Ok(mut log) = self.log.lock() {
            log.push(request_uri.to_string());
        }
    }
}

/// A lowercase alphanumeric string, for pod-name suffixes (`<prefix>-<a>-<b>`).
fn random_name(len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..len)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

type EchoResponse = Response<Full<Bytes>>;

/// What a handler decided for the connection besides the response.
enum Outcome {
    Reply(EchoResponse),
    /// Close the connection with a TCP RST and no response (retry simulation).
    Reset,
}

async fn serve_http(listener: TcpListener, echo: Arc<Echo>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // A duplicate of the socket lets a handler set SO_LINGER=0 before the connection is
        // dropped, which turns the close into a reset, as echo-basic's hijack does.
        let socket: Option<Arc<OwnedFd>> = stream.as_fd().try_clone_to_owned().ok().map(Arc::new);
        let echo = echo.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let echo = echo.clone();
                let socket = socket.clone();
                async move {
                    match handle_http(req, &echo).await {
                        Outcome::Reply(response) => Ok(response),
                        Outcome::Reset => {
                            if let Some(fd) = socket {
                                let _ = socket2::SockRef::from(&*fd).set_linger(Some(Duration::ZERO));
                            }
                            Err("reset requested")
                        }
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn serve_h2c(listener: TcpListener, echo: Arc<Echo>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let echo = echo.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let echo = echo.clone();
                async move {
                    let is_h2c = req.version() == Version::HTTP_2
                        || req.headers().get(http::header::UPGRADE).is_some_and(|v| v == "h2c");
                    if !is_h2c {
                        return Ok::<_, Infallible>(text_reply(StatusCode::BAD_REQUEST, "Expected h2c request"));
                    }
                    Ok(echo_reply(&req, &echo).await)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle_http(req: Request<Incoming>, echo: &Echo) -> Outcome {
    // echo-basic routes on the path with `//` collapsed; the reported path stays raw.
    let path = req.uri().path().replace("//", "/");
    if path == "/health" {
        return Outcome::Reply(text_reply(StatusCode::OK, "OK"));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return Outcome::Reply(
            match code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
                Some(status) => text_reply(status, ""),
                None => text_reply(StatusCode::BAD_REQUEST, "invalid status code"),
            },
        );
    }
    if path == "/ws" && websocket::is_upgrade(req.headers()) {
        return Outcome::Reply(websocket::accept(req));
    }
    if path.starts_with("/retry/")
        && let Some(outcome) = retry_failure(&req, echo).await
    {
        return outcome;
    }
    Outcome::Reply(echo_reply(&req, echo).await)
}

/// The `/retry/` simulation (README §4.4): fails while fewer than `succeedAfter` attempts were
/// made for this `uuid`; `None` means the attempt succeeds and gets the normal echo.
async fn retry_failure(req: &Request<Incoming>, echo: &Echo) -> Option<Outcome> {
    let query = query_pairs(req.uri().query().unwrap_or(""));
    let Some(uuid) = query.get("uuid") else {
        return Some(Outcome::Reply(text_reply(StatusCode::BAD_REQUEST, "uuid is required")));
    };
    let Some(succeed_after) = query.get("succeedAfter").and_then(|v| v.parse::<u64>().ok()) else {
        return Some(Outcome::Reply(text_reply(
            StatusCode::BAD_REQUEST,
            "succeedAfter is required",
        )));
    };
    let fail = {
        let mut attempts = echo.retry_attempts.lock().ok()?;
        let count = attempts.entry(uuid.clone()).or_insert(0);
        if *count < succeed_after {
            *count += 1;
            true
        } else {
            false
        }
    };
    if !fail {
        return None;
    }
    if let Some(delay) = query.get("delayRetry").and_then(|d| parse_go_duration(d)) {
        tokio::time::sleep(delay).await;
    }
    let status = query
        .get("responseCode")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok());
    Some(match status {
        Some(status) => Outcome::Reply(text_reply(status, "")),
        None => Outcome::Reset,
    })
}

/// The JSON echo of README §4.1, after the optional `delay`.
async fn echo_reply<B>(req: &Request<B>, echo: &Echo) -> EchoResponse {
    let query = query_pairs(req.uri().query().unwrap_or(""));
    if let Some(delay) = query.get("delay") {
        match parse_go_duration(delay) {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                let body = json!({"message": format!("invalid delay {delay:?}")}).to_string();
                return json_reply(StatusCode::INTERNAL_SERVER_ERROR, body, &HeaderMap::new());
            }
        }
    }
    let request_uri = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    echo.record(request_uri);
    let host = match req.version() {
        Version::HTTP_2 => req.uri().authority().map(|a| a.as_str()),
        _ => req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()),
    };
    let mut headers = Map::new();
    for (name, value) in req.headers() {
        if name == http::header::HOST {
            continue;
        }
        let entry = headers
            .entry(canonical_header_name(name.as_str()))
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(values) = entry {
            values.push(Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()));
        }
    }
    let proto = match req.version() {
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let body = json!({
        "path": request_uri,
        "host": host.unwrap_or(""),
        "method": req.method().as_str(),
        "proto": proto,
        "headers": headers,
        "httpPort": "3000",
        "namespace": echo.namespace,
        "ingress": "",
        "service": "",
        "pod": echo.pod,
    });
    let body = serde_json::to_string_pretty(&body).unwrap_or_default();
    json_reply(StatusCode::OK, body, req.headers())
}

/// A JSON reply carrying first the headers `X-Echo-Set-Header` asks for (README §4.3).
fn json_reply(status: StatusCode, body: String, request_headers: &HeaderMap) -> EchoResponse {
    let mut builder = Response::builder().status(status);
    let mut requested: Vec<(String, String)> = Vec::new();
    for value in request_headers.get_all("x-echo-set-header") {
        for pair in String::from_utf8_lossy(value.as_bytes()).split(',') {
            let Some((name, value)) = pair.trim().split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            match requested.iter_mut().find(|(n, _)| n == name) {
                Some((_, existing)) => {
                    existing.push(',');
                    existing.push_str(value);
                }
                None => requested.push((name.to_string(), value.to_string())),
            }
        }
    }
    for (name, value) in requested {
        builder = builder.header(name, value);
    }
    builder
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| text_reply(StatusCode::INTERNAL_SERVER_ERROR, "bad echo header"))
}

pub fn text_reply(status: StatusCode, text: &'static str) -> EchoResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

/// Go's `textproto.CanonicalMIMEHeaderKey`: `x-header-add` → `X-Header-Add`.
pub fn canonical_header_name(name: &str) -> String {
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

fn query_pairs(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

/// Go's `time.ParseDuration` for the forms the cases use: one or more `<number><unit>` parts
/// with units ns, us, µs, ms, s, m, h.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(number * seconds).ok()?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("x"), None);
    }

    #[test]
    fn header_names_are_canonical() {
        assert_eq!(canonical_header_name("x-header-add"), "X-Header-Add");
        assert_eq!(canonical_header_name("USER-AGENT"), "User-Agent");
    }
}
