//! Initial snapshot: copies tables as of a snapshot exported by a replication slot.
//!
//! `CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT` returns a snapshot name and the slot's
//! consistent point. Every copying connection imports that snapshot
//! (`BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT …`), so it sees
//! exactly the transactions committed before the consistent point — and the slot streams
//! exactly the ones committed after it. Nothing is lost or seen twice, whatever is written
//! while the copy runs.
//!
//! A table is cut into ranges of heap pages (`ctid` ranges, which Postgres 14+ scans
//! directly) that several connections copy in parallel with `COPY (SELECT …) TO STDOUT`.
//! A table whose every column has a type [`crate::pg_binary`] decodes (numbers, dates and
//! timestamps, text, json, uuid, bytea) is copied in binary format: the server skips its
//! output functions and we skip parsing text, and the values decode to exactly what their
//! text gives (the stream's path), fallbacks included. Any other table is copied as text,
//! through the stream's parser. Rows are read where they arrived (no copy, no
//! reference-counted slice per value) and handed over in bounded Arrow batches (no table
//! goes through memory whole).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use deltalake::arrow::record_batch::RecordBatch;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::catalog::{self, CatalogError, TableInfo};
use super::copy_binary::BinaryRows;
use super::dsn::ConnParams;
use crate::change::message::{Tuple, TupleValue};
use crate::change::{ChangeEncoder, ChangeMeta, ColumnSpec, Op, Xid};
use crate::lsn::Lsn;
use crate::pg_binary::BinaryType;

/// Rows and bytes per Arrow batch handed over.
const BATCH_ROWS: usize = 16_384;
const BATCH_BYTES: usize = 32 * 1024 * 1024;

/// The snapshot copy failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("copying {table}: {message}")]
    Copy { table: String, message: String },
    #[error("the snapshot's consumer went away")]
    Closed,
}

impl SnapshotError {
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Catalog(e) => e.is_transient(),
            SnapshotError::Copy { .. } => true,
            SnapshotError::Closed => false,
        }
    }
}

/// The replication connection's text forms (dates, time zone, intervals, floats, bytea),
/// for connections that copy rows: copied values then parse as streamed ones do.
pub const TEXT_FORMS: &str = "SET DateStyle = ISO; SET TimeZone = 'UTC'; \
     SET IntervalStyle = iso_8601; SET extra_float_digits = 3; SET bytea_output = hex";

/// Opens a read-only transaction on `client` that sees the exported snapshot `name`, with
/// the replication connection's text forms.
pub async fn import_snapshot(client: &Client, name: &str) -> Result<(), CatalogError> {
    client
        .batch_execute(&format!(
            "{TEXT_FORMS}; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET TRANSACTION SNAPSHOT {}",
            crate::table_name::quote_literal(name)
        ))
        .await?;
    Ok(())
}

/// Connections that all see one exported snapshot.
pub struct SnapshotReader {
    clients: Vec<Arc<Client>>,
    chunk_bytes: i64,
    /// What every table's copy obeys besides its own limits.
    overall: Arc<Paces>,
    limits: SnapshotLimits,
}

/// Paces work to `per_sec` units a second: each amount done pushes the earliest time the
/// next may start, and the caller waits for it. At most [`Pace::SLACK`] of idle time is
/// credited (a pause between two tables earns no burst), and waits shorter than
/// [`Pace::MIN_SLEEP`] are carried over rather than slept: COPY sends a message per row,
/// and a timer cannot sleep a row's few microseconds.
struct Pace {
    per_sec: f64,
    next: Mutex<std::time::Instant>,
}

impl Pace {
    const SLACK: std::time::Duration = std::time::Duration::from_millis(100);
    const MIN_SLEEP: std::time::Duration = std::time::Duration::from_millis(5);
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(3600);

    fn new(per_sec: f64) -> Pace {
        Pace {
            per_sec,
            next: Mutex::new(std::time::Instant::now()),
        }
    }

