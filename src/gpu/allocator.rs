//! Who holds which GPU: pure bookkeeping and the allocation rules, no I/O.
//!
//! Rules:
//! - A user holds at most one set of GPUs (one container per user). Asking again while holding
//!   returns the same set: allocation is idempotent per user.
//! - A GPU serves at most [`GpuMode::capacity`] holders (1 when exclusive). Allocation and
//!   claims check this under the caller's lock, so the count is never exceeded by labgate's own
//!   decisions, however many logins race. Only *adopting* reality (a container found running
//!   with GPUs, at start or at login) can record more, and that is reported, never chosen.
//! - Free GPUs are chosen least-used first: fewest holders, then fewest processes, least memory
//!   used, lowest utilisation, lowest index. GPUs in MIG mode are never chosen by count.
//! - A holding is [`HoldState::Claimed`] while its container is being created or started and
//!   [`HoldState::Running`] once it runs. [`Allocator::reconcile`] releases running holdings
//!   whose container a listing no longer shows running, but only holdings older than the
//!   listing (each change carries a logical stamp), and never claimed ones: a listing taken
//!   while a container is being created must not free its GPUs.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use super::{GpuInfo, GpuUuid};
use crate::auth::Username;
use crate::config::{GpuMode, GpuPin, GpuRequest};

/// Where a holding is in its container's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    /// Allocated for a container being created or started.
    Claimed,
    /// The container runs with these GPUs.
    Running,
}

/// The GPUs one user holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Holding {
    /// The GPUs, by UUID.
    pub gpus: Vec<GpuUuid>,
    /// Claimed or running.
    pub state: HoldState,
    /// When it was taken, if known (not for holdings adopted from a listing).
    pub since: Option<SystemTime>,
    /// Logical time of the last change (see [`Allocator::stamp`]).
    stamp: u64,
}

/// A GPU that is not available, and who holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Taken {
    /// Its index, when the inventory knows it.
    pub index: Option<u32>,
    /// The GPU.
    pub uuid: GpuUuid,
    /// Its holders, and for how long each has held it when known.
    pub holders: Vec<(Username, Option<Duration>)>,
}

impl fmt::Display for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "GPU {i} ({})", self.uuid)?,
            None => write!(f, "{}", self.uuid)?,
        }
        f.write_str(" is held by ")?;
        for (n, (user, held)) in self.holders.iter().enumerate() {
            if n > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{user}")?;
            if let Some(d) = held {
                write!(f, " for {}", short_duration(*d))?;
            }
        }
        Ok(())
    }
}

/// `42s`, `17m`, `3h 05m`.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

fn list(taken: &[Taken]) -> String {
    taken
        .iter()
        .map(Taken::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why GPUs could not be given, for the user who asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AllocError {
    /// Fewer GPUs are free than the quota asks for.
    #[error(
        "your quota asks for {wanted} GPU(s) but {free} {verb} free: {taken}; a GPU is freed when its holder's container stops, try again later",
        verb = if *free == 1 { "is" } else { "are" },
        taken = list(taken)
    )]
    NotEnough {
        /// GPUs asked for.
        wanted: usize,
        /// GPUs free now.
        free: usize,
        /// The GPUs that are not.
        taken: Vec<Taken>,
    },
    /// The host does not have that many GPUs that can be given out at all.
    #[error(
        "your quota asks for {wanted} GPU(s) but this host has {total} that can be given out; ask your admin"
    )]
    TooMany {
        /// GPUs asked for.
        wanted: usize,
        /// GPUs on the host not in MIG mode.
        total: usize,
    },
    /// A pinned GPU is in use.
    #[error(
        "GPU(s) pinned in your quota are in use: {taken}; a GPU is freed when its holder's container stops, try again later",
        taken = list(taken)
    )]
    PinnedTaken {
        /// The pinned GPUs that are not available.
        taken: Vec<Taken>,
    },
    /// A pinned GPU does not exist on this host.
    #[error(
        "your quota pins {pin}, which this host does not have ({found} GPU(s) found); ask your admin"
    )]
    UnknownPin {
        /// The pin.
        pin: GpuPin,
        /// GPUs the inventory found.
        found: usize,
    },
}

