//! GPUs without a GPU: the real gateway binary loads a fake `libnvidia-ml.so` (the workspace
//! crate `tests/fake-nvml`, built on first use) through `[gpu] nvml_library`, so the real
//! nvml-wrapper path runs; a real Docker Engine receives the device requests.
//!
//! Most tests run their gateway against a private `dockerd` of their own (`common::dockerd`)
//! with a stub `nvidia-container-runtime-hook` on its PATH: that engine registers its `nvidia`
//! device driver, so GPU containers start, and their init process has
//! `NVIDIA_VISIBLE_DEVICES` set to the UUIDs labgate asked for. Users log in to them and see
//! their GPUs; the tests change the fake GPUs' utilization and processes while the gateway
//! runs (the fake reads its `.gpus` file again when it changes). One test keeps the machine's
//! own engine, which has no NVIDIA runtime: Docker creates the GPU container and refuses to
//! start it, and the user is told why. Without root or `dockerd` the private-engine tests are
//! skipped (a failure under CI).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dockerd::{DockerdOptions, PrivateDockerd};
use common::nvml::{install_fake, set_gpus};
use common::{Gateway, IMAGE, Terminal, docker_inspect, eventually, median, pss_kib, stderr_of};

const GPU0: &str = "GPU-6b1e0d2c-0000-4000-8000-000000000000";
const GPU1: &str = "GPU-6b1e0d2c-0000-4000-8000-000000000001";

/// A gateway counts GPUs held by any labgate container on its engine (as it must on a real
/// host). Each private-engine test has an engine of its own, so [`GPU0`] and [`GPU1`] are
/// free there; on the machine's engine, which other test runs share, a test uses UUIDs of
/// this run's own ([`machine_gpu`]). GPU tests still run one at a time (the guard is declared
/// first in each test, so it is released after the gateway and the engine are gone): each
/// starts a daemon, and they would only compete for the two cores.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// GPU `i`'s UUID for a test on the machine's engine: no other test run uses it.
fn machine_gpu(i: u32) -> String {
    format!("GPU-6b1e0d2c-{i:04x}-4000-8000-{:012x}", std::process::id())
}

/// Two A100s; GPU 0 (`gpu0`) is busy (a process, memory, utilisation), GPU 1 idle.
fn two_gpus_named(gpu0: &str, gpu1: &str) -> String {
    format!(
        "{gpu0},NVIDIA A100-SXM4-80GB,81920,util=35,used=2048,mig=off,procs=4242:2048\n\
         {gpu1},NVIDIA A100-SXM4-80GB,81920,util=0,used=0,mig=off\n"
    )
}

/// [`two_gpus_named`] [`GPU0`] and [`GPU1`].
fn two_gpus() -> String {
    two_gpus_named(GPU0, GPU1)
}

/// A private engine that runs GPU containers (the stub NVIDIA hook), or `None` after saying
/// why the test is skipped.
fn gpu_engine(test: &str) -> Option<PrivateDockerd> {
    match PrivateDockerd::start(DockerdOptions { nvidia_hook: true }) {
        Ok(d) => Some(d),
        Err(why) => {
            common::skip_unless(false, &format!("{test}: {why}"));
            None
        }
    }
}

/// A gateway of `n` users on `engine`, as deployed otherwise.
fn gateway_on(engine: &PrivateDockerd, n: usize, defaults: &str, tail: &str) -> Gateway {
    Gateway::builder()
        .users(n)
        .docker(&engine.socket_line())
        .defaults(defaults)
        .tail(tail)
        .start()
}

/// What user `i` finds in their container's `NVIDIA_VISIBLE_DEVICES`: the engine's nvidia
/// driver sets it for the container's init process (login shells are `docker exec`s, which
/// do not inherit it, so it is read from PID 1). Empty when unset.
fn visible_gpus(gw: &Gateway, i: usize) -> String {
    gw.ok(
        i,
        "tr '\\0' '\\n' </proc/1/environ | sed -n 's/^NVIDIA_VISIBLE_DEVICES=//p'",
    )
    .trim()
    .to_owned()
}

