//! The admin's TOML config: parsing, validation, and per-user quota resolution.
//!
//! Owns the file format (`[server]`, `[docker]`, `[defaults]`, `[users.NAME]`), its units,
//! and the rule that a config is either wholly valid or rejected with `file:line:column` and a
//! message. Raw serde structs (`deny_unknown_fields`) are turned into the validated [`Config`];
//! nothing downstream ever sees an unvalidated value. Relative paths are resolved against the
//! directory of the config file.

mod gpu;
pub mod helpers;
pub mod images;
pub mod reload;
pub mod units;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::auth::Username;
use crate::forward::policy::{AllowRule, ForwardPolicy};
pub use gpu::{DEFAULT_NVML_LIBRARY, GpuConfig, GpuMode, GpuPin, GpuRequest, GpuUuid};
pub use images::{ProfileRefusal, Profiles, PullPolicy, RegistryAuth};
pub use units::{ByteSize, HumanDuration};

/// Default path of the config file, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/labgate.toml";

/// The message for `users = [...]` outside a profile table.
const PROFILE_ONLY: &str =
    "`users` belongs in a [profiles.NAME] table (the users who may use the profile)";

/// Environment variables a client may never set, whatever `accept_env` says.
const NEVER_ACCEPTED: [&str; 2] = ["PATH", "LD_*"];

