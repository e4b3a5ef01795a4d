//! Back-off on authentication failures, per client address: a small table of decaying
//! failure counts that says how long a refusal to an address should wait.
//!
//! Pure bookkeeping: the caller passes the time, so tests drive the clock. The table is
//! bounded (the least recently failed address is forgotten first), so a spray of addresses
//! cannot grow it.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How failures turn into delays.
#[derive(Debug, Clone, Copy)]
pub struct ThrottlePolicy {
    /// Recent failures an address may have before its refusals wait.
    pub free_failures: f64,
    /// Time in which an address's count of recent failures halves.
    pub half_life: Duration,
    /// Wait of the first delayed refusal; it doubles with each further failure.
    pub base_delay: Duration,
    /// Longest wait.
    pub max_delay: Duration,
    /// Addresses remembered at most.
    pub capacity: usize,
}

impl Default for ThrottlePolicy {
    /// 10 failures free, halving every minute; then 200 ms, doubling up to 5 s; 4096
    /// addresses.
    fn default() -> Self {
        ThrottlePolicy {
            free_failures: 10.0,
            half_life: Duration::from_secs(60),
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            capacity: 4096,
        }
    }
}

/// Where failures are counted: an IPv4 address, or the /64 network of an IPv6 one (what one
/// host usually has to itself). An IPv4-mapped IPv6 address counts as the IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source `ip` counts against.
    pub fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & (u128::MAX << 64);
                Source(IpAddr::V6(prefix.into()))
            }
            v4 => Source(v4),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// What one failure leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// How long the refusal should wait (zero while the address is under its free failures).
    pub delay: Duration,
    /// True for the failure that started the address's back-off (log it once).
    pub started: bool,
}

/// One address's recent failures.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Failures, decayed to `at`.
    score: f64,
    /// Time of the last failure.
    at: Instant,
    /// Whether the address is past its free failures (so the start is logged once).
    backing_off: bool,
}

/// Recent authentication failures by source.
#[derive(Debug)]
pub struct FailureTable {
    /// The tuning.
    policy: ThrottlePolicy,
    /// Sources with failures, at most `policy.capacity`.
    entries: HashMap<Source, Entry>,
}

impl FailureTable {
    /// An empty table.
    pub fn new(policy: ThrottlePolicy) -> FailureTable {
        FailureTable {
            policy,
            entries: HashMap::new(),
        }
    }

    /// Counts one failure from `source` at `now` and says how long its refusal waits.
    pub fn fail(&mut self, source: Source, now: Instant) -> Verdict {
        if !self.entries.contains_key(&source) && self.entries.len() >= self.policy.capacity {
            self.forget_least_recent();
        }
        let policy = self.policy;
        let entry = self.entries.entry(source).or_insert(Entry {
            score: 0.0,
            at: now,
            backing_off: false,
        });
        let decayed = decay(
            &policy,
            entry.score,
            now.saturating_duration_since(entry.at),
        );
        if decayed <= policy.free_failures {
            entry.backing_off = false;
        }
        entry.score = decayed + 1.0;
        entry.at = now.max(entry.at);
        let excess = entry.score - policy.free_failures;
        if excess <= 0.0 {
            return Verdict {
                delay: Duration::ZERO,
                started: false,
            };
        }
        let started = !entry.backing_off;
        entry.backing_off = true;
        let doublings = excess.ceil().clamp(1.0, 32.0) - 1.0;
        let delay = policy
            .base_delay
            .mul_f64(2f64.powf(doublings))
            .min(policy.max_delay);
        Verdict { delay, started }
    }

    /// Sources remembered now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no source is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn forget_least_recent(&mut self) {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.at)
            .map(|(s, _)| *s);
        if let Some(s) = oldest {
            self.entries.remove(&s);
        }
    }
}

