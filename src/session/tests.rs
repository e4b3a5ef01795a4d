//! The session layer against the in-process fake backend ([`crate::runtime::fake`]): what a
//! login, idle stop and the profile's container name are, with no Docker.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::text::Greeting;
use super::*;
use crate::auth::{ProfileName, Username};
use crate::config::GpuUuid;
use crate::gpu::GpuInfo;
use crate::login::registry::{self, ConnectionInfo};
use crate::login::testing::{config, context, login, user};
use crate::login::{Context, ensure_container};
use crate::runtime::fake::FakeRuntime;
use crate::runtime::{EnsureOutcome, ExecOutput, GpuNotice};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_logins_make_one_container() {
    let (ctx, fake) = context(config(""));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let login = login(&ctx, "alice", None);
                ensure_container(&ctx, &login).await.map(|c| c.outcome)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap().unwrap());
    }
    assert_eq!(fake.created.load(Ordering::SeqCst), 1);
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == EnsureOutcome::Created)
            .count(),
        1,
        "{outcomes:?}"
    );
    assert!(fake.running("labgate-alice"));
}

#[tokio::test]
async fn the_spec_carries_the_quota_and_a_profile_has_its_own_container() {
    let (ctx, fake) = context(config(
        "gpus = 1\n\n[profiles.big]\nimage = \"lab/big:2\"\nmemory = \"8G\"\nusers = [\"alice\"]\n",
    ));
    fake.gpu_slots.store(2, Ordering::SeqCst);
    let plain = login(&ctx, "alice", None);
    ensure_container(&ctx, &plain).await.unwrap();
    let big = login(&ctx, "alice", Some("big"));
    let c = ensure_container(&ctx, &big).await.unwrap();
    assert_eq!(c.name, "labgate-alice.big");
    let containers = fake.containers();
    let spec = &containers["labgate-alice.big"].spec;
    assert_eq!(spec.image, "lab/big:2");
    assert_eq!(spec.memory.map(|m| m.to_string()).as_deref(), Some("8G"));
    assert_eq!(spec.gpu_request.count(), 1, "the backend decides which");
    assert_eq!(containers["labgate-alice"].spec.image, "lab/base:1");
}

#[tokio::test]
async fn refused_logins_never_reach_the_backend() {
    let (ctx, fake) = context(config(
        "\n[profiles.big]\nimage = \"lab/big:2\"\nusers = [\"carol\"]\n",
    ));
    // A profile alice may not use: authenticated, but every session is refused.
    let denied = login(&ctx, "alice", Some("big"));
    assert!(denied.denied.is_some());
    let err = ensure_container(&ctx, &denied).await.unwrap_err();
    assert!(err.to_string().contains("big"), "{err}");
    // No identity to run as.
    let mut nobody = login(&ctx, "bob", None);
    nobody.identity = Err(crate::auth::identity::IdentityError::NoHostAccount(
        "bob".into(),
    ));
    assert!(ensure_container(&ctx, &nobody).await.is_err());
    assert_eq!(fake.created.load(Ordering::SeqCst), 0);
    assert!(fake.containers().is_empty());
}

#[tokio::test]
async fn a_failed_start_reaches_the_user_as_one_line() {
    let (ctx, fake) = context(config(""));
    *fake.refuse.lock().unwrap() = Some("OCI runtime create failed".into());
    let err = ensure_container(&ctx, &login(&ctx, "alice", None))
        .await
        .unwrap_err();
    assert_eq!(
        text::not_started(&err, true),
        "labgate: your container failed to start: OCI runtime create failed\r\n"
    );
    assert_eq!(
        text::not_started(&err, false),
        "labgate: your container failed to start: OCI runtime create failed\n"
    );
}

fn register(ctx: &Context, name: &str, container: &str) -> registry::Registration {
    ctx.connections.register(
        ConnectionInfo {
            conn: 7,
            user: user(name),
            container: container.to_owned(),
            peer: "192.0.2.7:40000".parse().unwrap(),
            fingerprint: "SHA256:x".into(),
            key: None,
            since: SystemTime::now(),
            stats: Arc::default(),
        },
        Default::default(),
    )
}

