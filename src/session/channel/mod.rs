//! One session channel, from open to close, in three phases:
//!
//! 1. **Setup**: collect `pty-req`, `env` and window changes until `shell`, `exec` or a
//!    served `subsystem` (`sftp`, see [`super::subsystem`]).
//! 2. **Starting**: ensure the container runs and start the process, while still draining the
//!    channel (stdin typed early is buffered, up to [`EARLY_INPUT_LIMIT`]; a close is noted).
//! 3. **Running**: stdin → process, output → channel (through russh's window-respecting
//!    writers), resizes and signals → process. When the output ends, the exit status is sent
//!    and the channel closed. When the client goes away first, the process is hung up.
//!
//! The handler has already answered each request; this task never replies to one.

mod setup;
mod start;

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelId, ChannelMsg, Sig};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::{Instrument, debug, warn};

use crate::forward::agent::AgentForward;
use crate::login::{Context, Login};
use crate::runtime::{ExecControl, ExecOutput, ExitStatus, TtySize};
use setup::tty_size;

/// Bytes of stdin kept while the container starts; beyond this the channel is not read (the
/// client is slowed by SSH flow control instead).
pub const EARLY_INPUT_LIMIT: usize = 4 << 20;

/// Exit status reported when the command never ran (the container could not be started...).
pub const EXIT_NOT_STARTED: u32 = 255;

/// Client input that arrived while the program was starting.
#[derive(Debug, Default)]
struct EarlyInput {
    data: Vec<Bytes>,
    len: usize,
    eof: bool,
    closed: bool,
    size: Option<TtySize>,
}

/// Serves one session channel until it closes. `handle` sends exit-signal, which the channel
/// half has no method for, and opens agent channels; `agent` is the connection's agent socket;
/// `alive` is held until the task ends (the handler counts the connection's sessions by it).
pub async fn run(
    channel: Channel<Msg>,
    login: Arc<Login>,
    ctx: Arc<Context>,
    handle: Handle,
    agent: Arc<AgentForward>,
    alive: Arc<()>,
) {
    let _alive = alive;
    let id = channel.id();
    let span = tracing::info_span!("channel", channel = %id);
    serve(channel, login, ctx, handle, agent)
        .instrument(span)
        .await
}

