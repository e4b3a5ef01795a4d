//! The run phase: stdin → the program (through a queue of its own), its output → the channel
//! (russh's window-respecting writers), window changes → resizes, signals → the program, EOF
//! → its stdin (without a terminal); a client gone first hangs it up. What the gateway tells
//! the container's sessions meanwhile ([`crate::login::notice`]) goes in among the output:
//! on a terminal to stdout as a line of its own, else to stderr, so stdout stays byte-exact.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use russh::server::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::early::EarlyInput;
use super::setup::tty_size;
use crate::login::notice::Subscription;
use crate::runtime::{Exec, ExecControl, ExecOutput, ExitStatus};

/// How the run phase ended.
pub(super) enum Outcome {
    /// The client closed the channel or the connection ended: the program was hung up and
    /// the channel gets nothing more.
    HungUp,
    /// The output ended: the exit status, `None` when it could not be had.
    Exited(Option<ExitStatus>),
}

/// Runs `exec` on the channel until its output ends or the client goes (`gone`: the
/// connection ended). `early` is the input that came while it started: a close hangs it up
/// at once, else the last size, the stdin and the EOF are handed on first. `is_tty`: it runs
/// on a terminal. `notices`: what the session is told while it runs.
pub(super) async fn run(
    rx: &mut ChannelReadHalf,
    tx: &ChannelWriteHalf<Msg>,
    exec: Exec,
    mut early: EarlyInput,
    is_tty: bool,
    gone: &CancellationToken,
    notices: Subscription,
) -> Outcome {
    let control: Arc<dyn ExecControl> = Arc::from(exec.control);
    if early.closed {
        control.hangup().await;
        return Outcome::HungUp;
    }
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

    let stdout = tx.make_writer();
    let stderr = tx.make_writer_ext(Some(1));
    let mut pump = tokio::spawn(
        pump_output(
            exec.output,
            stdout,
            stderr,
            control.clone(),
            is_tty,
            notices,
        )
        .in_current_span(),
    );
    let status = loop {
        tokio::select! {
            status = &mut pump => break status.ok().flatten(),
            msg = rx.wait() => match msg {
                None | Some(ChannelMsg::Close) => {
                    debug!("client closed the channel: hanging up");
                    control.hangup().await;
                    pump.abort();
                    return Outcome::HungUp;
                }
                // A process that does not read its stdin fills the feed's queue, and then
                // this waits; the connection ending must still hang the process up.
                Some(ChannelMsg::Data { data }) => tokio::select! {
                    () = stdin.send(data) => {}
                    () = gone.cancelled() => {
                        debug!("connection gone while input waited: hanging up");
                        control.hangup().await;
                        pump.abort();
                        return Outcome::HungUp;
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
    Outcome::Exited(status)
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

/// Copies the process's output to the channel, and the notices among it; returns the exit
/// status once it ends. Notices sent before the output ended (why the container stopped) are
/// written before the status. When the status cannot be had (the engine went away under the
/// session), the user is told so on stderr (`\r\n` on a terminal) and the channel ends
/// without a status (ssh exits 255).
async fn pump_output(
    mut output: futures::stream::BoxStream<'static, std::io::Result<ExecOutput>>,
    mut stdout: impl AsyncWrite + Unpin,
    mut stderr: impl AsyncWrite + Unpin,
    control: Arc<dyn ExecControl>,
    tty: bool,
    mut notices: Subscription,
) -> Option<ExitStatus> {
    loop {
        let chunk = tokio::select! {
            chunk = output.next() => chunk,
            event = notices.next() => {
                if say(&event, &mut stdout, &mut stderr, tty).await.is_err() {
                    return None;
                }
                continue;
            }
        };
        let Some(chunk) = chunk else { break };
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
    while let Some(event) = notices.try_next() {
        let _ = say(&event, &mut stdout, &mut stderr, tty).await;
    }
    let _ = stdout.flush().await;
    match control.wait().await {
        Ok(status) => {
            let _ = stderr.flush().await;
            Some(status)
        }
        Err(e) => {
            warn!(
                code = crate::codes::Code::EngineLost.as_str(),
                "exit status unknown: {e}"
            );
            crate::codes::Code::EngineLost.count();
            let line = super::super::text::ended(&e, tty);
            let _ = stderr.write_all(line.as_bytes()).await;
            let _ = stderr.flush().await;
            None
        }
    }
}

/// Writes what `event` tells the session: on a terminal to stdout (among the program's
/// output, which the user reads there), else to stderr.
async fn say(
    event: &crate::login::notice::Event,
    stdout: &mut (impl AsyncWrite + Unpin),
    stderr: &mut (impl AsyncWrite + Unpin),
    tty: bool,
) -> std::io::Result<()> {
    let line = super::super::text::notice(event, std::time::SystemTime::now(), tty);
    if tty {
        stdout.write_all(line.as_bytes()).await
    } else {
        stderr.write_all(line.as_bytes()).await
    }
}

/// RFC 4254 signal names to numbers (Linux).
pub(super) fn signal_number(sig: &Sig) -> Option<i32> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::SinkExt;

    use super::*;
    use crate::login::notice::{Event, Notices};
    use crate::runtime::fake::FakeControl as Exited;

    #[tokio::test]
    async fn notices_go_among_the_output_on_a_terminal_and_to_stderr_without_one() {
        let now = std::time::SystemTime::now();
        let warning = Event::ReclaimWarning {
            idle_since: now,
            deadline: now + Duration::from_secs(900),
        };
        let stopped = Event::Reclaimed { idle_since: now };
        for tty in [true, false] {
            let notices = Notices::default();
            let subscription = notices.subscribe("labgate-alice");
            let (mut chunks, output) = futures::channel::mpsc::unbounded();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let pause = || tokio::time::sleep(Duration::from_millis(20));
            let (status, ()) = tokio::join!(
                pump_output(
                    output.boxed(),
                    &mut out,
                    &mut err,
                    Arc::new(Exited),
                    tty,
                    subscription
                ),
                async {
                    let chunk = |s: &'static str| Ok(ExecOutput::Stdout(Bytes::from(s)));
                    chunks.send(chunk("before")).await.unwrap();
                    pause().await;
                    notices.send("labgate-bob", warning.clone());
                    notices.send("labgate-alice", warning.clone());
                    pause().await;
                    chunks.send(chunk("after")).await.unwrap();
                    pause().await;
                    // The stop: its notice is sent, then the output ends at once.
                    notices.send("labgate-alice", stopped.clone());
                    chunks.close_channel();
                }
            );
            assert_eq!(status, Some(ExitStatus::Code(0)));
            let (out, err) = (
                String::from_utf8(out).unwrap(),
                String::from_utf8(err).unwrap(),
            );
            let said = |e: &Event| super::super::super::text::notice(e, now, tty);
            if tty {
                // Lines of their own among the output, bob's not among them.
                assert_eq!(
                    out,
                    format!("before{}after{}", said(&warning), said(&stopped))
                );
                assert!(
                    out.contains("\r\nlabgate: your GPUs have been idle"),
                    "{out:?}"
                );
                assert!(err.is_empty(), "{err:?}");
            } else {
                // stdout byte-exact; the lines on stderr.
                assert_eq!(out, "beforeafter");
                assert_eq!(err, format!("{}{}", said(&warning), said(&stopped)));
                assert!(
                    err.starts_with("labgate: your GPUs have been idle"),
                    "{err:?}"
                );
            }
        }
    }
}
