//! Bounds on forwards still being opened (resolving, connecting, binding): a user who opens
//! many forwards to targets that never answer must not pile up threads, sockets and tasks on
//! the gateway. Each open holds a [`Pending`] guard until it is connected or refused; past
//! [`PER_CONNECTION`] on one connection or [`PER_USER`] across all of a user's connections
//! (profiles included), further opens are refused at once. Open forwards are not counted
//! here: they are the client's to close.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::auth::Username;

/// Opens in progress one connection may have.
pub const PER_CONNECTION: usize = 64;
/// Opens in progress one user may have, over all their connections.
pub const PER_USER: usize = 256;

/// Why an open was refused here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TooMany {
    /// This connection has [`PER_CONNECTION`] opens in progress.
    #[error("{PER_CONNECTION} forwards of this connection are still being opened")]
    Connection,
    /// The user has [`PER_USER`] opens in progress.
    #[error("{PER_USER} of your forwards are still being opened")]
    User,
}

/// The opens in progress of every user (shared by all connections).
#[derive(Debug, Default)]
pub struct PendingOpens {
    /// Opens in progress per user; a user with none has no entry.
    users: Mutex<HashMap<Username, usize>>,
}

/// One open in progress; dropping it ends it.
#[derive(Debug)]
pub struct Pending {
    /// The shared table, to give the user's place back.
    opens: Arc<PendingOpens>,
    /// Whose open it is.
    user: Username,
    /// The connection's own count.
    conn: Arc<AtomicUsize>,
}

impl PendingOpens {
    /// Starts an open for `user` on the connection counting in `conn`, or says which bound
    /// it would pass.
    pub fn begin(
        self: &Arc<Self>,
        user: &Username,
        conn: &Arc<AtomicUsize>,
    ) -> Result<Pending, TooMany> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let mine = users.get(user).copied().unwrap_or(0);
        if mine >= PER_USER {
            return Err(TooMany::User);
        }
        conn.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < PER_CONNECTION).then_some(n + 1)
        })
        .map_err(|_| TooMany::Connection)?;
        users.insert(user.clone(), mine + 1);
        Ok(Pending {
            opens: self.clone(),
            user: user.clone(),
            conn: conn.clone(),
        })
    }

    /// Opens in progress of `user`.
    pub fn of(&self, user: &Username) -> usize {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users.get(user).copied().unwrap_or(0)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.conn.fetch_sub(1, Ordering::AcqRel);
        let mut users = self.opens.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_are_bounded_per_connection_and_per_user_and_given_back() {
        let opens = Arc::new(PendingOpens::default());
        let alice = Username::parse("alice").unwrap();
        let bob = Username::parse("bob").unwrap();
        let conns: Vec<Arc<AtomicUsize>> = (0..5).map(|_| Arc::default()).collect();

        let mut held: Vec<Pending> = (0..PER_CONNECTION)
            .map(|_| opens.begin(&alice, &conns[0]).unwrap())
            .collect();
        assert_eq!(
            opens.begin(&alice, &conns[0]).unwrap_err(),
            TooMany::Connection
        );
        // Other connections of hers go on until her own bound.
        for conn in &conns[1..4] {
            for _ in 0..PER_CONNECTION {
                held.push(opens.begin(&alice, conn).unwrap());
            }
        }
        assert_eq!(opens.of(&alice), PER_USER);
        assert_eq!(opens.begin(&alice, &conns[4]).unwrap_err(), TooMany::User);
        // A refusal takes no place; bob is not affected.
        assert_eq!(conns[4].load(Ordering::Acquire), 0);
        let bobs = opens.begin(&bob, &conns[4]).unwrap();

        held.truncate(PER_USER - 1);
        assert!(opens.begin(&alice, &conns[3]).is_ok());
        drop(held);
        drop(bobs);
        assert_eq!(opens.of(&alice), 0);
        assert!(opens.users.lock().unwrap().is_empty());
        assert!(conns.iter().all(|c| c.load(Ordering::Acquire) == 0));
    }
}
