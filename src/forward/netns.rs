//! Sockets made inside a container's namespaces, from the host.
//!
//! Each operation runs on a fresh thread that enters the namespace of the container's init
//! process (`/proc/PID/ns/net`, or `ns/mnt` for unix socket paths), makes the socket, hands it
//! back and exits, so no tokio worker ever changes namespace. A socket keeps the namespace it
//! was made in: a TCP connection to 127.0.0.1 made this way reaches the container's own
//! loopback. Needs root (CAP_SYS_ADMIN) and the host PID namespace.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nix::sched::{CloneFlags, setns, unshare};
use tokio::sync::oneshot;

/// Runs `f` on a new thread inside namespace `kind` of process `pid`.
async fn in_namespace<T, F>(pid: i32, kind: Namespace, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("labgate-ns".into())
        .spawn(move || {
            let result = enter(pid, kind).and_then(|()| f());
            let _ = tx.send(result);
        })?;
    rx.await
        .map_err(|_| io::Error::other("namespace thread ended without an answer"))?
}

#[derive(Debug, Clone, Copy)]
enum Namespace {
    Net,
    Mount,
}

fn enter(pid: i32, kind: Namespace) -> io::Result<()> {
    let (file, flag) = match kind {
        Namespace::Net => ("net", CloneFlags::CLONE_NEWNET),
        Namespace::Mount => ("mnt", CloneFlags::CLONE_NEWNS),
    };
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/{file}"))?;
    if matches!(kind, Namespace::Mount) {
        // A thread shares its root and cwd with the process until it unshares them.
        unshare(CloneFlags::CLONE_FS).map_err(io::Error::from)?;
    }
    setns(&ns, flag).map_err(io::Error::from)
}

/// Connects to the first reachable of `addrs` from inside the network namespace of `pid`.
pub async fn connect_tcp(
    pid: i32,
    addrs: Vec<SocketAddr>,
    timeout: Duration,
) -> io::Result<tokio::net::TcpStream> {
    let std_stream = in_namespace(pid, Namespace::Net, move || {
        // Report the most telling failure: "connection refused" on 127.0.0.1 says more than
        // "cannot assign address" on ::1 of a container without IPv6.
        let mut best: Option<io::Error> = None;
        for addr in addrs {
            match std::net::TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if best
                        .as_ref()
                        .is_none_or(|b| b.kind() == io::ErrorKind::AddrNotAvailable)
                    {
                        best = Some(e);
                    }
                }
            }
        }
        Err(best.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to")
        }))
    })
    .await?;
    std_stream.set_nonblocking(true)?;
    let _ = std_stream.set_nodelay(true);
    tokio::net::TcpStream::from_std(std_stream)
}

/// Binds a TCP listener at `addr` inside the network namespace of `pid`.
pub async fn bind_tcp(pid: i32, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let listener = in_namespace(pid, Namespace::Net, move || {
        std::net::TcpListener::bind(addr)
    })
    .await?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// Connects to the unix socket at `path` as the container sees it: the path, and every
/// symlink on it, resolves inside the container's mount namespace, never on the host.
pub async fn connect_unix(pid: i32, path: PathBuf) -> io::Result<tokio::net::UnixStream> {
    let stream = in_namespace(pid, Namespace::Mount, move || {
        std::os::unix::net::UnixStream::connect(&path)
    })
    .await?;
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}

/// Connects to the socket `name` in directory `dir` inside the container's mount namespace,
/// where the container's user may change what those paths are: `dir` itself must not be a
/// symlink (it is entered, then `name` is looked at and reached from inside it), `name` must
/// be a socket file, not a symlink, and its listener must run as the file's owner (a swap
/// between the look and the connect is caught by that): a socket its owner made, never one
/// they merely pointed at.
pub async fn connect_unix_owned(
    pid: i32,
    dir: PathBuf,
    name: &'static str,
) -> io::Result<tokio::net::UnixStream> {
    let (stream, owner) = in_namespace(pid, Namespace::Mount, move || {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
        let dir_fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY)
            .open(&dir)?;
        // This thread has a cwd of its own (see `enter`).
        nix::unistd::fchdir(&dir_fd).map_err(io::Error::from)?;
        let meta = std::fs::symlink_metadata(name)?;
        if !meta.file_type().is_socket() {
            return Err(io::Error::other(format!(
                "{}/{name} is not a socket",
                dir.display()
            )));
        }
        Ok((std::os::unix::net::UnixStream::connect(name)?, meta.uid()))
    })
    .await?;
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let listener = stream.peer_cred()?.uid();
    if listener != owner {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the socket's listener runs as uid {listener}, its file belongs to uid {owner}"
            ),
        ));
    }
    Ok(stream)
}

