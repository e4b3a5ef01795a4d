//! Stdin and stdout as one duplex stream for russh-sftp, telling `main` when it is dropped
//! (russh-sftp drops it once the client has closed stdin).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// The process's stdin and stdout.
pub struct Stdio {
    stdin: tokio::io::Stdin,
    stdout: tokio::io::Stdout,
    /// Fired on drop: the session is over.
    ended: Option<oneshot::Sender<()>>,
}

impl Stdio {
    /// The stream, and a receiver that completes when it is dropped.
    pub fn new() -> (Stdio, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let stream = Stdio {
            stdin: tokio::io::stdin(),
            stdout: tokio::io::stdout(),
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
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stdout).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdout).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stdout).poll_shutdown(cx)
    }
}
