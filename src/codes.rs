//! Stable codes for the errors a user can meet, and what each means for the admin.
//!
//! A user is told one line (the error's `Display`, phrased for them); the gateway's log and
//! the audit log get the same line with its [`Code`] and the admin's explanation, and
//! `/metrics` counts them by code (`labgate_user_errors_total{code}`). Codes never change
//! meaning; README.md lists them all ("Error codes"), which a unit test checks.

/// Something that went wrong for a user, with its code.
pub trait Coded {
    /// The stable code of this error.
    fn code(&self) -> Code;
}

/// The stable codes. See [`Code::explanation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// The container engine does not answer.
    EngineUnavailable,
    /// The engine stopped answering during a session.
    EngineLost,
    /// Any other engine error.
    EngineError,
    /// The image is not on the host and may not be pulled.
    ImageMissing,
    /// The image could not be pulled.
    PullFailed,
    /// A `user+profile` login for a profile the user may not use.
    ProfileRefused,
    /// No identity to run the user's processes as.
    NoIdentity,
    /// A container not made by labgate has the user's container name.
    NameTaken,
    /// The engine refused to create the container.
    CreateFailed,
    /// The engine refused to start the container, or it died.
    StartFailed,
    /// A process could not be started in the container.
    ExecFailed,
    /// The home directory could not be prepared.
    HomeFailed,
    /// A home or mount path failed its safety checks.
    UnsafeBind,
    /// The gateway cannot see GPUs (no NVML).
    GpuUnavailable,
    /// NVML is loaded but a query failed.
    GpuInventory,
    /// Not enough free GPUs, or a pinned GPU is unknown or taken.
    GpuBusy,
    /// The engine cannot give containers GPUs.
    GpuNoRuntime,
    /// A login waited for GPUs longer than `[gpu] max_wait`.
    GpuWaitedTooLong,
    /// A forward refused by policy.
    ForwardDenied,
    /// A forward's target could not be resolved, reached or listened on.
    ForwardUnreachable,
    /// Too many forwards being opened at once.
    ForwardBusy,
}

impl Code {
    /// Every code, in the order README.md lists them.
    pub const ALL: [Code; 21] = [
        Code::EngineUnavailable,
        Code::EngineLost,
        Code::EngineError,
        Code::ImageMissing,
        Code::PullFailed,
        Code::ProfileRefused,
        Code::NoIdentity,
        Code::NameTaken,
        Code::CreateFailed,
        Code::StartFailed,
        Code::ExecFailed,
        Code::HomeFailed,
        Code::UnsafeBind,
        Code::GpuUnavailable,
        Code::GpuInventory,
        Code::GpuBusy,
        Code::GpuNoRuntime,
        Code::GpuWaitedTooLong,
        Code::ForwardDenied,
        Code::ForwardUnreachable,
        Code::ForwardBusy,
    ];

    /// Counts one more user who met this (`labgate_user_errors_total{code}`).
    pub fn count(self) {
        crate::metrics::metrics().user_error(self.as_str());
    }

