//! The container backend seam: what the SSH side needs from "a place to run a user's shell".
//!
//! [`ContainerRuntime`] is deliberately narrow (ensure a user's container runs, start a process
//! in it, list what we manage) so another backend (Kubernetes) could sit beside Docker without
//! the SSH side changing. [`ContainerSpec`] is the backend-neutral description built from a
//! user's quota; [`docker`] turns it into Engine API calls.

pub mod docker;
#[cfg(test)]
pub mod fake;
pub mod reach;
pub mod relay;
pub mod swarm;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::io::AsyncWrite;

use crate::auth::{ProfileName, Username};
use crate::config::{ByteSize, GpuRequest, GpuUuid, Mount, PullPolicy, Quota, RegistryAuth};
use crate::gpu::{GpuError, GpuInfo};

/// Where labgate's static relay helper is mounted (read-only) inside containers.
pub const RELAY_PATH: &str = "/.labgate/relay";
/// Where labgate's static fallback SFTP server is mounted (read-only) inside containers.
pub const SFTP_SERVER_PATH: &str = "/.labgate/sftp-server";

/// Everything a backend needs to create a user's container. Built from a quota snapshot taken
/// at login; later config changes do not alter a login in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    /// Owner of the container.
    pub user: Username,
    /// The profile (`user+profile` logins): its own container, the same home.
    pub profile: Option<ProfileName>,
    /// Container name: `labgate-USER`, or `labgate-USER.PROFILE` for a profile (see
    /// [`container_name`]).
    pub name: String,
    /// Image reference.
    pub image: String,
    /// When the image is pulled.
    pub pull_policy: PullPolicy,
    /// Credentials of the image's registry (the secret stays in its file until a pull).
    pub registry: Option<RegistryAuth>,
    /// Memory limit.
    pub memory: Option<ByteSize>,
    /// CPU limit in cores.
    pub cpus: Option<f64>,
    /// `/dev/shm` size.
    pub shm: Option<ByteSize>,
    /// Process limit.
    pub pids: Option<i64>,
    /// Host directory bound at [`ContainerSpec::home_target`].
    pub home_source: PathBuf,
    /// `/home/NAME` inside the container: `$HOME` and the working directory.
    pub home_target: String,
    /// Extra binds.
    pub mounts: Vec<Mount>,
    /// Configured shell, or `None` to pick bash if present, else sh.
    pub shell: Option<String>,
    /// Fixed environment of every process.
    pub env: BTreeMap<String, String>,
    /// `uid:gid` processes run as, if configured.
    pub uid_gid: Option<(u32, u32)>,
    /// Supplementary groups of that uid (a host account's, for `uid = "host"`).
    pub groups: Vec<u32>,
    /// The GPUs the quota asks for: the backend decides which (the local one from its NVML
    /// inventory, a cluster backend through its engine).
    pub gpu_request: GpuRequest,
    /// Placement constraints from the quota (`node.labels.gpu == a100`), for a cluster
    /// backend; this host's Docker Engine places nothing and ignores them.
    pub constraints: Vec<String>,
    /// GPUs to give the container, by UUID: set by the backend's own allocation, never from
    /// the quota directly (empty from [`ContainerSpec::new`]).
    pub gpus: Vec<GpuUuid>,
    /// Whether this start may take GPUs that are free now (a fresh allocation, or a stopped
    /// container's own GPUs back). `false` while other logins wait for GPUs ahead of this one
    /// (see [`crate::gpu::queue`]): then only a container that runs with its GPUs is used, and
    /// a start that would take GPUs is refused with [`GpuError::Waiting`].
    pub may_take_gpus: bool,
}

