//! The swarm test rig (`common::swarm`, issue #17's first step): three real `dockerd`s, each
//! in its own network, PID, mount and UTS namespaces and cgroup, form a swarm; these tests
//! check what the swarm backend will rely on. Nodes are reached over TLS from the host, a
//! service asking for one `NVIDIA-GPU` generic resource lands on a GPU node and sees one of its
//! UUIDs, GPUs are never shared and a service waits for a free one, a node's PIDs are its own
//! (host PIDs reach nothing), exec goes only through the task's node, a killed node goes Down
//! while the others stay Ready, and a rig leaves nothing behind when dropped or when its test
//! process dies.
//!
//! Most tests share one rig (started by the first, torn down by its watchdog when the test
//! process ends); the tests that kill a node or drop a rig start their own. They run one at a
//! time. Without root, `dockerd` or a cgroup v1 freezer they are skipped (a failure under CI).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::swarm::{GPU_KIND, NETWORK, NODE_NETWORK, Node, SwarmRig};
use common::{IMAGE, eventually, skip_unless, stderr_of};

/// The variable a task's container gets for its GPU.
const GPU_VAR: &str = "DOCKER_RESOURCE_NVIDIA-GPU";

/// One test at a time: they share a rig, some fill its GPUs, and a rig of their own would
/// only compete for the two cores (the guard is declared first, so it is released after the
/// test's own rig is gone).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rig the tests share, started by the first that asks; `None` (skipped) if it cannot run.
/// Never dropped: its watchdog tears it down when the test process ends.
fn shared_rig() -> Option<&'static SwarmRig> {
    static RIG: OnceLock<Result<SwarmRig, String>> = OnceLock::new();
    match RIG.get_or_init(|| SwarmRig::start().inspect(report)) {
        Ok(rig) => Some(rig),
        Err(why) => {
            skip_unless(false, why);
            None
        }
    }
}

/// A rig of the test's own; `None` (skipped) if it cannot run.
fn own_rig() -> Option<SwarmRig> {
    match SwarmRig::start() {
        Ok(rig) => {
            report(&rig);
            Some(rig)
        }
        Err(why) => {
            skip_unless(false, &why);
            None
        }
    }
}

/// Prints the rig's start time and memory (the figures README quotes).
fn report(rig: &SwarmRig) {
    let processes = rig.processes();
    // Proportional set size: pages shared by the three nodes' dockerds counted once.
    let pss_kib: u64 = processes
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|smaps| {
            let line = smaps.lines().find(|l| l.starts_with("Pss:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum();
    eprintln!(
        "swarm rig {}: up in {:.2} s; {} processes, {} MiB (PSS); the nodes' cgroups are \
         charged {} MiB (page cache included)",
        rig.names().tag,
        rig.started_in().as_secs_f64(),
        processes.len(),
        pss_kib >> 10,
        rig.memory_bytes() >> 20,
    );
}

/// One task of a service, as the manager sees it.
#[derive(Debug, Clone)]
struct Task {
    node_id: String,
    state: String,
    container: String,
    /// `.Status.Message` and `.Status.Err`.
    message: String,
}

/// A service on the rig (`--endpoint-mode dnsrr`, on [`NETWORK`], the test image running
/// `sleep`); removed when dropped, once its containers are gone from every node.
struct Service<'a> {
    rig: &'a SwarmRig,
    name: String,
}

impl<'a> Service<'a> {
    /// A service asking for one GPU.
    fn gpu(rig: &'a SwarmRig) -> Service<'a> {
        Service::create(rig, &["--generic-resource", &format!("{GPU_KIND}=1")])
    }

    fn create(rig: &'a SwarmRig, extra: &[&str]) -> Service<'a> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "svc{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut args = vec![
            "service",
            "create",
            "--detach",
            "--quiet",
            "--name",
            name.as_str(),
            "--endpoint-mode",
            "dnsrr",
            "--network",
            NETWORK,
            "--no-resolve-image",
            "--init",
            "--stop-grace-period",
            "1s",
        ];
        args.extend(extra);
        args.extend([IMAGE, "sleep", "3600"]);
        rig.docker(rig.manager(), &args);
        Service { rig, name }
    }

    /// Its tasks (current and past).
    fn tasks(&self) -> Vec<Task> {
        let m = self.rig.manager();
        let ids = self
            .rig
            .docker(m, &["service", "ps", "-q", "--no-trunc", &self.name]);
        if ids.is_empty() {
            return Vec::new();
        }
        let mut args = vec![
            "inspect",
            "--type",
            "task",
            "-f",
            "{{.NodeID}}|{{.Status.State}}|\
             {{with .Status.ContainerStatus}}{{.ContainerID}}{{end}}|\
             {{.Status.Message}} {{.Status.Err}}",
        ];
        args.extend(ids.lines());
        self.rig
            .docker(m, &args)
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.splitn(4, '|').collect();
                Task {
                    node_id: f[0].to_owned(),
                    state: f[1].to_owned(),
                    container: f[2].to_owned(),
                    message: f[3].to_owned(),
                }
            })
            .collect()
    }

    /// Waits for its running task (with a container) and returns it.
    fn running(&self, timeout: Duration) -> Task {
        let mut found = None;
        let ok = eventually(timeout, || {
            found = self
                .tasks()
                .into_iter()
                .find(|t| t.state == "running" && !t.container.is_empty());
            found.is_some()
        });
        assert!(ok, "{} never ran: {:?}", self.name, self.tasks());
        found.unwrap()
    }

    /// The node its task `task` is on.
    fn node_of(&self, task: &Task) -> &'a Node {
        self.rig
            .node_by_id(&task.node_id)
            .unwrap_or_else(|| panic!("no node has ID {}", task.node_id))
    }
}

