//! `[source]`: the database to replicate, its slot and publication, and the snapshot
//! settings, with their documented defaults and validation (problems name
//! `source.<field>`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::dsn::ConnParams;
use super::snapshot::{CopyRate, SnapshotLimits};
use crate::secret::Secret;
use crate::table_name::TableName;

/// `[source]`: the Postgres database to replicate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style URL or key=value string.
    pub dsn: String,
    /// File holding the password (first line; trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Logical replication slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Tables to replicate, as `schema.table` (unquoted names fold to lower case, as in SQL).
    pub tables: Vec<String>,
    /// Create the slot when it does not exist.
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// Create the slot as a failover slot (PostgreSQL 17+): standbys with
    /// `sync_replication_slots = on` keep a copy, so replication resumes on a promoted one.
    #[serde(default)]
    pub failover: bool,
    /// Create the publication (for exactly `tables`) when it does not exist.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// Seconds between standby status updates sent to Postgres.
    #[serde(default = "default_status_interval")]
    pub status_interval_secs: u64,
    /// `initial`: copy every table's existing rows when a table has no snapshot yet (the
    /// first start, a new slot, a newly configured table); `never`: only stream changes.
    #[serde(default = "default_snapshot")]
    pub snapshot: String,
    /// Connections copying a snapshot in parallel.
    #[serde(default = "default_snapshot_workers")]
    pub snapshot_workers: usize,
    /// Size of the table ranges (in MiB of heap) the snapshot copies as one unit.
    #[serde(default = "default_snapshot_chunk_mb")]
    pub snapshot_chunk_mb: u64,
    /// `exported`: copy a table as of an exported snapshot before streaming it;
    /// `watermark`: copy tables keyed by one integer column in key-ordered chunks while
    /// streaming, resumable after a crash (others as `exported`).
    #[serde(default = "default_snapshot_method")]
    pub snapshot_method: String,
    /// Rows per chunk of a watermark snapshot.
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: usize,
    /// The most COPY data (MiB per second) a snapshot or resync reads, all its connections
    /// together; 0: as fast as the source sends it.
    #[serde(default)]
    pub snapshot_max_mb_per_sec: f64,
    /// The most rows per second a snapshot or resync reads, all its connections together;
    /// 0: no limit.
    #[serde(default)]
    pub snapshot_max_rows_per_sec: f64,
    /// Limits for one table's copy, by `schema.table`, besides the overall ones.
    #[serde(default)]
    pub snapshot_table_limits: std::collections::BTreeMap<String, TableLimitConfig>,
    /// Seconds between heartbeats (`pg_logical_emit_message`); unset: none.
    pub heartbeat_secs: Option<u64>,
    /// Ask PostgreSQL 14+ to send large transactions while they run (protocol 2,
    /// `streaming 'on'`) instead of decoding them after their commit.
    #[serde(default = "yes")]
    pub stream_in_progress: bool,
    /// While streaming running transactions: the replication connection's
    /// `logical_decoding_work_mem` is lowered to this many MiB if the server's is higher
    /// (0: the server's as it is). Postgres sends a running transaction once its decoded
    /// changes pass this much memory, and decodes what is left of it at its commit: the
    /// lower, the less waits for the commit.
    #[serde(default = "default_decoding_work_mem_mb")]
    pub decoding_work_mem_mb: u64,
    /// Where running transactions are kept until they commit; default: a directory named
    /// after the slot and the lake in the system's temporary directory.
    pub spill_dir: Option<PathBuf>,
}

/// `source.snapshot_table_limits."schema.table"`: one table's copy rate (0: no limit).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableLimitConfig {
    #[serde(default)]
    pub max_mb_per_sec: f64,
    #[serde(default)]
    pub max_rows_per_sec: f64,
}

/// `value` as a rate (`None` for 0), or a problem naming `setting`.
fn rate(value: f64, scale: f64, setting: &str, problems: &mut Vec<String>) -> Option<f64> {
    // Below a hundredth of a MiB or one row a second a copy would never end.
    let least = if scale > 1.0 { 0.01 } else { 1.0 };
    if !value.is_finite() || value < 0.0 || (value > 0.0 && value < least) {
        problems.push(format!(
            "{setting}: must be 0 (no limit) or at least {least}, not {value}"
        ));
        return None;
    }
    (value > 0.0).then_some(value * scale)
}

const MIB: f64 = 1024.0 * 1024.0;

/// Whether a missing snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    Initial,
    Never,
}

/// How a table is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMethod {
    /// From an exported snapshot, before the table is streamed.
    Exported,
    /// In key-ordered chunks between watermarks, while streaming.
    Watermark,
}

