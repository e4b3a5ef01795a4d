//! `labgate check` on where containers run (`[cluster]`). For a swarm: one line saying how
//! it is reached (stdout); an error for each TLS file a `tcp://` API needs that cannot be
//! read; warnings for homes and mount sources outside `shared_paths` (a container may start
//! on any node) and for quotas that pin GPUs (a cluster gives a count). On this host's
//! engine: a warning for placement constraints, which mean nothing there.
//!
//! [`findings`] is pure but for reading the TLS files; [`report`] prints what it found.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::config::cluster::{Engine, EngineAddr, SwarmConfig};
use crate::config::{Config, GpuRequest, Quota};

/// What homes and mount sources outside `shared_paths` break, and what to do.
const NOT_SHARED: &str = "homes must be the same directory on every node (NFS or similar); declare the shared directories in [cluster] shared_paths";

/// What `labgate check` has to say about `[cluster]`, before it is printed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Findings {
    /// One line on how the cluster is reached (stdout); `None` for this host's engine.
    pub(super) info: Option<String>,
    /// Problems that fail the check (stderr, after the config file's name).
    pub(super) errors: Vec<String>,
    /// What will not work as the admin may expect (stderr, after `FILE: warning: `).
    pub(super) warnings: Vec<String>,
}

/// Prints the [`findings`] of `config`; true when there is no error.
pub(super) fn report(config: &Config) -> bool {
    let found = findings(config);
    let file = config.source.display();
    if let Some(info) = &found.info {
        println!("{info}");
    }
    for e in &found.errors {
        eprintln!("{file}: {e}");
    }
    for w in &found.warnings {
        eprintln!("{file}: warning: {w}");
    }
    found.errors.is_empty()
}

/// What `config`'s `[cluster]` and quotas call for (see the module doc).
pub(super) fn findings(config: &Config) -> Findings {
    let tables = config.quota_tables();
    match config.cluster.engine {
        Engine::Docker => Findings {
            warnings: constraints_ignored(&tables),
            ..Findings::default()
        },
        Engine::Swarm => {
            let swarm = &config.cluster.swarm;
            let mut warnings = not_shared(swarm, &tables);
            warnings.extend(pinned_gpus(&tables));
            Findings {
                info: Some(describe(swarm)),
                errors: unreadable_tls_files(swarm),
                warnings,
            }
        }
    }
}

/// The tables that set a value themselves (not merely inherit it): `value` differs from the
/// table below, or there is none. A profile appears once however many users it has.
fn setting<'a, T: PartialEq + 'a>(
    tables: &'a [(String, &'a Quota, Option<&'a Quota>)],
    value: impl Fn(&Quota) -> &T + 'a,
) -> impl Iterator<Item = (&'a str, &'a Quota)> + 'a {
    let mut seen = BTreeSet::new();
    tables.iter().filter_map(move |(table, quota, below)| {
        let own = below.is_none_or(|b| value(b) != value(quota));
        (own && seen.insert(table.as_str())).then_some((table.as_str(), *quota))
    })
}

/// `engine = "docker"`: constraints place nothing.
fn constraints_ignored(tables: &[(String, &Quota, Option<&Quota>)]) -> Vec<String> {
    setting(tables, |q| &q.constraints)
        .filter(|(_, q)| !q.constraints.is_empty())
        .map(|(table, q)| {
            format!(
                "{table} constraints = {:?} only place containers on a cluster's nodes: with [cluster] engine = \"docker\" every container runs on this host, and they are ignored",
                q.constraints
            )
        })
        .collect()
}

/// One line: the engine, the manager, the node API and agent templates (and the TLS files
/// when a `tcp://` address needs them), and the nodes named apart.
fn describe(swarm: &SwarmConfig) -> String {
    // ` (n2 at ADDR, n3 at ADDR)` for the nodes named apart, nothing when none is.
    let apart = |nodes: &std::collections::BTreeMap<String, EngineAddr>| {
        if nodes.is_empty() {
            return String::new();
        }
        let named: Vec<String> = nodes
            .iter()
            .map(|(host, addr)| format!("{host} at {addr}"))
            .collect();
        format!(" ({})", named.join(", "))
    };
    let mut line = format!(
        "cluster: engine \"swarm\", manager {}, node API {}{}",
        swarm.manager,
        swarm.node_api.as_str(),
        apart(&swarm.nodes)
    );
    match &swarm.node_agent {
        Some(agent) => line.push_str(&format!(", node agents {}", agent.as_str())),
        None if swarm.agents.is_empty() => {
            line.push_str(", no node agents (forwards through the relay exec, each session's stream over a connection of its own)");
        }
        None => line.push_str(", node agents"),
    }
    line.push_str(&apart(&swarm.agents));
    if swarm.uses_tcp() {
        line.push_str(&format!(", TLS from {}", swarm.tls_dir.display()));
    }
    line
}

