//! The ways into containers the suite runs on, and what a behaviour asks of the engine behind
//! a way: each backend-specific fact (how many containers a user has, whether a process runs
//! in one, its id and `/dev/shm` size, that it is stopped) is asked of the engine that knows
//! it. Local Docker: the machine's own engine and host PIDs. Swarm: the manager (services,
//! tasks, replicas) and the node that runs the task (its container, its processes through
//! `docker top`), since nothing of a remote container is visible from the gateway's host.

use std::ops::Deref;
use std::time::Duration;

use crate::common::swarm::SwarmRig;
use crate::common::{Gateway, containers_named, docker_inspect, eventually, pids_of};

/// A way into containers: the ways of local Docker (`[docker] forward_via`), and the swarm
/// backend (`[cluster] engine = "swarm"`, issue #17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// The default (`auto`): as root in the host PID namespace, the gateway enters the
    /// containers' namespaces, and commands without a terminal take the direct path.
    Namespace,
    /// `exec`: everything through `labgate-relay` execs and the engine's exec stream, the
    /// way a remote engine's containers would be reached.
    Relay,
    /// A three-node Docker Swarm (the rig of `common::swarm`, shared by the binary's swarm
    /// tests): a user's container is the task of the one-replica service `labgate-USER` on
    /// a node Swarm chose, reached through that node's TLS API; commands take the exec
    /// stream and forwards the relay exec (the gateway sees no process of a remote node).
    Swarm,
}

pub use crate::common::swarm::{serial as one_at_a_time, shared as shared_rig};

/// The shared rig, for a swarm test that already knows it runs (the macro's swarm tests
/// return before the behaviour when it does not).
fn rig() -> &'static SwarmRig {
    shared_rig().expect("a swarm behaviour runs only where the rig does")
}

/// Asserts the swarm has no service left: each swarm test removes the services it made
/// (its [`Lab`]'s drop) before the next one starts.
pub fn assert_no_services_left() {
    let rig = rig();
    let left = rig.docker(rig.manager(), &["service", "ls", "--format", "{{.Name}}"]);
    assert!(left.is_empty(), "services left behind: {left}");
}

/// The node the swarm rig keeps an image for a test in (see [`Way::image_lines`]).
const IMAGE_NODE: &str = "n2";

/// A gateway of one [`Way`]; derefs to the [`Gateway`]. On the swarm way it removes its
/// users' services when dropped (a failed test included): the rig outlives the test.
pub struct Lab {
    /// The gateway.
    pub gw: Gateway,
    /// The way it was started on: what its drop must clean up.
    way: Way,
}

impl Deref for Lab {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.gw
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.way == Way::Swarm {
            // The gateway first: it could otherwise start a service again meanwhile.
            self.gw.stop();
            if let Some(rig) = shared_rig() {
                rig.remove_services(&self.gw.users);
            }
        }
    }
}

/// The service (and the name `labgate status` lists) of user `i` of `gw`.
fn service(gw: &Gateway, i: usize) -> String {
    gw.container(i)
}

/// The swarm's filter for the containers of the service `service` (on any node).
fn of_service(service: &str) -> String {
    format!("label=com.docker.swarm.service.name={service}")
}

/// The node (hostname) that runs, or is to run, the task of `service`, as the manager says.
fn swarm_node_of(service: &str) -> Option<String> {
    rig().service_node(service)
}

/// The running container of `service`'s task and its node, asked of the manager (where)
/// and of that node (which container).
fn swarm_task(service: &str) -> Option<(String, String)> {
    let rig = rig();
    let node = swarm_node_of(service)?;
    let id = rig
        .docker_result(
            rig.node(&node),
            &["ps", "-q", "--no-trunc", "--filter", &of_service(service)],
        )
        .ok()?;
    let id = id.lines().next()?.trim().to_owned();
    (!id.is_empty()).then_some((node, id))
}

/// The replicas `service` asks for.
fn swarm_replicas(service: &str) -> String {
    let rig = rig();
    rig.docker(
        rig.manager(),
        &[
            "service",
            "inspect",
            "--format",
            "{{.Spec.Mode.Replicated.Replicas}}",
            service,
        ],
    )
}

/// The containers of `service`, running or not, on every node.
fn swarm_containers(service: &str) -> usize {
    let rig = rig();
    rig.nodes()
        .iter()
        .map(|node| {
            rig.docker(node, &["ps", "-a", "-q", "--filter", &of_service(service)])
                .lines()
                .count()
        })
        .sum()
}