fn default_snapshot_method() -> String {
    "exported".into()
}
fn default_snapshot_chunk_rows() -> usize {
    50_000
}
fn default_snapshot() -> String {
    "initial".into()
}
fn default_snapshot_workers() -> usize {
    4
}
fn default_snapshot_chunk_mb() -> u64 {
    64
}

fn yes() -> bool {
    true
}
fn default_decoding_work_mem_mb() -> u64 {
    8
}
fn default_status_interval() -> u64 {
    10
}

/// The validated `[source]` section.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// How to reach the database (the password included, from its file or variable).
    pub conn: ConnParams,
    pub slot: String,
    pub publication: String,
    pub tables: Vec<TableName>,
    pub create_slot: bool,
    /// Create the slot with `FAILOVER` (PostgreSQL 17+).
    pub failover: bool,
    pub create_publication: bool,
    pub status_interval: Duration,
    pub snapshot: SnapshotMode,
    pub snapshot_workers: usize,
    pub snapshot_chunk_bytes: i64,
    pub snapshot_method: SnapshotMethod,
    pub snapshot_chunk_rows: usize,
    /// The copy's rate limits, overall and by table.
    pub snapshot_limits: SnapshotLimits,
    /// Interval of the optional WAL heartbeat.
    pub heartbeat: Option<Duration>,
    /// Stream running transactions when the server can (PostgreSQL 14+).
    pub stream_in_progress: bool,
    /// `logical_decoding_work_mem` for the replication connection when it streams
    /// running transactions, in MiB; `None`: the server's.
    pub decoding_work_mem_mb: Option<u64>,
    /// Where streamed transactions wait for their commit.
    pub spill_dir: PathBuf,
}

/// `$TMPDIR/wal2delta-<slot>-<lake>`: named after the lake as well as the slot, since two
/// daemons on one host may replicate slots of the same name from two databases (each
/// into its own lake). The lake's part is a hash of its location (FNV-1a, stable across
/// builds), so a restart finds the same directory.
fn default_spill_dir(slot: &str, lake: &str) -> PathBuf {
    let hash = stable_hash(lake.as_bytes());
    std::env::temp_dir().join(format!("wal2delta-{slot}-{:08x}", hash as u32))
}

