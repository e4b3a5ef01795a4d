//! Load: 200 concurrent sessions and 50 concurrent forwards moving data on loopback, through
//! the real gateway with real OpenSSH clients. Every byte is compared, every client must
//! succeed, and the gateway's memory stays under a stated bound.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Gateway, eventually, fd_count, random_bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Users (containers) the sessions are spread over.
const USERS: usize = 4;
/// Concurrent `ssh user@gw cat` sessions.
const SESSIONS: usize = 200;
/// Concurrent `ssh -W localhost:PORT` forwards to an echo server in a container.
const FORWARDS: usize = 50;
/// Bytes each session sends and expects back.
const SESSION_BYTES: usize = 64 * 1024;
/// Bytes each forward sends and expects back.
const FORWARD_BYTES: usize = 1024 * 1024;
/// The echo server's port inside user 0's container.
const ECHO_PORT: u16 = 7000;

/// What the gateway may hold per connection besides the data in flight (russh's buffers,
/// the session or forward task, the exec stream): generous, a few times what it measures.
const PER_CONNECTION_KIB: u64 = 128;

/// Descriptors the gateway may hold beyond the first round's count after the second one
/// (pooled connections to the Docker socket); a leak per connection would be 250.
const FD_SLACK: usize = 32;

/// Bound on the gateway's resident memory growth under the load. A channel's window is
/// 2 MiB, larger than any stream here, so the gateway may legitimately hold every byte in
/// flight at once, and twice: on the way in (a forward's queue toward a target that reads
/// slower than the client sends; the 64 MiB queue bound is reached only by a stalled reader,
/// which this test does not have) and on the way out (the echo queued toward a client that
/// reads slower); plus a fixed cost per connection. Measured on the 2-core test machine:
/// 56 to 80 MiB of growth for 62.5 MiB in flight and 250 connections; the bound is 156 MiB.
/// It catches a third copy of the data, or unbounded buffering; leaks per connection are
/// caught by the descriptor check after a second round (and by `tests/leaks.rs`).
fn max_growth_kib() -> u64 {
    let in_flight = (SESSIONS * SESSION_BYTES + FORWARDS * FORWARD_BYTES) as u64 / 1024;
    2 * in_flight + (SESSIONS + FORWARDS) as u64 * PER_CONNECTION_KIB
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A gauge's value from the gateway's `/metrics`.
fn gauge(gw: &Gateway, name: &str) -> f64 {
    gw.metric(name).unwrap_or(-1.0)
}

/// Feeds `data` to `child`'s stdin (then closes it) while reading its stdout to the end;
/// returns what came back and whether the client exited successfully, with its stderr.
async fn echo(mut child: tokio::process::Child, data: Vec<u8>) -> (Vec<u8>, bool, String) {
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&data).await;
        // Dropping stdin sends EOF: `cat` ends, the forward's server side sees end of input.
    });
    let mut back = Vec::new();
    let mut err = Vec::new();
    let (r, _) = tokio::join!(stdout.read_to_end(&mut back), stderr.read_to_end(&mut err));
    r.unwrap();
    writer.await.unwrap();
    let ok = child.wait().await.map(|s| s.success()).unwrap_or(false);
    (back, ok, String::from_utf8_lossy(&err).into_owned())
}

/// The clients of one round: `SESSIONS` sessions spread over the users, `FORWARDS` forwards.
fn clients(gw: &Gateway) -> Vec<(String, std::process::Command, usize)> {
    let mut clients = Vec::new();
    for n in 0..SESSIONS {
        let mut c = gw.ssh(n % USERS);
        c.arg("cat");
        clients.push((format!("session {n}"), c, SESSION_BYTES));
    }
    for n in 0..FORWARDS {
        let mut c = gw.ssh(0);
        c.args(["-W", &format!("localhost:{ECHO_PORT}")]);
        clients.push((format!("forward {n}"), c, FORWARD_BYTES));
    }
    clients
}

