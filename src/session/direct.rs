//! The sftp subsystem's direct path: its bytes go over a unix socket into the container
//! instead of through the container engine's exec stream (which costs the engine more CPU per
//! byte than the whole gateway and caps sftp's speed).
//!
//! The subsystem's usual argv runs under `labgate-relay serve DIR -- ARGV...` through the
//! normal exec (same user, home, environment): the relay makes a fresh private `DIR` (0700,
//! the user's) in the container's `/tmp` with a socket in it, says `ready`, accepts one
//! connection, removes `DIR` and `exec`s the sftp server with stdin/stdout on that connection.
//! The gateway connects from inside the container's mount namespace
//! ([`crate::forward::netns::connect_unix_owned`]) and hands the session a [`Exec`] whose
//! stdin and stdout are the socket and whose stderr, exit status, signals and hangup are the
//! exec's, so the channel task serves it like any other process.
//!
//! Used only where the gateway can enter containers' namespaces and the relay is mounted;
//! anything going wrong before the socket is connected falls back to the exec stream.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use tracing::{debug, warn};

use super::Context;
use crate::forward::netns;
use crate::runtime::{
    ContainerHandle, ContainerRuntime, Exec, ExecOutput, ExecRequest, RELAY_PATH, RuntimeError,
};

/// The socket's name inside its directory (as `labgate-relay serve` names it).
const SOCKET_NAME: &str = "serve.sock";

/// How long the relay may take to say `ready`.
const READY_WAIT: Duration = Duration::from_secs(10);

/// Bytes read from the socket at a time: large reads, few wakeups.
const READ_CHUNK: usize = 256 * 1024;

/// Stdout bytes the relay may print before its `ready` line.
const READY_LIMIT: usize = 256;

/// Why the direct path was not set up (the session then uses the exec stream).
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// The exec could not be started.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The relay ended, or said something else, before `ready`.
    #[error("the relay did not get ready: {0}")]
    NotReady(String),
    /// The socket could not be reached, or is not the relay's.
    #[error("cannot connect to the relay's socket: {0}")]
    Connect(io::Error),
}

/// Starts subsystem `req` on the direct path where it can be used (the gateway enters
/// containers' namespaces and the relay is installed), else, or when that fails, on the exec
/// stream as any process.
pub async fn start(
    ctx: &Context,
    container: &ContainerHandle,
    req: ExecRequest,
) -> Result<Exec, RuntimeError> {
    let relay = ctx.config.borrow().docker.relay_helper.is_file();
    if relay && let Some(pid) = crate::forward::way_in(ctx, container).await {
        match exec(ctx.runtime.as_ref(), container, pid, req.clone()).await {
            Ok(exec) => {
                debug!("subsystem on the direct path (a socket into the container)");
                return Ok(exec);
            }
            Err(e) => {
                warn!(error = %e, "subsystem direct path not available: using the exec stream")
            }
        }
    }
    ctx.runtime.exec(container, req).await
}

/// The argv that serves `argv` on a socket in `dir`.
fn wrap(dir: &str, argv: Vec<String>) -> Vec<String> {
    [RELAY_PATH, "serve", dir, "--"]
        .into_iter()
        .map(str::to_owned)
        .chain(argv)
        .collect()
}

