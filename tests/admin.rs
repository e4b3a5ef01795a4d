//! Operations with the real gateway, Docker Engine and OpenSSH client: the admin CLI over
//! the admin socket (status, kick, stop), `/metrics` and `/healthz`, the audit log, idle stop,
//! the login banner and ending sessions when a key is removed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Gateway, docker_inspect, eventually};

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ssh -N -L port:localhost:1`: a connection with no channel open, as a Jupyter tunnel is
/// between page loads.
fn tunnel(gw: &Gateway, i: usize) -> Child {
    gw.ssh(i)
        .args(["-N", "-L", &format!("{}:localhost:1", free_port())])
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn state(name: &str) -> String {
    docker_inspect(name, "{{.State.Status}}").unwrap_or_default()
}

fn status_json(gw: &Gateway) -> serde_json::Value {
    let out = gw.labgate(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn connections_of(gw: &Gateway, user: &str) -> usize {
    status_json(gw)["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["user"] == user)
        .count()
}

fn exited_within(child: &mut Child, timeout: Duration) -> bool {
    eventually(timeout, || child.try_wait().unwrap().is_some())
}

fn fingerprint(gw: &Gateway, i: usize) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(gw.keys[i].private.with_extension("pub"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned()
}

#[test]
fn status_kick_and_stop_through_the_admin_socket() {
    let gw = Gateway::start(2, "", "");
    let alice = gw.users[0].clone();
    let socket = gw.dir.path().join("admin.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket must be owner-only");

    gw.ok(1, "true");
    let mut t = tunnel(&gw, 0);
    assert!(
        eventually(Duration::from_secs(20), || connections_of(&gw, &alice) == 1),
        "alice's tunnel never showed up in status"
    );
    // The tunnel alone does not start a container; a command does.
    gw.ok(0, "true");

    let out = gw.labgate(&["status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let alice_row = text
        .lines()
        .find(|l| l.starts_with(&gw.container(0)))
        .unwrap_or_else(|| panic!("no row for alice's container:\n{text}"));
    assert!(alice_row.contains("running"), "{alice_row}");
    assert!(alice_row.contains(common::IMAGE), "{alice_row}");
    let conn_row = text
        .lines()
        .find(|l| l.contains(&alice) && l.contains("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no connection row for alice:\n{text}"));
    assert!(conn_row.contains(&fingerprint(&gw, 0)), "{conn_row}");

    // Kick: alice's tunnel ends, her container keeps running, bob is untouched.
    let out = gw.labgate(&["kick", &alice]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 connection(s) ended"));
    assert!(
        exited_within(&mut t, Duration::from_secs(10)),
        "the kicked tunnel is still up"
    );
    assert_eq!(state(&gw.container(0)), "running");

    // Stop: the container stops (kept, with its home); the next login starts it again.
    gw.ok(0, "echo kept > ~/file");
    let out = gw.labgate(&["stop", &alice]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&gw.container(0)),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(state(&gw.container(0)), "exited");
    assert_eq!(state(&gw.container(1)), "running");
    assert_eq!(gw.ok(0, "cat ~/file"), "kept\n");

    // A user name that is not one is refused with the reason.
    let out = gw.labgate(&["kick", "Not/AUser"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("400"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No gateway on the socket: a clear error, not a hang.
    gw.stop();
    let out = gw.labgate(&["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the gateway's admin socket"),
        "{err}"
    );
}

/// The value of the sample `name` (exact, labels included) in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn metrics_healthz_and_audit_log() {
    let gw = Gateway::start(1, "", "");
    let user = gw.users[0].clone();

    // A refused login (a key that is not hers) and an accepted one.
    let stranger = common::keygen(gw.dir.path(), "stranger");
    let out = gw
        .ssh_as(&user, &stranger.private)
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    gw.ok(0, "true");

    // A forward that carries bytes back: a one-shot server in the container.
    gw.ok(
        0,
        "setsid sh -c '(echo hello-metrics; sleep 5) | nc -l -p 7001' >/dev/null 2>&1 < /dev/null &",
    );
    let mut got = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            let out = gw
                .ssh(0)
                .args(["-W", "127.0.0.1:7001"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            got = String::from_utf8_lossy(&out.stdout).into_owned();
            got.contains("hello-metrics")
        }),
        "forward never answered: {got:?}"
    );

    // A reload that applies and one that is rejected.
    let config = gw.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n# touched\n")).unwrap();
    assert!(eventually(Duration::from_secs(10), || gw
        .log()
        .contains("config reloaded")));
    std::fs::write(&config, format!("{text}\n[defaults.broken\n")).unwrap();
    assert!(eventually(Duration::from_secs(10), || gw
        .log()
        .contains("config not reloaded")));
    std::fs::write(&config, &text).unwrap();

    let (code, page) = gw.http_get("/metrics");
    assert_eq!(code, 200, "{page}");
    assert!(sample(&page, "labgate_logins_total{result=\"accepted\"}").unwrap() >= 2.0);
    assert!(sample(&page, "labgate_logins_total{result=\"refused\"}").unwrap() >= 1.0);
    assert_eq!(
        sample(&page, "labgate_container_create_seconds_count"),
        Some(1.0)
    );
    assert!(
        sample(
            &page,
            "labgate_forwarded_bytes_total{direction=\"to_client\"}"
        )
        .unwrap()
            >= "hello-metrics\n".len() as f64,
        "{page}"
    );
    assert!(sample(&page, "labgate_reloads_total{result=\"applied\"}").unwrap() >= 1.0);
    assert_eq!(
        sample(&page, "labgate_reloads_total{result=\"rejected\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&page, "labgate_sessions"), Some(0.0), "{page}");
    assert_eq!(sample(&page, "labgate_forwards"), Some(0.0), "{page}");

    let (code, body) = gw.http_get("/healthz");
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["docker"], "ok");
    // The loopback port only reads: the admin API is on the socket.
    let (code, _) = gw.http_get("/status");
    assert_eq!(code, 404);

    let audit = gw.audit();
    let find = |event: &str| {
        audit
            .iter()
            .find(|l| l["event"] == event)
            .unwrap_or_else(|| panic!("no {event:?} in the audit log: {audit:#?}"))
    };
    let accepted = find("login accepted");
    assert_eq!(accepted["user"], user.as_str());
    assert_eq!(accepted["fingerprint"], fingerprint(&gw, 0).as_str());
    assert!(accepted["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let refused = find("login refused");
    assert_eq!(refused["user"], user.as_str());
    assert_eq!(refused["reason"], "key not authorized for this user");
    assert_eq!(
        find("container created")["container"],
        gw.container(0).as_str()
    );
    let forward = find("forward opened");
    assert_eq!(forward["host"], "127.0.0.1");
    assert_eq!(forward["port"], 7001);
    find("config reloaded");
    find("config reload rejected");
    for line in &audit {
        assert!(
            line["ts"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }
}

#[test]
fn idle_stop_spares_open_connections_and_stops_the_rest() {
    let gw = Gateway::start(2, "idle_stop = \"3s\"", "");
    gw.ok(0, "echo kept > ~/file");
    gw.ok(1, "true");
    // Bob keeps a tunnel open with no channel: his container is in use.
    let mut t = tunnel(&gw, 1);
    assert!(eventually(Duration::from_secs(20), || connections_of(
        &gw,
        &gw.users[1]
    ) == 1));

    assert!(
        eventually(Duration::from_secs(30), || state(&gw.container(0))
            == "exited"),
        "alice's idle container was not stopped; log:\n{}",
        gw.log()
    );
    // Well past the idle period, bob's is still up.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(state(&gw.container(1)), "running");
    let status = status_json(&gw);
    let bob_row = status["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == gw.container(1).as_str())
        .unwrap()
        .clone();
    assert_eq!(bob_row["idle_stop_secs"], 3);
    assert!(bob_row["idle_secs"].is_null(), "{bob_row}");

    // Alice's home is kept; her next login starts the container again.
    assert_eq!(gw.ok(0, "cat ~/file"), "kept\n");

    // Bob's tunnel closes: now his container stops too.
    t.kill().unwrap();
    t.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || state(&gw.container(1))
            == "exited"),
        "bob's container was not stopped after his tunnel closed"
    );
    let stops = gw
        .audit()
        .into_iter()
        .filter(|l| l["event"] == "container stopped: idle")
        .count();
    assert!(stops >= 2, "{:#?}", gw.audit());
}

#[test]
fn interactive_logins_get_the_status_line_and_motd_commands_do_not() {
    let gw = Gateway::start_with_server(
        1,
        "motd = \"Welcome to the lab.\\nGPUs are shared: be kind.\"",
        "idle_stop = \"2h\"",
        "",
    );
    let out = gw
        .ssh(0)
        .arg("-tt")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"exit\n")?;
            c.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text
        .lines()
        .find(|l| l.starts_with("labgate: container"))
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    assert!(status.contains(&gw.container(0)), "{status}");
    assert!(status.contains("(created)"), "{status}");
    assert!(
        status.contains(&format!("image {}", common::IMAGE)),
        "{status}"
    );
    assert!(status.contains("0.5 CPUs"), "{status}");
    assert!(status.contains("no GPUs"), "{status}");
    assert!(status.contains("stopped after 2h"), "{status}");
    assert!(
        text.contains("Welcome to the lab.\r\nGPUs are shared: be kind.\r\n"),
        "{text:?}"
    );

    // Scripted use stays byte-exact.
    assert_eq!(gw.ok(0, "echo hi"), "hi\n");
}

#[test]
fn removing_a_key_ends_its_sessions_when_configured() {
    let gw = Gateway::start_with_server(1, "end_sessions_on_key_removal = true", "", "");
    gw.ok(0, "true");
    let mut t = tunnel(&gw, 0);
    assert!(eventually(Duration::from_secs(20), || connections_of(
        &gw,
        &gw.users[0]
    ) == 1));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        t.try_wait().unwrap().is_none(),
        "ended while the key was there"
    );

    std::fs::remove_file(gw.dir.path().join(format!("keys/{}.pub", gw.users[0]))).unwrap();
    assert!(
        exited_within(&mut t, Duration::from_secs(15)),
        "the session outlived its key"
    );
    let ended = gw.audit().into_iter().any(|l| {
        l["event"] == "connection ended: key removed" && l["user"] == gw.users[0].as_str()
    });
    assert!(ended, "{:#?}", gw.audit());
    assert!(!gw.run(0, "true").status.success());
}
