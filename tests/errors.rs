//! What users and admins see when something goes wrong: a missing image, an unreachable Docker
//! daemon, a quota Docker refuses, an image that cannot start, `labgate check` on broken
//! configs and key files, a container killed under a session, and a client that leaves while
//! its container is being made. Real `ssh`, the real gateway binary, the real Docker Engine.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::{
    Gateway, assert_alive, containers_named, docker_inspect, eventually, pids_of, stderr_of,
};

/// A valid ed25519 public key line (not tied to any private key the tests use).
const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHn7MrEI7ZE5jvoV0hWr8ya2DvjoZH2sGUTMv7Ur2DPt";

/// Asserts the login failed before the command ran, as the gateway reports it: exit status
/// 255 and a `labgate: ...` line containing `needle` on stderr, nothing on stdout.
fn assert_refused_with(gw: &Gateway, out: &Output, needle: &str) {
    let err = stderr_of(out);
    assert_eq!(
        out.status.code(),
        Some(255),
        "exit status; stderr: {err}\ngateway log:\n{}",
        gw.log()
    );
    assert!(
        err.contains("labgate: ") && err.contains(needle),
        "stderr should contain `labgate: ...{needle}...`, got: {err:?}\ngateway log:\n{}",
        gw.log()
    );
    assert!(
        out.stdout.is_empty(),
        "the command must not have run: stdout {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// ---------------------------------------------------------------------------------------------
// Container errors seen over SSH.

#[test]
fn missing_image_is_reported_clearly_and_others_still_log_in() {
    let gw = Gateway::start(
        2,
        "",
        "[users.{u1}]\nimage = \"labgate/does-not-exist:1\"\npull_policy = \"never\"\n",
    );
    let out = gw.run(1, "echo should-not-run");
    assert_refused_with(
        &gw,
        &out,
        "image labgate/does-not-exist:1 is not on this host and pull_policy is \"never\"; ask your admin",
    );
    assert_eq!(
        containers_named(&gw.container(1)),
        0,
        "no container is left behind for a missing image"
    );
    // The gateway stays up and serves other users.
    assert_eq!(gw.ok(0, "echo fine"), "fine\n");
    // And the same user gets the same clear message again (nothing cached in a bad state).
    let again = gw.run(1, "true");
    assert_refused_with(
        &gw,
        &again,
        "image labgate/does-not-exist:1 is not on this host",
    );
    assert_eq!(containers_named(&gw.container(1)), 0);
}

/// A unix socket file nobody listens on, as a stopped daemon leaves behind: connecting to it
/// is refused.
fn stale_socket(path: &Path) {
    drop(UnixListener::bind(path).unwrap());
    assert!(path.exists());
}

/// Forwards every connection to `path` to the real Docker socket, in both directions with
/// half-closes (exec streams need them), from a background thread: the daemon is "back".
fn serve_docker_at(path: &Path) {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { return };
            let Ok(upstream) = UnixStream::connect("/var/run/docker.sock") else {
                continue;
            };
            let pipe = |mut from: UnixStream, mut to: UnixStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            };
            pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
            pipe(upstream, client);
        }
    });
}

#[test]
fn unreachable_docker_daemon_is_reported_and_the_gateway_stays_up() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("docker.sock");
    stale_socket(&sock);
    let gw = Gateway::start(
        1,
        "",
        &format!("[docker]\nsocket = \"{}\"\n", sock.display()),
    );
    let first = gw.run(0, "echo should-not-run");
    assert_refused_with(&gw, &first, "container engine is not reachable");
    assert!(
        stderr_of(&first).contains("please tell your admin"),
        "{}",
        stderr_of(&first)
    );
    assert_alive(&gw);
    // A second login is answered with the same clear error, not a connection failure.
    let second = gw.run(0, "true");
    assert_refused_with(&gw, &second, "container engine is not reachable");
    assert_alive(&gw);
    assert_eq!(containers_named(&gw.container(0)), 0);
    // The admin reads the stable code and what it means, in the log and the audit log.
    let log = gw.log();
    assert!(log.contains("session start failed"), "{log}");
    assert!(log.contains("engine-unavailable"), "{log}");
    assert!(log.contains("is dockerd running"), "{log}");
    let audit = std::fs::read_to_string(gw.dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"code\":\"engine-unavailable\""), "{audit}");
    let (_, metrics) = gw.http_get("/metrics");
    assert!(
        metrics.contains("labgate_user_errors_total{code=\"engine-unavailable\"} 2"),
        "{metrics}"
    );
}

