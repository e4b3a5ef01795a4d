//! The image a container is made from: present as its pull policy says (pulls through
//! [`super::pull`], progress to the waiting logins), and whether a stopped container's image
//! is still the configured one.

use bollard::Docker;
use bollard::errors::Error as BollardError;

use super::{DockerRuntime, engine};
use crate::config::{PullPolicy, RegistryAuth};
use crate::runtime::{ContainerSpec, PullEvent, RuntimeError};

impl DockerRuntime {
    /// Pulls `image` in the background (a config change named it), unless `policy` says
    /// never, or says missing and the image is here. Progress goes to the log only.
    pub async fn prepull(
        &self,
        image: &str,
        policy: PullPolicy,
        auth: Option<RegistryAuth>,
    ) -> Result<(), RuntimeError> {
        if policy == PullPolicy::Never {
            return Ok(());
        }
        let (docker, _) = self.client().await?;
        self.puller
            .pull(docker, image, auth, policy == PullPolicy::Missing)
            .finish(|_| {})
            .await
            .map_err(|reason| RuntimeError::Pull {
                image: image.to_owned(),
                reason,
            })
    }

    /// Makes sure `spec.image` is on the host as its pull policy says, publishing progress
    /// for `spec.name`'s waiters. `Some(id)`: the image's id, when no pull ran (after a pull
    /// the reference may name another image).
    pub(super) async fn ensure_image(
        &self,
        docker: &Docker,
        spec: &ContainerSpec,
    ) -> Result<Option<String>, RuntimeError> {
        let (present, id) = match docker.inspect_image(&spec.image).await {
            Ok(image) => (true, image.id),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => (false, None),
            Err(e) => return Err(engine(e)),
        };
        match (spec.pull_policy, present) {
            (PullPolicy::Never, false) => Err(RuntimeError::ImageMissing(spec.image.clone())),
            (PullPolicy::Never | PullPolicy::Missing, true) => Ok(id),
            (policy, _) => {
                let events = self.pull_events.clone();
                let container = spec.name.clone();
                let pulled = self
                    .puller
                    .pull(
                        docker,
                        &spec.image,
                        spec.registry.clone(),
                        policy == PullPolicy::Missing,
                    )
                    .finish(|progress| {
                        let _ = events.send(PullEvent {
                            container: container.clone(),
                            progress,
                        });
                    })
                    .await;
                match pulled {
                    Ok(()) => Ok(None),
                    // "always" keeps users working from the copy here when the registry fails.
                    Err(reason) if present => {
                        tracing::warn!(image = %spec.image, %reason, "pull failed; using the image already on this host");
                        Ok(id)
                    }
                    Err(reason) => Err(RuntimeError::Pull {
                        image: spec.image.clone(),
                        reason,
                    }),
                }
            }
        }
    }

    /// For a stopped container about to start, made from the reference `made_from` (its
    /// image `image_id`): `Some(old image)` when the configured image is another one than
    /// the container's (another reference, or the reference now names another image, say
    /// after a pull), so it must be made again.
    pub(super) async fn image_changed(
        &self,
        docker: &Docker,
        made_from: Option<&str>,
        image_id: Option<&str>,
        spec: &ContainerSpec,
    ) -> Result<Option<String>, RuntimeError> {
        let known = self.ensure_image(docker, spec).await?;
        let old = made_from.unwrap_or_default().to_owned();
        if old != spec.image {
            return Ok(Some(old));
        }
        let wanted = match known {
            Some(id) => Some(id),
            None => docker.inspect_image(&spec.image).await.map_err(engine)?.id,
        };
        Ok((wanted.is_some() && wanted.as_deref() != image_id).then_some(old))
    }
}
