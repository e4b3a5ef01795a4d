//! The direct path of sessions without a terminal (sftp, and commands: scp, rsync, git, any
//! piped command): their stdin and stdout go over a unix socket into the container instead
//! of through the container engine's exec stream (which costs the engine more CPU per byte
//! than the whole gateway: a 1 GiB `cat` took three times as long through it).
//!
//! The program's usual argv runs under `labgate-relay serve DIR -- ARGV...` through the
//! normal exec (same user, home, environment): the relay makes a fresh private `DIR` (0700,
//! the user's) in the container's `/tmp` with a socket in it, says `ready`, accepts one
//! connection, removes `DIR` and `exec`s the sftp server with stdin/stdout on that connection.
//! The gateway connects from inside the container's mount namespace
//! ([`crate::forward::netns::connect_unix_owned`]) and hands the session a [`Exec`] whose
//! stdin and stdout are the socket and whose stderr, exit status, signals and hangup are the
//! exec's, so the channel task serves it like any other process.
//!
//! Used only where the gateway can enter containers' namespaces and the relay is mounted;
//! anything going wrong before the socket is connected falls back to the exec stream, and a
//! container whose relay failed once ([`Refusals`]) uses the exec stream from then on.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;
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

/// Bytes read from the socket at a time: the first read's buffer, doubled after each read
/// that fills it up to the most (large reads, few wakeups, while bytes stream). A buffer is
/// allocated only once the socket is readable: an idle session holds none.
const FIRST_CHUNK: usize = 8 * 1024;
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

/// Containers (by id) whose relay did not get ready once: their sessions use the exec stream
/// from then on, so a container without a usable relay (made before the relay was installed,
/// a read-only `/tmp`) pays for the attempt once, not on every command.
#[derive(Debug, Default)]
pub struct Refusals(Mutex<HashSet<String>>);

impl Refusals {
    /// Ids remembered at most; past it the set starts again (a stale id costs one attempt).
    const LIMIT: usize = 4096;

