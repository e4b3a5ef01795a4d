//! labgate's fallback SFTP server, for images that have no `sftp-server` of their own.
//!
//! The gateway bind-mounts this static binary read-only into every container (at
//! `/.labgate/sftp-server`) and, for the `sftp` subsystem, execs it when the image has no
//! OpenSSH `sftp-server`: as the user's uid:gid, in their home, with the SSH channel on
//! stdin/stdout, exactly as it would run the image's own server. The protocol (SFTP version 3,
//! what OpenSSH's `sftp`, `scp` and IDEs speak) is russh-sftp's server side; [`fs::Fs`] maps
//! its requests onto the filesystem. It runs as the user, so the kernel decides what it may
//! touch: nothing the user could not reach from a shell.

mod fs;
mod stdio;

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if std::env::args_os().len() > 1 {
        eprintln!(
            "usage: labgate-sftp (no arguments; speaks SFTP on stdin/stdout, relative paths from the working directory)"
        );
        return ExitCode::from(2);
    }
    let cwd = match std::env::current_dir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("labgate-sftp: no working directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (stream, ended) = stdio::Stdio::new();
    russh_sftp::server::run(stream, fs::Fs::new(cwd)).await;
    // russh-sftp serves on a task of its own; it drops the stream when the client has gone.
    let _ = ended.await;
    ExitCode::SUCCESS
}
