//! What the swarm looks like, as the manager reports it: nodes (hostname, address, health,
//! GPUs from their generic resources) and the tasks of labgate's services (where each runs,
//! its container, the GPUs the engine assigned it). Pure: built from the API's answers, it
//! answers the questions the backend and the admin commands ask (the GPU inventory and its
//! holders, whether a login's GPUs could be placed now, why a task is pending).

use std::collections::{BTreeMap, HashMap};

use bollard::models::{Node, Service, Task, TaskState};

use crate::auth::Username;
use crate::config::GpuUuid;
use crate::gpu::GpuInfo;
use crate::gpu::allocator::Taken;
use crate::runtime::docker::labels::{LABEL_MANAGED, LABEL_PROFILE, LABEL_USER};

/// A node of the swarm.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// Swarm node ID.
    pub id: String,
    /// Its hostname.
    pub hostname: String,
    /// Its address in the swarm (where its API is, by the `node_api` template).
    pub addr: String,
    /// Whether the manager sees it up (`ready`).
    pub ready: bool,
    /// Whether it takes new tasks (availability `active`).
    pub active: bool,
    /// Its GPUs: the named generic resources of the configured kind.
    pub gpus: Vec<GpuUuid>,
}

/// A task of one of labgate's services.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskView {
    /// Task ID.
    pub id: String,
    /// The service's name (`labgate-USER`).
    pub service: String,
    /// Who holds its GPUs (`user` or `user+profile`, from the service's labels).
    pub holder: Option<Username>,
    /// The node it is on (none while pending).
    pub node: Option<String>,
    /// What it is doing.
    pub state: TaskState,
    /// What the engine wants of it (`running`, or `shutdown` once replaced or scaled down).
    pub desired: TaskState,
    /// Its container, once made.
    pub container: Option<String>,
    /// The GPUs the engine assigned it.
    pub gpus: Vec<GpuUuid>,
    /// How many GPUs it asks for (its reservation of the kind).
    pub wants: usize,
    /// The engine's word on it (`pending`: why).
    pub message: String,
    /// Its error, if any (`no suitable node (insufficient resources on 3 nodes)`).
    pub err: Option<String>,
}

impl TaskView {
    /// Whether it runs, or is meant to and is on its way (holds its GPUs meanwhile).
    pub fn live(&self) -> bool {
        self.desired == TaskState::RUNNING && self.state <= TaskState::RUNNING
    }
}

/// The swarm at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// Nodes, sorted by hostname.
    pub nodes: Vec<NodeView>,
    /// Tasks of labgate's services.
    pub tasks: Vec<TaskView>,
}

pub(super) fn named_of_kind(
    resources: Option<&Vec<bollard::models::GenericResourcesInner>>,
    kind: &str,
) -> Vec<GpuUuid> {
    resources
        .into_iter()
        .flatten()
        .filter_map(|r| r.named_resource_spec.as_ref())
        .filter(|n| n.kind.as_deref() == Some(kind))
        .filter_map(|n| GpuUuid::parse(n.value.as_deref()?).ok())
        .collect()
}

/// The holder key of a service's labels: `user` or `user+profile`.
pub fn holder_of(labels: &HashMap<String, String>) -> Option<Username> {
    if labels.get(LABEL_MANAGED).map(String::as_str) != Some("true") {
        return None;
    }
    let user = Username::parse(labels.get(LABEL_USER)?).ok()?;
    match labels.get(LABEL_PROFILE) {
        Some(p) => Some(user.with_profile(&crate::auth::ProfileName::parse(p).ok()?)),
        None => Some(user),
    }
}