async fn serve(
    channel: Channel<Msg>,
    login: Arc<Login>,
    ctx: Arc<Context>,
    handle: Handle,
    agent: Arc<AgentForward>,
) {
    let id = channel.id();
    let (mut rx, tx) = channel.split();

    // Phase 1: setup.
    let Some((setup, program)) = setup::collect(&mut rx, &login).await else {
        return;
    };
    let (program, original) = start::force_command(program, login.key.options().command.as_deref());
    start::audit(&login, &setup, &program, original.as_deref());

    // Phase 2: starting, while draining the channel.
    let _open = login.stats.session();
    let mut early = EarlyInput::default();
    let agent = setup.agent.then(|| (agent.as_ref(), handle.clone()));
    // Subscribed before the start, so no step of a pull it waits for is missed.
    let mut pulls = ctx.runtime.pull_events();
    let mut pulls_open = true;
    let container = login.container_name();
    let mut view = super::progress::ProgressView::new(setup.pty.as_ref().map(|p| p.size.cols));
    // Cancelled when the channel closes or the connection ends: the start then stops
    // waiting for the container and never starts the process.
    let cancel = login.gone.child_token();
    let start = start::start(&ctx, &login, &setup, &program, original, agent, &cancel);
    tokio::pin!(start);
    let started = loop {
        tokio::select! {
            result = &mut start => break result,
            event = pulls.recv(), if pulls_open => match event {
                Ok(e) if e.container == container && !early.closed => view.show(&tx, &e.progress).await,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => pulls_open = false,
            },
            msg = rx.wait(), if early.len < EARLY_INPUT_LIMIT && !early.closed => match msg {
                None | Some(ChannelMsg::Close) => {
                    early.closed = true;
                    cancel.cancel();
                }
                Some(ChannelMsg::Data { data }) => {
                    early.len += data.len();
                    early.data.push(data);
                }
                Some(ChannelMsg::Eof) => early.eof = true,
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    let size = tty_size(col_width, row_height);
                    view.resize(size.cols);
                    early.size = Some(size);
                }
                Some(_) => {}
            },
        }
    };
    view.finish(&tx).await;
    let exec = match started {
        Ok(Some(exec)) => exec,
        Ok(None) => {
            debug!("channel or connection gone while the session started: nothing started");
            return;
        }
        Err(e) => {
            warn!(user = %login.user, error = %e, "session not started");
            if !early.closed {
                let mut stderr = tx.make_writer_ext(Some(1));
                let line = super::text::not_started(&e, setup.pty.is_some());
                let _ = stderr.write_all(line.as_bytes()).await;
                let _ = stderr.flush().await;
                let _ = tx.exit_status(EXIT_NOT_STARTED).await;
                let _ = tx.eof().await;
                let _ = tx.close().await;
            }
            return;
        }
    };
    let control: Arc<dyn ExecControl> = Arc::from(exec.control);
    if early.closed {
        control.hangup().await;
        return;
    }
    let is_tty = setup.pty.is_some();
    if let Some(size) = early.size.filter(|_| is_tty) {
        let _ = control.resize(size).await;
    }
    let mut stdin = StdinFeed::spawn(exec.stdin);
    for chunk in early.data.drain(..) {
        stdin.send(chunk).await;
    }
    if early.eof && !is_tty {
        stdin.eof();
    }

    // Phase 3: running.
    let stdout = tx.make_writer();
    let stderr = tx.make_writer_ext(Some(1));
    let mut pump = tokio::spawn(
        pump_output(exec.output, stdout, stderr, control.clone(), is_tty).in_current_span(),
    );
    let status = loop {
        tokio::select! {
            status = &mut pump => break status.ok().flatten(),
            msg = rx.wait() => match msg {
                None | Some(ChannelMsg::Close) => {
                    debug!("client closed the channel: hanging up");
                    control.hangup().await;
                    pump.abort();
                    return;
                }
                // A process that does not read its stdin fills the feed's queue, and then
                // this waits; the connection ending must still hang the process up.
                Some(ChannelMsg::Data { data }) => tokio::select! {
                    () = stdin.send(data) => {}
                    () = login.gone.cancelled() => {
                        debug!("connection gone while input waited: hanging up");
                        control.hangup().await;
                        pump.abort();
                        return;
                    }
                },
                // On a terminal, EOF is ignored as sshd does: half-closing a TTY exec's
                // stdin makes the engine end its output.
                Some(ChannelMsg::Eof) if !is_tty => stdin.eof(),
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) if is_tty => {
                    if let Err(e) = control.resize(tty_size(col_width, row_height)).await {
                        debug!("resize failed: {e}");
                    }
                }
                Some(ChannelMsg::Signal { signal }) => match signal_number(&signal) {
                    Some(n) => {
                        if let Err(e) = control.signal(n).await {
                            debug!("signal {signal:?} not delivered: {e}");
                        }
                    }
                    None => debug!("unknown signal {signal:?} ignored"),
                },
                Some(_) => {}
            },
        }
    };
    drop(stdin);
    finish(&tx, &handle, id, status).await;
}

/// Client input on its way to the process, written by a task of its own: a process that does
/// not read its stdin fills only this queue (bounded like a forward's, see
/// [`crate::forward::pump`]), never the connection's.
struct StdinFeed {
    ops: Option<tokio::sync::mpsc::UnboundedSender<StdinOp>>,
    budget: Arc<tokio::sync::Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

enum StdinOp {
    Data(Bytes, tokio::sync::OwnedSemaphorePermit),
    Eof,
}

impl StdinFeed {
    fn spawn(mut writer: std::pin::Pin<Box<dyn AsyncWrite + Send>>) -> Self {
        let (ops, mut queue) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut broken = false;
            while let Some(op) = queue.recv().await {
                match op {
                    StdinOp::Data(data, _permit) => {
                        if !broken && writer.write_all(&data).await.is_err() {
                            // The process closed its stdin: discard the rest, as a pipe would.
                            broken = true;
                        }
                    }
                    StdinOp::Eof => {
                        if !broken {
                            let _ = writer.shutdown().await;
                        }
                        return;
                    }
                }
            }
        });
        StdinFeed {
            ops: Some(ops),
            budget: Arc::new(tokio::sync::Semaphore::new(
                crate::forward::pump::CHANNEL_BUFFER,
            )),
            task,
        }
    }

    /// Queues `data`; waits only when the queue is full.
    async fn send(&self, data: Bytes) {
        let Some(ops) = &self.ops else { return };
        let n =
            u32::try_from(data.len().min(crate::forward::pump::CHANNEL_BUFFER)).unwrap_or(u32::MAX);
        if let Ok(permit) = self.budget.clone().acquire_many_owned(n).await {
            let _ = ops.send(StdinOp::Data(data, permit));
        }
    }

    /// The client's EOF: delivered after everything queued before it.
    fn eof(&mut self) {
        if let Some(ops) = self.ops.take() {
            let _ = ops.send(StdinOp::Eof);
        }
    }
}

