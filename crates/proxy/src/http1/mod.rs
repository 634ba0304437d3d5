//! meshgate's own HTTP/1.1 server codec (RFC 9112), for downstream connections.
//!
//! Why not hyper's server, which meshgate served HTTP/1.1 with before: on a small proxied
//! request its dispatcher, head parsing and encoding cost about a third of the instructions
//! meshgate spends in user space (`docs/performance.md`). Here the connection task parses a
//! head, polls the service's future itself and writes the response head with the body bytes
//! already there, with no channel for bodiless requests. Requests that switch protocols
//! (WebSocket upgrades, `CONNECT`) are handed, with the bytes read so far, to hyper, which
//! implements upgrades (`server::Ended::Upgrade`).

pub mod request_body;
pub mod server;

pub use request_body::RequestBody;
pub use server::{Ended, ServerSettings, serve};
