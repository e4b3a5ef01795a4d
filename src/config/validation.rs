//! Building the validated [`Config`] from the raw tables of [`super::raw`]: defaults
//! applied, relative paths resolved against the config file's directory, cross-field checks,
//! and every error placed at its `file:line:column`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::raw::{RawConfig, RawForwarding, RawQuota};
use super::validated::*;
use super::{ConfigError, Profiles, UidRule, helpers, images};
use crate::config::policy::{AllowRule, ForwardPolicy};

/// The message for `users = [...]` outside a profile table.
const PROFILE_ONLY: &str =
    "`users` belongs in a [profiles.NAME] table (the users who may use the profile)";

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
        listen: raw.server.listen.unwrap_or(DEFAULT_LISTEN),
        host_key: resolve(
            raw.server
                .host_key
                .unwrap_or_else(|| PathBuf::from(DEFAULT_HOST_KEY)),
        ),
        keys_dir: resolve(
            raw.server
                .keys_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_KEYS_DIR)),
        ),
        max_connections: raw
            .server
            .max_connections
            .map_or(DEFAULT_MAX_CONNECTIONS, |n| n.0 as usize),
        max_connections_per_user: raw
            .server
            .max_connections_per_user
            .map_or(DEFAULT_MAX_CONNECTIONS_PER_USER, |n| n.0 as usize),
        max_sessions: raw
            .server
            .max_sessions
            .map_or(DEFAULT_MAX_SESSIONS, |n| n.0 as usize),
        max_startups: raw
            .server
            .max_startups
            .map_or(DEFAULT_MAX_STARTUPS, |n| n.0 as usize),
        login_grace: raw.server.login_grace.map_or(DEFAULT_LOGIN_GRACE, |d| d.0),
        keepalive: raw.server.keepalive.map_or(DEFAULT_KEEPALIVE, |d| d.0),
        motd: raw.server.motd.filter(|m| !m.trim().is_empty()),
        login_status: raw.server.login_status.unwrap_or(DEFAULT_LOGIN_STATUS),
        end_sessions_on_key_removal: raw
            .server
            .end_sessions_on_key_removal
            .unwrap_or(DEFAULT_END_SESSIONS_ON_KEY_REMOVAL),
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
    let admin_listen = raw.admin.listen.as_ref().map(|l| *l.get_ref());
    let admin = AdminConfig {
        socket: resolve(
            raw.admin
                .socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET)),
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
        dashboard_listen: match raw.admin.dashboard_listen {
            Some(d) if d.get_ref().port() != 0 && admin_listen == Some(*d.get_ref()) => {
                return Err(v.at(
                    d.span(),
                    format!(
                        "[admin] dashboard_listen = \"{}\" is the same address as listen, which serves the lab page already: leave dashboard_listen out, or give it another address",
                        d.get_ref()
                    ),
                ));
            }
            d => d.map(Spanned::into_inner),
        },
        dashboard_show_users: raw.admin.dashboard_show_users.unwrap_or(true),
    };
    let helper_dirs = helpers::search_dirs();
    let docker = DockerConfig {
        socket: resolve(
            raw.docker
                .socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DOCKER_SOCKET)),
        ),
        timeout: raw.docker.timeout.map_or(DEFAULT_DOCKER_TIMEOUT, |d| d.0),
        network: raw
            .docker
            .network
            .unwrap_or_else(|| DEFAULT_NETWORK.to_owned()),
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
    let cluster = raw
        .cluster
        .validate(resolve)
        .map_err(|(span, message)| v.at(span, message))?;
    Ok(Config {
        source: path.to_owned(),
        server,
        cluster,
        docker,
        gpu,
        admin,
        defaults,
        users,
        profiles,
    })
}

pub(super) struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    pub(super) fn at(&self, span: Range<usize>, message: String) -> ConfigError {
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
            None => DEFAULT_HOME.to_owned(),
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
            None => DEFAULT_ACCEPT_ENV.map(String::from).to_vec(),
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
        let mut constraints = Vec::new();
        for c in raw.constraints.unwrap_or_default() {
            let span = c.span();
            let c = c.into_inner();
            super::cluster::check_constraint(&c).map_err(|m| self.at(span, m))?;
            constraints.push(c);
        }
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
            gpu_share: raw.gpu_share.map_or(1.0, |w| w.0),
            gpu_hours_per_week: raw.gpu_hours_per_week.map(|h| h.0),
            gpu_queue: raw.gpu_queue,
            gpu_max_wait: match raw.gpu_max_wait {
                None => None,
                Some(d) if d.get_ref().0 >= std::time::Duration::from_secs(1) => {
                    Some(d.into_inner().0)
                }
                Some(d) => return Err(self.at(d.span(), "gpu_max_wait must be at least 1s".into())),
            },
            gpu_reclaim: raw.gpu_reclaim.unwrap_or(DEFAULT_GPU_RECLAIM),
            pull_policy: raw.pull_policy.unwrap_or_default(),
            constraints,
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
            local: raw.local.unwrap_or(DEFAULT_FORWARDING),
            remote: raw.remote.unwrap_or(DEFAULT_FORWARDING),
            unix: raw.unix.unwrap_or(DEFAULT_FORWARDING),
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