    /// How long to wait after doing `amount`.
    fn wait_for(&self, amount: f64) -> std::time::Duration {
        let Ok(mut next) = self.next.lock() else {
            return std::time::Duration::ZERO;
        };
        let now = std::time::Instant::now();
        let step = std::time::Duration::try_from_secs_f64(amount / self.per_sec)
            .unwrap_or(Self::LONGEST)
            .min(Self::LONGEST);
        let floor = now.checked_sub(Self::SLACK).unwrap_or(now);
        *next = (*next).max(floor) + step;
        let wait = next.saturating_duration_since(now);
        if wait < Self::MIN_SLEEP {
            std::time::Duration::ZERO
        } else {
            wait
        }
    }
}

/// The paces one copy obeys: bytes and rows per second.
#[derive(Default)]
struct Paces {
    bytes: Option<Pace>,
    rows: Option<Pace>,
}

impl Paces {
    fn new(rate: &CopyRate) -> Paces {
        Paces {
            bytes: rate.bytes_per_sec.map(Pace::new),
            rows: rate.rows_per_sec.map(Pace::new),
        }
    }

    fn wait_for(&self, bytes: usize, rows: u64) -> std::time::Duration {
        let b = self.bytes.as_ref().map(|p| p.wait_for(bytes as f64));
        let r = self.rows.as_ref().map(|p| p.wait_for(rows as f64));
        b.into_iter().chain(r).max().unwrap_or_default()
    }
}

/// How fast a copy may read (`None`: as fast as the source sends).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CopyRate {
    pub bytes_per_sec: Option<f64>,
    pub rows_per_sec: Option<f64>,
}

/// The rate limits of a snapshot or resync (`source.snapshot_max_mb_per_sec`,
/// `snapshot_max_rows_per_sec`, `snapshot_table_limits`): for all its connections and
/// tables together, and for one table's copy. Reading slower makes the source's backends
/// wait on their sockets, so the limits hold for the source's disk and CPU too.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotLimits {
    pub overall: CopyRate,
    /// By table (`schema.table`).
    pub tables: std::collections::HashMap<String, CopyRate>,
}

impl SnapshotReader {
    /// Opens `workers` connections and imports the snapshot `name` in each. Tables are
    /// copied in ranges of about `chunk_bytes` of heap, within `limits`.
    pub async fn open(
        params: &ConnParams,
        name: &str,
        workers: usize,
        chunk_bytes: i64,
        limits: &SnapshotLimits,
    ) -> Result<SnapshotReader, SnapshotError> {
        // Opened concurrently: each is a connection, its authentication and the import.
        let clients = futures::future::try_join_all((0..workers.max(1)).map(|_| async {
            let client = catalog::connect(params).await?;
            import_snapshot(&client, name).await?;
            Ok::<_, CatalogError>(Arc::new(client))
        }))
        .await?;
        Ok(SnapshotReader {
            clients,
            chunk_bytes,
            overall: Arc::new(Paces::new(&limits.overall)),
            limits: limits.clone(),
        })
    }

    /// Copies `table` into batches shaped by the lake's `columns` (matched by name; a
    /// column the source no longer has is NULL), op `r` rows stamped with `point`, each
    /// copying task encoding with its own `encoder(columns)` (the lake's raw layout).
    /// Returns the number of rows copied.
    pub async fn copy_table<E: ChangeEncoder>(
        &self,
        table: &TableInfo,
        lake_columns: &[ColumnSpec],
        point: Lsn,
        encoder: fn(Vec<ColumnSpec>) -> E,
        out: mpsc::Sender<RecordBatch>,
    ) -> Result<u64, SnapshotError> {
        let ranges = self.plan_ranges(table).await?;
        let range_count = ranges.len();
        let job = Arc::new(CopyJob {
            table: table.name.to_string(),
            select: select_sql(table, lake_columns),
            binary: binary_types(table, lake_columns),
            row_filter: table.published.row_filter.clone(),
            columns: lake_columns.to_vec(),
            positions: copied_positions(table, lake_columns),
            point,
            snapshot_ts: chrono::Utc::now().timestamp_micros(),
            ranges: Mutex::new(ranges),
            seq: std::sync::atomic::AtomicI64::new(0),
            overall: self.overall.clone(),
            own: Paces::new(
                &self
                    .limits
                    .tables
                    .get(&table.name.to_string())
                    .copied()
                    .unwrap_or_default(),
            ),
        });
        match &job.binary {
            Some(_) => tracing::debug!(table = %table.name, "copying in binary format"),
            None => tracing::debug!(
                table = %table.name,
                "copying as text: a column's type has no binary reading here"
            ),
        }
        let mut tasks = Vec::new();
        for client in self.clients.iter().take(range_count) {
            let (client, job, out) = (client.clone(), job.clone(), out.clone());
            tasks.push(tokio::spawn(async move {
                job.copy_ranges(&client, encoder, &out).await
            }));
        }
        let mut total = 0;
        for task in tasks {
            total += task.await.map_err(|e| SnapshotError::Copy {
                table: table.name.to_string(),
                message: e.to_string(),
            })??;
        }
        Ok(total)
    }

