//! Key options and certificates with the real OpenSSH client and the busybox image: `no-pty`
//! and `restrict`, `from=` patterns, forced commands (`command=`, with `SSH_ORIGINAL_COMMAND`,
//! replacing exec, shell and sftp), `expiry-time=`, a misspelled option, and user certificates
//! signed by a CA in `[server] trusted_user_ca_keys` (accepted; another CA, another principal,
//! an expired certificate, a `source-address` elsewhere refused; `force-command` and the
//! missing `permit-pty` honoured). Every login that must be refused is checked to be refused,
//! and the reason the gateway logged is checked where the client cannot see it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Gateway, eventually, keygen};

/// Replaces user `i`'s key file with their key behind `options`.
fn set_options(gw: &Gateway, i: usize, options: &str) {
    let file = gw.dir.path().join(format!("keys/{}.pub", gw.users[i]));
    std::fs::write(&file, format!("{options} {}", gw.keys[i].public)).unwrap();
}

/// Runs `ssh [args] cmd` as user `i`, stdin closed.
fn ssh(gw: &Gateway, i: usize, args: &[&str]) -> Output {
    gw.ssh(i).args(args).stdin(Stdio::null()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts the login was refused, and that the gateway's audit line for it gives `reason`.
fn assert_refused(gw: &Gateway, out: &Output, reason: &str) {
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("Permission denied (publickey)"), "{err}");
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .lines()
            .any(|l| l.contains("login refused") && l.contains(reason))),
        "the gateway should log a refusal with {reason:?}:\n{}",
        gw.log()
    );
}

fn assert_ran(gw: &Gateway, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{out:?}\nstderr: {}\nlog:\n{}",
        text(&out.stderr),
        gw.log()
    );
    text(&out.stdout)
}

/// An interactive `ssh` (no command, no `-t`) for user `i` on a real terminal, as a person
/// types it: the client asks for a pty because its stdin is a terminal. Types `input`, then
/// returns everything the terminal showed until the client exited.
fn interactive(gw: &Gateway, i: usize, input: &str) -> String {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut child = {
        let mut cmd = gw.ssh(i);
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        cmd.spawn().unwrap()
    };
    let mut master = std::fs::File::from(pty.master);
    let fd = master.as_fd();
    let flags = rustix::fs::fcntl_getfl(fd).unwrap();
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK).unwrap();
    master.write_all(input.as_bytes()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // EIO: the client exited and closed the terminal.
            _ => break,
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    text(&seen)
}

#[test]
fn no_pty_refuses_the_terminal_and_the_session_runs_without_one() {
    let gw = Gateway::start(1, "", "");
    let session = "tty; echo done-$((40+2)); exit\n";
    // Without the option, an interactive login gets a terminal.
    let shown = interactive(&gw, 0, session);
    assert!(shown.contains("/dev/pts/"), "{shown}");
    assert!(shown.contains("done-42"), "{shown}");

    for options in ["no-pty", "restrict", "restrict,port-forwarding"] {
        set_options(&gw, 0, options);
        // The client says it got no terminal; the shell runs anyway, without one.
        let shown = interactive(&gw, 0, session);
        assert!(
            shown.contains("PTY allocation request failed"),
            "{options}: {shown}"
        );
        assert!(shown.contains("not a tty"), "{options}: {shown}");
        assert!(shown.contains("done-42"), "{options}: {shown}");
        // `ssh -tt` insists on a terminal: the client gives up on the refusal, as it does
        // against sshd.
        let out = ssh(&gw, 0, &["-tt", "echo ran"]);
        assert!(
            text(&out.stderr).contains("PTY allocation request failed"),
            "{options}: {out:?}"
        );
        assert!(!text(&out.stdout).contains("ran"), "{options}: {out:?}");
        // A plain exec is untouched.
        let out = ssh(&gw, 0, &["echo plain"]);
        assert_eq!(assert_ran(&gw, &out), "plain\n");
    }

    // `restrict,pty` gives the terminal back.
    set_options(&gw, 0, "restrict,pty");
    let out = ssh(&gw, 0, &["-tt", "tty"]);
    assert!(assert_ran(&gw, &out).contains("/dev/pts/"), "{out:?}");
}

