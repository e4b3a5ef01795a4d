//! A real three-node Docker Swarm on the test machine, for the swarm backend's tests (issue
//! #17). The machine's own engine is never touched: the rig starts three more `dockerd`s.
//!
//! # The nodes
//! Each node is a `dockerd` that sees the machine as a server of its own would:
//! - **its own network namespace** (`ip netns`, named `labgate-swarm-PID-K-nN`), with an
//!   `eth0` on a bridge in a hub namespace of the rig's (`…-hub`); its containers' bridges,
//!   iptables rules and swarm ports live there;
//! - **its own PID namespace**, dockerd its PID 1: the PIDs its API reports (`.State.Pid`)
//!   are the node's, not the host's, so nothing can reach a "remote" container through host
//!   PIDs and pass a test that a real cluster would fail;
//! - **its own mount and UTS namespaces**: the hostname `nN`, its own `/proc` and `/sys`
//!   (the sysfs of its network namespace; the cgroup mounts are carried over, which
//!   `ip netns exec` would lose: hence `nsenter --net` + `unshare`), a private `/etc/docker`
//!   (its own `key.json`, so engine IDs differ), a private `/run/containerd` and `/run/docker`
//!   (its exec root and containerd's sockets);
//! - **its own cgroup** in every hierarchy (`…/labgate-swarm-PID-K-nN`, under the test's own
//!   cgroup), holding dockerd, its containerd, the shims and, through the relative
//!   `cgroup-parent`, its containers: [`SwarmRig::kill_node`] freezes that cgroup and kills
//!   everything in it, as a machine dies whole (dockerd's parent, `unshare`, stays outside:
//!   it reaps the node's init, and the test reaps it);
//! - **its own files** under the rig's directory `$TMPDIR/labgate-swarm-PID-K/nN`: config
//!   (always `--config-file`: without it dockerd would read the machine's
//!   `/etc/docker/daemon.json`, data root included), data root, pid file, log, unix socket.
//!
//! Each listens on its unix socket and on `tcp://ADDR:2376` with TLS (`--tlsverify`, a CA of
//! the rig's own made with `openssl`; without TLS dockerd waits 15 s at start). The client
//! side is a `DOCKER_CERT_PATH` directory ([`SwarmRig::tls_dir`]). Beside its dockerd each
//! node runs `labgate node-agent` on `tcp://ADDR:2378` with the same certificates, inside
//! the node's namespaces and cgroups (it dies with the node). n1 is the manager (swarm
//! `init`), n2 and n3 workers; n1 has no GPUs and stays active (non-GPU services may land
//! there), n2 and n3 have two fake GPUs each as `NVIDIA-GPU` generic resources
//! (`node-generic-resources` in daemon.json). The test image is loaded on every node (no
//! registry: `docker save` from the machine's engine, `docker load` on each).
//!
//! Swarm here: no IPVS on this kernel, so services need `--endpoint-mode dnsrr`;
//! `live-restore` is refused in swarm mode; a task's container can be exec'd only through its
//! node's own API. Docker < 23 restarts generic-resource tasks on any node update when they
//! sit on an overlay (moby/moby#44378), so user services go on [`NETWORK`]: a swarm-scoped
//! bridge network made from a config-only network ([`NODE_NETWORK`], the same subnet on
//! every node, `enable_icc=false`) that exists on each node.
//!
//! # Addresses
//! A rig owns `10.218.N.0/24`, with an N that no address or route of the machine touches.
//! Before anything else it adds `unreachable 10.218.N.0/24` in the host namespace, so that no
//! packet for the rig's range ever leaves the machine; the host reaches the nodes only
//! through a veth of the rig's (`lgswNh`, `10.218.N.1/26`: its connected route is more
//! specific). Nodes have no default route.
//!
//! | addresses | what |
//! |---|---|
//! | `.0/26` | hub: the host `.1`, nodes `.11`, `.12`, `.13` |
//! | `.64/27` | each node's `docker0` (`bip`) |
//! | `.96/27` | each node's local address pool (`docker_gwbridge`) |
//! | `.128/26` | [`NETWORK`] on each node |
//! | `.192/26` | the swarm's address pool (`ingress`, overlays) |
//!
//! # Teardown
//! Everything a rig makes is named after its tag `labgate-swarm-PID-K` (interfaces:
//! `lgswNh`) and undone by one script, `teardown.sh` in the rig's directory, written before
//! anything else is made: freeze and kill each node's cgroup, remove the cgroups, delete the
//! namespaces (their veths go with them), the route, and the directory last. A watchdog
//! process started with the rig (`setsid`, its stdin a pipe from the test process) runs it
//! when that pipe closes: when the rig is dropped (also while a failed test unwinds) and when
//! the test process ends, however it ends, SIGKILL included, so a rig shared by all tests of
//! a binary (kept in a static, never dropped) goes at exit too. If the watchdog was killed
//! as well, the next rig's start runs the teardown of every rig whose owner process is gone
//! (the owner's PID and start time are in the directory). [`RigNames::leftovers`] lists what
//! is left of a rig; tests assert it is nothing.
//!
//! Needs root, `dockerd`, `openssl`, `unshare`, `nsenter`, `ip` and cgroup v1 with a freezer;
//! [`SwarmRig::start`] says what is missing (callers skip with [`super::skip_unless`]).
//!
//! # Layout
//! - this module: [`SwarmRig`] and [`Node`]: bringing the rig up, what tests use of it,
//!   [`SwarmRig::kill_node`], the drop;
//! - `names`: [`RigNames`], the teardown script and what is left of a rig; the sweep of stale
//!   rigs;
//! - `tls`: the CA and the certificates;
//! - `host`: commands, the test process's cgroups, readiness checks.

