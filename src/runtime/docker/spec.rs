//! Pure translation of a [`ContainerSpec`] into the Engine API's container-create body.
//!
//! Every security rule of a user container is visible here in one place: not privileged,
//! `no-new-privileges`, an init process, no published ports, no Docker socket, binds only of
//! the home and the admin's mounts, GPUs only by the UUIDs the allocator chose.

use std::collections::HashMap;

use bollard::models::RestartPolicyNameEnum;
use bollard::models::{
    ContainerCreateBody, DeviceRequest, HostConfig, Mount, MountType, RestartPolicy,
};

use crate::gpu::GpuUuid;
use crate::runtime::ContainerSpec;
use crate::runtime::docker::labels::{
    LABEL_GPUS, LABEL_IMAGE, LABEL_MANAGED, LABEL_PROFILE, LABEL_SETTINGS, LABEL_USER,
};

/// The container's main process: waits forever, and exits at once on SIGTERM (so a stop takes
/// milliseconds, not Docker's 10 s timeout). Plain POSIX sh, so any image with a shell works.
pub const KEEPALIVE: &str = "trap 'exit 0' TERM INT HUP; while :; do sleep 3600 & wait $!; done";

/// Capabilities of the engine's default set that user containers do not get. Kept: what
/// `apt`, `pip` and `su` as root need (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETUID, SETGID),
/// `ping` (NET_RAW), KILL and NET_BIND_SERVICE. Dropped: device nodes (MKNOD: a node made in
/// a bind-mounted directory is a way to the host's devices for whoever may open it there),
/// file capabilities and capability bounding (SETFCAP, SETPCAP), chroot (SYS_CHROOT) and the
/// kernel audit log (AUDIT_WRITE). Debuggers (gdb, py-spy) attach to the user's own processes
/// without any capability.
pub const DROPPED_CAPABILITIES: [&str; 5] =
    ["MKNOD", "SETFCAP", "SETPCAP", "SYS_CHROOT", "AUDIT_WRITE"];

/// Longest hostname the kernel accepts (a DNS label is 63).
const HOSTNAME_MAX: usize = 63;

/// The limits of `spec` that `docker update` can change on a running container. Swap is set
/// to twice the memory, as the engine does on create, so raising memory is never refused for
/// exceeding the old swap limit. A limit absent from the config is left as it is (the engine
/// cannot lift one live); it goes away when the container is recreated.
pub fn limits_update(spec: &ContainerSpec) -> bollard::models::ContainerUpdateBody {
    let memory = spec.memory.map(|m| i64::try_from(m.0).unwrap_or(i64::MAX));
    bollard::models::ContainerUpdateBody {
        memory,
        memory_swap: memory.map(|m| m.saturating_mul(2)),
        nano_cpus: spec.cpus.map(|c| (c * 1e9).round() as i64),
        pids_limit: spec.pids,
        ..Default::default()
    }
}

/// Whether a container created with `host` has other memory/CPU/process limits than `spec`
/// asks for (a reload changed them while it was stopped).
pub fn limits_differ(host: Option<&HostConfig>, spec: &ContainerSpec) -> bool {
    let want = limits_update(spec);
    let have = (
        host.and_then(|h| h.memory).filter(|m| *m > 0),
        host.and_then(|h| h.nano_cpus).filter(|c| *c > 0),
        host.and_then(|h| h.pids_limit).filter(|p| *p > 0),
    );
    have != (want.memory, want.nano_cpus, want.pids_limit)
}

/// The read-only bind of labgate's static relay helper at [`crate::runtime::RELAY_PATH`].
pub fn relay_mount(helper: &std::path::Path) -> Mount {
    helper_mount(helper, crate::runtime::RELAY_PATH)
}

/// The read-only bind of one of labgate's static helpers (the relay, the fallback SFTP
/// server) at `target` under `/.labgate`.
pub fn helper_mount(helper: &std::path::Path, target: &str) -> Mount {
    Mount {
        typ: Some(MountType::BIND),
        source: Some(helper.to_string_lossy().into_owned()),
        target: Some(target.to_owned()),
        read_only: Some(true),
        ..Default::default()
    }
}

