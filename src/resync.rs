//! `wal2delta resync`: asks the running daemon to copy tables again and waits for it.
//!
//! The daemon does the copy (`pipeline::resync`): only it writes the lake. This side
//! leaves the requests (`lake::requests`) and reads the outcomes. Without a running
//! daemon the requests wait for its next start.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Settings;
use crate::lake::lock::LakeLock;
use crate::lake::requests::{Requests, ResyncOutcome};
use crate::lake::{Lake, LakeError};
use crate::table_name::TableName;

#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("{0} is not a configured table; resync copies tables in source.tables")]
    NotConfigured(String),
    #[error("name at least one table with --table")]
    NoTable,
}

/// What became of the requests.
#[derive(Debug, Serialize)]
pub struct ResyncReport {
    /// False when no daemon runs: the copies happen at its next start.
    pub daemon_running: bool,
    pub tables: Vec<TableOutcome>,
}

#[derive(Debug, Serialize)]
pub struct TableOutcome {
    pub table: String,
    /// `done`, `failed`, `queued` (no daemon) or `running` (still copying at the deadline).
    pub state: &'static str,
    #[serde(flatten)]
    pub outcome: Option<ResyncOutcome>,
}

impl ResyncReport {
    /// 0 when every copy is done (or queued for a stopped daemon), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        if self
            .tables
            .iter()
            .all(|t| t.state == "done" || t.state == "queued")
        {
            0
        } else {
            1
        }
    }
}

/// Asks for `tables` to be copied again and, while a daemon runs, waits up to `wait`.
/// A table's resync still pending is waited for, unless `again` (a new copy replaces it).
pub async fn resync(
    settings: &Settings,
    tables: &[TableName],
    wait: Duration,
    again: bool,
) -> Result<ResyncReport, ResyncError> {
    if tables.is_empty() {
        return Err(ResyncError::NoTable);
    }
    for t in tables {
        if !settings.source.tables.contains(t) {
            return Err(ResyncError::NotConfigured(t.to_string()));
        }
    }
    let lake = Lake::open(&settings.lake)?;
    let requests = Requests::open(&lake);
    for t in tables {
        requests.ask_resync(t, again).await?;
    }
    let daemon_running = LakeLock::holder(&lake).await?.is_some();
    if !daemon_running {
        return Ok(ResyncReport {
            daemon_running,
            tables: tables
                .iter()
                .map(|t| TableOutcome {
                    table: t.to_string(),
                    state: "queued",
                    outcome: None,
                })
                .collect(),
        });
    }
    let started = Instant::now();
    while started.elapsed() < wait {
        let mut pending = false;
        for t in tables {
            pending |= requests.is_pending(t).await;
        }
        if !pending {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut outcomes = Vec::new();
    for t in tables {
        let outcome = requests.resync_outcome(t).await;
        let state = match &outcome {
            None => "running",
            Some(o) if o.error.is_some() => "failed",
            Some(_) => "done",
        };
        outcomes.push(TableOutcome {
            table: t.to_string(),
            state,
            outcome,
        });
    }
    Ok(ResyncReport {
        daemon_running,
        tables: outcomes,
    })
}

/// The report for people.
pub fn render(report: &ResyncReport) -> String {
    let mut out = String::new();
    if !report.daemon_running {
        out.push_str(
            "no daemon runs on this lake: the tables are copied again when it starts \
             (systemctl start wal2delta, or wal2delta run)\n",
        );
    }
    for t in &report.tables {
        let line = match (t.state, &t.outcome) {
            ("done", Some(o)) => match o.removed_in_chunks {
                Some(removed) => format!(
                    "{}: copied again at {} in chunks, into the live tables (since the \
                     daemon's last start: {} rows copied, {removed} rows the source no longer \
                     has deleted, in {:.1} s)",
                    t.table,
                    o.point.as_deref().unwrap_or("?"),
                    o.rows,
                    o.elapsed_ms as f64 / 1000.0
                ),
                None => format!(
                    "{}: copied again at {} ({} rows in {:.1} s); the curated table was replaced \
                     in one commit and caught up with the changes made meanwhile",
                    t.table,
                    o.point.as_deref().unwrap_or("?"),
                    o.rows,
                    o.elapsed_ms as f64 / 1000.0
                ),
            },
            ("failed", Some(o)) => format!(
                "{}: FAILED: {} (the daemon's log has the details; run resync again)",
                t.table,
                o.error.as_deref().unwrap_or("unknown error")
            ),
            ("queued", _) => format!("{}: queued", t.table),
            _ => format!(
                "{}: still copying; the daemon finishes it (follow its log; run resync again to wait)",
                t.table
            ),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}
