//! What a reload changes in one quota ([`Quota::changes`]), grouped by what it takes to apply
//! to a running container: live (`docker update`), a recreate, or nothing (read afresh at
//! each login or request).

use super::Quota;

/// How two quotas of the same user differ, by what applying the difference takes.
///
/// Settings in neither group (`shell`, `accept_env`, `forwarding`, `idle_stop`, `gpu_share`,
/// `gpu_reclaim`, `pull_policy`, registry credentials, the profile name) need nothing done:
/// they are read from the config at each login, request or check. So are `constraints`:
/// this host's engine ignores them, and a cluster backend reads them when it places a
/// container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaChanges {
    /// Memory, CPUs or the process limit differ: applied to a running container as it runs
    /// (`docker update`).
    pub live: bool,
    /// What differs that the container gets only when it is made again (next start after a
    /// stop), by group, in this order: [`Self::IMAGE`], [`Self::MOUNTS`], [`Self::GPUS`],
    /// [`Self::PROCESS`].
    pub recreate: Vec<&'static str>,
}

impl QuotaChanges {
    /// The image.
    pub const IMAGE: &'static str = "image";
    /// Bind mounts or the home.
    pub const MOUNTS: &'static str = "mounts/home";
    /// The GPU request.
    pub const GPUS: &'static str = "gpus";
    /// `/dev/shm`, the environment, the uid or gid.
    pub const PROCESS: &'static str = "shm/env/uid";

    /// Whether nothing needs doing for a running container.
    pub fn is_empty(&self) -> bool {
        !self.live && self.recreate.is_empty()
    }
}

impl Quota {
    /// Which settings differ from `old` to `new`, grouped by what applying them takes.
    pub fn changes(old: &Quota, new: &Quota) -> QuotaChanges {
        let live = (old.memory, old.cpus, old.pids) != (new.memory, new.cpus, new.pids);
        let groups = [
            (QuotaChanges::IMAGE, old.image != new.image),
            (
                QuotaChanges::MOUNTS,
                old.mounts != new.mounts || old.home != new.home,
            ),
            (QuotaChanges::GPUS, old.gpus != new.gpus),
            (
                QuotaChanges::PROCESS,
                old.shm != new.shm
                    || old.env != new.env
                    || old.uid != new.uid
                    || old.gid != new.gid,
            ),
        ];
        QuotaChanges {
            live,
            recreate: groups
                .into_iter()
                .filter_map(|(name, changed)| changed.then_some(name))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{ByteSize, GpuRequest, Mount, UidRule, parse};

    /// One edit of a quota, as the cases below list them.
    type Edit = fn(&mut Quota);

    fn base() -> Quota {
        parse(
            Path::new("/etc/labgate/labgate.toml"),
            "[defaults]\nimage = \"lab/base:1\"\nmemory = \"1G\"\ncpus = 1\npids = 100\n",
        )
        .unwrap()
        .defaults
    }

    fn changes(edit: impl FnOnce(&mut Quota)) -> QuotaChanges {
        let old = base();
        let mut new = old.clone();
        edit(&mut new);
        Quota::changes(&old, &new)
    }

    #[test]
    fn same_quota_changes_nothing() {
        assert!(changes(|_| {}).is_empty());
    }

    #[test]
    fn limits_are_live() {
        for edit in [
            (|q: &mut Quota| q.memory = Some(ByteSize(2 << 30))) as Edit,
            |q| q.cpus = Some(2.5),
            |q| q.pids = None,
        ] {
            assert_eq!(
                changes(edit),
                QuotaChanges {
                    live: true,
                    recreate: vec![]
                }
            );
        }
    }

    #[test]
    fn recreate_groups_each_setting() {
        let cases: [(Edit, &str); 9] = [
            (|q| q.image = "lab/base:2".into(), QuotaChanges::IMAGE),
            (|q| q.home = "/srv/home/{user}".into(), QuotaChanges::MOUNTS),
            (
                |q| {
                    q.mounts.push(Mount {
                        source: "/data".into(),
                        target: "/data".into(),
                        writable: false,
                    })
                },
                QuotaChanges::MOUNTS,
            ),
            (|q| q.gpus = GpuRequest::Count(1), QuotaChanges::GPUS),
            (|q| q.shm = Some(ByteSize(1 << 30)), QuotaChanges::PROCESS),
            (
                |q| {
                    q.env.insert("A".into(), "b".into());
                },
                QuotaChanges::PROCESS,
            ),
            (
                |q| q.uid = Some(UidRule::Fixed(1000)),
                QuotaChanges::PROCESS,
            ),
            (|q| q.uid = Some(UidRule::Host), QuotaChanges::PROCESS),
            (|q| q.gid = Some(100), QuotaChanges::PROCESS),
        ];
        for (edit, group) in cases {
            assert_eq!(
                changes(edit),
                QuotaChanges {
                    live: false,
                    recreate: vec![group]
                }
            );
        }
    }

    #[test]
    fn groups_come_in_order_with_live() {
        let all = changes(|q| {
            q.gid = Some(5);
            q.gpus = GpuRequest::Count(2);
            q.image = "other".into();
            q.memory = None;
            q.home = "/h/{user}".into();
        });
        assert!(all.live);
        assert_eq!(
            all.recreate,
            ["image", "mounts/home", "gpus", "shm/env/uid"]
        );
    }

    #[test]
    fn login_time_settings_change_nothing_running() {
        let c = changes(|q| {
            q.shell = Some("/bin/zsh".into());
            q.accept_env.push("FOO".into());
            q.idle_stop = Some(std::time::Duration::from_secs(60));
            q.gpu_reclaim = !q.gpu_reclaim;
            q.forwarding.local = !q.forwarding.local;
        });
        assert!(c.is_empty(), "{c:?}");
    }
}
