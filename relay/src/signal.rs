//! `labgate-relay signal MARK SIG` and `labgate-relay hangup MARK GRACE_MS`: deliver a signal
//! to a process the gateway started in this container, from inside it. On a remote node the
//! gateway sees no PID of the container's, so it marks each process it starts with
//! `LABGATE_EXEC=MARK` in its environment; these modes find the marked process that started
//! it all (its parent is unmarked) in `/proc` and act on its process group (`signal`), or do
//! what a terminal hangup does (`hangup`): SIGHUP to its session and group, then, after the
//! grace period, SIGKILL for what is still there and did not ignore SIGHUP (so `nohup` and
//! `setsid` jobs live on, as on a host). Only processes the caller may signal are signalled:
//! the gateway runs this as the user who owns them.

use std::collections::BTreeSet;
use std::io;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process, kill_process_group};

/// The environment variable that marks a process the gateway started.
const MARK_VAR: &str = "LABGATE_EXEC";

/// What `/proc/PID/stat` says of a process, as far as needed here.
struct Stat {
    ppid: i32,
    pgrp: i32,
    session: i32,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name may hold spaces and parentheses: fields are counted from the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        session: f.get(3)?.parse().ok()?,
    })
}

fn marked(pid: i32, mark: &str) -> bool {
    let want = format!("{MARK_VAR}={mark}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
}

fn pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn ignores_sighup(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            let hex = t
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|mask| mask & 1 != 0)
}

/// The marked processes whose parent is not marked: where each marked exec began.
fn roots(mark: &str) -> Vec<(i32, Stat)> {
    pids()
        .into_iter()
        .filter(|p| marked(*p, mark))
        .filter_map(|p| Some((p, stat(p)?)))
        .filter(|(_, s)| s.ppid <= 0 || !marked(s.ppid, mark))
        .collect()
}

fn pid(raw: i32) -> io::Result<Pid> {
    Pid::from_raw(raw).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid 0"))
}

/// `signal MARK SIG`: `SIG` (a number) to the process group of the marked exec.
pub(crate) fn signal(mark: &str, sig: &str) -> io::Result<()> {
    let sig = sig
        .parse::<i32>()
        .ok()
        .and_then(Signal::from_named_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown signal"))?;
    let found = roots(mark);
    if found.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no such process"));
    }
    for (p, s) in found {
        let r = kill_process_group(pid(s.pgrp)?, sig);
        // Not a group leader's group we may signal: the process alone.
        if r.is_err() {
            kill_process(pid(p)?, sig)?;
        }
    }
    Ok(())
}

/// `hangup MARK GRACE_MS`: what a terminal hangup does to the marked exec's session.
pub(crate) fn hangup(mark: &str, grace_ms: &str) -> io::Result<()> {
    let grace = grace_ms
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad grace period"))?;
    let found = roots(mark);
    let sessions: BTreeSet<i32> = found.iter().map(|(_, s)| s.session).collect();
    let groups: BTreeSet<i32> = found.iter().map(|(_, s)| s.pgrp).collect();
    let members = || {
        pids()
            .into_iter()
            .filter(|p| {
                stat(*p).is_some_and(|s| sessions.contains(&s.session) || groups.contains(&s.pgrp))
            })
            .collect::<Vec<_>>()
    };
    let hup = members();
    if hup.is_empty() {
        return Ok(());
    }
    for p in &hup {
        if let Ok(p) = pid(*p) {
            let _ = kill_process(p, Signal::HUP);
        }
    }
    let until = std::time::Instant::now() + grace;
    while std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
        if members().iter().all(|p| !hup.contains(p)) {
            return Ok(());
        }
    }
    for p in members() {
        if hup.contains(&p)
            && !ignores_sighup(p)
            && let Ok(p) = pid(p)
        {
            let _ = kill_process(p, Signal::KILL);
        }
    }
    Ok(())
}
