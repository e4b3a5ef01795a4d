//! What one client may make the gateway hold, and what a client's strings may do to its log
//! (the findings of the security review, issue #15): `env` per channel, connections per
//! user, sessions and `-R` listeners per connection, starts cancelled with their channel,
//! control characters in the text log, and where `-R` listens inside the container.

mod common;

use std::process::Stdio;
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
    // A login name with a newline (refused: not a valid name) and one with an escape.
    for name in [format!("zz\n{forged}"), "zz\u{1b}[2J\rboo".to_owned()] {
        let out = gw
            .ssh_as(&name, &gw.keys[0].private)
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
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