#[test]
fn logins_work_again_once_the_docker_daemon_is_back() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("docker.sock");
    stale_socket(&sock);
    let gw = Gateway::start(
        1,
        "",
        &format!("[docker]\nsocket = \"{}\"\n", sock.display()),
    );
    let down = gw.run(0, "true");
    assert_refused_with(&gw, &down, "container engine is not reachable");
    serve_docker_at(&sock);
    // No gateway restart: the next login reaches the engine.
    assert_eq!(gw.ok(0, "echo back"), "back\n");
    assert_eq!(
        docker_inspect(&gw.container(0), "{{.State.Running}}").unwrap(),
        "true"
    );
}

#[test]
fn the_gateway_starts_and_explains_while_the_docker_socket_is_missing() {
    // A daemon that is down usually removes its socket. The gateway should still start (the
    // Docker backend connects lazily) and tell users what is wrong, rather than refuse to run.
    let gw = Gateway::start(1, "", "[docker]\nsocket = \"/nonexistent/docker.sock\"\n");
    let out = gw.run(0, "echo should-not-run");
    assert_refused_with(&gw, &out, "container engine is not reachable");
    assert_alive(&gw);
}

#[test]
fn a_quota_docker_refuses_is_reported_with_dockers_reason() {
    let gw = Gateway::start(2, "", "[users.{u1}]\ncpus = 64\n");
    let out = gw.run(1, "echo should-not-run");
    assert_refused_with(&gw, &out, "your container could not be created: ");
    // Docker's own reason is passed on ("Range of CPUs is from 0.01 to N.00, as there are
    // only N CPUs available").
    let err = stderr_of(&out);
    eprintln!("cpus = 64: {}", err.trim_end());
    assert!(err.contains("CPUs"), "Docker's reason must be shown: {err}");
    assert_eq!(containers_named(&gw.container(1)), 0);
    assert_eq!(gw.ok(0, "echo fine"), "fine\n");
}

const NOSHELL_IMAGE: &str = "labgate-test/noshell:1";
static NOSHELL_ONCE: Once = Once::new();

