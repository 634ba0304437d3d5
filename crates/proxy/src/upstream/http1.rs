//! The HTTP/1.1 client side of the proxy, run inside the downstream request's own task.
//!
//! hyper's client keeps each upstream connection in a task of its own and talks to it over
//! channels, so every proxied request crossed tasks four times (request, response head, body
//! frames, connection back to the pool). Here the request's future writes the request and
//! reads the response head itself, and the response body reads from the socket when the
//! downstream side polls it: one task, no channels. A response whose body is already in the
//! buffer with its head (the common small response) hands its connection back to the pool
//! before the downstream write even starts.
//!
//! Framing follows RFC 9112 and hyper's client rules, so what upstreams receive does not
//! change: `Content-Length` when the length is known, else chunked (none for bodiless GET,
//! HEAD and CONNECT); responses by `Transfer-Encoding`, then `Content-Length`, else read to
//! the connection's end. Upgrades (WebSocket) still go through hyper, which owns the tunnel.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use rustls_pki_types::ServerName;
use tokio::io::AsyncWrite;
use tokio::time::Instant;

use super::connector::CountedStream;
use super::pool::ReturnTo;
use super::read_buffer::ReadBuffer;
use crate::body::{BodyError, UpstreamBody, UpstreamResponseBody};
use crate::http1_framing::{ChunkState, Decoded, Length, common_field_name, decode_chunked};

/// Response head bytes accepted from an upstream (Envoy's `max_request_headers_kb` default).
const MAX_HEAD_BYTES: usize = 60 * 1024;
/// Header fields accepted in one response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Request body bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// An upstream HTTP/1.1 connection: the socket and the bytes read but not consumed yet.
pub struct Http1Connection {
    io: CountedStream,
    buf: ReadBuffer,
    /// Where each field of a response head sits, kept to save an allocation per response.
    spans: Vec<FieldSpan>,
    pub opened: Instant,
    /// Requests sent on it so far (for `maxRequestsPerConnection`).
    pub requests: u32,
    /// When it last went idle (for `idleTimeout`).
    pub idle_since: Instant,
    /// The TLS server name it was opened with; only a request for the same name may use it.
    pub server_name: Option<ServerName<'static>>,
    /// Bytes were written that the transport may still hold (TLS records): flush before waiting.
    unflushed: bool,
    /// Its last response was an error to a request with a body, which the upstream may not
    /// have read: it may close the connection right after answering, so the next pick looks
    /// at the socket itself rather than at what the runtime has seen of it.
    suspect: bool,
}

impl Http1Connection {
    pub fn new(io: CountedStream, server_name: Option<ServerName<'static>>) -> Self {
        let now = Instant::now();
        Http1Connection {
            io,
            server_name,
            unflushed: false,
            suspect: false,
            buf: ReadBuffer::default(),
            spans: Vec::new(),
            opened: now,
            requests: 0,
            idle_since: now,
        }
    }

    /// Whether an idle connection can no longer carry a request: anything readable on it (the
    /// upstream's FIN or reset, or bytes nobody asked for) means so. Reads only the readiness
    /// the runtime recorded, so checking costs no system call. (A read that drained the socket
    /// cleared that readiness, so a healthy idle connection shows none.)
    pub fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        if std::mem::take(&mut self.suspect) {
            // One `recv(MSG_PEEK)`: a close or reset that arrived since the response was read
            // shows here even before the runtime has polled for it.
            let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
            return !matches!(
                socket2::SockRef::from(self.io.tcp()).peek(&mut byte),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            );
        }
        // `try_io` runs the closure only when the runtime has readiness recorded, and a check
        // this way registers no waiter (a `ready()` future takes the registration's lock twice).
        self.io.tcp().try_io(tokio::io::Interest::READABLE, || Ok(())).is_ok()
    }

    /// Reads more bytes into the buffer; `Ok(0)` at the connection's end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.poll_fill(&mut self.io, cx)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        self.unflushed |= self.io.buffers_writes();
        Pin::new(&mut self.io).poll_write(cx, bytes)
    }

    /// Pushes out what the transport holds back (only TLS does); plain TCP costs a branch.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.unflushed {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RequestFraming {
    /// No body goes out (also a bodiless GET whose body's length was unknown, as hyper does).
    Empty,
    Length(u64),
    Chunked,
}

