//! Admission of connections before and at authentication.
//!
//! - Connections not yet authenticated have their own bound, `max_startups`. Past it a new
//!   connection is still accepted and the *oldest* unauthenticated one of the address with
//!   the most of them is closed: a crowd that never logs in (hundreds from one NAT) churns
//!   itself, a client from another address is not touched, and a real client behind the
//!   crowd's NAT, who authenticates within a second, is never its oldest. The accept loop
//!   never waits.
//! - An authenticated connection counts against `max_connections`, and against its user's
//!   `max_connections_per_user` (all profiles of the user together); a login past either
//!   is refused, so one user cannot lock the others out.
//! - A refusal to an address that keeps failing waits its back-off ([`super::throttle`]),
//!   once per connection; a successful login never waits.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::auth::Username;
use crate::metrics::metrics;

use super::throttle::{FailureTable, Source, ThrottlePolicy};

/// Connections not yet authenticated, at most `max` of them, grouped by where they come
/// from (`K`) and oldest first within each group.
#[derive(Debug)]
pub struct Startups<K, T> {
    /// The bound.
    max: usize,
    /// By source, then by connection id; ids grow with accept order, so a group's first
    /// entry is its oldest.
    waiting: HashMap<K, BTreeMap<u64, T>>,
    /// Connections waiting, over all sources.
    len: usize,
}

impl<K: Hash + Eq + Copy, T> Startups<K, T> {
    /// An empty set bounded at `max` (at least 1).
    pub fn new(max: usize) -> Startups<K, T> {
        Startups {
            max: max.max(1),
            waiting: HashMap::new(),
            len: 0,
        }
    }

    /// Adds connection `id` (newer than any before it) from `source`; when that makes one
    /// too many, pushes out and returns the oldest connection of the source with the most
    /// waiting (the crowd pays, not a client from elsewhere; a tie goes to the source
    /// holding the oldest connection).
    pub fn admit(&mut self, source: K, id: u64, item: T) -> Option<(u64, T)> {
        self.waiting.entry(source).or_default().insert(id, item);
        self.len += 1;
        if self.len <= self.max {
            return None;
        }
        let crowd = self
            .waiting
            .iter()
            .filter_map(|(k, m)| Some((*k, m.len(), *m.keys().next()?)))
            .max_by_key(|(_, n, oldest)| (*n, Reverse(*oldest)))
            .map(|(k, _, _)| k)?;
        let group = self.waiting.get_mut(&crowd)?;
        let out = group.pop_first();
        if group.is_empty() {
            self.waiting.remove(&crowd);
        }
        self.len -= usize::from(out.is_some());
        out
    }

    /// Takes `id` from `source` out (it authenticated, or it ended); its item if it was
    /// still there.
    pub fn remove(&mut self, source: K, id: u64) -> Option<T> {
        let group = self.waiting.get_mut(&source)?;
        let item = group.remove(&id);
        if group.is_empty() {
            self.waiting.remove(&source);
        }
        self.len -= usize::from(item.is_some());
        item
    }

    /// Connections waiting now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Closes a connection's socket from outside its task: a duplicate of its descriptor, shut
/// down both ways. A read blocked anywhere ends at once, including the version exchange and
/// a stalled key exchange, where russh does not act on `Handle::disconnect`.
#[derive(Debug)]
pub struct Closer(std::net::TcpStream);

impl Closer {
    /// A closer for `socket` (one more descriptor, held while the connection is
    /// unauthenticated).
    pub fn new(socket: &tokio::net::TcpStream) -> std::io::Result<Closer> {
        use std::os::fd::AsFd;
        let fd = socket.as_fd().try_clone_to_owned()?;
        Ok(Closer(std::net::TcpStream::from(fd)))
    }

