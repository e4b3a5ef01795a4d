//! `labgate-relay listen DIR NAME`: a unix socket inside the container whose connections the
//! gateway takes over one by one (agent forwarding on the exec path).
//!
//! It makes `DIR` (0700; it must not exist yet) and binds `DIR/NAME` (0600), both owned by the
//! user the exec runs as, and says `listening` on stderr. For each connection to it, it binds a
//! one-shot hand-off socket `DIR/.N` and prints `conn N` on stdout; the gateway connects there
//! with `labgate-relay unix DIR/.N`, and the two are joined both ways. Only the user can reach
//! `DIR`. When stdin reaches EOF (the gateway is done), `DIR` is removed and the relay exits.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a hand-off socket waits for the gateway's connection.
const HANDOFF_WAIT: Duration = Duration::from_secs(20);

/// Runs the listener until stdin ends; `Err` only when it could not start.
pub fn run(dir: &Path, name: &str) -> io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    let path = dir.join(name);
    let listener = match bind_private(&path) {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
    };
    eprintln!("listening");
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
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        n += 1;
        let handoff = dir.join(format!(".{n}"));
        let stdout = stdout.clone();
        std::thread::spawn(move || {
            let _ = serve(client, &handoff, n, &stdout);
            let _ = std::fs::remove_file(&handoff);
        });
    }
    Ok(())
}

/// Binds `path` and makes it 0600.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Hands `client` to the gateway through the hand-off socket `handoff`.
fn serve(
    client: UnixStream,
    handoff: &PathBuf,
    n: u64,
    stdout: &Mutex<io::Stdout>,
) -> io::Result<()> {
    let listener = bind_private(handoff)?;
    listener.set_nonblocking(true)?;
    {
        let mut out = stdout.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(out, "conn {n}")?;
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
    join(client, gateway)
}

/// Copies both ways until both directions ended, half-closing each as its source ends.
fn join(a: UnixStream, b: UnixStream) -> io::Result<()> {
    let (mut a_read, mut b_write) = (a.try_clone()?, b.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut a_read, &mut b_write);
        let _ = b_write.shutdown(Shutdown::Write);
    });
    let (mut b_read, mut a_write) = (b, a);
    let _ = io::copy(&mut b_read, &mut a_write);
    let _ = a_write.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}
