//! Forwards into a container on a node through the node's `labgate node-agent`
//! (`[cluster] node_agent`): one connection to the agent per forward, a request line, the
//! agent's answer, then the forward's bytes, with no engine exec stream in the way. Where
//! the nodes run no agent, or a node's agent does not answer, forwards take the relay over
//! the node's exec stream ([`RelayReach`]), as they always did; listeners (`-R`, the agent
//! socket), name lookups and commands always do.
//!
//! The agent also carries the exec streams of the node's sessions ([`NodeAgent::exec_stream`]):
//! all of them over one multiplexed connection ([`super::mux`]) instead of a TLS connection
//! each to the node's engine. Where the agent does not answer, or is of a release that does
//! not multiplex, exec streams go to the node's engine as before.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::time::Instant;

use super::mux::{Mux, MuxStream};
use super::wire::{self, Answer, Request, Target, WireIdentity};
use crate::runtime::docker::dial::Dial;
use crate::runtime::reach::{Acceptor, BoxedStream, Reach, ReachError};
use crate::runtime::relay::RelayReach;
use crate::runtime::{Exec, ExecRequest, RuntimeError};

/// How long a node's agent that did not answer is passed over (its forwards take the relay)
/// before it is tried again.
const PASS_OVER: Duration = Duration::from_secs(30);

/// The longest the agent itself may take to answer the connection (TCP and TLS), whatever
/// the forward's own deadline: past it the forward takes the relay.
const AGENT_CONNECT: Duration = Duration::from_secs(3);

/// How long the agent may take to start an exec it was asked to carry.
const EXEC_ANSWER: Duration = Duration::from_secs(10);

/// The read buffer of a carried exec stream, for the agent's answer line (the output is
/// read into the caller's larger buffers, past this one).
const ANSWER_BUFFER: usize = 64;

/// One node's agent.
pub struct NodeAgent {
    /// The node's hostname (logs).
    hostname: String,
    /// Where it listens.
    dial: Dial,
    /// Until when it is passed over, after it did not answer.
    passed_over: std::sync::Mutex<Option<Instant>>,
    /// The multiplexed connection for exec streams, once made.
    mux: tokio::sync::Mutex<Option<Arc<Mux>>>,
    /// Set when the agent refused to multiplex (an older release): exec streams go to the
    /// node's engine.
    no_mux: AtomicBool,
}

/// Why a forward or an exec stream did not go through the agent.
pub enum AgentFailure {
    /// The agent could not be reached or spoke nonsense: try the relay.
    Unreachable(io::Error),
    /// The agent answered: this is the forward's result.
    Answered(io::Error),
}

impl NodeAgent {
    /// The agent of node `hostname` at `dial`.
    pub fn new(hostname: String, dial: Dial) -> Self {
        NodeAgent {
            hostname,
            dial,
            passed_over: std::sync::Mutex::new(None),
            mux: tokio::sync::Mutex::new(None),
            no_mux: AtomicBool::new(false),
        }
    }

    /// A stream carrying exec `exec` of `container`, started attached by the agent (see the
    /// module doc). `Unreachable` means nothing was started: the caller may start it through
    /// the node's engine instead.
    pub async fn exec_stream(
        &self,
        container: &str,
        exec: &str,
        tty: bool,
    ) -> Result<BufReader<MuxStream>, AgentFailure> {
        if self.no_mux.load(Ordering::Relaxed) || self.is_passed_over() {
            return Err(AgentFailure::Unreachable(io::Error::other(
                "the agent does not carry exec streams now",
            )));
        }
        let mux = self.mux().await.map_err(AgentFailure::Unreachable)?;
        let stream = mux.open().await.map_err(AgentFailure::Unreachable)?;
        let mut stream = BufReader::with_capacity(ANSWER_BUFFER, stream);
        let req = Request {
            v: wire::VERSION,
            container: container.to_owned(),
            to: Target::Exec {
                id: exec.to_owned(),
                tty,
            },
            within_ms: EXEC_ANSWER.as_millis() as u64,
        };
        // Once the request is out, the exec may have started: whatever happens is the answer.
        let within = EXEC_ANSWER + AGENT_CONNECT;
        match ask(
            &mut stream,
            &req,
            within,
            "the node's agent did not start the exec in time",
        )
        .await
        {
            Ok(Answer::Ok) => Ok(stream),
            Ok(Answer::Failed { kind, message }) => Err(AgentFailure::Answered(io::Error::new(
                kind.io_kind(),
                message,
            ))),
            Err(e) => {
                self.pass_over(&e);
                Err(AgentFailure::Answered(e))
            }
        }
    }