/// Each of `tls_dir`'s files that cannot be read while some API is `tcp://`.
fn unreadable_tls_files(swarm: &SwarmConfig) -> Vec<String> {
    if !swarm.uses_tcp() {
        return Vec::new();
    }
    let mut tcp = Vec::new();
    if matches!(swarm.manager, EngineAddr::Tcp { .. }) {
        tcp.push(format!("manager {}", swarm.manager));
    }
    if swarm.node_api.as_str().starts_with("tcp://") {
        tcp.push(format!("node_api {}", swarm.node_api.as_str()));
    }
    if let Some(agent) = &swarm.node_agent
        && agent.as_str().starts_with("tcp://")
    {
        tcp.push(format!("node_agent {}", agent.as_str()));
    }
    for (host, api) in swarm.nodes.iter().chain(&swarm.agents) {
        if matches!(api, EngineAddr::Tcp { .. }) {
            tcp.push(format!("[cluster.nodes.{host}] {api}"));
        }
    }
    swarm
        .tls_files()
        .iter()
        .filter_map(|file| {
            std::fs::File::open(file).err().map(|e| {
                format!(
                    "[cluster] tls_dir: cannot read {} ({e}): labgate speaks TLS to every tcp:// Docker API and node agent ({}) with tls_dir's ca.pem, cert.pem and key.pem",
                    file.display(),
                    tcp.join(", ")
                )
            })
        })
        .collect()
}

/// Homes and mount sources outside `shared_paths`: one warning each, or one in all when
/// `shared_paths` is empty.
fn not_shared(swarm: &SwarmConfig, tables: &[(String, &Quota, Option<&Quota>)]) -> Vec<String> {
    // A profile cannot set a home: homes come from [defaults] and [users.NAME].
    let homes: Vec<(&str, &str)> = setting(tables, |q| &q.home)
        .filter(|(table, _)| !table.starts_with("[profiles."))
        .map(|(table, q)| (table, q.home.as_str()))
        .collect();
    let mut sources: Vec<(&str, &Path)> = Vec::new();
    for (table, quota) in setting(tables, |q| &q.mounts) {
        for m in &quota.mounts {
            if !sources.iter().any(|(_, s)| *s == m.source) {
                sources.push((table, &m.source));
            }
        }
    }
    if swarm.shared_paths.is_empty() {
        let mut here: Vec<String> = homes
            .iter()
            .map(|(table, home)| format!("{table} home {home:?}"))
            .collect();
        here.extend(
            sources
                .iter()
                .map(|(table, s)| format!("{table} mount {}", s.display())),
        );
        return vec![format!(
            "[cluster] shared_paths is empty, so no home or mount is known to be on every node ({}): {NOT_SHARED}",
            here.join(", ")
        )];
    }
    let mut warnings = Vec::new();
    for (table, home) in homes {
        if !swarm.is_shared(&home_dir(home)) {
            warnings.push(format!(
                "{table} home {home:?} is not under [cluster] shared_paths: {NOT_SHARED}"
            ));
        }
    }
    for (table, source) in sources {
        if !swarm.is_shared(source) {
            warnings.push(format!(
                "{table} mount source {} is not under [cluster] shared_paths: mounts, like {NOT_SHARED}",
                source.display()
            ));
        }
    }
    warnings
}

/// The directory a home template makes homes in: the template up to `{user}`.
fn home_dir(template: &str) -> PathBuf {
    Path::new(template)
        .components()
        .take_while(|c| !c.as_os_str().to_string_lossy().contains("{user}"))
        .collect()
}