/// `score` after `elapsed` of halving every `half_life`; what is left under half a failure
/// is forgotten.
fn decay(policy: &ThrottlePolicy, score: f64, elapsed: Duration) -> f64 {
    let half_life = policy.half_life.as_secs_f64().max(f64::MIN_POSITIVE);
    let left = score * 0.5f64.powf(elapsed.as_secs_f64() / half_life);
    if left < 0.5 { 0.0 } else { left }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    fn fail_n(t: &mut FailureTable, s: Source, n: usize, now: Instant) -> Vec<Verdict> {
        (0..n).map(|_| t.fail(s, now)).collect()
    }

    #[test]
    fn free_failures_do_not_wait_then_waits_double_up_to_the_cap() {
        let mut t = FailureTable::new(ThrottlePolicy::default());
        let now = Instant::now();
        let v = fail_n(&mut t, ip("10.0.0.7"), 16, now);
        assert!(v[..10].iter().all(|v| v.delay.is_zero() && !v.started));
        let delays: Vec<u64> = v[10..].iter().map(|v| v.delay.as_millis() as u64).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000]);
        // The start is reported once, by the first delayed failure.
        assert_eq!(v.iter().filter(|v| v.started).count(), 1);
        assert!(v[10].started);
    }

    #[test]
    fn addresses_are_counted_apart() {
        let mut t = FailureTable::new(ThrottlePolicy::default());
        let now = Instant::now();
        fail_n(&mut t, ip("10.0.0.7"), 20, now);
        assert_eq!(t.fail(ip("10.0.0.8"), now).delay, Duration::ZERO);
        // IPv4-mapped IPv6 is the IPv4 address; IPv6 counts by /64.
        assert!(!t.fail(ip("::ffff:10.0.0.7"), now).delay.is_zero());
        fail_n(&mut t, ip("2001:db8::1"), 10, now);
        assert!(!t.fail(ip("2001:db8::2"), now).delay.is_zero());
        assert!(t.fail(ip("2001:db8:0:1::1"), now).delay.is_zero());
        assert_eq!(ip("2001:db8::1").to_string(), "2001:db8::/64");
    }

    #[test]
    fn failures_decay_and_a_later_burst_is_reported_again() {
        let mut t = FailureTable::new(ThrottlePolicy::default());
        let start = Instant::now();
        let s = ip("10.0.0.7");
        let v = fail_n(&mut t, s, 12, start);
        assert!(v[10].started);
        // Ten minutes later (ten half-lives) the address starts afresh.
        let later = start + Duration::from_secs(600);
        let v = fail_n(&mut t, s, 11, later);
        assert!(v[..10].iter().all(|v| v.delay.is_zero()));
        assert!(v[10].started, "a new burst is logged again");
        // One half-life after 11 failures, 5.5 are left: 4 more are free, the 5th waits.
        let next = later + Duration::from_secs(60);
        let v = fail_n(&mut t, s, 5, next);
        assert!(v[..4].iter().all(|v| v.delay.is_zero()), "{v:?}");
        assert!(!v[4].delay.is_zero());
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_least_recent_address() {
        let policy = ThrottlePolicy {
            capacity: 3,
            ..ThrottlePolicy::default()
        };
        let mut t = FailureTable::new(policy);
        let start = Instant::now();
        fail_n(&mut t, ip("10.0.0.1"), 20, start);
        for (i, a) in ["10.0.0.2", "10.0.0.3"].iter().enumerate() {
            t.fail(ip(a), start + Duration::from_secs(i as u64 + 1));
        }
        assert_eq!(t.len(), 3);
        // A fourth address pushes out 10.0.0.1, the least recently failed.
        t.fail(ip("10.0.0.4"), start + Duration::from_secs(10));
        assert_eq!(t.len(), 3);
        let again = t.fail(ip("10.0.0.1"), start + Duration::from_secs(11));
        assert!(again.delay.is_zero(), "10.0.0.1 was forgotten");
        assert_eq!(t.len(), 3);
    }
}
