//! Who a user's processes run as in their container, resolved once per login from the quota's
//! `uid` ([`UidRule`]): a fixed number; the host account of the same name (`"host"`: its uid,
//! primary group and supplementary groups from NSS, so a file made in a shared mount belongs
//! to the same person on the host and in the container); or a uid labgate gives the user once
//! from `[server] auto_uids` and records in `[server] state_dir` (`"auto"`), so it never
//! changes and never goes to someone else.
//!
//! Root is only ever what the admin wrote: `"host"` refuses an account whose uid is 0, and
//! `"auto"` gives out uids from a range of at least 1000.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::auth::Username;
pub use crate::auth::identity::{Identity, IdentityError};
use crate::config::{Config, Quota, UidRule};

/// The file under `state_dir` that records the uids given under `uid = "auto"`.
const AUTO_UIDS_FILE: &str = "auto-uids.json";

/// The uids given under `uid = "auto"`, as recorded in the state directory.
#[derive(Debug, Default)]
struct AutoBook {
    /// The record file this book was read from.
    path: PathBuf,
    /// User name → uid.
    uids: BTreeMap<String, u32>,
}

/// Resolves logins' identities; holds the `auto` record (read once, written on each new uid).
#[derive(Debug, Default)]
pub struct Identities {
    /// The record, once read (again when `state_dir` changes).
    book: Mutex<Option<AutoBook>>,
}

impl Identities {
    /// The identity `user` runs as under `quota` (`None`: the image's user), resolved now.
    pub async fn resolve(
        self: &Arc<Self>,
        user: &Username,
        quota: &Quota,
        config: &Config,
    ) -> Result<Option<Identity>, IdentityError> {
        let Some(rule) = quota.uid else {
            return Ok(None);
        };
        let gid = quota.gid;
        let user = user.clone();
        match rule {
            UidRule::Fixed(uid) => Ok(Some(Identity {
                uid,
                gid: gid.unwrap_or(uid),
                groups: Vec::new(),
            })),
            UidRule::Host => spawn_blocking(move || host_account(user.as_str(), gid)).await,
            UidRule::Auto => {
                let path = config.server.state_dir.join(AUTO_UIDS_FILE);
                let range = config.server.auto_uids.clone();
                let reserved = config.fixed_uids();
                let me = self.clone();
                spawn_blocking(move || {
                    let uid = me.assign(&path, user.as_str(), &range, &reserved)?;
                    Ok(Some(Identity {
                        uid,
                        gid: gid.unwrap_or(uid),
                        groups: Vec::new(),
                    }))
                })
                .await
            }
        }
    }

    /// The uid recorded for `user` in the record at `path`, giving them the lowest free one
    /// of `range` (not recorded for another user, not in `reserved`, no host account's) and
    /// recording it first when they have none.
    fn assign(
        &self,
        path: &Path,
        user: &str,
        range: &std::ops::RangeInclusive<u32>,
        reserved: &BTreeSet<u32>,
    ) -> Result<u32, IdentityError> {
        let mut slot = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|b| b.path != path) {
            *slot = Some(AutoBook::read(path)?);
        }
        let book = slot.get_or_insert_with(AutoBook::default);
        if let Some(uid) = book.uids.get(user) {
            return Ok(*uid);
        }
        let given: BTreeSet<u32> = book.uids.values().copied().collect();
        let uid = range
            .clone()
            .find(|uid| {
                !given.contains(uid)
                    && !reserved.contains(uid)
                    && !matches!(
                        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*uid)),
                        Ok(Some(_))
                    )
            })
            .ok_or(IdentityError::Exhausted {
                first: *range.start(),
                last: *range.end(),
            })?;
        book.uids.insert(user.to_owned(), uid);
        if let Err(e) = book.write() {
            book.uids.remove(user);
            return Err(e);
        }
        tracing::info!(target: "audit", user, uid, "uid given (uid = \"auto\")");
        Ok(uid)
    }
}

impl AutoBook {
    /// Reads the record at `path`; a missing file is an empty record, an unreadable or
    /// malformed one an error (never overwritten: the uids in it are people's files).
    fn read(path: &Path) -> Result<AutoBook, IdentityError> {
        let uids = match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| IdentityError::State(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(IdentityError::State(format!("{}: {e}", path.display()))),
        };
        Ok(AutoBook {
            path: path.to_owned(),
            uids,
        })
    }

