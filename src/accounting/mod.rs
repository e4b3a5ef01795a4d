//! GPU accounting: who held GPUs, for how long, how busy they kept them, and how long logins
//! waited for them; kept in an embedded database in `[server] state_dir` (`usage.sqlite`, see
//! [`store`]), so it survives gateway restarts and config reloads.
//!
//! The usage sampler (`login::usage`) hands in what it saw every few seconds ([`Charge`]s,
//! one per holder); this module adds them up per user, profile and minute, keeps each
//! running hold's totals (an ended hold is returned once, for the audit log), and records
//! the queue's waits. It answers: each user's last 7 days (budgets, the login status line),
//! the history that orders the queue, and `labgate usage` ([`report`]). It knows nothing of
//! containers, sessions or engines.
//!
//! A database that cannot be opened (a read-only disk, a file from a newer labgate) does not
//! stop the gateway: it counts in memory and says so in its log and in `labgate check`.

pub mod report;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::auth::Username;
use crate::config::GpuUuid;
use store::Store;

/// The database's file name in `[server] state_dir`.
pub const FILE_NAME: &str = "usage.sqlite";

/// The window of a weekly budget and of the login line's "GPU this week".
pub const WEEK: Duration = Duration::from_secs(7 * 86_400);

/// How often the in-memory week totals are summed again from the database (between, each
/// sample is added to them), so usage older than a week drops out.
const WEEK_REFRESH: Duration = Duration::from_secs(600);

/// What can go wrong with the accounting database.
#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    /// The state directory or the file could not be made or opened.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused.
    #[error("{}: {source}", path.display())]
    Sql {
        /// The database.
        path: PathBuf,
        /// SQLite's answer.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer labgate.
    #[error(
        "{}: written by a newer labgate (schema {version}); it is left as it is",
        path.display()
    )]
    Newer {
        /// The database.
        path: PathBuf,
        /// Its schema version.
        version: i64,
    },
    /// Nothing has been recorded yet (no database file).
    #[error("{}: no GPU usage recorded yet (the gateway makes this file when it starts)", .0.display())]
    Missing(PathBuf),
    /// Neither the file nor a database in memory could be opened.
    #[error("no accounting database could be opened")]
    Unavailable,
    /// The blocking task doing the work failed.
    #[error("the accounting task failed: {0}")]
    Task(String),
}

impl AccountingError {
    fn sql(path: &Path, source: rusqlite::Error) -> Self {
        AccountingError::Sql {
            path: path.to_owned(),
            source,
        }
    }
}

/// One holder's use since the last sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    /// The holder (`user` or `user+profile`).
    pub holder: Username,
    /// The GPUs it holds.
    pub gpus: Vec<GpuUuid>,
    /// Since when it has held them (kept from its first charge).
    pub since: SystemTime,
    /// GPU-seconds held since the last sample (seconds × GPUs).
    pub held: f64,
    /// GPU-seconds busy: `held` weighted by each GPU's utilisation.
    pub busy: f64,
    /// The holder held GPUs at the last sample and none now: this is its last charge (the
    /// time since that sample), and its hold ends with it.
    pub last: bool,
}

/// A hold that ended (its holder held no GPUs at the last sample): its whole length.
#[derive(Debug, Clone, PartialEq)]
pub struct EndedHold {
    /// The holder.
    pub holder: Username,
    /// The GPUs it held last.
    pub gpus: Vec<GpuUuid>,
    /// Since when.
    pub since: SystemTime,
    /// GPU-seconds held in all.
    pub held: f64,
    /// GPU-seconds busy in all.
    pub busy: f64,
}

/// How a wait in the GPU queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Its container started with the GPUs.
    Served,
    /// The user left (Ctrl-C, disconnect) or the start failed otherwise.
    Left,
    /// `max_wait` passed.
    TimedOut,
}

impl WaitOutcome {
    /// The word stored.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitOutcome::Served => "served",
            WaitOutcome::Left => "left",
            WaitOutcome::TimedOut => "timed out",
        }
    }
}

/// One wait in the GPU queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Wait {
    /// The holder that waited (`user` or `user+profile`).
    pub holder: Username,
    /// When it joined the line.
    pub joined: SystemTime,
    /// How long it waited.
    pub waited: Duration,
    /// How it ended.
    pub outcome: WaitOutcome,
}

/// One line of `labgate usage`: a user's (or a user's profile's) GPU use and waits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The user.
    pub user: String,
    /// The profile, for `user+profile` logins.
    pub profile: Option<String>,
    /// GPU-seconds held (seconds × GPUs).
    pub gpu_seconds_held: f64,
    /// GPU-seconds busy (held, weighted by utilisation).
    pub gpu_seconds_busy: f64,
    /// Waits in the GPU queue that began in the period.
    pub waits: u64,
    /// Their total length, in seconds.
    pub wait_seconds_total: f64,
    /// The longest, in seconds.
    pub wait_seconds_max: f64,
}

