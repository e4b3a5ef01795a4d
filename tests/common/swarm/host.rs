//! The host side of the swarm rig: commands (`docker` without the caller's `DOCKER_*`
//! settings, `ip`), the test process's own cgroups, and the checks that a node answers or a
//! range is free. (Processes by cgroup: `common::processes_in_cgroups_named`.)

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::Node;

/// Quotes `s` for `sh`.
pub(super) fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `docker`, with none of the caller's `DOCKER_*` settings (they would point it elsewhere or
/// turn TLS on for a unix socket).
pub(super) fn docker_command() -> Command {
    let mut cmd = Command::new("docker");
    for var in [
        "DOCKER_HOST",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "DOCKER_CONTEXT",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// `docker -H HOST ARGS` with no TLS at all, whatever it answers.
pub(super) fn docker_plain(host: &str, args: &[&str]) -> Output {
    docker_command()
        .args(["-H", host])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker: {e}"))
}

/// Runs `program args`, and says what went wrong if it did not succeed; stdout trimmed.
pub(super) fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let mut cmd = if program == "docker" {
        docker_command()
    } else {
        Command::new(program)
    };
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS`, or why it failed.
pub(super) fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args).map(drop)
}

/// The start time of process `pid` (field 22 of its `stat`), to tell it from a later process
/// with the same PID.
pub(super) fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19).map(str::to_owned)
}

/// This process's cgroup in each hierarchy: (hierarchy mount, own directory), the freezer's
/// first. `None` without a cgroup v1 freezer.
pub(super) fn own_cgroups() -> Option<Vec<(String, PathBuf)>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // (mount point, root inside the hierarchy, super options) of each cgroup mount.
    let mounts: Vec<(String, String, String, bool)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let v2 = match *post.first()? {
                "cgroup" => false,
                "cgroup2" => true,
                _ => return None,
            };
            Some((
                pre.get(4)?.to_string(),
                pre.get(3)?.to_string(),
                post.get(2)?.to_string(),
                v2,
            ))
        })
        .collect();
    let mut own = Vec::new();
    for line in std::fs::read_to_string("/proc/self/cgroup").ok()?.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let mount = mounts.iter().find(|(_, _, options, v2)| {
            if controllers.is_empty() {
                *v2
            } else {
                !*v2 && controllers
                    .split(',')
                    .all(|c| options.split(',').any(|o| o == c))
            }
        })?;
        let (point, root) = (&mount.0, &mount.1);
        let inner = path.strip_prefix(root.as_str()).unwrap_or(path);
        let dir = Path::new(point).join(inner.trim_start_matches('/'));
        let name = if controllers.is_empty() {
            "unified"
        } else {
            controllers
        };
        own.push((name.to_owned(), dir));
    }
    let freezer = own.iter().position(|(c, _)| c == "freezer")?;
    own.swap(0, freezer);
    Some(own)
}

/// `docker load` of `image` (a `docker save` archive) on `node`.
pub(super) fn load(node: &Node, image: &[u8]) -> Result<(), String> {
    let mut child = docker_command()
        .args(["-H", &node.host(), "load", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("docker load: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(image)
            .map_err(|e| format!("docker load on {}: {e}", node.name))?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "docker load on {}: {}",
            node.name,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Whether dockerd answers `/_ping` on `socket`.
pub(super) fn pings(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reply = String::new();
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200")
}

/// Whether some route other than the default covers `10.218.n.0/24`.
pub(super) fn covered_by_a_route(n: u8) -> bool {
    Command::new("ip")
        .args(["-4", "route", "show", "match", &format!("10.218.{n}.0/24")])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| !l.starts_with("default"))
        })
}