/// Starts `req` in `container` (whose init process is `pid` on the host) with its stdin and
/// stdout on a socket; on `Err` nothing of it is left running.
pub async fn exec(
    runtime: &dyn ContainerRuntime,
    container: &ContainerHandle,
    pid: i32,
    req: ExecRequest,
) -> Result<Exec, DirectError> {
    let dir = format!("/tmp/labgate-sftp-{:016x}", rand::random::<u64>());
    let req = ExecRequest {
        argv: wrap(&dir, req.argv),
        ..req
    };
    let mut exec = runtime.exec(container, req).await?;
    let connected = async {
        let early = tokio::time::timeout(READY_WAIT, wait_ready(&mut exec.output))
            .await
            .map_err(|_| DirectError::NotReady("no answer in time".into()))??;
        let socket = netns::connect_unix_owned(pid, PathBuf::from(&dir), SOCKET_NAME)
            .await
            .map_err(DirectError::Connect)?;
        Ok::<_, DirectError>((early, socket))
    }
    .await;
    let (early, socket) = match connected {
        Ok(c) => c,
        Err(e) => {
            exec.control.hangup().await;
            // A relay hung up while waiting for its connection leaves its directory behind.
            netns::remove_dir_detached(pid, PathBuf::from(&dir));
            return Err(e);
        }
    };
    // The exec's own stdin (the engine's stream) stays unused: the server reads the socket.
    let (read, write) = socket.into_split();
    let stdout = tokio_util::io::ReaderStream::with_capacity(read, READ_CHUNK)
        .map(|r| r.map(ExecOutput::Stdout));
    let rest: BoxStream<'static, io::Result<ExecOutput>> = exec.output;
    Ok(Exec {
        output: futures::stream::iter(early.into_iter().map(Ok))
            .chain(futures::stream::select(stdout, rest))
            .boxed(),
        stdin: Box::pin(write),
        control: exec.control,
    })
}

/// Reads the relay's output up to its `ready` line; returns what it wrote on stderr meanwhile
/// (for the client), or, when it ended first, what it said.
async fn wait_ready(
    output: &mut BoxStream<'static, io::Result<ExecOutput>>,
) -> Result<Vec<ExecOutput>, DirectError> {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    while let Some(chunk) = output.next().await {
        match chunk {
            Ok(ExecOutput::Stdout(b)) => {
                stdout.extend_from_slice(&b);
                if let Some(pos) = stdout.iter().position(|c| *c == b'\n') {
                    return if &stdout[..pos] == b"ready" && pos + 1 == stdout.len() {
                        Ok(stderr)
                    } else {
                        Err(DirectError::NotReady(
                            String::from_utf8_lossy(&stdout).trim().to_owned(),
                        ))
                    };
                }
                if stdout.len() > READY_LIMIT {
                    break;
                }
            }
            Ok(ExecOutput::Stderr(b)) => stderr.push(ExecOutput::Stderr(b)),
            Err(e) => return Err(DirectError::NotReady(e.to_string())),
        }
    }
    let said: Vec<u8> = stderr
        .iter()
        .filter_map(|c| match c {
            ExecOutput::Stderr(b) => Some(b.clone()),
            ExecOutput::Stdout(_) => None,
        })
        .collect::<Vec<Bytes>>()
        .concat();
    Err(DirectError::NotReady(
        String::from_utf8_lossy(&said).trim().to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(chunks: Vec<ExecOutput>) -> BoxStream<'static, io::Result<ExecOutput>> {
        futures::stream::iter(chunks.into_iter().map(Ok)).boxed()
    }

    #[test]
    fn the_subsystem_runs_under_the_relays_serve_mode() {
        let argv = wrap("/tmp/d", vec!["/bin/sh".into(), "-c".into(), "x".into()]);
        assert_eq!(
            argv,
            [
                "/.labgate/relay",
                "serve",
                "/tmp/d",
                "--",
                "/bin/sh",
                "-c",
                "x"
            ]
        );
    }

    #[tokio::test]
    async fn ready_is_found_across_chunks_and_stderr_is_kept() {
        let err = ExecOutput::Stderr(Bytes::from_static(b"note\n"));
        let mut out = stream(vec![
            err.clone(),
            ExecOutput::Stdout(Bytes::from_static(b"rea")),
            ExecOutput::Stdout(Bytes::from_static(b"dy\n")),
        ]);
        assert_eq!(wait_ready(&mut out).await.unwrap(), vec![err]);
    }

    #[tokio::test]
    async fn a_relay_that_ends_or_says_something_else_is_not_ready() {
        let mut out = stream(vec![ExecOutput::Stderr(Bytes::from_static(
            b"exec /.labgate/relay: no such file or directory\n",
        ))]);
        let e = wait_ready(&mut out).await.unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
        let mut out = stream(vec![ExecOutput::Stdout(Bytes::from_static(b"hello\n"))]);
        assert!(wait_ready(&mut out).await.is_err());
    }
}
