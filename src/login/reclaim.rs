//! Reclaim of idle GPUs for waiting logins (`[gpu] reclaim_idle`), carried out. Every 2 s
//! (sooner when a deadline is due), while reclaim is on and a login waits or a warning
//! stands, this lists the running containers that hold GPUs, asks [`crate::gpu::reclaim`]
//! what to do, and does it: tells the owner's sessions ([`super::notice`]), writes the audit
//! log, and at a deadline stops the container (home and container kept, as idle stop), so
//! the first in line gets its GPUs.
//!
//! At the deadline the GPUs are read afresh, and the stop makes a last check under the user's
//! start lock (the backend's `stop`): someone still waits and the GPUs are still idle since
//! the warning; only then are the sessions told why and the container stopped. While nobody
//! waits, nothing is listed or decided.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Context;
use super::notice::Event;
use crate::gpu::reclaim::{Action, CallOff, Holder, Policy, Reclaimer};
use crate::metrics::metrics;
use crate::runtime::ManagedContainer;

/// How often reclaim looks (the usage sampler's period: no fresher activity exists).
const LOOK_EVERY: Duration = Duration::from_secs(2);

/// Runs reclaim until `stop` turns true.
pub async fn run(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let mut reclaimer = Reclaimer::default();
    loop {
        look(&ctx, &mut reclaimer, SystemTime::now()).await;
        // A deadline before the next look is kept to the moment.
        let wait = reclaimer
            .next_deadline()
            .map(|d| d.duration_since(SystemTime::now()).unwrap_or_default())
            .map_or(LOOK_EVERY, |d| d.min(LOOK_EVERY));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// One look at `now`: decides and acts.
pub(crate) async fn look(ctx: &Arc<Context>, reclaimer: &mut Reclaimer, now: SystemTime) {
    let config = ctx.config.borrow().clone();
    let policy = config.gpu.reclaim_idle.map(|idle| Policy {
        idle,
        warning: config.gpu.reclaim_warning,
    });
    if policy.is_none() && !reclaimer.any_warned() {
        return;
    }
    let wanted: usize = ctx.gpu_line.line().iter().map(|p| p.wants).sum();
    if wanted == 0 && !reclaimer.any_warned() {
        return;
    }
    let list = match ctx.runtime.list_managed().await {
        Ok(list) => list,
        Err(e) => {
            debug!("GPU reclaim: cannot list containers: {e}");
            return;
        }
    };
    let mut holders = Vec::new();
    let mut containers = HashMap::new();
    for c in list {
        if !c.state.is_running() || c.gpus.is_empty() {
            continue;
        }
        let Some((user, holder)) = c.owner() else {
            continue;
        };
        // A GPU idle before this container had it does not count against it.
        let held_for = ctx
            .runtime
            .gpu_held_since(&holder)
            .map(|since| now.duration_since(since).unwrap_or_default());
        let idle_for = ctx
            .activity
            .all_idle_for(&c.gpus, now)
            .map(|idle| held_for.map_or(idle, |held| idle.min(held)));
        holders.push(Holder {
            container: c.name.clone(),
            owner: user.clone(),
            gpus: c.gpus.len(),
            exempt: !c.quota(&config, &user).gpu_reclaim,
            idle_for,
        });
        containers.insert(c.name.clone(), c);
    }
    for action in reclaimer.tick(policy, wanted, &holders, now) {
        match action {
            Action::Warn {
                container,
                owner,
                idle_since,
                deadline,
            } => {
                ctx.notices.send(
                    &container,
                    Event::ReclaimWarning {
                        idle_since,
                        deadline,
                    },
                );
                info!(target: "audit", user = %owner, container = %container,
                    idle = %rounded(now, idle_since),
                    deadline = %humantime::format_rfc3339_seconds(deadline),
                    "GPU reclaim warning");
            }
            Action::CallOff {
                container,
                owner,
                why,
            } => call_off(ctx, &container, &owner, why),
            Action::Reclaim {
                container,
                owner,
                idle_since,
            } => {
                if let Some(c) = containers.get(&container) {
                    reclaim(ctx, c, &owner, idle_since).await;
                }
            }
        }
    }
}

/// `idle_since` to `now`, to the nearest second (as the user is told), as humantime writes
/// it (`2h 10m 5s`).
fn rounded(now: SystemTime, idle_since: SystemTime) -> humantime::FormattedDuration {
    let idle = now.duration_since(idle_since).unwrap_or_default();
    humantime::format_duration(Duration::from_secs(idle.as_secs_f64().round() as u64))
}

/// Tells `container`'s sessions its warning no longer stands (unless it is gone), and audits.
fn call_off(ctx: &Context, container: &str, owner: &crate::auth::Username, why: CallOff) {
    match why {
        CallOff::Gone => ctx.notices.clear(container),
        why => ctx.notices.send(container, Event::ReclaimCalledOff { why }),
    }
    let reason = match why {
        CallOff::UsedAgain => "GPUs used again",
        CallOff::NobodyWaits => "nobody waits",
        CallOff::Gone => "container stopped",
        CallOff::Exempt => "exempt or reclaim off",
    };
    info!(target: "audit", user = %owner, container = %container, reason, "GPU reclaim called off");
}

/// Stops `c` for the line, if someone still waits and its GPUs are still idle since
/// `idle_since` when its user's start lock is held; its sessions are told why first.
async fn reclaim(
    ctx: &Arc<Context>,
    c: &ManagedContainer,
    owner: &crate::auth::Username,
    idle_since: SystemTime,
) {
    // A fresh reading rather than the last sample's: use in the window's last seconds counts.
    if let Ok(gpus) = ctx.runtime.gpus().await {
        let busy_at = ctx.config.borrow().gpu.busy_utilization;
        ctx.activity.observe(&gpus, busy_at, SystemTime::now());
    }
    let declined = Arc::new(AtomicBool::new(false));
    let still_wanted = {
        let (ctx, declined) = (ctx.clone(), declined.clone());
        let (name, gpus) = (c.name.clone(), c.gpus.clone());
        Box::new(move || {
            let now = SystemTime::now();
            let idle = ctx
                .activity
                .all_idle_for(&gpus, now)
                .is_some_and(|d| now.checked_sub(d).is_some_and(|s| s <= idle_since));
            if !idle || ctx.gpu_line.waiting() == 0 {
                declined.store(true, Ordering::SeqCst);
                return false;
            }
            ctx.notices.send(&name, Event::Reclaimed { idle_since });
            true
        })
    };
    match ctx.runtime.stop(c, still_wanted).await {
        Ok(true) => {
            ctx.gpu_line.freed();
            ctx.idle.timers().remove(&c.name);
            metrics().gpu_reclaim();
            info!(target: "audit", user = %owner, container = %c.name,
                idle = %rounded(SystemTime::now(), idle_since),
                "container stopped: GPUs reclaimed");
        }
        Ok(false) if declined.load(Ordering::SeqCst) => {
            let why = if ctx.gpu_line.waiting() == 0 {
                CallOff::NobodyWaits
            } else {
                CallOff::UsedAgain
            };
            call_off(ctx, &c.name, owner, why);
        }
        Ok(false) => ctx.notices.clear(&c.name),
        Err(e) => {
            ctx.notices.clear(&c.name);
            warn!(user = %owner, container = %c.name, "GPU reclaim: stop failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::gpu::{GpuInfo, GpuUuid};
    use crate::login::ensure_container;
    use crate::login::notice::Subscription;
    use crate::login::testing::{config, context, login};

    const HOUR: Duration = Duration::from_secs(3600);
    const MINUTE: Duration = Duration::from_secs(60);

    /// The fake backend's only GPU, at `utilization` percent.
    fn gpu(utilization: u32) -> GpuInfo {
        GpuInfo {
            index: 0,
            uuid: GpuUuid::parse("GPU-fake0").unwrap(),
            name: "Fake".into(),
            memory_total: 1 << 30,
            mig_mode: None,
            utilization: Some(utilization),
            memory_used: 0,
            processes: Vec::new(),
        }
    }

    /// A context whose users ask for 1 GPU of the fake's one, reclaimed after 1h idle with a
    /// 15m warning (`exempt`: alice has `gpu_reclaim = false`); alice holds it, idle 2h
    /// before `now`; her sessions' notices.
    async fn alice_holds_it_idle(
        now: SystemTime,
        exempt: bool,
    ) -> (
        Arc<Context>,
        Arc<crate::runtime::fake::FakeRuntime>,
        Subscription,
    ) {
        let alice = if exempt {
            "\n[users.alice]\ngpu_reclaim = false\n"
        } else {
            ""
        };
        let (ctx, fake) = context(config(&format!(
            "gpus = 1\n{alice}\n[gpu]\nreclaim_idle = \"1h\"\nreclaim_warning = \"15m\"\n"
        )));
        fake.gpu_slots.store(1, Ordering::SeqCst);
        ensure_container(&ctx, &login(&ctx, "alice", None))
            .await
            .unwrap();
        *fake.gpus.lock().unwrap() = vec![gpu(0)];
        ctx.activity.observe(&[gpu(0)], 5, now - 2 * HOUR);
        let heard = ctx.notices.subscribe("labgate-alice");
        (ctx, fake, heard)
    }

    /// Bob logs in and waits in line for the GPU.
    async fn bob_waits(
        ctx: &Arc<Context>,
    ) -> tokio::task::JoinHandle<
        Result<crate::runtime::ContainerHandle, crate::runtime::RuntimeError>,
    > {
        let task = tokio::spawn({
            let ctx = ctx.clone();
            async move { ensure_container(&ctx, &login(&ctx, "bob", None)).await }
        });
        while ctx.gpu_line.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        task
    }

    #[tokio::test]
    async fn an_idle_holder_is_warned_then_stopped_for_the_one_who_waits() {
        let now = SystemTime::now();
        let (ctx, fake, mut alice) = alice_holds_it_idle(now, false).await;
        let mut r = Reclaimer::default();
        // Nobody waits: nothing, however long it has been idle.
        look(&ctx, &mut r, now).await;
        look(&ctx, &mut r, now + 24 * HOUR).await;
        assert_eq!(alice.try_next(), None);

        let bob = bob_waits(&ctx).await;
        look(&ctx, &mut r, now).await;
        assert_eq!(
            alice.try_next(),
            Some(Event::ReclaimWarning {
                idle_since: now - 2 * HOUR,
                deadline: now + 15 * MINUTE,
            })
        );
        // A session opened during the window is shown the warning too.
        assert!(matches!(
            ctx.notices.subscribe("labgate-alice").try_next(),
            Some(Event::ReclaimWarning { .. })
        ));
        look(&ctx, &mut r, now + 14 * MINUTE).await;
        assert_eq!(alice.try_next(), None);
        assert!(fake.running("labgate-alice"));
        // The deadline: stopped, its sessions told why, and Bob gets the GPU.
        look(&ctx, &mut r, now + 15 * MINUTE).await;
        assert_eq!(
            alice.try_next(),
            Some(Event::Reclaimed {
                idle_since: now - 2 * HOUR
            })
        );
        assert!(!fake.running("labgate-alice"));
        let served = tokio::time::timeout(Duration::from_secs(5), bob)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(served.gpus, [GpuUuid::parse("GPU-fake0").unwrap()]);
        assert!(fake.running("labgate-bob"));
        assert!(
            ctx.notices.subscribe("labgate-alice").try_next().is_none(),
            "no warning stands"
        );
    }

    #[tokio::test]
    async fn use_during_the_warning_calls_it_off_and_keeps_the_container() {
        let now = SystemTime::now();
        let (ctx, fake, mut alice) = alice_holds_it_idle(now, false).await;
        let mut r = Reclaimer::default();
        let bob = bob_waits(&ctx).await;
        look(&ctx, &mut r, now).await;
        assert!(matches!(
            alice.try_next(),
            Some(Event::ReclaimWarning { .. })
        ));
        *fake.gpus.lock().unwrap() = vec![gpu(90)];
        ctx.activity.observe(&[gpu(90)], 5, now + MINUTE);
        look(&ctx, &mut r, now + MINUTE).await;
        assert_eq!(
            alice.try_next(),
            Some(Event::ReclaimCalledOff {
                why: CallOff::UsedAgain
            })
        );
        // Idle again at once: not long enough for a new warning, past the old deadline too.
        *fake.gpus.lock().unwrap() = vec![gpu(0)];
        ctx.activity.observe(&[gpu(0)], 5, now + 2 * MINUTE);
        look(&ctx, &mut r, now + 20 * MINUTE).await;
        assert_eq!(alice.try_next(), None);
        assert!(fake.running("labgate-alice"));
        assert!(!bob.is_finished(), "bob still waits");
        bob.abort();
    }

    #[tokio::test]
    async fn use_the_last_sample_missed_is_seen_at_the_deadline() {
        let now = SystemTime::now();
        let (ctx, fake, mut alice) = alice_holds_it_idle(now, false).await;
        let mut r = Reclaimer::default();
        let bob = bob_waits(&ctx).await;
        look(&ctx, &mut r, now).await;
        assert!(matches!(
            alice.try_next(),
            Some(Event::ReclaimWarning { .. })
        ));
        // A job starts after the last sample: the GPUs are read again at the deadline.
        *fake.gpus.lock().unwrap() = vec![gpu(90)];
        look(&ctx, &mut r, now + 15 * MINUTE).await;
        assert_eq!(
            alice.try_next(),
            Some(Event::ReclaimCalledOff {
                why: CallOff::UsedAgain
            })
        );
        assert!(fake.running("labgate-alice"));
        bob.abort();
    }

    #[tokio::test]
    async fn an_exempt_holder_is_never_warned() {
        let now = SystemTime::now();
        let (ctx, fake, mut alice) = alice_holds_it_idle(now, true).await;
        let mut r = Reclaimer::default();
        let bob = bob_waits(&ctx).await;
        for later in [0, 1, 16, 600] {
            look(&ctx, &mut r, now + later * MINUTE).await;
        }
        assert_eq!(alice.try_next(), None);
        assert!(fake.running("labgate-alice"));
        bob.abort();
    }
}
