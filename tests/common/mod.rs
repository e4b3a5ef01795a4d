//! Shared harness of the integration tests: a real `labgate serve` process on a free port
//! (it binds port 0 and prints the address), real OpenSSH clients, the real Docker Engine, and
//! the busybox image built locally. Every test uses its own user names, so tests run in
//! parallel without touching each other's containers; each gateway removes its users'
//! containers when dropped.

#![allow(dead_code)]

pub mod client;
pub mod dockerd;
pub mod nvml;
pub mod swarm;
pub mod vscode;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// The test image (built from the host's static busybox when missing).
pub const IMAGE: &str = labgate::demo::BUSYBOX_IMAGE;

static IMAGE_ONCE: Once = Once::new();
static NEXT_USER: AtomicUsize = AtomicUsize::new(0);

/// Builds the busybox image once per test binary.
pub fn ensure_image() {
    // On a thread of its own: callers may be inside an async test's runtime.
    IMAGE_ONCE.call_once(|| std::thread::spawn(build_image).join().unwrap());
}

fn build_image() {
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let docker = bollard::Docker::connect_with_unix(
                "/var/run/docker.sock",
                120,
                bollard::API_DEFAULT_VERSION,
            )
            .unwrap()
            .negotiate_version()
            .await
            .expect("Docker Engine must be running for the integration tests");
            labgate::demo::ensure_busybox_image(&docker, IMAGE)
                .await
                .expect("building the busybox test image");
        });
    }
}

/// A user name no other test (or concurrent test run) uses.
pub fn unique_user(prefix: &str) -> String {
    let n = NEXT_USER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// A generated ed25519 key pair on disk.
pub struct KeyPair {
    /// Private key path (`-i`).
    pub private: PathBuf,
    /// Public key line.
    pub public: String,
}

/// Generates a key pair with ssh-keygen in `dir`.
pub fn keygen(dir: &Path, name: &str) -> KeyPair {
    let private = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&private)
        .status()
        .unwrap();
    assert!(st.success(), "ssh-keygen failed");
    let public = std::fs::read_to_string(private.with_extension("pub")).unwrap();
    KeyPair { private, public }
}

/// A running gateway with its own directory, config and users.
pub struct Gateway {
    /// Temp dir holding config, keys, homes, host key, logs.
    pub dir: tempfile::TempDir,
    /// `ip:port` it listens on.
    pub addr: std::net::SocketAddr,
    /// `ip:port` of its `/metrics` and `/healthz` listener.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// `ip:port` of its lab page listener (`[admin] dashboard_listen`), if it has one.
    pub dashboard_addr: Option<std::net::SocketAddr>,
    /// The `labgate serve` process.
    child: Mutex<Option<Child>>,
    /// Users created for this gateway (containers removed on drop).
    pub users: Vec<String>,
    /// Their keys, by index of `users`.
    pub keys: Vec<KeyPair>,
    /// Extra config text appended to `[defaults]`... kept for restarts.
    config_text: String,
}

/// What a [`Gateway`] is started with: how many users, and the text added to each table of
/// its config. In every piece `{u0}`, `{u1}`... are replaced by the user names.
#[derive(Default)]
pub struct GatewayBuilder {
    users: usize,
    server: String,
    admin: String,
    defaults: String,
    docker: String,
    tail: String,
}

impl GatewayBuilder {
    /// `n` fresh users, each with a key of its own (default 1).
    pub fn users(mut self, n: usize) -> Self {
        self.users = n;
        self
    }

    /// Lines appended inside `[server]`.
    pub fn server(mut self, extra: &str) -> Self {
        self.server = extra.to_owned();
        self
    }

    /// Lines appended inside `[admin]`.
    pub fn admin(mut self, extra: &str) -> Self {
        self.admin = extra.to_owned();
        self
    }

    /// Lines appended inside `[defaults]`.
    pub fn defaults(mut self, extra: &str) -> Self {
        self.defaults = extra.to_owned();
        self
    }

    /// Lines inside `[docker]`, beside the static relay the harness installs as deployed
    /// (a `relay_helper` line here replaces it). With a `[docker]` table in the tail, they go
    /// at its top.
    pub fn docker(mut self, lines: &str) -> Self {
        self.docker = lines.to_owned();
        self
    }