    /// Cuts `table` into ranges of about `chunk_bytes` of heap pages (one open range for
    /// a small table), and publishes the row estimate for the progress metric.
    async fn plan_ranges(&self, table: &TableInfo) -> Result<VecDeque<PageRange>, SnapshotError> {
        let row = self.clients[0]
            .query_one(
                "SELECT coalesce(pg_relation_size(to_regclass($1)) / b, 0), greatest($2 / b, 1), \
                        (SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)) \
                 FROM (SELECT current_setting('block_size')::bigint AS b) s",
                &[&table.name.quoted(), &self.chunk_bytes],
            )
            .await
            .map_err(CatalogError::from)?;
        let (pages, chunk_pages): (i64, i64) = (row.get(0), row.get(1));
        let estimate: Option<f32> = row.get(2);
        crate::telemetry::snapshot_progress(
            &table.name.to_string(),
            0,
            estimate.filter(|e| *e >= 0.0).map(f64::from),
        );
        let mut ranges = VecDeque::new();
        if pages <= chunk_pages {
            ranges.push_back(PageRange {
                start: None,
                end: None,
            });
            return Ok(ranges);
        }
        let mut start = 0;
        while start < pages {
            let end = start + chunk_pages;
            // The last range is open: the table may have grown since the snapshot (its new
            // pages hold only rows the snapshot does not see).
            ranges.push_back(PageRange {
                start: Some(start),
                end: (end < pages).then_some(end),
            });
            start = end;
        }
        Ok(ranges)
    }

    /// Ends the snapshot transactions.
    pub async fn close(self) {
        for client in self.clients {
            let _ = client.batch_execute("COMMIT").await;
        }
    }
}

/// A range of heap pages (`ctid` bounds); `None` ends are open.
struct PageRange {
    start: Option<i64>,
    end: Option<i64>,
}

impl PageRange {
    /// The condition selecting the range's rows (`None`: every row).
    fn condition(&self) -> Option<String> {
        match (self.start, self.end) {
            (Some(s), Some(e)) => Some(format!("ctid >= '({s},0)'::tid AND ctid < '({e},0)'::tid")),
            (Some(s), None) => Some(format!("ctid >= '({s},0)'::tid")),
            _ => None,
        }
    }
}

/// `SELECT <the lake's columns the source still has> FROM [ONLY] table`.
fn select_sql(table: &TableInfo, lake_columns: &[ColumnSpec]) -> String {
    let select_list: Vec<String> = lake_columns
        .iter()
        .filter(|c| table.columns.iter().any(|s| s.name == c.name))
        .map(|c| crate::table_name::quote_ident(&c.name))
        .collect();
    // ONLY: rows of inheritance children are published (and copied) as their own
    // tables; a partitioned table's rows live in its partitions.
    let only = if table.partitioned { "" } else { "ONLY " };
    format!(
        "SELECT {} FROM {only}{}",
        select_list.join(", "),
        table.name.quoted()
    )
}