#[tokio::test]
async fn idle_stop_stops_only_unused_idle_containers() {
    let (ctx, fake) = context(config("idle_stop = \"1h\"\n"));
    for name in ["alice", "bob", "carol"] {
        ensure_container(&ctx, &login(&ctx, name, None))
            .await
            .unwrap();
    }
    // carol's GPU is busy; bob has a connection open.
    let gpu = GpuUuid::parse("GPU-c0").unwrap();
    fake.containers()
        .get_mut("labgate-carol")
        .unwrap()
        .spec
        .gpus = vec![gpu.clone()];
    *fake.gpus.lock().unwrap() = vec![GpuInfo {
        index: 0,
        uuid: gpu,
        name: "Fake".into(),
        memory_total: 1 << 30,
        mig_mode: None,
        utilization: Some(90),
        memory_used: 0,
        processes: Vec::new(),
    }];
    let _bob = register(&ctx, "bob", "labgate-bob");
    let config = ctx.config.borrow().clone();
    idle::sweep(&ctx, &config).await;
    assert!(
        fake.running("labgate-alice"),
        "idle, but not for an hour yet"
    );
    // An hour passes for alice.
    idle::backdate(&ctx.idle, "labgate-alice", Duration::from_secs(3601));
    idle::sweep(&ctx, &config).await;
    assert!(!fake.running("labgate-alice"), "idle for an hour: stopped");
    assert!(fake.running("labgate-bob"), "in use");
    assert!(fake.running("labgate-carol"), "its GPU is busy");
    assert!(ctx.idle.idle_since("labgate-bob").is_none());
    assert!(ctx.idle.idle_since("labgate-carol").is_none());
}

fn texts(chunks: &[ExecOutput]) -> Vec<(&'static str, String)> {
    chunks
        .iter()
        .map(|c| match c {
            ExecOutput::Stdout(b) => ("out", String::from_utf8_lossy(b).into_owned()),
            ExecOutput::Stderr(b) => ("err", String::from_utf8_lossy(b).into_owned()),
        })
        .collect()
}

#[tokio::test]
async fn a_login_shell_hears_notices_on_stderr_then_the_status_line_and_gpu_banner() {
    let (ctx, _fake) = context(config("cpus = 2\nidle_stop = \"2h\"\n"));
    let login = login(&ctx, "alice", None);
    let mut c = ensure_container(&ctx, &login).await.unwrap();
    let gpu = GpuUuid::parse("GPU-f000").unwrap();
    c.gpus = vec![gpu.clone()];
    c.pending_image = Some("lab/base:0".into());
    c.gpu_notice = Some(GpuNotice::NotYetGiven { count: 2 });
    let live = [GpuInfo {
        index: 0,
        uuid: gpu,
        name: "Fake H100".into(),
        memory_total: 80 << 30,
        mig_mode: None,
        utilization: Some(0),
        memory_used: 0,
        processes: Vec::new(),
    }];
    let server = ctx.config.borrow().server.clone();
    let shell = Greeting {
        server: &server,
        quota: &login.quota,
        container: &c,
        shell: true,
        tty: true,
        gpus: &live,
        gpu_week: Some(45_000.0),
    };
    assert_eq!(
        texts(&shell.render()),
        vec![
            ("err", "labgate: your container runs image lab/base:0; image lab/base:1 is used from its next start (home kept)\r\n".into()),
            ("out", "labgate: container labgate-alice (created) | image lab/base:1 | 2 CPUs, 1G memory | 1 GPU(s) GPU-f000 | GPU this week: 12.5 h | stopped after 2h without a connection\r\n".into()),
            ("err", "labgate: your quota now includes 2 GPU(s); your running container has none. They are given when it is made again (ask your admin)\r\n".into()),
            ("out", "GPU 0 Fake H100 (GPU-f000): 0% busy, 0.0/80.0 GiB used\r\n".into()),
        ]
    );
    // A command keeps stdout exact: only the GPU notice, on stderr, with `\n`.
    let command = Greeting {
        shell: false,
        tty: false,
        ..shell
    };
    assert_eq!(
        texts(&command.render()),
        vec![("err", "labgate: your quota now includes 2 GPU(s); your running container has none. They are given when it is made again (ask your admin)\n".into())]
    );
}

#[test]
fn a_profile_and_a_user_of_the_same_dashed_name_have_their_own_containers() {
    let c = config("\n[users.al-gpu]\n\n[profiles.gpu]\nusers = [\"al\"]\n");
    let al = Username::parse("al").unwrap();
    let gpu = ProfileName::parse("gpu").unwrap();
    let profile = c.profile_quota(&al, &gpu).unwrap();
    assert_eq!(
        crate::runtime::container_name(&al, profile.profile.as_ref()),
        "labgate-al.gpu"
    );
    assert_eq!(
        crate::runtime::container_name(&Username::parse("al-gpu").unwrap(), None),
        "labgate-al-gpu"
    );
}

