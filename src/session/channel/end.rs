//! The end phase, in sshd's order: EOF, the exit status (or the signal labgate delivered),
//! close; or, for a program that never started, the reason on stderr and status 255.

use russh::server::{Handle, Msg};
use russh::{ChannelId, ChannelWriteHalf, Sig};
use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::EXIT_NOT_STARTED;
use crate::runtime::{ExitStatus, RuntimeError};

/// Tells the client why its program did not start (`tty`: on a terminal), then ends the
/// channel with [`EXIT_NOT_STARTED`].
pub(super) async fn not_started(tx: &ChannelWriteHalf<Msg>, e: &RuntimeError, tty: bool) {
    let mut stderr = tx.make_writer_ext(Some(1));
    let line = super::super::text::not_started(e, tty);
    let _ = stderr.write_all(line.as_bytes()).await;
    let _ = stderr.flush().await;
    let _ = tx.exit_status(EXIT_NOT_STARTED).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

/// The user pressed Ctrl-C while waiting for GPUs: they left the line; the session ends
/// with 130, as a shell's interrupted command does.
pub(super) async fn left_queue(tx: &ChannelWriteHalf<Msg>, tty: bool, gpu_line: bool) {
    let mut stderr = tx.make_writer_ext(Some(1));
    let line = if gpu_line {
        super::super::text::left_queue(tty)
    } else {
        super::super::text::gave_up_start(tty)
    };
    let _ = stderr.write_all(line.as_bytes()).await;
    let _ = stderr.flush().await;
    let _ = tx.exit_status(EXIT_INTERRUPTED).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

/// Exit status of a session whose user left the GPU queue with Ctrl-C (128 + SIGINT).
pub(super) const EXIT_INTERRUPTED: u32 = 130;

/// Sends EOF, the exit status (or signal), and closes, in sshd's order.
pub(super) async fn finish(
    tx: &ChannelWriteHalf<Msg>,
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

/// Linux signal numbers to RFC 4254 names, for `exit-signal`.
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
    use super::super::pump::signal_number;
    use super::*;

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
