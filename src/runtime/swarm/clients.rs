//! Reaching the swarm: the manager's API (services, tasks, nodes) and each node's own API
//! (exec, inspect), made once and kept, API versions negotiated. `tcp://` APIs speak TLS with
//! the client certificate in `[cluster] tls_dir`; every call is bounded by `[docker]
//! timeout`, and the exec streams labgate opens itself get keepalives (`docker::dial`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{Service, Task};
use bollard::query_parameters::{ListNodesOptions, ListServicesOptions};
use tokio::sync::OnceCell;

use super::cluster::View;
use crate::config::cluster::{EngineAddr, SwarmConfig};
use crate::runtime::RuntimeError;
use crate::runtime::docker::dial::{Api, Dial, escape_query, tls_config};
use crate::runtime::docker::labels::LABEL_MANAGED;

/// A node's own API.
pub struct NodeClient {
    /// Its hostname (what users and admins see).
    pub hostname: String,
    /// The client for ordinary calls.
    pub docker: Docker,
    /// Its API's pooled connections, for the calls bollard does not make; its `dial` opens
    /// the exec streams.
    pub api: Api,
    /// The negotiated API version prefix (`v1.41`).
    pub version: String,
    /// Its `labgate node-agent`, where `[cluster] node_agent` says the nodes run one.
    pub agent: Option<Arc<super::tunnel::NodeAgent>>,
}

/// The manager's client and the nodes'.
pub struct Clients {
    config: SwarmConfig,
    timeout: Duration,
    manager: OnceCell<Connected>,
    tls: OnceCell<Arc<rustls::ClientConfig>>,
    nodes: tokio::sync::Mutex<HashMap<String, Arc<NodeClient>>>,
}

/// A negotiated client of one Docker API.
struct Connected {
    /// Bollard's client.
    docker: Docker,
    /// The pooled connections, for the calls bollard does not make.
    api: Api,
    /// The negotiated API version prefix (`v1.41`).
    version: String,
}

/// Maps a bollard error from `what`: an engine's answer stays an engine error, the rest
/// means unreachable.
pub fn engine_error(what: &str, e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError { message, .. } => {
            RuntimeError::Engine(format!("{what}: {message}"))
        }
        other => RuntimeError::Unavailable(format!("{what}: {other}")),
    }
}