/// `docker inspect -f FORMAT` of `service`'s running container, on its node.
fn swarm_inspect(service: &str, format: &str) -> Option<String> {
    let (node, id) = swarm_task(service)?;
    let rig = rig();
    rig.docker_result(rig.node(&node), &["inspect", "-f", format, &id])
        .ok()
}

impl Way {
    /// A gateway of this way with `users` users and nothing else configured.
    pub fn gateway(self, users: usize) -> Lab {
        self.gateway_with(users, "")
    }

    /// A gateway of this way with `users` users and `tables` (`[users.X]`...) after
    /// `[defaults]`. Local Docker: the static relay installed as deployed, `forward_via` set.
    /// Swarm: the rig's `[cluster]` table, both static helpers installed (as the package
    /// installs them on every node).
    pub fn gateway_with(self, users: usize, tables: &str) -> Lab {
        let builder = Gateway::builder().users(users);
        let gw = match self {
            Way::Namespace => builder.docker("forward_via = \"auto\"\n").tail(tables),
            Way::Relay => builder.docker("forward_via = \"exec\"\n").tail(tables),
            Way::Swarm => builder
                .docker(&format!(
                    "sftp_helper = \"{}\"",
                    crate::common::static_helper("labgate-sftp").display()
                ))
                .tail(&format!("{tables}\n{}", rig().cluster_table())),
        }
        .start();
        Lab { gw, way: self }
    }

    /// Lines for a `[users.X]` table that gives the user `image`, a local image of this
    /// machine (built by the caller). Local Docker has it already. On the swarm, where no
    /// registry serves it, it is loaded on one node (once per test process) and the user's
    /// service is constrained to that node: placement is not what such a test is about.
    pub fn image_lines(self, image: &str) -> String {
        match self {
            Way::Namespace | Way::Relay => format!("image = \"{image}\"\n"),
            Way::Swarm => {
                static LOADED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
                let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
                if !loaded.iter().any(|i| i == image) {
                    let rig = rig();
                    rig.load_image(rig.node(IMAGE_NODE), image);
                    loaded.push(image.to_owned());
                }
                format!("image = \"{image}\"\nconstraints = [\"node.hostname == {IMAGE_NODE}\"]\n")
            }
        }
    }

    /// How many containers user `i` of `gw` has, running or not: named `labgate-USER` on
    /// local Docker; on the swarm, the containers of the service `labgate-USER` on every
    /// node (each task ever run leaves one until Swarm prunes it), asserting there is one
    /// such service.
    pub fn containers_of(self, gw: &Gateway, i: usize) -> usize {
        let name = service(gw, i);
        match self {
            Way::Namespace | Way::Relay => containers_named(&name),
            Way::Swarm => {
                let rig = rig();
                let services =
                    rig.docker(rig.manager(), &["service", "ls", "--format", "{{.Name}}"]);
                assert_eq!(
                    services.lines().filter(|s| *s == name).count(),
                    1,
                    "one service {name}: {services}"
                );
                swarm_containers(&name)
            }
        }
    }

    /// Whether a process whose command line is exactly `cmdline` (args joined by spaces,
    /// zombies left out) runs for `user`: on local Docker, any host process (test markers are
    /// unique); on the swarm, a process of the user's running container, as its node's
    /// `docker top` lists it (the gateway's host sees no PID of a remote container).
    pub fn runs(self, user: &str, cmdline: &str) -> bool {
        match self {
            Way::Namespace | Way::Relay => !pids_of(cmdline).is_empty(),
            Way::Swarm => {
                let Some((node, id)) = swarm_task(&format!("labgate-{user}")) else {
                    return false;
                };
                let rig = rig();
                // `docker top` runs the node's `ps` with these options (it needs a PID
                // column). It fails only for a container that no longer runs: "no process"
                // must not pass for "could not look".
                let top = match rig
                    .docker_result(rig.node(&node), &["top", &id, "-o", "pid,stat,args"])
                {
                    Ok(top) => top,
                    Err(_) if swarm_task(&format!("labgate-{user}")).is_none() => return false,
                    Err(e) => panic!("cannot list the processes of {id} on {node}: {e}"),
                };
                top.lines().skip(1).any(|line| {
                    let mut cols = line.split_whitespace();
                    let (_pid, stat) = (cols.next(), cols.next().unwrap_or("Z"));
                    let args = cols.collect::<Vec<_>>().join(" ");
                    !stat.starts_with('Z') && args == cmdline
                })
            }
        }
    }