impl ContainerSpec {
    /// The spec for `user` under `quota`, whose processes run as `identity` (resolved from
    /// the quota's `uid` at login: see `auth::identity`; `None`: the image's user).
    pub fn new(user: &Username, quota: &Quota, identity: Option<&Identity>) -> Self {
        ContainerSpec {
            name: container_name(user, quota.profile.as_ref()),
            user: user.clone(),
            profile: quota.profile.clone(),
            image: quota.image.clone(),
            pull_policy: quota.pull_policy,
            registry: quota.registry.clone(),
            memory: quota.memory,
            cpus: quota.cpus,
            shm: quota.shm,
            pids: quota.pids,
            home_source: quota.home_for(user),
            home_target: format!("/home/{user}"),
            mounts: quota.mounts.clone(),
            shell: quota.shell.clone(),
            env: quota.env.clone(),
            uid_gid: identity.map(|i| (i.uid, i.gid)),
            groups: identity.map(|i| i.groups.clone()).unwrap_or_default(),
            gpu_request: quota.gpus.clone(),
            constraints: quota.constraints.clone(),
            gpus: Vec::new(),
            may_take_gpus: true,
        }
    }
}

/// The container of `user` (and `profile`): `labgate-USER`, `labgate-USER.PROFILE`. No user
/// or profile name has a `.`, so no two (user, profile) pairs share a name (with `-`,
/// `alice`'s profile `x` and user `alice-x` did).
pub fn container_name(user: &Username, profile: Option<&ProfileName>) -> String {
    match profile {
        Some(p) => format!("labgate-{user}.{p}"),
        None => format!("labgate-{user}"),
    }
}

/// The name a profile's container had before [`container_name`] used `.`: such containers are
/// renamed (found by their labels, never by the name alone) when the gateway starts or the
/// user next logs in.
pub fn legacy_profile_name(user: &Username, profile: &ProfileName) -> String {
    format!("labgate-{user}-{profile}")
}

impl ContainerSpec {
    /// Who the container's processes run as: `None` for the image's user (root).
    pub fn identity(&self) -> Option<Identity> {
        self.uid_gid.map(|(uid, gid)| Identity {
            uid,
            gid,
            groups: self.groups.clone(),
        })
    }
}

pub use crate::auth::identity::Identity;

impl ContainerSpec {
    /// Who holds this container's GPUs: the user, or `user+profile` for a profile's
    /// container, so a user's containers never count as one.
    pub fn holder(&self) -> Username {
        match &self.profile {
            Some(p) => self.user.with_profile(p),
            None => self.user.clone(),
        }
    }
}

/// A running container, as the session needs it.
#[derive(Debug, Clone)]
pub struct ContainerHandle {
    /// Backend id.
    pub id: String,
    /// Name (`labgate-NAME`).
    pub name: String,
    /// Resolved login shell.
    pub shell: String,
    /// Whether this call created it (first login), started it (resume) or found it running.
    pub outcome: EnsureOutcome,
    /// What the backend that made this handle needs to find the container again (local
    /// Docker: the host PID of its init); opaque above the seam.
    pub engine_data: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// The container's own addresses on its networks.
    pub ips: Vec<std::net::IpAddr>,
    /// Set when this start made the container again from another image: the image it had.
    pub recreated_from: Option<String>,
    /// The settings (`mounts/home`, `shm`, `env`, `uid`) whose change made this start
    /// recreate the container; empty when it was not recreated for them.
    pub remade_for: Vec<&'static str>,
    /// Set when the container runs from another image than the configured one (which it
    /// gets when it next starts): the image it runs.
    pub pending_image: Option<String>,
    /// The GPUs it has, by UUID.
    pub gpus: Vec<GpuUuid>,
    /// What the user should hear about its GPUs, when something happened to them.
    pub gpu_notice: Option<GpuNotice>,
}

impl ContainerHandle {
    /// A handle with nothing to report: found `outcome`, no GPUs, no notices (backends fill
    /// in the rest).
    pub fn new(id: String, name: String, shell: String, outcome: EnsureOutcome) -> Self {
        ContainerHandle {
            id,
            name,
            shell,
            outcome,
            engine_data: None,
            ips: Vec::new(),
            recreated_from: None,
            remade_for: Vec::new(),
            pending_image: None,
            gpus: Vec::new(),
            gpu_notice: None,
        }
    }
}

