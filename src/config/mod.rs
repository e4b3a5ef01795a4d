//! The admin's TOML config: parsing, validation, and per-user quota resolution.
//!
//! Owns the file format (`[server]`, `[docker]`, `[defaults]`, `[users.NAME]`), its units,
//! and the rule that a config is either wholly valid or rejected with `file:line:column` and a
//! message. Raw serde structs (`deny_unknown_fields`) are turned into the validated [`Config`];
//! nothing downstream ever sees an unvalidated value. Relative paths are resolved against the
//! directory of the config file.
//!
//! - `raw`: the file format as serde reads it (`Raw*` tables, checked newtypes, merging).
//! - `validated`: the types the rest of labgate reads, and the named defaults.
//! - `validation`: raw → validated ([`parse`]), with positions.
//! - `changes`: what a reload changes in a quota ([`Quota::changes`] → [`QuotaChanges`]).
//! - `gpu`, [`images`] (`[registries]`, `[profiles]`, pull policies), [`units`], [`helpers`],
//!   [`reload`].
//!
//! Every public type is re-exported here: `crate::config::Quota`, never the submodule path.

mod changes;
pub mod cluster;
mod gpu;
pub mod helpers;
pub mod images;
pub mod policy;
mod raw;
pub mod reload;
pub mod units;
mod validated;
mod validation;

use std::path::{Path, PathBuf};

pub use changes::QuotaChanges;
pub use gpu::{
    DEFAULT_NVML_LIBRARY, DEFAULT_RECLAIM_WARNING, GpuConfig, GpuMode, GpuPin, GpuRequest, GpuUuid,
};
pub use images::{ProfileRefusal, Profiles, PullPolicy, RegistryAuth};
pub use units::{ByteSize, HumanDuration};
pub use validated::{
    AdminConfig, Config, DEFAULT_ACCEPT_ENV, DEFAULT_ADMIN_SOCKET, DEFAULT_AUTO_UIDS,
    DEFAULT_DOCKER_SOCKET, DEFAULT_DOCKER_TIMEOUT, DEFAULT_END_SESSIONS_ON_KEY_REMOVAL,
    DEFAULT_FORWARDING, DEFAULT_GPU_RECLAIM, DEFAULT_HOME, DEFAULT_HOST_KEY, DEFAULT_KEEPALIVE,
    DEFAULT_KEYS_DIR, DEFAULT_LISTEN, DEFAULT_LOGIN_GRACE, DEFAULT_LOGIN_STATUS,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_USER, DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_STARTUPS, DEFAULT_NETWORK, DEFAULT_STATE_DIR, DockerConfig, ForwardVia, Mount,
    Quota, ServerConfig, UidRule,
};
pub use validation::parse;

/// Default path of the config file, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/labgate.toml";

/// Errors loading a config. `Display` gives `file:line:column: message` where a position is known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config: {source}", path = path.display())]
    Io {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type or an invalid value.
    #[error("{path}:{line}:{column}: {message}", path = path.display())]
    At {
        /// The config file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A problem the TOML parser could not place in the file.
    #[error("{path}: {message}", path = path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    let abs = std::path::absolute(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse(&abs, &text)
}

#[cfg(test)]
mod tests;
