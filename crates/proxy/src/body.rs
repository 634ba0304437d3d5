//! Body types on both sides of the proxy.
//!
//! Bodies stream through untouched; only replies the proxy makes itself carry a buffered
//! body, and request bodies of routes that retry keep a bounded copy for replay. Enums rather
//! than boxed trait objects keep the request path free of allocations.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::upstream::http1::Http1Body;
use crate::upstream::pool::RequestSlot;

/// Body of a response sent downstream.
pub enum ResponseBody {
    /// The upstream's body, streamed. `slot` counts the request against the cluster's
    /// `max_requests` until the body ends (HTTP/1.1 bodies return their connection themselves).
    Upstream {
        body: UpstreamResponseBody,
        slot: Option<RequestSlot>,
    },
    /// A reply the proxy produced itself.
    Local(Full<Bytes>),
    /// A response streamed to the client while a copy is kept (proxy-cache).
    Caching(Box<CachingBody>),
}

/// Streams a response while copying it, up to `limit` bytes; at its end the copy goes to
/// `store` (a body over the limit is not stored).
pub struct CachingBody {
    inner: ResponseBody,
    copy: Vec<Bytes>,
    size: usize,
    limit: usize,
    store: Option<Box<dyn FnOnce(Bytes) + Send + Sync>>,
}

impl CachingBody {
    pub fn new(inner: ResponseBody, limit: usize, store: impl FnOnce(Bytes) + Send + Sync + 'static) -> Self {
        CachingBody {
            inner,
            copy: Vec::new(),
            size: 0,
            limit,
            store: Some(Box::new(store)),
        }
    }

    fn finish(&mut self) {
        if let Some(store) = self.store.take() {
            store(Bytes::from(self.copy.concat()));
        }
    }
}

impl ResponseBody {
    /// Wraps an upstream body; an already-finished one (HEAD, 204, 304) ends its request's
    /// count at once, since nobody will poll it to the end.
    pub fn upstream(body: UpstreamResponseBody, slot: Option<RequestSlot>) -> Self {
        let slot = if body.is_end_stream() { None } else { slot };
        ResponseBody::Upstream { body, slot }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResponseBody::Upstream { body, slot } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                let ended = match &polled {
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    Poll::Pending => false,
                };
                if ended {
                    *slot = None;
                }
                polled
            }
            ResponseBody::Local(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            ResponseBody::Caching(c) => {
                let polled = Pin::new(&mut c.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref()
                            && c.store.is_some()
                        {
                            c.size += data.len();
                            if c.size > c.limit {
                                c.store = None;
                                c.copy.clear();
                            } else {
                                c.copy.push(data.clone());
                            }
                        }
                        if c.inner.is_end_stream() {
                            c.finish();
                        }
                    }
                    Poll::Ready(None) => c.finish(),
                    Poll::Ready(Some(Err(_))) => c.store = None,
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Local(b) => b.is_end_stream(),
            ResponseBody::Caching(c) => c.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Local(b) => b.size_hint(),
            ResponseBody::Caching(c) => c.inner.size_hint(),
        }
    }
}

/// A body the proxy produced itself.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    ResponseBody::Local(Full::new(bytes.into()))
}

pub fn empty() -> ResponseBody {
    ResponseBody::Local(Full::new(Bytes::new()))
}

