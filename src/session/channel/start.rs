//! The start phase: the forced command, the program's argv and environment (sshd's, with
//! `SSH_ORIGINAL_COMMAND` and the agent socket), the container's start, the exec, and the
//! greeting in front of its output.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use russh::server::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info};

use super::super::subsystem;
use super::setup::{Program, Setup};
use crate::forward::agent::AgentForward;
use crate::login::{Context, Login};
use crate::runtime::{ExecRequest, RuntimeError};

/// Applies a key's forced command (`command="..."`, a certificate's `force-command`): whatever
/// the client asked for, the forced command runs through the user's shell, as sshd runs it.
/// Also returns what the client asked for, for `SSH_ORIGINAL_COMMAND`: its command, or for a
/// subsystem the command sshd would name (see [`subsystem::original_command`]); nothing for a
/// shell. A client's own `env` request for that name is never applied.
pub(super) fn force_command(program: Program, forced: Option<&str>) -> (Program, Option<String>) {
    let Some(forced) = forced else {
        return (program, None);
    };
    let original = match program {
        Program::Shell => None,
        Program::Command(cmd) => Some(cmd),
        Program::Subsystem(name) => subsystem::original_command(&name),
    };
    (Program::Command(forced.to_owned()), original)
}

/// The audit lines of a program about to start: the forced command, if any, then what runs.
pub(super) fn audit(login: &Login, setup: &Setup, program: &Program, original: Option<&str>) {
    if let Some(forced) = &login.key.options().command {
        info!(target: "audit", user = %login.user, forced = %forced, original = original.unwrap_or(""), "forced command");
    }
    match program {
        Program::Shell => {
            info!(target: "audit", user = %login.user, pty = setup.pty.is_some(), "shell")
        }
        Program::Command(c) => {
            info!(target: "audit", user = %login.user, pty = setup.pty.is_some(), command = %c, "exec")
        }
        Program::Subsystem(name) => {
            info!(target: "audit", user = %login.user, subsystem = %name, "subsystem")
        }
    }
}

/// `fut`'s output, or `None` when `cancel` fires first (then `fut` is dropped). A token
/// already cancelled wins over a future already ready.
async fn unless_cancelled<F: std::future::Future>(
    cancel: &CancellationToken,
    fut: F,
) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        out = fut => Some(out),
    }
}

