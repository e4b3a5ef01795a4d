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
