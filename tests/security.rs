//! What the gateway does as root on a user's behalf never exceeds what the user may do
//! themselves: sockets and files inside containers are reached with the user's credentials,
//! bind sources are never followed through symlinks, and nothing a user opens can hold the
//! gateway's threads or descriptors past its deadline. Real engine, real OpenSSH client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Gateway, docker_inspect, eventually};

/// A unix socket at `path` (mode 0600 in a 0700 directory, both owned by `uid`) that greets
/// each connection with `greeting`; counts the connections it got.
fn private_socket(path: &Path, uid: u32, greeting: &'static [u8]) -> Arc<AtomicUsize> {
    let dir = path.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
    let listener = UnixListener::bind(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let counted = got.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let _ = s.set_nonblocking(false);
                    let _ = s.write_all(greeting);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    got
}

/// What a `-L local.sock:TARGET` forward as user `i` gives back, and the client's stderr.
fn through_unix_forward(gw: &Gateway, i: usize, target: &str, n: usize) -> (Vec<u8>, String) {
    let local = gw.dir.path().join(format!("fwd-{n}.sock"));
    let _ = std::fs::remove_file(&local);
    let mut child = gw
        .ssh_info(i)
        .args(["-N", "-L"])
        .arg(format!("{}:{target}", local.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || local.exists()),
        "no local socket for {target}"
    );
    let mut s = common::connect_unix(&local, Duration::from_secs(20));
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (got, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A gateway whose users 0 and 1 run as uids 2001 and 2002 and share `/scratch` (writable),
/// forwarding through `via` ("namespace" or "exec").
fn shared_scratch_gateway(scratch: &Path, via: &str) -> Gateway {
    std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o1777)).unwrap();
    Gateway::builder()
        .users(2)
        .defaults(&format!(
            "mounts = [ {{ source = \"{}\", target = \"/scratch\", writable = true }} ]\n",
            scratch.display()
        ))
        .docker(&format!("forward_via = \"{via}\"\n"))
        .tail("[users.{u0}]\nuid = 2001\n\n[users.{u1}]\nuid = 2002\n")
        .start()
}

fn unix_forwards_reach_only_what_the_user_may_open(via: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let gw = shared_scratch_gateway(scratch.path(), via);
    // Bob's private socket (0700 dir, 0600 socket) and alice's own, on the shared mount.
    let bobs = private_socket(&scratch.path().join("bob/s.sock"), 2002, b"bob-secret\n");
    let _alices = private_socket(&scratch.path().join("alice/s.sock"), 2001, b"alice-own\n");
    // Alice cannot reach bob's socket from a shell of her own: neither may her forward.
    let own_shell = gw.run(0, "cat /scratch/bob/s.sock; ls /scratch/bob");
    assert!(!own_shell.status.success());

    let (got, err) = through_unix_forward(&gw, 0, "/scratch/alice/s.sock", 0);
    assert_eq!(got, b"alice-own\n", "{err}\n{}", gw.log());
    let (got, err) = through_unix_forward(&gw, 0, "/scratch/bob/s.sock", 1);
    assert!(
        got.is_empty(),
        "alice reached bob's private socket through the gateway ({via}): {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(err.contains("open failed"), "{err}");
    assert_eq!(
        bobs.load(Ordering::SeqCst),
        0,
        "bob's socket was connected to"
    );
    // Bob himself reaches it.
    let (got, _) = through_unix_forward(&gw, 1, "/scratch/bob/s.sock", 2);
    assert_eq!(got, b"bob-secret\n");
}

#[test]
fn unix_forwards_act_as_the_user_on_the_namespace_path() {
    unix_forwards_reach_only_what_the_user_may_open("namespace");
}

#[test]
fn unix_forwards_act_as_the_user_on_the_relay_path() {
    unix_forwards_reach_only_what_the_user_may_open("exec");
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn opens_to_a_listener_that_never_accepts_end_by_their_deadline_and_leave_nothing() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType, bind, listen, socket};
    let gw = Gateway::start(1, "", "");
    gw.ok(0, "true");
    let home = gw.dir.path().join(format!("home/{}", gw.users[0]));
    // A service that listens with no queue and never accepts.
    let stuck = home.join("stuck.sock");
    let listener = socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
    bind(&listener, &SocketAddrUnix::new(&stuck).unwrap()).unwrap();
    listen(&listener, 0).unwrap();

    let local = gw.dir.path().join("stuck-local.sock");
    let mut client = gw
        .ssh_info(0)
        .args(["-N", "-L"])
        .arg(format!(
            "{}:/home/{}/stuck.sock",
            local.display(),
            gw.users[0]
        ))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || local.exists()));
    let pid = gw.pid();
    std::thread::sleep(Duration::from_millis(500));
    let (base_threads, base_fds) = (threads(pid), fds(pid));

    // 90 opens at once: the first fits the listener's queue, 64 at most wait their turn
    // (the rest are refused at once), and the waiting ones end at their deadline.
    let t0 = Instant::now();
    let clients: Vec<_> = (0..90)
        .map(|_| {
            let mut s = common::connect_unix(&local, Duration::from_secs(20));
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            // Ok: the channel was closed (refused); Err: still open after 20 s.
            std::thread::spawn(move || s.read_to_end(&mut Vec::new()).is_ok())
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        threads(pid) <= base_threads + 8,
        "opens that wait hold threads: {} -> {}",
        base_threads,
        threads(pid)
    );
    // Every open but the one in the queue ends by its deadline (the client sees the channel
    // closed); that one stays open, as an accepted connection would.
    let ended = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .filter(|closed| *closed)
        .count();
    assert!(ended >= 89, "only {ended} of 90 opens ended");
    assert!(t0.elapsed() < Duration::from_secs(25), "{:?}", t0.elapsed());
    let _ = client.kill();
    let out = client.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open failed"), "{err}");
    assert!(
        err.contains("resource shortage"),
        "no open was refused as too many: {err}"
    );

    // Once the connection is gone: no thread, no descriptor of it is left.
    assert!(
        eventually(Duration::from_secs(20), || threads(pid) <= base_threads
            && fds(pid) <= base_fds),
        "threads {} -> {}, fds {} -> {}",
        base_threads,
        threads(pid),
        base_fds,
        fds(pid)
    );
    drop(listener);
}

