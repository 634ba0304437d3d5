//! One HTTP/2 server connection (RFC 9113): frames in, requests to the service, responses
//! out, all in the connection's own task.
//!
//! Each stream's request future and response body are polled by the connection task itself,
//! through a waker per stream slot that queues the slot and wakes the task, instead of a task
//! per stream. Responses that complete while the task runs leave in one write. The task reads
//! no more while its unsent output is over a limit, and polls a response body only while the
//! stream's and the connection's send windows are open and that output is small, so memory
//! stays flat whatever the body sizes.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Body;
use slab::Slab;
use tokio::io::{AsyncRead, AsyncWrite};

use super::frame::{self, Head, Reason};
use super::hpack::{self, Field};
use super::request_body::{Recv, RequestBody};
use crate::body::ResponseBody;
use crate::coarse_timer::CoarseTimer;
use crate::upstream::read_buffer::ReadBuffer;

/// What the service returns for a request (`service::handle`'s future itself, so no wrapping
/// future is polled in between).
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

/// Unsent output past which the connection stops reading frames and polling bodies.
const OUTPUT_HIGH_WATER: usize = 64 * 1024;
/// Rounds of read, poll and write per wake-up before yielding to other tasks.
const ROUNDS_PER_POLL: usize = 16;
/// Streams reset by the client after which a connection made mostly of resets is closed
/// (the "rapid reset" attack, CVE-2023-44487).
const RESET_FLOOD_MIN: u64 = 1_000;
/// Stream ids reset by this end that are remembered, so frames the client sent before it saw
/// the reset are ignored rather than treated as errors.
const RECENT_RESETS: usize = 256;

/// The settings this end announces.
#[derive(Clone, Copy, Debug)]
pub struct ServerSettings {
    pub max_concurrent_streams: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE: how much request body each stream may send ahead.
    pub stream_window: u32,
    /// The connection's receive window, raised from 65,535 by a WINDOW_UPDATE at start.
    pub connection_window: u32,
    pub max_header_list_size: u32,
    /// Envoy's `idle_timeout`: a connection with no open stream for this long is sent GOAWAY
    /// (NO_ERROR) and closed. `None`: kept open as long as the client keeps it.
    pub idle_timeout: Option<Duration>,
    /// How long a new connection may take to send its preface and first SETTINGS before it
    /// is closed (slowloris protection for clients that open a connection and stay silent).
    pub preface_timeout: Option<Duration>,
}

impl Default for ServerSettings {
    /// hyper's defaults, which meshgate served with before it had its own codec.
    fn default() -> Self {
        ServerSettings {
            max_concurrent_streams: 200,
            stream_window: 1024 * 1024,
            connection_window: 1024 * 1024,
            max_header_list_size: 16 * 1024,
            idle_timeout: None,
            preface_timeout: None,
        }
    }
}

/// Why a connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// This end closed the connection with GOAWAY.
    #[error("protocol error ({0}): {1}")]
    Protocol(Reason, &'static str),
}

/// How long a connection closed for being idle goes on refusing streams after its GOAWAY
/// (Envoy's default `drain_timeout`).
const IDLE_DRAIN: Duration = Duration::from_secs(5);

/// A future that completes when the server starts shutting down.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves HTTP/2 on `io`, whose client has not sent anything yet (or only what `io` replays),
/// until the client closes the connection, or until `shutdown` completes and the streams in
/// flight are done: then GOAWAY tells the client to take new requests elsewhere (§6.8).
pub async fn serve<IO, F>(
    io: IO,
    settings: ServerSettings,
    shutdown: Shutdown,
    service: F,
) -> Result<(), ConnectionError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<RequestBody>) -> ResponseFuture + Unpin,
{
    let mut connection = Connection::new(io, settings, service);
    connection.shutdown = Some(shutdown);
    let first = connection.settings.preface_timeout.or(connection.settings.idle_timeout);
    if let Some(after) = first {
        connection.arm_timer(Instant::now() + after);
    }
    connection.await
}

/// Stream ids are distinct odd numbers: multiplying spreads them well enough.
#[derive(Default)]
struct StreamIdHasher(u64);

impl Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Slots whose stream has something to do, and the connection task to wake for them.
#[derive(Default)]
struct ReadyQueue {
    inner: Mutex<(Vec<usize>, Option<Waker>)>,
}

impl ReadyQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<usize>, Option<Waker>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The waker of one stream slot: queues the slot (once until it is polled) and wakes the task.
struct SlotWaker {
    slot: usize,
    queued: AtomicBool,
    ready: Arc<ReadyQueue>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            let mut ready = self.ready.lock();
            ready.0.push(self.slot);
            if let Some(task) = &ready.1 {
                task.wake_by_ref();
            }
        }
    }
}

/// Wakes the connection for its timer, flagging that the timer is what to look at.
struct TimerWaker {
    fired: AtomicBool,
    ready: Arc<ReadyQueue>,
}

impl Wake for TimerWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Some(task) = &self.ready.lock().1 {
            task.wake_by_ref();
        }
    }
}

enum Phase {
    /// The service is producing the response.
    Handling(ResponseFuture),
    /// Headers sent; body frames go out as the windows allow.
    Sending {
        body: ResponseBody,
        /// Part of a data frame not sent yet.
        pending: Bytes,
        /// The body ends with `pending`.
        last: bool,
    },
    /// The response is complete.
    Sent,
}

struct Stream {
    id: u32,
    phase: Phase,
    /// What this end may still send on the stream.
    send_window: i64,
    /// What the client may still send on the stream.
    recv_window: i64,
    /// Body bytes consumed that the client has not been given back yet (stream window).
    unreleased: u32,
    /// Body bytes received that are not yet given back on the connection window.
    outstanding: usize,
    /// Shared with the request body's reader; `None` for requests without a body.
    recv: Option<Arc<Recv>>,
    /// The client ended its side of the stream.
    peer_ended: bool,
    /// `content-length` minus the body bytes received so far.
    remaining_length: Option<u64>,
}

/// A header block spread over HEADERS and CONTINUATION frames.
struct PartialBlock {
    stream: u32,
    end_stream: bool,
    self_dependent: bool,
    block: BytesMut,
}

