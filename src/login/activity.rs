//! What each GPU is doing, as the last inventory samples saw it: its utilisation, its
//! holders, and since when it has been idle (at or below `[gpu] busy_utilization`).
//!
//! Fed by the usage sampler ([`super::usage`]) every few seconds; read by the waiting line
//! ("GPU 0 bob since 09:12, idle 2h10m"), by reclaim, which frees GPUs idle too long while
//! someone waits, and by the lab page ([`crate::admin::dashboard`]), which draws each GPU's
//! last 24 hours from [`GpuActivity::history`]: the mean utilisation of every
//! [`BUCKET`] (288 of them a GPU at most, so its memory is bounded). A GPU that stops reporting a utilisation counts as busy: labgate never
//! calls a GPU idle without having seen it idle.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::gpu::{GpuInfo, GpuUuid};

/// One GPU as last sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Its utilisation in percent, when it reports one.
    pub utilization: Option<u32>,
    /// Since when it has been idle without a break, `None` while busy (or unknown).
    pub idle_since: Option<SystemTime>,
}

/// How long one point of a GPU's utilisation history lasts.
pub const BUCKET: Duration = Duration::from_secs(300);

/// How many points a history keeps: 24 hours.
pub const BUCKETS: usize = 288;

/// One point of a history: the samples of one [`BUCKET`].
#[derive(Debug, Clone, Copy)]
struct Point {
    /// Which bucket (seconds since the epoch / [`BUCKET`]).
    bucket: u64,
    /// Sum of the utilisations sampled in it.
    sum: u64,
    /// How many were.
    count: u32,
}

/// The GPUs' recent activity.
#[derive(Debug, Default)]
pub struct GpuActivity {
    gpus: Mutex<HashMap<GpuUuid, Sample>>,
    /// Each GPU's last [`BUCKETS`] points, oldest first (buckets without samples left out).
    history: Mutex<HashMap<GpuUuid, VecDeque<Point>>>,
}

fn bucket_of(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / BUCKET.as_secs()
}

impl GpuActivity {
    fn gpus(&self) -> MutexGuard<'_, HashMap<GpuUuid, Sample>> {
        self.gpus.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an inventory taken `now`: a GPU at or below `busy_at` percent stays idle since
    /// it was first seen idle; above it (or without a reading) it is busy. GPUs gone from the
    /// inventory are forgotten.
    pub fn observe(&self, inventory: &[GpuInfo], busy_at: u32, now: SystemTime) {
        let mut gpus = self.gpus();
        gpus.retain(|uuid, _| inventory.iter().any(|g| &g.uuid == uuid));
        for g in inventory {
            let idle = g.utilization.is_some_and(|u| u <= busy_at);
            let entry = gpus.entry(g.uuid.clone()).or_insert(Sample {
                utilization: g.utilization,
                idle_since: None,
            });
            entry.utilization = g.utilization;
            entry.idle_since = match (idle, entry.idle_since) {
                (false, _) => None,
                (true, Some(since)) => Some(since),
                (true, None) => Some(now),
            };
        }
        drop(gpus);
        let bucket = bucket_of(now);
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.retain(|uuid, _| inventory.iter().any(|g| &g.uuid == uuid));
        for g in inventory {
            let Some(u) = g.utilization else { continue };
            let points = history.entry(g.uuid.clone()).or_default();
            match points.back_mut() {
                Some(p) if p.bucket == bucket => {
                    p.sum += u64::from(u.min(100));
                    p.count += 1;
                }
                _ => points.push_back(Point {
                    bucket,
                    sum: u64::from(u.min(100)),
                    count: 1,
                }),
            }
            let oldest = bucket.saturating_sub(BUCKETS as u64 - 1);
            while points.front().is_some_and(|p| p.bucket < oldest) || points.len() > BUCKETS {
                points.pop_front();
            }
        }
    }

    /// `uuid`'s mean utilisation in each of the last [`BUCKETS`] buckets up to `now`, oldest
    /// first (the last is the bucket `now` falls in); `None` where nothing was sampled.
    pub fn history(&self, uuid: &GpuUuid, now: SystemTime) -> Vec<Option<u32>> {
        let mut out = vec![None; BUCKETS];
        let last = bucket_of(now);
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        for p in history.get(uuid).into_iter().flatten() {
            let Some(age) = last.checked_sub(p.bucket) else {
                continue;
            };
            if let Some(slot) = (BUCKETS as u64 - 1)
                .checked_sub(age)
                .and_then(|i| out.get_mut(i as usize))
                && p.count > 0
            {
                *slot = Some((p.sum / u64::from(p.count)) as u32);
            }
        }
        out
    }