/// Whether a container made with `recorded` GPUs has what `request` asks for: as many, or
/// exactly the pinned ones. A pin by index that the inventory cannot resolve (no NVML) is
/// taken as satisfied rather than recreating on a guess.
fn satisfies(request: &GpuRequest, recorded: &[GpuUuid], gpus: &[GpuInfo]) -> bool {
    match request {
        GpuRequest::Count(n) => recorded.len() == *n as usize,
        GpuRequest::Pinned(pins) => {
            pins.len() == recorded.len()
                && pins.iter().all(|pin| match pin {
                    GpuPin::Uuid(u) => recorded.contains(u),
                    GpuPin::Index(i) => gpus
                        .iter()
                        .find(|g| g.index == *i)
                        .is_none_or(|g| recorded.contains(&g.uuid)),
                })
        }
    }
}

/// What to do with a stopped container that recorded GPUs.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// Its GPUs are free (now claimed): start it as it is.
    Reuse(Vec<GpuUuid>),
    /// Some of its GPUs are taken: recreate it with these (now claimed) instead.
    Recreate {
        /// The new GPUs.
        gpus: Vec<GpuUuid>,
        /// Who took the recorded ones.
        taken: Vec<Taken>,
    },
}

/// What a reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Users whose GPUs were released (container no longer running).
    pub released: Vec<Username>,
    /// Users whose running container's GPUs were recorded (gateway restart).
    pub adopted: Vec<Username>,
}

/// The holdings of all users, under one policy.
#[derive(Debug, Clone)]
pub struct Allocator {
    /// Exclusive or shared.
    mode: GpuMode,
    /// At most one holding per user.
    holdings: BTreeMap<Username, Holding>,
    /// Logical clock: bumped by every change.
    clock: u64,
    /// When each user last released, so a listing older than that is not adopted back.
    released: BTreeMap<Username, u64>,
}

impl Allocator {
    /// No holdings yet.
    pub fn new(mode: GpuMode) -> Self {
        Allocator {
            mode,
            holdings: BTreeMap::new(),
            clock: 0,
            released: BTreeMap::new(),
        }
    }

    /// The sharing policy.
    pub fn mode(&self) -> GpuMode {
        self.mode
    }