/// The rows of a `labgate gpus` table (header first), split into cells.
fn table_rows(out: &Output) -> Vec<Vec<String>> {
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{table}", stderr_of(out));
    table
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

fn gpu_section(lib: &Path) -> String {
    format!("[gpu]\nnvml_library = \"{}\"\n", lib.display())
}

/// `docker inspect -f FORMAT NAME` on `engine` (the machine's when `None`).
fn inspect(engine: Option<&PrivateDockerd>, name: &str, format: &str) -> Option<String> {
    match engine {
        Some(e) => e.inspect(name, format),
        None => docker_inspect(name, format),
    }
}

/// The device requests Docker recorded for a container, as JSON.
fn device_requests(engine: Option<&PrivateDockerd>, container: &str) -> serde_json::Value {
    let json = inspect(engine, container, "{{json .HostConfig.DeviceRequests}}")
        .unwrap_or_else(|| panic!("{container} was not created"));
    serde_json::from_str(&json).unwrap()
}

/// Asserts `container` (on `engine`, the machine's when `None`) was created asking for
/// exactly `uuids`, and records them in its label.
fn assert_asked_for(engine: Option<&PrivateDockerd>, container: &str, uuids: &[&str]) {
    let requests = device_requests(engine, container);
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
        inspect(
            engine,
            container,
            "{{index .Config.Labels \"labgate.gpus\"}}"
        )
        .unwrap(),
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
    let (gpu0, gpu1) = (machine_gpu(0), machine_gpu(1));
    let lib = install_fake(dir.path(), &two_gpus_named(&gpu0, &gpu1));
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
    let rows = table_rows(&out);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0][..2], ["INDEX", "UUID"], "{rows:?}");
    assert_eq!(
        rows[1],
        [
            "0",
            &gpu0,
            "NVIDIA A100-SXM4-80GB",
            "2.0/80.0 GiB",
            "35%",
            "off",
            "1",
            "-"
        ]
    );
    assert_eq!(
        rows[2],
        [
            "1",
            &gpu1,
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
    let (gpu0, gpu1) = (machine_gpu(0), machine_gpu(1));
    let lib = install_fake(nvml.path(), &two_gpus_named(&gpu0, &gpu1));
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
    assert_asked_for(None, &gw.container(0), &[&gpu1]);
    let out = gw.run(1, "true");
    assert_refused(&gw, &out, &["cannot give containers GPUs"]);
    assert_asked_for(None, &gw.container(1), &[&gpu0]);
    let log = gw.log();
    assert!(log.contains("GPUs found count=2"), "{log}");
    assert!(log.contains("GPUs allocated"), "{log}");
}

#[test]
fn a_gpu_login_runs_in_a_container_that_sees_the_gpus_allocated_to_it() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("a_gpu_login_runs_in_a_container") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let lib = install_fake(nvml.path(), &two_gpus());
    let gw = gateway_on(
        &engine,
        3,
        "",
        &format!(
            "[users.{{u0}}]\ngpus = 1\n\n[users.{{u1}}]\ngpus = [0]\n\n{}",
            gpu_section(&lib)
        ),
    );
    // A count gets the least-used GPU (1); a pin by index gets exactly that one (0), busy as
    // it is; a quota without GPUs gets none.
    assert_eq!(gw.ok(0, "echo in"), "in\n");
    assert_eq!(visible_gpus(&gw, 0), GPU1);
    assert_asked_for(Some(&engine), &gw.container(0), &[GPU1]);
    assert_eq!(gw.ok(1, "echo in"), "in\n");
    assert_eq!(visible_gpus(&gw, 1), GPU0);
    assert_asked_for(Some(&engine), &gw.container(1), &[GPU0]);
    assert_eq!(visible_gpus(&gw, 2), "");
    assert_eq!(
        engine.inspect(&gw.container(2), "{{json .HostConfig.DeviceRequests}}"),
        Some("null".to_owned())
    );
    for i in 0..3 {
        assert_eq!(
            engine
                .inspect(&gw.container(i), "{{.State.Status}}")
                .as_deref(),
            Some("running")
        );
    }
    // The admin's table names each GPU's holder.
    let rows = table_rows(&gw.labgate(&["gpus"]));
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[1][1], GPU0);
    assert_eq!(rows[1].last().unwrap(), &gw.users[1], "{rows:?}");
    assert_eq!(rows[2][1], GPU1);
    assert_eq!(rows[2].last().unwrap(), &gw.users[0], "{rows:?}");
    let log = gw.log();
    assert!(log.contains("GPUs allocated"), "{log}");
}

#[test]
fn exclusive_gpus_refuse_the_second_user_naming_the_holder_until_it_stops() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("exclusive_gpus_refuse_the_second_user") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let only = format!("{GPU0},NVIDIA A100-SXM4-80GB,81920\n");
    let lib = install_fake(nvml.path(), &only);
    // Without the queue, a login whose GPUs are held is refused at once.
    let gw = gateway_on(
        &engine,
        2,
        "gpus = 1",
        &format!("{}queue = false\n", gpu_section(&lib)),
    );
    let holder = &gw.users[0];
    assert_eq!(visible_gpus(&gw, 0), GPU0);

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
    assert_eq!(engine.inspect(&gw.container(1), "{{.Id}}"), None);
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
    let rows = table_rows(&gw.labgate(&["gpus"]));
    assert_eq!(rows[1].last(), Some(holder), "{rows:?}");

    // The holder's container stops: the GPU is free for the next login, which runs with it.
    engine.docker(&["stop", "-t", "1", &gw.container(0)]);
    assert_eq!(gw.ok(1, "echo got-it"), "got-it\n");
    assert_eq!(visible_gpus(&gw, 1), GPU0);
    assert_asked_for(Some(&engine), &gw.container(1), &[GPU0]);
    assert!(gw.log().contains("GPUs released"), "{}", gw.log());
    // Now the first user is the one refused, named the other way round.
    let out = gw.run(0, "echo should-not-run");
    assert_refused(
        &gw,
        &out,
        &[&format!("GPU 0 ({GPU0}) is held by {}", gw.users[1])],
    );
}

#[test]
fn idle_stop_keeps_a_container_whose_gpu_is_busy_and_stops_the_idle_one() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("idle_stop_keeps_a_container_whose_gpu_is_busy") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    // GPU 0 computes (35% > busy_utilization 10); GPU 1 is idle.
    let lib = install_fake(nvml.path(), &two_gpus());
    let gw = gateway_on(
        &engine,
        2,
        "idle_stop = \"2s\"",
        &format!(
            "[users.{{u0}}]\ngpus = [0]\n\n[users.{{u1}}]\ngpus = [1]\n\n{}busy_utilization = 10\n",
            gpu_section(&lib)
        ),
    );
    assert_eq!(visible_gpus(&gw, 0), GPU0);
    assert_eq!(visible_gpus(&gw, 1), GPU1);
    let state = |i: usize| {
        engine
            .inspect(&gw.container(i), "{{.State.Status}}")
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(30), || state(1) == "exited"),
        "the container with an idle GPU was not stopped; log:\n{}",
        gw.log()
    );
    // Nobody is connected to either, but GPU 0 is busy: well past the idle period, it runs.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(state(0), "running");
    let log = gw.log();
    assert!(log.contains("in use: GPU busy"), "{log}");
    // The stopped user logs in again: their container starts with the same GPU.
    assert_eq!(visible_gpus(&gw, 1), GPU1);
}

