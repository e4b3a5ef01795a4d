//! Where the gateway finds its static helpers, `labgate-relay` and `labgate-sftp`, which it
//! bind-mounts read-only into containers.
//!
//! The rule, per helper: the `[docker]` key when the config sets it (as written, found or
//! not: an admin who names a path means that one, and a missing file is reported by `labgate
//! check` rather than replaced by another binary); else the first of the Debian package's
//! directory (`/usr/lib/labgate`), the directory of a manual install by the earlier README and
//! the container image (`/usr/local/lib/labgate`), and the directory of the running `labgate`
//! executable (so `target/release/labgate` finds the helpers built beside it). Looked up at
//! each config load; the runtime checks the file again when it mounts it.

use std::path::{Path, PathBuf};

/// The relay: the direct path of sessions without a terminal, and forwards through an exec.
pub const RELAY: &str = "labgate-relay";
/// The fallback SFTP server for images without one.
pub const SFTP: &str = "labgate-sftp";
/// Where the Debian package installs the helpers.
pub const PACKAGE_DIR: &str = "/usr/lib/labgate";
/// Where a manual install (and `deploy/Dockerfile`) puts them.
pub const LOCAL_DIR: &str = "/usr/local/lib/labgate";

/// How a helper's path was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The config's `[docker] relay_helper` / `sftp_helper`.
    Configured,
    /// [`PACKAGE_DIR`].
    Package,
    /// [`LOCAL_DIR`].
    Local,
    /// The directory of the running executable.
    NextToExecutable,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Configured => "configured",
            Origin::Package => "package",
            Origin::Local => "local install",
            Origin::NextToExecutable => "next to the labgate executable",
        })
    }
}

/// One helper as the config load found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Helper {
    /// The file to mount: the one found, else the configured path, else where the package
    /// would put it (so a helper installed later is used without a reload).
    pub path: PathBuf,
    /// How `path` was chosen.
    pub origin: Origin,
    /// Whether `path` was a file when the config was loaded.
    pub found: bool,
    /// The places looked at, in order (for `labgate check` when nothing was found).
    pub searched: Vec<PathBuf>,
}

/// The directories searched when the config names no path, in order.
pub fn search_dirs() -> Vec<(Origin, PathBuf)> {
    let mut dirs = vec![
        (Origin::Package, PathBuf::from(PACKAGE_DIR)),
        (Origin::Local, PathBuf::from(LOCAL_DIR)),
    ];
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        dirs.push((Origin::NextToExecutable, dir));
    }
    dirs
}

/// Finds the helper `name` (a file name such as [`RELAY`]): `configured` when set, else the
/// first of `dirs` holding a file of that name.
pub fn locate(name: &str, configured: Option<PathBuf>, dirs: &[(Origin, PathBuf)]) -> Helper {
    if let Some(path) = configured {
        return Helper {
            found: path.is_file(),
            searched: vec![path.clone()],
            path,
            origin: Origin::Configured,
        };
    }
    let searched: Vec<PathBuf> = dirs.iter().map(|(_, d)| d.join(name)).collect();
    for ((origin, _), path) in dirs.iter().zip(&searched) {
        if path.is_file() {
            return Helper {
                path: path.clone(),
                origin: *origin,
                found: true,
                searched,
            };
        }
    }
    Helper {
        path: Path::new(PACKAGE_DIR).join(name),
        origin: Origin::Package,
        found: false,
        searched,
    }
}

/// Whether the ELF file at `path` names a program interpreter (the dynamic loader): such a
/// helper runs only in images whose C library suits it, while a static one runs in any.
/// `None` when the file cannot be read or is no 64-bit little-endian ELF file.
pub fn is_dynamically_linked(path: &Path) -> Option<bool> {
    use std::io::Read as _;
    // The program headers of a Rust executable sit right after the 64-byte ELF header.
    let mut head = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(64 * 1024)
        .read_to_end(&mut head)
        .ok()?;
    elf_has_interpreter(&head)
}

