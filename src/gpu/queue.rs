//! Who waits for GPUs, and in which order they are served: pure decisions, no I/O and no
//! clock of its own (callers pass the time).
//!
//! Waiters are grouped by holder (`user` or `user+profile`): several connections of one user
//! waiting for the same container (VS Code opens several) are one place in line. Groups are
//! served by [`Standing`]: under their weekly budget before over it, then lowest recent usage
//! per share ([`FairShare`]), ties first come first served. Once a group is being served (its
//! container is starting with the GPUs that freed), it stays first until it is done, so a
//! newcomer with less usage never takes a GPU from a start in progress.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::auth::Username;

/// A place in the queue, held by one waiting login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

#[derive(Debug, Clone)]
struct Waiter {
    ticket: Ticket,
    holder: Username,
    user: Username,
    wants: usize,
    since: SystemTime,
}

/// How a user stands for the order: usage per share, and whether over budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    /// Recent GPU-hours divided by the user's share (lower is served first).
    pub score: f64,
    /// Over their weekly budget: served after everyone under it.
    pub over_budget: bool,
}

/// One holder's place in line.
#[derive(Debug, Clone, PartialEq)]
pub struct Place {
    /// The holder (`user` or `user+profile`).
    pub holder: Username,
    /// The user, whose usage counts.
    pub user: Username,
    /// GPUs it waits for.
    pub wants: usize,
    /// Since when it has waited (its first login's arrival, kept while any waits).
    pub since: SystemTime,
    /// Its logins waiting.
    pub logins: usize,
}

/// The logins waiting for GPUs.
#[derive(Debug, Default)]
pub struct Queue {
    waiters: Vec<Waiter>,
    next: u64,
    serving: Option<Username>,
    /// When each group's first login joined: its place, kept while any of its logins waits.
    arrived: HashMap<Username, SystemTime>,
}

impl Queue {
    /// `user`'s login for container `holder`, which needs `wants` GPUs, joins the line.
    pub fn join(
        &mut self,
        holder: Username,
        user: Username,
        wants: usize,
        now: SystemTime,
    ) -> Ticket {
        self.next += 1;
        let ticket = Ticket(self.next);
        self.arrived.entry(holder.clone()).or_insert(now);
        self.waiters.push(Waiter {
            ticket,
            holder,
            user,
            wants,
            since: now,
        });
        ticket
    }

    /// The login holding `ticket` leaves (served, gave up, disconnected). When it was the
    /// last of a group being served, the next group may be served.
    pub fn leave(&mut self, ticket: Ticket) {
        if let Some(i) = self.waiters.iter().position(|w| w.ticket == ticket) {
            let gone = self.waiters.remove(i);
            if !self.waiters.iter().any(|w| w.holder == gone.holder) {
                self.arrived.remove(&gone.holder);
                if self.serving.as_ref() == Some(&gone.holder) {
                    self.serving = None;
                }
            }
        }
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// The groups in the order they are served.
    pub fn order(&self, standing: impl Fn(&Username) -> Standing) -> Vec<Place> {
        let mut places: Vec<Place> = Vec::new();
        for w in &self.waiters {
            match places.iter_mut().find(|p| p.holder == w.holder) {
                Some(p) => {
                    p.logins += 1;
                    p.wants = p.wants.max(w.wants);
                }
                None => places.push(Place {
                    holder: w.holder.clone(),
                    user: w.user.clone(),
                    wants: w.wants,
                    since: self.arrived.get(&w.holder).copied().unwrap_or(w.since),
                    logins: 1,
                }),
            }
        }
        let standings: HashMap<Username, Standing> = places
            .iter()
            .map(|p| (p.user.clone(), standing(&p.user)))
            .collect();
        places.sort_by(|a, b| {
            let serving = |p: &Place| self.serving.as_ref() != Some(&p.holder);
            let (sa, sb) = (standings[&a.user], standings[&b.user]);
            serving(a)
                .cmp(&serving(b))
                .then(sa.over_budget.cmp(&sb.over_budget))
                .then(sa.score.total_cmp(&sb.score))
                .then(a.since.cmp(&b.since))
        });
        places
    }

    /// The 1-based place of `ticket`'s group in line, if it waits.
    pub fn position(
        &self,
        ticket: Ticket,
        standing: impl Fn(&Username) -> Standing,
    ) -> Option<usize> {
        let holder = &self.waiters.iter().find(|w| w.ticket == ticket)?.holder;
        self.order(standing)
            .iter()
            .position(|p| &p.holder == holder)
            .map(|i| i + 1)
    }

    /// Marks `ticket`'s group as being served if it is first in line: it stays first until
    /// its logins have left. `false` when another group is first.
    pub fn try_serve(&mut self, ticket: Ticket, standing: impl Fn(&Username) -> Standing) -> bool {
        let Some(holder) = self
            .waiters
            .iter()
            .find(|w| w.ticket == ticket)
            .map(|w| w.holder.clone())
        else {
            return false;
        };
        let first = self.order(standing).into_iter().next().map(|p| p.holder);
        if first.as_ref() == Some(&holder) {
            self.serving = Some(holder);
            true
        } else {
            false
        }
    }

    /// The group being served gave its turn back (its start failed for want of GPUs after
    /// all: someone took them outside the queue): the order decides again.
    pub fn unserve(&mut self, ticket: Ticket) {
        let holder = self
            .waiters
            .iter()
            .find(|w| w.ticket == ticket)
            .map(|w| &w.holder);
        if holder.is_some() && self.serving.as_ref() == holder {
            self.serving = None;
        }
    }
}

/// Recent GPU use per user, decayed with a half-life: what the order weighs.
#[derive(Debug, Clone)]
pub struct FairShare {
    half_life: Duration,
    /// GPU-seconds as of the instant recorded.
    used: HashMap<Username, (f64, SystemTime)>,
}

impl FairShare {
    /// Usage that halves every `half_life`.
    pub fn new(half_life: Duration) -> Self {
        FairShare {
            half_life,
            used: HashMap::new(),
        }
    }

