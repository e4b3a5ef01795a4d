//! Agent forwarding (`ssh -A`) with the real OpenSSH client, a real `ssh-agent` on the host
//! and `ssh-add` inside the Debian image (`labgate/debian:test`, built by
//! `scripts/debian-image`): the forwarded agent lists the host agent's key; the socket is the
//! user's own, private, and gone when the connection closes; no `-A`, no socket; a key with
//! `no-agent-forwarding` gets none either.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Agent, Gateway, ensure_debian_image, eventually};

/// A user table giving user 0 the Debian image and a uid:gid of its own.
const DEBIAN_USER: &str = "[users.{u0}]\nimage = \"labgate/debian:test\"\nuid = 1000\ngid = 1001\n";

/// `ssh` for user 0, with the agent in its environment and `-A` when `forward`.
fn ssh(gw: &Gateway, agent: &Agent, forward: bool, cmd: &str) -> std::process::Output {
    let mut c = gw.ssh(0);
    if forward {
        c.args(["-A", "-o", "ForwardAgent=yes"]);
    }
    c.env("SSH_AUTH_SOCK", &agent.sock)
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout_ok(out: &std::process::Output, what: &str, gw: &Gateway) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {:?}\nstdout: {}\nstderr: {}\ngateway log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn agent_forwarding_reaches_the_host_agent_and_goes_away_with_the_connection() {
    ensure_debian_image();
    let gw = Gateway::start(1, "", DEBIAN_USER);
    let agent = Agent::start(gw.dir.path());

    // With -A: the forwarded agent lists the host agent's key; the socket is the user's.
    let out = ssh(
        &gw,
        &agent,
        true,
        "ssh-add -l; stat -c '%a %u:%g' \"$SSH_AUTH_SOCK\" \"$(dirname \"$SSH_AUTH_SOCK\")\"; echo \"$SSH_AUTH_SOCK\"",
    );
    let text = stdout_ok(&out, "ssh -A", &gw);
    assert!(
        text.contains(&agent.fingerprint),
        "`ssh-add -l` inside did not list {}: {text}",
        agent.fingerprint
    );
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len();
    assert!(n >= 4, "{text}");
    assert_eq!(lines[n - 3], "600 1000:1001", "socket mode/owner: {text}");
    assert_eq!(
        lines[n - 2],
        "700 1000:1001",
        "directory mode/owner: {text}"
    );
    assert!(
        lines[n - 1].starts_with("/tmp/labgate-agent-") && lines[n - 1].ends_with("/agent.sock"),
        "{text}"
    );

    // Without -A: no socket is offered. Once the -A connection is gone, its directory is too.
    let text = stdout_ok(
        &ssh(&gw, &agent, false, "echo \"${SSH_AUTH_SOCK:-unset}\""),
        "ssh",
        &gw,
    );
    assert_eq!(text.trim(), "unset");
    assert!(
        eventually(Duration::from_secs(10), || {
            !ssh(&gw, &agent, false, "ls -d /tmp/labgate-agent-*")
                .status
                .success()
        }),
        "the agent socket directory outlived its connection"
    );

    // A key with no-agent-forwarding gets no socket, even with -A.
    let keyfile = gw.dir.path().join(format!("keys/{}.pub", gw.users[0]));
    std::fs::write(
        &keyfile,
        format!("no-agent-forwarding {}", gw.keys[0].public),
    )
    .unwrap();
    let text = stdout_ok(
        &ssh(
            &gw,
            &agent,
            true,
            "echo \"${SSH_AUTH_SOCK:-unset}\"; ls -d /tmp/labgate-agent-* 2>/dev/null | wc -l",
        ),
        "ssh -A (no-agent-forwarding)",
        &gw,
    );
    assert_eq!(text.split_whitespace().collect::<Vec<_>>(), ["unset", "0"]);
}

#[test]
fn agent_forwarding_works_on_the_relay_path_too() {
    ensure_debian_image();
    let gw = Gateway::builder()
        .docker("forward_via = \"exec\"\n")
        .tail(DEBIAN_USER)
        .start();
    let agent = Agent::start(gw.dir.path());

    // Several agent connections in one session (each is handed over on its own), concurrent
    // ones included; the socket and its directory are the user's and private.
    let out = ssh(
        &gw,
        &agent,
        true,
        "ssh-add -l; ssh-add -l & ssh-add -l; wait; \
         stat -c '%a %u:%g' \"$SSH_AUTH_SOCK\" \"$(dirname \"$SSH_AUTH_SOCK\")\"",
    );
    let text = stdout_ok(&out, "ssh -A (relay path)", &gw);
    assert_eq!(
        text.matches(&agent.fingerprint).count(),
        3,
        "every `ssh-add -l` inside listed {}: {text}",
        agent.fingerprint
    );
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len();
    assert_eq!(lines[n - 2..], ["600 1000:1001", "700 1000:1001"], "{text}");
    assert!(
        gw.log()
            .contains("forwards: path fixed by [docker] forward_via"),
        "{}",
        gw.log()
    );

    // Gone with the connection: the directory, and the relay processes.
    assert!(
        eventually(Duration::from_secs(15), || {
            ssh(&gw, &agent, false, "ls -d /tmp/labgate-agent-* 2>/dev/null; ps -e -o args= | grep -c '^/.labgate/relay' || true")
                .stdout
                == b"0\n"
        }),
        "the agent socket directory or its relay outlived the connection"
    );
}
