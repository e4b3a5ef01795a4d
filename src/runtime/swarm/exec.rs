//! A process in a container on a remote node: created through the node's own API (the
//! manager cannot exec), its stream carried by the node's agent over the gateway's one
//! connection to it where the node runs one, else over a connection of labgate's own to the
//! node's engine (TLS, keepalives), and its controls. The gateway sees no PID of a remote
//! container, so every process it starts carries a mark (`LABGATE_EXEC=...` in its
//! environment) and signals and hangups are delivered from inside the container by the relay
//! helper (`labgate-relay signal|hangup`), run as the same user: never more than the user
//! could do themselves.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bollard::exec::CreateExecOptions;
use tokio::io::AsyncWrite;

use super::clients::NodeClient;
use super::mux::Link;
use super::tunnel::AgentFailure;
use crate::runtime::docker::exec::{
    DetachedError, assemble_boxed, attach, run_detached, start_attached,
};
use crate::runtime::docker::shell::sized_terminal;
use crate::runtime::{
    Exec, ExecControl, ExecRequest, ExitStatus, RELAY_PATH, RuntimeError, TtySize,
};

/// How long a hung-up process's group gets between SIGHUP and SIGKILL.
pub const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// How long the exit status of a process whose output ended may take: longer means its
/// node is gone.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the exit status of a process whose stream was cut may take: longer means it
/// still runs.
const CUT_WAIT: Duration = Duration::from_secs(1);

/// Whether `node`'s API answers a ping within a few seconds.
pub async fn node_answers(node: &NodeClient) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(3), node.docker.ping()).await,
        Ok(Ok(_))
    )
}

/// The environment variable that marks the processes labgate starts.
pub const MARK_VAR: &str = "LABGATE_EXEC";

/// Starts `req` in `container` on `node`.
pub async fn start(
    node: Arc<NodeClient>,
    container: &str,
    req: ExecRequest,
) -> Result<Exec, RuntimeError> {
    let t0 = std::time::Instant::now();
    let mark = format!("{:016x}", rand::random::<u64>());
    let mut env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("{MARK_VAR}={mark}"));
    let opts = CreateExecOptions::<String> {
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(req.tty.is_some()),
        env: Some(env),
        cmd: Some(match req.tty {
            Some(size) => sized_terminal(size, &req.argv),
            None => req.argv.clone(),
        }),
        user: req.user.map(|(u, g)| format!("{u}:{g}")),
        working_dir: Some(req.workdir.clone()),
        ..Default::default()
    };
    let created = node
        .docker
        .create_exec(container, opts)
        .await
        .map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError { message, .. } => {
                RuntimeError::Exec(message)
            }
            other => RuntimeError::Unavailable(format!("node {}: {other}", node.hostname)),
        })?;
    let created_ms = t0.elapsed().as_millis() as u64;
    let tty = req.tty.is_some();
    let carried = match &node.agent {
        Some(agent) => match agent.exec_stream(container, &created.id, tty).await {
            Ok(stream) => Some(stream),
            Err(AgentFailure::Unreachable(e)) => {
                tracing::debug!(node = %node.hostname, error = %e, "exec stream through the node's engine");
                None
            }
            Err(AgentFailure::Answered(e)) => {
                return Err(RuntimeError::Exec(format!(
                    "node {}'s agent: {e}",
                    node.hostname
                )));
            }
        },
        None => None,
    };
    let link = carried.as_ref().and_then(|s| s.get_ref().link());
    let (output, stdin): (_, Pin<Box<dyn AsyncWrite + Send>>) = match carried {
        Some(stream) => {
            let (output, stdin) = attach(stream, tty);
            (output, Box::pin(stdin))
        }
        None => {
            let (output, stdin) =
                start_attached(node.api.dial(), &node.version, &created.id, tty).await?;
            (output, Box::pin(stdin))
        }
    };
    let control = RemoteExecControl {
        node,
        container: container.to_owned(),
        exec_id: created.id,
        mark,
        user: req.user,
        delivered: Arc::new(AtomicI32::new(0)),
        link,
    };
    if let Some(size) = req.tty
        && let Err(e) = control.resize(size).await
    {
        tracing::debug!("initial resize: {e}");
    }
    tracing::debug!(node = %control.node.hostname, created_ms, ms = t0.elapsed().as_millis() as u64, "exec started");
    Ok(assemble_boxed(output, stdin, Box::new(control)))
}

