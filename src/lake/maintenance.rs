//! Delta maintenance: compaction of small files and vacuum of unreferenced ones, run by
//! the applier between batches.
//!
//! # Design
//! - **Between batches, in the applier's task.** Maintenance runs right after a batch and
//!   its checkpoint are committed, when no table has uncommitted files, and the applier
//!   continues with the table the maintenance commit returned. Nothing writes the table
//!   concurrently, so there is no commit conflict, and a crash mid-way leaves either the old
//!   or the new version (plus unreferenced files the next vacuum removes).
//! - **Positions are untouched.** A compaction commit (`OPTIMIZE`, `dataChange = false`)
//!   carries no `txn`; the tables' `txn` versions — the exactly-once positions — carry over
//!   unchanged in the log, so recovery reads the same positions before and after.
//! - **Bounded work per run.** A table is compacted when it has `compact_min_files` files
//!   smaller than half its target file size (raw 128 MiB, curated
//!   [`CURATED_FILE_SIZE`](super::table::CURATED_FILE_SIZE)); a run rewrites only those
//!   small files.
//! - **Vacuum keeps what readers may need.** Files are deleted only when no current
//!   version references them and they are older than `vacuum_retention_hours` (default 7
//!   days), so a running query or a time-travel read within the retention still finds its
//!   files. Full mode also removes files a crashed batch wrote but never committed.
//! - **Delta checkpoints** are written by delta-rs after every 100th commit (the
//!   `delta.checkpointInterval` default): opening a table replays at most 99 commits.
//! - **A short log.** Every commit lists the table's `_delta_log` (delta-rs moves its
//!   snapshot forward that way), and on a local disk that listing reads the whole
//!   directory: measured with deltalake 1.6.6, an append took 0.02 s with 120 log
//!   entries, 0.40 s with 100,000 and 1.60 s with 400,000. At up to five batches a
//!   second (group commit) and delta-rs's 30-day default, commits would slow down by
//!   seconds within days. So log cleanup is ours: our commits turn delta-rs's per-commit
//!   cleanup off ([`no_log_cleanup`]; it would list the log once more each time), and
//!   every [`Policy::log_cleanup_interval`] the applier deletes the commits and Delta
//!   checkpoints older than `log_retention_hours` (default 1) ([`clean_log`]). It deletes
//!   only below a Delta checkpoint that every kept version can be rebuilt from, and never
//!   a version a kept checkpoint record of the lake still points to (the applier passes
//!   the oldest such version), so time travel within the retention keeps working.

use std::num::NonZeroU64;
use std::time::Duration;

use deltalake::DeltaTable;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::vacuum::VacuumMode;
use object_store::ObjectStoreExt;
use serde::Deserialize;

use super::LakeError;

/// `[maintenance]`: compaction and vacuum of the lake's tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Compact a table once it has this many files under 64 MiB; 0: never.
    #[serde(default = "default_compact_min_files")]
    pub compact_min_files: usize,
    /// Seconds between checks (after a batch commit).
    #[serde(default = "default_check_interval")]
    pub check_interval_secs: u64,
    /// Vacuum deletes unreferenced files older than this many hours (fractions allowed).
    #[serde(default = "default_retention_hours")]
    pub vacuum_retention_hours: f64,
    /// Hours between vacuums (fractions allowed); 0: never vacuum.
    #[serde(default = "default_vacuum_interval")]
    pub vacuum_interval_hours: f64,
    /// Log cleanup deletes Delta log entries older than this many hours.
    #[serde(default = "default_log_retention_hours")]
    pub log_retention_hours: f64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            compact_min_files: default_compact_min_files(),
            check_interval_secs: default_check_interval(),
            vacuum_retention_hours: default_retention_hours(),
            vacuum_interval_hours: default_vacuum_interval(),
            log_retention_hours: default_log_retention_hours(),
        }
    }
}

fn default_compact_min_files() -> usize {
    64
}
fn default_check_interval() -> u64 {
    60
}
fn default_retention_hours() -> f64 {
    168.0
}
fn default_log_retention_hours() -> f64 {
    1.0
}
fn default_vacuum_interval() -> f64 {
    24.0
}

