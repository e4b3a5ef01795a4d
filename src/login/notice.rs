//! What the gateway tells the running sessions of one container as it happens: a GPU
//! reclaim's warning, its call-off, the stop. Events are data here, sent by whoever decides
//! them (`super::reclaim`); each running session subscribes for its own container and words
//! them with `session::text` (on a terminal among the program's output, else on stderr).
//!
//! A warning stands until it is called off or carried out: a session that starts running in
//! the meantime is shown it first, so no terminal of a warned container misses its deadline.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use crate::gpu::reclaim::CallOff;

/// Notices a slow session may fall behind by before it skips some.
const BACKLOG: usize = 64;

/// Something to tell a container's sessions.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Its GPUs have been idle since `idle_since` while others wait: it is stopped at
    /// `deadline` unless they are used.
    ReclaimWarning {
        /// Since when all its GPUs have been idle.
        idle_since: SystemTime,
        /// When it is stopped.
        deadline: SystemTime,
    },
    /// The warning no longer stands.
    ReclaimCalledOff {
        /// Why.
        why: CallOff,
    },
    /// It is being stopped now, its GPUs given to those who wait; idle since `idle_since`.
    Reclaimed {
        /// Since when all its GPUs had been idle.
        idle_since: SystemTime,
    },
}

/// An event for the sessions of one container.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// The container whose sessions are told.
    pub container: String,
    /// What they are told.
    pub event: Event,
}

/// The gateway's notices: a broadcast to every running session, and the warnings standing.
pub struct Notices {
    sender: broadcast::Sender<Notice>,
    /// The warning each container's sessions live under, by container.
    standing: Mutex<HashMap<String, Notice>>,
}

impl Default for Notices {
    fn default() -> Self {
        Notices {
            sender: broadcast::channel(BACKLOG).0,
            standing: Mutex::default(),
        }
    }
}

impl Notices {
    fn standing(&self) -> MutexGuard<'_, HashMap<String, Notice>> {
        self.standing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells `container`'s running sessions `event` (a warning then stands until the next
    /// event for that container).
    pub fn send(&self, container: &str, event: Event) {
        let notice = Notice {
            container: container.to_owned(),
            event,
        };
        {
            let mut standing = self.standing();
            match notice.event {
                Event::ReclaimWarning { .. } => {
                    standing.insert(notice.container.clone(), notice.clone());
                }
                _ => {
                    standing.remove(&notice.container);
                }
            }
        }
        // Nobody listening is fine: no session runs in it.
        let _ = self.sender.send(notice);
    }

    /// The reclaim warnings standing now: container, idle since, deadline; by container.
    pub fn warnings(&self) -> Vec<(String, SystemTime, SystemTime)> {
        let mut out: Vec<_> = self
            .standing()
            .values()
            .filter_map(|n| match n.event {
                Event::ReclaimWarning {
                    idle_since,
                    deadline,
                } => Some((n.container.clone(), idle_since, deadline)),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    /// Forgets `container`'s standing warning without telling anyone (it no longer runs).
    pub fn clear(&self, container: &str) {
        self.standing().remove(container);
    }

    /// The notices of `container` from now on, the standing warning first.
    pub fn subscribe(&self, container: &str) -> Subscription {
        let receiver = Some(self.sender.subscribe());
        let first = self.standing().get(container).cloned();
        Subscription {
            container: container.to_owned(),
            receiver,
            shown: first.clone(),
            first,
        }
    }
}

/// One session's notices.
pub struct Subscription {
    container: String,
    receiver: Option<broadcast::Receiver<Notice>>,
    /// The standing warning, not yet handed out.
    first: Option<Notice>,
    /// The standing warning handed out first: the same one arriving again is not repeated.
    shown: Option<Notice>,
}

impl Subscription {
    /// A subscription that never yields (tests, and sessions nobody tells anything).
    pub fn none() -> Self {
        Subscription {
            container: String::new(),
            receiver: None,
            first: None,
            shown: None,
        }
    }

    fn take(&mut self, notice: Notice) -> Option<Event> {
        if notice.container != self.container || self.shown.as_ref() == Some(&notice) {
            return None;
        }
        self.shown = None;
        Some(notice.event)
    }

    /// The next event for this container; pends forever once the gateway has no sender.
    pub async fn next(&mut self) -> Event {
        if let Some(first) = self.first.take() {
            return first.event;
        }
        loop {
            let Some(receiver) = self.receiver.as_mut() else {
                return std::future::pending().await;
            };
            match receiver.recv().await {
                Ok(notice) => {
                    if let Some(event) = self.take(notice) {
                        return event;
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => self.receiver = None,
            }
        }
    }

    /// An event already sent and not yet handed out, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        if let Some(first) = self.first.take() {
            return Some(first.event);
        }
        loop {
            let receiver = self.receiver.as_mut()?;
            match receiver.try_recv() {
                Ok(notice) => {
                    if let Some(event) = self.take(notice) {
                        return Some(event);
                    }
                }
                Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Closed) => self.receiver = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warning(at: u64) -> Event {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(at);
        Event::ReclaimWarning {
            idle_since: t,
            deadline: t,
        }
    }

    #[tokio::test]
    async fn a_session_hears_its_own_container_and_a_late_one_the_warning_standing() {
        let notices = Notices::default();
        let mut early = notices.subscribe("labgate-alice");
        notices.send("labgate-bob", warning(1));
        notices.send("labgate-alice", warning(2));
        assert_eq!(early.next().await, warning(2), "bob's is not alice's");
        // A session that starts running now is shown the standing warning once.
        let mut late = notices.subscribe("labgate-alice");
        assert_eq!(late.try_next(), Some(warning(2)));
        assert_eq!(late.try_next(), None);
        // Called off: it no longer stands.
        let off = Event::ReclaimCalledOff {
            why: CallOff::UsedAgain,
        };
        notices.send("labgate-alice", off.clone());
        assert_eq!(early.try_next(), Some(off.clone()));
        assert_eq!(late.next().await, off);
        let mut later = notices.subscribe("labgate-alice");
        assert_eq!(later.try_next(), None);
        assert!(Subscription::none().try_next().is_none());
    }

    #[tokio::test]
    async fn the_standing_warning_is_not_repeated_when_it_also_arrives() {
        let notices = Notices::default();
        // Subscribed between the broadcast and the standing record: both carry it.
        let mut s = Subscription {
            container: "labgate-alice".into(),
            receiver: Some(notices.sender.subscribe()),
            first: None,
            shown: None,
        };
        notices.send("labgate-alice", warning(3));
        s.first = notices.standing().get("labgate-alice").cloned();
        s.shown = s.first.clone();
        assert_eq!(s.try_next(), Some(warning(3)));
        assert_eq!(s.try_next(), None);
    }
}