/// The fields of a request's header block, checked as they are decoded (RFC 9113 §8.3.1).
#[derive(Default)]
struct RequestHead {
    method: Option<http::Method>,
    scheme: Option<http::uri::Scheme>,
    authority: Option<http::uri::Authority>,
    path: Option<http::uri::PathAndQuery>,
    headers: HeaderMap,
    malformed: Option<&'static str>,
    /// Set by the first regular field: pseudo-headers may not follow.
    regular_seen: bool,
    pseudo_seen: bool,
    list_size: usize,
}

impl RequestHead {
    fn add(&mut self, field: Field, size: usize) {
        self.list_size += size;
        if self.malformed.is_some() {
            return;
        }
        let pseudo_slot_taken = match &field {
            Field::Method(_) => self.method.is_some(),
            Field::Scheme(_) => self.scheme.is_some(),
            Field::Authority(_) => self.authority.is_some(),
            Field::Path(_) => self.path.is_some(),
            _ => false,
        };
        let is_pseudo = !matches!(field, Field::Header(..) | Field::Malformed);
        if is_pseudo {
            self.pseudo_seen = true;
            if self.regular_seen {
                self.malformed = Some("pseudo-header after a regular field");
                return;
            }
            if pseudo_slot_taken {
                self.malformed = Some("repeated pseudo-header");
                return;
            }
        }
        match field {
            Field::Method(m) => self.method = Some(m),
            Field::Scheme(s) => self.scheme = Some(s),
            Field::Authority(a) => self.authority = Some(a),
            Field::Path(p) => self.path = Some(p),
            Field::Status(_) => self.malformed = Some(":status in a request"),
            // Extended CONNECT (RFC 8441) is not announced.
            Field::Protocol(_) => self.malformed = Some(":protocol without extended CONNECT"),
            Field::Malformed => self.malformed = Some("invalid field"),
            Field::Header(name, value) => {
                self.regular_seen = true;
                // §8.2.2: connection-specific fields are malformed; TE may only say "trailers".
                let connection_specific = name == header::CONNECTION
                    || name == header::TRANSFER_ENCODING
                    || name == header::UPGRADE
                    || name == "keep-alive"
                    || name == "proxy-connection";
                if connection_specific || (name == header::TE && value != "trailers") {
                    self.malformed = Some("connection-specific field");
                    return;
                }
                self.headers.append(name, value);
            }
        }
    }

    /// The request, or why it is malformed. `content-length` is returned apart, checked.
    fn into_request(mut self) -> Result<(http::request::Parts, Option<u64>), &'static str> {
        if let Some(why) = self.malformed {
            return Err(why);
        }
        let method = self.method.take().ok_or("no :method")?;
        let mut uri = http::uri::Parts::default();
        if method == http::Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return Err(":scheme or :path in CONNECT");
            }
            uri.authority = Some(self.authority.take().ok_or("CONNECT without :authority")?);
        } else {
            let scheme = self.scheme.take().ok_or("no :scheme")?;
            let path = self.path.take().ok_or("no :path")?;
            let p = path.as_str();
            if !(p.starts_with('/') || (p == "*" && method == http::Method::OPTIONS)) {
                return Err("invalid :path");
            }
            if let Some(authority) = self.authority.take() {
                uri.scheme = Some(scheme);
                uri.authority = Some(authority);
            }
            uri.path_and_query = Some(path);
        }
        let content_length = content_length(&self.headers)?;
        join_cookies(&mut self.headers);
        let uri = Uri::from_parts(uri).map_err(|_| "invalid request target")?;
        let mut parts = Request::new(()).into_parts().0;
        parts.method = method;
        parts.uri = uri;
        parts.version = Version::HTTP_2;
        parts.headers = self.headers;
        Ok((parts, content_length))
    }

    fn into_trailers(self) -> Result<HeaderMap, &'static str> {
        if let Some(why) = self.malformed {
            return Err(why);
        }
        if self.pseudo_seen {
            return Err("pseudo-header in trailers");
        }
        Ok(self.headers)
    }
}

/// RFC 9113 §8.2.3: clients may split `cookie` into several fields (browsers do, for better
/// compression); they are joined with "; " before the request leaves HTTP/2.
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

/// Every `content-length` value must be the same number.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let n = std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or("invalid content-length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting content-length");
        }
        length = Some(n);
    }
    Ok(length)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Waiting for the client's connection preface.
    Preface,
    /// The preface arrived; the next frame must be SETTINGS.
    FirstSettings,
    Open,
    /// GOAWAY with an error was queued: write it and close.
    Closing,
}

struct Connection<IO, F> {
    io: IO,
    service: F,
    settings: ServerSettings,
    state: State,
    read: ReadBuffer,
    read_closed: bool,
    /// Frames to write, and how much of them is written.
    out: Vec<u8>,
    out_written: usize,
    decoder: hpack::Decoder,
    encoder: hpack::Encoder,
    head_scratch: Vec<u8>,
    partial: Option<PartialBlock>,
    streams: Slab<Stream>,
    ids: HashMap<u32, usize, BuildHasherDefault<StreamIdHasher>>,
    ready: Arc<ReadyQueue>,
    /// One waker per slot, reused by the streams that take the slot.
    wakers: Vec<(Arc<SlotWaker>, Waker)>,
    /// Slots to poll in this round, and a spare list to swap with the ready queue.
    to_poll: Vec<usize>,
    spare: Vec<usize>,
    /// Slots waiting for output room, and for the connection's send window.
    deferred: Vec<usize>,
    blocked: Vec<usize>,
    last_stream_id: u32,
    recent_resets: VecDeque<u32>,
    send_window: i64,
    recv_window: i64,
    /// Body bytes consumed that the client has not been given back on the connection.
    unreleased: u32,
    peer_initial_window: i64,
    peer_max_frame: usize,
    peer_goaway: bool,
    streams_opened: u64,
    peer_resets: u64,
    /// The output waits for one scheduler tick before its first write, so the responses of
    /// every connection that complete in that tick leave together and the client wakes once
    /// for them; written the moment they complete, a client of many connections woke about
    /// three times as often (h2load's `epoll_wait`s). `true` once this burst has waited.
    write_held: bool,
    /// Output was written but not yet flushed.
    flush_pending: bool,
    /// The error to report once the connection has closed.
    error: Option<ConnectionError>,
    /// Completes when the server drains; then GOAWAY is sent.
    shutdown: Option<Shutdown>,
    /// This end sent GOAWAY: no new streams, close once the open ones are done.
    going_away: bool,
    /// The preface deadline, then the idle check (see `on_timer`); coarse, as these
    /// timeouts are seconds to hours long.
    timer: Option<Pin<Box<dyn hyper::rt::Sleep>>>,
    /// The timer's waker: it flags the timer as gone off, then wakes this task.
    timer_waker: Option<(Arc<TimerWaker>, Waker)>,
    /// When the last open stream ended (or the connection opened).
    idle_since: Instant,
    /// After an idle GOAWAY: the connection stays open (refusing new streams) until then.
    linger_until: Option<Instant>,
}

