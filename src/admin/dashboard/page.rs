//! The lab page's HTML, rendered on the server from a [`Lab`] with maud (which escapes every
//! string it is given): the whole page for `GET /`, and its `<main>` alone for
//! `GET /?part=main`, which the page's script fetches every few seconds to redraw itself.
//! Charts are inline SVG drawn here: a sparkline of each GPU's last 24 hours and one bar a
//! user for GPU-hours. No inline script or style, so the page runs under a strict
//! Content-Security-Policy; its stylesheet and script are embedded in the binary
//! ([`super::assets`]).

use maud::{DOCTYPE, Markup, html};

use super::lab::{Gpu, Lab, UserUsage};

/// How often the page redraws itself, in milliseconds (the script reads it from the page).
pub const REFRESH_MS: u32 = 2500;

/// The whole page.
pub fn page(lab: &Lab, host: &str) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { "labgate · " (host) }
                link rel="icon" href="/assets/favicon.svg" type="image/svg+xml";
                link rel="stylesheet" href="/assets/lab.css";
                script src="/assets/lab.js" defer {}
            }
            body data-refresh-ms=(REFRESH_MS) {
                header.top {
                    h1 { span.logo aria-hidden="true" { "▚" } " labgate " span.host { (host) } }
                    p.live {
                        span.dot aria-hidden="true" {}
                        // Announced only when it changes (live, or not answering).
                        span id="state" role="status" { "live" }
                        " " span id="updated" {}
                    }
                }
                main id="lab" { (main(lab)) }
                footer { "Read-only. " a href="/api/lab" { "This page as JSON" } " · labgate " (lab.health.version) }
            }
        }
    }
    .into_string()
}

/// The part the script redraws.
pub fn main(lab: &Lab) -> Markup {
    let free = lab
        .gpus
        .iter()
        .filter(|g| g.holders.is_empty() && g.allocatable)
        .count();
    let running = lab
        .containers
        .iter()
        .filter(|c| c.state == "running")
        .count();
    html! {
        section.cards aria-label="Summary" {
            div.card.(if lab.health.status == "ok" { "ok" } else { "bad" }) {
                span.label { "Gateway" }
                span.value data-health=(lab.health.status) { (lab.health.status) }
                span.sub { "engine " (lab.health.engine) ", GPUs " (lab.health.gpus) }
            }
            div.card { span.label { "GPUs free" } span.value { (free) " / " (lab.gpus.len()) } }
            div.card.(if lab.queue.is_empty() { "" } else { "warn" }) {
                span.label { "Waiting" } span.value { (lab.queue.len()) }
            }
            div.card {
                span.label { "Containers running" } span.value { (running) " / " (lab.containers.len()) }
                span.sub { (lab.health.connections) " connection" (plural(lab.health.connections)) }
            }
        }
        section aria-labelledby="h-gpus" {
            h2 id="h-gpus" { "GPUs" }
            @if lab.gpus.is_empty() {
                p.empty { "No GPUs on this gateway." }
            } @else {
                div.scroll { table.stack id="gpus" {
                    caption.sr { "GPUs, their use over the last 24 hours and who holds them" }
                    thead { tr {
                        th scope="col" { "GPU" } th scope="col" { "Node" } th scope="col" { "Memory" }
                        th scope="col" { "Use" } th scope="col" { "Last 24 h" }
                        th scope="col" { "Holder" } th scope="col" { "Idle" }
                    } }
                    tbody { @for g in &lab.gpus { (gpu_row(g)) } }
                } }
            }
        }
        section aria-labelledby="h-queue" {
            h2 id="h-queue" { "Queue" }
            @if lab.queue.is_empty() {
                p.empty id="queue-empty" { "Nobody waits for a GPU." }
            } @else {
                div.scroll { table id="queue" {
                    caption.sr { "Logins waiting for GPUs, next first" }
                    thead { tr {
                        th scope="col" { "#" } th scope="col" { "User" } th scope="col" { "Wants" }
                        th scope="col" { "Waiting" } th scope="col" { "Logins" }
                    } }
                    tbody { @for w in &lab.queue { tr {
                        td.num { (w.position) }
                        th scope="row" { (w.user) }
                        td { (w.gpus) " GPU" (plural(w.gpus)) }
                        td { time datetime=(w.since) title=(w.since) { (human(w.waited_secs)) } }
                        td.num { (w.logins) }
                    } } }
                } }
            }
        }
        section aria-labelledby="h-containers" {
            h2 id="h-containers" { "Containers" }
            @if lab.containers.is_empty() {
                p.empty { "No containers yet." }
            } @else {
                div.scroll { table.stack id="containers" {
                    caption.sr { "Containers, their state and limits" }
                    thead { tr {
                        th scope="col" { "User" } th scope="col" { "Profile" } th scope="col" { "State" }
                        th scope="col" { "Node" } th scope="col" { "CPUs" } th scope="col" { "Memory" }
                        th scope="col" { "GPUs" } th scope="col" { "Connections" }
                    } }
                    tbody { @for c in &lab.containers { tr {
                        th scope="row" { (c.user) }
                        td data-label="Profile" { (c.profile.as_deref().unwrap_or("–")) }
                        td data-label="State" { span.state.(c.state.as_str()) { (c.state) } }
                        td data-label="Node" { (c.node) }
                        td.num data-label="CPUs" { (c.cpus.map_or("no limit".to_owned(), |n| format!("{n}"))) }
                        td.num data-label="Memory" { (c.memory.map_or("no limit".to_owned(), bytes)) }
                        td data-label="GPUs" { @if c.gpus.is_empty() { "–" } @else { (c.gpus.iter().map(|i| format!("GPU {i}")).collect::<Vec<_>>().join(", ")) } }
                        td.num data-label="Connections" { (c.connections) }
                    } } }
                } }
            }
        }
        section aria-labelledby="h-usage" {
            h2 id="h-usage" { "GPU-hours" }
            div.charts {
                (chart("usage-week", "Last 7 days", &lab.usage.week))
                (chart("usage-month", "Last 30 days", &lab.usage.month))
            }
        }
    }
}

