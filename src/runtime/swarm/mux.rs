//! Many streams over one connection to a node's agent (yamux): the gateway keeps one
//! connection per node for the exec streams of every session there, instead of a TLS
//! connection of its own per session (a connection's TLS state and socket were what made an
//! idle session on a cluster cost more of the gateway's memory than one on a single host).
//!
//! [`Mux`] is the gateway's end: [`Mux::open`] gives a new stream, and the connection stays
//! up while a [`Mux`] handle or one of its streams lives. [`serve`] is the agent's end: each
//! stream the gateway opens is handed to a task of its own, and all of them end with the
//! connection.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::runtime::reach::BoxedStream;

/// Streams one connection carries at once (sessions and relay helpers on one node).
pub const MAX_STREAMS: usize = 4096;

/// Requests for a stream that wait while the connection is busy.
const WAITING_OPENS: usize = 256;

/// The yamux settings of both ends.
fn config() -> yamux::Config {
    let mut c = yamux::Config::default();
    // Each stream's window starts at 256 KiB: the connection's total must allow that.
    c.set_max_connection_receive_window(Some(MAX_STREAMS * 256 * 1024));
    c.set_max_num_streams(MAX_STREAMS);
    c
}

/// A request for a new stream, answered when the connection has opened it.
type OpenRequest = oneshot::Sender<io::Result<yamux::Stream>>;

/// The gateway's end of a connection to a node's agent.
pub struct Mux {
    opens: mpsc::Sender<OpenRequest>,
    live: Arc<Live>,
}

/// How many of a connection's streams are open, the task to wake when one closes, and
/// whether the connection failed.
#[derive(Default)]
struct Live {
    streams: AtomicUsize,
    driver: AtomicWaker,
    severed: AtomicBool,
}

/// Tells whether the connection under a stream failed (the agent went away, or the node's
/// network): a stream that ended so was cut, not closed by its far end.
#[derive(Clone)]
pub struct Link(Arc<Live>);

impl Link {
    /// Whether the connection failed.
    pub fn is_severed(&self) -> bool {
        self.0.severed.load(Ordering::Acquire)
    }
}

impl Mux {
    /// Starts carrying streams over `io`, a connection whose agent has agreed to multiplex.
    /// `name` names the connection in the log.
    pub fn start(io: BoxedStream, name: String) -> Mux {
        let (opens, requests) = mpsc::channel(WAITING_OPENS);
        let live = Arc::new(Live::default());
        let conn = yamux::Connection::new(io.compat(), config(), yamux::Mode::Client);
        tokio::spawn(drive(conn, requests, live.clone(), name));
        Mux { opens, live }
    }

    /// Whether the connection has ended (the next use needs a new one).
    pub fn is_closed(&self) -> bool {
        self.opens.is_closed()
    }

    /// A new stream.
    pub async fn open(&self) -> io::Result<MuxStream> {
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the agent's connection ended");
        let (tx, rx) = oneshot::channel();
        self.opens.send(tx).await.map_err(|_| gone())?;
        let stream = rx.await.map_err(|_| gone())??;
        self.live.streams.fetch_add(1, Ordering::AcqRel);
        Ok(MuxStream {
            inner: stream.compat(),
            live: Some(self.live.clone()),
        })
    }
}