    fn contains(&self, id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn insert(&self, id: &str) {
        let mut ids = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if ids.len() >= Self::LIMIT {
            ids.clear();
        }
        ids.insert(id.to_owned());
    }
}

/// Starts `req` (a subsystem, or a program without a terminal) on the direct path where it
/// can be used (the gateway enters containers' namespaces, the relay is installed and has not
/// failed in this container), else, or when that fails, on the exec stream as any process.
pub async fn start(
    ctx: &Context,
    container: &ContainerHandle,
    req: ExecRequest,
) -> Result<Exec, RuntimeError> {
    let relay = ctx.config.borrow().docker.relay_helper.path.is_file();
    if relay
        && !ctx.direct_refused.contains(&container.id)
        && let Some(pid) = crate::forward::way_in(ctx, container).await
    {
        match exec(ctx.runtime.as_ref(), container, pid, req.clone()).await {
            Ok(exec) => {
                debug!("on the direct path (a socket into the container)");
                return Ok(exec);
            }
            Err(e) => {
                if matches!(e, DirectError::NotReady(_)) {
                    ctx.direct_refused.insert(&container.id);
                }
                warn!(error = %e, "direct path not available: using the exec stream")
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
    let dir = format!("/tmp/labgate-io-{:016x}", rand::random::<u64>());
    let who = req.user.map(|(uid, gid)| crate::runtime::Identity {
        uid,
        gid,
        groups: Vec::new(),
    });
    let req = ExecRequest {
        argv: wrap(&dir, req.argv),
        ..req
    };
    let mut exec = runtime.exec(container, req).await?;
    let connected = async {
        let early = tokio::time::timeout(READY_WAIT, wait_ready(&mut exec.output))
            .await
            .map_err(|_| DirectError::NotReady("no answer in time".into()))??;
        // The relay's own hand-off: bounded by its deadline alone.
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        let gone = tokio_util::sync::CancellationToken::new();
        let socket = netns::connect_unix_owned(
            pid,
            PathBuf::from(&dir),
            SOCKET_NAME,
            who.as_ref(),
            deadline,
            &gone,
        )
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
            netns::remove_dir_detached(pid, PathBuf::from(&dir), who);
            return Err(e);
        }
    };
    // The exec's own stdin (the engine's stream) stays unused: the program reads the socket.
    let (read, write) = socket.into_split();
    let stdout = chunks(read).map(|r| r.map(ExecOutput::Stdout)).boxed();
    Ok(Exec {
        output: futures::stream::iter(early.into_iter().map(Ok))
            .chain(until_exit(stdout, exec.output))
            .boxed(),
        stdin: Box::pin(write),
        control: exec.control,
    })
}

/// What `read` gives until its end or first error, in chunks of [`FIRST_CHUNK`] growing to
/// [`READ_CHUNK`] bytes.
fn chunks(
    read: tokio::net::unix::OwnedReadHalf,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures::stream::unfold(Some((read, FIRST_CHUNK)), |state| async move {
        let (read, size) = state?;
        loop {
            if let Err(e) = read.readable().await {
                return Some((Err(e), None));
            }
            let mut buf = bytes::BytesMut::with_capacity(size);
            match read.try_read_buf(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    let next = if n == size {
                        (size * 2).min(READ_CHUNK)
                    } else {
                        size
                    };
                    return Some((Ok(buf.freeze()), Some((read, next))));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Some((Err(e), None)),
            }
        }
    })
}

/// Once the process has exited, how long the socket is still read while bytes keep coming,
/// and at most. All the process wrote is queued in the socket by then; only a background job
/// that kept its stdout (`ssh lab 'server &'`) can still hold the socket, and it does not hold
/// the session (as with the engine's own stream, which also ends about then; OpenSSH would
/// wait for it).
const AFTER_EXIT_QUIET: Duration = Duration::from_millis(200);
const AFTER_EXIT_MAX: Duration = Duration::from_secs(2);

type Output = BoxStream<'static, io::Result<ExecOutput>>;

/// The program's output: `stdout` (the socket) and `rest` (the exec stream: stderr, ending
/// when the process exits), interleaved as they come; after `rest` ends, `stdout` only until
/// its end or [`AFTER_EXIT_QUIET`] without a byte ([`AFTER_EXIT_MAX`] at most).
fn until_exit(stdout: Output, rest: Output) -> Output {
    struct State {
        stdout: Option<Output>,
        rest: Option<Output>,
        exited: Option<tokio::time::Instant>,
    }
    let state = State {
        stdout: Some(stdout),
        rest: Some(rest),
        exited: None,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            match (st.stdout.as_mut(), st.rest.as_mut()) {
                (None, None) => return None,
                (None, Some(rest)) => match rest.next().await {
                    Some(item) => return Some((item, st)),
                    None => st.rest = None,
                },
                (Some(out), None) => {
                    let exited = *st.exited.get_or_insert_with(tokio::time::Instant::now);
                    let wait = AFTER_EXIT_MAX
                        .saturating_sub(exited.elapsed())
                        .min(AFTER_EXIT_QUIET);
                    match tokio::time::timeout(wait, out.next()).await {
                        Ok(Some(item)) => return Some((item, st)),
                        Ok(None) => st.stdout = None,
                        Err(_) => {
                            debug!(
                                "stdout still held after the process exited: not waiting for it"
                            );
                            st.stdout = None;
                        }
                    }
                }
                (Some(out), Some(rest)) => tokio::select! {
                    item = out.next() => match item {
                        Some(item) => return Some((item, st)),
                        None => st.stdout = None,
                    },
                    item = rest.next() => match item {
                        Some(item) => return Some((item, st)),
                        None => st.rest = None,
                    },
                },
            }
        }
    })
    .boxed()
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
    fn a_refused_container_is_remembered_and_the_set_stays_bounded() {
        let r = Refusals::default();
        assert!(!r.contains("a"));
        r.insert("a");
        assert!(r.contains("a"));
        for i in 0..Refusals::LIMIT {
            r.insert(&i.to_string());
        }
        assert!(r.0.lock().unwrap().len() <= Refusals::LIMIT);
    }

    #[test]
    fn the_program_runs_under_the_relays_serve_mode() {
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

    fn bytes(b: &'static [u8]) -> ExecOutput {
        ExecOutput::Stdout(Bytes::from_static(b))
    }

    #[tokio::test(start_paused = true)]
    async fn output_queued_before_the_exit_is_all_read_but_a_held_socket_is_not_waited_for() {
        // The socket gives two chunks, then stays open (a background job holds it).
        let stdout = futures::stream::iter(vec![Ok(bytes(b"a")), Ok(bytes(b"b"))])
            .chain(futures::stream::pending())
            .boxed();
        // The exec stream: one stderr chunk, then the exit.
        let rest = stream(vec![ExecOutput::Stderr(Bytes::from_static(b"e"))]);
        let got: Vec<ExecOutput> = until_exit(stdout, rest).map(|r| r.unwrap()).collect().await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got.contains(&bytes(b"a")) && got.contains(&bytes(b"b")));
    }

    #[tokio::test(start_paused = true)]
    async fn output_that_keeps_coming_after_the_exit_is_cut_at_the_limit() {
        let ticks = ticks();
        let rest = stream(vec![]);
        let t0 = tokio::time::Instant::now();
        let n = until_exit(ticks, rest).count().await;
        assert!(n > 5, "read while bytes came: {n}");
        assert!(t0.elapsed() <= AFTER_EXIT_MAX + Duration::from_millis(100));
    }

    /// A chunk every 50 ms, forever.
    fn ticks() -> Output {
        futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Some((Ok(bytes(b"x")), ()))
        })
        .boxed()
    }

    #[tokio::test]
    async fn socket_chunks_grow_while_full_and_every_byte_arrives_in_order() {
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let (read, _write) = a.into_split();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                b.write_all(&data).await.unwrap();
            })
        };
        let got: Vec<Bytes> = chunks(read).map(|r| r.unwrap()).collect().await;
        writer.await.unwrap();
        assert_eq!(got.concat(), data);
        assert!(got.iter().all(|c| c.len() <= READ_CHUNK));
        assert!(got.iter().any(|c| c.len() > FIRST_CHUNK), "the buffer grew");
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