/// [`is_dynamically_linked`] on the file's first bytes.
fn elf_has_interpreter(head: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    // ELF magic, 64-bit class, little-endian data.
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(head.get(at..at + 2)?.try_into().ok()?));
    let phoff = usize::try_from(u64::from_le_bytes(head.get(0x20..0x28)?.try_into().ok()?)).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let kind = u32::from_le_bytes(head.get(at..at + 4)?.try_into().ok()?);
        if kind == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(root: &Path) -> Vec<(Origin, PathBuf)> {
        vec![
            (Origin::Package, root.join("usr/lib/labgate")),
            (Origin::Local, root.join("usr/local/lib/labgate")),
            (Origin::NextToExecutable, root.join("target/release")),
        ]
    }

    fn put(root: &Path, rel: &str) -> PathBuf {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"helper").unwrap();
        path
    }

    #[test]
    fn a_configured_path_wins_over_every_installed_helper() {
        let root = tempfile::tempdir().unwrap();
        put(root.path(), "usr/lib/labgate/labgate-relay");
        let mine = put(root.path(), "opt/relay");
        let h = locate(RELAY, Some(mine.clone()), &dirs(root.path()));
        assert_eq!(
            (h.path, h.origin, h.found),
            (mine, Origin::Configured, true)
        );
    }

    #[test]
    fn a_configured_path_that_is_missing_is_kept_and_reported_missing() {
        // The admin named it: no other binary is used behind their back.
        let root = tempfile::tempdir().unwrap();
        put(root.path(), "usr/lib/labgate/labgate-sftp");
        let missing = root.path().join("opt/labgate-sftp");
        let h = locate(SFTP, Some(missing.clone()), &dirs(root.path()));
        assert_eq!(
            (h.path, h.origin, h.found),
            (missing, Origin::Configured, false)
        );
    }

    #[test]
    fn the_package_location_comes_before_local_and_the_executables_directory() {
        let root = tempfile::tempdir().unwrap();
        let package = put(root.path(), "usr/lib/labgate/labgate-relay");
        put(root.path(), "usr/local/lib/labgate/labgate-relay");
        put(root.path(), "target/release/labgate-relay");
        let h = locate(RELAY, None, &dirs(root.path()));
        assert_eq!(
            (h.path, h.origin, h.found),
            (package, Origin::Package, true)
        );
    }

    #[test]
    fn a_cargo_build_finds_the_helper_beside_its_executable() {
        let root = tempfile::tempdir().unwrap();
        let beside = put(root.path(), "target/release/labgate-sftp");
        // Another helper's file does not count.
        put(root.path(), "usr/lib/labgate/labgate-relay");
        let h = locate(SFTP, None, &dirs(root.path()));
        assert_eq!(
            (h.path, h.origin, h.found),
            (beside, Origin::NextToExecutable, true)
        );
    }

    #[test]
    fn nothing_found_points_at_the_package_location_and_lists_the_search() {
        let root = tempfile::tempdir().unwrap();
        // A directory of the helper's name is no helper.
        std::fs::create_dir_all(root.path().join("usr/local/lib/labgate/labgate-relay")).unwrap();
        let h = locate(RELAY, None, &dirs(root.path()));
        assert_eq!(h.path, Path::new(PACKAGE_DIR).join(RELAY));
        assert!(!h.found);
        assert_eq!(
            h.searched,
            [
                root.path().join("usr/lib/labgate/labgate-relay"),
                root.path().join("usr/local/lib/labgate/labgate-relay"),
                root.path().join("target/release/labgate-relay"),
            ]
        );
    }

    #[test]
    fn the_search_ends_beside_the_running_executable() {
        let dirs = search_dirs();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            dirs[0],
            (Origin::Package, PathBuf::from("/usr/lib/labgate"))
        );
        assert_eq!(
            dirs.last().unwrap(),
            &(
                Origin::NextToExecutable,
                exe.parent().unwrap().to_path_buf()
            )
        );
    }

    /// A minimal ELF64 header with one program header of type `kind`.
    fn elf_with(kind: u32) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&kind.to_le_bytes());
        b
    }

    #[test]
    fn an_interpreter_header_means_dynamically_linked() {
        assert_eq!(elf_has_interpreter(&elf_with(3)), Some(true));
        assert_eq!(elf_has_interpreter(&elf_with(1)), Some(false));
        assert_eq!(elf_has_interpreter(b"#!/bin/sh\n"), None);
        // Cut short inside the program headers: not an answer.
        assert_eq!(elf_has_interpreter(&elf_with(3)[..66]), None);
        // This test binary is linked against the host's C library.
        let me = std::env::current_exe().unwrap();
        assert_eq!(is_dynamically_linked(&me), Some(true));
    }
}
