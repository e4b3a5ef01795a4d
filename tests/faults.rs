//! Faults a shared server inflicts, survived: the Docker daemon dying and coming back while
//! sessions are open, a client killed (`kill -9`) in the middle of a large transfer (command
//! output, and a `-L` download), and a host key file that cannot be read at start. (A
//! container killed under a session is covered in `tests/errors.rs`.)
//!
//! The daemon test never touches the machine's Docker Engine: it starts a private `dockerd`
//! of its own (`common::dockerd`: own socket, data root, exec root, containerd and bridge, the
//! busybox test image loaded), points the gateway at it with `[docker] socket`, then stops and
//! restarts it. It needs root and `dockerd`; without them it is skipped (a failure under CI).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::dockerd::{DockerdOptions, PrivateDockerd};
use common::{Gateway, IMAGE, assert_alive, eventually, fd_count, stderr_of};

/// Waits for `child` to exit, at most `timeout`.
fn wait_for(mut child: Child, timeout: Duration) -> Option<Output> {
    let exited = eventually(timeout, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    Some(child.wait_with_output().unwrap())
}

#[test]
fn the_gateway_survives_a_docker_daemon_restart_and_finds_its_containers_again() {
    survive_the_daemon_going_away("docker_daemon_restart", rustix::process::Signal::TERM);
}

/// Opens a session, takes the daemon away with `signal`, checks what users see meanwhile,
/// brings the daemon back and checks that logins work again in the same container.
fn survive_the_daemon_going_away(what: &str, signal: rustix::process::Signal) {
    let mut docker = match PrivateDockerd::start(DockerdOptions::default()) {
        Ok(d) => d,
        Err(why) => {
            common::skip_unless(false, &format!("{what}: {why}"));
            return;
        }
    };
    let gw = Gateway::start(
        1,
        "",
        &format!("[docker]\nsocket = \"{}\"\n", docker.socket().display()),
    );
    let name = gw.container(0);
    assert_eq!(gw.ok(0, "echo up"), "up\n");
    let before = docker.containers_named(&name);
    assert_eq!(
        before.len(),
        1,
        "the container is made in the private daemon"
    );

    // A session is open when the daemon goes away.
    let mut open = gw
        .ssh(0)
        .arg("echo started; sleep 600; echo finished")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(open.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    docker.signal(signal);

    // The open session ends (its exec stream went with the daemon) and does not claim success.
    let ended = wait_for(open, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the open session outlived the daemon\n{}", gw.log()));
    assert!(
        !ended.status.success(),
        "a session cut by the daemon's stop is not a success: {:?}, stderr {:?}",
        ended.status,
        stderr_of(&ended)
    );
    let said = stderr_of(&ended);
    assert!(
        said.contains("labgate: ") && said.contains("container engine"),
        "the open session should end with a clear message, got {said:?}\n{}",
        gw.log()
    );
    let mut rest = String::new();
    let _ = (&ended.stdout[..]).read_to_string(&mut rest);
    assert!(!rest.contains("finished"), "{rest:?}");
    eprintln!(
        "open session ended with {:?}, stderr {:?}",
        ended.status,
        stderr_of(&ended)
    );

    // Logins during the outage: a clear message, exit 255, the gateway stays up.
    for _ in 0..2 {
        let out = gw.run(0, "echo should-not-run");
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(255), "stderr {err:?}\n{}", gw.log());
        assert!(
            err.contains("labgate: ") && err.contains("container engine is not reachable"),
            "{err:?}"
        );
        assert!(out.stdout.is_empty());
        assert_alive(&gw);
    }

    // The daemon is back: logins work without a gateway restart, in the same container.
    docker.run().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || gw.run(0, "echo back").stdout
            == b"back\n"),
        "logins did not recover after the daemon came back\n{}",
        gw.log()
    );
    assert_eq!(
        docker.containers_named(&name),
        before,
        "the existing container is found again, not duplicated"
    );
    assert_eq!(
        docker.docker(&["inspect", "-f", "{{.State.Running}}", &name]),
        "true"
    );
}