impl Drop for Service<'_> {
    fn drop(&mut self) {
        let m = self.rig.manager();
        let _ = self.rig.docker_output(m, &["service", "rm", &self.name]);
        let label = format!("label=com.docker.swarm.service.name={}", self.name);
        let gone = eventually(Duration::from_secs(30), || {
            self.rig.nodes().iter().all(|n| {
                let out = self
                    .rig
                    .docker_output(n, &["ps", "-aq", "--filter", &label]);
                // A killed node has no containers left.
                !out.status.success() || out.stdout.is_empty()
            })
        });
        if !gone && !std::thread::panicking() {
            panic!("the containers of service {} stayed", self.name);
        }
    }
}

/// The environment of container `id` on `node`, from its config (what its processes get).
fn container_env(rig: &SwarmRig, node: &Node, id: &str) -> Vec<String> {
    rig.docker(
        node,
        &[
            "inspect",
            "-f",
            "{{range .Config.Env}}{{println .}}{{end}}",
            id,
        ],
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// The GPU UUID container `id` on `node` was given.
fn gpu_of(rig: &SwarmRig, node: &Node, id: &str) -> String {
    let env = container_env(rig, node, id);
    env.iter()
        .find_map(|v| v.strip_prefix(&format!("{GPU_VAR}=")))
        .unwrap_or_else(|| panic!("no {GPU_VAR} in {env:?}"))
        .to_owned()
}

/// `hostname status availability manager-status` of every node, as the manager reports them
/// over TLS, sorted.
fn node_table(rig: &SwarmRig) -> Vec<String> {
    let out = rig
        .docker_tls(rig.manager())
        .args([
            "node",
            "ls",
            "--format",
            "{{.Hostname}} {{.Status}} {{.Availability}} {{.ManagerStatus}}",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "node ls: {}", stderr_of(&out));
    let mut rows: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .collect();
    rows.sort();
    rows
}

#[test]
fn the_rig_is_three_ready_nodes_reached_over_tls() {
    let _serial = one_at_a_time();
    let Some(rig) = shared_rig() else { return };
    assert_eq!(
        node_table(rig),
        [
            "n1 Ready Active Leader",
            "n2 Ready Active",
            "n3 Ready Active"
        ]
    );
    let mut engine_ids = BTreeSet::new();
    for node in rig.nodes() {
        let tls = |args: &[&str]| {
            let out = rig.docker_tls(node).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{} {args:?}: {}",
                node.name,
                stderr_of(&out)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let manager = node.name == "n1";
        assert_eq!(
            tls(&[
                "info",
                "-f",
                "{{.Name}} {{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}"
            ]),
            format!("{} active {manager}", node.name)
        );
        engine_ids.insert(tls(&["info", "-f", "{{.ID}}"]));
        tls(&["image", "inspect", IMAGE]);
        assert_eq!(
            tls(&[
                "network",
                "inspect",
                "-f",
                "{{.ConfigOnly}} {{index .Options \"com.docker.network.bridge.enable_icc\"}}",
                NODE_NETWORK
            ]),
            "true false"
        );
        // Its GPUs, as the swarm knows them.
        let announced = rig.docker(
            rig.manager(),
            &[
                "node",
                "inspect",
                "-f",
                "{{range .Description.Resources.GenericResources}}\
                 {{with .NamedResourceSpec}}{{.Kind}}={{.Value}} {{end}}{{end}}",
                &node.id,
            ],
        );
        let announced: BTreeSet<&str> = announced.split_whitespace().collect();
        let expected: Vec<String> = node
            .gpus
            .iter()
            .map(|g| format!("{GPU_KIND}={g}"))
            .collect();
        let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
        assert_eq!(announced, expected, "{}", node.name);
        assert_eq!(node.gpus.len(), if manager { 0 } else { 2 });
        // Plain TCP (no client certificate) is refused.
        let plain = rig.docker_without_tls(node, &["version"]);
        assert!(
            !plain.status.success(),
            "{} answered without TLS",
            node.name
        );
    }
    assert_eq!(
        engine_ids.len(),
        3,
        "engine IDs must differ: {engine_ids:?}"
    );
    // The network rule: the rig's range is unreachable from the host but through its veth,
    // and no node has a way out of the rig.
    let names = rig.names();
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(
        ip(&["-4", "route", "show", "type", "unreachable"]).contains(&names.range()),
        "no unreachable route for {}",
        names.range()
    );
    assert!(
        ip(&["-4", "route", "get", &names.addr(200)]).is_empty(),
        "{} has a route",
        names.addr(200)
    );
    assert!(ip(&["-4", "route", "get", &rig.node("n2").addr]).contains(&names.host_iface()));
    for node in rig.nodes() {
        let routes = ip(&["-n", &names.netns(&node.name), "-4", "route", "show"]);
        assert!(!routes.contains("default"), "{}: {routes}", node.name);
    }
    assert_eq!(
        rig.docker(
            rig.manager(),
            &[
                "network",
                "inspect",
                "-f",
                "{{.Scope}} {{.Driver}} {{.ConfigFrom.Network}}",
                NETWORK
            ]
        ),
        format!("swarm bridge {NODE_NETWORK}")
    );
}

#[test]
fn a_gpu_service_lands_on_a_gpu_node_and_gets_one_of_its_uuids() {
    let _serial = one_at_a_time();
    let Some(rig) = shared_rig() else { return };
    let t0 = Instant::now();
    let service = Service::gpu(rig);
    let task = service.running(Duration::from_secs(60));
    eprintln!("GPU service running in {:?}", t0.elapsed());
    let node = service.node_of(&task);
    assert!(["n2", "n3"].contains(&node.name.as_str()), "{}", node.name);
    let gpu = gpu_of(rig, node, &task.container);
    assert!(
        node.gpus.contains(&gpu),
        "{gpu} is not one of {:?}",
        node.gpus
    );
    // On the swarm bridge network, at an address of the node's share of the rig's range.
    let ip = rig.docker(
        node,
        &[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}"),
            &task.container,
        ],
    );
    let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
    assert!(
        ip.starts_with(&format!("10.218.{}.", rig.names().subnet)) && (130..191).contains(&last),
        "{ip}"
    );
}

#[test]
fn only_the_tasks_own_node_can_exec_into_it() {
    let _serial = one_at_a_time();
    let Some(rig) = shared_rig() else { return };
    let service = Service::gpu(rig);
    let task = service.running(Duration::from_secs(60));
    let node = service.node_of(&task);
    let gpu = gpu_of(rig, node, &task.container);
    let exec = |on: &Node| {
        rig.docker_tls(on)
            .args(["exec", &task.container, "env"])
            .output()
            .unwrap()
    };
    let own = exec(node);
    assert!(own.status.success(), "{}", stderr_of(&own));
    let env = String::from_utf8_lossy(&own.stdout);
    assert!(
        env.lines().any(|l| l == format!("{GPU_VAR}={gpu}")),
        "{env}"
    );
    for other in rig.nodes().iter().filter(|n| n.name != node.name) {
        let out = exec(other);
        assert!(
            !out.status.success(),
            "{} ran an exec for {}",
            other.name,
            node.name
        );
        assert!(
            stderr_of(&out).contains("No such container"),
            "{}: {}",
            other.name,
            stderr_of(&out)
        );
    }
}

#[test]
fn a_nodes_pids_are_its_own_and_reach_nothing_on_the_host() {
    let _serial = one_at_a_time();
    let Some(rig) = shared_rig() else { return };
    let service = Service::gpu(rig);
    let task = service.running(Duration::from_secs(60));
    let node = service.node_of(&task);
    let pid: i32 = rig
        .docker(node, &["inspect", "-f", "{{.State.Pid}}", &task.container])
        .parse()
        .unwrap();
    // The container's processes, by host PID, from its cgroup under the node's.
    let i = rig
        .nodes()
        .iter()
        .position(|n| n.name == node.name)
        .unwrap();
    let freezer = &rig.names().cgroups[i][0];
    let procs = std::fs::read_to_string(
        freezer
            .join("containers")
            .join(&task.container)
            .join("cgroup.procs"),
    )
    .unwrap();
    let nspids = |host_pid: &str| -> Vec<i32> {
        std::fs::read_to_string(format!("/proc/{host_pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .map(|l| l.split_whitespace().map(|p| p.parse().unwrap()).collect())
            .unwrap_or_default()
    };
    // Its init: PID 1 in the container, `pid` in the node, something else on the host.
    let init = procs
        .lines()
        .map(|p| (p.to_owned(), nspids(p)))
        .find(|(_, ns)| ns.last() == Some(&1))
        .unwrap_or_else(|| panic!("no PID 1 among {procs:?}"));
    let (host_pid, levels) = init;
    assert_eq!(levels.len(), 3, "host, node, container: {levels:?}");
    assert_eq!(levels[1], pid, "the engine reports the node's PID");
    assert_ne!(
        levels[0], pid,
        "the node's PID is the host's: no PID namespace"
    );
    assert_eq!(host_pid.parse::<i32>().unwrap(), levels[0]);
    // What the engine reports is not that container on the host.
    let at_reported = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    assert!(
        !at_reported.contains(&task.container),
        "host PID {pid} is the container"
    );
    // The node's dockerd is PID 1 of its namespace.
    let dockerd: Vec<Vec<i32>> = rig
        .processes()
        .iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "dockerd")
        })
        .map(|p| nspids(&p.to_string()))
        .collect();
    assert_eq!(dockerd.len(), 3, "{dockerd:?}");
    assert!(
        dockerd.iter().all(|ns| ns.len() == 2 && ns[1] == 1),
        "{dockerd:?}"
    );
}

#[test]
fn four_gpu_services_get_four_gpus_and_a_fifth_waits_for_one() {
    let _serial = one_at_a_time();
    let Some(rig) = shared_rig() else { return };
    let mut services: Vec<Service> = (0..4).map(|_| Service::gpu(rig)).collect();
    let mut held = Vec::new();
    for s in &services {
        let task = s.running(Duration::from_secs(60));
        held.push(gpu_of(rig, s.node_of(&task), &task.container));
    }
    let distinct: BTreeSet<&String> = held.iter().collect();
    let all: BTreeSet<&String> = rig.nodes().iter().flat_map(|n| &n.gpus).collect();
    assert_eq!(distinct, all, "four services, four GPUs: {held:?}");

    let fifth = Service::gpu(rig);
    let pending = || {
        fifth
            .tasks()
            .iter()
            .any(|t| t.state == "pending" && t.message.contains("insufficient resources"))
    };
    assert!(
        eventually(Duration::from_secs(20), pending),
        "{:?}",
        fifth.tasks()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(pending(), "the fifth must still wait: {:?}", fifth.tasks());

    let freed = held.remove(0);
    let t0 = Instant::now();
    drop(services.remove(0));
    let task = fifth.running(Duration::from_secs(60));
    eprintln!(
        "a freed GPU went to the waiting service in {:?}",
        t0.elapsed()
    );
    assert_eq!(gpu_of(rig, fifth.node_of(&task), &task.container), freed);
}

#[test]
fn a_killed_node_goes_down_and_the_others_stay_ready() {
    let _serial = one_at_a_time();
    let Some(rig) = own_rig() else { return };
    let names = rig.names().clone();
    let n3 = rig.node("n3");
    let on_n3 = format!("{}-n3", names.tag);
    let comms_on_n3 = || -> Vec<String> {
        rig.processes()
            .iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                    .is_ok_and(|c| c.contains(&on_n3))
            })
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
            .map(|c| c.trim().to_owned())
            .collect()
    };
    // A container on n3, so the kill has a shim and a container to take too.
    let service = Service::create(&rig, &["--constraint", "node.hostname==n3"]);
    let task = service.running(Duration::from_secs(60));
    assert_eq!(service.node_of(&task).name, "n3");
    let before = comms_on_n3();
    for comm in [
        "dockerd",
        "containerd",
        "containerd-shim",
        "docker-init",
        "sleep",
    ] {
        assert!(
            before.iter().any(|c| c.starts_with(comm)),
            "no {comm} on n3: {before:?}"
        );
    }

    let t0 = Instant::now();
    rig.kill_node("n3");
    let killed_in = t0.elapsed();
    assert_eq!(comms_on_n3(), Vec::<String>::new(), "n3 still runs these");
    assert!(!rig.docker_output(n3, &["version"]).status.success());
    let down = eventually(Duration::from_secs(25), || {
        node_table(&rig).contains(&"n3 Down Active".to_owned())
    });
    let down_in = t0.elapsed();
    eprintln!("n3 killed in {killed_in:?}, Down after {down_in:?}");
    assert!(down, "n3 never went Down: {:?}", node_table(&rig));
    assert_eq!(
        node_table(&rig),
        [
            "n1 Ready Active Leader",
            "n2 Ready Active",
            "n3 Down Active"
        ]
    );
    drop(service);
    drop(rig);
    assert_eq!(names.leftovers(), Vec::<String>::new());
}

#[test]
fn a_dropped_rig_leaves_nothing_behind() {
    let _serial = one_at_a_time();
    let Some(rig) = own_rig() else { return };
    let names = rig.names().clone();
    {
        // Not removed: the teardown must take running containers too.
        let service = Service::gpu(&rig);
        service.running(Duration::from_secs(60));
        std::mem::forget(service);
    }
    assert!(!names.leftovers().is_empty());
    let t0 = Instant::now();
    drop(rig);
    eprintln!("rig torn down in {:?}", t0.elapsed());
    assert_eq!(names.leftovers(), Vec::<String>::new());
}

#[test]
fn a_rig_whose_test_process_dies_is_torn_down_by_its_watchdog() {
    let _serial = one_at_a_time();
    let Some(rig) = own_rig() else { return };
    let names = rig.names().clone();
    rig.abandon();
    let gone = eventually(Duration::from_secs(60), || names.leftovers().is_empty());
    assert!(gone, "left: {:?}", names.leftovers());
}
