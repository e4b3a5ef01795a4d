//! Reclaiming idle GPUs for logins that wait for one (`[gpu] reclaim_idle`): which holder is
//! warned, which warning is called off, and which container is stopped. Pure decisions: no
//! I/O and no clock of its own; the caller passes what it saw and the time
//! (`login::reclaim` does, every 2 s, and carries the actions out).
//!
//! The rules, each held by [`Reclaimer::tick`]:
//! - **Never while nobody waits.** No warning is given and no container is stopped unless a
//!   login waits for GPUs; a warning whose waiters all left is called off.
//! - **Always warned first, with the whole window.** A container is stopped only at the
//!   deadline of a warning it was given at least `reclaim_warning` before, and only if it
//!   stayed idle all that time.
//! - **Use calls it off.** A holder whose GPUs were used during the window (its idle time
//!   started again) is called off, and must be idle `reclaim_idle` again before another
//!   warning.
//! - **Only as many as the line needs.** Holders are warned longest idle first until the
//!   warned ones hold as many GPUs as the waiting logins ask for, so one waiter never costs
//!   several people their containers.
//! - Exempt holders (a quota's `gpu_reclaim = false`) are never warned; one exempted (or
//!   reclaim turned off) by a reload during its window is called off, and so is one whose
//!   container went away.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::auth::Username;

/// When reclaim acts: `[gpu] reclaim_idle` and `reclaim_warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How long all of a container's GPUs must have been idle before it is warned.
    pub idle: Duration,
    /// How long the warning comes before the stop.
    pub warning: Duration,
}

/// A running container that holds GPUs, as one look saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// Its name (what warnings are kept by).
    pub container: String,
    /// Its user, who is warned.
    pub owner: Username,
    /// How many GPUs it holds (what stopping it frees for the line).
    pub gpus: usize,
    /// Its quota says `gpu_reclaim = false`.
    pub exempt: bool,
    /// How long all its GPUs have been idle together (`None`: one is busy, or unknown).
    pub idle_for: Option<Duration>,
}

/// Why a warning was called off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOff {
    /// Its GPUs were used during the warning window.
    UsedAgain,
    /// No login waits for GPUs any more.
    NobodyWaits,
    /// The container no longer runs with GPUs (stopped, or gone).
    Gone,
    /// A reload exempted it (`gpu_reclaim = false`) or turned reclaim off.
    Exempt,
}

/// What the caller is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Tell `owner`'s sessions in `container` it will be stopped at `deadline` unless its
    /// GPUs are used; idle since `idle_since`.
    Warn {
        /// The container.
        container: String,
        /// Its user.
        owner: Username,
        /// Since when its GPUs have all been idle.
        idle_since: SystemTime,
        /// When it is stopped if it stays idle and someone still waits.
        deadline: SystemTime,
    },
    /// The warning of `container` no longer stands.
    CallOff {
        /// The container.
        container: String,
        /// Its user.
        owner: Username,
        /// Why.
        why: CallOff,
    },
    /// Stop `container` now and give its GPUs to the line: warned a whole window ago, idle
    /// all along since `idle_since`, and someone waits.
    Reclaim {
        /// The container.
        container: String,
        /// Its user.
        owner: Username,
        /// Since when its GPUs have all been idle.
        idle_since: SystemTime,
    },
}

/// A warning given and not yet called off or carried out.
#[derive(Debug, Clone, PartialEq)]
struct Warning {
    owner: Username,
    gpus: usize,
    /// The idle time the warning was given for; a later start means the GPUs were used.
    idle_since: SystemTime,
    deadline: SystemTime,
}

/// The warnings standing, across looks.
#[derive(Debug, Default)]
pub struct Reclaimer {
    warned: BTreeMap<String, Warning>,
}

