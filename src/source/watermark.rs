//! Watermark snapshots: a table copied in key-ordered chunks while the stream runs, the
//! DBLog way, so that a copy resumes at its next chunk after a crash and never holds the
//! stream or the other tables back (`source.snapshot_method = "watermark"`).
//!
//! For each chunk the copier
//! 1. writes a **low watermark** into the WAL (`pg_logical_emit_message`, transactional,
//!    in its own transaction);
//! 2. opens a `REPEATABLE READ` transaction, reads its snapshot S
//!    (`pg_current_snapshot()`) and copies the next rows by key
//!    (`WHERE key > last ORDER BY key LIMIT n`);
//! 3. hands the rows to the apply stage through [`Watermarks`], then writes the **high
//!    watermark** in the same transaction and commits it.
//!
//! The stream delivers the high watermark after every transaction S sees (those committed
//! before S was taken) and the apply stage reconciles there (`apply::watermark`): it drops
//! the chunk's rows whose keys a transaction invisible to S changed between the two
//! watermarks (the stream carries their newer state), and appends the rest as `r` rows of
//! the watermark's transaction. A chunk the stream cannot be reconciled with exactly (a
//! truncate in the window, an update that left a TOAST value unsent, a transaction that
//! committed before the low watermark yet is invisible to S) is read again.
//!
//! Progress (the last key copied) is committed with the chunk's rows in the raw table, so
//! a restart resumes after the last durable chunk and no chunk lands twice. Only tables
//! keyed by one integer column are copied this way ([`chunk_key`]); others use the
//! exported snapshot ([`super::snapshot`]).
//!
//! A resync ([`Resync`]) copies a table the lake already holds: before each chunk's
//! transaction the copier reads the lake's keys ahead (a bounded window, [`KeysAhead`]),
//! the chunk covers no key past them, and the chunk carries the lake's keys of its range;
//! the apply stage deletes those the source no longer has.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::catalog::{self, CatalogError, TableInfo};
use super::dsn::ConnParams;
use super::snapshot::{LineSplitter, parse_copy_line};
use crate::change::message::{Tuple, TupleValue};
use crate::lsn::Lsn;
use crate::table_name::{TableName, quote_ident};

/// The prefix of wal2delta's watermark messages.
pub const PREFIX: &str = "wal2delta.watermark";

/// Integer types a chunk key may have: int2, int4, int8.
const INTEGER_TYPES: [u32; 3] = [21, 23, 20];

/// The column a table is copied in chunks by: its one integer key column, when it is
/// copied (a column list may leave it out). `None`: the table needs the exported snapshot.
pub fn chunk_key(table: &TableInfo) -> Option<&str> {
    let [key] = table.key_columns.as_slice() else {
        return None;
    };
    table
        .columns
        .iter()
        .find(|c| &c.name == key)
        .filter(|c| INTEGER_TYPES.contains(&c.type_oid))
        .map(|c| c.name.as_str())
}

/// The transactions a snapshot sees, as `pg_current_snapshot()` prints it
/// (`xmin:xmax:xip,…`), in the stream's 32-bit transaction ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidSnapshot {
    xmax: u32,
    in_progress: Vec<u32>,
}

impl XidSnapshot {
    pub fn parse(text: &str) -> Option<XidSnapshot> {
        let mut parts = text.trim().split(':');
        let _xmin: u64 = parts.next()?.parse().ok()?;
        let xmax: u64 = parts.next()?.parse().ok()?;
        let in_progress = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse::<u64>().ok().map(|x| x as u32))
                .collect::<Option<Vec<u32>>>()?,
        };
        Some(XidSnapshot {
            xmax: xmax as u32,
            in_progress,
        })
    }

    /// Whether a transaction with this id committed after the snapshot was taken (it was
    /// running, or had not started). Ids compare modulo 2³², as Postgres compares them.
    pub fn invisible(&self, xid: u32) -> bool {
        self.in_progress.contains(&xid) || (xid.wrapping_sub(self.xmax) as i32) >= 0
    }
}