#[test]
fn a_home_repointed_at_the_host_through_a_writable_mount_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().display().to_string();
    let gw = Gateway::start(
        1,
        "",
        &format!(
            "[users.{{u0}}]\nhome = \"{src}/homes/{{user}}\"\n\
             mounts = [ {{ source = \"{src}\", target = \"/scratch\", writable = true }} ]\n"
        ),
    );
    let user = gw.users[0].clone();
    gw.ok(0, "echo mine > ~/file");
    let home = scratch.path().join(format!("homes/{user}"));
    assert_eq!(
        std::fs::read_to_string(home.join("file")).unwrap(),
        "mine\n"
    );
    // From inside: move the home away, a symlink to the host's root in its place, and stop.
    gw.ok(
        0,
        &format!("cd /scratch/homes && mv {user} {user}.old && ln -s / {user}"),
    );
    let name = gw.container(0);
    Command::new("docker")
        .args(["stop", "-t", "1", &name])
        .output()
        .unwrap();
    // The next login is refused in one line, nothing of the host is mounted, and the log
    // names the path for the admin.
    let out = gw.run(0, "ls /home/*/etc/hostname; cat /proc/1/mountinfo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(
        err.contains("refused to start your container")
            && err.contains("symlink")
            && err.lines().count() == 1,
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hostname"));
    assert_ne!(
        docker_inspect(&name, "{{.State.Running}}").as_deref(),
        Some("true")
    );
    let log = gw.log();
    assert!(
        log.contains(&format!("homes/{user}: a symlink on the path")),
        "{log}"
    );
    // Put back, the home serves again with its files.
    std::fs::remove_file(&home).unwrap();
    std::fs::rename(scratch.path().join(format!("homes/{user}.old")), &home).unwrap();
    assert_eq!(gw.ok(0, "cat ~/file"), "mine\n");
}

#[test]
fn check_warns_about_homes_under_writable_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let config = dir.path().join("labgate.toml");
    std::fs::write(
        &config,
        "[server]\nkeys_dir = \"keys\"\nhost_key = \"host_key\"\n\n\
         [defaults]\nimage = \"busybox\"\nhome = \"/srv/scratch/homes/{user}\"\n\
         mounts = [ { source = \"/srv/scratch\", target = \"/scratch\", writable = true } ]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning, not a failure: {err}");
    assert!(
        err.contains("warning: [defaults] home \"/srv/scratch/homes/{user}\" lies under the writable mount source /srv/scratch"),
        "{err}"
    );
    // Read-only, or elsewhere: no warning.
    std::fs::write(
        &config,
        "[server]\nkeys_dir = \"keys\"\nhost_key = \"host_key\"\n\n\
         [defaults]\nimage = \"busybox\"\nhome = \"/srv/homes/{user}\"\n\
         mounts = [ { source = \"/srv/scratch\", target = \"/scratch\", writable = true } ]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("lies under"));
}

