//! The usage sampler: every two seconds it reads the GPUs (utilisation, for
//! [`super::activity`]) and who holds them (the backend's holders), and charges each holder
//! the GPU-seconds held and busy since the last sample: to the accounting database
//! ([`crate::accounting`]), to the queue's fair share ([`super::gpuline`]) and to
//! `labgate_gpu_seconds_total`. A hold that ended is written to the audit log once, with its
//! whole length (`GPU use ended`), so the audit log and `labgate usage` add up the same.
//!
//! Time between samples is measured on tokio's clock, so unit tests with paused time see
//! usage to the second; what a sample is dated with comes from a [`Clock`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{info, warn};

use super::Context;
use crate::accounting::Charge;
use crate::auth::Username;
use crate::config::GpuUuid;

/// How often usage is sampled.
pub const PERIOD: Duration = Duration::from_secs(2);

/// What samples are dated with: the system's clock, or (tests) a start time moved on by
/// tokio's clock, which paused tests advance.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// `SystemTime::now()`.
    System,
    /// `start` plus the tokio time passed since `at`.
    Tokio {
        /// The time at `at`.
        start: SystemTime,
        /// When that was, on tokio's clock.
        at: Instant,
    },
}

impl Clock {
    /// A clock that moves with tokio's, starting now.
    pub fn tokio() -> Self {
        Clock::Tokio {
            start: SystemTime::now(),
            at: Instant::now(),
        }
    }

    /// The time now.
    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { start, at } => *start + at.elapsed(),
        }
    }
}

/// Samples usage every [`PERIOD`] until `stop` turns true.
pub async fn run(ctx: Arc<Context>, mut stop: tokio::sync::watch::Receiver<bool>, clock: Clock) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    let mut failing = false;
    let mut before = Held::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // A stop by the gateway (idle, admin, reclaim) ends a hold now: count it now.
            () = ctx.gpu_line.changed() => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
        let elapsed = last.elapsed();
        last = Instant::now();
        let ok = sample(&ctx, clock.now(), elapsed, &mut before).await;
        // One line when the database starts failing and one when it works again.
        if ok == failing {
            failing = !ok;
            if ok {
                info!("GPU accounting: writing again");
            }
        }
    }
}

/// `holder`'s charge for `secs` seconds of `gpus`: held, and busy as each GPU's utilisation
/// (percent) says.
fn charge(
    holder: Username,
    gpus: Vec<GpuUuid>,
    since: SystemTime,
    secs: f64,
    utilization: &impl Fn(&GpuUuid) -> u32,
    last: bool,
) -> Charge {
    let busy = gpus
        .iter()
        .map(|u| secs * f64::from(utilization(u).min(100)) / 100.0)
        .sum();
    Charge {
        held: secs * gpus.len() as f64,
        busy,
        since,
        gpus,
        holder,
        last,
    }
}

/// Each holder's GPUs and since when, as a sample saw them.
type Held = BTreeMap<Username, (Vec<GpuUuid>, SystemTime)>;

