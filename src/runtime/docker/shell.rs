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

/// The header of the engine's answer to `HEAD /containers/ID/archive`: the path's stat.
const PATH_STAT: &str = "X-Docker-Container-Path-Stat";

/// Go's `os.ModeDir` and `os.ModeSymlink` in a path stat's `mode`.
const GO_MODE_DIR: u64 = 1 << 31;
const GO_MODE_SYMLINK: u64 = 1 << 27;

/// Whether `path` is executable in container `id` of the API `api` (version prefix
/// `version`), from the engine's stat of the path (`HEAD /containers/ID/archive`, what
/// `docker cp` asks first): no process runs in the container, where an exec costs a runc
/// start. Symlinks are followed (the engine resolves them within the container) up to 8 deep.
/// `None` when the engine's answer cannot be read: ask with an exec instead.
pub(crate) async fn executable_by_stat(
    api: &super::dial::Api,
    version: &str,
    id: &str,
    path: &str,
) -> Option<bool> {
    let mut path = path.to_owned();
    for _ in 0..8 {
        let url = format!(
            "/{version}/containers/{id}/archive?path={}",
            super::dial::escape_query(&path)
        );
        let answer = api.call(hyper::Method::HEAD, &url).await.ok()?;
        if answer.status == hyper::StatusCode::NOT_FOUND {
            return Some(false);
        }
        if !answer.status.is_success() {
            return None;
        }
        match as_program(answer.headers.get(PATH_STAT)?.as_bytes())? {
            AsProgram::Runs(runs) => return Some(runs),
            AsProgram::Follow(target) => path = target,
        }
    }
    Some(false)
}

/// What a path's stat says of it as a program.
#[derive(Debug, PartialEq)]
enum AsProgram {
    /// Not a link: whether it is a file with an execute bit.
    Runs(bool),
    /// A symlink to this path (resolved in the container by the engine).
    Follow(String),
}

/// Reads the engine's path stat header (base64 of `{"mode":..,"linkTarget":..}`, the mode
/// Go's `os.FileMode`); `None` when it cannot be read.
fn as_program(header: &[u8]) -> Option<AsProgram> {
    use base64::Engine as _;
    let stat = base64::engine::general_purpose::STANDARD
        .decode(header)
        .ok()?;
    let stat: serde_json::Value = serde_json::from_slice(&stat).ok()?;
    let mode = stat.get("mode")?.as_u64()?;
    if mode & GO_MODE_SYMLINK != 0 {
        let target = stat.get("linkTarget")?.as_str()?;
        return (!target.is_empty()).then(|| AsProgram::Follow(target.to_owned()));
    }
    Some(AsProgram::Runs(
        mode & GO_MODE_DIR == 0 && mode & 0o111 != 0,
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header(json: &str) -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(json)
            .into_bytes()
    }

    #[test]
    fn a_path_stat_says_whether_the_path_runs_and_where_a_link_leads() {
        // As a Docker Engine 20.10 answered for busybox's /bin/sh and /etc.
        assert_eq!(
            as_program(b"eyJuYW1lIjoic2giLCJzaXplIjo3LCJtb2RlIjoxMzQyMTgyMzksIm10aW1lIjoiMTk3MC0wMS0wMVQwMDowMDowMFoiLCJsaW5rVGFyZ2V0IjoiL2Jpbi9idXN5Ym94In0="),
            Some(AsProgram::Follow("/bin/busybox".into()))
        );
        assert_eq!(
            as_program(b"eyJuYW1lIjoiZXRjIiwic2l6ZSI6NDA5NiwibW9kZSI6MjE0NzQ4NDE0MSwibXRpbWUiOiIyMDI2LTEyLTA3VDAwOjAwOjA4LjQ3MTQxMzU5NFoiLCJsaW5rVGFyZ2V0IjoiIn0="),
            Some(AsProgram::Runs(false))
        );
        let file = |mode: u32| {
            header(&format!(
                r#"{{"name":"bash","mode":{mode},"linkTarget":""}}"#
            ))
        };
        assert_eq!(as_program(&file(0o755)), Some(AsProgram::Runs(true)));
        assert_eq!(as_program(&file(0o700)), Some(AsProgram::Runs(true)));
        assert_eq!(as_program(&file(0o644)), Some(AsProgram::Runs(false)));
    }

    #[test]
    fn an_unreadable_path_stat_is_no_answer() {
        assert_eq!(as_program(b"not base64!"), None);
        assert_eq!(as_program(&header("not json")), None);
        assert_eq!(as_program(&header(r#"{"name":"bash"}"#)), None);
        // A link the engine could not resolve.
        assert_eq!(
            as_program(&header(
                r#"{"name":"bash","mode":134218239,"linkTarget":""}"#
            )),
            None
        );
    }
}
