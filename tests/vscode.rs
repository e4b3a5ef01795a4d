//! VS Code Remote-SSH's connection pattern, step by step, with the real OpenSSH client against
//! the Debian lab image (`labgate/debian:test`, built by `scripts/debian-image`):
//!
//! 1. `ssh -T -D PORT host bash`, no PTY, an install script on stdin that starts a detached
//!    server (`setsid nohup`, bound to the container's 127.0.0.1) and prints `listening on N`;
//! 2. the server reached through that SOCKS tunnel (direct-tcpip to the container's loopback);
//! 3. a second connection at the same time lands in the same container and finds the server;
//! 4. a file downloaded through sftp meanwhile;
//! 5. the first connection vanishes, the server survives; a reconnect finds it again.
//!
//! And `remoteServerListenOnSocket`: the server on a unix socket under the home, reached with
//! `ssh -L PORT:/home/USER/...sock` (direct-streamlocal).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Gateway, Tunnel, containers_named, ensure_debian_image, eventually};

/// `ssh -N -L 127.0.0.1:PORT:SOCKET` (direct-streamlocal), killed on drop.
fn socket_forward(gw: &Gateway, socket: &str) -> Tunnel {
    Tunnel::open(gw, 0, |port| {
        vec!["-L".into(), format!("127.0.0.1:{port}:{socket}")]
    })
}

/// A user table giving user 0 the Debian image and a uid:gid of its own.
const DEBIAN_USER: &str = "[users.{u0}]\nimage = \"labgate/debian:test\"\nuid = 1000\ngid = 1001\n";

/// What the extension's install script does, reduced to its connection-relevant steps: reuse
/// a running server if its pid is alive, else start one detached and wait for its port; print
/// the port. bash then waits for more stdin, which keeps the connection (and its -D) open.
const INSTALL_TCP: &str = r#"
dir="$HOME/.vscode-server"; mkdir -p "$dir"; cd "$dir"
if [ -s server.pid ] && kill -0 "$(cat server.pid)" 2>/dev/null; then
  echo "found running server $(cat server.pid)"
else
  head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > token.txt
  setsid nohup python3 -u -m http.server --bind 127.0.0.1 0 >server.log 2>&1 </dev/null &
  echo $! > server.pid
  for i in $(seq 1 200); do
    port=$(sed -n 's/.* port \([0-9][0-9]*\) .*/\1/p' server.log)
    [ -n "$port" ] && break
    sleep 0.05
  done
  echo "$port" > server.port
  echo "started server $(cat server.pid)"
fi
echo "listening on $(cat server.port)"
"#;

/// The same for `remoteServerListenOnSocket`: the server listens on a unix socket under the
/// home and answers each line with its pid and the line.
const INSTALL_SOCKET: &str = r#"
dir="$HOME/.vscode-server"; mkdir -p "$dir"; cd "$dir"
if [ -s server.pid ] && kill -0 "$(cat server.pid)" 2>/dev/null; then
  echo "found running server $(cat server.pid)"
else
  cat > server.py <<'EOF'
import os, socketserver, sys
path = sys.argv[1]
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"server %d: " % os.getpid() + line)
            self.wfile.flush()
try:
    os.unlink(path)
except FileNotFoundError:
    pass
server = socketserver.ThreadingUnixStreamServer(path, Echo)
print("ready", flush=True)
server.serve_forever()
EOF
  setsid nohup python3 server.py "$dir/server.sock" >server.log 2>&1 </dev/null &
  echo $! > server.pid
  for i in $(seq 1 200); do grep -q ready server.log && break; sleep 0.05; done
  echo "started server $(cat server.pid)"
fi
echo "listening on $dir/server.sock"
"#;

