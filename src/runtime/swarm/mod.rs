//! The Docker Swarm backend (issue #17), being built: several GPU servers behind one
//! address, placed and accounted by Swarm (one-replica services, GPUs as the nodes' generic
//! resource), exec and the way in through each task's node's own Docker API.
//!
//! What exists so far: [`spec`], the pure service made from a [`super::ContainerSpec`]. It is
//! not yet a [`super::ContainerRuntime`]: `[cluster] engine = "swarm"` is still refused by the
//! config, and `tests/swarm.rs` runs the three-node test cluster the backend's tests will use.

pub mod spec;
