//! Names the commit a build comes from, for `labgate --version`: `LABGATE_COMMIT` when set
//! (a build from a source tarball, or a packager who knows better), else `git rev-parse
//! --short HEAD` in this checkout, else "unknown". Uses nothing but `git`, if it is there.
//!
//! The script runs again when `LABGATE_COMMIT`, the checkout's HEAD or the branch it names
//! move, so a new commit gets a new version line (and the crate is rebuilt once for it).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LABGATE_COMMIT");
    let commit = match std::env::var("LABGATE_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => {
            watch_head();
            git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=LABGATE_COMMIT={commit}");
}

/// `git ARGS` in the crate's directory: its trimmed stdout, or `None` when git is missing,
/// this is no checkout, or the answer is empty.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(manifest_dir())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

/// Reruns this script when HEAD moves: the HEAD file (a checkout or a worktree has its own)
/// and the file of the branch it names, or `packed-refs` while that branch has no file of its
/// own. Only files that exist are named: Cargo reruns a script every time for a missing one.
fn watch_head() {
    let mut files = Vec::new();
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        files.push(head);
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        match git(&["rev-parse", "--git-path", &branch]) {
            Some(file) if absolute(&file).is_file() => files.push(file),
            _ => files.extend(git(&["rev-parse", "--git-path", "packed-refs"])),
        }
    }
    for file in files {
        let path = absolute(&file);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

/// `git rev-parse --git-path` answers relative to the crate's directory when the git
/// directory lies inside it.
fn absolute(path: &str) -> PathBuf {
    manifest_dir().join(path)
}

/// The crate's directory (Cargo sets it for build scripts; "." otherwise).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from("."), PathBuf::from)
}
