//! The admin surface of a running gateway: an HTTP API on a root-only Unix socket for the
//! `labgate status | stop | kick | gpus` commands (one module each in [`cmd`]: route,
//! handler, answer, text), `/metrics` (Prometheus) and `/healthz` on a loopback port, the
//! audit log, and the process-wide metrics. This module is the server: it binds the
//! listeners and dispatches each request to its command's handler.
//!
//! | route                    | socket | loopback | what                                   |
//! |--------------------------|--------|----------|----------------------------------------|
//! | `GET /healthz`           | yes    | yes      | Docker reachable, config loaded        |
//! | `GET /metrics`           | yes    | yes      | Prometheus text                        |
//! | `GET /status`            | yes    | no       | containers, connections, idle timers   |
//! | `GET /gpus`              | yes    | no       | the GPU table with holders             |
//! | `POST /users/NAME/kick`  | yes    | no       | disconnect NAME's connections          |
//! | `POST /users/NAME/stop`  | yes    | no       | kick, then stop NAME's containers      |
//! | `GET /`, `/api/lab`      | yes    | yes      | the lab page and its JSON ([`dashboard`]) |
//!
//! The lab page is also served alone, GET and HEAD only, on `[admin] dashboard_listen` for
//! the lab network.
//!
//! The socket is created mode 0600 (bound under a temporary name, restricted, then renamed
//! into place), so only its owner — root, for a system gateway — can act; the loopback port
//! only reads. The text log's fields are escaped by [`logtext`].

pub mod audit;
pub mod client;
pub mod cmd;
pub mod dashboard;
pub mod logtext;
pub use crate::metrics;

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::auth::Username;
use crate::config::AdminConfig;
use crate::login::Context;

/// Where the per-user actions' routes start: `POST /users/NAME/ACTION`.
const USERS_PREFIX: &str = "/users/";

/// Why the admin endpoints could not be set up (the gateway runs on without them).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    /// Another live gateway answers on the socket.
    #[error("{0}: another gateway is serving this admin socket")]
    SocketInUse(PathBuf),
    /// The socket could not be created.
    #[error("{path}: cannot create the admin socket: {source}")]
    Socket {
        /// The configured path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The lab page's address could not be bound.
    #[error("cannot listen on {addr} for the lab page: {source}")]
    DashboardListen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The metrics address could not be bound.
    #[error("cannot listen on {addr} for /metrics: {source}")]
    Listen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Binds the admin socket and the metrics listener as `config` says and serves them until
/// `stop` turns true. Problems are logged; the gateway serves SSH regardless.
pub(crate) async fn start(ctx: Arc<Context>, config: &AdminConfig, stop: watch::Receiver<bool>) {
    let page = Arc::new(dashboard::Dashboard::default());
    match bind_socket(&config.socket).await {
        Ok(listener) => {
            info!(socket = %config.socket.display(), "admin socket ready");
            tokio::spawn(serve_listener(
                Listener::Unix(listener, config.socket.clone()),
                ctx.clone(),
                page.clone(),
                stop.clone(),
            ));
        }
        Err(e) => warn!("{e}; `labgate status/stop/kick` will not reach this gateway"),
    }
    if let Some(addr) = config.listen {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let bound = listener.local_addr().unwrap_or(addr);
                info!(addr = %bound, "serving /metrics, /healthz and the lab page");
                // Tests and scripts read the bound address (port 0 picks one) from this line.
                println!("labgate admin listening on {bound}");
                tokio::spawn(serve_listener(
                    Listener::Tcp(listener, Access::ReadOnly),
                    ctx.clone(),
                    page.clone(),
                    stop.clone(),
                ));
            }
            Err(source) => warn!("{}", AdminError::Listen { addr, source }),
        }
    }
    if let Some(addr) = config.dashboard_listen {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let bound = listener.local_addr().unwrap_or(addr);
                info!(addr = %bound, "serving the lab page");
                println!("labgate dashboard listening on {bound}");
                tokio::spawn(serve_listener(
                    Listener::Tcp(listener, Access::Dashboard),
                    ctx,
                    page,
                    stop,
                ));
            }
            Err(source) => warn!("{}", AdminError::DashboardListen { addr, source }),
        }
    }
}