/// Something about a container's GPUs the user should hear at login: data, worded by
/// [`crate::session::text`].
#[derive(Debug, Clone)]
pub enum GpuNotice {
    /// Made again with `gpus` because the GPUs it had are held by others (`taken`), or,
    /// with `taken` empty, because it was made before the quota included GPUs.
    MadeAgain {
        /// Its GPUs now.
        gpus: Vec<GpuUuid>,
        /// The GPUs it had and who holds them.
        taken: Vec<crate::gpu::allocator::Taken>,
    },
    /// Made again with `gpus` because the GPU quota changed.
    QuotaChanged {
        /// Its GPUs now.
        gpus: Vec<GpuUuid>,
    },
    /// The quota asks for `count` GPUs that the running container does not have: they come
    /// when it is made again.
    NotYetGiven {
        /// GPUs the quota asks for.
        count: usize,
    },
}

/// What `ensure_running` had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnsureOutcome {
    /// It was running already.
    Running,
    /// It existed stopped and was started.
    Started,
    /// It did not exist and was created and started.
    Created,
}

impl ManagedContainer {
    /// Its owner and the key its GPUs are held under (`user` or `user+profile`), when the
    /// user label is a valid name.
    pub fn owner(&self) -> Option<(Username, Username)> {
        let user = Username::parse(&self.user).ok()?;
        let holder = match &self.profile {
            Some(p) => user.with_profile(p),
            None => user.clone(),
        };
        Some((user, holder))
    }

    /// The quota that applies to it under `config` (a profile's, if it is a profile's and
    /// the user may still use it; else the user's own).
    pub fn quota<'a>(&self, config: &'a crate::config::Config, user: &Username) -> &'a Quota {
        self.profile
            .as_ref()
            .and_then(|p| config.profile_quota(user, p).ok())
            .unwrap_or_else(|| config.quota_for(user))
    }
}

/// What a backend says a container is doing (the Docker Engine's words; a cluster backend
/// maps its own onto them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Made, never started.
    Created,
    /// Its processes run.
    Running,
    /// Frozen.
    Paused,
    /// Being restarted by the engine.
    Restarting,
    /// Being removed.
    Removing,
    /// Stopped (idle stop, `labgate stop`, or its main process ended).
    Exited,
    /// Could not be stopped or removed cleanly.
    Dead,
    /// A state this version does not know, as the backend named it.
    Unknown(String),
}

impl ContainerState {
    /// The state the engine names `word`.
    pub fn from_engine(word: &str) -> Self {
        match word {
            "created" => Self::Created,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "restarting" => Self::Restarting,
            "removing" => Self::Removing,
            "exited" => Self::Exited,
            "dead" => Self::Dead,
            other => Self::Unknown(other.to_owned()),
        }
    }

    /// Whether its processes run (a paused container's do not).
    pub fn is_running(&self) -> bool {
        *self == Self::Running
    }
}

impl std::fmt::Display for ContainerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Restarting => "restarting",
            Self::Removing => "removing",
            Self::Exited => "exited",
            Self::Dead => "dead",
            Self::Unknown(word) => word,
        })
    }
}

/// A container labgate manages, as listed at start.
#[derive(Debug, Clone)]
pub struct ManagedContainer {
    /// Backend id.
    pub id: String,
    /// Container name (`labgate-NAME`).
    pub name: String,
    /// Owner, from the user label.
    pub user: String,
    /// The profile of a `user+profile` container, from its label.
    pub profile: Option<crate::auth::ProfileName>,
    /// What the engine says it is doing.
    pub state: ContainerState,
    /// Image reference it was created from.
    pub image: String,
    /// GPUs its label records.
    pub gpus: Vec<GpuUuid>,
    /// The node it runs on, on a cluster (`None`: this host, or not running).
    pub node: Option<String>,
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtySize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// A process to start in a container.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// argv (`[shell, "-l"]` or `[shell, "-c", command]`).
    pub argv: Vec<String>,
    /// Environment on top of the container's.
    pub env: Vec<(String, String)>,
    /// A terminal of this size, or plain pipes when `None`.
    pub tty: Option<TtySize>,
    /// `uid:gid` to run as.
    pub user: Option<(u32, u32)>,
    /// Working directory.
    pub workdir: String,
}

