//! Every line labgate itself says to a user in their session: the login status line, the
//! notices about their container (made again, another image pending, GPUs), why a session
//! did not start or ended, in one place and one voice.
//!
//! Lines start with `labgate: ` and end with `\r\n` on a terminal (the PTY is in raw mode
//! while the gateway writes) and `\n` otherwise. Notices go to stderr, so a command's stdout
//! stays byte-exact; the status line, the message of the day and the GPU banner go to an
//! interactive shell's stdout, as sshd's motd does. Pure functions: the session decides when
//! to say what, this module only how.

use bytes::Bytes;

use crate::config::{GpuUuid, Quota, ServerConfig};
use crate::gpu::GpuInfo;
use crate::runtime::{ContainerHandle, EnsureOutcome, ExecOutput, GpuNotice, RuntimeError};

/// The line end for a session with (`tty`) or without a terminal.
pub fn eol(tty: bool) -> &'static str {
    if tty { "\r\n" } else { "\n" }
}

/// `labgate: TEXT` and the line end.
pub fn line(text: &str, tty: bool) -> String {
    format!("labgate: {text}{}", eol(tty))
}

/// Why a session did not start (the error is phrased for the user).
pub fn not_started(e: &RuntimeError, tty: bool) -> String {
    line(&e.to_string(), tty)
}

/// Why a session ended without an exit status: the container died under the process, or
/// the engine stopped answering.
pub fn ended(e: &RuntimeError, tty: bool) -> String {
    match e {
        RuntimeError::Start(_) | RuntimeError::NodeLost { .. } | RuntimeError::StreamCut { .. } => {
            line(&e.to_string(), tty)
        }
        e => line(
            &format!("lost contact with the container engine; the session ended ({e})"),
            tty,
        ),
    }
}

/// The status line before an interactive shell (container and what happened to it, image,
/// quota, GPUs, idle stop) when `[server] login_status` is on, then `[server] motd`. Lines
/// end with `\n`; empty when both are off.
pub fn login_banner(
    server: &ServerConfig,
    quota: &Quota,
    container: &ContainerHandle,
    gpu_week: Option<f64>,
) -> String {
    let mut out = String::new();
    if server.login_status {
        let what = match container.outcome {
            EnsureOutcome::Created => "created",
            EnsureOutcome::Started => "started",
            EnsureOutcome::Running => "running",
        };
        let mut parts = vec![
            format!("container {} ({what})", container.name),
            format!("image {}", quota.image),
        ];
        let mut limits = Vec::new();
        if let Some(cpus) = quota.cpus {
            limits.push(format!("{cpus} CPUs"));
        }
        if let Some(m) = quota.memory {
            limits.push(format!("{m} memory"));
        }
        if let Some(s) = quota.shm {
            limits.push(format!("{s} shm"));
        }
        if let Some(p) = quota.pids {
            limits.push(format!("{p} processes"));
        }
        if !limits.is_empty() {
            parts.push(limits.join(", "));
        }
        parts.push(match container.gpus.len() {
            0 => "no GPUs".to_owned(),
            n => format!("{n} GPU(s) {}", GpuUuid::join(&container.gpus)),
        });
        if let Some(secs) = gpu_week.filter(|s| *s > 0.0 || quota.gpus != 0) {
            parts.push(match quota.gpu_hours_per_week {
                Some(budget) => format!("GPU this week: {:.1} of {budget} h", secs / 3600.0),
                None => format!("GPU this week: {:.1} h", secs / 3600.0),
            });
        }
        if let Some(idle) = quota.idle_stop {
            parts.push(format!(
                "stopped after {} without a connection",
                humantime::format_duration(idle)
            ));
        }
        out.push_str(&format!("labgate: {}\n", parts.join(" | ")));
    }
    if let Some(motd) = &server.motd {
        out.push_str(motd.trim_end_matches('\n'));
        out.push('\n');
    }
    out
}