    /// How long `uuid` has been idle at `now` (`None`: busy, or never sampled).
    pub fn idle_for(&self, uuid: &GpuUuid, now: SystemTime) -> Option<Duration> {
        let since = self.gpus().get(uuid)?.idle_since?;
        Some(now.duration_since(since).unwrap_or_default())
    }

    /// How long all of `uuids` have been idle together at `now`: the shortest of their idle
    /// times; `None` when any is busy or unknown, or the list is empty.
    pub fn all_idle_for(&self, uuids: &[GpuUuid], now: SystemTime) -> Option<Duration> {
        uuids
            .iter()
            .map(|u| self.idle_for(u, now))
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .min()
    }

    /// The last sample of `uuid`.
    pub fn sample(&self, uuid: &GpuUuid) -> Option<Sample> {
        self.gpus().get(uuid).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str, utilization: Option<u32>) -> GpuInfo {
        GpuInfo {
            index: 0,
            uuid: GpuUuid::parse(uuid).unwrap(),
            name: "Fake".into(),
            memory_total: 1 << 30,
            mig_mode: None,
            utilization,
            memory_used: 0,
            processes: Vec::new(),
        }
    }

    #[test]
    fn idle_time_runs_from_the_first_idle_sample_and_any_use_resets_it() {
        let a = GpuUuid::parse("GPU-a").unwrap();
        let b = GpuUuid::parse("GPU-b").unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let act = GpuActivity::default();
        act.observe(&[gpu("GPU-a", Some(3)), gpu("GPU-b", Some(90))], 5, at(0));
        act.observe(&[gpu("GPU-a", Some(5)), gpu("GPU-b", Some(90))], 5, at(60));
        assert_eq!(act.idle_for(&a, at(60)), Some(Duration::from_secs(60)));
        assert_eq!(act.idle_for(&b, at(60)), None, "busy");
        assert_eq!(act.all_idle_for(&[a.clone(), b.clone()], at(60)), None);
        assert_eq!(
            act.all_idle_for(std::slice::from_ref(&a), at(90)),
            Some(Duration::from_secs(90))
        );
        // One busy sample starts the idle time again.
        act.observe(&[gpu("GPU-a", Some(6)), gpu("GPU-b", Some(0))], 5, at(120));
        act.observe(&[gpu("GPU-a", Some(0)), gpu("GPU-b", Some(0))], 5, at(180));
        assert_eq!(act.idle_for(&a, at(200)), Some(Duration::from_secs(20)));
        assert_eq!(act.idle_for(&b, at(200)), Some(Duration::from_secs(80)));
        assert_eq!(
            act.all_idle_for(&[a.clone(), b.clone()], at(200)),
            Some(Duration::from_secs(20)),
            "together: the shorter"
        );
        // No reading is not idle; a GPU gone is forgotten.
        act.observe(&[gpu("GPU-a", None)], 5, at(240));
        assert_eq!(act.idle_for(&a, at(240)), None);
        assert_eq!(act.sample(&b), None);
        assert!(act.all_idle_for(&[], at(240)).is_none());
    }

    #[test]
    fn history_keeps_24_hours_of_five_minute_means() {
        let a = GpuUuid::parse("GPU-a").unwrap();
        // At a bucket's start, so the sample times fall where the test says.
        let t0 = SystemTime::UNIX_EPOCH + BUCKET * 10_000;
        let at = |s: u64| t0 + Duration::from_secs(s);
        let act = GpuActivity::default();
        act.observe(&[gpu("GPU-a", Some(10))], 5, at(0));
        act.observe(&[gpu("GPU-a", Some(30))], 5, at(2));
        act.observe(&[gpu("GPU-a", None)], 5, at(4));
        act.observe(&[gpu("GPU-a", Some(100))], 5, at(300));
        let h = act.history(&a, at(300));
        assert_eq!(h.len(), BUCKETS);
        assert_eq!(h[BUCKETS - 1], Some(100), "the bucket now");
        assert_eq!(
            h[BUCKETS - 2],
            Some(20),
            "the mean of 10 and 30; no reading is left out"
        );
        assert_eq!(h[BUCKETS - 3], None);
        // A day later the old points have fallen off, and memory stays bounded.
        for i in 0..(2 * BUCKETS as u64) {
            act.observe(&[gpu("GPU-a", Some(50))], 5, at(600 + i * 300));
        }
        let end = at(600 + (2 * BUCKETS as u64 - 1) * 300);
        let h = act.history(&a, end);
        assert!(h.iter().all(|p| *p == Some(50)), "{h:?}");
        assert!(act.history.lock().unwrap()[&a].len() <= BUCKETS);
        // A GPU gone is forgotten; an unknown one has an empty history.
        act.observe(&[], 5, end);
        assert!(act.history(&a, end).iter().all(Option::is_none));
    }
}
