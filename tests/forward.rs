//! Port forwarding into the user's container with the real OpenSSH client: `-L`, `-W`, `-D`,
//! unix sockets, `-R`, what must be refused, and no head-of-line blocking.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, Terminal, Tunnel, docker_inspect, eventually, gateway_ip};

/// Starts busybox httpd on the container's loopback only, serving `~/www`.
fn serve_http(gw: &Gateway, i: usize, port: u16) {
    gw.ok(
        i,
        &format!(
            "mkdir -p ~/www && echo hello-from-$(hostname) > ~/www/hello.txt && httpd -p 127.0.0.1:{port} -h ~/www"
        ),
    );
}

/// `ssh -W host:port`: stdin/stdout joined to a direct-tcpip channel.
fn via_w(gw: &Gateway, i: usize, target: &str, input: &[u8]) -> std::process::Output {
    let mut child = gw
        .ssh_info(i)
        .args(["-W", target])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn http_get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").into_bytes()
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn w_and_l_reach_a_service_bound_to_the_containers_loopback() {
    let gw = Gateway::start(1, "", "");
    serve_http(&gw, 0, 8000);
    let expected = format!("hello-from-{}", gw.container(0));
    for target in ["localhost:8000", "127.0.0.1:8000"] {
        let out = via_w(&gw, 0, target, &http_get("/hello.txt"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&expected),
            "{target}: {text} / {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tunnel = Tunnel::open(&gw, 0, |p| {
        vec!["-L".into(), format!("127.0.0.1:{p}:localhost:8000")]
    });
    let out = curl(&[&format!("http://127.0.0.1:{}/hello.txt", tunnel.port)]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    // No host port was published for any of this.
    assert_eq!(
        docker_inspect(&gw.container(0), "{{len .NetworkSettings.Ports}}").unwrap(),
        "0"
    );
}

#[test]
fn socks_d_resolves_localhost_inside_the_container_and_serves_parallel_requests() {
    let gw = Gateway::start(1, "", "");
    serve_http(&gw, 0, 8000);
    let expected = format!("hello-from-{}", gw.container(0));
    let tunnel = Tunnel::open(&gw, 0, |p| vec!["-D".into(), format!("127.0.0.1:{p}")]);
    let proxy = format!("127.0.0.1:{}", tunnel.port);
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let proxy = proxy.clone();
            std::thread::spawn(move || {
                curl(&[
                    "--socks5-hostname",
                    &proxy,
                    "http://localhost:8000/hello.txt",
                ])
            })
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn sixty_four_mib_pass_byte_exact_both_ways() {
    let gw = Gateway::start(1, "", "");
    gw.ok(0, "mkdir -p ~/www && head -c 67108864 /dev/urandom > ~/www/big && httpd -p 127.0.0.1:8001 -h ~/www");
    let inside = gw.ok(0, "sha256sum ~/www/big | cut -d' ' -f1");
    let out = via_w(&gw, 0, "localhost:8001", &http_get("/big"));
    let body_at = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap()
        + 4;
    let body = &out.stdout[body_at..];
    assert_eq!(body.len(), 64 << 20);
    let mut sha = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sha.stdin.take().unwrap().write_all(body).unwrap();
    let got = String::from_utf8(sha.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(got.split_whitespace().next(), Some(inside.trim()));

    // Upload: 64 MiB into `nc -l` inside, checked there.
    let data: Vec<u8> = (0..(64u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    // busybox nc quits when its stdin ends, so feed it one that never does.
    let mut listener = gw
        .ssh(0)
        .arg("sleep 600 | nc -l -p 8002 > ~/up.bin")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || gw
        .run(0, "netstat -ltn | grep -q ':8002 '")
        .status
        .success()));
    let out = via_w(&gw, 0, "127.0.0.1:8002", &data);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(Duration::from_secs(30), || gw
            .ok(0, "wc -c < ~/up.bin")
            .trim()
            == (64u32 << 20).to_string()),
        "upload incomplete: {}",
        gw.ok(0, "wc -c < ~/up.bin")
    );
    let _ = listener.kill();
    let _ = listener.wait();
    let mut sha = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sha.stdin.take().unwrap().write_all(&data).unwrap();
    let local = String::from_utf8(sha.wait_with_output().unwrap().stdout).unwrap();
    let remote = gw.ok(0, "sha256sum ~/up.bin | cut -d' ' -f1");
    assert_eq!(local.split_whitespace().next(), Some(remote.trim()));
}

#[test]
fn a_closed_port_is_a_clean_connect_failure() {
    let gw = Gateway::start(1, "", "");
    let out = via_w(&gw, 0, "localhost:9", b"");
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open failed: connect failed"), "{err}");
}

#[test]
fn a_forward_only_connection_starts_the_container() {
    let gw = Gateway::start(1, "", "");
    assert!(docker_inspect(&gw.container(0), "{{.Id}}").is_none());
    let out = via_w(&gw, 0, "localhost:9", b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("connect failed"));
    assert_eq!(
        docker_inspect(&gw.container(0), "{{.State.Running}}").unwrap(),
        "true"
    );
}

/// A one-shot TCP server on the host that answers `pong`.
fn host_pong_server(bind: &str) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind(bind).unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let h = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok((mut s, _)) = listener.accept() {
                let _ = s.set_nonblocking(false);
                let _ = s.write_all(b"pong-from-host\n");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (port, h)
}

#[test]
fn forwards_never_reach_the_host_or_another_users_container() {
    let gw = Gateway::start(2, "", "");
    serve_http(&gw, 1, 8000);
    gw.ok(0, "true");
    let other_ip = docker_inspect(
        &gw.container(1),
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    )
    .unwrap();
    let (host_port, _srv) = host_pong_server("0.0.0.0:0");
    let gw_ip = gateway_ip("labgate");
    let refused = |target: String| {
        let out = via_w(&gw, 0, &target, &http_get("/hello.txt"));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(255), "{target} must be refused");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("hello-from")
                && !String::from_utf8_lossy(&out.stdout).contains("pong"),
            "{target} leaked"
        );
        err
    };
    // The other user's container by bridge IP and by name.
    assert!(refused(format!("{other_ip}:8000")).contains("administratively prohibited"));
    assert!(refused(format!("{}:8000", gw.container(1))).contains("open failed"));
    // The host, through the network's gateway address and docker0.
    assert!(refused(format!("{gw_ip}:{host_port}")).contains("administratively prohibited"));
    // docker0's address: the default bridge's inspect often leaves Gateway empty.
    let docker0 = String::from_utf8_lossy(
        &Command::new("sh")
            .args([
                "-c",
                "ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1",
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_owned();
    assert!(!docker0.is_empty(), "docker0 has an address");
    assert!(refused(format!("{docker0}:{host_port}")).contains("administratively prohibited"));
    // 127.0.0.1 is the container's loopback, never the host's.
    let out = via_w(&gw, 0, &format!("127.0.0.1:{host_port}"), b"");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("pong-from-host"));
    // And not just forwards: the containers cannot reach each other at all.
    let direct = gw.run(
        0,
        &format!("wget -q -T 3 -O - http://{other_ip}:8000/hello.txt"),
    );
    assert!(
        !direct.status.success(),
        "inter-container traffic must be off"
    );
}

#[test]
fn the_admin_can_allow_a_target_outside_the_container() {
    let (host_port, _srv) = host_pong_server("0.0.0.0:0");
    // Create the network first so its gateway address is known for the config.
    let probe = Gateway::start(1, "", "");
    probe.ok(0, "true");
    let gw_ip = gateway_ip("labgate");
    drop(probe);
    let gw = Gateway::start(
        2,
        "",
        &format!("[users.{{u1}}.forwarding]\nallow = [\"{gw_ip}:{host_port}\"]\n"),
    );
    let denied = via_w(&gw, 0, &format!("{gw_ip}:{host_port}"), b"");
    assert!(String::from_utf8_lossy(&denied.stderr).contains("administratively prohibited"));
    let allowed = via_w(&gw, 1, &format!("{gw_ip}:{host_port}"), b"");
    assert_eq!(String::from_utf8_lossy(&allowed.stdout), "pong-from-host\n");
}

#[test]
fn switches_and_key_options_turn_forwarding_off() {
    let gw = Gateway::start(2, "", "[users.{u1}.forwarding]\nlocal = false\n");
    serve_http(&gw, 0, 8000);
    serve_http(&gw, 1, 8000);
    let off = via_w(&gw, 1, "localhost:8000", &http_get("/hello.txt"));
    assert!(String::from_utf8_lossy(&off.stderr).contains("administratively prohibited"));
    // Key options: no-port-forwarding, then permitopen.
    let keyfile = gw.dir.path().join(format!("keys/{}.pub", gw.users[0]));
    let key = std::fs::read_to_string(&keyfile).unwrap();
    std::fs::write(&keyfile, format!("no-port-forwarding {key}")).unwrap();
    let out = via_w(&gw, 0, "localhost:8000", &http_get("/hello.txt"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("administratively prohibited"));
    std::fs::write(&keyfile, format!("permitopen=\"localhost:8000\" {key}")).unwrap();
    let ok = via_w(&gw, 0, "localhost:8000", &http_get("/hello.txt"));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("hello-from"));
    let other = via_w(&gw, 0, "127.0.0.1:8000", &http_get("/hello.txt"));
    assert!(String::from_utf8_lossy(&other.stderr).contains("administratively prohibited"));
}

#[test]
fn unix_socket_forwards_resolve_inside_the_container_only() {
    use std::os::unix::net::UnixListener;
    let gw = Gateway::start(1, "", "");
    gw.ok(0, "true");
    let home = gw.dir.path().join(format!("home/{}", gw.users[0]));
    // A socket in the home (bind-mounted, so the test can serve it from the host side).
    let sock = home.join("app.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"unix-hello\n").unwrap();
    });
    // A host-only socket the user tries to reach through symlinks.
    let host_dir = tempfile::tempdir().unwrap();
    let host_sock = host_dir.path().join("host.sock");
    let _host_listener = UnixListener::bind(&host_sock).unwrap();
    gw.ok(
        0,
        &format!(
            "ln -s /var/run/docker.sock ~/docker.sock; ln -s {} ~/host.sock; ln -s ../../../../../../var/run/docker.sock ~/dots.sock",
            host_sock.display()
        ),
    );
    let user = &gw.users[0];
    let tunnel_sock = gw.dir.path().join("local.sock");
    let tunnel = {
        let mut child = gw
            .ssh(0)
            .args(["-N", "-L"])
            .arg(format!("{}:/home/{user}/app.sock", tunnel_sock.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        assert!(eventually(Duration::from_secs(20), || tunnel_sock.exists()));
        let mut s = common::connect_unix(&tunnel_sock, Duration::from_secs(20));
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, "unix-hello\n");
        let _ = child.kill();
        child.wait().unwrap()
    };
    let _ = tunnel;
    server.join().unwrap();
    for (n, evil) in [
        "./docker.sock",
        "./host.sock",
        "./dots.sock",
        "/var/run/docker.sock",
        "../../../var/run/docker.sock",
    ]
    .into_iter()
    .enumerate()
    {
        let local = gw.dir.path().join(format!("evil-{n}.sock"));
        let _ = std::fs::remove_file(&local);
        let mut child = gw
            .ssh_info(0)
            .args(["-N", "-L"])
            .arg(format!("{}:{evil}", local.display()))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            eventually(Duration::from_secs(20), || local.exists()),
            "{evil}: no local socket"
        );
        let mut s = common::connect_unix(&local, Duration::from_secs(20));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(
            got.is_empty(),
            "{evil} reached something: {:?}",
            String::from_utf8_lossy(&got)
        );
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("open failed"),
            "{evil}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn remote_forward_listens_inside_the_container_and_goes_away_with_the_connection() {
    remote_forward_listens_and_goes_away(&Gateway::start(1, "", ""));
}

#[test]
fn remote_forward_on_the_exec_relay_path_listens_inside_the_container_too() {
    let gw = relay_gateway(1);
    remote_forward_listens_and_goes_away(&gw);
    // The relay's hand-off directory goes with it.
    assert!(eventually(Duration::from_secs(10), || !gw
        .ok(0, "ls -a /tmp")
        .contains("labgate-fwd-")));
}

/// `-R 9000:...` as user 0 reaches a server on the client's side from inside the container,
/// and the listener closes with the connection.
fn remote_forward_listens_and_goes_away(gw: &Gateway) {
    let (host_port, _srv) = host_pong_server("127.0.0.1:0");
    let mut tunnel = gw
        .ssh(0)
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
        .arg(format!("9000:127.0.0.1:{host_port}"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || gw
            .run(0, "netstat -ltn | grep -q '127.0.0.1:9000 '")
            .status
            .success()),
        "{}",
        gw.log()
    );
    // (stdin stays open until the answer is in: on the relay path a client that half-closes
    // first loses its answer, see labgate-relay.)
    assert_eq!(gw.ok(0, "sleep 2 | nc 127.0.0.1 9000"), "pong-from-host\n");
    tunnel.kill().unwrap();
    tunnel.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !gw
            .run(0, "netstat -ltn | grep -q ':9000 '")
            .status
            .success()),
        "the listener must close with the connection"
    );
}

#[test]
fn a_stalled_forward_does_not_freeze_the_shell_on_the_same_connection() {
    let gw = Gateway::start(1, "", "");
    // A target that accepts and never reads: nc's stdout is a pipe nobody drains.
    gw.ok(0, "(nc -l -p 9999 | sleep 600) >/dev/null 2>&1 & sleep 0.3");
    let mut tunnel_port = 0;
    let mut shell = None;
    for attempt in 0..20u32 {
        let port =
            20_000 + ((std::process::id().wrapping_mul(31) + attempt * 7_919) % 40_000) as u16;
        let mut cmd = gw.ssh(0);
        cmd.args(["-tt", "-o", "ExitOnForwardFailure=yes", "-L"])
            .arg(format!("127.0.0.1:{port}:localhost:9999"));
        let term = Terminal::open(&mut cmd, 24, 80);
        if eventually(Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        }) {
            tunnel_port = port;
            shell = Some(term);
            break;
        }
    }
    let mut term = shell.expect("tunnel");
    // Push 50 MB into the stalled target, in the background.
    let pusher = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", tunnel_port)).unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..50 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    // The shell on the same connection keeps answering: the typed line echoed, then the
    // command's output, each within 5 s.
    for round in 0..5 {
        let token = format!("alive-{round}-{}", std::process::id());
        term.send(&format!("echo {token}\n"));
        for _ in 0..2 {
            term.expect_within(&token, Duration::from_secs(5));
        }
    }
    drop(term);
    let _ = pusher.join();
}

