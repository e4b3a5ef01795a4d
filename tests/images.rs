//! Images from a registry: pulls on demand with progress, shared pulls, pull errors, registry
//! credentials, background pulls after a config change, recreate on image change, and
//! profiles. A real registry (Debian's `docker-registry`) runs on a loopback port per test;
//! the engine accepts loopback registries without TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Gateway, IMAGE, docker_inspect, ensure_image, eventually};

/// A `docker-registry serve` process with its own config and storage, and the image
/// references made in it (removed from the engine at the end).
struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    refs: std::sync::Mutex<Vec<String>>,
}

impl Registry {
    /// A registry on a loopback port of its own choosing, without authentication.
    fn start() -> Registry {
        ensure_image();
        let mut r = Registry {
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            child: None,
            refs: Default::default(),
        };
        r.serve(None);
        r
    }

    /// (Re)starts the registry process, with basic auth for `(user, password)` when given.
    /// It binds port 0 and says which port it got; a restart gets a new one (the storage, and
    /// so the repositories, stay: see [`Registry::here`]).
    fn serve(&mut self, basic_auth: Option<(&str, &str)>) {
        self.stop();
        let dir = self.dir.path();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:0\n",
            dir.join("data").display(),
        );
        if let Some((user, password)) = basic_auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils) must be installed: scripts/prereqs.sh");
            assert!(out.status.success());
            std::fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: labgate-test\n    path: {}\n",
                dir.join("htpasswd").display()
            );
        }
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry must be installed: scripts/prereqs.sh");
        self.child = Some(child);
        let log = || std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
        let mut port = None;
        assert!(
            eventually(Duration::from_secs(20), || {
                port = listening_port(&log());
                port.is_some()
            }),
            "registry did not start: {}",
            log()
        );
        self.port = port.unwrap();
    }

    /// `reference` (made at an earlier port of this registry) at its port now.
    fn here(&self, reference: &str) -> String {
        let (_, path) = reference.split_once('/').unwrap();
        let moved = format!("127.0.0.1:{}/{path}", self.port);
        self.refs.lock().unwrap().push(moved.clone());
        moved
    }

    /// Kills the registry process (its storage stays).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `127.0.0.1:PORT/labgate/NAME-PID:TAG`, unique to this test process; removed from the
    /// engine when the registry is dropped.
    fn reference(&self, name: &str, tag: &str) -> String {
        let r = format!(
            "127.0.0.1:{}/labgate/{name}-{}:{tag}",
            self.port,
            std::process::id()
        );
        self.refs.lock().unwrap().push(r.clone());
        r
    }

    /// Puts the test image (with `extra` Dockerfile lines on top) into the registry as
    /// `NAME:TAG` and removes it from the engine, so the gateway has to pull it.
    fn push(&self, name: &str, tag: &str, extra: &str) -> String {
        let reference = self.reference(name, tag);
        let dockerfile = format!("FROM {IMAGE}\nLABEL labgate.test=\"{name}:{tag}\"\n{extra}\n");
        let mut build = Command::new("docker")
            .args(["build", "-q", "-t", &reference, "-"])
            .env("DOCKER_BUILDKIT", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        build
            .stdin
            .take()
            .unwrap()
            .write_all(dockerfile.as_bytes())
            .unwrap();
        let out = build.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        docker(&["push", &reference]);
        docker(&["rmi", &reference]);
        assert!(!image_present(&reference));
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        for r in self.refs.lock().unwrap().iter() {
            let _ = Command::new("docker")
                .args(["rmi", "-f", r])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
/// The port of the registry's `msg="listening on 127.0.0.1:PORT"` log line.
fn listening_port(log: &str) -> Option<u16> {
    let rest = log.split("listening on 127.0.0.1:").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn docker(args: &[&str]) {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn image_present(reference: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// How many pulls of `reference` the gateway ran (its log line per pull started).
fn pulls_of(gw: &Gateway, reference: &str) -> usize {
    gw.log()
        .lines()
        .filter(|l| l.contains("pulling image") && l.contains(reference))
        .count()
}

fn user_image(reference: &str) -> String {
    format!("[users.{{u0}}]\nimage = \"{reference}\"\n")
}

#[test]
fn a_first_login_on_a_terminal_pulls_with_a_redrawn_progress_line() {
    let registry = Registry::start();
    let reference = registry.push("pty", "1", "");
    let gw = Gateway::start(1, "", &user_image(&reference));
    let out = gw
        .ssh(0)
        .args(["-tt", "echo logged-in"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}\n{}", text(&out.stderr));
    assert!(
        shown.contains(&format!("\r\x1b[Klabgate: pulling {reference}: ")),
        "{shown:?}"
    );
    assert!(shown.contains(" layers, "), "{shown:?}");
    assert!(shown.contains("logged-in"), "{shown:?}");
    assert!(image_present(&reference));
    assert_eq!(pulls_of(&gw, &reference), 1);
}

#[test]
fn a_first_command_without_a_terminal_keeps_stdout_byte_exact_and_shows_progress_on_stderr() {
    let registry = Registry::start();
    let reference = registry.push("plain", "1", "");
    let gw = Gateway::start(1, "", &user_image(&reference));
    let home = gw.dir.path().join(format!("home/{}", gw.users[0]));
    std::fs::create_dir_all(&home).unwrap();
    let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    std::fs::write(home.join("data.bin"), &data).unwrap();
    let out = gw.run(0, "cat data.bin");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(out.stdout == data, "stdout is not the file, byte for byte");
    assert!(
        stderr.contains(&format!("labgate: pulling image {reference}\n")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("labgate: pulled image {reference}\n")),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\r'),
        "no redraws without a terminal: {stderr:?}"
    );
}

#[test]
fn concurrent_first_logins_share_one_pull() {
    let registry = Registry::start();
    // A layer of a few MB, so the pull takes long enough for the logins to meet in it.
    let reference = registry.push("shared", "1", "RUN head -c 20000000 /dev/urandom > /blob");
    let tail = format!(
        "[users.{{u0}}]\nimage = \"{reference}\"\n[users.{{u1}}]\nimage = \"{reference}\"\n[users.{{u2}}]\nimage = \"{reference}\"\n"
    );
    let gw = Gateway::start(3, "", &tail);
    let outputs: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                s.spawn({
                    let gw = &gw;
                    move || gw.run(i, "echo up")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for out in &outputs {
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "up\n");
    }
    assert_eq!(pulls_of(&gw, &reference), 1, "{}", gw.log());
    assert!(
        outputs
            .iter()
            .any(|o| text(&o.stderr).contains(&format!("labgate: pulled image {reference}"))),
        "someone saw the pull"
    );
}

#[test]
fn a_client_that_leaves_during_the_pull_does_not_stop_it_for_the_next_login() {
    let registry = Registry::start();
    let reference = registry.push("leaver", "1", "RUN head -c 20000000 /dev/urandom > /blob");
    let gw = Gateway::start(1, "", &user_image(&reference));
    let mut leaver = gw.spawn_silent(0, "true");
    assert!(
        eventually(Duration::from_secs(30), || pulls_of(&gw, &reference) == 1),
        "{}",
        gw.log()
    );
    leaver.kill().unwrap();
    leaver.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(60), || image_present(&reference)),
        "{}",
        gw.log()
    );
    assert_eq!(gw.ok(0, "echo back"), "back\n");
    assert_eq!(pulls_of(&gw, &reference), 1, "the pull was not repeated");
}

#[test]
fn unknown_images_and_a_stopped_registry_end_the_login_with_the_reason_and_the_gateway_stays_up() {
    let mut registry = Registry::start();
    let missing = registry.reference("nosuchimage", "1");
    let pushed = registry.push("down", "1", "");
    let tail =
        format!("[users.{{u0}}]\nimage = \"{missing}\"\n[users.{{u1}}]\nimage = \"{pushed}\"\n");
    let gw = Gateway::start(3, "", &tail);

    let out = gw.run(0, "true");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    assert!(
        stderr.contains(&format!("labgate: cannot pull image \"{missing}\": ")),
        "{stderr}"
    );
    assert!(
        stderr.contains("manifest unknown") || stderr.contains("not found"),
        "the registry's reason: {stderr}"
    );

    registry.stop();
    let out = gw.run(1, "true");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    assert!(
        stderr.contains(&format!("labgate: cannot pull image \"{pushed}\": ")),
        "{stderr}"
    );
    assert!(stderr.contains("connection refused"), "{stderr}");

    // The gateway is still up and serves a login whose image is here.
    assert_eq!(gw.ok(2, "echo fine"), "fine\n");
}

#[test]
fn a_registry_with_basic_auth_gets_the_configured_credentials_and_refuses_wrong_ones() {
    let mut registry = Registry::start();
    let first = registry.push("auth", "1", "");
    let second = registry.push("auth", "2", "");
    registry.serve(Some(("labuser", "s3cret-pa55")));
    let (first, second) = (registry.here(&first), registry.here(&second));
    let tail = format!(
        "[users.{{u0}}]\nimage = \"{first}\"\n[users.{{u1}}]\nimage = \"{second}\"\n\n\
         [registries.\"127.0.0.1:{}\"]\nusername = \"labuser\"\npassword_file = \"registry-password\"\n",
        registry.port
    );
    let gw = Gateway::start(2, "", &tail);
    let secret_file = gw.dir.path().join("registry-password");
    std::fs::write(&secret_file, "s3cret-pa55\n").unwrap();
    assert_eq!(gw.ok(0, "echo in"), "in\n");
    assert!(image_present(&first));

    // The file is read at each pull: a wrong password now is refused by the registry.
    std::fs::write(&secret_file, "wrong\n").unwrap();
    let out = gw.run(1, "true");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    assert!(
        stderr.contains(&format!("labgate: cannot pull image \"{second}\": ")),
        "{stderr}"
    );
    assert!(
        stderr.contains("unauthorized") || stderr.contains("authentication required"),
        "{stderr}"
    );
    let log = gw.log();
    assert!(
        !log.contains("s3cret-pa55") && !log.contains("wrong\n"),
        "secrets never logged"
    );
}

#[test]
fn a_config_change_pulls_the_new_image_in_the_background() {
    let registry = Registry::start();
    let reference = registry.push("prepull", "1", "");
    let gw = Gateway::start(1, "", "");
    let mut config = std::fs::read_to_string(gw.config_path()).unwrap();
    config += &format!("\n[users.{}]\nimage = \"{reference}\"\n", gw.users[0]);
    std::fs::write(gw.config_path(), config).unwrap();
    assert!(
        eventually(Duration::from_secs(60), || image_present(&reference)),
        "the image was not pulled; log:\n{}",
        gw.log()
    );
    let log = gw.log();
    assert!(log.contains("pull progress"), "progress steps are logged");
    assert_eq!(pulls_of(&gw, &reference), 1);
    // No one logged in: the pull needed no container.
    assert_eq!(common::containers_named(&gw.container(0)), 0);
}

#[test]
fn an_image_change_recreates_the_container_at_its_next_start_keeping_home() {
    let registry = Registry::start();
    let old = registry.push("change", "1", "");
    let new = registry.push("change", "2", "");
    let gw = Gateway::start(1, "", &user_image(&old));
    gw.ok(0, "echo kept > note");
    let name = gw.container(0);

    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), config.replace(&old, &new)).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || gw
            .log()
            .contains("config reloaded")),
        "no reload"
    );
    // While it runs, it keeps its image; an interactive shell is told what comes.
    let out = gw
        .ssh(0)
        .arg("-tt")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"exit\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        text(&out.stderr).contains(&format!(
            "labgate: your container runs image {old}; image {new} is used from its next start"
        )),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(docker_inspect(&name, "{{.Config.Image}}").unwrap(), old);
    docker(&["stop", "-t", "1", &name]);
    let out = gw.run(0, "cat note");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout), "kept\n");
    assert!(
        stderr.contains(&format!(
            "labgate: your container was recreated from image {new} (was {old})"
        )),
        "{stderr}"
    );
    assert_eq!(docker_inspect(&name, "{{.Config.Image}}").unwrap(), new);
    // The next login finds it as it is: no second notice.
    let out = gw.run(0, "true");
    assert!(
        !text(&out.stderr).contains("recreated"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn pull_policy_always_brings_a_moved_tag_and_the_container_follows_it() {
    let mut registry = Registry::start();
    let reference = registry.push("moving", "1", "");
    let tail = format!("[users.{{u0}}]\nimage = \"{reference}\"\npull_policy = \"always\"\n");
    let gw = Gateway::start(1, "", &tail);
    gw.ok(0, "echo kept > note");
    let name = gw.container(0);
    let first = docker_inspect(&name, "{{.Image}}").unwrap();
    // The tag moves away from it below: removed by id at the end.
    registry.refs.lock().unwrap().push(first.clone());
    docker(&["stop", "-t", "1", &name]);
    // The same tag now names another image in the registry.
    let again = registry.push("moving", "1", "RUN echo 2 > /version");
    assert_eq!(again, reference);

    let out = gw.run(0, "cat note /version");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout), "kept\n2\n");
    assert!(
        stderr.contains(&format!(
            "labgate: your container was recreated from image {reference} (was an older image of that name)"
        )),
        "{stderr}"
    );
    assert_ne!(docker_inspect(&name, "{{.Image}}").unwrap(), first);
    assert_eq!(pulls_of(&gw, &reference), 2, "one pull per start");

    // With the registry down, the copy on the host still serves the next start.
    registry.stop();
    docker(&["stop", "-t", "1", &name]);
    assert_eq!(gw.ok(0, "cat note"), "kept\n");
    assert!(
        gw.log()
            .contains("pull failed; using the image already on this host"),
        "{}",
        gw.log()
    );
}

