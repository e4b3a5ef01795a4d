//! `[cluster]`: which container engine runs users' containers, and how labgate reaches it.
//! `"docker"` (the default) is this host's Docker Engine (configured by `[docker]`), so a
//! config without `[cluster]` means what it always meant. `"swarm"` is a Docker Swarm: the
//! manager's API for services, each node's own API for exec (see `runtime::swarm`).
//! Kubernetes would be a new backend behind `runtime::ContainerRuntime` and a new value here.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// The engines this version can run containers on, as `engine` names them.
pub const ENGINES: &[&str] = &["docker", "swarm"];

/// Default `manager`: the Docker Engine on this host (a swarm manager itself).
pub const DEFAULT_MANAGER: &str = "unix:///var/run/docker.sock";
/// Default `node_api`: each node's TLS API on Docker's TLS port.
pub const DEFAULT_NODE_API: &str = "tcp://{addr}:2376";
/// Default `tls_dir` (the `DOCKER_CERT_PATH` layout: `ca.pem`, `cert.pem`, `key.pem`).
pub const DEFAULT_TLS_DIR: &str = "/etc/labgate/docker-tls";
/// Default `gpu_resource`: the generic resource kind NVIDIA's documentation uses.
pub const DEFAULT_GPU_RESOURCE: &str = "NVIDIA-GPU";
/// Default `network`: the swarm-scoped network users' services join.
pub const DEFAULT_CLUSTER_NETWORK: &str = "labgate";
/// The TLS port of a Docker API when a `tcp://` address names none.
pub const DOCKER_TLS_PORT: u16 = 2376;
/// The port of a node's `labgate node-agent` when a `tcp://` address names none.
pub const AGENT_PORT: u16 = 2378;

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Where users' containers run.
    pub engine: Engine,
    /// How a swarm is reached (defaults when `engine` is not `"swarm"`).
    pub swarm: SwarmConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            engine: Engine::Docker,
            swarm: SwarmConfig {
                manager: EngineAddr::Unix(PathBuf::from("/var/run/docker.sock")),
                node_api: NodeApi {
                    template: DEFAULT_NODE_API.to_owned(),
                    port: DOCKER_TLS_PORT,
                },
                node_agent: None,
                agents: BTreeMap::new(),
                tls_dir: PathBuf::from(DEFAULT_TLS_DIR),
                gpu_resource: DEFAULT_GPU_RESOURCE.to_owned(),
                network: DEFAULT_CLUSTER_NETWORK.to_owned(),
                shared_paths: Vec::new(),
                nodes: BTreeMap::new(),
            },
        }
    }
}

/// The keys of `[cluster]` for `engine = "swarm"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwarmConfig {
    /// A swarm manager's Docker API: services, tasks and nodes are asked of it.
    pub manager: EngineAddr,
    /// Each node's own Docker API (exec and inspect go to the node that runs the task).
    pub node_api: NodeApi,
    /// Each node's `labgate node-agent`, where forwards into its containers go (`None`:
    /// through the relay over the node's exec stream).
    pub node_agent: Option<NodeApi>,
    /// `ca.pem`, `cert.pem`, `key.pem` for every `tcp://` API (manager and nodes).
    pub tls_dir: PathBuf,
    /// The nodes' generic resource kind for GPUs (`node-generic-resources` in daemon.json).
    pub gpu_resource: String,
    /// The swarm-scoped network users' services join (README: a per-node config-only
    /// network with `enable_icc=false`, and a swarm bridge made from it).
    pub network: String,
    /// Directories the admin keeps identical on every node (NFS...): homes and mounts should
    /// lie under one of them (`labgate check` warns when not).
    pub shared_paths: Vec<PathBuf>,
    /// Nodes whose API the `node_api` template does not describe, by hostname.
    pub nodes: BTreeMap<String, EngineAddr>,
    /// Nodes whose agent the `node_agent` template does not describe, by hostname.
    pub agents: BTreeMap<String, EngineAddr>,
}

impl ClusterConfig {
    /// The `[cluster]` keys whose values differ from `self` to `new`, as `cluster.KEY`, in
    /// the order the README lists them (for reload's "needs a restart" report).
    pub fn changed_keys(&self, new: &ClusterConfig) -> Vec<&'static str> {
        let (a, b) = (&self.swarm, &new.swarm);
        [
            ("cluster.engine", self.engine != new.engine),
            ("cluster.manager", a.manager != b.manager),
            ("cluster.node_api", a.node_api != b.node_api),
            ("cluster.node_agent", a.node_agent != b.node_agent),
            ("cluster.tls_dir", a.tls_dir != b.tls_dir),
            ("cluster.gpu_resource", a.gpu_resource != b.gpu_resource),
            ("cluster.network", a.network != b.network),
            ("cluster.shared_paths", a.shared_paths != b.shared_paths),
            ("cluster.nodes", a.nodes != b.nodes || a.agents != b.agents),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}

impl SwarmConfig {
    /// The API of the node `hostname` whose swarm address is `addr`.
    pub fn node_addr(&self, hostname: &str, addr: &str) -> Result<EngineAddr, String> {
        match self.nodes.get(hostname) {
            Some(a) => Ok(a.clone()),
            None => self.node_api.expand(hostname, addr),
        }
    }