impl View {
    /// The view of the manager's answers; `gpu_kind` is `[cluster] gpu_resource`. Tasks of
    /// services that are not labgate's are left out.
    pub fn of(nodes: Vec<Node>, services: &[Service], tasks: Vec<Task>, gpu_kind: &str) -> View {
        let mut nodes: Vec<NodeView> = nodes
            .into_iter()
            .filter_map(|n| {
                let description = n.description.unwrap_or_default();
                let status = n.status.unwrap_or_default();
                Some(NodeView {
                    id: n.id?,
                    hostname: description.hostname.unwrap_or_default(),
                    addr: status.addr.unwrap_or_default(),
                    ready: status.state.is_some_and(|s| s.to_string() == "ready"),
                    active: n
                        .spec
                        .and_then(|s| s.availability)
                        .is_none_or(|a| a.to_string() == "active"),
                    gpus: named_of_kind(
                        description
                            .resources
                            .as_ref()
                            .and_then(|r| r.generic_resources.as_ref()),
                        gpu_kind,
                    ),
                })
            })
            .collect();
        nodes.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        let ours: HashMap<&str, (&str, Option<Username>)> = services
            .iter()
            .filter_map(|s| {
                let spec = s.spec.as_ref()?;
                let holder = holder_of(spec.labels.as_ref()?)?;
                Some((s.id.as_deref()?, (spec.name.as_deref()?, Some(holder))))
            })
            .collect();
        let tasks = tasks
            .into_iter()
            .filter_map(|t| {
                let (service, holder) = ours.get(t.service_id.as_deref()?)?.clone();
                let status = t.status.unwrap_or_default();
                Some(TaskView {
                    id: t.id?,
                    service: service.to_owned(),
                    holder,
                    node: t.node_id.filter(|n| !n.is_empty()),
                    state: status.state.unwrap_or(TaskState::NEW),
                    desired: t.desired_state.unwrap_or(TaskState::NEW),
                    container: status
                        .container_status
                        .and_then(|c| c.container_id)
                        .filter(|c| !c.is_empty()),
                    gpus: named_of_kind(t.assigned_generic_resources.as_ref(), gpu_kind),
                    wants: t
                        .spec
                        .as_ref()
                        .and_then(|s| s.resources.as_ref())
                        .and_then(|r| r.reservations.as_ref())
                        .and_then(|r| r.generic_resources.as_ref())
                        .into_iter()
                        .flatten()
                        .filter_map(|g| g.discrete_resource_spec.as_ref())
                        .filter(|d| d.kind.as_deref() == Some(gpu_kind))
                        .filter_map(|d| usize::try_from(d.value?).ok())
                        .sum(),
                    message: status.message.unwrap_or_default(),
                    err: status.err.filter(|e| !e.is_empty()),
                })
            })
            .collect();
        View { nodes, tasks }
    }

    /// The node `id`.
    pub fn node(&self, id: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The task of `service` that runs or is on its way, if any (the newest when several).
    pub fn live_task(&self, service: &str) -> Option<&TaskView> {
        self.tasks
            .iter()
            .filter(|t| t.service == service && t.live())
            .max_by_key(|t| t.state)
    }

    /// [`View::live_task`], leaving out tasks on nodes the manager sees down.
    pub fn live_task_on_a_live_node(&self, service: &str) -> Option<&TaskView> {
        self.tasks
            .iter()
            .filter(|t| t.service == service && t.live())
            .filter(|t| {
                t.node
                    .as_deref()
                    .and_then(|n| self.node(n))
                    .is_none_or(|n| n.ready)
            })
            .max_by_key(|t| t.state)
    }

    /// Every GPU of the swarm, numbered across nodes in hostname order (a cluster has no
    /// NVML of the gateway's: names say the node, figures are unknown).
    pub fn inventory(&self) -> Vec<GpuInfo> {
        let mut index = 0;
        let mut out = Vec::new();
        for node in &self.nodes {
            for uuid in &node.gpus {
                out.push(GpuInfo {
                    index,
                    uuid: uuid.clone(),
                    name: format!("GPU on {}", node.hostname),
                    memory_total: 0,
                    mig_mode: None,
                    utilization: None,
                    memory_used: 0,
                    processes: Vec::new(),
                });
                index += 1;
            }
        }
        out
    }

    /// Who holds which GPU: the holders of the live tasks the engine assigned them to.
    pub fn holders(&self) -> BTreeMap<GpuUuid, Vec<Username>> {
        let mut map: BTreeMap<GpuUuid, Vec<Username>> = BTreeMap::new();
        for t in self.tasks.iter().filter(|t| t.live()) {
            if let Some(h) = &t.holder {
                for g in &t.gpus {
                    map.entry(g.clone()).or_default().push(h.clone());
                }
            }
        }
        map
    }

    /// The node a task asking for `wanted` GPUs could go to now: a ready, active node with
    /// that many GPUs no live task holds. `Err` with the most free on one node and the
    /// GPUs held (for the user's message) when there is none.
    pub fn gpus_free_for(&self, wanted: usize) -> Result<&NodeView, (usize, Vec<Taken>)> {
        let held = self.holders();
        let free_on = |n: &NodeView| n.gpus.iter().filter(|g| !held.contains_key(*g)).count();
        let usable = || self.nodes.iter().filter(|n| n.ready && n.active);
        // Tasks on their way that the engine has not given GPUs yet will take some: which
        // is the engine's to say, so they count against every node's and the total.
        let coming: usize = self
            .tasks
            .iter()
            .filter(|t| t.live() && t.gpus.is_empty())
            .map(|t| t.wants)
            .sum();
        let total_free: usize = usable().map(free_on).sum();
        if total_free >= wanted + coming
            && let Some(n) = usable().find(|n| free_on(n) >= wanted)
        {
            return Ok(n);
        }
        let most = usable()
            .map(free_on)
            .max()
            .unwrap_or(0)
            .min(total_free.saturating_sub(coming));
        let index: HashMap<GpuUuid, u32> = self
            .inventory()
            .into_iter()
            .map(|g| (g.uuid, g.index))
            .collect();
        let taken = held
            .into_iter()
            .map(|(uuid, holders)| Taken {
                index: index.get(&uuid).copied(),
                uuid,
                holders: holders.into_iter().map(|h| (h, None)).collect(),
            })
            .collect();
        Err((most, taken))
    }

    /// The most GPUs one usable node has (a task cannot span nodes).
    pub fn most_gpus_on_a_node(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.ready && n.active)
            .map(|n| n.gpus.len())
            .max()
            .unwrap_or(0)
    }
}

