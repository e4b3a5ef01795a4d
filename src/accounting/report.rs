//! `labgate usage [--since 7d] [--json]`: per user (and profile), GPU-hours held, how busy
//! they were, and the waits in the queue, read from the accounting database beside a
//! running gateway (read-only) or without one.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::store::Store;
use super::{AccountingError, FILE_NAME, UsageRow};

/// What `labgate usage --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    /// Start of the period, RFC 3339 (UTC).
    pub since: String,
    /// When the report was made, RFC 3339 (UTC).
    pub until: String,
    /// One row per user or user+profile that held GPUs or waited, by name.
    pub users: Vec<UsageRow>,
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Reads the report for the last `period` from `state_dir`'s database.
pub fn read(state_dir: &Path, period: Duration) -> Result<UsageReport, AccountingError> {
    let store = Store::open_read_only(&state_dir.join(FILE_NAME))?;
    let until = SystemTime::now();
    let since = until.checked_sub(period).unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(UsageReport {
        since: rfc3339(since),
        until: rfc3339(until),
        users: store.report(since)?,
    })
}

/// `3725` seconds → `1h2m`; under a minute, seconds.
fn wait(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s / 60 % 60),
    }
}

/// The table `labgate usage` prints.
pub fn render(report: &UsageReport) -> String {
    let mut out = format!("GPU use from {} to {}\n", report.since, report.until);
    if report.users.is_empty() {
        out.push_str("no GPU was held and nobody waited for one in this period\n");
        return out;
    }
    let mut rows = vec![[
        "USER".to_owned(),
        "GPU-HOURS".to_owned(),
        "BUSY".to_owned(),
        "WAITS".to_owned(),
        "WAITED".to_owned(),
        "LONGEST".to_owned(),
    ]];
    let hours = |s: f64| format!("{:.2}", s / 3600.0);
    let busy = |held: f64, busy: f64| {
        if held > 0.0 {
            format!("{:.0}%", 100.0 * busy / held)
        } else {
            "-".to_owned()
        }
    };
    for r in &report.users {
        let name = match &r.profile {
            Some(p) => format!("{}+{p}", r.user),
            None => r.user.clone(),
        };
        rows.push([
            name,
            hours(r.gpu_seconds_held),
            busy(r.gpu_seconds_held, r.gpu_seconds_busy),
            r.waits.to_string(),
            wait(r.wait_seconds_total),
            wait(r.wait_seconds_max),
        ]);
    }
    let held: f64 = report.users.iter().map(|r| r.gpu_seconds_held).sum();
    let busy_s: f64 = report.users.iter().map(|r| r.gpu_seconds_busy).sum();
    let waits: u64 = report.users.iter().map(|r| r.waits).sum();
    let waited: f64 = report.users.iter().map(|r| r.wait_seconds_total).sum();
    let longest = report
        .users
        .iter()
        .map(|r| r.wait_seconds_max)
        .fold(0.0, f64::max);
    rows.push([
        "TOTAL".to_owned(),
        hours(held),
        busy(held, busy_s),
        waits.to_string(),
        wait(waited),
        wait(longest),
    ]);
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &rows {
        let mut line = format!("{:<w$}", row[0], w = widths[0]);
        for (cell, w) in row.iter().zip(widths).skip(1) {
            line.push_str(&format!("  {cell:>w$}"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: &str, profile: Option<&str>, held: f64, busy: f64, waits: u64) -> UsageRow {
        UsageRow {
            user: user.into(),
            profile: profile.map(Into::into),
            gpu_seconds_held: held,
            gpu_seconds_busy: busy,
            waits,
            wait_seconds_total: 90.0 * waits as f64,
            wait_seconds_max: if waits > 0 { 120.0 } else { 0.0 },
        }
    }

    #[test]
    fn the_table_shows_hours_busy_share_and_waits_with_a_total() {
        let report = UsageReport {
            since: "2026-11-29T10:00:00Z".into(),
            until: "2026-12-06T10:00:00Z".into(),
            users: vec![
                row("alice", None, 45_000.0, 22_500.0, 0),
                row("alice", Some("big"), 3600.0, 0.0, 2),
                row("bob", None, 0.0, 0.0, 1),
            ],
        };
        let text = render(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "GPU use from 2026-11-29T10:00:00Z to 2026-12-06T10:00:00Z"
        );
        assert_eq!(
            lines[1],
            "USER       GPU-HOURS  BUSY  WAITS  WAITED  LONGEST"
        );
        assert_eq!(
            lines[2],
            "alice          12.50   50%      0      0s       0s"
        );
        assert_eq!(
            lines[3],
            "alice+big       1.00    0%      2    3m0s     2m0s"
        );
        assert_eq!(
            lines[4],
            "bob             0.00     -      1   1m30s     2m0s"
        );
        assert_eq!(
            lines[5],
            "TOTAL          13.50   46%      3   4m30s     2m0s"
        );
        let empty = render(&UsageReport {
            users: Vec::new(),
            ..report
        });
        assert!(empty.ends_with("no GPU was held and nobody waited for one in this period\n"));
    }
}
