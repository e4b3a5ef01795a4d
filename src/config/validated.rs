//! The validated configuration: what the rest of labgate reads ([`Config`], its sections,
//! the per-user [`Quota`]), and the default of every setting a file may leave out, named
//! beside the type it belongs to. Built only by [`super::validation`], so every value here
//! has passed its checks.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::helpers;
use super::{ByteSize, GpuConfig, GpuRequest, ProfileRefusal, Profiles, PullPolicy, RegistryAuth};
use crate::auth::Username;
use crate::config::policy::ForwardPolicy;

/// Environment variables a client may never set, whatever `accept_env` says.
pub(super) const NEVER_ACCEPTED: [&str; 2] = ["PATH", "LD_*"];

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from (absolute), for messages and reload.
    pub source: PathBuf,
    /// Listener, host key, keys directory.
    pub server: ServerConfig,
    /// `[cluster]`: which engine runs users' containers.
    pub cluster: super::cluster::ClusterConfig,
    /// `[docker]`: this host's engine (`[cluster] engine = "docker"`).
    pub docker: DockerConfig,
    /// Where NVML is and how GPUs are shared.
    pub gpu: GpuConfig,
    /// The admin socket, metrics listener and audit log.
    pub admin: AdminConfig,
    /// The quota of every user without a `[users.NAME]` table.
    pub defaults: Quota,
    /// Fully resolved quotas of users with their own table.
    pub(super) users: BTreeMap<Username, Quota>,
    /// `[profiles.NAME]`: per allowed user, their quota with the profile merged over it.
    pub profiles: Profiles,
}

impl Config {
    /// The quota that applies to `user`: their own table merged over `[defaults]`.
    pub fn quota_for(&self, user: &Username) -> &Quota {
        self.users.get(user).unwrap_or(&self.defaults)
    }

    /// Users with their own `[users.NAME]` table.
    pub fn configured_users(&self) -> impl Iterator<Item = &Username> {
        self.users.keys()
    }

    /// The uids the config gives by number (never handed out under `uid = "auto"`).
    pub(crate) fn fixed_uids(&self) -> std::collections::BTreeSet<u32> {
        std::iter::once(&self.defaults)
            .chain(self.users.values())
            .chain(self.profiles.quotas.values())
            .filter_map(|q| match q.uid {
                Some(UidRule::Fixed(uid)) => Some(uid),
                _ => None,
            })
            .collect()
    }

    /// Every quota table with the quota it is merged over, so a report can name the table
    /// that sets a value (where the two differ): `[defaults]` (over nothing), each
    /// `[users.NAME]` (over `[defaults]`), each `[profiles.NAME]` once per user who may use it
    /// (over that user's quota).
    pub(crate) fn quota_tables(&self) -> Vec<(String, &Quota, Option<&Quota>)> {
        let mut tables = vec![("[defaults]".to_owned(), &self.defaults, None)];
        tables.extend(
            self.users
                .iter()
                .map(|(u, q)| (format!("[users.{u}]"), q, Some(&self.defaults))),
        );
        tables.extend(
            self.profiles
                .quotas
                .iter()
                .map(|((p, u), q)| (format!("[profiles.{p}]"), q, Some(self.quota_for(u)))),
        );
        tables
    }

    /// Homes that lie under a writable mount source (of any user's quota): `(table, home
    /// template, mount source)`. Someone who can write there can rename a home and put a
    /// symlink in its place; labgate refuses to start such a container, but the admin should
    /// know (`labgate check` warns).
    pub(crate) fn homes_under_writable_mounts(&self) -> Vec<(String, String, PathBuf)> {
        let all = std::iter::once(&self.defaults)
            .chain(self.users.values())
            .chain(self.profiles.quotas.values());
        let writable: std::collections::BTreeSet<&PathBuf> = all
            .flat_map(|q| q.mounts.iter().filter(|m| m.writable).map(|m| &m.source))
            .collect();
        let homes = std::iter::once(("[defaults]".to_owned(), &self.defaults))
            .chain(self.users.iter().map(|(u, q)| (format!("[users.{u}]"), q)));
        let mut found = Vec::new();
        for (table, quota) in homes {
            // The directory the homes are made in: the template up to `{user}`.
            let parent: PathBuf = Path::new(&quota.home)
                .components()
                .take_while(|c| !c.as_os_str().to_string_lossy().contains("{user}"))
                .collect();
            for source in &writable {
                if parent.starts_with(source) {
                    found.push((table.clone(), quota.home.clone(), (*source).clone()));
                }
            }
        }
        found.dedup_by(|a, b| a.1 == b.1 && a.2 == b.2);
        found
    }

