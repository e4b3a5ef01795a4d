//! Carrying bytes between an SSH channel and a socket, both ways, ending both ways correctly.
//!
//! russh (0.65) refills a channel's receive window when data arrives, not when it is consumed,
//! and its connection loop waits while a channel's queue is full. So the channel is read by a
//! task of its own that never waits for the socket: data goes into a queue bounded in bytes
//! ([`CHANNEL_BUFFER`]) that a second task writes to the socket. A target that stops reading
//! fills only its own queue; the shell and other forwards on the connection keep going. Only
//! past that bound does the channel wait (and with it, russh's loop): the bound is what keeps
//! one stuck forward from taking the gateway's memory.
//!
//! Socket to channel goes through russh's window-respecting writer, so a client that stops
//! reading slows only its own channel.

use std::sync::Arc;

use bytes::Bytes;
use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// Bytes one channel may hold between the client and a socket that is not reading.
pub const CHANNEL_BUFFER: usize = 64 << 20;

/// What a finished pump moved, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Client to target.
    pub up: u64,
    /// Target to client.
    pub down: u64,
}

/// Carries bytes between `channel` and `stream` until both directions have ended, then
/// closes the channel. Once `gone` (the connection has ended) it stops at once, whatever it
/// was waiting for: russh wakes no writer waiting on a full window when the connection dies,
/// and a target that neither reads nor writes would hold the reader at its byte budget.
pub async fn pump<S>(channel: Channel<Msg>, stream: S, gone: &CancellationToken) -> Moved
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut down = 0u64;
    tokio::select! {
        moved = carry(channel, stream, &mut down) => moved,
        _ = gone.cancelled() => {
            tracing::debug!("connection gone: forward dropped");
            Moved { up: 0, down }
        }
    }
}

/// [`pump`] until its end; its tasks end with it when it is dropped. `down` counts
/// target-to-client bytes as they go.
async fn carry<S>(channel: Channel<Msg>, stream: S, down: &mut u64) -> Moved
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let metrics = crate::metrics::metrics();
    let _open = metrics.forward();
    let (mut rx, tx) = channel.split();
    let (mut sock_read, mut sock_write) = tokio::io::split(stream);
    let budget = Arc::new(Semaphore::new(CHANNEL_BUFFER));
    let (queue_tx, mut queue_rx) =
        mpsc::unbounded_channel::<(Bytes, tokio::sync::OwnedSemaphorePermit)>();

    // Channel → queue: never waits on the socket, only on the byte budget.
    let (closed_tx, mut closed_rx) = tokio::sync::watch::channel(false);
    let reader = {
        let budget = budget.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            let mut up = 0u64;
            loop {
                match rx.wait().await {
                    Some(ChannelMsg::Data { data }) => {
                        let n = u32::try_from(data.len().min(CHANNEL_BUFFER)).unwrap_or(u32::MAX);
                        let Ok(permit) = budget.clone().acquire_many_owned(n).await else {
                            break;
                        };
                        up += data.len() as u64;
                        metrics.forwarded(data.len() as u64, 0);
                        if queue_tx.send((data, permit)).is_err() {
                            break;
                        }
                    }
                    Some(ChannelMsg::Eof) => break,
                    // Closed by the client, or the connection is gone.
                    Some(ChannelMsg::Close) | None => {
                        let _ = closed_tx.send(true);
                        break;
                    }
                    Some(_) => {}
                }
            }
            // Dropping `queue_tx` tells the writer: no more data (EOF or close).
            up
        }))
    };

    // Queue → socket; then half-close the socket's write side.
    let writer = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some((data, _permit)) = queue_rx.recv().await {
            if sock_write.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = sock_write.shutdown().await;
    }));

    // Socket → channel, respecting the client's window; then EOF. The client's close is
    // watched while waiting for the socket and while waiting for window space.
    let mut out = tx.make_writer();
    let mut buf = vec![0u8; 32 * 1024];
    let mut client_closed = false;
    loop {
        let n = tokio::select! {
            r = sock_read.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            // Re-armed each turn; once the reader has ended without a close it stays off.
            true = client_closed_signal(&mut closed_rx) => {
                client_closed = true;
                break;
            }
        };
        tokio::select! {
            r = out.write_all(&buf[..n]) => if r.is_err() {
                break;
            },
            true = client_closed_signal(&mut closed_rx) => {
                client_closed = true;
                break;
            }
        }
        *down += n as u64;
        metrics.forwarded(0, n as u64);
    }
    if client_closed {
        // The client is done with this channel: drop the target connection at once.
        reader.abort();
        writer.abort();
        return Moved { up: 0, down: *down };
    }
    let _ = out.flush().await;
    let _ = tx.eof().await;
    // The client answers our EOF with its own EOF/close; the reader sees it and ends.
    let up = reader.await.unwrap_or(0);
    let _ = writer.await;
    let _ = tx.close().await;
    Moved { up, down: *down }
}

/// True once the client closed the channel; false (and at once) if it can no longer happen.
async fn client_closed_signal(rx: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    rx.wait_for(|closed| *closed).await.is_ok()
}