    /// The logical time now: a reconcile passes the stamp it read before listing containers.
    pub fn stamp(&self) -> u64 {
        self.clock
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// What `user` holds.
    pub fn holding(&self, user: &Username) -> Option<&Holding> {
        self.holdings.get(user)
    }

    /// Every GPU with at least one holder, and its holders.
    pub fn holders(&self) -> BTreeMap<GpuUuid, Vec<Username>> {
        let mut out: BTreeMap<GpuUuid, Vec<Username>> = BTreeMap::new();
        for (user, h) in &self.holdings {
            for g in &h.gpus {
                out.entry(g.clone()).or_default().push(user.clone());
            }
        }
        out
    }

    /// Holders of `gpu` other than `except`.
    fn load(&self, gpu: &GpuUuid, except: &Username) -> usize {
        self.holdings
            .iter()
            .filter(|(u, h)| *u != except && h.gpus.contains(gpu))
            .count()
    }

    fn available(&self, gpu: &GpuUuid, user: &Username) -> bool {
        self.load(gpu, user) < self.mode.capacity()
    }

    fn taken(&self, gpu: &GpuUuid, user: &Username, gpus: &[GpuInfo], now: SystemTime) -> Taken {
        Taken {
            index: gpus.iter().find(|g| g.uuid == *gpu).map(|g| g.index),
            uuid: gpu.clone(),
            holders: self
                .holdings
                .iter()
                .filter(|(u, h)| *u != user && h.gpus.contains(gpu))
                .map(|(u, h)| (u.clone(), h.since.and_then(|s| now.duration_since(s).ok())))
                .collect(),
        }
    }

    fn record(
        &mut self,
        user: &Username,
        gpus: Vec<GpuUuid>,
        state: HoldState,
        since: Option<SystemTime>,
    ) {
        let stamp = self.tick();
        self.holdings.insert(
            user.clone(),
            Holding {
                gpus,
                state,
                since,
                stamp,
            },
        );
    }

    /// Chooses and claims GPUs for `user` as `request` asks, from the inventory `gpus`.
    /// A user who already holds GPUs gets the same ones back; a request for none claims none.
    pub fn allocate(
        &mut self,
        user: &Username,
        request: &GpuRequest,
        gpus: &[GpuInfo],
        now: SystemTime,
    ) -> Result<Vec<GpuUuid>, AllocError> {
        if let Some(h) = self.holdings.get(user) {
            return Ok(h.gpus.clone());
        }
        let chosen = match request {
            GpuRequest::Count(0) => return Ok(Vec::new()),
            GpuRequest::Count(n) => self.choose(user, *n as usize, gpus, now)?,
            GpuRequest::Pinned(pins) => self.pinned(user, pins, gpus, now)?,
        };
        self.record(user, chosen.clone(), HoldState::Claimed, Some(now));
        Ok(chosen)
    }

    fn choose(
        &self,
        user: &Username,
        wanted: usize,
        gpus: &[GpuInfo],
        now: SystemTime,
    ) -> Result<Vec<GpuUuid>, AllocError> {
        let eligible: Vec<&GpuInfo> = gpus.iter().filter(|g| g.allocatable()).collect();
        if wanted > eligible.len() {
            return Err(AllocError::TooMany {
                wanted,
                total: eligible.len(),
            });
        }
        let mut free: Vec<&GpuInfo> = eligible
            .iter()
            .copied()
            .filter(|g| self.available(&g.uuid, user))
            .collect();
        if free.len() < wanted {
            return Err(AllocError::NotEnough {
                wanted,
                free: free.len(),
                taken: eligible
                    .iter()
                    .filter(|g| !self.available(&g.uuid, user))
                    .map(|g| self.taken(&g.uuid, user, gpus, now))
                    .collect(),
            });
        }
        free.sort_by_key(|g| {
            (
                self.load(&g.uuid, user),
                g.processes.len(),
                g.memory_used,
                g.utilization.unwrap_or(0),
                g.index,
            )
        });
        free.truncate(wanted);
        free.sort_by_key(|g| g.index);
        Ok(free.into_iter().map(|g| g.uuid.clone()).collect())
    }

    fn pinned(
        &self,
        user: &Username,
        pins: &[GpuPin],
        gpus: &[GpuInfo],
        now: SystemTime,
    ) -> Result<Vec<GpuUuid>, AllocError> {
        let mut chosen = Vec::with_capacity(pins.len());
        for pin in pins {
            let found = gpus.iter().find(|g| match pin {
                GpuPin::Uuid(u) => g.uuid == *u,
                GpuPin::Index(i) => g.index == *i,
            });
            match found {
                Some(g) if !chosen.contains(&g.uuid) => chosen.push(g.uuid.clone()),
                Some(_) => {} // the same GPU by index and by UUID
                None => {
                    return Err(AllocError::UnknownPin {
                        pin: pin.clone(),
                        found: gpus.len(),
                    });
                }
            }
        }
        let taken: Vec<Taken> = chosen
            .iter()
            .filter(|g| !self.available(g, user))
            .map(|g| self.taken(g, user, gpus, now))
            .collect();
        if taken.is_empty() {
            Ok(chosen)
        } else {
            Err(AllocError::PinnedTaken { taken })
        }
    }

    /// Claims exactly `ids` for `user` (a stopped container's recorded GPUs), or says who
    /// holds the ones that are not available. `gpus` (possibly empty) only names indices.
    pub fn claim(
        &mut self,
        user: &Username,
        ids: &[GpuUuid],
        gpus: &[GpuInfo],
        now: SystemTime,
    ) -> Result<(), Vec<Taken>> {
        let taken: Vec<Taken> = ids
            .iter()
            .filter(|g| !self.available(g, user))
            .map(|g| self.taken(g, user, gpus, now))
            .collect();
        if !taken.is_empty() {
            return Err(taken);
        }
        if !ids.is_empty() {
            self.record(user, ids.to_vec(), HoldState::Claimed, Some(now));
        }
        Ok(())
    }

    /// For a stopped container that recorded `recorded`: reuse them if free, else choose new
    /// ones as `request` asks (the container is to be recreated), else refuse naming holders.
    /// Whatever is returned is claimed for `user`.
    pub fn resume(
        &mut self,
        user: &Username,
        recorded: &[GpuUuid],
        request: &GpuRequest,
        gpus: &[GpuInfo],
        now: SystemTime,
    ) -> Result<Resume, AllocError> {
        // Whatever the user held belonged to the stopped container.
        self.release(user);
        if !satisfies(request, recorded, gpus) {
            // The quota changed since the container was made: make it again as it now says.
            let fresh = self.allocate(user, request, gpus, now)?;
            return Ok(Resume::Recreate {
                gpus: fresh,
                taken: Vec::new(),
            });
        }
        match self.claim(user, recorded, gpus, now) {
            Ok(()) => Ok(Resume::Reuse(recorded.to_vec())),
            Err(taken) => {
                let fresh = self.allocate(user, request, gpus, now)?;
                Ok(Resume::Recreate { gpus: fresh, taken })
            }
        }
    }

    /// Records that `user`'s container runs with `ids`: a claim becomes a running holding,
    /// and a container found running is adopted. Returns the GPUs that are now over capacity
    /// (only possible when adopting what someone else made).
    pub fn confirm(&mut self, user: &Username, ids: &[GpuUuid], now: SystemTime) -> Vec<GpuUuid> {
        if ids.is_empty() {
            self.release(user);
            return Vec::new();
        }
        let since = match self.holdings.get(user) {
            Some(h) if h.gpus == ids => h.since,
            _ => Some(now),
        };
        self.record(user, ids.to_vec(), HoldState::Running, since);
        ids.iter()
            .filter(|g| self.load(g, user) >= self.mode.capacity())
            .cloned()
            .collect()
    }

    /// Releases what `user` holds.
    pub fn release(&mut self, user: &Username) -> Option<Holding> {
        let h = self.holdings.remove(user);
        if h.is_some() {
            let stamp = self.tick();
            self.released.insert(user.clone(), stamp);
        }
        h
    }

    /// Brings running holdings in line with `running` (users whose containers run, with the
    /// GPUs their labels record), a listing started when the clock read `seen`. Holdings and
    /// releases newer than the listing are left alone; claims are never released here.
    pub fn reconcile(&mut self, running: &[(Username, Vec<GpuUuid>)], seen: u64) -> Reconciled {
        let mut out = Reconciled::default();
        let listed: BTreeMap<&Username, &Vec<GpuUuid>> =
            running.iter().map(|(u, g)| (u, g)).collect();
        let stale: Vec<Username> = self
            .holdings
            .iter()
            .filter(|(u, h)| {
                h.state == HoldState::Running
                    && h.stamp <= seen
                    && listed.get(u).is_none_or(|g| g.is_empty())
            })
            .map(|(u, _)| u.clone())
            .collect();
        for user in stale {
            self.release(&user);
            out.released.push(user);
        }
        for (user, ids) in running {
            if ids.is_empty() {
                continue;
            }
            let newer_release = self.released.get(user).is_some_and(|s| *s > seen);
            let known = self.holdings.get(user);
            let newer_holding = known.is_some_and(|h| h.stamp > seen);
            if newer_release || newer_holding || known.is_some_and(|h| h.gpus == *ids) {
                continue;
            }
            self.record(user, ids.clone(), HoldState::Running, None);
            out.adopted.push(user.clone());
        }
        self.released.retain(|_, s| *s > seen);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::gpu::GpuProcess;

    fn user(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    fn uuid(i: u32) -> GpuUuid {
        GpuUuid::parse(&format!("GPU-0000000{i}")).unwrap()
    }

    fn gpu(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            uuid: uuid(index),
            name: "Fake A100".into(),
            memory_total: 80 << 30,
            mig_mode: Some(false),
            utilization: Some(0),
            memory_used: 0,
            processes: Vec::new(),
        }
    }

    fn gpus(n: u32) -> Vec<GpuInfo> {
        (0..n).map(gpu).collect()
    }

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        T0 + Duration::from_secs(secs)
    }

    fn exclusive() -> Allocator {
        Allocator::new(GpuMode::Exclusive)
    }

    fn count(n: u32) -> GpuRequest {
        GpuRequest::Count(n)
    }

    #[test]
    fn exclusive_gpus_go_to_one_user_each() {
        let mut a = exclusive();
        let inv = gpus(2);
        assert_eq!(
            a.allocate(&user("alice"), &count(1), &inv, T0),
            Ok(vec![uuid(0)])
        );
        assert_eq!(
            a.allocate(&user("bob"), &count(1), &inv, T0),
            Ok(vec![uuid(1)])
        );
        let err = a
            .allocate(&user("carol"), &count(1), &inv, at(125))
            .unwrap_err();
        assert_eq!(
            err,
            AllocError::NotEnough {
                wanted: 1,
                free: 0,
                taken: vec![
                    Taken {
                        index: Some(0),
                        uuid: uuid(0),
                        holders: vec![(user("alice"), Some(Duration::from_secs(125)))]
                    },
                    Taken {
                        index: Some(1),
                        uuid: uuid(1),
                        holders: vec![(user("bob"), Some(Duration::from_secs(125)))]
                    },
                ]
            }
        );
        assert_eq!(
            err.to_string(),
            "your quota asks for 1 GPU(s) but 0 are free: GPU 0 (GPU-00000000) is held by alice for 2m; \
             GPU 1 (GPU-00000001) is held by bob for 2m; a GPU is freed when its holder's container stops, try again later"
        );
        assert!(
            a.holding(&user("carol")).is_none(),
            "a refusal claims nothing"
        );
    }

    #[test]
    fn allocation_is_idempotent_per_user() {
        let mut a = exclusive();
        let inv = gpus(4);
        let first = a.allocate(&user("alice"), &count(2), &inv, T0).unwrap();
        assert_eq!(first, vec![uuid(0), uuid(1)]);
        assert_eq!(
            a.allocate(&user("alice"), &count(2), &inv, T0).unwrap(),
            first
        );
        assert_eq!(a.holders().len(), 2);
    }

    #[test]
    fn zero_gpus_claim_nothing_and_too_many_is_explained() {
        let mut a = exclusive();
        assert_eq!(a.allocate(&user("alice"), &count(0), &[], T0), Ok(vec![]));
        assert!(a.holding(&user("alice")).is_none());
        let err = a
            .allocate(&user("alice"), &count(3), &gpus(2), T0)
            .unwrap_err();
        assert_eq!(
            err,
            AllocError::TooMany {
                wanted: 3,
                total: 2
            }
        );
        assert!(
            err.to_string()
                .contains("this host has 2 that can be given out")
        );
    }

    #[test]
    fn least_used_gpus_are_chosen_first_and_returned_in_index_order() {
        let mut a = exclusive();
        let mut inv = gpus(4);
        inv[0].processes.push(GpuProcess {
            pid: 1,
            memory_used: None,
        });
        inv[1].memory_used = 10 << 30;
        inv[2].utilization = Some(90);
        // GPU 3 is idle: first; then 2 (busy but no memory), then 1, then 0 (a process).
        assert_eq!(
            a.allocate(&user("u1"), &count(1), &inv, T0),
            Ok(vec![uuid(3)])
        );
        assert_eq!(
            a.allocate(&user("u2"), &count(2), &inv, T0),
            Ok(vec![uuid(1), uuid(2)])
        );
        assert_eq!(
            a.allocate(&user("u3"), &count(1), &inv, T0),
            Ok(vec![uuid(0)])
        );
    }

    #[test]
    fn mig_enabled_gpus_are_never_chosen_by_count() {
        let mut a = exclusive();
        let mut inv = gpus(2);
        inv[0].mig_mode = Some(true);
        assert_eq!(
            a.allocate(&user("u1"), &count(1), &inv, T0),
            Ok(vec![uuid(1)])
        );
        assert_eq!(
            a.allocate(&user("u2"), &count(1), &inv, T0).unwrap_err(),
            AllocError::NotEnough {
                wanted: 1,
                free: 0,
                taken: vec![Taken {
                    index: Some(1),
                    uuid: uuid(1),
                    holders: vec![(user("u1"), Some(Duration::ZERO))]
                }]
            }
        );
    }

    #[test]
    fn shared_mode_allows_max_per_gpu_and_spreads_load() {
        let mut a = Allocator::new(GpuMode::Shared { max_per_gpu: 2 });
        let inv = gpus(2);
        let got: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|u| a.allocate(&user(u), &count(1), &inv, T0).unwrap())
            .collect();
        // Least-used first: the second user goes to the other GPU, not onto the first.
        assert_eq!(
            got,
            vec![vec![uuid(0)], vec![uuid(1)], vec![uuid(0)], vec![uuid(1)]]
        );
        let err = a.allocate(&user("e"), &count(1), &inv, T0).unwrap_err();
        let AllocError::NotEnough { taken, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(taken[0].holders.len(), 2);
        assert!(
            err.to_string().contains("is held by a for 0s, c for 0s"),
            "{err}"
        );
        for (g, holders) in a.holders() {
            assert!(holders.len() <= 2, "{g} has {holders:?}");
        }
    }

    #[test]
    fn pinned_gpus_by_uuid_or_index() {
        let mut a = exclusive();
        let inv = gpus(3);
        let pins = GpuRequest::Pinned(vec![GpuPin::Uuid(uuid(2)), GpuPin::Index(0)]);
        assert_eq!(
            a.allocate(&user("alice"), &pins, &inv, T0),
            Ok(vec![uuid(2), uuid(0)])
        );
        // The same GPU named twice (index and UUID) is one GPU.
        let same = GpuRequest::Pinned(vec![GpuPin::Uuid(uuid(1)), GpuPin::Index(1)]);
        assert_eq!(a.allocate(&user("bob"), &same, &inv, T0), Ok(vec![uuid(1)]));
        // Taken pins are refused with the holder, nothing is claimed.
        let err = a
            .allocate(
                &user("carol"),
                &GpuRequest::Pinned(vec![GpuPin::Index(2)]),
                &inv,
                T0,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "GPU(s) pinned in your quota are in use: GPU 2 (GPU-00000002) is held by alice for 0s; \
             a GPU is freed when its holder's container stops, try again later"
        );
        assert!(a.holding(&user("carol")).is_none());
    }

    #[test]
    fn unknown_pins_are_refused() {
        let mut a = exclusive();
        let err = a
            .allocate(
                &user("alice"),
                &GpuRequest::Pinned(vec![GpuPin::Index(7)]),
                &gpus(2),
                T0,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "your quota pins GPU 7, which this host does not have (2 GPU(s) found); ask your admin"
        );
        let err = a
            .allocate(
                &user("alice"),
                &GpuRequest::Pinned(vec![GpuPin::Uuid(uuid(9))]),
                &gpus(2),
                T0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("pins GPU-00000009"), "{err}");
    }

    #[test]
    fn a_pinned_mig_gpu_is_given_when_asked_for_explicitly() {
        let mut a = exclusive();
        let mut inv = gpus(1);
        inv[0].mig_mode = Some(true);
        let pins = GpuRequest::Pinned(vec![GpuPin::Index(0)]);
        assert_eq!(
            a.allocate(&user("alice"), &pins, &inv, T0),
            Ok(vec![uuid(0)])
        );
    }

    #[test]
    fn concurrent_requests_never_oversubscribe() {
        for mode in [GpuMode::Exclusive, GpuMode::Shared { max_per_gpu: 3 }] {
            let a = Arc::new(Mutex::new(Allocator::new(mode)));
            let inv = Arc::new(gpus(4));
            let threads: Vec<_> = (0..32)
                .map(|i| {
                    let (a, inv) = (a.clone(), inv.clone());
                    std::thread::spawn(move || {
                        let u = user(&format!("user{i}"));
                        let n = 1 + i % 2;
                        let mut guard = a.lock().unwrap();
                        guard.allocate(&u, &count(n), &inv, T0).is_ok()
                    })
                })
                .collect();
            let granted = threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .filter(|granted| *granted)
                .count();
            let a = a.lock().unwrap();
            let holders = a.holders();
            let capacity = mode.capacity();
            for (g, h) in &holders {
                assert!(h.len() <= capacity, "{mode:?}: {g} held by {h:?}");
            }
            let slots: usize = holders.values().map(Vec::len).sum();
            assert!(slots <= 4 * capacity);
            assert!(granted >= 2, "{mode:?}: only {granted} granted");
        }
    }

    #[test]
    fn rebuild_from_labels_then_allocate_around_them() {
        let mut a = exclusive();
        let seen = a.stamp();
        let r = a.reconcile(
            &[
                (user("alice"), vec![uuid(0)]),
                (user("bob"), vec![]),
                (user("carol"), vec![uuid(2), uuid(3)]),
            ],
            seen,
        );
        assert_eq!(r.adopted, vec![user("alice"), user("carol")]);
        assert!(r.released.is_empty());
        assert_eq!(a.holding(&user("alice")).unwrap().state, HoldState::Running);
        assert_eq!(
            a.allocate(&user("dave"), &count(1), &gpus(4), T0),
            Ok(vec![uuid(1)])
        );
        let err = a
            .allocate(&user("erin"), &count(1), &gpus(4), T0)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("GPU 0 (GPU-00000000) is held by alice;"),
            "adopted holdings have no known start: {err}"
        );
    }

