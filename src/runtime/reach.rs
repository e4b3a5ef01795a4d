//! The way into a running container: everything the SSH side does *inside* a user's
//! container besides running a process (forwards of every kind, agent sockets, name lookups,
//! the stdin/stdout fast path of commands without a terminal) goes through a [`Reach`] that
//! the backend makes for one container and one login ([`ContainerRuntime::reach`]).
//!
//! How it gets in is the backend's business: the local Docker backend enters the container's
//! namespaces from the host where it may, and runs labgate's relay helper through an exec
//! where it may not (and a remote backend would use the relay only). The session and forward
//! code never sees a host PID, a namespace or a relay.
//!
//! [`ContainerRuntime::reach`]: super::ContainerRuntime::reach

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Exec, ExecRequest, Identity, RuntimeError};

/// How long opening a forward may take, from its request to its connection: resolving the
/// name and trying every address it resolves to, together.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `localhost` and IP literals, which need no resolver.
pub(crate) fn literal(host: &str) -> Option<Vec<IpAddr>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(vec![ip]);
    }
    let name = bare.to_ascii_lowercase();
    (name == "localhost" || name == "localhost.localdomain" || name.ends_with(".localhost")).then(
        || {
            vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]
        },
    )
}

/// A byte stream to something inside a container.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A boxed [`Stream`].
pub type BoxedStream = Box<dyn Stream>;

/// A listener inside a container (`-R`, the agent socket). Dropping it closes it and removes
/// what it made there.
#[async_trait]
pub trait Acceptor: Send {
    /// The next connection to it, and where it came from when known; `None` once it has ended
    /// (the container went away).
    async fn accept(&mut self) -> Option<(BoxedStream, Option<SocketAddr>)>;
}

/// Who a [`Reach`] acts for: sockets and files inside the container are reached with this
/// user's credentials, and every wait ends when their connection does.
#[derive(Debug, Clone)]
pub struct Reacher {
    /// The user's identity in the container (`None`: the image's user).
    pub identity: Option<Identity>,
    /// Their home inside the container (where relay execs run).
    pub home: String,
    /// Cancelled when the connection has ended.
    pub gone: CancellationToken,
}

/// Why something inside the container could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ReachError {
    /// The name does not resolve inside the container.
    #[error("cannot resolve {0} inside the container")]
    Resolve(String),
    /// This way in cannot do it (a listener on the relay path, say).
    #[error("{0}")]
    Unsupported(&'static str),
    /// Starting what does it failed (the relay's exec).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Connecting, binding or reading failed (refused, timed out, not permitted...).
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The way into one running container, for one login.
#[async_trait]
pub trait Reach: Send + Sync {
    /// Resolves `host` as the container would: `localhost` is its loopback, IP literals are
    /// themselves, other names come from its `/etc/hosts`, then its own resolver.
    async fn resolve(&self, host: &str, deadline: Instant) -> Result<Vec<IpAddr>, ReachError>;

    /// Connects to the first reachable of `addrs` from inside the container, all of them
    /// together within `deadline`.
    async fn connect_tcp(
        &self,
        addrs: Vec<SocketAddr>,
        deadline: Instant,
    ) -> Result<BoxedStream, ReachError>;

    /// Connects to the unix socket at `path` (absolute, as the container sees it) as the
    /// user, within `deadline`.
    async fn connect_unix(&self, path: &str, deadline: Instant) -> Result<BoxedStream, ReachError>;

    /// Listens on `addr` inside the container (`-R`); the bound address with the listener.
    async fn listen_tcp(
        &self,
        addr: SocketAddr,
    ) -> Result<(Box<dyn Acceptor>, SocketAddr), ReachError>;

    /// Makes a fresh private directory `dir` (0700, the user's) with a unix socket `name`
    /// (0600) in it and listens there (the agent socket); removed when the listener drops.
    async fn listen_unix(&self, dir: &str, name: &str) -> Result<Box<dyn Acceptor>, ReachError>;

    /// Starts `req`, a program without a terminal, with its stdin and stdout on the fastest
    /// path the backend has into the container (falling back to the engine's exec stream).
    async fn start_stdio(&self, req: ExecRequest) -> Result<Exec, RuntimeError>;
}