    /// The code as logs, the audit log and metrics write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::EngineUnavailable => "engine-unavailable",
            Code::EngineLost => "engine-lost",
            Code::EngineError => "engine-error",
            Code::ImageMissing => "image-missing",
            Code::PullFailed => "pull-failed",
            Code::ProfileRefused => "profile-refused",
            Code::NoIdentity => "no-identity",
            Code::NameTaken => "name-taken",
            Code::CreateFailed => "create-failed",
            Code::StartFailed => "start-failed",
            Code::ExecFailed => "exec-failed",
            Code::HomeFailed => "home-failed",
            Code::UnsafeBind => "unsafe-bind",
            Code::GpuUnavailable => "gpu-unavailable",
            Code::GpuInventory => "gpu-inventory",
            Code::GpuBusy => "gpu-busy",
            Code::GpuNoRuntime => "gpu-no-runtime",
            Code::GpuWaitedTooLong => "gpu-waited-too-long",
            Code::ForwardDenied => "forward-denied",
            Code::ForwardUnreachable => "forward-unreachable",
            Code::ForwardBusy => "forward-busy",
        }
    }

    /// What the admin should know: the likely cause and where to look.
    pub fn explanation(self) -> &'static str {
        match self {
            Code::EngineUnavailable => {
                "the Docker Engine did not answer: is dockerd running, is [docker] socket right, did a call exceed [docker] timeout?"
            }
            Code::EngineLost => {
                "the engine stopped answering while a session ran (daemon restarted or stopped); the user's processes may still run"
            }
            Code::EngineError => "the engine refused a call; its own words are in the message",
            Code::ImageMissing => {
                "the configured image is not on this host and pull_policy = \"never\": load or build it, or allow pulls"
            }
            Code::PullFailed => {
                "the registry refused or could not be reached (name, tag, credentials in [registries], network)"
            }
            Code::ProfileRefused => {
                "the user logged in as user+profile for a profile whose users list does not name them"
            }
            Code::NoIdentity => {
                "the quota's uid could not be resolved: uid = \"host\" without a host account (or with uid 0), or auto_uids exhausted"
            }
            Code::NameTaken => {
                "a container not made by labgate has the user's container name: rename or remove it"
            }
            Code::CreateFailed => {
                "the engine refused to create the container, usually an invalid quota (memory, cpus, mounts) or image"
            }
            Code::StartFailed => {
                "the engine refused to start the container or it exited at once: `docker logs` of the container says why"
            }
            Code::ExecFailed => {
                "the engine could not start a process in the container (container stopping, shell missing)"
            }
            Code::HomeFailed => {
                "the home directory could not be made or given to the user's uid (permissions, disk, a file in the way)"
            }
            Code::UnsafeBind => {
                "a home or mount path has a symlink, another owner, or changed under the gateway: the log names the path"
            }
            Code::GpuUnavailable => {
                "the quota asks for GPUs but NVML could not be loaded on this host ([gpu] nvml_library, the NVIDIA driver)"
            }
            Code::GpuInventory => "NVML is loaded but listing the GPUs failed (driver state)",
            Code::GpuBusy => {
                "not enough free GPUs for the quota, or a pinned GPU is unknown or held: `labgate gpus` shows who holds which"
            }
            Code::GpuNoRuntime => {
                "the engine has no GPU support: install and configure the NVIDIA container toolkit"
            }
            Code::GpuWaitedTooLong => {
                "the login waited in the GPU queue for [gpu] max_wait and no GPU freed for it: `labgate gpus` shows who holds them"
            }
            Code::ForwardDenied => {
                "the forward was refused by [forwarding] switches, allow rules or the key's options"
            }
            Code::ForwardUnreachable => {
                "nothing answered at the forward's target inside the container, or its name did not resolve there"
            }
            Code::ForwardBusy => {
                "the connection or user has too many forwards being opened at once (a client opening many in parallel)"
            }
        }
    }
}

/// Records that `user` met `err` while `what` was being done (`session`, `forward`...): a
/// warning in the log with the code and the admin's explanation, an audit entry, and the
/// metric.
pub fn record(
    user: &dyn std::fmt::Display,
    what: &'static str,
    err: &(impl Coded + std::fmt::Display),
) {
    let code = err.code();
    tracing::warn!(
        user = %user,
        code = code.as_str(),
        explanation = code.explanation(),
        error = %err,
        "{what} failed"
    );
    tracing::info!(target: "audit", user = %user, code = code.as_str(), error = %err, "{what} failed");
    code.count();
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_the_readme_lists_each_with_its_explanation() {
        let readme = include_str!("../README.md");
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert!(
                readme.contains(&format!("| `{code}` |")),
                "README.md's error code table lacks {code}"
            );
            assert!(!code.explanation().is_empty());
        }
    }
}
