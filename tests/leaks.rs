//! Nothing leaks over many connections: 100 cycles of a login with `-A` and `-L` (a forwarded
//! HTTP request into the container, then the client killed while its command runs), a plain
//! command and a PTY session, against the real gateway with the real OpenSSH client. Afterwards
//! the gateway's open file descriptors, threads and tokio tasks are back at their baseline, no
//! exec process of labgate's is left in the container, and no agent socket directory remains.
//!
//! Tasks are read from the gateway's own log: at debug level it logs `alive_tasks=N` under the
//! `labgate::leaks` target each time a connection ends. The test measures it with a probe
//! connection that fails authentication (it spawns no channel task), so the count it sees is
//! the gateway's standing tasks plus the probe's own connection task, the same each time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Gateway, eventually, fd_count, keygen};

/// Cycles of connect/disconnect.
const CYCLES: usize = 100;

/// Port of the HTTP server inside the container (its loopback only).
const HTTP_PORT: u16 = 8731;

/// Open fds may exceed the baseline by this much. bollard keeps no idle connections to the
/// Docker socket (`pool_max_idle_per_host(0)`) and everything else is per connection, so
/// at rest the count is exact; the slack of 1 covers one Docker API request that a background
/// task (e.g. a reconcile or idle check) might have open at the moment of sampling.
const FD_SLACK: usize = 1;

/// Threads may exceed the baseline by this much. Forward and agent sockets are made on
/// short-lived threads that end right after, and tokio's blocking threads exit after 10 s
/// idle, which the polling below outwaits; the slack of 1 covers one blocking thread started
/// by a background task just before sampling.
const THREAD_SLACK: usize = 1;

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// The `alive_tasks=N` values the gateway logged so far, in order.
fn logged_alive_tasks(gw: &Gateway) -> Vec<usize> {
    gw.log()
        .lines()
        .filter(|l| l.contains("labgate::leaks"))
        .filter_map(|l| l.split("alive_tasks=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Connects with a key the gateway does not know, waits for that connection's
/// `alive_tasks=N` line and returns N.
fn probe_alive_tasks(gw: &Gateway, stranger: &std::path::Path) -> usize {
    let before = logged_alive_tasks(gw).len();
    let out = gw
        .ssh_as(&gw.users[0], stranger)
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255), "the probe must be refused");
    assert!(
        eventually(Duration::from_secs(10), || logged_alive_tasks(gw).len()
            > before),
        "no `labgate::leaks` line after a connection closed; log:\n{}",
        gw.log()
    );
    *logged_alive_tasks(gw).last().unwrap()
}

/// The command lines of the processes in `container` (`docker top`), sorted.
fn container_processes(container: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["top", container, "-o", "pid,args"])
        .output()
        .unwrap();
    assert!(out.status.success(), "docker top {container} failed");
    let mut procs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| Some(l.trim().split_once(' ')?.1.trim().to_owned()))
        .collect();
    procs.sort();
    procs
}

/// Agent socket directories left in the container's /tmp.
fn agent_dirs(container: &str) -> String {
    let out = Command::new("docker")
        .args([
            "exec",
            container,
            "sh",
            "-c",
            "ls -d /tmp/labgate-agent-* 2>/dev/null; true",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A host `ssh-agent` on its own socket (empty: `-A` only needs a socket to forward to).
struct Agent(Child, std::path::PathBuf);

impl Agent {
    fn start(dir: &std::path::Path) -> Agent {
        let sock = dir.join("agent.sock");
        Agent(common::ssh_agent(&sock), sock)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One login with `-A` and `-L`: waits until its command says the agent socket is there,
/// fetches a page through the local forward, then kills the client while the command still
/// runs (the gateway must hang up the exec and remove the agent directory).
fn forward_cycle(gw: &Gateway, agent: &Agent, n: usize) {
    for attempt in 0..20usize {
        let port = 20_000
            + ((std::process::id() as usize * 7919 + (n * 20 + attempt) * 104_729) % 40_000) as u16;
        let mut child = gw
            .ssh(0)
            .args([
                "-A",
                "-o",
                "ForwardAgent=yes",
                "-o",
                "ExitOnForwardFailure=yes",
            ])
            .args(["-L", &format!("127.0.0.1:{port}:127.0.0.1:{HTTP_PORT}")])
            .arg("test -S \"$SSH_AUTH_SOCK\" && echo ready && sleep 30")
            .env("SSH_AUTH_SOCK", &agent.1)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("forwarding"),
                "cycle {n}: no agent socket or login failed: {err}\n{}",
                gw.log()
            );
            continue; // the local port was taken: try another
        }
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.write_all(b"GET /hello.txt HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut page = String::new();
        conn.read_to_string(&mut page).unwrap();
        assert!(page.contains("hello-leaks"), "cycle {n}: {page:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        return;
    }
    panic!("cycle {n}: no free local port for -L");
}

/// One full cycle: the forward/agent login, a plain command, a PTY session.
fn cycle(gw: &Gateway, agent: &Agent, n: usize) {
    forward_cycle(gw, agent, n);
    assert_eq!(gw.ok(0, &format!("echo c{n}")), format!("c{n}\n"));
    let pty = gw
        .ssh(0)
        .args(["-tt", "echo pty; exit 3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(pty.status.code(), Some(3), "cycle {n}: PTY session");
}

#[test]
fn a_hundred_sessions_leave_no_fds_threads_tasks_execs_or_agent_dirs() {
    let gw = Gateway::start(1, "", "");
    let agent = Agent::start(gw.dir.path());
    let stranger = keygen(gw.dir.path(), "id_stranger");
    let pid = gw.pid();
    let container = gw.container(0);
    gw.ok(
        0,
        &format!(
            "mkdir -p ~/www && echo hello-leaks > ~/www/hello.txt && httpd -p 127.0.0.1:{HTTP_PORT} -h ~/www"
        ),
    );
    // Warm up (first forward, first agent socket, first PTY), then let everything settle.
    cycle(&gw, &agent, 0);
    std::thread::sleep(Duration::from_secs(12));
    let base_procs = container_processes(&container);
    let base_fds = fd_count(pid);
    let base_threads = thread_count(pid);
    let base_tasks = probe_alive_tasks(&gw, &stranger.private);
    eprintln!(
        "baseline: fds {base_fds}, threads {base_threads}, tasks {base_tasks}, processes {base_procs:?}"
    );

    for n in 1..=CYCLES {
        cycle(&gw, &agent, n);
    }

    let settled = eventually(Duration::from_secs(40), || {
        fd_count(pid) <= base_fds + FD_SLACK
            && thread_count(pid) <= base_threads + THREAD_SLACK
            && probe_alive_tasks(&gw, &stranger.private) <= base_tasks
            && container_processes(&container) == base_procs
    });
    let (fds, threads) = (fd_count(pid), thread_count(pid));
    let tasks = probe_alive_tasks(&gw, &stranger.private);
    let procs = container_processes(&container);
    eprintln!("after {CYCLES} cycles: fds {fds}, threads {threads}, tasks {tasks}");
    assert!(
        settled,
        "after {CYCLES} cycles: fds {fds} (baseline {base_fds}), threads {threads} \
         (baseline {base_threads}), tasks {tasks} (baseline {base_tasks}), processes \
         {procs:?} (baseline {base_procs:?})"
    );
    assert_eq!(
        agent_dirs(&container),
        "",
        "agent socket directories remain"
    );
}
