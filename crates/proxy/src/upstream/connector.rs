//! TCP connections to upstream endpoints, counted per cluster.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::task::{Context, Poll};

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

/// An upstream TCP stream that keeps its cluster's connection gauges right.
pub struct CountedStream {
    io: TcpStream,
    slot: ConnectionSlot,
}

impl CountedStream {
    pub fn new(io: TcpStream, slot: ConnectionSlot) -> Self {
        slot.stats.connections_opened.fetch_add(1, Relaxed);
        slot.stats.connections_active.fetch_add(1, Relaxed);
        CountedStream { io, slot }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.io
    }

    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        &mut self.io
    }
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.slot.stats.connections_active.fetch_sub(1, Relaxed);
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
