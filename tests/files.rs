//! Moving files the ways labs do, with the real OpenSSH tools against a realistic Debian image
//! (`labgate/debian:test`, built by `scripts/debian-image`): the sftp subsystem (`sftp -b`,
//! `scp`), legacy `scp -O`, `rsync -e ssh`, `git clone`/`push` with `GIT_PROTOCOL`; and the
//! busybox image, which has no sftp-server, served by labgate's built-in one (`labgate-sftp`),
//! or, where that is not installed, answering sftp with a clear error instead of a hang.
//! Every transfer is compared byte for byte; files land under the home, owned by the uid:gid.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, ensure_debian_image, random_bytes};

/// A user table giving user 0 the Debian image and a uid:gid of its own.
const DEBIAN_USER: &str = "[users.{u0}]\nimage = \"labgate/debian:test\"\nuid = 1000\ngid = 1001\n";

fn debian_gateway() -> Gateway {
    ensure_debian_image();
    // The harness installs the static relay, which the sftp subsystem's direct path runs.
    Gateway::start(1, "", DEBIAN_USER)
}

/// User 0's home on the host.
fn home(gw: &Gateway) -> PathBuf {
    gw.dir.path().join(format!("home/{}", gw.users[0]))
}

/// Runs `cmd` with stdin closed; kills it and fails if it takes longer than `limit`.
fn run_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} hung for more than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Runs `cmd` (2 minutes at most) and asserts it succeeded.
fn must(gw: &Gateway, cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = run_within(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{shown} failed: {:?}\nstdout: {}\nstderr: {}\ngateway log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    out
}

/// `sftp -b BATCH` for user `i`.
fn sftp(gw: &Gateway, i: usize, batch: &str, cwd: &Path) -> Command {
    let file = cwd.join("batch");
    std::fs::write(&file, batch).unwrap();
    let mut c = Command::new("sftp");
    c.current_dir(cwd)
        .args(gw.ssh_options(i))
        .arg("-b")
        .arg(&file)
        .arg(gw.destination(i));
    c
}

/// The `ssh` command line (one string) for `rsync -e` and `GIT_SSH_COMMAND`.
fn ssh_command(gw: &Gateway, i: usize) -> String {
    let mut s = "ssh".to_owned();
    for o in gw.ssh_options(i) {
        assert!(!o.contains([' ', '\'', '"']), "option needs quoting: {o}");
        s.push(' ');
        s.push_str(&o);
    }
    s
}

fn assert_owned_by_user(path: &Path) {
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (1000, 1001),
        "{} is not owned by the configured uid:gid",
        path.display()
    );
}

#[test]
fn sftp_puts_gets_lists_and_removes_byte_exact_under_the_home() {
    let gw = debian_gateway();
    let local = tempfile::tempdir().unwrap();
    let data = random_bytes(3 << 20, 1);
    std::fs::write(local.path().join("up.bin"), &data).unwrap();

    // Relative paths are relative to the home.
    let out = must(
        &gw,
        sftp(
            &gw,
            0,
            "mkdir inbox\nput up.bin inbox/data.bin\nls -l inbox\nget inbox/data.bin down.bin\npwd\n",
            local.path(),
        ),
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("data.bin"), "ls: {listing}");
    assert!(
        listing.contains(&format!("/home/{}", gw.users[0])),
        "pwd is the home: {listing}"
    );
    let down = std::fs::read(local.path().join("down.bin")).unwrap();
    assert!(down == data, "downloaded bytes differ");

    let on_host = home(&gw).join("inbox/data.bin");
    assert!(
        std::fs::read(&on_host).unwrap() == data,
        "stored bytes differ"
    );
    assert_owned_by_user(&on_host);
    assert_owned_by_user(&home(&gw).join("inbox"));
    // The container sees the same file.
    let sum = gw.ok(0, "sha256sum inbox/data.bin | cut -d' ' -f1");
    let host_sum = Command::new("sha256sum").arg(&on_host).output().unwrap();
    assert_eq!(
        sum.trim(),
        String::from_utf8_lossy(&host_sum.stdout)
            .split(' ')
            .next()
            .unwrap()
    );

    must(
        &gw,
        sftp(&gw, 0, "rm inbox/data.bin\nrmdir inbox\n", local.path()),
    );
    assert!(!home(&gw).join("inbox").exists(), "rm/rmdir took effect");
}

