//! Applying config edits without a restart.
//!
//! The config file is watched (its directory, since editors replace files by renaming) and
//! SIGHUP asks for a reload too. Each trigger is debounced, the file is loaded and validated
//! in full, and only a valid config is published on the `watch` channel; a broken edit is
//! logged with `file:line:column` and the config in force stays. New logins take the new
//! config at once (each login snapshots its quota); settings that only take effect at start
//! (listener, host key, Docker socket) are reported as needing a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{Config, load};

/// Quiet time after the last change before reloading: editors write in several steps.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Starts watching `path` and SIGHUP (both armed before this returns, so no later edit is
/// missed) and returns the task that reloads until `stop` resolves, publishing each valid new
/// config on `tx`.
pub fn start(
    path: PathBuf,
    tx: watch::Sender<Arc<Config>>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let (trigger_tx, trigger_rx) = mpsc::channel::<()>(16);
    let watcher = match watch_file(&path, trigger_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(path = %path.display(), "cannot watch the config file ({e}); reload with SIGHUP");
            None
        }
    };
    let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("cannot watch SIGHUP: {e}");
            None
        }
    };
    tokio::spawn(run(path, tx, stop, trigger_rx, watcher, hup))
}

async fn run(
    path: PathBuf,
    tx: watch::Sender<Arc<Config>>,
    stop: impl std::future::Future<Output = ()>,
    mut trigger_rx: mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
    mut hup: Option<tokio::signal::unix::Signal>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            Some(()) = trigger_rx.recv() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                info!("SIGHUP: reloading the config");
            }
        }
        // Let a burst of writes settle, then swallow the triggers it caused.
        tokio::time::sleep(DEBOUNCE).await;
        while trigger_rx.try_recv().is_ok() {}
        reload(&path, &tx);
    }
}

/// Loads `path` once and publishes it if valid and different.
pub fn reload(path: &Path, tx: &watch::Sender<Arc<Config>>) {
    match load(path) {
        Ok(new) => {
            let old = tx.borrow().clone();
            for what in restart_only_changes(&old, &new) {
                warn!(
                    setting = what,
                    "changed in the config, but takes effect only after a restart"
                );
            }
            let _ = tx.send(Arc::new(new));
            crate::metrics::metrics().reload("applied");
            info!(target: "audit", path = %path.display(), "config reloaded");
            info!(path = %path.display(), "config reloaded: new logins use it");
        }
        Err(e) => {
            crate::metrics::metrics().reload("rejected");
            info!(target: "audit", error = %e, "config reload rejected");
            error!("config not reloaded, the previous one stays in force: {e}");
        }
    }
}

/// Settings read only at start.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.server.listen != new.server.listen {
        changed.push("server.listen");
    }
    if old.server.host_key != new.server.host_key {
        changed.push("server.host_key");
    }
    if old.server.max_connections != new.server.max_connections {
        changed.push("server.max_connections");
    }
    if old.server.max_connections_per_user != new.server.max_connections_per_user {
        changed.push("server.max_connections_per_user");
    }
    if old.server.max_startups != new.server.max_startups {
        changed.push("server.max_startups");
    }
    if old.docker.socket != new.docker.socket {
        changed.push("docker.socket");
    }
    if old.docker.network != new.docker.network {
        changed.push("docker.network");
    }
    // The backend is chosen and given its `[cluster]` keys once, at start (shared_paths
    // included: the swarm backend keeps the section it was made with).
    changed.extend(old.cluster.changed_keys(&new.cluster));
    if old.docker.forward_via != new.docker.forward_via {
        changed.push("docker.forward_via");
    }
    if old.docker.relay_helper.path != new.docker.relay_helper.path {
        changed.push("docker.relay_helper");
    }
    if old.docker.sftp_helper.path != new.docker.sftp_helper.path {
        changed.push("docker.sftp_helper");
    }
    if old.admin != new.admin {
        changed.push("admin (socket, listen, audit_log)");
    }
    changed
}

fn watch_file(
    path: &Path,
    trigger: mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name().map(|n| n.to_owned()) == name);
        if ours && !matches!(event.kind, notify::EventKind::Access(_)) {
            let _ = trigger.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(cluster: &str) -> Config {
        crate::config::parse(
            Path::new("/etc/labgate/labgate.toml"),
            &format!("{cluster}\n[defaults]\nimage = \"x\"\n"),
        )
        .unwrap()
    }

    #[test]
    fn a_changed_cluster_key_is_named_and_needs_a_restart() {
        let docker = config("");
        let swarm = config("[cluster]\nengine = \"swarm\"\n");
        assert!(restart_only_changes(&docker, &docker).is_empty());
        assert_eq!(restart_only_changes(&docker, &swarm), ["cluster.engine"]);
        for (edit, key) in [
            ("manager = \"tcp://m1:2376\"", "cluster.manager"),
            ("node_api = \"tcp://{hostname}:2376\"", "cluster.node_api"),
            ("node_agent = \"tcp://{addr}:2378\"", "cluster.node_agent"),
            (
                "[cluster.nodes.n2]\nagent = \"unix:///agent.sock\"",
                "cluster.nodes",
            ),
            ("tls_dir = \"/etc/tls\"", "cluster.tls_dir"),
            ("gpu_resource = \"GPU\"", "cluster.gpu_resource"),
            ("network = \"lab2\"", "cluster.network"),
            ("shared_paths = [\"/srv\"]", "cluster.shared_paths"),
            (
                "[cluster.nodes.n2]\napi = \"unix:///x.sock\"",
                "cluster.nodes",
            ),
        ] {
            let edited = config(&format!("[cluster]\nengine = \"swarm\"\n{edit}\n"));
            assert_eq!(restart_only_changes(&swarm, &edited), [key], "{edit}");
        }
        let two =
            config("[cluster]\nengine = \"swarm\"\nmanager = \"tcp://m1\"\nnetwork = \"n\"\n");
        assert_eq!(
            restart_only_changes(&swarm, &two),
            ["cluster.manager", "cluster.network"]
        );
    }
}
