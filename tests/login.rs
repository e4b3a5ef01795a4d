//! Logging in: authentication and the container lifecycle, with the real `ssh` client, the real
//! gateway binary and the real Docker Engine.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Gateway, containers_named, docker_inspect, keygen};

#[test]
fn a_user_lands_in_their_own_container_with_home_as_cwd() {
    let gw = Gateway::start(1, "", "");
    let out = gw.ok(0, "hostname; echo $HOME; pwd; echo $USER; echo $SHELL");
    let user = &gw.users[0];
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("labgate-{user}").as_str(),
            &format!("/home/{user}"),
            &format!("/home/{user}"),
            user,
            "/bin/sh"
        ]
    );
    let name = gw.container(0);
    assert_eq!(
        docker_inspect(
            &name,
            "{{index .Config.Labels \"labgate.user\"}} {{index .Config.Labels \"labgate.managed\"}}"
        )
        .unwrap(),
        format!("{user} true")
    );
}

#[test]
fn quotas_and_confinement_are_applied_on_create() {
    let gw = Gateway::start(1, "", "");
    gw.ok(0, "true");
    let name = gw.container(0);
    let f = |fmt: &str| docker_inspect(&name, fmt).unwrap();
    assert_eq!(f("{{.HostConfig.Memory}}"), (256u64 << 20).to_string());
    assert_eq!(f("{{.HostConfig.NanoCpus}}"), "500000000");
    assert_eq!(f("{{.HostConfig.ShmSize}}"), (32u64 << 20).to_string());
    assert_eq!(f("{{.HostConfig.PidsLimit}}"), "128");
    assert_eq!(f("{{.HostConfig.Init}}"), "true");
    assert_eq!(f("{{.HostConfig.Privileged}}"), "false");
    assert_eq!(f("{{.HostConfig.SecurityOpt}}"), "[no-new-privileges]");
    assert_eq!(f("{{len .HostConfig.PortBindings}}"), "0");
    assert_eq!(f("{{len .NetworkSettings.Ports}}"), "0");
    let mounts = f("{{range .Mounts}}{{.Source}}:{{.Destination}}:{{.RW}} {{end}}");
    assert!(!mounts.contains("docker.sock"), "{mounts}");
    // The home, writable; labgate's static relay (installed, as deployed), read-only.
    let home = gw.dir.path().join(format!("home/{}", gw.users[0]));
    let relay = common::static_helper("labgate-relay");
    let mut mounts: Vec<&str> = mounts.split_whitespace().collect();
    mounts.sort();
    let mut want = vec![
        format!("{}:/home/{}:true", home.display(), gw.users[0]),
        format!("{}:/.labgate/relay:false", relay.display()),
    ];
    want.sort();
    assert_eq!(mounts, want);
    // The quota is real inside: the cgroup limits what the user sees.
    let pids_max = gw.ok(
        0,
        "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max",
    );
    assert_eq!(pids_max.trim(), "128");
}

#[test]
fn unknown_user_and_wrong_key_are_refused_alike_and_create_nothing() {
    let gw = Gateway::start(1, "", "");
    let stranger = keygen(gw.dir.path(), "stranger");
    let wrong_key = gw
        .ssh_as(&gw.users[0], &stranger.private)
        .arg("true")
        .output()
        .unwrap();
    let unknown = gw
        .ssh_as("nosuchuser", &gw.keys[0].private)
        .arg("true")
        .output()
        .unwrap();
    let bad_name = gw
        .ssh_as("Bad.Name", &gw.keys[0].private)
        .arg("true")
        .output()
        .unwrap();
    for out in [&wrong_key, &unknown, &bad_name] {
        assert_eq!(out.status.code(), Some(255));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Permission denied (publickey)"), "{err}");
    }
    let said = |out: &std::process::Output, user: &str| {
        String::from_utf8_lossy(&out.stderr).replace(user, "USER")
    };
    assert_eq!(
        said(&wrong_key, &gw.users[0]),
        said(&unknown, "nosuchuser"),
        "refusals must not tell users apart"
    );
    assert_eq!(containers_named(&gw.container(0)), 0);
    assert_eq!(containers_named("labgate-nosuchuser"), 0);
    let log = gw.log();
    assert!(log.contains("login refused"), "{log}");
    assert!(
        log.contains("unknown user") && log.contains("key not authorized"),
        "{log}"
    );
    assert!(
        log.contains("peer=127.0.0.1:"),
        "refusals are logged with the peer: {log}"
    );
}

