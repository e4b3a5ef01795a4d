//! The host paths a container binds (its home, the admin's mounts), checked on the host before
//! every create and start, and checked again once the container runs.
//!
//! A user may be able to change these paths: a home under a writable shared mount can be
//! renamed and replaced by a symlink to `/`, and the engine resolves a bind's source again at
//! each start, following symlinks. So:
//! - each source is opened with `openat2(RESOLVE_NO_SYMLINKS)`: no component of it may be a
//!   symlink (a home is made a component at a time the same way when missing, mode 0700);
//! - a home must be a directory owned by the uid the container runs as (root when none);
//! - once the container has started, what it has at each target must be the very file the
//!   check opened (same device and inode, looked up inside the container's root): a swap
//!   between the check and the engine's mount is caught, and the container is stopped before
//!   anything of the user's runs in it.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Uid, fstat, openat2};
use rustix::io::Errno;

/// Why a bind source was refused. The message is for the admin's log (it names the path);
/// [`Refused::user_line`] is what the user is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A component of the path is a symlink.
    #[error("{0}: a symlink on the path (bind sources are never followed through symlinks)")]
    Symlink(PathBuf),
    /// The home is not a directory.
    #[error("{0}: not a directory")]
    NotADirectory(PathBuf),
    /// The home belongs to someone else than the container's user.
    #[error("{path}: owned by uid {have}, expected uid {want}")]
    Owner {
        /// The home.
        path: PathBuf,
        /// Its owner.
        have: u32,
        /// The uid the container runs as.
        want: u32,
    },
    /// The path does not exist (a mount source; a home is made).
    #[error("{0}: does not exist")]
    Missing(PathBuf),
    /// The path is not absolute.
    #[error("{0}: not an absolute path")]
    Relative(PathBuf),
    /// What the running container has at `target` is not what was checked.
    #[error(
        "{target}: the container got another directory than {checked} as checked (it changed during the start)"
    )]
    Swapped {
        /// The checked source.
        checked: PathBuf,
        /// Where it is bound in the container.
        target: String,
    },
    /// Another failure.
    #[error("{0}: {1}")]
    Io(PathBuf, String),
}

impl Refused {
    /// The one line a user is told (no host paths).
    pub fn user_line(&self) -> &'static str {
        match self {
            Refused::Symlink(_) | Refused::Swapped { .. } => {
                "your home directory or a mount was replaced by a symlink or moved; labgate does not follow it (ask your admin)"
            }
            Refused::NotADirectory(_) => "your home directory is not a directory (ask your admin)",
            Refused::Owner { .. } => "your home directory belongs to another user (ask your admin)",
            Refused::Missing(_) => "a directory your container mounts is missing (ask your admin)",
            Refused::Relative(_) | Refused::Io(..) => {
                "your home directory or a mount cannot be checked (ask your admin)"
            }
        }
    }
}

/// A bind source as checked: the file it was, to compare with what the container got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The host path.
    pub source: PathBuf,
    /// Where it is bound in the container.
    pub target: String,
    /// Device and inode of what was checked.
    file: (u64, u64),
}

/// `openat2` of `name` under `dir` without following any symlink.
fn open_under(dir: &OwnedFd, name: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    openat2(
        dir,
        name,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

/// The root directory, to resolve absolute paths under.
fn root() -> Result<OwnedFd, Errno> {
    rustix::fs::open(
        "/",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn refusal(path: &Path, e: Errno) -> Refused {
    match e {
        Errno::LOOP => Refused::Symlink(path.to_owned()),
        Errno::NOENT => Refused::Missing(path.to_owned()),
        Errno::NOTDIR => Refused::NotADirectory(path.to_owned()),
        other => Refused::Io(path.to_owned(), other.to_string()),
    }
}

fn identity(fd: &OwnedFd) -> Result<(rustix::fs::Stat, (u64, u64)), Errno> {
    let st = fstat(fd)?;
    let (dev, ino) = (st.st_dev, st.st_ino);
    Ok((st, (dev, ino)))
}

/// Checks the admin's mount source `source` (bound at `target`): it exists and no component
/// of it is a symlink.
pub fn check_mount(source: &Path, target: &str) -> Result<Checked, Refused> {
    if !source.is_absolute() {
        return Err(Refused::Relative(source.to_owned()));
    }
    let fd = root()
        .and_then(|r| open_under(&r, source, OFlags::PATH))
        .map_err(|e| refusal(source, e))?;
    let (_, file) = identity(&fd).map_err(|e| refusal(source, e))?;
    Ok(Checked {
        source: source.to_owned(),
        target: target.to_owned(),
        file,
    })
}

/// Makes sure the home `source` (bound at `target`) is a directory owned by `owner` (uid,
/// gid; root when `None`) reached without any symlink, making what is missing of it one
/// component at a time (created homes: mode 0700, owned by `owner`; directories above it
/// as the default mode, root's). Returns it as checked.
pub fn ensure_home(
    source: &Path,
    target: &str,
    owner: Option<(u32, u32)>,
) -> Result<Checked, Refused> {
    if !source.is_absolute() {
        return Err(Refused::Relative(source.to_owned()));
    }
    let fail = |e: Errno| refusal(source, e);
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY;
    let mut dir = root().map_err(fail)?;
    let parts: Vec<&std::ffi::OsStr> = source
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect();
    if source
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(Refused::Io(source.to_owned(), "\"..\" in the path".into()));
    }
    let mut created = false;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let name = Path::new(part);
        dir = match open_under(&dir, name, dir_flags) {
            Ok(next) => next,
            Err(Errno::NOENT) => {
                let mode = if last {
                    Mode::from_raw_mode(0o700)
                } else {
                    Mode::from_raw_mode(0o755)
                };
                match rustix::fs::mkdirat(&dir, name, mode) {
                    Ok(()) => created |= last,
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(fail(e)),
                }
                open_under(&dir, name, dir_flags).map_err(fail)?
            }
            Err(e) => return Err(fail(e)),
        };
    }
    let (uid, gid) = owner.unwrap_or((0, 0));
    if created {
        rustix::fs::chownat(
            &dir,
            "",
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::EMPTY_PATH,
        )
        .map_err(fail)?;
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700)).map_err(fail)?;
        tracing::info!(home = %source.display(), "home directory created");
    }
    let (st, file) = identity(&dir).map_err(fail)?;
    if !FileType::from_raw_mode(st.st_mode).is_dir() {
        return Err(Refused::NotADirectory(source.to_owned()));
    }
    if st.st_uid != uid {
        return Err(Refused::Owner {
            path: source.to_owned(),
            have: st.st_uid,
            want: uid,
        });
    }
    Ok(Checked {
        source: source.to_owned(),
        target: target.to_owned(),
        file,
    })
}