    /// The id of user `i`'s running container (on local Docker, of the container named
    /// `labgate-USER`, running or not).
    pub fn container_id(self, gw: &Gateway, i: usize) -> Option<String> {
        let name = service(gw, i);
        match self {
            Way::Namespace | Way::Relay => docker_inspect(&name, "{{.Id}}"),
            Way::Swarm => swarm_task(&name).map(|(_, id)| id),
        }
    }

    /// The size of user `i`'s `/dev/shm` as its engine made it: `HostConfig.ShmSize` on
    /// local Docker; on the swarm (no service field for it) the size of the `tmpfs` mount at
    /// `/dev/shm` of the task's container, on its node.
    pub fn shm_bytes(self, gw: &Gateway, i: usize) -> Option<u64> {
        let name = service(gw, i);
        let text = match self {
            Way::Namespace | Way::Relay => docker_inspect(&name, "{{.HostConfig.ShmSize}}"),
            Way::Swarm => swarm_inspect(
                &name,
                "{{range .HostConfig.Mounts}}{{if eq .Target \"/dev/shm\"}}{{.TmpfsOptions.SizeBytes}}{{end}}{{end}}",
            ),
        }?;
        text.trim().parse().ok()
    }

    /// Asserts user `i`'s container is stopped after `labgate stop`. Local Docker: it exists
    /// and does not run. Swarm: stopping means the service asks for 0 replicas, and Swarm
    /// then removes the task's container (only the home persists), so no container of the
    /// service runs on any node.
    pub fn assert_stopped(self, gw: &Gateway, i: usize) {
        let name = service(gw, i);
        match self {
            Way::Namespace | Way::Relay => assert_eq!(
                docker_inspect(&name, "{{.State.Running}}").as_deref(),
                Some("false")
            ),
            Way::Swarm => {
                assert_eq!(swarm_replicas(&name), "0", "{name} scaled to 0");
                let rig = rig();
                let running = || {
                    rig.nodes()
                        .iter()
                        .map(|n| rig.docker(n, &["ps", "-q", "--filter", &of_service(&name)]))
                        .filter(|ids| !ids.is_empty())
                        .count()
                };
                assert!(
                    eventually(Duration::from_secs(30), || running() == 0),
                    "a container of {name} still runs after it was scaled to 0"
                );
            }
        }
    }

    /// Asserts `gw` was started on this way, for behaviours that are the same on every way
    /// of one backend (terminals: always the engine's): its log names the `forward_via` it
    /// read, or (swarm) that it reached the swarm's manager.
    pub fn assert_set(self, gw: &Gateway) {
        let log = gw.log();
        let line = match self {
            Way::Namespace => "forwards: entering containers' namespaces when possible",
            Way::Relay => "forwards: path fixed by [docker] forward_via",
            Way::Swarm => "connected to the swarm manager",
        };
        assert!(
            log.contains(line),
            "not started on the {self:?} way:\n{log}"
        );
    }

    /// Asserts the commands `gw` ran without a terminal went this way: the direct path
    /// (a socket as stdin/stdout) on the namespace way, the exec stream on the relay way; on
    /// the swarm, a node's own API (logged when the gateway connects to one) and never the
    /// direct path.
    pub fn assert_commands_went_this_way(self, gw: &Gateway) {
        let log = gw.log();
        let direct = log.contains("on the direct path");
        match self {
            Way::Namespace => assert!(direct, "no command took the direct path:\n{log}"),
            Way::Relay => assert!(!direct, "a command took the direct path:\n{log}"),
            Way::Swarm => {
                self.assert_set(gw);
                assert!(
                    log.contains("connected to a node's Docker API"),
                    "no command went to a node's API:\n{log}"
                );
                assert!(!direct, "a command took the direct path:\n{log}");
            }
        }
    }

    /// Asserts the forwards `gw` made went this way: into the container's namespaces, or
    /// through relay execs only. On the swarm the log says only what did not happen: no
    /// namespace was entered and no direct path taken (the relay exec the swarm backend
    /// always uses logs no line of its own).
    pub fn assert_forwards_went_this_way(self, gw: &Gateway) {
        let log = gw.log();
        let entered = log.contains("forwards enter containers' network namespaces");
        match self {
            Way::Namespace => assert!(entered, "forwards did not enter namespaces:\n{log}"),
            Way::Relay => {
                assert!(
                    log.contains("forwards: path fixed by [docker] forward_via") && !entered,
                    "forwards did not go through the relay only:\n{log}"
                )
            }
            Way::Swarm => {
                self.assert_set(gw);
                assert!(
                    !entered && !log.contains("on the direct path"),
                    "a forward entered a namespace or took the direct path:\n{log}"
                );
            }
        }
    }
}