#[test]
fn only_public_key_authentication_is_offered() {
    let gw = Gateway::start(1, "", "");
    let out = gw
        .ssh(0)
        .args([
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "PubkeyAuthentication=no",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied (publickey)."), "{err}");
}

#[test]
fn first_login_creates_stopped_container_is_resumed_running_one_reused() {
    let gw = Gateway::start(1, "", "");
    let name = gw.container(0);
    assert_eq!(containers_named(&name), 0);
    gw.ok(0, "true");
    let id = docker_inspect(&name, "{{.Id}}").unwrap();
    gw.ok(0, "true");
    assert_eq!(
        docker_inspect(&name, "{{.Id}}").unwrap(),
        id,
        "reused when running"
    );
    let st = Command::new("docker")
        .args(["stop", "-t", "1", &name])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        docker_inspect(&name, "{{.State.Running}}").unwrap(),
        "false"
    );
    assert_eq!(gw.ok(0, "echo back"), "back\n");
    assert_eq!(
        docker_inspect(&name, "{{.Id}}").unwrap(),
        id,
        "same container resumed"
    );
    assert_eq!(docker_inspect(&name, "{{.State.Running}}").unwrap(), "true");
    assert_eq!(containers_named(&name), 1);
}

#[test]
fn eight_concurrent_first_logins_make_exactly_one_container() {
    let gw = Gateway::start(1, "", "");
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
        assert!(
            out.status.success(),
            "login {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("login{i}\n"));
    }
    assert_eq!(containers_named(&gw.container(0)), 1);
}

#[test]
fn a_restarted_gateway_finds_its_containers() {
    let mut gw = Gateway::start(1, "", "");
    gw.ok(0, "echo first > marker");
    let id = docker_inspect(&gw.container(0), "{{.Id}}").unwrap();
    gw.stop();
    gw.spawn();
    assert!(
        common::eventually(Duration::from_secs(10), || gw
            .log()
            .contains("reconciled with the containers labgate manages")),
        "{}",
        gw.log()
    );
    assert_eq!(gw.ok(0, "cat marker"), "first\n");
    assert_eq!(docker_inspect(&gw.container(0), "{{.Id}}").unwrap(), id);
}

#[test]
fn home_survives_removal_of_the_container() {
    let gw = Gateway::start(1, "", "");
    gw.ok(0, "echo precious > ~/notes.txt");
    let name = gw.container(0);
    let old_id = docker_inspect(&name, "{{.Id}}").unwrap();
    let st = Command::new("docker")
        .args(["rm", "-f", &name])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(gw.ok(0, "cat ~/notes.txt"), "precious\n");
    assert_ne!(
        docker_inspect(&name, "{{.Id}}").unwrap(),
        old_id,
        "recreated"
    );
    let on_host = gw
        .dir
        .path()
        .join(format!("home/{}/notes.txt", gw.users[0]));
    assert_eq!(std::fs::read_to_string(on_host).unwrap(), "precious\n");
}

/// The ed25519 host key a server on `port` presents, as ssh-keyscan reports it.
fn host_key_of(port: u16) -> String {
    let out = Command::new("ssh-keyscan")
        .args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn host_key_is_generated_private_and_stable() {
    use std::os::unix::fs::PermissionsExt;
    let mut gw = Gateway::start(1, "", "");
    let path = gw.dir.path().join("host_key");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = host_key_of(gw.addr.port());
    assert!(!before.is_empty());
    gw.stop();
    gw.spawn();
    let after = host_key_of(gw.addr.port());
    assert_eq!(before, after, "the host key is kept across restarts");
}

#[test]
fn uid_and_gid_own_the_home_and_the_files() {
    use std::os::unix::fs::MetadataExt;
    let mut gw = Gateway::start(1, "uid = 1234\ngid = 2345", "");
    assert_eq!(gw.ok(0, "id -u; id -g"), "1234\n2345\n");
    // The image knows neither id: the gateway gave the container an account for them.
    let user = gw.users[0].clone();
    assert_eq!(gw.ok(0, "id -un; id -gn"), format!("{user}\n{user}\n"));
    let entries = "grep -c ':1234:2345:' /etc/passwd; grep -c ':2345:$' /etc/group";
    assert_eq!(gw.ok(0, entries), "1\n1\n");
    assert!(
        gw.log()
            .contains("account entry in place (written from the host)"),
        "a gateway running as root writes the entry without an exec"
    );
    // A restarted gateway (which has forgotten it did so) does not add them again.
    gw.stop();
    gw.spawn();
    assert_eq!(gw.ok(0, entries), "1\n1\n");
    gw.ok(0, "touch ~/made-inside");
    let home = gw.dir.path().join(format!("home/{}", gw.users[0]));
    let meta = std::fs::metadata(&home).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345));
    let file = std::fs::metadata(home.join("made-inside")).unwrap();
    assert_eq!(
        (file.uid(), file.gid()),
        (1234, 2345),
        "files on the host are not root's"
    );
}

#[test]
fn mounts_are_read_only_unless_marked_and_env_is_set() {
    let data = tempfile::tempdir().unwrap();
    let ro = data.path().join("datasets");
    let rw = data.path().join("scratch");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::write(ro.join("train.csv"), "a,b\n").unwrap();
    let gw = Gateway::start(
        1,
        &format!(
            "env = {{ LAB_NAME = \"vision\" }}\nmounts = [ {{ source = \"{}\", target = \"/datasets\" }}, {{ source = \"{}\", target = \"/scratch\", writable = true }} ]",
            ro.display(),
            rw.display()
        ),
        "",
    );
    assert_eq!(
        gw.ok(0, "cat /datasets/train.csv; echo $LAB_NAME"),
        "a,b\nvision\n"
    );
    let out = gw.run(0, "touch /datasets/x");
    assert!(
        !out.status.success(),
        "a read-only mount must refuse writes"
    );
    gw.ok(0, "echo out > /scratch/result");
    assert_eq!(std::fs::read_to_string(rw.join("result")).unwrap(), "out\n");
}

#[test]
fn per_user_quota_overrides_defaults() {
    let gw = Gateway::start(2, "", "[users.{u1}]\nmemory = \"300M\"\npids = 99\n");
    gw.ok(0, "true");
    gw.ok(1, "true");
    assert_eq!(
        docker_inspect(&gw.container(0), "{{.HostConfig.PidsLimit}}").unwrap(),
        "128"
    );
    assert_eq!(
        docker_inspect(&gw.container(1), "{{.HostConfig.PidsLimit}}").unwrap(),
        "99"
    );
    assert_eq!(
        docker_inspect(&gw.container(1), "{{.HostConfig.Memory}}").unwrap(),
        (300u64 << 20).to_string()
    );
    assert_eq!(
        docker_inspect(&gw.container(1), "{{.HostConfig.NanoCpus}}").unwrap(),
        "500000000",
        "fields the user table does not set come from [defaults]"
    );
}