/// Makes a fresh directory `dir` (mode 0700) and binds a unix socket `dir/name` (mode 0600)
/// in it, inside the mount namespace of `pid`, both owned by `owner` (uid, gid) when given.
/// `dir` must not exist yet, so a path planted in advance is never used. The directory is
/// handed to `owner` last, once the socket in it is ready.
pub async fn bind_unix(
    pid: i32,
    dir: PathBuf,
    name: &'static str,
    owner: Option<(u32, u32)>,
) -> io::Result<tokio::net::UnixListener> {
    let listener = in_namespace(pid, Namespace::Mount, move || {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let made = (|| {
            let path = dir.join(name);
            let listener = std::os::unix::net::UnixListener::bind(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
            }
            Ok(listener)
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    })
    .await?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// Removes the directory `dir` and what it holds inside the mount namespace of `pid`, on a
/// thread of its own, without waiting (for `Drop`). Best effort: a container that is gone
/// took the directory with it. Symlinks in it are removed, never followed.
pub fn remove_dir_detached(pid: i32, dir: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("labgate-ns".into())
        .spawn(move || {
            if enter(pid, Namespace::Mount).is_ok() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        });
    if let Err(e) = spawned {
        tracing::debug!("cannot clean a socket directory: {e}");
    }
}

/// Reads a small file as the container sees it (its `/etc/hosts`, say).
pub async fn read_file(pid: i32, path: PathBuf, limit: u64) -> io::Result<String> {
    in_namespace(pid, Namespace::Mount, move || {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(&path)?
            .take(limit)
            .read_to_string(&mut text)?;
        Ok(text)
    })
    .await
}

/// Whether this process can enter other processes' namespaces (root, or CAP_SYS_ADMIN, in
/// the host PID namespace): the fast path of forwarding.
pub async fn available(pid: i32) -> bool {
    in_namespace(pid, Namespace::Net, || Ok(())).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory with a listening socket `s` in it, in this process's namespaces.
    fn socket_dir() -> (tempfile::TempDir, std::os::unix::net::UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        (dir, listener)
    }

    #[tokio::test]
    async fn an_owned_socket_is_reached_but_never_through_a_symlink() {
        let me = i32::try_from(std::process::id()).unwrap();
        if !available(me).await {
            eprintln!("skipped: entering namespaces needs root");
            return;
        }
        let (dir, _listener) = socket_dir();
        assert!(
            connect_unix_owned(me, dir.path().to_owned(), "s")
                .await
                .is_ok()
        );

        // A symlinked directory, and a symlink in place of the socket, are refused.
        let other = tempfile::tempdir().unwrap();
        let linked_dir = other.path().join("d");
        std::os::unix::fs::symlink(dir.path(), &linked_dir).unwrap();
        assert!(connect_unix_owned(me, linked_dir, "s").await.is_err());
        std::os::unix::fs::symlink(dir.path().join("s"), other.path().join("s")).unwrap();
        let e = connect_unix_owned(me, other.path().to_owned(), "s")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");

        // A socket file handed to someone else than its listener's user is refused.
        std::os::unix::fs::lchown(dir.path().join("s"), Some(54321), None).unwrap();
        let e = connect_unix_owned(me, dir.path().to_owned(), "s")
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    }
}
