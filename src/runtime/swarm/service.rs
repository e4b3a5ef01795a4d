//! Making a user's service run, and stopping it: create it (first login), scale it to one
//! replica with the current spec (a later login after a stop), or use it as it runs; then
//! wait for its task to run, telling the waiting user why the engine says it is pending. A
//! wait given up (the deadline, or the login gone: its future dropped) scales the service
//! back to zero, so no half-started service is left holding a GPU.

use std::sync::Arc;
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::models::{ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, TaskState};
use bollard::query_parameters::{InspectServiceOptions, UpdateServiceOptions};
use tokio::time::Instant;

use super::SwarmRuntime;
use super::clients::{Clients, engine_error};
use super::cluster::pending_reason;
use super::spec::{Placement, service_spec};
use crate::gpu::GpuError;
use crate::gpu::allocator::AllocError;
use crate::runtime::docker::labels::{LABEL_IMAGE, LABEL_SETTINGS};
use crate::runtime::docker::spec::{changed_settings, helper_mount, relay_mount};
use crate::runtime::{ContainerSpec, EnsureOutcome, PullEvent, PullProgress, RuntimeError};

/// How long a task may stay unplaced (pending) before the login gives up.
pub(super) const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a placed task may take to run (its node pulling the image included).
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a waiting start looks at its task.
const POLL: Duration = Duration::from_millis(50);

/// Where a service's task runs.
pub struct Placed {
    /// The node's swarm ID.
    pub node: String,
    /// The task's container on it.
    pub container: String,
    /// What this start did.
    pub outcome: EnsureOutcome,
    /// The GPUs the engine gave it.
    pub gpus: Vec<crate::config::GpuUuid>,
    /// The image it had before this start made it again from another.
    pub recreated_from: Option<String>,
    /// The settings whose change this start applied.
    pub remade_for: Vec<&'static str>,
    /// The image it runs when that is not the configured one (it gets that one when it
    /// next starts).
    pub pending_image: Option<String>,
}

/// Undoes a start if dropped armed: a service this start made is removed, one it scaled up
/// is scaled back to zero, so a start given up leaves nothing half-made.
struct Withdraw {
    clients: Arc<Clients>,
    name: String,
    armed: bool,
    /// This start made the service.
    made: bool,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let clients = self.clients.clone();
        let name = std::mem::take(&mut self.name);
        let made = self.made;
        tokio::spawn(async move {
            let undone = if made {
                match clients.manager().await {
                    Ok(m) => m
                        .delete_service(&name)
                        .await
                        .map_err(|e| engine_error("swarm manager", e)),
                    Err(e) => Err(e),
                }
            } else {
                scale(&clients, &name, 0, None).await.map(|_| ())
            };
            match undone {
                Ok(()) if made => {
                    tracing::info!(target: "audit", container = %name, "start withdrawn: service removed")
                }
                Ok(()) => {
                    tracing::info!(target: "audit", container = %name, "start withdrawn: service scaled back to 0")
                }
                Err(e) => tracing::warn!(container = %name, "cannot undo a withdrawn start: {e}"),
            }
        });
    }
}

/// The registry credentials of `spec`'s image, for the nodes' pulls (sent with the service,
/// read from their file now).
async fn registry_credentials(
    spec: &ContainerSpec,
) -> Result<Option<DockerCredentials>, RuntimeError> {
    match &spec.registry {
        Some(auth) => crate::runtime::docker::pull::credentials(auth)
            .await
            .map(Some)
            .map_err(|reason| RuntimeError::Pull {
                image: spec.image.clone(),
                reason,
            }),
        None => Ok(None),
    }
}

/// Whether a task's error says its node has no such image and cannot pull it.
fn image_missing(err: &str) -> bool {
    let err = err.to_ascii_lowercase();
    [
        "no such image",
        "pull access denied",
        "manifest unknown",
        "not found: manifest",
    ]
    .iter()
    .any(|m| err.contains(m))
}