    #[test]
    fn a_container_that_stopped_releases_its_gpus_at_the_next_reconcile() {
        let mut a = exclusive();
        let inv = gpus(1);
        a.allocate(&user("alice"), &count(1), &inv, T0).unwrap();
        a.confirm(&user("alice"), &[uuid(0)], T0);
        let seen = a.stamp();
        let r = a.reconcile(&[], seen);
        assert_eq!(r.released, vec![user("alice")]);
        assert_eq!(
            a.allocate(&user("bob"), &count(1), &inv, T0),
            Ok(vec![uuid(0)])
        );
    }

    #[test]
    fn reconcile_never_releases_claims_or_changes_newer_than_its_listing() {
        let mut a = exclusive();
        let inv = gpus(3);
        // alice's container is being created: claimed, not yet running anywhere.
        a.allocate(&user("alice"), &count(1), &inv, T0).unwrap();
        // bob's runs; the listing starts now...
        a.allocate(&user("bob"), &count(1), &inv, T0).unwrap();
        a.confirm(&user("bob"), &[uuid(1)], T0);
        let seen = a.stamp();
        // ...and while it runs, carol's container starts and is confirmed.
        a.allocate(&user("carol"), &count(1), &inv, T0).unwrap();
        a.confirm(&user("carol"), &[uuid(2)], T0);
        // The listing saw only bob running.
        let r = a.reconcile(&[(user("bob"), vec![uuid(1)])], seen);
        assert!(r.released.is_empty(), "{r:?}");
        assert!(r.adopted.is_empty(), "{r:?}");
        assert_eq!(a.holding(&user("alice")).unwrap().state, HoldState::Claimed);
        assert!(a.holding(&user("carol")).is_some());
    }