/// Whether what the container whose init is host process `pid` has at `checked.target` is
/// the file that was checked; `None` when that cannot be looked at from here.
pub fn bound_in(pid: i32, checked: &Checked) -> Option<bool> {
    bound_under(format!("/proc/{pid}/root"), checked)
}

/// [`bound_in`] for the directory `root` taken as `/`.
fn bound_under(root: impl rustix::path::Arg, checked: &Checked) -> Option<bool> {
    let root = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let fd = openat2(
        &root,
        checked.target.trim_start_matches('/'),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    );
    match fd {
        Ok(fd) => Some(identity(&fd).ok()?.1 == checked.file),
        Err(_) => Some(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_missing_home_is_made_0700_for_its_owner_and_found_again() {
        let top = tempfile::tempdir().unwrap();
        let home = top.path().join("homes/alice");
        let made = ensure_home(&home, "/home/alice", Some((4242, 4343))).unwrap();
        let meta = std::fs::metadata(&home).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        // The directory above is the admin's, not the user's.
        assert_eq!(
            std::fs::metadata(top.path().join("homes")).unwrap().uid(),
            0
        );
        let again = ensure_home(&home, "/home/alice", Some((4242, 4343))).unwrap();
        assert_eq!(made, again);
        // A home made for root (no uid) is 0700 too.
        let root_home = top.path().join("homes/bob");
        ensure_home(&root_home, "/home/bob", None).unwrap();
        let meta = std::fs::metadata(&root_home).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn symlinks_anywhere_on_the_path_are_refused() {
        let top = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(top.path().join("real/alice")).unwrap();
        // The home itself replaced by a symlink to `/`.
        std::os::unix::fs::symlink("/", top.path().join("real/evil")).unwrap();
        let e = ensure_home(&top.path().join("real/evil"), "/home/evil", None).unwrap_err();
        assert!(matches!(e, Refused::Symlink(_)), "{e}");
        // A directory above it.
        std::os::unix::fs::symlink(top.path().join("real"), top.path().join("link")).unwrap();
        let e = ensure_home(&top.path().join("link/alice"), "/home/alice", None).unwrap_err();
        assert!(matches!(e, Refused::Symlink(_)), "{e}");
        // Nothing is made through a symlink either.
        let e = ensure_home(&top.path().join("link/new"), "/home/new", None).unwrap_err();
        assert!(matches!(e, Refused::Symlink(_)), "{e}");
        assert!(!top.path().join("real/new").exists());
        // Mount sources the same.
        assert!(matches!(
            check_mount(&top.path().join("link/alice"), "/x").unwrap_err(),
            Refused::Symlink(_)
        ));
        assert!(check_mount(&top.path().join("real/alice"), "/x").is_ok());
        assert!(matches!(
            check_mount(&top.path().join("real/none"), "/x").unwrap_err(),
            Refused::Missing(_)
        ));
    }

    #[test]
    fn a_home_of_another_owner_or_not_a_directory_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let home = top.path().join("alice");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(5555), Some(5555)).unwrap();
        let e = ensure_home(&home, "/home/alice", Some((4242, 4242))).unwrap_err();
        assert_eq!(
            e,
            Refused::Owner {
                path: home.clone(),
                have: 5555,
                want: 4242
            }
        );
        assert!(
            e.to_string()
                .contains("owned by uid 5555, expected uid 4242")
        );
        let file = top.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let e = ensure_home(&file, "/home/x", None).unwrap_err();
        assert!(matches!(e, Refused::NotADirectory(_)), "{e}");
    }

    #[test]
    fn what_is_bound_must_be_what_was_checked() {
        // A fake container root with the home "bound" at /home/alice.
        let top = tempfile::tempdir().unwrap();
        let source = top.path().join("src");
        let fake_root = top.path().join("root");
        std::fs::create_dir_all(fake_root.join("home")).unwrap();
        std::fs::create_dir(&source).unwrap();
        let checked = ensure_home(&source, "/home/alice", None).unwrap();
        std::os::unix::fs::symlink(&source, fake_root.join("home/alice")).unwrap();
        // The symlink resolves inside the fake root, never on the host: not the same.
        assert_eq!(bound_under(&fake_root, &checked), Some(false));
        std::fs::remove_file(fake_root.join("home/alice")).unwrap();
        std::fs::rename(&source, fake_root.join("home/alice")).unwrap();
        assert_eq!(bound_under(&fake_root, &checked), Some(true));
        // Another directory in its place is caught.
        std::fs::rename(fake_root.join("home/alice"), top.path().join("moved")).unwrap();
        std::fs::create_dir(fake_root.join("home/alice")).unwrap();
        assert_eq!(bound_under(&fake_root, &checked), Some(false));
    }
}
