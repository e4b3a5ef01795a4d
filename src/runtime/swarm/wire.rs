//! What the gateway and a node agent say to each other on one connection: a request line
//! (JSON), an answer line (JSON), then, after an `ok` answer, the connection's bytes both
//! ways, raw. A forward's connect has a connection of its own, so a slow target slows only
//! its own connection, and closing the connection closes the socket in the container.
//!
//! One request, [`Target::Mux`], turns its connection into many streams ([`super::mux`]),
//! each of which then starts with a request line of its own: the gateway carries the exec
//! streams of a node's sessions ([`Target::Exec`]) over one connection that way.

use std::io;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use crate::runtime::Identity;

/// The protocol's version: an agent answers a request of another version with an error
/// that names both.
pub const VERSION: u32 = 1;

/// The longest request or answer line either side reads.
pub const LINE_LIMIT: usize = 16 * 1024;

/// One request: where to connect, from inside which container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// [`VERSION`].
    pub v: u32,
    /// The container's id on the node (as the node's engine knows it); empty for
    /// [`Target::Mux`].
    pub container: String,
    /// What to connect to.
    pub to: Target,
    /// How long the agent may take to connect, in milliseconds.
    pub within_ms: u64,
}

/// Where a [`Request`] connects, inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// The first of these addresses that answers, from the container's network namespace.
    Tcp(Vec<SocketAddr>),
    /// The unix socket at `path` as the container sees it, reached as `user` (the image's
    /// user when `None`) with that user's permissions.
    Unix {
        /// Absolute path inside the container.
        path: String,
        /// Who connects.
        user: Option<WireIdentity>,
    },
    /// The container's exec `id` (made by the gateway through the node's API), started
    /// attached: the stream carries its stdin one way and its output the other, as the
    /// engine's hijacked connection does (multiplexed stdout/stderr unless `tty`).
    Exec {
        /// The exec's id.
        id: String,
        /// Whether the exec has a terminal.
        tty: bool,
    },
    /// Carry many streams over this connection from now on (yamux), each with a request of
    /// its own. Only as a connection's first request.
    Mux,
}

/// [`Identity`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireIdentity {
    /// User id.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl From<&Identity> for WireIdentity {
    fn from(i: &Identity) -> Self {
        WireIdentity {
            uid: i.uid,
            gid: i.gid,
            groups: i.groups.clone(),
        }
    }
}

impl From<WireIdentity> for Identity {
    fn from(i: WireIdentity) -> Self {
        Identity {
            uid: i.uid,
            gid: i.gid,
            groups: i.groups,
        }
    }
}

/// The agent's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Answer {
    /// Connected: the connection's bytes follow.
    Ok,
    /// Not connected, and why (what the user is told, as on one host).
    Failed {
        /// The kind of failure.
        kind: Failure,
        /// What went wrong, for the user and the log.
        message: String,
    },
}

/// The kinds of [`Answer::Failed`], close to [`io::ErrorKind`]'s, so the gateway tells the
/// user "connection refused" for a refused connect whichever way it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// Nothing listens there.
    Refused,
    /// No answer within the request's time.
    TimedOut,
    /// The user may not reach it.
    PermissionDenied,
    /// No such socket or file.
    NotFound,
    /// The address is not available in the container (no IPv6 there, say).
    AddrNotAvailable,
    /// The network or host cannot be reached from the container.
    Unreachable,
    /// The container is not one the agent serves (not labgate's, not running, not here).
    NoContainer,
    /// The request was not understood (another version, a malformed line).
    BadRequest,
    /// Anything else.
    Other,
}

impl Failure {
    /// The kind of `e`.
    pub fn of(e: &io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::TimedOut => Failure::TimedOut,
            io::ErrorKind::PermissionDenied => Failure::PermissionDenied,
            io::ErrorKind::NotFound => Failure::NotFound,
            io::ErrorKind::AddrNotAvailable => Failure::AddrNotAvailable,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                Failure::Unreachable
            }
            _ => Failure::Other,
        }
    }

    /// The [`io::ErrorKind`] the gateway reports for this kind.
    pub fn io_kind(self) -> io::ErrorKind {
        match self {
            Failure::Refused => io::ErrorKind::ConnectionRefused,
            Failure::TimedOut => io::ErrorKind::TimedOut,
            Failure::PermissionDenied => io::ErrorKind::PermissionDenied,
            Failure::NotFound | Failure::NoContainer => io::ErrorKind::NotFound,
            Failure::AddrNotAvailable => io::ErrorKind::AddrNotAvailable,
            Failure::Unreachable => io::ErrorKind::HostUnreachable,
            Failure::BadRequest => io::ErrorKind::InvalidInput,
            Failure::Other => io::ErrorKind::Other,
        }
    }
}

/// Writes `value` as one line.
pub async fn write_line<W, T>(w: &mut W, value: &T) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

/// Reads one line of at most [`LINE_LIMIT`] bytes and parses it; bytes after the line stay
/// in `r`'s buffer.
pub async fn read_line<R, T>(r: &mut R) -> io::Result<T>
where
    R: AsyncBufRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended before a whole line",
            ));
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > LINE_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line longer than {LINE_LIMIT} bytes"),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            break;
        }
    }
    serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, BufReader};

    #[tokio::test]
    async fn a_request_and_its_answer_round_trip_and_bytes_after_the_line_stay_readable() {
        let req = Request {
            v: VERSION,
            container: "abc".into(),
            to: Target::Unix {
                path: "/run/x.sock".into(),
                user: Some(WireIdentity {
                    uid: 1000,
                    gid: 1000,
                    groups: vec![27],
                }),
            },
            within_ms: 9000,
        };
        let mut wire = Vec::new();
        write_line(&mut wire, &req).await.unwrap();
        write_line(&mut wire, &Answer::Ok).await.unwrap();
        wire.extend_from_slice(b"raw bytes");
        let mut r = BufReader::new(&wire[..]);
        assert_eq!(read_line::<_, Request>(&mut r).await.unwrap(), req);
        assert_eq!(read_line::<_, Answer>(&mut r).await.unwrap(), Answer::Ok);
        let mut rest = String::new();
        r.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "raw bytes");
    }

    #[tokio::test]
    async fn an_endless_line_a_cut_line_and_unknown_fields_are_refused() {
        let long = vec![b'x'; LINE_LIMIT + 10];
        let e = read_line::<_, Answer>(&mut BufReader::new(&long[..]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        let e = read_line::<_, Answer>(&mut BufReader::new(&b"{\"ok\""[..]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = read_line::<_, Request>(&mut BufReader::new(
            &b"{\"v\":1,\"container\":\"a\",\"to\":{\"tcp\":[]},\"within_ms\":1,\"as_root\":true}\n"[..],
        ))
        .await
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn failures_keep_the_kind_the_user_is_told() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::TimedOut,
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::NotFound,
            io::ErrorKind::AddrNotAvailable,
            io::ErrorKind::HostUnreachable,
        ] {
            assert_eq!(Failure::of(&io::Error::from(kind)).io_kind(), kind);
        }
    }
}