/// One sample, `elapsed` after the last, taken `now`; false when it could not be written.
/// `before`: the holders the last sample saw (a holder gone since is charged up to now, its
/// last charge: the gateway samples as soon as it stops a container, so that is when the
/// hold ended; a container that stopped by itself is charged up to the sample that noticed).
async fn sample(ctx: &Context, now: SystemTime, elapsed: Duration, before: &mut Held) -> bool {
    let gpus = ctx.runtime.gpus().await.ok();
    if let Some(gpus) = &gpus {
        let busy_at = ctx.config.borrow().gpu.busy_utilization;
        ctx.activity.observe(gpus, busy_at, now);
    }
    let utilization = |uuid: &GpuUuid| {
        gpus.as_ref()
            .and_then(|all| all.iter().find(|g| &g.uuid == uuid))
            .and_then(|g| g.utilization)
            .unwrap_or(0)
    };
    let mut held: BTreeMap<Username, Vec<GpuUuid>> = BTreeMap::new();
    for (uuid, holders) in ctx.runtime.gpu_holders() {
        for h in holders {
            held.entry(h).or_default().push(uuid.clone());
        }
    }
    let mut charges = Vec::with_capacity(held.len());
    for (holder, (uuids, since)) in std::mem::take(before) {
        if !held.contains_key(&holder) {
            let secs = elapsed.as_secs_f64();
            charges.push(charge(holder, uuids, since, secs, &utilization, true));
        }
    }
    for (holder, uuids) in held {
        let since = ctx.runtime.gpu_held_since(&holder);
        // A hold that began after the last sample counts from its start.
        let secs = since
            .map_or(elapsed, |t| {
                elapsed.min(now.duration_since(t).unwrap_or_default())
            })
            .as_secs_f64();
        let since = since.unwrap_or(now);
        before.insert(holder.clone(), (uuids.clone(), since));
        charges.push(charge(holder, uuids, since, secs, &utilization, false));
    }
    for c in &charges {
        let user = c.holder.account();
        crate::metrics::metrics().gpu_held(user.as_str(), c.held);
        ctx.gpu_line.charge(&user, c.held, now);
    }
    crate::metrics::metrics().gpu_queue(ctx.gpu_line.waiting());
    match ctx.accounting.record(now, charges).await {
        Ok(ended) => {
            for e in ended {
                info!(
                    target: "audit",
                    user = %e.holder.account(),
                    holder = %e.holder,
                    gpus = %GpuUuid::join(&e.gpus),
                    since = %chrono::DateTime::<chrono::Utc>::from(e.since).format("%Y-%m-%dT%H:%M:%SZ"),
                    held_seconds = e.held,
                    busy_seconds = e.busy,
                    "GPU use ended"
                );
            }
            true
        }
        Err(e) => {
            warn!("GPU accounting: this sample is not recorded: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::ensure_container;
    use crate::login::testing::{config, context, login, user};

    /// A GPU held for an hour and a second of (paused) time is charged that, to the
    /// second, busy as its utilisation says.
    #[tokio::test(start_paused = true)]
    async fn an_hour_held_is_charged_an_hour_to_the_second() {
        let (ctx, fake) = context(config("gpus = 1\n"));
        fake.gpu_slots.store(1, std::sync::atomic::Ordering::SeqCst);
        *fake.gpus.lock().unwrap() = vec![crate::gpu::GpuInfo {
            index: 0,
            uuid: GpuUuid::parse("GPU-fake0").unwrap(),
            name: "Fake".into(),
            memory_total: 1 << 30,
            mig_mode: None,
            utilization: Some(50),
            memory_used: 0,
            processes: Vec::new(),
        }];
        let alice = login(&ctx, "alice", None);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let clock = Clock::tokio();
        let task = tokio::spawn(run(ctx.clone(), stop, clock));
        ensure_container(&ctx, &alice).await.unwrap();
        // Between two samples (every 2 s): the stop wakes the sampler, which charges the
        // last second then.
        tokio::time::sleep(Duration::from_secs(3601)).await;
        crate::admin::cmd::stop::stop_containers(&ctx, &user("alice"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let since = clock.now() - Duration::from_secs(7200);
        let report = ctx.accounting.report(since).await.unwrap();
        assert_eq!(report.len(), 1, "{report:?}");
        let alice = &report[0];
        assert_eq!(alice.user, "alice");
        assert!(
            (alice.gpu_seconds_held - 3601.0).abs() < 0.01,
            "{}",
            alice.gpu_seconds_held
        );
        assert!(
            (alice.gpu_seconds_busy - 1800.5).abs() < 0.01,
            "{}",
            alice.gpu_seconds_busy
        );
        assert!((ctx.accounting.week_seconds(&user("alice")) - 3601.0).abs() < 0.01);
    }
}