/// A chunk of a process's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    /// Standard output (everything, for a terminal).
    Stdout(Bytes),
    /// Standard error (never for a terminal).
    Stderr(Bytes),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(u32),
    /// Killed by this signal (number), which labgate itself delivered.
    Signal(i32),
}

/// A started process: its output, its stdin, and its controls.
pub struct Exec {
    /// Output chunks until the process (and everything holding its output) is gone.
    pub output: BoxStream<'static, io::Result<ExecOutput>>,
    /// Standard input; shutting it down delivers EOF (non-terminal processes).
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    /// Resize, signal, wait, hang up.
    pub control: Box<dyn ExecControl>,
}

/// Controls of a started process.
#[async_trait]
pub trait ExecControl: Send + Sync {
    /// Resizes the process's terminal.
    async fn resize(&self, size: TtySize) -> Result<(), RuntimeError>;
    /// Sends `signal` to the process's group (as a terminal would).
    async fn signal(&self, signal: i32) -> Result<(), RuntimeError>;
    /// The exit status, once the output has ended.
    async fn wait(&self) -> Result<ExitStatus, RuntimeError>;
    /// The client is gone: SIGHUP to the process's session and group, then SIGKILL for what
    /// did not exit and did not ignore SIGHUP (so `nohup` and `setsid` jobs survive).
    async fn hangup(&self);
}

/// What can go wrong in a backend, phrased for the user where they will see it.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container engine cannot be reached.
    #[error("the container engine is not reachable ({0}); please tell your admin")]
    Unavailable(String),
    /// The configured image is not on this host and may not be pulled.
    #[error("image {0} is not on this host and pull_policy is \"never\"; ask your admin")]
    ImageMissing(String),
    /// The image could not be pulled; the reason is the registry's (or the engine's).
    #[error("cannot pull image {image:?}: {reason}")]
    Pull {
        /// The image reference.
        image: String,
        /// Why.
        reason: String,
    },
    /// The login asked for a profile it may not use.
    #[error(transparent)]
    Profile(#[from] crate::config::ProfileRefusal),
    /// The login has no identity to run as (`uid = "host"` without a host account...).
    #[error(transparent)]
    Identity(#[from] crate::auth::identity::IdentityError),
    /// A container with our name exists but is not ours.
    #[error("a container named {0} exists but is not managed by labgate; ask your admin")]
    NameTaken(String),
    /// The engine refused to create the container (for example an invalid quota).
    #[error("your container could not be created: {0}")]
    Create(String),
    /// The engine refused to start the container, or it died at once.
    #[error("your container failed to start: {0}")]
    Start(String),
    /// The process could not be started in the container.
    #[error("could not start a process in your container: {0}")]
    Exec(String),
    /// The home directory could not be prepared.
    #[error("your home directory could not be prepared: {0}")]
    Home(String),
    /// A bind source (the home, a mount) failed its check: the user gets one line, the log
    /// the path.
    #[error("refused to start your container: {}", .0.user_line())]
    Unsafe(docker::hostpath::Refused),
    /// The GPUs the quota asks for cannot be given (none free, no NVML, no GPU runtime).
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    /// Anything else the engine said.
    #[error("container engine error: {0}")]
    Engine(String),
    /// The cluster node that ran the container stopped answering (it died, or its network).
    #[error(
        "the server {node} that ran your container stopped answering ({reason}); log in again to continue on a live server (your home is kept)"
    )]
    NodeLost {
        /// The node's hostname.
        node: String,
        /// What failed.
        reason: String,
    },
    /// The stream of a process on a cluster node was cut while the node still answers (its
    /// agent restarted, say): the process was hung up.
    #[error(
        "the connection to your program on server {node} was cut ({reason}); it was ended, as when you disconnect. Log in again to continue (your container still runs)"
    )]
    StreamCut {
        /// The node's hostname.
        node: String,
        /// What failed.
        reason: String,
    },
}