/// What the user hears about their container's GPUs.
pub fn gpu_notice(notice: &GpuNotice) -> String {
    let with = |ids: &[GpuUuid]| {
        if ids.is_empty() {
            "without GPUs".to_owned()
        } else {
            format!("with GPU(s) {}", GpuUuid::join(ids))
        }
    };
    let kept = "your home and mounts are kept, other changes inside the container are not";
    match notice {
        GpuNotice::NotYetGiven { count } => format!(
            "your quota now includes {count} GPU(s); your running container has none. They are given when it is made again (ask your admin)"
        ),
        GpuNotice::QuotaChanged { gpus } => format!(
            "your container was made again {} because your GPU quota changed; {kept}",
            with(gpus)
        ),
        GpuNotice::MadeAgain { gpus, taken } => {
            let reason = if taken.is_empty() {
                "it was made before your quota included GPUs".to_owned()
            } else {
                let held: Vec<String> = taken.iter().map(ToString::to_string).collect();
                format!("the GPUs it had are in use ({})", held.join("; "))
            };
            format!(
                "your container was made again {} because {reason}; {kept}",
                with(gpus)
            )
        }
    }
}

/// The line telling a user their running container has another image than the configured one.
pub fn pending_image(running: &str, image: &str) -> String {
    format!(
        "labgate: your container runs image {running}; image {image} is used from its next start (home kept)"
    )
}

/// The line telling a user their container was made from another image (`old`) than before.
pub fn recreated_from(old: &str, image: &str) -> String {
    let was = if old == image {
        "was an older image of that name".to_owned()
    } else {
        format!("was {old}")
    };
    format!("labgate: your container was recreated from image {image} ({was}); your home is kept")
}

/// The line telling a user their container was made again for changed settings.
pub fn remade_for(settings: &[&str]) -> String {
    format!(
        "labgate: your container was made again for the new settings ({}); your home is kept",
        settings.join(", ")
    )
}

/// The line a login waiting for GPUs sees (redrawn on a terminal; a line on stderr each time
/// its place changes without one): what it waits for, its place, and for each GPU it could
/// get who holds it, since when, and whether it is used
/// (`waiting for 1 GPU, 2nd in line | GPU 0 bob since 09:12, idle | GPU 1 carol since 10:40, busy 97%`).
pub fn gpu_wait(w: &crate::login::gpuline::WaitState, now: std::time::SystemTime) -> String {
    let what = if w.wants == 1 {
        "1 GPU".to_owned()
    } else {
        format!("{} GPUs", w.wants)
    };
    let mut parts = vec![format!(
        "waiting for {what}, {} in line",
        ordinal(w.position)
    )];
    for g in &w.gpus {
        if g.holders.is_empty() {
            parts.push(format!("GPU {} free", g.index));
            continue;
        }
        let who: Vec<&str> = g.holders.iter().map(|h| h.as_str()).collect();
        let since = g
            .since
            .map_or_else(String::new, |t| format!(" since {}", clock(t, now)));
        let use_ = match (g.busy, g.utilization) {
            (true, Some(u)) => format!("busy {u}%"),
            (true, None) => "busy".to_owned(),
            (false, _) => match g.idle_for {
                Some(d) => format!("idle {}", short_duration(d)),
                None => "idle".to_owned(),
            },
        };
        parts.push(format!("GPU {} {}{since}, {use_}", g.index, who.join(",")));
    }
    if let Some((used, budget)) = w.over_budget {
        parts.push(format!(
            "you used {used:.1} of your {budget} GPU-hours this week: you wait behind those under their budget"
        ));
    }
    parts.join(" | ")
}

/// `t` in local time as people read a clock: `09:12`, or `Dec 3 09:12` when it is 20 hours
/// or more from `now` (either way).
pub fn clock(t: std::time::SystemTime, now: std::time::SystemTime) -> String {
    let local = chrono::DateTime::<chrono::Local>::from(t);
    let apart = now
        .duration_since(t)
        .or_else(|_| t.duration_since(now))
        .unwrap_or_default();
    if apart < std::time::Duration::from_secs(20 * 3600) {
        local.format("%H:%M").to_string()
    } else {
        local.format("%b %-d %H:%M").to_string()
    }
}