mod host;
mod names;
mod tls;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::dockerd::subnet_in_use;
use super::processes_in_cgroups_named;
use super::{IMAGE, eventually};
use host::{
    covered_by_a_route, docker_command, docker_plain, ip, load, own_cgroups, pings, run, sq,
    start_time,
};
pub use names::RigNames;
use names::sweep_stale_rigs;
use tls::{certificate, openssl_config};

/// The start of every rig's name: its directory, namespaces and cgroups. Stale rigs are
/// found by it.
pub const PREFIX: &str = "labgate-swarm-";

/// The swarm-scoped bridge network for user services (made from [`NODE_NETWORK`]).
pub const NETWORK: &str = "labgate";

/// The config-only network on every node that [`NETWORK`] is made from.
pub const NODE_NETWORK: &str = "labgate-node";

/// The generic resource kind of the fake GPUs.
pub const GPU_KIND: &str = "NVIDIA-GPU";

/// The names of the nodes; the first is the manager.
pub(crate) const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// Fake GPUs per node (n1, the manager, has none).
const GPUS_PER_NODE: [usize; 3] = [0, 2, 2];

/// The storage driver of the nodes.
const STORAGE_DRIVER: &str = "overlay2";

/// The TLS port of every node.
pub const TLS_PORT: u16 = 2376;
/// The port of each node's `labgate node-agent` (TLS, the same certificates as its API).
pub const AGENT_PORT: u16 = 2378;

/// One node of the rig.
pub struct Node {
    /// `n1`, `n2`, `n3`: its hostname and swarm node name.
    pub name: String,
    /// Its address on the hub (`10.218.N.1x`), where its TLS API and swarm ports listen.
    pub addr: String,
    /// Its fake GPUs' UUIDs, as announced in its generic resources.
    pub gpus: Vec<String>,
    /// Its swarm node ID.
    pub id: String,
    /// Its directory (config, data root, socket, log, certificate).
    dir: PathBuf,
    /// `unshare`, the parent of its PID namespace's init (dockerd) and outside its cgroups:
    /// it reaps the node's init when the node is killed, and we reap it.
    process: Mutex<Option<Child>>,
}