    #[test]
    fn reconcile_does_not_adopt_back_a_release_newer_than_its_listing() {
        let mut a = exclusive();
        a.confirm(&user("alice"), &[uuid(0)], T0);
        let seen = a.stamp();
        // The listing saw alice running; then her container stopped and was released.
        a.release(&user("alice"));
        let r = a.reconcile(&[(user("alice"), vec![uuid(0)])], seen);
        assert!(r.adopted.is_empty());
        assert!(a.holding(&user("alice")).is_none());
        // A later listing that still shows her running does adopt.
        let seen = a.stamp();
        let r = a.reconcile(&[(user("alice"), vec![uuid(0)])], seen);
        assert_eq!(r.adopted, vec![user("alice")]);
    }

    #[test]
    fn adopting_reality_reports_oversubscription_instead_of_hiding_it() {
        let mut a = exclusive();
        assert!(a.confirm(&user("alice"), &[uuid(0)], T0).is_empty());
        assert_eq!(a.confirm(&user("bob"), &[uuid(0)], T0), vec![uuid(0)]);
        assert_eq!(a.holders()[&uuid(0)].len(), 2);
    }

    #[test]
    fn resume_reuses_free_recorded_gpus() {
        let mut a = exclusive();
        let inv = gpus(2);
        let got = a.resume(&user("alice"), &[uuid(1)], &count(1), &inv, T0);
        assert_eq!(got, Ok(Resume::Reuse(vec![uuid(1)])));
        assert_eq!(a.holding(&user("alice")).unwrap().gpus, vec![uuid(1)]);
    }