impl Drop for StdinFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies the process's output to the channel; returns the exit status once it ends. When
/// the status cannot be had (the engine went away under the session), the user is told so on
/// stderr (`\r\n` on a terminal) and the channel ends without a status (ssh exits 255).
async fn pump_output(
    mut output: futures::stream::BoxStream<'static, std::io::Result<ExecOutput>>,
    mut stdout: impl AsyncWrite + Unpin,
    mut stderr: impl AsyncWrite + Unpin,
    control: Arc<dyn ExecControl>,
    tty: bool,
) -> Option<ExitStatus> {
    while let Some(chunk) = output.next().await {
        let result = match chunk {
            Ok(ExecOutput::Stdout(b)) => stdout.write_all(&b).await,
            Ok(ExecOutput::Stderr(b)) => stderr.write_all(&b).await,
            Err(e) => {
                debug!("exec output stream error: {e}");
                break;
            }
        };
        if result.is_err() {
            // The channel is gone; the main loop hangs the process up.
            return None;
        }
    }
    let _ = stdout.flush().await;
    match control.wait().await {
        Ok(status) => {
            let _ = stderr.flush().await;
            Some(status)
        }
        Err(e) => {
            warn!("exit status unknown: {e}");
            let line = super::text::ended(&e, tty);
            let _ = stderr.write_all(line.as_bytes()).await;
            let _ = stderr.flush().await;
            None
        }
    }
}

/// Sends EOF, the exit status (or signal), and closes, in sshd's order.
async fn finish(
    tx: &russh::ChannelWriteHalf<Msg>,
    handle: &Handle,
    id: ChannelId,
    status: Option<ExitStatus>,
) {
    let _ = tx.eof().await;
    match status {
        Some(ExitStatus::Code(code)) => {
            let _ = tx.exit_status(code).await;
        }
        Some(ExitStatus::Signal(n)) => {
            let sig = signal_of(n);
            let _ = handle
                .exit_signal_request(id, sig, false, String::new(), String::new())
                .await;
        }
        None => {}
    }
    let _ = tx.close().await;
    debug!(?status, "session ended");
}

/// RFC 4254 signal names to numbers (Linux).
fn signal_number(sig: &Sig) -> Option<i32> {
    Some(match sig {
        Sig::ABRT => 6,
        Sig::ALRM => 14,
        Sig::FPE => 8,
        Sig::HUP => 1,
        Sig::ILL => 4,
        Sig::INT => 2,
        Sig::KILL => 9,
        Sig::PIPE => 13,
        Sig::QUIT => 3,
        Sig::SEGV => 11,
        Sig::TERM => 15,
        Sig::USR1 => 10,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => 12,
            "CONT" => 18,
            "STOP" => 19,
            "TSTP" => 20,
            "WINCH" => 28,
            _ => return None,
        },
    })
}

fn signal_of(n: i32) -> Sig {
    match n {
        6 => Sig::ABRT,
        14 => Sig::ALRM,
        8 => Sig::FPE,
        1 => Sig::HUP,
        4 => Sig::ILL,
        2 => Sig::INT,
        9 => Sig::KILL,
        13 => Sig::PIPE,
        3 => Sig::QUIT,
        11 => Sig::SEGV,
        15 => Sig::TERM,
        10 => Sig::USR1,
        12 => Sig::Custom("USR2".into()),
        other => Sig::Custom(format!("SIG{other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_image_notice_names_both_images() {
        assert_eq!(
            super::super::text::pending_image("lab/a:1", "lab/a:2"),
            "labgate: your container runs image lab/a:1; image lab/a:2 is used from its next start (home kept)"
        );
    }

    #[test]
    fn signal_names_round_trip() {
        for sig in [
            Sig::HUP,
            Sig::INT,
            Sig::KILL,
            Sig::TERM,
            Sig::USR1,
            Sig::QUIT,
        ] {
            let n = signal_number(&sig).unwrap();
            assert_eq!(format!("{:?}", signal_of(n)), format!("{sig:?}"));
        }
        assert_eq!(signal_number(&Sig::Custom("USR2".into())), Some(12));
        assert_eq!(signal_number(&Sig::Custom("BOGUS".into())), None);
    }
}
