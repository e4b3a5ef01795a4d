//! Image-related config: `pull_policy`, `[registries."host:port"]` credentials and
//! `[profiles.NAME]` tables.
//!
//! Registry secrets never live in the config or in memory between pulls: a registry names a
//! `password_file` that the container backend reads at pull time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::auth::{ProfileName, Username};

/// When the image of a container is pulled from its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Pull only when the image is not on the host.
    #[default]
    Missing,
    /// Pull before every container create or start (a moved tag recreates the container).
    Always,
    /// Never pull: a missing image fails the login.
    Never,
}

/// Credentials for one registry: the user name and the file holding the password (or token).
/// The secret itself is read only when pulling, so `Debug` and logs never carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    /// The registry as written in image references (`host:port`, `docker.io`).
    pub registry: String,
    /// User name at the registry.
    pub username: String,
    /// File whose contents (trailing newline removed) are the password.
    pub password_file: PathBuf,
}

/// `[registries."host:port"]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegistry {
    username: Spanned<String>,
    password_file: Spanned<PathBuf>,
}

/// The registry an image reference is pulled from, as Docker decides it: the first path
/// component when it looks like a host (has `.` or `:`, or is `localhost`), else Docker Hub.
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// Validates the registries table; `Err((span, message))` for the first bad entry.
pub(super) fn registries(
    raw: BTreeMap<String, Spanned<RawRegistry>>,
    base: &Path,
) -> Result<BTreeMap<String, RegistryAuth>, (std::ops::Range<usize>, String)> {
    let mut out = BTreeMap::new();
    for (name, r) in raw {
        let span = r.span();
        let r = r.into_inner();
        if name.is_empty() || name.contains(['/', '@']) || name.contains(char::is_whitespace) {
            return Err((
                span,
                format!("registry {name:?} must be a host or host:port, as in image references"),
            ));
        }
        if r.username.get_ref().is_empty() {
            return Err((
                r.username.span(),
                format!("registry {name:?}: username must not be empty"),
            ));
        }
        let file = r.password_file.get_ref();
        let file = if file.is_absolute() {
            file.clone()
        } else {
            base.join(file)
        };
        out.insert(
            name.clone(),
            RegistryAuth {
                registry: name,
                username: r.username.into_inner(),
                password_file: file,
            },
        );
    }
    Ok(out)
}

/// The credentials that apply to `image`, if its registry has an entry.
pub(super) fn auth_for(
    image: &str,
    registries: &BTreeMap<String, RegistryAuth>,
) -> Option<RegistryAuth> {
    let host = registry_of(image);
    registries.get(host).cloned().or_else(|| {
        (host == "docker.io")
            .then(|| registries.get("index.docker.io").cloned())
            .flatten()
    })
}

/// Profiles and who may use them, with each allowed user's resolved quota.
#[derive(Debug, Clone, Default)]
pub struct Profiles {
    /// `(profile, user)` → the user's quota with the profile merged over it.
    pub(super) quotas: BTreeMap<(ProfileName, Username), super::Quota>,
}

impl Profiles {
    /// The profiles `user` may use, sorted.
    pub fn allowed(&self, user: &Username) -> Vec<&ProfileName> {
        self.quotas
            .keys()
            .filter(|(_, u)| u == user)
            .map(|(p, _)| p)
            .collect()
    }

    /// Whether a profile of this name exists.
    pub fn exists(&self, profile: &ProfileName) -> bool {
        self.quotas.keys().any(|(p, _)| p == profile)
    }

    /// Every profile's quota, with the user it is for.
    pub fn all(&self) -> impl Iterator<Item = (&ProfileName, &Username, &super::Quota)> {
        self.quotas.iter().map(|((p, u), q)| (p, u, q))
    }
}

/// Why a `user+profile` login gets no container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileRefusal {
    /// No profile of that name.
    #[error("there is no profile {profile:?}; {}", may(.allowed))]
    Unknown {
        /// The profile asked for.
        profile: String,
        /// The profiles the user may use.
        allowed: Vec<String>,
    },
    /// The profile exists but this user is not in its `users`.
    #[error("you may not use profile {profile:?}; {}", may(.allowed))]
    NotAllowed {
        /// The profile asked for.
        profile: String,
        /// The profiles the user may use.
        allowed: Vec<String>,
    },
}

fn may(allowed: &[String]) -> String {
    if allowed.is_empty() {
        "you may use no profiles (log in without +PROFILE)".to_owned()
    } else {
        format!("profiles you may use: {}", allowed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_found_the_way_docker_finds_them() {
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("library/busybox:1"), "docker.io");
        assert_eq!(registry_of("pytorch/pytorch:latest"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/lab/img:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("nvcr.io/nvidia/pytorch:24.01-py3"), "nvcr.io");
        assert_eq!(registry_of("localhost/img"), "localhost");
    }

    #[test]
    fn refusals_list_what_the_user_may_use() {
        let e = ProfileRefusal::NotAllowed {
            profile: "gpu".into(),
            allowed: vec!["cpu".into(), "big".into()],
        };
        assert_eq!(
            e.to_string(),
            "you may not use profile \"gpu\"; profiles you may use: cpu, big"
        );
        let e = ProfileRefusal::Unknown {
            profile: "nope".into(),
            allowed: vec![],
        };
        assert!(e.to_string().contains("you may use no profiles"), "{e}");
    }
}