#[test]
fn scp_over_sftp_and_legacy_scp_copy_both_ways() {
    let gw = debian_gateway();
    let local = tempfile::tempdir().unwrap();
    let dest = gw.destination(0);
    for (legacy, seed) in [(false, 2u64), (true, 3)] {
        let data = random_bytes(2 << 20, seed);
        let name = if legacy { "legacy.bin" } else { "sftp.bin" };
        let src = local.path().join(name);
        std::fs::write(&src, &data).unwrap();

        let mut up = Command::new("scp");
        up.args(gw.ssh_options(0));
        if legacy {
            up.arg("-O");
        }
        up.arg(&src).arg(format!("{dest}:{name}"));
        must(&gw, up);
        let on_host = home(&gw).join(name);
        assert!(
            std::fs::read(&on_host).unwrap() == data,
            "{name}: upload differs"
        );
        assert_owned_by_user(&on_host);

        let back = local.path().join(format!("{name}.back"));
        let mut down = Command::new("scp");
        down.args(gw.ssh_options(0));
        if legacy {
            down.arg("-O");
        }
        down.arg(format!("{dest}:{name}")).arg(&back);
        must(&gw, down);
        assert!(
            std::fs::read(&back).unwrap() == data,
            "{name}: download differs"
        );
    }
    // Legacy scp really ran `scp -t`/`scp -f` in the container, the default one sftp.
    let log = gw.log();
    assert!(log.contains("scp -t") && log.contains("scp -f"), "{log}");
    assert!(log.contains("subsystem=sftp"), "{log}");
}

#[test]
fn rsync_copies_a_tree_and_a_second_run_transfers_nothing() {
    let gw = debian_gateway();
    let local = tempfile::tempdir().unwrap();
    let tree = local.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    let files = [
        ("top.txt", random_bytes(1000, 4)),
        ("a/mid.bin", random_bytes(300_000, 5)),
        ("a/b/deep.bin", random_bytes(70_000, 6)),
        ("a/b/empty", Vec::new()),
    ];
    for (name, data) in &files {
        std::fs::write(tree.join(name), data).unwrap();
    }
    let rsync = || {
        let mut c = Command::new("rsync");
        c.args(["-a", "-i", "-e", &ssh_command(&gw, 0)])
            .arg(format!("{}/", tree.display()))
            .arg(format!("{}:tree/", gw.destination(0)));
        c
    };
    let first = must(&gw, rsync());
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("a/b/deep.bin"),
        "{first:?}"
    );
    for (name, data) in &files {
        let p = home(&gw).join("tree").join(name);
        assert!(&std::fs::read(&p).unwrap() == data, "{name} differs");
        assert_owned_by_user(&p);
    }
    let second = must(&gw, rsync());
    assert_eq!(
        String::from_utf8_lossy(&second.stdout),
        "",
        "an unchanged tree transfers nothing"
    );
}