impl Reclaimer {
    /// One look at `now`: `policy` is `None` when reclaim is off; `wanted` is how many GPUs
    /// the waiting logins ask for together (0: nobody waits); `holders` are the running
    /// containers holding GPUs. Returns the call-offs, then the reclaims, then the warnings.
    pub fn tick(
        &mut self,
        policy: Option<Policy>,
        wanted: usize,
        holders: &[Holder],
        now: SystemTime,
    ) -> Vec<Action> {
        let idle_since = |h: &Holder| {
            h.idle_for
                .map(|d| now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH))
        };
        let mut actions = Vec::new();
        let mut reclaims = Vec::new();
        let warned = std::mem::take(&mut self.warned);
        for (container, w) in warned {
            let holder = holders.iter().find(|h| h.container == container);
            let why = match holder {
                None => Some(CallOff::Gone),
                Some(h) if policy.is_none() || h.exempt => Some(CallOff::Exempt),
                Some(h) if idle_since(h).is_none_or(|since| since > w.idle_since) => {
                    Some(CallOff::UsedAgain)
                }
                Some(_) if wanted == 0 => Some(CallOff::NobodyWaits),
                Some(_) => None,
            };
            match why {
                Some(why) => actions.push(Action::CallOff {
                    container,
                    owner: w.owner,
                    why,
                }),
                None if now >= w.deadline => reclaims.push((container, w)),
                None => {
                    self.warned.insert(container, w);
                }
            }
        }
        // What is being freed now or will be at a deadline, against what the line wants.
        let mut covered: usize = reclaims
            .iter()
            .map(|(_, w)| w.gpus)
            .chain(self.warned.values().map(|w| w.gpus))
            .sum();
        actions.extend(reclaims.into_iter().map(|(container, w)| Action::Reclaim {
            container,
            owner: w.owner,
            idle_since: w.idle_since,
        }));
        let Some(policy) = policy else {
            return actions;
        };
        if wanted == 0 {
            return actions;
        }
        let mut candidates: Vec<(&Holder, Duration, SystemTime)> = holders
            .iter()
            .filter(|h| !h.exempt && h.gpus > 0 && !self.warned.contains_key(&h.container))
            .filter(|h| !actions.iter().any(|a| action_container(a) == h.container))
            .filter_map(|h| Some((h, h.idle_for?, idle_since(h)?)))
            .filter(|(_, idle, _)| *idle >= policy.idle)
            .collect();
        // Longest idle first; equal, by name, so the choice never depends on listing order.
        candidates.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.container.cmp(&b.0.container))
        });
        for (h, _, since) in candidates {
            if covered >= wanted {
                break;
            }
            covered += h.gpus;
            let deadline = now + policy.warning;
            self.warned.insert(
                h.container.clone(),
                Warning {
                    owner: h.owner.clone(),
                    gpus: h.gpus,
                    idle_since: since,
                    deadline,
                },
            );
            actions.push(Action::Warn {
                container: h.container.clone(),
                owner: h.owner.clone(),
                idle_since: since,
                deadline,
            });
        }
        actions
    }

    /// The earliest deadline of the warnings standing (the caller looks again then).
    pub fn next_deadline(&self) -> Option<SystemTime> {
        self.warned.values().map(|w| w.deadline).min()
    }

    /// Whether any warning stands.
    pub fn any_warned(&self) -> bool {
        !self.warned.is_empty()
    }
}

