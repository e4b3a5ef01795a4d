//! The lab page (issue #19): one read-only page that shows which GPUs are free, who holds
//! the others and whether they use them, who waits, the containers, GPU-hours per user and
//! the gateway's health, and redraws itself every few seconds.
//!
//! This module owns the page's routes and everything they answer with:
//!
//! | route                 | what                                                        |
//! |-----------------------|-------------------------------------------------------------|
//! | `GET /`               | the page ([`page`]), rendered on the server                 |
//! | `GET /?part=main`     | its `<main>` alone, which the page's script swaps in        |
//! | `GET /api/lab`        | the same data as JSON ([`lab::Lab`], documented in README)  |
//! | `GET /assets/NAME`    | the stylesheet, the script and the icon, embedded in the binary |
//!
//! They are served on the loopback `[admin] listen` beside `/metrics`, and on
//! `[admin] dashboard_listen` for the lab network, where nothing else is: only `GET` and
//! `HEAD` (anything else: 405 with `Allow`), no command, no key, fingerprint, client address,
//! image, path or error text, and with `dashboard_show_users = false` no user name either
//! ([`lab::Names`]). Every answer carries a strict Content-Security-Policy (no inline
//! script or style, nothing from elsewhere), so the page works offline.

pub mod lab;
pub mod page;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode, Uri};

use crate::login::Context;

/// The JSON route.
pub const API_PATH: &str = "/api/lab";

/// Where the embedded files are served.
const ASSETS_PREFIX: &str = "/assets/";

/// The files the page loads, embedded in the binary: name, content type, content.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "lab.css",
        "text/css; charset=utf-8",
        include_str!("assets/lab.css"),
    ),
    (
        "lab.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/lab.js"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("assets/favicon.svg"),
    ),
];

/// What every answer of the page's routes carries.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How long one gathering of the page's data serves every viewer: each open page polls, and
/// gathering asks the engine and the accounting database.
const FRESH: Duration = Duration::from_secs(2);

/// Connections the dashboard port serves at once; a client past it is closed at once.
pub const MAX_CONNECTIONS: usize = 128;

/// The methods the page's routes answer.
pub const ALLOWED: &str = "GET, HEAD";

/// The page's state across requests: the key of its anonymous labels, the host's name and
/// the last data gathered.
#[derive(Debug)]
pub struct Dashboard {
    /// Key of the anonymous labels: drawn at start, so a user's label stays while the
    /// gateway runs and cannot be turned back into a name.
    key: std::hash::RandomState,
    /// The node column of the single-host backend.
    host: String,
    /// The last [`lab::Lab`], when it was gathered and whether it names users; a request
    /// waits here while another gathers, so viewers never gather in parallel.
    last: tokio::sync::Mutex<Option<(Instant, bool, Arc<lab::Lab>)>>,
    /// Places for the dashboard port's connections ([`MAX_CONNECTIONS`]).
    pub(crate) connections: Arc<tokio::sync::Semaphore>,
}

impl Default for Dashboard {
    fn default() -> Self {
        Self {
            key: std::hash::RandomState::new(),
            host: lab::host_name(),
            last: tokio::sync::Mutex::new(None),
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

/// Whether `path` is one of the page's routes.
pub fn serves(path: &str) -> bool {
    path == "/" || path == API_PATH || path.starts_with(ASSETS_PREFIX)
}

impl Dashboard {
    /// Answers a request for one of the page's routes (`GET` or `HEAD`; hyper leaves the body
    /// out of a `HEAD` answer).
    pub async fn respond(
        &self,
        ctx: &Context,
        method: &Method,
        uri: &Uri,
    ) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return not_allowed();
        }
        let path = uri.path();
        if let Some(name) = path.strip_prefix(ASSETS_PREFIX) {
            return match ASSETS.iter().find(|(n, _, _)| *n == name) {
                Some((_, kind, body)) => reply(StatusCode::OK, kind, (*body).to_owned(), true),
                None => not_found(),
            };
        }
        match path {
            API_PATH => {
                let lab = self.lab(ctx).await;
                match serde_json::to_string_pretty(&*lab) {
                    Ok(body) => reply(StatusCode::OK, "application/json", body + "\n", false),
                    Err(e) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain; charset=utf-8",
                        format!("{e}\n"),
                        false,
                    ),
                }
            }
            "/" => {
                let lab = self.lab(ctx).await;
                let body = if uri.query() == Some("part=main") {
                    page::main(&lab).into_string()
                } else {
                    page::page(&lab, &self.host)
                };
                reply(StatusCode::OK, "text/html; charset=utf-8", body, false)
            }
            _ => not_found(),
        }
    }
}

