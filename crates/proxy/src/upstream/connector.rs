//! Connections to upstream endpoints (plain TCP or TLS), counted per cluster.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::task::{Context, Poll};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::stats::UpstreamStats;

/// A connection counted against the cluster's `max_connections` (reserved by the pool before
/// connecting) and in its pool, until dropped: when the connect fails or the connection closes.
pub struct ConnectionSlot {
    stats: Arc<UpstreamStats>,
    pool_open: Arc<AtomicU32>,
}

impl ConnectionSlot {
    /// Takes over a reservation already counted in `stats.connections_reserved`.
    pub fn new(stats: Arc<UpstreamStats>, pool_open: Arc<AtomicU32>) -> Self {
        pool_open.fetch_add(1, SeqCst);
        ConnectionSlot { stats, pool_open }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.pool_open.fetch_sub(1, SeqCst);
        self.stats.connections_reserved.fetch_sub(1, SeqCst);
        super::pool::connection_freed(&self.stats);
    }
}

/// TLS for a new connection: the cluster's client config (ALPN chosen for the protocol) and
/// the server name for this request.
pub struct TlsTarget {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// What an upstream connection runs over.
pub enum Transport {
    Plain(TcpStream),
    /// TLS origination (DestinationRule `tls`), boxed: rustls' state is large.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// An upstream connection that keeps its cluster's connection gauges right.
pub struct CountedStream {
    io: Transport,
    slot: ConnectionSlot,
}

impl CountedStream {
    pub fn new(io: Transport, slot: ConnectionSlot) -> Self {
        slot.stats.connections_opened.fetch_add(1, Relaxed);
        slot.stats.connections_active.fetch_add(1, Relaxed);
        CountedStream { io, slot }
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match &self.io {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Whether writes may sit in a buffer until flushed (TLS records).
    pub fn buffers_writes(&self) -> bool {
        matches!(self.io, Transport::Tls(_))
    }
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.slot.stats.connections_active.fetch_sub(1, Relaxed);
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Transport::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Transport::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Transport::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Transport::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Transport::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Transport::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Transport::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Transport::Plain(tcp) => tcp.is_write_vectored(),
            Transport::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Transport::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Transport::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }
}
