//! GPUs without a GPU: the real gateway binary loads a fake `libnvidia-ml.so` (the workspace
//! crate `tests/fake-nvml`, built on first use) through `[gpu] nvml_library`, so the real
//! nvml-wrapper path runs; the real Docker Engine receives the device requests. These hosts
//! have no NVIDIA container runtime, so Docker creates a GPU container and refuses to start it:
//! the tests check what the create carried (device ids, label) and what the user is told.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::{Gateway, IMAGE, docker_inspect, stderr_of};

const GPU0: &str = "GPU-6b1e0d2c-0000-4000-8000-000000000000";
const GPU1: &str = "GPU-6b1e0d2c-0000-4000-8000-000000000001";

/// The fake GPUs have the same UUIDs in every test, and a gateway counts GPUs held by any
/// labgate container on the engine (as it must on a real host): GPU tests run one at a time.
/// The guard is declared first in each test, so it outlives (and is released after) the
/// gateway, whose drop removes the test's containers.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two A100s; GPU 0 is busy (a process, memory, utilisation), GPU 1 idle.
fn two_gpus() -> String {
    format!(
        "{GPU0},NVIDIA A100-SXM4-80GB,81920,util=35,used=2048,mig=off,procs=4242:2048\n\
         {GPU1},NVIDIA A100-SXM4-80GB,81920,util=0,used=0,mig=off\n"
    )
}

/// Builds the fake NVML once per test binary, in a target directory of its own (so it never
/// waits on the lock of the build running these tests), and returns the library's path.
fn fake_nvml() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-nvml");
        let out = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "fake-nvml", "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("running cargo to build tests/fake-nvml");
        assert!(
            out.status.success(),
            "building tests/fake-nvml failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = target.join("debug/libfake_nvml.so");
        assert!(lib.is_file(), "{} missing", lib.display());
        lib
    })
    .clone()
}

/// A copy of the fake as `DIR/libnvidia-ml.so.1`, with `gpus` as its GPU description (the
/// `.gpus` file next to it, which the fake reads).
fn install_fake(dir: &Path, gpus: &str) -> PathBuf {
    let lib = dir.join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml(), &lib).unwrap();
    std::fs::write(dir.join("libnvidia-ml.so.1.gpus"), gpus).unwrap();
    lib
}

fn gpu_section(lib: &Path) -> String {
    format!("[gpu]\nnvml_library = \"{}\"\n", lib.display())
}

/// The device requests Docker recorded for a container, as JSON.
fn device_requests(container: &str) -> serde_json::Value {
    let json = docker_inspect(container, "{{json .HostConfig.DeviceRequests}}")
        .unwrap_or_else(|| panic!("{container} was not created"));
    serde_json::from_str(&json).unwrap()
}

fn assert_asked_for(container: &str, uuids: &[&str]) {
    let requests = device_requests(container);
    assert_eq!(requests.as_array().map(Vec::len), Some(1), "{requests}");
    let r = &requests[0];
    assert_eq!(r["Driver"], "nvidia", "{requests}");
    assert_eq!(r["DeviceIDs"], serde_json::json!(uuids), "{requests}");
    assert_eq!(
        r["Capabilities"],
        serde_json::json!([["gpu"]]),
        "{requests}"
    );
    // Docker shows an unset count as 0: the ids alone choose the GPUs.
    assert_eq!(r["Count"], 0, "{requests}");
    assert_eq!(
        docker_inspect(container, "{{index .Config.Labels \"labgate.gpus\"}}").unwrap(),
        uuids.join(",")
    );
}

/// Asserts a login was refused before the command ran, with `needles` in the message.
fn assert_refused(gw: &Gateway, out: &Output, needles: &[&str]) {
    let err = stderr_of(out);
    assert_eq!(out.status.code(), Some(255), "{err}\n{}", gw.log());
    assert!(out.stdout.is_empty(), "the command must not have run");
    assert!(err.starts_with("labgate: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr should contain {n:?}: {err}");
    }
}

