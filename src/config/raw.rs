//! The file format as serde reads it: the `Raw*` tables (`deny_unknown_fields`, every key
//! optional, positions kept with [`Spanned`] where a later check reports one) and the
//! newtypes that reject a bad value at parse time, so serde reports that value's own
//! position. Merging (`[users.NAME]` over `[defaults]`, a profile over a user) happens here,
//! on raw tables; [`super::validation`] turns the result into the validated types.
//! Nothing outside `config` sees these types.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::{ByteSize, ForwardVia, GpuRequest, HumanDuration, PullPolicy, UidRule, gpu, images};
use crate::auth::Username;

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
pub(super) struct UidRange(pub(super) std::ops::RangeInclusive<u32>);

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) cluster: super::cluster::RawCluster,
    #[serde(default)]
    pub(super) docker: RawDocker,
    #[serde(default)]
    pub(super) gpu: gpu::RawGpu,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    pub(super) defaults: Spanned<RawQuota>,
    #[serde(default)]
    pub(super) users: BTreeMap<Username, Spanned<RawQuota>>,
    pub(super) forwarding: Option<RawForwarding>,
    #[serde(default)]
    pub(super) registries: BTreeMap<String, Spanned<images::RawRegistry>>,
    #[serde(default)]
    pub(super) profiles: BTreeMap<crate::auth::ProfileName, Spanned<RawQuota>>,
}

/// `[forwarding]` (everyone) and `[users.NAME.forwarding]` (one user), merged field by field.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawForwarding {
    pub(super) local: Option<bool>,
    pub(super) remote: Option<bool>,
    pub(super) unix: Option<bool>,
    pub(super) allow: Option<Vec<Spanned<String>>>,
}

impl RawForwarding {
    pub(super) fn over(self, base: &RawForwarding) -> RawForwarding {
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
pub(super) struct RawServer {
    pub(super) listen: Option<SocketAddr>,
    pub(super) host_key: Option<PathBuf>,
    pub(super) keys_dir: Option<PathBuf>,
    pub(super) max_connections: Option<Positive>,
    pub(super) max_connections_per_user: Option<Positive>,
    pub(super) max_sessions: Option<Positive>,
    pub(super) max_startups: Option<Positive>,
    pub(super) login_grace: Option<HumanDuration>,
    pub(super) keepalive: Option<HumanDuration>,
    pub(super) motd: Option<String>,
    pub(super) login_status: Option<bool>,
    pub(super) end_sessions_on_key_removal: Option<bool>,
    pub(super) trusted_user_ca_keys: Option<Spanned<PathBuf>>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) auto_uids: Option<UidRange>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) socket: Option<PathBuf>,
    pub(super) listen: Option<Spanned<SocketAddr>>,
    pub(super) audit_log: Option<PathBuf>,
    pub(super) dashboard_listen: Option<Spanned<SocketAddr>>,
    pub(super) dashboard_show_users: Option<bool>,
}

/// `idle_stop`: a duration, or `"never"` (a user's table can turn off the default's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct IdleStop(pub(super) Option<Duration>);

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
pub(super) struct RawDocker {
    pub(super) socket: Option<PathBuf>,
    pub(super) timeout: Option<HumanDuration>,
    pub(super) network: Option<String>,
    pub(super) relay_helper: Option<PathBuf>,
    pub(super) sftp_helper: Option<PathBuf>,
    pub(super) forward_via: Option<ForwardVia>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuota {
    pub(super) image: Option<Image>,
    pub(super) memory: Option<Memory>,
    pub(super) cpus: Option<Cpus>,
    pub(super) shm: Option<ByteSize>,
    pub(super) pids: Option<Positive>,
    pub(super) gpus: Option<GpuRequest>,
    pub(super) gpu_share: Option<Share>,
    pub(super) gpu_hours_per_week: Option<Budget>,
    pub(super) gpu_queue: Option<bool>,
    pub(super) gpu_max_wait: Option<Spanned<HumanDuration>>,
    pub(super) gpu_reclaim: Option<bool>,
    pub(super) home: Option<Spanned<String>>,
    pub(super) mounts: Option<Vec<RawMount>>,
    pub(super) shell: Option<ContainerPath>,
    pub(super) env: Option<BTreeMap<EnvName, String>>,
    pub(super) uid: Option<UidRule>,
    pub(super) gid: Option<u32>,
    pub(super) accept_env: Option<Vec<Spanned<String>>>,
    pub(super) forwarding: Option<RawForwarding>,
    pub(super) idle_stop: Option<IdleStop>,
    pub(super) pull_policy: Option<PullPolicy>,
    pub(super) constraints: Option<Vec<Spanned<String>>>,
    /// Only in `[profiles.NAME]`: who may use the profile.
    pub(super) users: Option<Spanned<Vec<Username>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMount {
    pub(super) source: Spanned<PathBuf>,
    pub(super) target: ContainerPath,
    #[serde(default)]
    pub(super) writable: bool,
}

/// A value that can only be valid or rejected at parse time, with the reason; each newtype
/// below checks one field so serde reports the field's own position.
macro_rules! checked {
    ($name:ident, $inner:ty, $check:expr) => {
        checked!($name, $inner, [], $check);
    };
    ($name:ident, $inner:ty, [$($derive:ident),*], $check:expr) => {
        #[derive(Debug, Clone, PartialEq, PartialOrd $(, $derive)*)]
        pub(super) struct $name(pub(super) $inner);
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
checked!(Share, f64, |w| {
    if w.is_finite() && *w > 0.0 && *w <= 1000.0 {
        Ok(())
    } else {
        Err(format!(
            "gpu_share must be a positive weight (1 is everyone's default; 2 counts usage half), not {w}"
        ))
    }
});
checked!(Budget, f64, |h| {
    if h.is_finite() && *h > 0.0 && *h <= 168.0 * 1024.0 {
        Ok(())
    } else {
        Err(format!(
            "gpu_hours_per_week must be a number of GPU-hours above 0 (e.g. 40), not {h}"
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
impl RawQuota {
    /// Fields of `self` where set, else those of `base`.
    pub(super) fn over(self, base: &RawQuota) -> RawQuota {
        RawQuota {
            image: self.image.or_else(|| base.image.clone()),
            memory: self.memory.or_else(|| base.memory.clone()),
            cpus: self.cpus.or_else(|| base.cpus.clone()),
            shm: self.shm.or(base.shm),
            pids: self.pids.or_else(|| base.pids.clone()),
            gpus: self.gpus.or_else(|| base.gpus.clone()),
            gpu_share: self.gpu_share.or_else(|| base.gpu_share.clone()),
            gpu_hours_per_week: self
                .gpu_hours_per_week
                .or_else(|| base.gpu_hours_per_week.clone()),
            gpu_queue: self.gpu_queue.or(base.gpu_queue),
            gpu_max_wait: self.gpu_max_wait.or_else(|| base.gpu_max_wait.clone()),
            gpu_reclaim: self.gpu_reclaim.or(base.gpu_reclaim),
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
            constraints: self.constraints.or_else(|| base.constraints.clone()),
            users: self.users,
            forwarding: Some(
                self.forwarding
                    .unwrap_or_default()
                    .over(&base.forwarding.clone().unwrap_or_default()),
            ),
        }
    }
}