#[test]
fn from_patterns_are_matched_against_the_client_address() {
    let gw = Gateway::start(1, "", "");
    for allowed in [
        r#"from="127.0.0.1""#,
        r#"from="127.0.0.0/8""#,
        r#"from="10.0.0.0/8,127.0.0.*""#,
        r#"from="!10.1.2.3,*""#,
    ] {
        set_options(&gw, 0, allowed);
        let out = ssh(&gw, 0, &["echo in"]);
        assert_eq!(assert_ran(&gw, &out), "in\n", "{allowed}");
    }
    for refused in [
        r#"from="10.0.0.0/8""#,
        r#"from="!127.0.0.1,*""#,
        r#"from="*,!127.0.0.0/8""#,
        r#"from="localhost""#,
    ] {
        set_options(&gw, 0, refused);
        let out = ssh(&gw, 0, &["echo in"]);
        let patterns = refused.trim_start_matches("from=").trim_matches('"');
        assert_refused(
            &gw,
            &out,
            &format!("client address 127.0.0.1 is not permitted by from=\"{patterns}\""),
        );
    }
}

#[test]
fn a_forced_command_replaces_exec_shell_and_sftp() {
    let gw = Gateway::start(1, "", "");
    set_options(
        &gw,
        0,
        r#"command="echo \"${SSH_ORIGINAL_COMMAND-unset}\" >> orig.log; echo forced:${SSH_ORIGINAL_COMMAND-unset}""#,
    );
    let out = ssh(&gw, 0, &["echo asked; id"]);
    assert_eq!(assert_ran(&gw, &out), "forced:echo asked; id\n");
    // A shell: no SSH_ORIGINAL_COMMAND.
    let out = ssh(&gw, 0, &[]);
    assert_eq!(assert_ran(&gw, &out), "forced:unset\n");
    // A subsystem: the forced command runs instead of the sftp server.
    let out = ssh(&gw, 0, &["-s", "sftp"]);
    assert_eq!(
        assert_ran(&gw, &out),
        "forced:/usr/lib/openssh/sftp-server\n"
    );
    let local = tempfile::tempdir().unwrap();
    let batch = local.path().join("batch");
    std::fs::write(&batch, "ls\n").unwrap();
    let mut opts = gw.ssh_options(0);
    opts.extend(["-b".to_owned(), batch.display().to_string()]);
    let sftp = Command::new("sftp")
        .args(&opts)
        .arg(gw.destination(0))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!sftp.status.success(), "{sftp:?}");
    let log = std::fs::read_to_string(gw.dir.path().join(format!("home/{}/orig.log", gw.users[0])))
        .unwrap();
    assert_eq!(
        log,
        "echo asked; id\nunset\n/usr/lib/openssh/sftp-server\n/usr/lib/openssh/sftp-server\n"
    );
    assert!(gw.log().contains("forced command"), "{}", gw.log());
}

#[test]
fn permitlisten_limits_remote_forwards() {
    let gw = Gateway::start(1, "", "");
    set_options(&gw, 0, r#"permitlisten="localhost:7070""#);
    let remote = |spec: &str| {
        ssh(
            &gw,
            0,
            &[
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                spec,
                "echo listening",
            ],
        )
    };
    assert_eq!(assert_ran(&gw, &remote("7070:127.0.0.1:9")), "listening\n");
    let out = remote("7071:127.0.0.1:9");
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).contains("remote port forwarding failed for listen port 7071"),
        "{out:?}"
    );
    assert!(
        gw.log()
            .contains("localhost:7071 is not in this key's permitlisten list"),
        "{}",
        gw.log()
    );
}

