//! Sessions and the container's life, as every backend must provide them.

use std::io::{Read, Write};
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use russh::Sig;

use super::Way;
use crate::common::client::{connect, ending};
use crate::common::{Terminal, eventually, stderr_of};

/// A `sleep` command line no other test (nor another run) uses, to find its process by its
/// command line ([`Way::runs`]).
fn marker() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    format!("sleep 8{:04}{n:03}", std::process::id() % 10_000)
}

/// Spawns `ssh user0 cmd` in the background and waits until `marker` runs.
fn spawn_until_running(way: Way, gw: &crate::Gateway, cmd: &str, marker: &str) -> Child {
    let child = gw.spawn_silent(0, cmd);
    assert!(
        eventually(Duration::from_secs(20), || way.runs(&gw.users[0], marker)),
        "{marker} never started; log:\n{}",
        gw.log()
    );
    child
}

/// Runs `cmd` as user 0 with `input` on its stdin (written while the output is read, then
/// closed); fails if the command has not ended 30 s after its stdin closed.
fn feed(gw: &crate::Gateway, cmd: &str, input: &[u8]) -> Output {
    let mut child = gw
        .ssh(0)
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).unwrap();
        buf
    });
    writer.join().unwrap();
    let ended = eventually(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !ended {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "`{cmd}` did not end after its stdin closed; log:\n{}",
            gw.log()
        );
    }
    let mut out = child.wait_with_output().unwrap();
    out.stdout = reader.join().unwrap();
    out
}

