//! `GET /api/lab`: what the lab page shows, as one JSON document ([`Lab`]), gathered from the
//! gateway's live state (GPUs, holders, activity, the queue, containers, connections) and the
//! accounting database. Nothing here names a key, a fingerprint, a client address, an image
//! or a path: the page is meant for the whole lab. With `dashboard_show_users = false`, user
//! names become stable anonymous labels ([`Names`]).

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::auth::Username;
use crate::login::Context;

/// How long the engine may take to list containers before the page says it is unreachable.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the lab page shows (`GET /api/lab`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lab {
    /// When this was gathered (RFC 3339, UTC).
    pub generated: String,
    /// The gateway's health.
    pub health: Health,
    /// Every GPU of every node, by node and index.
    pub gpus: Vec<Gpu>,
    /// Logins waiting for GPUs, in the order they are served.
    pub queue: Vec<Waiter>,
    /// Every container the gateway manages, by user.
    pub containers: Vec<Container>,
    /// GPU-hours per user, last 7 and last 30 days.
    pub usage: Usage,
}

/// The gateway's health, as the page's header shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    /// `ok`, or `degraded` when the engine or the GPUs cannot be read.
    pub status: String,
    /// `ok`, `unreachable` or `no answer within 5s` (the reasons are in the log and
    /// `/healthz`, not on a page for the whole lab).
    pub engine: String,
    /// `ok`, `none` (no NVML on this host) or `error`.
    pub gpus: String,
    /// Whether GPU usage is kept on disk (else in memory since the gateway started).
    pub accounting_persistent: bool,
    /// Authenticated connections now.
    pub connections: usize,
    /// labgate's version.
    pub version: String,
}

/// One GPU.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Gpu {
    /// The node (host) it is on.
    pub node: String,
    /// NVML index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Memory in use, bytes.
    pub memory_used: u64,
    /// Memory in all, bytes.
    pub memory_total: u64,
    /// Utilisation now, percent (`None`: not reported).
    pub utilization: Option<u32>,
    /// Mean utilisation per 5 minutes over the last 24 hours, oldest first (288 points;
    /// `null` where it was not sampled).
    pub history: Vec<Option<u32>>,
    /// Who holds it (empty: free).
    pub holders: Vec<Holder>,
    /// Seconds it has been idle without a break (`None`: busy or not yet sampled).
    pub idle_secs: Option<u64>,
    /// Whether labgate may hand it out (false: MIG mode).
    pub allocatable: bool,
}

/// Who holds a GPU.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    /// The user (or anonymous label), with `+profile` for a profile's container.
    pub user: String,
    /// Since when (RFC 3339), when known.
    pub since: Option<String>,
}

/// One place in the GPU queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Waiter {
    /// 1: served next.
    pub position: usize,
    /// The user (or anonymous label), with `+profile`.
    pub user: String,
    /// GPUs it waits for.
    pub gpus: usize,
    /// Since when (RFC 3339).
    pub since: String,
    /// Seconds waited so far.
    pub waited_secs: u64,
    /// Its logins waiting.
    pub logins: usize,
}

/// One container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Container {
    /// Its user (or anonymous label).
    pub user: String,
    /// Its profile, for `user+profile` containers.
    pub profile: Option<String>,
    /// The engine's state (`running`, `exited`...).
    pub state: String,
    /// The node it is on.
    pub node: String,
    /// CPU limit in cores (`None`: unlimited).
    pub cpus: Option<f64>,
    /// Memory limit in bytes (`None`: unlimited).
    pub memory: Option<u64>,
    /// NVML indexes of the GPUs it holds.
    pub gpus: Vec<u32>,
    /// Connections working in it now.
    pub connections: usize,
}

/// GPU-hours per user over two periods.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    /// The last 7 days.
    pub week: Vec<UserUsage>,
    /// The last 30 days.
    pub month: Vec<UserUsage>,
}

/// One user's GPU use in a period (all their profiles together).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserUsage {
    /// The user (or anonymous label).
    pub user: String,
    /// GPU-hours held.
    pub gpu_hours: f64,
    /// GPU-hours busy (held, weighted by utilisation).
    pub busy_hours: f64,
}

/// How the page names users: as they are, or by a label that stays the same for a user
/// while the gateway runs and says nothing about the name (a keyed hash, its key drawn at
/// start).
#[derive(Debug, Clone)]
pub struct Names {
    /// Whether names are shown.
    show: bool,
    /// The hash's key.
    key: std::hash::RandomState,
}

impl Names {
    /// Names shown (`true`) or hidden behind labels keyed by `key`.
    pub fn with_key(show: bool, key: std::hash::RandomState) -> Self {
        Self { show, key }
    }

    /// How a holder (`alice` or `alice+gpu`) is shown: the profile stays, the user may not.
    pub fn holder(&self, holder: &str) -> String {
        match holder.split_once('+') {
            Some((user, profile)) => format!("{}+{profile}", self.user(user)),
            None => self.user(holder),
        }
    }

