//! What one client may make the gateway hold, and what a client's strings may do to its log
//! (the findings of the security review, issue #15): `env` per channel, connections per
//! user, sessions and `-R` listeners per connection, starts cancelled with their channel,
//! control characters in the text log, and where `-R` listens inside the container.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Gateway, eventually};

/// The number of lines of `needle` in the gateway's log.
fn log_count(gw: &Gateway, needle: &str) -> usize {
    gw.log().lines().filter(|l| l.contains(needle)).count()
}

/// The start of a line of the gateway's text log: `2026-12-02T10:00:00.123456Z`.
fn starts_with_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
}

#[test]
fn control_characters_from_clients_never_forge_a_log_line() {
    let gw = Gateway::start(1, "", "");
    let forged =
        "2030-01-01T00:00:00.000000Z  INFO labgate::ssh::handler: login accepted user=root";
    // A login name with a newline (refused: not a valid name) and one with an escape, sent
    // by a client that lets them through (OpenSSH's refuses to).
    let rt = tokio::runtime::Runtime::new().unwrap();
    for name in [format!("zz\n{forged}"), "zz\u{1b}[2J\rboo".to_owned()] {
        assert!(!rt.block_on(common::client::try_login_as(&gw, &name, 0)));
    }
    // A command with a newline (inside a quoted argument of `:`), from a user who logged in.
    gw.ok(0, &format!(": '\n{forged}'"));
    assert!(
        eventually(Duration::from_secs(10), || log_count(&gw, "login refused")
            >= 2),
        "{}",
        gw.log()
    );
    let log = gw.log();
    for line in log.lines() {
        assert!(
            starts_with_timestamp(line),
            "a line not made by the log: {line:?}\n{log}"
        );
        assert!(!line.starts_with("2030"), "forged: {line:?}");
        assert!(!line.contains('\u{1b}') && !line.contains('\r'), "{line:?}");
    }
    assert!(log.contains(r"zz\n2030-01-01"), "{log}");
    assert!(log.contains(r": '\n2030-01-01"), "{log}");
    // The JSON audit log keeps the name as the client sent it.
    assert!(
        gw.audit().iter().any(|e| e["user"]
            .as_str()
            .is_some_and(|u| u.starts_with("zz\n2030"))),
        "{:?}",
        gw.audit()
    );
}

/// Whether a line of `netstat -ltn` in user `i`'s container has local address `addr`.
fn listening_on(gw: &Gateway, i: usize, addr: &str) -> bool {
    gw.ok(i, "netstat -ltn")
        .lines()
        .any(|l| l.split_whitespace().nth(3) == Some(addr))
}

#[test]
fn remote_forwards_listen_on_the_container_loopback_unless_the_key_names_the_address() {
    let gw = Gateway::start(2, "", "");
    // User 0: any listener, as the client asks for it: "", "*" (also sent as ""), 0.0.0.0.
    let mut t0 = gw
        .ssh(0)
        .args(["-N", "-o", "ExitOnForwardFailure=yes"])
        .args(["-R", ":9000:localhost:1"])
        .args(["-R", "*:9001:localhost:1"])
        .args(["-R", "0.0.0.0:9002:localhost:1"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || listening_on(
            &gw,
            0,
            "127.0.0.1:9002"
        ) || listening_on(
            &gw,
            0,
            "0.0.0.0:9002"
        )),
        "{}",
        gw.log()
    );
    for port in 9000..=9002 {
        assert!(listening_on(&gw, 0, &format!("127.0.0.1:{port}")), "{port}");
        assert!(!listening_on(&gw, 0, &format!("0.0.0.0:{port}")), "{port}");
    }
    // User 1's key names 0.0.0.0:9100: that one listener binds the wildcard; a permitted
    // port without an address stays on the loopback.
    let file = gw.dir.path().join(format!("keys/{}.pub", gw.users[1]));
    std::fs::write(
        &file,
        format!(
            "permitlisten=\"0.0.0.0:9100\",permitlisten=\"9101\" {}",
            gw.keys[1].public
        ),
    )
    .unwrap();
    let mut t1 = gw
        .ssh(1)
        .args(["-N", "-o", "ExitOnForwardFailure=yes"])
        .args(["-R", "0.0.0.0:9100:localhost:1"])
        .args(["-R", ":9101:localhost:1"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || listening_on(
            &gw,
            1,
            "0.0.0.0:9100"
        )),
        "{}",
        gw.log()
    );
    assert!(listening_on(&gw, 1, "127.0.0.1:9101"));
    for t in [&mut t0, &mut t1] {
        let _ = t.kill();
        let _ = t.wait();
    }
}

