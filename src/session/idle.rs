//! Idle stop: a running container whose quota sets `idle_stop` is stopped once it has been
//! unused that long; its GPUs are released, its home and the container itself are kept (the
//! next login starts it again).
//!
//! A container is in use while any SSH connection of its user is open (an `ssh -N -L` tunnel
//! with no channel open counts), or while any of its GPUs is busier than
//! `[gpu] busy_utilization`. The stop itself happens under the user's start lock after a last
//! look at the connections, so a login that arrives at that moment either keeps the container
//! or starts it again; it never gets a container stopped under it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::auth::Username;
use crate::config::Config;
use crate::gpu::{GpuInfo, GpuUuid};
use crate::login::Context;
use crate::metrics::metrics;
use crate::runtime::ManagedContainer;

/// How often containers are looked at: a quarter of the shortest `idle_stop`, between one
/// second and a minute. `None` when no quota stops containers.
fn period(config: &Config) -> Option<Duration> {
    std::iter::once(&config.defaults)
        .chain(config.configured_users().map(|u| config.quota_for(u)))
        .filter_map(|q| q.idle_stop)
        .min()
        .map(|d| (d / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)))
}

/// Moves the start of `name`'s idle time `by` into the past (tests: time passing).
#[cfg(test)]
pub(crate) fn backdate(timers: &crate::login::IdleTimers, name: &str, by: Duration) {
    if let Some(since) = timers.timers().get_mut(name) {
        *since -= by;
    }
}

/// Runs idle stop until `stop` turns true.
pub async fn run(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    loop {
        let config = ctx.config.borrow().clone();
        let wait = period(&config);
        if wait.is_some() {
            sweep(&ctx, &config).await;
        }
        let mut config_rx = ctx.config.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(60))) => {}
            // A reload may turn idle stop on or shorten it.
            _ = config_rx.changed() => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// One look at every managed container.
pub(crate) async fn sweep(ctx: &Context, config: &Config) {
    let list = match ctx.runtime.list_managed().await {
        Ok(list) => list,
        Err(e) => {
            debug!("idle stop: cannot list containers: {e}");
            return;
        }
    };
    let running: Vec<&ManagedContainer> = list.iter().filter(|c| c.state.is_running()).collect();
    ctx.idle
        .timers()
        .retain(|name, _| running.iter().any(|c| &c.name == name));
    let gpus = if running.iter().any(|c| !c.gpus.is_empty()) {
        ctx.runtime.gpus().await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let now = SystemTime::now();
    for c in running {
        let Some((user, _)) = c.owner() else {
            continue;
        };
        let Some(limit) = c.quota(config, &user).idle_stop else {
            ctx.idle.timers().remove(&c.name);
            continue;
        };
        let busy_gpu = busy_gpu(&c.gpus, &gpus, config.gpu.busy_utilization);
        if ctx.connections.in_use(&c.name) || busy_gpu.is_some() {
            if let Some(g) = busy_gpu {
                debug!(container = %c.name, gpu = %g, "in use: GPU busy");
            }
            ctx.idle.timers().remove(&c.name);
            continue;
        }
        let since = *ctx.idle.timers().entry(c.name.clone()).or_insert(now);
        let idle = now.duration_since(since).unwrap_or_default();
        if idle >= limit {
            stop_idle(ctx, c, &user, idle).await;
        }
    }
}

/// The first of `mine` that is busier than `threshold` percent.
fn busy_gpu<'a>(mine: &'a [GpuUuid], all: &[GpuInfo], threshold: u32) -> Option<&'a GpuUuid> {
    mine.iter().find(|uuid| {
        all.iter()
            .any(|g| &g.uuid == *uuid && g.utilization.is_some_and(|u| u > threshold))
    })
}

async fn stop_idle(ctx: &Context, c: &ManagedContainer, user: &Username, idle: Duration) {
    let connections = ctx.connections.clone();
    let name = c.name.clone();
    let result = ctx
        .runtime
        .stop(c, Box::new(move || !connections.in_use(&name)))
        .await;
    match result {
        Ok(true) => {
            ctx.gpu_line.freed();
            ctx.idle.timers().remove(&c.name);
            metrics().idle_stop();
            let idle = humantime::format_duration(Duration::from_secs(idle.as_secs()));
            info!(target: "audit", user = %user, container = %c.name, idle = %idle, "container stopped: idle");
        }
        Ok(false) => {
            ctx.idle.timers().remove(&c.name);
        }
        Err(e) => warn!(user = %user, container = %c.name, "idle stop failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::parse(std::path::Path::new("/etc/labgate/labgate.toml"), text).unwrap()
    }

    #[test]
    fn period_follows_the_shortest_idle_stop() {
        let none = config("[defaults]\nimage = \"x\"\n");
        assert_eq!(period(&none), None);
        let two_hours = config("[defaults]\nimage = \"x\"\nidle_stop = \"2h\"\n");
        assert_eq!(period(&two_hours), Some(Duration::from_secs(60)));
        let short = config(
            "[defaults]\nimage = \"x\"\nidle_stop = \"2h\"\n[users.alice]\nidle_stop = \"8s\"\n[users.bob]\nidle_stop = \"never\"\n",
        );
        assert_eq!(period(&short), Some(Duration::from_secs(2)));
        let bob = Username::parse("bob").unwrap();
        assert_eq!(short.quota_for(&bob).idle_stop, None);
    }

    #[test]
    fn a_gpu_above_the_threshold_keeps_the_container_busy() {
        let uuid = |s: &str| GpuUuid::parse(s).unwrap();
        let gpu = |u: &str, utilization: Option<u32>| GpuInfo {
            index: 0,
            uuid: uuid(u),
            name: "Fake A100".into(),
            memory_total: 80 << 30,
            mig_mode: None,
            utilization,
            memory_used: 0,
            processes: Vec::new(),
        };
        let all = [
            gpu("GPU-a", Some(40)),
            gpu("GPU-b", Some(2)),
            gpu("GPU-c", None),
        ];
        assert_eq!(busy_gpu(&[uuid("GPU-a")], &all, 5), Some(&uuid("GPU-a")));
        assert_eq!(busy_gpu(&[uuid("GPU-b"), uuid("GPU-c")], &all, 5), None);
        assert_eq!(busy_gpu(&[uuid("GPU-a")], &all, 50), None);
    }
}
