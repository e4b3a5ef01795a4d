//! `labgate-relay listen DIR NAME` (a unix socket: agent forwarding on the exec path) and
//! `labgate-relay listen-tcp DIR ADDR PORT` (a TCP listener: `-R` on the exec path): a
//! listener inside the container whose connections the gateway takes over one by one.
//!
//! It makes `DIR` (0700; it must not exist yet), binds `DIR/NAME` (0600) or `ADDR:PORT`, all as
//! the user the exec runs as, and says `listening` (for TCP, `listening PORT`, the bound port)
//! on stderr. For each connection, it binds a one-shot hand-off socket `DIR/.N` and prints
//! `conn N` (for TCP, `conn N PEER`) on stdout; the gateway connects there with
//! `labgate-relay unix DIR/.N`, and the two are joined both ways. Only the user can reach
//! `DIR`. When stdin reaches EOF (the gateway is done), `DIR` is removed and the relay exits.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Socket;

/// How long a hand-off socket waits for the gateway's connection.
const HANDOFF_WAIT: Duration = Duration::from_secs(20);

/// What to listen on.
pub enum Bind {
    /// A unix socket of this name in `DIR`.
    Unix(String),
    /// A TCP address (port 0: any free port).
    Tcp(SocketAddr),
}

/// A bound listener of either kind.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// The next connection and, for TCP, where it came from.
    fn accept(&self) -> io::Result<(Box<dyn Socket>, Option<SocketAddr>)> {
        match self {
            Listener::Unix(l) => Ok((Box::new(l.accept()?.0), None)),
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), Some(peer)))
            }
        }
    }
}

/// Runs the listener until stdin ends; `Err` only when it could not start.
pub fn run(dir: &Path, bind: Bind) -> io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    let bound = match &bind {
        Bind::Unix(name) => bind_private(&dir.join(name)).map(Listener::Unix),
        Bind::Tcp(addr) => TcpListener::bind(addr).map(Listener::Tcp),
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
    };
    match &listener {
        Listener::Unix(_) => eprintln!("listening"),
        Listener::Tcp(l) => eprintln!("listening {}", l.local_addr()?.port()),
    }
    let dir_owned = dir.to_path_buf();
    // The gateway closes stdin when the SSH connection ends: clean up and exit.
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = std::fs::remove_dir_all(&dir_owned);
        std::process::exit(0);
    });
    let stdout = Arc::new(Mutex::new(io::stdout()));
    let mut n: u64 = 0;
    loop {
        let Ok((client, peer)) = listener.accept() else {
            continue;
        };
        n += 1;
        let handoff = dir.join(format!(".{n}"));
        let stdout = stdout.clone();
        let line = match peer {
            Some(peer) => format!("conn {n} {peer}"),
            None => format!("conn {n}"),
        };
        std::thread::spawn(move || {
            let _ = serve(client, &handoff, &line, &stdout);
            let _ = std::fs::remove_file(&handoff);
        });
    }
}

/// Binds `path` and makes it 0600.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Hands `client` to the gateway through the hand-off socket `handoff`, announced by `line`.
fn serve(
    client: Box<dyn Socket>,
    handoff: &PathBuf,
    line: &str,
    stdout: &Mutex<io::Stdout>,
) -> io::Result<()> {
    let listener = bind_private(handoff)?;
    listener.set_nonblocking(true)?;
    {
        let mut out = stdout.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    let deadline = Instant::now() + HANDOFF_WAIT;
    let gateway = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(handoff);
    gateway.set_nonblocking(false)?;
    join(client, Box::new(gateway))
}

/// Copies both ways until both directions ended, half-closing each as its source ends.
fn join(a: Box<dyn Socket>, b: Box<dyn Socket>) -> io::Result<()> {
    let (mut a_read, mut b_write) = (a.try_clone_box()?, b.try_clone_box()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut a_read, &mut b_write);
        let _ = b_write.shutdown_write();
    });
    let (mut b_read, mut a_write) = (b, a);
    let _ = io::copy(&mut b_read, &mut a_write);
    let _ = a_write.shutdown_write();
    let _ = up.join();
    Ok(())
}
