//! Starting an exec and carrying its bytes: the Engine's hijacked HTTP connection, read raw.
//!
//! bollard's exec-start decoder guesses stream headers from the first byte even on a TTY
//! exec, and drops bytes of binary output. labgate therefore does the upgrade itself (hyper
//! over the unix socket): a TTY exec's stream is passed through untouched, and a non-TTY
//! exec's multiplexed stream (8-byte frame headers) is decoded by [`Demux`].

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::io::ReaderStream;

use super::process::HostProcess;
use crate::runtime::{Exec, ExecControl, ExecOutput, ExitStatus, RuntimeError, TtySize};

/// How long opening the exec's own connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts exec `exec_id` attached, over a fresh connection to `dial`, and returns its
/// output stream and stdin.
pub(crate) async fn start_attached(
    dial: &super::dial::Dial,
    api_version: &str,
    exec_id: &str,
    tty: bool,
) -> Result<
    (
        futures::stream::BoxStream<'static, io::Result<ExecOutput>>,
        tokio::io::WriteHalf<TokioIo<hyper::upgrade::Upgraded>>,
    ),
    RuntimeError,
> {
    let stream = hijack(dial, Some(api_version), exec_id, tty).await?;
    Ok(attach(TokioIo::new(stream), tty))
}

/// Starts exec `exec_id` attached, over a fresh connection to `dial`, and returns the
/// engine's hijacked connection: stdin one way, the output the other (multiplexed unless
/// `tty`). Without `api_version` the engine's own current version serves the request.
pub(crate) async fn hijack(
    dial: &super::dial::Dial,
    api_version: Option<&str>,
    exec_id: &str,
    tty: bool,
) -> Result<hyper::upgrade::Upgraded, RuntimeError> {
    let err = |what: &str, e: &dyn std::fmt::Display| RuntimeError::Exec(format!("{what}: {e}"));
    let stream = dial
        .connect(CONNECT_TIMEOUT)
        .await
        .map_err(|e| RuntimeError::Unavailable(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| err("engine handshake", &e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("exec connection ended: {e}");
        }
    });
    let body = serde_json_body(tty);
    let path = match api_version {
        Some(v) => format!("/{v}/exec/{exec_id}/start"),
        None => format!("/exec/{exec_id}/start"),
    };
    let req = Request::post(path)
        .header(header::HOST, "docker")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "tcp")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| err("request", &e))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| err("exec start", &e))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let text = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(RuntimeError::Exec(format!(
            "engine answered {status}: {}",
            text.trim()
        )));
    }
    hyper::upgrade::on(resp)
        .await
        .map_err(|e| err("upgrade", &e))
}

/// An attached exec's output stream and stdin, from its connection `stream` (the engine's
/// hijacked connection, or a node agent's stream carrying it).
pub(crate) fn attach<S>(
    stream: S,
    tty: bool,
) -> (
    futures::stream::BoxStream<'static, io::Result<ExecOutput>>,
    tokio::io::WriteHalf<S>,
)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let output = if tty {
        ReaderStream::with_capacity(read, 32 * 1024)
            .map(|r| r.map(ExecOutput::Stdout))
            .boxed()
    } else {
        FramedRead::with_capacity(read, Demux::default(), FIRST_READ).boxed()
    };
    (output, write)
}

fn serde_json_body(tty: bool) -> String {
    format!("{{\"Detach\":false,\"Tty\":{tty}}}")
}

/// The first read buffer of an exec's output: what an idle session holds (a fixed 64 KiB
/// buffer cost each idle session about 60 KiB of the gateway's memory).
const FIRST_READ: usize = 8 * 1024;

/// The most an exec's output is read at once: reads that keep filling the buffer double it
/// up to this.
const MAX_READ: usize = 64 * 1024;

/// Decoder of the Engine's multiplexed stdout/stderr stream: frames of
/// `[stream, 0, 0, 0, len (u32 big-endian)]` followed by `len` bytes. It keeps room for the
/// next read: [`FIRST_READ`], doubled up to [`MAX_READ`] each time a read fills the buffer.
#[derive(Debug)]
pub struct Demux {
    /// Room kept for the next read.
    read: usize,
}

impl Default for Demux {
    fn default() -> Self {
        Demux { read: FIRST_READ }
    }
}

impl Decoder for Demux {
    type Item = ExecOutput;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ExecOutput>, io::Error> {
        if src.len() == src.capacity() {
            self.read = (self.read * 2).min(MAX_READ);
        }
        let frame = Self::frame(src);
        if src.capacity() - src.len() < self.read {
            src.reserve(self.read);
        }
        frame
    }
}

