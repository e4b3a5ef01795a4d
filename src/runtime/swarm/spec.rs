//! Pure translation of a [`ContainerSpec`] into a Swarm service: one replica, labelled as on
//! one host, on the lab's isolated network, no published port, GPUs as the nodes' generic
//! resource. The security rules of [`crate::runtime::docker::spec`] hold here too, and where
//! the service API cannot say one of them the difference is named:
//!
//! - `/dev/shm`'s size has no service field: it is a `tmpfs` mount at `/dev/shm` instead.
//! - `no-new-privileges` is a service field only from Engine API 1.46 (Docker 27); older
//!   managers ignore it, so on those the nodes' `daemon.json` must say
//!   `"no-new-privileges": true` (README, "Several servers").
//! - GPUs are asked for by count only: Swarm gives each task distinct ones of the kind the
//!   nodes list (`DOCKER_RESOURCE_<KIND>` in the container), and cannot pin a UUID, so a quota
//!   with pinned GPUs is refused on a cluster ([`SpecError::PinnedGpus`]).

use std::collections::HashMap;

use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, GenericResourcesInner,
    GenericResourcesInnerDiscreteResourceSpec, Limit, Mount, MountTmpfsOptions, MountType,
    NetworkAttachmentConfig, ResourceObject, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec, TaskSpecContainerSpecPrivileges,
    TaskSpecPlacement, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum,
};

use crate::config::GpuRequest;
use crate::runtime::ContainerSpec;
use crate::runtime::docker::labels::{
    LABEL_IMAGE, LABEL_MANAGED, LABEL_PROFILE, LABEL_SETTINGS, LABEL_USER,
};
use crate::runtime::docker::spec::{DROPPED_CAPABILITIES, KEEPALIVE, binds, settings_label};

/// Seconds a task gets to end after SIGTERM (its keep-alive ends at once).
const STOP_GRACE_NS: i64 = 10_000_000_000;

/// Wait before a task that ended is started again (its node restarted, its process died).
const RESTART_DELAY_NS: i64 = 5_000_000_000;

/// Where the service goes and what the cluster calls GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement<'a> {
    /// The isolated network users' tasks join (no path between them).
    pub network: &'a str,
    /// The nodes' generic resource kind for GPUs (`[cluster] gpu_resource`).
    pub gpu_resource: &'a str,
    /// Placement constraints from the quota (`node.labels.gpu == a100`), passed through.
    pub constraints: &'a [String],
}

/// What a cluster cannot do for a quota.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Swarm hands out generic resources by count; a UUID cannot be asked for.
    #[error(
        "your quota pins GPUs ({0}), which a cluster cannot do: its engine chooses the GPUs; ask your admin to give a count (gpus = N)"
    )]
    PinnedGpus(String),
}