/// How each copied column's binary COPY values are read, with the source type they read,
/// when every one has a binary reading that gives what its text gives (`None`: the table
/// is copied as text).
fn binary_types(table: &TableInfo, lake_columns: &[ColumnSpec]) -> Option<Vec<(u32, BinaryType)>> {
    lake_columns
        .iter()
        .filter_map(|c| Some((c, table.columns.iter().find(|s| s.name == c.name)?)))
        .map(|(lake, source)| {
            BinaryType::for_column(source.type_oid, &lake.kind).map(|t| (source.type_oid, t))
        })
        .collect()
}

/// For each lake column, its index in the copied rows (`None`: the source dropped it).
fn copied_positions(table: &TableInfo, lake_columns: &[ColumnSpec]) -> Vec<Option<usize>> {
    let copied: Vec<&ColumnSpec> = lake_columns
        .iter()
        .filter(|c| table.columns.iter().any(|s| s.name == c.name))
        .collect();
    lake_columns
        .iter()
        .map(|c| copied.iter().position(|s| s.name == c.name))
        .collect()
}

/// One table's copy, shared by its copying tasks.
struct CopyJob {
    table: String,
    select: String,
    /// Copied in binary format, each value read as its source type (the OID) says
    /// (`None`: as text).
    binary: Option<Vec<(u32, BinaryType)>>,
    /// The publication's row filter: the copy holds the rows the stream publishes.
    row_filter: Option<String>,
    columns: Vec<ColumnSpec>,
    positions: Vec<Option<usize>>,
    point: Lsn,
    snapshot_ts: i64,
    /// Ranges not taken by a task yet.
    ranges: Mutex<VecDeque<PageRange>>,
    /// Numbers the table's snapshot rows across all tasks, so that (`_commit_lsn`,
    /// `_seq`) names one row of the raw log, as it does for changes.
    seq: std::sync::atomic::AtomicI64,
    /// The snapshot's limits for all tables, and this table's own.
    overall: Arc<Paces>,
    own: Paces,
}

impl CopyJob {
    /// Takes ranges until none is left, copying each on `client`; returns the rows.
    async fn copy_ranges<E: ChangeEncoder>(
        &self,
        client: &Client,
        encoder: fn(Vec<ColumnSpec>) -> E,
        out: &mpsc::Sender<RecordBatch>,
    ) -> Result<u64, SnapshotError> {
        // Checked once per connection: the check's lock holds until its transaction ends.
        let binary = self.binary_types(client).await?;
        let mut rows = 0;
        loop {
            let next = self.ranges.lock().ok().and_then(|mut q| q.pop_front());
            let Some(range) = next else {
                return Ok(rows);
            };
            rows += self
                .copy_range(
                    client,
                    &range,
                    binary.as_deref(),
                    encoder(self.columns.clone()),
                    out,
                )
                .await?;
        }
    }

    /// The binary readings of the copied columns, if the table is copied in binary and its
    /// columns still have the types it was looked up with. Preparing the query in the
    /// snapshot's transaction locks the table until the transaction ends, so a type cannot
    /// change between this check and the connection's COPYs (some `ALTER … TYPE`s rewrite
    /// nothing, `integer` to `oid` for one, and would be read with the wrong type); the
    /// connection copies a changed table as text.
    async fn binary_types(
        &self,
        client: &Client,
    ) -> Result<Option<Vec<BinaryType>>, SnapshotError> {
        let Some(expected) = &self.binary else {
            return Ok(None);
        };
        let statement = client
            .prepare(&self.select)
            .await
            .map_err(CatalogError::from)?;
        let now: Vec<u32> = statement
            .columns()
            .iter()
            .map(|c| c.type_().oid())
            .collect();
        if now.len() != expected.len() || now.iter().zip(expected).any(|(n, (e, _))| n != e) {
            tracing::warn!(
                table = %self.table,
                "a column's type changed since the table was looked up: this connection copies it as text"
            );
            return Ok(None);
        }
        Ok(Some(expected.iter().map(|(_, t)| *t).collect()))
    }

