//! `labgate usage [--since 7d] [--json]`: GPU-hours held, busy share and waits per user, from
//! the accounting database in the config's `[server] state_dir` (read-only: it works beside
//! a running gateway and without one). No socket route: the database is the record.

use std::path::Path;
use std::time::Duration;

use crate::accounting::{AccountingError, report};

/// What keeps `labgate usage` from answering.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The config could not be read (its `state_dir` says where the database is).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The database could not be read.
    #[error(transparent)]
    Accounting(#[from] AccountingError),
    /// The JSON could not be written.
    #[error("cannot write the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The report for the last `since`, as a table or (`json`) as [`report::UsageReport`].
pub fn call(config: &Path, since: Duration, json: bool) -> Result<String, UsageError> {
    let state_dir = crate::config::load(config)?.server.state_dir;
    let report = report::read(&state_dir, since)?;
    Ok(if json {
        let mut out = serde_json::to_string_pretty(&report)?;
        out.push('\n');
        out
    } else {
        report::render(&report)
    })
}
