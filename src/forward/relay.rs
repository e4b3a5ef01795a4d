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
use tokio_util::io::StreamReader;

use super::ForwardError;
use crate::runtime::{ContainerHandle, ExecControl, ExecOutput, ExecRequest, RELAY_PATH};
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

/// Runs `labgate-relay ARGS...` in the container and collects its stdout (for `resolve`).
async fn run_to_end(
    ctx: &Context,
    login: &Login,
    container: &ContainerHandle,
    args: &[String],
) -> Result<(String, String), ForwardError> {
    let mut exec = start(ctx, login, container, args).await?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(chunk) = exec.0.next().await {
        match chunk? {
            ExecOutput::Stdout(b) => out.extend_from_slice(&b),
            ExecOutput::Stderr(b) => err.extend_from_slice(&b),
        }
    }
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
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
    let mut argv = vec![RELAY_PATH.to_owned()];
    argv.extend(args.iter().cloned());
    let req = ExecRequest {
        argv,
        env: Vec::new(),
        tty: None,
        user: login.quota.uid.map(|u| (u, login.quota.gid.unwrap_or(u))),
        workdir: format!("/home/{}", login.user),
    };
    let exec = ctx.runtime.exec(container, req).await?;
    Ok((exec.output, exec.stdin, Arc::from(exec.control)))
}

/// The container's addresses for `name`, as its own resolver answers.
pub async fn resolve(
    ctx: &Context,
    login: &Login,
    container: &ContainerHandle,
    name: &str,
) -> Result<Vec<std::net::IpAddr>, ForwardError> {
    let (out, _err) = run_to_end(
        ctx,
        login,
        container,
        &["resolve".to_owned(), name.to_owned()],
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
/// `connected`, or the reason it could not.
pub async fn connect(
    ctx: &Context,
    login: &Login,
    container: &ContainerHandle,
    args: Vec<String>,
) -> Result<RelayStream, ForwardError> {
    let (mut output, stdin, control) = start(ctx, login, container, &args).await?;
    let mut status = Vec::new();
    let mut early_stdout: Vec<Bytes> = Vec::new();
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
    if line != "connected" {
        let reason = line.strip_prefix("error: ").unwrap_or(&line);
        let reason = if reason.is_empty() {
            format!("the relay at {RELAY_PATH} did not run (is it mounted in this container?)")
        } else {
            reason.to_owned()
        };
        return Err(ForwardError::Io(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            reason,
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
    Ok(RelayStream {
        io: tokio::io::join(StreamReader::new(stdout), stdin),
        control,
    })
}
