//! The local Docker backend's way into a container ([`Reach`]): by entering the container's
//! namespaces from the host ([`super::netns`]: fast, and the container's own loopback) where
//! the gateway may (root in the host PID namespace; `[docker] forward_via`), else through
//! labgate's relay helper run as an exec of the user's ([`super::relay`]). Both act as the
//! user, under the same deadlines, and refuse the same things.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{DockerRuntime, direct, netns};
use crate::config::ForwardVia;
use crate::runtime::reach::{Acceptor, BoxedStream, Reach, ReachError, Reacher, literal};
use crate::runtime::relay::RelayReach;
use crate::runtime::{ContainerHandle, ContainerRuntime, Exec, ExecRequest, RuntimeError};

/// The way into one container for one login.
pub(super) struct DockerReach {
    /// The backend (the relay path runs execs through it).
    pub(super) runtime: Arc<DockerRuntime>,
    /// The container.
    pub(super) container: ContainerHandle,
    /// Who, and until when.
    pub(super) who: Reacher,
    /// The host PID of the container's init when its namespaces are entered; `None`: the
    /// relay path.
    pub(super) pid: Option<i32>,
}

impl DockerReach {
    /// The relay path into the same container, for the same login.
    fn relay(&self) -> RelayReach {
        RelayReach {
            runtime: self.runtime.clone(),
            container: self.container.clone(),
            who: self.who.clone(),
        }
    }
}

impl DockerRuntime {
    /// The host PID to enter `container`'s namespaces through, or `None` for the relay exec.
    /// Under `forward_via = "auto"` the first call probes whether namespaces can be entered,
    /// and the gateway logs which path it uses and why.
    pub(super) async fn way_in(&self, container: &ContainerHandle) -> Option<i32> {
        match self.forward_via {
            ForwardVia::Namespace => super::pid_of(container),
            ForwardVia::Exec => None,
            ForwardVia::Auto => {
                let pid = super::pid_of(container)?;
                let usable = *self
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
}

/// Looks `host` up in the `hosts` file text.
fn in_hosts_file(hosts: &str, host: &str) -> Vec<IpAddr> {
    hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let ip = words.next()?.parse::<IpAddr>().ok()?;
            words.any(|w| w.eq_ignore_ascii_case(host)).then_some(ip)
        })
        .collect()
}

/// A TCP listener made inside the container's network namespace.
struct TcpAcceptor(tokio::net::TcpListener);

#[async_trait]
impl Acceptor for TcpAcceptor {
    async fn accept(&mut self) -> Option<(BoxedStream, Option<SocketAddr>)> {
        loop {
            match self.0.accept().await {
                Ok((s, peer)) => return Some((Box::new(s), Some(peer))),
                Err(e) => {
                    warn!("remote forward accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A unix listener made in the container's mount namespace; its directory is removed (as
/// the user) when it drops.
struct UnixAcceptor {
    listener: tokio::net::UnixListener,
    pid: i32,
    dir: PathBuf,
    who: Option<crate::runtime::Identity>,
}

impl Drop for UnixAcceptor {
    fn drop(&mut self) {
        netns::remove_dir_detached(self.pid, std::mem::take(&mut self.dir), self.who.take());
    }
}

#[async_trait]
impl Acceptor for UnixAcceptor {
    async fn accept(&mut self) -> Option<(BoxedStream, Option<SocketAddr>)> {
        loop {
            match self.listener.accept().await {
                Ok((s, _)) => return Some((Box::new(s), None)),
                Err(e) => {
                    warn!("unix socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

#[async_trait]
impl Reach for DockerReach {
    async fn resolve(&self, host: &str, deadline: Instant) -> Result<Vec<IpAddr>, ReachError> {
        if let Some(ips) = literal(host) {
            return Ok(ips);
        }
        let Some(pid) = self.pid else {
            return self.relay().resolve(host, deadline).await;
        };
        {
            let hosts = netns::read_file(
                pid,
                PathBuf::from("/etc/hosts"),
                1 << 20,
                self.who.identity.as_ref(),
            )
            .await
            .unwrap_or_default();
            let found = in_hosts_file(&hosts, host);
            if !found.is_empty() {
                return Ok(found);
            }
        }
        // The container's own resolver (its resolv.conf, Docker's embedded DNS), through the
        // relay helper when it is mounted.
        self.relay().resolve(host, deadline).await
    }

    async fn connect_tcp(
        &self,
        addrs: Vec<SocketAddr>,
        deadline: Instant,
    ) -> Result<BoxedStream, ReachError> {
        if let Some(pid) = self.pid {
            let s = netns::connect_tcp(pid, addrs, deadline, &self.who.gone).await?;
            return Ok(Box::new(s));
        }
        self.relay().connect_tcp(addrs, deadline).await
    }

    async fn connect_unix(&self, path: &str, deadline: Instant) -> Result<BoxedStream, ReachError> {
        if let Some(pid) = self.pid {
            let s = netns::connect_unix(
                pid,
                PathBuf::from(path),
                self.who.identity.as_ref(),
                deadline,
                &self.who.gone,
            )
            .await?;
            return Ok(Box::new(s));
        }
        self.relay().connect_unix(path, deadline).await
    }

    async fn listen_tcp(
        &self,
        addr: SocketAddr,
    ) -> Result<(Box<dyn Acceptor>, SocketAddr), ReachError> {
        if let Some(pid) = self.pid {
            let listener = netns::bind_tcp(pid, addr, self.who.identity.as_ref()).await?;
            let bound = listener.local_addr()?;
            return Ok((Box::new(TcpAcceptor(listener)), bound));
        }
        self.relay().listen_tcp(addr).await
    }

    async fn listen_unix(&self, dir: &str, name: &str) -> Result<Box<dyn Acceptor>, ReachError> {
        match self.pid {
            Some(pid) => {
                let who = self.who.identity.clone();
                let listener =
                    netns::bind_unix(pid, PathBuf::from(dir), name, who.as_ref()).await?;
                Ok(Box::new(UnixAcceptor {
                    listener,
                    pid,
                    dir: PathBuf::from(dir),
                    who,
                }))
            }
            None => self.relay().listen_unix(dir, name).await,
        }
    }

    async fn start_stdio(&self, req: ExecRequest) -> Result<Exec, RuntimeError> {
        let runtime = self.runtime.as_ref();
        if runtime.relay_helper.is_file()
            && !runtime.direct_refused.contains(&self.container.id)
            && let Some(pid) = self.pid
        {
            match direct::exec(runtime, &self.container, pid, req.clone()).await {
                Ok(exec) => {
                    debug!("on the direct path (a socket into the container)");
                    return Ok(exec);
                }
                Err(e) => {
                    if matches!(e, direct::DirectError::NotReady(_)) {
                        runtime.direct_refused.insert(&self.container.id);
                    }
                    warn!(error = %e, "direct path not available: using the exec stream")
                }
            }
        }
        runtime.exec(&self.container, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn names_resolve_as_the_container_would() {
        assert_eq!(
            literal("127.0.0.1"),
            Some(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)])
        );
        assert_eq!(
            literal("[::1]"),
            Some(vec![IpAddr::V6(Ipv6Addr::LOCALHOST)])
        );
        assert_eq!(literal("LocalHost").map(|v| v.len()), Some(2));
        assert_eq!(literal("db.lab"), None);
        let hosts = "127.0.0.1 localhost\n# 10.0.0.1 db.lab\n10.0.0.2 db.lab db # the db\n";
        assert_eq!(
            in_hosts_file(hosts, "DB.lab"),
            vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
        assert!(in_hosts_file(hosts, "nope").is_empty());
    }
}
