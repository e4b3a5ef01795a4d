//! The gateway's host key: loaded from `[server] host_key`, generated (ed25519, mode 0600) on
//! first start when the file does not exist.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, PrivateKey};

/// Errors loading or creating the host key.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The file exists but cannot be read.
    #[error("cannot read host key {path}: {source}", path = path.display())]
    Read {
        /// Key file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an OpenSSH private key (or is encrypted).
    #[error("host key {path} is not an unencrypted OpenSSH private key: {message}", path = path.display())]
    Parse {
        /// Key file.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// Readable by others than its owner: refused, as sshd does.
    #[error("host key {path} has mode {mode:o}: it must not be readable by group or others (chmod 600)", path = path.display())]
    Permissions {
        /// Key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A new key could not be written.
    #[error("cannot create host key {path}: {message}", path = path.display())]
    Create {
        /// Key file.
        path: PathBuf,
        /// Cause.
        message: String,
    },
}

/// Loads the key at `path`, or creates one there if the file does not exist.
pub fn load_or_create(path: &Path) -> Result<PrivateKey, HostKeyError> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(HostKeyError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
            let text = std::fs::read_to_string(path).map_err(|source| HostKeyError::Read {
                path: path.to_owned(),
                source,
            })?;
            let key =
                PrivateKey::from_openssh(text.as_bytes()).map_err(|e| HostKeyError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
            if key.is_encrypted() {
                return Err(HostKeyError::Parse {
                    path: path.to_owned(),
                    message: "it is encrypted".into(),
                });
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(source) => Err(HostKeyError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Generates an ed25519 key and writes it to `path` with mode 0600 (never replacing a file).
pub fn create(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let fail = |message: String| HostKeyError::Create {
        path: path.to_owned(),
        message,
    };
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| fail(e.to_string()))?;
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| fail(e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| fail(e.to_string()))?;
    file.write_all(pem.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(path = %path.display(), fingerprint = %key.public_key().fingerprint(Default::default()), "generated a new ed25519 host key");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_with_mode_0600_then_loads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/host_key");
        let a = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public_key().key_data(), b.public_key().key_data());
        assert_eq!(a.algorithm(), Algorithm::Ed25519);
    }

    #[test]
    fn refuses_world_readable_and_garbage_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(HostKeyError::Permissions { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_or_create(&path).unwrap_err();
        assert!(matches!(e, HostKeyError::Parse { .. }), "{e}");
    }
}