/// Writes the request head (`Host` and framing headers settled) and decides the framing.
/// The URI must be in origin form.
pub fn encode_head(parts: &mut Parts, body: &UpstreamBody, address: &str) -> (Vec<u8>, RequestFraming) {
    let framing = request_framing(parts, body);
    let headers = &parts.headers;
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let path = if path.is_empty() { "/" } else { path };
    let mut head = Vec::with_capacity(256 + headers.len() * 32);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(header::HOST) {
        head.extend_from_slice(b"host: ");
        head.extend_from_slice(address.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    (head, framing)
}

/// hyper's client rules: a `Transfer-Encoding` the request carries wins (ending in
/// `chunked`), then a valid `Content-Length`, then the body's known length; an unknown length
/// is chunked, except for GET, HEAD and CONNECT, which are sent without a body.
fn request_framing(parts: &mut Parts, body: &UpstreamBody) -> RequestFraming {
    let empty = body.is_end_stream();
    let exact = body.size_hint().exact();
    let method = &parts.method;
    let headers = &mut parts.headers;
    if empty {
        headers.remove(header::TRANSFER_ENCODING);
        return RequestFraming::Empty;
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        return RequestFraming::Chunked;
    }
    let declared = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .fold(Length::Absent, |length, value| length.and(value.as_bytes()));
    if let Length::Valid(len) = declared {
        return RequestFraming::Length(len);
    }
    if let Some(len) = exact {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        return RequestFraming::Length(len);
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) {
        return RequestFraming::Empty;
    }
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    RequestFraming::Chunked
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Why an exchange failed.
pub enum ExchangeError {
    /// A reused connection turned out closed before any of the request could be written (the
    /// upstream closed it while idle). Nothing of the body was read, so the request can go
    /// again on a fresh connection, as hyper's pool does; the body comes back. A request that
    /// went out is not sent again here: only a route's retry policy may do that.
    Stale(UpstreamBody),
    Failed(String),
}

/// What is known of the request while it goes out.
struct Outgoing {
    body: UpstreamBody,
    framing: RequestFraming,
    /// Body bytes still to send for `Length` framing.
    remaining: u64,
    /// Bytes gathered for the socket, and how many of them were written.
    out: Vec<u8>,
    written: usize,
    /// The body (and chunked terminator) is all in `out`.
    body_done: bool,
    /// The body was polled: from here on the request cannot be sent again.
    body_touched: bool,
    /// Writing to the connection failed (the upstream reset or closed it).
    write_failed: bool,
}

impl Outgoing {
    /// Sends body bytes as they come, until the body is all out (`Ready(Ok)`) or the body or
    /// the socket has nothing ready (`Pending`). `sent` counts the bytes written.
    fn poll_send(
        &mut self,
        conn: &mut Http1Connection,
        sent: &mut usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), String>> {
        loop {
            self.gather(cx)?;
            if self.written == self.out.len() {
                // All written; TLS may still hold the last records.
                if let Err(e) = ready!(conn.poll_flush(cx)) {
                    self.write_failed = true;
                    return Poll::Ready(Err(e.to_string()));
                }
                return if self.body_done {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            match ready!(conn.poll_write(cx, &self.out[self.written..])) {
                Ok(0) => {
                    self.write_failed = true;
                    return Poll::Ready(Err("upstream connection closed".to_string()));
                }
                Ok(n) => {
                    *sent += n;
                    self.written += n;
                    if self.written == self.out.len() {
                        self.out.clear();
                        self.written = 0;
                    }
                }
                Err(e) => {
                    self.write_failed = true;
                    return Poll::Ready(Err(e.to_string()));
                }
            }
        }
    }

    /// Everything went out: the body ended and nothing waits in `out`.
    fn is_done(&self) -> bool {
        self.body_done && self.written == self.out.len()
    }

    /// Pulls ready body frames into `out`, in the request's framing.
    fn gather(&mut self, cx: &mut Context<'_>) -> Result<(), String> {
        while !self.body_done && self.out.len() - self.written < WRITE_BATCH {
            self.body_touched = true;
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Some(Err(e))) => return Err(format!("request body: {e}")),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.push_data(&data)?,
                    Err(frame) => {
                        if let (RequestFraming::Chunked, Ok(trailers)) = (self.framing, frame.into_trailers()) {
                            self.finish(Some(&trailers))?;
                        }
                    }
                },
                Poll::Ready(None) => self.finish(None)?,
            }
            if !self.body_done && self.body.is_end_stream() {
                self.finish(None)?;
            }
        }
        Ok(())
    }

    fn push_data(&mut self, data: &[u8]) -> Result<(), String> {
        if data.is_empty() {
            return Ok(());
        }
        match self.framing {
            RequestFraming::Empty => {}
            RequestFraming::Length(_) => {
                if data.len() as u64 > self.remaining {
                    return Err("request body longer than its Content-Length".to_string());
                }
                self.remaining -= data.len() as u64;
                self.out.extend_from_slice(data);
            }
            RequestFraming::Chunked => {
                self.out.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
                self.out.extend_from_slice(data);
                self.out.extend_from_slice(b"\r\n");
            }
        }
        Ok(())
    }

    fn finish(&mut self, trailers: Option<&HeaderMap>) -> Result<(), String> {
        if self.body_done {
            return Ok(());
        }
        self.body_done = true;
        match self.framing {
            RequestFraming::Empty => Ok(()),
            RequestFraming::Length(_) if self.remaining > 0 => {
                Err("request body shorter than its Content-Length".to_string())
            }
            RequestFraming::Length(_) => Ok(()),
            RequestFraming::Chunked => {
                self.out.extend_from_slice(b"0\r\n");
                if let Some(trailers) = trailers {
                    write_trailers(&mut self.out, trailers);
                }
                self.out.extend_from_slice(b"\r\n");
                Ok(())
            }
        }
    }
}

/// Writes a chunked body's trailer fields.
fn write_trailers(out: &mut Vec<u8>, trailers: &HeaderMap) {
    for (name, value) in trailers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Sends the request on `conn` and reads the response head. The response's body reads the
/// rest from the connection, which goes back to `home` once the body has ended cleanly.
pub async fn exchange(
    mut conn: Box<Http1Connection>,
    head: &[u8],
    framing: RequestFraming,
    body: UpstreamBody,
    method: &Method,
    home: ReturnTo,
) -> Result<Response<UpstreamResponseBody>, ExchangeError> {
    let head_request = *method == Method::HEAD;
    let reused = conn.requests > 1;
    let has_body = framing != RequestFraming::Empty;
    let mut outgoing = Outgoing {
        remaining: match framing {
            RequestFraming::Length(n) => n,
            _ => 0,
        },
        body_done: framing == RequestFraming::Empty,
        body,
        framing,
        // A body is gathered behind the head, so a small one leaves in the same write.
        out: if framing == RequestFraming::Empty {
            Vec::new()
        } else {
            head.to_vec()
        },
        written: 0,
        body_touched: false,
        write_failed: false,
    };
    // Bytes of the request written so far.
    let mut sent = 0usize;
    let mut head_written = if framing == RequestFraming::Empty {
        0
    } else {
        head.len()
    };
    let mut write_error = None;
    let result = poll_fn(|cx| {
        // The head first (a bodiless request is only its head), then the body as it comes;
        // the response is read meanwhile, since an upstream may answer before the body is in.
        while head_written < head.len() {
            match conn.poll_write(cx, &head[head_written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err("upstream connection closed".to_string())),
                Poll::Ready(Ok(n)) => {
                    head_written += n;
                    sent += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.to_string())),
                Poll::Pending => return Poll::Pending,
            }
        }
        if write_error.is_none()
            && let Poll::Ready(Err(e)) = outgoing.poll_send(&mut conn, &mut sent, cx)
        {
            if !outgoing.write_failed {
                return Poll::Ready(Err(e));
            }
            // The upstream stopped reading: it may have answered already (413, 503, ...)
            // and reset the connection, and its answer is still there to read.
            write_error = Some(e);
        }
        loop {
            if !conn.buf.is_empty() {
                match parse_head(&mut conn.buf, &mut conn.spans, head_request) {
                    Err(e) => return Poll::Ready(Err(e)),
                    Ok(Some(parsed)) => return Poll::Ready(Ok(parsed)),
                    Ok(None) => {}
                }
            }
            if conn.buf.len() > MAX_HEAD_BYTES {
                return Poll::Ready(Err("upstream response headers too large".to_string()));
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(write_error
                        .take()
                        .unwrap_or_else(|| "upstream connection closed before response".to_string())));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(write_error.take().unwrap_or_else(|| e.to_string()))),
            }
        }
    })
    .await;
    let (parts, framing, keep_alive) = match result {
        Ok(parsed) => parsed,
        Err(e) if reused && sent == 0 && !outgoing.body_touched => {
            tracing::debug!(error = %e, "pooled upstream connection was closed; using a new one");
            return Err(ExchangeError::Stale(outgoing.body));
        }
        Err(e) => return Err(ExchangeError::Failed(e)),
    };
    // An upstream may answer before the whole request body went out (and go on reading it
    // while it responds): the body keeps being sent as the response is read.
    let write_failed = outgoing.write_failed;
    let sending = (!write_failed && (!outgoing.is_done() || conn.unflushed)).then(|| Box::new(outgoing));
    // A server that answers an error without reading the whole body usually closes once it
    // has answered (hyper's and Go's do; RFC 9110 §10.1.1): the connection is checked at the
    // socket before it serves again, so the next request does not meet that reset.
    conn.suspect = has_body && parts.status.as_u16() >= 400;
    let reusable = keep_alive && !write_failed;
    let body = Http1Body::start(conn, framing, reusable, sending, home);
    Ok(Response::from_parts(parts, UpstreamResponseBody::Http1(body)))
}