/// How long from `from` to `to`, to the nearest second, as [`short_duration`] says it (0s
/// when `to` is not later).
fn between(from: std::time::SystemTime, to: std::time::SystemTime) -> String {
    let d = to.duration_since(from).unwrap_or_default();
    short_duration(std::time::Duration::from_secs(
        d.as_secs_f64().round() as u64
    ))
}

/// What a running session is told of `event` at `now` (see [`crate::login::notice`]): on a
/// terminal a line of its own among the program's output (`\r\n` before and after, since
/// the cursor may be anywhere), else a line for stderr.
pub fn notice(
    event: &crate::login::notice::Event,
    now: std::time::SystemTime,
    tty: bool,
) -> String {
    use crate::gpu::reclaim::CallOff;
    use crate::login::notice::Event;
    let text = match event {
        Event::ReclaimWarning {
            idle_since,
            deadline,
        } => format!(
            "your GPUs have been idle for {} while others wait for one: your container will be stopped at {} (in {}) unless you use them; your home is kept",
            between(*idle_since, now),
            clock(*deadline, now),
            between(now, *deadline),
        ),
        Event::ReclaimCalledOff { why } => match why {
            CallOff::UsedAgain => {
                "your GPUs are in use again: your container will not be stopped".to_owned()
            }
            CallOff::NobodyWaits => {
                "nobody waits for a GPU any more: your container will not be stopped".to_owned()
            }
            CallOff::Exempt | CallOff::Gone => {
                "GPU reclaim no longer applies to your container: it will not be stopped".to_owned()
            }
        },
        Event::Reclaimed { idle_since } => format!(
            "your container is being stopped: its GPUs were idle for {} while others waited for one; your home is kept, and your next login starts it again",
            between(*idle_since, now),
        ),
    };
    if tty {
        format!("\r\n{}", line(&text, true))
    } else {
        line(&text, false)
    }
}

/// A duration as people say it at a glance: `45s`, `12m`, `2h10m`, `3d4h`.
pub fn short_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{minutes}m"),
        _ if days == 0 && minutes == 0 => format!("{hours}h"),
        _ if days == 0 => format!("{hours}h{minutes}m"),
        _ if hours == 0 => format!("{days}d"),
        _ => format!("{days}d{hours}h"),
    }
}

/// `1st`, `2nd`, `3rd`, `4th`, ... `11th`, `12th`, `13th`, `21st`.
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// The line for a user who pressed Ctrl-C while waiting for GPUs.
pub fn left_queue(tty: bool) -> String {
    line("you left the queue for GPUs; nothing was started", tty)
}

/// The line for a user who pressed Ctrl-C while the cluster placed their container.
pub fn gave_up_start(tty: bool) -> String {
    line(
        "you stopped waiting for your container; nothing was started",
        tty,
    )
}

/// One line per GPU for the banner of a login shell: index, name, use and memory.
pub fn gpu_banner(gpus: &[GpuInfo]) -> String {
    crate::gpu::render_banner(gpus)
}

/// What a session shows before its program's output.
pub struct Greeting<'a> {
    /// The gateway's settings (status line, motd).
    pub server: &'a ServerConfig,
    /// The login's quota.
    pub quota: &'a Quota,
    /// The container it runs in.
    pub container: &'a ContainerHandle,
    /// Whether the program is the login shell (not a command or subsystem).
    pub shell: bool,
    /// Whether the session has a terminal.
    pub tty: bool,
    /// The live state of the backend's GPUs, for the banner (only looked at for a login
    /// shell on a terminal with GPUs).
    pub gpus: &'a [GpuInfo],
    /// The user's GPU-seconds held in the last week (all profiles), for the status line.
    pub gpu_week: Option<f64>,
}