    #[test]
    fn resume_after_a_gpu_quota_change_recreates_as_the_quota_now_says() {
        let inv = gpus(3);
        let mut a = exclusive();
        let got = a.resume(&user("alice"), &[uuid(1)], &count(2), &inv, T0);
        assert_eq!(
            got,
            Ok(Resume::Recreate {
                gpus: vec![uuid(0), uuid(1)],
                taken: vec![]
            })
        );
        let mut a = exclusive();
        let got = a.resume(&user("alice"), &[uuid(1)], &count(0), &inv, T0);
        assert_eq!(
            got,
            Ok(Resume::Recreate {
                gpus: vec![],
                taken: vec![]
            })
        );
        assert!(a.holding(&user("alice")).is_none());
        // Pinned: the same GPU by UUID or by index is the same quota.
        let mut a = exclusive();
        let same = GpuRequest::Pinned(vec![GpuPin::Index(1)]);
        let got = a.resume(&user("alice"), &[uuid(1)], &same, &inv, T0);
        assert_eq!(got, Ok(Resume::Reuse(vec![uuid(1)])));
        let other = GpuRequest::Pinned(vec![GpuPin::Uuid(uuid(2))]);
        let mut a = exclusive();
        let got = a.resume(&user("alice"), &[uuid(1)], &other, &inv, T0);
        assert_eq!(
            got,
            Ok(Resume::Recreate {
                gpus: vec![uuid(2)],
                taken: vec![]
            })
        );
    }