/// A chunk copied and waiting for its high watermark in the stream.
pub struct Chunk {
    pub table: TableName,
    /// The copied columns, in the rows' order.
    pub columns: Vec<String>,
    /// The lake's columns when the copier read them (a column added since is missing from
    /// the rows, and an `r` row replaces the whole curated row).
    pub lake_columns: Vec<String>,
    pub rows: Vec<Tuple>,
    /// Each row's key.
    pub keys: Vec<i64>,
    pub snapshot: XidSnapshot,
    /// Where the copy began (its first low watermark); `None` for a copy's first chunk.
    pub start: Option<Lsn>,
    /// The key the chunk's rows follow (`None`: from the first).
    pub after: Option<i64>,
    /// Whether this is the table's last chunk (fewer rows than asked for).
    pub last: bool,
    /// The part of the table the publication publishes, by fingerprint (`None`: all).
    pub part: Option<String>,
    /// Where the key is among `columns`.
    pub key_index: usize,
    /// The resync the copy is for (its request's time, ms since the Unix epoch); `None`
    /// for a table's first copy.
    pub resync: Option<i64>,
    /// The last key of the key range the chunk covers, `(after, through]`: its last row's
    /// key when it is full, else the end of the lake keys a resync read ahead; `None` for
    /// the last chunk (the range has no end).
    pub through: Option<i64>,
    /// For a resync: the keys the lake held in the chunk's key range before it was copied,
    /// sorted (those neither in the chunk nor changed by the stream meanwhile are rows the
    /// source no longer has).
    pub stored: Vec<i64>,
    pub verdict: oneshot::Sender<Verdict>,
}

/// The lake's keys of a table, for a resync's chunks.
#[async_trait::async_trait]
pub trait StoredKeys: Send {
    /// The first `limit` keys after `after` (`None`: from the first), ascending.
    async fn first(&mut self, after: Option<i64>, limit: usize) -> Result<Vec<i64>, String>;
}

/// Chunks' worth of lake keys a resync reads ahead at once.
const KEYS_AHEAD: usize = 8;

/// The lake's keys ahead of a resync's copy: read before a chunk's transaction begins
/// (never while a source snapshot is held open), [`KEYS_AHEAD`] chunks' worth at a time, so
/// memory stays bounded whatever the lake holds. Keys the lake holds when they are read
/// include every row the source no longer has (those are there before the resync begins),
/// which is all a chunk needs: the range it covers never passes the keys read. (A row
/// going stale after its window was read — a partition detached meanwhile — is the
/// publication guard's: its new request stops this copy and starts another.)
#[derive(Default)]
struct KeysAhead {
    /// Every lake key in `(from, through]` when read, ascending (`through` `None`: to the
    /// last).
    keys: Vec<i64>,
    from: Option<i64>,
    through: Option<i64>,
    read: bool,
}

impl KeysAhead {
    /// Makes the keys after `after` ready for a chunk of `chunk_rows` rows.
    async fn ready(
        &mut self,
        stored: &mut dyn StoredKeys,
        after: Option<i64>,
        chunk_rows: usize,
    ) -> Result<(), String> {
        // A copy sent back (a chunk read again) stays inside the window as long as it
        // does not go back past the window's start.
        let inside = self.read
            && self.from <= after
            && self.through.is_none_or(|t| after.is_none_or(|a| a < t));
        let left = self.keys.len() - self.keys.partition_point(|k| Some(*k) <= after);
        if !inside || (left < chunk_rows && self.through.is_some()) {
            let limit = chunk_rows.saturating_mul(KEYS_AHEAD).max(1);
            let keys = stored.first(after, limit).await?;
            self.through = match keys.len() < limit {
                true => None,
                false => keys.last().copied(),
            };
            self.keys = keys;
            self.from = after;
            self.read = true;
        }
        Ok(())
    }

    /// The keys in `(after, through]` (`through` `None`: to the last).
    fn within(&self, after: Option<i64>, through: Option<i64>) -> Vec<i64> {
        self.keys
            .iter()
            .copied()
            .filter(|k| Some(*k) > after && through.is_none_or(|t| *k <= t))
            .collect()
    }
}

/// A copy that resyncs a table already in the lake: its request, and the lake's keys.
pub struct Resync<'a> {
    pub id: i64,
    pub stored: &'a mut dyn StoredKeys,
}

