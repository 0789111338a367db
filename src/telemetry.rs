//! Prometheus metrics: every metric's name, unit and help text, and the `/metrics`
//! listener (`[metrics] listen`).
//!
//! Metrics are recorded where things happen (apply, source, snapshot, pipeline) through
//! the functions below, so names and labels live in one place; docs/operations.md lists them.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde::Deserialize;

pub const CHANGES: &str = "wal2delta_changes_total";
pub const TRANSACTIONS: &str = "wal2delta_transactions_total";
pub const LAG_BYTES: &str = "wal2delta_replication_lag_bytes";
pub const LAG_SECONDS: &str = "wal2delta_replication_lag_seconds";
pub const FLUSHED_LSN: &str = "wal2delta_flushed_lsn";
pub const RETAINED_WAL: &str = "wal2delta_slot_retained_wal_bytes";
pub const COMMIT_SECONDS: &str = "wal2delta_delta_commit_duration_seconds";
pub const BATCH_ROWS: &str = "wal2delta_batch_rows";
pub const SNAPSHOT_COPIED: &str = "wal2delta_snapshot_rows_copied";
pub const SNAPSHOT_ESTIMATED: &str = "wal2delta_snapshot_rows_estimated";
pub const NORMALIZATION_FAILURES: &str = "wal2delta_normalization_failures_total";
pub const RECONNECTS: &str = "wal2delta_reconnects_total";
pub const ERRORS: &str = "wal2delta_errors_total";
pub const DIVERGENCES: &str = "wal2delta_divergences_total";
pub const BUILD_INFO: &str = "wal2delta_build_info";
pub const TABLE_FILES: &str = "wal2delta_table_files";
pub const COMPACTED: &str = "wal2delta_compacted_files_total";
pub const VACUUMED: &str = "wal2delta_vacuumed_files_total";
pub const LOG_CLEANED: &str = "wal2delta_log_files_removed_total";
pub const SQL_DURATION: &str = "wal2delta_sql_statement_duration_seconds";
pub const SQL_CONNECTIONS: &str = "wal2delta_sql_connections";
pub const SQL_REFUSED: &str = "wal2delta_sql_connections_refused_total";
pub const SQL_STATEMENTS: &str = "wal2delta_sql_statements_total";
pub const SQL_KEY_LOOKUPS: &str = "wal2delta_sql_key_lookups_total";
pub const MERGE_SECONDS: &str = "wal2delta_merge_seconds";
pub const MERGE_SCANNED: &str = "wal2delta_merge_scanned_files_total";
pub const MERGE_REWRITTEN_FILES: &str = "wal2delta_merge_rewritten_files_total";
pub const MERGE_REWRITTEN_BYTES: &str = "wal2delta_merge_rewritten_bytes_total";
pub const MERGE_MARKED_ROWS: &str = "wal2delta_merge_marked_rows_total";

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` serving `/metrics` (e.g. `127.0.0.1:9734`); unset: no endpoint.
    pub listen: Option<String>,
    /// Log a warning when the slot retains more WAL than this (MiB).
    pub retained_wal_warn_mb: Option<u64>,
}

impl MetricsConfig {
    /// Checks the section (problems name `metrics.<field>`): the address to serve on and
    /// the retained-WAL warning in bytes.
    pub fn validate(
        &self,
        problems: &mut Vec<String>,
    ) -> (Option<std::net::SocketAddr>, Option<i64>) {
        let listen = match self.listen.as_deref().map(str::parse) {
            None => None,
            Some(Ok(addr)) => Some(addr),
            Some(Err(e)) => {
                problems.push(format!(
                    "metrics.listen: `{}` is not a host:port address ({e}); e.g. \"127.0.0.1:9734\"",
                    self.listen.as_deref().unwrap_or_default()
                ));
                None
            }
        };
        let warn = self
            .retained_wal_warn_mb
            .map(|mb| (mb.min(1 << 40) * 1024 * 1024) as i64);
        (listen, warn)
    }
}

/// Starts the `/metrics` listener and describes every metric.
pub fn install(listen: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(
            Matcher::Full(COMMIT_SECONDS.into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(SQL_DURATION.into()),
                &[
                    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    5.0, 30.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(MERGE_SECONDS.into()),
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(BATCH_ROWS.into()),
                &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0],
            )
        })
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("cannot serve metrics on {listen}: {e}"))?;
    describe_counter!(
        CHANGES,
        Unit::Count,
        "Source changes written to the raw tables, by table and op (c, u, d, t, r)."
    );
    describe_counter!(
        DIVERGENCES,
        Unit::Count,
        "Source changes the stream cannot carry exactly, by table and reason: a table \
         dropped from the publication or given a row filter or column list, its replica \
         identity changed (these stop the daemon), partitions attached, detached or \
         truncated (these start a resync)."
    );
    describe_counter!(
        TRANSACTIONS,
        Unit::Count,
        "Source transactions committed to the lake."
    );
    describe_gauge!(
        LAG_BYTES,
        Unit::Bytes,
        "Server WAL end seen on the stream minus the durable (flushed) position."
    );
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "Now minus the commit time of the last applied transaction; 0 when caught up."
    );
    describe_gauge!(
        FLUSHED_LSN,
        "The durable source position confirmed to Postgres, as a number."
    );
    describe_gauge!(
        RETAINED_WAL,
        Unit::Bytes,
        "WAL the slot keeps from recycling (pg_current_wal_lsn - restart_lsn)."
    );
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "Duration of Delta commits, by table and layer (raw, curated)."
    );
    describe_histogram!(BATCH_ROWS, Unit::Count, "Rows per committed batch.");
    describe_gauge!(
        SNAPSHOT_COPIED,
        Unit::Count,
        "Rows copied by the running snapshot, by table."
    );
    describe_gauge!(
        SNAPSHOT_ESTIMATED,
        Unit::Count,
        "Rows the snapshot expects to copy (planner estimate), by table."
    );
    describe_counter!(
        NORMALIZATION_FAILURES,
        Unit::Count,
        "Values no normalization format accepted (NULL in curated), by table and column."
    );
    describe_counter!(
        RECONNECTS,
        Unit::Count,
        "Replication sessions or snapshots restarted after a transient error, by phase."
    );
    describe_counter!(
        ERRORS,
        Unit::Count,
        "Errors, by kind (replication, lake, catalog, snapshot, apply)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
    describe_gauge!(
        TABLE_FILES,
        Unit::Count,
        "Data files in each table's current version, by table and layer (raw, curated)."
    );
    describe_counter!(
        COMPACTED,
        Unit::Count,
        "Small files rewritten by compaction, by table and layer."
    );
    describe_counter!(
        VACUUMED,
        Unit::Count,
        "Unreferenced files deleted by vacuum, by table and layer."
    );
    describe_counter!(
        LOG_CLEANED,
        Unit::Count,
        "Delta log entries (commits, checkpoints) older than maintenance.log_retention_hours deleted, by table and layer (raw, curated, checkpoint)."
    );
    describe_histogram!(
        SQL_DURATION,
        Unit::Seconds,
        "Duration of SQL endpoint statements, from receipt to the last row sent."
    );
    describe_gauge!(
        SQL_CONNECTIONS,
        Unit::Count,
        "Open connections to the SQL endpoint."
    );
    describe_counter!(
        SQL_REFUSED,
        Unit::Count,
        "SQL connections refused because serve.max_connections were open."
    );
    describe_counter!(
        SQL_STATEMENTS,
        Unit::Count,
        "Statements the SQL endpoint ran, by outcome (ok, or the SQLSTATE class of the error)."
    );
    describe_counter!(
        SQL_KEY_LOOKUPS,
        Unit::Count,
        "Statements the SQL endpoint answered as key lookups, without planning a query (SELECT … FROM t WHERE key = v)."
    );
    describe_histogram!(
        MERGE_SECONDS,
        Unit::Seconds,
        "Duration of merging one chunk of changes into a curated table (before its commit), by table."
    );
    describe_counter!(
        MERGE_SCANNED,
        Unit::Count,
        "Curated data files whose key columns a merge read (the key statistics admitted a changed key), by table."
    );
    describe_counter!(
        MERGE_REWRITTEN_FILES,
        Unit::Count,
        "Curated data files a merge rewrote because they held a changed key, by table."
    );
    describe_counter!(
        MERGE_REWRITTEN_BYTES,
        Unit::Bytes,
        "Bytes of the curated data files merges rewrote (write amplification), by table."
    );
    describe_counter!(
        MERGE_MARKED_ROWS,
        Unit::Count,
        "Curated rows merges marked deleted in deletion vectors instead of rewriting their files, by table."
    );
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}

/// One chunk merged into a curated table: its duration, files scanned and rewritten.
pub fn merged(table: &str, took: Duration, scanned: u64, rewritten: u64, bytes: u64, marked: u64) {
    histogram!(MERGE_SECONDS, "table" => table.to_string()).record(took.as_secs_f64());
    counter!(MERGE_SCANNED, "table" => table.to_string()).increment(scanned);
    counter!(MERGE_REWRITTEN_FILES, "table" => table.to_string()).increment(rewritten);
    counter!(MERGE_REWRITTEN_BYTES, "table" => table.to_string()).increment(bytes);
    counter!(MERGE_MARKED_ROWS, "table" => table.to_string()).increment(marked);
}

pub fn table_files(table: &str, layer: &'static str, files: usize) {
    gauge!(TABLE_FILES, "table" => table.to_string(), "layer" => layer).set(files as f64);
}

pub fn compacted(table: &str, layer: &'static str, files: u64) {
    counter!(COMPACTED, "table" => table.to_string(), "layer" => layer).increment(files);
}

pub fn vacuumed(table: &str, layer: &'static str, files: usize) {
    counter!(VACUUMED, "table" => table.to_string(), "layer" => layer).increment(files as u64);
}

pub fn log_cleaned(table: &str, layer: &'static str, files: usize) {
    counter!(LOG_CLEANED, "table" => table.to_string(), "layer" => layer).increment(files as u64);
}

pub fn sql_lookup() {
    counter!(SQL_KEY_LOOKUPS).increment(1);
}

pub fn sql_statement_duration(took: Duration) {
    histogram!(SQL_DURATION).record(took.as_secs_f64());
}

/// Counts an open SQL connection for as long as it lives.
pub struct SqlConnection(());

impl SqlConnection {
    pub fn open() -> SqlConnection {
        gauge!(SQL_CONNECTIONS).increment(1.0);
        SqlConnection(())
    }
}

impl Drop for SqlConnection {
    fn drop(&mut self) {
        gauge!(SQL_CONNECTIONS).decrement(1.0);
    }
}

pub fn sql_connection_refused() {
    counter!(SQL_REFUSED).increment(1);
}

/// A statement ended: `outcome` is "ok" or the SQLSTATE's class ("42", "57"…).
pub fn sql_statement(outcome: &str) {
    counter!(SQL_STATEMENTS, "outcome" => outcome.to_string()).increment(1);
}

pub fn change(table: &str, op: &str, n: u64) {
    counter!(CHANGES, "table" => table.to_string(), "op" => op.to_string()).increment(n);
}

pub fn batch_committed(rows: usize, transactions: u64, last_commit_ts_micros: i64, flushed: i64) {
    counter!(TRANSACTIONS).increment(transactions);
    histogram!(BATCH_ROWS).record(rows as f64);
    let now = chrono::Utc::now().timestamp_micros();
    gauge!(LAG_SECONDS).set((now - last_commit_ts_micros).max(0) as f64 / 1e6);
    gauge!(FLUSHED_LSN).set(flushed as f64);
}

/// Nothing pending and everything sent is durable.
pub fn caught_up(flushed: i64) {
    gauge!(LAG_SECONDS).set(0.0);
    gauge!(LAG_BYTES).set(0.0);
    gauge!(FLUSHED_LSN).set(flushed as f64);
}

pub fn lag_bytes(server_end: i64, flushed: i64) {
    gauge!(LAG_BYTES).set((server_end - flushed).max(0) as f64);
}

pub fn commit_duration(table: &str, layer: &'static str, took: Duration) {
    histogram!(COMMIT_SECONDS, "table" => table.to_string(), "layer" => layer)
        .record(took.as_secs_f64());
}

pub fn retained_wal(bytes: i64) {
    gauge!(RETAINED_WAL).set(bytes as f64);
}

pub fn snapshot_progress(table: &str, copied: u64, estimated: Option<f64>) {
    gauge!(SNAPSHOT_COPIED, "table" => table.to_string()).set(copied as f64);
    if let Some(estimated) = estimated {
        gauge!(SNAPSHOT_ESTIMATED, "table" => table.to_string()).set(estimated);
    }
}

pub fn normalization_failures(table: &str, column: &str, n: u64) {
    counter!(NORMALIZATION_FAILURES, "table" => table.to_string(), "column" => column.to_string())
        .increment(n);
}

pub fn reconnect(phase: &'static str) {
    counter!(RECONNECTS, "phase" => phase).increment(1);
}

pub fn divergence(table: &str, reason: &'static str) {
    counter!(DIVERGENCES, "table" => table.to_string(), "reason" => reason).increment(1);
}

pub fn error(kind: &'static str) {
    counter!(ERRORS, "kind" => kind).increment(1);
}
