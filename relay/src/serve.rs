//! `labgate-relay serve DIR -- ARGV...`: runs a program (the sftp server) with stdin and
//! stdout on a unix socket the gateway connects to from outside, so its bytes never go through
//! the container engine's exec stream.
//!
//! It makes `DIR` (0700; it must not exist yet) and binds `DIR/serve.sock` (0600), both owned
//! by the user the exec runs as, and prints `ready` on stdout. It accepts exactly one
//! connection (or gives up after [`ACCEPT_WAIT`]), removes the socket and `DIR`, and then
//! `exec`s `ARGV` with stdin and stdout on that connection (stderr stays the exec's), so the
//! process the gateway signals, hangs up and waits for is the program itself.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The socket's name inside `DIR`.
pub const SOCKET_NAME: &str = "serve.sock";

/// How long the socket waits for the gateway's connection.
const ACCEPT_WAIT: Duration = Duration::from_secs(10);

/// Serves one connection with `argv`; returns only on failure (success replaces the process).
pub fn run(dir: &Path, argv: &[String]) -> io::Error {
    let Some((program, args)) = argv.split_first() else {
        return io::Error::new(io::ErrorKind::InvalidInput, "serve: no program to run");
    };
    let accepted = accept_one(dir);
    // The socket has served its one connection (or none): nobody else may reach it.
    let _ = std::fs::remove_dir_all(dir);
    let stream = match accepted {
        Ok(s) => s,
        Err(e) => return e,
    };
    let input = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => return e,
    };
    Command::new(program)
        .args(args)
        .stdin(Stdio::from(OwnedFd::from(input)))
        .stdout(Stdio::from(OwnedFd::from(stream)))
        .exec()
}

/// Makes `DIR` and its socket, says `ready`, and takes the first connection.
fn accept_one(dir: &Path) -> io::Result<UnixStream> {
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    let path = dir.join(SOCKET_NAME);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let deadline = Instant::now() + ACCEPT_WAIT;
    let (stream, _) = loop {
        match listener.accept() {
            Ok(conn) => break conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "serve: nobody connected in time",
                ));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn serves_one_connection_then_the_socket_and_dir_are_gone() {
        let base = std::env::temp_dir().join(format!("labgate-serve-test-{}", std::process::id()));
        let dir = base.clone();
        let server = std::thread::spawn(move || accept_one(&dir));
        let path = base.join(SOCKET_NAME);
        let mut client = loop {
            if let Ok(s) = UnixStream::connect(&path) {
                break s;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mode = std::fs::metadata(&base).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let mut accepted = server.join().unwrap().unwrap();
        // The listener is gone with its one connection: a second one is refused.
        assert!(
            UnixStream::connect(&path).is_err(),
            "a second connection must fail"
        );
        std::fs::remove_dir_all(&base).unwrap();
        accepted.write_all(b"hi").unwrap();
        drop(accepted);
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hi");
    }

    #[test]
    fn an_existing_dir_is_never_reused() {
        let dir = std::env::temp_dir();
        assert_eq!(
            accept_one(&dir).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}
