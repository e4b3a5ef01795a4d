//! Every forward kind through the way in: what a user forwards reaches the inside of their
//! own container (its loopback, its files), and `-R` and `-A` reach back to the client.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::Way;
use crate::Gateway;
use crate::common::{Agent, DEBIAN_IMAGE, Tunnel, ensure_debian_image, eventually, stderr_of};

/// Starts busybox httpd on the container's loopback only, serving a page naming the
/// container; returns that page's text.
fn serve_on_loopback(gw: &Gateway, port: u16) -> String {
    gw.ok(
        0,
        &format!(
            "mkdir -p ~/www && echo hello-from-$(hostname) > ~/www/hello.txt && httpd -p 127.0.0.1:{port} -h ~/www"
        ),
    );
    format!("hello-from-{}", gw.container(0))
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {args:?}: {}", stderr_of(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn local_forward_reaches_a_service_on_the_containers_loopback(way: Way) {
    let gw = way.gateway(1);
    let page = serve_on_loopback(&gw, 8000);
    let tunnel = Tunnel::open(&gw, 0, |p| {
        vec!["-L".into(), format!("127.0.0.1:{p}:localhost:8000")]
    });
    let url = format!("http://127.0.0.1:{}/hello.txt", tunnel.port);
    // Several connections through the one tunnel, each its own channel.
    for _ in 0..3 {
        assert_eq!(curl(&[&url]), page);
    }
    way.assert_forwards_went_this_way(&gw);
}

pub fn local_forward_reaches_a_unix_socket_in_the_container(way: Way) {
    let gw = way.gateway(1);
    gw.ok(0, "true");
    // A socket in the home, served from the host side of its bind mount: the client names
    // it by its path inside the container, which is not its path on the host.
    let user = &gw.users[0];
    let listener = UnixListener::bind(gw.dir.path().join(format!("home/{user}/app.sock"))).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"unix-hello\n").unwrap();
    });
    let local = gw.dir.path().join("local.sock");
    let mut ssh = gw
        .ssh(0)
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("{}:/home/{user}/app.sock", local.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || local.exists()),
        "ssh made no local socket"
    );
    let mut s = UnixStream::connect(&local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    let _ = ssh.kill();
    let _ = ssh.wait();
    assert_eq!(got, "unix-hello\n", "log:\n{}", gw.log());
    server.join().unwrap();
    way.assert_forwards_went_this_way(&gw);
}

pub fn socks_resolves_names_inside_the_container(way: Way) {
    let gw = way.gateway(1);
    let page = serve_on_loopback(&gw, 8000);
    let tunnel = Tunnel::open(&gw, 0, |p| vec!["-D".into(), format!("127.0.0.1:{p}")]);
    let proxy = format!("127.0.0.1:{}", tunnel.port);
    // `localhost` and the container's own name, resolved inside it; requests in parallel.
    let own = format!("http://{}:8001/hello.txt", gw.container(0));
    gw.ok(0, "httpd -p 0.0.0.0:8001 -h ~/www");
    let handles: Vec<_> = ["http://localhost:8000/hello.txt", own.as_str()]
        .into_iter()
        .cycle()
        .take(8)
        .map(|url| {
            let (proxy, url) = (proxy.clone(), url.to_owned());
            std::thread::spawn(move || curl(&["--socks5-hostname", &proxy, &url]))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), page);
    }
    way.assert_forwards_went_this_way(&gw);
}

pub fn remote_forward_listens_inside_the_container_and_reaches_back(way: Way) {
    let gw = way.gateway(1);
    // A server on the client's side.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in server.incoming() {
            let Ok(mut s) = s else { break };
            let _ = s.write_all(b"pong-from-client\n");
        }
    });
    let mut ssh = gw
        .ssh(0)
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
        .arg(format!("9000:127.0.0.1:{host_port}"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let listening = || {
        gw.run(0, "netstat -ltn | grep -q '127.0.0.1:9000 '")
            .status
            .success()
    };
    assert!(
        eventually(Duration::from_secs(20), listening),
        "no listener on the container's 127.0.0.1:9000; log:\n{}",
        gw.log()
    );
    // (stdin stays open until the answer is in: on the relay path a client that half-closes
    // first loses its answer, see labgate-relay.)
    assert_eq!(
        gw.ok(0, "sleep 2 | nc 127.0.0.1 9000"),
        "pong-from-client\n"
    );
    ssh.kill().unwrap();
    ssh.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !listening()),
        "the listener must close with the connection"
    );
    way.assert_forwards_went_this_way(&gw);
}

pub fn agent_forwarding_lists_the_clients_keys_inside(way: Way) {
    // busybox has no ssh-add: this user gets the Debian image.
    ensure_debian_image();
    let gw = way.gateway_with(
        1,
        &format!("[users.{{u0}}]\n{}", way.image_lines(DEBIAN_IMAGE)),
    );
    let agent = Agent::start(gw.dir.path());
    let ssh = |forward: bool, cmd: &str| {
        let mut c = gw.ssh(0);
        if forward {
            c.args(["-A", "-o", "ForwardAgent=yes"]);
        }
        let out = c
            .env("SSH_AUTH_SOCK", &agent.sock)
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`{cmd}`: {}\nlog:\n{}",
            stderr_of(&out),
            gw.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = ssh(true, "ssh-add -l");
    assert!(
        listed.contains(&agent.fingerprint),
        "`ssh-add -l` inside did not list {}: {listed}",
        agent.fingerprint
    );
    assert_eq!(
        ssh(false, "echo \"${SSH_AUTH_SOCK:-unset}\"").trim(),
        "unset"
    );
    way.assert_forwards_went_this_way(&gw);
}