impl crate::codes::Coded for RuntimeError {
    fn code(&self) -> crate::codes::Code {
        use crate::codes::Code;
        match self {
            RuntimeError::Unavailable(_) => Code::EngineUnavailable,
            RuntimeError::ImageMissing(_) => Code::ImageMissing,
            RuntimeError::Pull { .. } => Code::PullFailed,
            RuntimeError::Profile(_) => Code::ProfileRefused,
            RuntimeError::Identity(_) => Code::NoIdentity,
            RuntimeError::NameTaken(_) => Code::NameTaken,
            RuntimeError::Create(_) => Code::CreateFailed,
            RuntimeError::Start(_) => Code::StartFailed,
            RuntimeError::Exec(_) => Code::ExecFailed,
            RuntimeError::Home(_) => Code::HomeFailed,
            RuntimeError::Unsafe(_) => Code::UnsafeBind,
            RuntimeError::Gpu(e) => e.code(),
            RuntimeError::Engine(_) => Code::EngineError,
            RuntimeError::NodeLost { .. } | RuntimeError::StreamCut { .. } => Code::EngineLost,
        }
    }
}

/// One step of an image pull, for someone waiting on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullProgress {
    /// A one-line summary (`pulling IMAGE: 2/5 layers, 12.0 MB / 40.1 MB`).
    pub line: String,
    /// Whether a layer changed state (worth a line of its own), rather than bytes moving.
    pub step: bool,
}

/// Pull progress of a container start that waits for its image.
#[derive(Debug, Clone)]
pub struct PullEvent {
    /// The container whose start waits (`labgate-alice`): sessions filter on it.
    pub container: String,
    /// The progress.
    pub progress: PullProgress,
}

