//! One session channel, from open to close: the task ([`run`]) that is the channel's only
//! reader and takes it through its phases, each a module of its own:
//!
//! 1. `setup`: `pty-req`, `env`, `auth-agent-req` and window changes until `shell`, `exec`
//!    or a served `subsystem` (see [`super::subsystem`]);
//! 2. `start`: the forced command, argv and environment; the container's start and the exec,
//!    while `early` drains the channel (stdin buffered up to [`EARLY_INPUT_LIMIT`], a close
//!    noted) and shows pull progress;
//! 3. `pump`: stdin → process, output → channel, resizes, signals, EOF; a client gone first
//!    hangs the process up;
//! 4. `end`: EOF, exit status or signal, close, in sshd's order.
//!
//! The handler has already answered each request; this task never replies to one.

mod early;
mod end;
mod pump;
mod setup;
mod start;

use std::sync::Arc;

use russh::Channel;
use russh::server::{Handle, Msg};
use tracing::{Instrument, debug};

use crate::forward::agent::AgentForward;
use crate::login::{Context, Login};

/// Bytes of stdin kept while the container starts; beyond this the channel is not read (the
/// client is slowed by SSH flow control instead).
pub const EARLY_INPUT_LIMIT: usize = 4 << 20;

/// Exit status reported when the command never ran (the container could not be started...).
pub const EXIT_NOT_STARTED: u32 = 255;

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
    let agent = setup.agent.then(|| (agent.as_ref(), handle.clone()));
    // Cancelled when the channel closes or the connection ends: the start then stops
    // waiting for the container and never starts the process.
    let cancel = login.gone.child_token();
    let start = start::start(&ctx, &login, &setup, &program, original, agent, &cancel);
    let cols = setup.pty.as_ref().map(|p| p.size.cols);
    let container = login.container_name();
    let (started, early) =
        early::drain_until(start, &mut rx, &tx, &ctx, &container, cols, &cancel).await;
    let exec = match started {
        Ok(Some(exec)) => exec,
        Ok(None) if early.interrupted && !early.closed => {
            end::left_queue(&tx, setup.pty.is_some(), early.left_gpu_line).await;
            return;
        }
        Ok(None) => {
            debug!("channel or connection gone while the session started: nothing started");
            return;
        }
        Err(e) => {
            crate::codes::record(&login.user, "session start", &e);
            if !early.closed {
                end::not_started(&tx, &e, setup.pty.is_some()).await;
            }
            return;
        }
    };

    // Phase 3: running.
    let tty = setup.pty.is_some();
    let notices = ctx.notices.subscribe(&container);
    let status = match pump::run(&mut rx, &tx, exec, early, tty, &login.gone, notices).await {
        pump::Outcome::HungUp => return,
        pump::Outcome::Exited(status) => status,
    };

    // Phase 4: end.
    end::finish(&tx, &handle, id, status).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pending_image_notice_names_both_images() {
        assert_eq!(
            super::super::text::pending_image("lab/a:1", "lab/a:2"),
            "labgate: your container runs image lab/a:1; image lab/a:2 is used from its next start (home kept)"
        );
    }
}