/// One round: every client connects, all are open at once, then all move their data.
/// Returns the failures (wrong bytes back, or a client that did not exit successfully).
fn round(gw: &Gateway, rt: &tokio::runtime::Runtime, seed: u64) -> Vec<String> {
    let _enter = rt.enter();
    let children: Vec<_> = clients(gw)
        .into_iter()
        .map(|(name, c, len)| {
            let child = tokio::process::Command::from(c)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            (name, child, len)
        })
        .collect();

    // All of them open at once before any data moves.
    let (mut sessions, mut forwards) = (0.0, 0.0);
    assert!(
        eventually(Duration::from_secs(240), || {
            sessions = gauge(gw, "labgate_sessions");
            forwards = gauge(gw, "labgate_forwards");
            sessions >= SESSIONS as f64 && forwards >= FORWARDS as f64
        }),
        "only {sessions} sessions and {forwards} forwards open"
    );

    let tasks: Vec<_> = children
        .into_iter()
        .enumerate()
        .map(|(i, (name, child, len))| {
            let data = random_bytes(len, seed + i as u64);
            rt.spawn(async move {
                let (back, ok, err) = echo(child, data.clone()).await;
                (name, back == data, back.len(), ok, err)
            })
        })
        .collect();
    let results = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(300), futures::future::join_all(tasks))
            .await
            .expect("the clients did not finish in 5 minutes")
    });
    let mut failures = Vec::new();
    for r in results {
        let (name, same, got, ok, err) = r.unwrap();
        if !same || !ok {
            failures.push(format!(
                "{name}: {got} bytes back, identical {same}, exit ok {ok}: {err}"
            ));
        }
    }
    // Everything closes again.
    assert!(
        eventually(Duration::from_secs(30), || gauge(gw, "labgate_sessions")
            == 0.0
            && gauge(gw, "labgate_forwards") == 0.0),
        "sessions or forwards left open"
    );
    failures
}

#[test]
fn two_hundred_sessions_and_fifty_forwards_move_every_byte_in_bounded_memory() {
    // Each container runs up to 50 `cat`s (and user 0's the echo server's 50 connections).
    let tail: String = (0..USERS)
        .map(|i| format!("[users.{{u{i}}}]\npids = 512\n"))
        .collect();
    // Many connections per user here (the default per-user bound is 32).
    let gw = Gateway::start_with_server(USERS, "max_connections_per_user = 128\n", "", &tail);
    for i in 0..USERS {
        gw.ok(i, "true");
    }
    // A looping echo server: busybox `nc -ll -e` forks `cat` for each connection.
    gw.ok(
        0,
        &format!("setsid nc -ll -p {ECHO_PORT} -e cat </dev/null >/dev/null 2>&1 &"),
    );
    assert!(
        eventually(Duration::from_secs(10), || gw
            .run(0, &format!("echo ping | nc 127.0.0.1 {ECHO_PORT}"))
            .stdout
            == b"ping\n"),
        "the echo server did not start"
    );
    let pid = gw.pid();
    let rss_before = status_kib(pid, "VmRSS");
    let rt = tokio::runtime::Runtime::new().unwrap();

    let failures = round(&gw, &rt, 1);
    let peak = status_kib(pid, "VmHWM");
    eprintln!("gateway memory: {rss_before} KiB before, peak {peak} KiB in the first round");
    assert!(
        failures.is_empty(),
        "{} of {} clients failed:\n{}",
        failures.len(),
        SESSIONS + FORWARDS,
        failures.join("\n")
    );
    let bound = rss_before + max_growth_kib();
    assert!(
        peak <= bound,
        "peak RSS {peak} KiB over the bound {bound} KiB ({rss_before} KiB before the load)"
    );

    // The same load again: memory stays under the same bound (the allocator reuses what the
    // first round freed), and no descriptor is left per connection.
    let fds_after_first = fd_count(pid);
    let failures = round(&gw, &rt, 1_000);
    let peak = status_kib(pid, "VmHWM");
    eprintln!("gateway memory: peak {peak} KiB after the second round");
    assert!(
        failures.is_empty(),
        "second round:\n{}",
        failures.join("\n")
    );
    assert!(
        peak <= bound,
        "peak RSS {peak} KiB over the bound {bound} KiB after the second round"
    );
    let mut fds = 0;
    assert!(
        eventually(Duration::from_secs(30), || {
            fds = fd_count(pid);
            fds <= fds_after_first + FD_SLACK
        }),
        "{fds} descriptors after the second round, {fds_after_first} after the first"
    );

    let log = gw.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(
        errors.is_empty(),
        "errors in the log:\n{}",
        errors.join("\n")
    );
}