/// How the response body is delimited.
#[derive(Debug)]
enum ResponseFraming {
    Length(u64),
    Chunked(ChunkState),
    /// Until the upstream closes the connection.
    UntilClose,
}

type ParsedHead = (http::response::Parts, ResponseFraming, bool);

/// Parses a complete response head off the front of `buf`, skipping interim (1xx) responses.
/// A header field's name and value as byte ranges of the head.
type FieldSpan = (usize, usize, usize, usize);

fn parse_head(
    buf: &mut ReadBuffer,
    spans: &mut Vec<FieldSpan>,
    head_request: bool,
) -> Result<Option<ParsedHead>, String> {
    loop {
        // Left uninitialised: httparse writes only the fields it finds, so a parse does not
        // begin by zeroing a hundred of them.
        let mut fields = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            &buf[..],
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("invalid upstream response: {e}")),
        };
        let code = response.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| format!("invalid upstream status {code}"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err("upstream switched protocols without an upgrade request".to_string());
            }
            buf.advance(head_len);
            continue;
        }
        let http10 = response.version == Some(0);
        // Where each field sits in the head, so values can share its bytes.
        let base = buf.as_ptr() as usize;
        spans.clear();
        spans.extend(response.headers.iter().map(|field| {
            let name = field.name.as_ptr() as usize - base;
            let value = field.value.as_ptr() as usize - base;
            (name, name + field.name.len(), value, value + field.value.len())
        }));
        let head = buf.split_to(head_len).freeze();
        // One pass: the connection-management fields decide keep-alive and framing here and
        // are not kept, since they are hop-by-hop (RFC 9110 §7.6.1) and the proxy would only
        // remove them again.
        let mut headers = HeaderMap::with_capacity(spans.len());
        let mut keep_alive = !http10;
        let mut chunked = None;
        let mut length = Length::Absent;
        let mut listed: Vec<HeaderName> = Vec::new();
        for &(ns, ne, vs, ve) in spans.iter() {
            let name = match common_field_name(&head[ns..ne]) {
                Some(name) => name,
                None => {
                    HeaderName::from_bytes(&head[ns..ne]).map_err(|_| "invalid upstream header name".to_string())?
                }
            };
            let raw = &head[vs..ve];
            if name == header::CONNECTION {
                for token in std::str::from_utf8(raw).unwrap_or("").split(',') {
                    let token = token.trim();
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive |= http10;
                    } else if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                        listed.push(n);
                    }
                }
                continue;
            }
            if name == header::TRANSFER_ENCODING {
                let last = std::str::from_utf8(raw).unwrap_or("").rsplit(',').next().unwrap_or("");
                chunked = Some(last.trim().eq_ignore_ascii_case("chunked"));
                continue;
            }
            if name == header::UPGRADE || name == header::TE || name == KEEP_ALIVE || name == PROXY_CONNECTION {
                continue;
            }
            if name == header::CONTENT_LENGTH {
                length = length.and(raw);
            }
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
                .map_err(|_| format!("invalid value of upstream header {name}"))?;
            headers.append(name, value);
        }
        for name in listed {
            headers.remove(name);
        }
        let framing = if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            ResponseFraming::Length(0)
        } else if let Some(chunked) = chunked {
            // RFC 9112 §6.3: with both, Transfer-Encoding wins, the Content-Length goes before
            // the message is forwarded, and the connection must close.
            if length != Length::Absent {
                headers.remove(header::CONTENT_LENGTH);
                keep_alive = false;
            }
            if chunked {
                ResponseFraming::Chunked(ChunkState::Size)
            } else {
                keep_alive = false;
                ResponseFraming::UntilClose
            }
        } else {
            match length {
                Length::Valid(n) => ResponseFraming::Length(n),
                Length::Invalid => return Err("invalid upstream Content-Length".to_string()),
                Length::Absent => {
                    keep_alive = false;
                    ResponseFraming::UntilClose
                }
            }
        };
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = if http10 { Version::HTTP_10 } else { Version::HTTP_11 };
        parts.headers = headers;
        return Ok(Some((parts, framing, keep_alive)));
    }
}