/// Builds an image without `/bin/sh` (one plain file from scratch).
fn ensure_noshell_image() {
    NOSHELL_ONCE.call_once(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello"), "hello\n").unwrap();
        std::fs::write(
            dir.path().join("Dockerfile"),
            "FROM scratch\nCOPY hello /hello\n",
        )
        .unwrap();
        let out = Command::new("docker")
            .args(["build", "-q", "-t", NOSHELL_IMAGE])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker build: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

#[test]
fn a_container_that_cannot_start_is_reported_and_others_still_log_in() {
    ensure_noshell_image();
    let gw = Gateway::start(
        2,
        "",
        &format!("[users.{{u1}}]\nimage = \"{NOSHELL_IMAGE}\"\n"),
    );
    let out = gw.run(1, "echo should-not-run");
    assert_refused_with(&gw, &out, "your container failed to start: ");
    eprintln!("no shell: {}", stderr_of(&out).trim_end());
    assert_eq!(gw.ok(0, "echo fine"), "fine\n");
    // The message must not depend on timing: whether the container dies before or after the
    // gateway looks at it, on a first login (created) or a later one (the stopped container is
    // started again), the user is told their container failed to start.
    for attempt in 0..8 {
        if attempt % 2 == 0 {
            let _ = Command::new("docker")
                .args(["rm", "-f", &gw.container(1)])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let again = gw.run(1, "true");
        assert_refused_with(&gw, &again, "your container failed to start: ");
    }
    assert_eq!(gw.ok(0, "echo still-fine"), "still-fine\n");
    assert_alive(&gw);
}

// ---------------------------------------------------------------------------------------------
// `labgate check`.

fn check(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["check", "--config"])
        .arg(config)
        .env("LABGATE_LOG", "warn")
        .output()
        .unwrap()
}

/// A directory with `labgate.toml` (text as given), an empty `keys/` and the two helpers
/// [`VALID`] names in `helpers/`.
fn check_dir(config: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::create_dir_all(dir.path().join("helpers")).unwrap();
    for helper in ["labgate-relay", "labgate-sftp"] {
        std::fs::write(dir.path().join("helpers").join(helper), "#!/bin/sh\n").unwrap();
    }
    let path = dir.path().join("labgate.toml");
    std::fs::write(&path, config).unwrap();
    (dir, path)
}

const VALID: &str = "[server]\nlisten = \"127.0.0.1:0\"\nkeys_dir = \"keys\"\n\n[docker]\nrelay_helper = \"helpers/labgate-relay\"\nsftp_helper = \"helpers/labgate-sftp\"\n\n[defaults]\nimage = \"labgate/busybox\"\nmemory = \"256M\"\ncpus = 0.5\n";

#[test]
fn check_names_the_helpers_it_found_and_what_is_lost_without_one() {
    let (dir, path) = check_dir(&VALID.replace("helpers/labgate-sftp", "absent/labgate-sftp"));
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = stderr_of(&out);
    // Degraded, not broken: the gateway runs without a helper.
    assert_eq!(out.status.code(), Some(0), "{err}");
    let relay = dir.path().join("helpers/labgate-relay");
    assert!(
        stdout.contains(&format!(
            "helper labgate-relay: {} (configured)",
            relay.display()
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("helper labgate-sftp"), "{stdout}");
    assert!(
        err.contains("[docker] sftp_helper = ")
            && err.contains("absent/labgate-sftp\" does not exist")
            && err.contains("images without their own sftp-server get no sftp"),
        "{err}"
    );
    assert!(!err.contains("labgate-relay"), "{err}");

    // A dynamically linked helper (what a plain `cargo build` makes) runs only in some images.
    let exe = env!("CARGO_BIN_EXE_labgate");
    let (_dir, path) = check_dir(&VALID.replace("helpers/labgate-relay", exe));
    let out = check(&path);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("helper {exe} is dynamically linked"))
            && err.contains("no direct path"),
        "{err}"
    );
}

#[test]
fn check_accepts_a_valid_config_and_keys() {
    let (dir, path) = check_dir(VALID);
    std::fs::write(
        dir.path().join("keys/alice.pub"),
        format!("{ED} alice@laptop\n"),
    )
    .unwrap();
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr_of(&out));
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(stdout.contains("1 user(s)"), "{stdout}");
    assert!(stdout.contains(&path.display().to_string()), "{stdout}");
    assert!(
        stderr_of(&out).is_empty(),
        "no problems printed: {}",
        stderr_of(&out)
    );
}

#[test]
fn check_reports_an_unknown_field_with_line_and_column() {
    // Line 5 is `imagee = ...` inside [defaults]; the `image` line keeps the config otherwise
    // complete.
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n\n[defaults]\nimagee = \"x\"\nimage = \"labgate/busybox\"\n";
    let (_dir, path) = check_dir(text);
    let out = check(&path);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{}:5:1: ", path.display())),
        "expected `{}:5:1: ...`, got: {err}",
        path.display()
    );
    assert!(err.contains("imagee"), "the unknown field is named: {err}");
    assert!(out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn check_reports_a_bad_size_with_line_and_column() {
    let text = "[defaults]\nimage = \"labgate/busybox\"\nmemory = \"12Q\"\n";
    let (_dir, path) = check_dir(text);
    let out = check(&path);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // The value starts at line 3, column 10.
    assert!(
        err.starts_with(&format!("{}:3:10: ", path.display())),
        "expected `{}:3:10: ...`, got: {err}",
        path.display()
    );
    assert!(err.contains("12Q"), "the bad value is quoted: {err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn check_reports_a_bad_cluster_value_with_line_and_column() {
    // VALID is 12 lines; `manager` is line 16, its value at column 11.
    let text =
        format!("{VALID}\n[cluster]\nengine = \"swarm\"\nmanager = \"http://manager.lab:2375\"\n");
    let (_dir, path) = check_dir(&text);
    let out = check(&path);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{}:16:11: ", path.display())),
        "expected `{}:16:11: ...`, got: {err}",
        path.display()
    );
    assert!(
        err.contains(
            "\"http://manager.lab:2375\": a Docker API address is unix:///PATH or tcp://HOST:PORT"
        ),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn check_on_a_swarm_describes_it_fails_without_its_tls_files_and_warns_of_unshared_homes() {
    let swarm = format!("{VALID}\n[cluster]\nengine = \"swarm\"\ntls_dir = \"tls\"\n");
    let (dir, path) = check_dir(&swarm);
    let file = path.display().to_string();

    // The default node API is tcp://: without the client certificate the check fails.
    let out = check(&path);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let ca = dir.path().join("tls/ca.pem");
    assert!(
        err.contains(&format!(
            "{file}: [cluster] tls_dir: cannot read {} (",
            ca.display()
        )) && err.contains("key.pem (")
            && err.contains("(node_api tcp://{addr}:2376)"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("OK"));

    // With them it passes, describes the cluster and says once that nothing is shared.
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    for name in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::write(dir.path().join("tls").join(name), "pem\n").unwrap();
    }
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        stdout.contains(&format!(
            "cluster: engine \"swarm\", manager unix:///var/run/docker.sock, node API tcp://{{addr}}:2376, no node agents (forwards through the relay exec, each session's stream over a connection of its own), TLS from {}\n",
            dir.path().join("tls").display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("OK"), "{stdout}");
    let empty = format!("{file}: warning: [cluster] shared_paths is empty");
    assert_eq!(err.matches(&empty).count(), 1, "{err}");
    assert!(
        err.contains("[defaults] home \"/var/lib/labgate/home/{user}\"")
            && err.contains("homes must be the same directory on every node (NFS or similar); declare the shared directories in [cluster] shared_paths"),
        "{err}"
    );

    // Shared paths that leave the home out: a warning naming it.
    let (_dir, path) = check_dir(&swarm.replace(
        "tls_dir = \"tls\"",
        "tls_dir = \"tls\"\nnode_api = \"unix:///run/docker-{hostname}.sock\"\nshared_paths = [\"/srv/home\"]",
    ));
    let out = check(&path);
    let err = stderr_of(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "no tcp:// API, no TLS files needed: {err}"
    );
    assert!(
        err.contains(&format!(
            "{}: warning: [defaults] home \"/var/lib/labgate/home/{{user}}\" is not under [cluster] shared_paths: homes must be the same directory on every node",
            path.display()
        )),
        "{err}"
    );
    assert!(!err.contains("shared_paths is empty"), "{err}");
}

#[test]
fn check_reports_a_bad_key_line_with_its_line_number() {
    let (dir, path) = check_dir(VALID);
    let alice = dir.path().join("keys/alice.pub");
    std::fs::write(
        &alice,
        format!("{ED} alice@laptop\nssh-ed25519 notbase64!! broken\n"),
    )
    .unwrap();
    let out = check(&path);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}:2: ", alice.display())),
        "expected `{}:2: ...`, got: {err}",
        alice.display()
    );
    assert!(
        !err.contains("alice.pub:1:"),
        "the good line is fine: {err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn check_reports_a_key_file_whose_name_is_not_a_user_name() {
    let (dir, path) = check_dir(VALID);
    std::fs::write(dir.path().join("keys/alice.pub"), format!("{ED}\n")).unwrap();
    std::fs::write(dir.path().join("keys/Bad.Name.pub"), format!("{ED}\n")).unwrap();
    let out = check(&path);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Bad.Name.pub"), "the file is named: {err}");
    assert!(err.contains("invalid user name"), "{err}");
    assert!(
        !err.contains("alice.pub"),
        "the valid file is not reported: {err}"
    );
}

#[test]
fn check_reports_a_missing_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let out = check(&path);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains("cannot read config") && err.contains("No such file"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn check_reports_a_missing_keys_dir() {
    let (dir, path) = check_dir(VALID);
    std::fs::remove_dir(dir.path().join("keys")).unwrap();
    let out = check(&path);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&dir.path().join("keys").display().to_string()),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Failures during and around a session.

#[test]
fn a_container_killed_under_a_session_ends_the_session_and_the_next_login_works() {
    let gw = Gateway::start(1, "", "");
    gw.ok(0, "true");
    let name = gw.container(0);
    let child = gw
        .ssh(0)
        .arg("sleep 731; echo done")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || !pids_of("sleep 731").is_empty()),
        "the session's sleep never ran\n{}",
        gw.log()
    );
    let t0 = Instant::now();
    let st = Command::new("docker")
        .args(["kill", &name])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let out = wait_with_timeout(child, Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "ssh still hangs 10 s after its container was killed\n{}",
            gw.log()
        )
    });
    assert!(
        !out.status.success(),
        "a killed session is not a success: {:?}",
        out.status
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("done"),
        "the command never finished"
    );
    eprintln!(
        "ssh ended {:?} after the kill: {:?}, stderr {:?}",
        t0.elapsed(),
        out.status,
        stderr_of(&out)
    );
    assert_alive(&gw);
    // The next login starts the container again.
    assert_eq!(gw.ok(0, "echo back"), "back\n");
    assert_eq!(docker_inspect(&name, "{{.State.Running}}").unwrap(), "true");
    assert_eq!(containers_named(&name), 1);
}

/// Waits for `child` at most `timeout`; kills it and returns `None` when it is still running.
fn wait_with_timeout(mut child: std::process::Child, timeout: Duration) -> Option<Output> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_killed_at_once_leaves_one_container_and_logins_still_work() {
    let gw = Gateway::start(1, "", "");
    let name = gw.container(0);
    for _ in 0..3 {
        let mut child = gw.spawn_silent(0, "sleep 733");
        std::thread::sleep(Duration::from_millis(50));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(gw.ok(0, "echo alive"), "alive\n");
    assert_eq!(containers_named(&name), 1);
    assert_alive(&gw);
    assert!(
        eventually(Duration::from_secs(10), || pids_of("sleep 733").is_empty()),
        "a command of a client that is gone must not keep running"
    );
}

#[test]
fn a_client_killed_while_its_container_is_created_leaves_one_container() {
    let gw = Gateway::start(1, "", "");
    let name = gw.container(0);
    let user = gw.users[0].clone();
    let mut child = gw.spawn_silent(0, "sleep 737");
    // Kill the client as soon as the gateway has accepted its command, i.e. while the
    // container is being created.
    let deadline = Instant::now() + Duration::from_secs(20);
    let audited = loop {
        if gw
            .log()
            .lines()
            .any(|l| l.contains("sleep 737") && l.contains(&user))
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(audited, "the exec was never logged\n{}", gw.log());
    let created_yet = containers_named(&name);
    eprintln!("container existing when the client was killed: {created_yet}");
    // The container creation goes on; later logins work and share the one container.
    assert_eq!(gw.ok(0, "echo alive"), "alive\n");
    assert_eq!(gw.ok(0, "echo again"), "again\n");
    assert_eq!(containers_named(&name), 1);
    assert_eq!(docker_inspect(&name, "{{.State.Running}}").unwrap(), "true");
    // The command of the client that left is hung up, not left running.
    assert!(
        eventually(Duration::from_secs(10), || pids_of("sleep 737").is_empty()),
        "a command of a client that is gone must not keep running\n{}",
        gw.log()
    );
    assert_alive(&gw);
}
