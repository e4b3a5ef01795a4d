//! Image pulls: one pull per image reference at a time, shared by everyone who waits for it.
//!
//! [`Puller::pull`] starts a pull task for a reference, or joins the one in flight. The task
//! talks to the engine (`POST /images/create`, with the registry's credentials read from their
//! password file just before), folds the engine's per-layer status stream into a progress
//! summary ([`Layers`]), logs each step, and broadcasts every summary to the pull's waiters.
//! The outcome is published once on a `watch`; the entry leaves the in-flight map when the
//! task ends, so the next pull of that reference starts fresh.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::CreateImageOptions;
use futures::StreamExt;
use tokio::sync::{broadcast, watch};

use crate::config::RegistryAuth;
use crate::runtime::PullProgress;

/// The outcome of a pull: `Err` carries the registry's (or engine's) reason.
pub type PullOutcome = Result<(), String>;

/// Pulls in flight, by image reference.
#[derive(Default)]
pub struct Puller {
    inflight: Mutex<HashMap<String, Inflight>>,
}

#[derive(Clone)]
struct Inflight {
    progress: broadcast::Sender<PullProgress>,
    done: watch::Receiver<Option<PullOutcome>>,
}

/// A waiter on one pull: its progress and, at the end, its outcome.
pub struct PullWait {
    /// Progress summaries from the moment of joining.
    pub progress: broadcast::Receiver<PullProgress>,
    done: watch::Receiver<Option<PullOutcome>>,
}

impl PullWait {
    /// Waits for the pull to end, handing each progress summary to `on_progress`.
    pub async fn finish(mut self, mut on_progress: impl FnMut(PullProgress)) -> PullOutcome {
        loop {
            tokio::select! {
                biased;
                p = self.progress.recv() => match p {
                    Ok(p) => on_progress(p),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                changed = self.done.changed() => if changed.is_err() { break },
            }
            if self.done.borrow().is_some() {
                break;
            }
        }
        // Drain what was sent before the end.
        while let Ok(p) = self.progress.try_recv() {
            on_progress(p);
        }
        self.done
            .borrow()
            .clone()
            .unwrap_or_else(|| Err("the pull was interrupted".into()))
    }
}

impl Puller {
    /// Joins the pull of `image` in flight, or starts one. With `only_if_missing`, the new
    /// task first checks the engine again: a pull that ended between the caller's check and
    /// now already brought the image, and is not repeated.
    pub fn pull(
        self: &Arc<Self>,
        docker: &Docker,
        image: &str,
        auth: Option<RegistryAuth>,
        only_if_missing: bool,
    ) -> PullWait {
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(image) {
            return PullWait {
                progress: f.progress.subscribe(),
                done: f.done.clone(),
            };
        }
        let (progress, progress_rx) = broadcast::channel(256);
        let (done_tx, done) = watch::channel(None);
        map.insert(
            image.to_owned(),
            Inflight {
                progress: progress.clone(),
                done: done.clone(),
            },
        );
        let task = PullTask {
            puller: self.clone(),
            docker: docker.clone(),
            image: image.to_owned(),
            auth,
            progress,
        };
        tokio::spawn(async move {
            let outcome = task.run(only_if_missing).await;
            // Leave the map before publishing: a waiter woken by the outcome that pulls again
            // starts a new pull rather than joining this finished one.
            task.puller
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&task.image);
            let _ = done_tx.send(Some(outcome));
        });
        PullWait {
            progress: progress_rx,
            done,
        }
    }
}

struct PullTask {
    puller: Arc<Puller>,
    docker: Docker,
    image: String,
    auth: Option<RegistryAuth>,
    progress: broadcast::Sender<PullProgress>,
}

impl PullTask {
    async fn run(&self, only_if_missing: bool) -> PullOutcome {
        if only_if_missing && self.docker.inspect_image(&self.image).await.is_ok() {
            return Ok(());
        }
        let credentials = match &self.auth {
            Some(auth) => Some(credentials(auth).await?),
            None => None,
        };
        tracing::info!(image = %self.image, auth = ?self.auth.as_ref().map(|a| &a.username), "pulling image");
        self.step(format!("pulling image {}", self.image), true);
        let mut layers = Layers::default();
        let mut stream =
            self.docker
                .create_image(Some(pull_options(&self.image)), None, credentials);
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(step) = layers.apply(&info) {
                        let line = layers.summary(&self.image);
                        if step {
                            tracing::info!(image = %self.image, progress = %line, "pull progress");
                        }
                        self.step(line, step);
                    }
                }
                Err(e) => {
                    let reason = reason(e);
                    tracing::warn!(image = %self.image, %reason, "pull failed");
                    return Err(reason);
                }
            }
        }
        tracing::info!(image = %self.image, "image pulled");
        self.step(format!("pulled image {}", self.image), true);
        Ok(())
    }

    fn step(&self, line: String, step: bool) {
        let _ = self.progress.send(PullProgress { line, step });
    }
}

/// The registry's words for a failed pull, without bollard's framing.
fn reason(e: BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message,
        BollardError::DockerStreamError { error } => error,
        other => other.to_string(),
    }
}

/// `fromImage` with a tag: without one the engine would pull every tag of the repository.
fn pull_options(image: &str) -> CreateImageOptions {
    let last = image.rsplit('/').next().unwrap_or(image);
    let tagged = image.contains('@') || last.contains(':');
    CreateImageOptions {
        from_image: Some(image.to_owned()),
        tag: (!tagged).then(|| "latest".to_owned()),
        ..Default::default()
    }
}

