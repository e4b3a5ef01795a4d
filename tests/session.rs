//! Shell and command sessions as OpenSSH users know them: `SHELL -c`, separate stdout and
//! stderr, stdin EOF, exit status, terminals (size, resize, binary output), accepted env,
//! and what happens to processes when the client disappears.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, Terminal, eventually, pids_of};

#[test]
fn commands_run_through_the_shell_with_separate_streams_and_exit_status() {
    let gw = Gateway::start(1, "", "");
    let out = gw.run(
        0,
        "cd /tmp && echo out | tr a-z A-Z && echo err >&2; ls ~ >/dev/null && exit 42",
    );
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OUT\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(gw.run(0, "true").status.code(), Some(0));
    assert_eq!(gw.run(0, "false").status.code(), Some(1));
}

#[test]
fn stdin_reaches_the_command_and_its_eof_too() {
    let gw = Gateway::start(1, "", "");
    let mut child = gw
        .ssh(0)
        .arg("wc -c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"abc").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
}

#[test]
fn large_binary_data_passes_both_ways_byte_exact() {
    let gw = Gateway::start(1, "", "");
    let data = common::random_bytes(3_000_000, 76);
    let out = feed(&gw, "cat > blob && cat blob", &data);
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "bytes differ");
}

/// Runs `cmd` as user 0 with `data` as its stdin (written while the output is read).
fn feed(gw: &Gateway, cmd: &str, data: &[u8]) -> std::process::Output {
    let mut child = gw
        .ssh(0)
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        let data = data.to_vec();
        std::thread::spawn(move || stdin.write_all(&data).unwrap())
    };
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

#[test]
fn binary_output_through_a_pty_is_byte_exact() {
    let gw = Gateway::start(1, "", "");
    // Bytes 0x00-0x02 first: a stream-header guesser would eat them.
    let out = gw
        .ssh(0)
        .args(["-tt", r"printf '\001\002\003abcdefgh\000\377\376'"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", out);
    assert_eq!(out.stdout, b"\x01\x02\x03abcdefgh\x00\xff\xfe");
}

#[test]
fn accepted_env_passes_and_everything_else_is_refused() {
    let gw = Gateway::start(1, "", "");
    let out = gw
        .ssh(0)
        .args([
            "-o",
            "SetEnv=LANG=C.UTF-8 LC_ALL=C GIT_PROTOCOL=version=2 FOO=bar LD_PRELOAD=/evil.so PATH=/evil",
            "echo \"$LANG|$LC_ALL|$GIT_PROTOCOL|$FOO|$LD_PRELOAD\"; echo $PATH",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("C.UTF-8|C|version=2||"));
    assert!(!lines.next().unwrap_or("").contains("evil"));
}

#[test]
fn the_container_shell_is_sh_when_the_image_has_no_bash() {
    let gw = Gateway::start(1, "", "");
    assert_eq!(gw.ok(0, "echo $SHELL; echo $0"), "/bin/sh\n/bin/sh\n");
}

#[test]
fn the_configured_shell_is_used() {
    let gw = Gateway::start(1, "shell = \"/bin/ash\"", "");
    assert_eq!(gw.ok(0, "echo $SHELL; echo $0"), "/bin/ash\n/bin/ash\n");
}

#[test]
fn a_pty_gets_the_clients_term_and_size_and_follows_resizes() {
    let gw = Gateway::start(1, "", "");
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
}

#[test]
fn an_interactive_login_shell_runs_in_the_home_directory() {
    let gw = Gateway::start(1, "", "");
    let mut ssh = gw.ssh(0);
    ssh.args(["-tt"]);
    let mut term = Terminal::open(&mut ssh, 24, 80);
    term.send("echo \"where=$(pwd)\"\n");
    term.expect(&format!("where=/home/{}", gw.users[0]));
    term.send("exit 7\n");
    assert_eq!(
        term.wait().code(),
        Some(7),
        "exit status of the login shell"
    );
}

/// Spawns `ssh user cmd` in the background and waits until `marker` runs on the host.
fn spawn_until_running(gw: &Gateway, cmd: &str, marker: &str) -> std::process::Child {
    let child = gw.spawn_silent(0, cmd);
    assert!(
        eventually(Duration::from_secs(20), || !pids_of(marker).is_empty()),
        "{marker} never started; log:\n{}",
        gw.log()
    );
    child
}

#[test]
fn a_vanished_client_takes_its_processes_along_but_detached_ones_survive() {
    let gw = Gateway::start(1, "", "");
    let n = std::process::id() % 10_000;
    let plain = format!("sleep 1{n:04}1");
    let detached = format!("sleep 1{n:04}2");
    let nohup = format!("sleep 1{n:04}3");
    let child_job = format!("sleep 1{n:04}4");
    let cmd =
        format!("setsid {detached} & sh -c 'trap \"\" HUP; exec {nohup}' & {child_job} & {plain}");
    let mut ssh = spawn_until_running(&gw, &cmd, &plain);
    assert!(eventually(Duration::from_secs(10), || {
        [&detached, &nohup, &child_job]
            .iter()
            .all(|m| !pids_of(m).is_empty())
    }));
    ssh.kill().unwrap(); // SIGKILL: the client is gone without a word
    ssh.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || pids_of(&plain).is_empty()
            && pids_of(&child_job).is_empty()),
        "the session's processes must not linger; log:\n{}",
        gw.log()
    );
    assert!(!pids_of(&detached).is_empty(), "setsid job survives");
    assert!(
        !pids_of(&nohup).is_empty(),
        "a job ignoring SIGHUP (nohup) survives"
    );
    for m in [&detached, &nohup] {
        for pid in pids_of(m) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

#[test]
fn a_vanished_interactive_client_hangs_up_its_shell() {
    let gw = Gateway::start(1, "", "");
    let n = std::process::id() % 10_000;
    let marker = format!("sleep 2{n:04}1");
    let mut ssh = gw.ssh(0);
    ssh.args(["-tt"]);
    let mut term = Terminal::open(&mut ssh, 24, 80);
    term.send(&format!("{marker}\n"));
    assert!(eventually(Duration::from_secs(20), || !pids_of(&marker).is_empty()));
    term.child.kill().unwrap();
    term.child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || pids_of(&marker).is_empty()),
        "the foreground job of a hung-up terminal must end"
    );
}

#[test]
fn closing_a_channel_mid_command_ends_it_and_the_connection_stays_usable() {
    let gw = Gateway::start(1, "", "");
    let n = std::process::id() % 10_000;
    let marker = format!("sleep 3{n:04}1");
    let mut ssh = spawn_until_running(&gw, &marker, &marker);
    // SIGTERM: the client closes cleanly.
    let _ = Command::new("kill").arg(ssh.id().to_string()).status();
    ssh.wait().unwrap();
    assert!(eventually(Duration::from_secs(10), || pids_of(&marker).is_empty()));
    assert_eq!(gw.ok(0, "echo still-here"), "still-here\n");
}

#[test]
fn a_command_that_never_reads_stdin_does_not_stall_other_channels() {
    let gw = Gateway::start(1, "", "");
    let control = gw.dir.path().join("ctl");
    let mut master = gw
        .ssh(0)
        .args(["-N", "-M", "-S"])
        .arg(&control)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || control.exists()));
    // Channel 1 on the shared connection: 20 MB into a command that never reads them.
    let mut flood = gw
        .ssh(0)
        .arg("-S")
        .arg(&control)
        .arg("sleep 30")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = flood.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..20 {
            if input.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    // Channel 2 on the same connection still gets through.
    let mut other = gw
        .ssh(0)
        .arg("-S")
        .arg(&control)
        .arg("echo alive")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let done = eventually(Duration::from_secs(15), || {
        matches!(other.try_wait(), Ok(Some(_)))
    });
    let _ = flood.kill();
    let _ = master.kill();
    let _ = writer.join();
    assert!(
        done,
        "a second channel froze behind a command not reading its stdin"
    );
    let out = other.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alive\n");
    let _ = flood.wait();
    let _ = master.wait();
}