/// What the apply stage made of a chunk.
#[derive(Debug)]
pub enum Verdict {
    /// Its rows are in the batch (and, in a resync, the deletes of rows the source no
    /// longer has): the copy goes on from `start` (the copy's beginning).
    Taken {
        start: Lsn,
        added: usize,
        removed: usize,
    },
    /// It could not be reconciled with the stream exactly: read it again.
    Again(String),
    /// It does not follow the last chunk taken (a verdict the copier did not wait for, after
    /// an error): go on after `last_key`, in the copy that began at `start`.
    Behind {
        last_key: Option<i64>,
        start: Option<Lsn>,
    },
    /// The lake's columns changed since the copy read its list: read the table's columns
    /// again and copy these.
    Reshaped(Vec<String>),
}

enum Pending {
    /// The low watermark is on its way.
    Low(TableName),
    /// Both are: the chunk waits for the high one.
    Chunk(Box<Chunk>),
}

/// Where copiers and the apply stage meet: the watermarks written and the chunks waiting,
/// by token (unique to this process, so another daemon's or an earlier run's watermarks
/// in the stream match nothing and are ignored).
#[derive(Default)]
pub struct Watermarks {
    pending: Mutex<HashMap<String, Pending>>,
    /// The tables a copier is copying now (one copier per table).
    copying: Mutex<HashSet<TableName>>,
    /// The copies made durable, by table: where they completed and the resync they were.
    completed: Mutex<HashMap<TableName, (Lsn, Option<i64>)>>,
    durable: tokio::sync::Notify,
}

impl Watermarks {
    /// Claims `table` for a copier; `false` when another copies it already.
    pub fn claim(&self, table: &TableName) -> bool {
        self.copying
            .lock()
            .map(|mut c| c.insert(table.clone()))
            .unwrap_or(false)
    }

    /// Releases a table [`Watermarks::claim`] gave.
    pub fn release(&self, table: &TableName) {
        if let Ok(mut c) = self.copying.lock() {
            c.remove(table);
        }
    }

    /// The apply stage committed the last chunk of `table`'s copy (`resync`'s), complete
    /// at `at`.
    pub fn completed(&self, table: &TableName, at: Lsn, resync: Option<i64>) {
        if let Ok(mut c) = self.completed.lock() {
            c.insert(table.clone(), (at, resync));
        }
        self.durable.notify_waiters();
    }

    /// Waits until the copy `resync` of `table` is durable; returns where it completed.
    pub async fn wait_completed(&self, table: &TableName, resync: Option<i64>) -> Lsn {
        loop {
            let notified = self.durable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some((at, r)) = self
                .completed
                .lock()
                .ok()
                .and_then(|c| c.get(table).copied())
                && r == resync
            {
                return at;
            }
            notified.await;
        }
    }

    fn expect_low(&self, token: &str, table: &TableName) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(token.to_string(), Pending::Low(table.clone()));
        }
    }

    fn offer(&self, token: &str, chunk: Chunk) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(token.to_string(), Pending::Chunk(Box::new(chunk)));
        }
    }

    fn forget(&self, token: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(token);
        }
    }

    /// Whether a chunk with `token` is still expected (its copier has not given it up).
    pub fn is_pending(&self, token: &str) -> bool {
        self.pending
            .lock()
            .map(|p| p.contains_key(token))
            .unwrap_or(false)
    }

    /// The table a low watermark with `token` opens a window for, if it is ours.
    pub fn low(&self, token: &str) -> Option<TableName> {
        match self.pending.lock().ok()?.get(token)? {
            Pending::Low(t) => Some(t.clone()),
            Pending::Chunk(c) => Some(c.table.clone()),
        }
    }

    /// The chunk a high watermark with `token` closes, if it is ours.
    pub fn high(&self, token: &str) -> Option<Chunk> {
        let mut p = self.pending.lock().ok()?;
        match p.remove(token)? {
            Pending::Chunk(c) => Some(*c),
            Pending::Low(t) => {
                p.insert(token.to_string(), Pending::Low(t));
                None
            }
        }
    }
}