    /// Writes the record whole (a temporary file, synced, then renamed over the old one).
    fn write(&self) -> Result<(), IdentityError> {
        use std::io::Write;
        let fail =
            |e: std::io::Error| IdentityError::State(format!("{}: {e}", self.path.display()));
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(fail)?;
        let text = serde_json::to_string_pretty(&self.uids)
            .map_err(|e| IdentityError::State(e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp).map_err(fail)?;
        file.write_all(text.as_bytes()).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &self.path).map_err(fail)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// The host account `name`: uid, primary group (or `gid` when the config sets one) and
/// supplementary groups.
fn host_account(name: &str, gid: Option<u32>) -> Result<Option<Identity>, IdentityError> {
    let lookup = |e: nix::Error| IdentityError::Lookup {
        user: name.to_owned(),
        reason: e.to_string(),
    };
    let account = nix::unistd::User::from_name(name)
        .map_err(lookup)?
        .ok_or_else(|| IdentityError::NoHostAccount(name.to_owned()))?;
    let uid = account.uid.as_raw();
    if uid == 0 {
        return Err(IdentityError::HostRoot(name.to_owned()));
    }
    let primary = gid.unwrap_or(account.gid.as_raw());
    let cname = std::ffi::CString::new(name).map_err(|e| IdentityError::Lookup {
        user: name.to_owned(),
        reason: e.to_string(),
    })?;
    let mut groups: Vec<u32> = nix::unistd::getgrouplist(&cname, account.gid)
        .map_err(lookup)?
        .into_iter()
        .map(|g| g.as_raw())
        .filter(|g| *g != primary)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    Ok(Some(Identity {
        uid,
        gid: primary,
        groups,
    }))
}

async fn spawn_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IdentityError> + Send + 'static,
) -> Result<T, IdentityError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| IdentityError::State(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_uids_are_stable_distinct_recorded_and_skip_what_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(AUTO_UIDS_FILE);
        let range = 700_000..=700_003;
        let reserved = BTreeSet::from([700_001]);
        let ids = Identities::default();
        let alice = ids.assign(&path, "alice", &range, &reserved).unwrap();
        let bob = ids.assign(&path, "bob", &range, &reserved).unwrap();
        assert_eq!(
            (alice, bob),
            (700_000, 700_002),
            "a reserved uid is skipped"
        );
        assert_eq!(
            ids.assign(&path, "alice", &range, &reserved).unwrap(),
            alice
        );

        // Another gateway (a restart) reads the same record; a narrower range later does not
        // take a uid back.
        let restarted = Identities::default();
        assert_eq!(
            restarted
                .assign(&path, "bob", &(800_000..=800_001), &reserved)
                .unwrap(),
            bob
        );
        assert_eq!(
            restarted.assign(&path, "carol", &range, &reserved).unwrap(),
            700_003
        );
        assert_eq!(
            restarted.assign(&path, "dave", &range, &reserved),
            Err(IdentityError::Exhausted {
                first: 700_000,
                last: 700_003
            })
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let recorded: BTreeMap<String, u32> = serde_json::from_str(&text).unwrap();
        assert_eq!(
            recorded,
            BTreeMap::from([
                ("alice".to_owned(), 700_000),
                ("bob".to_owned(), 700_002),
                ("carol".to_owned(), 700_003),
            ])
        );
    }

    #[test]
    fn a_malformed_record_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUTO_UIDS_FILE);
        std::fs::write(&path, "{not json").unwrap();
        let e = Identities::default()
            .assign(&path, "alice", &(700_000..=700_010), &BTreeSet::new())
            .unwrap_err();
        assert!(matches!(e, IdentityError::State(_)), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{not json");
    }

    #[test]
    fn host_accounts_come_from_nss_and_root_is_refused() {
        let root = host_account("root", None).unwrap_err();
        assert_eq!(root, IdentityError::HostRoot("root".into()));
        assert_eq!(
            host_account("no-such-account-here", None).unwrap_err(),
            IdentityError::NoHostAccount("no-such-account-here".into())
        );
        // Every Debian system has `daemon` (uid 1, group 1).
        let daemon = host_account("daemon", None).unwrap().unwrap();
        assert_eq!((daemon.uid, daemon.gid), (1, 1));
        assert!(
            !daemon.groups.contains(&1),
            "the primary group is not repeated"
        );
        let regrouped = host_account("daemon", Some(4242)).unwrap().unwrap();
        assert_eq!(regrouped.gid, 4242);
    }
}