/// Where a command's stdin, stdout and stderr lead (`socket:[..]`, `pipe:[..]`, `/dev/pts/N`),
/// one line each, as `readlink` in the command sees them.
const STDIO: &str = "for f in 0 1 2; do readlink /proc/self/fd/$f; done";

fn stdio_kinds(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| l.trim().split(':').next().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn commands_without_a_terminal_talk_over_a_socket_and_with_one_through_the_terminal() {
    let gw = Gateway::start(1, "", "");
    // As deployed (the relay installed): stdin and stdout skip the engine's exec stream.
    let out = gw.ok(0, STDIO);
    assert_eq!(
        stdio_kinds(out.as_bytes()),
        ["socket", "socket", "pipe"],
        "{out}"
    );
    assert!(gw.log().contains("on the direct path"), "{}", gw.log());
    let out = gw.ssh(0).arg("-tt").arg(STDIO).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.lines().all(|l| l.trim().starts_with("/dev/pts/")),
        "{text}"
    );
}

#[test]
fn the_exec_stream_serves_commands_alike_when_the_direct_path_is_off() {
    let gw = Gateway::start(1, "", "[docker]\nforward_via = \"exec\"\n");
    let out = gw.ok(0, STDIO);
    assert_eq!(
        stdio_kinds(out.as_bytes()),
        ["pipe", "pipe", "pipe"],
        "{out}"
    );
    let out = gw.run(0, "echo out; echo err >&2; exit 42");
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let data = common::random_bytes(2_000_000, 77);
    let out = feed(&gw, "cat > blob && wc -c < blob >&2 && cat blob", &data);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "2000000");
    assert!(out.stdout == data, "bytes differ");
    assert!(!gw.log().contains("on the direct path"), "{}", gw.log());
}

#[test]
fn a_container_whose_relay_fails_pays_for_the_attempt_once() {
    // A "relay" that exits at once without a word, as a broken or missing one would.
    let gw = Gateway::start(1, "", "[docker]\nrelay_helper = \"/bin/true\"\n");
    for _ in 0..3 {
        assert_eq!(gw.ok(0, "echo hi").trim(), "hi");
    }
    assert_eq!(
        gw.log().matches("direct path not available").count(),
        1,
        "{}",
        gw.log()
    );
}

#[test]
fn a_background_job_that_keeps_stdout_does_not_hold_the_session() {
    let gw = Gateway::start(1, "", "");
    let n = std::process::id() % 10_000;
    let marker = format!("sleep 6{n:04}");
    // The whole list runs in the background, with the command's stdout (a classic of
    // `ssh host 'cd x && server &'`): the session ends with the shell, as with docker exec.
    let t0 = Instant::now();
    let out = gw.run(0, &format!("(echo early; {marker}; echo late) & exit 3"));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the session waited for the background job"
    );
    assert!(!pids_of(&marker).is_empty(), "the job runs on");
    for pid in pids_of(&marker) {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    // What the job wrote before the shell's exit may or may not have been read; never "late".
    assert!(!String::from_utf8_lossy(&out.stdout).contains("late"));
}
