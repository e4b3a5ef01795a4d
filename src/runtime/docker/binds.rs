//! Bind sources checked on the host before a start ([`super::hostpath`]), and verified in
//! the started container.

use super::hostpath::{self, Checked, Refused};
use super::inspect::placement;
use crate::runtime::{ContainerSpec, RuntimeError};

/// Checks every bind source of `spec` on the host (see [`hostpath`]): the
/// home, made if missing, and the admin's mounts. A refusal is logged with its path for the
/// admin; the user is told one line.
pub(crate) async fn check_binds(spec: &ContainerSpec) -> Result<Vec<Checked>, RuntimeError> {
    let spec = spec.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let mut binds = vec![hostpath::ensure_home(
            &spec.home_source,
            &spec.home_target,
            spec.uid_gid,
        )?];
        for m in &spec.mounts {
            binds.push(hostpath::check_mount(&m.source, &m.target)?);
        }
        Ok::<_, Refused>(binds)
    })
    .await
    .map_err(|e| RuntimeError::Home(e.to_string()))?;
    checked.map_err(|refused| {
        tracing::warn!(target: "audit", user = %spec.user, container = %spec.name, error = %refused, "container start refused: a bind source failed its check");
        RuntimeError::Unsafe(refused)
    })
}

/// Whether the container that `info` shows running has, at each bind's target, the file
/// that was checked; `Err` names the first that it does not.
pub(super) fn verify_binds(
    info: &bollard::models::ContainerInspectResponse,
    binds: &[Checked],
) -> Result<(), Refused> {
    let Some(pid) = placement(info).0 else {
        return Ok(());
    };
    for bind in binds {
        if hostpath::bound_in(pid, bind) == Some(false) {
            return Err(Refused::Swapped {
                checked: bind.source.clone(),
                target: bind.target.clone(),
            });
        }
    }
    Ok(())
}