#[test]
fn profiles_give_allowed_users_their_own_container_with_the_same_home_and_refuse_others() {
    let tail = "[profiles.big]\nmemory = \"300M\"\nusers = [\"{u0}\"]\n\n\
                [profiles.small]\nmemory = \"64M\"\nusers = [\"{u0}\", \"{u1}\"]\n";
    let gw = Gateway::start(2, "", tail);
    let (u0, u1) = (gw.users[0].clone(), gw.users[1].clone());
    let _cleanup = common::RemoveContainers(vec![
        format!("labgate-{u0}.big"),
        format!("labgate-{u0}.small"),
        format!("labgate-{u1}.small"),
    ]);
    let as_profile = |i: usize, profile: &str, cmd: &str| -> Output {
        gw.ssh_as(&format!("{}+{profile}", gw.users[i]), &gw.keys[i].private)
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    gw.ok(0, "echo shared > note");
    let out = as_profile(0, "big", "hostname; cat note; echo $HOME $USER");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("labgate-{u0}.big\nshared\n/home/{u0} {u0}\n")
    );
    let big = format!("labgate-{u0}.big");
    assert_eq!(
        docker_inspect(&big, "{{.HostConfig.Memory}}").unwrap(),
        (300u64 << 20).to_string()
    );
    assert_eq!(
        docker_inspect(&big, "{{index .Config.Labels \"labgate.profile\"}}").unwrap(),
        "big"
    );
    // Plain alice keeps her default container and quota.
    assert_eq!(gw.ok(0, "hostname"), format!("labgate-{u0}\n"));
    assert_eq!(
        docker_inspect(&gw.container(0), "{{.HostConfig.Memory}}").unwrap(),
        (256u64 << 20).to_string()
    );
    // A reload applies the profile's new limits to the profile's running container only.
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        config.replace("memory = \"300M\"", "memory = \"320M\""),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || docker_inspect(
            &big,
            "{{.HostConfig.Memory}}"
        )
        .as_deref()
            == Some(&(320u64 << 20).to_string())),
        "{}",
        gw.log()
    );
    assert_eq!(
        docker_inspect(&gw.container(0), "{{.HostConfig.Memory}}").unwrap(),
        (256u64 << 20).to_string()
    );

    let refused = as_profile(1, "big", "true");
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(255), "{stderr}");
    assert!(
        stderr.contains("labgate: you may not use profile \"big\"; profiles you may use: small"),
        "{stderr}"
    );
    let unknown = as_profile(1, "nope", "true");
    assert_eq!(unknown.status.code(), Some(255));
    assert!(
        text(&unknown.stderr).contains("there is no profile \"nope\"; profiles you may use: small"),
        "{}",
        text(&unknown.stderr)
    );
    assert_eq!(common::containers_named(&format!("labgate-{u1}.big")), 0);
    assert_eq!(common::containers_named(&format!("labgate-{u1}.nope")), 0);
    // A malformed profile part is an invalid user name: authentication fails.
    let bad = as_profile(0, "Big", "true");
    assert_eq!(bad.status.code(), Some(255));
    assert!(
        text(&bad.stderr).contains("Permission denied"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn check_warns_about_an_unreadable_registry_password_file_without_showing_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("readable"), "hunter2\n").unwrap();
    let config = dir.path().join("labgate.toml");
    std::fs::write(
        &config,
        "[defaults]\nimage = \"r.lab:5000/lab/a:1\"\n\n[users.bob]\nimage = \"r2.lab/b:1\"\n\n\
         [registries.\"r.lab:5000\"]\nusername = \"u\"\npassword_file = \"missing-secret\"\n\n\
         [registries.\"r2.lab\"]\nusername = \"u\"\npassword_file = \"readable\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("[registries.\"r.lab:5000\"] password_file")
            && stderr.contains("missing-secret cannot be read"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("r2.lab\"]"),
        "a readable file is fine: {stderr}"
    );
    assert!(!stderr.contains("hunter2") && !text(&out.stdout).contains("hunter2"));
}