/// Errors loading a config. `Display` gives `file:line:column: message` where a position is known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config: {source}", path = path.display())]
    Io {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type or an invalid value.
    #[error("{path}:{line}:{column}: {message}", path = path.display())]
    At {
        /// The config file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A problem the TOML parser could not place in the file.
    #[error("{path}: {message}", path = path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from (absolute), for messages and reload.
    pub source: PathBuf,
    /// Listener, host key, keys directory.
    pub server: ServerConfig,
    /// How to reach the Docker Engine.
    pub docker: DockerConfig,
    /// Where NVML is and how GPUs are shared.
    pub gpu: GpuConfig,
    /// The admin socket, metrics listener and audit log.
    pub admin: AdminConfig,
    /// The quota of every user without a `[users.NAME]` table.
    pub defaults: Quota,
    /// Fully resolved quotas of users with their own table.
    users: BTreeMap<Username, Quota>,
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
    pub fn fixed_uids(&self) -> std::collections::BTreeSet<u32> {
        std::iter::once(&self.defaults)
            .chain(self.users.values())
            .chain(self.profiles.quotas.values())
            .filter_map(|q| match q.uid {
                Some(UidRule::Fixed(uid)) => Some(uid),
                _ => None,
            })
            .collect()
    }

    /// Homes that lie under a writable mount source (of any user's quota): `(table, home
    /// template, mount source)`. Someone who can write there can rename a home and put a
    /// symlink in its place; labgate refuses to start such a container, but the admin should
    /// know (`labgate check` warns).
    pub fn homes_under_writable_mounts(&self) -> Vec<(String, String, PathBuf)> {
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

impl<'de> Deserialize<'de> for UidRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = UidRule;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a uid number, \"host\" or \"auto\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<UidRule, E> {
                u32::try_from(v)
                    .map(UidRule::Fixed)
                    .map_err(|_| E::custom(format!("uid {v} is out of range (0 to 4294967295)")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<UidRule, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UidRule, E> {
                match v {
                    "host" => Ok(UidRule::Host),
                    "auto" => Ok(UidRule::Auto),
                    other => Err(E::custom(format!(
                        "uid {other:?}: write a number, \"host\" (the host account of the same name) or \"auto\" (a uid labgate picks and keeps)"
                    ))),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[server] auto_uids = "FIRST-LAST"`.
#[derive(Debug, Clone)]
struct UidRange(std::ops::RangeInclusive<u32>);

impl<'de> Deserialize<'de> for UidRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || {
            serde::de::Error::custom(format!(
                "auto_uids {s:?}: write FIRST-LAST, e.g. \"200000-299999\", with 1000 <= FIRST <= LAST"
            ))
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (a, b): (u32, u32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a < 1000 || a > b {
            return Err(bad());
        }
        Ok(UidRange(a..=b))
    }
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
}

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
    /// Stop the container after this long without an SSH connection of its user (and, with
    /// GPUs, without GPU activity); `None`: never.
    pub idle_stop: Option<Duration>,
    /// When the image is pulled.
    pub pull_policy: PullPolicy,
    /// Credentials of the image's registry, when `[registries]` has them.
    pub registry: Option<RegistryAuth>,
    /// The profile this quota is for (`user+profile` logins), `None` for plain logins.
    pub profile: Option<crate::auth::ProfileName>,
}

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

fn env_pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

// ---------------------------------------------------------------------------------------------
// Raw file format.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    docker: RawDocker,
    #[serde(default)]
    gpu: gpu::RawGpu,
    #[serde(default)]
    admin: RawAdmin,
    defaults: Spanned<RawQuota>,
    #[serde(default)]
    users: BTreeMap<Username, Spanned<RawQuota>>,
    forwarding: Option<RawForwarding>,
    #[serde(default)]
    registries: BTreeMap<String, Spanned<images::RawRegistry>>,
    #[serde(default)]
    profiles: BTreeMap<crate::auth::ProfileName, Spanned<RawQuota>>,
}

/// `[forwarding]` (everyone) and `[users.NAME.forwarding]` (one user), merged field by field.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForwarding {
    local: Option<bool>,
    remote: Option<bool>,
    unix: Option<bool>,
    allow: Option<Vec<Spanned<String>>>,
}

impl RawForwarding {
    fn over(self, base: &RawForwarding) -> RawForwarding {
        RawForwarding {
            local: self.local.or(base.local),
            remote: self.remote.or(base.remote),
            unix: self.unix.or(base.unix),
            allow: self.allow.or_else(|| base.allow.clone()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<SocketAddr>,
    host_key: Option<PathBuf>,
    keys_dir: Option<PathBuf>,
    max_connections: Option<Positive>,
    max_connections_per_user: Option<Positive>,
    max_sessions: Option<Positive>,
    max_startups: Option<Positive>,
    login_grace: Option<HumanDuration>,
    keepalive: Option<HumanDuration>,
    motd: Option<String>,
    login_status: Option<bool>,
    end_sessions_on_key_removal: Option<bool>,
    trusted_user_ca_keys: Option<Spanned<PathBuf>>,
    state_dir: Option<PathBuf>,
    auto_uids: Option<UidRange>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<PathBuf>,
    listen: Option<Spanned<SocketAddr>>,
    audit_log: Option<PathBuf>,
}

/// `idle_stop`: a duration, or `"never"` (a user's table can turn off the default's).
#[derive(Debug, Clone, Copy, PartialEq)]
struct IdleStop(Option<Duration>);

impl<'de> Deserialize<'de> for IdleStop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "never" {
            return Ok(IdleStop(None));
        }
        let d = humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "idle_stop {s:?}: {e} (a duration such as \"2h\" or \"30m\", or \"never\")"
            ))
        })?;
        if d < Duration::from_secs(1) {
            return Err(serde::de::Error::custom(format!(
                "idle_stop {s:?} is too short: at least 1s (or \"never\")"
            )));
        }
        Ok(IdleStop(Some(d)))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    socket: Option<PathBuf>,
    timeout: Option<HumanDuration>,
    network: Option<String>,
    relay_helper: Option<PathBuf>,
    sftp_helper: Option<PathBuf>,
    forward_via: Option<ForwardVia>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    image: Option<Image>,
    memory: Option<Memory>,
    cpus: Option<Cpus>,
    shm: Option<ByteSize>,
    pids: Option<Positive>,
    gpus: Option<GpuRequest>,
    home: Option<Spanned<String>>,
    mounts: Option<Vec<RawMount>>,
    shell: Option<ContainerPath>,
    env: Option<BTreeMap<EnvName, String>>,
    uid: Option<UidRule>,
    gid: Option<u32>,
    accept_env: Option<Vec<Spanned<String>>>,
    forwarding: Option<RawForwarding>,
    idle_stop: Option<IdleStop>,
    pull_policy: Option<PullPolicy>,
    /// Only in `[profiles.NAME]`: who may use the profile.
    users: Option<Spanned<Vec<Username>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMount {
    source: Spanned<PathBuf>,
    target: ContainerPath,
    #[serde(default)]
    writable: bool,
}

/// A value that can only be valid or rejected at parse time, with the reason; each newtype
/// below checks one field so serde reports the field's own position.
macro_rules! checked {
    ($name:ident, $inner:ty, $check:expr) => {
        checked!($name, $inner, [], $check);
    };
    ($name:ident, $inner:ty, [$($derive:ident),*], $check:expr) => {
        #[derive(Debug, Clone, PartialEq, PartialOrd $(, $derive)*)]
        struct $name($inner);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = <$inner>::deserialize(d)?;
                let check: fn(&$inner) -> Result<(), String> = $check;
                check(&v).map_err(serde::de::Error::custom)?;
                Ok($name(v))
            }
        }
    };
}

checked!(Image, String, |s| {
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!("invalid image reference {s:?}"))
    } else {
        Ok(())
    }
});
checked!(Memory, ByteSize, |m| {
    // Docker refuses less than 6 MiB.
    if m.0 < 6 << 20 {
        Err(format!("memory {m} is below Docker's minimum of 6M"))
    } else {
        Ok(())
    }
});
checked!(Cpus, f64, |c| {
    if c.is_finite() && *c > 0.0 && *c <= 1024.0 {
        Ok(())
    } else {
        Err(format!(
            "cpus must be a number of cores above 0 (e.g. 1.5), not {c}"
        ))
    }
});
checked!(Positive, i64, |n| {
    if *n >= 1 {
        Ok(())
    } else {
        Err(format!("must be at least 1, not {n}"))
    }
});
checked!(ContainerPath, String, |p| {
    if !p.starts_with('/') || p == "/" || p.contains('\0') || p.split('/').any(|c| c == "..") {
        Err(format!(
            "{p:?} must be an absolute path inside the container, not / and without .."
        ))
    } else {
        Ok(())
    }
});
checked!(EnvName, String, [Eq, Ord], |n| {
    let mut chars = n.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!("invalid environment variable name {n:?}"))
    }
});
/// Checks an `accept_env` pattern: a name or a prefix ending in `*`, never one that could
/// admit PATH or LD_*.
fn check_env_pattern(p: &str) -> Result<(), String> {
    let name = p.strip_suffix('*').unwrap_or(p);
    let name_ok = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !name_ok {
        return Err(format!(
            "invalid accept_env pattern {p:?}: a name, or a prefix ending in *"
        ));
    }
    if NEVER_ACCEPTED.iter().any(|never| {
        env_pattern_matches(p, never.trim_end_matches('*')) || env_pattern_matches(never, name)
    }) {
        return Err(format!(
            "accept_env pattern {p:?} would let clients set PATH or LD_*, which is never allowed"
        ));
    }
    Ok(())
}

impl RawQuota {
    /// Fields of `self` where set, else those of `base`.
    fn over(self, base: &RawQuota) -> RawQuota {
        RawQuota {
            image: self.image.or_else(|| base.image.clone()),
            memory: self.memory.or_else(|| base.memory.clone()),
            cpus: self.cpus.or_else(|| base.cpus.clone()),
            shm: self.shm.or(base.shm),
            pids: self.pids.or_else(|| base.pids.clone()),
            gpus: self.gpus.or_else(|| base.gpus.clone()),
            home: self.home.or_else(|| base.home.clone()),
            mounts: self.mounts.or_else(|| base.mounts.clone()),
            shell: self.shell.or_else(|| base.shell.clone()),
            env: self.env.or_else(|| base.env.clone()),
            uid: self.uid.or(base.uid),
            // A user's own uid brings its own gid unless the table sets one.
            gid: self
                .gid
                .or(if self.uid.is_some() { None } else { base.gid }),
            accept_env: self.accept_env.or_else(|| base.accept_env.clone()),
            idle_stop: self.idle_stop.or(base.idle_stop),
            pull_policy: self.pull_policy.or(base.pull_policy),
            users: self.users,
            forwarding: Some(
                self.forwarding
                    .unwrap_or_default()
                    .over(&base.forwarding.clone().unwrap_or_default()),
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading and validation.

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    let abs = std::path::absolute(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse(&abs, &text)
}

/// Validates config `text` as if read from `path` (absolute; relative paths in the file are
/// resolved against its directory).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let base = path.parent().unwrap_or(Path::new("/")).to_owned();
    let v = Validator { path, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => v.at(span, e.message().to_owned()),
        None => ConfigError::Invalid {
            path: path.to_owned(),
            message: e.message().to_owned(),
        },
    })?;
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

    let server = ServerConfig {
        listen: raw
            .server
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 2222))),
        host_key: resolve(
            raw.server
                .host_key
                .unwrap_or_else(|| PathBuf::from("host_ed25519_key")),
        ),
        keys_dir: resolve(raw.server.keys_dir.unwrap_or_else(|| PathBuf::from("keys"))),
        max_connections: raw.server.max_connections.map_or(1024, |n| n.0 as usize),
        max_connections_per_user: raw
            .server
            .max_connections_per_user
            .map_or(DEFAULT_MAX_CONNECTIONS_PER_USER, |n| n.0 as usize),
        max_sessions: raw
            .server
            .max_sessions
            .map_or(DEFAULT_MAX_SESSIONS, |n| n.0 as usize),
        max_startups: raw.server.max_startups.map_or(256, |n| n.0 as usize),
        login_grace: raw
            .server
            .login_grace
            .map_or(Duration::from_secs(30), |d| d.0),
        keepalive: raw
            .server
            .keepalive
            .map_or(Duration::from_secs(30), |d| d.0),
        motd: raw.server.motd.filter(|m| !m.trim().is_empty()),
        login_status: raw.server.login_status.unwrap_or(true),
        end_sessions_on_key_removal: raw.server.end_sessions_on_key_removal.unwrap_or(false),
        trusted_user_ca_keys: match raw.server.trusted_user_ca_keys {
            Some(p) if p.get_ref().as_os_str().is_empty() => {
                return Err(v.at(
                    p.span(),
                    "trusted_user_ca_keys is empty: give the path of a file of CA public keys, or leave the key out".into(),
                ));
            }
            p => p.map(|p| resolve(p.into_inner())),
        },
        state_dir: resolve(
            raw.server
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        ),
        auto_uids: raw.server.auto_uids.map_or(DEFAULT_AUTO_UIDS, |r| r.0),
    };
    let admin = AdminConfig {
        socket: resolve(
            raw.admin
                .socket
                .unwrap_or_else(|| PathBuf::from("/run/labgate/admin.sock")),
        ),
        listen: match raw.admin.listen {
            Some(l) if !l.get_ref().ip().is_loopback() => {
                return Err(v.at(
                    l.span(),
                    format!(
                        "[admin] listen = \"{}\" must be a loopback address: the metrics endpoint has no authentication",
                        l.get_ref()
                    ),
                ));
            }
            l => l.map(Spanned::into_inner),
        },
        audit_log: raw.admin.audit_log.map(resolve),
    };
    let helper_dirs = helpers::search_dirs();
    let docker = DockerConfig {
        socket: resolve(
            raw.docker
                .socket
                .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock")),
        ),
        timeout: raw.docker.timeout.map_or(Duration::from_secs(60), |d| d.0),
        network: raw.docker.network.unwrap_or_else(|| "labgate".to_owned()),
        relay_helper: helpers::locate(
            helpers::RELAY,
            raw.docker.relay_helper.map(resolve),
            &helper_dirs,
        ),
        sftp_helper: helpers::locate(
            helpers::SFTP,
            raw.docker.sftp_helper.map(resolve),
            &helper_dirs,
        ),
        forward_via: raw.docker.forward_via.unwrap_or_default(),
    };
    if docker.network.is_empty()
        || docker.network == "host"
        || docker.network.starts_with("container:")
    {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            message: format!(
                "[docker] network = {:?} is not allowed: user containers need a bridge network of their own (the default \"labgate\" is created if missing)",
                docker.network
            ),
        });
    }

    let gpu = v.gpu(raw.gpu, &base)?;
    let defaults_span = raw.defaults.span();
    let mut raw_defaults = raw.defaults.into_inner();
    raw_defaults.forwarding = Some(
        raw_defaults
            .forwarding
            .take()
            .unwrap_or_default()
            .over(&raw.forwarding.unwrap_or_default()),
    );
    if let Some(home) = &raw_defaults.home
        && !home.get_ref().contains("{user}")
    {
        return Err(v.at(
            home.span(),
            "defaults.home must contain {user}, or every user would share one home".into(),
        ));
    }
    let registries = images::registries(raw.registries, &base).map_err(|(s, m)| v.at(s, m))?;
    let quota = |raw: RawQuota, span: Range<usize>| -> Result<Quota, ConfigError> {
        let mut q = v.quota(raw, span, &base, &docker)?;
        q.registry = images::auth_for(&q.image, &registries);
        Ok(q)
    };
    if let Some(u) = &raw_defaults.users {
        return Err(v.at(u.span(), PROFILE_ONLY.into()));
    }
    let defaults = quota(raw_defaults.clone(), defaults_span)?;
    let mut users = BTreeMap::new();
    let mut raw_users = BTreeMap::new();
    for (name, q) in raw.users {
        let span = q.span();
        let q = q.into_inner().over(&raw_defaults);
        if let Some(u) = &q.users {
            return Err(v.at(u.span(), PROFILE_ONLY.into()));
        }
        users.insert(name.clone(), quota(q.clone(), span)?);
        raw_users.insert(name, q);
    }
    let mut profiles = Profiles::default();
    for (name, p) in raw.profiles {
        let span = p.span();
        let p = p.into_inner();
        if let Some(home) = &p.home {
            return Err(v.at(
                home.span(),
                "a profile cannot set home: a user's profiles share their home".into(),
            ));
        }
        let Some(allowed) = p.users.clone() else {
            return Err(v.at(
                span,
                format!(
                    "profile {name}: set `users = [...]`, the users who may log in as USER+{name}"
                ),
            ));
        };
        for user in allowed.into_inner() {
            let own = raw_users.get(&user).unwrap_or(&raw_defaults);
            let mut q = quota(p.clone().over(own), span.clone())?;
            q.profile = Some(name.clone());
            profiles.quotas.insert((name.clone(), user), q);
        }
    }
    Ok(Config {
        source: path.to_owned(),
        server,
        docker,
        gpu,
        admin,
        defaults,
        users,
        profiles,
    })
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn at(&self, span: Range<usize>, message: String) -> ConfigError {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError::At {
            path: self.path.to_owned(),
            line,
            column,
            message,
        }
    }

    fn quota(
        &self,
        raw: RawQuota,
        table: Range<usize>,
        base: &Path,
        docker: &DockerConfig,
    ) -> Result<Quota, ConfigError> {
        let image = raw.image.ok_or_else(|| {
            self.at(
                table.clone(),
                "no image: set `image` in [defaults] or in this user's table".into(),
            )
        })?;
        let home = match raw.home {
            Some(h) => {
                let p = PathBuf::from(h.get_ref());
                let p = if p.is_absolute() { p } else { base.join(p) };
                p.to_string_lossy().into_owned()
            }
            None => "/var/lib/labgate/home/{user}".to_owned(),
        };
        let mut mounts = Vec::new();
        for m in raw.mounts.unwrap_or_default() {
            let span = m.source.span();
            let source = m.source.into_inner();
            let source = if source.is_absolute() {
                source
            } else {
                base.join(source)
            };
            if is_docker_socket(&source, &docker.socket) {
                return Err(self.at(
                    span,
                    format!(
                        "mount source {} is or contains the Docker socket: containers never see it",
                        source.display()
                    ),
                ));
            }
            mounts.push(Mount {
                source,
                target: m.target.0,
                writable: m.writable,
            });
        }
        let accept_env = match raw.accept_env {
            None => ["TERM", "LANG", "LC_*", "GIT_PROTOCOL"]
                .map(String::from)
                .to_vec(),
            Some(patterns) => {
                let mut out = Vec::with_capacity(patterns.len());
                for p in patterns {
                    let span = p.span();
                    let p = p.into_inner();
                    check_env_pattern(&p).map_err(|m| self.at(span, m))?;
                    out.push(p);
                }
                out
            }
        };
        Ok(Quota {
            image: image.0,
            memory: raw.memory.map(|m| m.0),
            cpus: raw.cpus.map(|c| c.0),
            shm: raw.shm,
            pids: raw.pids.map(|p| p.0),
            gpus: raw.gpus.unwrap_or_default(),
            home,
            mounts,
            shell: raw.shell.map(|s| s.0),
            env: raw
                .env
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.0, v))
                .collect(),
            gid: raw.gid.or(match raw.uid {
                Some(UidRule::Fixed(uid)) => Some(uid),
                _ => None,
            }),
            uid: raw.uid,
            accept_env,
            forwarding: self.forwarding(raw.forwarding.unwrap_or_default())?,
            idle_stop: raw.idle_stop.and_then(|i| i.0),
            pull_policy: raw.pull_policy.unwrap_or_default(),
            registry: None,
            profile: None,
        })
    }

    fn forwarding(&self, raw: RawForwarding) -> Result<ForwardPolicy, ConfigError> {
        let mut allow = Vec::new();
        for rule in raw.allow.unwrap_or_default() {
            let span = rule.span();
            allow.push(
                rule.get_ref()
                    .parse::<AllowRule>()
                    .map_err(|m| self.at(span, m))?,
            );
        }
        Ok(ForwardPolicy {
            local: raw.local.unwrap_or(true),
            remote: raw.remote.unwrap_or(true),
            unix: raw.unix.unwrap_or(true),
            allow,
        })
    }
}

fn is_docker_socket(source: &Path, socket: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let source = canon(source);
    [
        canon(socket),
        canon(Path::new("/var/run/docker.sock")),
        canon(Path::new("/run/docker.sock")),
    ]
    .iter()
    .any(|s| source == *s || s.starts_with(&source) && source != Path::new("/"))
        || source == Path::new("/")
}

#[cfg(test)]
mod tests;
