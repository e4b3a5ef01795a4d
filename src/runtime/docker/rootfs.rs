//! Looking into a container's filesystem from the host, through `/proc/PID/root` of its init
//! process: cheaper than an exec (a few system calls instead of the engine's 40 ms), and
//! used only for questions whose answer may also come from an exec when this cannot be
//! asked (no host PID namespace, no permission).
//!
//! Paths resolve inside the container's root (`openat2` with `RESOLVE_IN_ROOT`): a symlink
//! such as `/bin/bash -> /usr/bin/bash` is followed within the container, never on the host.
//! A file is written only once it is known to be a regular file: root in a container may
//! make `/etc/passwd` a FIFO, or a device node the container itself may not open but the
//! host could.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, fstat, open, openat2};
use rustix::io::Errno;

/// The most of an account file read (`/etc/passwd` of a large site can be a few MiB).
const ACCOUNT_FILE_LIMIT: u64 = 16 << 20;

/// The directory `root` (a container's `/proc/PID/root`), opened to resolve paths under.
fn open_root(root: impl rustix::path::Arg) -> Option<OwnedFd> {
    open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
}

/// A handle that opens nothing (`O_PATH`) on `path` (absolute, as the container sees it)
/// resolved inside `root`: symlinks are followed within it, magic links not at all.
fn path_in(root: &OwnedFd, path: &str) -> rustix::io::Result<OwnedFd> {
    openat2(
        root,
        path.trim_start_matches('/'),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Whether `path` (absolute, as the container sees it) is an executable file in the
/// filesystem of the container whose init is host process `pid`; `None` when that cannot be
/// looked at from here.
pub fn executable_in(pid: i32, path: &str) -> Option<bool> {
    executable_under(format!("/proc/{pid}/root"), path)
}

/// [`executable_in`] for the directory `root` taken as `/`.
fn executable_under(root: impl rustix::path::Arg, path: &str) -> Option<bool> {
    let root = open_root(root)?;
    match path_in(&root, path) {
        Ok(fd) => {
            let st = fstat(&fd).ok()?;
            Some(FileType::from_raw_mode(st.st_mode).is_file() && st.st_mode & 0o111 != 0)
        }
        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => Some(false),
        Err(_) => None,
    }
}

/// A line for an account file (`/etc/passwd`, `/etc/group`), added unless a line there
/// already has its id (third field).
#[derive(Debug, Clone, Copy)]
pub struct AccountLine<'a> {
    /// The file, absolute, as the container sees it.
    pub file: &'a str,
    /// The uid or gid no line may have yet.
    pub id: u32,
    /// The line, without its newline.
    pub line: &'a str,
}

/// Why an account line was not written from the host.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The path is there but is something else (a FIFO, a device, a directory).
    #[error("{0} is not a regular file")]
    NotAFile(String),
    /// Reading or writing it failed (a read-only root filesystem, say).
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// Adds each of `lines` whose id its file has no line for, in the filesystem of the container
/// whose init is host process `pid`; `Some(added)` on success. `None` when it cannot be done
/// from here (the container's root cannot be opened, or a file is missing and would have to be
/// created with the container's ownership): the caller asks the container with an exec.
pub fn add_account_lines_in(
    pid: i32,
    lines: &[AccountLine<'_>],
) -> Option<Result<usize, AccountError>> {
    add_account_lines_under(format!("/proc/{pid}/root"), lines)
}

/// [`add_account_lines_in`] for the directory `root` taken as `/`.
fn add_account_lines_under(
    root: impl rustix::path::Arg,
    lines: &[AccountLine<'_>],
) -> Option<Result<usize, AccountError>> {
    let root = open_root(root)?;
    let mut added = 0;
    for line in lines {
        match add_line(&root, line) {
            Ok(true) => added += 1,
            Ok(false) => {}
            Err(None) => return None,
            Err(Some(e)) => return Some(Err(e)),
        }
    }
    Some(Ok(added))
}

/// Appends `line` to its file under `root` unless present; `Err(None)`: not from here.
fn add_line(root: &OwnedFd, line: &AccountLine<'_>) -> Result<bool, Option<AccountError>> {
    let io = |e: std::io::Error| Some(AccountError::Io(line.file.to_owned(), e));
    // First a handle that opens nothing (O_PATH): a FIFO would block, a device would be
    // opened, before their type could be seen.
    let path = match path_in(root, line.file) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Err(None),
        Err(e) => return Err(io(e.into())),
    };
    let st = fstat(&path).map_err(|e| io(e.into()))?;
    if !FileType::from_raw_mode(st.st_mode).is_file() {
        return Err(Some(AccountError::NotAFile(line.file.to_owned())));
    }
    // Then that same file opened for real, through the handle (not the path, which could
    // have been swapped meanwhile), and checked to be the file looked at.
    let file = open(
        format!("/proc/self/fd/{}", path.as_fd().as_raw_fd()),
        OFlags::RDWR | OFlags::APPEND | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| io(e.into()))?;
    let again = fstat(&file).map_err(|e| io(e.into()))?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Err(Some(AccountError::NotAFile(line.file.to_owned())));
    }
    let mut file = std::fs::File::from(file);
    let mut text = Vec::new();
    (&mut file)
        .take(ACCOUNT_FILE_LIMIT)
        .read_to_end(&mut text)
        .map_err(io)?;
    let id = line.id.to_string();
    let present = text
        .split(|b| *b == b'\n')
        .any(|l| l.split(|b| *b == b':').nth(2) == Some(id.as_bytes()));
    if present {
        return Ok(false);
    }
    let mut out = Vec::with_capacity(line.line.len() + 2);
    if text.last().is_some_and(|b| *b != b'\n') {
        out.push(b'\n');
    }
    out.extend_from_slice(line.line.as_bytes());
    out.push(b'\n');
    file.write_all(&out).map_err(io)?;
    Ok(true)
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

    fn account_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nlab:x:1000:1000::/home/lab:/bin/sh",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\n").unwrap();
        dir
    }

    const ALICE: [AccountLine<'static>; 2] = [
        AccountLine {
            file: "/etc/passwd",
            id: 1234,
            line: "alice:x:1234:2345:alice:/home/alice:/bin/sh",
        },
        AccountLine {
            file: "/etc/group",
            id: 2345,
            line: "alice:x:2345:",
        },
    ];

    #[test]
    fn missing_account_lines_are_appended_once() {
        let root = account_root();
        let added = add_account_lines_under(root.path(), &ALICE);
        assert_eq!(added.map(|r| r.ok()), Some(Some(2)));
        let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/sh\nlab:x:1000:1000::/home/lab:/bin/sh\n\
             alice:x:1234:2345:alice:/home/alice:/bin/sh\n",
            "the last line gets its missing newline, nothing else changes"
        );
        let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
        assert_eq!(group, "root:x:0:\nalice:x:2345:\n");
        let again = add_account_lines_under(root.path(), &ALICE);
        assert_eq!(
            again.map(|r| r.ok()),
            Some(Some(0)),
            "a second call adds nothing"
        );
        assert_eq!(
            std::fs::read_to_string(root.path().join("etc/passwd")).unwrap(),
            passwd
        );
    }

    #[test]
    fn an_id_the_image_already_has_is_left_alone() {
        let root = account_root();
        let lab = [AccountLine {
            file: "/etc/passwd",
            id: 1000,
            line: "alice:x:1000:1000:alice:/home/alice:/bin/sh",
        }];
        let added = add_account_lines_under(root.path(), &lab);
        assert_eq!(added.map(|r| r.ok()), Some(Some(0)));
        assert!(
            !std::fs::read_to_string(root.path().join("etc/passwd"))
                .unwrap()
                .contains("alice")
        );
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let root = account_root();
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.path().join("etc/passwd"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        match add_account_lines_under(root.path(), &ALICE) {
            Some(Err(AccountError::NotAFile(f))) => assert_eq!(f, "/etc/passwd"),
            other => panic!("a FIFO must be refused, got {other:?}"),
        }
    }

    #[test]
    fn a_symlink_never_leads_to_the_hosts_files() {
        // `/etc/passwd -> /etc/hostname` resolves to the root's own `/etc/hostname`, which is
        // missing here: the host's file is neither read nor written.
        let root = account_root();
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.path().join("etc/passwd")).unwrap();
        let host_before = std::fs::read("/etc/hostname").ok();
        assert!(
            add_account_lines_under(root.path(), &ALICE).is_none(),
            "a file missing in the root is left to an exec"
        );
        assert_eq!(std::fs::read("/etc/hostname").ok(), host_before);
        // A link inside the root is followed, inside it.
        std::fs::write(root.path().join("etc/hostname"), "box\n").unwrap();
        let added = add_account_lines_under(root.path(), &ALICE[..1]);
        assert_eq!(added.map(|r| r.ok()), Some(Some(1)));
        assert_eq!(
            std::fs::read_to_string(root.path().join("etc/hostname")).unwrap(),
            "box\nalice:x:1234:2345:alice:/home/alice:/bin/sh\n"
        );
        assert_eq!(std::fs::read("/etc/hostname").ok(), host_before);
    }
}