/// Reads the password file now (so a rotated secret applies to the next pull).
pub(crate) async fn credentials(auth: &RegistryAuth) -> Result<DockerCredentials, String> {
    let password = tokio::fs::read_to_string(&auth.password_file)
        .await
        .map_err(|e| {
            tracing::warn!(registry = %auth.registry, file = %auth.password_file.display(), "registry password file unreadable: {e}");
            format!(
                "the password file of registry {} cannot be read; please tell your admin",
                auth.registry
            )
        })?;
    Ok(DockerCredentials {
        username: Some(auth.username.clone()),
        password: Some(password.trim_end_matches(['\n', '\r']).to_owned()),
        serveraddress: Some(auth.registry.clone()),
        ..Default::default()
    })
}

/// The state of each layer of a pull, as the engine reports it.
#[derive(Debug, Default)]
pub struct Layers {
    layers: BTreeMap<String, Layer>,
}

#[derive(Debug, Default, Clone)]
struct Layer {
    status: String,
    done_bytes: u64,
    size: u64,
    finished: bool,
}

impl Layers {
    /// Folds one engine message in. `None` when it says nothing about layers; `Some(true)`
    /// when a layer finished downloading or was unpacked (a step worth a plain line: two per
    /// layer), `Some(false)` for anything else (bytes moving, intermediate states).
    pub fn apply(&mut self, info: &bollard::models::CreateImageInfo) -> Option<bool> {
        let id = info.id.as_deref()?;
        let status = info.status.as_deref()?;
        // Messages about the tag itself ("Pulling from lab/img") carry the tag as id.
        if status.starts_with("Pulling from") || status.starts_with("Digest:") {
            return None;
        }
        let layer = self.layers.entry(id.to_owned()).or_default();
        let step = layer.status != status
            && matches!(
                status,
                "Download complete" | "Pull complete" | "Already exists"
            );
        layer.status = status.to_owned();
        let detail = info.progress_detail.as_ref();
        let current = detail.and_then(|d| d.current).unwrap_or(0).max(0) as u64;
        let total = detail.and_then(|d| d.total).unwrap_or(0).max(0) as u64;
        match status {
            "Downloading" => {
                layer.size = layer.size.max(total);
                layer.done_bytes = if layer.size > 0 {
                    current.min(layer.size)
                } else {
                    current
                };
            }
            "Download complete" | "Verifying Checksum" | "Extracting" => {
                layer.done_bytes = layer.size;
            }
            "Pull complete" | "Already exists" => {
                layer.done_bytes = layer.size;
                layer.finished = true;
            }
            _ => {}
        }
        Some(step)
    }

    /// One line: layers done of known, bytes downloaded of known.
    pub fn summary(&self, image: &str) -> String {
        let total = self.layers.len();
        let done = self.layers.values().filter(|l| l.finished).count();
        let bytes: u64 = self.layers.values().map(|l| l.done_bytes).sum();
        let size: u64 = self.layers.values().map(|l| l.size).sum();
        format!(
            "pulling {image}: {done}/{total} layers, {} / {}",
            human(bytes),
            human(size)
        )
    }
}

/// Bytes in the units `docker pull` shows (decimal).
fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} kB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{CreateImageInfo, ProgressDetail};

    fn msg(id: &str, status: &str, current: i64, total: i64) -> CreateImageInfo {
        CreateImageInfo {
            id: Some(id.into()),
            status: Some(status.into()),
            progress_detail: Some(ProgressDetail {
                current: Some(current),
                total: Some(total),
            }),
            error_detail: None,
        }
    }

    #[test]
    fn layers_fold_into_a_summary_with_steps_and_byte_updates() {
        let mut l = Layers::default();
        assert_eq!(l.apply(&msg("1:tag", "Pulling from lab/img", 0, 0)), None);
        assert_eq!(l.apply(&msg("aaa", "Pulling fs layer", 0, 0)), Some(false));
        assert_eq!(l.apply(&msg("bbb", "Already exists", 0, 0)), Some(true));
        assert_eq!(
            l.apply(&msg("aaa", "Downloading", 500_000, 2_000_000)),
            Some(false)
        );
        assert_eq!(
            l.apply(&msg("aaa", "Downloading", 1_500_000, 2_000_000)),
            Some(false)
        );
        assert_eq!(l.summary("x:1"), "pulling x:1: 1/2 layers, 1.5 MB / 2.0 MB");
        assert_eq!(l.apply(&msg("aaa", "Download complete", 0, 0)), Some(true));
        assert_eq!(l.apply(&msg("aaa", "Extracting", 10, 20)), Some(false));
        assert_eq!(l.apply(&msg("aaa", "Pull complete", 0, 0)), Some(true));
        assert_eq!(l.summary("x:1"), "pulling x:1: 2/2 layers, 2.0 MB / 2.0 MB");
    }

    #[test]
    fn untagged_references_pull_latest_only() {
        assert_eq!(pull_options("busybox").tag.as_deref(), Some("latest"));
        assert_eq!(
            pull_options("127.0.0.1:5000/lab/img").tag.as_deref(),
            Some("latest")
        );
        assert_eq!(pull_options("127.0.0.1:5000/lab/img:1").tag, None);
        assert_eq!(pull_options("lab/img@sha256:abc").tag, None);
    }

    #[test]
    fn sizes_read_like_docker_pull() {
        assert_eq!(human(999), "999 B");
        assert_eq!(human(1_500), "1.5 kB");
        assert_eq!(human(2_340_000_000), "2.34 GB");
    }
}
