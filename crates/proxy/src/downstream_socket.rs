//! The downstream TCP socket as hyper sees it: plain `send(2)` writes, and HTTP/2 writes held
//! back to the end of the scheduler tick so that one tick's responses leave together.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The client connection preface of HTTP/2 (RFC 9113 §3.4) starts with these bytes.
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// A downstream TCP stream.
///
/// Writes go out through `send(2)`, not `writev(2)`: hyper and h2 gather what they write into
/// one buffer when told the stream has no vectored writes, and writev's own kernel cost (file
/// lookup, iovec import, VFS checks) came to about 2% of a small proxied request's CPU in `perf`.
///
/// On HTTP/2 connections, the first write of each flush cycle is put off until the runtime has
/// run every task that was already ready. An HTTP/2 connection carries many streams, whose
/// responses complete one upstream read at a time; writing each as it completes sends the client
/// many small segments and wakes it once per segment. Waiting one tick sends everything that
/// completed in that tick in one write, and the client wakes once for them. The cost is one
/// extra poll of the I/O driver (`epoll_wait` with a zero timeout) per write burst. HTTP/1.1
/// has one response in flight per connection, so its writes are not held (holding them was
/// measured, and gained nothing).
pub struct DownstreamSocket {
    stream: TcpStream,
    write_batching: WriteBatching,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WriteBatching {
    /// Nothing read yet: the protocol is not known.
    Undecided,
    /// HTTP/1.1: writes go out at once.
    Off,
    /// HTTP/2, and the next write starts a burst: put it off by one tick.
    Armed,
    /// HTTP/2, and this burst has waited its tick: writes go out until the next flush.
    Waited,
}

impl DownstreamSocket {
    /// A plain-text connection: HTTP/2 is recognised from the client preface.
    pub fn new(stream: TcpStream) -> Self {
        DownstreamSocket {
            stream,
            write_batching: WriteBatching::Undecided,
        }
    }

    /// Under TLS the protocol comes from ALPN once the handshake is done.
    pub fn set_http2(&mut self, http2: bool) {
        self.write_batching = if http2 {
            WriteBatching::Armed
        } else {
            WriteBatching::Off
        };
    }
}

impl AsyncRead for DownstreamSocket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_batching != WriteBatching::Undecided {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            let n = read.len().min(H2_PREFACE_START.len());
            this.set_http2(read[..n] == H2_PREFACE_START[..n]);
        }
        result
    }
}

impl AsyncWrite for DownstreamSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_batching == WriteBatching::Armed {
            this.write_batching = WriteBatching::Waited;
            // `yield_now` defers its wake-up until the runtime has polled the I/O driver and
            // run the tasks that were ready, which is the point of the wait.
            let mut tick = std::pin::pin!(tokio::task::yield_now());
            if tick.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_batching == WriteBatching::Waited {
            this.write_batching = WriteBatching::Armed;
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (DownstreamSocket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (DownstreamSocket::new(server), client)
    }

    #[tokio::test]
    async fn recognises_the_http2_preface_and_still_delivers_every_byte() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut got = [0u8; 24];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(server.write_batching, WriteBatching::Armed);

        // A held write still arrives, and the flush re-arms the wait for the next burst.
        server.write_all(b"frames").await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(server.write_batching, WriteBatching::Armed);
        let mut reply = [0u8; 6];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"frames");
    }

    /// Which finishes first: a write on `server`, or a task that became ready after the write
    /// started? The writer is spawned first, so without a wait its write completes first.
    async fn first_to_finish(server: DownstreamSocket) -> &'static str {
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = order.clone();
        let writer = tokio::spawn(async move {
            let mut server = server;
            server.write_all(b"x").await.unwrap();
            log.lock().unwrap().push("write");
            server
        });
        let log = order.clone();
        let other = tokio::spawn(async move { log.lock().unwrap().push("other task") });
        writer.await.unwrap();
        other.await.unwrap();
        order.lock().unwrap()[0]
    }

    #[tokio::test]
    async fn an_http2_write_waits_for_the_tasks_already_ready() {
        let (mut server, _client) = pair().await;
        server.set_http2(true);
        assert_eq!(first_to_finish(server).await, "other task");
        let (mut server, _client) = pair().await;
        server.set_http2(false);
        assert_eq!(first_to_finish(server).await, "write");
    }

    #[tokio::test]
    async fn http1_writes_are_not_held() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = [0u8; 18];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(server.write_batching, WriteBatching::Off);
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert_eq!(server.write_batching, WriteBatching::Off);
        let mut reply = [0u8; 19];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"HTTP/1.1 200 OK\r\n\r\n");
    }
}
