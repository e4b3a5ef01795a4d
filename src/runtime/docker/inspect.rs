//! The engine's view of a container: inspected by name, whose it is (its labels), where it
//! runs, how it ended, the image it was made from.

use std::collections::HashMap;
use std::net::IpAddr;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::InspectContainerOptions;

use super::{DockerRuntime, engine};
use crate::runtime::RuntimeError;
use crate::runtime::docker::labels::{LABEL_IMAGE, LABEL_MANAGED, LABEL_PROFILE, LABEL_USER};

impl DockerRuntime {
    /// The container named `name`, or `None` when there is none.
    pub(super) async fn inspect_named(
        &self,
        docker: &Docker,
        name: &str,
    ) -> Result<Option<bollard::models::ContainerInspectResponse>, RuntimeError> {
        match docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => Ok(Some(info)),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(engine(e)),
        }
    }

    /// Explains a failed exec: a container that died right after starting (an image without
    /// `/bin/sh`, say) is a start failure with its exit code, not an engine error.
    pub(super) async fn exec_failure(
        &self,
        docker: &Docker,
        id: &str,
        err: BollardError,
    ) -> RuntimeError {
        if let Some(dead) = self.not_running(docker, id).await {
            return dead;
        }
        match err {
            BollardError::DockerResponseServerError { message, .. } => RuntimeError::Exec(message),
            other => engine(other),
        }
    }

    /// `Some(error)` when the container is not running, describing how it ended.
    pub(super) async fn not_running(&self, docker: &Docker, id: &str) -> Option<RuntimeError> {
        let info = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .ok()?;
        ended(&info)
    }
}

/// Whether `info` is labgate's container of `user` (and `profile`), by its labels: a
/// container with our name but not our labels is never touched.
pub(super) fn is_ours(
    info: &bollard::models::ContainerInspectResponse,
    user: &str,
    profile: Option<&str>,
) -> bool {
    labelled_ours(
        info.config.as_ref().and_then(|c| c.labels.as_ref()),
        user,
        profile,
    )
}

/// Whether a container's `labels` say it is labgate's container of `user` (and `profile`).
pub(super) fn labelled_ours(
    labels: Option<&HashMap<String, String>>,
    user: &str,
    profile: Option<&str>,
) -> bool {
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    label(LABEL_MANAGED) == Some("true")
        && label(LABEL_USER) == Some(user)
        && label(LABEL_PROFILE) == profile
}

/// The host PID of the container's init process and the container's own addresses.
pub(crate) fn placement(
    info: &bollard::models::ContainerInspectResponse,
) -> (Option<i32>, Vec<IpAddr>) {
    let pid = info
        .state
        .as_ref()
        .and_then(|s| s.pid)
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p > 0);
    let ips = info
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .map(|nets| {
            nets.values()
                .flat_map(|n| [n.ip_address.as_deref(), n.global_ipv6_address.as_deref()])
                .flatten()
                .filter_map(|a| a.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    (pid, ips)
}

/// `Some(error)` when `info` shows a container that is not running, describing how it ended.
pub(super) fn ended(info: &bollard::models::ContainerInspectResponse) -> Option<RuntimeError> {
    let state = info.state.clone().unwrap_or_default();
    if state.running == Some(true) {
        return None;
    }
    let code = state.exit_code.unwrap_or(-1);
    Some(RuntimeError::Start(
        match state.error.filter(|e| !e.is_empty()) {
            Some(e) => e,
            None => format!("it exited at once with code {code} (does the image have /bin/sh?)"),
        },
    ))
}

/// The image reference a container was made from: its label, else the engine's record.
pub(super) fn image_of(info: &bollard::models::ContainerInspectResponse) -> Option<String> {
    let config = info.config.as_ref()?;
    config
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_IMAGE).cloned())
        .or_else(|| config.image.clone())
}
