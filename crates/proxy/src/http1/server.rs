//! One HTTP/1.1 server connection (RFC 9112): request heads parsed in place, the service's
//! future polled by the connection's own task, and each response's head written together
//! with the body bytes that are ready, in one write.
//!
//! The rules follow hyper's server, which meshgate used before, so clients see the same
//! framing: a response gets `Content-Length` when its length is known, else chunked coding
//! (close-delimited for HTTP/1.0); `Date` is added when missing; trailers are sent only when
//! the `Trailer` field names them. Where Envoy is stricter it is followed instead: a request
//! with both `Content-Length` and `Transfer-Encoding` is refused (400), as is a transfer
//! coding other than chunked (501).

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::request_body::{BodySender, Demand, RequestBody};
use crate::body::ResponseBody;
use crate::coarse_timer::CoarseTimer;
use crate::http1_framing::{ChunkState, Decoded, Length, common_field_name, decode_chunked};
use crate::upstream::read_buffer::ReadBuffer;

/// Header fields accepted in one request head (hyper's and Envoy's default).
const MAX_HEADERS: usize = 100;
/// Fields the proxy may add to a request on its way upstream, reserved for when the head is
/// parsed: growing a `HeaderMap` rehashes it.
const REQUEST_FIELDS_ADDED: usize = 12;
/// Response bytes gathered before they are written, when the body has more ready.
const WRITE_BATCH: usize = 64 * 1024;
/// An output buffer grown past this by a large response is dropped afterwards.
const RETAINED_OUTPUT: usize = 16 * 1024;
/// After an error reply, how long and how much of what the client still sends is read and
/// dropped before the socket closes, so that closing with unread input (which sends a
/// reset) does not destroy the reply before the client reads it.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Connection settings.
#[derive(Clone, Copy, Debug)]
pub struct ServerSettings {
    /// A request head (request line and fields) larger than this is answered 431.
    pub max_head_bytes: usize,
    /// How long a client may take to send a request head, from when the connection starts
    /// waiting for one (idle keep-alive time included). `None`: no limit.
    pub head_timeout: Option<Duration>,
}

/// How a connection ended.
pub enum Ended<IO> {
    Closed,
    /// A request asked to switch protocols (`Upgrade`, `CONNECT`): the connection, with the
    /// bytes read from it and not yet consumed (that request's head first), for a codec that
    /// implements upgrades.
    Upgrade(Prefixed<IO>),
}