#[test]
fn git_clones_and_pushes_over_ssh_with_protocol_v2() {
    let gw = debian_gateway();
    // GIT_PROTOCOL is passed through (accept_env).
    let mut env = gw.ssh(0);
    env.args(["-o", "SetEnv=GIT_PROTOCOL=version=2", "echo $GIT_PROTOCOL"]);
    assert_eq!(
        String::from_utf8_lossy(&must(&gw, env).stdout),
        "version=2\n"
    );

    gw.ok(
        0,
        "git init -q --bare repo.git && git init -q work && cd work && echo one > f && git add f \
         && git -c user.name=lab -c user.email=lab@lab commit -qm first \
         && git push -q ../repo.git HEAD:refs/heads/main",
    );
    let local = tempfile::tempdir().unwrap();
    let git = |args: &[&str], cwd: &Path| {
        let mut c = Command::new("git");
        c.current_dir(cwd)
            .env("GIT_SSH_COMMAND", ssh_command(&gw, 0))
            .env("GIT_TRACE_PACKET", "1")
            .args([
                "-c",
                "protocol.version=2",
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
            ])
            .args(args);
        c
    };
    let remote = format!("{}:repo.git", gw.destination(0));
    let clone = must(
        &gw,
        git(&["clone", "-b", "main", &remote, "clone"], local.path()),
    );
    let trace = String::from_utf8_lossy(&clone.stderr);
    assert!(
        trace.contains("< version 2"),
        "the server spoke protocol v2 (GIT_PROTOCOL reached git-upload-pack): {trace}"
    );
    let work = local.path().join("clone");
    assert_eq!(std::fs::read_to_string(work.join("f")).unwrap(), "one\n");

    std::fs::write(work.join("g"), random_bytes(100_000, 7)).unwrap();
    must(&gw, git(&["add", "g"], &work));
    must(&gw, git(&["commit", "-qm", "second"], &work));
    must(&gw, git(&["push", "-q", "origin", "main"], &work));
    assert_eq!(
        gw.ok(0, "git -C repo.git log --format=%s main"),
        "second\nfirst\n"
    );
    let ours = must(&gw, git(&["rev-parse", "HEAD:g"], &work));
    assert_eq!(
        gw.ok(0, "git -C repo.git rev-parse main:g"),
        String::from_utf8_lossy(&ours.stdout),
        "the pushed blob is byte-exact"
    );
}

/// A gateway mounting labgate's static sftp server (built once), its user 0 as 1000:1001.
fn fallback_gateway() -> Gateway {
    Gateway::builder()
        .docker(&format!(
            "sftp_helper = \"{}\"\n",
            common::static_helper("labgate-sftp").display()
        ))
        .tail("[users.{u0}]\nuid = 1000\ngid = 1001\n")
        .start()
}

#[test]
fn the_builtin_sftp_server_serves_an_image_without_one_as_the_user() {
    // The busybox image has no sftp-server: labgate's own answers, mounted read-only.
    let gw = fallback_gateway();
    assert_eq!(
        gw.ok(
            0,
            "ls /usr/lib/openssh/sftp-server /usr/lib/sftp-server 2>/dev/null | wc -l"
        )
        .trim(),
        "0"
    );
    let local = tempfile::tempdir().unwrap();
    let data = random_bytes(5 << 20, 8);
    std::fs::write(local.path().join("up.bin"), &data).unwrap();
    let out = must(
        &gw,
        sftp(
            &gw,
            0,
            "mkdir inbox\nput up.bin inbox/data.bin\nrename inbox/data.bin inbox/moved.bin\n\
             ls -l inbox\nget inbox/moved.bin down.bin\npwd\n",
            local.path(),
        ),
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    let entries: Vec<&str> = listing
        .lines()
        .filter(|l| !l.starts_with("sftp>"))
        .collect();
    assert!(
        entries.iter().any(|l| l.ends_with(" moved.bin"))
            && !entries.iter().any(|l| l.ends_with("data.bin")),
        "ls after rename: {listing}"
    );
    assert!(
        listing.contains(&format!("Remote working directory: /home/{}", gw.users[0])),
        "{listing}"
    );
    assert!(
        std::fs::read(local.path().join("down.bin")).unwrap() == data,
        "get differs"
    );
    let on_host = home(&gw).join("inbox/moved.bin");
    assert!(
        std::fs::read(&on_host).unwrap() == data,
        "stored bytes differ"
    );
    assert_owned_by_user(&on_host);
    assert_owned_by_user(&home(&gw).join("inbox"));
    assert_eq!(
        gw.ok(0, "sha256sum inbox/moved.bin | cut -d' ' -f1"),
        gw.ok(0, "cat inbox/moved.bin | sha256sum | cut -d' ' -f1")
    );

    // scp (the sftp protocol) both ways.
    let back = local.path().join("back.bin");
    let mut up = Command::new("scp");
    up.args(gw.ssh_options(0))
        .arg(local.path().join("up.bin"))
        .arg(format!("{}:scp.bin", gw.destination(0)));
    must(&gw, up);
    let mut down = Command::new("scp");
    down.args(gw.ssh_options(0))
        .arg(format!("{}:scp.bin", gw.destination(0)))
        .arg(&back);
    must(&gw, down);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "scp round trip differs"
    );
    assert_owned_by_user(&home(&gw).join("scp.bin"));

    // It runs as the user: what the user may not write, it may not either.
    for (batch, what) in [
        ("put up.bin /etc/labgate-test\n", "a file in /etc"),
        (
            "put up.bin /.labgate/sftp-server\n",
            "labgate's read-only helper",
        ),
    ] {
        let out = run_within(sftp(&gw, 0, batch, local.path()), Duration::from_secs(60));
        assert!(!out.status.success(), "{what} was writable: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Permission denied")
                || err.contains("Read-only file system")
                || err.contains("Failure"),
            "{what}: {err}"
        );
    }
    assert!(!gw.run(0, "test -e /etc/labgate-test").status.success());

    must(
        &gw,
        sftp(
            &gw,
            0,
            "rm inbox/moved.bin\nrmdir inbox\nrm scp.bin\n",
            local.path(),
        ),
    );
    assert!(!home(&gw).join("inbox").exists(), "rm/rmdir took effect");
    assert!(!home(&gw).join("scp.bin").exists());
}