    /// The agent of the node `hostname` whose swarm address is `addr`, when the nodes run
    /// one.
    pub fn agent_addr(&self, hostname: &str, addr: &str) -> Option<Result<EngineAddr, String>> {
        match self.agents.get(hostname) {
            Some(a) => Some(Ok(a.clone())),
            None => self.node_agent.as_ref().map(|t| t.expand(hostname, addr)),
        }
    }

    /// The TLS files in [`SwarmConfig::tls_dir`]: CA, certificate, key.
    pub fn tls_files(&self) -> [PathBuf; 3] {
        ["ca.pem", "cert.pem", "key.pem"].map(|f| self.tls_dir.join(f))
    }

    /// Whether any API (manager, template, a node) is `tcp://` and so needs [`Self::tls_dir`].
    pub fn uses_tcp(&self) -> bool {
        matches!(self.manager, EngineAddr::Tcp { .. })
            || self.node_api.template.starts_with("tcp://")
            || self
                .node_agent
                .as_ref()
                .is_some_and(|t| t.template.starts_with("tcp://"))
            || self
                .nodes
                .values()
                .chain(self.agents.values())
                .any(|a| matches!(a, EngineAddr::Tcp { .. }))
    }

    /// Whether `path` lies under one of [`Self::shared_paths`].
    pub fn is_shared(&self, path: &Path) -> bool {
        self.shared_paths.iter().any(|s| path.starts_with(s))
    }
}

/// The keys a Swarm placement constraint may test (besides `node.labels.NAME` and
/// `engine.labels.NAME`): Swarm matches no node on any other key, so a container asking for
/// one would wait for ever.
pub const CONSTRAINT_KEYS: &[&str] = &[
    "node.id",
    "node.hostname",
    "node.ip",
    "node.role",
    "node.platform.os",
    "node.platform.arch",
];

/// Checks a quota's `constraints` entry as Swarm reads one: `KEY == VALUE` or `KEY != VALUE`
/// (spaces around the operator are fine), a key Swarm knows, a value of the characters it
/// accepts (swarmkit's `constraint.Parse`).
pub fn check_constraint(c: &str) -> Result<(), String> {
    const EXAMPLE: &str = "e.g. \"node.labels.gpu == a100\"";
    let Some((key, value)) = ["==", "!="].iter().find_map(|op| c.split_once(op)) else {
        return Err(format!(
            "constraint {c:?}: write KEY == VALUE or KEY != VALUE ({EXAMPLE})"
        ));
    };
    let (key, value) = (key.trim(), value.trim());
    if key.is_empty() || value.is_empty() {
        let what = if key.is_empty() { "key" } else { "value" };
        return Err(format!(
            "constraint {c:?} has no {what}: write KEY == VALUE or KEY != VALUE ({EXAMPLE})"
        ));
    }
    let mut chars = key.chars();
    let key_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.len() > 1
        && chars.all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !key_ok {
        return Err(format!(
            "constraint {c:?}: the key {key:?} is not one Swarm accepts (letters, digits, '.', '_' and '-', starting with a letter)"
        ));
    }
    let lower = key.to_ascii_lowercase();
    let labelled = ["node.labels.", "engine.labels."]
        .iter()
        .any(|p| lower.len() > p.len() && lower.starts_with(p));
    if !labelled && !CONSTRAINT_KEYS.contains(&lower.as_str()) {
        return Err(format!(
            "constraint {c:?}: Swarm matches no node on the key {key:?}: use node.labels.NAME, engine.labels.NAME or one of {}",
            CONSTRAINT_KEYS.join(", ")
        ));
    }
    if let Some(bad) = value.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || c.is_whitespace() || ":-_.*()?+[]\\^$|/".contains(*c))
    }) {
        return Err(format!(
            "constraint {c:?}: Swarm refuses {bad:?} in a value (letters, digits, spaces and :-_.*()?+[]\\^$|/)"
        ));
    }
    Ok(())
}