    /// Shuts the socket down; the connection's task sees end of file and ends.
    pub fn close(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// The connection task's view of its connection's admission: whether it authenticated, and
/// a way to close it while it has not (for the login grace timer).
#[derive(Debug)]
pub struct PreAuthHandle {
    /// Set by [`Ticket::authenticate`].
    authenticated: Arc<AtomicBool>,
    /// Alive while the connection is among the unauthenticated.
    closer: Weak<Closer>,
}

impl PreAuthHandle {
    /// Whether the connection has authenticated.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::SeqCst)
    }

    /// Closes the connection if it is still unauthenticated.
    pub fn close(&self) {
        if let Some(closer) = self.closer.upgrade() {
            closer.close();
        }
    }
}

/// A login refused because `max_connections` connections are authenticated.
#[derive(Debug, thiserror::Error)]
#[error("the gateway is full: {0} connection(s) logged in (max_connections)")]
pub struct Full(pub usize);

/// Why [`Ticket::authenticate`] refused a login.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// `max_connections` connections are authenticated.
    #[error(transparent)]
    Full(#[from] Full),
    /// The user holds `max_connections_per_user` of them.
    #[error("{user} has {max} connection(s) logged in (max_connections_per_user = {max})")]
    User {
        /// The user (the account, whatever profile each connection used).
        user: Username,
        /// The bound.
        max: usize,
    },
}

/// Authenticated connections by user, each bounded.
#[derive(Debug)]
struct PerUser {
    /// The bound (`max_connections_per_user`).
    max: usize,
    /// Connections of each user holding one now; a user with none has no entry.
    count: HashMap<Username, usize>,
}

/// The unauthenticated connections and what the bound has closed.
#[derive(Debug)]
struct PreAuth {
    /// Who waits, with the means to close them.
    startups: Startups<Source, Arc<Closer>>,
    /// Closed by the bound since the last warning.
    closed: u64,
    /// When the bound was last warned about (at most one warning a minute).
    warned: Option<Instant>,
}

/// The gateway's admission state, shared by the accept loop and every connection.
#[derive(Debug)]
pub struct Admission {
    /// Unauthenticated connections.
    pre_auth: Mutex<PreAuth>,
    /// `max_startups`, for messages.
    max_startups: usize,
    /// One permit per authenticated connection.
    authenticated: Arc<Semaphore>,
    /// `max_connections`, for messages.
    max_connections: usize,
    /// Authenticated connections of each user, against `max_connections_per_user`.
    per_user: Arc<Mutex<PerUser>>,
    /// Recent authentication failures by address.
    failures: Mutex<FailureTable>,
}

impl Admission {
    /// Admission with these bounds and the default back-off.
    pub fn new(
        max_startups: usize,
        max_connections: usize,
        max_connections_per_user: usize,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            pre_auth: Mutex::new(PreAuth {
                startups: Startups::new(max_startups),
                closed: 0,
                warned: None,
            }),
            max_startups,
            authenticated: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            per_user: Arc::new(Mutex::new(PerUser {
                max: max_connections_per_user.max(1),
                count: HashMap::new(),
            })),
            failures: Mutex::new(FailureTable::new(ThrottlePolicy::default())),
        })
    }

