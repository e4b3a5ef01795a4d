//! What making sure a container runs takes, decided without I/O: from what inspecting its
//! name found, the wanted spec, and what the steps the plan asked for learned (the old
//! profile name looked for, the image compared). The lifecycle carries the plan out.

use std::collections::HashMap;

use bollard::models::{ContainerInspectResponse, HostConfig};

use super::super::inspect::{image_of, labelled_ours};
use super::super::spec;
use crate::runtime::ContainerSpec;
use crate::runtime::docker::labels::LABEL_SETTINGS;

/// The container found under the wanted name, as far as the plan needs it.
#[derive(Debug, Clone, Default)]
pub(super) struct Found {
    /// Its id (its name when the engine gave none).
    pub(super) id: String,
    /// Its labels: whose it is, the settings it was made with.
    labels: HashMap<String, String>,
    /// Whether it runs.
    state: State,
    /// The image reference it was made from: its label, else the engine's record.
    pub(super) image: Option<String>,
    /// The id of the image it was made from.
    pub(super) image_id: Option<String>,
    /// Its limits as the engine has them.
    host_config: Option<HostConfig>,
}

/// Whether a found container runs, in the terms the plan decides on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Paused (the engine also calls it running).
    Paused,
    /// Running.
    Running,
    /// Anything else: created, exited, dead.
    #[default]
    Stopped,
}

impl Found {
    /// What `info` shows of the container named `name`.
    pub(super) fn of(info: &ContainerInspectResponse, name: &str) -> Self {
        let state = info.state.clone().unwrap_or_default();
        Self {
            id: info.id.clone().unwrap_or_else(|| name.to_owned()),
            labels: info
                .config
                .as_ref()
                .and_then(|c| c.labels.clone())
                .unwrap_or_default(),
            state: if state.paused == Some(true) {
                State::Paused
            } else if state.running == Some(true) {
                State::Running
            } else {
                State::Stopped
            },
            image: image_of(info),
            image_id: info.image.clone(),
            host_config: info.host_config.clone(),
        }
    }
}

/// What the steps the plan asked for learned ([`Plan::RenameLegacy`], [`Plan::CompareImage`]).
#[derive(Debug, Clone, Default)]
pub(super) struct Learned {
    /// Whether the profile container's old name was looked for (and renamed when found).
    pub(super) legacy_looked: bool,
    /// How the stopped container's image compares with the configured one.
    pub(super) image: ImageCheck,
}

/// A stopped container's image against the configured one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) enum ImageCheck {
    /// Not compared yet.
    #[default]
    NotCompared,
    /// The configured image is the container's.
    Same,
    /// The configured image is another one than `from`, the container's.
    Changed {
        /// The image reference the container was made from.
        from: String,
    },
}

/// Why a container under the wanted name is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Its labels do not say it is this user's (and profile's) container.
    NameTaken,
}

/// The next step towards a running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Plan {
    /// Nothing under the name, and the spec is a profile's: rename its container from the
    /// old name `from` if it is there (made before profile containers were named with `.`),
    /// then look again.
    RenameLegacy {
        /// `labgate-USER-PROFILE`.
        from: String,
        /// The profile, as its label says it.
        profile: String,
    },
    /// Nothing under the name: get the image as its pull policy says, create, start.
    Create,
    /// A container under the name that is not ours: never touched.
    Refuse(Refusal),
    /// Ours and paused: unpause it.
    Unpause,
    /// Ours and running: use it as it is.
    UseRunning {
        /// The image it runs when the configured one is another (used at its next start).
        pending_image: Option<String>,
    },
    /// Ours and stopped: compare its image with the configured one (which may pull) first.
    CompareImage,
    /// Ours, stopped, its image and settings as configured: start it.
    Start {
        /// Whether a reload changed its memory, CPU or process limits while it was stopped.
        update_limits: bool,
    },
    /// Ours, stopped, its image or recreate-only settings changed: remove it, make it again.
    Recreate {
        /// The image it was made from, when the configured one is another.
        old_image: Option<String>,
        /// The recreate-only settings that changed.
        settings: Vec<&'static str>,
    },
}

