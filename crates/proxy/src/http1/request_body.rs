//! The body of a request received over HTTP/1.1.
//!
//! A body that arrived whole with its head (the common small POST) is handed over as it is.
//! A longer one is read from the connection on demand: when whatever sends the request
//! upstream polls the body, the connection task reads the next piece off the socket and
//! passes the frames that read holds through a small locked queue. Nothing is read ahead of
//! what the reader asks for, so a slow upstream holds at most one socket read of the body in
//! memory, and the bytes after the body (a pipelined request) stay in the connection's buffer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
#[error("HTTP/1.1 request body: {0}")]
pub struct RecvError(pub &'static str);

/// What the connection and the body's reader share.
#[derive(Default)]
struct ChannelState {
    /// Frames handed over by the connection, not read yet.
    frames: VecDeque<Frame<Bytes>>,
    ended: bool,
    error: Option<&'static str>,
    /// The reader is waiting for a frame.
    wanted: bool,
    /// The client asked for `100 Continue` and it has not been sent.
    continue_pending: bool,
    reader: Option<Waker>,
    connection: Option<Waker>,
    reader_gone: bool,
}

/// The connection's end of a streaming body. Dropped before the body ended (the exchange
/// finished first, or the connection failed), it ends the body with an error, so a reader
/// elsewhere (an upstream HTTP/2 stream's task) is not left waiting.
pub(crate) struct BodySender(Arc<Mutex<ChannelState>>);

impl Drop for BodySender {
    fn drop(&mut self) {
        let mut state = lock(&self.0);
        if !state.ended && state.error.is_none() {
            state.error = Some("the connection stopped reading the body");
            Self::wake_reader(state);
        }
    }
}

/// What the connection should do for the body next.
pub(crate) enum Demand {
    /// The reader waits for a frame: read one.
    Frame,
    /// The reader waits, but the client waits for `100 Continue` first.
    Continue,
    /// Nothing is wanted yet.
    Idle,
    /// The reader dropped the body before its end.
    Gone,
}

fn lock(state: &Mutex<ChannelState>) -> MutexGuard<'_, ChannelState> {
    // A panic while holding the lock cannot leave the slot inconsistent.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl BodySender {
    /// What the reader wants; registers `cx` to be woken when that changes.
    pub(crate) fn demand(&self, cx: &Context<'_>) -> Demand {
        let mut state = lock(&self.0);
        if state.reader_gone {
            return Demand::Gone;
        }
        if !state.connection.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            state.connection = Some(cx.waker().clone());
        }
        match (state.wanted && state.frames.is_empty(), state.continue_pending) {
            (true, true) => Demand::Continue,
            (true, false) => Demand::Frame,
            (false, _) => Demand::Idle,
        }
    }

    /// `100 Continue` went out, or is no longer owed (the final response started): the
    /// connection may read the body now.
    pub(crate) fn continue_sent(&self) {
        let mut state = lock(&self.0);
        state.continue_pending = false;
        if let Some(w) = state.connection.take() {
            drop(state);
            w.wake();
        }
    }

    /// Whether `100 Continue` is still owed to the client: asked for, the reader waiting, not sent.
    pub(crate) fn continue_owed(&self) -> bool {
        let state = lock(&self.0);
        state.continue_pending && state.wanted && !state.reader_gone
    }

    pub(crate) fn send(&self, frame: Frame<Bytes>) {
        let mut state = lock(&self.0);
        state.frames.push_back(frame);
        state.wanted = false;
        state.continue_pending = false;
        Self::wake_reader(state);
    }

    pub(crate) fn end(&self) {
        let mut state = lock(&self.0);
        state.ended = true;
        Self::wake_reader(state);
    }

    pub(crate) fn fail(&self, reason: &'static str) {
        let mut state = lock(&self.0);
        state.error = Some(reason);
        Self::wake_reader(state);
    }

    fn wake_reader(mut state: MutexGuard<'_, ChannelState>) {
        if let Some(w) = state.reader.take() {
            drop(state);
            w.wake();
        }
    }
}

/// A request body received over HTTP/1.1.
pub struct RequestBody {
    kind: Kind,
    /// What `Content-Length` announced, less what has been read; `None` for chunked bodies.
    remaining: Option<u64>,
}

enum Kind {
    /// The whole body, read with the head (`None` once handed out, or for no body).
    Whole(Option<Bytes>),
    Streaming(Arc<Mutex<ChannelState>>),
}

impl RequestBody {
    /// A request without a body.
    pub fn empty() -> Self {
        RequestBody {
            kind: Kind::Whole(None),
            remaining: Some(0),
        }
    }

    /// A body that arrived whole with its head.
    pub(crate) fn whole(data: Bytes) -> Self {
        RequestBody {
            remaining: Some(data.len() as u64),
            kind: Kind::Whole((!data.is_empty()).then_some(data)),
        }
    }

    /// A body read from the connection as it is polled; `expect_continue`: the client waits
    /// for `100 Continue` before it sends the body.
    pub(crate) fn streaming(content_length: Option<u64>, expect_continue: bool) -> (Self, BodySender) {
        let state = Arc::new(Mutex::new(ChannelState {
            continue_pending: expect_continue,
            ..ChannelState::default()
        }));
        let body = RequestBody {
            kind: Kind::Streaming(state.clone()),
            remaining: content_length,
        };
        (body, BodySender(state))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RecvError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, RecvError>>> {
        let this = self.get_mut();
        let state = match &mut this.kind {
            Kind::Whole(data) => {
                this.remaining = Some(0);
                return Poll::Ready(data.take().map(|d| Ok(Frame::data(d))));
            }
            Kind::Streaming(state) => state,
        };
        let mut state = lock(state);
        if let Some(frame) = state.frames.pop_front() {
            if let (Some(r), Some(data)) = (&mut this.remaining, frame.data_ref()) {
                *r = r.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(reason) = state.error {
            return Poll::Ready(Some(Err(RecvError(reason))));
        }
        if state.ended {
            return Poll::Ready(None);
        }
        if !state.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            state.reader = Some(cx.waker().clone());
        }
        if !state.wanted {
            state.wanted = true;
            if let Some(w) = state.connection.take() {
                drop(state);
                w.wake();
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Whole(data) => data.is_none(),
            Kind::Streaming(state) => {
                let state = lock(state);
                state.ended && state.frames.is_empty()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Kind::Streaming(state) = &self.kind {
            let mut state = lock(state);
            state.reader_gone = true;
            if let Some(w) = state.connection.take() {
                drop(state);
                w.wake();
            }
        }
    }
}