impl MaintenanceConfig {
    /// Checks the section (problems name `maintenance.<field>`) and returns its policy.
    pub fn validate(&self, problems: &mut Vec<String>) -> Policy {
        if self.check_interval_secs == 0 {
            problems.push("maintenance.check_interval_secs: must be at least 1".into());
        }
        let hours = |field: &str, h: f64, problems: &mut Vec<String>| {
            if !(0.0..=1e6).contains(&h) {
                problems.push(format!(
                    "maintenance.{field}: must be from 0 to 1000000 hours"
                ));
                return Duration::ZERO;
            }
            Duration::from_secs_f64(h * 3600.0)
        };
        let retention = hours(
            "vacuum_retention_hours",
            self.vacuum_retention_hours,
            problems,
        );
        let vacuum_every = hours(
            "vacuum_interval_hours",
            self.vacuum_interval_hours,
            problems,
        );
        let log_retention = hours("log_retention_hours", self.log_retention_hours, problems);
        Policy {
            compact_min_files: self.compact_min_files,
            check_interval: Duration::from_secs(self.check_interval_secs.max(1)),
            vacuum_retention: (!vacuum_every.is_zero()).then_some(retention),
            vacuum_interval: vacuum_every,
            log_retention,
        }
    }
}

/// When and how much to maintain (`[maintenance]`).
#[derive(Debug, Clone)]
pub struct Policy {
    /// Compact a table once it has this many small files; 0 turns compaction off.
    pub compact_min_files: usize,
    /// How often tables are checked.
    pub check_interval: Duration,
    /// Vacuum deletes unreferenced files older than this; `None`: no vacuum.
    pub vacuum_retention: Option<Duration>,
    /// How often tables are vacuumed.
    pub vacuum_interval: Duration,
    /// Log cleanup deletes log entries older than this.
    pub log_retention: Duration,
}

impl Policy {
    /// How often logs are cleaned: a tenth of the retention (so a log holds at most
    /// 1.1 retentions and two checkpoint intervals), at most once per check. Each cleanup
    /// lists the table's `_delta_log` once.
    pub fn log_cleanup_interval(&self) -> Duration {
        (self.log_retention / 10).max(self.check_interval)
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            compact_min_files: 64,
            check_interval: Duration::from_secs(60),
            vacuum_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            vacuum_interval: Duration::from_secs(24 * 3600),
            log_retention: Duration::from_secs(3600),
        }
    }
}

/// What one compaction did.
#[derive(Debug, Clone, Copy)]
pub struct Compacted {
    pub files_removed: u64,
    pub files_added: u64,
}

fn small(size: i64, target_size: u64) -> bool {
    (size as u64) < target_size / 2
}

/// The table's data files and how many of them are small (under half `target_size`).
pub fn file_counts(table: &DeltaTable, target_size: u64) -> Option<(usize, usize)> {
    let snapshot = table.snapshot().ok()?;
    let mut files = 0;
    let mut smalls = 0;
    for f in snapshot.log_data().iter() {
        files += 1;
        if small(f.size(), target_size) {
            smalls += 1;
        }
    }
    Some((files, smalls))
}

/// Compacts the table's small files when there are at least `policy.compact_min_files`.
/// On success `table` is the compacted version.
pub async fn compact(
    table: &mut DeltaTable,
    label: &str,
    policy: &Policy,
    target_size: u64,
    properties: deltalake::parquet::file::properties::WriterProperties,
) -> Result<Option<Compacted>, LakeError> {
    // A daemon that may have lost its lease rewrites and deletes nothing.
    super::lock::fence()?;
    if policy.compact_min_files == 0 {
        return Ok(None);
    }
    let Some((_, smalls)) = file_counts(table, target_size) else {
        return Ok(None);
    };
    if smalls < policy.compact_min_files {
        return Ok(None);
    }
    let delta_err = |source| LakeError::Delta {
        table: label.to_string(),
        source,
    };
    let (compacted, metrics) = table
        .clone()
        .optimize()
        .with_target_size(NonZeroU64::new(target_size.max(1)).expect("non-zero"))
        .with_max_concurrent_tasks(1)
        .with_writer_properties(properties)
        .with_commit_properties(no_log_cleanup())
        .await
        .map_err(delta_err)?;
    *table = compacted;
    Ok(Some(Compacted {
        files_removed: metrics.num_files_removed,
        files_added: metrics.num_files_added,
    }))
}

