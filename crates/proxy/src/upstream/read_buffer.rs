//! The read buffer of a connection this proxy parses itself (HTTP/1.1 upstreams, HTTP/2
//! downstreams).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// Size of a fresh buffer.
const READ_SIZE: usize = 16 * 1024;

/// Bytes read from a connection and not consumed yet, in front of zeroed spare room.
///
/// The spare room is initialised once per allocation (not per read), which lets reads go
/// through tokio's `poll_read`: it notes a short read as the socket drained, so the next
/// read waits for the runtime's readiness instead of trying the socket first. Consumed bytes
/// leave as `Bytes` sharing the allocation, so small bodies are never copied.
#[derive(Default)]
pub(crate) struct ReadBuffer {
    /// Filled bytes, then zeroed spare room.
    bytes: BytesMut,
    filled: usize,
}

impl std::ops::Deref for ReadBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.filled]
    }
}

impl ReadBuffer {
    pub(crate) fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.bytes.len() - self.filled < READ_SIZE / 4 {
            let mut fresh = BytesMut::zeroed(READ_SIZE.max(self.filled * 2));
            fresh[..self.filled].copy_from_slice(&self.bytes[..self.filled]);
            self.bytes = fresh;
        }
        let mut room = ReadBuf::new(&mut self.bytes[self.filled..]);
        ready!(Pin::new(io).poll_read(cx, &mut room))?;
        let n = room.filled().len();
        self.filled += n;
        Poll::Ready(Ok(n))
    }

    /// The first `n` filled bytes, removed.
    pub(crate) fn split_to(&mut self, n: usize) -> BytesMut {
        debug_assert!(n <= self.filled);
        self.filled -= n;
        self.bytes.split_to(n)
    }

    /// Everything filled, removed.
    pub(crate) fn split(&mut self) -> BytesMut {
        self.split_to(self.filled)
    }

    pub(crate) fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.filled);
        self.filled -= n;
        self.bytes.advance(n);
    }
}