impl Greeting<'_> {
    /// The chunks, in order: notices about the container on stderr (an image change pending,
    /// made again), then for an interactive shell the status line and motd on stdout, the
    /// GPU notice on stderr and the GPU banner on stdout.
    pub fn render(&self) -> Vec<ExecOutput> {
        let eol = eol(self.tty);
        let c = self.container;
        let err = |s: String| ExecOutput::Stderr(Bytes::from(s));
        let mut out = Vec::new();
        // A pending image change is said to interactive shells only: scripts keep a quiet
        // stderr.
        if let Some(running) = c.pending_image.as_ref().filter(|_| self.shell) {
            out.push(err(format!(
                "{}{eol}",
                pending_image(running, &self.quota.image)
            )));
        }
        if let Some(old) = &c.recreated_from {
            out.push(err(format!(
                "{}{eol}",
                recreated_from(old, &self.quota.image)
            )));
        } else if !c.remade_for.is_empty() {
            out.push(err(format!("{}{eol}", remade_for(&c.remade_for))));
        }
        if self.shell && self.tty {
            let banner = login_banner(self.server, self.quota, c, self.gpu_week);
            if !banner.is_empty() {
                out.push(ExecOutput::Stdout(Bytes::from(banner.replace('\n', eol))));
            }
        }
        if let Some(notice) = &c.gpu_notice {
            out.push(err(line(&gpu_notice(notice), self.tty)));
        }
        if self.shell && self.tty && !c.gpus.is_empty() {
            let mine: Vec<GpuInfo> = self
                .gpus
                .iter()
                .filter(|g| c.gpus.contains(&g.uuid))
                .cloned()
                .collect();
            if !mine.is_empty() {
                out.push(ExecOutput::Stdout(Bytes::from(
                    gpu_banner(&mine).replace('\n', eol),
                )));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Username;
    use crate::gpu::allocator::Taken;

    #[test]
    fn gpu_notices_say_what_happened_and_what_is_kept() {
        let f001 = GpuUuid::parse("GPU-f001").unwrap();
        let taken = Taken {
            index: Some(0),
            uuid: GpuUuid::parse("GPU-f000").unwrap(),
            holders: vec![(Username::parse("bob").unwrap(), None)],
        };
        assert_eq!(
            gpu_notice(&GpuNotice::MadeAgain {
                gpus: vec![f001.clone()],
                taken: vec![taken],
            }),
            "your container was made again with GPU(s) GPU-f001 because the GPUs it had are in use (GPU 0 (GPU-f000) is held by bob); your home and mounts are kept, other changes inside the container are not"
        );
        assert_eq!(
            gpu_notice(&GpuNotice::MadeAgain {
                gpus: vec![f001],
                taken: Vec::new(),
            }),
            "your container was made again with GPU(s) GPU-f001 because it was made before your quota included GPUs; your home and mounts are kept, other changes inside the container are not"
        );
        assert_eq!(
            gpu_notice(&GpuNotice::QuotaChanged { gpus: Vec::new() }),
            "your container was made again without GPUs because your GPU quota changed; your home and mounts are kept, other changes inside the container are not"
        );
    }

    #[test]
    fn a_waiting_login_sees_its_place_and_who_holds_what() {
        use crate::login::gpuline::{HeldGpu, WaitState};
        let t = std::time::SystemTime::now();
        let hhmm = chrono::DateTime::<chrono::Local>::from(t)
            .format("%H:%M")
            .to_string();
        let w = WaitState {
            container: "labgate-alice".into(),
            wants: 1,
            position: 2,
            gpus: vec![
                HeldGpu {
                    index: 0,
                    holders: vec![Username::parse("bob").unwrap()],
                    since: Some(t),
                    utilization: Some(0),
                    busy: false,
                    idle_for: Some(std::time::Duration::from_secs(2 * 3600 + 10 * 60 + 7)),
                },
                HeldGpu {
                    index: 1,
                    holders: vec![Username::parse("carol").unwrap()],
                    since: None,
                    utilization: Some(97),
                    busy: true,
                    idle_for: None,
                },
                HeldGpu {
                    index: 2,
                    holders: vec![],
                    since: None,
                    utilization: None,
                    busy: false,
                    idle_for: None,
                },
            ],
            over_budget: None,
            done: false,
        };
        assert_eq!(
            gpu_wait(&w, t),
            format!(
                "waiting for 1 GPU, 2nd in line | GPU 0 bob since {hhmm}, idle 2h10m | GPU 1 carol, busy 97% | GPU 2 free"
            )
        );
        let short: Vec<String> = [0, 59, 60, 754, 3600, 7800, 86_400, 97_200]
            .into_iter()
            .map(|s| short_duration(std::time::Duration::from_secs(s)))
            .collect();
        assert_eq!(
            short,
            ["0s", "59s", "1m", "12m", "1h", "2h10m", "1d", "1d3h"]
        );
        let ords: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101]
            .into_iter()
            .map(ordinal)
            .collect();
        assert_eq!(
            ords,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"
            ]
        );
    }

    #[test]
    fn reclaim_notices_say_how_long_idle_when_the_stop_comes_and_that_home_is_kept() {
        use crate::gpu::reclaim::CallOff;
        use crate::login::notice::Event;
        use std::time::Duration;
        let now = std::time::SystemTime::now();
        let deadline = now + Duration::from_secs(15 * 60);
        let hhmm = chrono::DateTime::<chrono::Local>::from(deadline)
            .format("%H:%M")
            .to_string();
        let warning = Event::ReclaimWarning {
            idle_since: now - Duration::from_secs(2 * 3600 + 10 * 60),
            deadline,
        };
        assert_eq!(
            notice(&warning, now, true),
            format!(
                "\r\nlabgate: your GPUs have been idle for 2h10m while others wait for one: your container will be stopped at {hhmm} (in 15m) unless you use them; your home is kept\r\n"
            )
        );
        // A moment later (a session shown the standing warning): whole minutes.
        let later = now + Duration::from_millis(1400);
        assert!(
            notice(&warning, later, false).contains(&format!("at {hhmm} (in 14m) unless")),
            "{}",
            notice(&warning, later, false)
        );
        assert!(notice(&warning, later, false).ends_with("your home is kept\n"));
        assert_eq!(
            notice(
                &Event::ReclaimCalledOff {
                    why: CallOff::UsedAgain
                },
                now,
                false
            ),
            "labgate: your GPUs are in use again: your container will not be stopped\n"
        );
        assert_eq!(
            notice(
                &Event::ReclaimCalledOff {
                    why: CallOff::NobodyWaits
                },
                now,
                true
            ),
            "\r\nlabgate: nobody waits for a GPU any more: your container will not be stopped\r\n"
        );
        assert_eq!(
            notice(
                &Event::Reclaimed {
                    idle_since: now - Duration::from_secs(2 * 3600 + 15 * 60)
                },
                now,
                false
            ),
            "labgate: your container is being stopped: its GPUs were idle for 2h15m while others waited for one; your home is kept, and your next login starts it again\n"
        );
        let far = now + Duration::from_secs(30 * 3600);
        assert_eq!(
            clock(far, now),
            chrono::DateTime::<chrono::Local>::from(far)
                .format("%b %-d %H:%M")
                .to_string()
        );
    }

    #[test]
    fn lines_end_as_the_session_needs() {
        assert_eq!(line("x", true), "labgate: x\r\n");
        assert_eq!(line("x", false), "labgate: x\n");
        assert_eq!(
            recreated_from("lab/a:1", "lab/a:1"),
            "labgate: your container was recreated from image lab/a:1 (was an older image of that name); your home is kept"
        );
        assert_eq!(
            remade_for(&["mounts/home", "shm"]),
            "labgate: your container was made again for the new settings (mounts/home, shm); your home is kept"
        );
    }
}