    /// The quota of `user` logging in as `user+profile`, or why they may not.
    pub fn profile_quota(
        &self,
        user: &Username,
        profile: &crate::auth::ProfileName,
    ) -> Result<&Quota, ProfileRefusal> {
        if let Some(q) = self.profiles.quotas.get(&(profile.clone(), user.clone())) {
            return Ok(q);
        }
        let allowed = self
            .profiles
            .allowed(user)
            .iter()
            .map(|p| p.to_string())
            .collect();
        let exists = self.profiles.exists(profile);
        let profile = profile.to_string();
        Err(if exists {
            ProfileRefusal::NotAllowed { profile, allowed }
        } else {
            ProfileRefusal::Unknown { profile, allowed }
        })
    }
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address the SSH listener binds (port 0 picks a free port; the bound address is logged
    /// and printed).
    pub listen: SocketAddr,
    /// Host key file; an ed25519 key is generated there (mode 0600) if it does not exist.
    pub host_key: PathBuf,
    /// Directory of `NAME.pub` key files: one file per user.
    pub keys_dir: PathBuf,
    /// Authenticated connections at once; a login past it is refused (and logged).
    pub max_connections: usize,
    /// Authenticated connections of one user at once, all profiles together (`alice` and
    /// `alice+gpu` count as alice's), so one user cannot fill `max_connections`; a login
    /// past it is refused (and logged). Default [`DEFAULT_MAX_CONNECTIONS_PER_USER`].
    pub max_connections_per_user: usize,
    /// Session channels (shells, commands, sftp) open at once on one connection, as sshd's
    /// `MaxSessions`; one more is refused with a channel open failure that says why.
    /// Read at each channel open. Default [`DEFAULT_MAX_SESSIONS`].
    pub max_sessions: usize,
    /// Connections not yet authenticated at once; a new one past it closes the oldest of the
    /// address holding the most (see `ssh::admission`), so a crowd that never logs in cannot
    /// lock a real user out.
    pub max_startups: usize,
    /// Time a client has to authenticate before it is disconnected.
    pub login_grace: Duration,
    /// Interval of SSH keepalives to an otherwise silent client; three missed answers end it.
    pub keepalive: Duration,
    /// Text shown to interactive logins after the status line (`None`: nothing).
    pub motd: Option<String>,
    /// Whether interactive logins get the one-line container status (state, image, quota,
    /// GPUs) before the shell starts.
    pub login_status: bool,
    /// Whether removing a user's key (or key file) also ends the connections that logged in
    /// with it; by default they stay and only new logins are refused.
    pub end_sessions_on_key_removal: bool,
    /// File of CA public keys trusted to sign user certificates (sshd's `TrustedUserCAKeys`);
    /// `None`: certificates are refused. Read at each certificate login.
    pub trusted_user_ca_keys: Option<PathBuf>,
    /// Where the gateway keeps what must outlive it (the uids given under `uid = "auto"`).
    pub state_dir: PathBuf,
    /// The uids `uid = "auto"` gives out, lowest free first.
    pub auto_uids: std::ops::RangeInclusive<u32>,
}

/// Default of `[server] listen`: loopback only, until the admin opens it.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 2222);

/// Default of `[server] host_key`, relative to the config file's directory.
pub const DEFAULT_HOST_KEY: &str = "host_ed25519_key";

/// Default of `[server] keys_dir`, relative to the config file's directory.
pub const DEFAULT_KEYS_DIR: &str = "keys";

/// Default of `[server] max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Default of `[server] max_startups`: far more than real clients have mid-login at once.
pub const DEFAULT_MAX_STARTUPS: usize = 256;

/// Default of `[server] login_grace`.
pub const DEFAULT_LOGIN_GRACE: Duration = Duration::from_secs(30);

/// Default of `[server] keepalive`.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);

/// Default of `[server] login_status`: interactive logins get the status line.
pub const DEFAULT_LOGIN_STATUS: bool = true;

/// Default of `[server] end_sessions_on_key_removal`: a removed key refuses new logins only.
pub const DEFAULT_END_SESSIONS_ON_KEY_REMOVAL: bool = false;

/// Default of `[server] state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/labgate";

/// Default of `[server] auto_uids`: above the uids of host accounts and below the ranges
/// rootless containers map (subuids usually start at 100000 + 65536 per user; this range is
/// one a lab keeps free of host accounts).
pub const DEFAULT_AUTO_UIDS: std::ops::RangeInclusive<u32> = 200_000..=299_999;

/// `uid` of a quota: who a user's processes run as in their container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UidRule {
    /// This uid (and `gid`, default the same number).
    Fixed(u32),
    /// The host account of the login's name (NSS): its uid, gid and supplementary groups,
    /// so files in shared mounts belong to the same person on the host and in the container.
    Host,
    /// A stable uid per user from `[server] auto_uids`, recorded in `[server] state_dir` so it
    /// never changes and is never given to another user.
    Auto,
}

