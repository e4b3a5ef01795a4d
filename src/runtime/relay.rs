//! The exec path of forwarding: when the gateway cannot enter a container's namespaces
//! (rootless, no host PID namespace, or a container on another node), a forward runs labgate's static `labgate-relay`
//! (bind-mounted read-only into every container at [`RELAY_PATH`]) as an exec: the relay
//! connects from inside the container and joins the socket to its stdin/stdout, which the
//! gateway joins to the SSH channel. Nothing has to be installed in the image.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::io::StreamReader;

use std::net::{IpAddr, SocketAddr};

use async_trait::async_trait;

use crate::runtime::reach::{Acceptor, BoxedStream, Reach, ReachError, Reacher};
use crate::runtime::{
    ContainerHandle, ContainerRuntime, Exec, ExecControl, ExecOutput, ExecRequest, RELAY_PATH,
    RuntimeError,
};

type Output = futures::stream::BoxStream<'static, io::Result<ExecOutput>>;
type StdoutReader = StreamReader<futures::stream::BoxStream<'static, io::Result<Bytes>>, Bytes>;

/// A relay exec seen as one socket. Dropping it hangs the exec up.
pub struct RelayStream {
    io: tokio::io::Join<StdoutReader, Pin<Box<dyn AsyncWrite + Send>>>,
    control: Arc<dyn ExecControl>,
}

impl Drop for RelayStream {
    fn drop(&mut self) {
        let control = self.control.clone();
        tokio::spawn(async move { control.hangup().await });
    }
}

impl AsyncRead for RelayStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for RelayStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Runs `labgate-relay ARGS...` in the container and collects its stdout (for `resolve`),
/// within `deadline`: a relay that takes longer (a resolver the user pointed at a black hole)
/// is hung up.
async fn run_to_end(
    runtime: &dyn ContainerRuntime,
    who: &Reacher,
    container: &ContainerHandle,
    args: &[String],
    deadline: Instant,
) -> Result<(String, String), ReachError> {
    let (mut output, _stdin, control) = start(runtime, who, container, args).await?;
    let mut abandon = Abandon(Some(control));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let collect = async {
        while let Some(chunk) = output.next().await {
            match chunk? {
                ExecOutput::Stdout(b) => out.extend_from_slice(&b),
                ExecOutput::Stderr(b) => err.extend_from_slice(&b),
            }
        }
        Ok::<_, ReachError>(())
    };
    within(deadline, &who.gone, "the relay", collect).await??;
    abandon.0 = None;
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
}

/// Hangs a relay exec up when dropped armed: one given up on (past its deadline, or its
/// connection gone) is never left running.
struct Abandon(Option<Arc<dyn ExecControl>>);

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(control) = self.0.take() {
            tokio::spawn(async move { control.hangup().await });
        }
    }
}

/// `work` unless `deadline` passes or the connection ends first.
async fn within<T>(
    deadline: Instant,
    gone: &tokio_util::sync::CancellationToken,
    what: &str,
    work: impl std::future::Future<Output = T>,
) -> Result<T, ReachError> {
    tokio::select! {
        r = tokio::time::timeout_at(deadline, work) => r.map_err(|_| {
            ReachError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what}: no answer in time"),
            ))
        }),
        () = gone.cancelled() => Err(ReachError::Io(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the client went away",
        ))),
    }
}

type Started = (
    Output,
    Pin<Box<dyn AsyncWrite + Send>>,
    Arc<dyn ExecControl>,
);

/// Starts `labgate-relay ARGS...` in `container` as `who`, in their home.
async fn start(
    runtime: &dyn ContainerRuntime,
    who: &Reacher,
    container: &ContainerHandle,
    args: &[String],
) -> Result<Started, ReachError> {
    let mut argv = vec![RELAY_PATH.to_owned()];
    argv.extend(args.iter().cloned());
    let req = ExecRequest {
        argv,
        env: Vec::new(),
        tty: None,
        user: who.identity.as_ref().map(|id| (id.uid, id.gid)),
        workdir: who.home.clone(),
    };
    let exec = runtime.exec(container, req).await?;
    Ok((exec.output, exec.stdin, Arc::from(exec.control)))
}

/// The container's addresses for `name`, as its own resolver answers (by `deadline`).
pub async fn resolve(
    runtime: &dyn ContainerRuntime,
    who: &Reacher,
    container: &ContainerHandle,
    name: &str,
    deadline: Instant,
) -> Result<Vec<std::net::IpAddr>, ReachError> {
    let (out, _err) = run_to_end(
        runtime,
        who,
        container,
        &["resolve".to_owned(), name.to_owned()],
        deadline,
    )
    .await?;
    let ips: Vec<_> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    if ips.is_empty() {
        Err(ReachError::Resolve(name.to_owned()))
    } else {
        Ok(ips)
    }
}

