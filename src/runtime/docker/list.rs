//! The containers labgate manages, found by label, as the seam's [`ManagedContainer`]s.

use std::collections::HashMap;

use bollard::models::ContainerSummary;
use bollard::query_parameters::ListContainersOptions;

use super::{DockerRuntime, engine};
use crate::runtime::docker::labels::{LABEL_GPUS, LABEL_MANAGED, LABEL_PROFILE, LABEL_USER};
use crate::runtime::{ManagedContainer, RuntimeError};

impl DockerRuntime {
    /// The containers labgate manages (by label); stopped ones too when `all`.
    pub(super) async fn managed_containers(
        &self,
        all: bool,
    ) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let (docker, _) = self.client().await?;
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_MANAGED}=true")])]);
        docker
            .list_containers(Some(ListContainersOptions {
                all,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(engine)
    }
}

/// What the engine's summary `c` of a managed container says of it.
pub(super) fn managed(c: ContainerSummary) -> ManagedContainer {
    let label = |key: &str| {
        c.labels
            .as_ref()
            .and_then(|l| l.get(key).cloned())
            .unwrap_or_default()
    };
    ManagedContainer {
        id: c.id.clone().unwrap_or_default(),
        name: c
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        user: label(LABEL_USER),
        profile: crate::auth::ProfileName::parse(&label(LABEL_PROFILE)).ok(),
        gpus: crate::gpu::GpuUuid::parse_list(&label(LABEL_GPUS)),
        state: crate::runtime::ContainerState::from_engine(
            &c.state.map(|s| s.to_string()).unwrap_or_default(),
        ),
        image: c.image.clone().unwrap_or_default(),
        node: None,
    }
}
