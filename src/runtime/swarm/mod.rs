//! The Docker Swarm backend: several GPU servers behind one address. A user's container is a
//! one-replica service (`labgate-USER`, labelled as on one host) that Swarm places on a node
//! with room, GPUs given by count as the nodes' generic resource; labgate never schedules.
//! Stopping scales the service to zero (its writable layer goes; the home and mounts stay).
//! Exec and the way in go to the node that runs the task, through its own Docker API
//! (`[cluster] node_api`, TLS) and, where the nodes run `labgate node-agent`, through it
//! (exec streams multiplexed over one connection per node, forwards' connects); the rest of
//! the forwards go through the relay exec, since the gateway sees no process of a remote
//! node.
//!
//! Layout: this module holds [`SwarmRuntime`] and its [`ContainerRuntime`] impl; [`spec`]
//! makes the service, [`cluster`] reads the swarm (nodes, tasks, GPUs), `clients` reaches the
//! manager and the nodes, `service` makes a service run and waits for its task, and `exec`
//! controls a process on a remote node, `tunnel` reaches a node's agent and `mux` carries
//! many streams over one connection to it.

mod clients;
pub mod cluster;
mod exec;
pub mod mux;
mod service;
pub mod spec;
mod tunnel;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::auth::Username;
use crate::config::cluster::SwarmConfig;
use crate::config::{Config, GpuUuid};
use crate::gpu::{GpuError, GpuInfo};
use crate::runtime::docker::account::Accounts;
use crate::runtime::reach::{Reach, Reacher};
use crate::runtime::relay::RelayReach;
use crate::runtime::{
    ContainerHandle, ContainerRuntime, ContainerSpec, ContainerState, Exec, ExecRequest,
    ManagedContainer, PullEvent, RuntimeError, StillWanted,
};
use clients::{Clients, NodeClient};
use cluster::View;

/// How long a view of the swarm is used before it is asked again.
const VIEW_FRESH: Duration = Duration::from_secs(1);

/// The Swarm backend.
pub struct SwarmRuntime {
    /// `[cluster]`.
    config: SwarmConfig,
    /// The manager's and the nodes' clients.
    clients: Arc<Clients>,
    /// One lock per service name: making and scaling are serialized per container.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Resolved login shell per container id.
    shells: crate::runtime::docker::shell::Shells,
    /// Each container's addresses on its networks, by container id (fixed for its life).
    ips: Mutex<HashMap<String, Vec<std::net::IpAddr>>>,
    /// Containers given a `passwd` entry for the configured uid.
    accounts: Accounts,
    /// The relay helper bound into containers (the same path on every node).
    relay_helper: PathBuf,
    /// The fallback SFTP server bound into containers (the same path on every node).
    sftp_helper: PathBuf,
    /// The last view of the swarm and when it was taken.
    view: Mutex<(View, Option<Instant>)>,
    /// Progress of container starts that wait for the cluster (placement), as pull events.
    events: tokio::sync::broadcast::Sender<PullEvent>,
}

/// What a swarm handle carries below the seam ([`ContainerHandle::engine_data`]): the node
/// its container runs on.
#[derive(Clone)]
struct Remote {
    node: Arc<NodeClient>,
}

fn node_of(container: &ContainerHandle) -> Result<Arc<NodeClient>, RuntimeError> {
    container
        .engine_data
        .as_ref()
        .and_then(|d| d.downcast_ref::<Remote>())
        .map(|r| r.node.clone())
        .ok_or_else(|| RuntimeError::Engine("not a container of this swarm backend".into()))
}