/// A gateway of `users` users whose forwards always go through relay execs.
fn relay_gateway(users: usize) -> Gateway {
    Gateway::builder()
        .users(users)
        .docker("forward_via = \"exec\"\n")
        .start()
}

#[test]
fn the_exec_relay_path_reaches_the_container_and_keeps_the_same_limits() {
    let gw = relay_gateway(2);
    serve_http(&gw, 0, 8000);
    serve_http(&gw, 1, 8000);
    assert!(
        gw.log()
            .contains("forwards: path fixed by [docker] forward_via"),
        "{}",
        gw.log()
    );
    let expected = format!("hello-from-{}", gw.container(0));
    for target in ["localhost:8000", "127.0.0.1:8000"] {
        let out = via_w(&gw, 0, target, &http_get("/hello.txt"));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&expected),
            "{target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The helper is the gateway's, mounted read-only; the image ships nothing.
    gw.ok(0, "test -x /.labgate/relay");
    assert!(!gw.run(0, "echo x > /.labgate/relay").status.success());
    // Same policy: the other container and the host are refused, a closed port fails cleanly.
    let other_ip = docker_inspect(
        &gw.container(1),
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    )
    .unwrap();
    let out = via_w(&gw, 0, &format!("{other_ip}:8000"), b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("administratively prohibited"));
    let out = via_w(&gw, 0, "localhost:9", b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("connect failed"));
    // Names resolve as the container would: the other container's name resolves (Docker's
    // DNS) and is then refused by policy; the container's own name reaches itself.
    let out = via_w(&gw, 0, &format!("{}:8000", gw.container(1)), b"");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("administratively prohibited"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.ok(0, "httpd -p 0.0.0.0:8001 -h ~/www");
    let own = via_w(
        &gw,
        0,
        &format!("{}:8001", gw.container(0)),
        &http_get("/hello.txt"),
    );
    assert!(String::from_utf8_lossy(&own.stdout).contains(&expected));
    // Bulk data through the relay stays byte-exact.
    gw.ok(0, "head -c 8388608 /dev/urandom > ~/www/blob");
    let inside = gw.ok(0, "md5sum ~/www/blob | cut -d' ' -f1");
    let out = via_w(&gw, 0, "localhost:8000", &http_get("/blob"));
    let at = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap()
        + 4;
    let mut md5 = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    md5.stdin
        .take()
        .unwrap()
        .write_all(&out.stdout[at..])
        .unwrap();
    let got = String::from_utf8(md5.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(got.split_whitespace().next(), Some(inside.trim()));
    // No relay process lingers once the forwards are done.
    assert!(eventually(Duration::from_secs(10), || !gw
        .ok(0, "ps")
        .contains("/.labgate/relay")));
}

#[test]
fn the_exec_relay_path_resolves_unix_sockets_inside_the_container() {
    use std::os::unix::net::UnixListener;
    let gw = relay_gateway(1);
    gw.ok(0, "ln -s /var/run/docker.sock ~/docker.sock");
    let home = gw.dir.path().join(format!("home/{}", gw.users[0]));
    let listener = UnixListener::bind(home.join("app.sock")).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"unix-hello\n").unwrap();
    });
    for (n, (path, ok)) in [
        ("./app.sock", true),
        ("./docker.sock", false),
        ("/var/run/docker.sock", false),
    ]
    .into_iter()
    .enumerate()
    {
        let local = gw.dir.path().join(format!("relay-{n}.sock"));
        let mut child = gw
            .ssh_info(0)
            .args(["-N", "-L"])
            .arg(format!("{}:{path}", local.display()))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(eventually(Duration::from_secs(20), || local.exists()));
        let mut s = common::connect_unix(&local, Duration::from_secs(20));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        if ok {
            assert_eq!(got, "unix-hello\n");
        } else {
            assert!(got.is_empty(), "{path}");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("open failed"),
                "{path}"
            );
        }
    }
    server.join().unwrap();
}