/// Quotas that pin GPUs, which a cluster cannot do (the backend refuses such a login).
fn pinned_gpus(tables: &[(String, &Quota, Option<&Quota>)]) -> Vec<String> {
    setting(tables, |q| &q.gpus)
        .filter_map(|(table, q)| match &q.gpus {
            GpuRequest::Pinned(pins) => Some(format!(
                "{table} gpus pins GPUs ({}): a cluster gives GPUs by count only (its engine picks them), so logins with this quota are refused; write gpus = {}",
                pins.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                pins.len()
            )),
            GpuRequest::Count(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, text: &str) -> Config {
        crate::config::parse(&dir.join("labgate.toml"), text).unwrap()
    }

    fn swarm(dir: &Path, cluster: &str, rest: &str) -> Findings {
        findings(&config(
            dir,
            &format!(
                "[cluster]\nengine = \"swarm\"\n{cluster}\n\n[defaults]\nimage = \"x\"\n{rest}"
            ),
        ))
    }

    #[test]
    fn this_hosts_engine_warns_only_of_constraints_and_names_the_table_that_sets_them() {
        let dir = Path::new("/etc/labgate");
        let plain = findings(&config(dir, "[defaults]\nimage = \"x\"\ngpus = [0]\n"));
        assert_eq!(plain, Findings::default(), "pins are fine on one host");
        let found = findings(&config(
            dir,
            concat!(
                "[defaults]\nimage = \"x\"\n\n",
                "[users.alice]\nconstraints = [\"node.labels.gpu == a100\"]\n\n",
                "[profiles.p]\nusers = [\"alice\", \"bob\"]\nconstraints = [\"node.role == worker\"]\n\n",
                "[profiles.q]\nusers = [\"alice\"]\nmemory = \"1G\"\n",
            ),
        ));
        assert_eq!(found.info, None);
        assert!(found.errors.is_empty());
        assert_eq!(found.warnings.len(), 2, "{:#?}", found.warnings);
        assert!(
            found.warnings[0].starts_with(
                "[users.alice] constraints = [\"node.labels.gpu == a100\"] only place containers on a cluster's nodes"
            ) && found.warnings[0].contains("engine = \"docker\""),
            "{}",
            found.warnings[0]
        );
        assert!(
            found.warnings[1].starts_with("[profiles.p] constraints"),
            "once for its two users, never for q which inherits alice's: {:#?}",
            found.warnings
        );
    }

    #[test]
    fn a_swarm_is_described_and_needs_readable_tls_files_when_an_api_is_tcp() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let shared = "shared_paths = [\"/var/lib/labgate\"]\ntls_dir = \"tls\"";
        let found = swarm(dir, shared, "");
        let tls = dir.join("tls");
        assert_eq!(
            found.info.as_deref(),
            Some(
                format!(
                    "cluster: engine \"swarm\", manager unix:///var/run/docker.sock, node API tcp://{{addr}}:2376, no node agents (forwards through the relay exec, each session's stream over a connection of its own), TLS from {}",
                    tls.display()
                )
                .as_str()
            )
        );
        assert_eq!(found.errors.len(), 3, "{:#?}", found.errors);
        for (e, name) in found.errors.iter().zip(["ca.pem", "cert.pem", "key.pem"]) {
            assert!(
                e.starts_with(&format!(
                    "[cluster] tls_dir: cannot read {} (",
                    tls.join(name).display()
                )) && e.contains("(node_api tcp://{addr}:2376)"),
                "{e}"
            );
        }
        assert!(found.warnings.is_empty(), "{:#?}", found.warnings);

        std::fs::create_dir(&tls).unwrap();
        for name in ["ca.pem", "cert.pem"] {
            std::fs::write(tls.join(name), "pem").unwrap();
        }
        let found = swarm(dir, shared, "");
        assert_eq!(found.errors.len(), 1, "{:#?}", found.errors);
        assert!(found.errors[0].contains("key.pem"), "{}", found.errors[0]);
        std::fs::write(tls.join("key.pem"), "pem").unwrap();
        assert!(swarm(dir, shared, "").errors.is_empty());

        // Only unix sockets: no TLS needed, none named.
        let unix = swarm(
            Path::new("/nonexistent"),
            "node_api = \"unix:///run/docker-{hostname}.sock\"\nshared_paths = [\"/var/lib/labgate\"]\n\n[cluster.nodes.n2]\napi = \"unix:///run/n2.sock\"",
            "",
        );
        assert!(unix.errors.is_empty(), "{:#?}", unix.errors);
        assert_eq!(
            unix.info.as_deref(),
            Some(
                "cluster: engine \"swarm\", manager unix:///var/run/docker.sock, node API unix:///run/docker-{hostname}.sock (n2 at unix:///run/n2.sock), no node agents (forwards through the relay exec, each session's stream over a connection of its own)"
            )
        );
        // A tcp:// node named apart needs them too, and is named.
        let node = swarm(
            Path::new("/nonexistent"),
            "node_api = \"unix:///run/d.sock\"\n\n[cluster.nodes.n3]\napi = \"tcp://n3:2376\"",
            "",
        );
        assert_eq!(node.errors.len(), 3);
        assert!(
            node.errors[0].contains("([cluster.nodes.n3] tcp://n3:2376)"),
            "{}",
            node.errors[0]
        );
        // So do tcp:// agents, which are described with the nodes that have their own.
        let agents = swarm(
            Path::new("/nonexistent"),
            "node_api = \"unix:///run/d.sock\"\nnode_agent = \"tcp://{addr}\"\n\n[cluster.nodes.n4]\nagent = \"unix:///run/a.sock\"",
            "",
        );
        assert_eq!(agents.errors.len(), 3);
        assert!(
            agents.errors[0].contains("(node_agent tcp://{addr})"),
            "{}",
            agents.errors[0]
        );
        assert!(
            agents.info.as_deref().is_some_and(
                |i| i.contains(", node agents tcp://{addr} (n4 at unix:///run/a.sock)")
            ),
            "{:?}",
            agents.info
        );
    }

    #[test]
    fn homes_and_mounts_outside_shared_paths_are_warned_of_once_each() {
        let rest = concat!(
            "home = \"/srv/home/{user}\"\n",
            "mounts = [{ source = \"/srv/data\", target = \"/data\" }, { source = \"/scratch\", target = \"/scratch\" }]\n\n",
            "[users.alice]\nhome = \"/local/{user}\"\n\n",
            "[users.bob]\nmemory = \"1G\"\n\n",
            "[profiles.p]\nusers = [\"alice\", \"bob\"]\nmounts = [{ source = \"/scratch\", target = \"/s\" }, { source = \"/tmp/x\", target = \"/x\" }]\n",
        );
        let dir = Path::new("/nonexistent");
        let found = swarm(
            dir,
            "node_api = \"unix:///d.sock\"\nshared_paths = [\"/srv\"]",
            rest,
        );
        assert_eq!(
            found.warnings,
            [
                format!(
                    "[users.alice] home \"/local/{{user}}\" is not under [cluster] shared_paths: {NOT_SHARED}"
                ),
                format!(
                    "[defaults] mount source /scratch is not under [cluster] shared_paths: mounts, like {NOT_SHARED}"
                ),
                format!(
                    "[profiles.p] mount source /tmp/x is not under [cluster] shared_paths: mounts, like {NOT_SHARED}"
                ),
            ]
        );
        let none = swarm(dir, "node_api = \"unix:///d.sock\"", rest);
        assert_eq!(none.warnings.len(), 1, "said once: {:#?}", none.warnings);
        let w = &none.warnings[0];
        assert!(
            w.starts_with("[cluster] shared_paths is empty")
                && w.contains("[defaults] home \"/srv/home/{user}\", [users.alice] home \"/local/{user}\", [defaults] mount /srv/data, [defaults] mount /scratch, [profiles.p] mount /tmp/x")
                && w.ends_with(NOT_SHARED),
            "{w}"
        );
    }

    #[test]
    fn pinned_gpus_are_warned_of_where_they_are_set() {
        let found = swarm(
            Path::new("/nonexistent"),
            "node_api = \"unix:///d.sock\"\nshared_paths = [\"/\"]",
            "gpus = 1\n\n[users.alice]\ngpus = [\"GPU-8c5a3b1e-0f9d-4d5e-9b1a-2f3c4d5e6f70\", 3]\n\n[users.bob]\ncpus = 2\n",
        );
        assert_eq!(
            found.warnings,
            [
                "[users.alice] gpus pins GPUs (GPU-8c5a3b1e-0f9d-4d5e-9b1a-2f3c4d5e6f70, GPU 3): a cluster gives GPUs by count only (its engine picks them), so logins with this quota are refused; write gpus = 2"
            ]
        );
    }
}