/// Command lines of the processes in `container` (`docker top`) that contain `marker`.
fn processes_with(container: &str, marker: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["top", container, "-o", "pid,args"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(marker))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_client_killed_mid_transfer_leaves_no_process_and_no_fds() {
    let gw = Gateway::start(1, "", "");
    gw.ok(0, "true");
    let pid = gw.pid();
    let base_fds = fd_count(pid);
    // A transfer far larger than anything buffered on the way (about 4 GB).
    let producer = "head -c 4000000731 /dev/zero";
    let mut child = gw
        .ssh(0)
        .arg(producer)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < 64 << 20 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the transfer ended early\n{}", gw.log());
        got += n;
    }
    let container = gw.container(0);
    assert!(
        !processes_with(&container, "4000000731").is_empty(),
        "the producer runs"
    );
    child.kill().unwrap(); // SIGKILL: no channel close, no EOF, just a dead TCP connection
    child.wait().unwrap();
    drop(stdout);

    assert!(
        eventually(Duration::from_secs(20), || processes_with(
            &container,
            "4000000731"
        )
        .is_empty()),
        "the exec's process outlived its client: {:?}\n{}",
        processes_with(&container, "4000000731"),
        gw.log()
    );
    assert!(
        eventually(Duration::from_secs(20), || fd_count(pid) <= base_fds),
        "fds: {} after, {base_fds} before",
        fd_count(pid)
    );
    assert_alive(&gw);
    assert_eq!(gw.ok(0, "echo still-here"), "still-here\n");
}

#[test]
fn an_unreadable_host_key_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    // A directory where the key file should be: reading it fails (even for root, whom file
    // modes do not stop).
    std::fs::create_dir_all(dir.path().join("host_key")).unwrap();
    std::fs::set_permissions(
        dir.path().join("host_key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let config = dir.path().join("labgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nhost_key = \"host_key\"\nkeys_dir = \"keys\"\n\n\
             [defaults]\nimage = \"{IMAGE}\"\nhome = \"home/{{user}}\"\n"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_for(child, Duration::from_secs(20)).expect("labgate kept running");
    let err = stderr_of(&out);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    assert!(
        err.contains("cannot read host key") && err.contains("host_key"),
        "stderr: {err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "it must not serve without its host key"
    );
}

/// Writes to `sink` from a thread of its own until a write fails (the thread returned ends
/// then), and returns once more than the gateway's 64 MiB queue has gone into it and nothing
/// moves any more: everything on the way is full. `what` names it in the failure.
fn fill_until_stalled(
    gw: &Gateway,
    what: &str,
    mut sink: impl std::io::Write + Send + 'static,
) -> std::thread::JoinHandle<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            while sink.write_all(&chunk).is_ok() {
                sent.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        })
    };
    let mut last = 0;
    assert!(
        eventually(Duration::from_secs(60), || {
            std::thread::sleep(Duration::from_millis(500));
            let now = sent.load(Ordering::SeqCst);
            let stalled = now == last && now > 64 << 20;
            last = now;
            stalled
        }),
        "{what} never filled up: {} bytes sent\n{}",
        sent.load(Ordering::SeqCst),
        gw.log()
    );
    writer
}