/// One maintenance pass: compaction when due, then vacuum when `vacuum` gives a retention.
/// Returns what compaction did and how many files vacuum deleted.
pub async fn run(
    table: &mut DeltaTable,
    label: &str,
    policy: &Policy,
    target_size: u64,
    properties: deltalake::parquet::file::properties::WriterProperties,
    vacuum_retention: Option<Duration>,
) -> Result<(Option<Compacted>, usize), LakeError> {
    let compacted = compact(table, label, policy, target_size, properties).await?;
    let vacuumed = match vacuum_retention {
        Some(retention) => vacuum(table, label, retention).await?,
        None => 0,
    };
    Ok((compacted, vacuumed))
}

/// Commit properties that leave log cleanup to [`clean_log`] (delta-rs would otherwise
/// list the whole `_delta_log` after each commit).
pub fn no_log_cleanup() -> CommitProperties {
    CommitProperties::default().with_cleanup_expired_logs(Some(false))
}

/// Deletes the table's log entries (commits, Delta checkpoints) older than `retention`,
/// keeping every version from `keep_from` (default: the current one) on loadable
/// (delta-rs deletes only below a Delta checkpoint at or before both `keep_from` and the
/// oldest version within the retention). Returns how many files were deleted.
pub async fn clean_log(
    table: &DeltaTable,
    label: &str,
    keep_from: Option<u64>,
    retention: Duration,
) -> Result<usize, LakeError> {
    super::lock::fence()?;
    let Some(current) = table.version() else {
        return Ok(0);
    };
    let keep_from = keep_from.map_or(current, |v| v.min(current));
    let cutoff = chrono::Utc::now().timestamp_millis()
        - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    deltalake::checkpoints::cleanup_expired_logs_for(
        keep_from as _,
        table.log_store().as_ref(),
        cutoff,
        None,
    )
    .await
    .map_err(|source| LakeError::Delta {
        table: label.to_string(),
        source,
    })
}

/// Deletes files no current version references that are older than the retention.
/// Returns how many were deleted; `table` moves to the version vacuum committed.
pub async fn vacuum(
    table: &mut DeltaTable,
    label: &str,
    retention: Duration,
) -> Result<usize, LakeError> {
    super::lock::fence()?;
    let delta_err = |source| LakeError::Delta {
        table: label.to_string(),
        source,
    };
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(7));
    if super::deletion_vector::supported(table) {
        return vacuum_keeping_deletion_vectors(table, retention)
            .await
            .map_err(delta_err);
    }
    let (vacuumed, metrics) = table
        .clone()
        .vacuum()
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_mode(VacuumMode::Full)
        .with_commit_properties(no_log_cleanup())
        .await
        .map_err(delta_err)?;
    *table = vacuumed;
    Ok(metrics.files_deleted.len())
}

/// Vacuum of a table with deletion vectors: delta-rs's plan, less the DV files a version
/// within the retention still references (which delta-rs does not track), deleted here.
async fn vacuum_keeping_deletion_vectors(
    table: &mut DeltaTable,
    retention: chrono::Duration,
) -> Result<usize, deltalake::DeltaTableError> {
    let keep = super::deletion_vector::keep(table, retention).await;
    let (_, plan) = table
        .clone()
        .vacuum()
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_mode(VacuumMode::Full)
        .with_dry_run(true)
        .await?;
    let store = table.object_store();
    let mut deleted = 0;
    for path in plan.files_deleted {
        // The plan's paths are already encoded object paths.
        let location = deltalake::Path::parse(&path).unwrap_or_else(|_| path.as_str().into());
        if super::deletion_vector::is_dv_file(&path) {
            let modified = match store.head(&location).await {
                Ok(meta) => meta.last_modified,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            if keep.keeps(&path, modified) {
                continue;
            }
        }
        match store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(deleted)
}
