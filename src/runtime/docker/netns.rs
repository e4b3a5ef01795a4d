//! Sockets made inside a container's namespaces, from the host.
//!
//! Each operation runs on a fresh thread that enters the namespace of the container's init
//! process (`/proc/PID/ns/net`, or `ns/mnt` for unix socket paths), makes the socket, hands it
//! back and exits, so no tokio worker ever changes namespace. A socket keeps the namespace it
//! was made in: a TCP connection to 127.0.0.1 made this way reaches the container's own
//! loopback. Needs root (CAP_SYS_ADMIN) and the host PID namespace.
//!
//! **Never as root on the user's behalf.** Right after entering the namespace, a thread that
//! is given the container user's [`Identity`] takes it (supplementary groups, gid, uid, for
//! this thread alone: the raw per-thread system calls, not libc's process-wide ones), so the
//! kernel's permission checks decide what it may connect to, create or read, exactly as
//! for a process of the user's in the container. The thread then ends; its credentials go
//! with it.
//!
//! **Never without a deadline.** No operation here blocks on something the user controls: a
//! unix connect is non-blocking (a listener that never accepts gives "try again", retried
//! until the deadline), a TCP socket is made in the namespace and connected by tokio under
//! the deadline, and a file is opened non-blocking and read only when it is a regular file.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::{CloneFlags, setns, unshare};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::runtime::Identity;

/// How often a unix connect that found its listener's queue full is tried again.
const UNIX_RETRY: Duration = Duration::from_millis(50);

/// Runs `f` on a new thread inside namespace `kind` of process `pid`, as `who` when given.
async fn in_namespace<T, F>(
    pid: i32,
    kind: Namespace,
    who: Option<&Identity>,
    f: F,
) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let who = who.cloned();
    std::thread::Builder::new()
        .name("labgate-ns".into())
        .spawn(move || {
            let result = enter(pid, kind)
                .and_then(|()| who.as_ref().map_or(Ok(()), become_user))
                .and_then(|()| f());
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

/// Gives the calling thread (alone) the credentials of `who`: groups first, then the gid,
/// then the uid, after which it has no capabilities left. Only for threads that end after
/// their one operation.
fn become_user(who: &Identity) -> io::Result<()> {
    use rustix::fs::{Gid, Uid};
    let groups: Vec<Gid> = who.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    rustix::thread::set_thread_groups(&groups)?;
    let gid = Gid::from_raw(who.gid);
    rustix::thread::set_thread_res_gid(gid, gid, gid)?;
    let uid = Uid::from_raw(who.uid);
    rustix::thread::set_thread_res_uid(uid, uid, uid)?;
    Ok(())
}

/// The error of a connect that ran out of time.
fn timed_out(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what}: no answer in time"),
    )
}

/// The error of a connect given up because the connection ended.
fn abandoned() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the client went away")
}

/// Connects to the first reachable of `addrs` from inside the network namespace of `pid`,
/// all of them together within `deadline`; gives up at once when `gone` is cancelled. The
/// sockets are made in the namespace (where they stay) and connected by tokio, so a target
/// that never answers holds no thread.
pub async fn connect_tcp(
    pid: i32,
    addrs: Vec<SocketAddr>,
    deadline: Instant,
    gone: &CancellationToken,
) -> io::Result<tokio::net::TcpStream> {
    let families: Vec<bool> = addrs.iter().map(SocketAddr::is_ipv6).collect();
    let sockets = in_namespace(pid, Namespace::Net, None, move || {
        families
            .into_iter()
            .map(|v6| {
                let domain = if v6 {
                    rustix::net::AddressFamily::INET6
                } else {
                    rustix::net::AddressFamily::INET
                };
                rustix::net::socket_with(
                    domain,
                    rustix::net::SocketType::STREAM,
                    rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
                    None,
                )
                .map_err(io::Error::from)
            })
            .collect::<io::Result<Vec<OwnedFd>>>()
    })
    .await?;
    // Report the most telling failure: "connection refused" on 127.0.0.1 says more than
    // "cannot assign address" on ::1 of a container without IPv6.
    let mut best: Option<io::Error> = None;
    for (fd, addr) in sockets.into_iter().zip(addrs) {
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        let result = tokio::select! {
            r = tokio::time::timeout_at(deadline, socket.connect(addr)) => {
                r.unwrap_or_else(|_| Err(timed_out(&addr.to_string())))
            }
            () = gone.cancelled() => return Err(abandoned()),
        };
        match result {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => {
                let timed_out = e.kind() == io::ErrorKind::TimedOut;
                if best
                    .as_ref()
                    .is_none_or(|b| b.kind() == io::ErrorKind::AddrNotAvailable)
                {
                    best = Some(e);
                }
                if timed_out {
                    break;
                }
            }
        }
    }
    Err(best
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to")))
}

/// Binds a TCP listener at `addr` inside the network namespace of `pid`, as `who`.
pub async fn bind_tcp(
    pid: i32,
    addr: SocketAddr,
    who: Option<&Identity>,
) -> io::Result<tokio::net::TcpListener> {
    let listener = in_namespace(pid, Namespace::Net, who, move || {
        std::net::TcpListener::bind(addr)
    })
    .await?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// One non-blocking connect to the unix socket at `path` (relative to the thread's cwd
/// when relative): `WouldBlock` when its listener's queue is full.
fn connect_unix_now(path: &Path) -> io::Result<std::os::unix::net::UnixStream> {
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&fd, &rustix::net::SocketAddrUnix::new(path)?)?;
    Ok(std::os::unix::net::UnixStream::from(fd))
}

/// Tries `attempt` (a non-blocking connect in a namespace thread) until it does not find the
/// listener's queue full, the deadline passes or the connection ends.
async fn until_accepted<T, A, Fut>(
    what: &str,
    deadline: Instant,
    gone: &CancellationToken,
    mut attempt: A,
) -> io::Result<T>
where
    A: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    loop {
        match attempt().await {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return done,
        }
        if Instant::now() + UNIX_RETRY >= deadline {
            return Err(timed_out(what));
        }
        tokio::select! {
            () = tokio::time::sleep(UNIX_RETRY) => {}
            () = gone.cancelled() => return Err(abandoned()),
        }
    }
}

