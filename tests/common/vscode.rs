//! VS Code Remote-SSH's connection pattern (`tests/vscode.rs`, and on a cluster node in
//! `tests/cluster.rs`): an install script run by `ssh -T -D PORT host bash` that starts a
//! detached server or finds the running one, and the ways VS Code then reaches it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{Gateway, Tunnel, eventually};

/// `ssh -N -L 127.0.0.1:PORT:SOCKET` (direct-streamlocal), killed on drop.
pub fn socket_forward(gw: &Gateway, socket: &str) -> Tunnel {
    Tunnel::open(gw, 0, |port| {
        vec!["-L".into(), format!("127.0.0.1:{port}:{socket}")]
    })
}

/// What the extension's install script does, reduced to its connection-relevant steps: reuse
/// a running server if its pid is alive, else start one detached and wait for its port; print
/// the port. bash then waits for more stdin, which keeps the connection (and its -D) open.
pub const INSTALL_TCP: &str = r#"
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
pub const INSTALL_SOCKET: &str = r#"
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
pub struct Connection {
    child: Child,
    /// Kept open: bash reads its script from it and waits for more, as with VS Code.
    stdin: Option<ChildStdin>,
    /// Lines bash printed.
    lines: mpsc::Receiver<String>,
    /// The local SOCKS port (`-D`).
    socks: u16,
    /// What the script said before `listening on` (`started server PID` or `found ...`).
    pub said: String,
    /// What follows `listening on `.
    pub listening: String,
    /// The pid of this connection's bash in the container.
    pub shell_pid: String,
}

impl Connection {
    /// Connects as user 0 and runs `script`; the `-D` port is picked by trying random ones
    /// with ExitOnForwardFailure, so no port is bound and dropped.
    pub fn open(gw: &Gateway, script: &str) -> Connection {
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
    pub fn server_pid(&self) -> String {
        self.said
            .rsplit(' ')
            .next()
            .filter(|p| p.parse::<u32>().is_ok())
            .unwrap_or_else(|| panic!("no server pid in {:?}", self.said))
            .to_owned()
    }

    /// GET `url` through this connection's SOCKS tunnel (names resolved on the far side).
    pub fn get(&self, url: &str) -> String {
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
    pub fn run(&mut self, cmd: &str) -> String {
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
    pub fn vanish(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A clean end: stdin closed, so bash and the connection end; waits for ssh to exit.
    pub fn close(mut self) {
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
pub fn sftp(gw: &Gateway, batch: &str, cwd: &std::path::Path) {
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

/// Sends `line` to the echo server behind local `port`, returns its answer line.
pub fn ask(port: u16, line: &str) -> String {
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