    fn decayed(&self, value: f64, from: SystemTime, to: SystemTime) -> f64 {
        let age = to.duration_since(from).unwrap_or_default().as_secs_f64();
        let half = self.half_life.as_secs_f64().max(1.0);
        value * 0.5f64.powf(age / half)
    }

    /// Adds `gpu_seconds` of use by `user`, ending at `at`.
    pub fn charge(&mut self, user: &Username, gpu_seconds: f64, at: SystemTime) {
        let now = match self.used.get(user) {
            Some(&(v, t)) => self.decayed(v, t, at) + gpu_seconds,
            None => gpu_seconds,
        };
        self.used.insert(user.clone(), (now, at));
    }

    /// `user`'s decayed GPU-seconds at `now`.
    pub fn usage(&self, user: &Username, now: SystemTime) -> f64 {
        self.used
            .get(user)
            .map_or(0.0, |&(v, t)| self.decayed(v, t, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn even(_: &Username) -> Standing {
        Standing {
            score: 0.0,
            over_budget: false,
        }
    }

    fn holders(q: &Queue, s: impl Fn(&Username) -> Standing) -> Vec<String> {
        q.order(s)
            .into_iter()
            .map(|p| p.holder.to_string())
            .collect()
    }

    #[test]
    fn equal_standing_is_first_come_first_served_and_a_users_logins_are_one_place() {
        let mut q = Queue::default();
        let a1 = q.join(u("alice"), u("alice"), 1, at(0));
        let b = q.join(u("bob"), u("bob"), 1, at(1));
        let a2 = q.join(u("alice"), u("alice"), 1, at(2));
        assert_eq!(holders(&q, even), ["alice", "bob"]);
        assert_eq!(q.position(a2, even), Some(1));
        assert_eq!(q.position(b, even), Some(2));
        q.leave(a1);
        assert_eq!(
            q.position(a2, even),
            Some(1),
            "alice's other login keeps her place"
        );
        q.leave(a2);
        assert_eq!(q.position(b, even), Some(1));
        q.leave(b);
        assert!(q.is_empty());
        assert_eq!(q.position(b, even), None);
    }

    #[test]
    fn lower_usage_goes_first_and_over_budget_goes_last() {
        let mut q = Queue::default();
        q.join(u("heavy"), u("heavy"), 1, at(0));
        q.join(u("light"), u("light"), 1, at(1));
        q.join(u("over"), u("over"), 1, at(2));
        let standing = |user: &Username| match user.as_str() {
            "heavy" => Standing {
                score: 50.0,
                over_budget: false,
            },
            "over" => Standing {
                score: 0.0,
                over_budget: true,
            },
            _ => Standing {
                score: 1.0,
                over_budget: false,
            },
        };
        assert_eq!(holders(&q, standing), ["light", "heavy", "over"]);
    }

    #[test]
    fn a_group_being_served_stays_first_until_it_leaves() {
        let mut q = Queue::default();
        let heavy = q.join(u("heavy"), u("heavy"), 1, at(0));
        let score = |user: &Username| Standing {
            score: if user.as_str() == "heavy" { 9.0 } else { 0.0 },
            over_budget: false,
        };
        assert!(q.try_serve(heavy, score), "alone: first");
        // A newcomer with less usage arrives while heavy's container starts.
        let light = q.join(u("light"), u("light"), 1, at(5));
        assert!(!q.try_serve(light, score));
        assert_eq!(holders(&q, score), ["heavy", "light"]);
        q.leave(heavy);
        assert!(q.try_serve(light, score));
        // Giving the turn back lets the order decide again.
        let other = q.join(u("zed"), u("zed"), 1, at(0));
        q.unserve(light);
        assert!(q.try_serve(other, even), "zed came first");
    }

    #[test]
    fn usage_halves_every_half_life() {
        let day = Duration::from_secs(86_400);
        let mut f = FairShare::new(7 * day);
        f.charge(&u("alice"), 3600.0, at(0));
        assert_eq!(f.usage(&u("alice"), at(0)), 3600.0);
        let week_later = at(0) + 7 * day;
        assert!((f.usage(&u("alice"), week_later) - 1800.0).abs() < 1e-6);
        f.charge(&u("alice"), 200.0, week_later);
        assert!((f.usage(&u("alice"), week_later) - 2000.0).abs() < 1e-6);
        assert_eq!(f.usage(&u("bob"), week_later), 0.0);
    }
}