#[test]
fn expiry_time_in_the_past_is_refused_and_in_the_future_accepted() {
    let gw = Gateway::start(1, "", "");
    set_options(&gw, 0, r#"expiry-time="29991231""#);
    assert_eq!(assert_ran(&gw, &ssh(&gw, 0, &["echo ok"])), "ok\n");
    set_options(&gw, 0, r#"expiry-time="202001010000Z""#);
    let out = ssh(&gw, 0, &["echo ok"]);
    assert_refused(&gw, &out, "key expired (expiry-time 2020-01-01T00:00:00Z)");
}

#[test]
fn a_misspelled_option_makes_the_line_unusable_and_is_logged_with_file_and_line() {
    let gw = Gateway::start(1, "", "");
    let file = gw.dir.path().join(format!("keys/{}.pub", gw.users[0]));
    std::fs::write(&file, format!("# keys\nno-ptty {}", gw.keys[0].public)).unwrap();
    let out = ssh(&gw, 0, &["echo ok"]);
    assert_refused(&gw, &out, "key not authorized for this user");
    let log = gw.log();
    assert!(
        log.contains(&format!(
            "{}:2: unknown key option \"no-ptty\"",
            file.display()
        )),
        "{log}"
    );
}

/// Removes a container the gateway made for a user it was not started with.
struct RemoveContainer(String);

impl Drop for RemoveContainer {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A CA made with ssh-keygen in `dir`.
struct Ca {
    key: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let pair = keygen(dir, name);
        Ca { key: pair.private }
    }

    fn public(&self) -> String {
        std::fs::read_to_string(self.key.with_extension("pub")).unwrap()
    }

    /// Signs `key`'s public half for `principals` with `extra` ssh-keygen options (`-V`,
    /// `-O`); returns the certificate path (`KEY-cert.pub`).
    fn sign(&self, key: &Path, principals: &str, extra: &[&str]) -> PathBuf {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(&self.key)
            .args(["-I", "test-cert", "-n", principals])
            .args(extra)
            .arg(key.with_extension("pub"))
            .status()
            .unwrap();
        assert!(st.success(), "ssh-keygen -s failed");
        let mut cert = key.as_os_str().to_owned();
        cert.push("-cert.pub");
        PathBuf::from(cert)
    }
}

/// A gateway trusting `ca` for user certificates (the config is edited, then the gateway
/// restarted on it).
fn gateway_trusting(ca: &Ca, tail: &str) -> Gateway {
    let mut gw = Gateway::start(2, "", tail);
    std::fs::write(gw.dir.path().join("user_ca.pub"), ca.public()).unwrap();
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    let config = config.replacen(
        "[server]\n",
        "[server]\ntrusted_user_ca_keys = \"user_ca.pub\"\n",
        1,
    );
    std::fs::write(gw.config_path(), config).unwrap();
    gw.stop();
    gw.spawn();
    gw
}

/// `ssh` as `user` with `key` and its certificate `cert`, running `args`.
fn ssh_cert(gw: &Gateway, user: &str, key: &Path, cert: &Path, args: &[&str]) -> Output {
    gw.ssh_as(user, key)
        .arg("-o")
        .arg(format!("CertificateFile={}", cert.display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn certificates_from_the_trusted_ca_log_in_and_others_are_refused() {
    let cas = tempfile::tempdir().unwrap();
    let ca = Ca::new(cas.path(), "lab_ca");
    let other_ca = Ca::new(cas.path(), "other_ca");
    // A user known only by a [users.NAME] table, without a key file.
    let tabled = common::unique_user("tab");
    let _cleanup = RemoveContainer(format!("labgate-{tabled}"));
    let gw = gateway_trusting(&ca, &format!("[users.{tabled}]\nmemory = \"128M\"\n"));
    let user = gw.users[0].clone();
    // A key that is in no key file: only its certificate can let it in.
    let key = keygen(cas.path(), "carried").private;

    let cert = ca.sign(&key, &format!("someone,{user}"), &["-V", "-5m:+1h"]);
    let out = ssh_cert(&gw, &user, &key, &cert, &["echo $USER; tty || true"]);
    assert_eq!(assert_ran(&gw, &out), format!("{user}\nnot a tty\n"));
    assert!(gw.log().contains("login accepted (certificate)"));
    assert!(gw.log().contains("key_id=test-cert"));
    // ssh-keygen's default extensions grant a terminal.
    let out = ssh_cert(&gw, &user, &key, &cert, &["-tt", "tty"]);
    assert!(assert_ran(&gw, &out).contains("/dev/pts/"), "{out:?}");
    // The same certificate for another user is not among its principals.
    let out = ssh_cert(&gw, &gw.users[1], &key, &cert, &["true"]);
    assert_refused(
        &gw,
        &out,
        &format!(
            "\"{}\" is not among the certificate's principals",
            gw.users[1]
        ),
    );

    let foreign = other_ca.sign(&key, &user, &["-V", "-5m:+1h"]);
    let out = ssh_cert(&gw, &user, &key, &foreign, &["true"]);
    assert_refused(&gw, &out, "certificate signed by an untrusted CA");

    let expired = ca.sign(&key, &user, &["-V", "20200101:20200102"]);
    let out = ssh_cert(&gw, &user, &key, &expired, &["true"]);
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(text(&out.stderr).contains("Permission denied (publickey)"));

    let elsewhere = ca.sign(&key, &user, &["-O", "source-address=10.0.0.0/8"]);
    let out = ssh_cert(&gw, &user, &key, &elsewhere, &["true"]);
    assert_refused(
        &gw,
        &out,
        "client address 127.0.0.1 is not permitted by source-address=\"10.0.0.0/8\"",
    );

    // A [users.NAME] table is enough for a certificate login.
    let cert = ca.sign(&key, &tabled, &[]);
    let out = ssh_cert(&gw, &tabled, &key, &cert, &["echo $USER"]);
    assert_eq!(assert_ran(&gw, &out), format!("{tabled}\n"));

    // A name with no key file and no [users.NAME] table is unknown, certificate or not.
    let stranger = common::unique_user("nobody");
    let cert = ca.sign(&key, &stranger, &[]);
    let out = ssh_cert(&gw, &stranger, &key, &cert, &["true"]);
    assert_refused(&gw, &out, &format!("user={stranger} peer=127.0.0.1"));
    assert_refused(&gw, &out, "reason=unknown user");
    assert_eq!(common::containers_named(&format!("labgate-{stranger}")), 0);
}

#[test]
fn certificate_options_force_the_command_and_withhold_the_terminal() {
    let cas = tempfile::tempdir().unwrap();
    let ca = Ca::new(cas.path(), "lab_ca");
    let gw = gateway_trusting(&ca, "");
    let user = gw.users[0].clone();
    let key = keygen(cas.path(), "carried").private;
    let cert = ca.sign(
        &key,
        &user,
        &[
            "-O",
            "force-command=echo from-cert:${SSH_ORIGINAL_COMMAND-unset}",
            "-O",
            "no-pty",
        ],
    );
    let out = ssh_cert(&gw, &user, &key, &cert, &["echo asked"]);
    assert_eq!(assert_ran(&gw, &out), "from-cert:echo asked\n");
    // No permit-pty: the terminal is refused (and `-tt` gives up, as against sshd).
    let out = ssh_cert(&gw, &user, &key, &cert, &["-tt", "echo asked"]);
    assert!(
        text(&out.stderr).contains("PTY allocation request failed"),
        "{out:?}"
    );
    // The user's own key file is not touched by the certificate's options.
    assert_eq!(assert_ran(&gw, &ssh(&gw, 0, &["echo own"])), "own\n");
}

#[test]
fn labgate_check_reports_bad_key_options_and_ca_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    let pair = keygen(dir.path(), "id_alice");
    let config = dir.path().join("labgate.toml");
    std::fs::write(
        &config,
        "[server]\nkeys_dir = \"keys\"\ntrusted_user_ca_keys = \"user_ca.pub\"\n\n[defaults]\nimage = \"busybox\"\n",
    )
    .unwrap();
    let keyfile = dir.path().join("keys/alice.pub");
    std::fs::write(
        &keyfile,
        format!("{}from=\"10.0.0.1/8\" {}", pair.public, pair.public),
    )
    .unwrap();
    let check = || {
        let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
            .args(["check", "--config"])
            .arg(&config)
            .env("LABGATE_LOG", "warn")
            .output()
            .unwrap();
        (out.status.code(), text(&out.stderr))
    };
    let ca = dir.path().join("user_ca.pub");
    let (code, err) = check();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}:2: key option from=\"10.0.0.1/8\"",
            keyfile.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{}: cannot read trusted_user_ca_keys",
            ca.display()
        )),
        "{err}"
    );

    std::fs::write(&keyfile, &pair.public).unwrap();
    std::fs::write(&ca, format!("# CA\nnot a key\n{}", pair.public)).unwrap();
    let (code, err) = check();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}:2: not a valid CA public key line",
            ca.display()
        )),
        "{err}"
    );

    std::fs::write(&ca, &pair.public).unwrap();
    let (code, err) = check();
    assert_eq!(code, Some(0), "{err}");
}
