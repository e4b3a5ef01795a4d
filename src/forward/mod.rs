//! Port forwarding into the user's container: `-L`/`-D` (direct-tcpip), unix sockets
//! (direct-streamlocal) and `-R` (tcpip-forward).
//!
//! Targets are resolved and reached *inside the user's container*: `localhost` is the
//! container's loopback, where Jupyter and TensorBoard listen. Sockets are made from inside the
//! container's namespaces ([`netns`]), no host port is ever published, and [`policy`] refuses
//! everything outside the container unless the admin allows it. [`pump`] carries the bytes.
//! The container is started (or created) if a forward arrives before any shell.

pub mod agent;
pub mod netns;
pub mod pending;
pub mod policy;
pub mod pump;
pub mod relay;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{ChannelOpenHandle, Handle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use crate::config::ForwardVia;
use crate::runtime::ContainerHandle;
use crate::session::{Context, Login};
use policy::{Denied, PermitOpen};

/// How long opening a forward may take, from its request to its connection: resolving the
/// name and trying every address it resolves to, together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// The container's processes are not visible from the gateway (no host PID namespace).
    #[error("the container's namespaces are not reachable from the gateway")]
    NoNamespace,
    /// The name does not resolve inside the container.
    #[error("cannot resolve {0} inside the container")]
    Resolve(String),
    /// Too many forwards are being opened at once.
    #[error("{0}")]
    Busy(#[from] pending::TooMany),
    /// Connecting or binding failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
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

async fn container_pid(
    ctx: &Context,
    login: &Login,
) -> Result<(ContainerHandle, i32), ForwardError> {
    let container = crate::session::ensure_container(ctx, login).await?;
    let pid = container.pid.ok_or(ForwardError::NoNamespace)?;
    Ok((container, pid))
}

/// The way into a container: `Some(pid)` to enter its namespaces, `None` for the relay exec.
/// Under `forward_via = "auto"` the first forward probes whether namespaces can be entered
/// and the gateway logs which path it uses and why.
pub(crate) async fn way_in(ctx: &Context, container: &ContainerHandle) -> Option<i32> {
    let via = ctx.config.borrow().docker.forward_via;
    match via {
        ForwardVia::Namespace => container.pid,
        ForwardVia::Exec => None,
        ForwardVia::Auto => {
            let pid = container.pid?;
            let usable = *ctx
                .namespaces
                .get_or_init(|| async move {
                    let ok = netns::available(pid).await;
                    if ok {
                        info!("forwards enter containers' network namespaces (fast path)");
                    } else {
                        warn!("cannot enter containers' namespaces (not root, or not in the host PID namespace): forwards go through the relay exec");
                    }
                    ok
                })
                .await;
            usable.then_some(pid)
        }
    }
}

/// Either kind of connection to a target.
enum Connected<T> {
    Direct(T),
    Relayed(relay::RelayStream),
}

async fn pump_any<T>(channel: Channel<Msg>, c: Connected<T>, login: &Login) -> pump::Moved
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    match c {
        Connected::Direct(s) => pump::pump(channel, s, &login.gone).await,
        Connected::Relayed(s) => pump::pump(channel, s, &login.gone).await,
    }
}

/// Resolves `host` as the container would: `localhost` is its loopback, IP literals are
/// themselves, other names come from the container's `/etc/hosts`, then its own resolver.
async fn resolve(
    ctx: &Context,
    login: &Login,
    container: &ContainerHandle,
    pid: Option<i32>,
    host: &str,
    deadline: Instant,
) -> Result<Vec<IpAddr>, ForwardError> {
    if let Some(ips) = literal(host) {
        return Ok(ips);
    }
    if let Some(pid) = pid
        && let Ok(ips) = hosts_file(pid, host, login.identity()).await
    {
        return Ok(ips);
    }
    // The container's own resolver (its resolv.conf, Docker's embedded DNS), through the
    // relay helper when it is mounted.
    relay::resolve(ctx, login, container, host, deadline).await
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

/// `localhost` and IP literals, which need no resolver.
fn literal(host: &str) -> Option<Vec<IpAddr>> {
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

/// Looks `host` up in the container's `/etc/hosts` (read as the user).
async fn hosts_file(
    pid: i32,
    host: &str,
    who: Option<crate::runtime::Identity>,
) -> Result<Vec<IpAddr>, ForwardError> {
    let name = host.to_ascii_lowercase();
    let hosts = netns::read_file(pid, PathBuf::from("/etc/hosts"), 1 << 20, who.as_ref())
        .await
        .unwrap_or_default();
    let found: Vec<IpAddr> = hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let ip = words.next()?.parse::<IpAddr>().ok()?;
            words.any(|w| w.eq_ignore_ascii_case(&name)).then_some(ip)
        })
        .collect();
    if found.is_empty() {
        Err(ForwardError::Resolve(host.to_owned()))
    } else {
        Ok(found)
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
    let result: Result<Connected<tokio::net::TcpStream>, ForwardError> = async {
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
        let container = crate::session::ensure_container(&ctx, &login).await?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let pid = way_in(&ctx, &container).await;
        let ips = resolve(&ctx, &login, &container, pid, &host, deadline).await?;
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
        match pid {
            Some(pid) => Ok(Connected::Direct(
                netns::connect_tcp(pid, allowed, deadline, &login.gone).await?,
            )),
            None => {
                let mut last = None;
                for addr in allowed {
                    let args = vec!["tcp".into(), addr.ip().to_string(), addr.port().to_string()];
                    match relay::connect(&ctx, &login, &container, args, deadline).await {
                        Ok(s) => return Ok(Connected::Relayed(s)),
                        Err(e) => last = Some(e),
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                Err(last.unwrap_or_else(|| ForwardError::Resolve(host.clone())))
            }
        }
    }
    .await;
    match result {
        Ok(stream) => {
            info!(target: "audit", user = %login.user, %host, port, "forward opened");
            let _open = login.stats.forward();
            reply.accept().await;
            let moved = pump_any(channel, stream, &login).await;
            debug!(%host, port, up = moved.up, down = moved.down, "forward closed");
        }
        Err(e) => {
            info!(target: "audit", user = %login.user, %host, port, error = %e, "forward refused");
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
    let result: Result<Connected<tokio::net::UnixStream>, ForwardError> = async {
        require_port_forwarding(&login)?;
        if !login.quota.forwarding.unix {
            return Err(Denied::Disabled("unix socket").into());
        }
        let _pending = ctx.pending.begin(&login.user, &login.opening)?;
        let container = crate::session::ensure_container(&ctx, &login).await?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut target = PathBuf::from(format!("/home/{}", login.user));
        target.push(&path);
        match way_in(&ctx, &container).await {
            Some(pid) => Ok(Connected::Direct(
                netns::connect_unix(
                    pid,
                    target,
                    login.identity().as_ref(),
                    deadline,
                    &login.gone,
                )
                .await?,
            )),
            None => {
                let args = vec!["unix".into(), target.to_string_lossy().into_owned()];
                Ok(Connected::Relayed(
                    relay::connect(&ctx, &login, &container, args, deadline).await?,
                ))
            }
        }
    }
    .await;
    match result {
        Ok(stream) => {
            info!(target: "audit", user = %login.user, %path, "unix forward opened");
            let _open = login.stats.forward();
            reply.accept().await;
            pump_any(channel, stream, &login).await;
        }
        Err(e) => {
            info!(target: "audit", user = %login.user, %path, error = %e, "unix forward refused");
            reply.reject(e.open_failure()).await;
        }
    }
}

/// The `-R` listeners of one connection; they close when it does.
#[derive(Default)]
pub struct RemoteForwards {
    /// The accept loop of each listener, by the address and port the client asked for;
    /// at most [`MAX_REMOTE_FORWARDS`](crate::session::limits::MAX_REMOTE_FORWARDS).
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
        let max = crate::session::limits::MAX_REMOTE_FORWARDS;
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
        let (container, _) = container_pid(ctx, login).await?;
        let pid = way_in(ctx, &container)
            .await
            .ok_or(ForwardError::NoNamespace)?;
        let named = login.key.options().names_listen_address(address, port);
        let ip = policy::listen_ip(address, named).map_err(ForwardError::Resolve)?;
        let listener =
            netns::bind_tcp(pid, SocketAddr::new(ip, port16), login.identity().as_ref()).await?;
        let bound = u32::from(listener.local_addr()?.port());
        let key = (address.to_owned(), if port == 0 { bound } else { port });
        let address = address.to_owned();
        let user = login.user.clone();
        info!(target: "audit", user = %user, %address, port = bound, "remote forward listening");
        let open = login.stats.forward();
        let gone = login.gone.clone();
        let task = tokio::spawn(
            async move {
                let _open = open;
                loop {
                    let (stream, peer) = match listener.accept().await {
                        Ok(x) => x,
                        Err(e) => {
                            warn!("remote forward accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
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