/// An upstream response body read straight from its connection.
pub struct Http1Body {
    state: BodyState,
}

enum BodyState {
    /// The whole body came with the head; the connection is already back in its pool.
    Whole(Option<Bytes>),
    Reading(Box<Reading>),
    Done,
}

struct Reading {
    conn: Box<Http1Connection>,
    framing: ResponseFraming,
    reusable: bool,
    /// The rest of a request body the upstream answered early.
    sending: Option<Box<Outgoing>>,
    home: ReturnTo,
}

impl Http1Body {
    fn start(
        mut conn: Box<Http1Connection>,
        framing: ResponseFraming,
        reusable: bool,
        sending: Option<Box<Outgoing>>,
        home: ReturnTo,
    ) -> Self {
        if let ResponseFraming::Length(n) = framing
            && conn.buf.len() as u64 >= n
            && sending.is_none()
        {
            let whole = conn.buf.split_to(n as usize).freeze();
            // Bytes beyond the response are not a response to anything: no reuse.
            if reusable && conn.buf.is_empty() {
                home.put_back(conn);
            }
            return Http1Body {
                state: BodyState::Whole((!whole.is_empty()).then_some(whole)),
            };
        }
        Http1Body {
            state: BodyState::Reading(Box::new(Reading {
                conn,
                framing,
                reusable,
                sending,
                home,
            })),
        }
    }
}

