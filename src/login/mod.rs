//! Who is logged in, and what every connection shares.
//!
//! A [`Login`] is the snapshot taken when a user authenticates: who, with which key, from
//! where, under which quota and identity. [`Context`] is what all connections share: the
//! config in force, the container backend, the live connections ([`registry`]), idle
//! timers, the forwards being opened ([`pending`]) and what running sessions are told
//! ([`notice`]). [`ensure_container`] is the one way a login gets its container. The session
//! channels ([`crate::session`]) and the forwards ([`crate::forward`]) both build on this
//! module; it imports neither.

pub mod activity;
pub mod gpuline;
pub mod identity;
pub mod notice;
pub mod pending;
pub mod reclaim;
pub mod registry;
#[cfg(test)]
pub(crate) mod testing;
pub mod usage;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::auth::{AuthorizedKey, Username};
use crate::config::{Config, Quota};
use crate::runtime::{ContainerHandle, ContainerRuntime, ContainerSpec, RuntimeError};

/// When each running, unused container became idle.
#[derive(Debug, Default)]
pub struct IdleTimers(Mutex<HashMap<String, SystemTime>>);

impl IdleTimers {
    /// The timers, by container name.
    pub(crate) fn timers(&self) -> MutexGuard<'_, HashMap<String, SystemTime>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Since when container `name` has been idle, if it is.
    pub fn idle_since(&self, name: &str) -> Option<SystemTime> {
        self.timers().get(name).copied()
    }
}

/// What every connection shares: the current config and the container backend.
pub struct Context {
    /// The config in force; a login snapshots it.
    pub config: watch::Receiver<Arc<Config>>,
    /// The container backend (which also decides containers' GPUs).
    pub runtime: Arc<dyn ContainerRuntime>,
    /// The live connections.
    pub connections: Arc<registry::Connections>,
    /// When each running container became idle (for idle stop and `labgate status`).
    pub idle: IdleTimers,
    /// Forwards being opened, per user (bounded: see [`pending`]).
    pub pending: Arc<pending::PendingOpens>,
    /// Logins waiting for GPUs, and the recent usage that orders them.
    pub gpu_line: gpuline::GpuLine,
    /// What each GPU is doing (utilisation, idle since), as last sampled.
    pub activity: activity::GpuActivity,
    /// GPU usage and waits, kept in `[server] state_dir`.
    pub accounting: Arc<crate::accounting::Accounting>,
    /// What running sessions are told as it happens (a GPU reclaim's warning and stop).
    pub notices: notice::Notices,
    /// Resolves logins' identities (`uid = "host"`, `"auto"`).
    pub identities: Arc<identity::Identities>,
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
    /// What the connection has open (sessions, forwards).
    pub stats: Arc<registry::ConnStats>,
    /// Cancelled once the connection has ended (see [`crate::ssh`]'s handler): what waits on
    /// the client or a target selects on it.
    pub gone: tokio_util::sync::CancellationToken,
    /// Forwards this connection is opening (bounded: see [`pending`]).
    pub opening: Arc<std::sync::atomic::AtomicUsize>,
    /// Who this login's processes run as, resolved at login from the quota's `uid`, or why
    /// it could not be (then every session and forward fails with that).
    pub identity: Result<Option<crate::runtime::Identity>, crate::auth::identity::IdentityError>,
}

impl Login {
    /// The name of the container this login works in.
    pub fn container_name(&self) -> String {
        crate::runtime::container_name(&self.user, self.quota.profile.as_ref())
    }

    /// Who this login's processes run as in the container (`None`: the image's user, root);
    /// what the gateway acts as on paths the user controls.
    pub fn identity(&self) -> Option<crate::runtime::Identity> {
        self.identity.clone().ok().flatten()
    }

    /// The user's home inside the container.
    pub fn home(&self) -> String {
        format!("/home/{}", self.user)
    }

    /// Who the way into the container acts for: this login's identity, home and end.
    pub fn reacher(&self) -> crate::runtime::reach::Reacher {
        crate::runtime::reach::Reacher {
            identity: self.identity(),
            home: self.home(),
            gone: self.gone.clone(),
        }
    }

    /// The way into `container` for this login.
    pub async fn reach(
        &self,
        ctx: &Context,
        container: &ContainerHandle,
    ) -> Arc<dyn crate::runtime::reach::Reach> {
        ctx.runtime.clone().reach(container, self.reacher()).await
    }

    /// The spec of this login's container.
    pub fn spec(&self) -> ContainerSpec {
        ContainerSpec::new(&self.user, &self.quota, self.identity().as_ref())
    }
}

/// Makes sure `login`'s container runs (creating or starting it, with the GPUs its quota
/// asks for) and returns it. Every way into a container goes through here: shells, commands
/// and forwards alike. The backend decides the GPUs and refuses a quota it cannot serve; it
/// never starts a container without the GPUs the quota asks for.
pub async fn ensure_container(
    ctx: &Context,
    login: &Login,
) -> Result<ContainerHandle, RuntimeError> {
    start_container(ctx, login, &login.gone).await
}

/// [`ensure_container`] for a session channel, which stops waiting (for GPUs in line) when
/// `cancel` is cancelled: the channel closed, or its user pressed Ctrl-C while waiting.
pub async fn start_container(
    ctx: &Context,
    login: &Login,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<ContainerHandle, RuntimeError> {
    if let Some(refusal) = &login.denied {
        return Err(refusal.clone().into());
    }
    if let Err(e) = &login.identity {
        return Err(e.clone().into());
    }
    let spec = login.spec();
    if spec.gpu_request.count() == 0 {
        return run_container(ctx, &spec, cancel, &login.gone).await;
    }
    // The wait in line ends early; a start under way runs to its end unless the backend
    // undoes a start given up (see `run_container`), so no container is left half made.
    ctx.gpu_line.start(ctx, login, spec, cancel).await
}

/// `ctx.runtime.ensure_running(spec)`. When the backend undoes a start that is given up
/// ([`crate::runtime::ContainerRuntime::withdraws_dropped_starts`]: a cluster, where a start
/// can wait long for a place), it is given up as soon as `cancel` or `gone` is cancelled;
/// otherwise it runs to its end.
pub(crate) async fn run_container(
    ctx: &Context,
    spec: &crate::runtime::ContainerSpec,
    cancel: &tokio_util::sync::CancellationToken,
    gone: &tokio_util::sync::CancellationToken,
) -> Result<ContainerHandle, RuntimeError> {
    if !ctx.runtime.withdraws_dropped_starts() {
        return ctx.runtime.ensure_running(spec).await;
    }
    tokio::select! {
        started = ctx.runtime.ensure_running(spec) => started,
        () = cancel.cancelled() => Err(RuntimeError::Start("the login ended before the container started".into())),
        () = gone.cancelled() => Err(RuntimeError::Start("the login ended before the container started".into())),
    }
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
