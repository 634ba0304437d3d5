//! meshgate's own HTTP/2 server codec (RFC 9113).
//!
//! Why not the `h2` crate, which the rest of the Rust ecosystem uses: on a proxied request
//! over HTTP/2 it costs about 20,000 of the 35,000 instructions meshgate spends in user space
//! (stream store locking, flow-control bookkeeping, an HPACK encoder that hashes every field
//! with SipHash, and the task per stream that hyper adds), and that is where meshgate trails
//! HAProxy in the HTTP/2 benchmark (`docs/performance.md`). The codec is built in layers,
//! each tested on its own: frames (`frame`), HPACK (`hpack`), request bodies (`request_body`)
//! and the connection (`server`).

pub mod frame;
pub mod hpack;
pub mod request_body;
pub mod server;

pub use request_body::RequestBody;
pub use server::{ServerSettings, serve};
