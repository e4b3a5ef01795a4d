//! Profile containers from before they were named `labgate-USER.PROFILE`: found under their
//! old name (`labgate-USER-PROFILE`) and renamed.

use bollard::Docker;

use super::inspect::is_ours;
use super::{DockerRuntime, engine};
use crate::auth::Username;
use crate::runtime::{ContainerRuntime, RuntimeError};

impl DockerRuntime {
    /// Renames the container `from` to `to` if its labels say it is `user`'s container of
    /// `profile` (a container from before profile containers were named with `.`); true
    /// when it was renamed.
    pub(super) async fn migrate_name(
        &self,
        docker: &Docker,
        from: &str,
        to: &str,
        user: &str,
        profile: &str,
    ) -> Result<bool, RuntimeError> {
        let Some(info) = self.inspect_named(docker, from).await? else {
            return Ok(false);
        };
        if !is_ours(&info, user, Some(profile)) {
            return Ok(false);
        }
        let id = info.id.unwrap_or_else(|| from.to_owned());
        docker
            .rename_container(
                &id,
                bollard::query_parameters::RenameContainerOptions {
                    name: to.to_owned(),
                },
            )
            .await
            .map_err(engine)?;
        tracing::info!(target: "audit", user, profile, from, to, "container renamed");
        Ok(true)
    }

    /// Renames every profile container still under its old name (`labgate-USER-PROFILE`) to
    /// `labgate-USER.PROFILE`; the number renamed.
    pub async fn migrate_names(&self) -> Result<usize, RuntimeError> {
        let (docker, _) = self.client().await?;
        let mut renamed = 0;
        for c in self.list_managed().await? {
            let (Some(profile), Ok(user)) = (&c.profile, Username::parse(&c.user)) else {
                continue;
            };
            let (old, new) = (
                crate::runtime::legacy_profile_name(&user, profile),
                crate::runtime::container_name(&user, Some(profile)),
            );
            if c.name == old {
                let lock = self.lock_for(&new);
                let _guard = lock.lock().await;
                if self
                    .migrate_name(docker, &old, &new, user.as_str(), profile.as_str())
                    .await?
                {
                    renamed += 1;
                }
            }
        }
        Ok(renamed)
    }
}
