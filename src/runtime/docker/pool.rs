//! The local backend's GPU pool: the allocator behind a lock and the host's NVML inventory,
//! put together to give one login its container with the GPUs its quota allows.
//!
//! It sits behind the seam: [`super::DockerRuntime`] owns one, and its `ensure_running` goes
//! through [`GpuPool::ensure_running`], which decides the GPUs, then starts the container
//! ([`GpuContainers::start`]), per user one at a time. (A cluster backend leaves GPUs to its
//! engine and has no pool.)
//!
//! | container            | GPUs                                                           |
//! | -------------------- | -------------------------------------------------------------- |
//! | none                 | allocate as the quota asks; create with them                   |
//! | running              | keep what its label records (adopted if the pool did not know) |
//! | stopped, GPUs free   | claim its recorded GPUs; start it as it is                     |
//! | stopped, GPUs taken  | allocate fresh ones; recreate it (home and mounts are kept)    |
//! | neither free         | refuse, naming who holds what                                  |
//!
//! Holdings are rebuilt from container labels before the first GPU decision, and released when
//! a listing shows their container no longer running: at start, when an allocation finds too
//! few free GPUs, and when a user's own container is found stopped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::auth::Username;
use crate::config::{GpuConfig, GpuMode, GpuRequest};
use crate::gpu::allocator::{AllocError, Allocator, Reconciled, Resume};
use crate::gpu::nvml::NvmlInventory;
use crate::gpu::{GpuError, GpuInfo, GpuInventory, GpuUuid};
use crate::runtime::{ContainerHandle, ContainerSpec, GpuNotice, RuntimeError};

/// What the pool needs from the engine: the containers' recorded GPUs, and starting and
/// stopping them once it has decided.
#[async_trait]
pub trait GpuContainers: Send + Sync {
    /// Finds or creates `spec`'s container with exactly `spec.gpus` and makes sure it runs.
    async fn start(&self, spec: &ContainerSpec) -> Result<ContainerHandle, RuntimeError>;

    /// Stops the container `name`; `Ok(false)` when it was not running.
    async fn stop_container(&self, name: &str) -> Result<bool, RuntimeError>;

    /// Whether `spec`'s container runs and the GPUs its label records; `None` when there is
    /// no such container, or it is not labgate's (then `ensure_running` refuses it).
    async fn recorded_gpus(&self, spec: &ContainerSpec) -> Result<Option<Recorded>, RuntimeError>;

    /// Removes `spec`'s stopped container so it can be made again with other GPUs. The home
    /// and the mounts are host directories and stay.
    async fn remove_stopped(&self, spec: &ContainerSpec) -> Result<(), RuntimeError>;

    /// Users whose containers run, with the GPUs their labels record.
    async fn running_gpus(&self) -> Result<Vec<(Username, Vec<GpuUuid>)>, RuntimeError>;

    /// Whether `err`, from starting a container with GPUs, means the engine cannot give
    /// containers GPUs at all (no NVIDIA container runtime).
    fn lacks_gpu_support(&self, err: &RuntimeError) -> bool;
}

/// A container's GPUs as its label records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Whether it runs (or is paused).
    pub running: bool,
    /// GPUs it was created with.
    pub gpus: Vec<GpuUuid>,
}

/// The host's GPUs and who holds them. One per gateway.
pub struct GpuPool {
    /// NVML, or why it is unavailable.
    inventory: Result<Arc<dyn GpuInventory>, String>,
    /// The holdings; locked only for pure, short decisions (never across an await).
    allocator: Mutex<Allocator>,
    /// One lock per user: a user's GPU decision and container start happen one at a time.
    users: Mutex<HashMap<Username, Arc<tokio::sync::Mutex<()>>>>,
    /// Set once holdings were rebuilt from the running containers' labels.
    rebuilt: OnceCell<()>,
}

impl GpuPool {
    /// A pool over `inventory` (or the reason there is none).
    pub fn new(inventory: Result<Arc<dyn GpuInventory>, String>, mode: GpuMode) -> Self {
        GpuPool {
            inventory,
            allocator: Mutex::new(Allocator::new(mode)),
            users: Mutex::new(HashMap::new()),
            rebuilt: OnceCell::new(),
        }
    }

