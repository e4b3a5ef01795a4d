//! A container's login shell (configured, else `/bin/bash` when it has one, else `/bin/sh`),
//! and the wrapper that sizes an exec's terminal before its program starts.

use bollard::Docker;
use bollard::exec::CreateExecOptions;

use super::{DockerRuntime, HANGUP_GRACE, exec, rootfs};
use crate::runtime::{ContainerSpec, RuntimeError};

impl DockerRuntime {
    /// The login shell: the configured one, else `/bin/bash` when the container has it, else
    /// `/bin/sh`. Asked of the container's filesystem from the host when its init process
    /// (`pid`) can be looked into, else of the container with an exec; remembered per id.
    pub(super) async fn shell_of(
        &self,
        docker: &Docker,
        id: &str,
        pid: Option<i32>,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        if let Some(shell) = &spec.shell {
            return Ok(shell.clone());
        }
        if let Some(s) = self
            .shells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Ok(s.clone());
        }
        let bash = match pid.and_then(|pid| rootfs::executable_in(pid, "/bin/bash")) {
            Some(bash) => bash,
            None => self.probe_bash(docker, id).await?,
        };
        let shell = if bash { "/bin/bash" } else { "/bin/sh" };
        self.shells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), shell.to_owned());
        Ok(shell.to_owned())
    }

    /// Whether `/bin/bash` is executable in container `id`, asked with an exec.
    async fn probe_bash(&self, docker: &Docker, id: &str) -> Result<bool, RuntimeError> {
        match has_bash(docker, id).await {
            Ok(bash) => Ok(bash),
            Err(exec::DetachedError::Engine(e)) => Err(self.exec_failure(docker, id, e).await),
            Err(exec::DetachedError::Wait(e)) => Err(e),
        }
    }
}

/// Whether `/bin/bash` is executable in container `id` of the engine `docker`, asked with
/// an exec (any backend whose engine is a Docker Engine).
pub(crate) async fn has_bash(docker: &Docker, id: &str) -> Result<bool, exec::DetachedError> {
    let probe = CreateExecOptions::<String> {
        cmd: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "test -x /bin/bash".into(),
        ]),
        ..Default::default()
    };
    let status = exec::run_detached(docker, id, probe, HANGUP_GRACE).await?;
    Ok(status == crate::runtime::ExitStatus::Code(0))
}

/// Wraps `argv` so the terminal has its size before the program starts. Engine API 1.41 has
/// no console size on exec create, and a resize after start races with the program (`stty
/// size` would print `0 0`). The wrapper execs `argv`, so the process tree is unchanged.
pub(crate) fn sized_terminal(size: crate::runtime::TtySize, argv: &[String]) -> Vec<String> {
    let mut out: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        "stty rows \"$1\" cols \"$2\" 2>/dev/null; shift 2; exec \"$@\"".into(),
        "labgate".into(),
        size.rows.to_string(),
        size.cols.to_string(),
    ];
    out.extend(argv.iter().cloned());
    out
}
