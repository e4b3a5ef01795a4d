//! A `dockerd` of the test's own, so a test can stop, restart or reconfigure an engine without
//! touching the machine's: its own socket, data root, exec root, pid file, containerd and log
//! in a temp dir, its own default bridge interface (never `docker0`: the machine's engine owns
//! that one; `--bridge none` would make dockerd delete it), no iptables rules
//! (`--iptables=false`, so no chains to remove), the vfs storage driver and a cgroup parent of
//! its own. The busybox test image is loaded into it and labgate's `labgate` network is made
//! with a small subnet no other daemon of this machine uses.
//!
//! With [`DockerdOptions::nvidia_hook`], a stub `nvidia-container-runtime-hook` (a script that
//! reads its stdin and exits 0) is first on the daemon's `PATH`: dockerd then registers its
//! `nvidia` device driver, so a container created with a device request for `GPU-...` UUIDs
//! starts, and its init process has `NVIDIA_VISIBLE_DEVICES` set to them (in the OCI spec's
//! process environment: `docker exec` processes do not inherit it; `/proc/1/environ` shows
//! it). No GPU is needed.
//!
//! Dropping a [`PrivateDockerd`] tears it all down, also while a failed test unwinds: its
//! containers and network are removed, the daemon is stopped (SIGTERM, then SIGKILL) with its
//! containerd, mounts left under its directory are detached, and its bridge, cgroup parent and
//! directory are removed. It needs root and `dockerd`; [`PrivateDockerd::start`] says so
//! otherwise (callers skip with [`super::skip_unless`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{IMAGE, eventually};

/// What the daemon is started with.
#[derive(Debug, Clone, Copy, Default)]
pub struct DockerdOptions {
    /// A stub `nvidia-container-runtime-hook` first on the daemon's `PATH`: GPU device
    /// requests are accepted and their containers start.
    pub nvidia_hook: bool,
}

/// A running private `dockerd` (see the module doc); torn down on drop.
pub struct PrivateDockerd {
    /// Socket, data root, exec root, pid file, log, config, the stub hook.
    dir: tempfile::TempDir,
    /// The default bridge interface made for it (never `docker0`).
    bridge: String,
    /// Its cgroup parent (a directory under each cgroup v1 controller).
    cgroup_parent: String,
    options: DockerdOptions,
    /// The running daemon, if it runs.
    child: Option<Child>,
}

/// The stub hook: enough for dockerd to register the `nvidia` device driver, and for runc
/// to run it as a prestart hook (it gets the container state on stdin).
const STUB_HOOK: &str = "#!/bin/sh\ncat >/dev/null\nexit 0\n";

