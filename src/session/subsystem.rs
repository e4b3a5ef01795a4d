//! SSH subsystems: which names labgate serves, and what each runs in the user's container.
//!
//! Only `sftp` is served (it is also what `scp` speaks by default since OpenSSH 9, and what
//! IDEs use to move files). It runs the image's own `sftp-server` as a plain (non-terminal)
//! process, as the user's uid:gid, in their home, like sshd's `Subsystem sftp` line. The
//! server is looked for at the usual distribution paths by one `sh -c` that `exec`s the first
//! one found, so there is no extra round trip and nothing to cache. When the image has none,
//! labgate's own static server (`labgate-sftp`, bind-mounted read-only at
//! [`SFTP_SERVER_PATH`]) is the last path tried, so a minimal image still serves sftp; a
//! container without that mount either gets a clear line on stderr and exit status
//! [`EXIT_NO_SERVER`] instead of a hang.

use crate::runtime::SFTP_SERVER_PATH;

/// The SFTP subsystem's name.
pub const SFTP: &str = "sftp";

/// Where distributions install OpenSSH's `sftp-server`, in the order they are tried
/// (Debian/Ubuntu, Alpine, Fedora/RHEL, some BSD-style layouts, Arch).
pub const SFTP_SERVER_PATHS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/lib/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
];

/// Exit status when neither the image nor labgate's mount has an sftp server (the shell's "command not found").
pub const EXIT_NO_SERVER: u32 = 127;

/// Finds and `exec`s the first executable among its arguments, so the process the client talks
/// to is the sftp-server itself (signals and hangup reach it directly).
const LAUNCHER: &str = "for p in \"$@\"; do [ -x \"$p\" ] && exec \"$p\"; done; \
echo \"labgate: this image has no sftp-server and labgate's built-in one is not mounted in \
this container (looked in $*); sftp and scp need one of them: ask your admin\" >&2; exit 127";

/// Whether labgate serves the subsystem `name`.
pub fn is_supported(name: &str) -> bool {
    name == SFTP
}

/// What `SSH_ORIGINAL_COMMAND` says when a forced command replaces subsystem `name`: sshd puts
/// the subsystem's configured command there, and `/usr/lib/openssh/sftp-server` is the one
/// Debian's and Ubuntu's sshd use (so a wrapper that `exec`s it finds it on those images).
pub fn original_command(name: &str) -> Option<String> {
    is_supported(name).then(|| SFTP_SERVER_PATHS[0].to_owned())
}

/// The argv that runs subsystem `name` in a container, or `None` for a subsystem labgate
/// does not serve.
pub fn argv(name: &str) -> Option<Vec<String>> {
    if !is_supported(name) {
        return None;
    }
    let mut argv = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        LAUNCHER.to_owned(),
        "labgate-sftp".to_owned(),
    ];
    argv.extend(SFTP_SERVER_PATHS.iter().map(|p| (*p).to_owned()));
    argv.push(SFTP_SERVER_PATH.to_owned());
    Some(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sftp_is_served() {
        assert!(is_supported("sftp"));
        for name in ["", "SFTP", "sftp ", "netconf", "x11"] {
            assert!(!is_supported(name), "{name:?}");
            assert_eq!(argv(name), None);
        }
    }

    #[test]
    fn sftp_argv_tries_every_image_path_then_labgates_own_then_explains() {
        let argv = argv(SFTP).unwrap();
        assert_eq!(&argv[..2], ["/bin/sh", "-c"]);
        assert!(argv[2].contains("exec \"$p\""));
        assert!(argv[2].contains(">&2; exit 127"));
        // $0, then the paths as positional parameters, in order.
        assert_eq!(argv[3], "labgate-sftp");
        assert_eq!(&argv[4..argv.len() - 1], SFTP_SERVER_PATHS);
        assert_eq!(argv.last().unwrap(), "/.labgate/sftp-server");
    }
}