pub fn concurrent_first_logins_make_exactly_one_container(way: Way) {
    let gw = way.gateway(1);
    let children: Vec<_> = (0..8)
        .map(|i| {
            gw.ssh(0)
                .arg(format!("echo login{i}"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "login {i}: {}", stderr_of(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("login{i}\n"));
    }
    assert_eq!(way.containers_of(&gw, 0), 1);
    way.assert_commands_went_this_way(&gw);
}

pub fn stdout_and_stderr_stay_apart_without_a_terminal(way: Way) {
    let gw = way.gateway(1);
    // Interleaved writes, many of them: a stream mixed up or reordered shows.
    let out = gw.run(
        0,
        "test -t 0 || test -t 1 || test -t 2 || echo no-tty; \
         i=0; while [ $i -lt 300 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done",
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let expected = |what: &str| (0..300).map(|i| format!("{what}{i}\n")).collect::<String>();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("no-tty\n{}", expected("out"))
    );
    // The gateway's own lines go to stderr too, by design (`session::progress`: a start that
    // waits, as a swarm placement over 0.5 s or an image pull, says so, and stdout stays
    // byte-exact); what the command wrote comes after them, whole and in order.
    let stderr = stderr_of(&out);
    let (gateway, command): (Vec<&str>, Vec<&str>) =
        stderr.lines().partition(|l| l.starts_with("labgate: "));
    assert_eq!(
        command.iter().map(|l| format!("{l}\n")).collect::<String>(),
        expected("err"),
        "the gateway said: {gateway:?}"
    );
    assert!(
        stderr.ends_with(&expected("err")),
        "a gateway line amid the command's stderr:\n{stderr}"
    );
    way.assert_commands_went_this_way(&gw);
}

pub fn exit_status_and_death_by_a_signal_come_back(way: Way) {
    let gw = way.gateway(1);
    for (cmd, code) in [
        ("true", 0),
        ("false", 1),
        ("exit 42", 42),
        ("exit 255", 255),
    ] {
        let out = gw.run(0, cmd);
        assert_eq!(
            out.status.code(),
            Some(code),
            "`{cmd}`: {}",
            stderr_of(&out)
        );
    }
    // A shell killed by a signal it sent itself ends with the code the engine reports, 128 +
    // the signal, as an exit status. (sshd would send exit-signal and ssh would exit 255, but
    // the engine does not tell this from `exit 143`; a signal labgate delivers itself does
    // come back as exit-signal: the next behaviour.)
    for (cmd, code) in [("kill -TERM $$", 143), ("kill -KILL $$", 137)] {
        let out = gw.run(0, cmd);
        assert_eq!(
            out.status.code(),
            Some(code),
            "`{cmd}`: {}",
            stderr_of(&out)
        );
    }
    way.assert_commands_went_this_way(&gw);
}

pub fn a_signal_request_comes_back_as_exit_signal(way: Way) {
    let gw = way.gateway(1);
    let marker = marker();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (signal, status) = rt.block_on(async {
        let handle = connect(&gw, 0).await;
        let mut channel = handle.channel_open_session().await.unwrap();
        channel.exec(true, marker.as_bytes()).await.unwrap();
        let (m, user) = (marker.clone(), gw.users[0].clone());
        let running = tokio::task::spawn_blocking(move || {
            eventually(Duration::from_secs(20), || way.runs(&user, &m))
        })
        .await
        .unwrap();
        assert!(running, "{marker} never started: {}", gw.log());
        channel.signal(Sig::TERM).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), ending(&mut channel))
            .await
            .expect("the channel did not end after SIGTERM")
    });
    assert_eq!(
        (signal.as_deref(), status),
        (Some("TERM"), None),
        "{}",
        gw.log()
    );
    assert!(
        !way.runs(&gw.users[0], &marker),
        "{marker} outlived its signal"
    );
    way.assert_commands_went_this_way(&gw);
}

pub fn stdin_reaches_the_command_and_its_eof_ends_it(way: Way) {
    let gw = way.gateway(1);
    let out = feed(&gw, "wc -c", b"abc");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    // `cat` ends only on EOF; what it echoes is byte-exact.
    let data = crate::common::random_bytes(1_000_000, 16);
    let out = feed(&gw, "cat", &data);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "bytes differ");
    // EOF sent while the command already runs (it echoed a first line) ends it too.
    let mut cat = gw
        .ssh(0)
        .arg("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = cat.stdin.take().unwrap();
    let mut stdout = cat.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    stdin.write_all(b"first\n").unwrap();
    let mut echoed = Vec::new();
    while echoed != b"first\n" {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(chunk) => echoed.extend(chunk),
            Err(_) => {
                let _ = cat.kill();
                panic!("cat did not echo its first line: {echoed:?}");
            }
        }
    }
    drop(stdin);
    let ended = eventually(Duration::from_secs(20), || {
        matches!(cat.try_wait(), Ok(Some(_)))
    });
    let _ = cat.kill();
    assert!(ended, "cat did not end at an EOF sent while it ran");
    assert!(cat.wait().unwrap().success());
    way.assert_commands_went_this_way(&gw);
}

pub fn a_terminal_has_the_clients_size_and_follows_resizes(way: Way) {
    let gw = way.gateway(1);
    let mut ssh = gw.ssh(0);
    ssh.env("TERM", "xterm-256color").args([
        "-tt",
        "echo term=$TERM; stty size | sed 's/^/size=/'; read line; stty size | sed 's/^/size=/'; tty",
    ]);
    let mut term = Terminal::open(&mut ssh, 40, 100);
    term.expect("term=xterm-256color");
    term.expect("size=40 100");
    term.resize(50, 132);
    // Give the window-change a moment to travel before the next `stty size`.
    std::thread::sleep(Duration::from_millis(500));
    term.send("\n");
    term.expect("size=50 132");
    term.expect("/dev/pts/");
    assert!(term.wait().success());
    way.assert_set(&gw);
}

pub fn a_vanished_client_hangs_up_its_command(way: Way) {
    let gw = way.gateway(1);
    let marker = marker();
    let mut ssh = spawn_until_running(way, &gw, &marker, &marker);
    ssh.kill().unwrap(); // SIGKILL: the client is gone without a word
    ssh.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !way.runs(&gw.users[0], &marker)),
        "{marker} outlived its client; log:\n{}",
        gw.log()
    );
    way.assert_commands_went_this_way(&gw);
}

