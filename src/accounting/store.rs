//! The accounting database: SQLite (rusqlite, with SQLite built in), one file in
//! `[server] state_dir`, written by the gateway alone; `labgate usage` opens it read-only.
//!
//! Tables: `usage` (GPU-seconds held and busy per user, profile and minute), `holds` (each
//! running hold's totals so far, so its end can be audited with its whole length, also
//! across a restart) and `waits` (each wait in the GPU queue). The schema version is SQLite's
//! `user_version`; a file from a newer labgate is refused, never rewritten.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OpenFlags, params};

use super::{AccountingError, Charge, EndedHold, UsageRow, Wait};
use crate::auth::Username;
use crate::config::GpuUuid;

/// The schema this code writes.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    minute  INTEGER NOT NULL,
    user    TEXT NOT NULL,
    profile TEXT NOT NULL,
    held    REAL NOT NULL,
    busy    REAL NOT NULL,
    PRIMARY KEY (minute, user, profile)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holds (
    holder  TEXT PRIMARY KEY,
    user    TEXT NOT NULL,
    profile TEXT NOT NULL,
    gpus    TEXT NOT NULL,
    since   INTEGER NOT NULL,
    held    REAL NOT NULL,
    busy    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS waits (
    joined  INTEGER NOT NULL,
    user    TEXT NOT NULL,
    profile TEXT NOT NULL,
    waited  REAL NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS waits_by_time ON waits (joined);
";

/// The open database.
pub struct Store {
    conn: Connection,
    /// Where it is (`None`: in memory, nothing kept).
    path: Option<PathBuf>,
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn time(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// `alice+gpu` → (`alice`, `gpu`); `alice` → (`alice`, ``).
fn split(holder: &Username) -> (String, String) {
    match holder.as_str().split_once('+') {
        Some((user, profile)) => (user.to_owned(), profile.to_owned()),
        None => (holder.as_str().to_owned(), String::new()),
    }
}

impl Store {
    /// Opens (creating) the database at `path`, its directory 0700 and the file 0600 (it
    /// names users and when they worked).
    pub fn open(path: &Path) -> Result<Self, AccountingError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let io = |e: std::io::Error| AccountingError::Io {
            path: path.to_owned(),
            source: e,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        // Made with its mode before SQLite opens it, so it is never world-readable.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let conn = Connection::open(path).map_err(|e| AccountingError::sql(path, e))?;
        let store = Store {
            conn,
            path: Some(path.to_owned()),
        };
        store.prepare()?;
        Ok(store)
    }

    /// Opens the database at `path` read-only (`labgate usage`, beside a running gateway).
    pub fn open_read_only(path: &Path) -> Result<Self, AccountingError> {
        if !path.exists() {
            return Err(AccountingError::Missing(path.to_owned()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| AccountingError::sql(path, e))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| AccountingError::sql(path, e))?;
        let store = Store {
            conn,
            path: Some(path.to_owned()),
        };
        let version = store.version()?;
        if version > SCHEMA_VERSION {
            return Err(AccountingError::Newer {
                path: path.to_owned(),
                version,
            });
        }
        Ok(store)
    }

    /// A database in memory: counts while the gateway runs, keeps nothing.
    pub fn in_memory() -> Result<Self, AccountingError> {
        let conn = Connection::open_in_memory()
            .map_err(|e| AccountingError::sql(Path::new(":memory:"), e))?;
        let store = Store { conn, path: None };
        store.prepare()?;
        Ok(store)
    }

    fn err(&self, e: rusqlite::Error) -> AccountingError {
        AccountingError::sql(self.path.as_deref().unwrap_or(Path::new(":memory:")), e)
    }

    fn version(&self) -> Result<i64, AccountingError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn prepare(&self) -> Result<(), AccountingError> {
        // WAL: `labgate usage` reads while the gateway writes; NORMAL: a power loss may lose
        // the last seconds, never the file.
        self.conn
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .map_err(|e| self.err(e))?;
        self.conn
            .busy_timeout(Duration::from_secs(5))
            .map_err(|e| self.err(e))?;
        let version = self.version()?;
        if version > SCHEMA_VERSION {
            return Err(AccountingError::Newer {
                path: self.path.clone().unwrap_or_default(),
                version,
            });
        }
        self.conn.execute_batch(SCHEMA).map_err(|e| self.err(e))?;
        self.conn
            .execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
            .map_err(|e| self.err(e))
    }

    /// Adds one sample taken `at`: each charge to its minute and to its hold; `waits` as
    /// they are. Holds not charged this time, or charged for the last time, have ended:
    /// they are removed and returned.
    /// All or nothing.
    pub fn record(
        &mut self,
        at: SystemTime,
        charges: &[Charge],
        waits: &[Wait],
    ) -> Result<Vec<EndedHold>, AccountingError> {
        let path = self.path.clone();
        let err = |e: rusqlite::Error| {
            AccountingError::sql(path.as_deref().unwrap_or(Path::new(":memory:")), e)
        };
        let tx = self.conn.transaction().map_err(err)?;
        let minute = secs(at) / 60 * 60;
        for c in charges {
            let (user, profile) = split(&c.holder);
            if c.held > 0.0 || c.busy > 0.0 {
                tx.execute(
                    "INSERT INTO usage (minute, user, profile, held, busy) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (minute, user, profile)
                     DO UPDATE SET held = held + excluded.held, busy = busy + excluded.busy",
                    params![minute, user, profile, c.held, c.busy],
                )
                .map_err(err)?;
            }
            tx.execute(
                "INSERT INTO holds (holder, user, profile, gpus, since, held, busy)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (holder) DO UPDATE SET gpus = excluded.gpus,
                     held = held + excluded.held, busy = busy + excluded.busy",
                params![
                    c.holder.as_str(),
                    user,
                    profile,
                    GpuUuid::join(&c.gpus),
                    secs(c.since),
                    c.held,
                    c.busy
                ],
            )
            .map_err(err)?;
        }
        let mut gone = Vec::new();
        {
            let mut stmt = tx
                .prepare("SELECT holder, gpus, since, held, busy FROM holds")
                .map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, f64>(3)?,
                        r.get::<_, f64>(4)?,
                    ))
                })
                .map_err(err)?;
            for row in rows {
                let row = row.map_err(err)?;
                if !charges
                    .iter()
                    .any(|c| !c.last && c.holder.as_str() == row.0)
                {
                    gone.push(row);
                }
            }
        }
        let mut ended = Vec::new();
        for (holder, gpus, since, held, busy) in gone {
            tx.execute("DELETE FROM holds WHERE holder = ?1", params![holder])
                .map_err(err)?;
            // A row with a name this version refuses (hand-edited) is dropped unreported.
            if let Ok(holder) = Username::parse_holder(&holder) {
                ended.push(EndedHold {
                    holder,
                    gpus: GpuUuid::parse_list(&gpus),
                    since: time(since),
                    held,
                    busy,
                });
            }
        }
        for w in waits {
            let (user, profile) = split(&w.holder);
            tx.execute(
                "INSERT INTO waits (joined, user, profile, waited, outcome) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    secs(w.joined),
                    user,
                    profile,
                    w.waited.as_secs_f64(),
                    w.outcome.as_str()
                ],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(ended)
    }

    /// GPU-seconds held per user since `since`.
    pub fn held_per_user(
        &self,
        since: SystemTime,
    ) -> Result<HashMap<Username, f64>, AccountingError> {
        let mut stmt = self
            .conn
            .prepare("SELECT user, SUM(held) FROM usage WHERE minute >= ?1 GROUP BY user")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![secs(since) / 60 * 60], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::new();
        for row in rows {
            let (user, held) = row.map_err(|e| self.err(e))?;
            if let Ok(user) = Username::parse(&user) {
                out.insert(user, held);
            }
        }
        Ok(out)
    }

    /// Each user's GPU-seconds held per hour since `since`, oldest first (to rebuild the
    /// queue's decayed usage at start: hours, so ten half-lives of a busy lab stay a few
    /// thousand rows).
    pub fn history(
        &self,
        since: SystemTime,
    ) -> Result<Vec<(Username, SystemTime, f64)>, AccountingError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT user, minute / 3600 * 3600 AS hour, SUM(held) FROM usage
                 WHERE minute >= ?1 GROUP BY hour, user ORDER BY hour",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![secs(since)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, f64>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (user, hour, held) = row.map_err(|e| self.err(e))?;
            if let Ok(user) = Username::parse(&user) {
                // The hour's end: what was charged in it was used by then.
                out.push((user, time(hour + 3600), held));
            }
        }
        Ok(out)
    }

    /// Per user and profile since `since`: GPU-seconds held and busy, and waits.
    pub fn report(&self, since: SystemTime) -> Result<Vec<UsageRow>, AccountingError> {
        let mut rows: std::collections::BTreeMap<(String, String), UsageRow> = Default::default();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT user, profile, SUM(held), SUM(busy) FROM usage WHERE minute >= ?1
                 GROUP BY user, profile",
            )
            .map_err(|e| self.err(e))?;
        let used = stmt
            .query_map(params![secs(since) / 60 * 60], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, f64>(2)?,
                    r.get::<_, f64>(3)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for u in used {
            let (user, profile, held, busy) = u.map_err(|e| self.err(e))?;
            let r = entry(&mut rows, user, profile);
            r.gpu_seconds_held = held;
            r.gpu_seconds_busy = busy;
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT user, profile, COUNT(*), SUM(waited), MAX(waited) FROM waits
                 WHERE joined >= ?1 GROUP BY user, profile",
            )
            .map_err(|e| self.err(e))?;
        let waits = stmt
            .query_map(params![secs(since)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, f64>(3)?,
                    r.get::<_, f64>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for w in waits {
            let (user, profile, n, total, max) = w.map_err(|e| self.err(e))?;
            let r = entry(&mut rows, user, profile);
            r.waits = u64::try_from(n).unwrap_or(0);
            r.wait_seconds_total = total;
            r.wait_seconds_max = max;
        }
        Ok(rows.into_values().collect())
    }
}

fn entry(
    rows: &mut std::collections::BTreeMap<(String, String), UsageRow>,
    user: String,
    profile: String,
) -> &mut UsageRow {
    rows.entry((user.clone(), profile.clone()))
        .or_insert_with(|| UsageRow {
            user,
            profile: (!profile.is_empty()).then_some(profile),
            gpu_seconds_held: 0.0,
            gpu_seconds_busy: 0.0,
            waits: 0,
            wait_seconds_total: 0.0,
            wait_seconds_max: 0.0,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{FILE_NAME, WaitOutcome};

    fn u(s: &str) -> Username {
        Username::parse_holder(s).unwrap()
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn charge(holder: &str, held: f64, busy: f64) -> Charge {
        Charge {
            holder: u(holder),
            gpus: vec![GpuUuid::parse("GPU-a").unwrap()],
            since: at(0),
            held,
            busy,
            last: false,
        }
    }

    #[test]
    fn usage_adds_up_per_user_and_profile_survives_reopening_and_ended_holds_come_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(FILE_NAME);
        {
            let mut s = Store::open(&path).unwrap();
            for t in 0..90u64 {
                let ended = s
                    .record(
                        at(t * 2),
                        &[charge("alice", 2.0, 1.0), charge("bob+big", 4.0, 4.0)],
                        &[],
                    )
                    .unwrap();
                assert!(ended.is_empty());
            }
            let wait = Wait {
                holder: u("carol"),
                joined: at(10),
                waited: Duration::from_secs(42),
                outcome: WaitOutcome::Served,
            };
            // alice's hold ends with a last charge: reported once, with its whole length.
            let last = Charge {
                last: true,
                ..charge("alice", 1.0, 0.0)
            };
            let ended = s
                .record(at(180), &[charge("bob+big", 4.0, 4.0), last], &[wait])
                .unwrap();
            assert_eq!(ended.len(), 1);
            assert_eq!(ended[0].holder, u("alice"));
            assert_eq!((ended[0].held, ended[0].busy), (181.0, 90.0));
            assert_eq!(ended[0].since, at(0));
            assert!(
                s.record(at(182), &[], &[]).unwrap().len() == 1,
                "bob's ends"
            );
            assert!(s.record(at(184), &[], &[]).unwrap().is_empty());
        }
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let s = Store::open_read_only(&path).unwrap();
        let rows = s.report(at(0)).unwrap();
        let find = |user: &str, profile: Option<&str>| {
            rows.iter()
                .find(|r| r.user == user && r.profile.as_deref() == profile)
                .cloned()
                .unwrap()
        };
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(find("alice", None).gpu_seconds_held, 181.0);
        assert_eq!(find("alice", None).gpu_seconds_busy, 90.0);
        assert_eq!(find("bob", Some("big")).gpu_seconds_held, 364.0);
        let carol = find("carol", None);
        assert_eq!((carol.waits, carol.wait_seconds_total), (1, 42.0));
        assert_eq!(carol.gpu_seconds_held, 0.0);
        let per_user = s.held_per_user(at(0)).unwrap();
        assert_eq!(per_user[&u("bob")], 364.0, "profiles count for their user");
        // From the minute of at(150) on: alice's samples at(120) to at(178), and her last.
        let late = s.report(at(150)).unwrap();
        let alice_late = late.iter().find(|r| r.user == "alice").unwrap();
        assert_eq!(alice_late.gpu_seconds_held, 61.0, "with the last charge");
        let history = s.history(at(0)).unwrap();
        let total: f64 = history.iter().map(|h| h.2).sum();
        assert_eq!(total, 545.0);
        assert!(history.windows(2).all(|w| w[0].1 <= w[1].1), "oldest first");
    }

    #[test]
    fn a_missing_or_newer_database_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert!(matches!(
            Store::open_read_only(&path),
            Err(AccountingError::Missing(_))
        ));
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(conn);
        let err = Store::open(&path).err().unwrap();
        assert!(err.to_string().contains("newer labgate"), "{err}");
        assert!(Store::open_read_only(&path).is_err());
    }
}
