//! Port forwarding into the user's container: `-L`/`-D` (direct-tcpip), unix sockets
//! (direct-streamlocal) and `-R` (tcpip-forward).
//!
//! Targets are resolved and reached *inside the user's container*: `localhost` is the
//! container's loopback, where Jupyter and TensorBoard listen. The backend's way in
//! ([`crate::runtime::reach`]) makes the sockets there, as the user; no host port is ever
//! published, and [`policy`] refuses everything outside the container unless the admin allows
//! it. [`pump`] carries the bytes. The container is started (or created) if a forward arrives
//! before any shell.

pub mod agent;
pub mod pump;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use russh::server::{ChannelOpenHandle, Handle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info};

use crate::codes::Coded;
use crate::config::policy::{self, Denied, PermitOpen};
use crate::login::{Context, Login};
use crate::runtime::reach::{BoxedStream, ReachError};

/// `-R` listeners one connection may hold at once.
pub const MAX_REMOTE_FORWARDS: usize = 64;

/// How long opening a forward may take (see [`crate::runtime::reach::CONNECT_TIMEOUT`]).
use crate::runtime::reach::CONNECT_TIMEOUT;
/// At most this many of the addresses a name resolves to are tried (a container's
/// `/etc/hosts` is the user's to write).
const MAX_ADDRESSES: usize = 8;