fn action_container(a: &Action) -> &str {
    match a {
        Action::Warn { container, .. }
        | Action::CallOff { container, .. }
        | Action::Reclaim { container, .. } => container,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(7200);
    const WARNING: Duration = Duration::from_secs(900);
    const POLICY: Option<Policy> = Some(Policy {
        idle: IDLE,
        warning: WARNING,
    });

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn at(secs: u64) -> SystemTime {
        t0() + Duration::from_secs(secs)
    }

    /// `name`'s container (`labgate-NAME`) with one GPU, idle since `since` (`None`: busy) as
    /// seen at `now`.
    fn holder(name: &str, since: Option<SystemTime>, now: SystemTime) -> Holder {
        Holder {
            container: format!("labgate-{name}"),
            owner: Username::parse(name).unwrap(),
            gpus: 1,
            exempt: false,
            idle_for: since.map(|s| now.duration_since(s).unwrap()),
        }
    }

    fn names(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Warn { container, .. } => format!("warn {container}"),
                Action::CallOff { container, why, .. } => format!("call off {container} {why:?}"),
                Action::Reclaim { container, .. } => format!("reclaim {container}"),
            })
            .collect()
    }

    #[test]
    fn an_idle_holder_is_warned_then_reclaimed_at_the_deadline_while_someone_waits() {
        let mut r = Reclaimer::default();
        let since = Some(t0());
        // Idle, but not long enough yet.
        let now = t0() + IDLE - Duration::from_secs(1);
        assert!(
            r.tick(POLICY, 1, &[holder("alice", since, now)], now)
                .is_empty()
        );
        // Long enough: warned, with the deadline a whole window ahead.
        let now = t0() + IDLE;
        let actions = r.tick(POLICY, 1, &[holder("alice", since, now)], now);
        assert_eq!(
            actions,
            [Action::Warn {
                container: "labgate-alice".into(),
                owner: Username::parse("alice").unwrap(),
                idle_since: t0(),
                deadline: now + WARNING,
            }]
        );
        assert_eq!(r.next_deadline(), Some(now + WARNING));
        // Looks during the window change nothing; the warning is never repeated.
        for s in [1, 60, 899] {
            let t = now + Duration::from_secs(s);
            assert!(
                r.tick(POLICY, 1, &[holder("alice", since, t)], t)
                    .is_empty()
            );
        }
        // At the deadline, still idle, someone still waits: reclaimed, once.
        let t = now + WARNING;
        assert_eq!(
            r.tick(POLICY, 1, &[holder("alice", since, t)], t),
            [Action::Reclaim {
                container: "labgate-alice".into(),
                owner: Username::parse("alice").unwrap(),
                idle_since: t0(),
            }]
        );
        assert!(!r.any_warned());
        assert_eq!(r.next_deadline(), None);
    }

    #[test]
    fn never_while_nobody_waits() {
        let mut r = Reclaimer::default();
        let since = Some(t0());
        // Idle for days, nobody waits: nothing, ever.
        for h in [2, 3, 24, 72] {
            let now = at(h * 3600);
            assert!(
                r.tick(POLICY, 0, &[holder("alice", since, now)], now)
                    .is_empty()
            );
        }
        // Someone waits: warned; they leave during the window: called off, and no reclaim
        // at the deadline.
        let now = at(100 * 3600);
        assert_eq!(
            names(&r.tick(POLICY, 1, &[holder("alice", since, now)], now)),
            ["warn labgate-alice"]
        );
        let t = now + Duration::from_secs(60);
        assert_eq!(
            names(&r.tick(POLICY, 0, &[holder("alice", since, t)], t)),
            ["call off labgate-alice NobodyWaits"]
        );
        let t = now + WARNING + Duration::from_secs(1);
        assert!(
            r.tick(POLICY, 0, &[holder("alice", since, t)], t)
                .is_empty()
        );
        // Someone waits again: a fresh warning with a whole window, not a stop.
        let actions = r.tick(POLICY, 1, &[holder("alice", since, t)], t);
        assert!(
            matches!(&actions[..], [Action::Warn { deadline, .. }] if *deadline == t + WARNING),
            "{actions:?}"
        );
    }

    #[test]
    fn use_during_the_window_calls_it_off_and_the_idle_time_starts_again() {
        let mut r = Reclaimer::default();
        let now = t0() + IDLE;
        r.tick(POLICY, 1, &[holder("alice", Some(t0()), now)], now);
        // Busy at the next look.
        let t = now + Duration::from_secs(120);
        assert_eq!(
            names(&r.tick(POLICY, 1, &[holder("alice", None, t)], t)),
            ["call off labgate-alice UsedAgain"]
        );
        // Idle again right after: too recently used for a warning, even past the deadline.
        let again = t + Duration::from_secs(2);
        let t = now + WARNING;
        assert!(
            r.tick(POLICY, 1, &[holder("alice", Some(again), t)], t)
                .is_empty()
        );
        // Used between two looks (never seen busy, but idle since later): called off too.
        let t = again + IDLE;
        assert_eq!(
            names(&r.tick(POLICY, 1, &[holder("alice", Some(again), t)], t)),
            ["warn labgate-alice"]
        );
        let later = t + Duration::from_secs(30);
        let t = t + Duration::from_secs(60);
        assert_eq!(
            names(&r.tick(POLICY, 1, &[holder("alice", Some(later), t)], t)),
            ["call off labgate-alice UsedAgain"]
        );
    }

    #[test]
    fn exempt_holders_are_never_warned_and_a_reload_that_exempts_calls_off() {
        let mut r = Reclaimer::default();
        let now = at(30 * 86_400);
        let mut alice = holder("alice", Some(t0()), now);
        alice.exempt = true;
        assert!(
            r.tick(POLICY, 3, std::slice::from_ref(&alice), now)
                .is_empty()
        );
        // Warned, then exempted by a reload; bob warned, then reclaim turned off.
        alice.exempt = false;
        let bob = holder("bob", Some(t0()), now);
        assert_eq!(
            names(&r.tick(POLICY, 3, &[alice.clone(), bob.clone()], now)),
            ["warn labgate-alice", "warn labgate-bob"]
        );
        alice.exempt = true;
        assert_eq!(
            names(&r.tick(POLICY, 3, &[alice.clone(), bob.clone()], now)),
            ["call off labgate-alice Exempt"]
        );
        let t = now + WARNING;
        assert_eq!(
            names(&r.tick(None, 3, &[alice, bob], t)),
            ["call off labgate-bob Exempt"]
        );
        assert!(!r.any_warned());
    }

    #[test]
    fn a_container_gone_during_the_window_is_called_off() {
        let mut r = Reclaimer::default();
        let now = t0() + IDLE;
        r.tick(POLICY, 1, &[holder("alice", Some(t0()), now)], now);
        let t = now + WARNING;
        assert_eq!(
            names(&r.tick(POLICY, 1, &[], t)),
            ["call off labgate-alice Gone"]
        );
        // Back (its user started it again): its idle time is bounded by its new holding, so
        // nothing until it has been idle long enough again.
        let back = t + Duration::from_secs(10);
        assert!(
            r.tick(POLICY, 1, &[holder("alice", Some(back), back)], back)
                .is_empty()
        );
    }

    #[test]
    fn only_as_many_holders_as_the_line_needs_longest_idle_first() {
        let mut r = Reclaimer::default();
        let now = at(10 * 3600);
        let holders = |t: SystemTime| {
            [
                holder("carol", Some(at(3600)), t),
                holder("alice", Some(t0()), t),
                holder("bob", Some(t0()), t),
                holder("dave", Some(at(9 * 3600)), t), // not idle long enough
            ]
        };
        // One GPU wanted: the longest idle (alice and bob tie: by name).
        assert_eq!(
            names(&r.tick(POLICY, 1, &holders(now), now)),
            ["warn labgate-alice"]
        );
        // The line grows to three GPUs: two more, never dave.
        let t = now + Duration::from_secs(60);
        assert_eq!(
            names(&r.tick(POLICY, 3, &holders(t), t)),
            ["warn labgate-bob", "warn labgate-carol"]
        );
        let t = now + Duration::from_secs(120);
        assert!(
            r.tick(POLICY, 4, &holders(t), t).is_empty(),
            "dave is too recently used"
        );
        // A holder of two GPUs covers two.
        let mut r = Reclaimer::default();
        let mut big = holder("erin", Some(t0()), now);
        big.gpus = 2;
        assert_eq!(
            names(&r.tick(POLICY, 2, &[holder("bob", Some(at(3600)), now), big], now)),
            ["warn labgate-erin"]
        );
    }

    #[test]
    fn a_reclaim_that_did_not_happen_is_warned_afresh_never_stopped_at_once() {
        let mut r = Reclaimer::default();
        let now = t0() + IDLE;
        let since = Some(t0());
        r.tick(POLICY, 1, &[holder("alice", since, now)], now);
        let t = now + WARNING;
        assert_eq!(
            names(&r.tick(POLICY, 1, &[holder("alice", since, t)], t)),
            ["reclaim labgate-alice"]
        );
        // The stop failed (or a login raced it): still there, still idle. The next look warns
        // again with a whole window; it does not stop it.
        let t = t + Duration::from_secs(2);
        let actions = r.tick(POLICY, 1, &[holder("alice", since, t)], t);
        assert!(
            matches!(&actions[..], [Action::Warn { deadline, .. }] if *deadline == t + WARNING),
            "{actions:?}"
        );
    }

    #[test]
    fn a_sparse_look_never_shortens_the_window() {
        let mut r = Reclaimer::default();
        let now = at(5 * 86_400);
        let since = Some(t0());
        // Idle far longer than reclaim_idle: still only a warning at the first look.
        assert_eq!(
            names(&r.tick(POLICY, 1, &[holder("alice", since, now)], now)),
            ["warn labgate-alice"]
        );
        let t = now + WARNING - Duration::from_millis(1);
        assert!(
            r.tick(POLICY, 1, &[holder("alice", since, t)], t)
                .is_empty()
        );
        let t = now + WARNING + Duration::from_secs(3600);
        assert_eq!(
            names(&r.tick(POLICY, 1, &[holder("alice", since, t)], t)),
            ["reclaim labgate-alice"]
        );
    }
}