/// Body of a response from upstream: read in the request's task (HTTP/1.1), or from hyper's
/// connection task (HTTP/2, and HTTP/1.1 upgrades).
pub enum UpstreamResponseBody {
    Http1(Http1Body),
    Hyper(Incoming),
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamResponseBody::Http1(b) => Pin::new(b).poll_frame(cx),
            UpstreamResponseBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamResponseBody::Http1(b) => b.is_end_stream(),
            UpstreamResponseBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamResponseBody::Http1(b) => b.size_hint(),
            UpstreamResponseBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// Body of a request from downstream: meshgate's own codecs', or hyper's (upgrades,
/// connections whose protocol was not told apart, `--http1-server hyper`).
pub enum DownstreamBody {
    Hyper(Incoming),
    Http1(crate::http1::RequestBody),
    Http2(crate::http2::RequestBody),
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            DownstreamBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            DownstreamBody::Http1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            DownstreamBody::Http2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownstreamBody::Hyper(b) => b.is_end_stream(),
            DownstreamBody::Http1(b) => b.is_end_stream(),
            DownstreamBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DownstreamBody::Hyper(b) => b.size_hint(),
            DownstreamBody::Http1(b) => b.size_hint(),
            DownstreamBody::Http2(b) => b.size_hint(),
        }
    }
}

/// Body of a request sent upstream.
pub enum UpstreamBody {
    /// The downstream body, streamed as it arrives.
    Streaming(DownstreamBody),
    /// A frame already read from the downstream body (to validate its framing before
    /// anything goes upstream), then the rest of it.
    Prefixed {
        first: Option<Frame<Bytes>>,
        rest: DownstreamBody,
    },
    /// A body the proxy holds whole.
    Buffered(Full<Bytes>),
    /// One try's view of a [`ReplayableBody`].
    Replay(ReplayReader),
    /// A body copied as it streams, for request mirrors.
    Teed(Box<MirrorTee>),
}

/// Streams a body unchanged while keeping a copy of up to [`REPLAY_BUFFER_LIMIT`] bytes; when
/// the body has been read to its end within that size, `on_complete` gets the copy (request
/// mirrors are sent then, so they carry the whole body without delaying the primary request).
pub struct MirrorTee {
    inner: UpstreamBody,
    copy: Vec<Bytes>,
    size: usize,
    overflow: bool,
    on_complete: Option<Box<dyn FnOnce(Bytes) + Send + Sync>>,
}

impl MirrorTee {
    pub fn new(inner: UpstreamBody, on_complete: impl FnOnce(Bytes) + Send + Sync + 'static) -> Self {
        MirrorTee {
            inner,
            copy: Vec::new(),
            size: 0,
            overflow: false,
            on_complete: Some(Box::new(on_complete)),
        }
    }

    /// Hands the copy over, once, unless the body outgrew it.
    fn complete(&mut self) {
        if let Some(callback) = self.on_complete.take()
            && !self.overflow
        {
            callback(Bytes::from(self.copy.concat()));
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && !self.overflow
                {
                    self.size += data.len();
                    if self.size > REPLAY_BUFFER_LIMIT {
                        self.overflow = true;
                        self.copy.clear();
                        tracing::debug!("request body over the mirror buffer: not mirrored");
                    } else {
                        self.copy.push(data.clone());
                    }
                }
                // A sender that knows the body's length may never poll for its end.
                if self.inner.is_end_stream() {
                    self.complete();
                }
            }
            Poll::Ready(None) => self.complete(),
            Poll::Ready(Some(Err(_))) => self.on_complete = None,
            Poll::Pending => {}
        }
        polled
    }
}

/// Why an upstream request body stopped.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Streaming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Prefixed { first, rest } => match first.take() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None => Pin::new(rest).poll_frame(cx).map_err(Into::into),
            },
            UpstreamBody::Buffered(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            UpstreamBody::Replay(r) => r.poll_frame(cx),
            UpstreamBody::Teed(t) => t.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streaming(b) => b.is_end_stream(),
            UpstreamBody::Prefixed { first, rest } => first.is_none() && rest.is_end_stream(),
            UpstreamBody::Buffered(b) => b.is_end_stream(),
            UpstreamBody::Replay(r) => r.is_end_stream(),
            UpstreamBody::Teed(t) => t.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Streaming(b) => b.size_hint(),
            UpstreamBody::Prefixed { first, rest } => {
                let extra = first.as_ref().and_then(|f| f.data_ref()).map_or(0, |d| d.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
            UpstreamBody::Buffered(b) => b.size_hint(),
            UpstreamBody::Replay(r) => r.size_hint(),
            UpstreamBody::Teed(t) => t.inner.size_hint(),
        }
    }
}