#[test]
fn the_inventory_lists_the_fake_gpus_through_nvml() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let lib = install_fake(dir.path(), &two_gpus());
    let config = dir.path().join("labgate.toml");
    std::fs::write(
        &config,
        format!("{}\n[defaults]\nimage = \"{IMAGE}\"\n", gpu_section(&lib)),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["gpus", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{table}", stderr_of(&out));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("INDEX  UUID"), "{table}");
    let cells = |l: &str| {
        l.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cells(lines[1]),
        [
            "0",
            GPU0,
            "NVIDIA A100-SXM4-80GB",
            "2.0/80.0 GiB",
            "35%",
            "off",
            "1",
            "-"
        ]
    );
    assert_eq!(
        cells(lines[2]),
        [
            "1",
            GPU1,
            "NVIDIA A100-SXM4-80GB",
            "0.0/80.0 GiB",
            "0%",
            "off",
            "0",
            "-"
        ]
    );
}

#[test]
fn no_nvml_library_refuses_gpu_logins_clearly_and_serves_everyone_else() {
    let _serial = one_at_a_time();
    let gw = Gateway::start(
        2,
        "",
        "[users.{u0}]\ngpus = 1\n\n[gpu]\nnvml_library = \"/nonexistent/libnvidia-ml.so.1\"\n",
    );
    let out = gw.run(0, "echo should-not-run");
    assert_refused(
        &gw,
        &out,
        &[
            "your quota asks for 1 GPU(s), but GPUs are not available on this host",
            "/nonexistent/libnvidia-ml.so.1",
            "ask your admin",
        ],
    );
    assert_eq!(
        docker_inspect(&gw.container(0), "{{.Id}}"),
        None,
        "no container without the GPUs the quota asks for"
    );
    assert_eq!(gw.ok(1, "echo fine"), "fine\n");
    let _ = gw.run(0, "true");
    let log = gw.log();
    assert_eq!(
        log.matches("GPUs unavailable").count(),
        1,
        "said once, at start:\n{log}"
    );
}

#[test]
fn a_gpu_login_asks_docker_for_the_allocated_uuids_and_explains_the_missing_runtime() {
    let _serial = one_at_a_time();
    let nvml = tempfile::tempdir().unwrap();
    let lib = install_fake(nvml.path(), &two_gpus());
    let gw = Gateway::start(
        2,
        "",
        &format!(
            "[users.{{u0}}]\ngpus = 1\n\n[users.{{u1}}]\ngpus = [0]\n\n{}",
            gpu_section(&lib)
        ),
    );
    let out = gw.run(0, "echo should-not-run");
    assert_refused(
        &gw,
        &out,
        &[
            "the container engine on this host cannot give containers GPUs",
            "could not select device driver",
            "NVIDIA container toolkit",
        ],
    );
    // A count gets the least-used GPU (1); a pin by index gets exactly that one (0).
    assert_asked_for(&gw.container(0), &[GPU1]);
    let out = gw.run(1, "true");
    assert_refused(&gw, &out, &["cannot give containers GPUs"]);
    assert_asked_for(&gw.container(1), &[GPU0]);
    let log = gw.log();
    assert!(log.contains("GPUs found count=2"), "{log}");
    assert!(log.contains("GPUs allocated"), "{log}");
}

/// Makes a running container for `user` as labgate would have before a restart, recording
/// `gpu` in its label (it cannot really have the GPU here: no NVIDIA runtime).
fn running_gpu_container(gw: &Gateway, i: usize, gpu: &str) {
    let user = &gw.users[i];
    let home = gw.dir.path().join(format!("home/{user}"));
    std::fs::create_dir_all(&home).unwrap();
    let st = Command::new("docker")
        .args(["run", "-d", "--init", "--name", &gw.container(i)])
        .args(["--label", "labgate.managed=true"])
        .args(["--label", &format!("labgate.user={user}")])
        .args(["--label", &format!("labgate.gpus={gpu}")])
        .args(["-v", &format!("{}:/home/{user}", home.display())])
        .args([
            IMAGE,
            "/bin/sh",
            "-c",
            labgate::runtime::docker::spec::KEEPALIVE,
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn exclusive_gpus_refuse_the_second_user_naming_the_holder_until_it_stops() {
    let _serial = one_at_a_time();
    let nvml = tempfile::tempdir().unwrap();
    let only = format!("{GPU0},NVIDIA A100-SXM4-80GB,81920\n");
    let lib = install_fake(nvml.path(), &only);
    let gw = Gateway::start(2, "gpus = 1", &gpu_section(&lib));
    running_gpu_container(&gw, 0, GPU0);
    let holder = &gw.users[0];

    let out = gw.run(1, "echo should-not-run");
    assert_refused(
        &gw,
        &out,
        &[
            "your quota asks for 1 GPU(s) but 0 are free",
            &format!("GPU 0 ({GPU0}) is held by {holder}"),
            "freed when its holder's container stops",
        ],
    );
    assert_eq!(docker_inspect(&gw.container(1), "{{.Id}}"), None);
    // The holder keeps working in their running container, and a login shell's banner shows
    // their GPU with its use.
    assert_eq!(gw.ok(0, "echo mine"), "mine\n");
    let mut shell = gw
        .ssh(0)
        .arg("-tt")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    shell.stdin.take().unwrap().write_all(b"exit\n").unwrap();
    let out = shell.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains(&format!(
            "GPU 0 NVIDIA A100-SXM4-80GB ({GPU0}): 0% busy, 0.0/80.0 GiB used\r\n"
        )),
        "{screen:?}"
    );
    // The admin's table shows who holds it.
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["gpus", "--config"])
        .arg(gw.config_path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap_or_default()
            .ends_with(holder.as_str()),
        "{table}"
    );

    // The holder's container stops: the GPU is free for the next login.
    let st = Command::new("docker")
        .args(["stop", "-t", "1", &gw.container(0)])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let out = gw.run(1, "true");
    assert_refused(&gw, &out, &["cannot give containers GPUs"]);
    assert_asked_for(&gw.container(1), &[GPU0]);
    assert!(gw.log().contains("GPUs released"), "{}", gw.log());
}

#[test]
fn idle_stop_keeps_a_container_whose_gpu_is_busy_and_stops_the_idle_one() {
    let _serial = one_at_a_time();
    let nvml = tempfile::tempdir().unwrap();
    // GPU 0 computes (35% > busy_utilization 10); GPU 1 is idle.
    let lib = install_fake(nvml.path(), &two_gpus());
    let gw = Gateway::start(
        2,
        "gpus = 1\nidle_stop = \"2s\"",
        &format!("{}busy_utilization = 10\n", gpu_section(&lib)),
    );
    running_gpu_container(&gw, 0, GPU0);
    running_gpu_container(&gw, 1, GPU1);
    let state = |i: usize| docker_inspect(&gw.container(i), "{{.State.Status}}").unwrap();
    assert!(
        common::eventually(std::time::Duration::from_secs(30), || state(1) == "exited"),
        "the container with an idle GPU was not stopped; log:\n{}",
        gw.log()
    );
    // Nobody is connected to either, but GPU 0 is busy: well past the idle period, it runs.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(state(0), "running");
    let log = gw.log();
    assert!(log.contains("in use: GPU busy"), "{log}");
}
