//! The network containers join: found or created once (a bridge without inter-container
//! traffic), one network per name even when gateways race to create it.

use std::collections::HashMap;

use bollard::Docker;
use bollard::errors::Error as BollardError;

use super::{DockerRuntime, engine};
use crate::runtime::RuntimeError;
use crate::runtime::docker::labels::LABEL_MANAGED;

impl DockerRuntime {
    /// Creates labgate's network if missing (a bridge with inter-container traffic disabled,
    /// so a user's container cannot reach another's, not even by bridge IP) and returns its id.
    /// Docker allows two networks of one name: if gateways raced to create it, every gateway
    /// keeps the oldest and removes the others, so all agree.
    pub(super) async fn ensure_network(&self, docker: &Docker) -> Result<String, RuntimeError> {
        self.network_id
            .get_or_try_init(|| async {
                let mut found = self.networks_named(docker).await?;
                if found.is_empty() {
                    let req = bollard::models::NetworkCreateRequest {
                        name: self.network.clone(),
                        driver: Some("bridge".into()),
                        options: Some(HashMap::from([(
                            "com.docker.network.bridge.enable_icc".to_owned(),
                            "false".to_owned(),
                        )])),
                        labels: Some(HashMap::from([(
                            LABEL_MANAGED.to_owned(),
                            "true".to_owned(),
                        )])),
                        ..Default::default()
                    };
                    match docker.create_network(req).await {
                        Ok(_) => tracing::info!(network = %self.network, "created the isolated container network"),
                        Err(BollardError::DockerResponseServerError { status_code: 409, .. }) => {}
                        Err(e) => return Err(engine(e)),
                    }
                    found = self.networks_named(docker).await?;
                }
                found.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
                let Some(keep) = found.first() else {
                    return Err(RuntimeError::Engine(format!("network {} vanished", self.network)));
                };
                for extra in found.iter().skip(1) {
                    if let Some(id) = &extra.id {
                        let _ = docker.remove_network(id).await;
                    }
                }
                let icc = keep
                    .options
                    .as_ref()
                    .and_then(|o| o.get("com.docker.network.bridge.enable_icc"))
                    .map(String::as_str);
                if icc != Some("false") {
                    tracing::warn!(network = %self.network, "network allows inter-container traffic: users' containers can reach each other");
                }
                keep.id
                    .clone()
                    .ok_or_else(|| RuntimeError::Engine("network without id".into()))
            })
            .await
            .cloned()
    }

    /// Networks whose name is exactly ours (the engine's name filter matches substrings).
    async fn networks_named(
        &self,
        docker: &Docker,
    ) -> Result<Vec<bollard::models::Network>, RuntimeError> {
        let filters = HashMap::from([("name".to_owned(), vec![self.network.clone()])]);
        let list = docker
            .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(engine)?;
        Ok(list
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(self.network.as_str()))
            .collect())
    }
}