#[test]
fn sftp_without_any_sftp_server_fails_clearly_and_other_subsystems_are_refused() {
    // The busybox image has no sftp-server, and labgate's own is not installed here.
    let gw = Gateway::start(1, "", "[docker]\nsftp_helper = \"absent/labgate-sftp\"\n");
    let local = tempfile::tempdir().unwrap();
    let out = run_within(sftp(&gw, 0, "ls\n", local.path()), Duration::from_secs(60));
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "labgate: this image has no sftp-server and labgate's built-in one is not mounted"
        ),
        "{err}"
    );

    let mut other = gw.ssh(0);
    other.args(["-s", "netconf"]);
    let out = run_within(other, Duration::from_secs(60));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("subsystem request failed"),
        "{out:?}"
    );
}

/// What the stdin of each `sftp-server` in user 0's container is (`socket:[N]` or
/// `pipe:[N]`), read on the host (the server makes itself undumpable, so its own user cannot
/// read its `/proc/PID/fd`).
fn sftp_server_stdin(gw: &Gateway) -> Vec<String> {
    let top = Command::new("docker")
        .args(["top", &gw.container(0), "-o", "pid,comm"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&top.stdout)
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [pid, "sftp-server"] => std::fs::read_link(format!("/proc/{pid}/fd/0")).ok(),
            _ => None,
        })
        .map(|p| p.display().to_string())
        .collect()
}