/// The replicas a service asks for.
fn replicas(spec: &ServiceSpec) -> i64 {
    spec.mode
        .as_ref()
        .and_then(|m| m.replicated.as_ref())
        .and_then(|r| r.replicas)
        .unwrap_or(0)
}

/// Sets `name`'s replicas to `n`, with `new_spec` instead of its own when given. `Ok(false)`
/// when there is no such service or it already asked for `n` (and no new spec was given).
async fn scale(
    clients: &Clients,
    name: &str,
    n: i64,
    new_spec: Option<(ServiceSpec, Option<DockerCredentials>)>,
) -> Result<bool, RuntimeError> {
    let manager = clients.manager().await?;
    let service = match manager
        .inspect_service(name, None::<InspectServiceOptions>)
        .await
    {
        Ok(s) => s,
        Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => return Ok(false),
        Err(e) => return Err(engine_error("swarm manager", e)),
    };
    let version = service
        .version
        .and_then(|v| v.index)
        .and_then(|i| i32::try_from(i).ok())
        .unwrap_or_default();
    let current = service.spec.unwrap_or_default();
    if new_spec.is_none() && replicas(&current) == n {
        return Ok(false);
    }
    let (mut spec, credentials) = new_spec.unwrap_or((current, None));
    spec.mode = Some(ServiceSpecMode {
        replicated: Some(ServiceSpecModeReplicated { replicas: Some(n) }),
        ..Default::default()
    });
    manager
        .update_service(
            name,
            spec,
            UpdateServiceOptions {
                version,
                ..Default::default()
            },
            credentials,
        )
        .await
        .map_err(|e| engine_error("swarm manager", e))?;
    Ok(true)
}

impl SwarmRuntime {
    /// Stops the service `name` (scaled to zero). `Ok(false)` when it was not running.
    pub(super) async fn scale_to_zero(&self, name: &str) -> Result<bool, RuntimeError> {
        scale(&self.clients, name, 0, None).await
    }

