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
//! - **Vacuum keeps what readers may need.** Files are deleted only when no version
//!   within `vacuum_retention_hours` (default 7 days) references them, so a running query
//!   or a time-travel read within the retention still finds its files. delta-rs's plan
//!   alone is not enough: it tracks neither superseded deletion-vector files nor a data
//!   file removed again after an expired same-path `remove` ([`vacuum`]). Full mode also
//!   removes files a crashed batch wrote but never committed.
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

use std::collections::HashSet;
use std::num::NonZeroU64;
use std::time::Duration;

use deltalake::DeltaTable;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::vacuum::VacuumMode;
use futures::StreamExt;
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

/// Deletes files no version within the retention references. Returns how many were
/// deleted.
///
/// delta-rs's full-mode plan is the starting point (unreferenced files older than the
/// retention, expired tombstones); [`Keep`] then takes out what it misses:
/// - a data file that a deletion-vector merge removed and re-added long ago and a
///   compaction removed just now: its old tombstone is expired, so delta-rs deletes it
///   while the endpoint still serves the version before the compaction (found by the
///   maintenance test: "Failed to fetch metadata … not found");
/// - DV files of superseded DVs, which delta-rs does not track at all;
/// - the files of the version a reader started within the retention may still read, when
///   the compactions after it are older than the retention (an idle source).
pub async fn vacuum(
    table: &mut DeltaTable,
    label: &str,
    retention: Duration,
) -> Result<usize, LakeError> {
    super::lock::fence()?;
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(7));
    vacuum_keeping_readers_files(table, retention)
        .await
        .map_err(|source| LakeError::Delta {
            table: label.to_string(),
            source,
        })
}

async fn vacuum_keeping_readers_files(
    table: &mut DeltaTable,
    retention: chrono::Duration,
) -> Result<usize, deltalake::DeltaTableError> {
    let keep = Keep::find(table, retention).await?;
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
        if keep.referenced.contains(&location) {
            continue;
        }
        let modified = match store.head(&location).await {
            Ok(meta) => meta.last_modified,
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if modified > keep.written_after {
            continue;
        }
        match store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(deleted)
}

/// The files vacuum keeps although the current version does not reference them.
struct Keep {
    /// Files (data and DV) of the oldest version a reader may still read, and files with a
    /// tombstone younger than the retention.
    referenced: HashSet<deltalake::Path>,
    /// Files written after this may belong to a later version: kept. A file is written
    /// just before the commit that adds it; the slack covers that time.
    written_after: chrono::DateTime<chrono::Utc>,
}

/// How far back [`Keep::find`] steps over commits that changed no data.
const MAX_STEPS_OVER_MAINTENANCE: u64 = 32;

impl Keep {
    /// The oldest version a reader may read is the one current at `now - retention`, or
    /// before it: the endpoint serves the versions of the last checkpoint record, which
    /// precede the compaction and vacuum commits that follow a batch. So this steps back
    /// over commits that changed no data.
    async fn find(
        table: &DeltaTable,
        retention: chrono::Duration,
    ) -> Result<Keep, deltalake::DeltaTableError> {
        let since = chrono::Utc::now() - retention;
        let mut referenced = HashSet::new();
        let log_store = table.log_store();
        let current = table.snapshot()?;
        let mut tombstones = current.all_tombstones(log_store.as_ref());
        while let Some(tombstone) = tombstones.next().await {
            let tombstone = tombstone?;
            if tombstone
                .deletion_timestamp()
                .is_none_or(|t| t >= since.timestamp_millis())
            {
                let path = tombstone.path();
                referenced.insert(
                    deltalake::Path::parse(path.as_ref())
                        .unwrap_or_else(|_| deltalake::Path::from(path.as_ref())),
                );
            }
        }
        drop(tombstones);

        // The version at `since` (the oldest one whose log is kept, if the log is shorter).
        let mut then = table.clone();
        then.load_with_datetime(since).await?;
        let mut version = then.version().unwrap_or(0);
        let mut then_ts = None;
        for step in 0..=MAX_STEPS_OVER_MAINTENANCE {
            let Ok(Some(commit)) = log_store.read_commit_entry(version).await else {
                break;
            };
            let (data, timestamp) = commit_facts(&commit);
            then_ts = timestamp;
            if data || version == 0 || step == MAX_STEPS_OVER_MAINTENANCE {
                break;
            }
            version -= 1;
        }
        if Some(version) != then.version() && then.load_version(version).await.is_err() {
            then.load_with_datetime(since).await?; // its log is gone: the step back stops
            then_ts = None;
        }
        let then_ts = then_ts
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map_or(since, |t| t.min(since));
        let snapshot = then.snapshot()?;
        for view in snapshot.log_data().iter() {
            referenced.insert(view.object_store_path());
            if let Some(dv) = view
                .deletion_vector_descriptor()
                .and_then(|dv| super::deletion_vector::relative_file(&dv))
            {
                referenced.insert(deltalake::Path::from(dv.as_str()));
            }
        }
        let slack = retention.min(chrono::Duration::hours(1));
        Ok(Keep {
            referenced,
            written_after: then_ts - slack,
        })
    }
}

/// Whether a commit's JSON lines add or remove a file with `dataChange: true`, and its
/// `commitInfo.timestamp`.
fn commit_facts(commit: &[u8]) -> (bool, Option<i64>) {
    let mut data = false;
    let mut timestamp = None;
    for action in commit
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
    {
        data |= ["add", "remove"].iter().any(|kind| {
            action
                .get(kind)
                .and_then(|a| a.get("dataChange"))
                .and_then(|d| d.as_bool())
                .unwrap_or(false)
        });
        if let Some(t) = action
            .get("commitInfo")
            .and_then(|c| c.get("timestamp"))
            .and_then(|t| t.as_i64())
        {
            timestamp = Some(t);
        }
    }
    (data, timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_changes_data_only_with_a_data_change_add_or_remove() {
        let merge = br#"{"commitInfo":{"timestamp":1796094555712,"operation":"MERGE"}}
{"remove":{"path":"a.parquet","dataChange":true,"deletionTimestamp":1}}
{"add":{"path":"a.parquet","dataChange":true}}"#;
        assert_eq!(commit_facts(merge), (true, Some(1796094555712)));
        let optimize = br#"{"commitInfo":{"timestamp":7,"operation":"OPTIMIZE"}}
{"remove":{"path":"a.parquet","dataChange":false}}
{"add":{"path":"b.parquet","dataChange":false}}"#;
        assert_eq!(commit_facts(optimize), (false, Some(7)));
        let vacuum = br#"{"commitInfo":{"timestamp":8,"operation":"VACUUM END"}}"#;
        assert_eq!(commit_facts(vacuum), (false, Some(8)));
        assert_eq!(
            commit_facts(
                b"not json
"
            ),
            (false, None)
        );
    }
}
