//! The test-only fake `libnvidia-ml.so` (workspace crate `tests/fake-nvml`), built once per
//! test binary and installed where a gateway's `[gpu] nvml_library` points, with a GPU
//! description a test can rewrite while the gateway runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Builds the fake NVML once per test binary, in a target directory of its own (so it never
/// waits on the lock of the build running these tests), and returns the library's path.
pub fn fake_nvml() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-nvml");
        let out = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "fake-nvml", "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("running cargo to build tests/fake-nvml");
        assert!(
            out.status.success(),
            "building tests/fake-nvml failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = target.join("debug/libfake_nvml.so");
        assert!(lib.is_file(), "{} missing", lib.display());
        lib
    })
    .clone()
}

/// A copy of the fake as `DIR/libnvidia-ml.so.1`, with `gpus` as its GPU description (the
/// `.gpus` file next to it, which the fake reads).
pub fn install_fake(dir: &Path, gpus: &str) -> PathBuf {
    let lib = dir.join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml(), &lib).unwrap();
    set_gpus(dir, gpus);
    lib
}

/// Replaces the GPU description of the fake installed in `dir`, whole (a rename), so a
/// process using it sees the new one at its next NVML query.
pub fn set_gpus(dir: &Path, gpus: &str) {
    let new = dir.join("libnvidia-ml.so.1.gpus.new");
    std::fs::write(&new, gpus).unwrap();
    std::fs::rename(&new, dir.join("libnvidia-ml.so.1.gpus")).unwrap();
}