    /// The service of `spec` as it should be: the configured spec, with the helpers bound.
    fn wanted(&self, spec: &ContainerSpec) -> Result<ServiceSpec, RuntimeError> {
        let on = Placement {
            network: &self.config.network,
            gpu_resource: &self.config.gpu_resource,
            constraints: &spec.constraints,
        };
        let mut service =
            service_spec(spec, &on).map_err(|e| RuntimeError::Create(e.to_string()))?;
        if let Some(mounts) = service
            .task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut())
            .and_then(|c| c.mounts.as_mut())
        {
            if self.relay_helper.is_file() {
                mounts.push(relay_mount(&self.relay_helper));
            }
            if self.sftp_helper.is_file() {
                mounts.push(helper_mount(
                    &self.sftp_helper,
                    crate::runtime::SFTP_SERVER_PATH,
                ));
            }
        }
        Ok(service)
    }

    /// Whether a start that takes GPUs may go ahead: the queue lets it, and some usable node
    /// has as many free GPUs as it asks for (else the login waits in the GPU line).
    async fn gpus_free(&self, spec: &ContainerSpec) -> Result<(), RuntimeError> {
        let wanted = spec.gpu_request.count();
        if wanted == 0 {
            return Ok(());
        }
        if !spec.may_take_gpus {
            return Err(RuntimeError::Gpu(GpuError::Waiting));
        }
        let view = self.view(true).await?;
        let most = view.most_gpus_on_a_node();
        if most < wanted {
            return Err(RuntimeError::Gpu(GpuError::Allocation(
                AllocError::TooMany {
                    wanted,
                    total: most,
                },
            )));
        }
        match view.gpus_free_for(wanted) {
            Ok(_) => Ok(()),
            Err((free, taken)) => Err(RuntimeError::Gpu(GpuError::Allocation(
                AllocError::NotEnough {
                    wanted,
                    free,
                    taken,
                },
            ))),
        }
    }

    /// Makes `spec`'s service run and waits for its task.
    pub(super) async fn make_running(&self, spec: &ContainerSpec) -> Result<Placed, RuntimeError> {
        crate::runtime::docker::binds::check_binds(spec).await?;
        let manager = self.clients.manager().await?;
        let wanted = self.wanted(spec)?;
        let existing = match manager
            .inspect_service(&spec.name, None::<InspectServiceOptions>)
            .await
        {
            Ok(s) => Some(s),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => None,
            Err(e) => return Err(engine_error("swarm manager", e)),
        };
        let mut recreated_from = None;
        let mut remade_for = Vec::new();
        let mut pending_image = None;
        let t0 = std::time::Instant::now();
        // Armed before each request that makes or scales, so a start dropped while the
        // request is under way is undone too.
        let mut guard = Withdraw {
            clients: self.clients.clone(),
            name: spec.name.clone(),
            armed: false,
            made: false,
        };
        let outcome = match existing {
            None => {
                self.gpus_free(spec).await?;
                let credentials = registry_credentials(spec).await?;
                (guard.armed, guard.made) = (true, true);
                match manager.create_service(wanted, credentials).await {
                    Ok(_) => {}
                    Err(BollardError::DockerResponseServerError {
                        status_code: 409, ..
                    }) => {
                        // Made meanwhile by another gateway: theirs is used below.
                        guard.armed = false;
                    }
                    Err(BollardError::DockerResponseServerError { message, .. }) => {
                        guard.armed = false;
                        return Err(RuntimeError::Create(message));
                    }
                    Err(e) => {
                        guard.armed = false;
                        return Err(engine_error("swarm manager", e));
                    }
                }
                tracing::info!(target: "audit", container = %spec.name, image = %spec.image, "container created (service)");
                EnsureOutcome::Created
            }
            Some(service) => {
                let current = service.spec.clone().unwrap_or_default();
                let labels = current.labels.clone().unwrap_or_default();
                let ours = super::cluster::holder_of(&labels).is_some_and(|h| h == spec.holder());
                if !ours {
                    return Err(RuntimeError::NameTaken(spec.name.clone()));
                }
                if replicas(&current) >= 1 {
                    pending_image = labels
                        .get(LABEL_IMAGE)
                        .filter(|i| **i != spec.image)
                        .cloned();
                    EnsureOutcome::Running
                } else {
                    self.gpus_free(spec).await?;
                    let old_image = labels.get(LABEL_IMAGE).filter(|i| **i != spec.image);
                    recreated_from = old_image.cloned();
                    remade_for = labels
                        .get(LABEL_SETTINGS)
                        .map(|l| changed_settings(l, spec))
                        .unwrap_or_default();
                    let credentials = registry_credentials(spec).await?;
                    guard.armed = true;
                    scale(&self.clients, &spec.name, 1, Some((wanted, credentials))).await?;
                    tracing::info!(target: "audit", container = %spec.name, "container started (service scaled to 1)");
                    EnsureOutcome::Started
                }
            }
        };
        let placed = self.wait_running(spec).await?;
        guard.armed = false;
        if outcome != EnsureOutcome::Running {
            crate::metrics::metrics()
                .container_ready(outcome == EnsureOutcome::Created, t0.elapsed());
        }
        Ok(Placed {
            outcome,
            recreated_from,
            remade_for,
            pending_image,
            ..placed
        })
    }

    /// `task`'s ID and where it will run, when it is on its node but not yet running (its
    /// container's ID is not known yet: the node's start event gives it).
    fn assigned(&self, task: &bollard::models::Task) -> Option<(String, Placed)> {
        let state = task.status.as_ref()?.state?;
        if !(TaskState::ASSIGNED..TaskState::RUNNING).contains(&state) {
            return None;
        }
        let id = task.id.clone().filter(|id| !id.is_empty())?;
        Some((id, self.on_node(task, String::new())?))
    }

    /// Where `task` runs, when it runs (its container made, on a node).
    fn placed(&self, task: &bollard::models::Task) -> Option<Placed> {
        let status = task.status.as_ref()?;
        if status.state != Some(TaskState::RUNNING) {
            return None;
        }
        let container = status.container_status.as_ref()?.container_id.clone();
        self.on_node(task, container.filter(|c| !c.is_empty())?)
    }

    /// `task` as it runs in `container` on its node, with the GPUs the engine gave it.
    fn on_node(&self, task: &bollard::models::Task, container: String) -> Option<Placed> {
        Some(Placed {
            node: task.node_id.clone().filter(|n| !n.is_empty())?,
            container,
            outcome: EnsureOutcome::Running,
            gpus: super::cluster::named_of_kind(
                task.assigned_generic_resources.as_ref(),
                &self.config.gpu_resource,
            ),
            recreated_from: None,
            remade_for: Vec::new(),
            pending_image: None,
        })
    }

    /// `spec`'s container when its task already runs on a node that answers, asked of the
    /// manager in one call (a warm login); `None`: the full path decides.
    pub(super) async fn already_running(
        &self,
        spec: &ContainerSpec,
    ) -> Option<(Placed, Arc<super::clients::NodeClient>)> {
        let tasks = self.clients.tasks_to_run(&spec.name).await.ok()?;
        let (task, placed) = tasks.iter().find_map(|t| Some((t, self.placed(t)?)))?;
        let labels = task
            .spec
            .as_ref()
            .and_then(|s| s.container_spec.as_ref())
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        if super::cluster::holder_of(&labels)? != spec.holder() {
            return None;
        }
        let node = self.clients.node(&placed.node).await.ok()?;
        let t0 = std::time::Instant::now();
        if !super::exec::node_answers(&node).await {
            return None;
        }
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "node ping");
        let placed = Placed {
            pending_image: labels
                .get(LABEL_IMAGE)
                .filter(|i| **i != spec.image)
                .cloned(),
            ..placed
        };
        Some((placed, node))
    }

    /// Waits until `spec`'s service has a running task, telling the waiting session why it
    /// does not (as pull events for its container).
    async fn wait_running(&self, spec: &ContainerSpec) -> Result<Placed, RuntimeError> {
        let started = Instant::now();
        let mut said = String::new();
        let mut next_look = started + Duration::from_millis(300);
        let mut failed_before = None;
        let mut watch = StartWatch::default();
        loop {
            // One light call per poll; the whole swarm (why it waits) twice a second.
            let tasks = self.clients.tasks_to_run(&spec.name).await?;
            if let Some(placed) = tasks.iter().find_map(|t| self.placed(t)) {
                return Ok(placed);
            }
            watch.follow(&self.clients, tasks.iter().find_map(|t| self.assigned(t)));
            if Instant::now() < next_look {
                if let Some(placed) = watch.pause(POLL).await {
                    return Ok(placed);
                }
                continue;
            }
            next_look = Instant::now() + Duration::from_millis(500);
            let view = self.view(true).await?;
            // A task on a node the manager sees down is not coming back: its replacement is.
            let task = view.live_task_on_a_live_node(&spec.name).cloned();
            if let Some(t) = &task
                && t.state == TaskState::RUNNING
                && let (Some(node), Some(container)) = (&t.node, &t.container)
            {
                return Ok(Placed {
                    node: node.clone(),
                    container: container.clone(),
                    outcome: EnsureOutcome::Running,
                    gpus: t.gpus.clone(),
                    recreated_from: None,
                    remade_for: Vec::new(),
                    pending_image: None,
                });
            }
            // A task that failed during this start for want of its image: no retry brings it.
            let failed_before = failed_before.get_or_insert_with(|| {
                view.tasks
                    .iter()
                    .filter(|t| t.service == spec.name && t.err.is_some())
                    .map(|t| t.id.clone())
                    .collect::<std::collections::HashSet<_>>()
            });
            if let Some(err) = view
                .tasks
                .iter()
                .filter(|t| t.service == spec.name && !failed_before.contains(&t.id))
                .filter_map(|t| t.err.as_deref())
                .find(|e| image_missing(e))
            {
                return Err(RuntimeError::Pull {
                    image: spec.image.clone(),
                    reason: format!("the cluster's node could not get it: {err}"),
                });
            }
            // The newest task that failed says why, when none is on its way.
            let failed = view
                .tasks
                .iter()
                .filter(|t| t.service == spec.name && t.err.is_some())
                .max_by_key(|t| t.state)
                .cloned();
            let (placed, reason) = match (&task, &failed) {
                (Some(t), _) => (t.state >= TaskState::ASSIGNED, pending_reason(t)),
                (None, Some(f)) => (false, pending_reason(f)),
                (None, None) => (false, "waiting for the swarm to make a task".to_owned()),
            };
            let limit = if placed {
                START_TIMEOUT
            } else {
                PLACEMENT_TIMEOUT
            };
            if started.elapsed() >= limit {
                return Err(RuntimeError::Start(format!(
                    "the cluster did not run your container within {}: {reason}",
                    humantime::format_duration(limit)
                )));
            }
            if reason != said && started.elapsed() >= Duration::from_millis(500) {
                let line = match &task {
                    Some(t) if t.state < TaskState::ASSIGNED => {
                        format!("waiting for the cluster to place your container: {reason}")
                    }
                    Some(t) if reason == t.state.to_string() => {
                        format!("starting your container ({reason})")
                    }
                    Some(t) => format!("starting your container ({}): {reason}", t.state),
                    None => format!("waiting for the cluster: {reason}"),
                };
                let _ = self.events.send(PullEvent {
                    container: spec.name.clone(),
                    progress: PullProgress { line, step: true },
                });
                said = reason;
            }
            if let Some(placed) = watch.pause(POLL).await {
                return Ok(placed);
            }
        }
    }
}

