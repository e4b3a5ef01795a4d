//! The line of logins waiting for GPUs, above the seam: a login whose quota's GPUs are held
//! by others waits here instead of failing (`[gpu] queue`, on by default), in the order
//! [`crate::gpu::queue`] decides, until its container starts, `[gpu] max_wait` passes, or
//! its channel or connection ends (then it leaves the line at once, leaving no trace).
//!
//! The backend decides whether GPUs are free (local Docker: its pool; a cluster: its engine);
//! this module only decides who may take them: while anyone waits, a login starts with
//! `may_take_gpus` unless it is first in line, so a freed GPU goes to the first waiter, and is
//! held for it while its container starts. Waiting logins are told where they stand
//! ([`WaitState`], worded by the session), and GPU-seconds held are sampled into
//! [`FairShare`], which orders the line.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Context, Login};
use crate::accounting::{Accounting, Wait, WaitOutcome};
use crate::auth::Username;
use crate::gpu::GpuError;
use crate::gpu::queue::{FairShare, Queue, Standing, Ticket};
use crate::runtime::{ContainerHandle, ContainerSpec, RuntimeError};

/// How often a waiting login looks again without being woken (a holder's container may
/// stop outside the gateway), and how often usage is sampled.
const RECHECK: Duration = Duration::from_secs(2);

/// A GPU a waiting login could get, as it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldGpu {
    /// Its index.
    pub index: u32,
    /// Who holds it.
    pub holders: Vec<Username>,
    /// Since when its (first) holder has had it, when known.
    pub since: Option<SystemTime>,
    /// Its utilisation now, in percent, when it reports one.
    pub utilization: Option<u32>,
    /// Whether that counts as busy (`[gpu] busy_utilization`).
    pub busy: bool,
    /// How long it has been idle, when it is (see [`super::activity`]).
    pub idle_for: Option<Duration>,
}

/// Where a waiting login stands, for its session to show.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitState {
    /// The container it waits to start (sessions filter on it).
    pub container: String,
    /// GPUs it waits for.
    pub wants: usize,
    /// Its place in line (1: next).
    pub position: usize,
    /// The GPUs it could get and who holds them.
    pub gpus: Vec<HeldGpu>,
    /// `(used, budget)` GPU-hours this week, when the user is over their weekly budget (and
    /// so waits behind everyone under theirs).
    pub over_budget: Option<(f64, f64)>,
    /// The login is leaving the line: served, given up or timed out (the last event).
    pub done: bool,
}

/// The line, one per gateway.
pub struct GpuLine {
    queue: Mutex<Queue>,
    share: Mutex<FairShare>,
    /// Woken when GPUs may have freed or the line changed.
    changed: Notify,
    events: broadcast::Sender<WaitState>,
    /// The config in force: each user's `gpu_share`.
    config: tokio::sync::watch::Receiver<Arc<crate::config::Config>>,
    /// Each user's last week, for budgets; waits are recorded there.
    accounting: Arc<Accounting>,
}

