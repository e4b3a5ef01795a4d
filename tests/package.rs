//! The Debian package (issue #20), installed as an admin would install it.
//!
//! `scripts/deb` builds it once per run (in a target directory of its own: this `cargo test`
//! holds the usual one's lock; the static helpers there are the ones `tests/common` builds),
//! unless `LABGATE_DEB` names a package already built from this checkout (`scripts/test`
//! builds it first). Each test installs it with `dpkg -i` into a fresh container of the
//! Debian test image (`labgate/debian:test`, made by `scripts/debian-image`), without network;
//! neither the install nor `labgate check` needs Docker or systemd in there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

const IMAGE: &str = "labgate/debian:test";

/// The package under test, built on first use.
fn package() -> &'static Path {
    static PACKAGE: OnceLock<PathBuf> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        if let Some(deb) = std::env::var_os("LABGATE_DEB") {
            let deb = PathBuf::from(deb);
            assert!(deb.is_file(), "LABGATE_DEB={} is no file", deb.display());
            return deb;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("static-helpers");
        let started = std::time::Instant::now();
        let out = Command::new(root.join("scripts/deb"))
            .env("CARGO_TARGET_DIR", &target)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "scripts/deb failed: {out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        assert!(deb.is_file(), "scripts/deb printed no package: {stdout}");
        eprintln!("built {} in {:.0?}", deb.display(), started.elapsed());
        deb
    })
}