impl SwarmRuntime {
    /// A backend for the swarm `config` names. Does no I/O and never fails: the manager may
    /// answer later, and until then each login is told the engine is not reachable.
    pub fn new(config: &Config) -> Self {
        SwarmRuntime {
            config: config.cluster.swarm.clone(),
            clients: Arc::new(Clients::new(
                config.cluster.swarm.clone(),
                config.docker.timeout,
            )),
            locks: Mutex::new(HashMap::new()),
            shells: crate::runtime::docker::shell::Shells::default(),
            ips: Mutex::new(HashMap::new()),
            accounts: Accounts::default(),
            relay_helper: config.docker.relay_helper.path.clone(),
            sftp_helper: config.docker.sftp_helper.path.clone(),
            view: Mutex::new((View::default(), None)),
            events: tokio::sync::broadcast::channel(256).0,
        }
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_owned()).or_default().clone()
    }

    /// The swarm now (asked of the manager, unless asked within [`VIEW_FRESH`]).
    async fn view(&self, fresh: bool) -> Result<View, RuntimeError> {
        {
            let cached = self.view.lock().unwrap_or_else(|p| p.into_inner());
            if !fresh && cached.1.is_some_and(|t| t.elapsed() < VIEW_FRESH) {
                return Ok(cached.0.clone());
            }
        }
        let view = self.clients.view().await?;
        self.forget_gone_containers(&view);
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = (view.clone(), Some(Instant::now()));
        Ok(view)
    }

    /// Drops what is remembered of containers no task of `view` has any more (a stopped
    /// service's container is gone for good: the next start makes another).
    fn forget_gone_containers(&self, view: &View) {
        let live: std::collections::HashSet<&str> = view
            .tasks
            .iter()
            .filter_map(|t| t.container.as_deref())
            .collect();
        self.shells.retain(|id| live.contains(id));
        self.ips
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| live.contains(id.as_str()));
        self.accounts.retain(|id| live.contains(id));
    }

    /// The last view taken, however old (for the synchronous questions).
    fn cached_view(&self) -> View {
        self.view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// The addresses of `container` on `node` (its own, for the forward policy), asked of the
    /// node once per container.
    async fn ips_of(&self, node: &NodeClient, container: &str) -> Vec<std::net::IpAddr> {
        if let Some(ips) = self
            .ips
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(container)
        {
            return ips.clone();
        }
        match node
            .docker
            .inspect_container(
                container,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(info) => {
                let ips = crate::runtime::docker::inspect::placement(&info).1;
                self.ips
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(container.to_owned(), ips.clone());
                ips
            }
            Err(e) => {
                tracing::warn!(node = %node.hostname, container, "cannot read the container's addresses: {e}");
                Vec::new()
            }
        }
    }

    /// The login shell of `container` on `node` (see `Shells`): from the node's stat of
    /// `/bin/bash`, else asked with an exec.
    async fn shell_of(
        &self,
        node: &NodeClient,
        container: &str,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        let has_bash = async {
            use crate::runtime::docker::shell;
            if let Some(bash) =
                shell::executable_by_stat(&node.api, &node.version, container, "/bin/bash").await
            {
                return Ok(bash);
            }
            shell::has_bash(&node.docker, container)
                .await
                .map_err(|e| match e {
                    crate::runtime::docker::exec::DetachedError::Engine(e) => {
                        RuntimeError::Exec(format!("on node {}: {e}", node.hostname))
                    }
                    crate::runtime::docker::exec::DetachedError::Wait(e) => e,
                })
        };
        self.shells.of(container, spec, has_bash).await
    }
}