    /// Loads NVML as `config` says and logs, once, what was found or why GPUs are
    /// unavailable. Never fails: without NVML the gateway serves logins that need no GPU.
    pub async fn open(config: &GpuConfig) -> Self {
        let inventory: Result<Arc<dyn GpuInventory>, String> =
            match NvmlInventory::open(config.nvml_library.clone()).await {
                Ok(nvml) => Ok(Arc::new(nvml)),
                Err(reason) => {
                    warn!(
                        "GPUs unavailable: {reason}; logins whose quota asks for GPUs are refused"
                    );
                    Err(reason)
                }
            };
        let pool = GpuPool::new(inventory, config.mode);
        if let Ok(inv) = &pool.inventory {
            match inv.list().await {
                Ok(gpus) => {
                    info!(count = gpus.len(), mode = ?config.mode, "GPUs found");
                    for g in &gpus {
                        info!(index = g.index, uuid = %g.uuid, name = %g.name, memory = g.memory_total, mig = ?g.mig_mode, "GPU");
                    }
                }
                Err(e) => warn!("GPU inventory failed: {e}"),
            }
        }
        pool
    }

    /// Why GPUs are unavailable, if they are.
    pub fn unavailable(&self) -> Option<&str> {
        self.inventory.as_ref().err().map(String::as_str)
    }

    /// The GPUs now, with their live use.
    pub async fn inventory(&self, wanted: usize) -> Result<Vec<GpuInfo>, GpuError> {
        match &self.inventory {
            Ok(inv) => inv.list().await,
            Err(reason) => Err(GpuError::Unavailable {
                wanted,
                reason: reason.clone(),
            }),
        }
    }

    /// Who holds which GPU, as this gateway knows it.
    pub fn holders(&self) -> BTreeMap<GpuUuid, Vec<Username>> {
        self.allocator().holders()
    }

    /// Since when `user` has held its GPUs, when known (not for holdings adopted from labels).
    pub fn held_since(&self, user: &Username) -> Option<SystemTime> {
        self.allocator().holding(user).and_then(|h| h.since)
    }

    /// The GPUs `user` holds.
    pub fn held_by(&self, user: &Username) -> Vec<GpuUuid> {
        self.allocator()
            .holding(user)
            .map(|h| h.gpus.clone())
            .unwrap_or_default()
    }