/// Default of `[server] max_connections_per_user`: more than a user's editor windows,
/// terminals and transfers need at once (VS Code holds two or three connections a window).
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 32;

/// Default of `[server] max_sessions`: sshd's `MaxSessions` default.
pub const DEFAULT_MAX_SESSIONS: usize = 10;

/// `[admin]`: how the admin reaches the running gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Unix socket of the admin API (`labgate status`, `stop`, `kick`, `gpus`): created with
    /// mode 0600, so only its owner (root) may use it.
    pub socket: PathBuf,
    /// Loopback address serving `/metrics` and `/healthz` (`None`: not served).
    pub listen: Option<SocketAddr>,
    /// File that receives one JSON line per audit event (`None`: audit events go only to
    /// the log).
    pub audit_log: Option<PathBuf>,
    /// Address serving the read-only lab page (`/`, `/api/lab`) to the lab network, beside
    /// the loopback `listen` (`None`: only there). See [`crate::admin::dashboard`].
    pub dashboard_listen: Option<SocketAddr>,
    /// Whether the lab page names users (else stable anonymous labels such as `user-3f2a`).
    pub dashboard_show_users: bool,
}

/// Default of `[admin] socket`.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/labgate/admin.sock";

/// `[docker]`.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Unix socket of the Docker Engine API.
    pub socket: PathBuf,
    /// Bound on each Docker API call (not on a running exec).
    pub timeout: Duration,
    /// The network user containers join: labgate's own bridge with inter-container traffic
    /// off (created if missing), so users cannot reach each other's containers.
    pub network: String,
    /// The static `labgate-relay` binary, bind-mounted read-only into containers for the
    /// direct path and the exec forwarding path (absent: those are unavailable). Configured
    /// or found by [`helpers::locate`].
    pub relay_helper: helpers::Helper,
    /// The static `labgate-sftp` binary, bind-mounted read-only into containers: the `sftp`
    /// subsystem of an image without its own sftp-server (absent: such images get none).
    pub sftp_helper: helpers::Helper,
    /// How forwards reach into containers.
    pub forward_via: ForwardVia,
}

/// Default of `[docker] socket`: the engine's usual socket.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Default of `[docker] timeout`.
pub const DEFAULT_DOCKER_TIMEOUT: Duration = Duration::from_secs(60);

/// Default of `[docker] network` (created if missing).
pub const DEFAULT_NETWORK: &str = "labgate";

/// How forwards reach into a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ForwardVia {
    /// Namespaces when the gateway may enter them, else the relay exec.
    #[default]
    Auto,
    /// Always enter the container's namespaces (needs root and the host PID namespace).
    Namespace,
    /// Always relay through an exec of `labgate-relay` in the container.
    Exec,
}