    /// The agent's multiplexed connection, made when there is none (or it ended).
    async fn mux(&self) -> io::Result<Arc<Mux>> {
        let mut held = self.mux.lock().await;
        if let Some(m) = held.as_ref().filter(|m| !m.is_closed()) {
            return Ok(m.clone());
        }
        let made = async {
            let stream = self.dial.connect_bulk(AGENT_CONNECT).await?;
            let mut stream = BufReader::new(stream);
            let req = Request {
                v: wire::VERSION,
                container: String::new(),
                to: Target::Mux,
                within_ms: 0,
            };
            match ask(&mut stream, &req, AGENT_CONNECT, NO_ANSWER).await? {
                Answer::Ok => Ok(stream),
                Answer::Failed { kind, message } => {
                    if kind == wire::Failure::BadRequest {
                        tracing::warn!(
                            node = %self.hostname,
                            agent = ?self.dial,
                            %message,
                            "the node's agent does not carry exec streams (an older release?): they go to the node's engine"
                        );
                        self.no_mux.store(true, Ordering::Relaxed);
                    }
                    Err(io::Error::new(kind.io_kind(), message))
                }
            }
        }
        .await;
        match made {
            Ok(stream) => {
                let mux = Arc::new(Mux::start(Box::new(stream), self.hostname.clone()));
                *held = Some(mux.clone());
                Ok(mux)
            }
            Err(e) => {
                if !self.no_mux.load(Ordering::Relaxed) {
                    self.pass_over(&e);
                }
                Err(e)
            }
        }
    }

    fn is_passed_over(&self) -> bool {
        let until = *self.passed_over.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    fn pass_over(&self, why: &io::Error) {
        let mut until = self.passed_over.lock().unwrap_or_else(|p| p.into_inner());
        if until.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(
                node = %self.hostname,
                agent = ?self.dial,
                error = %why,
                "the node's agent does not answer: its forwards go through the relay exec for {}s",
                PASS_OVER.as_secs()
            );
        }
        *until = Some(Instant::now() + PASS_OVER);
    }

    /// Opens `to` in `container` through the agent, within `deadline`.
    async fn open(
        &self,
        container: &str,
        to: Target,
        deadline: Instant,
    ) -> Result<BoxedStream, AgentFailure> {
        let left = deadline.saturating_duration_since(Instant::now());
        let stream = self
            .dial
            .connect_bulk(left.min(AGENT_CONNECT))
            .await
            .map_err(AgentFailure::Unreachable)?;
        let mut stream = BufReader::new(stream);
        let req = Request {
            v: wire::VERSION,
            container: container.to_owned(),
            to,
            within_ms: left.as_millis() as u64,
        };
        let within = (deadline + AGENT_CONNECT).saturating_duration_since(Instant::now());
        let answer = ask(&mut stream, &req, within, NO_ANSWER)
            .await
            .map_err(AgentFailure::Unreachable)?;
        match answer {
            Answer::Ok => Ok(Box::new(Greedy(stream))),
            Answer::Failed { kind, message } => {
                let e = io::Error::new(kind.io_kind(), message);
                if kind == wire::Failure::BadRequest {
                    // Another release on the node: the relay still works.
                    Err(AgentFailure::Unreachable(e))
                } else {
                    Err(AgentFailure::Answered(e))
                }
            }
        }
    }
}

/// What an agent that did not answer a request in time is said to have done.
const NO_ANSWER: &str = "no answer from the node's agent in time";

/// Sends `req` on `stream` and reads the agent's answer line, within `within`; past it, a
/// `TimedOut` error saying `late`. Bytes after the answer stay in `stream`'s buffer.
async fn ask<S>(stream: &mut S, req: &Request, within: Duration, late: &str) -> io::Result<Answer>
where
    S: tokio::io::AsyncBufRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(within, async {
        wire::write_line(stream, req).await?;
        wire::read_line::<_, Answer>(stream).await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, late))?
}

/// The way into a container on a node that runs an agent: connects through the agent,
/// everything else (and connects the agent cannot take) through the relay.
pub struct AgentReach {
    /// The relay way in, for the rest.
    pub relay: RelayReach,
    /// The node's agent.
    pub agent: Arc<NodeAgent>,
}

impl AgentReach {
    /// Connects to `to` through the agent, or through `relay` when the agent is passed over
    /// or does not answer.
    async fn connect(
        &self,
        to: Target,
        deadline: Instant,
        relay: impl std::future::Future<Output = Result<BoxedStream, ReachError>>,
    ) -> Result<BoxedStream, ReachError> {
        if !self.agent.is_passed_over() {
            match self
                .agent
                .open(&self.relay.container.id, to, deadline)
                .await
            {
                Ok(s) => return Ok(s),
                Err(AgentFailure::Answered(e)) => return Err(ReachError::Io(e)),
                Err(AgentFailure::Unreachable(e)) => self.agent.pass_over(&e),
            }
        }
        relay.await
    }
}