/// One `ssh -T -D PORT host bash` connection with its install script running.
struct Connection {
    child: Child,
    /// Kept open: bash reads its script from it and waits for more, as with VS Code.
    stdin: Option<ChildStdin>,
    /// Lines bash printed.
    lines: mpsc::Receiver<String>,
    /// The local SOCKS port (`-D`).
    socks: u16,
    /// What the script said before `listening on` (`started server PID` or `found ...`).
    said: String,
    /// What follows `listening on `.
    listening: String,
    /// The pid of this connection's bash in the container.
    shell_pid: String,
}

impl Connection {
    /// Connects as user 0 and runs `script`; the `-D` port is picked by trying random ones
    /// with ExitOnForwardFailure, so no port is bound and dropped.
    fn open(gw: &Gateway, script: &str) -> Connection {
        for attempt in 0..20u32 {
            let socks = 20_000
                + ((std::process::id().wrapping_mul(7919) + attempt * 104_729 + 31) % 40_000)
                    as u16;
            if let Some(c) = Self::try_open(gw, script, socks) {
                return c;
            }
        }
        panic!("could not connect with -D; gateway log:\n{}", gw.log());
    }

    fn try_open(gw: &Gateway, script: &str, socks: u16) -> Option<Connection> {
        let mut child = gw
            .ssh(0)
            .args(["-T", "-o", "ExitOnForwardFailure=yes", "-D"])
            .arg(format!("127.0.0.1:{socks}"))
            .arg("bash")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
        stdin.flush().unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut said = String::new();
        loop {
            match lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => match line.strip_prefix("listening on ") {
                    Some(rest) => {
                        let mut c = Connection {
                            child,
                            stdin: Some(stdin),
                            lines,
                            socks,
                            said,
                            listening: rest.to_owned(),
                            shell_pid: String::new(),
                        };
                        c.shell_pid = c.run("echo $$").trim().to_owned();
                        return Some(c);
                    }
                    None => said = line,
                },
                // ssh exited (the -D port was taken) or never answered.
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }

    /// The server's pid, from `started server PID` / `found running server PID`.
    fn server_pid(&self) -> String {
        self.said
            .rsplit(' ')
            .next()
            .filter(|p| p.parse::<u32>().is_ok())
            .unwrap_or_else(|| panic!("no server pid in {:?}", self.said))
            .to_owned()
    }

    /// GET `url` through this connection's SOCKS tunnel (names resolved on the far side).
    fn get(&self, url: &str) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "30", "--socks5-hostname"])
            .arg(format!("127.0.0.1:{}", self.socks))
            .arg(url)
            .output()
            .unwrap();
        assert!(out.status.success(), "curl {url}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs one more command in this connection's bash (as VS Code does after install).
    fn run(&mut self, cmd: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}; echo '--end--'").unwrap();
        stdin.flush().unwrap();
        let mut out = String::new();
        loop {
            let line = self.lines.recv_timeout(Duration::from_secs(30)).unwrap();
            if line == "--end--" {
                return out;
            }
            out.push_str(&line);
            out.push('\n');
        }
    }

    /// The client vanishes (VS Code's window closed, laptop lid shut): ssh is killed.
    fn vanish(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A clean end: stdin closed, so bash and the connection end; waits for ssh to exit.
    fn close(mut self) {
        drop(self.stdin.take());
        let ended = eventually(Duration::from_secs(30), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        assert!(ended, "ssh did not end after its stdin closed");
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sftp -b` for user 0 in `cwd`, asserting success.
fn sftp(gw: &Gateway, batch: &str, cwd: &std::path::Path) {
    let file = cwd.join("batch");
    std::fs::write(&file, batch).unwrap();
    let out = Command::new("sftp")
        .current_dir(cwd)
        .args(gw.ssh_options(0))
        .arg("-b")
        .arg(&file)
        .arg(gw.destination(0))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sftp failed: {out:?}\ngateway log:\n{}",
        gw.log()
    );
}

#[test]
fn vscode_sequence_socks_tunnel_second_connection_and_server_surviving_a_disconnect() {
    ensure_debian_image();
    // With the relay installed (the harness does, as deployed): sftp takes its direct path.
    let gw = Gateway::start(1, "", DEBIAN_USER);

    // 1-2: install, start the detached server, reach it through -D on the remote loopback.
    let first = Connection::open(&gw, INSTALL_TCP);
    assert!(first.said.starts_with("started server "), "{}", first.said);
    let port: u16 = first
        .listening
        .parse()
        .unwrap_or_else(|_| panic!("no port in {:?}; log:\n{}", first.listening, gw.log()));
    let pid = first.server_pid();
    let home = gw.dir.path().join(format!("home/{}", gw.users[0]));
    let token = std::fs::read_to_string(home.join(".vscode-server/token.txt")).unwrap();
    assert_eq!(token.len(), 32, "{token:?}");
    for host in ["127.0.0.1", "localhost"] {
        assert_eq!(first.get(&format!("http://{host}:{port}/token.txt")), token);
    }

    // 3: a second connection while the first is open lands in the same container and finds
    // the same server process.
    let mut second = Connection::open(&gw, INSTALL_TCP);
    assert_eq!(second.said, format!("found running server {pid}"));
    assert_eq!(second.listening, port.to_string());
    assert_eq!(
        second.get(&format!("http://127.0.0.1:{port}/token.txt")),
        token
    );
    assert_eq!(containers_named(&gw.container(0)), 1);
    let ps = second.run(&format!("ps -o pid=,args= -p {pid}"));
    assert!(ps.contains("http.server"), "{ps}");

    // 4: VS Code downloads files through sftp meanwhile.
    let local = tempfile::tempdir().unwrap();
    sftp(
        &gw,
        "get .vscode-server/token.txt token.txt\n",
        local.path(),
    );
    assert_eq!(
        std::fs::read_to_string(local.path().join("token.txt")).unwrap(),
        token
    );
    assert!(gw.log().contains("on the direct path"));

    // 5: the first client vanishes; the detached server lives on and is still reachable
    // through the second connection; then that one ends cleanly, and a reconnect finds the
    // same server again.
    let first_shell = first.shell_pid.clone();
    first.vanish();
    assert!(
        eventually(Duration::from_secs(10), || {
            second
                .run(&format!(
                    "kill -0 {first_shell} 2>/dev/null && echo alive || echo gone"
                ))
                .trim()
                == "gone"
        }),
        "the first connection's bash was not hung up"
    );
    assert_eq!(
        second.get(&format!("http://127.0.0.1:{port}/token.txt")),
        token
    );
    second.close();
    let third = Connection::open(&gw, INSTALL_TCP);
    assert_eq!(third.said, format!("found running server {pid}"));
    assert_eq!(
        third.get(&format!("http://localhost:{port}/token.txt")),
        token
    );
}

/// Sends `line` to the echo server behind local `port`, returns its answer line.
fn ask(port: u16, line: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        answer.push(byte[0]);
    }
    String::from_utf8(answer).unwrap()
}

#[test]
fn vscode_listen_on_socket_reaches_a_unix_socket_under_the_home_across_reconnects() {
    ensure_debian_image();
    let gw = Gateway::start(1, "", DEBIAN_USER);
    let first = Connection::open(&gw, INSTALL_SOCKET);
    let socket = first.listening.clone();
    assert_eq!(
        socket,
        format!("/home/{}/.vscode-server/server.sock", gw.users[0])
    );
    let pid = first.server_pid();
    let forward = socket_forward(&gw, &socket);
    assert_eq!(ask(forward.port, "hello"), format!("server {pid}: hello"));

    // The installing connection and the forward go away; the server stays.
    first.vanish();
    drop(forward);
    let again = Connection::open(&gw, INSTALL_SOCKET);
    assert_eq!(again.said, format!("found running server {pid}"));
    let forward = socket_forward(&gw, &socket);
    assert_eq!(ask(forward.port, "again"), format!("server {pid}: again"));
    drop(forward);
}