/// A Docker API address: `unix:///PATH` or `tcp://HOST:PORT` (always with TLS).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EngineAddr {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP address, spoken with TLS.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
}

impl EngineAddr {
    /// Parses `unix:///PATH` or `tcp://HOST[:PORT]` (Docker's TLS port by default).
    pub fn parse(s: &str) -> Result<EngineAddr, String> {
        Self::parse_with_port(s, DOCKER_TLS_PORT)
    }

    /// [`EngineAddr::parse`] with `default_port` for a `tcp://` address that names none.
    pub fn parse_with_port(s: &str, default_port: u16) -> Result<EngineAddr, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a unix socket needs an absolute path (unix:///run/docker.sock)"
                ));
            }
            return Ok(EngineAddr::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            let rest = rest.trim_end_matches('/');
            if rest.is_empty() || rest.contains('/') {
                return Err(format!("{s:?}: expected tcp://HOST:PORT"));
            }
            let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
                match v6.split_once(']') {
                    Some((h, "")) => (h, None),
                    Some((h, p)) => (h, p.strip_prefix(':')),
                    None => return Err(format!("{s:?}: unclosed [ in the address")),
                }
            } else {
                match rest.rsplit_once(':') {
                    Some((h, p)) if !h.contains(':') => (h, Some(p)),
                    _ => (rest, None),
                }
            };
            if host.is_empty() || host.contains(char::is_whitespace) {
                return Err(format!("{s:?}: expected tcp://HOST:PORT"));
            }
            let port = match port {
                None => default_port,
                Some(p) => p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{s:?}: {p:?} is not a port"))?,
            };
            return Ok(EngineAddr::Tcp {
                host: host.to_owned(),
                port,
            });
        }
        Err(format!(
            "{s:?}: a Docker API address is unix:///PATH or tcp://HOST:PORT (with TLS from tls_dir)"
        ))
    }
}

impl fmt::Display for EngineAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineAddr::Unix(p) => write!(f, "unix://{}", p.display()),
            EngineAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            EngineAddr::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

/// A per-node address template (`node_api`, `node_agent`): an [`EngineAddr`] with `{addr}`
/// (the node's swarm address) and `{hostname}` (its hostname) in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeApi {
    template: String,
    /// The port of a `tcp://` address that names none.
    port: u16,
}

impl NodeApi {
    /// Checks `template` (a node's Docker API): only the two placeholders, and an address
    /// once they are filled.
    pub fn parse(template: &str) -> Result<NodeApi, String> {
        Self::parse_with_port(template, DOCKER_TLS_PORT)
    }

    /// [`NodeApi::parse`] for an address whose default port is `port`.
    pub fn parse_with_port(template: &str, port: u16) -> Result<NodeApi, String> {
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("{template:?}: unclosed {{"));
            };
            let name = &rest[open + 1..open + close];
            if name != "addr" && name != "hostname" {
                return Err(format!(
                    "{template:?}: unknown placeholder {{{name}}}: use {{addr}} (the node's swarm address) or {{hostname}}"
                ));
            }
            rest = &rest[open + close + 1..];
        }
        let t = NodeApi {
            template: template.to_owned(),
            port,
        };
        t.expand("node1", "10.0.0.1")?;
        Ok(t)
    }

    /// The API of the node `hostname` at `addr`.
    pub fn expand(&self, hostname: &str, addr: &str) -> Result<EngineAddr, String> {
        EngineAddr::parse_with_port(
            &self
                .template
                .replace("{addr}", addr)
                .replace("{hostname}", hostname),
            self.port,
        )
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.template
    }
}

/// A container engine labgate can drive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Engine {
    /// This host's Docker Engine (`[docker]`).
    #[default]
    Docker,
    /// A Docker Swarm (`[cluster]`'s other keys).
    Swarm,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Docker => "docker",
            Engine::Swarm => "swarm",
        })
    }
}

impl<'de> Deserialize<'de> for Engine {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EngineVisitor;
        impl Visitor<'_> for EngineVisitor {
            type Value = Engine;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the name of a container engine (\"docker\" or \"swarm\")")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Engine, E> {
                match s {
                    "docker" => Ok(Engine::Docker),
                    "swarm" => Ok(Engine::Swarm),
                    "kubernetes" => Err(E::custom(
                        "engine = \"kubernetes\" is not available in this version of labgate; it runs containers on this host's Docker Engine (\"docker\") or a Docker Swarm (\"swarm\")",
                    )),
                    other => Err(E::custom(format!(
                        "unknown engine {other:?}: expected one of {}",
                        ENGINES
                            .iter()
                            .map(|e| format!("{e:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))),
                }
            }
        }
        d.deserialize_str(EngineVisitor)
    }
}

/// A Docker API address as written (checked when read, so the error points at it).
#[derive(Debug, Clone)]
pub(super) struct RawAddr(pub(super) EngineAddr);

/// A string, checked by `parse` as it is read (its error is the key's).
fn parsed<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    parse(&String::deserialize(d)?).map_err(de::Error::custom)
}

impl<'de> Deserialize<'de> for RawAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, EngineAddr::parse).map(RawAddr)
    }
}

