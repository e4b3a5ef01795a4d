//! VS Code Remote-SSH's connection pattern, step by step, with the real OpenSSH client against
//! the Debian lab image (`labgate/debian:test`, built by `scripts/debian-image`):
//!
//! 1. `ssh -T -D PORT host bash`, no PTY, an install script on stdin that starts a detached
//!    server (`setsid nohup`, bound to the container's 127.0.0.1) and prints `listening on N`;
//! 2. the server reached through that SOCKS tunnel (direct-tcpip to the container's loopback);
//! 3. a second connection at the same time lands in the same container and finds the server;
//! 4. a file downloaded through sftp meanwhile;
//! 5. the first connection vanishes, the server survives; a reconnect finds it again.
//!
//! And `remoteServerListenOnSocket`: the server on a unix socket under the home, reached with
//! `ssh -L PORT:/home/USER/...sock` (direct-streamlocal).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::time::Duration;

use common::vscode::{Connection, INSTALL_SOCKET, INSTALL_TCP, ask, sftp, socket_forward};
use common::{Gateway, containers_named, ensure_debian_image, eventually};

/// A user table giving user 0 the Debian image and a uid:gid of its own.
const DEBIAN_USER: &str = "[users.{u0}]\nimage = \"labgate/debian:test\"\nuid = 1000\ngid = 1001\n";

#[test]
fn vscode_sequence_socks_tunnel_second_connection_and_server_surviving_a_disconnect() {
    ensure_debian_image();
    // With the relay installed (the harness does, as deployed): sftp takes its direct path.
    let gw = Gateway::start(1, "", DEBIAN_USER);

    // 1-2: install, start the detached server, reach it through -D on the remote loopback.
    let first = Connection::open(&gw, INSTALL_TCP);
    assert!(first.said.starts_with("started server "), "{}", first.said);
    let port: u16 = first
        .listening
        .parse()
        .unwrap_or_else(|_| panic!("no port in {:?}; log:\n{}", first.listening, gw.log()));
    let pid = first.server_pid();
    let home = gw.dir.path().join(format!("home/{}", gw.users[0]));
    let token = std::fs::read_to_string(home.join(".vscode-server/token.txt")).unwrap();
    assert_eq!(token.len(), 32, "{token:?}");
    for host in ["127.0.0.1", "localhost"] {
        assert_eq!(first.get(&format!("http://{host}:{port}/token.txt")), token);
    }

    // 3: a second connection while the first is open lands in the same container and finds
    // the same server process.
    let mut second = Connection::open(&gw, INSTALL_TCP);
    assert_eq!(second.said, format!("found running server {pid}"));
    assert_eq!(second.listening, port.to_string());
    assert_eq!(
        second.get(&format!("http://127.0.0.1:{port}/token.txt")),
        token
    );
    assert_eq!(containers_named(&gw.container(0)), 1);
    let ps = second.run(&format!("ps -o pid=,args= -p {pid}"));
    assert!(ps.contains("http.server"), "{ps}");

    // 4: VS Code downloads files through sftp meanwhile.
    let local = tempfile::tempdir().unwrap();
    sftp(
        &gw,
        "get .vscode-server/token.txt token.txt\n",
        local.path(),
    );
    assert_eq!(
        std::fs::read_to_string(local.path().join("token.txt")).unwrap(),
        token
    );
    assert!(gw.log().contains("on the direct path"));

    // 5: the first client vanishes; the detached server lives on and is still reachable
    // through the second connection; then that one ends cleanly, and a reconnect finds the
    // same server again.
    let first_shell = first.shell_pid.clone();
    first.vanish();
    assert!(
        eventually(Duration::from_secs(10), || {
            second
                .run(&format!(
                    "kill -0 {first_shell} 2>/dev/null && echo alive || echo gone"
                ))
                .trim()
                == "gone"
        }),
        "the first connection's bash was not hung up"
    );
    assert_eq!(
        second.get(&format!("http://127.0.0.1:{port}/token.txt")),
        token
    );
    second.close();
    let third = Connection::open(&gw, INSTALL_TCP);
    assert_eq!(third.said, format!("found running server {pid}"));
    assert_eq!(
        third.get(&format!("http://localhost:{port}/token.txt")),
        token
    );
}

#[test]
fn vscode_listen_on_socket_reaches_a_unix_socket_under_the_home_across_reconnects() {
    ensure_debian_image();
    let gw = Gateway::start(1, "", DEBIAN_USER);
    let first = Connection::open(&gw, INSTALL_SOCKET);
    let socket = first.listening.clone();
    assert_eq!(
        socket,
        format!("/home/{}/.vscode-server/server.sock", gw.users[0])
    );
    let pid = first.server_pid();
    let forward = socket_forward(&gw, &socket);
    assert_eq!(ask(forward.port, "hello"), format!("server {pid}: hello"));

    // The installing connection and the forward go away; the server stays.
    first.vanish();
    drop(forward);
    let again = Connection::open(&gw, INSTALL_SOCKET);
    assert_eq!(again.said, format!("found running server {pid}"));
    let forward = socket_forward(&gw, &socket);
    assert_eq!(ask(forward.port, "again"), format!("server {pid}: again"));
    drop(forward);
}