    /// Copies one range with `COPY … TO STDOUT`, in binary format read by `binary` when
    /// given, handing batches to `out`.
    async fn copy_range(
        &self,
        client: &Client,
        range: &PageRange,
        binary: Option<&[BinaryType]>,
        mut builder: impl ChangeEncoder,
        out: &mpsc::Sender<RecordBatch>,
    ) -> Result<u64, SnapshotError> {
        let copy_err = |message: &str| SnapshotError::Copy {
            table: self.table.clone(),
            message: message.to_string(),
        };
        let conditions: Vec<String> = self
            .row_filter
            .iter()
            .map(|f| format!("({f})"))
            .chain(range.condition())
            .collect();
        let format = if binary.is_some() {
            " (FORMAT binary)"
        } else {
            ""
        };
        let sql = if conditions.is_empty() {
            format!("COPY ({}) TO STDOUT{format}", self.select)
        } else {
            format!(
                "COPY ({} WHERE {}) TO STDOUT{format}",
                self.select,
                conditions.join(" AND ")
            )
        };
        let stream = client.copy_out(&sql).await.map_err(CatalogError::from)?;
        let mut stream = std::pin::pin!(stream);
        let field_count = self.positions.iter().flatten().count();
        let mut lines = LineSplitter::default();
        let mut binary_rows = BinaryRows::default();
        let mut rows = 0u64;
        let mut spare = Vec::with_capacity(field_count);
        let meta = |seq| ChangeMeta {
            commit_lsn: self.point,
            lsn: self.point,
            commit_ts: self.snapshot_ts,
            xid: Xid(0),
            seq,
        };
        let next_seq = || self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(CatalogError::from)?;
            let lines_before = rows;
            // Postgres sends a row per message: the values are read where they arrived,
            // without a copy or a reference-counted slice per value.
            if let Some(types) = binary {
                binary_rows.split(
                    &chunk,
                    field_count,
                    |values| {
                        builder
                            .append_binary(
                                Op::Read,
                                meta(next_seq()),
                                values,
                                types,
                                &self.positions,
                            )
                            .map_err(|i| {
                                let ty = self
                                    .positions
                                    .get(i)
                                    .copied()
                                    .flatten()
                                    .and_then(|p| types.get(p));
                                copy_err(&format!(
                                    "COPY sent a binary value of column {:?} that is not a \
                                     {} value (a Postgres bug or an extension's type under a \
                                     built-in name); report it with the column's type",
                                    self.columns.get(i).map_or("?", |c| c.name.as_str()),
                                    ty.map_or(String::new(), |t| format!("{t:?}")),
                                ))
                            })?;
                        rows += 1;
                        Ok(())
                    },
                    copy_err,
                )?;
            } else {
                lines.split(&chunk, |line| {
                    let mut fields = reuse(std::mem::take(&mut spare));
                    fields.extend(copy_fields(line));
                    if fields.len() != field_count {
                        return Err(copy_err("COPY sent a row with the wrong number of fields"));
                    }
                    builder.append_text(Op::Read, meta(next_seq()), &fields, &self.positions);
                    spare = reuse(fields);
                    rows += 1;
                    Ok(())
                })?;
            }
            if builder.rows() >= BATCH_ROWS || builder.bytes() >= BATCH_BYTES {
                send(&mut builder, out, &self.table).await?;
            }
            let wait = self
                .overall
                .wait_for(chunk.len(), rows - lines_before)
                .max(self.own.wait_for(chunk.len(), rows - lines_before));
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        if !lines.is_empty() || (binary.is_some() && !binary_rows.is_complete()) {
            return Err(copy_err("COPY ended in the middle of a row"));
        }
        send(&mut builder, out, &self.table).await?;
        Ok(rows)
    }
}

async fn send(
    builder: &mut impl ChangeEncoder,
    out: &mpsc::Sender<RecordBatch>,
    table: &str,
) -> Result<(), SnapshotError> {
    if builder.rows() == 0 {
        return Ok(());
    }
    let batch = builder.finish().map_err(|e| SnapshotError::Copy {
        table: table.to_string(),
        message: e.to_string(),
    })?;
    out.send(batch).await.map_err(|_| SnapshotError::Closed)
}

/// Splits COPY data (arbitrary chunks) into complete lines.
#[derive(Default)]
pub(super) struct LineSplitter {
    partial: BytesMut,
}

