//! The Docker Swarm backend (issue #17), being built: several GPU servers behind one
//! address, placed and accounted by Swarm (one-replica services, GPUs as the nodes' generic
//! resource), exec and the way in through each task's node's own Docker API.

pub mod spec;

use std::sync::Arc;

use crate::config::Config;
use crate::gpu::GpuError;

/// The Swarm backend.
#[allow(dead_code)]
pub struct SwarmRuntime {
    config: Arc<crate::config::cluster::SwarmConfig>,
}

impl SwarmRuntime {
    /// A backend for the swarm `config` names. Does no I/O.
    pub fn new(config: &Config) -> Self {
        SwarmRuntime {
            config: Arc::new(config.cluster.swarm.clone()),
        }
    }
}

/// The `labgate gpus` table of a swarm, asked of its manager.
pub async fn gpu_report(_config: &Config) -> Result<String, GpuError> {
    Err(GpuError::Inventory("not yet".into()))
}