    /// Admits connection `conn` (ids grow with accept order) as unauthenticated; past
    /// `max_startups` the oldest unauthenticated connection of the largest crowd is closed. Returns the
    /// connection's ticket (for its handler) and a handle that closes it while it is
    /// unauthenticated (for the login grace timer). Fails only if the socket's descriptor
    /// cannot be duplicated (out of descriptors): the caller drops the connection.
    pub fn admit(
        self: &Arc<Self>,
        conn: u64,
        peer: SocketAddr,
        socket: &tokio::net::TcpStream,
    ) -> std::io::Result<(Ticket, PreAuthHandle)> {
        let source = Source::of(peer.ip());
        let closer = Arc::new(Closer::new(socket)?);
        let authenticated = Arc::new(AtomicBool::new(false));
        let handle = PreAuthHandle {
            authenticated: authenticated.clone(),
            closer: Arc::downgrade(&closer),
        };
        let evicted = {
            let mut pre = lock(&self.pre_auth);
            let evicted = pre.startups.admit(source, conn, closer);
            metrics().unauthenticated(pre.startups.len());
            if evicted.is_some() {
                metrics().startup_closed();
                pre.closed += 1;
                let now = Instant::now();
                if pre
                    .warned
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
                {
                    warn!(
                        "max_startups ({}) unauthenticated connections reached: closed {} (the oldest of the largest crowd)",
                        self.max_startups, pre.closed
                    );
                    pre.warned = Some(now);
                    pre.closed = 0;
                }
            }
            evicted
        };
        if let Some((old, closer)) = evicted {
            debug!(
                closed_conn = old,
                "closing the oldest unauthenticated connection"
            );
            closer.close();
        }
        let ticket = Ticket {
            admission: self.clone(),
            conn,
            source,
            authenticated,
            permit: None,
            user: None,
            delayed: false,
        };
        Ok((ticket, handle))
    }

    /// Unauthenticated connections now.
    pub fn unauthenticated(&self) -> usize {
        lock(&self.pre_auth).startups.len()
    }
}

/// A connection's place in [`Admission`]: unauthenticated until [`Ticket::authenticate`];
/// dropping it (the connection ended) frees its place.
#[derive(Debug)]
pub struct Ticket {
    /// The shared state.
    admission: Arc<Admission>,
    /// Connection id (its place among the unauthenticated).
    conn: u64,
    /// Where its failures count.
    source: Source,
    /// Shared with the connection task's [`PreAuthHandle`].
    authenticated: Arc<AtomicBool>,
    /// Held once authenticated.
    permit: Option<OwnedSemaphorePermit>,
    /// The user's place, held once authenticated.
    user: Option<UserPlace>,
    /// Whether a refusal on this connection already waited its back-off.
    delayed: bool,
}

impl Ticket {
    /// Counts the connection as authenticated as `user` (it leaves the unauthenticated
    /// set), unless `max_connections` are, or `max_connections_per_user` of the user's: then
    /// it stays unauthenticated and the login is to be refused.
    pub fn authenticate(&mut self, user: &Username) -> Result<(), Refused> {
        if self.permit.is_some() {
            return Ok(());
        }
        let place = UserPlace::take(&self.admission.per_user, user)?;
        let permit = self
            .admission
            .authenticated
            .clone()
            .try_acquire_owned()
            .map_err(|_| Full(self.admission.max_connections))?;
        self.permit = Some(permit);
        self.user = Some(place);
        self.authenticated.store(true, Ordering::SeqCst);
        let mut pre = lock(&self.admission.pre_auth);
        pre.startups.remove(self.source, self.conn);
        metrics().unauthenticated(pre.startups.len());
        Ok(())
    }

    /// Counts a refused authentication attempt against the client's address and, if the
    /// address is backing off, waits its delay: only the first refusal of a connection
    /// waits, so a real user behind the same address waits at most once for a key of hers
    /// that is not the right one (and never for the right one).
    pub async fn refused(&mut self) {
        let verdict = lock(&self.admission.failures).fail(self.source, Instant::now());
        if verdict.started {
            metrics().auth_backoff();
            warn!(source = %self.source, "auth failures from {}: backing off", self.source);
        }
        if !verdict.delay.is_zero() && !self.delayed {
            self.delayed = true;
            tokio::time::sleep(verdict.delay).await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.permit.is_none() {
            let mut pre = lock(&self.admission.pre_auth);
            pre.startups.remove(self.source, self.conn);
            metrics().unauthenticated(pre.startups.len());
        }
    }
}

/// One authenticated connection of a user, counted in [`PerUser`] until dropped.
#[derive(Debug)]
struct UserPlace {
    /// The shared counts.
    per_user: Arc<Mutex<PerUser>>,
    /// Whose place.
    user: Username,
}

impl UserPlace {
    /// Takes a place for `user`, unless the user holds the bound.
    fn take(per_user: &Arc<Mutex<PerUser>>, user: &Username) -> Result<UserPlace, Refused> {
        let mut table = lock(per_user);
        let max = table.max;
        let count = table.count.entry(user.clone()).or_insert(0);
        if *count >= max {
            return Err(Refused::User {
                user: user.clone(),
                max,
            });
        }
        *count += 1;
        Ok(UserPlace {
            per_user: per_user.clone(),
            user: user.clone(),
        })
    }
}

impl Drop for UserPlace {
    fn drop(&mut self) {
        let mut table = lock(&self.per_user);
        if let Some(count) = table.count.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                table.count.remove(&self.user);
            }
        }
    }
}