#[test]
fn env_past_the_per_channel_bounds_is_refused_and_logged_once() {
    let gw = Gateway::start(1, "", "");
    // 80 small variables: the first 64 are kept, the rest refused.
    let many: Vec<String> = (1..=80).map(|i| format!("LC_X{i}=v{i}")).collect();
    let out = gw
        .ssh(0)
        .args(["-o", &format!("SetEnv={}", many.join(" "))])
        .arg("env | grep -c '^LC_X'; echo \"[$LC_X1|$LC_X64|$LC_X65|$LC_X80]\"")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}\n{}", gw.log());
    assert_eq!(stdout, "64\n[v1|v64||]\n", "{}", gw.log());
    // Two values of 40 KiB: the second does not fit in 64 KiB; a small one after it does.
    let big = "b".repeat(40 << 10);
    let out = gw
        .ssh(0)
        .args([
            "-o",
            &format!("SetEnv=LC_BIG1={big} LC_BIG2={big} LC_SMALL=s"),
        ])
        .arg("echo \"${#LC_BIG1}|${#LC_BIG2}|$LC_SMALL\"")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}|0|s\n", 40 << 10),
        "{out:?}"
    );
    // One line per channel that went past a bound, not one per refused request.
    assert_eq!(
        log_count(&gw, "env requests past 64 variables or 65536 bytes"),
        2,
        "{}",
        gw.log()
    );
}

#[test]
fn one_user_cannot_fill_max_connections_and_profiles_count_together() {
    let gw = Gateway::start_with_server(
        2,
        "max_connections = 3\nmax_connections_per_user = 2",
        "",
        "[profiles.p]\nusers = [\"{u0}\"]\n",
    );
    let u0 = gw.users[0].clone();
    // alice and alice+p hold the user's two places.
    let mut held = Vec::new();
    for login in [u0.clone(), format!("{u0}+p")] {
        held.push(
            gw.ssh_as(&login, &gw.keys[0].private)
                .arg("-N")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    assert!(
        eventually(Duration::from_secs(20), || log_count(&gw, "login accepted")
            == 2),
        "{}",
        gw.log()
    );
    let third = gw.run(0, "true");
    assert!(!third.status.success(), "a third login of the user got in");
    assert!(
        String::from_utf8_lossy(&third.stderr).contains("Permission denied"),
        "{third:?}"
    );
    assert!(
        gw.log().contains(&format!(
            "login refused: {u0} has 2 connection(s) logged in (max_connections_per_user = 2)"
        )),
        "{}",
        gw.log()
    );
    // The gateway has room for someone else.
    assert_eq!(gw.ok(1, "echo in"), "in\n");
    // A place of the user's is freed when one of her connections ends.
    let mut first = held.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(15), || gw
            .run(0, "true")
            .status
            .success()),
        "the user's place was not freed"
    );
    for mut c in held {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A ControlMaster connection of user 0 (`-N`, logging at INFO to `DIR/master.log`), and
/// its control socket.
fn control_master(gw: &Gateway) -> (Child, std::path::PathBuf, std::path::PathBuf) {
    let control = gw.dir.path().join("cm");
    let log = gw.dir.path().join("master.log");
    let master = gw
        .ssh_info(0)
        .args(["-N", "-M", "-S"])
        .arg(&control)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || control.exists()),
        "no control socket; {}",
        gw.log()
    );
    (master, control, log)
}

