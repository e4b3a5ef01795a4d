//! The embedded demo: everything `labgate demo` needs on a fresh machine with a Docker Engine
//! and no registry. It builds a small image locally from the host's static busybox (Debian's
//! `busybox-static`), writes the embedded config into a demo directory, creates a `demo` user
//! with a fresh key pair, and prints the `ssh` line to log in. The same image builder serves
//! the integration tests.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::BuildImageOptions;
use futures::StreamExt;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, PrivateKey};

/// The embedded demo config.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// The image tag the demo config (and the tests) use.
pub const BUSYBOX_IMAGE: &str = "labgate/busybox:latest";

/// Where a static busybox is looked for on the host.
const BUSYBOX_PATHS: [&str; 3] = ["/bin/busybox", "/usr/bin/busybox", "/usr/local/bin/busybox"];

/// Errors preparing the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// No static busybox on the host.
    #[error(
        "no static busybox found at {paths:?}: install Debian's busybox-static (apt-get install busybox-static)",
        paths = BUSYBOX_PATHS
    )]
    NoBusybox,
    /// A file could not be read or written.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The Docker Engine refused or failed.
    #[error("docker: {0}")]
    Docker(String),
    /// Key generation failed.
    #[error("key generation: {0}")]
    Key(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A static busybox on the host, if any. A dynamically linked one (Debian's plain `busybox`)
/// cannot run in a `FROM scratch` image, so it does not count.
pub fn find_static_busybox() -> Option<PathBuf> {
    BUSYBOX_PATHS.iter().map(PathBuf::from).find(|p| {
        std::fs::read(p).is_ok_and(|bytes| {
            let head = &bytes[..bytes.len().min(4096)];
            bytes.starts_with(b"\x7fELF")
                && !head
                    .windows(8)
                    .any(|w| w == b"/lib64/l" || w == b"/lib/ld-")
        })
    })
}

/// Builds `tag` from the host's static busybox unless the engine already has it.
pub async fn ensure_busybox_image(docker: &Docker, tag: &str) -> Result<(), DemoError> {
    if docker.inspect_image(tag).await.is_ok() {
        return Ok(());
    }
    let busybox = find_static_busybox().ok_or(DemoError::NoBusybox)?;
    let context = busybox_context(&busybox)?;
    let opts = BuildImageOptions {
        t: Some(tag.to_owned()),
        rm: true,
        forcerm: true,
        ..Default::default()
    };
    let mut stream = docker.build_image(opts, None, Some(bollard::body_full(context.into())));
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| DemoError::Docker(e.to_string()))?;
        if let Some(detail) = info.error_detail {
            return Err(DemoError::Docker(detail.message.unwrap_or_default()));
        }
    }
    tracing::info!(image = tag, "built the busybox image");
    Ok(())
}

/// A build context: `Dockerfile` and `rootfs/` with busybox and a link per applet.
fn busybox_context(busybox: &Path) -> Result<Vec<u8>, DemoError> {
    let binary = std::fs::read(busybox).map_err(io_err(busybox))?;
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(io_err(busybox))?;
    let applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(String::from)
        .collect();
    let dockerfile = "FROM scratch\nCOPY rootfs/ /\n\
        ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
        CMD [\"/bin/sh\"]\n";
    let files: [(&str, &[u8], u32); 4] = [
        ("Dockerfile", dockerfile.as_bytes(), 0o644),
        (
            "rootfs/etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        ),
        ("rootfs/etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644),
        ("rootfs/bin/busybox", &binary, 0o755),
    ];
    let mut tar = tar::Builder::new(Vec::new());
    let fail = |e: std::io::Error| DemoError::Io {
        path: PathBuf::from("<build context>"),
        source: e,
    };
    for dir in ["rootfs/tmp", "rootfs/root", "rootfs/home", "rootfs/usr/bin"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(if dir.ends_with("tmp") { 0o1777 } else { 0o755 });
        h.set_size(0);
        tar.append_data(&mut h, dir, std::io::empty())
            .map_err(fail)?;
    }
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, data).map_err(fail)?;
    }
    for applet in &applets {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        tar.append_link(&mut h, format!("rootfs/bin/{applet}"), "busybox")
            .map_err(fail)?;
    }
    tar.into_inner().map_err(fail)
}

/// Writes an ed25519 key pair (`path` mode 0600, `path.pub`) unless `path` exists; returns the
/// public key line.
pub fn ensure_user_key(path: &Path, comment: &str) -> Result<String, DemoError> {
    let pub_path = path.with_extension("pub");
    if path.exists() && pub_path.exists() {
        return std::fs::read_to_string(&pub_path).map_err(io_err(&pub_path));
    }
    let mut key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| DemoError::Key(e.to_string()))?;
    key.set_comment(comment);
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| DemoError::Key(e.to_string()))?;
    let line = key
        .public_key()
        .to_openssh()
        .map_err(|e| DemoError::Key(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(pem.as_bytes()).map_err(io_err(path))?;
    std::fs::write(&pub_path, format!("{line}\n")).map_err(io_err(&pub_path))?;
    Ok(format!("{line}\n"))
}

/// Prepares the demo directory `dir` (config, demo user, key) and the image; returns the
/// config path to serve and the private key path of the demo user.
pub async fn prepare(dir: &Path, docker_socket: &str) -> Result<(PathBuf, PathBuf), DemoError> {
    std::fs::create_dir_all(dir.join("keys")).map_err(io_err(dir))?;
    let dir = std::fs::canonicalize(dir).map_err(io_err(dir))?;
    let config = dir.join("labgate.toml");
    std::fs::write(&config, DEMO_CONFIG).map_err(io_err(&config))?;
    let key = dir.join("demo_ed25519");
    let public = ensure_user_key(&key, "demo@labgate")?;
    let user_file = dir.join("keys/demo.pub");
    std::fs::write(&user_file, public).map_err(io_err(&user_file))?;
    let docker = Docker::connect_with_unix(docker_socket, 120, bollard::API_DEFAULT_VERSION)
        .map_err(|e| DemoError::Docker(e.to_string()))?
        .negotiate_version()
        .await
        .map_err(|e| DemoError::Docker(format!("{e} (is the Docker daemon running?)")))?;
    ensure_busybox_image(&docker, BUSYBOX_IMAGE).await?;
    Ok((config, key))
}
