//! The live connections: who is logged in, from where, to which container, with how many
//! sessions and forwards open, and the way to end each connection.
//!
//! A connection is registered when its user authenticates and deregistered when its handler
//! is dropped ([`Registration`]), so the registry never keeps a dead connection. Idle stop
//! asks it whether a container is in use, the admin API lists and kicks through it, and the
//! key-removal watcher finds the connections whose key is gone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use russh::keys::PublicKey;
use tokio_util::sync::CancellationToken;

use crate::auth::Username;
use crate::metrics::{Live, metrics};

/// Counts of what a connection has open; shared with its channel and forward tasks.
#[derive(Debug, Default)]
pub struct ConnStats {
    sessions: AtomicUsize,
    forwards: AtomicUsize,
}

impl ConnStats {
    /// Counts one running session (here and in the metrics) until the guard is dropped.
    pub fn session(self: &Arc<Self>) -> Open {
        Open::new(self.clone(), Kind::Session)
    }

    /// Counts one open forward (here and in the metrics) until the guard is dropped.
    pub fn forward(self: &Arc<Self>) -> Open {
        Open::new(self.clone(), Kind::Forward)
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Forwards open now.
    pub fn forwards(&self) -> usize {
        self.forwards.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Session,
    Forward,
}

/// One open session or forward; dropping it gives the counts back.
#[must_use = "the count is given back when this is dropped"]
pub struct Open {
    stats: Arc<ConnStats>,
    kind: Kind,
    _metric: Live,
}

impl Open {
    fn new(stats: Arc<ConnStats>, kind: Kind) -> Self {
        let metric = match kind {
            Kind::Session => {
                stats.sessions.fetch_add(1, Ordering::Relaxed);
                metrics().session()
            }
            Kind::Forward => {
                stats.forwards.fetch_add(1, Ordering::Relaxed);
                metrics().forward()
            }
        };
        Open {
            stats,
            kind,
            _metric: metric,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let counter = match self.kind {
            Kind::Session => &self.stats.sessions,
            Kind::Forward => &self.stats.forwards,
        };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What is known of one authenticated connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Connection id (as in the logs).
    pub conn: u64,
    /// Its user.
    pub user: Username,
    /// The container it works in.
    pub container: String,
    /// Client address.
    pub peer: SocketAddr,
    /// Fingerprint of the key it logged in with.
    pub fingerprint: String,
    /// The key itself, for the key-removal check (`None` for a certificate login: its key is
    /// in no file).
    pub key: Option<PublicKey>,
    /// When it authenticated.
    pub since: SystemTime,
    /// Its open sessions and forwards.
    pub stats: Arc<ConnStats>,
}

struct Entry {
    info: ConnectionInfo,
    end: CancellationToken,
    _metric: Live,
}

/// The gateway's live connections.
#[derive(Default)]
pub struct Connections {
    live: Mutex<HashMap<u64, Entry>>,
}

impl Connections {
    fn live(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an authenticated connection; `end` is cancelled to disconnect it. It stays
    /// registered until the returned guard is dropped.
    pub fn register(
        self: &Arc<Self>,
        info: ConnectionInfo,
        end: CancellationToken,
    ) -> Registration {
        let conn = info.conn;
        self.live().insert(
            conn,
            Entry {
                info,
                end,
                _metric: metrics().connection(),
            },
        );
        Registration {
            registry: self.clone(),
            conn,
        }
    }

    /// Every live connection.
    pub fn list(&self) -> Vec<ConnectionInfo> {
        let mut out: Vec<_> = self.live().values().map(|e| e.info.clone()).collect();
        out.sort_by_key(|c| c.conn);
        out
    }

    /// Whether any connection works in `container`.
    pub fn in_use(&self, container: &str) -> bool {
        self.live().values().any(|e| e.info.container == container)
    }

    /// Disconnects every connection of `user`; returns how many were asked to end.
    pub fn kick(&self, user: &Username) -> usize {
        self.end_where(|c| &c.user == user)
    }

    /// Disconnects the connections `pick` selects; returns how many.
    pub fn end_where(&self, pick: impl Fn(&ConnectionInfo) -> bool) -> usize {
        let live = self.live();
        let mut n = 0;
        for e in live.values().filter(|e| pick(&e.info)) {
            e.end.cancel();
            n += 1;
        }
        n
    }
}

/// How often the key files of connected users are read again when
/// `[server] end_sessions_on_key_removal` is on.
const KEY_CHECK_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// With `[server] end_sessions_on_key_removal`, ends the connections whose key is no longer
/// in their user's key file (or whose file is gone); runs until `stop` turns true. A key
/// file that cannot be read (permissions, I/O) ends nothing: only a definite removal does.
pub async fn end_when_key_removed(
    ctx: Arc<super::Context>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(KEY_CHECK_PERIOD) => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
        let (enabled, store) = {
            let config = ctx.config.borrow();
            (
                config.server.end_sessions_on_key_removal,
                crate::auth::KeyStore::new(config.server.keys_dir.clone()),
            )
        };
        if !enabled {
            continue;
        }
        for c in ctx.connections.list() {
            let Some(key) = &c.key else { continue };
            let gone = match store.load(&c.user).await {
                Ok(None) => true,
                Ok(Some(file)) => file.find(key).is_none(),
                Err(e) => {
                    tracing::debug!(user = %c.user, "key file unreadable, connection kept: {e}");
                    false
                }
            };
            if gone && ctx.connections.end_where(|k| k.conn == c.conn) > 0 {
                tracing::info!(target: "audit", user = %c.user, conn = c.conn, fingerprint = %c.fingerprint, "connection ended: key removed");
            }
        }
    }
}

/// Keeps a connection registered; dropping it (with the connection's handler) removes it.
pub struct Registration {
    registry: Arc<Connections>,
    conn: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.live().remove(&self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(conn: u64, user: &str) -> ConnectionInfo {
        let key =
            russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
                .unwrap()
                .public_key()
                .clone();
        ConnectionInfo {
            conn,
            user: Username::parse(user).unwrap(),
            container: format!("labgate-{user}"),
            peer: "127.0.0.1:5000".parse().unwrap(),
            fingerprint: "SHA256:x".into(),
            key: Some(key),
            since: SystemTime::now(),
            stats: Arc::default(),
        }
    }

    #[test]
    fn registration_lives_as_long_as_its_guard_and_kick_ends_only_that_user() {
        let reg = Arc::new(Connections::default());
        let (a, b) = (CancellationToken::new(), CancellationToken::new());
        let ga = reg.register(info(1, "alice"), a.clone());
        let gb = reg.register(info(2, "bob"), b.clone());
        assert!(reg.in_use("labgate-alice"));
        assert_eq!(reg.kick(&Username::parse("alice").unwrap()), 1);
        assert!(a.is_cancelled());
        assert!(!b.is_cancelled());
        drop(ga);
        assert!(!reg.in_use("labgate-alice"));
        assert!(reg.in_use("labgate-bob"));
        assert_eq!(reg.list().len(), 1);
        drop(gb);
        assert!(reg.list().is_empty());
    }

    #[test]
    fn open_guards_count_sessions_and_forwards() {
        let stats = Arc::new(ConnStats::default());
        let s = stats.session();
        let f1 = stats.forward();
        let f2 = stats.forward();
        assert_eq!((stats.sessions(), stats.forwards()), (1, 2));
        drop((s, f1));
        assert_eq!((stats.sessions(), stats.forwards()), (0, 1));
        drop(f2);
        assert_eq!(stats.forwards(), 0);
    }
}
