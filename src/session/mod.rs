//! Per-connection state after login, and the bridge of each session channel to a process in
//! the user's container.
//!
//! A [`Login`] is the snapshot taken when a user authenticates: who, with which key, from
//! where, under which quota. Every session channel is served by one task
//! ([`channel::run`]) that owns the russh `Channel` (its only reader, so the connection never
//! stalls on an unread queue), collects pty/env requests, starts the shell or command through
//! the [`ContainerRuntime`], and carries bytes, resizes, signals, EOF and the exit status.

pub mod channel;
pub mod progress;
pub mod subsystem;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::auth::{AuthorizedKey, Username};
use crate::config::{Config, Quota};
use crate::runtime::{ContainerHandle, ContainerRuntime, ContainerSpec, RuntimeError};

/// What every connection shares: the current config and the container backend.
pub struct Context {
    /// The config in force; a login snapshots it.
    pub config: watch::Receiver<Arc<Config>>,
    /// The container backend.
    pub runtime: Arc<dyn ContainerRuntime>,
    /// The host's GPUs and who holds them; every container start goes through it.
    pub gpus: Arc<crate::gpu::pool::GpuPool>,
    /// Whether this gateway may enter containers' namespaces (probed once, by the first
    /// forward); when not, forwards go through the relay exec.
    pub namespaces: tokio::sync::OnceCell<bool>,
}

/// An authenticated user on one connection.
#[derive(Debug, Clone)]
pub struct Login {
    /// The user.
    pub user: Username,
    /// The key they proved, with its options.
    pub key: AuthorizedKey,
    /// Quota snapshot taken at login (the profile's, for `user+profile` logins).
    pub quota: Arc<Quota>,
    /// Set when the login asked for a profile it may not use: authentication succeeded (it
    /// cannot carry a message), and every session and forward is refused with this.
    pub denied: Option<crate::config::ProfileRefusal>,
    /// Client address.
    pub peer: SocketAddr,
    /// Gateway address the client connected to.
    pub local: SocketAddr,
    /// Connection id, for logs.
    pub conn: u64,
}

/// Makes sure `login`'s container runs (creating or starting it) and returns it. Every way
/// into a container goes through here: shells, commands and forwards alike.
pub async fn ensure_container(
    ctx: &Context,
    login: &Login,
) -> Result<ContainerHandle, RuntimeError> {
    Ok(start_container(ctx, login).await?.container)
}

/// [`ensure_container`], also saying which GPUs the container has and what the user should be
/// told about them (recreated with other GPUs...). The GPU pool decides the GPUs and refuses
/// a quota it cannot serve; it never starts a container without the GPUs the quota asks for.
pub async fn start_container(
    ctx: &Context,
    login: &Login,
) -> Result<crate::gpu::pool::Started, RuntimeError> {
    if let Some(refusal) = &login.denied {
        return Err(refusal.clone().into());
    }
    let spec = ContainerSpec::new(&login.user, &login.quota);
    ctx.gpus
        .ensure_running(ctx.runtime.as_ref(), spec, &login.quota.gpus)
        .await
}

/// The quota a login gets: the user's own, or for `user+profile` the profile's, or (with the
/// refusal) the user's own when the profile is not theirs to use.
pub fn login_quota(
    ctx: &Context,
    user: &Username,
    profile: Option<&crate::auth::ProfileName>,
) -> (Arc<Quota>, Option<crate::config::ProfileRefusal>) {
    let config = ctx.config.borrow();
    match profile.map(|p| config.profile_quota(user, p)) {
        None => (Arc::new(config.quota_for(user).clone()), None),
        Some(Ok(q)) => (Arc::new(q.clone()), None),
        Some(Err(refusal)) => (Arc::new(config.quota_for(user).clone()), Some(refusal)),
    }
}