/// Ensures the container runs and starts the program in it; `None` when `cancel` fired
/// (the channel closed, the connection ended) before the program was started. The
/// container's start runs in a task of its own, never dropped half-way (the user's other
/// sessions may wait for it too): this session only stops waiting for it. Once the process
/// is being started, it is not cancelled: the caller hangs it up.
pub(super) async fn start(
    ctx: &Arc<Context>,
    login: &Arc<Login>,
    setup: &Setup,
    program: &Program,
    original_command: Option<String>,
    agent: Option<(&AgentForward, Handle)>,
    cancel: &CancellationToken,
) -> Result<Option<crate::runtime::Exec>, RuntimeError> {
    let spec = login.spec();
    let starting = tokio::spawn({
        let (ctx, login, cancel) = (ctx.clone(), login.clone(), cancel.clone());
        async move { crate::login::start_container(&ctx, &login, &cancel).await }.in_current_span()
    });
    let container = match unless_cancelled(cancel, starting).await {
        None => return Ok(None),
        Some(Ok(started)) => started?,
        Some(Err(e)) => return Err(RuntimeError::Engine(format!("container start failed: {e}"))),
    };
    let container = &container;
    let argv = argv(program, &container.shell)?;
    let agent_socket = match agent {
        Some((agent, handle)) => agent.socket(ctx, login, container, handle).await,
        None => None,
    };
    let user = login.user.to_string();
    let env = environment(
        &Account {
            user: &user,
            home: &spec.home_target,
            shell: &container.shell,
            peer: login.peer,
            local: login.local,
        },
        setup,
        agent_socket,
        original_command,
    );
    if cancel.is_cancelled() {
        return Ok(None);
    }
    let req = ExecRequest {
        argv,
        env,
        tty: setup.pty.as_ref().map(|p| p.size),
        user: spec.uid_gid,
        workdir: spec.home_target.clone(),
    };
    // Byte streams without a terminal (sftp; scp, rsync, git and any piped command) go over a
    // socket, not the engine's exec stream, where that can be had.
    let mut exec = if setup.pty.is_none() || matches!(program, Program::Subsystem(_)) {
        login.reach(ctx, container).await.start_stdio(req).await?
    } else {
        ctx.runtime.exec(container, req).await?
    };
    let shell = *program == Program::Shell;
    let tty = setup.pty.is_some();
    // The GPU banner of a login shell shows their live use.
    let gpus = if shell && tty && !container.gpus.is_empty() {
        ctx.runtime.gpus().await.unwrap_or_else(|e| {
            debug!("no GPU banner: {e}");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let server = ctx.config.borrow().server.clone();
    let greeting = super::super::text::Greeting {
        server: &server,
        quota: &login.quota,
        container,
        shell,
        tty,
        gpus: &gpus,
        gpu_week: Some(ctx.accounting.week_seconds(&login.user)),
    }
    .render();
    if !greeting.is_empty() {
        exec.output = futures::stream::iter(greeting.into_iter().map(Ok))
            .chain(exec.output)
            .boxed();
    }
    Ok(Some(exec))
}

/// The argv that runs `program` with the container's login shell `shell`.
fn argv(program: &Program, shell: &str) -> Result<Vec<String>, RuntimeError> {
    Ok(match program {
        Program::Shell => vec![shell.to_owned(), "-l".into()],
        Program::Command(cmd) => vec![shell.to_owned(), "-c".into(), cmd.clone()],
        Program::Subsystem(name) => subsystem::argv(name)
            .ok_or_else(|| RuntimeError::Exec(format!("subsystem {name} is not served")))?,
    })
}

/// Who is logged in and from where: the part of the environment sshd sets whatever the
/// client asked for.
struct Account<'a> {
    /// `USER` and `LOGNAME`.
    user: &'a str,
    /// `HOME`, the home inside the container.
    home: &'a str,
    /// `SHELL`, the container's login shell.
    shell: &'a str,
    /// The client's address, for `SSH_CONNECTION` and `SSH_CLIENT`.
    peer: SocketAddr,
    /// The gateway's address the client connected to.
    local: SocketAddr,
}

/// The program's environment, in this order: the account's variables, `TERM` (the pty's),
/// `SSH_AUTH_SOCK` (the agent socket, if one was made), the client's accepted `env` requests
/// (without a `TERM` when there is a pty, never `SSH_ORIGINAL_COMMAND`), and
/// `SSH_ORIGINAL_COMMAND` under a forced command.
fn environment(
    account: &Account<'_>,
    setup: &Setup,
    agent_socket: Option<String>,
    original_command: Option<String>,
) -> Vec<(String, String)> {
    let Account {
        user,
        home,
        shell,
        peer,
        local,
    } = account;
    let mut env = vec![
        ("HOME".to_owned(), (*home).to_owned()),
        ("USER".to_owned(), (*user).to_owned()),
        ("LOGNAME".to_owned(), (*user).to_owned()),
        ("SHELL".to_owned(), (*shell).to_owned()),
        (
            "SSH_CONNECTION".to_owned(),
            format!(
                "{} {} {} {}",
                peer.ip(),
                peer.port(),
                local.ip(),
                local.port()
            ),
        ),
        (
            "SSH_CLIENT".to_owned(),
            format!("{} {} {}", peer.ip(), peer.port(), local.port()),
        ),
    ];
    if let Some(pty) = &setup.pty {
        env.push(("TERM".to_owned(), pty.term.clone()));
    }
    if let Some(path) = agent_socket {
        env.push(("SSH_AUTH_SOCK".to_owned(), path));
    }
    env.extend(
        setup
            .env
            .iter()
            .filter(|(k, _)| !(setup.pty.is_some() && k == "TERM"))
            .filter(|(k, _)| k != "SSH_ORIGINAL_COMMAND")
            .cloned(),
    );
    if let Some(original) = original_command {
        env.push(("SSH_ORIGINAL_COMMAND".to_owned(), original));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::super::setup::Pty;
    use super::*;
    use crate::runtime::TtySize;

    #[test]
    fn a_forced_command_replaces_whatever_the_client_asked_for() {
        let forced = Some("echo forced");
        let run = |p| force_command(p, forced);
        let cmd = Program::Command("echo forced".into());
        assert_eq!(run(Program::Shell), (cmd.clone(), None));
        assert_eq!(
            run(Program::Command("ls -l".into())),
            (cmd.clone(), Some("ls -l".into()))
        );
        let (program, original) = run(Program::Subsystem("sftp".into()));
        assert_eq!(program, cmd);
        assert!(original.is_some_and(|o| o.ends_with("sftp-server")));
        assert_eq!(force_command(Program::Shell, None), (Program::Shell, None));
    }

    #[test]
    fn a_shell_logs_in_a_command_goes_through_the_shell_and_sftp_runs_its_launcher() {
        assert_eq!(
            argv(&Program::Shell, "/bin/bash").unwrap(),
            ["/bin/bash", "-l"]
        );
        assert_eq!(
            argv(&Program::Command("ls -l; exit 3".into()), "/bin/sh").unwrap(),
            ["/bin/sh", "-c", "ls -l; exit 3"]
        );
        assert_eq!(
            argv(&Program::Subsystem("sftp".into()), "/bin/bash").unwrap(),
            subsystem::argv("sftp").unwrap()
        );
        assert!(matches!(
            argv(&Program::Subsystem("netconf".into()), "/bin/sh"),
            Err(RuntimeError::Exec(m)) if m == "subsystem netconf is not served"
        ));
    }

    fn account() -> Account<'static> {
        Account {
            user: "alice",
            home: "/home/alice",
            shell: "/bin/bash",
            peer: "192.0.2.7:50022".parse().unwrap(),
            local: "[2001:db8::1]:2222".parse().unwrap(),
        }
    }

    fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
        env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn the_environment_says_who_and_from_where_as_sshd_does() {
        let env = environment(&account(), &Setup::default(), None, None);
        assert_eq!(
            pairs(&env),
            [
                ("HOME", "/home/alice"),
                ("USER", "alice"),
                ("LOGNAME", "alice"),
                ("SHELL", "/bin/bash"),
                ("SSH_CONNECTION", "192.0.2.7 50022 2001:db8::1 2222"),
                ("SSH_CLIENT", "192.0.2.7 50022 2222"),
            ]
        );
    }

    #[test]
    fn the_ptys_term_wins_and_a_client_never_sets_the_original_command() {
        let pty = Pty {
            term: "xterm-256color".into(),
            size: TtySize { cols: 80, rows: 24 },
        };
        let asked: Vec<(String, String)> = [
            ("LANG", "C.UTF-8"),
            ("TERM", "dumb"),
            ("SSH_ORIGINAL_COMMAND", "rm -rf ~"),
            ("LC_ALL", "C"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
        let setup = Setup::with(Some(pty), asked.clone());
        let env = environment(
            &account(),
            &setup,
            Some("/tmp/labgate-agent-x/agent.sock".into()),
            Some("ls -l".into()),
        );
        assert_eq!(
            pairs(&env)[6..],
            [
                ("TERM", "xterm-256color"),
                ("SSH_AUTH_SOCK", "/tmp/labgate-agent-x/agent.sock"),
                ("LANG", "C.UTF-8"),
                ("LC_ALL", "C"),
                ("SSH_ORIGINAL_COMMAND", "ls -l"),
            ]
        );
        // Without a terminal, the client's TERM is passed on; still no original command.
        let env = environment(&account(), &Setup::with(None, asked), None, None);
        assert_eq!(
            pairs(&env)[6..],
            [("LANG", "C.UTF-8"), ("TERM", "dumb"), ("LC_ALL", "C")]
        );
    }

    #[tokio::test]
    async fn a_start_stops_waiting_once_cancelled_and_a_cancelled_one_never_proceeds() {
        let cancel = CancellationToken::new();
        assert_eq!(unless_cancelled(&cancel, async { 7 }).await, Some(7));
        // Waiting for a container that does not come: the channel closes.
        let waiting = tokio::spawn({
            let cancel = cancel.clone();
            async move { unless_cancelled(&cancel, std::future::pending::<()>()).await }
        });
        tokio::task::yield_now().await;
        cancel.cancel();
        assert_eq!(waiting.await.unwrap(), None);
        // Already cancelled: even a ready start is not taken (no exec is made after it).
        let mut proceeded = false;
        let out = unless_cancelled(&cancel, async { proceeded = true }).await;
        assert_eq!(out, None);
        assert!(!proceeded);
        // The connection's `gone` cancels every channel's start.
        let gone = CancellationToken::new();
        let channel = gone.child_token();
        gone.cancel();
        assert_eq!(unless_cancelled(&channel, async { 1 }).await, None);
    }
}