impl<IO, F> Connection<IO, F>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<RequestBody>) -> ResponseFuture,
{
    fn new(io: IO, settings: ServerSettings, service: F) -> Self {
        let mut out = Vec::with_capacity(4096);
        // The server preface: SETTINGS, then the larger connection window (§3.4, §6.9.2).
        frame::write_settings(
            &mut out,
            &[
                (frame::SETTINGS_MAX_CONCURRENT_STREAMS, settings.max_concurrent_streams),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, settings.stream_window),
                (frame::SETTINGS_MAX_HEADER_LIST_SIZE, settings.max_header_list_size),
            ],
        );
        let connection_window = settings.connection_window.max(frame::DEFAULT_WINDOW);
        if connection_window > frame::DEFAULT_WINDOW {
            frame::write_window_update(&mut out, 0, connection_window - frame::DEFAULT_WINDOW);
        }
        Connection {
            io,
            service,
            settings,
            state: State::Preface,
            read: ReadBuffer::default(),
            read_closed: false,
            out,
            out_written: 0,
            decoder: hpack::Decoder::new(4096),
            encoder: hpack::Encoder::default(),
            head_scratch: Vec::with_capacity(256),
            partial: None,
            streams: Slab::new(),
            ids: HashMap::default(),
            ready: Arc::new(ReadyQueue::default()),
            wakers: Vec::new(),
            to_poll: Vec::new(),
            spare: Vec::new(),
            deferred: Vec::new(),
            blocked: Vec::new(),
            last_stream_id: 0,
            recent_resets: VecDeque::new(),
            send_window: i64::from(frame::DEFAULT_WINDOW),
            recv_window: i64::from(connection_window),
            unreleased: 0,
            peer_initial_window: i64::from(frame::DEFAULT_WINDOW),
            peer_max_frame: frame::DEFAULT_MAX_FRAME,
            peer_goaway: false,
            streams_opened: 0,
            peer_resets: 0,
            write_held: false,
            flush_pending: false,
            error: None,
            shutdown: None,
            going_away: false,
            timer: None,
            timer_waker: None,
            idle_since: Instant::now(),
            linger_until: None,
        }
    }

    /// Arms the timer for `deadline` and registers it to wake this task through its own
    /// waker, so that the connection looks at the timer only when it went off.
    fn arm_timer(&mut self, deadline: Instant) {
        let waker = self
            .timer_waker
            .get_or_insert_with(|| {
                let flag = Arc::new(TimerWaker {
                    fired: AtomicBool::new(false),
                    ready: self.ready.clone(),
                });
                (flag.clone(), Waker::from(flag))
            })
            .1
            .clone();
        let mut timer = hyper::rt::Timer::sleep_until(&CoarseTimer, deadline);
        // The first poll registers the sleep; it never completes then.
        let _ = timer.as_mut().poll(&mut Context::from_waker(&waker));
        self.timer = Some(timer);
    }

    /// Acts on the timer if it went off since the last look.
    fn check_timer(&mut self) {
        let Some((flag, waker)) = &self.timer_waker else {
            return;
        };
        if !flag.fired.swap(false, Ordering::AcqRel) {
            return;
        }
        let waker = waker.clone();
        if let Some(timer) = &mut self.timer
            && timer.as_mut().poll(&mut Context::from_waker(&waker)).is_ready()
        {
            self.timer = None;
            self.on_timer();
        }
    }

    /// The timer fired: a client still owing its preface is cut off; an open connection
    /// idle for `idle_timeout` is told to go away, or the check is put off to when it could be.
    fn on_timer(&mut self) {
        match self.state {
            State::Preface | State::FirstSettings => {
                tracing::debug!("HTTP/2 client sent no preface in time");
                self.state = State::Closing;
                return;
            }
            State::Closing => return,
            State::Open => {}
        }
        let Some(idle_timeout) = self.settings.idle_timeout else {
            return;
        };
        if self.going_away || self.peer_goaway {
            return;
        }
        let now = Instant::now();
        if !self.streams.is_empty() {
            self.arm_timer(now + idle_timeout);
            return;
        }
        let due = self.idle_since + idle_timeout;
        if due > now {
            self.arm_timer(due);
            return;
        }
        tracing::debug!("HTTP/2 connection idle timeout");
        frame::write_goaway(&mut self.out, self.last_stream_id, Reason::NO_ERROR, b"idle timeout");
        self.going_away = true;
        // As Envoy's `drain_timeout`: a request the client sent before it saw the GOAWAY is
        // refused cleanly (REFUSED_STREAM, safe to retry) rather than lost to a closed socket.
        let until = now + IDLE_DRAIN;
        self.linger_until = Some(until);
        self.arm_timer(until);
    }

    fn output_backlog(&self) -> usize {
        self.out.len() - self.out_written
    }

    /// Queues GOAWAY and stops everything but writing it.
    fn fail(&mut self, reason: Reason, why: &'static str) -> ConnectionError {
        tracing::debug!(%reason, why, "HTTP/2 connection error");
        frame::write_goaway(&mut self.out, self.last_stream_id, reason, why.as_bytes());
        self.state = State::Closing;
        self.drop_all_streams("connection error");
        ConnectionError::Protocol(reason, why)
    }

    fn drop_all_streams(&mut self, why: &'static str) {
        for stream in self.streams.drain() {
            if let Some(recv) = stream.recv {
                recv.fail(why);
            }
        }
        self.ids.clear();
    }

    fn waker(&mut self, slot: usize) -> Waker {
        while self.wakers.len() <= slot {
            let arc = Arc::new(SlotWaker {
                slot: self.wakers.len(),
                queued: AtomicBool::new(false),
                ready: self.ready.clone(),
            });
            let waker = Waker::from(arc.clone());
            self.wakers.push((arc, waker));
        }
        self.wakers[slot].1.clone()
    }

    /// Gives `n` body bytes back to the client on the connection window once enough add up.
    /// Credit goes back in batches of half the window, or as soon as the client has less than
    /// half left, so that a reader stalled on one stream cannot starve the others.
    fn release_connection(&mut self, n: usize) {
        self.unreleased = self.unreleased.saturating_add(n as u32);
        let half = self.settings.connection_window / 2;
        if self.unreleased > 0 && (self.unreleased >= half || self.recv_window <= i64::from(half)) {
            frame::write_window_update(&mut self.out, 0, self.unreleased);
            self.recv_window += i64::from(self.unreleased);
            self.unreleased = 0;
        }
    }

    /// Resets a stream this end still knows, or one it never accepted. Errors a client
    /// provokes on open streams count with its own resets ("MadeYouReset", CVE-2025-8671).
    fn reset(&mut self, id: u32, reason: Reason) {
        frame::write_rst_stream(&mut self.out, id, reason);
        if let Some(&slot) = self.ids.get(&id) {
            self.remove(slot, "stream reset");
            if reason != Reason::NO_ERROR && reason != Reason::REFUSED_STREAM && self.count_reset() {
                let _ = self.fail(Reason::ENHANCE_YOUR_CALM, "too many streams reset");
            }
        }
        self.remember_reset(id);
    }

    /// Counts a stream cancelled early; true once the connection is mostly that.
    fn count_reset(&mut self) -> bool {
        self.peer_resets += 1;
        self.peer_resets >= RESET_FLOOD_MIN && self.peer_resets * 2 > self.streams_opened
    }

    fn remember_reset(&mut self, id: u32) {
        if self.recent_resets.len() == RECENT_RESETS {
            self.recent_resets.pop_front();
        }
        self.recent_resets.push_back(id);
    }

    fn remove(&mut self, slot: usize, why: &'static str) {
        let Some(stream) = self.streams.try_remove(slot) else {
            return;
        };
        self.ids.remove(&stream.id);
        if self.streams.is_empty() && self.settings.idle_timeout.is_some() {
            self.idle_since = Instant::now();
        }
        // Dropping the phase drops the request's future (and so its body reader) first.
        let Stream {
            phase,
            recv,
            outstanding,
            peer_ended,
            ..
        } = stream;
        drop(phase);
        if let Some(recv) = recv
            && !peer_ended
        {
            recv.fail(why);
        }
        // Whatever the stream received and did not give back returns to the connection.
        self.release_connection(outstanding);
    }

    // ----- reading -----

    fn process_frames(&mut self) -> Result<(), ConnectionError> {
        loop {
            if self.state == State::Preface {
                let n = self.read.len().min(frame::PREFACE.len());
                if self.read[..n] != frame::PREFACE[..n] {
                    return Err(self.fail(Reason::PROTOCOL_ERROR, "invalid connection preface"));
                }
                if n < frame::PREFACE.len() {
                    return Ok(());
                }
                self.read.advance(n);
                self.state = State::FirstSettings;
            }
            if self.state == State::Closing || self.read.len() < frame::HEAD_LEN {
                return Ok(());
            }
            let head = Head::parse(&self.read);
            if head.len > frame::DEFAULT_MAX_FRAME {
                return Err(self.fail(Reason::FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE"));
            }
            if self.read.len() < frame::HEAD_LEN + head.len {
                return Ok(());
            }
            self.read.advance(frame::HEAD_LEN);
            let payload = self.read.split_to(head.len).freeze();
            if self.state == State::FirstSettings {
                if head.kind != frame::SETTINGS || head.flags & frame::ACK != 0 {
                    return Err(self.fail(Reason::PROTOCOL_ERROR, "first frame is not SETTINGS"));
                }
                self.state = State::Open;
                // From now on the idle timeout applies rather than the preface's.
                if let Some(idle) = self.settings.idle_timeout {
                    self.idle_since = Instant::now();
                    self.arm_timer(self.idle_since + idle);
                } else {
                    self.timer = None;
                }
            }
            if let Some(partial) = &self.partial
                && (head.kind != frame::CONTINUATION || head.stream != partial.stream)
            {
                return Err(self.fail(Reason::PROTOCOL_ERROR, "header block interrupted"));
            }
            self.frame(head, payload)?;
        }
    }

    fn frame(&mut self, head: Head, payload: Bytes) -> Result<(), ConnectionError> {
        match head.kind {
            frame::DATA => self.data(head, payload),
            frame::HEADERS => self.headers(head, payload),
            frame::PRIORITY => {
                if head.stream == 0 {
                    return Err(self.fail(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                if head.len != 5 {
                    self.reset(head.stream, Reason::FRAME_SIZE_ERROR);
                } else if u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff
                    == head.stream
                {
                    self.reset(head.stream, Reason::PROTOCOL_ERROR);
                }
                Ok(())
            }
            frame::RST_STREAM => {
                if head.stream == 0 {
                    return Err(self.fail(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
                }
                if head.len != 4 {
                    return Err(self.fail(Reason::FRAME_SIZE_ERROR, "RST_STREAM length"));
                }
                if head.stream > self.last_stream_id {
                    return Err(self.fail(Reason::PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
                }
                if let Some(&slot) = self.ids.get(&head.stream) {
                    self.remove(slot, "stream reset by the client");
                    if self.count_reset() {
                        return Err(self.fail(Reason::ENHANCE_YOUR_CALM, "too many streams reset"));
                    }
                }
                Ok(())
            }
            frame::SETTINGS => self.settings_frame(head, &payload),
            frame::PUSH_PROMISE => Err(self.fail(Reason::PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            frame::PING => {
                if head.stream != 0 {
                    return Err(self.fail(Reason::PROTOCOL_ERROR, "PING on a stream"));
                }
                if head.len != 8 {
                    return Err(self.fail(Reason::FRAME_SIZE_ERROR, "PING length"));
                }
                if head.flags & frame::ACK == 0 {
                    frame::write_ping_ack(&mut self.out, &payload);
                }
                Ok(())
            }
            frame::GOAWAY => {
                if head.stream != 0 {
                    return Err(self.fail(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if head.len < 8 {
                    return Err(self.fail(Reason::FRAME_SIZE_ERROR, "GOAWAY length"));
                }
                self.peer_goaway = true;
                Ok(())
            }
            frame::WINDOW_UPDATE => self.window_update(head, &payload),
            frame::CONTINUATION => self.continuation(head, payload),
            // §4.1: unknown frame types are ignored.
            _ => Ok(()),
        }
    }

    fn settings_frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnectionError> {
        if head.stream != 0 {
            return Err(self.fail(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.flags & frame::ACK != 0 {
            if head.len != 0 {
                return Err(self.fail(Reason::FRAME_SIZE_ERROR, "SETTINGS ACK with a payload"));
            }
            return Ok(());
        }
        if !head.len.is_multiple_of(6) {
            return Err(self.fail(Reason::FRAME_SIZE_ERROR, "SETTINGS length"));
        }
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match id {
                frame::SETTINGS_HEADER_TABLE_SIZE => self.encoder.peer_table_size_changed(value as usize),
                frame::SETTINGS_ENABLE_PUSH if value > 1 => {
                    return Err(self.fail(Reason::PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH above 1"));
                }
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    if i64::from(value) > frame::MAX_WINDOW {
                        return Err(self.fail(Reason::FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large"));
                    }
                    // §6.9.2: the change applies to every stream's window, which may go negative.
                    let delta = i64::from(value) - self.peer_initial_window;
                    self.peer_initial_window = i64::from(value);
                    let mut overflow = false;
                    for (slot, stream) in self.streams.iter_mut() {
                        stream.send_window += delta;
                        overflow |= stream.send_window > frame::MAX_WINDOW;
                        if delta > 0 {
                            self.to_poll.push(slot);
                        }
                    }
                    if overflow {
                        return Err(self.fail(Reason::FLOW_CONTROL_ERROR, "stream window above 2^31-1"));
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    let size = value as usize;
                    if !(frame::DEFAULT_MAX_FRAME..=frame::MAX_MAX_FRAME).contains(&size) {
                        return Err(self.fail(Reason::PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range"));
                    }
                    self.peer_max_frame = size;
                }
                _ => {}
            }
        }
        frame::write_settings_ack(&mut self.out);
        Ok(())
    }

    fn window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnectionError> {
        if head.len != 4 {
            return Err(self.fail(Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE length"));
        }
        let increment = i64::from(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff);
        if head.stream == 0 {
            if increment == 0 {
                return Err(self.fail(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.send_window += increment;
            if self.send_window > frame::MAX_WINDOW {
                return Err(self.fail(Reason::FLOW_CONTROL_ERROR, "connection window above 2^31-1"));
            }
            self.to_poll.append(&mut self.blocked);
            return Ok(());
        }
        if head.stream > self.last_stream_id {
            return Err(self.fail(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream"));
        }
        let Some(&slot) = self.ids.get(&head.stream) else {
            return Ok(());
        };
        if increment == 0 {
            self.reset(head.stream, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        let stream = &mut self.streams[slot];
        stream.send_window += increment;
        if stream.send_window > frame::MAX_WINDOW {
            self.reset(head.stream, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        self.to_poll.push(slot);
        Ok(())
    }

    /// The frame's payload without its padding (§6.1, §6.2).
    fn unpad(&mut self, head: Head, mut payload: Bytes) -> Result<Bytes, ConnectionError> {
        if head.flags & frame::PADDED == 0 {
            return Ok(payload);
        }
        let Some(&pad) = payload.first() else {
            return Err(self.fail(Reason::FRAME_SIZE_ERROR, "padded frame without a pad length"));
        };
        let pad = usize::from(pad);
        if pad >= payload.len() {
            return Err(self.fail(Reason::PROTOCOL_ERROR, "padding as long as the frame"));
        }
        payload.advance(1);
        payload.truncate(payload.len() - pad);
        Ok(payload)
    }

    fn data(&mut self, head: Head, payload: Bytes) -> Result<(), ConnectionError> {
        if head.stream == 0 {
            return Err(self.fail(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        // The whole frame, padding included, counts against the windows (§6.9.1).
        let flow = head.len;
        self.recv_window -= flow as i64;
        if self.recv_window < 0 {
            return Err(self.fail(Reason::FLOW_CONTROL_ERROR, "DATA past the connection window"));
        }
        let data = self.unpad(head, payload)?;
        let Some(&slot) = self.ids.get(&head.stream) else {
            if head.stream > self.last_stream_id {
                return Err(self.fail(Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
            }
            self.release_connection(flow);
            // Frames the client sent before it saw a reset are ignored; on a stream both sides
            // closed, DATA is a connection error (§5.1, "closed").
            if self.recent_resets.contains(&head.stream) {
                return Ok(());
            }
            return Err(self.fail(Reason::STREAM_CLOSED, "DATA on a closed stream"));
        };
        let stream = &mut self.streams[slot];
        stream.outstanding += flow;
        if stream.peer_ended {
            self.reset(head.stream, Reason::STREAM_CLOSED);
            return Ok(());
        }
        stream.recv_window -= flow as i64;
        if stream.recv_window < 0 {
            self.reset(head.stream, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        if let Some(remaining) = &mut stream.remaining_length {
            if data.len() as u64 > *remaining {
                self.reset(head.stream, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
            *remaining -= data.len() as u64;
        }
        let end = head.flags & frame::END_STREAM != 0;
        if end && stream.remaining_length.is_some_and(|r| r > 0) {
            self.reset(head.stream, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        // Padding is released at once; data once it is read.
        let padding = flow - data.len();
        let mut released = padding;
        match &stream.recv {
            Some(recv) => {
                if !data.is_empty() && !recv.push(data.clone()) {
                    released += data.len();
                }
                if end {
                    recv.end(None);
                }
            }
            None => released += data.len(),
        }
        if end {
            stream.peer_ended = true;
            self.to_poll.push(slot);
        }
        if released > 0 {
            self.release(slot, released);
        }
        Ok(())
    }

    /// Gives `n` bytes of a stream back to the client: on the stream (while it can still send)
    /// and on the connection.
    fn release(&mut self, slot: usize, n: usize) {
        let half_window = self.settings.stream_window / 2;
        let stream = &mut self.streams[slot];
        stream.outstanding = stream.outstanding.saturating_sub(n);
        if !stream.peer_ended {
            stream.unreleased = stream.unreleased.saturating_add(n as u32);
            if stream.unreleased >= half_window {
                frame::write_window_update(&mut self.out, stream.id, stream.unreleased);
                stream.recv_window += i64::from(stream.unreleased);
                stream.unreleased = 0;
            }
        }
        self.release_connection(n);
    }

    fn headers(&mut self, head: Head, payload: Bytes) -> Result<(), ConnectionError> {
        if head.stream == 0 {
            return Err(self.fail(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        let mut block = self.unpad(head, payload)?;
        let mut self_dependent = false;
        if head.flags & frame::PRIORITY_FLAG != 0 {
            if block.len() < 5 {
                return Err(self.fail(Reason::FRAME_SIZE_ERROR, "HEADERS priority fields missing"));
            }
            let dependency = u32::from_be_bytes([block[0], block[1], block[2], block[3]]) & 0x7fff_ffff;
            self_dependent = dependency == head.stream;
            block.advance(5);
        }
        let end_stream = head.flags & frame::END_STREAM != 0;
        if head.flags & frame::END_HEADERS != 0 {
            return self.header_block(head.stream, end_stream, self_dependent, block);
        }
        self.partial = Some(PartialBlock {
            stream: head.stream,
            end_stream,
            self_dependent,
            block: BytesMut::from(&block[..]),
        });
        Ok(())
    }

    fn continuation(&mut self, head: Head, payload: Bytes) -> Result<(), ConnectionError> {
        let limit = self.settings.max_header_list_size as usize * 2 + 16 * 1024;
        let Some(partial) = &mut self.partial else {
            return Err(self.fail(Reason::PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
        };
        partial.block.extend_from_slice(&payload);
        if partial.block.len() > limit {
            return Err(self.fail(Reason::ENHANCE_YOUR_CALM, "header block too large"));
        }
        if head.flags & frame::END_HEADERS == 0 {
            return Ok(());
        }
        let Some(partial) = self.partial.take() else {
            return Ok(());
        };
        self.header_block(
            partial.stream,
            partial.end_stream,
            partial.self_dependent,
            partial.block.freeze(),
        )
    }

    fn header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        self_dependent: bool,
        block: Bytes,
    ) -> Result<(), ConnectionError> {
        // Decoded first, whatever becomes of the stream: the tables must stay in step.
        let mut fields = RequestHead::default();
        if let Err(e) = self.decoder.decode(&block, |field, size| fields.add(field, size)) {
            tracing::debug!(error = %e, "HTTP/2 header block");
            return Err(self.fail(Reason::COMPRESSION_ERROR, e.0));
        }
        if let Some(&slot) = self.ids.get(&id) {
            self.trailers(slot, end_stream, fields);
            return Ok(());
        }
        if id <= self.last_stream_id {
            if self.recent_resets.contains(&id) {
                return Ok(());
            }
            return Err(self.fail(Reason::STREAM_CLOSED, "HEADERS on a closed stream"));
        }
        if id.is_multiple_of(2) {
            return Err(self.fail(Reason::PROTOCOL_ERROR, "even stream id from a client"));
        }
        self.last_stream_id = id;
        if self_dependent {
            self.reset(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        if self.peer_goaway || self.going_away || self.streams.len() >= self.settings.max_concurrent_streams as usize {
            self.reset(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        if fields.list_size > self.settings.max_header_list_size as usize {
            // As the h2 crate: 431, and the stream ends.
            self.head_scratch.clear();
            self.encoder.encode_response(
                http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                &HeaderMap::new(),
                &mut self.head_scratch,
            );
            frame::write_header_block(&mut self.out, id, &self.head_scratch, true, self.peer_max_frame);
            if !end_stream {
                frame::write_rst_stream(&mut self.out, id, Reason::NO_ERROR);
            }
            self.remember_reset(id);
            return Ok(());
        }
        let (parts, content_length) = match fields.into_request() {
            Ok(request) => request,
            Err(why) => {
                tracing::debug!(stream = id, why, "malformed HTTP/2 request");
                self.reset(id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
        };
        if end_stream && content_length.is_some_and(|n| n > 0) {
            self.reset(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        self.streams_opened += 1;
        let slot = self.streams.vacant_key();
        let waker = self.waker(slot);
        let (recv, body) = if end_stream {
            (None, RequestBody::empty())
        } else {
            let recv = Recv::new(waker);
            (Some(recv.clone()), RequestBody::streaming(recv, content_length))
        };
        let future = (self.service)(Request::from_parts(parts, body));
        self.streams.insert(Stream {
            id,
            phase: Phase::Handling(future),
            send_window: self.peer_initial_window,
            recv_window: i64::from(self.settings.stream_window),
            unreleased: 0,
            outstanding: 0,
            recv,
            peer_ended: end_stream,
            remaining_length: content_length,
        });
        self.ids.insert(id, slot);
        self.to_poll.push(slot);
        Ok(())
    }

    /// A second header block on a stream: trailers, which must end it.
    fn trailers(&mut self, slot: usize, end_stream: bool, fields: RequestHead) {
        let stream = &mut self.streams[slot];
        let id = stream.id;
        if stream.peer_ended {
            self.reset(id, Reason::STREAM_CLOSED);
            return;
        }
        if !end_stream || stream.remaining_length.is_some_and(|r| r > 0) {
            self.reset(id, Reason::PROTOCOL_ERROR);
            return;
        }
        let trailers = match fields.into_trailers() {
            Ok(t) => t,
            Err(_) => {
                self.reset(id, Reason::PROTOCOL_ERROR);
                return;
            }
        };
        stream.peer_ended = true;
        if let Some(recv) = &stream.recv {
            recv.end(Some(trailers));
        }
        self.to_poll.push(slot);
    }

    // ----- streams -----

    fn poll_stream(&mut self, slot: usize) {
        let Some(stream) = self.streams.get_mut(slot) else {
            return;
        };
        // Body bytes the reader consumed go back to the client.
        let (consumed, reader_gone) = match &stream.recv {
            Some(recv) => recv.take_consumed(),
            None => (0, true),
        };
        if consumed > 0 {
            self.release(slot, consumed);
        }
        let waker = self.wakers[slot].1.clone();
        let mut cx = Context::from_waker(&waker);
        let phase = std::mem::replace(&mut self.streams[slot].phase, Phase::Sent);
        let phase = match phase {
            Phase::Handling(mut future) => match future.as_mut().poll(&mut cx) {
                Poll::Ready(Ok(response)) => self.start_response(slot, response),
                Poll::Ready(Err(never)) => match never {},
                Poll::Pending => Phase::Handling(future),
            },
            other => other,
        };
        let phase = match phase {
            Phase::Sending { body, pending, last } => match self.send_body(slot, &mut cx, body, pending, last) {
                Some(phase) => phase,
                // Reset: the stream is gone.
                None => return,
            },
            other => other,
        };
        let stream = &mut self.streams[slot];
        let done = matches!(phase, Phase::Sent);
        stream.phase = phase;
        if done {
            if stream.peer_ended {
                self.remove(slot, "stream complete");
            } else if reader_gone {
                // The response is complete and nobody reads the rest of the request: tell the
                // client to stop sending it (§8.1).
                let id = stream.id;
                self.reset(id, Reason::NO_ERROR);
            }
        }
    }

    fn start_response(&mut self, slot: usize, response: Response<ResponseBody>) -> Phase {
        let (mut parts, body) = response.into_parts();
        strip_connection_specific(&mut parts.headers);
        if !parts.headers.contains_key(header::DATE) {
            parts.headers.insert(header::DATE, crate::response_date::date_value());
        }
        let end = body.is_end_stream();
        self.head_scratch.clear();
        self.encoder
            .encode_response(parts.status, &parts.headers, &mut self.head_scratch);
        let id = self.streams[slot].id;
        frame::write_header_block(&mut self.out, id, &self.head_scratch, end, self.peer_max_frame);
        if end {
            Phase::Sent
        } else {
            Phase::Sending {
                body,
                pending: Bytes::new(),
                last: false,
            }
        }
    }

    /// Sends what the windows and the output limit allow. `None`: the stream was reset.
    fn send_body(
        &mut self,
        slot: usize,
        cx: &mut Context<'_>,
        mut body: ResponseBody,
        mut pending: Bytes,
        mut last: bool,
    ) -> Option<Phase> {
        let id = self.streams[slot].id;
        loop {
            if !pending.is_empty() {
                let stream = &mut self.streams[slot];
                let window = stream.send_window.min(self.send_window).max(0) as usize;
                if window == 0 {
                    if self.send_window <= 0 && !self.blocked.contains(&slot) {
                        self.blocked.push(slot);
                    }
                    return Some(Phase::Sending { body, pending, last });
                }
                let chunk = pending.split_to(pending.len().min(window).min(self.peer_max_frame));
                stream.send_window -= chunk.len() as i64;
                self.send_window -= chunk.len() as i64;
                let end = last && pending.is_empty();
                frame::write_data_head(&mut self.out, id, chunk.len(), end);
                self.out.extend_from_slice(&chunk);
                if end {
                    return Some(Phase::Sent);
                }
                continue;
            }
            if self.output_backlog() >= OUTPUT_HIGH_WATER {
                self.deferred.push(slot);
                return Some(Phase::Sending { body, pending, last });
            }
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        last = body.is_end_stream();
                        if data.is_empty() && last {
                            frame::write_data_head(&mut self.out, id, 0, true);
                            return Some(Phase::Sent);
                        }
                        pending = data;
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.head_scratch.clear();
                            self.encoder.encode_trailers(&trailers, &mut self.head_scratch);
                            frame::write_header_block(&mut self.out, id, &self.head_scratch, true, self.peer_max_frame);
                            return Some(Phase::Sent);
                        }
                    }
                },
                Poll::Ready(None) => {
                    frame::write_data_head(&mut self.out, id, 0, true);
                    return Some(Phase::Sent);
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(stream = id, error = %e, "response body failed; resetting the stream");
                    self.reset(id, Reason::INTERNAL_ERROR);
                    return None;
                }
                Poll::Pending => return Some(Phase::Sending { body, pending, last }),
            }
        }
    }

    // ----- driving -----

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.poll_fill(&mut self.io, cx)
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_written < self.out.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.out_written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !self.out.is_empty() {
            self.out.clear();
            self.out_written = 0;
            self.flush_pending = true;
        }
        // TLS streams can hold written records until flushed; a flush may take several polls.
        if self.flush_pending {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.flush_pending = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO, F> Future for Connection<IO, F>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<RequestBody>) -> ResponseFuture + Unpin,
{
    type Output = Result<(), ConnectionError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The connection holds no self-references; it is only pinned to be a future.
        let this = self.get_mut();
        {
            let mut ready = this.ready.lock();
            if !ready.1.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                ready.1 = Some(cx.waker().clone());
            }
        }
        if let Some(shutdown) = &mut this.shutdown
            && shutdown.as_mut().poll(cx).is_ready()
        {
            this.shutdown = None;
            if this.state == State::Preface {
                this.state = State::Closing;
            } else if this.state != State::Closing {
                // §6.8: the last stream this end will process, then no new ones.
                frame::write_goaway(&mut this.out, this.last_stream_id, Reason::NO_ERROR, b"draining");
                this.going_away = true;
            }
        }
        this.check_timer();
        let mut error = None;
        let mut waiting_tick = false;
        for _ in 0..ROUNDS_PER_POLL {
            let mut progressed = false;
            let read_allowed = this.output_backlog() < 4 * OUTPUT_HIGH_WATER;
            if this.state != State::Closing && !this.read_closed && read_allowed {
                match this.poll_read(cx) {
                    Poll::Ready(Ok(0)) => {
                        this.read_closed = true;
                        this.drop_all_streams("client closed the connection");
                        progressed = true;
                    }
                    Poll::Ready(Ok(_)) => {
                        if let Err(e) = this.process_frames() {
                            error = Some(e);
                        }
                        progressed = true;
                    }
                    Poll::Ready(Err(e)) => {
                        this.drop_all_streams("connection failed");
                        return Poll::Ready(Err(e.into()));
                    }
                    Poll::Pending => {}
                }
            }
            {
                let mut ready = this.ready.lock();
                std::mem::swap(&mut ready.0, &mut this.spare);
            }
            this.to_poll.append(&mut this.spare);
            if !this.to_poll.is_empty() {
                progressed = true;
                let mut slots = std::mem::take(&mut this.to_poll);
                for &slot in &slots {
                    if let Some((waker, _)) = this.wakers.get(slot) {
                        waker.queued.store(false, Ordering::Release);
                    }
                }
                slots.sort_unstable();
                slots.dedup();
                for &slot in &slots {
                    if this.state == State::Closing {
                        break;
                    }
                    this.poll_stream(slot);
                }
                slots.clear();
                if this.to_poll.is_empty() {
                    this.to_poll = slots;
                }
            }
            // The first write of a burst waits one scheduler tick (see `held_write`).
            if this.output_backlog() > 0 && !this.write_held {
                this.write_held = true;
                let mut tick = std::pin::pin!(tokio::task::yield_now());
                waiting_tick = tick.as_mut().poll(cx).is_pending();
            }
            let written = if waiting_tick {
                Poll::Pending
            } else {
                this.poll_write_out(cx)
            };
            match written {
                Poll::Ready(Ok(())) => {
                    this.write_held = false;
                    // Reading waited for this write: go round again so it resumes (and
                    // registers for the next readiness).
                    if !read_allowed {
                        progressed = true;
                    }
                    if !this.deferred.is_empty() {
                        this.to_poll.append(&mut this.deferred);
                        progressed = true;
                    }
                }
                Poll::Ready(Err(e)) => {
                    this.drop_all_streams("connection failed");
                    return Poll::Ready(Err(e.into()));
                }
                Poll::Pending => {}
            }
            let finished = this.state == State::Closing
                || this.read_closed
                || ((this.peer_goaway || this.going_away)
                    && this.streams.is_empty()
                    && this.linger_until.is_none_or(|t| Instant::now() >= t));
            if finished && this.output_backlog() == 0 && !this.flush_pending {
                // The close (and for TLS its close_notify) must go out too.
                if Pin::new(&mut this.io).poll_shutdown(cx).is_pending() {
                    this.error = this.error.take().or(error);
                    return Poll::Pending;
                }
                let error = this.error.take().or(error);
                return Poll::Ready(match error {
                    Some(e) => Err(e),
                    None => Ok(()),
                });
            }
            if !progressed {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// RFC 9113 §8.2.2: fields that only mean something to one HTTP/1.1 connection cannot be sent.
/// The proxy's hop-by-hop removal does it (with its fast check for the usual case of none),
/// and a response drops even `TE: trailers`.
fn strip_connection_specific(headers: &mut HeaderMap) {
    let te = headers.keys().any(|name| name == header::TE);
    crate::service::remove_hop_by_hop(headers, false);
    if te {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn raw_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Head {
            len: payload.len(),
            kind,
            flags,
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(payload);
        out
    }

    /// `POST /` as literal fields.
    fn post_block() -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "a"),
        ] {
            out.push(0);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.push(value.len() as u8);
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// A server whose service holds each request (and so its body) unread forever.
    async fn start(settings: ServerSettings) -> DuplexStream {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve(server, settings, Box::pin(std::future::pending()), |req| {
            Box::pin(async move {
                let _held = req;
                std::future::pending::<Result<Response<ResponseBody>, Infallible>>().await
            })
        }));
        client
    }

    /// Frames the server wrote until it closed, as (type, stream, first 4 payload octets).
    async fn frames_until_close(mut client: DuplexStream) -> Vec<(u8, u32, u32)> {
        let mut bytes = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), client.read_to_end(&mut bytes)).await;
        let mut frames = Vec::new();
        let mut at = 0;
        while at + frame::HEAD_LEN <= bytes.len() {
            let head = Head::parse(&bytes[at..]);
            let payload = &bytes[at + frame::HEAD_LEN..(at + frame::HEAD_LEN + head.len).min(bytes.len())];
            let word = payload
                .get(..4)
                .map_or(0, |w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
            // GOAWAY: the error code follows the last stream id.
            let word = if head.kind == frame::GOAWAY {
                u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]])
            } else {
                word
            };
            frames.push((head.kind, head.stream, word));
            at += frame::HEAD_LEN + head.len;
        }
        frames
    }

    async fn send_body_frames(client: &mut DuplexStream, frames: usize) {
        let mut out = frame::PREFACE.to_vec();
        out.extend(raw_frame(frame::SETTINGS, 0, 0, &[]));
        out.extend(raw_frame(frame::HEADERS, frame::END_HEADERS, 1, &post_block()));
        for _ in 0..frames {
            out.extend(raw_frame(frame::DATA, 0, 1, &[0; 16_384]));
        }
        client.write_all(&out).await.expect("write");
    }

    #[tokio::test]
    async fn data_past_the_connection_window_ends_the_connection() {
        let mut client = start(ServerSettings {
            connection_window: 65_535,
            ..ServerSettings::default()
        })
        .await;
        // Four full frames are 65,536 octets: one past the window, since nothing was read.
        send_body_frames(&mut client, 4).await;
        let frames = frames_until_close(client).await;
        assert_eq!(
            frames.last(),
            Some(&(frame::GOAWAY, 0, Reason::FLOW_CONTROL_ERROR.0)),
            "{frames:?}"
        );
    }

    #[tokio::test]
    async fn data_past_a_stream_window_resets_the_stream() {
        let mut client = start(ServerSettings {
            stream_window: 65_535,
            ..ServerSettings::default()
        })
        .await;
        send_body_frames(&mut client, 4).await;
        // Then a PING, answered: the connection lives on.
        client
            .write_all(&raw_frame(frame::PING, 0, 0, &[7; 8]))
            .await
            .expect("write");
        client
            .write_all(&raw_frame(frame::GOAWAY, 0, 0, &[0; 8]))
            .await
            .expect("write");
        let frames = frames_until_close(client).await;
        assert!(
            frames.contains(&(frame::RST_STREAM, 1, Reason::FLOW_CONTROL_ERROR.0)),
            "{frames:?}"
        );
        assert!(frames.iter().any(|f| f.0 == frame::PING), "{frames:?}");
        assert!(!frames.iter().any(|f| f.0 == frame::GOAWAY), "{frames:?}");
    }

    #[test]
    fn connection_specific_response_fields_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::SERVER, HeaderValue::from_static("s"));
        strip_connection_specific(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::SERVER));
    }
}