/// Connects through the relay (`tcp ADDR PORT` or `unix PATH`) as `who`; returns once the
/// relay said `connected`, or the reason it could not, or that it did not say by `deadline`
/// (then the relay is hung up).
pub async fn connect(
    runtime: &dyn ContainerRuntime,
    who: &Reacher,
    container: &ContainerHandle,
    args: Vec<String>,
    deadline: Instant,
) -> Result<RelayStream, ReachError> {
    let (mut output, stdin, control) = start(runtime, who, container, &args).await?;
    let mut abandon = Abandon(Some(control.clone()));
    let (line, early_stdout) =
        within(deadline, &who.gone, "the relay", status_line(&mut output)).await??;
    if line != "connected" {
        return Err(ReachError::Io(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            refusal(&line),
        )));
    }
    let stdout = futures::stream::iter(early_stdout.into_iter().map(Ok))
        .chain(output.filter_map(|chunk| async move {
            match chunk {
                Ok(ExecOutput::Stdout(b)) => Some(Ok(b)),
                Ok(ExecOutput::Stderr(_)) => None,
                Err(e) => Some(Err(e)),
            }
        }))
        .boxed();
    abandon.0 = None;
    Ok(RelayStream {
        io: tokio::io::join(StreamReader::new(stdout), stdin),
        control,
    })
}

/// A `labgate-relay listen DIR NAME` exec: a private unix socket in the container whose
/// connections are handed over one by one (`conn N` on its stdout; the gateway then connects
/// to `DIR/.N` with [`connect`]). Dropping it closes the relay's stdin, on which it
/// removes `DIR` and exits; one that does not is hung up.
pub struct RelayListener {
    output: Output,
    /// Bytes of stdout not yet split into lines.
    pending: Vec<u8>,
    stdin: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    control: Arc<dyn ExecControl>,
}

/// How long a listener relay gets to clean up after its stdin closed before it is hung up.
const LISTENER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts `labgate-relay listen DIR NAME` as the user; returns once it said `listening`.
pub async fn listen(
    runtime: &dyn ContainerRuntime,
    who: &Reacher,
    container: &ContainerHandle,
    dir: &str,
    name: &str,
) -> Result<RelayListener, ReachError> {
    let args = ["listen".to_owned(), dir.to_owned(), name.to_owned()];
    Ok(listen_with(runtime, who, container, &args).await?.0)
}

/// Starts `labgate-relay listen-tcp DIR ADDR PORT` as the user (`-R` on the exec path);
/// returns once it said `listening PORT`, with that (bound) port.
pub async fn listen_tcp(
    runtime: &dyn ContainerRuntime,
    who: &Reacher,
    container: &ContainerHandle,
    dir: &str,
    addr: std::net::SocketAddr,
) -> Result<(RelayListener, u16), ReachError> {
    let args = [
        "listen-tcp".to_owned(),
        dir.to_owned(),
        addr.ip().to_string(),
        addr.port().to_string(),
    ];
    let (listener, rest) = listen_with(runtime, who, container, &args).await?;
    let port = rest.trim().parse().map_err(|_| {
        ReachError::Io(io::Error::other(format!(
            "the relay said it listens on {rest:?}"
        )))
    })?;
    Ok((listener, port))
}

/// Starts a listening relay with `args`; returns once it said `listening`, with what
/// followed that word on its line.
async fn listen_with(
    runtime: &dyn ContainerRuntime,
    who: &Reacher,
    container: &ContainerHandle,
    args: &[String],
) -> Result<(RelayListener, String), ReachError> {
    let (mut output, stdin, control) = start(runtime, who, container, args).await?;
    let (line, early_stdout) = status_line(&mut output).await?;
    let listener = RelayListener {
        output,
        pending: early_stdout.concat(),
        stdin: Some(stdin),
        control,
    };
    match line.strip_prefix("listening") {
        Some(rest) => Ok((listener, rest.to_owned())),
        None => Err(ReachError::Io(io::Error::other(refusal(&line)))),
    }
}

/// Reads the relay's first status line (its stderr: `connected`, `listening`, `error: ...`),
/// keeping what it wrote on stdout meanwhile; the whole stderr trimmed if it ended first.
async fn status_line(output: &mut Output) -> Result<(String, Vec<Bytes>), ReachError> {
    let mut status = Vec::new();
    let mut early_stdout = Vec::new();
    let line = loop {
        match output.next().await {
            Some(Ok(ExecOutput::Stderr(b))) => {
                status.extend_from_slice(&b);
                if let Some(pos) = status.iter().position(|c| *c == b'\n') {
                    break String::from_utf8_lossy(&status[..pos]).into_owned();
                }
            }
            Some(Ok(ExecOutput::Stdout(b))) => early_stdout.push(b),
            Some(Err(e)) => return Err(e.into()),
            None => break String::from_utf8_lossy(&status).trim().to_owned(),
        }
    };
    Ok((line, early_stdout))
}

/// Why a relay did not do what it was asked: its `error: ...` line, or that it did not run.
fn refusal(line: &str) -> String {
    match line.strip_prefix("error: ").unwrap_or(line) {
        "" => format!("the relay at {RELAY_PATH} did not run (is it mounted in this container?)"),
        reason => reason.to_owned(),
    }
}