impl Clients {
    /// Clients for `config`'s swarm; nothing is connected yet.
    pub fn new(config: SwarmConfig, timeout: Duration) -> Self {
        Clients {
            config,
            timeout,
            manager: OnceCell::new(),
            tls: OnceCell::new(),
            nodes: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    async fn tls(&self) -> Result<Arc<rustls::ClientConfig>, RuntimeError> {
        self.tls
            .get_or_try_init(|| async {
                tls_config(&self.config.tls_dir).map_err(|e| {
                    RuntimeError::Unavailable(format!("TLS for the cluster's Docker APIs: {e}"))
                })
            })
            .await
            .cloned()
    }

    /// How to open connections to `addr` (TLS from `tls_dir` for `tcp://`).
    async fn dial(&self, addr: &EngineAddr) -> Result<Dial, RuntimeError> {
        match addr {
            EngineAddr::Unix(path) => Ok(Dial::Unix(path.clone())),
            EngineAddr::Tcp { host, port } => Dial::tls(host, *port, self.tls().await?)
                .map_err(|e| RuntimeError::Unavailable(format!("{addr}: {e}"))),
        }
    }

    /// A negotiated client of the API at `addr`, and its pooled connections.
    async fn connect(&self, addr: &EngineAddr) -> Result<Connected, RuntimeError> {
        let secs = self.timeout.as_secs().max(1);
        let unreachable = |e: BollardError| RuntimeError::Unavailable(format!("{addr}: {e}"));
        let dial = self.dial(addr).await?;
        let api = Api::new(dial.clone(), self.timeout);
        let docker = match addr {
            EngineAddr::Unix(path) => Docker::connect_with_unix(
                &path.to_string_lossy(),
                secs,
                bollard::API_DEFAULT_VERSION,
            ),
            EngineAddr::Tcp { .. } => api.docker(),
        }
        .map_err(unreachable)?;
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        let v = docker.client_version();
        let version = format!("v{}.{}", v.major_version, v.minor_version);
        Ok(Connected {
            docker,
            api,
            version,
        })
    }

    /// The manager's client, its pooled connections, its API version.
    async fn manager_api(&self) -> Result<&Connected, RuntimeError> {
        self.manager
            .get_or_try_init(|| async {
                let api = self.connect(&self.config.manager).await?;
                tracing::info!(api = %api.version, manager = %self.config.manager, "connected to the swarm manager");
                Ok(api)
            })
            .await
    }

    /// The manager's client.
    pub async fn manager(&self) -> Result<&Docker, RuntimeError> {
        Ok(&self.manager_api().await?.docker)
    }

    /// The tasks of service `name` that should run (one manager call: a warm login's).
    pub async fn tasks_to_run(&self, name: &str) -> Result<Vec<Task>, RuntimeError> {
        self.tasks_where(serde_json::json!({ "service": [name], "desired-state": ["running"] }))
            .await
    }

    /// The tasks of `services`.
    async fn tasks(&self, services: Vec<String>) -> Result<Vec<Task>, RuntimeError> {
        self.tasks_where(serde_json::json!({ "service": services }))
            .await
    }

    /// The tasks `filters` select. Asked without bollard: Engine API before 1.42 names a
    /// task's GPUs `GenericResources`, later ones `AssignedGenericResources` (bollard's only
    /// name).
    async fn tasks_where(&self, filters: serde_json::Value) -> Result<Vec<Task>, RuntimeError> {
        let manager = self.manager_api().await?;
        let path = format!(
            "/{}/tasks?filters={}",
            manager.version,
            escape_query(&filters.to_string())
        );
        tasks_of(get_json(&manager.api, &path).await?)
    }

    /// The services labgate manages.
    pub async fn services(&self) -> Result<Vec<Service>, RuntimeError> {
        let manager = self.manager().await?;
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_MANAGED}=true")])]);
        manager
            .list_services(Some(ListServicesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| engine_error("swarm manager", e))
    }

    /// The swarm as the manager sees it now.
    pub async fn view(&self) -> Result<View, RuntimeError> {
        let manager = self.manager().await?;
        let services = self.services().await?;
        let nodes = manager
            .list_nodes(None::<ListNodesOptions>)
            .await
            .map_err(|e| engine_error("swarm manager", e))?;
        let ids: Vec<String> = services.iter().filter_map(|s| s.id.clone()).collect();
        let tasks = if ids.is_empty() {
            Vec::new()
        } else {
            self.tasks(ids).await?
        };
        Ok(View::of(nodes, &services, tasks, &self.config.gpu_resource))
    }

    /// The client of node `id` (its API found from its address and hostname by
    /// `[cluster] node_api`, or `[cluster.nodes.HOSTNAME]`).
    pub async fn node(&self, id: &str) -> Result<Arc<NodeClient>, RuntimeError> {
        if let Some(n) = self.nodes.lock().await.get(id) {
            return Ok(n.clone());
        }
        // Not locked while connecting: a node that does not answer holds up no other.
        let manager = self.manager().await?;
        let node = manager
            .inspect_node(id)
            .await
            .map_err(|e| engine_error("swarm manager", e))?;
        let hostname = node
            .description
            .and_then(|d| d.hostname)
            .unwrap_or_else(|| id.to_owned());
        let addr = node.status.and_then(|s| s.addr).unwrap_or_default();
        let api = self
            .config
            .node_addr(&hostname, &addr)
            .map_err(|e| RuntimeError::Unavailable(format!("node {hostname}'s API: {e}")))?;
        let Connected {
            docker,
            api: pool,
            version,
        } = self.connect(&api).await.map_err(|e| match e {
            RuntimeError::Unavailable(why) => {
                RuntimeError::Unavailable(format!("node {hostname} ({why})"))
            }
            other => other,
        })?;
        tracing::info!(node = %hostname, api = %api, version = %version, "connected to a node's Docker API");
        let agent = self.agent(&hostname, &addr).await;
        let client = Arc::new(NodeClient {
            hostname,
            docker,
            api: pool,
            version,
            agent,
        });
        self.nodes
            .lock()
            .await
            .insert(id.to_owned(), client.clone());
        Ok(client)
    }

    /// Node `hostname`'s agent (at swarm address `addr`), where the config names one that
    /// can be dialled; why not is logged.
    async fn agent(&self, hostname: &str, addr: &str) -> Option<Arc<super::tunnel::NodeAgent>> {
        let at = match self.config.agent_addr(hostname, addr)? {
            Ok(at) => at,
            Err(e) => {
                tracing::warn!(node = %hostname, error = %e, "the node's agent address: its forwards use the relay exec, its sessions' streams the node's engine");
                return None;
            }
        };
        match self.dial(&at).await {
            Ok(dial) => Some(Arc::new(super::tunnel::NodeAgent::new(
                hostname.to_owned(),
                dial,
            ))),
            Err(e) => {
                tracing::warn!(node = %hostname, agent = %at, error = %e, "the node's agent: its forwards use the relay exec, its sessions' streams the node's engine");
                None
            }
        }
    }

    /// Forgets node `id`'s client (it stopped answering: the next use connects again).
    pub async fn forget(&self, id: &str) {
        self.nodes.lock().await.remove(id);
    }
}

/// The tasks in the manager's answer `json`, their GPUs read under either name.
fn tasks_of(mut json: serde_json::Value) -> Result<Vec<Task>, RuntimeError> {
    if let Some(list) = json.as_array_mut() {
        for task in list.iter_mut().filter_map(|t| t.as_object_mut()) {
            if !task.contains_key("AssignedGenericResources")
                && let Some(gpus) = task.remove("GenericResources")
            {
                task.insert("AssignedGenericResources".to_owned(), gpus);
            }
        }
    }
    serde_json::from_value(json)
        .map_err(|e| RuntimeError::Engine(format!("swarm manager: tasks: {e}")))
}

/// `GET path` of `api`, as JSON.
async fn get_json(api: &Api, path: &str) -> Result<serde_json::Value, RuntimeError> {
    let answer = api
        .call(hyper::Method::GET, path)
        .await
        .map_err(|e| RuntimeError::Unavailable(format!("{api:?}: {e}")))?;
    if !answer.status.is_success() {
        return Err(RuntimeError::Engine(format!(
            "{api:?}: {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body).trim()
        )));
    }
    serde_json::from_slice(&answer.body).map_err(|e| RuntimeError::Engine(format!("{api:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasks_gpus_are_read_under_the_old_and_the_new_name() {
        let gpu = |v: &str| serde_json::json!([{ "NamedResourceSpec": { "Kind": "NVIDIA-GPU", "Value": v } }]);
        let json = serde_json::json!([
            { "ID": "old", "GenericResources": gpu("GPU-a") },
            { "ID": "new", "AssignedGenericResources": gpu("GPU-b") },
        ]);
        let tasks = tasks_of(json).unwrap();
        let named = |t: &Task| {
            t.assigned_generic_resources.as_ref().unwrap()[0]
                .named_resource_spec
                .as_ref()
                .unwrap()
                .value
                .clone()
        };
        assert_eq!(named(&tasks[0]).as_deref(), Some("GPU-a"));
        assert_eq!(named(&tasks[1]).as_deref(), Some("GPU-b"));
    }

    #[test]
    fn filters_are_escaped_for_the_query() {
        assert_eq!(
            escape_query(r#"{"service":["a b"]}"#),
            "%7B%22service%22%3A%5B%22a%20b%22%5D%7D"
        );
    }
}