/// Why a forward was not opened.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Refused by policy (config switch, key option, or a target outside the container).
    #[error("refused: {0}")]
    Denied(#[from] Denied),
    /// The container could not be made ready.
    #[error("{0}")]
    Container(#[from] crate::runtime::RuntimeError),
    /// The container could not be reached inside (resolve, connect, listen).
    #[error("{0}")]
    Reach(#[from] ReachError),
    /// The name does not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// Too many forwards are being opened at once.
    #[error("{0}")]
    Busy(#[from] crate::login::pending::TooMany),
    /// Connecting or binding failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl crate::codes::Coded for ForwardError {
    fn code(&self) -> crate::codes::Code {
        use crate::codes::Code;
        match self {
            ForwardError::Denied(_) => Code::ForwardDenied,
            ForwardError::Container(e) => e.code(),
            ForwardError::Reach(ReachError::Runtime(e)) => e.code(),
            ForwardError::Reach(_) | ForwardError::Resolve(_) | ForwardError::Io(_) => {
                Code::ForwardUnreachable
            }
            ForwardError::Busy(_) => Code::ForwardBusy,
        }
    }
}

impl ForwardError {
    fn open_failure(&self) -> ChannelOpenFailure {
        match self {
            ForwardError::Denied(_) => ChannelOpenFailure::AdministrativelyProhibited,
            ForwardError::Busy(_) => ChannelOpenFailure::ResourceShortage,
            _ => ChannelOpenFailure::ConnectFailed,
        }
    }
}

fn require_port_forwarding(login: &Login) -> Result<(), Denied> {
    if login.key.options().port_forwarding {
        Ok(())
    } else {
        Err(Denied::Disabled("port (no-port-forwarding key option)"))
    }
}

/// The addresses the *gateway's* resolver gives for `host`, when an allow rule names it: a
/// rule that names a host vouches only for what that name is on the gateway, never for what
/// the user made it mean in the container's `/etc/hosts`. Empty when no rule names it or the
/// name does not resolve here.
async fn vouched(login: &Login, host: &str, port: u16, deadline: Instant) -> Vec<IpAddr> {
    if !login.quota.forwarding.names(host, port) {
        return Vec::new();
    }
    let lookup = tokio::net::lookup_host((host.to_owned(), port));
    match tokio::time::timeout_at(deadline, lookup).await {
        Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
        Ok(Err(e)) => {
            debug!(%host, error = %e, "an allowed name does not resolve on the gateway");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

/// Opens a direct-tcpip channel (`-L`, `-D`): connects to `host:port` from inside the
/// container, answers the open request, then carries bytes until both sides are done.
pub async fn direct_tcpip(
    ctx: Arc<Context>,
    login: Arc<Login>,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    host: String,
    port: u32,
) {
    let result: Result<BoxedStream, ForwardError> = async {
        require_port_forwarding(&login)?;
        if !login.quota.forwarding.local {
            return Err(Denied::Disabled("local").into());
        }
        let port = u16::try_from(port).map_err(|_| {
            ForwardError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("port {port} out of range"),
            ))
        })?;
        PermitOpen::parse(login.key.options().permit_open.iter().map(String::as_str))
            .check(&host, port)?;
        let _pending = ctx.pending.begin(&login.user, &login.opening)?;
        let container = crate::login::ensure_container(&ctx, &login).await?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let reach = login.reach(&ctx, &container).await;
        let ips = reach.resolve(&host, deadline).await?;
        let vouched = vouched(&login, &host, port, deadline).await;
        let mut allowed = Vec::new();
        let mut refusal = None;
        for ip in ips {
            match login
                .quota
                .forwarding
                .check(&host, ip, port, &container.ips, &vouched)
            {
                Ok(()) if allowed.len() < MAX_ADDRESSES => {
                    allowed.push(SocketAddr::new(ip, port));
                }
                Ok(()) => {}
                Err(e) => refusal = Some(e),
            }
        }
        if allowed.is_empty() {
            return Err(refusal
                .map(ForwardError::from)
                .unwrap_or_else(|| ForwardError::Resolve(host.clone())));
        }
        Ok(reach.connect_tcp(allowed, deadline).await?)
    }
    .await;
    match result {
        Ok(stream) => {
            info!(target: "audit", user = %login.user, %host, port, "forward opened");
            let _open = login.stats.forward();
            reply.accept().await;
            let moved = pump::pump(channel, stream, &login.gone).await;
            debug!(%host, port, up = moved.up, down = moved.down, "forward closed");
        }
        Err(e) => {
            let code = e.code();
            info!(target: "audit", user = %login.user, %host, port, code = code.as_str(), error = %e, "forward refused");
            code.count();
            reply.reject(e.open_failure()).await;
        }
    }
}

/// Opens a direct-streamlocal channel (`-L port:/path.sock`): connects to the unix socket
/// at `path` as the container sees it (relative paths are relative to the home directory),
/// as the container's user.
pub async fn direct_streamlocal(
    ctx: Arc<Context>,
    login: Arc<Login>,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    path: String,
) {
    let result: Result<BoxedStream, ForwardError> = async {
        require_port_forwarding(&login)?;
        if !login.quota.forwarding.unix {
            return Err(Denied::Disabled("unix socket").into());
        }
        let _pending = ctx.pending.begin(&login.user, &login.opening)?;
        let container = crate::login::ensure_container(&ctx, &login).await?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut target = std::path::PathBuf::from(login.home());
        target.push(&path);
        let reach = login.reach(&ctx, &container).await;
        Ok(reach
            .connect_unix(&target.to_string_lossy(), deadline)
            .await?)
    }
    .await;
    match result {
        Ok(stream) => {
            info!(target: "audit", user = %login.user, %path, "unix forward opened");
            let _open = login.stats.forward();
            reply.accept().await;
            pump::pump(channel, stream, &login.gone).await;
        }
        Err(e) => {
            let code = e.code();
            info!(target: "audit", user = %login.user, %path, code = code.as_str(), error = %e, "unix forward refused");
            code.count();
            reply.reject(e.open_failure()).await;
        }
    }
}

/// The `-R` listeners of one connection; they close when it does.
#[derive(Default)]
pub struct RemoteForwards {
    /// The accept loop of each listener, by the address and port the client asked for;
    /// at most [`MAX_REMOTE_FORWARDS`](MAX_REMOTE_FORWARDS).
    listeners: HashMap<(String, u32), JoinHandle<()>>,
}

impl RemoteForwards {
    /// Binds `address:port` inside the container and forwards each connection to the client.
    /// Returns the bound port (the chosen one when `port` is 0).
    pub async fn listen(
        &mut self,
        ctx: &Context,
        login: &Arc<Login>,
        handle: Handle,
        address: &str,
        port: u32,
    ) -> Result<u32, ForwardError> {
        require_port_forwarding(login)?;
        if !login.quota.forwarding.remote {
            return Err(Denied::Disabled("remote").into());
        }
        if !login.key.options().permits_listen(address, port) {
            return Err(Denied::ListenNotPermitted {
                host: address.to_owned(),
                port,
            }
            .into());
        }
        let max = MAX_REMOTE_FORWARDS;
        let replaces = port != 0 && self.listeners.contains_key(&(address.to_owned(), port));
        if self.listeners.len() >= max && !replaces {
            return Err(Denied::TooManyListeners(max).into());
        }
        let port16 = u16::try_from(port).map_err(|_| {
            ForwardError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "port out of range",
            ))
        })?;
        let container = crate::login::ensure_container(ctx, login).await?;
        let named = login.key.options().names_listen_address(address, port);
        let ip = policy::listen_ip(address, named).map_err(ForwardError::Resolve)?;
        let reach = login.reach(ctx, &container).await;
        let (mut listener, bound) = reach.listen_tcp(SocketAddr::new(ip, port16)).await?;
        let bound = u32::from(bound.port());
        let key = (address.to_owned(), if port == 0 { bound } else { port });
        let address = address.to_owned();
        let user = login.user.clone();
        info!(target: "audit", user = %user, %address, port = bound, "remote forward listening");
        let open = login.stats.forward();
        let gone = login.gone.clone();
        let task = tokio::spawn(
            async move {
                let _open = open;
                while let Some((stream, peer)) = listener.accept().await {
                    let peer = peer.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
                    let handle = handle.clone();
                    let address = address.clone();
                    let gone = gone.clone();
                    tokio::spawn(
                        async move {
                            match handle
                                .channel_open_forwarded_tcpip(
                                    address,
                                    bound,
                                    peer.ip().to_string(),
                                    u32::from(peer.port()),
                                )
                                .await
                            {
                                Ok(channel) => {
                                    pump::pump(channel, stream, &gone).await;
                                }
                                Err(e) => debug!("client refused a forwarded connection: {e}"),
                            }
                        }
                        .in_current_span(),
                    );
                }
            }
            .in_current_span(),
        );
        if let Some(old) = self.listeners.insert(key, task) {
            old.abort();
        }
        Ok(bound)
    }

    /// Stops the listener of `address:port`; false if there was none.
    pub fn cancel(&mut self, address: &str, port: u32) -> bool {
        match self.listeners.remove(&(address.to_owned(), port)) {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        }
    }
}

impl Drop for RemoteForwards {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}