#[test]
fn sessions_past_max_sessions_on_one_connection_are_refused() {
    let gw = Gateway::start_with_server(1, "max_sessions = 3", "", "");
    let (mut master, control, master_log) = control_master(&gw);
    let through_master = |cmd: &str| {
        let mut c = Command::new("ssh");
        c.args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg("-S")
        .arg(&control)
        .args(["-p", "1", "127.0.0.1", cmd]);
        c
    };
    // Sessions that ended (closed by the gateway first, when their command exits) no
    // longer count: more than max_sessions of them one after the other all run.
    for _ in 0..5 {
        let out = through_master("echo once")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "once\n", "{out:?}");
    }
    // Sessions through the master; a refused one would fall back to a connection of its
    // own (OpenSSH does), so the fallback goes to a closed port and fails.
    let mut clients: Vec<Child> = (0..5)
        .map(|_| {
            through_master("echo up; sleep 30")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Two of the five are refused at once; three run.
    let mut refused = Vec::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            for c in clients.iter_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    refused.push((st, c.id()));
                }
            }
            refused.sort_by_key(|r| r.1);
            refused.dedup_by_key(|r| r.1);
            refused.len() >= 2
        }),
        "{}",
        gw.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    let mut running = 0;
    for c in clients.iter_mut() {
        match c.try_wait().unwrap() {
            Some(st) => {
                assert_eq!(st.code(), Some(255));
                let mut err = String::new();
                c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                assert!(err.contains("Session open refused by peer"), "{err}");
            }
            None => {
                let mut line = [0u8; 3];
                c.stdout.as_mut().unwrap().read_exact(&mut line).unwrap();
                assert_eq!(&line, b"up\n");
                running += 1;
            }
        }
    }
    assert_eq!(running, 3, "{}", gw.log());
    let said = std::fs::read_to_string(&master_log).unwrap();
    assert!(
        said.contains("3 session channels are open on this connection (max_sessions)"),
        "{said}"
    );
    assert_eq!(
        log_count(&gw, "session refused: 3 session channels are open"),
        2,
        "{}",
        gw.log()
    );
    for mut c in clients {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = master.kill();
    let _ = master.wait();
}

/// Open descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn remote_listeners_past_the_bound_are_refused_and_hold_no_descriptor() {
    let gw = Gateway::start(1, "", "");
    // The container runs, and the engine connection is open, before counting.
    gw.ok(0, "true");
    let before = fds(gw.pid());
    let log = gw.dir.path().join("client.log");
    let mut client = gw.ssh_info(0);
    client.arg("-N");
    // Distinct forwards (ssh drops duplicates): 0 asks for a free port each time.
    for target in 1..=100 {
        client.args(["-R", &format!("0:localhost:{target}")]);
    }
    let mut client = client
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let count = |s: &str, needle: &str| s.lines().filter(|l| l.contains(needle)).count();
    assert!(
        eventually(Duration::from_secs(60), || {
            let s = said();
            count(&s, "Allocated port") + count(&s, "remote port forwarding failed") >= 100
        }),
        "{}\n{}",
        said(),
        gw.log()
    );
    let s = said();
    assert_eq!(count(&s, "Allocated port"), 64, "{s}");
    assert_eq!(count(&s, "remote port forwarding failed"), 36, "{s}");
    let held = fds(gw.pid());
    assert!(
        held < before + 64 + 24,
        "{held} descriptors open, {before} before the 64 listeners"
    );
    // Logged once for the connection, not once per refused request.
    assert_eq!(
        log_count(&gw, "64 remote forwards are open on this connection"),
        1,
        "{}",
        gw.log()
    );
    let _ = client.kill();
    let _ = client.wait();
}