/// Drives the gateway's end of a connection: opens the streams asked for and carries every
/// stream's bytes, until the connection fails, or no handle and no stream is left.
async fn drive(
    mut conn: yamux::Connection<Compat<BoxedStream>>,
    mut requests: mpsc::Receiver<OpenRequest>,
    live: Arc<Live>,
    name: String,
) {
    let mut waiting: VecDeque<OpenRequest> = VecDeque::new();
    let mut handles = true;
    let ended = poll_fn(|cx| {
        live.driver.register(cx.waker());
        loop {
            while handles {
                match requests.poll_recv(cx) {
                    Poll::Ready(Some(tx)) => waiting.push_back(tx),
                    Poll::Ready(None) => handles = false,
                    Poll::Pending => break,
                }
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(Ok(s)) => {
                        if let Some(tx) = waiting.pop_front() {
                            // One that gave up waiting drops the stream: yamux closes it.
                            let _ = tx.send(Ok(s));
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if !handles && waiting.is_empty() && live.streams.load(Ordering::Acquire) == 0 {
                return Poll::Ready(Ok(()));
            }
            match conn.poll_next_inbound(cx) {
                // The agent opens no streams: one it did is refused by dropping it.
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                // The agent closed it: as good as failed for the streams on it.
                Poll::Ready(None) => return Poll::Ready(Err(yamux::ConnectionError::Closed)),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    requests.close();
    let why = match ended {
        Ok(()) => {
            // Unused: say goodbye to the agent.
            let _ = poll_fn(|cx| conn.poll_close(cx)).await;
            tracing::debug!(agent = %name, "the agent's connection closed");
            return;
        }
        Err(e) => e,
    };
    live.severed.store(true, Ordering::Release);
    tracing::info!(agent = %name, error = %why, "the agent's connection ended");
    let fail = |tx: OpenRequest| {
        let _ = tx.send(Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("the agent's connection ended: {why}"),
        )));
    };
    waiting.drain(..).for_each(fail);
    while let Ok(tx) = requests.try_recv() {
        fail(tx);
    }
}

/// One stream of a [`Mux`] (or of [`serve`]'s connection): bytes both ways, ended by
/// shutting its write side down (the far end reads its end) and by dropping it.
pub struct MuxStream {
    inner: Compat<yamux::Stream>,
    /// Counted while open, on the gateway's end.
    live: Option<Arc<Live>>,
}

impl MuxStream {
    /// What tells whether this stream's connection failed (the gateway's end only).
    pub fn link(&self) -> Option<Link> {
        self.live.clone().map(Link)
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        if let Some(live) = self.live.take()
            && live.streams.fetch_sub(1, Ordering::AcqRel) == 1
        {
            live.driver.wake();
        }
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The agent's end: hands each stream the gateway opens over `io` to `serve_stream` (a
/// task of its own) until the connection ends; the streams' tasks end with it.
pub async fn serve<T, F, Fut>(io: T, peer: &str, mut serve_stream: F)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: FnMut(MuxStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conn = yamux::Connection::new(io.compat(), config(), yamux::Mode::Server);
    let mut streams = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            next = poll_fn(|cx| conn.poll_next_inbound(cx)) => match next {
                Some(Ok(s)) => {
                    streams.spawn(serve_stream(MuxStream {
                        inner: s.compat(),
                        live: None,
                    }));
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "multiplexed connection ended");
                    break;
                }
                None => break,
            },
            // Reap the finished ones as they go.
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    // Dropping the set aborts what still runs: its streams are gone with the connection.
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo agent over one end of a pipe, the gateway's [`Mux`] over the other.
    fn pair() -> Mux {
        let (gateway, agent) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            serve(agent, "test", |mut s| async move {
                let mut got = Vec::new();
                // Echo what came, after the gateway's end: half-close both ways.
                if s.read_to_end(&mut got).await.is_ok() {
                    let _ = s.write_all(&got).await;
                    let _ = s.shutdown().await;
                }
            })
            .await;
        });
        Mux::start(Box::new(gateway), "test".into())
    }

    #[tokio::test]
    async fn many_streams_share_one_connection_each_with_its_own_bytes_and_end() {
        let mux = pair();
        let mut tasks = Vec::new();
        for i in 0..50u8 {
            let mut s = mux.open().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let sent = vec![i; 100_000 + i as usize];
                s.write_all(&sent).await.unwrap();
                s.shutdown().await.unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back).await.unwrap();
                assert_eq!(back, sent, "stream {i}");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(mux.live.streams.load(Ordering::Acquire), 0);
        assert!(!mux.is_closed());
    }

    #[tokio::test]
    async fn a_connection_that_ends_fails_its_streams_and_the_next_open() {
        let (gateway, agent) = tokio::io::duplex(1 << 16);
        let mux = Mux::start(Box::new(gateway), "test".into());
        let agent = tokio::spawn(async move {
            serve(agent, "test", |s| async move {
                // Held open, never answered.
                let _s = s;
                std::future::pending::<()>().await;
            })
            .await;
        });
        let mut s = mux.open().await.unwrap();
        let link = s.link().unwrap();
        s.write_all(b"x").await.unwrap();
        s.flush().await.unwrap();
        assert!(!link.is_severed());
        agent.abort();
        let mut buf = [0u8; 1];
        // The read ends (an error or the end), it does not hang.
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the stream noticed the end");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let reopened = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                if mux.is_closed() {
                    return mux.open().await.err();
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the handle noticed the end");
        assert!(reopened.is_some());
        assert!(link.is_severed());
    }

    #[tokio::test]
    async fn the_connection_closes_when_no_handle_and_no_stream_is_left() {
        let (gateway, agent) = tokio::io::duplex(1 << 16);
        let mux = Mux::start(Box::new(gateway), "test".into());
        let served = tokio::spawn(async move {
            serve(agent, "test", |mut s| async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
            })
            .await;
        });
        let s = mux.open().await.unwrap();
        drop(mux);
        // A stream still open keeps it up.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!served.is_finished());
        drop(s);
        tokio::time::timeout(std::time::Duration::from_secs(5), served)
            .await
            .expect("the agent's end saw the connection close")
            .unwrap();
    }
}