    fn allocator(&self) -> MutexGuard<'_, Allocator> {
        self.allocator.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn user_lock(&self, user: &Username) -> Arc<tokio::sync::Mutex<()>> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users.entry(user.clone()).or_default().clone()
    }

    /// Brings holdings in line with the containers that run now: adopts the GPUs of running
    /// containers (their labels), releases those of containers that stopped.
    pub async fn reconcile(&self, backend: &dyn GpuContainers) -> Result<Reconciled, RuntimeError> {
        let seen = self.allocator().stamp();
        let running = backend.running_gpus().await?;
        let result = self.allocator().reconcile(&running, seen);
        for user in &result.adopted {
            info!(user = %user, gpus = %GpuUuid::join(&self.held_by(user)), "GPU holding rebuilt from container label");
        }
        for user in &result.released {
            info!(user = %user, "GPUs released: container no longer running");
        }
        for (gpu, holders) in self.holders() {
            if holders.len() > self.allocator().mode().capacity() {
                warn!(gpu = %gpu, holders = ?holders, "GPU held by more running containers than the mode allows (containers made outside this gateway?)");
            }
        }
        Ok(result)
    }

    /// Rebuilds holdings from the running containers' labels, once: later calls return at
    /// once. Every GPU decision waits for it.
    pub async fn rebuild(&self, backend: &dyn GpuContainers) -> Result<(), RuntimeError> {
        self.rebuilt
            .get_or_try_init(|| async { self.reconcile(backend).await.map(|_| ()) })
            .await
            .map(|_| ())
    }

    /// Allocates fresh GPUs for `user`, after reconciling with the containers that run now:
    /// a holder's container may have stopped, and a labgate container may have been started
    /// behind the gateway's back (`docker start`, another gateway). One listing per fresh
    /// allocation, which is rare (first login, recreate).
    async fn allocate(
        &self,
        backend: &dyn GpuContainers,
        user: &Username,
        request: &GpuRequest,
        gpus: &[GpuInfo],
    ) -> Result<Vec<GpuUuid>, RuntimeError> {
        self.reconcile(backend).await?;
        Ok(self
            .allocator()
            .allocate(user, request, gpus, SystemTime::now())
            .map_err(GpuError::from)?)
    }

    /// The inventory for a decision that needs one, or the error that tells the user why
    /// there is none.
    async fn inventory_for(&self, request: &GpuRequest) -> Result<Vec<GpuInfo>, RuntimeError> {
        Ok(self.inventory(request.count()).await?)
    }

    /// Makes sure `spec.user`'s container runs with GPUs as `spec.gpu_request` (their quota)
    /// asks, as the table in the module doc says, and returns it with its GPUs and what the
    /// user should hear about them. Safe to call concurrently: per user one at a time, across
    /// users never oversubscribing a GPU.
    pub async fn ensure_running(
        &self,
        backend: &dyn GpuContainers,
        mut spec: ContainerSpec,
    ) -> Result<ContainerHandle, RuntimeError> {
        let request = spec.gpu_request.clone();
        let request = &request;
        let user = spec.holder();
        let lock = self.user_lock(&user);
        let _serial = lock.lock().await;
        let recorded = backend.recorded_gpus(&spec).await?;
        let wants = request.count() > 0;
        let has_recorded = recorded.as_ref().is_some_and(|r| !r.gpus.is_empty());
        if !wants && !has_recorded {
            // No GPUs involved; whatever the pool thought the user held is stale.
            if self.allocator().release(&user).is_some() {
                info!(user = %user, "GPUs released: container has none");
            }
            return backend.start(&spec).await;
        }
        self.rebuild(backend).await?;
        let now = SystemTime::now();
        let mut notice = None;
        let mut claim = Claim {
            pool: self,
            user: &user,
            armed: false,
        };
        // Others wait for GPUs ahead of this login: it may use its container only if that
        // runs with its GPUs already; taking free ones is the queue's to decide.
        if !spec.may_take_gpus && !recorded.as_ref().is_some_and(|r| r.running) {
            return Err(GpuError::Waiting.into());
        }
        match recorded {
            Some(r) if r.running => {
                let over = self.allocator().confirm(&user, &r.gpus, now);
                if !over.is_empty() {
                    warn!(user = %user, gpus = %GpuUuid::join(&over), "running container holds GPUs beyond the mode's limit");
                }
                if wants && r.gpus.is_empty() {
                    notice = Some(GpuNotice::NotYetGiven {
                        count: request.count(),
                    });
                }
                spec.gpus = r.gpus;
            }
            Some(r) if r.gpus.is_empty() => {
                // Stopped, made before the quota had GPUs: make it again with them.
                let inv = self.inventory_for(request).await?;
                claim.armed = true;
                let ids = self.allocate(backend, &user, request, &inv).await?;
                backend.remove_stopped(&spec).await?;
                notice = Some(GpuNotice::MadeAgain {
                    gpus: ids.clone(),
                    taken: Vec::new(),
                });
                spec.gpus = ids;
            }
            Some(r) => {
                // Stopped: its recorded GPUs if free, else new ones and a new container.
                let inv = self.inventory(request.count()).await;
                let listed = inv.as_deref().unwrap_or_default();
                claim.armed = true;
                self.reconcile(backend).await?;
                let resumed = self
                    .allocator()
                    .resume(&user, &r.gpus, request, listed, now);
                match resumed {
                    Ok(Resume::Reuse(ids)) => spec.gpus = ids,
                    Ok(Resume::Recreate { gpus, taken }) => {
                        backend.remove_stopped(&spec).await?;
                        if taken.is_empty() {
                            notice = Some(GpuNotice::QuotaChanged { gpus: gpus.clone() });
                            info!(user = %user, gpus = %GpuUuid::join(&gpus), "container made again: its GPU quota changed");
                        } else {
                            notice = Some(GpuNotice::MadeAgain {
                                gpus: gpus.clone(),
                                taken,
                            });
                            info!(user = %user, gpus = %GpuUuid::join(&gpus), "container made again: its GPUs were taken");
                        }
                        spec.gpus = gpus;
                    }
                    // Without an inventory, "no such GPU" means "no GPUs known": say why.
                    Err(e @ (AllocError::TooMany { .. } | AllocError::UnknownPin { .. })) => {
                        return Err(match inv {
                            Err(why) => why,
                            Ok(_) => GpuError::from(e),
                        }
                        .into());
                    }
                    Err(e) => return Err(GpuError::from(e).into()),
                }
            }
            None => {
                let inv = self.inventory_for(request).await?;
                claim.armed = true;
                spec.gpus = self.allocate(backend, &user, request, &inv).await?;
            }
        }
        if !spec.gpus.is_empty() {
            info!(target: "audit", user = %user, gpus = %GpuUuid::join(&spec.gpus), "GPUs allocated");
        }
        match backend.start(&spec).await {
            Ok(mut container) => {
                self.allocator()
                    .confirm(&user, &spec.gpus, SystemTime::now());
                claim.armed = false;
                container.gpus = spec.gpus;
                container.gpu_notice = notice;
                Ok(container)
            }
            Err(e) if !spec.gpus.is_empty() && backend.lacks_gpu_support(&e) => {
                Err(GpuError::NoGpuRuntime(e.to_string()).into())
            }
            Err(e) => Err(e),
        }
    }
}

