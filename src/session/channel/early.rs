//! The channel while the program starts: stdin typed early is buffered (up to
//! [`EARLY_INPUT_LIMIT`]), EOF, a close and the last window size are noted, and the
//! container's image pulls are shown as progress.

use std::future::Future;

use bytes::Bytes;
use russh::server::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::super::progress::ProgressView;
use super::EARLY_INPUT_LIMIT;
use super::setup::tty_size;
use crate::login::Context;
use crate::runtime::TtySize;

/// Client input that arrived while the program was starting.
#[derive(Debug, Default)]
pub(super) struct EarlyInput {
    /// Stdin, in order, for the program once it runs.
    pub(super) data: Vec<Bytes>,
    /// Bytes in `data`, against [`EARLY_INPUT_LIMIT`].
    len: usize,
    /// The client sent EOF.
    pub(super) eof: bool,
    /// The channel closed (or the connection ended): nothing is to run.
    pub(super) closed: bool,
    /// The last window size the client sent.
    pub(super) size: Option<TtySize>,
    /// The user pressed Ctrl-C on the terminal while waiting for GPUs (or for a cluster to
    /// place the container): the start was cancelled, the channel is still open.
    pub(super) interrupted: bool,
    /// That Ctrl-C came while in line for GPUs.
    pub(super) left_gpu_line: bool,
}

/// Drives `start` to its end while draining the channel, so the connection never stalls on
/// it: returns what `start` returned and the input that came meanwhile. A close cancels
/// `cancel`. Pull progress of `container` is drawn on the channel (`cols`: the terminal's
/// width, `None` without one) until the close.
pub(super) async fn drain_until<T>(
    start: impl Future<Output = T>,
    rx: &mut ChannelReadHalf,
    tx: &ChannelWriteHalf<Msg>,
    ctx: &Context,
    container: &str,
    cols: Option<u16>,
    cancel: &CancellationToken,
) -> (T, EarlyInput) {
    let mut early = EarlyInput::default();
    // Subscribed before the start is polled, so no step of a pull it waits for is missed.
    let mut pulls = ctx.runtime.pull_events();
    let mut pulls_open = true;
    let mut waits = ctx.gpu_line.events();
    let mut waits_open = true;
    // The place in line last shown, while this container's start waits for GPUs.
    let mut waiting: Option<usize> = None;
    let mut view = ProgressView::new(cols);
    let withdrawable = ctx.runtime.withdraws_dropped_starts();
    tokio::pin!(start);
    let started = loop {
        tokio::select! {
            result = &mut start => break result,
            event = pulls.recv(), if pulls_open => match event {
                Ok(e) if e.container == container && !early.closed => view.show(tx, &e.progress).await,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => pulls_open = false,
            },
            event = waits.recv(), if waits_open => match event {
                Ok(w) if w.container == container && !early.closed => {
                    if w.done {
                        waiting = None;
                    } else {
                        let step = waiting != Some(w.position);
                        waiting = Some(w.position);
                        let line = super::super::text::gpu_wait(&w, std::time::SystemTime::now());
                        view.show(tx, &crate::runtime::PullProgress { line, step }).await;
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => waits_open = false,
            },
            msg = rx.wait(), if early.len < EARLY_INPUT_LIMIT && !early.closed => match msg {
                None | Some(ChannelMsg::Close) => {
                    early.closed = true;
                    cancel.cancel();
                }
                // Ctrl-C on a terminal while in line for GPUs, or while a cluster places the
                // container (its start undoes itself): give the start up.
                Some(ChannelMsg::Data { data }) if cols.is_some() && (waiting.is_some() || withdrawable) && data.contains(&0x03) => {
                    early.interrupted = true;
                    early.left_gpu_line = waiting.is_some();
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
    view.finish(tx).await;
    (started, early)
}