#[async_trait]
impl Reach for AgentReach {
    async fn resolve(&self, host: &str, deadline: Instant) -> Result<Vec<IpAddr>, ReachError> {
        self.relay.resolve(host, deadline).await
    }

    async fn connect_tcp(
        &self,
        addrs: Vec<SocketAddr>,
        deadline: Instant,
    ) -> Result<BoxedStream, ReachError> {
        let to = Target::Tcp(addrs.clone());
        self.connect(to, deadline, self.relay.connect_tcp(addrs, deadline))
            .await
    }

    async fn connect_unix(&self, path: &str, deadline: Instant) -> Result<BoxedStream, ReachError> {
        let to = Target::Unix {
            path: path.to_owned(),
            user: self.relay.who.identity.as_ref().map(WireIdentity::from),
        };
        self.connect(to, deadline, self.relay.connect_unix(path, deadline))
            .await
    }

    async fn listen_tcp(
        &self,
        addr: SocketAddr,
    ) -> Result<(Box<dyn Acceptor>, SocketAddr), ReachError> {
        self.relay.listen_tcp(addr).await
    }

    async fn listen_unix(&self, dir: &str, name: &str) -> Result<Box<dyn Acceptor>, ReachError> {
        self.relay.listen_unix(dir, name).await
    }

    async fn start_stdio(&self, req: ExecRequest) -> Result<Exec, RuntimeError> {
        self.relay.start_stdio(req).await
    }
}

/// A stream whose reads take all it has ready, up to the caller's buffer: TLS hands out one
/// record (16 KiB) per read, so a forward's pump would otherwise turn twice as often as on a
/// plain socket for the same bytes.
struct Greedy<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for Greedy<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = buf.filled().len();
        loop {
            let before = buf.filled().len();
            match Pin::new(&mut self.0).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() > before && buf.remaining() > 0 => {}
                // An end, an error, a full buffer: as it is.
                Poll::Ready(result) => return Poll::Ready(result),
                // Nothing more ready: what was read so far (the waker stays registered).
                Poll::Pending if buf.filled().len() > start => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Greedy<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An agent of an older release at a unix socket: it refuses every request as one it
    /// does not understand, and counts the connections it got.
    fn older_agent(dir: &std::path::Path) -> (Dial, Arc<std::sync::atomic::AtomicUsize>) {
        let path = dir.join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut s = BufReader::new(s);
                let _ = wire::read_line::<_, serde_json::Value>(&mut s).await;
                let answer = Answer::Failed {
                    kind: wire::Failure::BadRequest,
                    message: "bad request: unknown variant `mux`".into(),
                };
                let _ = wire::write_line(&mut s, &answer).await;
            }
        });
        (Dial::Unix(path), count)
    }

    #[tokio::test]
    async fn an_agent_that_does_not_multiplex_is_asked_once_and_exec_streams_go_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let (dial, asked) = older_agent(dir.path());
        let agent = NodeAgent::new("n1".into(), dial);
        for _ in 0..3 {
            match agent.exec_stream("c", "e", false).await {
                Err(AgentFailure::Unreachable(_)) => {}
                Err(AgentFailure::Answered(e)) => panic!("answered: {e}"),
                Ok(_) => panic!("carried"),
            }
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // Its forwards are not passed over for it: it still serves connects.
        assert!(!agent.is_passed_over());
    }

    #[tokio::test]
    async fn an_agent_that_does_not_answer_is_passed_over_for_exec_streams_too() {
        let dir = tempfile::tempdir().unwrap();
        let agent = NodeAgent::new("n1".into(), Dial::Unix(dir.path().join("none.sock")));
        assert!(matches!(
            agent.exec_stream("c", "e", true).await,
            Err(AgentFailure::Unreachable(_))
        ));
        assert!(agent.is_passed_over());
    }

    #[tokio::test]
    async fn greedy_reads_gather_what_is_ready_and_keep_the_end() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        for _ in 0..4 {
            b.write_all(&[7u8; 1000]).await.unwrap();
        }
        // A reader that hands out at most 1000 bytes per read, as TLS hands out records.
        let mut greedy = Greedy(tokio_util::io::StreamReader::new(
            tokio_util::io::ReaderStream::with_capacity(a, 1000),
        ));
        let mut buf = vec![0u8; 64 * 1024];
        assert_eq!(greedy.read(&mut buf).await.unwrap(), 4000);
        b.write_all(b"end").await.unwrap();
        drop(b);
        assert_eq!(greedy.read(&mut buf).await.unwrap(), 3);
        assert_eq!(greedy.read(&mut buf).await.unwrap(), 0);
    }
}
