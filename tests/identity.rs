//! Who users run as in their containers: `uid = "host"` (the host account of the same name,
//! with its groups) and `uid = "auto"` (a uid labgate gives once and keeps), seen the way a
//! user sees them: `id` in the container and the owner of their files on the host.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use common::Gateway;

/// A host group and a host account in it, removed when dropped.
struct HostAccount {
    name: String,
    group: String,
}

impl HostAccount {
    fn new() -> HostAccount {
        let n = std::process::id() % 100_000;
        let (name, group) = (format!("lgh{n}"), format!("lgg{n}"));
        let _ = Command::new("userdel").arg(&name).output();
        let _ = Command::new("groupdel").arg(&group).output();
        let made = Command::new("groupadd").arg(&group).output().unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let made = Command::new("useradd")
            .args(["-M", "-N", "-s", "/bin/sh", "-G", &group, &name])
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        HostAccount { name, group }
    }

    /// `id FLAG NAME` on the host.
    fn id(&self, flag: &str) -> String {
        let out = Command::new("id")
            .args([flag, &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for HostAccount {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &format!("labgate-{}", self.name)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("userdel").arg(&self.name).output();
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

/// Sorted numbers of a space-separated list.
fn numbers(s: &str) -> Vec<u32> {
    let mut v: Vec<u32> = s.split_whitespace().map(|n| n.parse().unwrap()).collect();
    v.sort_unstable();
    v
}

#[test]
fn uid_host_runs_as_the_host_account_with_its_groups() {
    let account = HostAccount::new();
    let gw = Gateway::start(
        1,
        "",
        &format!(
            "[users.{}]\nuid = \"host\"\n\n[users.{{u0}}]\nuid = \"host\"\n",
            account.name
        ),
    );
    std::fs::write(
        gw.dir.path().join(format!("keys/{}.pub", account.name)),
        &gw.keys[0].public,
    )
    .unwrap();
    let out = gw
        .ssh_as(&account.name, &gw.keys[0].private)
        .arg("id -u; id -g; id -G; touch ~/made-here")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], account.id("-u"));
    assert_eq!(lines[1], account.id("-g"));
    assert_eq!(numbers(lines[2]), numbers(&account.id("-G")));
    assert!(
        numbers(lines[2]).len() >= 2,
        "the supplementary group is there"
    );
    // The file is the account's on the host too.
    let home = gw.dir.path().join(format!("home/{}", account.name));
    let meta = std::fs::metadata(home.join("made-here")).unwrap();
    assert_eq!(meta.uid().to_string(), account.id("-u"));
    assert_eq!(meta.gid().to_string(), account.id("-g"));

    // A user with no host account of that name is told so, in one line.
    let out = gw.run(0, "id -u");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(
        err.contains(&format!(
            "there is no account named {} on the gateway's host",
            gw.users[0]
        )),
        "{err}"
    );
}

#[test]
fn uid_auto_gives_each_user_a_uid_of_their_own_that_survives_a_restart() {
    let mut gw = Gateway::start_with_server(
        2,
        "state_dir = \"state\"\nauto_uids = \"650000-650099\"\n",
        "uid = \"auto\"\n",
        "",
    );
    let first = gw.ok(0, "id -u; touch ~/mine").trim().to_owned();
    let second = gw.ok(1, "id -u").trim().to_owned();
    assert_eq!(first, "650000");
    assert_eq!(second, "650001");
    let home = gw.dir.path().join(format!("home/{}", gw.users[0]));
    assert_eq!(std::fs::metadata(home.join("mine")).unwrap().uid(), 650_000);
    assert_eq!(std::fs::metadata(&home).unwrap().uid(), 650_000);
    // The record names both; a restarted gateway gives the same uids (in the other order).
    let record = std::fs::read_to_string(gw.dir.path().join("state/auto-uids.json")).unwrap();
    assert!(
        record.contains(&format!("\"{}\": 650000", gw.users[0])),
        "{record}"
    );
    gw.stop();
    for c in [gw.container(0), gw.container(1)] {
        let _ = Command::new("docker").args(["rm", "-f", &c]).output();
    }
    gw.spawn();
    assert_eq!(gw.ok(1, "id -u").trim(), "650001");
    assert_eq!(
        gw.ok(0, "id -u; cat ~/mine && echo kept").trim(),
        "650000\nkept"
    );
}