    /// How a user is shown.
    pub fn user(&self, user: &str) -> String {
        if self.show {
            user.to_owned()
        } else {
            format!("user-{:06x}", self.key.hash_one(user) & 0xff_ffff)
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// This host's name: the node column of the single-host Docker backend (a cluster backend
/// names each GPU's and container's node).
pub fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Gathers the page's data at `now`, naming users as `names` says.
pub async fn collect(ctx: &Context, names: &Names, now: SystemTime) -> Lab {
    let node = host_name();
    let (inventory, gpus_health) = match ctx.runtime.gpus().await {
        Ok(g) => (g, "ok".to_owned()),
        Err(crate::gpu::GpuError::NoNvml(_)) => (Vec::new(), "none".to_owned()),
        // The reasons (paths, library errors) are for the admin's log and /healthz.
        Err(_) => (Vec::new(), "error".to_owned()),
    };
    let holders = ctx.runtime.gpu_holders();
    let index_of: BTreeMap<_, _> = inventory
        .iter()
        .map(|g| (g.uuid.clone(), g.index))
        .collect();
    let mut gpus: Vec<Gpu> = inventory
        .iter()
        .map(|g| Gpu {
            node: ctx
                .runtime
                .gpu_node(&g.uuid)
                .unwrap_or_else(|| node.clone()),
            index: g.index,
            name: g.name.clone(),
            memory_used: g.memory_used,
            memory_total: g.memory_total,
            utilization: g.utilization,
            history: ctx.activity.history(&g.uuid, now),
            holders: holders
                .get(&g.uuid)
                .into_iter()
                .flatten()
                .map(|h| Holder {
                    user: names.holder(h.as_str()),
                    since: ctx.runtime.gpu_held_since(h).map(rfc3339),
                })
                .collect(),
            idle_secs: ctx.activity.idle_for(&g.uuid, now).map(|d| d.as_secs()),
            allocatable: g.allocatable(),
        })
        .collect();
    gpus.sort_by(|a, b| (&a.node, a.index).cmp(&(&b.node, b.index)));

    let queue = ctx
        .gpu_line
        .line()
        .into_iter()
        .enumerate()
        .map(|(i, p)| Waiter {
            position: i + 1,
            user: names.holder(p.holder.as_str()),
            gpus: p.wants,
            since: rfc3339(p.since),
            waited_secs: now.duration_since(p.since).unwrap_or_default().as_secs(),
            logins: p.logins,
        })
        .collect();

    let connections = ctx.connections.list();
    let config = ctx.config.borrow().clone();
    let (managed, engine) =
        match tokio::time::timeout(ENGINE_TIMEOUT, ctx.runtime.list_managed()).await {
            Ok(Ok(m)) => (m, "ok".to_owned()),
            Ok(Err(_)) => (Vec::new(), "unreachable".to_owned()),
            Err(_) => (Vec::new(), "no answer within 5s".to_owned()),
        };
    let mut containers: Vec<Container> = managed
        .into_iter()
        .map(|c| {
            let quota = c.owner().map(|(user, _)| c.quota(&config, &user));
            Container {
                user: names.user(&c.user),
                profile: c.profile.as_ref().map(ToString::to_string),
                state: c.state.to_string(),
                node: c.node.clone().unwrap_or_else(|| node.clone()),
                cpus: quota.and_then(|q| q.cpus),
                memory: quota.and_then(|q| q.memory).map(|m| m.0),
                gpus: c
                    .gpus
                    .iter()
                    .filter_map(|u| index_of.get(u).copied())
                    .collect(),
                connections: connections.iter().filter(|k| k.container == c.name).count(),
            }
        })
        .collect();
    containers.sort_by(|a, b| (&a.user, &a.profile).cmp(&(&b.user, &b.profile)));

    let usage = Usage {
        week: usage(ctx, names, now, 7).await,
        month: usage(ctx, names, now, 30).await,
    };
    let healthy = engine == "ok" && (gpus_health == "ok" || gpus_health == "none");
    Lab {
        generated: rfc3339(now),
        health: Health {
            status: if healthy { "ok" } else { "degraded" }.to_owned(),
            engine,
            gpus: gpus_health,
            accounting_persistent: ctx.accounting.persistent(),
            connections: connections.len(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
        gpus,
        queue,
        containers,
        usage,
    }
}

/// GPU-hours per user over the last `days` days, most first (users with none left out).
async fn usage(ctx: &Context, names: &Names, now: SystemTime, days: u64) -> Vec<UserUsage> {
    let since = now
        .checked_sub(Duration::from_secs(days * 86_400))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let rows = ctx.accounting.report(since).await.unwrap_or_default();
    let mut per_user: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for r in rows {
        let account = Username::parse(&r.user).map_or(r.user.clone(), |u| u.account().to_string());
        let e = per_user.entry(account).or_default();
        e.0 += r.gpu_seconds_held;
        e.1 += r.gpu_seconds_busy;
    }
    let mut out: Vec<UserUsage> = per_user
        .into_iter()
        .filter(|(_, (held, _))| *held > 0.0)
        .map(|(user, (held, busy))| UserUsage {
            user: names.user(&user),
            gpu_hours: held / 3600.0,
            busy_hours: busy / 3600.0,
        })
        .collect();
    out.sort_by(|a, b| {
        b.gpu_hours
            .total_cmp(&a.gpu_hours)
            .then(a.user.cmp(&b.user))
    });
    out
}