impl GpuLine {
    /// An empty line under `config` (its `[gpu] fair_share_half_life` as it is now; each
    /// user's `gpu_share` as it is when the order is decided).
    /// The recent usage that orders it is read back from `accounting` (what is older than
    /// ten half-lives no longer counts).
    pub fn new(
        config: tokio::sync::watch::Receiver<Arc<crate::config::Config>>,
        accounting: Arc<Accounting>,
    ) -> Self {
        let half_life = config.borrow().gpu.fair_share_half_life;
        let mut share = FairShare::new(half_life);
        let since = SystemTime::now()
            .checked_sub(half_life.saturating_mul(10))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        match accounting.history(since) {
            Ok(history) => {
                for (user, at, held) in history {
                    share.charge(&user, held, at);
                }
            }
            Err(e) => tracing::warn!("GPU queue: past usage not read, everyone starts even: {e}"),
        }
        GpuLine {
            queue: Mutex::new(Queue::default()),
            share: Mutex::new(share),
            changed: Notify::new(),
            events: broadcast::channel(256).0,
            config,
            accounting,
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn share(&self) -> MutexGuard<'_, FairShare> {
        self.share.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What waiting logins are told, as it changes. A session subscribes before its start.
    pub fn events(&self) -> broadcast::Receiver<WaitState> {
        self.events.subscribe()
    }

    /// GPUs may have freed (a container stopped): waiters look again now.
    pub fn freed(&self) {
        self.changed.notify_waiters();
    }

    /// Returns when GPUs may have freed or the line changed (the usage sampler then samples
    /// at once, so a hold's end is counted when it happens, not at the next tick).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// How many holders wait.
    pub fn waiting(&self) -> usize {
        self.queue()
            .order(|_| Standing {
                score: 0.0,
                over_budget: false,
            })
            .len()
    }

    fn standing(&self, now: SystemTime) -> impl Fn(&Username) -> Standing + '_ {
        let share = self.share().clone();
        let config = self.config.borrow().clone();
        let accounting = self.accounting.clone();
        move |user: &Username| {
            let quota = config.quota_for(user);
            Standing {
                score: share.usage(user, now) / quota.gpu_share,
                over_budget: over_budget(quota, accounting.week_seconds(user)).is_some(),
            }
        }
    }

    /// The line now, in the order it is served.
    pub fn line(&self) -> Vec<crate::gpu::queue::Place> {
        let now = SystemTime::now();
        let standing = self.standing(now);
        self.queue().order(standing)
    }

    /// Adds `gpu_seconds` of `user`'s use ending `at` to what orders the line.
    pub fn charge(&self, user: &Username, gpu_seconds: f64, at: SystemTime) {
        self.share().charge(user, gpu_seconds, at);
    }

    /// Starts `login`'s container (`spec`, whose quota asks for GPUs), waiting in line when
    /// its GPUs are held by others and the queue is on. Ends early when `cancel` does.
    pub async fn start(
        &self,
        ctx: &Context,
        login: &Login,
        mut spec: ContainerSpec,
        cancel: &CancellationToken,
    ) -> Result<ContainerHandle, RuntimeError> {
        let (queue, max_wait) = {
            let gpu = &ctx.config.borrow().gpu;
            (
                login.quota.gpu_queue.unwrap_or(gpu.queue),
                login.quota.gpu_max_wait.unwrap_or(gpu.max_wait),
            )
        };
        let busy_at = ctx.config.borrow().gpu.busy_utilization;
        if !queue {
            return super::run_container(ctx, &spec, cancel, &login.gone).await;
        }
        // Nobody waits: the backend decides. Others wait: only a container already running
        // with its GPUs may be used without queueing.
        spec.may_take_gpus = self.queue().is_empty();
        match super::run_container(ctx, &spec, cancel, &login.gone).await {
            Err(RuntimeError::Gpu(e)) if e.is_busy() => {}
            other => return other,
        }
        let holder = spec.holder();
        let ticket = self.queue().join(
            holder.clone(),
            login.user.clone(),
            spec.gpu_request.count(),
            SystemTime::now(),
        );
        let mut place = Place {
            line: self,
            ticket,
            holder,
            container: spec.name.clone(),
            wants: spec.gpu_request.count(),
            joined: tokio::time::Instant::now(),
            joined_at: SystemTime::now(),
            outcome: WaitOutcome::Left,
        };
        crate::metrics::metrics().gpu_queue(self.waiting());
        info!(target: "audit", user = %login.user, container = %spec.name, gpus = spec.gpu_request.count(), "waiting for GPUs");
        let deadline = tokio::time::Instant::now() + max_wait;
        // The attempt just made could take GPUs and found none: trying again at once would
        // ask the engine the same question; wait for a change first.
        let mut just_tried = spec.may_take_gpus;
        loop {
            // Listening before looking: a GPU freed while this login looks (or draws its line)
            // still wakes it.
            let woken = self.changed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let first = !std::mem::take(&mut just_tried)
                && self
                    .queue()
                    .try_serve(ticket, self.standing(SystemTime::now()));
            if first {
                spec.may_take_gpus = true;
                match super::run_container(ctx, &spec, cancel, &login.gone).await {
                    Ok(c) => {
                        info!(target: "audit", user = %login.user, container = %spec.name, "GPUs free: leaving the queue");
                        place.outcome = WaitOutcome::Served;
                        place.publish_done();
                        return Ok(c);
                    }
                    Err(RuntimeError::Gpu(e)) if e.is_busy() => self.queue().unserve(ticket),
                    Err(e) => return Err(e),
                }
            }
            let position = self
                .queue()
                .position(ticket, self.standing(SystemTime::now()))
                .unwrap_or(1);
            let budget = over_budget(&login.quota, self.accounting.week_seconds(&login.user));
            place.publish(ctx, position, busy_at, budget).await;
            // Leaving first (the channel closed, Ctrl-C, the connection ended), then the
            // deadline, then a wake-up.
            tokio::select! {
                biased;
                _ = async { tokio::select! { _ = cancel.cancelled() => {}, _ = login.gone.cancelled() => {} } } => {
                    info!(target: "audit", user = %login.user, container = %spec.name, "left the GPU queue");
                    return Err(RuntimeError::Gpu(GpuError::Waiting));
                }
                _ = tokio::time::sleep_until(deadline) => {
                    info!(target: "audit", user = %login.user, container = %spec.name, "GPU wait too long: leaving the queue");
                    place.outcome = WaitOutcome::TimedOut;
                    return Err(RuntimeError::Gpu(GpuError::WaitedTooLong(max_wait)));
                }
                _ = woken => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

/// `(used, budget)` in GPU-hours when `quota`'s weekly budget is spent by `week_seconds`.
fn over_budget(quota: &crate::config::Quota, week_seconds: f64) -> Option<(f64, f64)> {
    let budget = quota.gpu_hours_per_week?;
    let used = week_seconds / 3600.0;
    (used >= budget).then_some((used, budget))
}

/// A login's place in line: leaves it when dropped (served, failed, cancelled, or the
/// future dropped with its connection), and wakes the others.
struct Place<'a> {
    line: &'a GpuLine,
    ticket: Ticket,
    holder: Username,
    container: String,
    wants: usize,
    joined: tokio::time::Instant,
    joined_at: SystemTime,
    /// How the wait ends, as far as known (recorded when the place is left).
    outcome: WaitOutcome,
}

impl Place<'_> {
    /// Tells the session where this login stands (it draws the line, or prints it when the
    /// place changed).
    async fn publish(
        &self,
        ctx: &Context,
        position: usize,
        busy_at: u32,
        over_budget: Option<(f64, f64)>,
    ) {
        let holders = ctx.runtime.gpu_holders();
        let gpus = ctx.runtime.gpus().await.unwrap_or_default();
        let held = gpus
            .iter()
            .filter(|g| g.allocatable())
            .map(|g| {
                let who = holders.get(&g.uuid).cloned().unwrap_or_default();
                HeldGpu {
                    index: g.index,
                    since: who.first().and_then(|h| ctx.runtime.gpu_held_since(h)),
                    holders: who,
                    utilization: g.utilization,
                    busy: g.utilization.is_some_and(|u| u > busy_at),
                    idle_for: ctx.activity.idle_for(&g.uuid, SystemTime::now()),
                }
            })
            .collect();
        let _ = self.line.events.send(WaitState {
            container: self.container.clone(),
            wants: self.wants,
            position,
            gpus: held,
            over_budget,
            done: false,
        });
    }

    fn publish_done(&self) {
        let _ = self.line.events.send(WaitState {
            container: self.container.clone(),
            wants: self.wants,
            position: 0,
            gpus: Vec::new(),
            over_budget: None,
            done: true,
        });
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.line.queue().leave(self.ticket);
        self.line.changed.notify_waiters();
        let waited = self.joined.elapsed();
        crate::metrics::metrics().gpu_waited(waited);
        self.line.accounting.record_wait(Wait {
            holder: self.holder.clone(),
            joined: self.joined_at,
            waited,
            outcome: self.outcome,
        });
        crate::metrics::metrics().gpu_queue(self.line.waiting());
    }
}