/// The commit the package's `labgate --version` must name.
fn commit() -> String {
    if let Ok(c) = std::env::var("LABGATE_COMMIT") {
        return c;
    }
    let out = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A fresh Debian container holding the package at /tmp/labgate.deb; removed when dropped.
struct Debian {
    name: String,
}

impl Debian {
    fn start() -> Debian {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let deb = package();
        ensure_image();
        let name = format!(
            "labgate-package-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let run = Command::new("docker")
            .args(["run", "-d", "--rm", "--network", "none", "--name", &name])
            .args([IMAGE, "sleep", "infinity"])
            .output()
            .unwrap();
        assert!(run.status.success(), "{run:?}");
        let debian = Debian { name };
        let cp = Command::new("docker")
            .arg("cp")
            .arg(deb)
            .arg(format!("{}:/tmp/labgate.deb", debian.name))
            .output()
            .unwrap();
        assert!(cp.status.success(), "{cp:?}");
        debian
    }

    /// Runs `script` with bash inside, as root.
    fn sh(&self, script: &str) -> Output {
        Command::new("docker")
            .args(["exec", &self.name, "bash", "-c", script])
            .output()
            .unwrap()
    }

    /// [`Debian::sh`] that must succeed; its stdout.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "`{script}` failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether `path` exists inside.
    fn exists(&self, path: &str) -> bool {
        self.sh(&format!("test -e '{path}'")).status.success()
    }
}

impl Drop for Debian {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Builds the Debian test image when this machine has none yet (a few minutes, once).
fn ensure_image() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let have = Command::new("docker")
            .args(["image", "inspect", IMAGE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if !have.success() {
            let st =
                Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/debian-image"))
                    .arg("debian")
                    .status()
                    .unwrap();
            assert!(st.success(), "scripts/debian-image failed");
        }
    });
}

const CHECK: &str = "labgate check --config /etc/labgate/labgate.toml";

#[test]
fn the_package_installs_the_gateway_helpers_unit_config_and_docs_where_listed() {
    let debian = Debian::start();
    debian.ok("dpkg -i /tmp/labgate.deb");

    // What, with which mode and owner.
    let listed = [
        ("/usr/bin/labgate", "regular file", "755"),
        ("/usr/lib/labgate", "directory", "755"),
        ("/usr/lib/labgate/labgate-relay", "regular file", "755"),
        ("/usr/lib/labgate/labgate-sftp", "regular file", "755"),
        ("/etc/labgate", "directory", "755"),
        ("/etc/labgate/labgate.toml", "regular file", "644"),
        ("/etc/labgate/keys", "directory", "755"),
        (
            "/usr/lib/systemd/system/labgate.service",
            "regular file",
            "644",
        ),
        (
            "/usr/lib/systemd/system/labgate-node-agent.service",
            "regular file",
            "644",
        ),
        ("/var/lib/labgate", "directory", "750"),
        ("/var/lib/labgate/home", "directory", "755"),
        ("/var/log/labgate", "directory", "750"),
        ("/usr/share/man/man1/labgate.1.gz", "regular file", "644"),
        (
            "/usr/share/man/man1/labgate-check.1.gz",
            "regular file",
            "644",
        ),
        (
            "/usr/share/bash-completion/completions/labgate",
            "regular file",
            "644",
        ),
        (
            "/usr/share/zsh/vendor-completions/_labgate",
            "regular file",
            "644",
        ),
        (
            "/usr/share/fish/vendor_completions.d/labgate.fish",
            "regular file",
            "644",
        ),
        (
            "/usr/share/doc/labgate/examples/labgate.toml",
            "regular file",
            "644",
        ),
    ];
    let paths: Vec<&str> = listed.iter().map(|(p, _, _)| *p).collect();
    let seen = debian.ok(&format!("stat -c '%n|%F|%a|%U:%G' {}", paths.join(" ")));
    let want: Vec<String> = listed
        .iter()
        .map(|(p, kind, mode)| format!("{p}|{kind}|{mode}|root:root"))
        .collect();
    assert_eq!(seen.lines().collect::<Vec<_>>(), want);

    // The config is a conffile: dpkg keeps an admin's edit.
    let conffiles = debian.ok("dpkg-query -W -f '${Conffiles}' labgate");
    assert!(
        conffiles.contains("/etc/labgate/labgate.toml"),
        "{conffiles}"
    );

    // The version names the commit.
    assert_eq!(
        debian.ok("labgate --version"),
        format!(
            "labgate {} (commit {})\n",
            env!("CARGO_PKG_VERSION"),
            commit()
        )
    );

    // The shipped config passes, the package's helpers are found, and they are static (no
    // warning): they run in any image.
    let out = debian.sh(CHECK);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("helper labgate-relay: /usr/lib/labgate/labgate-relay (package)")
            && stdout.contains("helper labgate-sftp: /usr/lib/labgate/labgate-sftp (package)")
            && stdout.contains(
                "/etc/labgate/labgate.toml: OK (0 user(s) with keys in /etc/labgate/keys)"
            ),
        "{stdout}"
    );
    assert_eq!(stderr, "", "no warnings on the shipped config");

    // Without a helper, check says what is lost, and still passes.
    debian.ok("mv /usr/lib/labgate/labgate-sftp /tmp/");
    let out = debian.sh(CHECK);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: no labgate-sftp helper (looked for /usr/lib/labgate/labgate-sftp, /usr/local/lib/labgate/labgate-sftp, /usr/bin/labgate-sftp): images without their own sftp-server get no sftp"),
        "{stderr}"
    );
    debian.ok("mv /tmp/labgate-sftp /usr/lib/labgate/");

    // The man page comes from the command line's definitions, one page per command.
    let man = debian.ok("zcat /usr/share/man/man1/labgate.1.gz");
    assert!(man.contains(".TH labgate 1"), "{man}");
    assert!(man.contains("labgate\\-check(1)"), "{man}");
    let check_man = debian.ok("zcat /usr/share/man/man1/labgate-check.1.gz");
    assert!(check_man.contains("\\-\\-config"), "{check_man}");

    // bash picks the completions up.
    let complete = debian.ok(
        "source /usr/share/bash-completion/completions/labgate && complete -p labgate && \
         COMP_WORDS=(labgate ch) COMP_CWORD=1 COMP_LINE='labgate ch' COMP_POINT=10 && \
         _labgate labgate ch labgate && printf '%s\\n' \"${COMPREPLY[@]}\"",
    );
    assert!(complete.contains("labgate"), "{complete}");
    assert!(complete.lines().any(|l| l == "check"), "{complete}");
}

