//! Agent forwarding (`ssh -A`): a unix socket inside the user's container whose connections
//! are relayed to the client's agent through `auth-agent@openssh.com` channels.
//!
//! One socket per SSH connection, made by the first session channel that asked for it (never
//! by the handler, which must not wait on Docker): a fresh `/tmp/labgate-agent-RANDOM/`
//! (0700) holding `agent.sock` (0600), both made as the user (their uid, gid and groups) from
//! inside the container's mount namespace ([`super::netns`]), or, where the gateway cannot enter it, by
//! a `labgate-relay listen` exec running as the user ([`super::relay::listen`]), which hands
//! each connection over through a relay exec of its own. Every channel of the connection that
//! asked for forwarding gets it as `SSH_AUTH_SOCK`. The listener, the socket and its directory go
//! away when the connection closes ([`AgentForward::close`], from the handler's `Drop`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::server::Handle;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, warn};

use super::{netns, pump, relay, way_in};
use crate::runtime::{ContainerHandle, Identity};
use crate::session::{Context, Login};

/// The socket's file name inside its directory.
const SOCKET_NAME: &str = "agent.sock";

/// The agent socket of one connection, made on first use.
#[derive(Default)]
pub struct AgentForward {
    /// The socket path once made; `Some(None)` when making it failed (not retried).
    path: tokio::sync::Mutex<Option<Option<String>>>,
    /// The listener task, and whether the connection is closed.
    task: Mutex<(Option<JoinHandle<()>>, bool)>,
}

/// Removes the socket directory when the listener task ends or is aborted.
struct Cleanup {
    pid: i32,
    dir: PathBuf,
    /// Who made it (and so removes it).
    who: Option<Identity>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        netns::remove_dir_detached(self.pid, std::mem::take(&mut self.dir), self.who.take());
    }
}

impl AgentForward {
    /// The path of this connection's agent socket inside `container`, making it on first
    /// call; `None` when it cannot be made (no way into the container's namespaces, no
    /// `/tmp`...), which is logged and leaves the session without `SSH_AUTH_SOCK`.
    pub async fn socket(
        &self,
        ctx: &Context,
        login: &Login,
        container: &ContainerHandle,
        handle: Handle,
    ) -> Option<String> {
        let mut path = self.path.lock().await;
        if let Some(made) = path.as_ref() {
            return made.clone();
        }
        let made = self.make(ctx, login, container, handle).await;
        *path = Some(made.clone());
        made
    }

    async fn make(
        &self,
        ctx: &Context,
        login: &Login,
        container: &ContainerHandle,
        handle: Handle,
    ) -> Option<String> {
        let dir = PathBuf::from(format!("/tmp/labgate-agent-{:016x}", rand::random::<u64>()));
        let path = dir.join(SOCKET_NAME).to_string_lossy().into_owned();
        let task = match way_in(ctx, container).await {
            Some(pid) => Self::listen_in_namespace(login, pid, dir, handle).await?,
            None => Self::listen_through_relay(ctx, login, container, dir, handle).await?,
        };
        info!(target: "audit", user = %login.user, socket = %path, "agent forwarding");
        let mut slot = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if slot.1 {
            // The connection closed meanwhile.
            task.abort();
            return None;
        }
        slot.0 = Some(task);
        Some(path)
    }

    /// The namespace path: the gateway binds the socket inside the container's mount
    /// namespace and accepts on it itself.
    async fn listen_in_namespace(
        login: &Login,
        pid: i32,
        dir: PathBuf,
        handle: Handle,
    ) -> Option<JoinHandle<()>> {
        let who = login.identity();
        let listener = match netns::bind_unix(pid, dir.clone(), SOCKET_NAME, who.as_ref()).await {
            Ok(l) => l,
            Err(e) => {
                warn!(user = %login.user, dir = %dir.display(), error = %e, "agent socket not made: not forwarded");
                return None;
            }
        };
        let cleanup = Cleanup { pid, dir, who };
        let gone = login.gone.clone();
        let task = tokio::spawn(
            async move {
                let _cleanup = cleanup;
                loop {
                    let stream = match listener.accept().await {
                        Ok((s, _)) => s,
                        Err(e) => {
                            warn!("agent socket accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let (handle, gone) = (handle.clone(), gone.clone());
                    tokio::spawn(
                        async move {
                            match handle.channel_open_agent().await {
                                Ok(channel) => {
                                    pump::pump(channel, stream, &gone).await;
                                }
                                Err(e) => debug!("client refused an agent channel: {e}"),
                            }
                        }
                        .in_current_span(),
                    );
                }
            }
            .in_current_span(),
        );
        Some(task)
    }

    /// The exec path (the gateway cannot enter namespaces, or `forward_via = "exec"`): a
    /// `labgate-relay listen` exec, as the user, binds the socket and hands each connection
    /// over through a relay exec of its own. Dropping the listener ends the relay, which
    /// removes the directory.
    async fn listen_through_relay(
        ctx: &Context,
        login: &Login,
        container: &ContainerHandle,
        dir: PathBuf,
        handle: Handle,
    ) -> Option<JoinHandle<()>> {
        let runtime = ctx.runtime.clone();
        let dir = dir.to_string_lossy().into_owned();
        let mut listener = match relay::listen(
            runtime.as_ref(),
            login,
            container,
            &dir,
            SOCKET_NAME,
        )
        .await
        {
            Ok(l) => l,
            Err(e) => {
                warn!(user = %login.user, dir = %dir, error = %e, "agent socket not made through the relay: not forwarded");
                return None;
            }
        };
        let (login, container) = (Arc::new(login.clone()), Arc::new(container.clone()));
        let task = tokio::spawn(
            async move {
                while let Some(n) = listener.next_connection().await {
                    let (runtime, login, container) =
                        (runtime.clone(), login.clone(), container.clone());
                    let (handle, handoff) = (handle.clone(), format!("{dir}/.{n}"));
                    tokio::spawn(
                        hand_over(runtime, login, container, handle, handoff).in_current_span(),
                    );
                }
                debug!("agent relay ended");
            }
            .in_current_span(),
        );
        Some(task)
    }

    /// Stops the listener; its socket directory is removed from the container. Called when
    /// the connection ends; no socket is made after this.
    pub fn close(&self) {
        let mut slot = self.task.lock().unwrap_or_else(|p| p.into_inner());
        slot.1 = true;
        if let Some(task) = slot.0.take() {
            task.abort();
        }
    }
}

/// Takes over one agent connection on the relay path: connects to its hand-off socket with a
/// relay exec and joins that to a fresh auth-agent channel to the client.
async fn hand_over(
    runtime: Arc<dyn crate::runtime::ContainerRuntime>,
    login: Arc<Login>,
    container: Arc<ContainerHandle>,
    handle: Handle,
    handoff: String,
) {
    let args = vec!["unix".to_owned(), handoff];
    let deadline = tokio::time::Instant::now() + super::CONNECT_TIMEOUT;
    let stream =
        match relay::connect_via(runtime.as_ref(), &login, &container, args, deadline).await {
            Ok(s) => s,
            Err(e) => {
                debug!("agent hand-off failed: {e}");
                return;
            }
        };
    match handle.channel_open_agent().await {
        Ok(channel) => {
            pump::pump(channel, stream, &login.gone).await;
        }
        Err(e) => debug!("client refused an agent channel: {e}"),
    }
}