pub fn a_vanished_client_hangs_up_its_terminal(way: Way) {
    let gw = way.gateway(1);
    let marker = marker();
    let mut ssh = gw.ssh(0);
    ssh.arg("-tt");
    let mut term = Terminal::open(&mut ssh, 24, 80);
    term.send(&format!("{marker}\n"));
    assert!(
        eventually(Duration::from_secs(20), || way.runs(&gw.users[0], &marker)),
        "{marker} never started; log:\n{}",
        gw.log()
    );
    term.child.kill().unwrap();
    term.child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !way.runs(&gw.users[0], &marker)),
        "the foreground job of a hung-up terminal must end; log:\n{}",
        gw.log()
    );
    way.assert_set(&gw);
}

/// `labgate status --json`.
fn status(gw: &crate::Gateway) -> serde_json::Value {
    let out = gw.labgate(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The container `name` as `labgate status` lists it.
fn listed(gw: &crate::Gateway, name: &str) -> Option<serde_json::Value> {
    status(gw)["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
}

pub fn status_lists_the_container_and_stop_stops_it(way: Way) {
    let gw = way.gateway(1);
    let name = gw.container(0);
    let user = gw.users[0].clone();
    let marker = marker();
    let mut session = spawn_until_running(way, &gw, &marker, &marker);
    let row = listed(&gw, &name).unwrap_or_else(|| panic!("{name} not listed: {}", status(&gw)));
    assert_eq!(row["state"], "running", "{row}");
    assert_eq!(row["image"], crate::common::IMAGE, "{row}");
    assert_eq!(row["user"], user.as_str(), "{row}");
    let connection = status(&gw)["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["user"] == user.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no connection of {user}: {}", status(&gw)));
    assert_eq!(connection["container"], name.as_str(), "{connection}");
    assert_eq!(connection["sessions"], 1, "{connection}");
    session.kill().unwrap();
    session.wait().unwrap();

    let out = gw.labgate(&["stop", &user]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&name),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    way.assert_stopped(&gw, 0);
    let row = listed(&gw, &name).unwrap_or_else(|| panic!("{name} not listed: {}", status(&gw)));
    assert_eq!(row["state"], "exited", "{row}");
    // The next login starts it again.
    assert_eq!(gw.ok(0, "echo back"), "back\n");
    assert_eq!(listed(&gw, &name).unwrap()["state"], "running");
    way.assert_commands_went_this_way(&gw);
}

/// Replaces `from` by `to` in the gateway's config as editors do (a new file renamed over
/// the old one) and waits for the reload to be logged.
fn edit_config(gw: &crate::Gateway, from: &str, to: &str) {
    let path = gw.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from} not in the config:\n{text}");
    let reloads = gw.log().matches("config reloaded").count();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text.replacen(from, to, 1)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || gw
            .log()
            .matches("config reloaded")
            .count()
            > reloads),
        "no reload; log:\n{}",
        gw.log()
    );
}

pub fn the_home_survives_a_recreate(way: Way) {
    let gw = way.gateway(1);
    gw.ok(0, "echo kept > ~/file");
    let id = way.container_id(&gw, 0).unwrap();
    assert_eq!(
        way.shm_bytes(&gw, 0),
        Some(32 << 20),
        "the first /dev/shm size"
    );
    // A change only a new container can have, applied at its next start. (Local Docker
    // keeps a stopped container and makes it again at the next login because its settings
    // changed. On the swarm every stop removes the task's container, so "made again" holds
    // whatever changed; what this checks there is that the scale-up after the stop gives the
    // service the changed settings.)
    edit_config(&gw, "shm = \"32M\"", "shm = \"64M\"");
    let out = gw.labgate(&["stop", &gw.users[0]]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = gw.run(0, "cat ~/file");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n", "home kept");
    assert_ne!(
        way.container_id(&gw, 0).unwrap(),
        id,
        "the container was not made again"
    );
    assert_eq!(
        way.shm_bytes(&gw, 0),
        Some(64 << 20),
        "the new /dev/shm size"
    );
    way.assert_commands_went_this_way(&gw);
}