/// A watermark message's content: `low <token>` or `high <token>`.
pub fn parse_message(content: &[u8]) -> Option<(bool, &str)> {
    let text = std::str::from_utf8(content).ok()?;
    let (kind, token) = text.split_once(' ')?;
    match kind {
        "low" => Some((true, token)),
        "high" => Some((false, token)),
        _ => None,
    }
}

/// Why a copy stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("copying {table} in chunks: {message}")]
    Copy { table: String, message: String },
    /// The lake's keys could not be read (a resync's chunk); the copy resumes.
    #[error("reading the lake's keys of {table}: {message}")]
    Lake { table: String, message: String },
    /// The session ended (the apply stage went away): the next one resumes.
    #[error("the replication session ended")]
    Ended,
}

/// Where one table's chunked copy starts: after `last_key`, continuing the copy that
/// began at `start` (both `None` for a fresh copy).
#[derive(Debug, Clone)]
pub struct Resume {
    pub start: Option<Lsn>,
    pub last_key: Option<i64>,
}

/// Copies one table in chunks of `chunk_rows` from `resume` on (which follows the chunks
/// taken), until its last chunk is taken or `cancel` fires. Returns the rows taken.
// The copy's settings come in pieces: the source's connection and publication, the
// table, the lake's columns, the position, the chunk size, the registry and the stop.
#[allow(clippy::too_many_arguments)]
pub async fn copy_table(
    params: &ConnParams,
    publication: &str,
    table: &TableInfo,
    lake_columns: &[String],
    resume: &mut Resume,
    chunk_rows: usize,
    mut resync: Option<Resync<'_>>,
    watermarks: Arc<Watermarks>,
    cancel: CancellationToken,
) -> Result<Copied, ChunkError> {
    let mut plan = Plan::new(table, lake_columns)?;
    let client = catalog::connect(params).await?;
    client
        .batch_execute(super::snapshot::TEXT_FORMS)
        .await
        .map_err(CatalogError::from)?;
    let estimate: Option<f32> = client
        .query_one(
            "SELECT (SELECT reltuples FROM pg_class WHERE oid = to_regclass($1))",
            &[&table.name.quoted()],
        )
        .await
        .map_err(CatalogError::from)?
        .get(0);
    let estimate = estimate.filter(|e| *e >= 0.0).map(f64::from);
    crate::telemetry::snapshot_progress(&table.name.to_string(), 0, estimate);
    let nonce: u64 = rand_nonce();
    let mut table = table.clone();
    let mut copied = Copied::default();
    let mut n = 0u64;
    let label = table.name.to_string();
    // Chunks copied and waiting for their verdict, oldest first: the next one is read
    // while the stream carries the previous one to the apply stage.
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    // Where the next chunk to read starts, and whether the last one has been read.
    let mut next_after = resume.last_key;
    let mut read_all = false;
    let mut ahead = KeysAhead::default();
    loop {
        while in_flight.len() < AHEAD && !read_all {
            n += 1;
            let token = format!("{nonce:016x}-{n}");
            // A resync's chunk covers no key past the lake keys read ahead.
            let bound = match resync.as_mut() {
                None => None,
                Some(r) => {
                    let ready = tokio::select! {
                        ready = ahead.ready(r.stored, next_after, chunk_rows) => ready,
                        _ = cancel.cancelled() => return Err(ChunkError::Ended),
                    };
                    ready.map_err(|message| ChunkError::Lake {
                        table: table.name.to_string(),
                        message,
                    })?;
                    ahead.through
                }
            };
            let sql = plan.sql(next_after, bound, chunk_rows);
            let chunk = tokio::select! {
                c = copy_chunk(&client, &watermarks, &token, &table.name, &sql, plan.columns.len(), plan.key_index) => c,
                _ = cancel.cancelled() => {
                    watermarks.forget(&token);
                    return Err(ChunkError::Ended);
                }
            };
            let (rows, keys, snapshot) = match chunk {
                Ok(c) => c,
                Err(e) => {
                    watermarks.forget(&token);
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(e);
                }
            };
            // A full chunk covers the keys up to its last row's; a short one, up to the
            // bound (none: it is the last).
            let through = match rows.len() < chunk_rows {
                true => bound,
                false => keys.last().copied(),
            };
            let last = through.is_none();
            let stored = match resync.is_some() {
                true => ahead.within(next_after, through),
                false => Vec::new(),
            };
            let last_key = through.or(keys.last().copied()).or(next_after);
            let (tx, verdict) = oneshot::channel();
            watermarks.offer(
                &token,
                Chunk {
                    table: table.name.clone(),
                    columns: plan.columns.clone(),
                    lake_columns: plan.lake_columns.clone(),
                    rows,
                    keys,
                    snapshot,
                    start: resume.start,
                    after: next_after,
                    last,
                    part: table.published.fingerprint(),
                    key_index: plan.key_index,
                    resync: resync.as_ref().map(|r| r.id),
                    through,
                    stored,
                    verdict: tx,
                },
            );
            let high = async {
                client
                    .query(
                        "SELECT pg_logical_emit_message(true, $1, $2)::text",
                        &[&PREFIX, &format!("high {token}")],
                    )
                    .await?;
                client.batch_execute("COMMIT").await
            };
            if let Err(e) = high.await {
                watermarks.forget(&token);
                return Err(CatalogError::from(e).into());
            }
            in_flight.push_back(InFlight {
                n,
                verdict,
                last_key,
                last,
            });
            next_after = last_key;
            read_all = last;
        }
        let Some(chunk) = in_flight.pop_front() else {
            return Ok(copied);
        };
        let verdict = tokio::select! {
            v = chunk.verdict => v.map_err(|_| ChunkError::Ended)?,
            _ = cancel.cancelled() => return Err(ChunkError::Ended),
        };
        match verdict {
            Verdict::Taken {
                start,
                added,
                removed,
            } => {
                // A copy's first chunk names where it began.
                resume.start = Some(start);
                resume.last_key = chunk.last_key;
                copied.rows += added as u64;
                copied.removed += removed as u64;
                crate::telemetry::snapshot_progress(&label, copied.rows, estimate);
                tracing::debug!(table = %table.name, chunk = chunk.n, added, removed, last_key = ?resume.last_key, "chunk taken");
                if chunk.last {
                    return Ok(copied);
                }
                continue;
            }
            Verdict::Again(why) => {
                // The chunks read after it do not follow a taken one: all are read again.
                tracing::info!(table = %table.name, chunk = chunk.n, reason = %why, "chunk read again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Verdict::Behind { last_key, start } => {
                tracing::info!(table = %table.name, chunk = chunk.n, last_key = ?last_key, "chunks were taken that this copier did not wait for; going on after them");
                resume.last_key = last_key;
                resume.start = start.or(resume.start);
            }
            Verdict::Reshaped(lake_columns) => {
                tracing::info!(table = %table.name, columns = ?lake_columns, "the table's columns changed; the copy reads them again");
                if let Some(info) = catalog::table_info(&client, &table.name, publication).await? {
                    table = info;
                }
                plan = Plan::new(&table, &lake_columns)?;
            }
        }
        // Not taken: the chunks read after it do not follow a taken one either.
        in_flight.clear();
        next_after = resume.last_key;
        read_all = false;
    }
}

/// What a copy took: the rows copied, and (a resync) the rows deleted because the
/// source no longer has them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Copied {
    pub rows: u64,
    pub removed: u64,
}