impl RelayListener {
    /// The number of the next connection to take over, and where it came from when the
    /// relay said (TCP); `None` once the relay has ended.
    pub async fn next_connection(&mut self) -> Option<(u64, Option<std::net::SocketAddr>)> {
        loop {
            while let Some(pos) = self.pending.iter().position(|c| *c == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                let mut words = text.trim().strip_prefix("conn ").unwrap_or("").split(' ');
                if let Some(n) = words.next().and_then(|n| n.parse().ok()) {
                    return Some((n, words.next().and_then(|p| p.parse().ok())));
                }
            }
            match self.output.next().await? {
                Ok(ExecOutput::Stdout(b)) => self.pending.extend_from_slice(&b),
                Ok(ExecOutput::Stderr(_)) => {}
                Err(_) => return None,
            }
        }
    }
}

impl Drop for RelayListener {
    fn drop(&mut self) {
        let stdin = self.stdin.take();
        let control = self.control.clone();
        tokio::spawn(async move {
            if let Some(mut stdin) = stdin {
                use tokio::io::AsyncWriteExt;
                let _ = stdin.shutdown().await;
            }
            if tokio::time::timeout(LISTENER_GRACE, control.wait())
                .await
                .is_err()
            {
                control.hangup().await;
            }
        });
    }
}

/// The way into a container through relay execs alone ([`Reach`] for backends that cannot
/// enter a container's namespaces: a cluster's remote nodes, or local Docker without them).
#[derive(Clone)]
pub struct RelayReach {
    /// The backend the relay execs run through.
    pub runtime: Arc<dyn ContainerRuntime>,
    /// The container.
    pub container: ContainerHandle,
    /// Who, and until when.
    pub who: Reacher,
}

impl RelayReach {
    /// `labgate-relay ARGS...` connected in the container, within `deadline`.
    async fn connect(
        &self,
        args: Vec<String>,
        deadline: Instant,
    ) -> Result<RelayStream, ReachError> {
        connect(
            self.runtime.as_ref(),
            &self.who,
            &self.container,
            args,
            deadline,
        )
        .await
    }
}

/// A `labgate-relay listen` exec: each connection is announced and taken over through a
/// relay exec of its own (the hand-off socket `DIR/.N`).
struct RelayAcceptor {
    listener: RelayListener,
    reach: RelayReach,
    dir: String,
}

#[async_trait]
impl Acceptor for RelayAcceptor {
    async fn accept(&mut self) -> Option<(BoxedStream, Option<SocketAddr>)> {
        loop {
            let (n, peer) = self.listener.next_connection().await?;
            let args = vec!["unix".to_owned(), format!("{}/.{n}", self.dir)];
            let deadline = Instant::now() + crate::runtime::reach::CONNECT_TIMEOUT;
            match self.reach.connect(args, deadline).await {
                Ok(s) => return Some((Box::new(s), peer)),
                Err(e) => tracing::debug!("relay hand-off failed: {e}"),
            }
        }
    }
}

#[async_trait]
impl Reach for RelayReach {
    async fn resolve(&self, host: &str, deadline: Instant) -> Result<Vec<IpAddr>, ReachError> {
        if let Some(ips) = crate::runtime::reach::literal(host) {
            return Ok(ips);
        }
        resolve(
            self.runtime.as_ref(),
            &self.who,
            &self.container,
            host,
            deadline,
        )
        .await
    }

    async fn connect_tcp(
        &self,
        addrs: Vec<SocketAddr>,
        deadline: Instant,
    ) -> Result<BoxedStream, ReachError> {
        let mut last = None;
        for addr in addrs {
            let args = vec!["tcp".into(), addr.ip().to_string(), addr.port().to_string()];
            match self.connect(args, deadline).await {
                Ok(s) => return Ok(Box::new(s)),
                Err(e) => last = Some(e),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(last.unwrap_or(ReachError::Unsupported("no address to connect to")))
    }

    async fn connect_unix(&self, path: &str, deadline: Instant) -> Result<BoxedStream, ReachError> {
        let s = self
            .connect(vec!["unix".into(), path.to_owned()], deadline)
            .await?;
        Ok(Box::new(s))
    }

    async fn listen_tcp(
        &self,
        addr: SocketAddr,
    ) -> Result<(Box<dyn Acceptor>, SocketAddr), ReachError> {
        let dir = format!("/tmp/labgate-fwd-{:016x}", rand::random::<u64>());
        let (listener, port) = listen_tcp(
            self.runtime.as_ref(),
            &self.who,
            &self.container,
            &dir,
            addr,
        )
        .await?;
        let acceptor = RelayAcceptor {
            listener,
            reach: self.clone(),
            dir,
        };
        Ok((Box::new(acceptor), SocketAddr::new(addr.ip(), port)))
    }

    async fn listen_unix(&self, dir: &str, name: &str) -> Result<Box<dyn Acceptor>, ReachError> {
        let listener = listen(self.runtime.as_ref(), &self.who, &self.container, dir, name).await?;
        Ok(Box::new(RelayAcceptor {
            listener,
            reach: self.clone(),
            dir: dir.to_owned(),
        }))
    }

    async fn start_stdio(&self, req: ExecRequest) -> Result<Exec, RuntimeError> {
        self.runtime.exec(&self.container, req).await
    }
}