#[test]
fn an_allowed_name_is_what_the_gateway_resolves_not_the_containers_hosts_file() {
    let host = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = host.local_addr().unwrap().port();
    host.set_nonblocking(true).unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let counted = served.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok((mut s, _)) = host.accept() {
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(b"pong-from-host\n");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    // The admin allows a database by name; the name means nothing on the gateway.
    let gw = Gateway::start(
        1,
        "",
        &format!("[users.{{u0}}.forwarding]\nallow = [\"db.labgate-test.invalid:{port}\"]\n"),
    );
    gw.ok(0, "true");
    let host_ip = common::gateway_ip("labgate");
    assert!(!host_ip.is_empty());
    // The user (root in the container) maps it to the host's bridge address.
    gw.ok(
        0,
        &format!("echo '{host_ip} db.labgate-test.invalid' >> /etc/hosts"),
    );
    let out = gw
        .ssh_info(0)
        .args(["-W", &format!("db.labgate-test.invalid:{port}")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("pong"),
        "the container's /etc/hosts opened the host"
    );
    assert!(err.contains("administratively prohibited"), "{err}");
    assert_eq!(served.load(Ordering::SeqCst), 0);
}

#[test]
fn containers_cannot_make_device_nodes_but_root_in_them_can_still_install() {
    let gw = Gateway::start(1, "", "");
    // Root in the container: chown (apt, pip) works, a device node does not.
    let out = gw.ok(
        0,
        "touch /tmp/f && chown 1234:1234 /tmp/f && stat -c %u /tmp/f; \
         mknod /tmp/mem c 1 1 2>/dev/null && echo made || echo refused",
    );
    assert_eq!(out, "1234\nrefused\n");
    let drop = docker_inspect(&gw.container(0), "{{.HostConfig.CapDrop}}").unwrap();
    assert!(drop.contains("MKNOD"), "{drop}");
}

#[test]
fn a_profile_container_never_takes_another_users_name_and_old_ones_are_renamed() {
    let mut gw = Gateway::start(1, "", "[profiles.x]\nusers = [\"{u0}\"]\n");
    let u0 = gw.users[0].clone();
    let other = format!("{u0}-x");
    let _cleanup = common::RemoveContainers(vec![
        format!("labgate-{u0}.x"),
        format!("labgate-{u0}-x"),
        format!("labgate-{other}"),
    ]);
    // A profile container as an older gateway named it: made by this one, then given the
    // old name while the gateway is down.
    let first = gw
        .ssh_as(&format!("{u0}+x"), &gw.keys[0].private)
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    gw.stop();
    let old_id = docker_inspect(&format!("labgate-{u0}.x"), "{{.Id}}").unwrap();
    let renamed = Command::new("docker")
        .args([
            "rename",
            &format!("labgate-{u0}.x"),
            &format!("labgate-{u0}-x"),
        ])
        .output()
        .unwrap();
    assert!(renamed.status.success());
    gw.spawn();
    // Renamed at start, by its labels: the same container under the new name.
    assert!(
        eventually(Duration::from_secs(20), || docker_inspect(
            &format!("labgate-{u0}.x"),
            "{{.Id}}"
        )
        .as_deref()
            == Some(old_id.as_str())),
        "{}",
        gw.log()
    );
    let as_profile = gw
        .ssh_as(&format!("{u0}+x"), &gw.keys[0].private)
        .arg("echo in-profile")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&as_profile.stdout), "in-profile\n");
    assert_eq!(
        docker_inspect(&format!("labgate-{u0}.x"), "{{.Id}}").as_deref(),
        Some(old_id.as_str())
    );
    // User `U-x` (a valid, different user) gets a container of their own beside it.
    std::fs::write(
        gw.dir.path().join(format!("keys/{other}.pub")),
        &gw.keys[0].public,
    )
    .unwrap();
    let theirs = gw
        .ssh_as(&other, &gw.keys[0].private)
        .arg("id -un 2>/dev/null; hostname")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        theirs.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&theirs.stderr),
        gw.log()
    );
    assert!(String::from_utf8_lossy(&theirs.stdout).ends_with(&format!("labgate-{other}\n")));
    assert_eq!(
        docker_inspect(
            &format!("labgate-{other}"),
            "{{index .Config.Labels \"labgate.user\"}}"
        )
        .as_deref(),
        Some(other.as_str())
    );
}