impl GpuPool {
    /// Stops container `name`, whose GPUs `user` holds (`user` or `user+profile`), if
    /// `still_wanted` says so once that start lock is held (so no login is starting it
    /// meanwhile), and releases its GPUs.
    /// `Ok(false)` when it was not stopped (not running, or `still_wanted` said no).
    pub async fn stop(
        &self,
        backend: &dyn GpuContainers,
        name: &str,
        user: &Username,
        still_wanted: impl FnOnce() -> bool,
    ) -> Result<bool, RuntimeError> {
        let lock = self.user_lock(user);
        let _serial = lock.lock().await;
        if !still_wanted() {
            return Ok(false);
        }
        let stopped = backend.stop_container(name).await?;
        if let Some(h) = self.allocator().release(user) {
            info!(user = %user, gpus = %GpuUuid::join(&h.gpus), "GPUs released: container stopped");
        }
        Ok(stopped)
    }
}

/// Releases a user's claim if the start fails or is abandoned (the future dropped).
struct Claim<'a> {
    pool: &'a GpuPool,
    user: &'a Username,
    armed: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.allocator().release(self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::GpuPin;
    use crate::runtime::EnsureOutcome;

    fn user(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    fn uuid(i: u32) -> GpuUuid {
        GpuUuid::parse(&format!("GPU-f00{i}")).unwrap()
    }

    fn gpu(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            uuid: uuid(index),
            name: "Fake H100".into(),
            memory_total: 80 << 30,
            mig_mode: None,
            utilization: Some(0),
            memory_used: 0,
            processes: Vec::new(),
        }
    }

    struct FakeInventory(Vec<GpuInfo>);

    #[async_trait]
    impl GpuInventory for FakeInventory {
        async fn list(&self) -> Result<Vec<GpuInfo>, GpuError> {
            tokio::task::yield_now().await;
            Ok(self.0.clone())
        }
    }

    /// An in-memory engine: containers by user, with their state and GPUs.
    #[derive(Default)]
    struct FakeEngine {
        /// user → (running, GPUs).
        containers: Mutex<BTreeMap<String, (bool, Vec<GpuUuid>)>>,
        /// Every create, in order: (user, GPUs).
        created: Mutex<Vec<(String, Vec<GpuUuid>)>>,
        /// When set, starting a container with GPUs fails with this engine message.
        start_error: Mutex<Option<String>>,
    }

    impl FakeEngine {
        fn stop(&self, u: &str) {
            if let Some(c) = self.containers.lock().unwrap().get_mut(u) {
                c.0 = false;
            }
        }
        fn created(&self) -> Vec<(String, Vec<GpuUuid>)> {
            self.created.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl GpuContainers for FakeEngine {
        async fn start(&self, spec: &ContainerSpec) -> Result<ContainerHandle, RuntimeError> {
            tokio::task::yield_now().await;
            let u = spec.holder().to_string();
            let mut containers = self.containers.lock().unwrap();
            let gpus = match containers.get(&u) {
                Some((_, gpus)) => gpus.clone(),
                None => {
                    self.created
                        .lock()
                        .unwrap()
                        .push((u.clone(), spec.gpus.clone()));
                    spec.gpus.clone()
                }
            };
            if let Some(msg) = self.start_error.lock().unwrap().clone()
                && !gpus.is_empty()
            {
                containers.insert(u, (false, gpus));
                return Err(RuntimeError::Start(msg));
            }
            containers.insert(u, (true, gpus));
            Ok(ContainerHandle::new(
                spec.name.clone(),
                spec.name.clone(),
                "/bin/sh".into(),
                EnsureOutcome::Created,
            ))
        }
        async fn stop_container(&self, name: &str) -> Result<bool, RuntimeError> {
            let u = name.trim_start_matches("labgate-");
            let mut containers = self.containers.lock().unwrap();
            Ok(containers
                .get_mut(u)
                .map(|c| std::mem::replace(&mut c.0, false))
                .unwrap_or(false))
        }
        async fn recorded_gpus(
            &self,
            spec: &ContainerSpec,
        ) -> Result<Option<Recorded>, RuntimeError> {
            tokio::task::yield_now().await;
            Ok(self
                .containers
                .lock()
                .unwrap()
                .get(spec.holder().as_str())
                .map(|(running, gpus)| Recorded {
                    running: *running,
                    gpus: gpus.clone(),
                }))
        }
        async fn remove_stopped(&self, spec: &ContainerSpec) -> Result<(), RuntimeError> {
            let mut containers = self.containers.lock().unwrap();
            let holder = spec.holder();
            assert_eq!(containers.get(holder.as_str()).map(|c| c.0), Some(false));
            containers.remove(holder.as_str());
            Ok(())
        }
        async fn running_gpus(&self) -> Result<Vec<(Username, Vec<GpuUuid>)>, RuntimeError> {
            tokio::task::yield_now().await;
            Ok(self
                .containers
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, (running, _))| *running)
                .map(|(u, (_, g))| (holder(u), g.clone()))
                .collect())
        }
        fn lacks_gpu_support(&self, err: &RuntimeError) -> bool {
            err.to_string().contains("could not select device driver")
        }
    }

    fn pool(n: u32, mode: GpuMode) -> (Arc<GpuPool>, Arc<FakeEngine>) {
        let engine = Arc::new(FakeEngine::default());
        let inv: Arc<dyn GpuInventory> = Arc::new(FakeInventory((0..n).map(gpu).collect()));
        let pool = GpuPool::new(Ok(inv), mode);
        (Arc::new(pool), engine)
    }

    /// `alice` or `alice+gpu`, as the pool keys holdings.
    fn holder(name: &str) -> Username {
        match name.split_once('+') {
            Some((u, p)) => user(u).with_profile(&crate::auth::ProfileName::parse(p).unwrap()),
            None => user(name),
        }
    }

    #[tokio::test]
    async fn a_users_profile_container_holds_its_gpus_apart_from_the_plain_one() {
        let (pool, engine) = pool(2, GpuMode::Exclusive);
        let mut gpu = spec("alice");
        gpu.profile = Some(crate::auth::ProfileName::parse("gpu").unwrap());
        gpu.name = "labgate-alice-gpu".into();
        gpu.gpu_request = ONE;
        let started = pool.ensure_running(engine.as_ref(), gpu).await.unwrap();
        assert_eq!(started.gpus, vec![uuid(0)]);
        // Plain alice has no GPUs in her quota: her login must not release the profile's.
        let plain = login(&pool, &engine, "alice", GpuRequest::default())
            .await
            .unwrap();
        assert!(plain.gpus.is_empty());
        assert_eq!(pool.held_by(&holder("alice+gpu")), vec![uuid(0)]);
        assert_eq!(
            login(&pool, &engine, "bob", ONE).await.unwrap().gpus,
            vec![uuid(1)],
            "bob never gets the profile container's GPU"
        );
    }

    fn spec(u: &str) -> ContainerSpec {
        let quota = crate::config::parse(
            std::path::Path::new("/etc/labgate/labgate.toml"),
            "[defaults]\nimage = \"busybox\"\n",
        )
        .unwrap()
        .defaults;
        ContainerSpec::new(&user(u), &quota, None)
    }

    async fn login(
        pool: &GpuPool,
        engine: &FakeEngine,
        u: &str,
        request: GpuRequest,
    ) -> Result<ContainerHandle, RuntimeError> {
        let mut spec = spec(u);
        spec.gpu_request = request;
        pool.ensure_running(engine, spec).await
    }

    const ONE: GpuRequest = GpuRequest::Count(1);

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_logins_never_oversubscribe_and_refusals_name_holders() {
        let (pool, engine) = pool(2, GpuMode::Exclusive);
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let (pool, engine) = (pool.clone(), engine.clone());
                tokio::spawn(async move { login(&pool, &engine, &format!("u{i}"), ONE).await })
            })
            .collect();
        let mut granted = Vec::new();
        let mut refused = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(s) => granted.extend(s.gpus),
                Err(e) => refused.push(e.to_string()),
            }
        }
        granted.sort();
        assert_eq!(granted, vec![uuid(0), uuid(1)], "each GPU exactly once");
        assert_eq!(refused.len(), 10);
        for r in &refused {
            assert!(
                r.starts_with(
                    "your quota asks for 1 GPU(s) but 0 are free: GPU 0 (GPU-f000) is held by u"
                ),
                "{r}"
            );
        }
        let mut created: Vec<GpuUuid> = engine.created().into_iter().flat_map(|(_, g)| g).collect();
        created.sort();
        assert_eq!(
            created,
            vec![uuid(0), uuid(1)],
            "no container was made without its GPUs"
        );
    }

    #[tokio::test]
    async fn a_stopped_holder_frees_its_gpu_for_the_next_login() {
        let (pool, engine) = pool(1, GpuMode::Exclusive);
        assert_eq!(
            login(&pool, &engine, "alice", ONE).await.unwrap().gpus,
            vec![uuid(0)]
        );
        let err = login(&pool, &engine, "bob", ONE).await.unwrap_err();
        assert!(err.to_string().contains("held by alice for"), "{err}");
        engine.stop("alice");
        assert_eq!(
            login(&pool, &engine, "bob", ONE).await.unwrap().gpus,
            vec![uuid(0)]
        );
        assert_eq!(pool.holders()[&uuid(0)], vec![user("bob")]);
    }

    #[tokio::test]
    async fn resume_reuses_free_gpus_and_recreates_when_taken() {
        let (pool, engine) = pool(2, GpuMode::Exclusive);
        login(&pool, &engine, "alice", ONE).await.unwrap(); // GPU 0
        engine.stop("alice");
        // Free again: the same container, the same GPU, nothing to tell.
        let again = login(&pool, &engine, "alice", ONE).await.unwrap();
        assert_eq!(again.gpus, vec![uuid(0)]);
        assert!(again.gpu_notice.is_none(), "{:?}", again.gpu_notice);
        assert_eq!(engine.created().len(), 1);

        engine.stop("alice");
        // bob asks for GPU 0 explicitly while alice's container is stopped.
        let pinned = GpuRequest::Pinned(vec![GpuPin::Index(0)]);
        assert_eq!(
            login(&pool, &engine, "bob", pinned).await.unwrap().gpus,
            vec![uuid(0)]
        );
        let back = login(&pool, &engine, "alice", ONE).await.unwrap();
        assert_eq!(back.gpus, vec![uuid(1)]);
        match back.gpu_notice {
            Some(GpuNotice::MadeAgain { gpus, taken }) => {
                assert_eq!(gpus, vec![uuid(1)]);
                assert_eq!(taken.len(), 1, "{taken:?}");
                let held = taken[0].to_string();
                assert!(
                    held.starts_with("GPU 0 (GPU-f000) is held by bob"),
                    "{held}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            engine.created(),
            vec![
                ("alice".into(), vec![uuid(0)]),
                ("bob".into(), vec![uuid(0)]),
                ("alice".into(), vec![uuid(1)]),
            ]
        );
    }

    #[tokio::test]
    async fn resume_when_taken_and_none_free_is_refused() {
        let (pool, engine) = pool(1, GpuMode::Exclusive);
        login(&pool, &engine, "alice", ONE).await.unwrap();
        engine.stop("alice");
        login(&pool, &engine, "bob", ONE).await.unwrap();
        let err = login(&pool, &engine, "alice", ONE).await.unwrap_err();
        assert!(
            err.to_string().contains("GPU 0 (GPU-f000) is held by bob"),
            "{err}"
        );
        assert!(
            !engine.containers.lock().unwrap()["alice"].0,
            "left as it was"
        );
    }

    #[tokio::test]
    async fn holdings_are_rebuilt_from_running_containers_before_any_decision() {
        let (pool, engine) = pool(2, GpuMode::Exclusive);
        // A container from before the restart holds GPU 0.
        engine
            .containers
            .lock()
            .unwrap()
            .insert("carol".into(), (true, vec![uuid(0)]));
        assert_eq!(
            login(&pool, &engine, "dave", ONE).await.unwrap().gpus,
            vec![uuid(1)]
        );
        assert_eq!(pool.held_by(&user("carol")), vec![uuid(0)]);
    }

    #[tokio::test]
    async fn without_nvml_gpu_logins_are_refused_and_others_served() {
        let engine = Arc::new(FakeEngine::default());
        let pool = GpuPool::new(
            Err("cannot load NVML library libnvidia-ml.so.1: not found".into()),
            GpuMode::Exclusive,
        );
        assert!(pool.unavailable().is_some());
        let err = login(&pool, &engine, "alice", ONE).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "your quota asks for 1 GPU(s), but GPUs are not available on this host \
             (cannot load NVML library libnvidia-ml.so.1: not found); ask your admin"
        );
        assert!(engine.created().is_empty(), "no container without its GPUs");
        let ok = login(&pool, &engine, "bob", GpuRequest::Count(0))
            .await
            .unwrap();
        assert!(ok.gpus.is_empty());
    }

    #[tokio::test]
    async fn an_engine_without_gpu_support_is_explained_and_the_claim_released() {
        let (pool, engine) = pool(1, GpuMode::Exclusive);
        *engine.start_error.lock().unwrap() =
            Some("could not select device driver \"nvidia\" with capabilities: [[gpu]]".into());
        let err = login(&pool, &engine, "alice", ONE).await.unwrap_err();
        assert!(
            matches!(err, RuntimeError::Gpu(GpuError::NoGpuRuntime(_))),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("NVIDIA container toolkit"),
            "{err}"
        );
        assert!(pool.holders().is_empty(), "a failed start holds nothing");
    }

    #[tokio::test]
    async fn a_stopped_container_made_without_gpus_is_made_again_with_them() {
        let (pool, engine) = pool(1, GpuMode::Exclusive);
        login(&pool, &engine, "alice", GpuRequest::Count(0))
            .await
            .unwrap();
        engine.stop("alice");
        let s = login(&pool, &engine, "alice", ONE).await.unwrap();
        assert_eq!(s.gpus, vec![uuid(0)]);
        assert!(
            matches!(&s.gpu_notice, Some(GpuNotice::MadeAgain { taken, .. }) if taken.is_empty()),
            "made again because it had no GPUs: {:?}",
            s.gpu_notice
        );
    }

    #[tokio::test]
    async fn shared_mode_serves_max_per_gpu() {
        let (pool, engine) = pool(1, GpuMode::Shared { max_per_gpu: 2 });
        login(&pool, &engine, "a", ONE).await.unwrap();
        login(&pool, &engine, "b", ONE).await.unwrap();
        let err = login(&pool, &engine, "c", ONE).await.unwrap_err();
        assert!(err.to_string().contains("is held by a for"), "{err}");
    }

    #[tokio::test]
    async fn a_login_not_first_in_line_uses_a_running_container_but_takes_no_gpus() {
        let (pool, engine) = pool(2, GpuMode::Exclusive);
        login(&pool, &engine, "alice", ONE).await.unwrap();
        let mut queued = spec("alice");
        queued.gpu_request = ONE;
        queued.may_take_gpus = false;
        let again = pool.ensure_running(engine.as_ref(), queued.clone()).await;
        assert_eq!(
            again.unwrap().gpus,
            vec![uuid(0)],
            "runs with its GPU: used"
        );
        engine.stop("alice");
        let err = pool
            .ensure_running(engine.as_ref(), queued)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RuntimeError::Gpu(GpuError::Waiting)),
            "{err:?}"
        );
        let mut bob = spec("bob");
        bob.gpu_request = ONE;
        bob.may_take_gpus = false;
        let err = pool.ensure_running(engine.as_ref(), bob).await.unwrap_err();
        assert!(
            matches!(err, RuntimeError::Gpu(GpuError::Waiting)),
            "{err:?}"
        );
        assert_eq!(
            engine.created().len(),
            1,
            "nothing made for a login not first in line"
        );
        assert!(pool.held_by(&user("bob")).is_empty());
    }
}