#[test]
fn a_gpu_turning_busy_while_the_gateway_runs_keeps_its_container_until_idle_again() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("a_gpu_turning_busy_while_the_gateway_runs") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let idle = format!("{GPU0},NVIDIA A100-SXM4-80GB,81920,util=0,used=0\n");
    let lib = install_fake(nvml.path(), &idle);
    let gw = gateway_on(
        &engine,
        1,
        "gpus = 1\nidle_stop = \"3s\"",
        &format!("{}busy_utilization = 10\n", gpu_section(&lib)),
    );
    let row = || table_rows(&gw.labgate(&["gpus"])).swap_remove(1);
    let state = || {
        engine
            .inspect(&gw.container(0), "{{.State.Status}}")
            .unwrap()
    };
    // The user starts a job on the GPU as they log out: it computes, with a process.
    assert_eq!(visible_gpus(&gw, 0), GPU0);
    set_gpus(
        nvml.path(),
        &format!("{GPU0},NVIDIA A100-SXM4-80GB,81920,util=80,used=4096,procs=4242:4096\n"),
    );
    // The running gateway sees it: the admin's table, and idle stop sparing the container
    // well past its idle period.
    assert_eq!(
        row(),
        [
            "0",
            GPU0,
            "NVIDIA A100-SXM4-80GB",
            "4.0/80.0 GiB",
            "80%",
            "-",
            "1",
            gw.users[0].as_str()
        ]
    );
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(state(), "running", "{}", gw.log());
    assert!(gw.log().contains("in use: GPU busy"), "{}", gw.log());
    // The job ends: the GPU is idle again, and the container is stopped, its GPU released.
    set_gpus(nvml.path(), &idle);
    assert_eq!(row()[4], "0%");
    assert!(
        eventually(Duration::from_secs(30), || state() == "exited"),
        "the container of an idle GPU was not stopped; log:\n{}",
        gw.log()
    );
    assert!(
        eventually(Duration::from_secs(10), || row().last().map(String::as_str)
            == Some("-")),
        "{:?}",
        row()
    );
}

/// A gateway on `engine` whose users' quotas ask for 1 GPU, with one idle A100 ([`GPU0`])
/// described in `nvml`; `gpu_extra`: more lines of `[gpu]`.
fn one_gpu(engine: &PrivateDockerd, nvml: &Path, n: usize, gpu_extra: &str) -> Gateway {
    let lib = install_fake(
        nvml,
        &format!("{GPU0},NVIDIA A100-SXM4-80GB,81920,util=0,used=0\n"),
    );
    gateway_on(
        engine,
        n,
        "gpus = 1",
        &format!("{}{gpu_extra}", gpu_section(&lib)),
    )
}

/// What a waiting session without a terminal is told, up to the holder's "since" time:
/// `labgate: waiting for 1 GPU, PLACE in line | GPU 0 HOLDER since `.
fn waiting(place: &str, holder: &str) -> String {
    format!("labgate: waiting for 1 GPU, {place} in line | GPU 0 {holder} since ")
}

/// Asserts `rest` (what follows [`waiting`] on its line) is `HH:MM, idle` and, once the
/// GPU has been sampled idle, for how long (`HH:MM, idle 4s`).
fn assert_since_idle(rest: &str) {
    let b = rest.as_bytes();
    let idle_for = rest.get(11..).unwrap_or("");
    assert!(
        rest.len() >= 11
            && b[..2].iter().chain(&b[3..5]).all(u8::is_ascii_digit)
            && b[2] == b':'
            && &rest[5..11] == ", idle"
            && (idle_for.is_empty()
                || (idle_for.starts_with(' ')
                    && idle_for[1..].ends_with(['s', 'm', 'h', 'd'])
                    && idle_for[1..].starts_with(|c: char| c.is_ascii_digit()))),
        "expected `HH:MM, idle[ DURATION]` after the holder, got {rest:?}"
    );
}

