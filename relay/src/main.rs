//! labgate's in-container relay: the forwarding path used when the gateway cannot enter a
//! container's namespaces (it runs rootless, or without the host PID namespace), and, where it
//! can, the socket that carries the sftp subsystem past the container engine (`serve`).
//!
//! The gateway bind-mounts this static binary read-only into every container and execs it:
//!
//! - `labgate-relay tcp ADDR PORT`: connect to `ADDR:PORT` from inside the container;
//! - `labgate-relay unix PATH`: connect to the unix socket `PATH` as the container sees it;
//! - `labgate-relay resolve NAME`: print the container's addresses for `NAME`, one a line;
//! - `labgate-relay listen DIR NAME`: a private unix socket whose connections the gateway takes
//!   over one by one (agent forwarding, see [`listen`]);
//! - `labgate-relay listen-tcp DIR ADDR PORT`: a TCP listener inside the container whose
//!   connections the gateway takes over the same way (`-R`);
//! - `labgate-relay serve DIR -- ARGV...`: run `ARGV` (the sftp server) on the one connection
//!   the gateway makes to a private unix socket in `DIR` (see [`serve`]);
//! - `labgate-relay signal MARK SIG`, `labgate-relay hangup MARK GRACE_MS`: signal a process
//!   the gateway started, found by its mark (remote nodes, where the gateway sees no PID of
//!   the container's: see [`signal`]).
//!
//! After connecting it writes `connected` (or `error: REASON`) as one line on stderr, then
//! joins stdin to the socket and the socket to stdout. Stdin EOF half-closes the socket;
//! the target's EOF ends the relay.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

mod listen;
mod serve;
mod signal;

/// A connected socket of either kind.
pub(crate) trait Socket: Read + Write + Send + 'static {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>>;
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Socket for TcpStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Socket for UnixStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

fn connect(args: &[String]) -> io::Result<Box<dyn Socket>> {
    match args {
        [kind, addr, port] if kind == "tcp" => {
            let port: u16 = port
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad port"))?;
            let ip: std::net::IpAddr = addr
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad address"))?;
            let s = TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(10))?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        [kind, path] if kind == "unix" => Ok(Box::new(UnixStream::connect(path)?)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "usage: labgate-relay tcp ADDR PORT | unix PATH | resolve NAME | listen DIR NAME \
             | listen-tcp DIR ADDR PORT | serve DIR -- ARGV... | signal MARK SIG \
             | hangup MARK GRACE_MS",
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [kind, name] = args.as_slice()
        && kind == "resolve"
    {
        return match (name.as_str(), 0).to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    println!("{}", a.ip());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let bind = match args.as_slice() {
        [kind, dir, name] if kind == "listen" => Some((dir, listen::Bind::Unix(name.clone()))),
        [kind, dir, addr, port] if kind == "listen-tcp" => {
            match (addr.parse::<std::net::IpAddr>(), port.parse::<u16>()) {
                (Ok(ip), Ok(port)) => Some((dir, listen::Bind::Tcp((ip, port).into()))),
                _ => {
                    eprintln!("error: listen-tcp: bad address or port");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    if let Some((dir, bind)) = bind {
        return match listen::run(std::path::Path::new(dir), bind) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let signalled = match args.as_slice() {
        [kind, mark, sig] if kind == "signal" => Some(signal::signal(mark, sig)),
        [kind, mark, grace] if kind == "hangup" => Some(signal::hangup(mark, grace)),
        _ => None,
    };
    if let Some(done) = signalled {
        return match done {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let [kind, dir, dashes, argv @ ..] = args.as_slice()
        && kind == "serve"
        && dashes == "--"
    {
        // Returns only when it could not serve.
        let e = serve::run(std::path::Path::new(dir), argv);
        eprintln!("error: {e}");
        return ExitCode::from(127);
    }
    let socket = match connect(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("connected");
    let mut reader = match socket.try_clone_box() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let up = std::thread::spawn(move || {
        let mut socket = socket;
        let _ = io::copy(&mut io::stdin().lock(), &mut socket);
        let _ = socket.shutdown_write();
    });
    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
    // The target has closed its side. Exiting closes stdout, which the gateway turns into an
    // EOF for the client; anything the client still sends has nowhere to go (std alone cannot
    // close fd 1 while the process lives on: a client that half-closes before its answer
    // arrives, `nc </dev/null`, loses the answer on this path).
    drop(up);
    ExitCode::SUCCESS
}