/// The accounting of one gateway.
pub struct Accounting {
    /// `None` when not even a database in memory could be opened.
    store: Arc<Mutex<Option<Store>>>,
    /// Whether it is kept on disk (else in memory: see the module's doc).
    persistent: bool,
    /// Waits that ended since the last sample (written with the next one).
    waits: Mutex<Vec<Wait>>,
    /// GPU-seconds held per user in the last week, and when that was last summed.
    week: Mutex<(HashMap<Username, f64>, Option<SystemTime>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Accounting {
    /// Opens `state_dir`'s database; when it cannot be, an in-memory one and the reason
    /// (for the log).
    pub fn open(state_dir: &Path) -> (Self, Option<AccountingError>) {
        match Store::open(&state_dir.join(FILE_NAME)) {
            Ok(store) => (Self::with(Some(store), true), None),
            Err(e) => (Self::in_memory(), Some(e)),
        }
    }

    /// Accounting in memory only (tests; a database that cannot be opened).
    pub fn in_memory() -> Self {
        let store = Store::in_memory()
            .inspect_err(|e| tracing::error!("accounting: {e}"))
            .ok();
        Self::with(store, false)
    }

    fn with(store: Option<Store>, persistent: bool) -> Self {
        Accounting {
            store: Arc::new(Mutex::new(store)),
            persistent,
            waits: Mutex::default(),
            week: Mutex::default(),
        }
    }

    /// Whether usage is kept on disk.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Notes a wait that ended; it is written with the next sample.
    pub fn record_wait(&self, wait: Wait) {
        lock(&self.waits).push(wait);
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Store) -> Result<T, AccountingError> + Send + 'static,
    ) -> Result<T, AccountingError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || match &mut *lock(&store) {
            Some(store) => work(store),
            None => Err(AccountingError::Unavailable),
        })
        .await
        .map_err(|e| AccountingError::Task(e.to_string()))?
    }

    /// Records a sample taken `at` (every holder holding GPUs then, each with its use since
    /// the last sample); returns the holds that ended. A failed write loses this sample
    /// only (its waits are kept for the next).
    pub async fn record(
        &self,
        at: SystemTime,
        charges: Vec<Charge>,
    ) -> Result<Vec<EndedHold>, AccountingError> {
        let waits = std::mem::take(&mut *lock(&self.waits));
        let refresh = {
            let mut week = lock(&self.week);
            for c in &charges {
                *week.0.entry(c.holder.account()).or_default() += c.held;
            }
            week.1
                .is_none_or(|t| at.duration_since(t).unwrap_or_default() >= WEEK_REFRESH)
        };
        let kept = waits.clone();
        let result = self
            .blocking(move |store| {
                let ended = store.record(at, &charges, &waits)?;
                let week = if refresh {
                    Some(store.held_per_user(at.checked_sub(WEEK).unwrap_or(at))?)
                } else {
                    None
                };
                Ok((ended, week))
            })
            .await;
        match result {
            Ok((ended, week)) => {
                if let Some(sums) = week {
                    *lock(&self.week) = (sums, Some(at));
                }
                Ok(ended)
            }
            Err(e) => {
                lock(&self.waits).splice(0..0, kept);
                Err(e)
            }
        }
    }

    /// GPU-seconds `user` held in the last week (all their profiles), as of the last sample.
    pub fn week_seconds(&self, user: &Username) -> f64 {
        lock(&self.week)
            .0
            .get(&user.account())
            .copied()
            .unwrap_or(0.0)
    }

    /// Per user and profile since `since`.
    pub async fn report(&self, since: SystemTime) -> Result<Vec<UsageRow>, AccountingError> {
        self.blocking(move |store| store.report(since)).await
    }

    /// Each user's GPU-seconds per hour since `since`, oldest first (blocking: for start-up).
    pub fn history(
        &self,
        since: SystemTime,
    ) -> Result<Vec<(Username, SystemTime, f64)>, AccountingError> {
        match &*lock(&self.store) {
            Some(store) => store.history(since),
            None => Err(AccountingError::Unavailable),
        }
    }

    /// Sums the last week again now (blocking: for start-up).
    pub fn load_week(&self, now: SystemTime) -> Result<(), AccountingError> {
        let since = now.checked_sub(WEEK).unwrap_or(now);
        let sums = match &*lock(&self.store) {
            Some(store) => store.held_per_user(since)?,
            None => return Err(AccountingError::Unavailable),
        };
        *lock(&self.week) = (sums, Some(now));
        Ok(())
    }
}