/// What a chunk's `COPY` reads: the columns (the lake's that the source has), where the
/// key is among them, and the statement's fixed part.
struct Plan {
    columns: Vec<String>,
    lake_columns: Vec<String>,
    key: String,
    key_index: usize,
    select: String,
    filter: Option<String>,
}

impl Plan {
    fn new(table: &TableInfo, lake_columns: &[String]) -> Result<Plan, ChunkError> {
        let key = chunk_key(table).ok_or_else(|| ChunkError::Copy {
            table: table.name.to_string(),
            message: "the table has no single integer key column".into(),
        })?;
        let columns: Vec<String> = lake_columns
            .iter()
            .filter(|c| table.columns.iter().any(|s| &s.name == *c))
            .cloned()
            .collect();
        let key_index = columns
            .iter()
            .position(|c| c == key)
            .ok_or_else(|| ChunkError::Copy {
                table: table.name.to_string(),
                message: format!("the key column {key} is not copied"),
            })?;
        let only = if table.partitioned { "" } else { "ONLY " };
        let select = format!(
            "SELECT {} FROM {only}{}",
            columns
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", "),
            table.name.quoted()
        );
        Ok(Plan {
            columns,
            lake_columns: lake_columns.to_vec(),
            key: key.to_string(),
            key_index,
            select,
            filter: table
                .published
                .row_filter
                .as_ref()
                .map(|f| format!("({f})")),
        })
    }

    /// The `COPY` of the next `rows` rows after key `after`, up to key `through`.
    fn sql(&self, after: Option<i64>, through: Option<i64>, rows: usize) -> String {
        let key = quote_ident(&self.key);
        let conditions: Vec<String> = self
            .filter
            .iter()
            .cloned()
            .chain(after.map(|k| format!("{key} > {k}")))
            .chain(through.map(|k| format!("{key} <= {k}")))
            .collect();
        format!(
            "COPY ({}{} ORDER BY {key} LIMIT {rows}) TO STDOUT",
            self.select,
            if conditions.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", conditions.join(" AND "))
            },
        )
    }
}