/// What a user's container gets: `[defaults]` with `[users.NAME]` merged over it.
#[derive(Debug, Clone, PartialEq)]
pub struct Quota {
    /// Image reference the container is created from.
    pub image: String,
    /// Memory limit in bytes.
    pub memory: Option<ByteSize>,
    /// CPU limit in cores (fractional).
    pub cpus: Option<f64>,
    /// Size of `/dev/shm`.
    pub shm: Option<ByteSize>,
    /// Limit on processes in the container.
    pub pids: Option<i64>,
    /// GPUs to attach: a count or pinned GPUs (allocation is the GPU module's job).
    pub gpus: GpuRequest,
    /// Host path of the home directory; `{user}` is replaced by the user name.
    pub home: String,
    /// Extra bind mounts.
    pub mounts: Vec<Mount>,
    /// Login shell; `None` picks `/bin/bash` if the image has it, else `/bin/sh`.
    pub shell: Option<String>,
    /// Fixed environment variables.
    pub env: BTreeMap<String, String>,
    /// Who the user's processes run as (`None`: the image's default user, usually root).
    pub uid: Option<UidRule>,
    /// Primary group id (defaults to a fixed `uid`'s number, the host account's group for
    /// `"host"`, the uid for `"auto"`).
    pub gid: Option<u32>,
    /// Patterns of environment variables a client may send (`LC_*` matches a prefix).
    pub accept_env: Vec<String>,
    /// Which forwards the user may open, and to where beyond their container.
    pub forwarding: ForwardPolicy,
    /// The user's weight in the GPU queue's fair order: their recent GPU use is divided by it
    /// (default 1; 2 lets a user use twice as much before going behind others).
    pub gpu_share: f64,
    /// A soft weekly budget of GPU-hours: over it, the user waits in the GPU queue behind
    /// everyone under theirs (and is told so). `None`: no budget.
    pub gpu_hours_per_week: Option<f64>,
    /// Whether this user's logins wait for busy GPUs; `None`: as `[gpu] queue` says.
    pub gpu_queue: Option<bool>,
    /// Longest wait in the GPU queue for this user; `None`: `[gpu] max_wait`.
    pub gpu_max_wait: Option<Duration>,
    /// Whether this container's idle GPUs may be reclaimed for waiting logins
    /// (`[gpu] reclaim_idle`); `false` exempts a user or profile.
    pub gpu_reclaim: bool,
    /// Stop the container after this long without an SSH connection of its user (and, with
    /// GPUs, without GPU activity); `None`: never.
    pub idle_stop: Option<Duration>,
    /// When the image is pulled.
    pub pull_policy: PullPolicy,
    /// Swarm placement constraints (`node.labels.gpu == a100`): which nodes may run the
    /// container. Only a cluster engine places containers; on this host's Docker Engine they
    /// mean nothing (`labgate check` warns).
    pub constraints: Vec<String>,
    /// Credentials of the image's registry, when `[registries]` has them.
    pub registry: Option<RegistryAuth>,
    /// The profile this quota is for (`user+profile` logins), `None` for plain logins.
    pub profile: Option<crate::auth::ProfileName>,
}

/// Default of a quota's `gpu_reclaim`: idle GPUs may be reclaimed (when `[gpu] reclaim_idle`
/// turns reclaim on at all).
pub const DEFAULT_GPU_RECLAIM: bool = true;

/// Default of a quota's `home`: `{user}` is replaced by the user name.
pub const DEFAULT_HOME: &str = "/var/lib/labgate/home/{user}";

/// Default of a quota's `accept_env`: the terminal type, the locale, and git's protocol
/// version (which git over SSH sends).
pub const DEFAULT_ACCEPT_ENV: [&str; 4] = ["TERM", "LANG", "LC_*", "GIT_PROTOCOL"];

/// Default of each `[forwarding]` switch (`local`, `remote`, `unix`): allowed, within the
/// user's own container unless `allow` names more.
pub const DEFAULT_FORWARDING: bool = true;

impl Quota {
    /// The home directory on the host for `user`.
    pub fn home_for(&self, user: &Username) -> PathBuf {
        PathBuf::from(self.home.replace("{user}", user.as_str()))
    }

    /// Whether a client may set the variable `name`.
    pub fn accepts_env(&self, name: &str) -> bool {
        !NEVER_ACCEPTED.iter().any(|p| env_pattern_matches(p, name))
            && self.accept_env.iter().any(|p| env_pattern_matches(p, name))
    }
}

/// A host directory bound into every container of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Host path (absolute).
    pub source: PathBuf,
    /// Path inside the container (absolute).
    pub target: String,
    /// Read-write when true; read-only by default.
    pub writable: bool,
}

pub(super) fn env_pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}