/// Request body bytes kept for replay: a body larger than this is streamed without a copy and
/// its request is not retried (Envoy's per-request buffer limit for retries and shadowing).
pub const REPLAY_BUFFER_LIMIT: usize = 64 * 1024;

/// A request body that can be sent again by a retry.
///
/// The body still streams: each try reads what earlier tries already read from the copy, then
/// pulls further frames from the downstream, keeping a copy while the total stays within
/// [`REPLAY_BUFFER_LIMIT`]. Only the newest try may read; an abandoned try whose connection is
/// still sending (after a per-try timeout, or an early error response) gets an error, so that
/// connection is aborted instead of racing the retry for the downstream body.
pub struct ReplayableBody {
    shared: Arc<Mutex<ReplayState>>,
}

struct ReplayState {
    /// The downstream body not read yet; `None` once it ended.
    source: Option<UpstreamBody>,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    copied: usize,
    /// The body outgrew the copy (or the downstream body failed): no replay is possible.
    lost: bool,
    /// The body announced more than the copy holds: it is not copied, and once any of it was
    /// read no replay is tried (a try that failed before reading it, such as a connect
    /// failure, can still be retried).
    too_large: bool,
    /// The try allowed to read.
    current_try: u32,
}

impl ReplayableBody {
    pub fn new(source: UpstreamBody) -> Self {
        let too_large = source.size_hint().lower() > REPLAY_BUFFER_LIMIT as u64;
        ReplayableBody {
            shared: Arc::new(Mutex::new(ReplayState {
                source: Some(source),
                chunks: Vec::new(),
                trailers: None,
                copied: 0,
                lost: false,
                too_large,
                current_try: 0,
            })),
        }
    }

    /// Whether a new try can send the whole body again.
    pub fn replayable(&self) -> bool {
        !locked(&self.shared).lost
    }

    /// The body for the next try; earlier tries' readers stop with an error.
    pub fn next_try(&self) -> UpstreamBody {
        let mut state = locked(&self.shared);
        state.current_try = state.current_try.wrapping_add(1);
        UpstreamBody::Replay(ReplayReader {
            shared: self.shared.clone(),
            try_number: state.current_try,
            next_chunk: 0,
            trailers_sent: false,
        })
    }
}

fn locked(m: &Mutex<ReplayState>) -> MutexGuard<'_, ReplayState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One try's position in a [`ReplayableBody`].
pub struct ReplayReader {
    shared: Arc<Mutex<ReplayState>>,
    try_number: u32,
    next_chunk: usize,
    trailers_sent: bool,
}

impl ReplayReader {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut guard = locked(&self.shared);
        let state = &mut *guard;
        if state.current_try != self.try_number {
            return Poll::Ready(Some(Err("request body taken over by a retry".into())));
        }
        if let Some(chunk) = state.chunks.get(self.next_chunk) {
            self.next_chunk += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        let Some(source) = state.source.as_mut() else {
            if !self.trailers_sent
                && let Some(t) = &state.trailers
            {
                self.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                state.source = None;
                state.lost = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    state.copied += data.len();
                    if state.copied > REPLAY_BUFFER_LIMIT || state.too_large {
                        state.lost = true;
                        state.chunks = Vec::new();
                    } else if !state.lost {
                        state.chunks.push(data.clone());
                        self.next_chunk = state.chunks.len();
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    state.trailers = Some(t.clone());
                    self.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = locked(&self.shared);
        state.source.is_none()
            && self.next_chunk >= state.chunks.len()
            && (self.trailers_sent || state.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let state = locked(&self.shared);
        let copied: u64 = state.chunks.iter().skip(self.next_chunk).map(|c| c.len() as u64).sum();
        let rest = state
            .source
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + copied);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + copied);
        }
        hint
    }
}