/// Chunks read ahead of the oldest one waiting for its verdict.
const AHEAD: usize = 2;

/// A chunk copied, waiting for the apply stage's verdict.
struct InFlight {
    n: u64,
    verdict: oneshot::Receiver<Verdict>,
    /// The last key the copy holds once this chunk is taken.
    last_key: Option<i64>,
    last: bool,
}

/// Writes the low watermark, then opens the chunk's transaction and copies its rows.
/// The transaction stays open: the caller writes the high watermark in it and commits.
async fn copy_chunk(
    client: &Client,
    watermarks: &Watermarks,
    token: &str,
    table: &TableName,
    sql: &str,
    fields: usize,
    key_index: usize,
) -> Result<(Vec<Tuple>, Vec<i64>, XidSnapshot), ChunkError> {
    let copy_err = |message: String| ChunkError::Copy {
        table: table.to_string(),
        message,
    };
    watermarks.expect_low(token, table);
    client
        .query(
            "SELECT pg_logical_emit_message(true, $1, $2)::text",
            &[&PREFIX, &format!("low {token}")],
        )
        .await
        .map_err(CatalogError::from)?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(CatalogError::from)?;
    let text: String = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(CatalogError::from)?
        .get(0);
    let snapshot = XidSnapshot::parse(&text)
        .ok_or_else(|| copy_err(format!("pg_current_snapshot() gave `{text}`")))?;
    let stream = client.copy_out(sql).await.map_err(CatalogError::from)?;
    let mut stream = std::pin::pin!(stream);
    let mut lines = LineSplitter::default();
    let (mut rows, mut keys) = (Vec::new(), Vec::new());
    while let Some(data) = stream.next().await {
        let data = data.map_err(CatalogError::from)?;
        for line in lines.push(&data) {
            let tuple = parse_copy_line(&line, fields).ok_or_else(|| {
                copy_err("COPY sent a row with the wrong number of fields".into())
            })?;
            let key = key_of(&tuple, key_index)
                .ok_or_else(|| copy_err("a row's key is not an integer".into()))?;
            keys.push(key);
            rows.push(tuple);
        }
        crate::service::beat();
    }
    if !lines.is_empty() {
        return Err(copy_err("COPY ended in the middle of a row".into()));
    }
    Ok((rows, keys, snapshot))
}

