//! Body types on both sides of the proxy.
//!
//! Bodies stream through untouched; only replies the proxy makes itself carry a buffered
//! body. Enums rather than boxed trait objects keep the request path free of allocations.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::upstream::pool::PoolReturn;

/// Body of a response sent downstream.
pub enum ResponseBody {
    /// The upstream's body, streamed; its connection goes back to the pool at the end.
    Upstream { body: Incoming, on_end: Option<PoolReturn> },
    /// A reply the proxy produced itself.
    Local(Full<Bytes>),
}

impl ResponseBody {
    /// Wraps an upstream body; an already-finished one (HEAD, 204, 304) frees its
    /// connection at once, since nobody will poll it to the end.
    pub fn upstream(body: Incoming, on_end: Option<PoolReturn>) -> Self {
        if body.is_end_stream() {
            if let Some(r) = on_end {
                r.release();
            }
            return ResponseBody::Upstream { body, on_end: None };
        }
        ResponseBody::Upstream { body, on_end }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream { body, on_end } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) | Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                        if let Some(r) = on_end.take() {
                            r.release();
                        }
                    }
                    // A broken body must not hand its connection to the next request.
                    Poll::Ready(Some(Err(_))) => *on_end = None,
                    _ => {}
                }
                polled
            }
            ResponseBody::Local(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Local(b) => b.size_hint(),
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

/// Body of a request sent upstream.
pub enum UpstreamBody {
    /// The downstream body, streamed as it arrives.
    Streaming(Incoming),
    /// A frame already read from the downstream body (to validate its framing before
    /// anything goes upstream), then the rest of it.
    Prefixed {
        first: Option<Frame<Bytes>>,
        rest: Incoming,
    },
    /// A body the proxy holds whole.
    Buffered(Full<Bytes>),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Streaming(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Prefixed { first, rest } => match first.take() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None => Pin::new(rest).poll_frame(cx),
            },
            UpstreamBody::Buffered(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streaming(b) => b.is_end_stream(),
            UpstreamBody::Prefixed { first, rest } => first.is_none() && rest.is_end_stream(),
            UpstreamBody::Buffered(b) => b.is_end_stream(),
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
        }
    }
}