/// The `node_api` template as written.
#[derive(Debug, Clone)]
pub(super) struct RawNodeApi(pub(super) NodeApi);

impl<'de> Deserialize<'de> for RawNodeApi {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, NodeApi::parse).map(RawNodeApi)
    }
}

/// The `node_agent` template as written.
#[derive(Debug, Clone)]
pub(super) struct RawNodeAgent(pub(super) NodeApi);

impl<'de> Deserialize<'de> for RawNodeAgent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, |s| NodeApi::parse_with_port(s, AGENT_PORT)).map(RawNodeAgent)
    }
}

/// An agent's address as written.
#[derive(Debug, Clone)]
pub(super) struct RawAgentAddr(pub(super) EngineAddr);

impl<'de> Deserialize<'de> for RawAgentAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d, |s| EngineAddr::parse_with_port(s, AGENT_PORT)).map(RawAgentAddr)
    }
}

/// `[cluster.nodes.HOSTNAME]`: a node whose Docker API, agent or both the templates do not
/// describe.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) api: Option<RawAddr>,
    pub(super) agent: Option<RawAgentAddr>,
}

/// `[cluster]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) engine: Option<Engine>,
    pub(super) manager: Option<toml::Spanned<RawAddr>>,
    pub(super) node_api: Option<toml::Spanned<RawNodeApi>>,
    pub(super) node_agent: Option<toml::Spanned<RawNodeAgent>>,
    pub(super) tls_dir: Option<toml::Spanned<PathBuf>>,
    pub(super) gpu_resource: Option<toml::Spanned<String>>,
    pub(super) network: Option<toml::Spanned<String>>,
    pub(super) shared_paths: Option<toml::Spanned<Vec<toml::Spanned<PathBuf>>>>,
    #[serde(default)]
    pub(super) nodes: BTreeMap<String, toml::Spanned<RawNode>>,
}

