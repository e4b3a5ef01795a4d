//! Agent forwarding (`ssh -A`): a unix socket inside the user's container whose connections
//! are relayed to the client's agent through `auth-agent@openssh.com` channels.
//!
//! One socket per SSH connection, made by the first session channel that asked for it (never
//! by the handler, which must not wait on Docker): a fresh `/tmp/labgate-agent-RANDOM/`
//! (0700) holding `agent.sock` (0600), both made as the user by the backend's way in
//! ([`crate::runtime::reach::Reach::listen_unix`]). Every channel of the connection that
//! asked for forwarding gets it as `SSH_AUTH_SOCK`. The listener, the socket and its directory go
//! away when the connection closes ([`AgentForward::close`], from the handler's `Drop`).

use std::sync::Mutex;

use russh::server::Handle;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, warn};

use super::pump;
use crate::login::{Context, Login};
use crate::runtime::ContainerHandle;

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

impl AgentForward {
    /// The path of this connection's agent socket inside `container`, making it on first
    /// call; `None` when it cannot be made (no `/tmp` the user may write...), which is logged
    /// and leaves the session without `SSH_AUTH_SOCK`.
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
        let dir = format!("/tmp/labgate-agent-{:016x}", rand::random::<u64>());
        let path = format!("{dir}/{SOCKET_NAME}");
        let reach = login.reach(ctx, container).await;
        let mut listener = match reach.listen_unix(&dir, SOCKET_NAME).await {
            Ok(l) => l,
            Err(e) => {
                warn!(user = %login.user, %dir, error = %e, "agent socket not made: not forwarded");
                return None;
            }
        };
        let gone = login.gone.clone();
        let task = tokio::spawn(
            async move {
                while let Some((stream, _)) = listener.accept().await {
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
                debug!("agent listener ended");
            }
            .in_current_span(),
        );
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
