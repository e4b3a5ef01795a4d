//! The labels the Docker backend puts on every container it makes: how it finds its
//! containers again (after a restart too) and what a container was made with. A cluster
//! backend on Docker (Swarm) puts the same labels on its services.

/// Label on every container labgate manages.
pub const LABEL_MANAGED: &str = "labgate.managed";

/// Label naming the user a container belongs to.
pub const LABEL_USER: &str = "labgate.user";

/// Label recording the GPUs (comma-separated UUIDs) a container was created with: what a
/// restarted gateway rebuilds GPU holdings from.
pub const LABEL_GPUS: &str = "labgate.gpus";

/// Label naming the profile of a `user+profile` container (absent for the plain one).
pub const LABEL_PROFILE: &str = "labgate.profile";

/// Label recording the settings a container was created with that only a recreate can change
/// (home, mounts, shm, env, uid): compared at each start of a stopped container.
pub const LABEL_SETTINGS: &str = "labgate.settings";

/// Label recording the image reference the container was created from (as configured).
pub const LABEL_IMAGE: &str = "labgate.image";
