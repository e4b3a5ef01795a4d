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

    /// Every process in this process's session or process group (the process included),
    /// each held by a pidfd: a signal sent through it reaches that process or nothing, never
    /// a process that got its PID after it ended.
    fn family(&self) -> Vec<Member> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let in_family = |s: &Stat| s.session == self.pid || s.pgrp == self.pid;
        dir.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| read_stat(pid).is_some_and(|s| in_family(&s)))
            .filter_map(|pid| {
                let fd = rustix::process::pidfd_open(
                    rustix::process::Pid::from_raw(pid)?,
                    rustix::process::PidfdFlags::empty(),
                )
                .ok()?;
                // Read again once held: the PID may have changed hands since the scan.
                let stat = read_stat(pid).filter(in_family)?;
                Some(Member {
                    pid,
                    start_time: stat.start_time,
                    fd,
                })
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
        for member in &family {
            member.signal(rustix::process::Signal::HUP);
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGCONT);
        let deadline = std::time::Instant::now() + grace;
        let remaining = |family: &[Member]| -> Vec<usize> {
            (0..family.len())
                .filter(|&i| family[i].alive() && !ignores_sighup(family[i].pid))
                .collect()
        };
        while std::time::Instant::now() < deadline {
            if remaining(&family).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in remaining(&family) {
            tracing::debug!(pid = family[i].pid, "process survived SIGHUP: SIGKILL");
            family[i].signal(rustix::process::Signal::KILL);
        }
    }
}

/// A process of the family being hung up, held by a pidfd.
struct Member {
    /// Its PID when it was found (for `/proc` reads only, never for signals).
    pid: i32,
    /// Its start time then: a process with this PID and another start time is not it.
    start_time: u64,
    /// The process itself.
    fd: std::os::fd::OwnedFd,
}

impl Member {
    /// Whether it still runs (as far as `/proc` tells; signals go through the pidfd anyway).
    fn alive(&self) -> bool {
        read_stat(self.pid).is_some_and(|s| s.start_time == self.start_time)
    }

    /// Sends `signal` to it, or to nothing if it has ended.
    fn signal(&self, signal: rustix::process::Signal) {
        let _ = rustix::process::pidfd_send_signal(&self.fd, signal);
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

    #[test]
    fn a_member_whose_pid_was_reused_is_never_signalled() {
        // A process of the family ends; another process is then given its PID (through
        // ns_last_pid, as root). The member held for the ended one must not reach it.
        let mut first = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = first.id() as i32;
        let member = Member {
            pid,
            start_time: read_stat(pid).unwrap().start_time,
            fd: rustix::process::pidfd_open(
                rustix::process::Pid::from_raw(pid).unwrap(),
                rustix::process::PidfdFlags::empty(),
            )
            .unwrap(),
        };
        first.kill().unwrap();
        first.wait().unwrap();
        let mut reused = None;
        for _ in 0..200 {
            if std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_err() {
                break;
            }
            let child = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap();
            if child.id() as i32 == pid {
                reused = Some(child);
                break;
            }
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        let Some(mut second) = reused else {
            assert!(
                std::env::var_os("CI").is_none(),
                "could not get PID {pid} again (needs root)"
            );
            eprintln!("skipped: could not get PID {pid} again (needs root)");
            return;
        };
        // (Start times count clock ticks: both may well have started in the same one, so only
        // the pidfd tells them apart.)
        member.signal(rustix::process::Signal::KILL);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            second.try_wait().unwrap().is_none(),
            "the process that got the PID was killed"
        );
        let _ = second.kill();
        let _ = second.wait();
    }
}
