//! Signalling a container process from the host, by host PID.
//!
//! The Engine API cannot kill an exec, so labgate does what a terminal hangup does: SIGHUP to
//! the process's session and process group, then, after a grace period, SIGKILL for whatever
//! is still there and did not ignore SIGHUP. `nohup` jobs ignore SIGHUP and `setsid` jobs
//! are in another session and group, so both survive as they would on a host. This needs the
//! host PID namespace (true when labgate runs on the host, or in a container with `pid: host`).

use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// A process identified by host PID and its start time, so a reused PID is never signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostProcess {
    /// Host PID.
    pub pid: i32,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
}

/// The fields of `/proc/PID/stat` labgate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    pgrp: i32,
    session: i32,
    start_time: u64,
}

fn read_stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/PID/stat`; the command name may contain spaces and parentheses, so fields are
/// counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) pgrp(5) session(6) ... starttime(22).
    Some(Stat {
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn ignores_sighup(pid: i32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 != 0) // SIGHUP is signal 1, bit 0.
}

impl HostProcess {
    /// Identifies `pid` now; `None` if it is not visible (gone, or another PID namespace).
    pub fn identify(pid: i32) -> Option<Self> {
        if pid <= 0 {
            return None;
        }
        read_stat(pid).map(|s| HostProcess {
            pid,
            start_time: s.start_time,
        })
    }

    /// Whether this exact process still exists.
    pub fn alive(&self) -> bool {
        read_stat(self.pid).is_some_and(|s| s.start_time == self.start_time)
    }

    /// Sends `signal` to the process group this process leads (or, if it leads none, to the
    /// process alone).
    pub fn signal_group(&self, signal: Signal) -> nix::Result<()> {
        let Some(stat) = read_stat(self.pid).filter(|s| s.start_time == self.start_time) else {
            return Err(nix::errno::Errno::ESRCH);
        };
        if stat.pgrp == self.pid {
            killpg(Pid::from_raw(self.pid), signal)
        } else {
            kill(Pid::from_raw(self.pid), signal)
        }
    }

    /// Every process in this process's session or process group (the process included).
    fn family(&self) -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| {
                read_stat(pid).is_some_and(|s| s.session == self.pid || s.pgrp == self.pid)
            })
            .collect()
    }

    /// The terminal-hangup sequence described in the module doc. Runs blocking `/proc` scans:
    /// call it from `spawn_blocking`.
    pub fn hangup_blocking(&self, grace: Duration) {
        if !self.alive() {
            return;
        }
        let family = self.family();
        for &pid in &family {
            let _ = kill(Pid::from_raw(pid), Signal::SIGHUP);
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGCONT);
        let deadline = std::time::Instant::now() + grace;
        let remaining = |family: &[i32]| -> Vec<i32> {
            family
                .iter()
                .copied()
                .filter(|&pid| read_stat(pid).is_some() && !ignores_sighup(pid))
                .collect()
        };
        while std::time::Instant::now() < deadline {
            if remaining(&family).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in remaining(&family) {
            tracing::debug!(pid, "process survived SIGHUP: SIGKILL");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let line = "4242 (we ird) name)) S 1 4242 4240 34816 4242 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1 2";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.pgrp, 4242);
        assert_eq!(s.session, 4240);
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn identifies_this_process_and_rejects_bad_pids() {
        let me = HostProcess::identify(std::process::id() as i32).unwrap();
        assert!(me.alive());
        assert!(HostProcess::identify(0).is_none());
        assert!(HostProcess::identify(-5).is_none());
        let stale = HostProcess {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !stale.alive(),
            "a reused PID must not count as the same process"
        );
    }

    #[test]
    fn hangup_kills_a_child_group_but_spares_nohup_style_ignorers() {
        use std::os::unix::process::CommandExt;
        // A shell leading its own group, with a child that ignores SIGHUP and one that does not.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("trap '' HUP; sleep 30 & echo $! ; trap - HUP; sleep 30 & echo $!; wait")
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let ignorer: i32 = lines.next().unwrap().unwrap().trim().parse().unwrap();
        let plain: i32 = lines.next().unwrap().unwrap().trim().parse().unwrap();
        let leader = HostProcess::identify(child.id() as i32).unwrap();
        leader.hangup_blocking(Duration::from_millis(500));
        let _ = child.wait();
        let state = |pid: i32| read_stat(pid).is_some();
        // A zombie still has a stat entry until reaped; check the state letter instead.
        let zombie_or_gone = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|t| t[t.rfind(')').unwrap() + 2..].starts_with('Z'))
                .unwrap_or(true)
        };
        assert!(zombie_or_gone(plain), "the plain child must be gone");
        assert!(
            state(ignorer) && !zombie_or_gone(ignorer),
            "the SIGHUP-ignoring child survives"
        );
        let _ = kill(Pid::from_raw(ignorer), Signal::SIGKILL);
    }
}