/// The service that runs `spec` as its one task.
pub fn service_spec(spec: &ContainerSpec, on: &Placement<'_>) -> Result<ServiceSpec, SpecError> {
    let gpus = match &spec.gpu_request {
        GpuRequest::Count(n) => i64::from(*n),
        GpuRequest::Pinned(pins) => {
            return Err(SpecError::PinnedGpus(
                pins.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
    };
    let mut labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_USER.to_owned(), spec.user.to_string()),
        (LABEL_IMAGE.to_owned(), spec.image.clone()),
        (LABEL_SETTINGS.to_owned(), settings_label(spec)),
    ]);
    if let Some(profile) = &spec.profile {
        labels.insert(LABEL_PROFILE.to_owned(), profile.to_string());
    }
    let mut mounts = binds(spec);
    if let Some(shm) = spec.shm {
        mounts.push(Mount {
            typ: Some(MountType::TMPFS),
            target: Some("/dev/shm".into()),
            tmpfs_options: Some(MountTmpfsOptions {
                size_bytes: Some(i64::try_from(shm.0).unwrap_or(i64::MAX)),
                mode: Some(0o1777),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let container = TaskSpecContainerSpec {
        image: Some(spec.image.clone()),
        labels: Some(labels.clone()),
        command: Some(vec!["/bin/sh".into(), "-c".into(), KEEPALIVE.into()]),
        args: Some(Vec::new()),
        hostname: Some(spec.name.chars().take(63).collect()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        dir: Some(spec.home_target.clone()),
        user: spec.uid_gid.map(|(u, g)| format!("{u}:{g}")),
        groups: (!spec.groups.is_empty()).then(|| spec.groups.iter().map(u32::to_string).collect()),
        privileges: Some(TaskSpecContainerSpecPrivileges {
            no_new_privileges: Some(true),
            ..Default::default()
        }),
        tty: Some(false),
        open_stdin: Some(false),
        mounts: Some(mounts),
        stop_grace_period: Some(STOP_GRACE_NS),
        init: Some(true),
        capability_drop: Some(DROPPED_CAPABILITIES.map(str::to_owned).to_vec()),
        ..Default::default()
    };
    let resources = TaskSpecResources {
        limits: Some(Limit {
            nano_cpus: spec.cpus.map(|c| (c * 1e9).round() as i64),
            memory_bytes: spec.memory.map(|m| i64::try_from(m.0).unwrap_or(i64::MAX)),
            pids: spec.pids,
        }),
        reservations: (gpus > 0).then(|| ResourceObject {
            generic_resources: Some(vec![GenericResourcesInner {
                discrete_resource_spec: Some(GenericResourcesInnerDiscreteResourceSpec {
                    kind: Some(on.gpu_resource.to_owned()),
                    value: Some(gpus),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(ServiceSpec {
        name: Some(spec.name.clone()),
        labels: Some(labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources: Some(resources),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                delay: Some(RESTART_DELAY_NS),
                ..Default::default()
            }),
            placement: (!on.constraints.is_empty()).then(|| TaskSpecPlacement {
                constraints: Some(on.constraints.to_vec()),
                ..Default::default()
            }),
            networks: Some(vec![NetworkAttachmentConfig {
                target: Some(on.network.to_owned()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        // No virtual IP (this kernel family may have no IPVS) and never a published port.
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ports: None,
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Username;
    use crate::config::{GpuPin, Quota};

    fn spec(extra: &str) -> ContainerSpec {
        let config = crate::config::parse(
            std::path::Path::new("/etc/labgate/labgate.toml"),
            &format!(
                "[defaults]\nimage = \"lab/cuda:12\"\nmemory = \"8G\"\ncpus = 4\nshm = \"1G\"\npids = 512\nuid = 2001\n{extra}"
            ),
        )
        .unwrap();
        let alice = Username::parse("alice").unwrap();
        let quota: &Quota = config.quota_for(&alice);
        let identity = crate::runtime::Identity {
            uid: 2001,
            gid: 2001,
            groups: vec![44],
        };
        ContainerSpec::new(&alice, quota, Some(&identity))
    }

    const ON: Placement<'static> = Placement {
        network: "labgate",
        gpu_resource: "NVIDIA-GPU",
        constraints: &[],
    };

    #[test]
    fn a_service_is_one_isolated_replica_with_the_quota_as_limits_and_gpus_as_generic_resources() {
        let s = service_spec(&spec("gpus = 2\n"), &ON).unwrap();
        assert_eq!(s.name.as_deref(), Some("labgate-alice"));
        let labels = s.labels.clone().unwrap();
        assert_eq!(labels[LABEL_MANAGED], "true");
        assert_eq!(labels[LABEL_USER], "alice");
        assert_eq!(labels[LABEL_IMAGE], "lab/cuda:12");
        assert_eq!(
            s.mode.unwrap().replicated.unwrap().replicas,
            Some(1),
            "one task"
        );
        let endpoint = s.endpoint_spec.unwrap();
        assert_eq!(endpoint.mode, Some(EndpointSpecModeEnum::DNSRR));
        assert!(endpoint.ports.is_none(), "never a published port");
        let task = s.task_template.unwrap();
        assert_eq!(task.networks.unwrap()[0].target.as_deref(), Some("labgate"));
        let limits = task.resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits.nano_cpus, Some(4_000_000_000));
        assert_eq!(limits.memory_bytes, Some(8 << 30));
        assert_eq!(limits.pids, Some(512));
        let gpus = task
            .resources
            .unwrap()
            .reservations
            .unwrap()
            .generic_resources
            .unwrap();
        let discrete = gpus[0].discrete_resource_spec.clone().unwrap();
        assert_eq!(
            (discrete.kind.as_deref(), discrete.value),
            (Some("NVIDIA-GPU"), Some(2))
        );
        let c = task.container_spec.unwrap();
        assert_eq!(
            c.labels.unwrap()[LABEL_USER],
            "alice",
            "the task's container too"
        );
        assert_eq!(c.user.as_deref(), Some("2001:2001"));
        assert_eq!(c.groups, Some(vec!["44".to_owned()]));
        assert_eq!(c.init, Some(true));
        assert_eq!(c.privileges.unwrap().no_new_privileges, Some(true));
        assert_eq!(c.capability_drop.unwrap().len(), DROPPED_CAPABILITIES.len());
        let mounts = c.mounts.unwrap();
        assert_eq!(mounts[0].target.as_deref(), Some("/home/alice"));
        assert_eq!(mounts[0].typ, Some(MountType::BIND));
        let shm = mounts
            .iter()
            .find(|m| m.target.as_deref() == Some("/dev/shm"))
            .unwrap();
        assert_eq!(shm.typ, Some(MountType::TMPFS));
        assert_eq!(shm.tmpfs_options.clone().unwrap().size_bytes, Some(1 << 30));
        assert!(
            mounts
                .iter()
                .all(|m| m.source.as_deref() != Some("/var/run/docker.sock")),
            "never the Docker socket"
        );
        assert_eq!(c.dir.as_deref(), Some("/home/alice"));
    }

    #[test]
    fn no_gpus_reserve_nothing_constraints_pass_through_and_pins_are_refused() {
        let constraints = vec!["node.labels.gpu == a100".to_owned()];
        let on = Placement {
            constraints: &constraints,
            ..ON
        };
        let s = service_spec(&spec(""), &on).unwrap();
        let task = s.task_template.unwrap();
        assert!(task.resources.unwrap().reservations.is_none());
        assert_eq!(task.placement.unwrap().constraints, Some(constraints));
        let mut pinned = spec("");
        pinned.gpu_request = GpuRequest::Pinned(vec![GpuPin::Index(3)]);
        let err = service_spec(&pinned, &ON).unwrap_err();
        assert!(err.to_string().contains("pins GPUs (GPU 3)"), "{err}");
    }
}
