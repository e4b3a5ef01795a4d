//! Prompt TCP acknowledgements while a connection sets itself up.
//!
//! OpenSSH's client leaves Nagle's algorithm on for sessions without a terminal (`ssh host
//! cmd`, scp, rsync, git): a small packet written while an earlier one is unacknowledged
//! waits for that acknowledgement. Linux delays acknowledgements by up to 40 ms when the
//! receiver has nothing to send, so the client's key exchange message (written right after
//! its KEXINIT) or its exec request (right after an env request) stalled for 40 ms on a
//! good share of logins. `TCP_QUICKACK` makes the kernel acknowledge at once; it is not
//! sticky (the kernel goes back to delaying once it sees a request/response pattern), so it
//! is set again after every read for a connection's first [`ARMED_READS`] reads: the
//! handshake, authentication and the first sessions' requests. Bulk data after that is left
//! to the kernel's usual acknowledgement, with no extra system call per read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Reads after which the option is no longer set again (russh reads a packet's length, then
/// its body: about two reads a packet).
pub const ARMED_READS: u32 = 256;

/// A TCP stream that acknowledges promptly during its first reads.
pub struct QuickAck {
    inner: TcpStream,
    armed: u32,
}

impl QuickAck {
    /// Wraps `inner`, acknowledging at once from the start.
    pub fn new(inner: TcpStream) -> Self {
        let mut s = Self {
            inner,
            armed: ARMED_READS,
        };
        s.arm();
        s
    }

    /// Sets `TCP_QUICKACK` once more while reads are left; failures only cost latency.
    fn arm(&mut self) {
        if self.armed > 0 {
            self.armed -= 1;
            let _ = rustix::net::sockopt::set_tcp_quickack(&self.inner, true);
        }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.arm();
        }
        r
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_pass_both_ways_and_the_option_is_set_only_for_the_first_reads() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut server = QuickAck::new(server);
        assert!(rustix::net::sockopt::tcp_quickack(&server.inner).unwrap());
        let mut buf = [0u8; 1];
        for i in 0..ARMED_READS + 3 {
            client.write_all(&[i as u8]).await.unwrap();
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf[0], i as u8);
        }
        assert_eq!(server.armed, 0);
        server.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
    }
}