impl LineSplitter {
    /// Calls `line` with each complete line (without its `\n`) that `chunk` ends, after
    /// what earlier chunks left; a line wholly inside `chunk` is not copied.
    pub(super) fn split<E>(
        &mut self,
        chunk: &[u8],
        mut line: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut rest = chunk;
        if !self.partial.is_empty() {
            let Some(end) = memchr::memchr(b'\n', rest) else {
                self.partial.extend_from_slice(rest);
                return Ok(());
            };
            self.partial.extend_from_slice(&rest[..end]);
            let whole = std::mem::take(&mut self.partial);
            line(&whole)?;
            rest = &rest[end + 1..];
        }
        while let Some(end) = memchr::memchr(b'\n', rest) {
            line(&rest[..end])?;
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    /// The complete lines `chunk` ends, copied out packed together (a chunked copy keeps
    /// its rows until their verdict: slices of the connection's read buffers would keep
    /// those whole, about 40 MB more at the peak of the benchmark's copy).
    pub(super) fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.partial.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(i) = memchr::memchr(b'\n', &self.partial) {
            let mut line = self.partial.split_to(i + 1);
            line.truncate(i);
            lines.push(line.freeze());
        }
        lines
    }

    pub(super) fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }
}

/// The fields of one line of COPY text format: `None` for `\N` (NULL), borrowed from the
/// line unless escapes had to be undone.
pub(super) fn copy_fields(line: &[u8]) -> CopyFields<'_> {
    CopyFields { rest: Some(line) }
}

/// Iterator of [`copy_fields`]: one `memchr2` per field finds its end or its first
/// backslash (COPY escapes tabs in values, so a tab always ends a field).
pub(super) struct CopyFields<'a> {
    rest: Option<&'a [u8]>,
}

impl<'a> Iterator for CopyFields<'a> {
    type Item = Option<Cow<'a, [u8]>>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest?;
        let (field, escaped, next) = match memchr::memchr2(b'\t', b'\\', rest) {
            None => (rest, false, None),
            Some(i) if rest[i] == b'\t' => (&rest[..i], false, Some(&rest[i + 1..])),
            Some(i) => match memchr::memchr(b'\t', &rest[i..]) {
                None => (rest, true, None),
                Some(j) => (&rest[..i + j], true, Some(&rest[i + j + 1..])),
            },
        };
        self.rest = next;
        Some(if !escaped {
            Some(Cow::Borrowed(field))
        } else if field == b"\\N" {
            None
        } else {
            Some(Cow::Owned(unescape(field)))
        })
    }
}

/// An emptied vector of fields whose allocation serves the next line (of another
/// lifetime): collecting in place keeps the buffer.
fn reuse<'b>(mut fields: Vec<Option<Cow<'_, [u8]>>>) -> Vec<Option<Cow<'b, [u8]>>> {
    fields.clear();
    fields.into_iter().map(|_| None).collect()
}

/// One line of COPY text format → a tuple of text values (`\N` is NULL).
pub(super) fn parse_copy_line(line: &Bytes, columns: usize) -> Option<Tuple> {
    // Sized once: a chunked copy holds its rows until their verdict, and a vector grown
    // by doubling (and its freed smaller buffers) cost 40–60 MB at the benchmark's peak.
    let mut values = Vec::with_capacity(columns);
    values.extend(copy_fields(line).map(|field| match field {
        None => TupleValue::Null,
        Some(Cow::Borrowed(b)) => TupleValue::Text(line.slice_ref(b)),
        Some(Cow::Owned(v)) => TupleValue::Text(Bytes::from(v)),
    }));
    (values.len() == columns).then_some(Tuple(values))
}

