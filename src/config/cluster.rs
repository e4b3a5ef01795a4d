//! `[cluster]`: which container engine runs users' containers. Today the only engine is
//! `"docker"`, this host's Docker Engine (configured by `[docker]`), and it is the default, so
//! a config without `[cluster]` means what it always meant. A cluster engine (Docker Swarm,
//! then Kubernetes) is added as a new backend behind `runtime::ContainerRuntime` and a new
//! value here.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// The engines this version can run containers on, as `engine` names them.
pub const ENGINES: &[&str] = &["docker"];

/// `[cluster]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Where users' containers run.
    pub engine: Engine,
}

/// A container engine labgate can drive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Engine {
    /// This host's Docker Engine (`[docker]`).
    #[default]
    Docker,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Docker => "docker",
        })
    }
}

impl<'de> Deserialize<'de> for Engine {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EngineVisitor;
        impl Visitor<'_> for EngineVisitor {
            type Value = Engine;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the name of a container engine (\"docker\")")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Engine, E> {
                match s {
                    "docker" => Ok(Engine::Docker),
                    "swarm" | "kubernetes" => Err(E::custom(format!(
                        "engine = {s:?} is not available in this version of labgate; it runs containers on this host's Docker Engine (engine = \"docker\")"
                    ))),
                    other => Err(E::custom(format!(
                        "unknown engine {other:?}: expected one of {}",
                        ENGINES
                            .iter()
                            .map(|e| format!("{e:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))),
                }
            }
        }
        d.deserialize_str(EngineVisitor)
    }
}

/// `[cluster]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) engine: Option<Engine>,
}

impl RawCluster {
    /// The validated section.
    pub(super) fn validate(self) -> ClusterConfig {
        ClusterConfig {
            engine: self.engine.unwrap_or_default(),
        }
    }
}
