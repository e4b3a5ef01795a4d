//! The exec path of forwarding: when the gateway cannot enter a container's namespaces
//! (rootless, or no host PID namespace), a forward runs labgate's static `labgate-relay`
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

use super::ForwardError;
use crate::runtime::{
    ContainerHandle, ContainerRuntime, ExecControl, ExecOutput, ExecRequest, RELAY_PATH,
};
use crate::session::{Context, Login};

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
    ctx: &Context,
    login: &Login,
    container: &ContainerHandle,
    args: &[String],
    deadline: Instant,
) -> Result<(String, String), ForwardError> {
    let (mut output, _stdin, control) = start(ctx, login, container, args).await?;
    let mut abandon = Abandon(Some(control));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let collect = async {
        while let Some(chunk) = output.next().await {
            match chunk? {
                ExecOutput::Stdout(b) => out.extend_from_slice(&b),
                ExecOutput::Stderr(b) => err.extend_from_slice(&b),
            }
        }
        Ok::<_, ForwardError>(())
    };
    within(deadline, &login.gone, "the relay", collect).await??;
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
) -> Result<T, ForwardError> {
    tokio::select! {
        r = tokio::time::timeout_at(deadline, work) => r.map_err(|_| {
            ForwardError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what}: no answer in time"),
            ))
        }),
        () = gone.cancelled() => Err(ForwardError::Io(io::Error::new(
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

async fn start(
    ctx: &Context,
    login: &Login,
    container: &ContainerHandle,
    args: &[String],
) -> Result<Started, ForwardError> {
    start_via(ctx.runtime.as_ref(), login, container, args).await
}

async fn start_via(
    runtime: &dyn ContainerRuntime,
    login: &Login,
    container: &ContainerHandle,
    args: &[String],
) -> Result<Started, ForwardError> {
    let mut argv = vec![RELAY_PATH.to_owned()];
    argv.extend(args.iter().cloned());
    let req = ExecRequest {
        argv,
        env: Vec::new(),
        tty: None,
        user: login.identity().map(|id| (id.uid, id.gid)),
        workdir: format!("/home/{}", login.user),
    };
    let exec = runtime.exec(container, req).await?;
    Ok((exec.output, exec.stdin, Arc::from(exec.control)))
}

/// The container's addresses for `name`, as its own resolver answers (by `deadline`).
pub async fn resolve(
    ctx: &Context,
    login: &Login,
    container: &ContainerHandle,
    name: &str,
    deadline: Instant,
) -> Result<Vec<std::net::IpAddr>, ForwardError> {
    let (out, _err) = run_to_end(
        ctx,
        login,
        container,
        &["resolve".to_owned(), name.to_owned()],
        deadline,
    )
    .await?;
    let ips: Vec<_> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    if ips.is_empty() {
        Err(ForwardError::Resolve(name.to_owned()))
    } else {
        Ok(ips)
    }
}

/// Connects through the relay (`tcp ADDR PORT` or `unix PATH`); returns once the relay said
/// `connected`, or the reason it could not, or that it did not say by `deadline` (then the
/// relay is hung up).
pub async fn connect(
    ctx: &Context,
    login: &Login,
    container: &ContainerHandle,
    args: Vec<String>,
    deadline: Instant,
) -> Result<RelayStream, ForwardError> {
    connect_via(ctx.runtime.as_ref(), login, container, args, deadline).await
}

/// [`connect`] with the backend given directly (for tasks that outlive the session's borrow
/// of the [`Context`]).
pub async fn connect_via(
    runtime: &dyn ContainerRuntime,
    login: &Login,
    container: &ContainerHandle,
    args: Vec<String>,
    deadline: Instant,
) -> Result<RelayStream, ForwardError> {
    let (mut output, stdin, control) = start_via(runtime, login, container, &args).await?;
    let mut abandon = Abandon(Some(control.clone()));
    let (line, early_stdout) =
        within(deadline, &login.gone, "the relay", status_line(&mut output)).await??;
    if line != "connected" {
        return Err(ForwardError::Io(io::Error::new(
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
/// to `DIR/.N` with [`connect_via`]). Dropping it closes the relay's stdin, on which it
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
    login: &Login,
    container: &ContainerHandle,
    dir: &str,
    name: &str,
) -> Result<RelayListener, ForwardError> {
    let args = ["listen".to_owned(), dir.to_owned(), name.to_owned()];
    let (mut output, stdin, control) = start_via(runtime, login, container, &args).await?;
    let (line, early_stdout) = status_line(&mut output).await?;
    let listener = RelayListener {
        output,
        pending: early_stdout.concat(),
        stdin: Some(stdin),
        control,
    };
    if line != "listening" {
        return Err(ForwardError::Io(io::Error::other(refusal(&line))));
    }
    Ok(listener)
}

/// Reads the relay's first status line (its stderr: `connected`, `listening`, `error: ...`),
/// keeping what it wrote on stdout meanwhile; the whole stderr trimmed if it ended first.
async fn status_line(output: &mut Output) -> Result<(String, Vec<Bytes>), ForwardError> {
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
    /// The number of the next connection to take over; `None` once the relay has ended.
    pub async fn next_connection(&mut self) -> Option<u64> {
        loop {
            while let Some(pos) = self.pending.iter().position(|c| *c == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                if let Some(n) = text
                    .trim()
                    .strip_prefix("conn ")
                    .and_then(|n| n.parse().ok())
                {
                    return Some(n);
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