/// Whether an address of `10.{a}.{b}.x` is already on an interface or in a route here.
pub fn subnet_in_use(a: u32, b: u32) -> bool {
    let prefix = format!("10.{a}.{b}.");
    ["addr", "route"].iter().any(|what| {
        Command::new("ip")
            .args(["-4", "-o", what, "show"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&prefix))
    })
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    out.status.success().then_some(()).ok_or_else(|| {
        format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

impl PrivateDockerd {
    /// Starts a private daemon with the test image loaded and the `labgate` network made,
    /// or says why it cannot (no root, no `dockerd`, the daemon did not come up).
    pub fn start(options: DockerdOptions) -> Result<PrivateDockerd, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("needs root to run a private dockerd".into());
        }
        if Command::new("dockerd").arg("--version").output().is_err() {
            return Err("dockerd is not installed".into());
        }
        super::ensure_image();
        // Names apart from concurrent runs and from this binary's other daemons; subnets
        // nobody here uses yet.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let n = (0..200)
            .map(|i| (pid.wrapping_mul(7) + k * 13 + i) % 200 + 20)
            .find(|&n| !subnet_in_use(213, n) && !subnet_in_use(214, n))
            .ok_or("no free 10.213.x.0/24 subnet for its bridge")?;
        let bridge = format!("lgd{}x{k}", pid % 10_000_000);
        let cgroup_parent = format!("labgate-test-{pid}-{k}");
        let dir = tempfile::Builder::new()
            .prefix("labgate-dockerd.")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // The guard exists before anything is made, so a failure below still tears down.
        let mut daemon = PrivateDockerd {
            dir,
            bridge: String::new(),
            cgroup_parent,
            options,
            child: None,
        };
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        daemon.bridge = bridge.clone();
        ip(&["addr", "add", &format!("10.213.{n}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        let d = daemon.dir.path();
        std::fs::write(d.join("daemon.json"), "{}").map_err(|e| e.to_string())?;
        if options.nvidia_hook {
            std::fs::create_dir_all(d.join("bin")).map_err(|e| e.to_string())?;
            let hook = d.join("bin/nvidia-container-runtime-hook");
            std::fs::write(&hook, STUB_HOOK).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(|e| e.to_string())?;
        }
        daemon.run()?;
        let image = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker save {IMAGE} | docker -H {} load",
                daemon.host()
            ))
            .output()
            .map_err(|e| e.to_string())?;
        if !image.status.success() {
            return Err(format!(
                "loading the image: {}",
                String::from_utf8_lossy(&image.stderr)
            ));
        }
        // labgate's network, made here with a small fixed subnet rather than one of the
        // daemon's default pools (which the machine's engine may use).
        let net = daemon.docker_output(&[
            "network",
            "create",
            "--subnet",
            &format!("10.214.{n}.0/24"),
            "--opt",
            "com.docker.network.bridge.enable_icc=false",
            "labgate",
        ]);
        if !net.status.success() {
            return Err(format!(
                "creating the labgate network: {}",
                String::from_utf8_lossy(&net.stderr)
            ));
        }
        Ok(daemon)
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// `unix://SOCKET`, for `docker -H`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The line of a labgate config's `[docker]` table that points at this daemon.
    pub fn socket_line(&self) -> String {
        format!("socket = \"{}\"", self.socket().display())
    }

    /// Starts (or restarts) `dockerd` and waits until it answers.
    pub fn run(&mut self) -> Result<(), String> {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new("dockerd");
        if self.options.nvidia_hook {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![d.join("bin")];
            dirs.extend(std::env::split_paths(&path));
            cmd.env(
                "PATH",
                std::env::join_paths(dirs).map_err(|e| e.to_string())?,
            );
        }
        let child = cmd
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--host")
            .arg(self.host())
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .args(["--bridge", &self.bridge])
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
            ])
            .args(["--storage-driver", "vfs"])
            .args(["--cgroup-parent", &self.cgroup_parent])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("dockerd: {e}"))?;
        self.child = Some(child);
        let up = eventually(Duration::from_secs(60), || {
            matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
                && Command::new("docker")
                    .args(["-H", &self.host(), "version"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        });
        if up {
            Ok(())
        } else {
            Err(format!("dockerd did not come up:\n{}", self.log()))
        }
    }

    /// Stops the daemon as a service manager does (SIGTERM) and waits until it is gone.
    pub fn stop(&mut self) {
        self.signal(rustix::process::Signal::TERM);
    }

    /// Sends `signal` to the daemon and waits until it is gone (SIGKILL after 30 s).
    pub fn signal(&mut self, signal: rustix::process::Signal) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, signal);
            }
            let gone = eventually(Duration::from_secs(30), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !gone {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// `docker -H <this daemon> ARGS`; asserts success, returns stdout trimmed.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = self.docker_output(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `docker -H <this daemon> ARGS`, whatever it answers.
    pub fn docker_output(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(["-H", &self.host()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `docker inspect -f FORMAT NAME` on this daemon, trimmed; `None` if there is no such
    /// object.
    pub fn inspect(&self, name: &str, format: &str) -> Option<String> {
        let out = self.docker_output(&["inspect", "-f", format, name]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// IDs of the containers (any state) named exactly `name`.
    pub fn containers_named(&self, name: &str) -> Vec<String> {
        self.docker(&[
            "ps",
            "-a",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("name=^{name}$"),
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// Kills the daemon's own containerd if it outlived the daemon (a SIGKILLed dockerd
    /// cannot stop it).
    fn kill_containerd(&self) {
        let pidfile = self.dir.path().join("exec/containerd/containerd.pid");
        let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
        else {
            return;
        };
        // Only if that PID is still a containerd of this daemon's (the PID may be reused).
        let ours =
            std::fs::read(format!("/proc/{}/cmdline", pid.as_raw_nonzero())).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains(&*self.dir.path().to_string_lossy())
            });
        if ours {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let path = format!("/proc/{}", pid.as_raw_nonzero());
            let _ = eventually(Duration::from_secs(10), || !Path::new(&path).exists());
        }
    }

    /// Detaches every mount still under the daemon's directory, deepest first.
    fn unmount_leftovers(&self) {
        let root = self.dir.path().to_string_lossy().into_owned();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| m == &root || m.starts_with(&format!("{root}/")))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount")
                .args(["-l", &m])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        // Never panic here: a failed test may already be unwinding.
        if self.child.is_some() {
            let out = self.docker_output(&["ps", "-a", "-q"]);
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let mut rm = vec!["rm", "-f"];
                rm.extend(ids.iter().map(String::as_str));
                let _ = self.docker_output(&rm);
            }
            let _ = self.docker_output(&["network", "rm", "labgate"]);
        }
        self.stop();
        self.kill_containerd();
        self.unmount_leftovers();
        if !self.bridge.is_empty() {
            let _ = ip(&["link", "del", &self.bridge]);
        }
        // A relative cgroup parent lands under the daemon's own cgroup in each hierarchy,
        // which is the test process's (`/` in most, a directory of its own in some): remove
        // it from the root and from under each of those.
        let own: Vec<String> = std::fs::read_to_string("/proc/self/cgroup")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .map(|p| p.trim_start_matches('/').to_owned())
            .collect();
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in controllers.filter_map(Result::ok) {
                let _ = std::fs::remove_dir(c.path().join(&self.cgroup_parent));
                for p in own.iter().filter(|p| !p.is_empty()) {
                    let _ = std::fs::remove_dir(c.path().join(p).join(&self.cgroup_parent));
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("--- private dockerd log ---\n{}", self.log());
        }
        // The temp dir itself goes when `dir` drops, after this.
    }
}