    /// Text after `[defaults]` (`[users.X]` tables, `[docker]`...).
    pub fn tail(mut self, tail: &str) -> Self {
        self.tail = tail.to_owned();
        self
    }

    /// Writes the config and starts the gateway; returns once it listens.
    pub fn start(self) -> Gateway {
        ensure_image();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        let mut users = Vec::new();
        let mut keys = Vec::new();
        for _ in 0..self.users {
            let user = unique_user("t");
            let pair = keygen(dir.path(), &format!("id_{user}"));
            std::fs::write(dir.path().join(format!("keys/{user}.pub")), &pair.public).unwrap();
            users.push(user);
            keys.push(pair);
        }
        let named = |text: &str| {
            users.iter().enumerate().fold(text.to_owned(), |t, (i, u)| {
                t.replace(&format!("{{u{i}}}"), u)
            })
        };
        let admin_extra = named(&self.admin);
        let (server_extra, defaults_extra, docker) = (
            named(&self.server),
            named(&self.defaults),
            named(&self.docker),
        );
        let mut tail = named(&self.tail);
        if tail.contains("[docker]") {
            tail = tail.replacen("[docker]\n", &format!("[docker]\n{docker}\n"), 1);
        } else {
            // As deployed: the static relay is installed, so sessions without a terminal take
            // their direct path (a test with a `[docker]` table of its own says what it
            // wants).
            let relay = if docker.contains("relay_helper") {
                String::new()
            } else {
                format!(
                    "relay_helper = \"{}\"\n",
                    static_helper("labgate-relay").display()
                )
            };
            tail = format!("[docker]\n{relay}{docker}\n\n{tail}");
        }
        // Tests say which helpers they mount: one a test leaves out is absent, whatever the
        // gateway's own search would find (the package's, or the dynamically linked debug
        // builds beside target/debug/labgate).
        for key in ["relay_helper", "sftp_helper"] {
            if !tail.contains(key) {
                tail = tail.replacen(
                    "[docker]\n",
                    &format!("[docker]\n{key} = \"absent/{key}\"\n"),
                    1,
                );
            }
        }
        // A test may set its own login grace.
        let grace = if server_extra.contains("login_grace") {
            ""
        } else {
            "login_grace = \"20s\"\n"
        };
        // Each gateway keeps its state (GPU accounting, auto uids) in its own directory.
        let state = if server_extra.contains("state_dir") {
            ""
        } else {
            "state_dir = \"state\"\n"
        };
        let config_text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nhost_key = \"host_key\"\nkeys_dir = \"keys\"\n{grace}{state}{server_extra}\n\n\
             [admin]\nsocket = \"admin.sock\"\nlisten = \"127.0.0.1:0\"\naudit_log = \"audit.jsonl\"\n{admin_extra}\n\n\
             [defaults]\nimage = \"{IMAGE}\"\nmemory = \"256M\"\ncpus = 0.5\nshm = \"32M\"\npids = 128\nhome = \"home/{{user}}\"\n{defaults_extra}\n\n{tail}\n"
        );
        std::fs::write(dir.path().join("labgate.toml"), &config_text).unwrap();
        let mut gw = Gateway {
            dir,
            addr: "127.0.0.1:1".parse().unwrap(),
            admin_addr: None,
            dashboard_addr: None,
            child: Mutex::new(None),
            users,
            keys,
            config_text,
        };
        gw.spawn();
        gw
    }
}