impl Demux {
    /// The next whole frame of `src`, stdin echoes skipped.
    fn frame(src: &mut BytesMut) -> Result<Option<ExecOutput>, io::Error> {
        loop {
            let Some(header) = src.get(..8) else {
                return Ok(None);
            };
            let stream = header[0];
            let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
            if src.len() < 8 + len {
                src.reserve(8 + len - src.len());
                return Ok(None);
            }
            src.advance(8);
            let payload = src.split_to(len).freeze();
            match stream {
                1 => return Ok(Some(ExecOutput::Stdout(payload))),
                2 => return Ok(Some(ExecOutput::Stderr(payload))),
                0 => continue, // stdin echo: never requested, skip
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unknown exec stream type {other}"),
                    ));
                }
            }
        }
    }
}

/// Controls of one Docker exec.
pub(super) struct DockerExecControl {
    pub(super) docker: Docker,
    pub(super) exec_id: String,
    /// Host process of the exec, looked up when first needed: the engine reports the PID a
    /// moment after the exec starts, and most execs never need it.
    pub(super) process: tokio::sync::OnceCell<HostProcess>,
    /// The last signal labgate delivered (0: none), to tell `128 + n` exit codes caused by
    /// labgate's own signals from ordinary exit codes.
    pub(super) delivered: Arc<AtomicI32>,
    pub(super) grace: Duration,
}

impl DockerExecControl {
    /// The exec's host process while it runs; `None` once it has ended or when its PID is
    /// not visible here (the gateway is outside the host PID namespace).
    async fn process(&self) -> Option<HostProcess> {
        if let Some(p) = self.process.get() {
            return Some(*p);
        }
        for _ in 0..50 {
            let info = self.docker.inspect_exec(&self.exec_id).await.ok()?;
            if info.running != Some(true) {
                return None;
            }
            if let Some(pid) = info
                .pid
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| *p > 0)
            {
                let found = HostProcess::identify(pid)?;
                return Some(*self.process.get_or_init(|| async { found }).await);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }
}

#[async_trait]
impl ExecControl for DockerExecControl {
    async fn resize(&self, size: TtySize) -> Result<(), RuntimeError> {
        let opts = bollard::query_parameters::ResizeExecOptions {
            h: i32::from(size.rows),
            w: i32::from(size.cols),
        };
        self.docker
            .resize_exec(&self.exec_id, opts)
            .await
            .map_err(|e| RuntimeError::Engine(e.to_string()))
    }

    async fn signal(&self, signal: i32) -> Result<(), RuntimeError> {
        let sig = Signal::try_from(signal).map_err(|e| RuntimeError::Exec(e.to_string()))?;
        let process = self
            .process()
            .await
            .ok_or_else(|| RuntimeError::Exec("process not visible from the gateway".into()))?;
        self.delivered.store(signal, Ordering::SeqCst);
        process
            .signal_group(sig)
            .map_err(|e| RuntimeError::Exec(format!("signal {sig}: {e}")))
    }

    async fn wait(&self) -> Result<ExitStatus, RuntimeError> {
        wait_exec(&self.docker, &self.exec_id, &self.delivered).await
    }

