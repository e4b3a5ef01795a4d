//! Composition root: loads the config and host key, builds the container backend, reconciles
//! with the containers labgate already manages, binds the listener and serves until a
//! shutdown signal.

use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{self, Config, ConfigError};
use crate::login::Context;
use crate::runtime::ContainerRuntime;
use crate::ssh;

/// Errors that stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The host key cannot be loaded or created.
    #[error(transparent)]
    HostKey(#[from] ssh::hostkey::HostKeyError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the gateway with the config at `path` until `shutdown` resolves.
pub async fn run(
    path: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let config = config::load(path)?;
    serve(config, shutdown).await
}

/// Runs the gateway with an already loaded config until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let host_key = ssh::hostkey::load_or_create(&config.server.host_key)?;
    if let Some(path) = &config.admin.audit_log
        && let Err(e) = crate::admin::audit::open(path)
    {
        warn!(path = %path.display(), "cannot open the audit log ({e}); audit events go only to the log");
    }
    let runtime = crate::runtime::open(&config).await;
    let russh_config = Arc::new(ssh::russh_config(&config.server, host_key));
    let server = config.server.clone();
    let listener = TcpListener::bind(server.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: server.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| StartError::Bind {
        addr: server.listen,
        source,
    })?;
    tokio::spawn(recover(runtime.clone()));
    let source = config.source.clone();
    let admin = config.admin.clone();
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    tokio::spawn(apply_live_limits(config_rx.clone(), runtime.clone()));
    runtime.clone().follow_config(config_rx.clone());
    // Watching starts before the listening line, so no edit made after it is missed.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut reload_stop = stop_rx.clone();
    let reloader = crate::config::reload::start(source, config_tx, async move {
        let _ = reload_stop.wait_for(|s| *s).await.map(|_| ());
    });
    let state_dir = config_rx.borrow().server.state_dir.clone();
    let (accounting, unopened) = crate::accounting::Accounting::open(&state_dir);
    if let Some(e) = unopened {
        tracing::error!("GPU accounting is kept in memory only (lost at restart): {e}");
    }
    let accounting = Arc::new(accounting);
    if let Err(e) = accounting.load_week(std::time::SystemTime::now()) {
        tracing::warn!("GPU accounting: this week's usage not read: {e}");
    }
    let gpu_line = crate::login::gpuline::GpuLine::new(config_rx.clone(), accounting.clone());
    let ctx = Arc::new(Context {
        config: config_rx,
        runtime,
        connections: Arc::default(),
        idle: Default::default(),
        pending: Arc::default(),
        gpu_line,
        accounting,
        identities: Arc::default(),
        activity: Default::default(),
        notices: Default::default(),
    });
    tokio::spawn(crate::login::usage::run(
        ctx.clone(),
        stop_rx.clone(),
        crate::login::usage::Clock::System,
    ));
    crate::admin::start(ctx.clone(), &admin, stop_rx.clone()).await;
    tokio::spawn(crate::session::idle::run(ctx.clone(), stop_rx.clone()));
    tokio::spawn(crate::login::reclaim::run(ctx.clone(), stop_rx.clone()));
    tokio::spawn(crate::login::registry::end_when_key_removed(
        ctx.clone(),
        stop_rx.clone(),
    ));
    let engine = ctx.config.borrow().cluster.engine;
    match ctx.config.borrow().docker.forward_via {
        _ if engine == crate::config::cluster::Engine::Swarm => info!(
            "forwards: through the relay exec in each container (a cluster's containers are not entered from the gateway)"
        ),
        crate::config::ForwardVia::Auto => {
            info!(
                "forwards: entering containers' namespaces when possible, else the relay exec (decided at the first forward)"
            )
        }
        via => info!(?via, "forwards: path fixed by [docker] forward_via"),
    }
    info!(addr = %bound, "labgate listening");
    // Tests and scripts read the bound address (port 0 picks one) from this line.
    println!("labgate listening on {bound}");
    let server_task = tokio::spawn(ssh::serve(listener, ctx, russh_config, server, stop_rx));
    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = reloader.await;
    let _ = server_task.await;
    Ok(())
}

/// After each reload, applies changed memory/CPU/process limits to running containers
/// (`docker update`) and tells the admin which other changes wait for a recreate.
async fn apply_live_limits(
    mut config: watch::Receiver<Arc<Config>>,
    runtime: Arc<dyn ContainerRuntime>,
) {
    let mut previous = config.borrow().clone();
    while config.changed().await.is_ok() {
        let current = config.borrow_and_update().clone();
        let running = match runtime.list_managed().await {
            Ok(list) => list,
            Err(e) => {
                warn!("reload: cannot list containers to update their limits: {e}");
                previous = current;
                continue;
            }
        };
        for c in running.iter().filter(|c| c.state.is_running()) {
            let Some((user, _)) = c.owner() else {
                continue;
            };
            let (old, new) = (c.quota(&previous, &user), c.quota(&current, &user));
            let changes = crate::config::Quota::changes(old, new);
            if changes.live {
                let spec = crate::runtime::ContainerSpec::new(&user, new, None);
                match runtime.update_limits(&spec).await {
                    Ok(true) => {
                        info!(user = %user, container = %c.name, "reload: live limits applied (memory, cpus, pids)")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(user = %user, container = %c.name, "reload: live limits not applied: {e}")
                    }
                }
            }
            if !changes.recreate.is_empty() {
                info!(user = %user, container = %c.name, changed = ?changes.recreate, "reload: these changes apply when the container next starts (idle stop, `labgate stop`); it is made again then, home and mounts kept");
            }
        }
        previous = current;
    }
}

/// Brings the backend in line with what runs (containers labgate manages, GPU holdings), so
/// a restarted gateway knows them.
async fn recover(runtime: Arc<dyn ContainerRuntime>) {
    if let Err(e) = runtime.recover().await {
        warn!(
            "cannot list managed containers: {e}; logins will fail until the container engine is reachable"
        );
    }
}