/// The binds of `spec`: its home, writable, then the admin's mounts as configured. Nothing
/// else of the host (never the Docker socket).
pub fn binds(spec: &ContainerSpec) -> Vec<Mount> {
    let mut mounts = vec![Mount {
        typ: Some(MountType::BIND),
        source: Some(spec.home_source.to_string_lossy().into_owned()),
        target: Some(spec.home_target.clone()),
        read_only: Some(false),
        ..Default::default()
    }];
    mounts.extend(spec.mounts.iter().map(|m| Mount {
        typ: Some(MountType::BIND),
        source: Some(m.source.to_string_lossy().into_owned()),
        target: Some(m.target.clone()),
        read_only: Some(!m.writable),
        ..Default::default()
    }));
    mounts
}

/// The create body for `spec`, joining `network` (labgate's isolated bridge).
pub fn create_body(spec: &ContainerSpec, network: &str) -> ContainerCreateBody {
    let mounts = binds(spec);
    let mut labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_USER.to_owned(), spec.user.to_string()),
        (LABEL_IMAGE.to_owned(), spec.image.clone()),
    ]);
    if let Some(profile) = &spec.profile {
        labels.insert(LABEL_PROFILE.to_owned(), profile.to_string());
    }
    labels.insert(LABEL_SETTINGS.to_owned(), settings_label(spec));
    if !spec.gpus.is_empty() {
        labels.insert(LABEL_GPUS.to_owned(), GpuUuid::join(&spec.gpus));
    }
    let env = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        // The kernel takes at most 64 bytes; a long user+profile name is cut.
        hostname: Some(spec.name.chars().take(HOSTNAME_MAX).collect()),
        labels: Some(labels),
        env: Some(env),
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into(), KEEPALIVE.into()]),
        cmd: Some(vec![]),
        working_dir: Some(spec.home_target.clone()),
        user: spec.uid_gid.map(|(u, g)| format!("{u}:{g}")),
        tty: Some(false),
        open_stdin: Some(false),
        exposed_ports: None,
        host_config: Some(HostConfig {
            memory: spec.memory.map(|m| i64::try_from(m.0).unwrap_or(i64::MAX)),
            nano_cpus: spec.cpus.map(|c| (c * 1e9).round() as i64),
            shm_size: spec.shm.map(|s| i64::try_from(s.0).unwrap_or(i64::MAX)),
            pids_limit: spec.pids,
            init: Some(true),
            privileged: Some(false),
            security_opt: Some(vec!["no-new-privileges".into()]),
            cap_drop: Some(DROPPED_CAPABILITIES.map(str::to_owned).to_vec()),
            group_add: (!spec.groups.is_empty())
                .then(|| spec.groups.iter().map(u32::to_string).collect()),
            publish_all_ports: Some(false),
            port_bindings: None,
            network_mode: Some(network.to_owned()),
            mounts: Some(mounts),
            device_requests: gpu_requests(&spec.gpus),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The device request that gives a container exactly `gpus`: the NVIDIA driver, the `gpu`
/// capability, the devices by UUID, and never `count` (Docker refuses `count` with ids, and a
/// count would let the runtime pick GPUs labgate did not allocate). `None` for no GPUs.
pub fn gpu_requests(gpus: &[GpuUuid]) -> Option<Vec<DeviceRequest>> {
    if gpus.is_empty() {
        return None;
    }
    Some(vec![DeviceRequest {
        driver: Some("nvidia".into()),
        count: None,
        device_ids: Some(gpus.iter().map(|g| g.as_str().to_owned()).collect()),
        capabilities: Some(vec![vec!["gpu".into()]]),
        options: None,
    }])
}

/// The settings fixed when a container is created, other than its image and GPUs (which have
/// their own labels): what [`LABEL_SETTINGS`] records.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Settings {
    home: (String, String),
    mounts: Vec<(String, String, bool)>,
    shm: Option<u64>,
    env: std::collections::BTreeMap<String, String>,
    user: Option<(u32, u32)>,
    /// Supplementary groups; absent from labels written before they existed (and when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    groups: Vec<u32>,
}

impl Settings {
    fn of(spec: &ContainerSpec) -> Self {
        Settings {
            home: (
                spec.home_source.to_string_lossy().into_owned(),
                spec.home_target.clone(),
            ),
            mounts: spec
                .mounts
                .iter()
                .map(|m| {
                    (
                        m.source.to_string_lossy().into_owned(),
                        m.target.clone(),
                        m.writable,
                    )
                })
                .collect(),
            shm: spec.shm.map(|s| s.0),
            env: spec.env.clone(),
            user: spec.uid_gid,
            groups: spec.groups.clone(),
        }
    }
}

/// The [`LABEL_SETTINGS`] value for `spec`.
pub fn settings_label(spec: &ContainerSpec) -> String {
    serde_json::to_string(&Settings::of(spec)).unwrap_or_default()
}

/// Which recreate-only settings differ between a container's [`LABEL_SETTINGS`] value and
/// `spec`. A label this version cannot read names nothing (no recreate on a guess).
pub fn changed_settings(label: &str, spec: &ContainerSpec) -> Vec<&'static str> {
    let Ok(old) = serde_json::from_str::<Settings>(label) else {
        return Vec::new();
    };
    let new = Settings::of(spec);
    let mut changed = Vec::new();
    if old.home != new.home || old.mounts != new.mounts {
        changed.push("mounts/home");
    }
    if old.shm != new.shm {
        changed.push("shm");
    }
    if old.env != new.env {
        changed.push("env");
    }
    if old.user != new.user || old.groups != new.groups {
        changed.push("uid");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Username;
    use crate::config::{ByteSize, Mount as CfgMount};
    use std::path::PathBuf;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            user: Username::parse("alice").unwrap(),
            profile: None,
            name: "labgate-alice".into(),
            image: "lab/img:1".into(),
            pull_policy: Default::default(),
            registry: None,
            memory: Some(ByteSize(512 << 20)),
            cpus: Some(1.5),
            shm: Some(ByteSize(64 << 20)),
            pids: Some(256),
            home_source: PathBuf::from("/srv/home/alice"),
            home_target: "/home/alice".into(),
            mounts: vec![
                CfgMount {
                    source: "/data".into(),
                    target: "/data".into(),
                    writable: false,
                },
                CfgMount {
                    source: "/scratch".into(),
                    target: "/scratch".into(),
                    writable: true,
                },
            ],
            shell: None,
            env: [("OMP_NUM_THREADS".to_string(), "2".to_string())].into(),
            uid_gid: Some((1000, 100)),
            groups: vec![],
            gpu_request: Default::default(),
            constraints: vec![],
            gpus: vec![],
            may_take_gpus: true,
        }
    }

    #[test]
    fn quotas_become_engine_limits() {
        let body = create_body(&spec(), "labgate");
        let hc = body.host_config.unwrap();
        assert_eq!(hc.memory, Some(512 << 20));
        assert_eq!(hc.nano_cpus, Some(1_500_000_000));
        assert_eq!(hc.shm_size, Some(64 << 20));
        assert_eq!(hc.pids_limit, Some(256));
        assert_eq!(body.user.as_deref(), Some("1000:100"));
        assert_eq!(body.env.unwrap(), vec!["OMP_NUM_THREADS=2".to_string()]);
    }

    #[test]
    fn containers_are_confined() {
        let body = create_body(&spec(), "labgate");
        let hc = body.host_config.unwrap();
        assert_eq!(hc.privileged, Some(false));
        assert_eq!(hc.init, Some(true));
        assert_eq!(
            hc.security_opt.unwrap(),
            vec!["no-new-privileges".to_string()]
        );
        assert!(hc.port_bindings.is_none() && body.exposed_ports.is_none());
        assert_eq!(hc.publish_all_ports, Some(false));
        let dropped = hc.cap_drop.unwrap();
        assert!(dropped.iter().any(|c| c == "MKNOD"), "{dropped:?}");
        assert!(hc.cap_add.is_none(), "no capability is ever added");
        assert!(hc.binds.is_none());
        assert_eq!(hc.network_mode.as_deref(), Some("labgate"));
        let mounts = hc.mounts.unwrap();
        assert!(
            mounts
                .iter()
                .all(|m| !m.source.as_deref().unwrap().contains("docker.sock"))
        );
        let by_target = |t: &str| {
            mounts
                .iter()
                .find(|m| m.target.as_deref() == Some(t))
                .unwrap()
        };
        assert_eq!(
            by_target("/home/alice").source.as_deref(),
            Some("/srv/home/alice")
        );
        assert_eq!(by_target("/home/alice").read_only, Some(false));
        assert_eq!(
            by_target("/data").read_only,
            Some(true),
            "mounts are read-only unless marked"
        );
        assert_eq!(by_target("/scratch").read_only, Some(false));
    }

    #[test]
    fn live_limit_updates_carry_the_quota_and_a_matching_swap() {
        let body = limits_update(&spec());
        assert_eq!(body.memory, Some(512 << 20));
        assert_eq!(body.memory_swap, Some(1024 << 20));
        assert_eq!(body.nano_cpus, Some(1_500_000_000));
        assert_eq!(body.pids_limit, Some(256));
        let mut unlimited = spec();
        unlimited.memory = None;
        unlimited.pids = None;
        let body = limits_update(&unlimited);
        assert_eq!(
            (body.memory, body.memory_swap, body.pids_limit),
            (None, None, None)
        );
    }

    #[test]
    fn containers_are_labelled_and_named_for_their_user() {
        let body = create_body(&spec(), "labgate");
        let labels = body.labels.unwrap();
        assert_eq!(labels.get(LABEL_USER).map(String::as_str), Some("alice"));
        assert_eq!(labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));
        assert_eq!(body.working_dir.as_deref(), Some("/home/alice"));
        assert_eq!(body.image.as_deref(), Some("lab/img:1"));
        assert_eq!(
            labels.get(LABEL_IMAGE).map(String::as_str),
            Some("lab/img:1")
        );
        assert!(!labels.contains_key(LABEL_PROFILE));
    }

    #[test]
    fn long_container_names_make_valid_hostnames() {
        let mut spec = spec();
        spec.name = format!("labgate-{}-{}", "a".repeat(32), "p".repeat(32));
        let body = create_body(&spec, "labgate");
        assert_eq!(body.hostname.unwrap().len(), 63);
        assert_eq!(
            create_body(&self::spec(), "labgate").hostname.as_deref(),
            Some("labgate-alice")
        );
    }

    #[test]
    fn profile_containers_say_their_profile() {
        let mut spec = spec();
        spec.profile = Some(crate::auth::ProfileName::parse("gpu").unwrap());
        let labels = create_body(&spec, "labgate").labels.unwrap();
        assert_eq!(labels.get(LABEL_PROFILE).map(String::as_str), Some("gpu"));
        assert_eq!(labels.get(LABEL_USER).map(String::as_str), Some("alice"));
    }

    #[test]
    fn gpus_are_requested_by_uuid_from_the_nvidia_driver_and_labelled() {
        let mut spec = spec();
        spec.gpus = vec![
            GpuUuid::parse("GPU-11111111-2222-3333-4444-555555555555").unwrap(),
            GpuUuid::parse("GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee").unwrap(),
        ];
        let body = create_body(&spec, "labgate");
        let requests = body.host_config.unwrap().device_requests.unwrap();
        assert_eq!(
            requests,
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                count: None,
                device_ids: Some(vec![
                    "GPU-11111111-2222-3333-4444-555555555555".into(),
                    "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee".into(),
                ]),
                capabilities: Some(vec![vec!["gpu".into()]]),
                options: None,
            }]
        );
        assert_eq!(
            body.labels.unwrap().get(LABEL_GPUS).map(String::as_str),
            Some(
                "GPU-11111111-2222-3333-4444-555555555555,GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
            )
        );
        // On the wire: DeviceIDs and never Count (Docker refuses both together).
        let json = serde_json::to_value(&requests[0]).unwrap();
        assert!(json.get("Count").is_none(), "{json}");
        assert_eq!(json["Driver"], "nvidia");
        assert_eq!(json["Capabilities"], serde_json::json!([["gpu"]]));
    }

    #[test]
    fn no_gpus_means_no_device_request_and_no_label() {
        let body = create_body(&spec(), "labgate");
        assert!(body.host_config.unwrap().device_requests.is_none());
        assert!(!body.labels.unwrap().contains_key(LABEL_GPUS));
        assert_eq!(gpu_requests(&[]), None);
    }

    #[test]
    fn the_settings_label_names_what_changed_and_tolerates_old_labels() {
        let s = spec();
        let label = settings_label(&s);
        let body = create_body(&s, "labgate");
        assert_eq!(body.labels.unwrap().get(LABEL_SETTINGS), Some(&label));
        assert!(changed_settings(&label, &s).is_empty());
        let mut other = spec();
        other.mounts.push(crate::config::Mount {
            source: PathBuf::from("/srv/data"),
            target: "/data".into(),
            writable: false,
        });
        other.env.insert("NEW".into(), "1".into());
        other.memory = Some(ByteSize(1 << 30)); // live-updatable: not a reason
        assert_eq!(changed_settings(&label, &other), vec!["mounts/home", "env"]);
        let mut uid = spec();
        uid.uid_gid = Some((4242, 4242));
        assert_eq!(changed_settings(&label, &uid), vec!["uid"]);
        assert!(changed_settings("not json", &other).is_empty());
    }
}
