//! Before authentication: a crowd of connections that never log in (as from behind a lab's
//! NAT) cannot lock a real user out, silent connections end at the login grace time, and
//! repeated failures from one address back off without delaying the real user. Real gateway,
//! real OpenSSH client, crowds of plain TCP connections.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Gateway, eventually, fd_count, keygen};

/// A connection that says nothing (`hello` false) or only its version line, then stalls.
fn stalled(addr: std::net::SocketAddr, hello: bool) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    if hello {
        s.write_all(b"SSH-2.0-crowd_0.1\r\n").unwrap();
    }
    s.set_nonblocking(true).unwrap();
    s
}

/// A stalled connection from 127.0.0.2 (another address on the loopback network).
fn from_other_address(addr: std::net::SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

/// Whether the gateway has closed `s` (end of file, or reset), reading what it sent so far.
fn closed_by_gateway(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// How many of `crowd` the gateway has closed; `closed` remembers them across calls.
fn count_closed(crowd: &mut [TcpStream], closed: &mut [bool]) -> usize {
    for (s, c) in crowd.iter_mut().zip(closed.iter_mut()) {
        if !*c {
            *c = closed_by_gateway(s);
        }
    }
    closed.iter().filter(|c| **c).count()
}

#[test]
fn a_crowd_that_never_logs_in_does_not_lock_out_a_real_user() {
    let max_startups = 50;
    let gw = Gateway::start_with_server(1, &format!("max_startups = {max_startups}"), "", "");
    gw.ok(0, "true"); // the container exists: the logins below measure only admission
    let pid = gw.pid();
    let base_fds = fd_count(pid);

    // A client from another address, stalled before the crowd arrives: the oldest of all.
    let mut elsewhere = from_other_address(gw.addr);

    // 300 connections from one address: half silent, half stalled after their version line.
    let mut crowd: Vec<TcpStream> = (0..300).map(|i| stalled(gw.addr, i % 2 == 1)).collect();
    let mut closed = vec![false; crowd.len()];
    // Past max_startups each newcomer closed the oldest: all but the newest 50 are closed.
    let mut n = 0;
    assert!(
        eventually(Duration::from_secs(20), || {
            n = count_closed(&mut crowd, &mut closed);
            n >= crowd.len() - max_startups
        }),
        "only {n} of the crowd closed"
    );
    assert!(
        !closed[crowd.len() - 1],
        "the newest of the crowd is still waiting"
    );
    assert!(
        !closed_by_gateway(&mut elsewhere),
        "the crowd closed a client from another address"
    );
    // The admin sees it in the metrics.
    let (_, page) = gw.http_get("/metrics");
    let closed_metric: f64 = page
        .lines()
        .find_map(|l| l.strip_prefix("labgate_startups_closed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no labgate_startups_closed_total in {page}"));
    assert!(
        closed_metric >= (crowd.len() - max_startups) as f64,
        "{page}"
    );
    let waiting: f64 = page
        .lines()
        .find_map(|l| l.strip_prefix("labgate_unauthenticated_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no labgate_unauthenticated_connections in {page}"));
    assert!(waiting <= max_startups as f64, "{page}");
    // The gateway holds at most max_startups of them (each with a second descriptor that
    // closes it) once the closed ones' tasks have ended.
    let bound = base_fds + 2 * max_startups + 10;
    let mut fds = 0;
    assert!(
        eventually(Duration::from_secs(10), || {
            fds = fd_count(pid);
            fds <= bound
        }),
        "{fds} descriptors (baseline {base_fds}) with {} connections of the crowd open",
        crowd.len()
    );

    // The crowd keeps arriving while the real user logs in, again and again: every login
    // succeeds (with OpenSSH's MaxStartups, random drops would fail some).
    let stop = Arc::new(AtomicBool::new(false));
    let addr = gw.addr;
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut more = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                more.push(stalled(addr, more.len() % 2 == 0));
                std::thread::sleep(Duration::from_millis(40));
            }
            more
        })
    };
    for i in 0..6 {
        let out = gw
            .ssh(0)
            .arg("echo in")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stdout == b"in\n",
            "login {i} under the crowd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stop.store(true, Ordering::SeqCst);
    let mut more = churn.join().unwrap();
    crowd.append(&mut more);
    let mut closed = vec![false; crowd.len()];
    assert!(
        eventually(Duration::from_secs(20), || count_closed(
            &mut crowd,
            &mut closed
        ) >= crowd.len() - max_startups),
        "the churning crowd was not closed"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            fds = fd_count(pid);
            fds <= bound
        }),
        "{fds} descriptors (baseline {base_fds})"
    );
    assert!(
        gw.log().contains(&format!(
            "max_startups ({max_startups}) unauthenticated connections reached"
        )),
        "the bound is logged"
    );
}

#[test]
fn connections_that_never_log_in_end_at_the_login_grace_time() {
    let gw = Gateway::start_with_server(1, "login_grace = \"1s\"", "", "");
    // Silent (before russh has a session), and stalled in the key exchange (where russh
    // does not act on a disconnect).
    let mut crowd = vec![stalled(gw.addr, false), stalled(gw.addr, true)];
    let mut closed = vec![false; 2];
    assert!(
        eventually(Duration::from_secs(15), || count_closed(
            &mut crowd,
            &mut closed
        ) == 2),
        "closed: {closed:?}"
    );
    let log = gw.log();
    assert!(log.contains("no SSH version line within 1s"), "{log}");
    assert!(log.contains("no login within 1s"), "{log}");
    // A real login is not affected.
    assert_eq!(gw.ok(0, "echo ok"), "ok\n");
}

#[test]
fn repeated_auth_failures_back_off_and_the_real_user_still_logs_in() {
    let gw = Gateway::start(1, "", "");
    let stranger = keygen(gw.dir.path(), "stranger");
    // 30 wrong-key logins from 127.0.0.1, at once.
    let attempts: Vec<_> = (0..30)
        .map(|_| {
            gw.ssh_as(&gw.users[0], &stranger.private)
                .arg("true")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for a in attempts {
        let out = a.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("Permission denied"), "{err}");
    }
    let log = gw.log();
    assert_eq!(
        log.matches("auth failures from 127.0.0.1: backing off")
            .count(),
        1,
        "back-off is logged once per address:\n{log}"
    );
    // The real user behind the same address logs in, key accepted at once.
    assert_eq!(gw.ok(0, "echo in"), "in\n");
    assert!(
        gw.audit()
            .iter()
            .any(|e| e["event"] == "login accepted" && e["user"] == gw.users[0].as_str()),
        "{:?}",
        gw.audit()
    );
}

#[test]
fn a_login_past_max_connections_is_refused_until_one_ends() {
    let gw = Gateway::start_with_server(1, "max_connections = 1", "", "");
    let mut first = gw
        .ssh(0)
        .arg("echo up; sleep 60")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 3];
    first
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    assert_eq!(&line, b"up\n");

    let out = gw.run(0, "true");
    assert!(!out.status.success(), "a second login got in");
    assert!(
        gw.log()
            .contains("login refused: the gateway is full: 1 connection(s) logged in"),
        "{}",
        gw.log()
    );

    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(15), || gw
            .run(0, "true")
            .status
            .success()),
        "the place was not freed"
    );
}
