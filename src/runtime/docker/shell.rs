//! A container's login shell (configured, else `/bin/bash` when it has one, else `/bin/sh`),
//! and the wrapper that sizes an exec's terminal before its program starts.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use bollard::Docker;
use bollard::exec::CreateExecOptions;

use super::{DockerRuntime, HANGUP_GRACE, exec, rootfs};
use crate::runtime::{ContainerSpec, RuntimeError};

/// Login shells resolved per container id: the configured one, else `/bin/bash` when the
/// container has it, else `/bin/sh`, each container asked once.
#[derive(Default)]
pub(crate) struct Shells(Mutex<HashMap<String, String>>);

impl Shells {
    /// The login shell of container `id` under `spec`; `has_bash` asks the container when
    /// neither the config nor an earlier answer says.
    pub(crate) async fn of<F>(
        &self,
        id: &str,
        spec: &ContainerSpec,
        has_bash: F,
    ) -> Result<String, RuntimeError>
    where
        F: Future<Output = Result<bool, RuntimeError>>,
    {
        if let Some(shell) = &spec.shell {
            return Ok(shell.clone());
        }
        if let Some(s) = self.lock().get(id) {
            return Ok(s.clone());
        }
        let shell = if has_bash.await? {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        self.lock().insert(id.to_owned(), shell.to_owned());
        Ok(shell.to_owned())
    }

    /// Keeps only the containers `keep` says yes to (the rest are gone).
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|id, _| keep(id));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DockerRuntime {
    /// The login shell (see [`Shells`]): asked of the container's filesystem from the host
    /// when its init process (`pid`) can be looked into, else of the container with an exec.
    pub(super) async fn shell_of(
        &self,
        docker: &Docker,
        id: &str,
        pid: Option<i32>,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        self.shells
            .of(id, spec, async {
                match pid.and_then(|pid| rootfs::executable_in(pid, "/bin/bash")) {
                    Some(bash) => Ok(bash),
                    None => self.probe_bash(docker, id).await,
                }
            })
            .await
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
