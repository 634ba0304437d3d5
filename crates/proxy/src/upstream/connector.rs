//! TCP connections to upstream endpoints, counted per cluster.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::stats::UpstreamStats;

/// Envoy's and Istio's default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An [`HttpConnector`] that counts the connections it opens for one cluster.
#[derive(Clone)]
pub struct CountingConnector {
    inner: HttpConnector,
    stats: Arc<UpstreamStats>,
}

impl CountingConnector {
    pub fn new(stats: Arc<UpstreamStats>) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(DEFAULT_CONNECT_TIMEOUT));
        inner.set_keepalive(Some(Duration::from_secs(300)));
        CountingConnector { inner, stats }
    }
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = CountedStream;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<CountedStream, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let stats = self.stats.clone();
        Box::pin(async move {
            match connecting.await {
                Ok(io) => {
                    stats.connections_opened.fetch_add(1, Relaxed);
                    stats.connections_active.fetch_add(1, Relaxed);
                    Ok(CountedStream { io, stats })
                }
                Err(e) => {
                    stats.connect_failures.fetch_add(1, Relaxed);
                    Err(e)
                }
            }
        })
    }
}

/// An upstream TCP stream that decrements the active-connection gauge when dropped.
pub struct CountedStream {
    io: TokioIo<TcpStream>,
    stats: Arc<UpstreamStats>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.stats.connections_active.fetch_sub(1, Relaxed);
    }
}

impl Connection for CountedStream {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for CountedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for CountedStream {
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