/// Serves HTTP/1.1 on `io` until the client closes, a response ends the connection, or an
/// upgrade request hands it over. `draining`: responses carry `Connection: close` once set.
pub async fn serve<IO, H, F>(
    mut io: IO,
    settings: ServerSettings,
    draining: &AtomicBool,
    mut handler: H,
) -> io::Result<Ended<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    // The head and the body apart, so the service builds its request in one move; its
    // future is polled as it comes (the service's own, without a wrapping async block).
    H: FnMut(Request<()>, RequestBody) -> F,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>>,
{
    let mut buf = ReadBuffer::default();
    let mut out: Vec<u8> = Vec::new();
    let mut spans: Vec<FieldSpan> = Vec::new();
    let mut timer = HeadTimer::new(settings.head_timeout);
    // Where each head is parsed into, so it is not moved out through the reading futures.
    let mut parsed: Option<ParsedHead> = None;
    loop {
        let head = match read_head(&mut io, &mut buf, &mut spans, &settings, &mut timer, &mut parsed).await {
            Ok(()) => match parsed.take() {
                Some(head) => head,
                None => return Ok(Ended::Closed),
            },
            Err(HeadError::Io(e)) => return Err(e),
            Err(HeadError::Reply(status)) => {
                error_reply(&mut io, status).await;
                return Ok(Ended::Closed);
            }
            Err(HeadError::Upgrade) => return Ok(Ended::Upgrade(Prefixed::new(buf.split().freeze(), io))),
        };
        let facts = head.facts;
        let (body, sender) = match head.framing {
            Framing::Length(n) if buf.len() as u64 >= n => {
                (RequestBody::whole(buf.split_to(n as usize).freeze()), None)
            }
            Framing::Length(n) => {
                let (body, sender) = RequestBody::streaming(Some(n), head.expect_continue);
                (body, Some((sender, Framing::Length(n))))
            }
            Framing::Chunked => {
                let (body, sender) = RequestBody::streaming(None, head.expect_continue);
                (body, Some((sender, Framing::Chunked)))
            }
        };
        // Polled in place: no task and no allocation per request.
        let response = pin!(handler(head.request, body));
        let keep_alive = match sender {
            None => {
                let Some(response) = await_response(&mut io, &mut buf, &settings, response).await else {
                    // The client closed its connection: dropping the response future cancels
                    // the request upstream.
                    return Ok(Ended::Closed);
                };
                KeepAlive::from(write_response(&mut io, &mut out, response, &facts, draining).await?)
            }
            Some((sender, framing)) => {
                let (mut read_half, mut write_half) = tokio::io::split(&mut io);
                let complete = AtomicBool::new(false);
                let mut pump = pin!(pump_then_watch(
                    &mut read_half,
                    &mut buf,
                    framing,
                    &sender,
                    &settings,
                    &complete
                ));
                let mut exchange = pin!(async {
                    let response = await_response_sending_continue(&mut write_half, &sender, response).await?;
                    write_response(&mut write_half, &mut out, response, &facts, draining).await
                });
                let mut body_end = None;
                let written = poll_fn(|cx| {
                    if body_end.is_none()
                        && let Poll::Ready(end) = pump.as_mut().poll(cx)
                    {
                        body_end = Some(end);
                    }
                    if body_end == Some(BodyEnd::ClientLeft) {
                        return Poll::Ready(None);
                    }
                    let written = std::task::ready!(exchange.as_mut().poll(cx));
                    if body_end.is_none()
                        && let Poll::Ready(end) = pump.as_mut().poll(cx)
                    {
                        body_end = Some(end);
                    }
                    Poll::Ready(Some(written))
                })
                .await;
                let Some(written) = written else {
                    // Gone before its response: dropping the exchange cancels the request
                    // upstream, as for a bodiless request.
                    return Ok(Ended::Closed);
                };
                let written = written?;
                // A body the service did not read to its end leaves the connection mid-request.
                if complete.load(Relaxed) {
                    KeepAlive::from(written)
                } else {
                    KeepAlive::NoWithUnreadInput
                }
            }
        };
        if out.capacity() > RETAINED_OUTPUT {
            // A large response's buffer is not kept for the connection's idle time.
            out = Vec::new();
        }
        match keep_alive {
            KeepAlive::Yes => {}
            KeepAlive::No if buf.is_empty() => {
                let _ = io.shutdown().await;
                return Ok(Ended::Closed);
            }
            // Pipelined requests that will not be answered are unread input too.
            KeepAlive::No | KeepAlive::NoWithUnreadInput => {
                close_lingering(&mut io).await;
                return Ok(Ended::Closed);
            }
        }
    }
}

/// Whether a connection serves another request after a response.
enum KeepAlive {
    Yes,
    No,
    /// No, and the client may still be sending a request body nobody read: closing at once
    /// could reset the connection before the client reads the response.
    NoWithUnreadInput,
}

impl KeepAlive {
    fn from(keep: bool) -> Self {
        if keep { KeepAlive::Yes } else { KeepAlive::No }
    }
}

/// What the response depends on from its request.
struct RequestFacts {
    head: bool,
    connect: bool,
    http10: bool,
    /// The client keeps the connection open after this exchange.
    keep_alive: bool,
}

struct ParsedHead {
    request: Request<()>,
    facts: RequestFacts,
    framing: Framing,
    expect_continue: bool,
}

#[derive(Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
}

enum HeadError {
    Io(io::Error),
    /// The request cannot be served: answer with this status and close.
    Reply(StatusCode),
    /// The request switches protocols.
    Upgrade,
}

/// A header field's name and value as byte ranges of the head.
type FieldSpan = (usize, usize, usize, usize);

/// Reads and parses the next request head into `parsed`, which stays `None` when the client
/// closed the connection or kept it idle past the head timeout.
async fn read_head<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    buf: &mut ReadBuffer,
    spans: &mut Vec<FieldSpan>,
    settings: &ServerSettings,
    timer: &mut HeadTimer,
    parsed: &mut Option<ParsedHead>,
) -> Result<(), HeadError> {
    let mut waiting_since = None;
    // The buffer's length when a parse last found the head incomplete: a head arriving in
    // small pieces is parsed again only once a blank line can have arrived, not on every read.
    let mut partial_at: Option<usize> = None;
    poll_fn(|cx| {
        loop {
            let worth_parsing = match partial_at {
                None => !buf.is_empty(),
                Some(n) => {
                    let could_end = buf.len() > n && could_end_head(&buf[n.saturating_sub(3)..]);
                    // What was looked at need not be looked at again.
                    partial_at = Some(buf.len());
                    could_end
                }
            };
            if worth_parsing {
                if parse_head(buf, spans, settings.max_head_bytes, parsed)? {
                    return Poll::Ready(Ok(()));
                }
                partial_at = Some(buf.len());
            }
            if buf.len() > settings.max_head_bytes {
                return Poll::Ready(Err(HeadError::Reply(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)));
            }
            match buf.poll_fill(io, cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(HeadError::Io(e))),
                Poll::Pending => {
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if timer.poll_expired(since, cx) {
                        // A client that began a head and stalled gets Envoy's 408; an idle
                        // keep-alive connection is just closed.
                        return Poll::Ready(if buf.is_empty() {
                            Ok(())
                        } else {
                            Err(HeadError::Reply(StatusCode::REQUEST_TIMEOUT))
                        });
                    }
                    return Poll::Pending;
                }
            }
        }
    })
    .await
}

