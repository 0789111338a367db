//! Operator requests to the running daemon: files under `<lake>/_wal2delta/requests/`.
//!
//! `wal2delta resync` cannot write the lake itself while a daemon does (one writer per
//! lake, `lake::lock`), so it leaves a request the daemon picks up, and the daemon leaves
//! the outcome next to it. A request survives a restart: a daemon that stops before
//! finishing does it after the next start. Files, like the lock, so only a local lake.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Lake, LakeError};
use crate::table_name::TableName;

/// A request to copy a table again.
#[derive(Debug, Serialize, Deserialize)]
struct ResyncRequest {
    table: String,
    requested_at: String,
}

/// How a resync ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResyncOutcome {
    pub table: String,
    /// The error when it failed.
    pub error: Option<String>,
    pub rows: u64,
    /// The consistent point of the copy.
    pub point: Option<String>,
    pub elapsed_ms: u64,
}

/// The request directory of one lake.
#[derive(Debug, Clone)]
pub struct Requests {
    dir: PathBuf,
}

impl Requests {
    pub fn open(lake: &Lake) -> Result<Requests, LakeError> {
        let root = lake
            .root()
            .to_file_path()
            .map_err(|_| LakeError::Location {
                location: lake.root().to_string(),
                message: "requests to the daemon (resync) need a local lake directory for now"
                    .into(),
            })?;
        Ok(Requests {
            dir: root.join("_wal2delta").join("requests"),
        })
    }

    fn path(&self, table: &TableName, suffix: &str) -> PathBuf {
        let name = table.path_segments().replace('/', ".");
        self.dir.join(format!("resync.{name}.{suffix}"))
    }

    fn io_err(&self, what: &str, e: std::io::Error) -> LakeError {
        LakeError::Location {
            location: self.dir.display().to_string(),
            message: format!("{what}: {e}"),
        }
    }

    /// Asks the daemon to copy `table` again (forgetting the outcome of an earlier one).
    pub fn ask_resync(&self, table: &TableName) -> Result<(), LakeError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io_err("cannot create", e))?;
        let _ = std::fs::remove_file(self.path(table, "outcome"));
        let request = ResyncRequest {
            table: table.to_string(),
            requested_at: chrono::Utc::now().to_rfc3339(),
        };
        let text = serde_json::to_string(&request).unwrap_or_default();
        // Written whole, then renamed: the daemon never reads half a request.
        let tmp = self.path(table, "tmp");
        std::fs::write(&tmp, text).map_err(|e| self.io_err("cannot write a request", e))?;
        std::fs::rename(&tmp, self.path(table, "request"))
            .map_err(|e| self.io_err("cannot write a request", e))
    }

    /// The tables whose resync is asked for and not done yet.
    pub fn pending_resyncs(&self) -> Vec<TableName> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut tables: Vec<TableName> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".request"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|text| serde_json::from_str::<ResyncRequest>(&text).ok())
            .filter_map(|r| TableName::parse(&r.table).ok())
            .collect();
        tables.sort_by_key(|t| t.to_string());
        tables
    }

    /// Whether `table`'s resync is still asked for.
    pub fn is_pending(&self, table: &TableName) -> bool {
        self.path(table, "request").exists()
    }

    /// Records how `table`'s resync ended and drops the request.
    pub fn finish_resync(&self, table: &TableName, outcome: &ResyncOutcome) {
        let text = serde_json::to_string_pretty(outcome).unwrap_or_default();
        if let Err(e) = std::fs::write(self.path(table, "outcome"), text) {
            tracing::warn!(table = %table, error = %e, "cannot record the resync's outcome");
        }
        let _ = std::fs::remove_file(self.path(table, "request"));
    }

    /// What the daemon's publication guard remembered of the tables' shapes (their
    /// partitions), so a change made while it was stopped is found at the next start.
    pub fn load_guard_state(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("guard-state.json")).ok()
    }

    pub fn save_guard_state(&self, text: &str) -> Result<(), LakeError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io_err("cannot create", e))?;
        let tmp = self.dir.join("guard-state.tmp");
        std::fs::write(&tmp, text).map_err(|e| self.io_err("cannot save the guard state", e))?;
        std::fs::rename(&tmp, self.dir.join("guard-state.json"))
            .map_err(|e| self.io_err("cannot save the guard state", e))
    }

    /// How `table`'s last resync ended, once it has.
    pub fn resync_outcome(&self, table: &TableName) -> Option<ResyncOutcome> {
        if self.is_pending(table) {
            return None;
        }
        let text = std::fs::read_to_string(self.path(table, "outcome")).ok()?;
        serde_json::from_str(&text).ok()
    }
}