/// The next step for `spec`'s container, `found` under its name, after the steps that
/// `learned` records. Asks for each step that learns something at most once.
pub(super) fn plan(found: Option<&Found>, spec: &ContainerSpec, learned: &Learned) -> Plan {
    let Some(found) = found else {
        return match &spec.profile {
            Some(profile) if !learned.legacy_looked => Plan::RenameLegacy {
                from: crate::runtime::legacy_profile_name(&spec.user, profile),
                profile: profile.as_str().to_owned(),
            },
            _ => Plan::Create,
        };
    };
    let profile = spec.profile.as_ref().map(|p| p.as_str());
    if !labelled_ours(Some(&found.labels), spec.user.as_str(), profile) {
        return Plan::Refuse(Refusal::NameTaken);
    }
    match found.state {
        State::Paused => Plan::Unpause,
        State::Running => Plan::UseRunning {
            pending_image: found.image.clone().filter(|running| *running != spec.image),
        },
        State::Stopped => {
            let old_image = match &learned.image {
                ImageCheck::NotCompared => return Plan::CompareImage,
                ImageCheck::Same => None,
                ImageCheck::Changed { from } => Some(from.clone()),
            };
            let settings = found
                .labels
                .get(LABEL_SETTINGS)
                .map(|l| spec::changed_settings(l, spec))
                .unwrap_or_default();
            if old_image.is_some() || !settings.is_empty() {
                Plan::Recreate {
                    old_image,
                    settings,
                }
            } else {
                Plan::Start {
                    update_limits: spec::limits_differ(found.host_config.as_ref(), spec),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ProfileName, Username};
    use crate::runtime::docker::labels::{LABEL_IMAGE, LABEL_MANAGED, LABEL_PROFILE, LABEL_USER};
    use bollard::models::{ContainerConfig, ContainerState};

    fn spec() -> ContainerSpec {
        let quota = crate::config::parse(
            std::path::Path::new("/etc/labgate/labgate.toml"),
            "[defaults]\nimage = \"lab/img:2\"\nmemory = \"1G\"\ncpus = 2\npids = 512\n",
        )
        .unwrap()
        .defaults;
        ContainerSpec::new(&Username::parse("alice").unwrap(), &quota, None)
    }

    fn gpu_spec() -> ContainerSpec {
        let mut spec = spec();
        spec.profile = Some(ProfileName::parse("gpu").unwrap());
        spec.name = "labgate-alice.gpu".into();
        spec
    }

    /// The limits `spec` asks for, as the engine would report them.
    fn limits_of(spec: &ContainerSpec) -> HostConfig {
        let want = spec::limits_update(spec);
        HostConfig {
            memory: want.memory,
            nano_cpus: want.nano_cpus,
            pids_limit: want.pids_limit,
            ..Default::default()
        }
    }

    /// Alice's container as `spec` would have made it, in `state`, from `image`.
    fn found(spec: &ContainerSpec, state: State, image: &str) -> Found {
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_USER.to_owned(), spec.user.as_str().to_owned()),
            (LABEL_SETTINGS.to_owned(), spec::settings_label(spec)),
        ]);
        if let Some(p) = &spec.profile {
            labels.insert(LABEL_PROFILE.to_owned(), p.as_str().to_owned());
        }
        Found {
            id: "c0ffee".into(),
            labels,
            state,
            image: Some(image.into()),
            image_id: Some("sha256:1".into()),
            host_config: Some(limits_of(spec)),
        }
    }

    fn compared(image: ImageCheck) -> Learned {
        Learned {
            legacy_looked: true,
            image,
        }
    }

    #[test]
    fn nothing_found_is_created() {
        assert_eq!(plan(None, &spec(), &Learned::default()), Plan::Create);
    }

    #[test]
    fn a_profile_container_is_looked_for_under_its_old_name_once() {
        let spec = gpu_spec();
        assert_eq!(
            plan(None, &spec, &Learned::default()),
            Plan::RenameLegacy {
                from: "labgate-alice-gpu".into(),
                profile: "gpu".into()
            }
        );
        let looked = Learned {
            legacy_looked: true,
            ..Default::default()
        };
        assert_eq!(plan(None, &spec, &looked), Plan::Create);
    }

    #[test]
    fn a_container_without_our_labels_is_refused() {
        let spec = spec();
        let mut other = found(&spec, State::Running, "lab/img:2");
        other.labels.clear();
        assert_eq!(
            plan(Some(&other), &spec, &Learned::default()),
            Plan::Refuse(Refusal::NameTaken)
        );
        let mut bobs = found(&spec, State::Stopped, "lab/img:2");
        bobs.labels.insert(LABEL_USER.into(), "bob".into());
        assert_eq!(
            plan(Some(&bobs), &spec, &compared(ImageCheck::Same)),
            Plan::Refuse(Refusal::NameTaken)
        );
        let mut unmanaged = found(&spec, State::Stopped, "lab/img:2");
        unmanaged
            .labels
            .insert(LABEL_MANAGED.into(), "false".into());
        assert_eq!(
            plan(Some(&unmanaged), &spec, &Learned::default()),
            Plan::Refuse(Refusal::NameTaken)
        );
    }

    #[test]
    fn another_profile_or_none_is_not_ours() {
        let gpu = gpu_spec();
        let plain = found(&spec(), State::Running, "lab/img:2");
        assert_eq!(
            plan(Some(&plain), &gpu, &Learned::default()),
            Plan::Refuse(Refusal::NameTaken)
        );
        let profiled = found(&gpu, State::Running, "lab/img:2");
        assert_eq!(
            plan(Some(&profiled), &spec(), &Learned::default()),
            Plan::Refuse(Refusal::NameTaken)
        );
        assert_eq!(
            plan(Some(&profiled), &gpu, &Learned::default()),
            Plan::UseRunning {
                pending_image: None
            }
        );
    }

    #[test]
    fn a_paused_container_is_unpaused_whatever_changed() {
        let spec = spec();
        let mut paused = found(&spec, State::Paused, "lab/img:1");
        paused.labels.insert(LABEL_SETTINGS.into(), "{}".into());
        assert_eq!(
            plan(Some(&paused), &spec, &Learned::default()),
            Plan::Unpause
        );
    }

    #[test]
    fn a_running_container_is_used_and_another_image_is_pending() {
        let spec = spec();
        let same = found(&spec, State::Running, "lab/img:2");
        assert_eq!(
            plan(Some(&same), &spec, &Learned::default()),
            Plan::UseRunning {
                pending_image: None
            }
        );
        let old = found(&spec, State::Running, "lab/img:1");
        assert_eq!(
            plan(Some(&old), &spec, &Learned::default()),
            Plan::UseRunning {
                pending_image: Some("lab/img:1".into())
            }
        );
        let mut unknown = found(&spec, State::Running, "lab/img:1");
        unknown.image = None;
        assert_eq!(
            plan(Some(&unknown), &spec, &Learned::default()),
            Plan::UseRunning {
                pending_image: None
            }
        );
    }

    #[test]
    fn a_stopped_container_has_its_image_compared_first() {
        let spec = spec();
        let stopped = found(&spec, State::Stopped, "lab/img:2");
        assert_eq!(
            plan(Some(&stopped), &spec, &Learned::default()),
            Plan::CompareImage
        );
    }

    #[test]
    fn a_stopped_container_as_configured_is_started() {
        let spec = spec();
        let stopped = found(&spec, State::Stopped, "lab/img:2");
        assert_eq!(
            plan(Some(&stopped), &spec, &compared(ImageCheck::Same)),
            Plan::Start {
                update_limits: false
            }
        );
    }

    #[test]
    fn a_stopped_container_with_other_limits_gets_them_before_it_starts() {
        let spec = spec();
        let mut stopped = found(&spec, State::Stopped, "lab/img:2");
        stopped.host_config = Some(HostConfig {
            memory: Some(256 << 20),
            ..limits_of(&spec)
        });
        assert_eq!(
            plan(Some(&stopped), &spec, &compared(ImageCheck::Same)),
            Plan::Start {
                update_limits: true
            }
        );
    }

    #[test]
    fn a_stopped_container_of_another_image_is_recreated() {
        let spec = spec();
        let stopped = found(&spec, State::Stopped, "lab/img:1");
        let changed = ImageCheck::Changed {
            from: "lab/img:1".into(),
        };
        assert_eq!(
            plan(Some(&stopped), &spec, &compared(changed)),
            Plan::Recreate {
                old_image: Some("lab/img:1".into()),
                settings: vec![]
            }
        );
    }

    #[test]
    fn a_stopped_container_with_changed_settings_is_recreated_naming_them() {
        let spec = spec();
        let mut before = spec.clone();
        before.env.insert("OMP_NUM_THREADS".into(), "2".into());
        before.shm = Some(crate::config::ByteSize(64 << 20));
        let mut stopped = found(&spec, State::Stopped, "lab/img:2");
        stopped
            .labels
            .insert(LABEL_SETTINGS.into(), spec::settings_label(&before));
        assert_eq!(
            plan(Some(&stopped), &spec, &compared(ImageCheck::Same)),
            Plan::Recreate {
                old_image: None,
                settings: vec!["shm", "env"]
            }
        );
        let changed = ImageCheck::Changed {
            from: "lab/img:1".into(),
        };
        assert_eq!(
            plan(Some(&stopped), &spec, &compared(changed)),
            Plan::Recreate {
                old_image: Some("lab/img:1".into()),
                settings: vec!["shm", "env"]
            }
        );
    }

    #[test]
    fn settings_not_recorded_or_unreadable_recreate_nothing() {
        let spec = spec();
        let mut stopped = found(&spec, State::Stopped, "lab/img:2");
        stopped.labels.remove(LABEL_SETTINGS);
        assert_eq!(
            plan(Some(&stopped), &spec, &compared(ImageCheck::Same)),
            Plan::Start {
                update_limits: false
            }
        );
        stopped
            .labels
            .insert(LABEL_SETTINGS.into(), "not json".into());
        assert_eq!(
            plan(Some(&stopped), &spec, &compared(ImageCheck::Same)),
            Plan::Start {
                update_limits: false
            }
        );
    }

    #[test]
    fn the_engine_view_maps_to_what_the_plan_needs() {
        let info = |paused, running, status| ContainerInspectResponse {
            id: None,
            image: Some("sha256:9".into()),
            state: Some(ContainerState {
                paused: Some(paused),
                running: Some(running),
                status,
                ..Default::default()
            }),
            config: Some(ContainerConfig {
                image: Some("lab/img:engine".into()),
                labels: Some(HashMap::from([(
                    LABEL_IMAGE.to_owned(),
                    "lab/img:label".to_owned(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let paused = Found::of(&info(true, true, None), "labgate-alice");
        assert_eq!(paused.state, State::Paused);
        assert_eq!(paused.id, "labgate-alice");
        assert_eq!(paused.image.as_deref(), Some("lab/img:label"));
        assert_eq!(paused.image_id.as_deref(), Some("sha256:9"));
        assert_eq!(
            Found::of(&info(false, true, None), "x").state,
            State::Running
        );
        let dead = Some(bollard::models::ContainerStateStatusEnum::DEAD);
        assert_eq!(
            Found::of(&info(false, false, dead), "x").state,
            State::Stopped
        );
        let mut unlabelled = info(false, false, None);
        if let Some(c) = unlabelled.config.as_mut() {
            c.labels = None;
        }
        let found = Found::of(&unlabelled, "x");
        assert_eq!(found.image.as_deref(), Some("lab/img:engine"));
        assert_eq!(
            plan(Some(&found), &spec(), &Learned::default()),
            Plan::Refuse(Refusal::NameTaken)
        );
    }
}