/// A backend that runs users' containers.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Progress of the image pulls container starts are waiting for, as they happen. A
    /// session subscribes before asking for its container and shows the events for it.
    fn pull_events(&self) -> tokio::sync::broadcast::Receiver<PullEvent> {
        tokio::sync::broadcast::channel(1).1
    }

    /// Finds or creates the container of `spec.user` and makes sure it runs. Safe to call
    /// concurrently for the same user: exactly one container results.
    async fn ensure_running(&self, spec: &ContainerSpec) -> Result<ContainerHandle, RuntimeError>;

    /// The way into the running `container` for `who`: forwards, agent sockets, name
    /// lookups and the stdio fast path of commands go through it (see [`reach`]).
    async fn reach(
        self: std::sync::Arc<Self>,
        container: &ContainerHandle,
        who: reach::Reacher,
    ) -> std::sync::Arc<dyn reach::Reach>;

    /// Starts a process in a running container.
    async fn exec(
        &self,
        container: &ContainerHandle,
        req: ExecRequest,
    ) -> Result<Exec, RuntimeError>;

    /// The containers labgate manages (by label), for reconciling at start.
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, RuntimeError>;

    /// Applies the limits the engine can change on a live container (memory, CPUs, process
    /// count) to the running container of `spec.user`. `Ok(false)` when none is running.
    async fn update_limits(&self, spec: &ContainerSpec) -> Result<bool, RuntimeError>;

    /// Stops `container` (its processes get SIGTERM, then SIGKILL after a grace period) and
    /// frees what it holds (GPUs), if `still_wanted` says so once no start of it is under
    /// way (so no login is starting it meanwhile); the container and the home stay.
    /// `Ok(false)` when it was not stopped (not running, or `still_wanted` said no).
    async fn stop(
        &self,
        container: &ManagedContainer,
        still_wanted: StillWanted,
    ) -> Result<bool, RuntimeError>;

    /// The GPUs this backend gives containers, with their live use; an error says why there
    /// are none (no NVML on this host).
    async fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError>;

    /// Who holds which GPU, as the backend knows it (`user` or `user+profile`).
    fn gpu_holders(&self) -> BTreeMap<GpuUuid, Vec<Username>>;

    /// The node GPU `uuid` is on, on a cluster (`None`: this host).
    fn gpu_node(&self, _uuid: &GpuUuid) -> Option<String> {
        None
    }

    /// Since when `holder` has held its GPUs, when the backend knows.
    fn gpu_held_since(&self, _holder: &Username) -> Option<std::time::SystemTime> {
        None
    }

    /// Whether a start ([`ContainerRuntime::ensure_running`]) dropped before it ends undoes
    /// itself (the login that asked for it has gone): then it is dropped at once, else it
    /// runs to its end.
    fn withdraws_dropped_starts(&self) -> bool {
        false
    }

    /// The nodes of a cluster backend (none for one host).
    async fn nodes(&self) -> Result<Vec<NodeSummary>, RuntimeError> {
        Ok(Vec::new())
    }

    /// Run once when the gateway starts: brings the backend's own state in line with the
    /// engine's (containers labgate manages, GPU holdings) and logs what it found.
    async fn recover(&self) -> Result<(), RuntimeError>;

    /// Follows config reloads for what the backend does ahead of logins (pulling changed
    /// images); nothing by default.
    fn follow_config(
        self: std::sync::Arc<Self>,
        _config: tokio::sync::watch::Receiver<std::sync::Arc<crate::config::Config>>,
    ) {
    }
}

/// A node of a cluster backend, as the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    /// Its hostname.
    pub name: String,
    /// Whether the cluster sees it up.
    pub ready: bool,
    /// Its GPUs.
    pub gpus: usize,
    /// Its GPUs labgate's containers hold.
    pub gpus_held: usize,
    /// labgate's containers running on it.
    pub containers: usize,
}

/// Asked once a stop may go ahead: `false` calls it off (a login arrived meanwhile).
pub type StillWanted = Box<dyn FnOnce() -> bool + Send>;

/// The `labgate gpus` table when no gateway runs: asked of the backend `config` names.
pub async fn gpu_report(config: &crate::config::Config) -> Result<String, GpuError> {
    match config.cluster.engine {
        crate::config::cluster::Engine::Docker => docker::gpus::report(config).await,
        crate::config::cluster::Engine::Swarm => swarm::gpu_report(config).await,
    }
}

/// The backend `config` names (`[cluster] engine`; local Docker by default), ready to use.
/// A new backend is a module beside [`docker`] and one arm here.
pub async fn open(config: &crate::config::Config) -> Arc<dyn ContainerRuntime> {
    match config.cluster.engine {
        crate::config::cluster::Engine::Docker => {
            let gpus = docker::pool::GpuPool::open(&config.gpu).await;
            Arc::new(docker::DockerRuntime::new(&config.docker, gpus))
        }
        crate::config::cluster::Engine::Swarm => Arc::new(swarm::SwarmRuntime::new(config)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_states_read_and_print_as_the_engine_names_them() {
        for word in [
            "created",
            "running",
            "paused",
            "restarting",
            "removing",
            "exited",
            "dead",
        ] {
            let state = ContainerState::from_engine(word);
            assert!(!matches!(state, ContainerState::Unknown(_)), "{word}");
            assert_eq!(state.to_string(), word);
            assert_eq!(state.is_running(), word == "running");
        }
        let odd = ContainerState::from_engine("frozen-ish");
        assert_eq!(odd, ContainerState::Unknown("frozen-ish".into()));
        assert_eq!(odd.to_string(), "frozen-ish");
        assert!(!odd.is_running());
    }
}