impl SwarmRuntime {
    /// Makes `spec`'s service run, on a node whose API answers: a task the manager still
    /// places on a node that died (it notices within about 15 s, then starts the task
    /// elsewhere) is waited out, the user told why.
    async fn running_on_a_live_node(
        &self,
        spec: &ContainerSpec,
    ) -> Result<(service::Placed, Arc<NodeClient>), RuntimeError> {
        let t0 = Instant::now();
        if let Some(running) = self.already_running(spec).await {
            tracing::debug!(
                ms = t0.elapsed().as_millis() as u64,
                "found running (one manager call)"
            );
            return Ok(running);
        }
        let deadline = Instant::now() + service::PLACEMENT_TIMEOUT;
        let mut first = None;
        loop {
            let placed = self.make_running(spec).await?;
            let outcome = *first.get_or_insert(placed.outcome);
            let why = match self.clients.node(&placed.node).await {
                Ok(node) if exec::node_answers(&node).await => {
                    return Ok((service::Placed { outcome, ..placed }, node));
                }
                Ok(node) => {
                    self.clients.forget(&placed.node).await;
                    format!("the server {} does not answer", node.hostname)
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(RuntimeError::Start(format!(
                    "the cluster did not run your container on a live server: {why}"
                )));
            }
            let _ = self.events.send(PullEvent {
                container: spec.name.clone(),
                progress: crate::runtime::PullProgress {
                    line: format!(
                        "{why}; waiting for the cluster to start your container on another server"
                    ),
                    step: true,
                },
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[async_trait]
impl ContainerRuntime for SwarmRuntime {
    fn pull_events(&self) -> tokio::sync::broadcast::Receiver<PullEvent> {
        self.events.subscribe()
    }

    async fn ensure_running(&self, spec: &ContainerSpec) -> Result<ContainerHandle, RuntimeError> {
        let lock = self.lock_for(&spec.name);
        let _guard = lock.lock().await;
        let (placed, node) = self.running_on_a_live_node(spec).await?;
        let shell = self.shell_of(&node, &placed.container, spec).await?;
        if let Err(e) = self
            .accounts
            .ensure(&node.docker, &placed.container, None, spec, &shell)
            .await
        {
            tracing::warn!(container = %spec.name, node = %node.hostname, error = %e, "no account entry for the uid");
        }
        let mut handle = ContainerHandle::new(
            placed.container.clone(),
            spec.name.clone(),
            shell,
            placed.outcome,
        );
        handle.ips = self.ips_of(&node, &placed.container).await;
        handle.engine_data = Some(Arc::new(Remote { node }));
        handle.gpus = placed.gpus;
        handle.recreated_from = placed.recreated_from;
        handle.remade_for = placed.remade_for;
        handle.pending_image = placed.pending_image;
        Ok(handle)
    }

    async fn reach(self: Arc<Self>, container: &ContainerHandle, who: Reacher) -> Arc<dyn Reach> {
        let agent = node_of(container).ok().and_then(|n| n.agent.clone());
        let relay = RelayReach {
            runtime: self,
            container: container.clone(),
            who,
        };
        match agent {
            Some(agent) => Arc::new(tunnel::AgentReach { relay, agent }),
            None => Arc::new(relay),
        }
    }

    async fn exec(
        &self,
        container: &ContainerHandle,
        req: ExecRequest,
    ) -> Result<Exec, RuntimeError> {
        let node = node_of(container)?;
        exec::start(node, &container.id, req).await
    }

    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, RuntimeError> {
        let services = self.clients.services().await?;
        let view = self.view(true).await?;
        Ok(services
            .iter()
            .filter_map(|s| {
                let spec = s.spec.as_ref()?;
                let labels = spec.labels.as_ref()?;
                let name = spec.name.clone()?;
                let task = view.live_task(&name);
                let running = task.is_some_and(|t| t.state == bollard::models::TaskState::RUNNING);
                Some(ManagedContainer {
                    id: s.id.clone()?,
                    user: labels
                        .get(crate::runtime::docker::labels::LABEL_USER)?
                        .clone(),
                    profile: labels
                        .get(crate::runtime::docker::labels::LABEL_PROFILE)
                        .and_then(|p| crate::auth::ProfileName::parse(p).ok()),
                    state: if running {
                        ContainerState::Running
                    } else {
                        ContainerState::Exited
                    },
                    image: labels
                        .get(crate::runtime::docker::labels::LABEL_IMAGE)
                        .cloned()
                        .unwrap_or_default(),
                    gpus: task.map(|t| t.gpus.clone()).unwrap_or_default(),
                    node: task
                        .and_then(|t| t.node.as_deref())
                        .and_then(|n| view.node(n))
                        .map(|n| n.hostname.clone()),
                    name,
                })
            })
            .collect())
    }

    async fn update_limits(&self, spec: &ContainerSpec) -> Result<bool, RuntimeError> {
        // The service keeps its spec (an update would restart the task); the running
        // container gets the new limits through its node, and the service at its next start.
        let view = self.view(true).await?;
        let Some(task) = view
            .live_task(&spec.name)
            .filter(|t| t.state == bollard::models::TaskState::RUNNING)
        else {
            return Ok(false);
        };
        let (Some(node), Some(container)) = (task.node.clone(), task.container.clone()) else {
            return Ok(false);
        };
        let node = self.clients.node(&node).await?;
        node.docker
            .update_container(
                &container,
                crate::runtime::docker::spec::limits_update(spec),
            )
            .await
            .map_err(|e| RuntimeError::Engine(format!("node {}: {e}", node.hostname)))?;
        Ok(true)
    }

    async fn stop(
        &self,
        container: &ManagedContainer,
        still_wanted: StillWanted,
    ) -> Result<bool, RuntimeError> {
        let lock = self.lock_for(&container.name);
        let _guard = lock.lock().await;
        if !still_wanted() {
            return Ok(false);
        }
        let stopped = self.scale_to_zero(&container.name).await?;
        if stopped {
            tracing::info!(target: "audit", container = %container.name, "container stopped (service scaled to 0)");
            self.view(true).await.ok();
        }
        Ok(stopped)
    }

    async fn gpus(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let view = self
            .view(false)
            .await
            .map_err(|e| GpuError::Inventory(e.to_string()))?;
        Ok(view.inventory())
    }

    fn gpu_holders(&self) -> BTreeMap<GpuUuid, Vec<Username>> {
        self.cached_view().holders()
    }

    fn gpu_node(&self, uuid: &GpuUuid) -> Option<String> {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        view.0
            .nodes
            .iter()
            .find(|n| n.gpus.contains(uuid))
            .map(|n| n.hostname.clone())
    }

    fn withdraws_dropped_starts(&self) -> bool {
        true
    }

    async fn nodes(&self) -> Result<Vec<crate::runtime::NodeSummary>, RuntimeError> {
        Ok(self.view(false).await?.summaries())
    }

    async fn recover(&self) -> Result<(), RuntimeError> {
        let list = self.list_managed().await?;
        let view = self.cached_view();
        let running = list.iter().filter(|c| c.state.is_running()).count();
        tracing::info!(
            managed = list.len(),
            running,
            nodes = view.nodes.len(),
            ready = view.nodes.iter().filter(|n| n.ready).count(),
            gpus = view.inventory().len(),
            "reconciled with the swarm's services labgate manages"
        );
        for c in &list {
            tracing::debug!(user = %c.user, service = %c.name, state = %c.state, node = ?c.node, "managed service");
        }
        // Each live node's API now, so a first login does not wait for a TLS handshake and a
        // version negotiation; one that does not answer is logged (and asked again later).
        for node in view.nodes.iter().filter(|n| n.ready) {
            match tokio::time::timeout(Duration::from_secs(5), self.clients.node(&node.id)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(node = %node.hostname, "node API not reachable: {e}"),
                Err(_) => {
                    tracing::warn!(node = %node.hostname, "node API did not answer within 5 s")
                }
            }
        }
        Ok(())
    }
}

/// The `labgate gpus` table of a swarm, asked of its manager.
pub async fn gpu_report(config: &Config) -> Result<String, GpuError> {
    let runtime = SwarmRuntime::new(config);
    let view = runtime
        .view(true)
        .await
        .map_err(|e| GpuError::Inventory(e.to_string()))?;
    Ok(crate::gpu::render_table(
        &view.inventory(),
        Some(&view.holders()),
    ))
}
