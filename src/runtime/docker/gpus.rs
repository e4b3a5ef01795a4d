//! What the GPU pool needs from Docker ([`GpuContainers`]): the GPUs a container's label
//! records, removal of a stopped container so it can be made again with other GPUs, and which
//! running containers hold which GPUs.

use std::collections::HashMap;

use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::RemoveContainerOptions;

use super::pool::{GpuContainers, Recorded};
use super::{DockerRuntime, engine};
use crate::auth::Username;
use crate::gpu::GpuUuid;
use crate::runtime::docker::labels::{LABEL_GPUS, LABEL_MANAGED, LABEL_USER};
use crate::runtime::{ContainerHandle, ContainerSpec, RuntimeError};

/// What Docker says when a container asks for a device driver it does not have (no NVIDIA
/// container toolkit): `could not select device driver "nvidia" with capabilities: [[gpu]]`.
const NO_DEVICE_DRIVER: &str = "could not select device driver";

/// Whether Docker refused a container because it has no NVIDIA runtime.
fn no_gpu_runtime(err: &RuntimeError) -> bool {
    matches!(err, RuntimeError::Start(m) | RuntimeError::Create(m) if m.contains(NO_DEVICE_DRIVER))
}

fn gpus_of(labels: &HashMap<String, String>) -> Vec<GpuUuid> {
    labels
        .get(LABEL_GPUS)
        .map(|l| GpuUuid::parse_list(l))
        .unwrap_or_default()
}

#[async_trait]
impl GpuContainers for DockerRuntime {
    async fn start(&self, spec: &ContainerSpec) -> Result<ContainerHandle, RuntimeError> {
        self.start_with_gpus(spec).await
    }

    async fn stop_container(&self, name: &str) -> Result<bool, RuntimeError> {
        self.stop_named(name).await
    }

    async fn recorded_gpus(&self, spec: &ContainerSpec) -> Result<Option<Recorded>, RuntimeError> {
        let (docker, _) = self.client().await?;
        let Some(info) = self.inspect_named(docker, &spec.name).await? else {
            return Ok(None);
        };
        let labels = info.config.and_then(|c| c.labels).unwrap_or_default();
        if labels.get(LABEL_MANAGED).map(String::as_str) != Some("true")
            || labels.get(LABEL_USER).map(String::as_str) != Some(spec.user.as_str())
        {
            return Ok(None);
        }
        let state = info.state.unwrap_or_default();
        Ok(Some(Recorded {
            running: state.running == Some(true) || state.paused == Some(true),
            gpus: gpus_of(&labels),
        }))
    }

    async fn remove_stopped(&self, spec: &ContainerSpec) -> Result<(), RuntimeError> {
        let lock = self.lock_for(&spec.name);
        let _serial = lock.lock().await;
        let (docker, _) = self.client().await?;
        // Not forced: a container that started meanwhile is refused (409), never killed.
        let opts = RemoveContainerOptions {
            force: false,
            v: false,
            link: false,
        };
        match docker.remove_container(&spec.name, Some(opts)).await {
            Ok(()) => {
                tracing::info!(container = %spec.name, "stopped container removed, to be made again with other GPUs");
                Ok(())
            }
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(engine(e)),
        }
    }

    async fn running_gpus(&self) -> Result<Vec<(Username, Vec<GpuUuid>)>, RuntimeError> {
        let list = self.managed_containers(false).await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels?;
                let user = Username::parse(labels.get(LABEL_USER)?).ok()?;
                let holder = match labels.get(crate::runtime::docker::labels::LABEL_PROFILE) {
                    Some(p) => user.with_profile(&crate::auth::ProfileName::parse(p).ok()?),
                    None => user,
                };
                Some((holder, gpus_of(&labels)))
            })
            .collect())
    }

    fn lacks_gpu_support(&self, err: &RuntimeError) -> bool {
        no_gpu_runtime(err)
    }
}

/// The `labgate gpus` table without a running gateway: GPUs from NVML, holders from the
/// labels of the running containers (`?` with a warning when Docker cannot be reached).
pub async fn report(config: &crate::config::Config) -> Result<String, crate::gpu::GpuError> {
    use crate::gpu::{GpuError, GpuInventory, nvml::NvmlInventory, render_table};
    let inventory = NvmlInventory::open(config.gpu.nvml_library.clone())
        .await
        .map_err(GpuError::NoNvml)?;
    let gpus = inventory.list().await?;
    let docker = DockerRuntime::new(
        &config.docker,
        super::pool::GpuPool::new(Err("not used".into()), config.gpu.mode),
    );
    let holders = match docker.running_gpus().await {
        Ok(running) => {
            let mut map: std::collections::BTreeMap<GpuUuid, Vec<Username>> =
                std::collections::BTreeMap::new();
            for (user, uuids) in running {
                for uuid in uuids {
                    map.entry(uuid).or_default().push(user.clone());
                }
            }
            Some(map)
        }
        Err(e) => {
            tracing::warn!("GPU holders unknown: {e}");
            None
        }
    };
    Ok(render_table(&gpus, holders.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_give_gpus_and_garbage_gives_none() {
        let labels = HashMap::from([(LABEL_GPUS.to_owned(), "GPU-aaaa,GPU-bbbb".to_owned())]);
        assert_eq!(
            gpus_of(&labels),
            vec![
                GpuUuid::parse("GPU-aaaa").unwrap(),
                GpuUuid::parse("GPU-bbbb").unwrap()
            ]
        );
        assert!(gpus_of(&HashMap::new()).is_empty());
    }

    #[test]
    fn the_missing_nvidia_runtime_is_recognised() {
        let docker_says = RuntimeError::Start(
            "could not select device driver \"nvidia\" with capabilities: [[gpu]]".into(),
        );
        assert!(no_gpu_runtime(&docker_says));
        assert!(!no_gpu_runtime(&RuntimeError::Start(
            "exited at once".into()
        )));
        assert!(!no_gpu_runtime(&RuntimeError::ImageMissing("x".into())));
    }
}