/// Connects to the unix socket at `path` as the container sees it, as `who`: the path, and
/// every symlink on it, resolves inside the container's mount namespace, never on the host,
/// and the user's own permissions decide whether they may reach it.
pub async fn connect_unix(
    pid: i32,
    path: PathBuf,
    who: Option<&Identity>,
    deadline: Instant,
    gone: &CancellationToken,
) -> io::Result<tokio::net::UnixStream> {
    let what = path.display().to_string();
    let stream = until_accepted(&what, deadline, gone, || {
        let path = path.clone();
        in_namespace(pid, Namespace::Mount, who, move || connect_unix_now(&path))
    })
    .await?;
    tokio::net::UnixStream::from_std(stream)
}

/// Connects to the socket `name` in directory `dir` inside the container's mount namespace,
/// as `who`, where the container's user may change what those paths are: `dir` itself must
/// not be a symlink (it is entered, then `name` is looked at and reached from inside it),
/// `name` must be a socket file, not a symlink, and its listener must run as the file's owner
/// (a swap between the look and the connect is caught by that): a socket its owner made,
/// never one they merely pointed at.
pub async fn connect_unix_owned(
    pid: i32,
    dir: PathBuf,
    name: &'static str,
    who: Option<&Identity>,
    deadline: Instant,
    gone: &CancellationToken,
) -> io::Result<tokio::net::UnixStream> {
    let what = dir.join(name).display().to_string();
    let (stream, owner) = until_accepted(&what, deadline, gone, || {
        let dir = dir.clone();
        in_namespace(pid, Namespace::Mount, who, move || {
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
            Ok((connect_unix_now(Path::new(name))?, meta.uid()))
        })
    })
    .await?;
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
/// in it, inside the mount namespace of `pid`, as `who` (so both are theirs, and made only
/// where they may make them). `dir` must not exist yet, so a path planted in advance is
/// never used.
pub async fn bind_unix(
    pid: i32,
    dir: PathBuf,
    name: &str,
    who: Option<&Identity>,
) -> io::Result<tokio::net::UnixListener> {
    let name = name.to_owned();
    let listener = in_namespace(pid, Namespace::Mount, who, move || {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let made = (|| {
            let path = dir.join(&name);
            let listener = std::os::unix::net::UnixListener::bind(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
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

/// Removes the directory `dir` and what it holds inside the mount namespace of `pid`, as
/// `who`, on a thread of its own, without waiting (for `Drop`). Best effort: a container
/// that is gone took the directory with it. Symlinks in it are removed, never followed.
pub fn remove_dir_detached(pid: i32, dir: PathBuf, who: Option<Identity>) {
    let spawned = std::thread::Builder::new()
        .name("labgate-ns".into())
        .spawn(move || {
            if enter(pid, Namespace::Mount).is_ok()
                && who.as_ref().map_or(Ok(()), become_user).is_ok()
            {
                let _ = std::fs::remove_dir_all(&dir);
            }
        });
    if let Err(e) = spawned {
        tracing::debug!("cannot clean a socket directory: {e}");
    }
}

/// Reads a small file as the container sees it (its `/etc/hosts`, say), as `who`: opened
/// without blocking and read only when it is a regular file (a FIFO put in its place never
/// holds the thread), at most `limit` bytes.
pub async fn read_file(
    pid: i32,
    path: PathBuf,
    limit: u64,
    who: Option<&Identity>,
) -> io::Result<String> {
    in_namespace(pid, Namespace::Mount, who, move || {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let mut text = String::new();
        file.take(limit).read_to_string(&mut text)?;
        Ok(text)
    })
    .await
}

/// Whether this process can enter other processes' namespaces (root, or CAP_SYS_ADMIN, in
/// the host PID namespace): the fast path of forwarding.
pub async fn available(pid: i32) -> bool {
    in_namespace(pid, Namespace::Net, None, || Ok(()))
        .await
        .is_ok()
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

    /// `connect_unix_owned` to `dir/s` as root, with a short deadline.
    async fn owned(pid: i32, dir: PathBuf) -> io::Result<tokio::net::UnixStream> {
        let deadline = Instant::now() + Duration::from_secs(2);
        connect_unix_owned(pid, dir, "s", None, deadline, &CancellationToken::new()).await
    }

    #[tokio::test]
    async fn an_owned_socket_is_reached_but_never_through_a_symlink() {
        let me = i32::try_from(std::process::id()).unwrap();
        if !available(me).await {
            eprintln!("skipped: entering namespaces needs root");
            return;
        }
        let (dir, _listener) = socket_dir();
        assert!(owned(me, dir.path().to_owned()).await.is_ok());

        // A symlinked directory, and a symlink in place of the socket, are refused.
        let other = tempfile::tempdir().unwrap();
        let linked_dir = other.path().join("d");
        std::os::unix::fs::symlink(dir.path(), &linked_dir).unwrap();
        assert!(owned(me, linked_dir).await.is_err());
        std::os::unix::fs::symlink(dir.path().join("s"), other.path().join("s")).unwrap();
        let e = owned(me, other.path().to_owned()).await.unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");

        // A socket file handed to someone else than its listener's user is refused.
        std::os::unix::fs::lchown(dir.path().join("s"), Some(54321), None).unwrap();
        let e = owned(me, dir.path().to_owned()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    }
    /// A listener (made in this process's namespaces) whose queue is full and that never
    /// accepts: a connect to it waits for ever unless something else ends it.
    fn never_accepting_tcp() -> (OwnedFd, SocketAddr, std::net::TcpStream) {
        use rustix::net::{AddressFamily, SocketType, bind, listen, socket};
        let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        bind(&fd, &SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        listen(&fd, 0).unwrap();
        let addr = match rustix::net::getsockname(&fd).unwrap().try_into() {
            Ok(a) => a,
            Err(_) => panic!("not an inet address"),
        };
        // Backlog 0 still takes one connection: fill it.
        let first = std::net::TcpStream::connect(addr).unwrap();
        (fd, addr, first)
    }

    #[tokio::test]
    async fn connects_end_at_their_deadline_or_when_the_connection_is_gone() {
        let me = i32::try_from(std::process::id()).unwrap();
        if !available(me).await {
            eprintln!("skipped: entering namespaces needs root");
            return;
        }
        let (_listener, addr, _first) = never_accepting_tcp();
        // Eight addresses that never answer share one deadline: not eight of them.
        let t0 = std::time::Instant::now();
        let deadline = Instant::now() + Duration::from_millis(600);
        let e = connect_tcp(me, vec![addr; 8], deadline, &CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

        // The connection's end ends the wait at once.
        let gone = CancellationToken::new();
        let far = Instant::now() + Duration::from_secs(60);
        let waiting = tokio::spawn({
            let gone = gone.clone();
            async move { connect_tcp(me, vec![addr], far, &gone).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        gone.cancel();
        let e = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("ended when gone")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
    }

    #[tokio::test]
    async fn a_unix_listener_that_never_accepts_holds_no_thread() {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketType, bind, listen, socket};
        let me = i32::try_from(std::process::id()).unwrap();
        if !available(me).await {
            eprintln!("skipped: entering namespaces needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stuck.sock");
        let fd = socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        bind(&fd, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        listen(&fd, 0).unwrap();
        let gone = CancellationToken::new();
        let deadline = || Instant::now() + Duration::from_millis(400);
        // The first one fits the queue; the next ones wait until their deadline, no longer.
        let _first = connect_unix(me, path.clone(), None, deadline(), &gone)
            .await
            .unwrap();
        let t0 = std::time::Instant::now();
        let waits: Vec<_> = (0..20)
            .map(|_| {
                let (path, gone) = (path.clone(), gone.clone());
                tokio::spawn(async move { connect_unix(me, path, None, deadline(), &gone).await })
            })
            .collect();
        for w in waits {
            let e = w.await.unwrap().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // No thread of theirs is left blocked in a connect (other tests' namespace threads
        // live for a moment: wait for them).
        let ns_threads = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "labgate-ns")
                })
                .count()
        };
        let t1 = std::time::Instant::now();
        while ns_threads() > 0 && t1.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ns_threads(), 0);
    }
}