impl Node {
    /// The node's unix socket (reachable from the host's mount namespace).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `unix://SOCKET`, for `docker -H`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// `tcp://ADDR:2376`: its TLS API, for clients with [`SwarmRig::tls_dir`].
    pub fn tcp_url(&self) -> String {
        format!("tcp://{}:{TLS_PORT}", self.addr)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// Its `labgate node-agent`'s log so far (debug: a line per forward it joined).
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

/// A running three-node swarm (see the module doc); torn down when dropped.
pub struct SwarmRig {
    /// What it is made of, by name.
    names: RigNames,
    /// n1 (the manager), n2, n3.
    nodes: Vec<Node>,
    /// The process that runs the teardown when its stdin closes (see the module doc).
    watchdog: Option<Child>,
    /// How long [`SwarmRig::start`] took.
    started_in: Duration,
}

/// The rig all swarm tests of one test binary share (torn down by its watchdog when the
/// process ends), or `None` (after saying why) where it cannot run: no root, no `dockerd`...
pub fn shared() -> Option<&'static SwarmRig> {
    static RIG: std::sync::OnceLock<Result<SwarmRig, String>> = std::sync::OnceLock::new();
    match RIG.get_or_init(SwarmRig::start) {
        Ok(rig) => Some(rig),
        Err(why) => {
            super::skip_unless(false, why);
            None
        }
    }
}

/// One swarm test at a time in a test binary: they share a rig and its GPUs, and rigs of
/// their own would only compete for the cores.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fake GPU `i` of node `node` (1-based) for the rig of process `pid`: a UUID in the
/// shape NVML gives.
fn gpu_uuid(pid: u32, node: usize, i: usize) -> String {
    format!("GPU-{pid:08x}-{node:04x}-4000-8000-{i:012x}")
}

impl SwarmRig {
    /// Starts a rig: three nodes up, the swarm formed, the image loaded, the networks made.
    /// Or says why it cannot run here (no root, a missing tool, no cgroup v1 freezer).
    /// Panics if it can run and fails (a node that did not come up...), once what it made is
    /// torn down.
    pub fn start() -> Result<SwarmRig, String> {
        let t0 = Instant::now();
        if !rustix::process::geteuid().is_root() {
            return Err("needs root to run a swarm of private dockerds".into());
        }
        for tool in ["dockerd", "openssl", "unshare", "nsenter", "ip"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return Err(format!("{tool} is not installed"));
            }
        }
        let own = own_cgroups().ok_or("needs cgroup v1 with a freezer hierarchy")?;
        super::ensure_image();
        sweep_stale_rigs();
        // It can run here: from now on a failure is a failure, not a reason to skip (what
        // was made is torn down first).
        Ok(Self::bring_up(t0, &own).unwrap_or_else(|e| panic!("the swarm rig: {e}")))
    }

