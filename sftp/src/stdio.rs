//! Stdin and stdout as one duplex stream for russh-sftp, telling `main` when it is dropped
//! (russh-sftp drops it once the client has closed stdin).

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// Bytes of stdin read ahead (several pipelined write requests of OpenSSH's client).
const STDIN_BUFFER: usize = 256 * 1024;

/// The process's stdin and stdout.
pub struct Stdio {
    /// Buffered: russh-sftp reads each packet's length, then its body, and every read of
    /// tokio's stdin is a trip to its blocking thread pool.
    stdin: tokio::io::BufReader<tokio::io::Stdin>,
    /// Written directly (blocking): the server answers one request at a time, so there is
    /// nothing else for this thread to do while a full pipe drains, and tokio's stdout would
    /// add a trip to its blocking pool for each write and each flush (one per answer).
    stdout: std::io::Stdout,
    /// Fired on drop: the session is over.
    ended: Option<oneshot::Sender<()>>,
}

impl Stdio {
    /// The stream, and a receiver that completes when it is dropped.
    pub fn new() -> (Stdio, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let stream = Stdio {
            stdin: tokio::io::BufReader::with_capacity(STDIN_BUFFER, tokio::io::stdin()),
            stdout: std::io::stdout(),
            ended: Some(tx),
        };
        (stream, rx)
    }
}

impl Drop for Stdio {
    fn drop(&mut self) {
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(());
        }
    }
}

impl AsyncRead for Stdio {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdin).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stdio {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.stdout.write(buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stdout.flush())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stdout.flush())
    }
}
