//! Background pulls after a config change: when a reload names an image that no quota or
//! profile used before, it is pulled at once (per its pull policy), so the next container
//! start does not wait. Progress goes to the log, one line per step (see [`super::pull`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use super::DockerRuntime;
use crate::config::{Config, PullPolicy, Quota, RegistryAuth};

/// Every image the config uses, with the pull policy and credentials of its first user.
pub fn images_of(config: &Config) -> BTreeMap<String, (PullPolicy, Option<RegistryAuth>)> {
    let quotas = std::iter::once(&config.defaults)
        .chain(config.configured_users().map(|u| config.quota_for(u)))
        .chain(config.profiles.all().map(|(_, _, q)| q));
    let mut out = BTreeMap::new();
    for q in quotas {
        let Quota {
            image,
            pull_policy,
            registry,
            ..
        } = q;
        out.entry(image.clone())
            .or_insert_with(|| (*pull_policy, registry.clone()));
    }
    out
}

/// Until the config channel closes: after each reload, pulls the images that are new in it.
pub async fn on_change(mut config: watch::Receiver<Arc<Config>>, runtime: Arc<DockerRuntime>) {
    let mut known = images_of(&config.borrow());
    while config.changed().await.is_ok() {
        let current = images_of(&config.borrow_and_update());
        for (image, (policy, auth)) in &current {
            if known.contains_key(image) || *policy == PullPolicy::Never {
                continue;
            }
            info!(image = %image, "config names a new image: pulling it in the background");
            let runtime = runtime.clone();
            let (image, policy, auth) = (image.clone(), *policy, auth.clone());
            tokio::spawn(async move {
                if let Err(e) = runtime.prepull(&image, policy, auth).await {
                    warn!(image = %image, "background pull failed: {e}");
                }
            });
        }
        known = current;
    }
}