#[test]
fn a_client_killed_mid_forward_leaves_no_fds_and_the_gateway_serves_on() {
    use std::io::Write;
    use std::net::TcpStream;
    let gw = Gateway::start(1, "", "");
    // 512 MiB served from the container's loopback, and a service that takes connections and
    // then neither reads nor writes (`sleep` on the socket).
    gw.ok(
        0,
        "mkdir -p ~/www && head -c 536870912 /dev/zero > ~/www/big && httpd -p 127.0.0.1:8732 -h ~/www; \
         setsid nc -ll -p 8733 -e sleep 600 </dev/null >/dev/null 2>&1 &",
    );
    let pid = gw.pid();
    let base_fds = fd_count(pid);

    // A download whose reader stops: the client's window fills and the gateway waits for it.
    let mut download = common::Tunnel::open(&gw, 0, |p| {
        vec!["-L".into(), format!("127.0.0.1:{p}:127.0.0.1:8732")]
    });
    let mut conn = TcpStream::connect(("127.0.0.1", download.port)).unwrap();
    conn.write_all(b"GET /big HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < 32 << 20 {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the download ended early\n{}", gw.log());
        got += n;
    }

    // An upload into the service that never reads: the gateway's queue for it fills.
    let mut upload = common::Tunnel::open(&gw, 0, |p| {
        vec!["-L".into(), format!("127.0.0.1:{p}:127.0.0.1:8733")]
    });
    let sink = TcpStream::connect(("127.0.0.1", upload.port)).unwrap();
    let pusher = fill_until_stalled(&gw, "the upload", sink);
    // (Tunnel::open's readiness probes into the silent service stay half-open too.)
    let open = gw.metric("labgate_forwards").unwrap_or(0.0);
    assert!(open >= 2.0, "forwards open: {open}");

    // Both clients killed (SIGKILL) with their forwards stuck.
    download.child.kill().unwrap();
    download.child.wait().unwrap();
    upload.child.kill().unwrap();
    upload.child.wait().unwrap();
    drop(conn);
    pusher.join().unwrap();

    // The download's connection ends at once, and its forward with it. The upload's cannot
    // end by itself: the client's kernel still holds bytes the gateway has not read (russh
    // reads nothing more while a channel's queue is full), so no FIN comes while the silent
    // service holds its queue. The admin's kick ends it; then every forward of both
    // connections must be gone, the ones into the silent service too.
    assert!(
        eventually(Duration::from_secs(20), || gw.metric("labgate_connections")
            == Some(1.0)),
        "the download's connection is still open\n{}",
        gw.log()
    );
    let kick = gw.labgate(&["kick", &gw.users[0]]);
    assert!(kick.status.success(), "{kick:?}");
    assert!(
        eventually(Duration::from_secs(20), || fd_count(pid) <= base_fds
            && gw.metric("labgate_forwards") == Some(0.0)),
        "fds: {} after, {base_fds} before; forwards open: {:?}\n{}",
        fd_count(pid),
        gw.metric("labgate_forwards"),
        gw.log()
    );
    assert_alive(&gw);
    // The service in the container is unharmed and reachable again.
    let page = gw.ok(0, "wget -q -O - http://127.0.0.1:8732/big | wc -c");
    assert_eq!(page.trim(), (512u64 << 20).to_string());
}

#[test]
fn a_kicked_connection_stuck_on_input_nobody_reads_ends_and_hangs_up_its_command() {
    let gw = Gateway::start(1, "", "");
    gw.ok(0, "true"); // the container exists
    let pid = gw.pid();
    let base_fds = fd_count(pid);
    let mark = format!("sleep {}", 6000 + std::process::id() % 1000);

    // A command that never reads its stdin, fed from a client that sends without end: the
    // gateway's queue for it fills, then the whole connection waits.
    let mut client = gw
        .ssh(0)
        .arg(format!("exec {mark}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let input = client.stdin.take().unwrap();
    assert!(
        eventually(Duration::from_secs(20), || !common::pids_of(&mark)
            .is_empty()),
        "the command never ran\n{}",
        gw.log()
    );
    let feeder = fill_until_stalled(&gw, "the input", input);

    // The client dies; its connection cannot notice (russh reads nothing while it waits), so
    // the admin kicks it: the command is hung up and nothing of the connection is left.
    client.kill().unwrap();
    client.wait().unwrap();
    feeder.join().unwrap();
    let kick = gw.labgate(&["kick", &gw.users[0]]);
    assert!(kick.status.success(), "{kick:?}");
    assert!(
        eventually(Duration::from_secs(20), || common::pids_of(&mark)
            .is_empty()
            && gw.metric("labgate_sessions") == Some(0.0)
            && fd_count(pid) <= base_fds),
        "left: {:?} running, sessions {:?}, fds {} (before {base_fds})\n{}",
        common::pids_of(&mark),
        gw.metric("labgate_sessions"),
        fd_count(pid),
        gw.log()
    );
    assert_alive(&gw);
    assert_eq!(gw.ok(0, "echo back"), "back\n");
}
