//! The body of a request received over HTTP/2: DATA frames the connection hands over, read
//! by whatever sends the request upstream.
//!
//! The connection and the reader share one small locked queue (both run on the same worker
//! thread, so the lock is never contended). What the reader consumes is reported back, in
//! steps, so the connection can reopen the client's flow-control window: a slow upstream
//! holds at most one stream window of the body in memory.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

/// Consumed bytes worth waking the connection for, to send WINDOW_UPDATE.
const REPORT_STEP: usize = 32 * 1024;

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
#[error("HTTP/2 request body: {0}")]
pub struct RecvError(pub &'static str);

/// DATA payloads smaller than this are copied into `tail` instead of queued: a tiny frame's
/// slice would keep its whole read buffer alive, and a queue entry per frame costs more than
/// the frame (a client sending 1-octet frames could pin tens of megabytes per stream).
const SMALL_CHUNK: usize = 1024;

#[derive(Default)]
struct RecvState {
    chunks: VecDeque<Bytes>,
    /// Small payloads gathered after `chunks`.
    tail: BytesMut,
    trailers: Option<HeaderMap>,
    ended: bool,
    error: Option<&'static str>,
    /// The reader waiting for data.
    reader: Option<Waker>,
    /// Bytes consumed (or dropped unread) that the connection has not yet credited back.
    consumed: usize,
    reader_gone: bool,
}

/// State shared by the connection and the body's reader.
pub(crate) struct Recv {
    state: Mutex<RecvState>,
    /// Wakes the connection's handling of this stream.
    connection: Waker,
}

impl Recv {
    pub(crate) fn new(connection: Waker) -> Arc<Recv> {
        Arc::new(Recv {
            state: Mutex::new(RecvState::default()),
            connection,
        })
    }

    fn lock(&self) -> MutexGuard<'_, RecvState> {
        // A panic while holding the lock cannot leave the queue inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A DATA frame's payload. Returns false if the reader is gone: the bytes count as
    /// consumed at once.
    pub(crate) fn push(&self, data: Bytes) -> bool {
        let mut state = self.lock();
        if state.reader_gone {
            return false;
        }
        if data.len() < SMALL_CHUNK {
            state.tail.extend_from_slice(&data);
        } else {
            if !state.tail.is_empty() {
                let gathered = state.tail.split().freeze();
                state.chunks.push_back(gathered);
            }
            state.chunks.push_back(data);
        }
        if let Some(w) = state.reader.take() {
            drop(state);
            w.wake();
        }
        true
    }

    /// The peer ended the stream, with trailers or without.
    pub(crate) fn end(&self, trailers: Option<HeaderMap>) {
        let mut state = self.lock();
        state.ended = true;
        state.trailers = trailers;
        if let Some(w) = state.reader.take() {
            drop(state);
            w.wake();
        }
    }

    /// The stream was reset or the connection closed before the body ended.
    pub(crate) fn fail(&self, reason: &'static str) {
        let mut state = self.lock();
        if state.ended && state.chunks.is_empty() && state.tail.is_empty() {
            return;
        }
        state.error = Some(reason);
        if let Some(w) = state.reader.take() {
            drop(state);
            w.wake();
        }
    }

    /// Bytes consumed since the last call, and whether the reader has gone away.
    pub(crate) fn take_consumed(&self) -> (usize, bool) {
        let mut state = self.lock();
        (std::mem::take(&mut state.consumed), state.reader_gone)
    }
}

/// A request body received over HTTP/2.
pub struct RequestBody {
    recv: Option<Arc<Recv>>,
    /// What `content-length` announced, less what has been read.
    remaining: Option<u64>,
}

impl RequestBody {
    /// A request that ended with its headers.
    pub fn empty() -> Self {
        RequestBody {
            recv: None,
            remaining: Some(0),
        }
    }

    pub(crate) fn streaming(recv: Arc<Recv>, content_length: Option<u64>) -> Self {
        RequestBody {
            recv: Some(recv),
            remaining: content_length,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RecvError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, RecvError>>> {
        let this = self.get_mut();
        let Some(recv) = &this.recv else {
            return Poll::Ready(None);
        };
        let mut state = recv.lock();
        let next = match state.chunks.pop_front() {
            Some(data) => Some(data),
            None if !state.tail.is_empty() => Some(state.tail.split().freeze()),
            None => None,
        };
        if let Some(data) = next {
            let before = state.consumed;
            state.consumed += data.len();
            let report = before / REPORT_STEP != state.consumed / REPORT_STEP
                || (state.chunks.is_empty() && state.tail.is_empty());
            drop(state);
            if report {
                recv.connection.wake_by_ref();
            }
            if let Some(r) = &mut this.remaining {
                *r = r.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = state.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if let Some(reason) = state.error {
            return Poll::Ready(Some(Err(RecvError(reason))));
        }
        if state.ended {
            return Poll::Ready(None);
        }
        state.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.recv {
            None => true,
            Some(recv) => {
                let state = recv.lock();
                state.ended && state.chunks.is_empty() && state.tail.is_empty() && state.trailers.is_none()
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
        if let Some(recv) = &self.recv {
            let mut state = recv.lock();
            state.reader_gone = true;
            let unread: usize = state.chunks.drain(..).map(|c| c.len()).sum::<usize>() + state.tail.len();
            state.tail.clear();
            state.consumed += unread;
            drop(state);
            recv.connection.wake_by_ref();
        }
    }
}