/// A number unique to each copy of this process (and, by time and pid, to the process).
fn rand_nonce() -> u64 {
    static COPIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
        .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    crate::source::config::stable_hash(
        &[t.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat(),
    )
}

/// The integer value of the key column at `index` of a tuple (`None`: not an integer).
pub fn key_of(tuple: &Tuple, index: usize) -> Option<i64> {
    match tuple.0.get(index)? {
        TupleValue::Text(t) => std::str::from_utf8(t).ok()?.parse().ok(),
        _ => None,
    }
}

/// SQL that tells whether the role may write watermarks, and the function's signature
/// for a `GRANT` (PostgreSQL 17 added a fourth argument, `flush`).
pub const CAN_EMIT: &str = "SELECT coalesce(bool_or(has_function_privilege(oid, 'EXECUTE')), false), \
            min(oid::regprocedure::text) \
     FROM pg_proc WHERE proname = 'pg_logical_emit_message' \
       AND pronamespace = 'pg_catalog'::regnamespace AND proargtypes[2] = 'text'::regtype";

#[cfg(test)]
mod tests {
    use super::*;

    /// A lake holding `keys`, counting its reads.
    struct Held {
        keys: Vec<i64>,
        reads: usize,
    }

    #[async_trait::async_trait]
    impl StoredKeys for Held {
        async fn first(&mut self, after: Option<i64>, limit: usize) -> Result<Vec<i64>, String> {
            self.reads += 1;
            Ok(self
                .keys
                .iter()
                .copied()
                .filter(|k| Some(*k) > after)
                .take(limit)
                .collect())
        }
    }

    #[tokio::test]
    async fn lake_keys_are_read_ahead_a_bounded_window_at_a_time() {
        let mut lake = Held {
            keys: (1..=100).map(|k| k * 10).collect(),
            reads: 0,
        };
        let mut ahead = KeysAhead::default();
        // Chunks of 2 rows: 16 keys read at once, through key 160.
        ahead.ready(&mut lake, None, 2).await.unwrap();
        assert_eq!((ahead.keys.len(), ahead.through), (16, Some(160)));
        assert_eq!(ahead.within(None, Some(35)), vec![10, 20, 30]);
        // The next chunks use the same read until fewer than a chunk's keys are left.
        ahead.ready(&mut lake, Some(35), 2).await.unwrap();
        assert_eq!(ahead.within(Some(35), Some(60)), vec![40, 50, 60]);
        ahead.ready(&mut lake, Some(145), 2).await.unwrap();
        assert_eq!(lake.reads, 1);
        ahead.ready(&mut lake, Some(155), 2).await.unwrap();
        assert_eq!((lake.reads, ahead.through), (2, Some(310)));
        // A copy sent back within the window reads nothing again; further back, it does.
        ahead.ready(&mut lake, Some(160), 2).await.unwrap();
        assert_eq!(lake.reads, 2);
        assert_eq!(ahead.within(Some(160), Some(180)), vec![170, 180]);
        ahead.ready(&mut lake, Some(5), 2).await.unwrap();
        assert_eq!(
            (lake.reads, ahead.within(Some(5), Some(20))),
            (3, vec![10, 20])
        );
        // Near the end the window has no end, and the last chunk takes every key left.
        ahead.ready(&mut lake, Some(900), 2).await.unwrap();
        assert_eq!(ahead.through, None);
        assert_eq!(
            ahead.within(Some(900), None),
            (91..=100).map(|k| k * 10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn snapshots_parse_and_tell_what_they_see() {
        let s = XidSnapshot::parse("100:105:101,103").unwrap();
        assert!(!s.invisible(99));
        assert!(!s.invisible(100));
        assert!(s.invisible(101));
        assert!(!s.invisible(102));
        assert!(s.invisible(103));
        assert!(s.invisible(105));
        assert!(s.invisible(200));
        // 64-bit ids with an epoch: compared on their low 32 bits, modulo 2³².
        let s = XidSnapshot::parse("4294967390:4294967400:").unwrap();
        assert!(s.invisible(104));
        assert!(!s.invisible(103));
        assert!(!s.invisible(u32::MAX - 5));
        assert!(XidSnapshot::parse("1:2").is_none());
        assert!(XidSnapshot::parse("a:2:").is_none());
    }

    #[test]
    fn messages_parse() {
        assert_eq!(parse_message(b"low ab-1"), Some((true, "ab-1")));
        assert_eq!(parse_message(b"high ab-1"), Some((false, "ab-1")));
        assert_eq!(parse_message(b"middle ab-1"), None);
        assert_eq!(parse_message(b"\xff"), None);
    }
}