/// FNV-1a of `data`: the same in every build and on every machine, for names and
/// fingerprints kept across restarts.
pub(crate) fn stable_hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SourceConfig {
    /// Checks every field, adding each problem to `problems`; the settings when the
    /// connection string at least parses. `lake` is the lake's location, which names the
    /// default spill directory.
    pub fn validate(&self, lake: &str, problems: &mut Vec<String>) -> Option<SourceSettings> {
        let conn = ConnParams::parse(&self.dsn)
            .map_err(|e| problems.push(format!("source.dsn: {e}")))
            .ok();
        let password = self.password(problems);
        let conn = conn.map(|mut conn| {
            if password.is_some() {
                conn.password = password;
            }
            conn
        });
        // Slot names: what pg_create_logical_replication_slot accepts.
        let slot_valid = !self.slot.is_empty()
            && self.slot.len() <= 63
            && self
                .slot
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !slot_valid {
            problems.push(format!(
                "source.slot: `{}` is not a valid slot name (1 to 63 characters: lower-case letters, digits, underscore)",
                self.slot
            ));
        }
        if self.publication.is_empty() || self.publication.len() > 63 {
            problems.push("source.publication: must be 1 to 63 characters long".into());
        }
        let tables = self.tables(problems);
        if self.status_interval_secs == 0 || self.status_interval_secs > 3600 {
            problems.push("source.status_interval_secs: must be from 1 to 3600".into());
        }
        let snapshot = match self.snapshot.as_str() {
            "initial" => SnapshotMode::Initial,
            "never" => SnapshotMode::Never,
            other => {
                problems.push(format!(
                    "source.snapshot: `{other}` is not a snapshot mode; use \"initial\" or \"never\""
                ));
                SnapshotMode::Initial
            }
        };
        let snapshot_method = match self.snapshot_method.as_str() {
            "exported" => SnapshotMethod::Exported,
            "watermark" => SnapshotMethod::Watermark,
            other => {
                problems.push(format!(
                    "source.snapshot_method: `{other}` is not a snapshot method; use \"exported\" or \"watermark\""
                ));
                SnapshotMethod::Exported
            }
        };
        if !(100..=10_000_000).contains(&self.snapshot_chunk_rows) {
            problems.push("source.snapshot_chunk_rows: must be from 100 to 10000000".into());
        }
        if !(1..=64).contains(&self.snapshot_workers) {
            problems.push("source.snapshot_workers: must be from 1 to 64".into());
        }
        if !(1..=65536).contains(&self.snapshot_chunk_mb) {
            problems.push("source.snapshot_chunk_mb: must be from 1 to 65536".into());
        }
        let mut snapshot_limits = SnapshotLimits {
            overall: CopyRate {
                bytes_per_sec: rate(
                    self.snapshot_max_mb_per_sec,
                    MIB,
                    "source.snapshot_max_mb_per_sec",
                    problems,
                ),
                rows_per_sec: rate(
                    self.snapshot_max_rows_per_sec,
                    1.0,
                    "source.snapshot_max_rows_per_sec",
                    problems,
                ),
            },
            tables: Default::default(),
        };
        for (name, limit) in &self.snapshot_table_limits {
            let setting = format!("source.snapshot_table_limits.\"{name}\"");
            match TableName::parse(name) {
                Ok(t) if tables.contains(&t) => {
                    let rate = CopyRate {
                        bytes_per_sec: rate(
                            limit.max_mb_per_sec,
                            MIB,
                            &format!("{setting}.max_mb_per_sec"),
                            problems,
                        ),
                        rows_per_sec: rate(
                            limit.max_rows_per_sec,
                            1.0,
                            &format!("{setting}.max_rows_per_sec"),
                            problems,
                        ),
                    };
                    snapshot_limits.tables.insert(t.to_string(), rate);
                }
                Ok(_) => problems.push(format!(
                    "{setting}: `{name}` is not in source.tables; list it there or remove its limits"
                )),
                Err(e) => problems.push(format!("{setting}: {e}")),
            }
        }
        // Postgres's own bounds: 64 kB to 2 TB (MAX_KILOBYTES).
        if self.decoding_work_mem_mb > 2 * 1024 * 1024 - 1 {
            problems.push(
                "source.decoding_work_mem_mb: must be at most 2097151 (or 0: the server's setting)"
                    .into(),
            );
        }
        if self.heartbeat_secs == Some(0) {
            problems
                .push("source.heartbeat_secs: must be at least 1 (or unset: no heartbeat)".into());
        }
        Some(SourceSettings {
            conn: conn?,
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            tables,
            create_slot: self.create_slot,
            failover: self.failover,
            create_publication: self.create_publication,
            status_interval: Duration::from_secs(self.status_interval_secs),
            snapshot,
            snapshot_workers: self.snapshot_workers,
            snapshot_chunk_bytes: (self.snapshot_chunk_mb * 1024 * 1024) as i64,
            snapshot_method,
            snapshot_chunk_rows: self.snapshot_chunk_rows,
            snapshot_limits,
            heartbeat: self.heartbeat_secs.map(|s| Duration::from_secs(s.max(1))),
            stream_in_progress: self.stream_in_progress,
            decoding_work_mem_mb: (self.decoding_work_mem_mb > 0)
                .then_some(self.decoding_work_mem_mb),
            spill_dir: self
                .spill_dir
                .clone()
                .unwrap_or_else(|| default_spill_dir(&self.slot, lake)),
        })
    }

    /// The password from `password_file` or `password_env`, if one is set and readable.
    fn password(&self, problems: &mut Vec<String>) -> Option<Secret> {
        match (&self.password_file, &self.password_env) {
            (Some(_), Some(_)) => {
                problems.push(
                    "source.password_file and source.password_env are both set; keep one".into(),
                );
                None
            }
            (Some(file), None) => match std::fs::read_to_string(file) {
                Ok(text) => Some(Secret::new(text.lines().next().unwrap_or("").to_string())),
                Err(e) => {
                    problems.push(format!(
                        "source.password_file: cannot read {}: {e}",
                        file.display()
                    ));
                    None
                }
            },
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) => Some(Secret::new(v)),
                Err(_) => {
                    problems.push(format!(
                        "source.password_env: the environment variable `{var}` is not set"
                    ));
                    None
                }
            },
            (None, None) => None,
        }
    }

    /// The configured tables, parsed, each once.
    fn tables(&self, problems: &mut Vec<String>) -> Vec<TableName> {
        let mut tables = Vec::new();
        if self.tables.is_empty() {
            problems.push("source.tables: list at least one table, as \"schema.table\"".into());
        }
        for t in &self.tables {
            match TableName::parse(t) {
                Ok(name) if tables.contains(&name) => {
                    problems.push(format!("source.tables: `{t}` is listed twice"))
                }
                Ok(name) => tables.push(name),
                Err(e) => problems.push(format!("source.tables: {e}")),
            }
        }
        tables
    }
}
