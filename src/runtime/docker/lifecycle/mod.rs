//! Making sure a user's container runs: created, started, unpaused, recreated when its image
//! or recreate-only settings changed, or used as it runs; and stopped.

mod plan;

use std::sync::Arc;
use std::time::Instant;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{CreateContainerOptions, InspectContainerOptions};

use super::binds::{check_binds, verify_binds};
use super::hostpath::Checked;
use super::inspect::{ended, placement};
use super::{DockerRuntime, Local, STOP_GRACE_SECS, engine, spec};
use crate::runtime::{ContainerHandle, ContainerSpec, EnsureOutcome, RuntimeError};
use plan::{Found, ImageCheck, Learned, Plan, Refusal, plan};

impl DockerRuntime {
    /// Removes a stopped container and makes it again from `spec` (home and mounts are host
    /// directories and stay): its image (`old_image` it was) or the `settings` named changed.
    async fn recreate(
        &self,
        docker: &Docker,
        id: &str,
        spec: &ContainerSpec,
        binds: &[Checked],
        old_image: Option<&str>,
        settings: &[&'static str],
    ) -> Result<(String, bollard::models::ContainerInspectResponse), RuntimeError> {
        // Not forced: a container that started meanwhile is refused (409), never killed.
        let opts = bollard::query_parameters::RemoveContainerOptions {
            force: false,
            v: false,
            link: false,
        };
        docker
            .remove_container(id, Some(opts))
            .await
            .map_err(engine)?;
        match old_image {
            Some(old) => {
                tracing::info!(target: "audit", container = %spec.name, from = %old, to = %spec.image, settings = ?settings, "container recreated: image changed")
            }
            None => {
                tracing::info!(target: "audit", container = %spec.name, settings = ?settings, "container recreated: settings changed")
            }
        }
        let id = self.create(docker, spec).await?;
        let info = self.start(docker, &id, spec, binds).await?;
        Ok((id, info))
    }

    async fn create(&self, docker: &Docker, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let opts = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let network = self.ensure_network(docker).await?;
        let mut body = spec::create_body(spec, &network);
        if let Some(mounts) = body.host_config.as_mut().and_then(|h| h.mounts.as_mut()) {
            if self.relay_helper.is_file() {
                mounts.push(spec::relay_mount(&self.relay_helper));
            }
            if self.sftp_helper.is_file() {
                mounts.push(spec::helper_mount(
                    &self.sftp_helper,
                    crate::runtime::SFTP_SERVER_PATH,
                ));
            }
        }
        let t0 = Instant::now();
        match docker.create_container(Some(opts), body).await {
            Ok(r) => {
                tracing::info!(container = %spec.name, image = %spec.image, ms = t0.elapsed().as_millis() as u64, "container created");
                Ok(r.id)
            }
            Err(BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            }) if message.contains("image") => Err(RuntimeError::Create(message)),
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                // Someone else (another gateway) created it meanwhile: use theirs.
                let info = docker
                    .inspect_container(&spec.name, None::<InspectContainerOptions>)
                    .await
                    .map_err(engine)?;
                Ok(info.id.unwrap_or_else(|| spec.name.clone()))
            }
            Err(BollardError::DockerResponseServerError { message, .. }) => {
                Err(RuntimeError::Create(message))
            }
            Err(e) => Err(engine(e)),
        }
    }

    /// Starts container `id` and returns the engine's view of it once started (one inspect
    /// serves both the checks below and the caller's placement). A container that got other
    /// files at its binds than `binds` as checked is killed before anything runs in it.
    async fn start(
        &self,
        docker: &Docker,
        id: &str,
        spec: &ContainerSpec,
        binds: &[Checked],
    ) -> Result<bollard::models::ContainerInspectResponse, RuntimeError> {
        let name = &spec.name;
        let t0 = Instant::now();
        match docker.start_container(id, None).await {
            Ok(()) => {}
            Err(BollardError::DockerResponseServerError { message, .. }) => {
                return Err(RuntimeError::Start(message));
            }
            Err(e) => return Err(engine(e)),
        }
        let info = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(engine)?;
        // A container can start and die at once (no /bin/sh in the image, say).
        if let Some(dead) = ended(&info) {
            return Err(dead);
        }
        if let Err(refused) = verify_binds(&info, binds) {
            tracing::warn!(target: "audit", user = %spec.user, container = %name, error = %refused, "container stopped at start: a bind source changed");
            if let Err(e) = docker
                .kill_container(id, None::<bollard::query_parameters::KillContainerOptions>)
                .await
            {
                tracing::error!(container = %name, error = %e, "cannot kill a container whose bind changed");
            }
            return Err(RuntimeError::Unsafe(refused));
        }
        tracing::info!(container = %name, ms = t0.elapsed().as_millis() as u64, "container started");
        Ok(info)
    }

    /// Finds or creates `spec`'s container with exactly `spec.gpus` (the pool decided them)
    /// and makes sure it runs.
    pub(super) async fn start_with_gpus(
        &self,
        spec: &ContainerSpec,
    ) -> Result<ContainerHandle, RuntimeError> {
        let lock = self.lock_for(&spec.name);
        let _guard = lock.lock().await;
        let (docker, _) = self.client().await?;
        let binds = check_binds(spec).await?;
        let mut found = self.inspect_named(docker, &spec.name).await?;
        let mut learned = Learned::default();
        let mut recreated_from = None;
        let mut remade_for = Vec::new();
        let mut pending_image = None;
        // Each step that learns something runs at most once (see `plan`), so this ends.
        let (id, outcome, info) = loop {
            let seen = found.as_ref().map(|info| Found::of(info, &spec.name));
            let id = seen
                .as_ref()
                .map_or_else(|| spec.name.clone(), |c| c.id.clone());
            match plan(seen.as_ref(), spec, &learned) {
                Plan::RenameLegacy { from, profile } => {
                    learned.legacy_looked = true;
                    if self
                        .migrate_name(docker, &from, &spec.name, spec.user.as_str(), &profile)
                        .await?
                    {
                        // Made before profile containers were named with `.`, and renamed now.
                        found = self.inspect_named(docker, &spec.name).await?;
                    }
                }
                Plan::Refuse(Refusal::NameTaken) => {
                    return Err(RuntimeError::NameTaken(spec.name.clone()));
                }
                Plan::Unpause => {
                    docker.unpause_container(&id).await.map_err(engine)?;
                    break (id, EnsureOutcome::Started, None);
                }
                Plan::UseRunning {
                    pending_image: pending,
                } => {
                    pending_image = pending;
                    break (id, EnsureOutcome::Running, found);
                }
                Plan::CompareImage => {
                    let (made_from, image_id) = seen.as_ref().map_or((None, None), |c| {
                        (c.image.as_deref(), c.image_id.as_deref())
                    });
                    learned.image = match self
                        .image_changed(docker, made_from, image_id, spec)
                        .await?
                    {
                        Some(from) => ImageCheck::Changed { from },
                        None => ImageCheck::Same,
                    };
                }
                Plan::Recreate {
                    old_image,
                    settings,
                } => {
                    let (id, info) = self
                        .recreate(docker, &id, spec, &binds, old_image.as_deref(), &settings)
                        .await?;
                    recreated_from = old_image;
                    remade_for = settings;
                    break (id, EnsureOutcome::Created, Some(info));
                }
                Plan::Start { update_limits } => {
                    let t0 = Instant::now();
                    if update_limits {
                        // Changed by a reload while it was stopped: the new limits from now.
                        docker
                            .update_container(&id, spec::limits_update(spec))
                            .await
                            .map_err(engine)?;
                        tracing::info!(container = %spec.name, "limits updated before start (memory, cpus, pids)");
                    }
                    let info = self.start(docker, &id, spec, &binds).await?;
                    crate::metrics::metrics().container_ready(false, t0.elapsed());
                    tracing::info!(target: "audit", container = %spec.name, "container started");
                    break (id, EnsureOutcome::Started, Some(info));
                }
                Plan::Create => {
                    self.ensure_image(docker, spec).await?;
                    let t0 = Instant::now();
                    let id = self.create(docker, spec).await?;
                    let info = self.start(docker, &id, spec, &binds).await?;
                    crate::metrics::metrics().container_ready(true, t0.elapsed());
                    tracing::info!(target: "audit", container = %spec.name, image = %spec.image, "container created");
                    break (id, EnsureOutcome::Created, Some(info));
                }
            }
        };
        let info = match info {
            Some(info) => info,
            None => docker
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
                .map_err(engine)?,
        };
        let (pid, ips) = placement(&info);
        let shell = self.shell_of(docker, &id, pid, spec).await?;
        if let Err(e) = self.accounts.ensure(docker, &id, pid, spec, &shell).await {
            // Shells and commands still work without it; sftp-server and scp do not.
            tracing::warn!(container = %spec.name, error = %e, "no account entry for the uid");
        }
        let mut handle = ContainerHandle::new(id, spec.name.clone(), shell, outcome);
        handle.engine_data = Some(Arc::new(Local { pid }));
        handle.ips = ips;
        handle.recreated_from = recreated_from;
        handle.remade_for = remade_for;
        handle.pending_image = pending_image;
        handle.gpus = spec.gpus.clone();
        Ok(handle)
    }

    /// Stops the container `name` (SIGTERM, then SIGKILL after a grace period); `Ok(false)`
    /// when it was not running.
    pub(super) async fn stop_named(&self, name: &str) -> Result<bool, RuntimeError> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let (docker, _) = self.client().await?;
        let running = self
            .inspect_named(docker, name)
            .await?
            .and_then(|i| i.state)
            .is_some_and(|s| s.running == Some(true));
        if !running {
            return Ok(false);
        }
        let opts = bollard::query_parameters::StopContainerOptions {
            t: Some(STOP_GRACE_SECS),
            signal: None,
        };
        match docker.stop_container(name, Some(opts)).await {
            Ok(()) => {
                tracing::info!(target: "audit", container = %name, "container stopped");
                Ok(true)
            }
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(engine(e)),
        }
    }
}
