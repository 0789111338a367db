//! The source side of `verify`: one exported snapshot, and the table's rows hashed in SQL
//! by key range, so only per-range sums (and, for ranges that differ, keys and hashes)
//! leave the server.
//!
//! The snapshot comes from a temporary slot, like the daemon's own snapshots: its
//! consistent point is exact (every transaction committed before it is visible, none
//! after), and the slot is gone as soon as the snapshot is imported, so a long check pins
//! no WAL.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::canonical::{Compared, sql_hashes, sql_piece, sql_value};
use super::{Bucket, VerifyError};
use crate::lsn::Lsn;
use crate::source::catalog;
use crate::source::dsn::ConnParams;
use crate::source::replication::ReplicationConnection;
use crate::source::snapshot::import_snapshot;
use crate::table_name::TableName;

/// A transaction that sees the source as of one consistent point.
pub struct SourceSnapshot {
    client: Client,
    pub point: Lsn,
}

impl SourceSnapshot {
    /// Exports a snapshot from a temporary slot and imports it; the slot is dropped at once.
    pub async fn take(params: &ConnParams) -> Result<SourceSnapshot, VerifyError> {
        let mut repl = ReplicationConnection::connect(params).await?;
        let slot = format!("wal2delta_verify_{}", std::process::id());
        let (point, name) = repl.create_slot_exporting(&slot, true, false).await?;
        let client = catalog::connect(params).await?;
        let imported = import_snapshot(&client, &name).await;
        // The imported snapshot lives on in the transaction; the temporary slot goes.
        repl.close().await;
        imported?;
        Ok(SourceSnapshot { client, point })
    }

    /// Rows and hash sums per key range (`2^bits` ranges).
    pub async fn buckets(
        &self,
        table: &TableQuery,
        bits: u32,
    ) -> Result<HashMap<u32, Bucket>, VerifyError> {
        let sql = format!(
            "SELECT (h.kb >> {shift})::bigint, count(*)::bigint, sum(h.rb)::text \
             FROM ({hashed}) AS h GROUP BY 1",
            shift = 32 - bits,
            hashed = table.hashed
        );
        let rows = self
            .client
            .query(&sql, &[])
            .await
            .map_err(|e| table.error(e))?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let bucket: i64 = row.get(0);
            let count: i64 = row.get(1);
            let sum: String = row.get(2);
            out.insert(
                bucket as u32,
                Bucket {
                    rows: count as u64,
                    sum: sum.parse().unwrap_or(u128::MAX),
                },
            );
        }
        Ok(out)
    }

    /// Canonical key and row hash of every row in `buckets`.
    pub async fn rows_in(
        &self,
        table: &TableQuery,
        bits: u32,
        buckets: &[u32],
    ) -> Result<Vec<(String, u64)>, VerifyError> {
        let sql = format!(
            "SELECT h.k, h.rb FROM ({hashed}) AS h WHERE (h.kb >> {shift}) = ANY($1)",
            shift = 32 - bits,
            hashed = table.hashed
        );
        let wanted: Vec<i64> = buckets.iter().map(|b| i64::from(*b)).collect();
        let rows = self
            .client
            .query(&sql, &[&wanted])
            .await
            .map_err(|e| table.error(e))?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect())
    }
}

/// The SQL that hashes one table's rows: `kb` (key hash), `rb` (row hash), `k` (the
/// canonical key).
pub struct TableQuery {
    table: String,
    hashed: String,
}

impl TableQuery {
    /// `columns` are compared; those at `key` (indices into `columns`) are the key. A
    /// partitioned table is read through its root (its partitions' rows); any other
    /// table without the rows of tables inheriting from it, which are not published.
    /// With the publication's `row_filter`, only the rows it publishes.
    pub fn new(
        table: &TableName,
        partitioned: bool,
        row_filter: Option<&str>,
        columns: &[Compared],
        key: &[usize],
    ) -> TableQuery {
        let values: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} AS c{i}", sql_value(c)))
            .collect();
        let piece = |i: &usize| sql_piece(&format!("v.c{i}"));
        let key_sql = key.iter().map(piece).collect::<Vec<_>>().join(" || ");
        let all: Vec<usize> = (0..columns.len()).collect();
        let row_sql = all.iter().map(piece).collect::<Vec<_>>().join(" || ");
        let (kb, rb) = sql_hashes(&key_sql, &row_sql);
        let hashed = format!(
            "SELECT {kb} AS kb, {rb} AS rb, {key_sql} AS k \
             FROM (SELECT {} FROM {}{} AS s{}) AS v",
            values.join(", "),
            if partitioned { "" } else { "ONLY " },
            table.quoted(),
            row_filter
                .map(|f| format!(" WHERE ({f})"))
                .unwrap_or_default(),
        );
        TableQuery {
            table: table.to_string(),
            hashed,
        }
    }

    fn error(&self, e: tokio_postgres::Error) -> VerifyError {
        VerifyError::SourceQuery {
            table: self.table.clone(),
            message: catalog::describe(&e),
        }
    }
}