// The GPU queue, on the fake backend's GPUs (`GPU-fake0`...).

async fn waiting(ctx: &Context, holder: &str) {
    for _ in 0..200 {
        if ctx
            .gpu_line
            .line()
            .iter()
            .any(|p| p.holder.as_str() == holder)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{holder} never joined the line");
}

fn gpu_config(extra: &str) -> crate::config::Config {
    config(&format!("gpus = 1\n\n[gpu]\n{extra}"))
}

/// A gateway on the fake backend with one GPU, which alice holds.
async fn one_gpu_held_by_alice(
    extra: &str,
) -> (
    Arc<Context>,
    Arc<FakeRuntime>,
    crate::runtime::ContainerHandle,
) {
    let (ctx, fake) = context(gpu_config(extra));
    fake.gpu_slots.store(1, Ordering::SeqCst);
    let alice = ensure_container(&ctx, &login(&ctx, "alice", None))
        .await
        .unwrap();
    assert_eq!(alice.gpus.len(), 1);
    (ctx, fake, alice)
}

/// `name` logs in, in a task of its own (it may wait in line).
fn log_in(
    ctx: &Arc<Context>,
    name: &'static str,
) -> tokio::task::JoinHandle<Result<crate::runtime::ContainerHandle, crate::runtime::RuntimeError>>
{
    let ctx = ctx.clone();
    tokio::spawn(async move { ensure_container(&ctx, &login(&ctx, name, None)).await })
}

/// Stops `name`'s container as idle stop or `labgate stop` do, waking the line.
async fn stop(ctx: &Context, name: &str) {
    let listed = ctx.runtime.list_managed().await.unwrap();
    let c = listed.iter().find(|c| c.name == name).unwrap();
    assert!(ctx.runtime.stop(c, Box::new(|| true)).await.unwrap());
    ctx.gpu_line.freed();
}

fn line_of(ctx: &Context) -> Vec<String> {
    ctx.gpu_line
        .line()
        .iter()
        .map(|p| p.holder.to_string())
        .collect()
}

#[tokio::test]
async fn a_login_waits_for_a_gpu_and_gets_it_when_the_holder_stops() {
    let (ctx, _fake, alice) = one_gpu_held_by_alice("").await;
    let bob = log_in(&ctx, "bob");
    waiting(&ctx, "bob").await;
    assert!(!bob.is_finished(), "bob waits while alice holds the GPU");
    stop(&ctx, "labgate-alice").await;
    let got = tokio::time::timeout(Duration::from_secs(1), bob)
        .await
        .expect("bob is served at once when woken")
        .unwrap()
        .unwrap();
    assert_eq!(got.gpus, alice.gpus, "the freed GPU");
    assert!(line_of(&ctx).is_empty(), "bob left the line");
}

#[tokio::test]
async fn a_waiter_whose_connection_ends_leaves_the_line_and_nothing_is_made() {
    let (ctx, fake, _) = one_gpu_held_by_alice("").await;
    let bob_login = login(&ctx, "bob", None);
    let gone = bob_login.gone.clone();
    let bob = tokio::spawn({
        let ctx = ctx.clone();
        async move { ensure_container(&ctx, &bob_login).await }
    });
    waiting(&ctx, "bob").await;
    gone.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(1), bob)
        .await
        .unwrap()
        .unwrap();
    assert!(ended.is_err());
    assert!(line_of(&ctx).is_empty());
    assert!(!fake.containers().contains_key("labgate-bob"));
}

#[tokio::test]
async fn the_line_serves_the_user_with_less_recent_use_first() {
    let (ctx, _fake, _) = one_gpu_held_by_alice("").await;
    // carol used GPUs for an hour this week; bob did not.
    ctx.gpu_line
        .charge(&user("carol"), 3600.0, SystemTime::now());
    let carol = log_in(&ctx, "carol");
    waiting(&ctx, "carol").await;
    let bob = log_in(&ctx, "bob");
    waiting(&ctx, "bob").await;
    assert_eq!(
        line_of(&ctx),
        ["bob", "carol"],
        "less recent use first, though carol came first"
    );
    stop(&ctx, "labgate-alice").await;
    tokio::time::timeout(Duration::from_secs(1), bob)
        .await
        .expect("bob is served first")
        .unwrap()
        .unwrap();
    assert!(!carol.is_finished(), "carol still waits");
    assert_eq!(line_of(&ctx), ["carol"]);
    carol.abort();
}

