//! Config edits apply without a restart; a broken edit never takes the gateway down.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Gateway, eventually};

/// What `$LAB_PROJECT` looks like inside, when the client sends it.
fn sent_env(gw: &Gateway) -> String {
    let out = gw
        .ssh(0)
        .args(["-o", "SetEnv=LAB_PROJECT=vision", "echo \"[$LAB_PROJECT]\""])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn edit(gw: &Gateway, from: &str, to: &str) {
    let path = gw.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from} not in config");
    // Write a new file and rename it over the old one, as editors do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text.replacen(from, to, 1)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

#[test]
fn an_edit_applies_to_new_logins_and_a_broken_one_keeps_the_old_config() {
    let gw = Gateway::start(1, "accept_env = [\"TERM\"]", "");
    assert_eq!(sent_env(&gw), "[]");

    edit(
        &gw,
        "accept_env = [\"TERM\"]",
        "accept_env = [\"TERM\", \"LAB_*\"]",
    );
    assert!(
        eventually(Duration::from_secs(30), || sent_env(&gw) == "[vision]"),
        "the edit was not applied; log:\n{}",
        gw.log()
    );

    // A broken edit: logged with its position, the gateway stays up on the old config.
    edit(&gw, "memory = \"256M\"", "memory = \"256Q\"");
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .contains("config not reloaded, the previous one stays in force")),
        "{}",
        gw.log()
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("config not reloaded"))
        .unwrap();
    assert!(
        line.contains("labgate.toml:") && line.contains("256Q"),
        "{line}"
    );
    assert_eq!(
        sent_env(&gw),
        "[vision]",
        "the previous config stays in force"
    );
}

#[test]
fn sighup_reloads_too() {
    let gw = Gateway::start(1, "accept_env = [\"TERM\"]", "");
    // Made first, so the wait below is for the reload, not for a first login's container.
    assert_eq!(sent_env(&gw), "[]");
    // Change the file without the watcher noticing a difference in timing: then SIGHUP.
    edit(
        &gw,
        "accept_env = [\"TERM\"]",
        "accept_env = [\"LAB_PROJECT\"]",
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(gw.pid() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .contains("SIGHUP: reloading the config")),
        "{}",
        gw.log()
    );
    assert!(
        eventually(Duration::from_secs(30), || sent_env(&gw) == "[vision]"),
        "the reload was not applied; log:\n{}",
        gw.log()
    );
}

#[test]
fn a_changed_way_into_containers_is_reported_as_needing_a_restart() {
    let gw = Gateway::start(1, "", "");
    edit(&gw, "[docker]\n", "[docker]\nforward_via = \"exec\"\n");
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .contains("docker.forward_via")),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("takes effect only after a restart"));
}

#[test]
fn a_changed_listen_address_is_reported_as_needing_a_restart() {
    let gw = Gateway::start(1, "", "");
    edit(&gw, "listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .contains("takes effect only after a restart")),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("server.listen"));
    assert_eq!(
        gw.ok(0, "echo up"),
        "up\n",
        "still serving on the old address"
    );
}

#[test]
fn keys_dropped_in_or_removed_apply_at_the_next_login() {
    let gw = Gateway::start(1, "", "");
    assert_eq!(gw.ok(0, "echo in"), "in\n");
    let keyfile = gw.dir.path().join(format!("keys/{}.pub", gw.users[0]));
    let key = std::fs::read_to_string(&keyfile).unwrap();
    std::fs::remove_file(&keyfile).unwrap();
    let out = gw.run(0, "true");
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied (publickey)"));
    std::fs::write(&keyfile, key).unwrap();
    assert_eq!(gw.ok(0, "echo back"), "back\n");
}

#[test]
fn quota_changes_reach_running_containers_live_and_the_rest_is_reported() {
    let gw = Gateway::start(1, "", "");
    gw.ok(0, "true");
    let name = gw.container(0);
    let id = common::docker_inspect(&name, "{{.Id}}").unwrap();
    edit(&gw, "pids = 128", "pids = 99");
    edit(&gw, "memory = \"256M\"", "memory = \"300M\"");
    assert!(
        eventually(Duration::from_secs(15), || {
            common::docker_inspect(&name, "{{.HostConfig.PidsLimit}} {{.HostConfig.Memory}}")
                .as_deref()
                == Some(&format!("99 {}", 300u64 << 20))
        }),
        "limits not applied: {:?}\n{}",
        common::docker_inspect(&name, "{{.HostConfig.PidsLimit}} {{.HostConfig.Memory}}"),
        gw.log()
    );
    assert_eq!(
        common::docker_inspect(&name, "{{.Id}}").unwrap(),
        id,
        "same container"
    );
    let max = gw.ok(
        0,
        "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max",
    );
    assert_eq!(max.trim(), "99", "the limit holds inside");
    edit(&gw, "shm = \"32M\"", "shm = \"64M\"");
    assert!(
        eventually(Duration::from_secs(15), || gw
            .log()
            .contains("these changes apply when the container next starts")),
        "{}",
        gw.log()
    );
}

#[test]
fn recreate_only_changes_apply_at_the_next_start_keeping_the_home() {
    let gw = Gateway::start(1, "", "");
    let name = gw.container(0);
    gw.ok(0, "echo kept > ~/file");
    let id = common::docker_inspect(&name, "{{.Id}}").unwrap();

    // While it runs, a recreate-only change waits: same container, old shm.
    edit(&gw, "shm = \"32M\"", "shm = \"64M\"");
    assert!(eventually(Duration::from_secs(15), || gw
        .log()
        .contains("these changes apply when the container next starts")));
    assert_eq!(common::docker_inspect(&name, "{{.Id}}").unwrap(), id);

    // Stopped (as idle stop or `labgate stop` would), then a login: made again with it.
    let out = gw.labgate(&["stop", &gw.users[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = gw.run(0, "cat ~/file");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n", "home kept");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("your container was made again for the new settings (shm)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(common::docker_inspect(&name, "{{.Id}}").unwrap(), id);
    assert_eq!(
        common::docker_inspect(&name, "{{.HostConfig.ShmSize}}").unwrap(),
        (64u64 << 20).to_string()
    );

    // Live limits changed while it is stopped reach it when it starts, without a recreate.
    let id = common::docker_inspect(&name, "{{.Id}}").unwrap();
    let out = gw.labgate(&["stop", &gw.users[0]]);
    assert!(out.status.success());
    edit(&gw, "pids = 128", "pids = 77");
    assert!(eventually(Duration::from_secs(15), || gw
        .log()
        .matches("config reloaded: new logins use it")
        .count()
        >= 2));
    let out = gw.run(
        0,
        "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "77");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(common::docker_inspect(&name, "{{.Id}}").unwrap(), id);
}