    /// Makes the rig (see [`SwarmRig::start`]).
    fn bring_up(t0: Instant, own: &[(String, PathBuf)]) -> Result<SwarmRig, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let tag = format!("{PREFIX}{pid}-{}", NEXT.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let names = RigNames {
            cgroups: NODES
                .iter()
                .map(|n| {
                    own.iter()
                        .map(|(_, d)| d.join(format!("{tag}-{n}")))
                        .collect()
                })
                .collect(),
            tag,
            dir,
            subnet: 0,
        };
        // From here on the guard exists: an error below drops it, which tears down.
        let mut rig = SwarmRig {
            names,
            nodes: Vec::new(),
            watchdog: None,
            started_in: Duration::ZERO,
        };
        let d = rig.names.dir.clone();
        let write = |path: &Path, text: &str| {
            std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
        };
        write(
            &d.join("owner"),
            &format!("{pid} {}", start_time(pid).unwrap_or_default()),
        )?;
        write(&d.join("teardown.sh"), &rig.names.teardown_script())?;
        rig.watchdog = Some(
            Command::new("setsid")
                .args(["sh", "-c", "cat >/dev/null 2>&1; sh \"$0\" >/dev/null 2>&1"])
                .arg(d.join("teardown.sh"))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("setsid: {e}"))?,
        );
        // The image, from the machine's engine, while the rest starts.
        let save = std::thread::spawn(|| {
            docker_command()
                .args(["save", IMAGE])
                .output()
                .map_err(|e| e.to_string())
                .and_then(|o| {
                    if o.status.success() {
                        Ok(o.stdout)
                    } else {
                        Err(String::from_utf8_lossy(&o.stderr).into_owned())
                    }
                })
                .map_err(|e| format!("docker save {IMAGE}: {e}"))
        });
        rig.claim_range()?;
        rig.make_network()?;
        rig.make_certificates()?;
        for i in 0..NODES.len() {
            let child = rig.spawn_node(i, pid, own)?;
            rig.nodes.push(Node {
                name: NODES[i].to_owned(),
                addr: rig.names.addr(11 + i as u8),
                gpus: (0..GPUS_PER_NODE[i])
                    .map(|g| gpu_uuid(pid, i + 1, g))
                    .collect(),
                id: String::new(),
                dir: d.join(NODES[i]),
                process: Mutex::new(Some(child)),
            });
        }
        for node in &rig.nodes {
            let up = eventually(Duration::from_secs(60), || {
                let exited = node
                    .process
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                    .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
                exited || pings(&node.socket())
            });
            if !up || !pings(&node.socket()) {
                return Err(format!(
                    "node {} did not come up:\n{}",
                    node.name,
                    node.log()
                ));
            }
        }
        let image = save
            .join()
            .unwrap_or_else(|_| Err("docker save panicked".into()))?;
        rig.form_swarm(&image)?;
        rig.started_in = t0.elapsed();
        Ok(rig)
    }

    /// Claims a free `10.218.N.0/24` by adding its `unreachable` route (the claim is atomic:
    /// a concurrent rig's route with the same N makes ours fail, and we take the next).
    fn claim_range(&mut self) -> Result<(), String> {
        let pid = std::process::id();
        for k in 0..250u32 {
            let n = (pid.wrapping_mul(7).wrapping_add(k) % 250 + 2) as u8;
            if subnet_in_use(218, u32::from(n)) || covered_by_a_route(n) {
                continue;
            }
            let range = format!("10.218.{n}.0/24");
            if ip(&["route", "add", "unreachable", &range]).is_ok() {
                // Only now does the teardown own the range (until here it must not delete
                // another rig's route).
                self.names.subnet = n;
                return std::fs::write(
                    self.names.dir.join("teardown.sh"),
                    self.names.teardown_script(),
                )
                .map_err(|e| e.to_string());
            }
        }
        Err("no free 10.218.N.0/24 for the swarm rig".into())
    }

    /// The hub namespace with its bridge, each node's namespace with its `eth0` on it, and
    /// the host's veth to the hub.
    fn make_network(&self) -> Result<(), String> {
        let n = &self.names;
        let hub = n.netns("hub");
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for (i, node) in NODES.iter().enumerate() {
            let ns = n.netns(node);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &hub, "link", "add", node, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &hub, "link", "set", node, "master", "br0", "up"])?;
            let addr = format!("{}/26", n.addr(11 + i as u8));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        let host = n.host_iface();
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "host", "netns", &hub,
        ])?;
        ip(&["-n", &hub, "link", "set", "host", "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("{}/26", n.addr(1)), "dev", &host])?;
        ip(&["link", "set", &host, "up"])
    }

    /// The CA, each node's server certificate and the client's (a `DOCKER_CERT_PATH`).
    fn make_certificates(&self) -> Result<(), String> {
        let d = &self.names.dir;
        let config = d.join("openssl.cnf");
        std::fs::write(&config, openssl_config(&self.names)).map_err(|e| e.to_string())?;
        let ca = d.join("ca");
        let client = self.tls_dir();
        for dir in [&ca, &client] {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        certificate(&config, "ca", "labgate swarm test CA", &ca, None)?;
        std::fs::copy(ca.join("cert.pem"), client.join("ca.pem")).map_err(|e| e.to_string())?;
        certificate(&config, "client", "client", &client, Some(&ca))?;
        for node in NODES {
            let tls = d.join(node).join("tls");
            std::fs::create_dir_all(&tls).map_err(|e| e.to_string())?;
            certificate(&config, node, node, &tls, Some(&ca))?;
        }
        Ok(())
    }

    /// Writes node `i`'s config and start script, makes its cgroups, and starts it.
    fn spawn_node(&self, i: usize, pid: u32, own: &[(String, PathBuf)]) -> Result<Child, String> {
        let n = &self.names;
        let name = NODES[i];
        let nd = n.dir.join(name);
        for sub in ["etc", "cgroup", "data"] {
            std::fs::create_dir_all(nd.join(sub)).map_err(|e| e.to_string())?;
        }
        let gpus: Vec<String> = (0..GPUS_PER_NODE[i])
            .map(|g| format!("{GPU_KIND}={}", gpu_uuid(pid, i + 1, g)))
            .collect();
        let p = |rel: &str| nd.join(rel).to_string_lossy().into_owned();
        let config = serde_json::json!({
            "hosts": [
                format!("unix://{}", p("docker.sock")),
                format!("tcp://{}:{TLS_PORT}", n.addr(11 + i as u8)),
            ],
            "tls": true,
            "tlsverify": true,
            "tlscacert": n.dir.join("ca/cert.pem"),
            "tlscert": p("tls/cert.pem"),
            "tlskey": p("tls/key.pem"),
            "data-root": p("data"),
            "exec-root": "/run/docker",
            "pidfile": p("docker.pid"),
            // Relative: under dockerd's own cgroup, which is the node's.
            "cgroup-parent": "containers",
            "storage-driver": STORAGE_DRIVER,
            "bip": format!("{}/27", n.addr(65)),
            "default-address-pools": [{"base": format!("{}/27", n.addr(96)), "size": 28}],
            "node-generic-resources": gpus,
            "log-driver": "json-file",
        });
        std::fs::write(nd.join("daemon.json"), config.to_string()).map_err(|e| e.to_string())?;
        // Its cgroup in every hierarchy (cpuset needs its CPUs and memory nodes first).
        let mut procs = Vec::new();
        for ((controller, _), cg) in own.iter().zip(&n.cgroups[i]) {
            std::fs::create_dir_all(cg).map_err(|e| format!("{}: {e}", cg.display()))?;
            if controller == "cpuset" {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let parent = cg.parent().unwrap_or(cg).join(file);
                    let value = std::fs::read_to_string(&parent).map_err(|e| e.to_string())?;
                    std::fs::write(cg.join(file), value.trim()).map_err(|e| e.to_string())?;
                }
            }
            procs.push(sq(&cg.join("cgroup.procs").to_string_lossy()));
        }
        let q = |rel: &str| sq(&p(rel));
        let start = format!(
            "# Node {name} of the swarm test rig {tag}: runs as PID 1 of its own PID, mount and\n\
             # UTS namespaces, in its network namespace (tests/common/swarm/).\n\
             set -e\n\
             # Into the node's cgroups first: everything it starts is then in them. (Its\n\
             # parent, unshare, stays out: it outlives a kill of the node and reaps it.)\n\
             for p in {procs}; do echo $$ > \"$p\"; done\n\
             echo {name} > /proc/sys/kernel/hostname\n\
             # Its network namespace's sysfs, keeping the cgroup mounts.\n\
             mount --rbind /sys/fs/cgroup {cg}\n\
             mount -t sysfs sysfs /sys\n\
             mount --move {cg} /sys/fs/cgroup\n\
             # Not the machine engine's exec root (its containers' network namespaces).\n\
             awk '$5 ~ \"^/run/docker/\" {{ print $5 }}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l || true\n\
             mkdir -p /etc/docker /run/containerd /run/docker\n\
             mount --bind {etc} /etc/docker\n\
             mount -t tmpfs -o mode=711 tmpfs /run/containerd\n\
             mount -t tmpfs -o mode=711 tmpfs /run/docker\n\
             # labgate's node agent beside the engine, as a lab's node runs it.\n\
             LABGATE_LOG=labgate=debug {agent} node-agent --listen tcp://{addr}:{AGENT_PORT} \\\n\
               --tls-ca {ca} --tls-cert {cert} --tls-key {key} --docker {sock} >> {agent_log} 2>&1 &\n\
             exec dockerd --config-file {config}\n",
            tag = n.tag,
            procs = procs.join(" "),
            cg = q("cgroup"),
            etc = q("etc"),
            config = q("daemon.json"),
            agent = sq(env!("CARGO_BIN_EXE_labgate")),
            addr = n.addr(11 + i as u8),
            ca = sq(&n.dir.join("ca/cert.pem").to_string_lossy()),
            cert = q("tls/cert.pem"),
            key = q("tls/key.pem"),
            sock = q("docker.sock"),
            agent_log = q("agent.log"),
        );
        std::fs::write(nd.join("start.sh"), start).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(nd.join("dockerd.log")).map_err(|e| e.to_string())?;
        Command::new("sh")
            .arg("-c")
            .arg(
                "exec nsenter --net=/run/netns/\"$0\" -- unshare --mount --uts --pid --fork \
                 --mount-proc --propagation slave -- sh \"$START\"",
            )
            .arg(n.netns(name))
            .env("START", nd.join("start.sh"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting node {name}: {e}"))
    }

    /// `swarm init` on n1, the workers join, the image is loaded and the networks are made
    /// on every node.
    fn form_swarm(&mut self, image: &[u8]) -> Result<(), String> {
        let n = self.names.clone();
        let manager = &self.nodes[0];
        let pool = format!("{}/26", n.addr(192));
        let addr = manager.addr.clone();
        self.docker_result(
            manager,
            &[
                "swarm",
                "init",
                "--advertise-addr",
                &addr,
                "--listen-addr",
                &format!("{addr}:2377"),
                "--default-addr-pool",
                &pool,
                "--default-addr-pool-mask-length",
                "28",
            ],
        )?;
        let token = self.docker_result(manager, &["swarm", "join-token", "-q", "worker"])?;
        let config_only = [
            "network",
            "create",
            "--config-only",
            "--subnet",
            &format!("{}/26", n.addr(128)),
            "--gateway",
            &n.addr(129),
            "--opt",
            "com.docker.network.bridge.enable_icc=false",
            NODE_NETWORK,
        ];
        let rig = &*self;
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = rig
                .nodes
                .iter()
                .map(|node| {
                    let (token, manager_addr) = (&token, &addr);
                    s.spawn(move || {
                        if node.name != NODES[0] {
                            rig.docker_result(
                                node,
                                &[
                                    "swarm",
                                    "join",
                                    "--token",
                                    token,
                                    "--advertise-addr",
                                    &node.addr,
                                    "--listen-addr",
                                    &format!("{}:2377", node.addr),
                                    &format!("{manager_addr}:2377"),
                                ],
                            )?;
                        }
                        load(node, image)?;
                        rig.docker_result(node, &config_only).map(drop)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                .collect()
        });
        for r in results {
            r?;
        }
        let ready = eventually(Duration::from_secs(30), || {
            self.docker_result(&self.nodes[0], &["node", "ls", "--format", "{{.Status}}"])
                .is_ok_and(|s| s.lines().filter(|l| *l == "Ready").count() == NODES.len())
        });
        if !ready {
            return Err(format!(
                "the swarm did not get three Ready nodes: {:?}",
                self.docker_result(&self.nodes[0], &["node", "ls"])
            ));
        }
        for i in 0..self.nodes.len() {
            let id = self.docker_result(&self.nodes[i], &["info", "-f", "{{.Swarm.NodeID}}"])?;
            self.nodes[i].id = id;
        }
        self.docker_result(
            &self.nodes[0],
            &[
                "network",
                "create",
                "--driver",
                "bridge",
                "--scope",
                "swarm",
                "--config-from",
                NODE_NETWORK,
                NETWORK,
            ],
        )?;
        Ok(())
    }

    /// How long [`SwarmRig::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The names of what the rig is made of (for [`RigNames::leftovers`]).
    pub fn names(&self) -> &RigNames {
        &self.names
    }

    /// n1, n2, n3.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The manager, n1.
    pub fn manager(&self) -> &Node {
        &self.nodes[0]
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The node with swarm node ID `id`.
    pub fn node_by_id(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The host PIDs of the nodes' `labgate node-agent`s.
    pub fn agent_pids(&self) -> Vec<u32> {
        let dir = self.names.dir.to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                cmdline.contains("node-agent") && cmdline.contains(&dir)
            })
            .collect()
    }

    /// The client's TLS directory (`DOCKER_CERT_PATH`: `ca.pem`, `cert.pem`, `key.pem`).
    pub fn tls_dir(&self) -> PathBuf {
        self.names.dir.join("client")
    }

    /// The gateway's `[cluster]` table for this rig: the manager's unix socket, the nodes'
    /// TLS APIs by the default template, their agents, homes declared shared (they are on this machine's
    /// disk, which every node sees at the same path).
    pub fn cluster_table(&self) -> String {
        format!(
            "[cluster]\nengine = \"swarm\"\nmanager = \"{}\"\nnode_api = \"tcp://{{addr}}:{TLS_PORT}\"\n\
             node_agent = \"tcp://{{addr}}:{AGENT_PORT}\"\n\
             tls_dir = \"{}\"\ngpu_resource = \"{GPU_KIND}\"\nnetwork = \"{NETWORK}\"\n\
             shared_paths = [\"/\"]\n",
            self.manager().host(),
            self.tls_dir().display(),
        )
    }

    /// Loads `image` from the machine's engine on `node` (no registry serves the rig): for a
    /// test whose user needs an image other than the test image, placed on that node.
    pub fn load_image(&self, node: &Node, image: &str) {
        let saved = docker_command()
            .args(["save", image])
            .output()
            .unwrap_or_else(|e| panic!("docker save {image}: {e}"));
        assert!(
            saved.status.success(),
            "docker save {image}: {}",
            String::from_utf8_lossy(&saved.stderr)
        );
        load(node, &saved.stdout).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The node (hostname) of `service`'s task that should run, as the manager says; `None`
    /// when there is none (no such service, or scaled to zero).
    pub fn service_node(&self, service: &str) -> Option<String> {
        self.running_task(service, "{{.Node}}")
    }

    /// `docker service ps --filter desired-state=running --format FORMAT SERVICE` on the
    /// manager: the first line, `None` when there is none.
    pub fn running_task(&self, service: &str, format: &str) -> Option<String> {
        let out = self
            .docker_result(
                self.manager(),
                &[
                    "service",
                    "ps",
                    "--filter",
                    "desired-state=running",
                    "--format",
                    format,
                    service,
                ],
            )
            .ok()?;
        let line = out.lines().next()?.trim().to_owned();
        (!line.is_empty()).then_some(line)
    }

    /// Removes the services of `users` (`labgate-USER`), if any: a test's cleanup.
    pub fn remove_services(&self, users: &[String]) {
        for user in users {
            let _ = self.docker_result(
                self.manager(),
                &["service", "rm", &format!("labgate-{user}")],
            );
        }
    }

    /// `docker` talking to `node` over TLS (`DOCKER_HOST=tcp://ADDR:2376`,
    /// `DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`), as a remote client would.
    pub fn docker_tls(&self, node: &Node) -> Command {
        let mut cmd = docker_command();
        cmd.env("DOCKER_HOST", node.tcp_url())
            .env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", self.tls_dir());
        cmd
    }

    /// `docker -H tcp://ADDR:2376 ARGS` to `node` without TLS (no client certificate),
    /// whatever it answers.
    pub fn docker_without_tls(&self, node: &Node, args: &[&str]) -> Output {
        docker_plain(&node.tcp_url(), args)
    }

    /// `docker -H <node's unix socket> ARGS`, whatever it answers.
    pub fn docker_output(&self, node: &Node, args: &[&str]) -> Output {
        docker_command()
            .args(["-H", &node.host()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("docker: {e}"))
    }

    /// `docker -H <node's unix socket> ARGS`; asserts success, returns stdout trimmed.
    pub fn docker(&self, node: &Node, args: &[&str]) -> String {
        self.docker_result(node, args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `docker -H <node's unix socket> ARGS`: stdout trimmed, or what went wrong.
    pub fn docker_result(&self, node: &Node, args: &[&str]) -> Result<String, String> {
        let host = node.host();
        let mut all = vec!["-H", &host];
        all.extend(args);
        run("docker", &all)
    }

    /// Kills node `name` as a machine dies: its cgroup is frozen and everything in it
    /// (dockerd, containerd, the shims, the containers) killed. Its address stays on the hub
    /// (connections to it are refused, as by a host whose engine died).
    /// Cuts node `name` off the network, as a pulled cable or a dead switch port would: its
    /// processes (dockerd, containers) live on, but nothing reaches it and nothing it sends
    /// arrives. No packet is refused: connections to it hang until their own timeouts.
    pub fn cut_node(&self, name: &str) {
        assert!(NODES.contains(&name), "no node {name}");
        // The node's port on the hub: down, its frames go nowhere, and nothing answers.
        ip(&["-n", &self.names.netns("hub"), "link", "set", name, "down"])
            .unwrap_or_else(|e| panic!("cutting node {name}: {e}"));
    }

    /// Kills node `name` whole, as a machine dies: see [`SwarmRig::cut_node`] for one whose
    /// network vanishes instead.
    pub fn kill_node(&self, name: &str) {
        let i = NODES
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no node {name}"));
        let status = Command::new("sh")
            .arg("-c")
            .arg(self.names.kill_script(i))
            .status()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        assert!(status.success(), "killing node {name}: {status}");
        // Its unshare (outside the node's cgroups) has reaped the node's init and ends.
        let process = self.nodes[i]
            .process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut child) = process {
            let ended = eventually(Duration::from_secs(10), || {
                !matches!(child.try_wait(), Ok(None))
            });
            if !ended {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Bytes of memory the nodes' cgroups use (dockerd, containerd, shims, containers, and
    /// the page cache charged to them).
    pub fn memory_bytes(&self) -> u64 {
        self.names
            .cgroups
            .iter()
            .flatten()
            .filter(|c| c.to_string_lossy().contains("/memory/"))
            .filter_map(|c| std::fs::read_to_string(c.join("memory.usage_in_bytes")).ok())
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum()
    }

    /// Host PIDs of every process of the rig's nodes.
    pub fn processes(&self) -> Vec<i32> {
        processes_in_cgroups_named(&self.names.tag)
    }

    /// Leaves the rig as a test process that dies leaves it: its watchdog's pipe is closed
    /// and nothing else is done (the watchdog must tear it down). Its processes that are
    /// ours are reaped when they end, as init would after a real death.
    pub fn abandon(mut self) {
        let mut children: Vec<Child> = self
            .nodes
            .iter()
            .filter_map(|n| n.process.lock().unwrap_or_else(|e| e.into_inner()).take())
            .collect();
        if let Some(mut watchdog) = self.watchdog.take() {
            drop(watchdog.stdin.take());
            children.push(watchdog);
        }
        std::thread::spawn(move || {
            for mut child in children {
                let _ = child.wait();
            }
        });
        std::mem::forget(self);
    }
}

impl Drop for SwarmRig {
    fn drop(&mut self) {
        // Never panic here: a failed test may already be unwinding.
        let Some(mut watchdog) = self.watchdog.take() else {
            // The start failed before anything but the directory was made.
            let _ = std::fs::remove_dir_all(&self.names.dir);
            return;
        };
        if std::thread::panicking() {
            for node in &self.nodes {
                let log = node.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!(
                    "--- node {} log (last lines) ---\n{}",
                    node.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        drop(watchdog.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            // Reap the nodes the teardown kills (they are our children).
            for node in &self.nodes {
                let mut process = node.process.lock().unwrap_or_else(|e| e.into_inner());
                if process
                    .as_mut()
                    .is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
                {
                    *process = None;
                }
            }
            if !matches!(watchdog.try_wait(), Ok(None)) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for node in &self.nodes {
            if let Some(mut child) = node
                .process
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                if !matches!(child.try_wait(), Ok(None)) {
                    continue;
                }
                // Still running after the teardown: ours, so end it by its handle.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let left = self.names.leftovers();
        if !left.is_empty() {
            eprintln!(
                "swarm rig {}: left after teardown:\n{}",
                self.names.tag,
                left.join("\n")
            );
        }
    }
}