/// Locks `m`, recovering from poisoning (the guarded state is plain bookkeeping that a
/// panic cannot leave half-updated in a harmful way).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAT: u8 = 7;

    #[test]
    fn past_the_bound_the_oldest_is_pushed_out() {
        let mut s = Startups::new(3);
        for id in 1..=3 {
            assert_eq!(s.admit(NAT, id, id * 10), None);
        }
        assert_eq!(s.admit(NAT, 4, 40), Some((1, 10)));
        assert_eq!(s.admit(NAT, 5, 50), Some((2, 20)));
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn an_authenticated_connection_leaves_and_is_never_pushed_out() {
        let mut s = Startups::new(2);
        s.admit(NAT, 1, ());
        s.admit(NAT, 2, ());
        // Connection 1 authenticates: it leaves the set, making room.
        assert_eq!(s.remove(NAT, 1), Some(()));
        assert_eq!(s.admit(NAT, 3, ()), None);
        // The crowd goes on arriving: 2, then 3 are pushed out, never 1 again.
        assert_eq!(s.admit(NAT, 4, ()).map(|e| e.0), Some(2));
        assert_eq!(s.admit(NAT, 5, ()).map(|e| e.0), Some(3));
        assert_eq!(s.remove(NAT, 1), None);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_fresh_client_survives_a_churning_crowd_until_max_newer_ones_arrive() {
        let max = 50;
        let mut s = Startups::new(max);
        let mut next = 0u64;
        let mut pushed_out = Vec::new();
        for _ in 0..300 {
            next += 1;
            pushed_out.extend(s.admit(NAT, next, ()).map(|e| e.0));
        }
        next += 1;
        let real = next;
        pushed_out.extend(s.admit(NAT, real, ()).map(|e| e.0));
        // Up to max - 1 newer crowd connections arrive before she authenticates.
        for _ in 0..max - 1 {
            next += 1;
            pushed_out.extend(s.admit(NAT, next, ()).map(|e| e.0));
        }
        assert!(!pushed_out.contains(&real));
        assert_eq!(
            s.remove(NAT, real),
            Some(()),
            "she is still waiting, not closed"
        );
        // Every arrival past the bound pushed out one crowd connection.
        assert_eq!(pushed_out.len(), 300 + 1 + (max - 1) - max);
    }

    #[test]
    fn the_largest_crowd_pays_and_other_addresses_keep_their_connections() {
        let mut s = Startups::new(10);
        // Two clients from elsewhere arrive first, so they are the oldest of all.
        s.admit(1u8, 1, ());
        s.admit(2u8, 2, ());
        let mut pushed_out = Vec::new();
        for id in 3..1000 {
            pushed_out.extend(s.admit(NAT, id, ()));
        }
        assert!(
            pushed_out.iter().all(|(id, _)| *id >= 3),
            "only the crowd is closed"
        );
        assert_eq!(s.remove(1, 1), Some(()));
        assert_eq!(s.remove(2, 2), Some(()));
        // Equal crowds: the one holding the oldest connection gives it up.
        let mut s = Startups::new(4);
        s.admit(1u8, 1, ());
        s.admit(2u8, 2, ());
        s.admit(2u8, 3, ());
        s.admit(1u8, 4, ());
        assert_eq!(s.admit(3u8, 5, ()).map(|e| e.0), Some(1));
        assert_eq!(s.len(), 4);
    }

    #[tokio::test]
    async fn tickets_move_between_the_bounds_and_free_their_place_on_drop() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        let mut sockets = Vec::new();
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            sockets.push(listener.accept().await.unwrap());
        }
        let admission = Admission::new(2, 1, 8);
        let (mut a, _) = admission.admit(1, sockets[0].1, &sockets[0].0).unwrap();
        let (mut b, b_handle) = admission.admit(2, sockets[1].1, &sockets[1].0).unwrap();
        assert_eq!(admission.unauthenticated(), 2);
        let alice = Username::parse("alice").unwrap();
        a.authenticate(&alice).unwrap();
        assert_eq!(admission.unauthenticated(), 1);
        assert!(b_handle.closer.upgrade().is_some());
        // One authenticated connection is the bound: b's login is refused, b still waits.
        assert!(matches!(b.authenticate(&alice), Err(Refused::Full(_))));
        assert_eq!(admission.unauthenticated(), 1);
        drop(a);
        b.authenticate(&alice).unwrap();
        assert_eq!(admission.unauthenticated(), 0);
        assert!(b_handle.is_authenticated());
        assert!(
            b_handle.closer.upgrade().is_none(),
            "an authenticated one is not closable"
        );
        let (c, _) = admission.admit(3, sockets[2].1, &sockets[2].0).unwrap();
        drop(c);
        assert_eq!(admission.unauthenticated(), 0);
    }

    #[tokio::test]
    async fn the_oldest_unauthenticated_socket_is_shut_down() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admission = Admission::new(1, 8, 8);
        let mut old_client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (old, old_peer) = listener.accept().await.unwrap();
        let (_old_ticket, _) = admission.admit(1, old_peer, &old).unwrap();
        let _new_client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (new, new_peer) = listener.accept().await.unwrap();
        let (_new_ticket, _) = admission.admit(2, new_peer, &new).unwrap();
        // The old connection's client sees end of file; its server side reads end too.
        let mut buf = [0u8; 8];
        assert_eq!(old_client.read(&mut buf).await.unwrap(), 0);
        let mut old = old;
        assert_eq!(old.read(&mut buf).await.unwrap(), 0);
        assert_eq!(admission.unauthenticated(), 1);
    }

    #[tokio::test]
    async fn a_user_holds_at_most_max_connections_per_user_and_others_still_log_in() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        let mut sockets = Vec::new();
        for _ in 0..4 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            sockets.push(listener.accept().await.unwrap());
        }
        let admission = Admission::new(8, 3, 2);
        let mut tickets: Vec<Ticket> = sockets
            .iter()
            .zip(1..)
            .map(|((s, peer), id)| admission.admit(id, *peer, s).unwrap().0)
            .collect();
        let alice = Username::parse("alice").unwrap();
        let bob = Username::parse("bob").unwrap();
        tickets[0].authenticate(&alice).unwrap();
        tickets[1].authenticate(&alice).unwrap();
        let refused = tickets[2].authenticate(&alice).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "alice has 2 connection(s) logged in (max_connections_per_user = 2)"
        );
        // The refusal took no place: bob gets the last one.
        tickets[3].authenticate(&bob).unwrap();
        assert_eq!(admission.unauthenticated(), 1);
        // One of alice's ends: her third gets in... once the gateway has room for it.
        drop(tickets.remove(0));
        tickets[1].authenticate(&alice).unwrap();
        assert!(lock(&admission.per_user).count.get(&alice) == Some(&2));
        drop(tickets);
        assert!(lock(&admission.per_user).count.is_empty());
    }
}