/// `labgate stop USER` through the gateway's admin socket; asserts it stopped something.
fn admin_stop(gw: &Gateway, user: &str) {
    let out = gw.labgate(&["stop", user]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{said}", stderr_of(&out));
    assert!(said.contains(&format!("labgate-{user}")), "{said}");
}

/// Whether the audit log has `event` for `user`.
fn audited(gw: &Gateway, event: &str, user: &str) -> bool {
    gw.audit()
        .iter()
        .any(|l| l["event"] == event && l["user"] == user)
}

/// How long after `labgate stop` ended a holder's container (its audit line, written after
/// the GPUs were released and waiters woken) the waiting `user` was given GPUs. Woken, a
/// waiter takes them at once; one that only looks again every 2 s would be a second or more
/// late, as the tests stop the holder within a moment of the waiter's last look.
fn served_after_stop(gw: &Gateway, user: &str) -> Duration {
    let audit = gw.audit();
    let ts = |event: &str, who: Option<&str>| {
        let line = audit
            .iter()
            .rev()
            .find(|l| l["event"] == event && who.is_none_or(|u| l["user"] == u))
            .unwrap_or_else(|| panic!("no {event:?} in the audit log: {audit:#?}"));
        humantime::parse_rfc3339(line["ts"].as_str().unwrap()).unwrap()
    };
    let allocated = ts("GPUs allocated", Some(user));
    allocated
        .duration_since(ts("admin stop", None))
        .unwrap_or_default()
}

/// A client started in the background without a terminal (stdin closed), its stdout and
/// stderr collected as they come; killed when dropped.
struct Background {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Bytes of stderr already matched by [`Background::expect_stderr`].
    seen: usize,
}

impl Background {
    /// `ssh USER@gw CMD` as user `i`.
    fn start(gw: &Gateway, i: usize, cmd: &str) -> Background {
        let mut child = gw
            .ssh(i)
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let readers = vec![
            collect(child.stdout.take().unwrap(), Arc::clone(&stdout)),
            collect(child.stderr.take().unwrap(), Arc::clone(&stderr)),
        ];
        Background {
            child,
            stdout,
            stderr,
            readers,
            seen: 0,
        }
    }

    fn stdout(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits (`timeout` at most) until stderr, past what earlier calls matched, has a line
    /// containing `needle`; returns the rest of that line.
    fn expect_stderr(&mut self, gw: &Gateway, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.stderr();
            if let Some(at) = all[self.seen.min(all.len())..].find(needle) {
                let from = self.seen + at + needle.len();
                if let Some(end) = all[from..].find('\n') {
                    self.seen = from + end;
                    return all[from..from + end].to_owned();
                }
            }
            assert!(
                Instant::now() < deadline,
                "never saw {needle:?} on stderr: {all:?}\nexited: {:?}\ngateway log:\n{}",
                self.child.try_wait(),
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the client still runs.
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the client to exit (`timeout` at most) and for its output to be read.
    fn exit_within(&mut self, gw: &Gateway, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "ssh still runs after {timeout:?}; stderr: {:?}\ngateway log:\n{}",
                self.stderr(),
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        status
    }

    /// Kills the client, as a user closing their laptop would.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

fn collect(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

#[test]
fn a_second_user_waits_for_the_gpu_and_gets_it_when_the_holder_stops() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("a_second_user_waits_for_the_gpu") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let gw = one_gpu(&engine, nvml.path(), 2, "");
    let (alice, bob) = (&gw.users[0], &gw.users[1]);
    assert_eq!(visible_gpus(&gw, 0), GPU0);

    // Bob's command waits: his stdout untouched, his stderr saying where he stands.
    let mut waiter = Background::start(&gw, 1, "echo started");
    let rest = waiter.expect_stderr(&gw, &waiting("1st", alice), Duration::from_secs(20));
    assert_since_idle(&rest);
    std::thread::sleep(Duration::from_millis(200));
    assert!(waiter.running(), "{}", waiter.stderr());
    assert!(waiter.stdout().is_empty(), "{:?}", waiter.stdout());
    assert_eq!(engine.inspect(&gw.container(1), "{{.Id}}"), None);
    assert!(audited(&gw, "waiting for GPUs", bob), "{:#?}", gw.audit());

    // Alice is stopped: Bob's command runs at once, with the GPU, its output byte-exact.
    let stopped = Instant::now();
    admin_stop(&gw, alice);
    let status = waiter.exit_within(&gw, Duration::from_secs(10));
    let took = stopped.elapsed();
    assert_eq!(status.code(), Some(0), "{}", waiter.stderr());
    assert_eq!(String::from_utf8_lossy(&waiter.stdout()), "started\n");
    for line in waiter.stderr().lines() {
        assert!(line.starts_with("labgate: waiting for 1 GPU, "), "{line:?}");
    }
    let woken = served_after_stop(&gw, bob);
    eprintln!("bob's command ended {took:?} after `labgate stop` was run, served {woken:?} after");
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(woken < Duration::from_millis(700), "not woken: {woken:?}");
    assert_eq!(visible_gpus(&gw, 1), GPU0);
    assert_asked_for(Some(&engine), &gw.container(1), &[GPU0]);
    assert!(
        audited(&gw, "GPUs free: leaving the queue", bob),
        "{:#?}",
        gw.audit()
    );
}

#[test]
fn a_waiter_that_disconnects_leaves_no_trace() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("a_waiter_that_disconnects_leaves_no_trace") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let gw = one_gpu(&engine, nvml.path(), 3, "");
    let (alice, bob) = (&gw.users[0], &gw.users[1]);
    assert_eq!(visible_gpus(&gw, 0), GPU0);

    let mut waiter = Background::start(&gw, 1, "echo should-not-run");
    waiter.expect_stderr(&gw, &waiting("1st", alice), Duration::from_secs(20));
    waiter.kill();
    assert!(
        eventually(Duration::from_secs(10), || audited(
            &gw,
            "left the GPU queue",
            bob
        )),
        "{:#?}",
        gw.audit()
    );

    // The GPU frees: nobody is left in line to take it, and the next login gets it at once.
    admin_stop(&gw, alice);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        engine.containers_named(&gw.container(1)).is_empty(),
        "{}",
        gw.log()
    );
    let t = Instant::now();
    assert_eq!(visible_gpus(&gw, 2), GPU0);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        engine.containers_named(&gw.container(1)).is_empty(),
        "{}",
        gw.log()
    );
    assert!(!audited(&gw, "waiting for GPUs", &gw.users[2]));
}

#[test]
fn the_line_is_served_by_recent_usage() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("the_line_is_served_by_recent_usage") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let gw = one_gpu(&engine, nvml.path(), 3, "");
    let (alice, bob, carol) = (&gw.users[0], &gw.users[1], &gw.users[2]);
    // Carol has used the GPU lately (usage is sampled every 2 s); Bob never has.
    assert_eq!(visible_gpus(&gw, 2), GPU0);
    std::thread::sleep(Duration::from_secs(5));
    admin_stop(&gw, carol);
    assert_eq!(visible_gpus(&gw, 0), GPU0);

    // Carol comes first, then Bob: Bob goes ahead of her.
    let mut carol_waits = Background::start(&gw, 2, "echo carol");
    carol_waits.expect_stderr(&gw, &waiting("1st", alice), Duration::from_secs(20));
    let mut bob_waits = Background::start(&gw, 1, "echo bob");
    bob_waits.expect_stderr(&gw, &waiting("1st", alice), Duration::from_secs(20));
    carol_waits.expect_stderr(&gw, &waiting("2nd", alice), Duration::from_secs(10));

    // The GPU frees: Bob gets it; Carol waits on, now first, behind Bob.
    admin_stop(&gw, alice);
    let status = bob_waits.exit_within(&gw, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", bob_waits.stderr());
    assert_eq!(String::from_utf8_lossy(&bob_waits.stdout()), "bob\n");
    let woken = served_after_stop(&gw, bob);
    eprintln!("bob served {woken:?} after alice's stop");
    assert!(
        woken < Duration::from_millis(700),
        "bob not woken: {woken:?}"
    );
    carol_waits.expect_stderr(&gw, &waiting("1st", bob), Duration::from_secs(10));
    assert!(carol_waits.running(), "{}", carol_waits.stderr());
    assert!(carol_waits.stdout().is_empty());

    // Bob is stopped: Carol gets it.
    admin_stop(&gw, bob);
    let status = carol_waits.exit_within(&gw, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", carol_waits.stderr());
    assert_eq!(String::from_utf8_lossy(&carol_waits.stdout()), "carol\n");
    let woken = served_after_stop(&gw, carol);
    eprintln!("carol served {woken:?} after bob's stop");
    assert!(
        woken < Duration::from_millis(700),
        "carol not woken: {woken:?}"
    );
    assert_eq!(visible_gpus(&gw, 2), GPU0);
}

#[test]
fn ctrl_c_on_a_terminal_leaves_the_line() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("ctrl_c_on_a_terminal_leaves_the_line") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let gw = one_gpu(&engine, nvml.path(), 2, "");
    let (alice, bob) = (&gw.users[0], &gw.users[1]);
    assert_eq!(visible_gpus(&gw, 0), GPU0);

    let mut term = Terminal::open(gw.ssh(1).arg("-tt"), 24, 80);
    term.expect(&format!(
        "\r\x1b[Klabgate: waiting for 1 GPU, 1st in line | GPU 0 {alice} since "
    ));
    term.send("\x03");
    term.expect("labgate: you left the queue for GPUs; nothing was started\r\n");
    assert_eq!(term.wait().code(), Some(130));
    assert!(
        engine.containers_named(&gw.container(1)).is_empty(),
        "{}",
        gw.log()
    );
    assert!(audited(&gw, "left the GPU queue", bob), "{:#?}", gw.audit());
    // Alice keeps her GPU.
    assert_eq!(gw.ok(0, "echo still"), "still\n");
}

#[test]
fn max_wait_ends_the_wait_with_a_clear_message() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("max_wait_ends_the_wait_with_a_clear_message") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let gw = one_gpu(&engine, nvml.path(), 2, "max_wait = \"3s\"\n");
    let (alice, bob) = (&gw.users[0], &gw.users[1]);
    assert_eq!(visible_gpus(&gw, 0), GPU0);

    let t = Instant::now();
    let out = gw.run(1, "echo should-not-run");
    let took = t.elapsed();
    let err = stderr_of(&out);
    assert!(err.starts_with(&waiting("1st", alice)), "{err}");
    assert_refused(
        &gw,
        &out,
        &[
            "no GPU became free for you within 3s ([gpu] max_wait)",
            "try again later",
        ],
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert!(
        engine.containers_named(&gw.container(1)).is_empty(),
        "{}",
        gw.log()
    );
    assert!(
        audited(&gw, "GPU wait too long: leaving the queue", bob),
        "{:#?}",
        gw.audit()
    );
}

/// The `labgate usage --json` row of `user` (no profile).
fn usage_row(gw: &Gateway, user: &str) -> serde_json::Value {
    let out = gw.labgate(&["usage", "--json", "--since", "1h"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["user"] == user && r["profile"].is_null())
        .cloned()
        .unwrap_or_else(|| panic!("no row for {user}: {report:#}"))
}

/// What the audit log's `GPU use ended` lines of `user` add up to: (held, busy) GPU-seconds.
fn audited_use(gw: &Gateway, user: &str) -> (f64, f64, usize) {
    let ended: Vec<_> = gw
        .audit()
        .into_iter()
        .filter(|l| l["event"] == "GPU use ended" && l["user"] == user)
        .collect();
    let sum = |k: &str| ended.iter().map(|l| l[k].as_f64().unwrap()).sum::<f64>();
    (sum("held_seconds"), sum("busy_seconds"), ended.len())
}

#[test]
fn gpu_use_and_waits_are_accounted_match_the_audit_log_and_survive_a_restart() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("gpu_use_and_waits_are_accounted") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let mut gw = one_gpu(&engine, nvml.path(), 2, "");
    let (alice, bob) = (gw.users[0].clone(), gw.users[1].clone());
    // The GPU runs at 50% while held: half of its held time counts as busy.
    set_gpus(
        nvml.path(),
        &format!("{GPU0},NVIDIA A100-SXM4-80GB,81920,util=50,used=0\n"),
    );
    gw.ok(0, "true");
    let mut waiter = Background::start(&gw, 1, "echo started");
    waiter.expect_stderr(&gw, &waiting("1st", &alice), Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(4));
    admin_stop(&gw, &alice);
    assert_eq!(
        waiter.exit_within(&gw, Duration::from_secs(10)).code(),
        Some(0)
    );
    std::thread::sleep(Duration::from_secs(3));
    admin_stop(&gw, &bob);
    assert!(
        eventually(Duration::from_secs(10), || audited_use(&gw, &bob).2 == 1
            && audited_use(&gw, &alice).2 == 1),
        "{:#?}",
        gw.audit()
    );

    let check = |gw: &Gateway| {
        for user in [&alice, &bob] {
            let row = usage_row(gw, user);
            let (held, busy, _) = audited_use(gw, user);
            let (r_held, r_busy) = (
                row["gpu_seconds_held"].as_f64().unwrap(),
                row["gpu_seconds_busy"].as_f64().unwrap(),
            );
            assert!(
                (r_held - held).abs() < 0.01,
                "{user}: {row} vs audit {held}"
            );
            assert!(
                (r_busy - busy).abs() < 0.01,
                "{user}: {row} vs audit {busy}"
            );
            assert!(
                (1.5..40.0).contains(&r_held),
                "{user} held for seconds: {row}"
            );
            assert!(
                (r_busy / r_held - 0.5).abs() < 0.01,
                "{user} kept it 50% busy: {row}"
            );
        }
        let alice_row = usage_row(gw, &alice);
        assert!(
            alice_row["gpu_seconds_held"].as_f64().unwrap() >= 4.0,
            "{alice_row}"
        );
        let bob_row = usage_row(gw, &bob);
        assert_eq!(bob_row["waits"], 1, "{bob_row}");
        let waited = bob_row["wait_seconds_total"].as_f64().unwrap();
        assert!(
            (3.0..40.0).contains(&waited),
            "bob waited about 4 s: {bob_row}"
        );
        assert_eq!(usage_row(gw, &alice)["waits"], 0);
    };
    check(&gw);
    // The table says the same in hours.
    let table = gw.labgate(&["usage"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{}", stderr_of(&table));
    assert!(text.lines().nth(1).unwrap().starts_with("USER "), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with(&format!("{bob} "))),
        "{text}"
    );

    // Stopped, then started again: nothing is lost, nothing counted twice; `labgate usage`
    // reads the record without a gateway too.
    gw.stop();
    check(&gw);
    gw.spawn();
    std::thread::sleep(Duration::from_secs(3));
    check(&gw);
}

/// The GPU queue's figures for `bench/run` (not a test: it asserts nothing a user checks and
/// is never run by `cargo test`):
/// - how soon a freed GPU reaches the head of the line (`labgate stop` of the holder to the
///   waiter's GPUs allocated, and to its command's end), over 5 rounds;
/// - what a waiting login costs the gateway in memory, against an idle `ssh -N` connection;
/// - login time (`ssh USER true`, container running) with an empty accounting database and
///   with a week of minutes of 50 users in it.
///
/// `cargo test --release --test gpu -- --ignored --nocapture gpu_queue_figures`
#[test]
#[ignore = "a benchmark: bench/run runs it"]
fn gpu_queue_figures() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("gpu_queue_figures") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let mut gw = one_gpu(&engine, nvml.path(), 2, "");

    // 1. A freed GPU to the head of the line.
    let (mut served, mut ran) = (Vec::new(), Vec::new());
    for round in 0..5 {
        let (holder, waiter) = (round % 2, 1 - round % 2);
        gw.ok(holder, "true");
        let mut w = Background::start(&gw, waiter, "true");
        w.expect_stderr(&gw, "labgate: waiting for 1 GPU", Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(300));
        let stopped = Instant::now();
        admin_stop(&gw, &gw.users[holder].clone());
        assert_eq!(w.exit_within(&gw, Duration::from_secs(20)).code(), Some(0));
        ran.push(stopped.elapsed().as_secs_f64() * 1000.0);
        served.push(served_after_stop(&gw, &gw.users[waiter].clone()).as_secs_f64() * 1000.0);
        admin_stop(&gw, &gw.users[waiter].clone());
    }

    // 2. Memory: 20 idle connections of the holder, then 20 logins waiting.
    const N: usize = 20;
    gw.ok(0, "true");
    std::thread::sleep(Duration::from_secs(2));
    let base = pss_kib(gw.pid());
    let idle: Vec<Child> = (0..N)
        .map(|_| {
            gw.ssh(0)
                .arg("-N")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    eventually(Duration::from_secs(30), || {
        gw.metric("labgate_connections") == Some(N as f64)
    });
    std::thread::sleep(Duration::from_secs(2));
    let with_idle = pss_kib(gw.pid());
    let mut waiters: Vec<Background> = (0..N).map(|_| Background::start(&gw, 1, "true")).collect();
    for w in &mut waiters {
        w.expect_stderr(&gw, "labgate: waiting for 1 GPU", Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(2));
    let with_waiters = pss_kib(gw.pid());
    drop(waiters);
    for mut c in idle {
        let _ = c.kill();
        let _ = c.wait();
    }
    let per_idle = (with_idle.saturating_sub(base)) as f64 / N as f64;
    let per_waiter = (with_waiters.saturating_sub(with_idle)) as f64 / N as f64;

    // 3. Login time, with an empty database and with a week of 50 users' minutes, in turns
    // (each after a restart), so drift on the machine falls on both.
    let state = gw.dir.path().join("state");
    let full_db = gw.dir.path().join("full.sqlite");
    {
        use labgate::accounting::{Charge, store::Store};
        let mut store = Store::open(&full_db).unwrap();
        let now = std::time::SystemTime::now();
        for minute in 0..7 * 24 * 60u64 {
            let at = now - Duration::from_secs(60 * minute);
            let charges: Vec<Charge> = (0..50)
                .map(|u| Charge {
                    holder: labgate::auth::Username::parse(&format!("bench{u}")).unwrap(),
                    gpus: Vec::new(),
                    since: at,
                    held: 60.0,
                    busy: 30.0,
                    last: true,
                })
                .collect();
            store.record(at, &charges, &[]).unwrap();
        }
    }
    let (mut empty, mut full) = (Vec::new(), Vec::new());
    for turn in 0..4 {
        gw.stop();
        for f in ["usage.sqlite", "usage.sqlite-wal", "usage.sqlite-shm"] {
            let _ = std::fs::remove_file(state.join(f));
        }
        if turn % 2 == 1 {
            std::fs::copy(&full_db, state.join("usage.sqlite")).unwrap();
        }
        gw.spawn();
        gw.ok(0, "true");
        for _ in 0..8 {
            let t = Instant::now();
            gw.ok(0, "true");
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if turn % 2 == 1 {
                full.push(ms)
            } else {
                empty.push(ms)
            }
        }
    }
    let (empty, full) = (median(empty), median(full));

    println!(
        "gpu-queue: freed GPU to the head's allocation, ms (median of 5): {:.0}",
        median(served)
    );
    println!(
        "gpu-queue: freed GPU to the head's command done, ms (median of 5): {:.0}",
        median(ran)
    );
    println!("gpu-queue: gateway memory per idle connection, KiB: {per_idle:.0}");
    println!("gpu-queue: gateway memory per waiting login, KiB: {per_waiter:.0}");
    println!("gpu-queue: login (ssh true), empty accounting, ms (median of 16): {empty:.1}");
    println!("gpu-queue: login (ssh true), a week of 50 users, ms (median of 16): {full:.1}");
    println!("gpu-queue: login ratio full/empty: {:.2}", full / empty);
}

/// `[gpu]` lines that turn reclaim on, short enough for a test: warned after 2 s idle, stopped
/// 4 s later.
const RECLAIM: &str = "reclaim_idle = \"2s\"\nreclaim_warning = \"4s\"\n";

/// User `i`'s login shell on a terminal, once it answers.
fn shell_on_terminal(gw: &Gateway, i: usize) -> Terminal {
    let mut term = Terminal::open(gw.ssh(i).arg("-tt"), 24, 80);
    term.send("echo ready-$((6*7))\n");
    term.expect("ready-42");
    term
}

/// Asserts `rest`, what follows "your container will be stopped at " in a warning, is
/// `HH:MM (in Ns) unless you use them; your home is kept` with N at most `warning` seconds.
fn assert_deadline(rest: &str, warning: u64) {
    let (clock, tail) = rest.split_at(5.min(rest.len()));
    let b = clock.as_bytes();
    assert!(
        b.len() == 5 && b[2] == b':' && b[..2].iter().chain(&b[3..]).all(u8::is_ascii_digit),
        "expected HH:MM first: {rest:?}"
    );
    let secs: u64 = tail
        .strip_prefix(" (in ")
        .and_then(|t| t.split_once("s) unless you use them; your home is kept"))
        .filter(|(_, after)| after.is_empty())
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected warning {rest:?}"));
    assert!((1..=warning).contains(&secs), "{rest:?}");
}

#[test]
fn reclaim_warns_an_idle_holder_then_stops_it_for_the_one_who_waits() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("reclaim_warns_an_idle_holder_then_stops_it") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let gw = one_gpu(&engine, nvml.path(), 2, RECLAIM);
    let (alice, bob) = (&gw.users[0], &gw.users[1]);
    // Alice holds the only GPU, idle, with a shell open.
    let mut term = shell_on_terminal(&gw, 0);
    let mut waiter = Background::start(&gw, 1, "echo started");
    waiter.expect_stderr(&gw, &waiting("1st", alice), Duration::from_secs(20));

    // Someone waits and her GPU has been idle past reclaim_idle: her terminal is warned.
    let idle = term.expect_line(
        "\r\nlabgate: your GPUs have been idle for ",
        Duration::from_secs(10),
    );
    let warned = Instant::now();
    let rest = idle
        .split_once(" while others wait for one: your container will be stopped at ")
        .unwrap_or_else(|| panic!("unexpected warning {idle:?}"))
        .1;
    assert_deadline(rest, 4);
    assert!(
        audited(&gw, "GPU reclaim warning", alice),
        "{:#?}",
        gw.audit()
    );
    assert_eq!(
        engine
            .inspect(&gw.container(0), "{{.State.Status}}")
            .as_deref(),
        Some("running")
    );
    // The admin sees it coming.
    let status = gw.labgate(&["status"]);
    let said = String::from_utf8_lossy(&status.stdout);
    let reclaiming = said
        .lines()
        .skip_while(|l| !l.starts_with("RECLAIMING"))
        .nth(1);
    assert!(
        reclaiming.is_some_and(|l| l.starts_with(&gw.container(0))),
        "{said}"
    );

    // Still idle at the deadline: stopped, her terminal told why; Bob gets the GPU.
    let why = term.expect_line(
        "labgate: your container is being stopped: its GPUs were idle for ",
        Duration::from_secs(10),
    );
    let after = warned.elapsed();
    assert!(
        why.ends_with(
            " while others waited for one; your home is kept, and your next login starts it again"
        ),
        "{why:?}"
    );
    eprintln!("alice was warned: idle for {idle:?}\n{after:?} later: idle for {why:?}");
    assert!(
        after >= Duration::from_secs(3),
        "the window was cut short: {after:?}"
    );
    term.wait();
    let status = waiter.exit_within(&gw, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", waiter.stderr());
    assert_eq!(String::from_utf8_lossy(&waiter.stdout()), "started\n");
    assert_eq!(
        engine
            .inspect(&gw.container(0), "{{.State.Status}}")
            .as_deref(),
        Some("exited"),
        "kept, stopped"
    );
    assert_asked_for(Some(&engine), &gw.container(1), &[GPU0]);
    assert!(
        audited(&gw, "container stopped: GPUs reclaimed", alice),
        "{:#?}",
        gw.audit()
    );
    assert!(audited(&gw, "GPUs free: leaving the queue", bob));
    assert_eq!(gw.metric("labgate_gpu_reclaims_total"), Some(1.0));
}

#[test]
fn reclaim_is_called_off_when_the_gpu_is_used_during_the_warning() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("reclaim_is_called_off_when_the_gpu_is_used") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let gw = one_gpu(&engine, nvml.path(), 2, RECLAIM);
    let alice = &gw.users[0];
    let mut term = shell_on_terminal(&gw, 0);
    let mut waiter = Background::start(&gw, 1, "echo started");
    waiter.expect_stderr(&gw, &waiting("1st", alice), Duration::from_secs(20));
    term.expect_within(
        "\r\nlabgate: your GPUs have been idle for ",
        Duration::from_secs(10),
    );
    let warned = Instant::now();

    // She starts a job on the GPU within the window: called off, and she is told.
    set_gpus(
        nvml.path(),
        &format!("{GPU0},NVIDIA A100-SXM4-80GB,81920,util=80,used=4096,procs=4242:4096\n"),
    );
    term.expect_within(
        "\r\nlabgate: your GPUs are in use again: your container will not be stopped\r\n",
        Duration::from_secs(10),
    );
    assert!(
        audited(&gw, "GPU reclaim called off", alice),
        "{:#?}",
        gw.audit()
    );
    // Past the deadline: her container runs, her shell answers, Bob still waits.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(warned.elapsed()));
    term.send("echo still-$((6*7))\n");
    term.expect("still-42");
    assert_eq!(
        engine
            .inspect(&gw.container(0), "{{.State.Status}}")
            .as_deref(),
        Some("running")
    );
    assert!(waiter.running(), "{}", waiter.stderr());
    assert!(waiter.stdout().is_empty());
    assert!(!audited(&gw, "container stopped: GPUs reclaimed", alice));
}

#[test]
fn reclaim_never_acts_while_nobody_waits() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("reclaim_never_acts_while_nobody_waits") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let gw = one_gpu(&engine, nvml.path(), 2, RECLAIM);
    let alice = &gw.users[0];
    let mut term = shell_on_terminal(&gw, 0);
    // Idle far past reclaim_idle + reclaim_warning, nobody waiting: nothing.
    std::thread::sleep(Duration::from_secs(8));
    let shown = term.unmatched();
    assert!(!shown.contains("labgate:"), "{shown:?}");
    assert!(
        !audited(&gw, "GPU reclaim warning", alice),
        "{:#?}",
        gw.audit()
    );
    assert_eq!(
        engine
            .inspect(&gw.container(0), "{{.State.Status}}")
            .as_deref(),
        Some("running")
    );
    // Reclaim was on all along: the first waiter gets her warned at once.
    let mut waiter = Background::start(&gw, 1, "echo started");
    waiter.expect_stderr(&gw, &waiting("1st", alice), Duration::from_secs(20));
    term.expect_within(
        "\r\nlabgate: your GPUs have been idle for ",
        Duration::from_secs(5),
    );
}

#[test]
fn reclaim_never_warns_an_exempt_user() {
    let _serial = one_at_a_time();
    let Some(engine) = gpu_engine("reclaim_never_warns_an_exempt_user") else {
        return;
    };
    let nvml = tempfile::tempdir().unwrap();
    let gw = one_gpu(
        &engine,
        nvml.path(),
        2,
        &format!("{RECLAIM}\n[users.{{u0}}]\ngpu_reclaim = false\n"),
    );
    let alice = &gw.users[0];
    let mut term = shell_on_terminal(&gw, 0);
    let mut waiter = Background::start(&gw, 1, "echo started");
    waiter.expect_stderr(&gw, &waiting("1st", alice), Duration::from_secs(20));
    // Someone waits, her GPU idle past reclaim_idle + reclaim_warning: never warned.
    std::thread::sleep(Duration::from_secs(6));
    let shown = term.unmatched();
    assert!(!shown.contains("labgate:"), "{shown:?}");
    assert!(
        !audited(&gw, "GPU reclaim warning", alice),
        "{:#?}",
        gw.audit()
    );
    assert_eq!(
        engine
            .inspect(&gw.container(0), "{{.State.Status}}")
            .as_deref(),
        Some("running")
    );
    assert!(waiter.running(), "{}", waiter.stderr());
}
