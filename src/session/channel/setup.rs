//! The setup phase: the requests before the program starts (`pty-req`, `env`,
//! `auth-agent-req`, window changes), until `shell`, `exec` or a served `subsystem`.

use russh::{ChannelMsg, ChannelReadHalf};
use tracing::debug;

use super::super::limits::{EnvBudget, EnvVerdict};
use super::super::subsystem;
use crate::login::Login;
use crate::runtime::TtySize;

/// What the client asked to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Program {
    /// Interactive login shell.
    Shell,
    /// `SHELL -c command`.
    Command(String),
    /// A subsystem labgate serves (see [`subsystem`]), never on a terminal.
    Subsystem(String),
}

/// The pty the client asked for.
#[derive(Debug, Clone)]
pub(super) struct Pty {
    /// `TERM` for the program.
    pub(super) term: String,
    /// The latest size the client gave.
    pub(super) size: TtySize,
}

/// Requests seen before the program starts.
#[derive(Debug, Default)]
pub(super) struct Setup {
    /// The terminal, unless none was asked for (or the key says `no-pty`, or a subsystem runs).
    pub(super) pty: Option<Pty>,
    /// The client's `env` requests that `accept_env` and the bounds let through, in order.
    pub(super) env: Vec<(String, String)>,
    /// What `env` holds against the per-channel bounds (the handler counts the same way
    /// and has answered each request).
    env_budget: EnvBudget,
    /// The client asked for agent forwarding (`-A`) and the key allows it.
    pub(super) agent: bool,
}

#[cfg(test)]
impl Setup {
    /// A setup as `collect` would leave it after these requests (within the bounds).
    pub(super) fn with(pty: Option<Pty>, env: Vec<(String, String)>) -> Setup {
        Setup {
            pty,
            env,
            ..Setup::default()
        }
    }
}

/// Reads the channel until the client asks for a program: what it asked for and everything
/// before it. `None` when the channel closes first. The handler has answered every request.
pub(super) async fn collect(rx: &mut ChannelReadHalf, login: &Login) -> Option<(Setup, Program)> {
    let mut setup = Setup::default();
    let program = loop {
        match rx.wait().await {
            None | Some(ChannelMsg::Close) => return None,
            // Refused by the handler under `no-pty`: the session runs without a terminal.
            Some(ChannelMsg::RequestPty { .. }) if !login.key.options().pty => {
                debug!("pty request refused by the key's options");
            }
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => {
                setup.pty = Some(Pty {
                    term,
                    size: tty_size(col_width, row_height),
                })
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => {
                if let Some(pty) = &mut setup.pty {
                    pty.size = tty_size(col_width, row_height);
                }
            }
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => {
                if login.quota.accepts_env(&variable_name) {
                    match setup.env_budget.admit(&variable_name, &variable_value) {
                        EnvVerdict::Accept => setup.env.push((variable_name, variable_value)),
                        EnvVerdict::Refuse { .. } => {} // the handler logged it
                    }
                } else {
                    debug!(name = %variable_name, "env request refused by accept_env");
                }
            }
            // The handler answers it from the same key option.
            Some(ChannelMsg::AgentForward { .. }) => {
                setup.agent = login.key.options().agent_forwarding;
            }
            Some(ChannelMsg::RequestShell { .. }) => break Program::Shell,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Program::Command(String::from_utf8_lossy(&command).into_owned());
            }
            // The handler accepted only the names `subsystem` serves; others were refused.
            Some(ChannelMsg::RequestSubsystem { name, .. }) if subsystem::is_supported(&name) => {
                // A subsystem speaks a binary protocol: never through a terminal.
                setup.pty = None;
                break Program::Subsystem(name);
            }
            Some(_) => {}
        }
    };
    Some((setup, program))
}

/// A client's terminal size: 0 (unknown) gets the usual 80×24, a size beyond `u16` the most.
pub(super) fn tty_size(cols: u32, rows: u32) -> TtySize {
    let clamp = |v: u32, default: u16| match u16::try_from(v) {
        Ok(0) => default,
        Ok(v) => v,
        Err(_) => u16::MAX,
    };
    TtySize {
        cols: clamp(cols, 80),
        rows: clamp(rows, 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_sizes_get_terminal_defaults() {
        assert_eq!(tty_size(0, 0), TtySize { cols: 80, rows: 24 });
        assert_eq!(
            tty_size(132, 50),
            TtySize {
                cols: 132,
                rows: 50
            }
        );
        assert_eq!(tty_size(u32::MAX, 1).cols, u16::MAX);
    }
}
