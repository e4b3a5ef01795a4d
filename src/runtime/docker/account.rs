//! The user's account inside their container: a `passwd` and a `group` line for the
//! configured uid:gid.
//!
//! Images rarely know the uid labgate runs a user as, and OpenSSH's own helpers refuse to run
//! without an entry for it (`sftp-server`: "No user found for uid 1000"; `scp -t`: "unknown
//! user"; `ssh` and `git` over ssh inside the container likewise), as do prompts and `whoami`.
//! So once per container, as root, labgate appends `NAME:x:UID:GID:NAME:HOME:SHELL` to
//! `/etc/passwd` and `NAME:x:GID:` to `/etc/group` when no entry has that uid (gid). The lines
//! live in the container's writable layer: a recreated container gets them again, an existing
//! entry for the uid (an image made for the lab) is left alone. Only when a uid is configured:
//! root needs no entry.
//!
//! The files are written from the host through the container's root
//! ([`super::rootfs::add_account_lines_in`]: no exec, whose 40 ms would fall on the
//! first login) where the gateway may look into containers; else, or when a file is missing,
//! by a shell script run as root in the container.

use std::collections::HashSet;
use std::sync::Mutex;

use bollard::Docker;
use bollard::exec::CreateExecOptions;

use super::rootfs::{AccountLine, add_account_lines_in};
use crate::runtime::{ContainerSpec, ExitStatus, RuntimeError};

/// Adds the entries missing for `$2` (uid) and `$3` (gid). Shell built-ins only (no `grep`
/// needed in the image); `$1` name, `$4` home, `$5` login shell.
const SCRIPT: &str = "has() { while IFS=: read -r _ _ id _; do [ \"$id\" = \"$2\" ] && return 0; \
done < \"$1\"; return 1; } 2>/dev/null; \
has /etc/passwd \"$2\" || echo \"$1:x:$2:$3:$1:$4:$5\" >> /etc/passwd || exit 1; \
has /etc/group \"$3\" || echo \"$1:x:$3:\" >> /etc/group || exit 1";

/// Containers (by id) whose account is known to be in place.
#[derive(Default)]
pub(crate) struct Accounts {
    done: Mutex<HashSet<String>>,
}

impl Accounts {
    /// Keeps only the containers `keep` says yes to (the rest are gone).
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|id| keep(id));
    }

    /// Makes sure container `id` (whose init is host process `pid`, when known) has a
    /// `passwd`/`group` entry for `spec`'s uid:gid. Safe to call on every login: it runs once
    /// per container (again only after a failure).
    pub(crate) async fn ensure(
        &self,
        docker: &Docker,
        id: &str,
        pid: Option<i32>,
        spec: &ContainerSpec,
        shell: &str,
    ) -> Result<(), RuntimeError> {
        let Some((uid, gid)) = spec.uid_gid else {
            return Ok(());
        };
        if self.lock().contains(id) {
            return Ok(());
        }
        if let Some(pid) = pid {
            let user = spec.user.to_string();
            let passwd = format!("{user}:x:{uid}:{gid}:{user}:{}:{shell}", spec.home_target);
            let group = format!("{user}:x:{gid}:");
            let written = tokio::task::spawn_blocking(move || {
                let lines = [
                    AccountLine {
                        file: "/etc/passwd",
                        id: uid,
                        line: &passwd,
                    },
                    AccountLine {
                        file: "/etc/group",
                        id: gid,
                        line: &group,
                    },
                ];
                add_account_lines_in(pid, &lines)
            })
            .await
            .ok()
            .flatten();
            match written {
                Some(Ok(added)) => {
                    tracing::debug!(container = %spec.name, uid, gid, added, "account entry in place (written from the host)");
                    self.lock().insert(id.to_owned());
                    return Ok(());
                }
                Some(Err(e)) => {
                    return Err(RuntimeError::Exec(format!(
                        "adding your account entry: {e}"
                    )));
                }
                None => {}
            }
        }
        let opts = CreateExecOptions::<String> {
            cmd: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                SCRIPT.into(),
                "labgate-account".into(),
                spec.user.to_string(),
                uid.to_string(),
                gid.to_string(),
                spec.home_target.clone(),
                shell.to_owned(),
            ]),
            user: Some("0:0".into()),
            ..Default::default()
        };
        let failed = |e: String| RuntimeError::Exec(format!("adding your account entry: {e}"));
        let status = match super::exec::run_detached(docker, id, opts, super::HANGUP_GRACE).await {
            Ok(status) => status,
            Err(super::exec::DetachedError::Engine(e)) => return Err(failed(e.to_string())),
            Err(super::exec::DetachedError::Wait(e)) => return Err(e),
        };
        match status {
            ExitStatus::Code(0) => {
                tracing::debug!(container = %spec.name, uid, gid, "account entry in place");
                self.lock().insert(id.to_owned());
                Ok(())
            }
            other => Err(failed(format!("/etc/passwd not writable ({other:?})"))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.done.lock().unwrap_or_else(|p| p.into_inner())
    }
}