fn gpu_row(g: &Gpu) -> Markup {
    let mem_pct = if g.memory_total > 0 {
        100.0 * g.memory_used as f64 / g.memory_total as f64
    } else {
        0.0
    };
    html! {
        tr data-held=(if g.holders.is_empty() { "no" } else { "yes" }) {
            th scope="row" { span.idx { (g.index) } " " span.gpuname { (g.name) } }
            td data-label="Node" { (g.node) }
            td data-label="Memory" { span {
                meter min="0" max=(g.memory_total) value=(g.memory_used)
                    aria-label=(format!("memory {mem_pct:.0}% used")) {}
                " " span.sub { (bytes(g.memory_used)) " / " (bytes(g.memory_total)) }
            } }
            td.num data-label="Use" { @match g.utilization { Some(u) => { (u) "%" }, None => "–" } }
            td data-label="Last 24 h" { (sparkline(&g.history)) }
            td.holder data-label="Holder" { span {
                @if g.holders.is_empty() {
                    @if g.allocatable { span.free { "free" } } @else { span.sub { "MIG, not handed out" } }
                } @else {
                    @for h in &g.holders {
                        span.who { (h.user) }
                        @if let Some(since) = &h.since {
                            " " span.sub { "since " time datetime=(since) title=(since) { (clock(since)) } }
                        }
                        br;
                    }
                }
            } }
            td data-label="Idle" { @match (g.idle_secs, g.holders.is_empty()) {
                (Some(s), false) if s >= 60 => span.idle { "idle " (human(s)) },
                (Some(s), _) => span.sub { "idle " (human(s)) },
                (None, _) => span.busy { "in use" },
            } }
        }
    }
}