#[test]
fn an_upgrade_keeps_the_edited_config_remove_keeps_the_data_and_purge_the_homes() {
    let debian = Debian::start();
    debian.ok("dpkg -i /tmp/labgate.deb");
    // The admin's edit and a user; the gateway's state and a user's work.
    debian.ok(
        "sed -i 's/^memory = .*/memory = \"8G\"/' /etc/labgate/labgate.toml && \
         ssh-keygen -q -t ed25519 -N '' -C alice -f /tmp/alice && \
         cp /tmp/alice.pub /etc/labgate/keys/alice.pub && \
         install -d -o 1000 -g 1000 /var/lib/labgate/home/alice && \
         echo results > /var/lib/labgate/home/alice/work.txt && \
         install -m 0600 /dev/null /var/lib/labgate/host_ed25519_key && \
         echo '{}' > /var/log/labgate/audit.jsonl",
    );
    let edited = "grep -x 'memory = \"8G\"' /etc/labgate/labgate.toml";

    // The next version, with the same shipped config: the edit stays, silently.
    debian.ok("dpkg-deb -R /tmp/labgate.deb /tmp/next && \
         sed -i 's/^Version: .*/Version: 99.0.0-1/' /tmp/next/DEBIAN/control && \
         dpkg-deb -b /tmp/next /tmp/labgate-next.deb >/dev/null && dpkg -i /tmp/labgate-next.deb");
    assert_eq!(
        debian.ok("dpkg-query -W -f '${Version}' labgate"),
        "99.0.0-1"
    );
    debian.ok(edited);
    assert!(!debian.exists("/etc/labgate/labgate.toml.dpkg-dist"));
    let out = debian.ok(CHECK);
    assert!(out.contains("OK (1 user(s)"), "{out}");

    // One whose shipped config changed too: the admin's stays in force, the new one lies
    // beside it (as apt does when told to keep the old one).
    debian.ok(
        "echo '# new in 99.0.1' >> /tmp/next/etc/labgate/labgate.toml && \
         sed -i 's/^Version: .*/Version: 99.0.1-1/' /tmp/next/DEBIAN/control && \
         dpkg-deb -b /tmp/next /tmp/labgate-next.deb >/dev/null && \
         dpkg -i --force-confdef --force-confold /tmp/labgate-next.deb",
    );
    debian.ok(edited);
    debian.ok("grep -x '# new in 99.0.1' /etc/labgate/labgate.toml.dpkg-dist");

    // Remove: the program goes, config, keys, state, homes and logs stay.
    debian.ok("dpkg -r labgate");
    assert!(!debian.exists("/usr/bin/labgate"));
    assert!(!debian.exists("/usr/lib/labgate/labgate-relay"));
    debian.ok(edited);
    for kept in [
        "/etc/labgate/keys/alice.pub",
        "/var/lib/labgate/host_ed25519_key",
        "/var/lib/labgate/home/alice/work.txt",
        "/var/log/labgate/audit.jsonl",
    ] {
        assert!(debian.exists(kept), "{kept} is kept by remove");
    }

    // Purge: config, keys, host key and logs go; the users' homes stay, and it says so.
    let out = debian.sh("dpkg -P labgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("kept the users' home directories in /var/lib/labgate/home"),
        "{stderr}"
    );
    for gone in [
        "/etc/labgate",
        "/var/lib/labgate/host_ed25519_key",
        "/var/log/labgate",
    ] {
        assert!(!debian.exists(gone), "{gone} is removed by purge");
    }
    assert_eq!(
        debian.ok("cat /var/lib/labgate/home/alice/work.txt"),
        "results\n"
    );
}

#[test]
fn the_unit_passes_systemd_analyze_verify_against_the_package_files() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    if !common::skip_unless(
        have,
        "this machine has no systemd-analyze (Debian's systemd package)",
    ) {
        return;
    }
    // The package's files as a root for systemd: its unit refers to its own binary. Around
    // them, what a Debian host has: this machine's targets and slices (systemd), /bin/kill
    // (procps) and a stand-in for the Docker Engine's unit (docker.io or docker-ce, which the
    // package recommends). The man page's presence is the install test's business.
    let root = tempfile::tempdir().unwrap();
    let x = Command::new("dpkg-deb")
        .arg("-x")
        .arg(package())
        .arg(root.path())
        .output()
        .unwrap();
    assert!(x.status.success(), "{x:?}");
    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(
        units.join("docker.service"),
        "[Unit]\nDescription=stand-in for the Docker Engine\n\n[Service]\nExecStart=/bin/kill -0 1\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::copy("/bin/kill", root.path().join("bin/kill")).unwrap();
    let system = root.path().join("usr/lib/systemd/system");
    for entry in std::fs::read_dir("/usr/lib/systemd/system").unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_some_and(|e| e == "target" || e == "slice")
            && path.is_file()
        {
            std::fs::copy(&path, system.join(path.file_name().unwrap())).unwrap();
        }
    }

    for unit in ["labgate.service", "labgate-node-agent.service"] {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.path().display()))
            .arg(format!("/usr/lib/systemd/system/{unit}"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{unit}: {text}");
        assert_eq!(text, "", "systemd has nothing to say about {unit}");
    }
}