#[test]
fn remote_and_unix_switches_refuse_those_forwards() {
    let gw = Gateway::start(
        1,
        "",
        "[users.{u0}.forwarding]\nremote = false\nunix = false\n",
    );
    let out = gw
        .ssh_info(0)
        .args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "9000:127.0.0.1:9",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("remote port forwarding failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local = gw.dir.path().join("u.sock");
    let mut child = gw
        .ssh_info(0)
        .args(["-N", "-L"])
        .arg(format!("{}:/tmp/whatever.sock", local.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || local.exists()));
    let mut s = common::connect_unix(&local, Duration::from_secs(20));
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("administratively prohibited"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        gw.log()
            .contains("remote forwarding is disabled for this user")
    );
    // The admin sees the refused unix forward under its stable code.
    let audit = std::fs::read_to_string(gw.dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.lines().any(
            |l| l.contains("unix forward refused") && l.contains("\"code\":\"forward-denied\"")
        ),
        "{audit}"
    );
}

#[test]
fn cancel_tcpip_forward_closes_the_listener_on_a_live_connection() {
    let gw = Gateway::start(1, "", "");
    let (host_port, _srv) = host_pong_server("127.0.0.1:0");
    let control = gw.dir.path().join("ctl");
    let mut master = gw
        .ssh(0)
        .args(["-N", "-M", "-S"])
        .arg(&control)
        .arg("-R")
        .arg(format!("9100:127.0.0.1:{host_port}"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let listening = |gw: &Gateway| {
        gw.run(0, "netstat -ltn | grep -q '127.0.0.1:9100 '")
            .status
            .success()
    };
    assert!(eventually(Duration::from_secs(20), || listening(&gw)));
    let cancel = gw
        .ssh(0)
        .args(["-S"])
        .arg(&control)
        .args(["-O", "cancel", "-R"])
        .arg(format!("9100:127.0.0.1:{host_port}"))
        .output()
        .unwrap();
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    assert!(
        eventually(Duration::from_secs(10), || !listening(&gw)),
        "cancel-tcpip-forward must close the listener"
    );
    assert!(
        matches!(master.try_wait(), Ok(None)),
        "the connection stays up"
    );
    let _ = master.kill();
    let _ = master.wait();
}
