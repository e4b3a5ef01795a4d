//! Looking into a container's filesystem from the host, through `/proc/PID/root` of its init
//! process: cheaper than an exec (a few system calls instead of the engine's 40 ms), and
//! used only for questions whose answer may also come from an exec when this cannot be
//! asked (no host PID namespace, no permission).
//!
//! Paths resolve inside the container's root (`openat2` with `RESOLVE_IN_ROOT`): a symlink
//! such as `/bin/bash -> /usr/bin/bash` is followed within the container, never on the host.

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, fstat, open, openat2};
use rustix::io::Errno;

/// Whether `path` (absolute, as the container sees it) is an executable file in the
/// filesystem of the container whose init is host process `pid`; `None` when that cannot be
/// looked at from here.
pub fn executable_in(pid: i32, path: &str) -> Option<bool> {
    executable_under(format!("/proc/{pid}/root"), path)
}

/// [`executable_in`] for the directory `root` taken as `/`.
fn executable_under(root: impl rustix::path::Arg, path: &str) -> Option<bool> {
    let root = open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let found = openat2(
        &root,
        path.trim_start_matches('/'),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    );
    match found {
        Ok(fd) => {
            let st = fstat(&fd).ok()?;
            Some(FileType::from_raw_mode(st.st_mode).is_file() && st.st_mode & 0o111 != 0)
        }
        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => Some(false),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_are_found_and_other_paths_are_not() {
        // This process's own root stands in for a container's.
        let me = std::process::id() as i32;
        assert_eq!(executable_in(me, "/bin/sh"), Some(true));
        assert_eq!(executable_in(me, "/no/such/file"), Some(false));
        assert_eq!(executable_in(me, "/etc/hostname/x"), Some(false));
        assert_eq!(executable_in(me, "/proc"), Some(false), "a directory");
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "x").unwrap();
        assert_eq!(executable_in(me, plain.to_str().unwrap()), Some(false));
    }

    #[test]
    fn symlinks_resolve_inside_the_root_given() {
        // An absolute link resolves against the root given, never the host's: `/bin/sh`
        // exists on the host, not under this root, until the root has one of its own.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/bin/sh", dir.path().join("sh")).unwrap();
        assert_eq!(executable_under(dir.path(), "/sh"), Some(false));
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::copy("/bin/sh", dir.path().join("bin/sh")).unwrap();
        assert_eq!(executable_under(dir.path(), "/sh"), Some(true));
    }

    #[test]
    fn a_process_that_is_not_there_cannot_be_looked_into() {
        assert_eq!(executable_in(i32::MAX, "/bin/sh"), None);
    }
}
