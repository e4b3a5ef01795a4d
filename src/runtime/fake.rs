//! An in-process backend for unit tests of the layers above the seam (session, idle stop,
//! admin): containers are entries in a map, a process prints its argv and exits 0, and the
//! way in connects to echo servers. It is also the proof that a backend is one module: it
//! implements [`ContainerRuntime`] and [`Reach`] and nothing above the seam knows it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::reach::{Acceptor, BoxedStream, Reach, ReachError, Reacher};
use super::{
    ContainerHandle, ContainerRuntime, ContainerSpec, ContainerState, EnsureOutcome, Exec,
    ExecControl, ExecOutput, ExecRequest, ExitStatus, ManagedContainer, RuntimeError, StillWanted,
    TtySize,
};
use crate::auth::Username;
use crate::config::GpuUuid;
use crate::gpu::{GpuError, GpuInfo};

/// One container of the fake engine.
#[derive(Debug, Clone)]
pub struct FakeContainer {
    /// The spec it was made from.
    pub spec: ContainerSpec,
    /// Whether it runs.
    pub running: bool,
}

/// The fake engine.
#[derive(Default)]
pub struct FakeRuntime {
    containers: Mutex<BTreeMap<String, FakeContainer>>,
    /// Containers made, in all.
    pub created: AtomicUsize,
    /// Execs started, in all.
    pub execs: AtomicUsize,
    /// The GPUs it reports, with their use.
    pub gpus: Mutex<Vec<GpuInfo>>,
    /// When set, every start fails with this.
    pub refuse: Mutex<Option<String>>,
    /// GPUs it can give containers (`GPU-fake0`...), each to one running container.
    pub gpu_slots: AtomicUsize,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl FakeRuntime {
    /// The containers, by name.
    pub fn containers(&self) -> MutexGuard<'_, BTreeMap<String, FakeContainer>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether container `name` runs.
    pub fn running(&self, name: &str) -> bool {
        self.containers().get(name).is_some_and(|c| c.running)
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_owned()).or_default().clone()
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn ensure_running(&self, spec: &ContainerSpec) -> Result<ContainerHandle, RuntimeError> {
        let lock = self.lock_for(&spec.name);
        let _serial = lock.lock().await;
        // A real engine answers later: let other logins interleave.
        tokio::task::yield_now().await;
        if let Some(why) = self
            .refuse
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(RuntimeError::Start(why));
        }
        let mut containers = self.containers();
        let running = containers.get(&spec.name).is_some_and(|c| c.running);
        // GPUs as a backend gives them: each to one running container; a start that would
        // take some only when allowed and enough are free.
        let wants = spec.gpu_request.count();
        let mut gpus = containers
            .get(&spec.name)
            .map(|c| c.spec.gpus.clone())
            .unwrap_or_default();
        if wants > 0 && !running {
            if !spec.may_take_gpus {
                return Err(GpuError::Waiting.into());
            }
            let held: Vec<GpuUuid> = containers
                .values()
                .filter(|c| c.running)
                .flat_map(|c| c.spec.gpus.clone())
                .collect();
            let free: Vec<GpuUuid> = (0..self.gpu_slots.load(Ordering::SeqCst))
                .filter_map(|i| GpuUuid::parse(&format!("GPU-fake{i}")).ok())
                .filter(|g| !held.contains(g))
                .collect();
            if free.len() < wants {
                return Err(
                    GpuError::Allocation(crate::gpu::allocator::AllocError::NotEnough {
                        wanted: wants,
                        free: free.len(),
                        taken: Vec::new(),
                    })
                    .into(),
                );
            }
            gpus = free.into_iter().take(wants).collect();
        }
        let outcome = match containers.get_mut(&spec.name) {
            Some(c) if c.running => EnsureOutcome::Running,
            Some(c) => {
                c.running = true;
                c.spec.gpus = gpus.clone();
                EnsureOutcome::Started
            }
            None => {
                self.created.fetch_add(1, Ordering::SeqCst);
                let mut spec = spec.clone();
                spec.gpus = gpus.clone();
                containers.insert(
                    spec.name.clone(),
                    FakeContainer {
                        spec,
                        running: true,
                    },
                );
                EnsureOutcome::Created
            }
        };
        let mut handle = ContainerHandle::new(
            spec.name.clone(),
            spec.name.clone(),
            "/bin/sh".into(),
            outcome,
        );
        handle.gpus = gpus;
        Ok(handle)
    }