impl RawCluster {
    /// The validated section; relative paths are resolved with `resolve`. An error names the
    /// key's position (`span`) and what is wrong.
    pub(super) fn validate(
        self,
        resolve: impl Fn(PathBuf) -> PathBuf,
    ) -> Result<ClusterConfig, (std::ops::Range<usize>, String)> {
        let engine = self.engine.unwrap_or_default();
        let mut out = ClusterConfig {
            engine,
            ..ClusterConfig::default()
        };
        if engine != Engine::Swarm {
            let first = [
                self.manager.as_ref().map(|s| ("manager", s.span())),
                self.node_api.as_ref().map(|s| ("node_api", s.span())),
                self.node_agent.as_ref().map(|s| ("node_agent", s.span())),
                self.tls_dir.as_ref().map(|s| ("tls_dir", s.span())),
                self.gpu_resource
                    .as_ref()
                    .map(|s| ("gpu_resource", s.span())),
                self.network.as_ref().map(|s| ("network", s.span())),
                self.shared_paths
                    .as_ref()
                    .map(|s| ("shared_paths", s.span())),
                self.nodes.values().next().map(|s| ("nodes", s.span())),
            ]
            .into_iter()
            .flatten()
            .next();
            if let Some((key, span)) = first {
                return Err((
                    span,
                    format!(
                        "[cluster] {key} applies only to engine = \"swarm\" (the engine here is {engine:?}, this host's Docker Engine, configured by [docker])",
                        engine = engine.to_string()
                    ),
                ));
            }
            return Ok(out);
        }
        let swarm = &mut out.swarm;
        if let Some(m) = self.manager {
            swarm.manager = m.into_inner().0;
        }
        if let Some(t) = self.node_api {
            swarm.node_api = t.into_inner().0;
        }
        if let Some(t) = self.node_agent {
            swarm.node_agent = Some(t.into_inner().0);
        }
        if let Some(d) = self.tls_dir {
            swarm.tls_dir = resolve(d.into_inner());
        }
        if let Some(kind) = self.gpu_resource {
            let span = kind.span();
            let kind = kind.into_inner();
            if kind.is_empty()
                || !kind
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err((
                    span,
                    format!(
                        "gpu_resource {kind:?}: a generic resource kind is letters, digits, '-', '_' and '.' (as in daemon.json's node-generic-resources, e.g. \"NVIDIA-GPU\")"
                    ),
                ));
            }
            swarm.gpu_resource = kind;
        }
        if let Some(n) = self.network {
            let span = n.span();
            let n = n.into_inner();
            if n.is_empty() || n.contains(char::is_whitespace) {
                return Err((span, format!("network {n:?} is not a network name")));
            }
            swarm.network = n;
        }
        if let Some(paths) = self.shared_paths {
            for p in paths.into_inner() {
                let span = p.span();
                let p = p.into_inner();
                if !p.is_absolute() {
                    return Err((
                        span,
                        format!(
                            "shared_paths: {} is not absolute (the same path on every node)",
                            p.display()
                        ),
                    ));
                }
                swarm.shared_paths.push(p);
            }
        }
        for (host, node) in self.nodes {
            let span = node.span();
            let node = node.into_inner();
            if node.api.is_none() && node.agent.is_none() {
                return Err((
                    span,
                    format!(
                        "[cluster.nodes.{host}] says nothing: give the node's api (its Docker API) or agent (its labgate node-agent), or both"
                    ),
                ));
            }
            if let Some(api) = node.api {
                swarm.nodes.insert(host.clone(), api.0);
            }
            if let Some(agent) = node.agent {
                swarm.agents.insert(host, agent.0);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_addresses_parse_with_tls_port_by_default_and_say_what_is_wrong() {
        assert_eq!(
            EngineAddr::parse("unix:///run/docker.sock"),
            Ok(EngineAddr::Unix("/run/docker.sock".into()))
        );
        assert_eq!(
            EngineAddr::parse("tcp://10.0.0.2"),
            Ok(EngineAddr::Tcp {
                host: "10.0.0.2".into(),
                port: 2376
            })
        );
        let v6 = EngineAddr::parse("tcp://[fd00::2]:2377").unwrap();
        assert_eq!(v6.to_string(), "tcp://[fd00::2]:2377");
        for (bad, says) in [
            ("unix://run/docker.sock", "absolute path"),
            ("tcp://host:99999", "not a port"),
            ("tcp://", "tcp://HOST:PORT"),
            ("http://host:2375", "unix:///PATH or tcp://HOST:PORT"),
            ("tcp://host:2376/x", "tcp://HOST:PORT"),
        ] {
            let e = EngineAddr::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn constraints_have_the_shape_and_keys_swarm_accepts() {
        for good in [
            "node.labels.gpu == a100",
            "node.labels.gpu==a100",
            "node.hostname != gpu3",
            "engine.labels.zone == lab-2",
            "Node.Role == manager",
            "node.ip == 10.0.0.0/24",
            "node.platform.arch == x86_64",
        ] {
            assert_eq!(check_constraint(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            (
                "node.labels.gpu = a100",
                "write KEY == VALUE or KEY != VALUE",
            ),
            ("node.labels.gpu", "write KEY == VALUE"),
            ("== a100", "has no key"),
            ("node.labels.gpu == ", "has no value"),
            (
                "node labels == a100",
                "the key \"node labels\" is not one Swarm accepts",
            ),
            (
                "node.label.gpu == a100",
                "Swarm matches no node on the key \"node.label.gpu\"",
            ),
            ("node.labels. == a100", "matches no node"),
            ("gpu == a100", "node.labels.NAME"),
            (
                "node.labels.gpu == a100 != b",
                "Swarm refuses '!' in a value",
            ),
            ("node.labels.gpu == \"a100\"", "Swarm refuses '\"'"),
        ] {
            let e = check_constraint(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.starts_with(&format!("constraint {bad:?}")), "{e}");
        }
    }

    #[test]
    fn node_api_templates_fill_in_address_and_hostname_and_refuse_other_placeholders() {
        let t = NodeApi::parse("tcp://{addr}:2376").unwrap();
        assert_eq!(
            t.expand("gpu1", "10.1.0.5").unwrap().to_string(),
            "tcp://10.1.0.5:2376"
        );
        let t = NodeApi::parse("unix:///run/docker-{hostname}.sock").unwrap();
        assert_eq!(
            t.expand("gpu1", "10.1.0.5").unwrap(),
            EngineAddr::Unix("/run/docker-gpu1.sock".into())
        );
        let e = NodeApi::parse("tcp://{ip}:2376").unwrap_err();
        assert!(e.contains("unknown placeholder {ip}"), "{e}");
        assert!(NodeApi::parse("ftp://{addr}").is_err());
        assert!(NodeApi::parse("tcp://{addr:2376").is_err());
    }
}