/// An sftp session of user 0 held open (its stdin is never written to or closed until the
/// child is dropped), once its server runs; returns it with what the server's stdin is.
fn held_sftp_session(gw: &Gateway) -> (std::process::Child, String) {
    let mut ssh = gw.ssh(0);
    ssh.args(["-s", "sftp"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let child = ssh.spawn().unwrap();
    let mut fd0 = Vec::new();
    let running = common::eventually(Duration::from_secs(60), || {
        fd0 = sftp_server_stdin(gw);
        !fd0.is_empty()
    });
    assert!(running, "no sftp-server ran:\n{}", gw.log());
    assert_eq!(fd0.len(), 1, "one server: {fd0:?}");
    (child, fd0.remove(0))
}

/// Byte-exact `put` then `get` of a few MiB through sftp as user 0.
fn round_trip(gw: &Gateway, seed: u64) {
    let local = tempfile::tempdir().unwrap();
    let data = random_bytes(6 << 20, seed);
    std::fs::write(local.path().join("up.bin"), &data).unwrap();
    must(
        gw,
        sftp(
            gw,
            0,
            "put up.bin rt.bin\nget rt.bin down.bin\n",
            local.path(),
        ),
    );
    assert!(
        std::fs::read(home(gw).join("rt.bin")).unwrap() == data,
        "uploaded bytes differ"
    );
    assert!(
        std::fs::read(local.path().join("down.bin")).unwrap() == data,
        "downloaded bytes differ"
    );
}

#[test]
fn sftp_runs_on_a_private_one_shot_socket_that_is_gone_once_connected() {
    let gw = debian_gateway();
    round_trip(&gw, 9);
    assert!(gw.log().contains("on the direct path"), "{}", gw.log());

    // While a session runs, its server talks over a socket (not the engine's exec pipes), and
    // the socket's directory is already gone: nobody else can connect to it.
    let (mut child, fd0) = held_sftp_session(&gw);
    assert!(fd0.starts_with("socket:"), "sftp-server's stdin: {fd0}");
    assert_eq!(
        gw.ok(0, "ls -d /tmp/labgate-io-* 2>/dev/null | wc -l")
            .trim(),
        "0"
    );
    drop(child.stdin.take());
    let _ = child.wait();
    assert!(
        common::eventually(Duration::from_secs(20), || sftp_server_stdin(&gw)
            .is_empty()),
        "the server ended with its session"
    );
    assert_eq!(
        gw.ok(0, "ls -d /tmp/labgate-io-* 2>/dev/null | wc -l")
            .trim(),
        "0"
    );
}

#[test]
fn sftp_still_runs_on_the_exec_stream_when_forwards_do_not_enter_namespaces() {
    ensure_debian_image();
    let gw = Gateway::builder()
        .docker("forward_via = \"exec\"\n")
        .tail(DEBIAN_USER)
        .start();
    round_trip(&gw, 10);
    let (mut child, fd0) = held_sftp_session(&gw);
    assert!(fd0.starts_with("pipe:"), "sftp-server's stdin: {fd0}");
    drop(child.stdin.take());
    let _ = child.wait();
    assert!(!gw.log().contains("on the direct path"), "{}", gw.log());
}

#[test]
fn sftp_falls_back_to_the_exec_stream_when_the_relay_does_not_get_ready() {
    ensure_debian_image();
    // A "relay" that exits at once without a word, as a broken or missing one would.
    let tail = format!("[docker]\nrelay_helper = \"/bin/true\"\n\n{DEBIAN_USER}");
    let gw = Gateway::start(1, "", &tail);
    round_trip(&gw, 11);
    let log = gw.log();
    assert!(
        log.contains("direct path not available: using the exec stream"),
        "{log}"
    );
    let (mut child, fd0) = held_sftp_session(&gw);
    assert!(fd0.starts_with("pipe:"), "sftp-server's stdin: {fd0}");
    drop(child.stdin.take());
    let _ = child.wait();
}

#[test]
fn an_sftp_client_killed_mid_download_leaves_no_server_and_no_fds() {
    let gw = debian_gateway();
    // A file far larger than anything buffered on the way (sparse: reads as zeros).
    gw.ok(0, "truncate -s 4G big.bin");
    let pid = gw.pid();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let base_fds = fds();
    let local = tempfile::tempdir().unwrap();
    let mut cmd = sftp(&gw, 0, "get big.bin big.bin\n", local.path());
    // Its own process group, so the kill takes sftp and its ssh at once: a vanished client.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut client = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let got = || {
        std::fs::metadata(local.path().join("big.bin"))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    assert!(
        common::eventually(Duration::from_secs(60), || got() > 32 << 20),
        "the download did not get going ({} bytes)\n{}",
        got(),
        gw.log()
    );
    let servers = || {
        let out = Command::new("docker")
            .args(["top", &gw.container(0), "-o", "pid,args"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("sftp-server"))
            .count()
    };
    assert_eq!(servers(), 1, "one sftp-server serves the download");
    let group = rustix::process::Pid::from_raw(client.id() as i32).unwrap();
    rustix::process::kill_process_group(group, rustix::process::Signal::KILL).unwrap();
    client.wait().unwrap();

    assert!(
        common::eventually(Duration::from_secs(20), || servers() == 0),
        "the sftp-server outlived its client\n{}",
        gw.log()
    );
    assert!(
        common::eventually(Duration::from_secs(20), || fds() <= base_fds),
        "fds: {} after, {base_fds} before",
        fds()
    );
    // The gateway serves on: a fresh sftp session lists the file.
    let out = must(&gw, sftp(&gw, 0, "ls -l big.bin\n", local.path()));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("big.bin"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