impl View {
    /// Each node's figures: up, GPUs, GPUs held, labgate's running containers.
    pub fn summaries(&self) -> Vec<crate::runtime::NodeSummary> {
        let held = self.holders();
        self.nodes
            .iter()
            .map(|n| crate::runtime::NodeSummary {
                name: n.hostname.clone(),
                ready: n.ready,
                gpus: n.gpus.len(),
                gpus_held: n.gpus.iter().filter(|g| held.contains_key(*g)).count(),
                containers: self
                    .tasks
                    .iter()
                    .filter(|t| {
                        t.live()
                            && t.state == TaskState::RUNNING
                            && t.node.as_deref() == Some(n.id.as_str())
                    })
                    .count(),
            })
            .collect()
    }
}

/// Why a task is not running yet, in the engine's words, for a waiting user.
pub fn pending_reason(task: &TaskView) -> String {
    match (&task.err, task.message.as_str()) {
        (Some(err), _) => err.clone(),
        (None, "") => task.state.to_string(),
        (None, message) => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{
        GenericResourcesInner, GenericResourcesInnerNamedResourceSpec, NodeDescription, NodeState,
        NodeStatus, ResourceObject, ServiceSpec, TaskStatus,
    };

    fn gpu(uuid: &str) -> GenericResourcesInner {
        GenericResourcesInner {
            named_resource_spec: Some(GenericResourcesInnerNamedResourceSpec {
                kind: Some("NVIDIA-GPU".into()),
                value: Some(uuid.into()),
            }),
            ..Default::default()
        }
    }

    fn node(id: &str, host: &str, ready: bool, gpus: &[&str]) -> Node {
        Node {
            id: Some(id.into()),
            description: Some(NodeDescription {
                hostname: Some(host.into()),
                resources: Some(ResourceObject {
                    generic_resources: Some(gpus.iter().map(|g| gpu(g)).collect()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                state: Some(if ready {
                    NodeState::READY
                } else {
                    NodeState::DOWN
                }),
                addr: Some(format!("10.0.0.{}", host.len())),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn service(id: &str, user: &str) -> Service {
        Service {
            id: Some(id.into()),
            spec: Some(ServiceSpec {
                name: Some(format!("labgate-{user}")),
                labels: Some(HashMap::from([
                    (LABEL_MANAGED.to_owned(), "true".to_owned()),
                    (LABEL_USER.to_owned(), user.to_owned()),
                ])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn task(service: &str, node: &str, state: TaskState, gpus: &[&str]) -> Task {
        Task {
            id: Some(format!("t-{service}-{node}")),
            service_id: Some(service.into()),
            node_id: Some(node.into()),
            desired_state: Some(TaskState::RUNNING),
            assigned_generic_resources: Some(gpus.iter().map(|g| gpu(g)).collect()),
            status: Some(TaskStatus {
                state: Some(state),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const A: &str = "GPU-aaaaaaaa-0000-4000-8000-000000000001";
    const B: &str = "GPU-aaaaaaaa-0000-4000-8000-000000000002";
    const C: &str = "GPU-aaaaaaaa-0000-4000-8000-000000000003";

    #[test]
    fn gpus_are_the_nodes_generic_resources_and_holders_the_live_tasks() {
        let view = View::of(
            vec![
                node("id3", "n3", true, &[C]),
                node("id2", "n2", true, &[A, B]),
                node("id1", "n1", true, &[]),
            ],
            &[service("s-alice", "alice"), service("s-bob", "bob")],
            vec![
                task("s-alice", "id2", TaskState::RUNNING, &[A]),
                task("s-bob", "id3", TaskState::STARTING, &[C]),
                task("s-other", "id3", TaskState::RUNNING, &[B]),
            ],
            "NVIDIA-GPU",
        );
        let inventory = view.inventory();
        let named: Vec<(u32, String, String)> = inventory
            .iter()
            .map(|g| (g.index, g.uuid.to_string(), g.name.clone()))
            .collect();
        assert_eq!(
            named,
            vec![
                (0, A.into(), "GPU on n2".into()),
                (1, B.into(), "GPU on n2".into()),
                (2, C.into(), "GPU on n3".into()),
            ]
        );
        let holders = view.holders();
        assert_eq!(holders.len(), 2, "a service that is not ours holds nothing");
        assert_eq!(holders[&GpuUuid::parse(A).unwrap()][0].as_str(), "alice");
        assert_eq!(holders[&GpuUuid::parse(C).unwrap()][0].as_str(), "bob");
        assert_eq!(
            view.live_task("labgate-alice").unwrap().node.as_deref(),
            Some("id2")
        );
        assert_eq!(view.gpus_free_for(1).unwrap().hostname, "n2");
        let n3 = view
            .summaries()
            .into_iter()
            .find(|n| n.name == "n3")
            .unwrap();
        assert_eq!(
            (n3.ready, n3.gpus, n3.gpus_held, n3.containers),
            (true, 1, 1, 0),
            "bob's task holds n3's GPU while it starts"
        );
        let (most, taken) = view.gpus_free_for(2).unwrap_err();
        assert_eq!(most, 1);
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[0].index, Some(0));
        // A task on its way asking for a GPU the engine has not assigned yet takes the last.
        let mut carol = task("s-carol", "", TaskState::PENDING, &[]);
        carol.spec = Some(bollard::models::TaskSpec {
            resources: Some(bollard::models::TaskSpecResources {
                reservations: Some(ResourceObject {
                    generic_resources: Some(vec![GenericResourcesInner {
                        discrete_resource_spec: Some(
                            bollard::models::GenericResourcesInnerDiscreteResourceSpec {
                                kind: Some("NVIDIA-GPU".into()),
                                value: Some(1),
                            },
                        ),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let busier = View::of(
            vec![
                node("id3", "n3", true, &[C]),
                node("id2", "n2", true, &[A, B]),
            ],
            &[service("s-alice", "alice"), service("s-carol", "carol")],
            vec![task("s-alice", "id2", TaskState::RUNNING, &[A]), carol],
            "NVIDIA-GPU",
        );
        assert_eq!(
            busier.gpus_free_for(1).unwrap().hostname,
            "n2",
            "2 free, 1 coming"
        );
        assert_eq!(busier.gpus_free_for(2).unwrap_err().0, 1);
    }

    #[test]
    fn a_down_node_places_nothing_and_a_shut_down_task_holds_nothing() {
        let mut gone = task("s-alice", "id2", TaskState::RUNNING, &[A]);
        gone.desired_state = Some(TaskState::SHUTDOWN);
        let view = View::of(
            vec![node("id2", "n2", false, &[A, B])],
            &[service("s-alice", "alice")],
            vec![gone],
            "NVIDIA-GPU",
        );
        assert!(view.holders().is_empty());
        assert!(view.live_task("labgate-alice").is_none());
        let on_down = View::of(
            vec![
                node("id2", "n2", false, &[A]),
                node("id3", "n3", true, &[B]),
            ],
            &[service("s-alice", "alice")],
            vec![
                task("s-alice", "id2", TaskState::RUNNING, &[A]),
                task("s-alice", "id3", TaskState::PENDING, &[]),
            ],
            "NVIDIA-GPU",
        );
        assert_eq!(
            on_down.live_task("labgate-alice").unwrap().node.as_deref(),
            Some("id2")
        );
        let replacement = on_down.live_task_on_a_live_node("labgate-alice").unwrap();
        assert_eq!(
            (replacement.node.as_deref(), replacement.state),
            (Some("id3"), TaskState::PENDING),
            "the task on the down node is not waited for: its replacement is"
        );
        assert_eq!(view.gpus_free_for(1).unwrap_err().0, 0, "n2 is down");
    }

    #[test]
    fn a_pending_task_says_why_in_the_engines_words() {
        let mut t = TaskView {
            id: "t".into(),
            service: "labgate-alice".into(),
            holder: None,
            node: None,
            state: TaskState::PENDING,
            desired: TaskState::RUNNING,
            container: None,
            gpus: Vec::new(),
            wants: 0,
            message: "pending task scheduling".into(),
            err: None,
        };
        assert_eq!(pending_reason(&t), "pending task scheduling");
        t.err = Some("no suitable node (insufficient resources on 3 nodes)".into());
        assert_eq!(
            pending_reason(&t),
            "no suitable node (insufficient resources on 3 nodes)"
        );
    }
}