impl Reading {
    /// The next frame; `Ok(None)` at the body's clean end.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame<Bytes>>, String>> {
        if let Some(sending) = &mut self.sending {
            let mut sent = 0;
            match sending.poll_send(&mut self.conn, &mut sent, cx) {
                Poll::Ready(Ok(())) => self.sending = None,
                Poll::Pending => {}
                // The upstream stopped reading: its response still counts, but the
                // connection, with a request half sent, cannot serve another.
                Poll::Ready(Err(_)) => {
                    self.sending = None;
                    self.reusable = false;
                }
            }
        }
        loop {
            let buf = &mut self.conn.buf;
            match &mut self.framing {
                ResponseFraming::Length(0) => return Poll::Ready(Ok(None)),
                ResponseFraming::Length(left) if !buf.is_empty() => {
                    let n = (*left).min(buf.len() as u64);
                    *left -= n;
                    return Poll::Ready(Ok(Some(Frame::data(buf.split_to(n as usize).freeze()))));
                }
                ResponseFraming::UntilClose if !buf.is_empty() => {
                    return Poll::Ready(Ok(Some(Frame::data(buf.split().freeze()))));
                }
                ResponseFraming::Chunked(state) => {
                    match decode_chunked(state, buf).map_err(|e| format!("upstream response: {e}"))? {
                        Decoded::Frame(frame) => return Poll::Ready(Ok(Some(frame))),
                        Decoded::End => return Poll::Ready(Ok(None)),
                        Decoded::NeedMore => {}
                    }
                }
                _ => {}
            }
            match ready!(self.conn.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(match self.framing {
                        ResponseFraming::UntilClose => Ok(None),
                        _ => Err("upstream closed the connection mid-body".to_string()),
                    });
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e.to_string())),
            }
        }
    }
}

