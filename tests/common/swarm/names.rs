//! What a swarm rig is made of, by name, and how it is undone: [`RigNames`] (its teardown
//! script, what is left of it) and the sweep of rigs whose test process is gone. Everything is
//! found by name (the rig's tag `labgate-swarm-PID-K`, its range `10.218.N.0/24`), so the
//! teardown can run without the process that made the rig.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::host::{sq, start_time};
use super::{NODES, PREFIX};
use crate::common::processes_in_cgroups_named;

/// The names of everything a rig makes, kept apart from the rig so a test can check, after
/// dropping it, that none of it is left.
#[derive(Debug, Clone)]
pub struct RigNames {
    /// `labgate-swarm-PID-K`.
    pub tag: String,
    /// Its directory (`$TMPDIR/TAG`).
    pub dir: PathBuf,
    /// N of its range `10.218.N.0/24`.
    pub subnet: u8,
    /// Each node's cgroup directories, one per hierarchy; the first is the freezer's.
    pub cgroups: Vec<Vec<PathBuf>>,
}

impl RigNames {
    /// The rig's range, `10.218.N.0/24`.
    pub fn range(&self) -> String {
        format!("10.218.{}.0/24", self.subnet)
    }

    /// Address `host` of the rig's range.
    pub fn addr(&self, host: u8) -> String {
        format!("10.218.{}.{host}", self.subnet)
    }

    /// The host's end of the veth to the hub.
    pub fn host_iface(&self) -> String {
        format!("lgsw{}h", self.subnet)
    }

    /// The network namespace of node `name` (or `hub`).
    pub fn netns(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// What is left of the rig: namespaces, interfaces, routes, mounts, cgroups, processes
    /// and files that carry its names. Empty once it is torn down.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let text = |args: &[&str]| {
            Command::new(args[0])
                .args(&args[1..])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let prefix = format!("10.218.{}.", self.subnet);
        left.extend(
            text(&["ip", "netns", "list"])
                .lines()
                .filter(|l| l.contains(&self.tag))
                .map(|l| format!("netns {l}")),
        );
        left.extend(
            text(&["ip", "-o", "link", "show"])
                .lines()
                .filter(|l| l.contains(&self.host_iface()))
                .map(|l| format!("link {l}")),
        );
        left.extend(
            text(&["ip", "-o", "-4", "addr", "show"])
                .lines()
                .chain(text(&["ip", "-4", "route", "show", "table", "all"]).lines())
                .filter(|l| l.contains(&prefix))
                .map(|l| format!("address or route {l}")),
        );
        left.extend(
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&self.tag))
                .map(|l| format!("mount {l}")),
        );
        left.extend(
            self.cgroups
                .iter()
                .flatten()
                .filter(|c| c.exists())
                .map(|c| format!("cgroup {}", c.display())),
        );
        left.extend(processes_in_cgroups_named(&self.tag).into_iter().map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            format!(
                "process {}",
                stat.split(' ').take(5).collect::<Vec<_>>().join(" ")
            )
        }));
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        left
    }

    /// The shell commands that freeze node `i`'s cgroup, kill everything in it and wait
    /// until it is empty. Safe when the node is already gone.
    pub(super) fn kill_script(&self, i: usize) -> String {
        let f = sq(&self.cgroups[i][0].to_string_lossy());
        format!(
            "F={f}\n\
             if [ -d \"$F\" ]; then\n\
             \x20 echo FROZEN > \"$F/freezer.state\"\n\
             \x20 i=0; while [ \"$(cat \"$F/freezer.state\")\" != FROZEN ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done\n\
             \x20 find \"$F\" -name cgroup.procs -exec cat {{}} + | xargs -r kill -9\n\
             \x20 echo THAWED > \"$F/freezer.state\"\n\
             \x20 i=0; while [ -n \"$(find \"$F\" -name cgroup.procs -exec cat {{}} +)\" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done\n\
             fi\n"
        )
    }

    /// The whole teardown (see the module doc); safe to run twice, or on a half-made rig.
    pub(super) fn teardown_script(&self) -> String {
        let mut s = format!(
            "#!/bin/sh\n\
             # Tears down the swarm test rig {tag} (tests/common/swarm/). Run by its watchdog\n\
             # when the rig is dropped or its test process ends, or by the next rig's start.\n",
            tag = self.tag
        );
        for i in 0..NODES.len() {
            s += &self.kill_script(i);
        }
        // Cgroups, deepest first; a cgroup whose last task is still exiting refuses at first.
        let all: Vec<String> = self
            .cgroups
            .iter()
            .flatten()
            .map(|c| sq(&c.to_string_lossy()))
            .collect();
        s += &format!(
            "for try in 1 2 3 4 5 6 7 8 9 10; do\n\
             \x20 left=\n\
             \x20 for c in {all}; do\n\
             \x20   [ -d \"$c\" ] || continue\n\
             \x20   find \"$c\" -depth -type d -exec rmdir {{}} + 2>/dev/null\n\
             \x20   [ -d \"$c\" ] && left=1\n\
             \x20 done\n\
             \x20 [ -z \"$left\" ] && break\n\
             \x20 sleep 0.2\n\
             done\n",
            all = all.join(" ")
        );
        for name in NODES.iter().chain(&["hub"]) {
            s += &format!("ip netns del {} 2>/dev/null\n", self.netns(name));
        }
        // Subnet 0: the range was not claimed (yet), so the route is not ours.
        if self.subnet != 0 {
            s += &format!(
                "ip link del {} 2>/dev/null\n\
                 ip route del unreachable {} 2>/dev/null\n",
                self.host_iface(),
                self.range()
            );
        }
        let d = sq(&self.dir.to_string_lossy());
        s += &format!(
            "awk -v d={d} '$5 == d || index($5, d \"/\") == 1 {{ print $5 }}' /proc/self/mountinfo \
             | sort -r | xargs -r -n1 umount -l 2>/dev/null\n\
             rm -rf {d}\n"
        );
        s
    }
}

/// Runs the teardown of every rig whose owner process is gone.
pub(super) fn sweep_stale_rigs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let owner = std::fs::read_to_string(dir.join("owner")).unwrap_or_default();
        let stale = match start_time(pid) {
            None => true,
            // No owner yet: a rig being made right now.
            Some(t) => !owner.trim().is_empty() && owner.trim() != format!("{pid} {t}"),
        };
        if !stale {
            continue;
        }
        eprintln!("swarm rig: tearing down {name}, left by a test process that is gone");
        match std::fs::read_to_string(dir.join("teardown.sh")) {
            Ok(script) => {
                let _ = Command::new("sh")
                    .arg("-c")
                    .arg(script)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}