impl Dashboard {
    /// The page's data: the last gathered if it is fresh and names users as the config now
    /// says, else gathered now.
    async fn lab(&self, ctx: &Context) -> Arc<lab::Lab> {
        let show = ctx.config.borrow().admin.dashboard_show_users;
        let mut last = self.last.lock().await;
        if let Some((at, shown, lab)) = &*last
            && *shown == show
            && at.elapsed() < FRESH
        {
            return lab.clone();
        }
        let names = lab::Names::with_key(show, self.key.clone());
        let lab = Arc::new(lab::collect(ctx, &names, SystemTime::now()).await);
        *last = Some((Instant::now(), show, lab.clone()));
        lab
    }
}

/// The answer to a method other than `GET` and `HEAD`.
pub fn not_allowed() -> Response<Full<Bytes>> {
    let mut r = reply(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain; charset=utf-8",
        "read-only: GET and HEAD only\n".to_owned(),
        false,
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(ALLOWED));
    r
}

/// The answer to a path that is not the page's.
pub fn not_found() -> Response<Full<Bytes>> {
    reply(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "not here: this port serves the lab page (/) and /api/lab\n".to_owned(),
        false,
    )
}

fn reply(status: StatusCode, kind: &str, body: String, cache: bool) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(kind) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if cache { "max-age=300" } else { "no-store" }),
    );
    r
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::accounting::Charge;
    use crate::gpu::{GpuInfo, GpuUuid};
    use crate::login::ensure_container;
    use crate::login::testing::{config, context, login, user};

    /// The fake backend with one GPU (held by alice, 37% busy, sampled for ten minutes), bob
    /// waiting for it, carol without GPUs, and an hour of alice's use in the database.
    async fn lab(show_users: bool) -> (Arc<Context>, tokio::task::JoinHandle<()>) {
        let (ctx, fake) = context(config(&format!(
            "gpus = 1\ncpus = 2.5\n\n[users.carol]\ngpus = 0\n\n[admin]\ndashboard_show_users = {show_users}\n"
        )));
        fake.gpu_slots.store(1, Ordering::SeqCst);
        let gpu = GpuInfo {
            index: 0,
            uuid: GpuUuid::parse("GPU-fake0").unwrap(),
            name: "Fake A100".into(),
            memory_total: 80 << 30,
            mig_mode: None,
            utilization: Some(37),
            memory_used: 12 << 30,
            processes: Vec::new(),
        };
        *fake.gpus.lock().unwrap() = vec![gpu.clone()];
        ensure_container(&ctx, &login(&ctx, "alice", None))
            .await
            .unwrap();
        ensure_container(&ctx, &login(&ctx, "carol", None))
            .await
            .unwrap();
        let now = SystemTime::now();
        for m in 0..10 {
            ctx.activity.observe(
                std::slice::from_ref(&gpu),
                5,
                now - Duration::from_secs(60 * m),
            );
        }
        ctx.activity.observe(std::slice::from_ref(&gpu), 5, now);
        ctx.accounting
            .record(
                now,
                vec![Charge {
                    holder: user("alice"),
                    gpus: vec![gpu.uuid.clone()],
                    since: now - Duration::from_secs(3600),
                    held: 3600.0,
                    busy: 1332.0,
                    last: false,
                }],
            )
            .await
            .unwrap();
        let bob = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let _ = ensure_container(&ctx, &login(&ctx, "bob", None)).await;
            })
        };
        for _ in 0..200 {
            if ctx.gpu_line.waiting() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ctx.gpu_line.line().len(), 1, "bob waits");
        (ctx, bob)
    }

    async fn get(ctx: &Context, page: &Dashboard, uri: &str) -> (StatusCode, String) {
        let r = page.respond(ctx, &Method::GET, &uri.parse().unwrap()).await;
        let status = r.status();
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn api_lab_shows_holders_the_queue_containers_and_usage() {
        let (ctx, bob) = lab(true).await;
        let page = Dashboard::default();
        let (status, body) = get(&ctx, &page, API_PATH).await;
        assert_eq!(status, StatusCode::OK);
        let lab: lab::Lab = serde_json::from_str(&body).unwrap();
        assert_eq!(lab.health.status, "ok", "{body}");
        assert_eq!(lab.health.engine, "ok");
        let g = &lab.gpus[0];
        assert_eq!((g.index, g.name.as_str()), (0, "Fake A100"));
        assert_eq!(g.node, lab::host_name());
        assert_eq!(g.holders.len(), 1);
        assert_eq!(g.holders[0].user, "alice");
        assert_eq!(g.utilization, Some(37));
        assert_eq!(g.history.len(), crate::login::activity::BUCKETS);
        assert_eq!(g.history.last(), Some(&Some(37)));
        assert_eq!(g.idle_secs, None, "37% is busy");
        assert_eq!(lab.queue.len(), 1);
        assert_eq!(
            (lab.queue[0].position, lab.queue[0].user.as_str()),
            (1, "bob")
        );
        assert_eq!(lab.queue[0].gpus, 1);
        let users: Vec<_> = lab.containers.iter().map(|c| c.user.as_str()).collect();
        assert_eq!(users, ["alice", "carol"], "bob has none yet");
        assert_eq!(lab.containers[0].gpus, [0]);
        assert_eq!(lab.containers[0].cpus, Some(2.5));
        assert_eq!(lab.containers[0].memory, Some(1 << 30));
        assert!(lab.containers[1].gpus.is_empty());
        assert_eq!(lab.usage.week.len(), 1);
        assert_eq!(lab.usage.week[0].user, "alice");
        assert!((lab.usage.week[0].gpu_hours - 1.0).abs() < 1e-9);
        assert!((lab.usage.week[0].busy_hours - 0.37).abs() < 1e-9);
        assert_eq!(lab.usage.month, lab.usage.week);
        for secret in [
            "ssh-ed25519",
            "SHA256:",
            "192.0.2.7",
            "lab/base",
            "labgate-alice",
        ] {
            assert!(!body.contains(secret), "{secret} in {body}");
        }
        // The page shows the same.
        let (status, html) = get(&ctx, &page, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(html.contains("id=\"gpus\""), "{html}");
        assert!(html.contains("<table id=\"queue\">"), "{html}");
        assert_eq!(
            html.matches("class=\"bar\"").count(),
            2,
            "one bar a user, each chart"
        );
        assert!(html.contains("data-user=\"alice\""), "{html}");
        let (_, part) = get(&ctx, &page, "/?part=main").await;
        assert!(part.starts_with("<section"), "{part}");
        assert!(!part.contains("<html"), "{part}");
        bob.abort();
    }

    #[tokio::test]
    async fn hidden_names_get_stable_labels_and_names_never_show() {
        let (ctx, bob) = lab(false).await;
        let page = Dashboard::default();
        let (_, body) = get(&ctx, &page, API_PATH).await;
        let (_, again) = get(&ctx, &page, API_PATH).await;
        let (_, html) = get(&ctx, &page, "/").await;
        for name in ["alice", "bob", "carol"] {
            assert!(!body.contains(name), "{name} in {body}");
            assert!(!html.contains(name), "{name} in {html}");
        }
        let lab: lab::Lab = serde_json::from_str(&body).unwrap();
        let again: lab::Lab = serde_json::from_str(&again).unwrap();
        let holder = &lab.gpus[0].holders[0].user;
        assert!(holder.starts_with("user-"), "{holder}");
        assert_eq!(&again.gpus[0].holders[0].user, holder, "stable");
        assert_eq!(&lab.usage.week[0].user, holder, "the same label everywhere");
        let gpu_container = lab.containers.iter().find(|c| c.gpus == [0]).unwrap();
        assert_eq!(&gpu_container.user, holder);
        assert_ne!(&lab.queue[0].user, holder);
        bob.abort();
    }

    #[tokio::test]
    async fn only_reads_and_only_the_page_and_its_files() {
        let (ctx, _) = context(config(""));
        let page = Dashboard::default();
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            let r = page.respond(&ctx, &method, &"/".parse().unwrap()).await;
            assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(r.headers()[header::ALLOW], ALLOWED);
        }
        for (path, kind) in [
            ("/assets/lab.css", "text/css"),
            ("/assets/lab.js", "text/javascript"),
            ("/assets/favicon.svg", "image/svg+xml"),
        ] {
            let r = page
                .respond(&ctx, &Method::GET, &path.parse().unwrap())
                .await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert!(
                r.headers()[header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .starts_with(kind)
            );
            assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        }
        let (status, _) = get(&ctx, &page, "/assets/../../etc/passwd").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, html) = get(&ctx, &page, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(html.contains("No GPUs on this gateway."), "{html}");
        assert!(html.contains("Nobody waits for a GPU."), "{html}");
        assert!(!html.contains("<script>"), "no inline script under the CSP");
        assert!(!html.contains("style="), "no inline style under the CSP");
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "nothing from elsewhere"
        );
    }
}