    async fn hangup(&self) {
        let Some(process) = self.process().await else {
            tracing::warn!(exec = %self.exec_id, "cannot hang up: exec process not visible (is the gateway outside the host PID namespace?)");
            return;
        };
        self.delivered
            .store(Signal::SIGHUP as i32, Ordering::SeqCst);
        let grace = self.grace;
        let _ = tokio::task::spawn_blocking(move || process.hangup_blocking(grace)).await;
    }
}

/// The exit status of exec `exec_id`, once its output has ended; `delivered` is the last
/// signal labgate sent it (0: none), so a `128 + n` exit of that signal reads as the signal.
pub(crate) async fn wait_exec(
    docker: &Docker,
    exec_id: &str,
    delivered: &AtomicI32,
) -> Result<ExitStatus, RuntimeError> {
    // The engine can report the exec as running for a moment after its stream ended.
    let mut delay = Duration::from_millis(2);
    for _ in 0..60 {
        let info = docker
            .inspect_exec(exec_id)
            .await
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;
        if info.running != Some(true) {
            let code = info.exit_code.unwrap_or(255);
            // 126/127 from the engine itself: the exec could not run, which a container
            // that died right after starting (no shell in the image) also causes when
            // the exec slipped in before its death. Say what really happened.
            if matches!(code, 126 | 127)
                && let Some(id) = info.container_id.as_deref()
                && let Ok(container) = docker
                    .inspect_container(
                        id,
                        None::<bollard::query_parameters::InspectContainerOptions>,
                    )
                    .await
                && let Some(dead) = super::inspect::ended(&container)
            {
                return Err(dead);
            }
            let delivered = delivered.load(Ordering::SeqCst);
            if delivered > 0 && code == 128 + i64::from(delivered) {
                return Ok(ExitStatus::Signal(delivered));
            }
            return Ok(ExitStatus::Code(u32::try_from(code).unwrap_or(255)));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
    Err(RuntimeError::Engine(
        "the process's output ended but the engine still reports it running".into(),
    ))
}

/// How a detached command failed: the engine refused to start it, or its end could not be read.
pub(crate) enum DetachedError {
    /// Create or start was refused (the caller explains it, e.g. a container that died).
    Engine(bollard::errors::Error),
    /// The exit status could not be read.
    Wait(RuntimeError),
}

/// Runs `opts` in container `id` without attaching to it and waits for its exit status: for
/// the gateway's own short commands (probes, account entries).
pub(crate) async fn run_detached(
    docker: &Docker,
    id: &str,
    opts: bollard::exec::CreateExecOptions<String>,
    grace: Duration,
) -> Result<ExitStatus, DetachedError> {
    let created = docker
        .create_exec(id, opts)
        .await
        .map_err(DetachedError::Engine)?;
    docker
        .start_exec(
            &created.id,
            Some(bollard::exec::StartExecOptions {
                detach: true,
                ..Default::default()
            }),
        )
        .await
        .map_err(DetachedError::Engine)?;
    let control = DockerExecControl {
        docker: docker.clone(),
        exec_id: created.id,
        process: tokio::sync::OnceCell::new(),
        delivered: Arc::default(),
        grace,
    };
    control.wait().await.map_err(DetachedError::Wait)
}

/// Assembles an [`Exec`] from its parts.
pub(super) fn assemble(
    output: futures::stream::BoxStream<'static, io::Result<ExecOutput>>,
    stdin: tokio::io::WriteHalf<TokioIo<hyper::upgrade::Upgraded>>,
    control: DockerExecControl,
) -> Exec {
    assemble_boxed(output, stdin, Box::new(control))
}

/// Assembles an [`Exec`] from its parts, with any backend's controls.
pub(crate) fn assemble_boxed(
    output: futures::stream::BoxStream<'static, io::Result<ExecOutput>>,
    stdin: impl tokio::io::AsyncWrite + Send + 'static,
    control: Box<dyn ExecControl>,
) -> Exec {
    Exec {
        output,
        stdin: Box::pin(stdin),
        control,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stream: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![stream, 0, 0, 0];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn demux_splits_stdout_and_stderr_and_keeps_binary_bytes() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(1, b"\x01\x02\x03abc"));
        buf.extend_from_slice(&frame(2, b"oops\n"));
        let mut d = Demux::default();
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(ExecOutput::Stdout(Bytes::from_static(b"\x01\x02\x03abc")))
        );
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(ExecOutput::Stderr(Bytes::from_static(b"oops\n")))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn demux_waits_for_whole_frames() {
        let all = frame(1, b"hello world");
        let mut buf = BytesMut::from(&all[..5]);
        let mut d = Demux::default();
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&all[5..12]);
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&all[12..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(ExecOutput::Stdout(Bytes::from_static(b"hello world")))
        );
    }

    #[test]
    fn demux_reads_more_at_once_while_reads_fill_its_buffer_and_an_idle_one_stays_small() {
        // Idle: an empty buffer keeps the first read's room.
        let mut d = Demux::default();
        let mut idle = BytesMut::with_capacity(FIRST_READ);
        assert!(d.decode(&mut idle).unwrap().is_none());
        assert!(idle.capacity() < 2 * FIRST_READ);
        // Bulk: each read that filled the buffer doubles the room kept, up to MAX_READ.
        let mut room = Vec::new();
        for _ in 0..6 {
            let mut full = BytesMut::from(&frame(1, &[7; 100])[..]);
            assert_eq!(full.len(), full.capacity());
            assert!(d.decode(&mut full).unwrap().is_some());
            room.push(full.capacity() - full.len());
        }
        assert_eq!(
            room,
            [16, 32, 64, 64, 64, 64].map(|k| k * 1024),
            "room kept after each full read"
        );
    }

    #[test]
    fn demux_rejects_garbage_stream_ids() {
        let mut buf = BytesMut::from(&frame(7, b"x")[..]);
        assert!(Demux::default().decode(&mut buf).is_err());
    }
}