#[tokio::test]
async fn with_the_queue_off_a_busy_gpu_is_refused_at_once() {
    let (ctx, _fake, _) = one_gpu_held_by_alice("queue = false\n").await;
    let err = tokio::time::timeout(Duration::from_secs(1), log_in(&ctx, "bob"))
        .await
        .expect("no waiting")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("but 0 are free"), "{err}");
}

#[tokio::test]
async fn a_wait_longer_than_max_wait_ends_with_a_clear_message() {
    let (ctx, _fake, _) = one_gpu_held_by_alice("max_wait = \"1s\"\n").await;
    let err = tokio::time::timeout(Duration::from_secs(5), log_in(&ctx, "bob"))
        .await
        .expect("ends after max_wait")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no GPU became free for you within 1s ([gpu] max_wait); try again later, or ask your admin"
    );
    assert!(line_of(&ctx).is_empty());
}

#[tokio::test]
async fn a_larger_gpu_share_lets_a_user_use_more_before_going_behind() {
    // dave's share is 4: his hour counts as 15 minutes, less than erin's half hour.
    let (ctx, _fake, _) = one_gpu_held_by_alice("\n[users.dave]\ngpu_share = 4\n").await;
    let now = SystemTime::now();
    ctx.gpu_line.charge(&user("dave"), 3600.0, now);
    ctx.gpu_line.charge(&user("erin"), 1800.0, now);
    let erin = log_in(&ctx, "erin");
    waiting(&ctx, "erin").await;
    let dave = log_in(&ctx, "dave");
    waiting(&ctx, "dave").await;
    assert_eq!(line_of(&ctx), ["dave", "erin"]);
    erin.abort();
    dave.abort();
}

#[tokio::test]
async fn over_its_weekly_budget_a_user_waits_behind_everyone_under_it_and_is_told() {
    // dave has used no GPU lately by the decayed measure, but 2 of his 1 GPU-hours this week.
    let (ctx, _fake, _) = one_gpu_held_by_alice("\n[users.dave]\ngpu_hours_per_week = 1\n").await;
    let now = SystemTime::now();
    let week = crate::accounting::Charge {
        holder: user("dave"),
        gpus: Vec::new(),
        since: now,
        held: 7200.0,
        busy: 0.0,
        last: false,
    };
    ctx.accounting.record(now, vec![week]).await.unwrap();
    ctx.gpu_line.charge(&user("erin"), 1800.0, now);
    let mut told = ctx.gpu_line.events();
    let dave = log_in(&ctx, "dave");
    waiting(&ctx, "dave").await;
    let erin = log_in(&ctx, "erin");
    waiting(&ctx, "erin").await;
    assert_eq!(line_of(&ctx), ["erin", "dave"], "over budget goes last");
    let daves = loop {
        let w = told.recv().await.unwrap();
        if w.container == "labgate-dave" {
            break w;
        }
    };
    assert_eq!(daves.over_budget, Some((2.0, 1.0)));
    assert!(
        crate::session::text::gpu_wait(&daves, now).ends_with(
            "you used 2.0 of your 1 GPU-hours this week: you wait behind those under their budget"
        ),
        "{}",
        crate::session::text::gpu_wait(&daves, now)
    );
    dave.abort();
    erin.abort();
}

#[tokio::test]
async fn a_users_own_queue_and_max_wait_override_the_gpu_section() {
    let (ctx, _fake, _) = one_gpu_held_by_alice(
        "\n[users.bob]\ngpu_queue = false\n\n[users.carol]\ngpu_max_wait = \"1s\"\n",
    )
    .await;
    let err = tokio::time::timeout(Duration::from_secs(1), log_in(&ctx, "bob"))
        .await
        .expect("bob does not wait")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("but 0 are free"), "{err}");
    let err = tokio::time::timeout(Duration::from_secs(5), log_in(&ctx, "carol"))
        .await
        .expect("carol waits 1s at most")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("within 1s"), "{err}");
    // Waits are recorded with the next sample: carol's, timed out after about a second.
    ctx.accounting
        .record(SystemTime::now(), Vec::new())
        .await
        .unwrap();
    let report = ctx
        .accounting
        .report(SystemTime::now() - Duration::from_secs(60))
        .await
        .unwrap();
    let carol = report.iter().find(|r| r.user == "carol").unwrap();
    assert_eq!(carol.waits, 1);
    assert!((0.9..3.0).contains(&carol.wait_seconds_total), "{carol:?}");
    assert!(report.iter().all(|r| r.user != "bob"), "bob never waited");
}