/// A task's container start, watched on its node's own event stream: the node knows it
/// tens of milliseconds (sometimes over a hundred) before the manager's task list says so.
/// The manager's list still decides when the watch has nothing to say.
#[derive(Default)]
struct StartWatch {
    /// The task watched.
    task: Option<String>,
    /// Where its container runs, once its node says it started; `None` when the watch ended
    /// without news (the node did not answer...).
    seen: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Option<Placed>> + Send>>>,
}

impl StartWatch {
    /// Watches `assigned` (a task on its node, and where it will run) unless it already does.
    fn follow(&mut self, clients: &Arc<Clients>, assigned: Option<(String, Placed)>) {
        let Some((task, placed)) = assigned else {
            return;
        };
        if self.task.as_deref() == Some(task.as_str()) {
            return;
        }
        self.task = Some(task.clone());
        let clients = clients.clone();
        self.seen = Some(Box::pin(async move {
            let node = clients.node(&placed.node).await.ok()?;
            let container = started_container(&node, &task).await?;
            Some(Placed {
                container,
                ..placed
            })
        }));
    }

    /// Waits `pause`, or less when the watched container starts meanwhile.
    async fn pause(&mut self, pause: Duration) -> Option<Placed> {
        let Some(seen) = self.seen.as_mut() else {
            tokio::time::sleep(pause).await;
            return None;
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => None,
            placed = seen => {
                self.seen = None;
                placed
            }
        }
    }
}

/// The ID of task `task`'s container on `node` once it has started: the node's `start`
/// event for it, replayed when it came before the question (the engine keeps its recent
/// events; the last five minutes are asked, for clocks that differ between machines).
async fn started_container(node: &super::clients::NodeClient, task: &str) -> Option<String> {
    use futures::StreamExt;
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs()
        .saturating_sub(300);
    let filters = std::collections::HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        ("event".to_owned(), vec!["start".to_owned()]),
        (
            "label".to_owned(),
            vec![format!("com.docker.swarm.task.id={task}")],
        ),
    ]);
    let mut events = node
        .docker
        .events(Some(bollard::query_parameters::EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(filters),
        }));
    let event = events.next().await?.ok()?;
    event.actor?.id.filter(|id| !id.is_empty())
}