    #[test]
    fn resume_when_taken_recreates_with_free_gpus() {
        let mut a = exclusive();
        let inv = gpus(2);
        a.allocate(&user("bob"), &count(1), &inv, T0).unwrap(); // takes GPU 0
        let got = a.resume(&user("alice"), &[uuid(0)], &count(1), &inv, at(60));
        assert_eq!(
            got,
            Ok(Resume::Recreate {
                gpus: vec![uuid(1)],
                taken: vec![Taken {
                    index: Some(0),
                    uuid: uuid(0),
                    holders: vec![(user("bob"), Some(Duration::from_secs(60)))]
                }]
            })
        );
        assert_eq!(a.holding(&user("alice")).unwrap().gpus, vec![uuid(1)]);
    }

    #[test]
    fn resume_when_taken_and_nothing_free_is_refused_naming_the_holder() {
        let mut a = exclusive();
        let inv = gpus(1);
        a.allocate(&user("bob"), &count(1), &inv, T0).unwrap();
        a.confirm(&user("alice"), &[uuid(0)], T0); // alice's old, now stopped, holding
        let err = a
            .resume(&user("alice"), &[uuid(0)], &count(1), &inv, at(7200))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("GPU 0 (GPU-00000000) is held by bob for 2h 00m"),
            "{err}"
        );
        assert!(
            a.holding(&user("alice")).is_none(),
            "the stopped container's stale holding is gone"
        );
    }

    #[test]
    fn release_frees_for_the_next_user() {
        let mut a = exclusive();
        let inv = gpus(1);
        a.allocate(&user("alice"), &count(1), &inv, T0).unwrap();
        assert!(a.release(&user("alice")).is_some());
        assert!(a.release(&user("alice")).is_none());
        assert_eq!(
            a.allocate(&user("bob"), &count(1), &inv, T0),
            Ok(vec![uuid(0)])
        );
    }

    #[test]
    fn durations_are_short_and_readable() {
        assert_eq!(short_duration(Duration::from_secs(42)), "42s");
        assert_eq!(short_duration(Duration::from_secs(17 * 60 + 5)), "17m");
        assert_eq!(
            short_duration(Duration::from_secs(3 * 3600 + 5 * 60)),
            "3h 05m"
        );
    }
}