/// Controls of a process on a remote node.
struct RemoteExecControl {
    node: Arc<NodeClient>,
    container: String,
    exec_id: String,
    /// Its mark (see the module doc).
    mark: String,
    /// Who it runs as: signals are sent as the same user.
    user: Option<(u32, u32)>,
    /// The last signal labgate delivered (0: none).
    delivered: Arc<AtomicI32>,
    /// Where the node's agent carries its stream: whether that connection failed.
    link: Option<Link>,
}

impl RemoteExecControl {
    /// Runs the relay helper with `args` in the container as the process's user.
    async fn relay(&self, args: &[String]) -> Result<(), RuntimeError> {
        let mut cmd = vec![RELAY_PATH.to_owned()];
        cmd.extend(args.iter().cloned());
        let opts = CreateExecOptions::<String> {
            cmd: Some(cmd),
            user: self.user.map(|(u, g)| format!("{u}:{g}")),
            ..Default::default()
        };
        match run_detached(&self.node.docker, &self.container, opts, HANGUP_GRACE).await {
            Ok(ExitStatus::Code(0)) => Ok(()),
            Ok(status) => Err(RuntimeError::Exec(format!(
                "the relay could not signal the process ({status:?})"
            ))),
            Err(DetachedError::Engine(e)) => Err(RuntimeError::Exec(format!(
                "on node {}: {e}",
                self.node.hostname
            ))),
            Err(DetachedError::Wait(e)) => Err(e),
        }
    }
}

#[async_trait]
impl ExecControl for RemoteExecControl {
    async fn resize(&self, size: TtySize) -> Result<(), RuntimeError> {
        let opts = bollard::query_parameters::ResizeExecOptions {
            h: i32::from(size.rows),
            w: i32::from(size.cols),
        };
        self.node
            .docker
            .resize_exec(&self.exec_id, opts)
            .await
            .map_err(|e| RuntimeError::Engine(e.to_string()))
    }

    async fn signal(&self, signal: i32) -> Result<(), RuntimeError> {
        self.delivered.store(signal, Ordering::SeqCst);
        self.relay(&["signal".into(), self.mark.clone(), signal.to_string()])
            .await
    }

    async fn wait(&self) -> Result<ExitStatus, RuntimeError> {
        let _took = WaitTook(std::time::Instant::now());
        let lost = |reason: String| RuntimeError::NodeLost {
            node: self.node.hostname.clone(),
            reason,
        };
        // A stream cut under the process (its agent connection failed) says nothing of the
        // process: it may have ended just then, or still run.
        let within = if self.link.as_ref().is_some_and(Link::is_severed) {
            CUT_WAIT
        } else {
            WAIT_TIMEOUT
        };
        let waited = tokio::time::timeout(
            within,
            crate::runtime::docker::exec::wait_exec(
                &self.node.docker,
                &self.exec_id,
                &self.delivered,
            ),
        )
        .await;
        match waited {
            Ok(Err(RuntimeError::Engine(e) | RuntimeError::Unavailable(e)))
                if !node_answers(&self.node).await =>
            {
                Err(lost(e))
            }
            Ok(other) => other,
            Err(_) if node_answers(&self.node).await => {
                // The node is up and the process runs on without its stream: nobody can
                // reach it any more, so it goes, as when its client leaves.
                self.hangup().await;
                let reason = match &self.link {
                    Some(link) if link.is_severed() => {
                        "the connection to the server's labgate agent failed".to_owned()
                    }
                    _ => format!(
                        "its output ended but it did not exit within {}",
                        humantime::format_duration(within)
                    ),
                };
                Err(RuntimeError::StreamCut {
                    node: self.node.hostname.clone(),
                    reason,
                })
            }
            Err(_) => Err(lost(format!(
                "no exit status within {}",
                humantime::format_duration(within)
            ))),
        }
    }

    async fn hangup(&self) {
        self.delivered.store(1, Ordering::SeqCst);
        let grace = HANGUP_GRACE.as_millis().to_string();
        if let Err(e) = self
            .relay(&["hangup".into(), self.mark.clone(), grace])
            .await
        {
            tracing::debug!(node = %self.node.hostname, exec = %self.exec_id, "hangup: {e}");
        }
    }
}

/// Logs how long a wait for an exit status took, when dropped.
struct WaitTook(std::time::Instant);

impl Drop for WaitTook {
    fn drop(&mut self) {
        tracing::debug!(ms = self.0.elapsed().as_millis() as u64, "exit status read");
    }
}