/// Whether `bytes` hold a blank line (`\n\n` or `\n\r\n`), without which no head is complete.
fn could_end_head(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

/// The request-head timeout of one connection: one coarse sleep, kept across requests and
/// armed again only when it fires early (it fires at most once per timeout period).
struct HeadTimer {
    timeout: Option<Duration>,
    sleep: Option<Pin<Box<dyn hyper::rt::Sleep>>>,
}

impl HeadTimer {
    fn new(timeout: Option<Duration>) -> Self {
        HeadTimer { timeout, sleep: None }
    }

    /// Whether a head awaited since `since` is overdue; otherwise `cx` is woken by then.
    fn poll_expired(&mut self, since: Instant, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.timeout else {
            return false;
        };
        let deadline = since + timeout;
        loop {
            let sleep = self
                .sleep
                .get_or_insert_with(|| hyper::rt::Timer::sleep_until(&CoarseTimer, deadline));
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if Instant::now() >= deadline {
                self.sleep = None;
                return true;
            }
            // It fired for an earlier wait: arm it for this one.
            self.sleep = None;
        }
    }
}

/// Parses a complete request head off the front of `buf` into `out`; `false` while it is
/// incomplete.
fn parse_head(
    buf: &mut ReadBuffer,
    spans: &mut Vec<FieldSpan>,
    max_head_bytes: usize,
    out: &mut Option<ParsedHead>,
) -> Result<bool, HeadError> {
    // Left uninitialised: httparse writes only the fields it finds.
    let mut fields = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let head_len =
        match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut parsed, &buf[..], &mut fields) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(HeadError::Reply(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
            }
            Err(_) => return Err(HeadError::Reply(StatusCode::BAD_REQUEST)),
        };
    if head_len > max_head_bytes {
        return Err(HeadError::Reply(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
    }
    let bad = || HeadError::Reply(StatusCode::BAD_REQUEST);
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes()).map_err(|_| bad())?;
    let http10 = parsed.version == Some(0);
    let base = buf.as_ptr() as usize;
    let path = parsed.path.unwrap_or("");
    let path_span = (
        path.as_ptr() as usize - base,
        path.as_ptr() as usize - base + path.len(),
    );
    spans.clear();
    spans.extend(parsed.headers.iter().map(|field| {
        let name = field.name.as_ptr() as usize - base;
        let value = field.value.as_ptr() as usize - base;
        (name, name + field.name.len(), value, value + field.value.len())
    }));
    // hyper's rule: a request with `Upgrade` (HTTP/1.1) or `CONNECT` may switch protocols,
    // which the codec upgrades are served by handles; the head stays in the buffer for it.
    let connect = method == Method::CONNECT;
    if connect
        || (!http10
            && spans
                .iter()
                .any(|&(ns, ne, _, _)| buf[ns..ne].eq_ignore_ascii_case(b"upgrade")))
    {
        return Err(HeadError::Upgrade);
    }

    let head = buf.split_to(head_len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path_span.0..path_span.1)).map_err(|_| bad())?;
    // Room for the fields the proxy adds (x-forwarded-*, x-request-id, ...) without growing.
    let mut headers = HeaderMap::with_capacity(spans.len() + REQUEST_FIELDS_ADDED);
    let mut keep_alive = !http10;
    let mut close = false;
    let mut length = Length::Absent;
    let mut transfer_encodings = 0usize;
    let mut chunked_last = false;
    let mut only_chunked = false;
    let mut expect_continue = false;
    for &(ns, ne, vs, ve) in spans.iter() {
        let name = match common_field_name(&head[ns..ne]) {
            Some(name) => name,
            None => HeaderName::from_bytes(&head[ns..ne]).map_err(|_| bad())?,
        };
        let raw = &head[vs..ve];
        if name == header::CONTENT_LENGTH {
            length = length.and(raw);
        } else if name == header::TRANSFER_ENCODING {
            // Only `chunked` is understood, and it must come last (RFC 9112 §6.1, §6.3).
            transfer_encodings += 1;
            chunked_last = raw
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            only_chunked = raw.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if name == header::CONNECTION {
            for token in raw.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name == header::EXPECT {
            expect_continue = !http10 && raw.eq_ignore_ascii_case(b"100-continue");
        }
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve)).map_err(|_| bad())?;
        headers.append(name, value);
    }
    let framing = match length {
        _ if transfer_encodings > 0 => {
            if http10 || length != Length::Absent {
                // HTTP/1.0 has no transfer codings; with both fields the message could be
                // read two ways (request smuggling): Envoy refuses both.
                return Err(bad());
            }
            if !chunked_last {
                return Err(bad());
            }
            if transfer_encodings > 1 || !only_chunked {
                // Codings before `chunked` (gzip, ...) are not implemented.
                return Err(HeadError::Reply(StatusCode::NOT_IMPLEMENTED));
            }
            Framing::Chunked
        }
        Length::Invalid => return Err(bad()),
        Length::Valid(n) => Framing::Length(n),
        Length::Absent => Framing::Length(0),
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = if http10 { Version::HTTP_10 } else { Version::HTTP_11 };
    *request.headers_mut() = headers;
    *out = Some(ParsedHead {
        facts: RequestFacts {
            head: request.method() == Method::HEAD,
            connect,
            http10,
            keep_alive: keep_alive && !close,
        },
        request,
        framing,
        expect_continue,
    });
    Ok(true)
}

/// Polls the service's future while watching the connection: `None` when the client closed
/// it first. Bytes that arrive meanwhile (a pipelined request) are kept, up to a head's size.
async fn await_response<IO: AsyncRead + Unpin, F: Future<Output = Result<Response<ResponseBody>, Infallible>>>(
    io: &mut IO,
    buf: &mut ReadBuffer,
    settings: &ServerSettings,
    mut response: Pin<&mut F>,
) -> Option<Response<ResponseBody>> {
    let mut watching = true;
    poll_fn(|cx| {
        if let Poll::Ready(Ok(response)) = response.as_mut().poll(cx) {
            return Poll::Ready(Some(response));
        }
        if client_left(io, buf, settings, &mut watching, cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Reads what the client sends while its request is served (a pipelined request is kept, up
/// to a head's size): whether it closed the connection. A client that half-closed after
/// pipelining requests still wants them answered: the watch stops (`watching`) instead.
fn client_left<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut ReadBuffer,
    settings: &ServerSettings,
    watching: &mut bool,
    cx: &mut Context<'_>,
) -> bool {
    while *watching && buf.len() <= settings.max_head_bytes {
        match buf.poll_fill(io, cx) {
            Poll::Ready(Ok(0)) if !buf.is_empty() => *watching = false,
            Poll::Ready(Ok(0) | Err(_)) => return true,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => break,
        }
    }
    false
}

/// Polls the service's future; when its request body is first read and the client waits for
/// `100 Continue`, sends that first.
async fn await_response_sending_continue<
    W: AsyncWrite + Unpin,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>>,
>(
    io: &mut W,
    sender: &BodySender,
    mut response: Pin<&mut F>,
) -> io::Result<Response<ResponseBody>> {
    loop {
        let ready = poll_fn(|cx| {
            if let Poll::Ready(Ok(response)) = response.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            if sender.continue_owed() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match ready {
            Some(response) => {
                // A client still waiting for `100 Continue` reads the final response instead
                // (RFC 9110 §10.1.1); a body read after this point is read as it comes.
                sender.continue_sent();
                return Ok(response);
            }
            None => {
                send(io, b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                sender.continue_sent();
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BodyEnd {
    /// Read to its end: the next request follows on the connection.
    Complete,
    /// The service stopped reading it, or it was malformed or cut short.
    Incomplete,
    /// Read to its end, then the client closed the connection before its response.
    ClientLeft,
}

/// Feeds the body (`pump_body`); once it was read whole, sets `complete` and watches the
/// connection as `await_response` does, ending with `ClientLeft` if the client goes away.
async fn pump_then_watch<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut ReadBuffer,
    framing: Framing,
    sender: &BodySender,
    settings: &ServerSettings,
    complete: &AtomicBool,
) -> BodyEnd {
    let end = pump_body(io, buf, framing, sender).await;
    if end != BodyEnd::Complete {
        return end;
    }
    complete.store(true, Relaxed);
    let mut watching = true;
    poll_fn(|cx| {
        if client_left(io, buf, settings, &mut watching, cx) {
            Poll::Ready(BodyEnd::ClientLeft)
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Feeds a streaming request body from the connection, one piece per demand of its reader.
async fn pump_body<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut ReadBuffer,
    framing: Framing,
    sender: &BodySender,
) -> BodyEnd {
    let mut left = match framing {
        Framing::Length(n) => Some(n),
        Framing::Chunked => None,
    };
    let mut chunks = ChunkState::Size;
    loop {
        let demand = poll_fn(|cx| match sender.demand(cx) {
            Demand::Idle | Demand::Continue => Poll::Pending,
            demand => Poll::Ready(demand),
        })
        .await;
        if matches!(demand, Demand::Gone) {
            return BodyEnd::Incomplete;
        }
        // Every frame the buffer holds; a read first when it holds none.
        let mut sent = false;
        loop {
            let decoded = match &mut left {
                Some(0) => Ok(Decoded::End),
                Some(_) if buf.is_empty() => Ok(Decoded::NeedMore),
                Some(left) => {
                    let n = (*left).min(buf.len() as u64);
                    *left -= n;
                    Ok(Decoded::Frame(Frame::data(buf.split_to(n as usize).freeze())))
                }
                None => decode_chunked(&mut chunks, buf),
            };
            match decoded {
                Ok(Decoded::Frame(frame)) => {
                    sender.send(frame);
                    sent = true;
                    continue;
                }
                Ok(Decoded::End) => {
                    sender.end();
                    return BodyEnd::Complete;
                }
                Ok(Decoded::NeedMore) if sent => break,
                Ok(Decoded::NeedMore) => {}
                Err(reason) => {
                    sender.fail(reason);
                    return BodyEnd::Incomplete;
                }
            }
            match poll_fn(|cx| buf.poll_fill(io, cx)).await {
                Ok(0) | Err(_) => {
                    sender.fail("the client closed the connection before the body ended");
                    return BodyEnd::Incomplete;
                }
                Ok(_) => {}
            }
        }
    }
}

/// How a response body is delimited on the wire.
enum ResponseFraming {
    /// No body may follow (HEAD, 204, 304, 2xx to CONNECT).
    None,
    Length(u64),
    /// Chunked, with the trailer fields the `Trailer` field announced.
    Chunked(Vec<HeaderName>),
    /// Until the connection closes (HTTP/1.0 without a known length).
    UntilClose,
}

/// Writes a response; whether the connection may serve another request after it.
async fn write_response<W: AsyncWrite + Unpin>(
    io: &mut W,
    out: &mut Vec<u8>,
    response: Response<ResponseBody>,
    facts: &RequestFacts,
    draining: &AtomicBool,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    out.clear();
    let (mut framing, mut keep_alive) = encode_head(out, &parts, &body, facts, draining.load(Relaxed));
    drop(parts);
    let complete = match framing {
        ResponseFraming::None => {
            send(io, out).await?;
            true
        }
        _ => write_body(io, out, &mut body, &mut framing).await?,
    };
    if matches!(framing, ResponseFraming::UntilClose) {
        keep_alive = false;
    }
    Ok(keep_alive && complete)
}

/// Writes the status line and fields; the body's framing, and whether the connection stays open.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    body: &ResponseBody,
    facts: &RequestFacts,
    draining: bool,
) -> (ResponseFraming, bool) {
    let status = parts.status;
    let connect_ok = facts.connect && status.is_success();
    let may_have_length = !(status.is_informational()
        || connect_ok
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED);
    let may_have_body = may_have_length && !facts.head;
    let mut keep_alive = facts.keep_alive && !draining;

    if status == StatusCode::OK && !facts.http10 {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if facts.http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    // The first valid `Content-Length`, which is the one written; later ones are dropped.
    let mut written_length: Option<u64> = None;
    let mut has_date = false;
    let mut says_close = false;
    let mut says_keep_alive = false;
    let mut trailers: Vec<HeaderName> = Vec::new();
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            let Length::Valid(n) = Length::Absent.and(value.as_bytes()) else {
                continue;
            };
            if !may_have_length || written_length.is_some() {
                continue;
            }
            written_length = Some(n);
        } else if *name == header::TRANSFER_ENCODING {
            // The framing is this codec's to choose.
            continue;
        } else if *name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                says_close |= token.eq_ignore_ascii_case(b"close");
                says_keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if *name == header::DATE {
            has_date = true;
        } else if *name == header::TRAILER {
            if !may_have_body || facts.http10 {
                continue;
            }
            trailers.extend(
                value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok()),
            );
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if says_close {
        keep_alive = false;
    }

    let framing = match written_length {
        Some(n) if may_have_body => ResponseFraming::Length(n),
        _ if !may_have_body => {
            // A HEAD response says how long the body would be when the header did not.
            if may_have_length
                && written_length.is_none()
                && let Some(n) = body.size_hint().exact()
                && n > 0
            {
                write_length(out, n);
            }
            ResponseFraming::None
        }
        _ if body.is_end_stream() => {
            write_length(out, 0);
            ResponseFraming::Length(0)
        }
        _ => match body.size_hint().exact() {
            Some(n) => {
                write_length(out, n);
                ResponseFraming::Length(n)
            }
            None if facts.http10 => {
                keep_alive = false;
                ResponseFraming::UntilClose
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                ResponseFraming::Chunked(trailers)
            }
        },
    };

    if facts.http10 {
        if keep_alive && !says_keep_alive {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    } else if !keep_alive && !says_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !has_date {
        write_field(out, b"date", crate::response_date::date_value().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep_alive)
}

/// Writes `bytes` and pushes them out: TLS holds encrypted records back until flushed, and the
/// connection may wait for the client next.
async fn send<W: AsyncWrite + Unpin>(io: &mut W, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn write_length(out: &mut Vec<u8>, n: u64) {
    use std::io::Write;
    let _ = write!(out, "content-length: {n}\r\n");
}

/// Writes the body after the head in `out`, gathering what is ready into one write; whether
/// it was written whole (a body that failed or broke its length leaves the connection unusable).
async fn write_body<W: AsyncWrite + Unpin>(
    io: &mut W,
    out: &mut Vec<u8>,
    body: &mut ResponseBody,
    framing: &mut ResponseFraming,
) -> io::Result<bool> {
    enum Step {
        Frame(Option<Result<Frame<Bytes>, crate::body::BodyError>>),
        Flush,
    }
    let mut trailers: Option<HeaderMap> = None;
    loop {
        let step = poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Step::Frame(frame)),
            Poll::Pending if !out.is_empty() => Poll::Ready(Step::Flush),
            Poll::Pending => Poll::Pending,
        })
        .await;
        match step {
            Step::Flush => {
                send(io, out).await?;
                out.clear();
            }
            Step::Frame(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if !encode_data(out, framing, &data) {
                        send(io, out).await?;
                        return Ok(false);
                    }
                    if out.len() >= WRITE_BATCH {
                        send(io, out).await?;
                        out.clear();
                    }
                }
                Err(frame) => {
                    if let Ok(fields) = frame.into_trailers() {
                        trailers.get_or_insert_with(HeaderMap::new).extend(fields);
                    }
                }
            },
            Step::Frame(Some(Err(e))) => {
                // What was gathered goes out; the missing end tells the client the body broke.
                tracing::debug!(error = %e, "response body failed");
                send(io, out).await?;
                return Ok(false);
            }
            Step::Frame(None) => {
                let complete = match framing {
                    ResponseFraming::Length(left) => *left == 0,
                    ResponseFraming::Chunked(allowed) => {
                        out.extend_from_slice(b"0\r\n");
                        for (name, value) in trailers.iter().flatten() {
                            if allowed.contains(name) && trailer_allowed(name) {
                                write_field(out, name.as_str().as_bytes(), value.as_bytes());
                            }
                        }
                        out.extend_from_slice(b"\r\n");
                        true
                    }
                    ResponseFraming::UntilClose | ResponseFraming::None => true,
                };
                send(io, out).await?;
                out.clear();
                return Ok(complete);
            }
        }
    }
}

/// Appends a data frame in the response's framing; false when the body runs past its
/// declared length (what fits is kept).
fn encode_data(out: &mut Vec<u8>, framing: &mut ResponseFraming, data: &[u8]) -> bool {
    match framing {
        ResponseFraming::Length(left) => {
            let fits = (*left).min(data.len() as u64) as usize;
            out.extend_from_slice(&data[..fits]);
            *left -= fits as u64;
            fits == data.len()
        }
        ResponseFraming::Chunked(_) => {
            if !data.is_empty() {
                use std::io::Write;
                let _ = write!(out, "{:x}\r\n", data.len());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
            true
        }
        ResponseFraming::UntilClose => {
            out.extend_from_slice(data);
            true
        }
        ResponseFraming::None => true,
    }
}

/// Fields that must not be sent as trailers (RFC 9110 §6.5.1: framing, routing, controls).
fn trailer_allowed(name: &HeaderName) -> bool {
    ![
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::HOST,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CONTENT_RANGE,
        header::TRAILER,
        header::CONNECTION,
        header::TE,
        header::CACHE_CONTROL,
        header::EXPECT,
        header::AUTHORIZATION,
        header::SET_COOKIE,
    ]
    .contains(name)
}

/// Answers a request the codec refuses, then closes the connection.
async fn error_reply<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO, status: StatusCode) {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\n");
    write_field(&mut out, b"date", crate::response_date::date_value().as_bytes());
    out.extend_from_slice(b"\r\n");
    if send(io, &out).await.is_ok() {
        close_lingering(io).await;
    }
}

/// Closes the connection for writing, then reads and drops what the client still sends, for
/// a while, so that the last response is not lost to the reset that closing a socket with
/// unread input causes (nginx's `lingering_close`).
async fn close_lingering<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO) {
    if io.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// A connection with bytes already read from it in front, for the codec it is handed to.
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    fn new(prefix: Bytes, io: IO) -> Self {
        Prefixed { prefix, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(out.remaining());
            out.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, out)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::DuplexStream;

    const SETTINGS: ServerSettings = ServerSettings {
        max_head_bytes: 1024,
        head_timeout: None,
    };

    /// Answers with the method, path, body and trailers it received; `/head` answers with a
    /// five-octet body, `/ignore-body` without reading the body.
    async fn describe(head: Request<()>, body: RequestBody) -> Result<Response<ResponseBody>, Infallible> {
        let (parts, ()) = head.into_parts();
        if parts.uri.path() == "/ignore-body" {
            return Ok(Response::new(crate::body::full("ignored")));
        }
        if parts.uri.path() == "/head" {
            return Ok(Response::new(crate::body::full("hello")));
        }
        let text = match body.collect().await {
            Ok(collected) => {
                let trailers = collected.trailers().map(|t| format!("{t:?}")).unwrap_or_default();
                let data = collected.to_bytes();
                format!(
                    "{} {} body={} trailers={trailers}",
                    parts.method,
                    parts.uri,
                    String::from_utf8_lossy(&data)
                )
            }
            Err(e) => format!("error: {e}"),
        };
        Ok(Response::new(crate::body::full(text)))
    }

    /// Serves one connection over an in-memory pipe; the client end and the server's outcome.
    fn start() -> (DuplexStream, tokio::task::JoinHandle<io::Result<Option<Bytes>>>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            static NOT_DRAINING: AtomicBool = AtomicBool::new(false);
            match serve(server, SETTINGS, &NOT_DRAINING, describe).await? {
                Ended::Closed => Ok(None),
                Ended::Upgrade(mut prefixed) => {
                    let mut rest = vec![0u8; 256];
                    let n = prefixed.read(&mut rest).await?;
                    Ok(Some(Bytes::copy_from_slice(&rest[..n])))
                }
            }
        });
        (client, task)
    }

    /// Reads until the server closes the connection.
    async fn read_all(client: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Reads until `count` responses' bodies (`body=` markers) or the end arrive.
    async fn read_until(client: &mut DuplexStream, needle: &str) -> String {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&out).contains(needle) {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let (mut client, task) = start();
        client
            .write_all(
                b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nPOST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            )
            .await
            .unwrap();
        let text = read_until(&mut client, "body=abc").await;
        let one = text.find("GET /one body=").expect(&text);
        let two = text.find("POST /two body=abc").expect(&text);
        assert!(one < two, "{text}");
        assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{text}");
        assert!(
            text.contains("content-length: 24\r\n") && text.contains("\r\ndate: "),
            "{text}"
        );
        // Still open: a third request is served.
        client
            .write_all(b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let text = read_all(&mut client).await;
        assert!(
            text.contains("connection: close\r\n") && text.ends_with("GET /three body= trailers="),
            "{text}"
        );
        assert!(task.await.unwrap().unwrap().is_none());
    }

    #[tokio::test]
    async fn a_head_sent_one_octet_at_a_time_is_served() {
        let (mut client, _task) = start();
        for &octet in b"GET /slow HTTP/1.1\r\nHost: x\nX-A: 1\r\nConnection: close\r\n\r\n" {
            client.write_all(&[octet]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let text = read_all(&mut client).await;
        assert!(text.ends_with("GET /slow body= trailers="), "{text}");
    }

    #[tokio::test]
    async fn http10_closes_unless_asked_to_keep_alive() {
        let (mut client, _task) = start();
        client
            .write_all(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let text = read_until(&mut client, "body=").await;
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert!(text.contains("connection: keep-alive\r\n"), "{text}");
        client.write_all(b"GET /b HTTP/1.0\r\n\r\n").await.unwrap();
        let text = read_all(&mut client).await;
        assert!(
            text.starts_with("HTTP/1.0 200 OK\r\n") && !text.contains("keep-alive"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn expect_100_continue_is_answered_when_the_body_is_read() {
        let (mut client, _task) = start();
        client
            .write_all(b"PUT /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            .await
            .unwrap();
        let interim = read_until(&mut client, "\r\n\r\n").await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"hello").await.unwrap();
        let text = read_until(&mut client, "body=hello").await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    }

    #[tokio::test]
    async fn chunked_bodies_arrive_whole_with_their_trailers() {
        let (mut client, _task) = start();
        client
            .write_all(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        client
            .write_all(b"2;ext=1\r\nde\r\n0\r\nx-sum: 5\r\n\r\n")
            .await
            .unwrap();
        let text = read_until(&mut client, "x-sum").await;
        assert!(
            text.contains("POST /c body=abcde trailers={\"x-sum\": \"5\"}"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_trailer_section_ends_where_httparse_says_and_the_next_request_follows() {
        let (mut client, _task) = start();
        // Trailers ended by a bare LF blank line, then a pipelined request.
        client
            .write_all(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nx-a: 1\n\nGET /next HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let text = read_all(&mut client).await;
        assert!(text.contains("POST /c body=a trailers={\"x-a\": \"1\"}"), "{text}");
        assert!(text.ends_with("GET /next body= trailers="), "{text}");
    }

    #[tokio::test]
    async fn chunk_sizes_with_junk_after_them_fail_the_body() {
        for size_line in ["3 junk", "3\rx", "3;ext\x01"] {
            let (mut client, _task) = start();
            let request =
                format!("POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{size_line}\r\nabc\r\n0\r\n\r\n");
            client.write_all(request.as_bytes()).await.unwrap();
            let text = read_all(&mut client).await;
            assert!(
                text.contains("error: HTTP/1.1 request body: invalid chunk size"),
                "{size_line:?}: {text}"
            );
        }
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_after_the_client_half_closes() {
        let (mut client, _task) = start();
        client
            .write_all(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let text = read_all(&mut client).await;
        assert!(text.contains("GET /1 body=") && text.contains("GET /2 body="), "{text}");
    }

    #[tokio::test]
    async fn ambiguous_or_unsupported_framing_is_refused() {
        for (request, status) in [
            (
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "400",
            ),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "501"),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "400"),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "400"),
            (
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                "400",
            ),
            ("GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n", "400"),
        ] {
            let (mut client, _task) = start();
            client.write_all(request.as_bytes()).await.unwrap();
            let text = read_all(&mut client).await;
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{request:?}: {text}");
            assert!(text.contains("connection: close\r\n"), "{text}");
        }
        let (mut client, _task) = start();
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "x".repeat(2000));
        client.write_all(big.as_bytes()).await.unwrap();
        assert!(read_all(&mut client).await.starts_with("HTTP/1.1 431 "));
    }

    #[tokio::test]
    async fn head_responses_carry_the_length_but_no_body() {
        let (mut client, _task) = start();
        client
            .write_all(
                b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\nGET /head HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let text = read_all(&mut client).await;
        let (first, second) = text.split_at(text.rfind("HTTP/1.1 200").expect(&text));
        assert!(
            first.contains("content-length: 5\r\n") && first.ends_with("\r\n\r\n"),
            "{first}"
        );
        assert!(second.ends_with("\r\n\r\nhello"), "{second}");
    }

    #[tokio::test]
    async fn a_body_the_service_did_not_read_ends_the_connection() {
        let (mut client, task) = start();
        client
            .write_all(b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
            .await
            .unwrap();
        // The response, then the end of the connection: the rest of the body would be read
        // as the next request otherwise.
        let text = read_all(&mut client).await;
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("ignored"),
            "{text}"
        );
        assert!(task.await.unwrap().unwrap().is_none());
    }

    #[tokio::test]
    async fn upgrade_requests_are_handed_over_with_their_bytes() {
        let (mut client, task) = start();
        let request = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframe";
        client.write_all(request).await.unwrap();
        let handed = task.await.unwrap().unwrap().expect("handed over");
        assert_eq!(&handed[..], &request[..]);
    }
}