impl Gateway {
    /// A gateway to configure: one user, the test image, the static relay installed.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            users: 1,
            ..GatewayBuilder::default()
        }
    }

    /// Starts a gateway with `n` fresh users; `defaults_extra` is appended inside
    /// `[defaults]`, `tail` after it (for `[users.X]` tables; `{u0}`, `{u1}`... are replaced
    /// by the user names).
    pub fn start(n: usize, defaults_extra: &str, tail: &str) -> Gateway {
        Gateway::builder()
            .users(n)
            .defaults(defaults_extra)
            .tail(tail)
            .start()
    }

    /// [`Gateway::start`] with `server_extra` appended inside `[server]`.
    pub fn start_with_server(
        n: usize,
        server_extra: &str,
        defaults_extra: &str,
        tail: &str,
    ) -> Gateway {
        Gateway::builder()
            .users(n)
            .server(server_extra)
            .defaults(defaults_extra)
            .tail(tail)
            .start()
    }

    /// The config file path.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("labgate.toml")
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Starts (or restarts) the gateway process and waits for its listening line.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("gateway.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_labgate"))
            .args(["serve", "--config"])
            .arg(self.config_path())
            .env(
                "LABGATE_LOG",
                "debug,russh=info,bollard=info,hyper=info,rustls=info,yamux=info",
            )
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("labgate listening on ")
                    || line.starts_with("labgate admin listening on ")
                    || line.starts_with("labgate dashboard listening on ")
                {
                    let _ = tx.send(line);
                }
            }
        });
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("gateway did not start; log:\n{}", self.log()));
            if let Some(a) = line.strip_prefix("labgate dashboard listening on ") {
                self.dashboard_addr = Some(a.parse().unwrap());
            } else if let Some(a) = line.strip_prefix("labgate admin listening on ") {
                self.admin_addr = Some(a.parse().unwrap());
            } else if let Some(a) = line.strip_prefix("labgate listening on ") {
                self.addr = a.parse().unwrap();
                break;
            }
        }
        *self.child.lock().unwrap() = Some(child);
    }

    /// Stops the gateway process (SIGTERM, then wait).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
                rustix::process::Signal::TERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// PID of the gateway process.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().as_ref().map(Child::id).unwrap()
    }

    /// An `ssh` command for user `i` with its key, against this gateway.
    pub fn ssh(&self, i: usize) -> Command {
        self.ssh_as(&self.users[i], &self.keys[i].private)
    }

    /// An `ssh` command for any user name and key.
    pub fn ssh_as(&self, user: &str, key: &Path) -> Command {
        self.ssh_logging(user, key, "ERROR")
    }

    /// `ssh` for user `i` that also prints the client's INFO messages (channel open
    /// failures and their reasons).
    pub fn ssh_info(&self, i: usize) -> Command {
        self.ssh_logging(&self.users[i], &self.keys[i].private, "INFO")
    }

    fn ssh_logging(&self, user: &str, key: &Path, level: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-i"])
            .arg(key)
            .args([
                "-p",
                &self.addr.port().to_string(),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                &format!("LogLevel={level}"),
                "-o",
                "ConnectTimeout=20",
            ])
            .arg(format!("{user}@{}", self.addr.ip()));
        c
    }

    /// The options of [`Gateway::ssh`] for user `i` in a form every OpenSSH tool takes
    /// (`sftp`, `scp`, and `ssh` itself inside `rsync -e` or `GIT_SSH_COMMAND`): `-F` and
    /// `-o` only, the port as `-o Port=`, no destination (see [`Gateway::destination`]).
    pub fn ssh_options(&self, i: usize) -> Vec<String> {
        let mut opts = vec!["-F".to_owned(), "/dev/null".to_owned()];
        for o in [
            format!("IdentityFile={}", self.keys[i].private.display()),
            format!("Port={}", self.addr.port()),
            "StrictHostKeyChecking=no".to_owned(),
            "UserKnownHostsFile=/dev/null".to_owned(),
            "BatchMode=yes".to_owned(),
            "IdentitiesOnly=yes".to_owned(),
            "LogLevel=ERROR".to_owned(),
            "ConnectTimeout=20".to_owned(),
        ] {
            opts.push("-o".to_owned());
            opts.push(o);
        }
        opts
    }

    /// `user@ip` of user `i` on this gateway.
    pub fn destination(&self, i: usize) -> String {
        format!("{}@{}", self.users[i], self.addr.ip())
    }

    /// Starts `cmd` as user `i` in the background, its stdio closed; the caller waits for or
    /// kills the client.
    pub fn spawn_silent(&self, i: usize, cmd: &str) -> Child {
        self.ssh(i)
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Runs `cmd` as user `i` and returns the output.
    pub fn run(&self, i: usize, cmd: &str) -> Output {
        self.ssh(i).arg(cmd).stdin(Stdio::null()).output().unwrap()
    }

    /// Runs `cmd` as user `i`, asserts success, returns stdout.
    pub fn ok(&self, i: usize, cmd: &str) -> String {
        let out = self.run(i, cmd);
        assert!(
            out.status.success(),
            "`{cmd}` failed: {:?}\nstderr: {}\ngateway log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `labgate ARGS --config <this gateway's config>` (the admin commands).
    pub fn labgate(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_labgate"))
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .output()
            .unwrap()
    }

    /// GETs `path` from the metrics listener with curl: (HTTP status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let addr = self.admin_addr.expect("the gateway serves [admin] listen");
        let out = Command::new("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                &format!("http://{addr}{path}"),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// A sample of `name` on the gateway's `/metrics` page (a gauge or counter without
    /// labels); `None` when the page has none.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, page) = self.http_get("/metrics");
        page.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The audit log's lines, parsed (a line that is not JSON fails the test).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    /// The container name of user `i`.
    pub fn container(&self, i: usize) -> String {
        format!("labgate-{}", self.users[i])
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
        for u in &self.users {
            let _ = Command::new("docker")
                .args(["rm", "-f", &format!("labgate-{u}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if std::thread::panicking() {
            eprintln!("--- gateway log ---\n{}", self.log());
        }
    }
}

/// Removes these containers when dropped (profile containers, users a test made itself).
pub struct RemoveContainers(pub Vec<String>);

impl Drop for RemoveContainers {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = Command::new("docker")
                .args(["rm", "-f", c])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The gateway address of Docker network `network` (the host, as its containers see it).
pub fn gateway_ip(network: &str) -> String {
    let out = Command::new("docker")
        .args([
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
            network,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// How many containers (running or not) are named exactly `name`.
pub fn containers_named(name: &str) -> usize {
    let out = Command::new("docker")
        .args(["ps", "-a", "-q", "--filter", &format!("name=^{name}$")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// `docker inspect -f FORMAT NAME`, trimmed; `None` if there is no such object.
pub fn docker_inspect(name: &str, format: &str) -> Option<String> {
    let out = Command::new("docker")
        .args(["inspect", "-f", format, name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Host PIDs of processes whose command line is exactly `cmdline` (args joined by spaces).
pub fn pids_of(cmdline: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rfind(')')
            .is_some_and(|i| state[i + 1..].trim_start().starts_with('Z'));
        if args.join(" ") == cmdline && !zombie {
            found.push(pid);
        }
    }
    found
}

/// Connects to the unix socket at `path` that an `ssh -L` client is setting up: its file
/// appears when the client binds it, a moment before it listens, so a refused connection is
/// tried again (within `timeout`).
pub fn connect_unix(path: &std::path::Path, timeout: Duration) -> std::os::unix::net::UnixStream {
    let deadline = Instant::now() + timeout;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("{}: no client listens there: {e}", path.display()),
        }
    }
}

/// Polls `f` until it returns true or `timeout` passes; returns the last result.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Debian lab image of the file and IDE tests.
pub const DEBIAN_IMAGE: &str = "labgate/debian:test";

/// The Debian lab image with Debian's Jupyter Notebook.
pub const JUPYTER_IMAGE: &str = "labgate/jupyter:test";

static DEBIAN_ONCE: Once = Once::new();
static JUPYTER_ONCE: Once = Once::new();

/// Builds [`DEBIAN_IMAGE`] with `scripts/debian-image` if this machine lacks it (minutes,
/// once; cached on the machine afterwards).
pub fn ensure_debian_image() {
    DEBIAN_ONCE.call_once(|| build_lab_image("debian", DEBIAN_IMAGE));
}

/// Builds [`JUPYTER_IMAGE`] (and the Debian image under it) if this machine lacks it.
pub fn ensure_jupyter_image() {
    JUPYTER_ONCE.call_once(|| build_lab_image("jupyter", JUPYTER_IMAGE));
}

fn build_lab_image(which: &str, image: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/debian-image");
    let st = Command::new(script).arg(which).status().unwrap();
    assert!(
        st.success(),
        "scripts/debian-image failed: cannot build {image}"
    );
}

/// Builds one of labgate's static helpers (`labgate-relay`, `labgate-sftp`) as the deploy
/// files do (release, crt-static), once per test binary, and returns the binary's path.
pub fn static_helper(package: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    if let Some((_, path)) = built.iter().find(|(p, _)| p == package) {
        return path.clone();
    }
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("static-helpers");
    let st = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            package,
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .unwrap();
    assert!(st.success(), "building {package} failed");
    let path = target_dir.join(format!("x86_64-unknown-linux-gnu/release/{package}"));
    built.push((package.to_owned(), path.clone()));
    path
}

/// Starts a host `ssh-agent` (empty) on socket `sock` and waits for the socket; the caller
/// kills it.
pub fn ssh_agent(sock: &Path) -> Child {
    let child = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || sock.exists()),
        "ssh-agent did not make its socket"
    );
    child
}

/// A background `ssh -N` of user `i` with forwarding args, killed on drop. The local port is
/// chosen by trying random ones with ExitOnForwardFailure, so no port is bound-and-dropped
/// (another process could take such a port before ssh binds it).
pub struct Tunnel {
    /// The ssh client.
    pub child: Child,
    /// The local port it listens on.
    pub port: u16,
}

impl Tunnel {
    /// Opens `ssh -N` as user `i` with `forward(port)` as its forwarding args (`-L ...`,
    /// `-D ...`), trying ports until one is free; panics with the gateway log if none works.
    pub fn open(gw: &Gateway, i: usize, forward: impl Fn(u16) -> Vec<String>) -> Tunnel {
        let salt = NEXT_USER.fetch_add(1, Ordering::SeqCst) as u32;
        for attempt in 0..20u32 {
            let port = 20_000
                + ((std::process::id().wrapping_mul(7919) + (attempt + salt * 31) * 104_729)
                    % 40_000) as u16;
            let mut child = gw
                .ssh(i)
                .args(["-N", "-o", "ExitOnForwardFailure=yes"])
                .args(forward(port))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let ready = eventually(Duration::from_secs(20), || {
                matches!(child.try_wait(), Ok(Some(_)))
                    || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if ready && matches!(child.try_wait(), Ok(None)) {
                return Tunnel { child, port };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not open a tunnel; gateway log:\n{}", gw.log());
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `len` pseudo-random bytes (xorshift64) that compress badly and differ by `seed`, so a
/// byte delivered to the wrong stream is caught too.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A command's stderr as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// How many file descriptors process `pid` holds open.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Asserts the gateway process still runs (not a zombie, not gone).
pub fn assert_alive(gw: &Gateway) {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", gw.pid())).unwrap_or_default();
    let state = stat
        .rfind(')')
        .map(|i| stat[i + 1..].trim_start().chars().next().unwrap_or('?'));
    assert!(
        matches!(state, Some(s) if s != 'Z' && s != 'X'),
        "the gateway process must still run (stat: {stat:?})\nlog:\n{}",
        gw.log()
    );
}

/// Whether a test that needs something this machine may lack (`can`) runs: false means the
/// caller returns at once, after `why` was printed as SKIPPED. Under CI (`CI` set) nothing
/// is skipped silently: a missing prerequisite fails the test with `why`.
pub fn skip_unless(can: bool, why: &str) -> bool {
    if can {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "this test cannot run here under CI: {why}"
    );
    eprintln!("SKIPPED: {why}");
    false
}

/// A real terminal for the client: `ssh -tt` runs with a pty as stdin/stdout/stderr, so it
/// sends its size in pty-req and a window-change on SIGWINCH, as in an interactive session.
/// The client is killed when this drops.
pub struct Terminal {
    /// The pty's master side (non-blocking).
    pub master: std::fs::File,
    /// The client.
    pub child: Child,
    /// Output read and not yet matched by [`Terminal::expect`].
    seen: Vec<u8>,
}

impl Terminal {
    /// Spawns `cmd` on a new pty of `rows` × `cols`.
    pub fn open(cmd: &mut Command, rows: u16, cols: u16) -> Terminal {
        use std::os::fd::AsFd;
        let pty = nix::pty::openpty(
            Some(&nix::pty::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            }),
            None,
        )
        .unwrap();
        let slave = std::fs::File::from(pty.slave);
        let child = cmd
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave)
            .spawn()
            .unwrap();
        let master = std::fs::File::from(pty.master);
        let fd = master.as_fd();
        let flags = rustix::fs::fcntl_getfl(fd).unwrap();
        rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK).unwrap();
        Terminal {
            master,
            child,
            seen: Vec::new(),
        }
    }

    /// Reads until `needle` appears in the output since the last match (20 s at most).
    pub fn expect(&mut self, needle: &str) {
        self.expect_within(needle, Duration::from_secs(20));
    }

    /// [`Terminal::expect`] with a deadline of `timeout`.
    pub fn expect_within(&mut self, needle: &str, timeout: Duration) {
        use std::io::Read;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(pos) = String::from_utf8_lossy(&self.seen).find(needle) {
                self.seen.drain(..pos + needle.len());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {needle:?}; got {:?}",
                String::from_utf8_lossy(&self.seen)
            );
            match self.master.read(&mut buf) {
                Ok(n) if n > 0 => self.seen.extend_from_slice(&buf[..n]),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// [`Terminal::expect_within`] `needle`, then the rest of its line (up to `\r\n`, which
    /// is consumed too).
    pub fn expect_line(&mut self, needle: &str, timeout: Duration) -> String {
        self.expect_within(needle, timeout);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(end) = self.seen.windows(2).position(|w| w == b"\r\n") {
                let rest = String::from_utf8_lossy(&self.seen[..end]).into_owned();
                self.seen.drain(..end + 2);
                return rest;
            }
            assert!(
                Instant::now() < deadline,
                "no end of the line after {needle:?}; got {:?}",
                self.unmatched()
            );
            let before = self.seen.len();
            self.unmatched();
            if self.seen.len() == before {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Everything the terminal has shown since the last match, without waiting.
    pub fn unmatched(&mut self) -> String {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = self.master.read(&mut buf) {
            self.seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Types `text`.
    pub fn send(&mut self, text: &str) {
        use std::io::Write;
        self.master.write_all(text.as_bytes()).unwrap();
    }

    /// Resizes the terminal and tells the client, as the kernel would.
    pub fn resize(&mut self, rows: u16, cols: u16) {
        use std::os::fd::AsFd;
        rustix::termios::tcsetwinsize(
            self.master.as_fd(),
            rustix::termios::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .unwrap();
        // ssh is not in the pty's foreground group here, so tell it as the kernel would.
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(),
            rustix::process::Signal::WINCH,
        )
        .unwrap();
    }

    /// Waits for the client to exit (20 s at most) and returns its status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "ssh did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A host `ssh-agent` on its own socket in `dir`, holding one fresh key; killed on drop.
pub struct Agent {
    child: Child,
    /// Its socket (`SSH_AUTH_SOCK` for a client forwarding it).
    pub sock: PathBuf,
    /// The fingerprint (`SHA256:...`) of the key it holds.
    pub fingerprint: String,
}

impl Agent {
    /// Starts the agent and adds a new key to it.
    pub fn start(dir: &Path) -> Agent {
        let sock = dir.join("agent.sock");
        let mut agent = Agent {
            child: ssh_agent(&sock),
            sock,
            fingerprint: String::new(),
        };
        let key = keygen(dir, "id_agent");
        let st = Command::new("ssh-add")
            .arg(&key.private)
            .env("SSH_AUTH_SOCK", &agent.sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "ssh-add failed");
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(key.private.with_extension("pub"))
            .output()
            .unwrap();
        agent.fingerprint = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned();
        assert!(agent.fingerprint.starts_with("SHA256:"));
        agent
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Proportional set size of process `pid`, in KiB (pages shared with others counted in
/// part): what a benchmark charges a process.
pub fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("Pss:"))
        .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .sum()
}

/// CPU time process `pid` has used (user and system, all its threads), in ms; 0 when it is
/// gone.
pub fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(11).unwrap_or(&0) + fields.get(12).unwrap_or(&0);
    // USER_HZ is 100 on Linux.
    ticks * 10
}

/// Host PIDs of the processes of container `name` on the machine's engine (its cgroup).
pub fn container_processes(name: &str) -> Vec<i32> {
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{.Id}}", name])
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!id.is_empty(), "no container {name}");
    processes_in_cgroups_named(&id)
}

/// Host PIDs of the processes in a cgroup (of any hierarchy) whose path contains `tag`.
pub fn processes_in_cgroups_named(tag: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(tag))
        })
        .collect()
}

/// Restricts every thread of process `pid` to `cpus` (children it forks later inherit it).
/// A process that ended meanwhile is skipped.
pub fn pin(pid: u32, cpus: &[usize]) {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c).unwrap();
    }
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
        }
    }
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