/// Creates the socket with mode 0600 at `path`, replacing a stale one but never a live one.
async fn bind_socket(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |source| AdminError::Socket {
        path: path.to_owned(),
        source,
    };
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(AdminError::SocketInUse(path.to_owned()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(err)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&staging, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(err(e));
    }
    Ok(listener)
}

/// One of the admin listeners.
enum Listener {
    /// The admin socket, removed from the file system when serving ends.
    Unix(UnixListener, PathBuf),
    /// The loopback metrics port, or the lab page's port.
    Tcp(TcpListener, Access),
}

/// Accepts one client of `listener` and serves it on a task of its own.
async fn accept_one(
    listener: &Listener,
    ctx: &Arc<Context>,
    page: &Arc<dashboard::Dashboard>,
) -> std::io::Result<()> {
    match listener {
        Listener::Unix(l, _) => {
            let (stream, _) = l.accept().await?;
            tokio::spawn(serve_connection(
                stream,
                ctx.clone(),
                page.clone(),
                Access::Admin,
            ));
        }
        Listener::Tcp(l, Access::Dashboard) => {
            let (stream, _) = l.accept().await?;
            // Open to the lab network: bounded, and each client's headers have a deadline.
            let Ok(permit) = page.connections.clone().try_acquire_owned() else {
                debug!(
                    "lab page: {} connections already, closing a new one",
                    dashboard::MAX_CONNECTIONS
                );
                return Ok(());
            };
            let (ctx, page) = (ctx.clone(), page.clone());
            tokio::spawn(async move {
                serve_connection(stream, ctx, page, Access::Dashboard).await;
                drop(permit);
            });
        }
        Listener::Tcp(l, access) => {
            let (stream, _) = l.accept().await?;
            tokio::spawn(serve_connection(stream, ctx.clone(), page.clone(), *access));
        }
    }
    Ok(())
}

async fn serve_listener(
    listener: Listener,
    ctx: Arc<Context>,
    page: Arc<dashboard::Dashboard>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = accept_one(&listener, &ctx, &page) => if let Err(e) = r {
                warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

/// What a listener's clients may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The root-only socket: everything.
    Admin,
    /// The loopback port: `/metrics`, `/healthz` and the lab page.
    ReadOnly,
    /// `dashboard_listen`: the lab page alone, GET and HEAD only.
    Dashboard,
}

async fn serve_connection<S>(
    stream: S,
    ctx: Arc<Context>,
    page: Arc<dashboard::Dashboard>,
    access: Access,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        let page = page.clone();
        async move { Ok::<_, Infallible>(route(&ctx, &page, access, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!("admin connection: {e}");
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", format!("{value}\n"))
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message.to_string() }))
}

/// A handler's typed answer as the socket's JSON (through [`serde_json::Value`], whose text
/// the clients have always read), or its error.
fn answer<T: serde::Serialize>(result: Result<T, impl std::fmt::Display>) -> Response<Full<Bytes>> {
    match result {
        Ok(answer) => match serde_json::to_value(&answer) {
            Ok(v) => json(StatusCode::OK, &v),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn route(
    ctx: &Context,
    page: &dashboard::Dashboard,
    access: Access,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if access == Access::Dashboard {
        // Nothing but the page here, and nothing but reads.
        return match (&method, dashboard::serves(&path)) {
            (&Method::GET | &Method::HEAD, true) => page.respond(ctx, &method, req.uri()).await,
            (&Method::GET | &Method::HEAD, false) => dashboard::not_found(),
            _ => dashboard::not_allowed(),
        };
    }
    match (&method, path.as_str()) {
        (&Method::GET | &Method::HEAD, p) if dashboard::serves(p) => {
            page.respond(ctx, &method, req.uri()).await
        }
        (&Method::GET, "/healthz") => healthz(ctx).await,
        (&Method::GET, "/metrics") => {
            refresh_gpu_metrics(ctx).await;
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics::metrics().render(),
            )
        }
        _ if access != Access::Admin => error(
            StatusCode::NOT_FOUND,
            "not here: the loopback port serves /metrics and /healthz; the rest is on the admin socket",
        ),
        (&Method::GET, cmd::status::PATH) => answer(cmd::status::collect(ctx).await),
        (&Method::GET, cmd::gpus::PATH) => match cmd::gpus::table(ctx).await {
            Ok(table) => reply(StatusCode::OK, "text/plain; charset=utf-8", table),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        (&Method::POST, p) if p.starts_with(USERS_PREFIX) => user_action(ctx, p).await,
        _ => error(StatusCode::NOT_FOUND, format!("no route {method} {path}")),
    }
}

async fn user_action(ctx: &Context, path: &str) -> Response<Full<Bytes>> {
    let mut parts = path.trim_start_matches(USERS_PREFIX).splitn(2, '/');
    let (Some(name), Some(action)) = (parts.next(), parts.next()) else {
        return error(StatusCode::NOT_FOUND, "expected /users/NAME/kick or /stop");
    };
    let user = match Username::parse(name) {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match action {
        cmd::kick::ACTION => answer(Ok::<_, Infallible>(cmd::kick::kick(ctx, &user))),
        cmd::stop::ACTION => answer(cmd::stop::stop(ctx, &user).await),
        other => error(StatusCode::NOT_FOUND, format!("no action {other:?}")),
    }
}

/// Updates the GPU and node gauges before a scrape.
async fn refresh_gpu_metrics(ctx: &Context) {
    let total = ctx.runtime.gpus().await.map(|g| g.len()).unwrap_or(0);
    metrics::metrics().gpus(total, ctx.runtime.gpu_holders().len());
    match ctx.runtime.nodes().await {
        Ok(nodes) => metrics::metrics().nodes(&nodes),
        Err(e) => tracing::debug!("node gauges not updated: {e}"),
    }
}

async fn healthz(ctx: &Context) -> Response<Full<Bytes>> {
    let docker = tokio::time::timeout(Duration::from_secs(5), ctx.runtime.list_managed()).await;
    let (ok, docker) = match docker {
        Ok(Ok(_)) => (true, "ok".to_owned()),
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, "no answer within 5s".to_owned()),
    };
    let config = ctx.config.borrow().source.display().to_string();
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "unhealthy" },
        "docker": docker,
        "config": config,
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, &body)
}
