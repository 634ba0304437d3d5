//! Body types on both sides of the proxy.
//!
//! Bodies stream through untouched (`Incoming` on either side); only replies the proxy makes
//! itself carry a buffered `Full` body. An `Either` keeps that choice free of boxing.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// Body of a request sent upstream.
pub type UpstreamBody = Either<Incoming, Full<Bytes>>;

/// Body of a response sent downstream.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// A body the proxy produced itself.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Either::Right(Full::new(bytes.into()))
}

pub fn empty() -> ResponseBody {
    Either::Right(Full::new(Bytes::new()))
}