    async fn reach(self: Arc<Self>, container: &ContainerHandle, _who: Reacher) -> Arc<dyn Reach> {
        Arc::new(FakeReach {
            runtime: self,
            container: container.clone(),
        })
    }

    async fn exec(
        &self,
        container: &ContainerHandle,
        req: ExecRequest,
    ) -> Result<Exec, RuntimeError> {
        if !self.running(&container.name) {
            return Err(RuntimeError::Exec("the container is not running".into()));
        }
        self.execs.fetch_add(1, Ordering::SeqCst);
        let line = format!("{}\n", req.argv.join(" "));
        let output = futures::stream::iter([Ok(ExecOutput::Stdout(Bytes::from(line)))]);
        Ok(Exec {
            output: Box::pin(output),
            stdin: Box::pin(tokio::io::sink()),
            control: Box::new(FakeControl),
        })
    }

    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, RuntimeError> {
        Ok(self
            .containers()
            .values()
            .map(|c| ManagedContainer {
                id: c.spec.name.clone(),
                name: c.spec.name.clone(),
                user: c.spec.user.to_string(),
                profile: c.spec.profile.clone(),
                state: if c.running {
                    ContainerState::Running
                } else {
                    ContainerState::Exited
                },
                image: c.spec.image.clone(),
                gpus: c.spec.gpus.clone(),
                node: None,
            })
            .collect())
    }

    async fn update_limits(&self, spec: &ContainerSpec) -> Result<bool, RuntimeError> {
        Ok(self.running(&spec.name))
    }

    async fn stop(
        &self,
        container: &ManagedContainer,
        still_wanted: StillWanted,
    ) -> Result<bool, RuntimeError> {
        let lock = self.lock_for(&container.name);
        let _serial = lock.lock().await;
        if !still_wanted() {
            return Ok(false);
        }
        Ok(self
            .containers()
            .get_mut(&container.name)
            .is_some_and(|c| std::mem::replace(&mut c.running, false)))
    }

    async fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.gpus.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn gpu_holders(&self) -> BTreeMap<GpuUuid, Vec<Username>> {
        let mut holders: BTreeMap<GpuUuid, Vec<Username>> = BTreeMap::new();
        for c in self.containers().values().filter(|c| c.running) {
            for g in &c.spec.gpus {
                holders.entry(g.clone()).or_default().push(c.spec.holder());
            }
        }
        holders
    }

    async fn recover(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// Controls of a fake process: it has already exited 0.
pub(crate) struct FakeControl;

#[async_trait]
impl ExecControl for FakeControl {
    async fn resize(&self, _size: TtySize) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn signal(&self, _signal: i32) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn wait(&self) -> Result<ExitStatus, RuntimeError> {
        Ok(ExitStatus::Code(0))
    }
    async fn hangup(&self) {}
}

/// The way into a fake container: every TCP or unix target is an echo server.
struct FakeReach {
    runtime: Arc<FakeRuntime>,
    container: ContainerHandle,
}

/// One end of an in-memory pipe whose other end echoes.
fn echo() -> BoxedStream {
    let (mine, mut theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(&mut theirs);
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    Box::new(mine)
}

#[async_trait]
impl Reach for FakeReach {
    async fn resolve(&self, host: &str, _deadline: Instant) -> Result<Vec<IpAddr>, ReachError> {
        match host {
            "localhost" => Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]),
            other => other
                .parse()
                .map(|ip| vec![ip])
                .map_err(|_| ReachError::Resolve(other.to_owned())),
        }
    }

    async fn connect_tcp(
        &self,
        addrs: Vec<SocketAddr>,
        _deadline: Instant,
    ) -> Result<BoxedStream, ReachError> {
        if addrs.is_empty() {
            return Err(ReachError::Io(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        Ok(echo())
    }

    async fn connect_unix(
        &self,
        _path: &str,
        _deadline: Instant,
    ) -> Result<BoxedStream, ReachError> {
        Ok(echo())
    }

    async fn listen_tcp(
        &self,
        _addr: SocketAddr,
    ) -> Result<(Box<dyn Acceptor>, SocketAddr), ReachError> {
        Err(ReachError::Unsupported("the fake backend has no listeners"))
    }

    async fn listen_unix(&self, _dir: &str, _name: &str) -> Result<Box<dyn Acceptor>, ReachError> {
        Err(ReachError::Unsupported("the fake backend has no listeners"))
    }

    async fn start_stdio(&self, req: ExecRequest) -> Result<Exec, RuntimeError> {
        self.runtime.exec(&self.container, req).await
    }
}