/// Undoes COPY text escapes: `\b \f \n \r \t \v \\`, `\ooo` octal, `\xhh` hex, and `\c`
/// for any other character `c`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        i += 1;
        if b != b'\\' || i >= field.len() {
            out.push(b);
            continue;
        }
        let c = field[i];
        i += 1;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xFF) as u8);
            }
            b'x' if field.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u8;
                for _ in 0..2 {
                    match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d as u8;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v);
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pace_carries_short_waits_and_holds_the_rate() {
        let pace = Pace::new(1000.0);
        // 200 units at once at 1,000 a second: waits under 5 ms are carried, then the
        // wait grows with what was done, to about 200 ms.
        let waits: Vec<_> = (0..200).map(|_| pace.wait_for(1.0)).collect();
        assert!(waits[..4].iter().all(|w| w.is_zero()), "{waits:?}");
        let first = waits.iter().find(|w| !w.is_zero()).unwrap();
        assert!(*first >= Pace::MIN_SLEEP, "{first:?}");
        assert!(
            waits[199] > std::time::Duration::from_millis(150),
            "{waits:?}"
        );
        // Absurd amounts do not overflow.
        assert!(Pace::new(1e-300).wait_for(1e300) <= Pace::LONGEST + Pace::MIN_SLEEP);
    }

    #[test]
    fn copy_fields_split_at_tabs_only_and_read_null_and_escapes() {
        let fields = |line: &[u8]| -> Vec<Option<Vec<u8>>> {
            copy_fields(line)
                .map(|f| f.map(|c| c.into_owned()))
                .collect()
        };
        let text = |t: &str| Some(t.as_bytes().to_vec());
        assert_eq!(fields(b""), vec![text("")]);
        assert_eq!(fields(b"\t"), vec![text(""), text("")]);
        assert_eq!(fields(b"a\t"), vec![text("a"), text("")]);
        assert_eq!(fields(b"\\N\tx"), vec![None, text("x")]);
        // An escaped backslash before N is the text `\N`, not NULL.
        assert_eq!(fields(b"\\\\N"), vec![text("\\N")]);
        assert_eq!(
            fields(b"a\\tb\tc\\\\\t\\N\t"),
            vec![text("a\tb"), text("c\\"), None, text("")]
        );
    }

    #[test]
    fn copy_lines_split_and_unescape() {
        let mut s = LineSplitter::default();
        assert!(
            s.push(&Bytes::from_static(b"1\ta\\tb\\\\c\t\\N\n2\t"))
                .len()
                == 1
        );
        let lines = s.push(&Bytes::from_static(b"x\\101\\x41\t\n"));
        assert_eq!(lines.len(), 1);
        assert!(s.is_empty());
        let t = parse_copy_line(&Bytes::from_static(b"1\ta\\tb\\\\c\t\\N"), 3).unwrap();
        assert_eq!(t.0[1], TupleValue::Text(Bytes::from_static(b"a\tb\\c")));
        assert_eq!(t.0[2], TupleValue::Null);
        let t = parse_copy_line(&lines[0], 3).unwrap();
        assert_eq!(t.0[1], TupleValue::Text(Bytes::from_static(b"xAA")));
        assert_eq!(t.0[2], TupleValue::Text(Bytes::new()));
        assert!(parse_copy_line(&Bytes::from_static(b"1\t2"), 3).is_none());
        // A line over three chunks, then two whole lines and a part in one chunk: whole
        // lines are borrowed, fields without escapes too.
        let mut s = LineSplitter::default();
        let mut got: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
        for chunk in [&b"1\ta"[..], b"b", b"c\n2\t\\N\n3\tx\\ty\n4"] {
            s.split(chunk, |line| {
                let fields: Vec<_> = copy_fields(line).collect();
                if let Some(Some(Cow::Borrowed(f))) = fields.first() {
                    assert!(chunk.as_ptr_range().contains(&f.as_ptr()) || line.len() > 3);
                }
                got.push(fields.into_iter().map(|f| f.map(Cow::into_owned)).collect());
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        let text = |t: &str| Some(t.as_bytes().to_vec());
        assert_eq!(
            got,
            vec![
                vec![text("1"), text("abc")],
                vec![text("2"), None],
                vec![text("3"), text("x\ty")],
            ]
        );
        assert!(!s.is_empty());
        assert_eq!(
            copy_fields(b"").count(),
            1,
            "an empty line is one empty field"
        );
    }
}