impl Body for Http1Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match &mut this.state {
            BodyState::Whole(data) => {
                let frame = data.take().map(|d| Ok(Frame::data(d)));
                this.state = BodyState::Done;
                Poll::Ready(frame)
            }
            BodyState::Reading(reading) => match ready!(reading.poll_next(cx)) {
                Ok(Some(frame)) => {
                    if reading.at_end() {
                        this.finish();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Ok(None) => {
                    this.finish();
                    Poll::Ready(None)
                }
                Err(e) => {
                    // The connection closes with the body: it cannot serve another request.
                    this.state = BodyState::Done;
                    Poll::Ready(Some(Err(e.into())))
                }
            },
            BodyState::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            BodyState::Whole(data) => data.is_none(),
            BodyState::Reading(r) => r.at_end(),
            BodyState::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            BodyState::Reading(r) => match r.framing {
                ResponseFraming::Length(left) => SizeHint::with_exact(left),
                _ => SizeHint::default(),
            },
            BodyState::Done => SizeHint::with_exact(0),
        }
    }
}

impl Reading {
    /// The body ended with nothing left to read: a length-delimited body read whole, or a
    /// chunked body whose trailers were handed out (a sender may stop polling after them).
    fn at_end(&self) -> bool {
        matches!(
            self.framing,
            ResponseFraming::Length(0) | ResponseFraming::Chunked(ChunkState::End)
        )
    }
}

impl Http1Body {
    /// The body ended cleanly: its connection goes back to its pool if it may serve again.
    fn finish(&mut self) {
        if let BodyState::Reading(reading) = std::mem::replace(&mut self.state, BodyState::Done) {
            let Reading {
                conn,
                reusable,
                sending,
                home,
                ..
            } = *reading;
            // A request body still unsent leaves the connection mid-request.
            if reusable && sending.is_none() && conn.buf.is_empty() {
                home.put_back(conn);
            }
        }
    }
}