/// A 24-hour sparkline: one point per 5 minutes, gaps where nothing was sampled.
fn sparkline(history: &[Option<u32>]) -> Markup {
    let n = history.len().max(1);
    let mut paths = String::new();
    let mut pen = false;
    for (i, p) in history.iter().enumerate() {
        match p {
            Some(u) => {
                let y = 30.0 - f64::from((*u).min(100)) * 0.28;
                paths.push_str(&format!("{}{i} {y:.1} ", if pen { "L" } else { "M" }));
                pen = true;
            }
            None => pen = false,
        }
    }
    // The latest point as a dot, so even a GPU sampled for a few minutes shows where it is.
    let now = history
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, p)| p.map(|u| (i, 30.0 - f64::from(u.min(100)) * 0.28)));
    let known: Vec<u32> = history.iter().flatten().copied().collect();
    let label = if known.is_empty() {
        "no samples in the last 24 hours".to_owned()
    } else {
        let mean = known.iter().sum::<u32>() / known.len() as u32;
        let peak = known.iter().max().copied().unwrap_or(0);
        format!("last 24 hours: mean {mean}%, peak {peak}%")
    };
    html! {
        svg.spark role="img" aria-label=(label) viewBox=(format!("0 0 {n} 32")) preserveAspectRatio="none" width="120" height="28" {
            title { (label) }
            line.base x1="0" y1="30" x2=(n) y2="30" {}
            @if !paths.is_empty() { path d=(paths.trim_end()) {} }
            @if let Some((x, y)) = now {
                ellipse.now cx=(x) cy=(format!("{y:.1}")) rx=(format!("{:.1}", n as f64 / 60.0)) ry="2.5" {}
            }
        }
    }
}

/// A horizontal bar chart: one bar a user, busy hours as the darker part.
fn chart(id: &str, caption: &str, rows: &[UserUsage]) -> Markup {
    const ROW: f64 = 30.0;
    const LABEL: f64 = 120.0;
    const WIDTH: f64 = 440.0;
    const BAR: f64 = WIDTH - LABEL - 70.0;
    let max = rows.iter().map(|r| r.gpu_hours).fold(0.0, f64::max);
    let height = (rows.len().max(1) as f64) * ROW + 8.0;
    html! {
        figure.chart id=(id) {
            figcaption { (caption) }
            @if rows.is_empty() {
                p.empty { "No GPU was held." }
            } @else {
                svg role="img" aria-label=(format!("GPU-hours per user, {}", caption.to_lowercase()))
                    viewBox=(format!("0 0 {WIDTH} {height}")) width="100%" {
                    @for (i, r) in rows.iter().enumerate() {
                        @let y = 4.0 + i as f64 * ROW;
                        @let w = if max > 0.0 { (r.gpu_hours / max * BAR).max(2.0) } else { 2.0 };
                        @let b = if max > 0.0 { (r.busy_hours / max * BAR).min(w) } else { 0.0 };
                        g.row {
                            title { (r.user) ": " (hours(r.gpu_hours)) " held, " (hours(r.busy_hours)) " busy" }
                            text.name x=(LABEL - 8.0) y=(y + 17.0) text-anchor="end" { (r.user) }
                            rect.bar data-user=(r.user) x=(LABEL) y=(y) width=(format!("{w:.1}")) height="22" rx="3" {}
                            @if b > 0.0 { rect.busy x=(LABEL) y=(y) width=(format!("{b:.1}")) height="22" rx="3" {} }
                            text.val x=(LABEL + w + 6.0) y=(y + 17.0) { (hours(r.gpu_hours)) }
                        }
                    }
                }
                p.legend { span.key.held aria-hidden="true" {} " held " span.key.busyk aria-hidden="true" {} " busy" }
            }
        }
    }
}

/// `12.3 h`, `2.25 h`, `14 min`, `< 1 min`.
fn hours(h: f64) -> String {
    match h {
        10.0.. => format!("{h:.1} h"),
        1.0.. => format!("{h:.2} h"),
        _ if h * 60.0 >= 1.0 => format!("{:.0} min", h * 60.0),
        _ if h > 0.0 => "< 1 min".to_owned(),
        _ => "0".to_owned(),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `1h 2m`, `3m`, `42s`, `2d 3h`.
fn human(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h {}m", secs / 3600, secs / 60 % 60),
        _ => format!("{}d {}h", secs / 86_400, secs / 3600 % 24),
    }
}

/// `12:34` (UTC) from an RFC 3339 time; the full time is in the element's title.
fn clock(rfc3339: &str) -> String {
    rfc3339
        .get(11..16)
        .map_or_else(|| rfc3339.to_owned(), |hm| format!("{hm} UTC"))
}

/// `12.0 GiB`, `512 MiB`.
fn bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let f = n as f64;
    if f >= GIB {
        format!("{:.1} GiB", f / GIB)
    } else {
        format!("{:.0} MiB", f / MIB)
    }
}
