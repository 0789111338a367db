//! Apply: turns the ordered stream of pgoutput messages into Delta commits.
//!
//! Changes are appended to per-table Arrow builders as they arrive; large tables spill
//! finished chunks into uncommitted Parquet files, so memory stays bounded whatever the
//! transaction size. A chunk is written on a thread of its own ([`ChunkWriter`]) while the
//! next one is built. A batch is committed only at a transaction boundary, when a row, byte
//! or age limit is reached: first every touched raw table (each commit carrying its source
//! position), then the global checkpoint. Only then does the durable LSN, the one reported
//! to Postgres, move forward.
//!
//! Exactly-once on restart: a transaction is skipped for a table whose recorded position
//! is at or past the transaction's commit LSN (see `lake::checkpoint` for the design).
//!
//! Apply is the transform step between the stream and the lake: it maps relations to
//! tables, reconciles schema changes ([`schema`]) and normalizes values for the curated
//! tables ([`normalize`]); the lake owns the table formats and the commit path.

pub mod config;
pub mod normalize;
pub mod schema;
mod watermark;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use deltalake::kernel::Add;
use tokio::sync::{mpsc, oneshot, watch};

use deltalake::arrow::array::{Array, ArrayRef, Int64Array};
use deltalake::arrow::compute::filter_record_batch;
use deltalake::arrow::compute::kernels::cmp::gt;
use deltalake::arrow::record_batch::RecordBatch;

use self::config::ApplyConfig;
use self::normalize::{Normalization, Normalizer};
use crate::change::message::{OldTuple, PgOutputMessage, Relation, Tuple, TupleValue};
use crate::change::{ChangeMeta, ColumnSpec, Op, RelId, ReplicaIdentity, SourceEvent, Xid};
use crate::lake::checkpoint::{Checkpoint, CheckpointRecord, RecordSender, TableVersions};
use crate::lake::curated::splice::Splice;
use crate::lake::curated::{CuratedConfig, CuratedTable, Indexing};
use crate::lake::maintenance::Policy;
use crate::lake::raw::layout::RawBatchBuilder;
use crate::lake::raw::{ChunkedProgress, RawTable};
use crate::lake::table::CURATED_FILE_SIZE;
use crate::lake::{Lake, LakeError};
use crate::lsn::Lsn;
use crate::source::catalog::TableInfo;
use crate::source::diagnosis::SourceUnusable;
use crate::source::replication::PG_EPOCH_OFFSET_MICROS;
use crate::table_name::TableName;

/// Apply failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("the replication stream broke its own rules: {0}")]
    Stream(String),
    #[error(transparent)]
    TypeChanged(#[from] schema::TypeChanged),
    /// The stream can no longer be followed exactly (a changed replica identity).
    #[error(transparent)]
    Diverged(#[from] SourceUnusable),
    /// A chunk's write on another thread ended without handing the tables back.
    #[error(
        "writing a chunk of {table} did not finish ({reason}); nothing of its batch was \
         committed, and the session starts again from the lake's positions"
    )]
    WriteLost { table: String, reason: String },
}

impl ApplyError {
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Lake(e) => e.is_transient(),
            // The tables are opened again from what is durable.
            ApplyError::WriteLost { .. } => true,
            _ => false,
        }
    }
}

struct TableState {
    name: TableName,
    builder: RawBatchBuilder,
    key_columns: Vec<String>,
    /// The raw and curated tables; away while a chunk of a large batch is written on
    /// another thread ([`TableState::write_behind`]).
    sides: Option<Box<Sides>>,
    writing: Option<Writing>,
}

/// A table's raw and curated tables, and how its values are stored in the curated one.
struct Sides {
    raw: RawTable,
    curated: CuratedTable,
    /// The normalization rules of the curated table's columns.
    normalizer: Normalizer,
}

/// A chunk's write running on the [`ChunkWriter`]'s thread, which has the table's sides
/// until it ends.
struct Writing {
    /// The position both tables held when it began (a chunk's write commits nothing).
    held: Option<Lsn>,
    done: oneshot::Receiver<(Box<Sides>, Result<(), LakeError>)>,
}

type Job = Box<dyn FnOnce() + Send>;

/// The thread that writes the chunks of large batches, for every table, one after the
/// other. A thread of its own rather than tokio's blocking pool, which may start a new
/// thread per chunk: the memory a chunk's write frees stays with that thread's allocator
/// heap, and a new thread per chunk left each one's behind (the peak grew with the
/// transaction, past 500 MB for 2 M rows).
#[derive(Default)]
struct ChunkWriter {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
}

impl ChunkWriter {
    /// Runs `job` on the thread, starting it first if needed.
    fn run(&mut self, job: Job) -> Result<(), String> {
        let jobs = match self.jobs.take() {
            Some(jobs) => jobs,
            None => {
                let (tx, rx) = std::sync::mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name("wal2delta-chunks".into())
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })
                    .map_err(|e| format!("cannot start a thread: {e}"))?;
                tx
            }
        };
        // A thread that ended (a write panicked) is replaced at the next chunk.
        jobs.send(job)
            .map_err(|_| "its thread has ended".to_string())?;
        self.jobs = Some(jobs);
        Ok(())
    }
}

impl TableState {
    /// Opens a source table's raw and curated tables with the columns the lake keeps
    /// for it (the source's, plus any it dropped).
    async fn open(
        lake: &Lake,
        slot: &str,
        info: &TableInfo,
        normalization: &Normalization,
        curated_config: &CuratedConfig,
    ) -> Result<TableState, ApplyError> {
        let name = &info.name;
        let existing = RawTable::stored_schema(lake, name).await?;
        let columns = schema::reconcile(&name.to_string(), existing.as_deref(), &info.columns)?;
        let raw = RawTable::open(lake, slot, name, &columns).await?;
        let normalizer = Normalizer::for_table(name, &columns, &info.key_columns, normalization);
        let curated = CuratedTable::open(
            lake,
            slot,
            name,
            &columns,
            &info.key_columns,
            &normalizer.stored_types(),
            curated_config,
        )
        .await?;
        Ok(TableState {
            name: name.clone(),
            builder: RawBatchBuilder::new(columns),
            key_columns: info.key_columns.clone(),
            sides: Some(Box::new(Sides {
                raw,
                curated,
                normalizer,
            })),
            writing: None,
        })
    }

    /// The position both the raw and the curated table hold.
    fn held(&self) -> Option<Lsn> {
        match (&self.writing, &self.sides) {
            (Some(writing), _) => writing.held,
            (None, Some(sides)) => sides.held(),
            (None, None) => None,
        }
    }

    /// The raw and curated tables, once a chunk's write running on another thread (if
    /// any) has ended; its error, if it failed.
    async fn settle(&mut self) -> Result<&mut Sides, ApplyError> {
        if let Some(writing) = self.writing.take() {
            match writing.done.await {
                Ok((sides, result)) => {
                    self.sides = Some(sides);
                    result?;
                }
                Err(e) => {
                    return Err(ApplyError::WriteLost {
                        table: self.name.to_string(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        self.sides
            .as_deref_mut()
            .ok_or_else(|| lost_write(&self.name))
    }

    /// The builder and the raw and curated tables, once a chunk's write (if any) has
    /// ended.
    async fn parts(&mut self) -> Result<(&mut RawBatchBuilder, &mut Sides), ApplyError> {
        self.settle().await?;
        let lost = lost_write(&self.name);
        Ok((&mut self.builder, self.sides.as_deref_mut().ok_or(lost)?))
    }

    /// The raw and curated tables, when no chunk is being written.
    fn here(&self) -> Option<&Sides> {
        self.sides.as_deref().filter(|_| self.writing.is_none())
    }

    /// The same, to change them.
    fn here_mut(&mut self) -> Option<&mut Sides> {
        self.sides.as_deref_mut().filter(|_| self.writing.is_none())
    }

    /// Writes a chunk of a batch on the [`ChunkWriter`]'s thread while the stream's next
    /// rows are built into the next chunk: both are mostly CPU (Parquet encoding and the
    /// merge; decoding and Arrow building), and a large transaction's replay took them one
    /// after the other. One chunk per table is in flight: the previous one's write ends
    /// first.
    async fn write_behind(
        &mut self,
        batch: RecordBatch,
        writer: &mut ChunkWriter,
    ) -> Result<(), ApplyError> {
        self.settle().await?;
        let mut sides = self.sides.take().ok_or_else(|| lost_write(&self.name))?;
        let held = sides.held();
        let runtime = tokio::runtime::Handle::current();
        let (tx, done) = oneshot::channel();
        writer
            .run(Box::new(move || {
                let result = runtime.block_on(sides.write_chunk(batch));
                let _ = tx.send((sides, result));
            }))
            .map_err(|reason| ApplyError::WriteLost {
                table: self.name.to_string(),
                reason,
            })?;
        self.writing = Some(Writing { held, done });
        Ok(())
    }

    /// Applies a schema change: what is buffered goes out under the old schema, later rows
    /// under the new one; the next commit records the new schema with the data.
    async fn evolve(
        &mut self,
        columns: Vec<ColumnSpec>,
        normalization: &Normalization,
    ) -> Result<(), ApplyError> {
        let normalizer =
            Normalizer::for_table(&self.name, &columns, &self.key_columns, normalization);
        let (builder, sides) = self.parts().await?;
        if builder.rows() > 0 {
            let batch = builder.finish().map_err(|source| LakeError::Arrow {
                table: sides.raw.label().to_string(),
                source,
            })?;
            sides.write_chunk(batch).await?;
        }
        *builder = RawBatchBuilder::new(columns.clone());
        sides.raw.evolve(&columns).await?;
        sides.normalizer = normalizer;
        Ok(sides
            .curated
            .evolve(&columns, &sides.normalizer.stored_types())?)
    }
}

/// A table whose sides did not come back from a failed chunk's write.
fn lost_write(table: &TableName) -> ApplyError {
    ApplyError::WriteLost {
        table: table.to_string(),
        reason: "an earlier write failed".into(),
    }
}

impl Sides {
    /// The position both the raw and the curated table hold.
    fn held(&self) -> Option<Lsn> {
        match (self.raw.applied(), self.curated.applied()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            _ => None,
        }
    }

    /// Hands a chunk of change rows to the raw and curated tables, each taking only the
    /// transactions it does not hold yet.
    async fn write_chunk(&mut self, batch: RecordBatch) -> Result<(), LakeError> {
        let raw = after(&batch, self.raw.applied(), self.raw.label())?;
        self.raw.write(raw).await?;
        let curated = after(&batch, self.curated.applied(), self.curated.label())?;
        let values = self.normalize(&curated)?;
        self.curated.merge(&curated, values).await
    }

    /// Brings the curated table up to the raw one by merging the raw change rows it does
    /// not hold yet: after a resync swapped in a copy taken before the stream's position,
    /// or after a crash between the two (the slot does not send those changes again).
    async fn catch_up(
        &mut self,
        name: &TableName,
        schema: &deltalake::arrow::datatypes::SchemaRef,
    ) -> Result<(), LakeError> {
        let (Some(raw_at), Some(curated_at)) = (self.raw.applied(), self.curated.applied()) else {
            return Ok(());
        };
        if curated_at >= raw_at {
            return Ok(());
        }
        let changes = self.raw.changes(Some(curated_at), raw_at, schema).await?;
        let rows: usize = changes.iter().map(|b| b.num_rows()).sum();
        for batch in changes {
            let values = self.normalize(&batch)?;
            self.curated.merge(&batch, values).await?;
        }
        self.curated.commit(raw_at).await?;
        tracing::info!(table = %name, from = %curated_at, to = %raw_at, rows, "curated table brought up to the raw change log");
        Ok(())
    }

    /// Finishes the raw files written so far and adds their curated twins, spliced;
    /// `pending` holds the converted columns of their rows, taken here. Returns how many
    /// files were spliced.
    async fn splice_files(
        &mut self,
        splice: &Splice,
        pending: &mut [Vec<ArrayRef>],
    ) -> Result<usize, ApplyError> {
        let label = self.curated.label().to_string();
        if pending.first().is_some_and(Vec::is_empty) {
            // No row since the last splice (the last batch filled the file).
            if self.raw.flush_files().await?.is_empty() {
                return Ok(0);
            }
            return Err(ApplyError::Stream(format!(
                "{label}: raw files written without their converted columns"
            )));
        }
        let arrow_err = |source| LakeError::Arrow {
            table: label.clone(),
            source,
        };
        let arrays = pending
            .iter_mut()
            .map(|parts| {
                let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
                let whole = deltalake::arrow::compute::concat(&refs);
                parts.clear();
                whole
            })
            .collect::<Result<Vec<ArrayRef>, _>>()
            .map_err(arrow_err)?;
        let mut offset = 0;
        let files = self.raw.flush_files().await?;
        let count = files.len();
        for add in files {
            let bytes = self.raw.read_file(&add).await?;
            offset += self
                .curated
                .append_spliced(splice, &add, &bytes, &arrays, offset)
                .await?;
        }
        if arrays.iter().any(|a| a.len() != offset) {
            return Err(ApplyError::Stream(format!(
                "{label}: the raw files spliced hold {offset} rows, not the {} converted",
                arrays.first().map_or(0, |a| a.len())
            )));
        }
        Ok(count)
    }

    /// The source columns of raw change rows as the curated table stores them.
    fn normalize(
        &self,
        rows: &RecordBatch,
    ) -> Result<Vec<deltalake::arrow::array::ArrayRef>, LakeError> {
        self.normalizer
            .normalize(rows)
            .map_err(|source| LakeError::Arrow {
                table: self.curated.label().to_string(),
                source,
            })
    }
}

/// Curated files a table's snapshot splices from raw files at most (`write_snapshot`):
/// about 200 MiB of raw copy in curated-sized files, fewer than compaction's default
/// trigger (64 small files) on their own.
const SPLICED_FILES: usize = 48;

/// The next staged copy (`None` when no more can come).
async fn next_copy(copies: Option<&StagedCopies>) -> Option<StagedCopy> {
    copies?.lock().await.recv().await
}

/// The rows of `batch` from transactions committed after `applied`.
fn after(batch: &RecordBatch, applied: Option<Lsn>, label: &str) -> Result<RecordBatch, LakeError> {
    let Some(applied) = applied else {
        return Ok(batch.clone());
    };
    let arrow_err = |source| LakeError::Arrow {
        table: label.to_string(),
        source,
    };
    let lsns = batch
        .column_by_name("_commit_lsn")
        .and_then(|a| a.as_any().downcast_ref::<Int64Array>())
        .ok_or_else(|| {
            arrow_err(deltalake::arrow::error::ArrowError::SchemaError(
                "no _commit_lsn column".into(),
            ))
        })?;
    if lsns.is_empty() || lsns.values().iter().all(|v| *v > applied.as_i64()) {
        return Ok(batch.clone());
    }
    let keep = gt(lsns, &Int64Array::new_scalar(applied.as_i64())).map_err(arrow_err)?;
    filter_record_batch(batch, &keep).map_err(arrow_err)
}

/// How the stream's relation maps onto a lake table.
struct RelationMap {
    table: Option<TableName>,
    /// For each lake column, its index in the relation's tuples.
    positions: Vec<Option<usize>>,
}

struct OpenTxn {
    commit_lsn: Lsn,
    commit_ts: i64,
    xid: Xid,
    seq: i64,
}

#[derive(Default)]
struct Batch {
    started: Option<Instant>,
    rows: usize,
    bytes: usize,
    last_commit_lsn: Lsn,
    last_end_lsn: Lsn,
    /// Commit time (µs since the Unix epoch) of the batch's last transaction.
    last_commit_ts: i64,
    transactions: u64,
    touched: BTreeSet<TableName>,
    /// Changes per table and op, for the metrics.
    changes: FastMap<TableName, FastMap<Op, u64>>,
}

/// The maps looked up once or more per change (keyed by table names and relation ids):
/// ahash, not SipHash, which took about 2% of a large transaction's replay.
type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// The apply stage's state for one replication session.
pub struct Applier {
    config: ApplyConfig,
    tables: FastMap<TableName, TableState>,
    relations: FastMap<RelId, RelationMap>,
    normalization: Normalization,
    checkpoint: Checkpoint,
    txn: Option<OpenTxn>,
    batch: Batch,
    durable: watch::Sender<Lsn>,
    maintenance: Policy,
    next_check: Instant,
    next_vacuum: Instant,
    next_log_cleanup: Instant,
    /// Tables copied again while streaming (`resync`), waiting to be swapped in.
    copies: Option<StagedCopies>,
    /// Chunked copies running beside the stream, and their reconciliation with it.
    watermarks: Option<Arc<crate::source::watermark::Watermarks>>,
    reconciler: watermark::Reconciler,
    /// Curated files may lack a key-index entry (after the start, a snapshot, a resync
    /// or a commit): the loop indexes them one file at a time while nothing else waits.
    indexing: bool,
    /// The lake is on an object store (not local files).
    on_object_store: bool,
    writer: ChunkWriter,
}

/// A table copied again while the daemon streams (`resync`): the copy's files, written
/// but not committed.
pub struct StagedCopy {
    pub table: TableName,
    /// The copy's consistent point.
    pub point: Lsn,
    /// The columns the copy was written with (the lake's at the time).
    pub columns: Vec<ColumnSpec>,
    /// The fingerprint of the publication's row filter and column list it copied with
    /// (`None`: the whole table).
    pub part: Option<String>,
    pub raw: Vec<Add>,
    pub curated: Vec<Add>,
    pub rows: u64,
    /// Told when the copy is swapped in, or why it was refused.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// Where staged copies arrive; shared by the sessions of one daemon.
pub type StagedCopies = Arc<tokio::sync::Mutex<mpsc::Receiver<StagedCopy>>>;

impl Applier {
    /// Opens every raw and curated table and the checkpoint, reading back their positions.
    /// New checkpoint records are published on `records` when given.
    // The settings come in pieces: the configuration module depends on this one (`[apply]`).
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        lake: &Lake,
        slot: &str,
        tables: &[TableInfo],
        normalization: &Normalization,
        curated_config: &CuratedConfig,
        config: ApplyConfig,
        durable: watch::Sender<Lsn>,
        records: Option<RecordSender>,
    ) -> Result<Applier, ApplyError> {
        // The tables open concurrently (each a few log reads: the daemon reopens them all
        // after its snapshot and at every reconnect); catching up, which may read a
        // table's pending changes into memory, goes one table at a time.
        let opened = futures::future::try_join_all(
            tables
                .iter()
                .map(|info| TableState::open(lake, slot, info, normalization, curated_config)),
        )
        .await?;
        let mut states = FastMap::default();
        for mut state in opened {
            let name = state.name.clone();
            let (builder, sides) = state.parts().await?;
            sides.catch_up(&name, builder.schema()).await?;
            states.insert(state.name.clone(), state);
        }
        let mut checkpoint = Checkpoint::open(lake, slot).await?;
        if let Some(records) = records {
            checkpoint.publish_to(records);
        }
        Ok(Applier {
            config,
            tables: states,
            relations: FastMap::default(),
            normalization: normalization.clone(),
            checkpoint,
            txn: None,
            batch: Batch::default(),
            durable,
            maintenance: Default::default(),
            next_check: Instant::now(),
            next_vacuum: Instant::now(),
            next_log_cleanup: Instant::now(),
            copies: None,
            watermarks: None,
            reconciler: Default::default(),
            indexing: true,
            on_object_store: lake.is_object_store(),
            writer: ChunkWriter::default(),
        })
    }

    /// Takes the chunks of copies running beside the stream from `watermarks`.
    pub fn take_chunks_from(&mut self, watermarks: Arc<crate::source::watermark::Watermarks>) {
        self.watermarks = Some(watermarks);
    }

    /// Whether `table`'s raw or curated table holds any source position (rows streamed
    /// or copied before).
    pub fn has_position(&self, table: &TableName) -> bool {
        self.tables
            .get(table)
            .and_then(TableState::here)
            .is_some_and(|t| t.raw.applied().is_some() || t.curated.applied().is_some())
    }

    /// How far `table`'s chunked copy is, as durable in the lake.
    pub fn chunked_progress(&self, table: &TableName) -> Option<ChunkedProgress> {
        self.tables.get(table)?.here()?.raw.chunked().cloned()
    }

    /// Swaps in the copies arriving on `copies` between batches.
    pub fn take_copies_from(&mut self, copies: StagedCopies) {
        self.copies = Some(copies);
    }

    /// Swaps a staged copy in: the curated table replaced in one commit, brought up to the
    /// raw change log (the changes streamed while the copy ran), the raw table given the
    /// copy's `r` rows, then one checkpoint record, so the SQL endpoint goes from the old
    /// rows straight to the new ones.
    async fn swap_in(&mut self, copy: StagedCopy) -> Result<(), ApplyError> {
        if !self.batch.touched.is_empty() {
            self.flush().await?;
        }
        let StagedCopy {
            table,
            point,
            columns,
            part,
            raw,
            curated,
            rows,
            done,
        } = copy;
        let Some(state) = self.tables.get_mut(&table) else {
            let _ = done.send(Err(format!("{table} is not replicated by this daemon")));
            return Ok(());
        };
        let current = state.builder.columns();
        if current != columns.as_slice() {
            // Columns added at the source that no change carried yet: grow first.
            let grown = columns.len() > current.len() && columns[..current.len()] == *current;
            if !grown {
                let _ = done.send(Err(format!(
                    "the columns of {table} changed while it was copied; it is copied again"
                )));
                return Ok(());
            }
            state.evolve(columns, &self.normalization).await?;
        }
        let held = Lsn::from_i64(point.as_i64().saturating_sub(1));
        let (builder, sides) = state.parts().await?;
        sides.curated.replace_with(curated, held, point).await?;
        sides
            .raw
            .add_copy(raw, held, point, part.as_deref())
            .await?;
        sides.catch_up(&table, builder.schema()).await?;
        let versions = self.versions().await?;
        // Shown at the checkpoint's own position: the copy may be ahead of the stream.
        self.checkpoint.record_versions(Lsn::ZERO, versions).await?;
        self.record_resync(&table, point, serde_json::json!({ "rows": rows }))
            .await?;
        tracing::info!(table = %table, at = %point, rows, "resync swapped in");
        let _ = done.send(Ok(()));
        self.indexing = true;
        Ok(())
    }

    /// Records a resync of `table` at `point` in the checkpoint's reset history, with
    /// `details` (an object) added.
    async fn record_resync(
        &mut self,
        table: &TableName,
        point: Lsn,
        details: serde_json::Value,
    ) -> Result<(), ApplyError> {
        let mut record = serde_json::json!({
            "action": "resync",
            "tables": [table.to_string()],
            "point": point.to_string(),
            "at": chrono::Utc::now().to_rfc3339(),
        });
        if let (Some(record), serde_json::Value::Object(details)) =
            (record.as_object_mut(), details)
        {
            record.extend(details);
        }
        Ok(self.checkpoint.record_reset(None, &[], record).await?)
    }

    /// Sets the Delta maintenance policy (`[maintenance]`); the first check comes one
    /// interval after this.
    pub fn set_maintenance(&mut self, policy: Policy) {
        let now = Instant::now();
        self.next_check = now + policy.check_interval;
        self.next_vacuum = now + policy.check_interval;
        self.next_log_cleanup = now + policy.check_interval;
        self.maintenance = policy;
    }

    /// Compaction and vacuum when due (`lake::maintenance`). Runs between batches, so no
    /// table has uncommitted files; a failure is logged and retried at the next check,
    /// never stopping replication.
    async fn maintain(&mut self) {
        let now = Instant::now();
        if now < self.next_check {
            return;
        }
        self.next_check = now + self.maintenance.check_interval;
        let vacuum = match self.maintenance.vacuum_retention {
            Some(retention) if now >= self.next_vacuum => {
                self.next_vacuum = now + self.maintenance.vacuum_interval;
                Some(retention)
            }
            _ => None,
        };
        let policy = self.maintenance.clone();
        for (name, state) in self.tables.iter_mut() {
            // Between batches, every chunk's write has ended.
            let Some(state) = state.here_mut() else {
                continue;
            };
            let label = name.to_string();
            let started = Instant::now();
            let raw = state.raw.maintain(&policy, vacuum).await;
            let curated = state.curated.maintain(&policy, vacuum).await;
            for (layer, result) in [("raw", raw), ("curated", curated)] {
                match result {
                    Ok((files, compacted, vacuumed)) => {
                        crate::telemetry::table_files(&label, layer, files);
                        if let Some(c) = compacted {
                            crate::telemetry::compacted(&label, layer, c.files_removed);
                            tracing::info!(table = %label, layer, removed = c.files_removed, added = c.files_added, files, elapsed_ms = started.elapsed().as_millis() as u64, "compacted small files");
                        }
                        if vacuumed > 0 {
                            crate::telemetry::vacuumed(&label, layer, vacuumed);
                            tracing::info!(table = %label, layer, deleted = vacuumed, "vacuumed unreferenced files");
                        }
                    }
                    Err(e) => {
                        crate::telemetry::error("maintenance");
                        tracing::warn!(table = %label, layer, error = %e, "Delta maintenance failed; replication continues, retrying at the next check");
                    }
                }
            }
        }
        // After vacuum: its DV bookkeeping loads the oldest version still in the log.
        if now >= self.next_log_cleanup {
            self.next_log_cleanup = now + policy.log_cleanup_interval();
            self.clean_logs(policy.log_retention).await;
        }
    }

    /// Deletes log entries older than `retention` from the checkpoint table, then from
    /// every table, keeping each table's version in the oldest checkpoint record left
    /// loadable (readers may still pick that record).
    async fn clean_logs(&mut self, retention: std::time::Duration) {
        let failed = |label: &str, layer: &str, e: &dyn std::fmt::Display| {
            crate::telemetry::error("maintenance");
            tracing::warn!(table = %label, layer, error = %e, "Delta log cleanup failed; replication continues, retrying at the next cleanup");
        };
        let oldest = match self.checkpoint.clean_log(retention).await {
            Ok((removed, oldest)) => {
                crate::telemetry::log_cleaned("_wal2delta.checkpoint", "checkpoint", removed);
                oldest
            }
            Err(e) => {
                failed("_wal2delta.checkpoint", "checkpoint", &e);
                return;
            }
        };
        for (name, state) in self.tables.iter_mut() {
            let Some(state) = state.here_mut() else {
                continue;
            };
            let label = name.to_string();
            // A table the oldest record does not list joined the lake after it: records
            // since then may point to any of its versions, so all are kept for now.
            let (raw_keep, curated_keep) = match &oldest {
                Some(r) => (
                    Some(r.versions.raw.get(&label).copied().unwrap_or(0)),
                    Some(r.versions.curated.get(&label).copied().unwrap_or(0)),
                ),
                None => (None, None),
            };
            for (layer, result) in [
                ("raw", state.raw.clean_log(raw_keep, retention).await),
                (
                    "curated",
                    state.curated.clean_log(curated_keep, retention).await,
                ),
            ] {
                match result {
                    Ok(removed) => {
                        crate::telemetry::log_cleaned(&label, layer, removed);
                        if removed > 0 {
                            tracing::info!(table = %label, layer, removed, "deleted Delta log entries older than the log retention");
                        }
                    }
                    Err(e) => failed(&label, layer, &e),
                }
            }
        }
    }

    /// Where streaming should restart: the global checkpoint.
    pub fn restart_position(&self) -> Lsn {
        self.checkpoint.position().unwrap_or(Lsn::ZERO)
    }

    /// Positions per table, for logs.
    pub fn table_positions(&self) -> Vec<(String, Option<Lsn>)> {
        self.tables
            .values()
            .filter_map(TableState::here)
            .flat_map(|t| {
                [
                    (t.raw.label().to_string(), t.raw.applied()),
                    (t.curated.label().to_string(), t.curated.applied()),
                ]
            })
            .collect()
    }

    /// The columns `table` is stored with (the source's, plus any it dropped).
    pub fn lake_columns(&self, table: &TableName) -> Option<Vec<ColumnSpec>> {
        self.tables.get(table).map(|t| t.builder.columns().to_vec())
    }

    /// Where `table`'s snapshot was taken, if it has a complete one.
    pub fn snapshot_position(&self, table: &TableName) -> Option<Lsn> {
        self.tables
            .get(table)
            .and_then(TableState::here)
            .and_then(|t| t.raw.snapshot_at())
    }

    /// Whether `table`'s snapshot copied the `part` the publication publishes now (see
    /// [`crate::source::catalog::PublishedPart::fingerprint`]).
    pub async fn copied_part(
        &self,
        table: &TableName,
        part: Option<&str>,
    ) -> Result<bool, ApplyError> {
        match self.tables.get(table) {
            Some(t) => {
                let t = t.here().ok_or_else(|| {
                    ApplyError::Stream(format!(
                        "{table} is being written while its copy is checked"
                    ))
                })?;
                Ok(t.raw.copied_part(part).await?)
            }
            None => Ok(true),
        }
    }

    /// The tables the latest checkpoint covered (`None` when no checkpoint says): one left
    /// out of the configuration for a while missed changes.
    pub async fn tracked_tables(&self) -> Option<std::collections::HashSet<String>> {
        self.checkpoint.tracked_tables().await
    }

    /// When an operator asked for `table` to be copied again, if ever.
    pub async fn resnapshot_requested(&self, table: &TableName) -> Result<Option<Lsn>, ApplyError> {
        Ok(self.checkpoint.resnapshot_requested(table).await?)
    }

    /// The slot's creation point as recorded in the checkpoint table.
    pub fn slot_created_at(&self) -> Option<Lsn> {
        self.checkpoint.slot_created_at()
    }

    /// Records that the slot was created with consistent point `lsn`: every snapshot taken
    /// before it belongs to an older slot.
    pub async fn record_slot_created(&mut self, lsn: Lsn) -> Result<(), ApplyError> {
        Ok(self.checkpoint.record_slot_created(lsn).await?)
    }

    /// Writes a table's snapshot rows (raw-shaped, op `r`) as they arrive, replacing the
    /// curated table's contents. Nothing is visible until [`Applier::commit_snapshot`].
    pub async fn write_snapshot(
        &mut self,
        table: &TableName,
        mut batches: mpsc::Receiver<RecordBatch>,
    ) -> Result<u64, ApplyError> {
        let state = self
            .tables
            .get_mut(table)
            .ok_or_else(|| ApplyError::Stream(format!("snapshot of unknown table {table}")))?
            .settle()
            .await?;
        state.curated.begin_replace();
        // Curated files spliced from the raw ones (`lake::curated::splice`): each row is
        // encoded once, but for the columns a normalization rule converts. Not on object
        // stores, where reading each raw file back would cost a download. The raw files
        // are then curated-sized; after SPLICED_FILES of them the copy goes on as before
        // (raw files of 128 MiB), so that a large table leaves compaction a bounded
        // rewrite, not all of its raw copy.
        let converted = state.normalizer.converted();
        let mut splice = if self.on_object_store {
            None
        } else {
            state.curated.splice_from(&state.raw.schema(), &converted)
        };
        if splice.is_some() {
            state.raw.set_bloom_key(&state.curated.bloom_key()).await?;
        }
        // The converted columns of the rows written to raw files not yet spliced.
        let mut pending: Vec<Vec<ArrayRef>> = vec![Vec::new(); converted.len()];
        let mut spliced = 0;
        let mut rows = 0u64;
        let label = table.to_string();
        while let Some(batch) = batches.recv().await {
            crate::service::beat();
            rows += batch.num_rows() as u64;
            crate::telemetry::snapshot_progress(&label, rows, None);
            state.raw.write(batch.clone()).await?;
            let Some(how) = &splice else {
                let values = state.normalize(&batch)?;
                state.curated.append(&batch, values).await?;
                continue;
            };
            if !converted.is_empty() {
                let values = state.normalize(&batch)?;
                for (k, &i) in converted.iter().enumerate() {
                    pending[k].push(values[i].clone());
                }
            }
            if state.raw.buffered() >= CURATED_FILE_SIZE as usize {
                spliced += state.splice_files(how, &mut pending).await?;
                if spliced >= SPLICED_FILES {
                    state.raw.set_bloom_key(&[]).await?;
                    splice = None;
                }
            }
        }
        if let Some(how) = &splice {
            state.splice_files(how, &mut pending).await?;
            state.raw.set_bloom_key(&[]).await?;
        }
        Ok(rows)
    }

    /// Commits a completely copied snapshot taken at `point`: the curated table first,
    /// then the raw table with the snapshot marker (the last step, so a table whose raw
    /// table has the marker is complete in both).
    pub async fn commit_snapshot(
        &mut self,
        table: &TableName,
        point: Lsn,
        part: Option<&str>,
    ) -> Result<(), ApplyError> {
        let state = self
            .tables
            .get_mut(table)
            .ok_or_else(|| ApplyError::Stream(format!("snapshot of unknown table {table}")))?;
        // The snapshot holds the transactions whose commit record starts *before* the
        // consistent point; one starting exactly at it is streamed, so the tables hold
        // everything up to the point minus one.
        let held = Lsn::from_i64(point.as_i64().saturating_sub(1));
        let state = state.settle().await?;
        state.curated.commit_snapshot(held, point).await?;
        state.raw.commit_snapshot(held, point, part).await?;
        // A checkpoint record with the new versions makes the copy visible to the SQL
        // endpoint now, not at the next change. The replication position does not move.
        let versions = self.versions().await?;
        self.checkpoint.record_versions(held, versions).await?;
        Ok(())
    }

    /// Runs until the channel closes (source stopped), then commits what is complete.
    pub async fn run(mut self, mut events: mpsc::Receiver<SourceEvent>) -> Result<(), ApplyError> {
        // One timer for the whole run (not one per event): an idle but responsive loop
        // still feeds the watchdog, also when the server sends no keepalives.
        let mut idle = tokio::time::interval(std::time::Duration::from_secs(5));
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Group commit: a batch at a transaction boundary is committed once it is
            // `min_batch_age_ms` old if nothing more is waiting (what arrived during the
            // last commit has been taken in), else at `max_batch_age_ms`, so a backlog
            // still gathers into large batches.
            let age = if events.is_empty() {
                self.config.min_batch_age()
            } else {
                self.config.max_batch_age_ms
            };
            let deadline = self
                .batch
                .started
                .filter(|_| self.txn.is_none())
                .map(|s| s + std::time::Duration::from_millis(age));
            crate::service::beat();
            // Idle (no transaction open, nothing waiting in the stream nor a resync to
            // swap in, the stream not closed, the batch not yet due): index one more
            // file's keys. A step reads one file's key column.
            if self.indexing
                && self.txn.is_none()
                && events.is_empty()
                && !events.is_closed()
                && deadline.is_none_or(|d| Instant::now() < d)
                && !self.copy_waiting()
            {
                self.indexing = self.index_one_file().await;
                continue;
            }
            let copies = self.copies.clone().filter(|_| self.txn.is_none());
            let event = tokio::select! {
                biased;
                // A full batch waiting only for time goes first, so a busy stream cannot
                // starve the commit.
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                    self.flush().await?;
                    continue;
                }
                copy = next_copy(copies.as_ref()), if copies.is_some() => {
                    match copy {
                        Some(copy) => self.swap_in(copy).await?,
                        None => self.copies = None,
                    }
                    continue;
                }
                event = events.recv() => event,
                _ = idle.tick() => continue,
            };
            match event {
                Some(SourceEvent::Messages { messages, .. }) => {
                    for (wal_start, message) in messages {
                        self.handle(wal_start, message).await?;
                    }
                }
                Some(SourceEvent::Keepalive { wal_end }) => self.keepalive(wal_end),
                None => break,
            }
        }
        // The source stopped. With no transaction open, the batch holds complete
        // transactions only: commit them. With one open, its rows sit in the same builders
        // and files as the complete ones and cannot be told apart, so commit nothing: the
        // next session reads all of it again from the durable position.
        if let Some(txn) = &self.txn {
            tracing::info!(
                open_commit_lsn = %txn.commit_lsn,
                "stream ended inside a transaction; the uncommitted batch will be read again"
            );
        } else if !self.batch.touched.is_empty() {
            // The last batch of a stopping daemon: no maintenance, stop promptly.
            self.next_check = Instant::now() + std::time::Duration::from_secs(3600);
            self.flush().await?;
        }
        Ok(())
    }

    /// Indexes the keys of one curated file that lacks an entry (in the first table that
    /// has one); returns whether to go on. An entry that does not fit now ends the round
    /// (until the next commit); a file whose keys cannot be read is logged and left to
    /// the merges, which read what the index lacks, as without it.
    async fn index_one_file(&mut self) -> bool {
        for (name, state) in self.tables.iter_mut() {
            let Some(state) = state.here_mut() else {
                continue;
            };
            match state.curated.index_one_file().await {
                Ok(Indexing::Started) => return true,
                Ok(Indexing::Refused) => return false,
                Ok(Indexing::Done) => {}
                Err(e) => {
                    tracing::warn!(table = %name, error = %e, "could not read a curated file's keys for the key index; merges read them when they need them");
                    return true;
                }
            }
        }
        false
    }

    /// Whether a resync's copy waits to be swapped in.
    fn copy_waiting(&self) -> bool {
        self.copies
            .as_ref()
            .is_some_and(|c| c.try_lock().map_or(true, |r| !r.is_empty()))
    }

    fn keepalive(&mut self, wal_end: Lsn) {
        // Nothing received is waiting to be committed, so everything the server sent
        // before this keepalive is durable: the slot may advance (an idle publication
        // must not pin WAL).
        if self.txn.is_none() && self.batch.touched.is_empty() {
            self.advance(wal_end);
            crate::telemetry::caught_up(wal_end.as_i64());
        }
    }

    /// Declares everything before `lsn` durable (committed to the lake, or confirmed by the
    /// slot earlier). The durable position only moves forward.
    pub fn advance(&self, lsn: Lsn) {
        self.durable.send_if_modified(|d| {
            if lsn > *d {
                *d = lsn;
                true
            } else {
                false
            }
        });
    }

    async fn handle(&mut self, wal_start: Lsn, message: PgOutputMessage) -> Result<(), ApplyError> {
        match message {
            PgOutputMessage::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => {
                if self.txn.is_some() {
                    return Err(ApplyError::Stream(
                        "Begin inside an open transaction".into(),
                    ));
                }
                // A full batch must not wait behind a long transaction.
                if !self.batch.touched.is_empty() && self.batch_full() {
                    self.flush().await?;
                }
                self.txn = Some(OpenTxn {
                    commit_lsn: final_lsn,
                    commit_ts: commit_ts.saturating_add(PG_EPOCH_OFFSET_MICROS),
                    xid,
                    seq: 0,
                });
            }
            PgOutputMessage::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                let txn = self
                    .txn
                    .take()
                    .ok_or_else(|| ApplyError::Stream("Commit without Begin".into()))?;
                if txn.commit_lsn != commit_lsn {
                    return Err(ApplyError::Stream(format!(
                        "Commit LSN {commit_lsn} does not match Begin's {}",
                        txn.commit_lsn
                    )));
                }
                if self.watermarks.is_some() {
                    self.reconciler.committed(txn.xid.0, commit_lsn);
                }
                self.batch.last_commit_lsn = commit_lsn;
                self.batch.last_end_lsn = end_lsn;
                self.batch.last_commit_ts = txn.commit_ts;
                self.batch.transactions += 1;
                if self.batch.touched.is_empty() {
                    // Nothing of this transaction needs writing (no configured table, or
                    // every table already holds it): it is durable as it is.
                    self.batch = Batch::default();
                    self.advance(end_lsn);
                } else if self.batch_full() {
                    self.flush().await?;
                }
            }
            PgOutputMessage::Relation(rel) => self.relation(rel).await?,
            PgOutputMessage::Insert { relid, new } => {
                self.change(relid, wal_start, Op::Insert, Some(&new), None)
                    .await?
            }
            PgOutputMessage::Update { relid, old, new } => {
                self.change(relid, wal_start, Op::Update, Some(&new), old.as_ref())
                    .await?
            }
            PgOutputMessage::Delete { relid, old } => {
                let row = old.tuple().clone();
                self.change(relid, wal_start, Op::Delete, Some(&row), None)
                    .await?
            }
            PgOutputMessage::Truncate { relids, .. } => {
                for relid in relids {
                    self.change(relid, wal_start, Op::Truncate, None, None)
                        .await?;
                }
            }
            PgOutputMessage::Origin { .. } | PgOutputMessage::Type { .. } => {}
            PgOutputMessage::Message {
                prefix,
                content,
                transactional: true,
                ..
            } if prefix == crate::source::watermark::PREFIX => {
                self.watermark(wal_start, &content).await?
            }
            PgOutputMessage::Message { prefix, .. } => {
                tracing::debug!(%prefix, "logical decoding message ignored");
            }
        }
        Ok(())
    }

    async fn relation(&mut self, rel: Relation) -> Result<(), ApplyError> {
        let name = TableName::new(rel.namespace.clone(), rel.name.clone());
        let Some(state) = self.tables.get_mut(&name) else {
            tracing::debug!(table = %name, "relation not configured; its changes are ignored");
            self.relations.insert(
                rel.relid,
                RelationMap {
                    table: None,
                    positions: vec![],
                },
            );
            return Ok(());
        };
        // Updates and deletes name rows by the replica identity: once it is other columns
        // than the curated table's key, they cannot be applied exactly. (FULL sends the
        // whole old row, the key included.)
        if matches!(
            rel.replica_identity,
            ReplicaIdentity::Default | ReplicaIdentity::Index
        ) {
            let mut sent: Vec<&str> = rel
                .columns
                .iter()
                .filter(|c| c.is_key)
                .map(|c| c.name.as_str())
                .collect();
            let mut keyed: Vec<&str> = state.key_columns.iter().map(String::as_str).collect();
            sent.sort_unstable();
            keyed.sort_unstable();
            if sent != keyed {
                return Err(SourceUnusable::KeyChanged {
                    table: name.to_string(),
                    quoted: name.quoted(),
                    was: state.key_columns.join(", "),
                    now: sent.join(", "),
                }
                .into());
            }
        }
        let mut next: Vec<ColumnSpec> = state.builder.columns().to_vec();
        let mut added = Vec::new();
        for col in &rel.columns {
            match next.iter_mut().find(|c| c.name == col.name) {
                None => {
                    added.push(col.name.clone());
                    next.push(ColumnSpec {
                        name: col.name.clone(),
                        kind: crate::pg_types::ColumnKind::from_pg(col.type_oid, col.type_modifier),
                        type_oid: col.type_oid,
                        type_modifier: col.type_modifier,
                    });
                }
                Some(lc)
                    if lc.type_oid != col.type_oid || lc.type_modifier != col.type_modifier =>
                {
                    *lc = schema::retype(&name.to_string(), lc, col.type_oid, col.type_modifier)?;
                }
                Some(_) => {}
            }
        }
        if !added.is_empty() {
            tracing::info!(table = %name, columns = ?added, "columns added at the source; the raw and curated schemas grow with the next commit");
            state.evolve(next, &self.normalization).await?;
        } else {
            // Same storage, possibly new source types (e.g. integer → bigint).
            state.builder.retype(next);
        }
        let lake_columns = state.builder.columns();
        let positions = lake_columns
            .iter()
            .map(|lc| rel.columns.iter().position(|c| c.name == lc.name))
            .collect();
        self.relations.insert(
            rel.relid,
            RelationMap {
                table: Some(name),
                positions,
            },
        );
        Ok(())
    }

    async fn change(
        &mut self,
        relid: RelId,
        wal_start: Lsn,
        op: Op,
        row: Option<&Tuple>,
        before: Option<&OldTuple>,
    ) -> Result<(), ApplyError> {
        let txn = self
            .txn
            .as_mut()
            .ok_or_else(|| ApplyError::Stream("change outside a transaction".into()))?;
        let seq = txn.seq;
        txn.seq += 1;
        let map = self.relations.get(&relid).ok_or_else(|| {
            ApplyError::Stream(format!(
                "change for relation {relid} before its Relation message"
            ))
        })?;
        let Some(name) = &map.table else {
            return Ok(());
        };
        let Some(state) = self.tables.get_mut(name) else {
            return Ok(());
        };
        if self.reconciler.watching(name) {
            // A chunked copy's window is open: note the keys this change touches.
            match row {
                None => self.reconciler.saw_truncate(name, txn.xid.0),
                Some(row) => {
                    let index = state.key_columns.first().and_then(|k| {
                        let lake = state.builder.columns().iter().position(|c| &c.name == k)?;
                        map.positions.get(lake).copied().flatten()
                    });
                    let key =
                        |t: &Tuple| index.and_then(|i| crate::source::watermark::key_of(t, i));
                    let mut keys = vec![key(row)];
                    if let Some(before) = before {
                        keys.push(key(before.tuple()));
                    }
                    let unsent = row
                        .0
                        .iter()
                        .any(|v| matches!(v, TupleValue::UnchangedToast));
                    self.reconciler.saw(name, txn.xid.0, &keys, unsent);
                }
            }
        }
        if state.held().is_some_and(|held| txn.commit_lsn <= held) {
            return Ok(()); // already durable in this table
        }
        let meta = ChangeMeta {
            commit_lsn: txn.commit_lsn,
            lsn: wal_start,
            commit_ts: txn.commit_ts,
            xid: txn.xid,
            seq,
        };
        let bytes_before = state.builder.bytes();
        let fallbacks = state.builder.append(op, meta, row, &map.positions, before);
        if fallbacks > 0 {
            tracing::debug!(table = %name, count = fallbacks, "values kept as text in _fallback");
        }
        self.batch.rows += 1;
        // Counted per table and op for the metrics (the name is cloned once per batch).
        match self.batch.changes.get_mut(name) {
            Some(ops) => *ops.entry(op).or_insert(0) += 1,
            None => {
                self.batch
                    .changes
                    .insert(name.clone(), FastMap::from_iter([(op, 1)]));
            }
        }
        self.batch.bytes += state.builder.bytes().saturating_sub(bytes_before);
        self.batch.started.get_or_insert_with(Instant::now);
        if !self.batch.touched.contains(name) {
            self.batch.touched.insert(name.clone());
        }
        if state.builder.rows() >= self.config.spill_rows
            || state.builder.bytes() >= self.config.spill_bytes
        {
            let batch = state.builder.finish().map_err(|source| LakeError::Arrow {
                table: name.to_string(),
                source,
            })?;
            state.write_behind(batch, &mut self.writer).await?;
        }
        Ok(())
    }

    /// A watermark of a chunked copy (`source::watermark`): a low one opens its table's
    /// window; a high one reconciles the chunk and adds its rows to the batch as `r` rows
    /// of this transaction, with the copy's progress for the raw table's next commit.
    async fn watermark(&mut self, wal_start: Lsn, content: &[u8]) -> Result<(), ApplyError> {
        let (Some(watermarks), Some(txn)) = (&self.watermarks, &self.txn) else {
            return Ok(());
        };
        let Some((low, token)) = crate::source::watermark::parse_message(content) else {
            return Ok(());
        };
        if low {
            if let Some(table) = watermarks.low(token) {
                // Windows of chunks their copier gave up (an error) close here.
                self.reconciler.retain(|t| watermarks.is_pending(t));
                self.reconciler.low(table, token, txn.commit_lsn);
            }
            return Ok(());
        }
        let Some(chunk) = watermarks.high(token) else {
            return Ok(()); // an earlier run's, or another daemon's
        };
        let Some(taken) = self.reconciler.high(token, chunk) else {
            return Ok(());
        };
        let watermark::Taken {
            chunk,
            keep,
            dropped,
            start,
        } = taken;
        let Some(txn) = self.txn.as_mut() else {
            return Ok(());
        };
        let Some(state) = self.tables.get_mut(&chunk.table) else {
            let _ = chunk.verdict.send(crate::source::watermark::Verdict::Again(
                "the table is not configured".into(),
            ));
            return Ok(());
        };
        // A column added since the copier read the lake's columns would be NULL in the
        // chunk's rows, which replace whole curated rows.
        let lake: Vec<String> = state
            .builder
            .columns()
            .iter()
            .map(|c| c.name.clone())
            .collect();
        if lake.iter().any(|c| !chunk.lake_columns.contains(c)) {
            let _ = chunk
                .verdict
                .send(crate::source::watermark::Verdict::Reshaped(lake));
            return Ok(());
        }
        // Chunks are taken in key order without gaps: the progress recorded is a prefix.
        // A resync's first chunk begins a new copy of a table whose earlier copy (the first
        // one, or another resync) left its progress.
        let same = state.settle().await?.raw.chunked_resync() == chunk.resync;
        if !same && state.settle().await?.raw.chunked_completing().is_some() {
            // The batch completes the table's previous copy: a new one begins after that
            // commit (one commit records one copy's progress).
            let _ = chunk.verdict.send(crate::source::watermark::Verdict::Again(
                "the table's previous copy completes with the next commit".into(),
            ));
            return Ok(());
        }
        let (after, begun) = match same {
            true => (
                state.settle().await?.raw.chunked_last_key(),
                state.settle().await?.raw.chunked_start(),
            ),
            false => (None, None),
        };
        if chunk.after != after {
            let _ = chunk
                .verdict
                .send(crate::source::watermark::Verdict::Behind {
                    last_key: after,
                    start: begun.map(|(s, _)| s),
                });
            return Ok(());
        }
        // Chunks read ahead of a copy's first verdict do not know where it began.
        let (start, began_ms) =
            begun.unwrap_or_else(|| (start, chrono::Utc::now().timestamp_millis()));
        let positions: Vec<Option<usize>> = state
            .builder
            .columns()
            .iter()
            .map(|lc| chunk.columns.iter().position(|c| *c == lc.name))
            .collect();
        // A resync deletes the rows the lake holds in the chunk's range that the source no
        // longer has: neither in the chunk nor changed by the stream since its snapshot.
        let deletes: Vec<Tuple> = chunk
            .stored
            .iter()
            .filter(|k| chunk.keys.binary_search(k).is_err() && !dropped.contains(k))
            .map(|key| {
                let mut values = vec![TupleValue::Null; chunk.columns.len()];
                values[chunk.key_index] = TupleValue::Text(key.to_string().into());
                Tuple(values)
            })
            .collect();
        let removed = deletes.len();
        let rows = (keep.iter().map(|&i| (Op::Read, &chunk.rows[i])))
            .chain(deletes.iter().map(|t| (Op::Delete, t)));
        let bytes_before = state.builder.bytes();
        for (op, row) in rows {
            let meta = ChangeMeta {
                commit_lsn: txn.commit_lsn,
                lsn: wal_start,
                commit_ts: txn.commit_ts,
                xid: txn.xid,
                seq: txn.seq,
            };
            txn.seq += 1;
            state.builder.append(op, meta, Some(row), &positions, None);
            if state.builder.rows() >= self.config.spill_rows
                || state.builder.bytes() >= self.config.spill_bytes
            {
                let batch = state.builder.finish().map_err(|source| LakeError::Arrow {
                    table: chunk.table.to_string(),
                    source,
                })?;
                state.write_behind(batch, &mut self.writer).await?;
            }
        }
        if removed > 0 {
            tracing::info!(table = %chunk.table, rows = removed, after = ?chunk.after, "resync: deleting rows the source no longer has");
            *self
                .batch
                .changes
                .entry(chunk.table.clone())
                .or_default()
                .entry(Op::Delete)
                .or_insert(0) += removed as u64;
        }
        state.settle().await?.raw.set_chunked(ChunkedProgress {
            start,
            began_ms,
            last_key: chunk.through.or(chunk.keys.last().copied()),
            done: chunk.last.then(|| (txn.commit_lsn, chunk.part.clone())),
            resync: chunk.resync,
        });
        let added = keep.len() + removed;
        self.batch.rows += added;
        self.batch.bytes += state.builder.bytes().saturating_sub(bytes_before);
        self.batch.started.get_or_insert_with(Instant::now);
        *self
            .batch
            .changes
            .entry(chunk.table.clone())
            .or_default()
            .entry(Op::Read)
            .or_insert(0) += keep.len() as u64;
        self.batch.touched.insert(chunk.table.clone());
        if chunk.last {
            tracing::info!(table = %chunk.table, at = %txn.commit_lsn, "chunked copy complete");
        }
        let _ = chunk
            .verdict
            .send(crate::source::watermark::Verdict::Taken {
                start,
                added: keep.len(),
                removed,
            });
        Ok(())
    }

    /// Every table's Delta version now.
    /// Every table's versions, for a checkpoint record, after every chunk's write ended.
    async fn versions(&mut self) -> Result<TableVersions, ApplyError> {
        let mut versions = TableVersions::default();
        for (name, state) in self.tables.iter_mut() {
            let state = state.settle().await?;
            if let Some(v) = state.raw.version() {
                versions.raw.insert(name.to_string(), v);
            }
            if let Some(v) = state.curated.version() {
                versions.curated.insert(name.to_string(), v);
            }
        }
        Ok(versions)
    }

    fn batch_full(&self) -> bool {
        self.batch.rows >= self.config.max_batch_rows
            || self.batch.bytes >= self.config.max_batch_bytes
            || self.batch.started.is_some_and(|s| {
                s.elapsed() >= std::time::Duration::from_millis(self.config.max_batch_age_ms)
            })
    }

    /// Commits the batch: each touched table, then the checkpoint, then the durable LSN.
    async fn flush(&mut self) -> Result<(), ApplyError> {
        if self.txn.is_some() {
            return Err(ApplyError::Stream(
                "flush inside an open transaction".into(),
            ));
        }
        let through = self.batch.last_commit_lsn;
        let end = self.batch.last_end_lsn;
        let started = Instant::now();
        let rows = self.batch.rows;
        let touched = std::mem::take(&mut self.batch.touched);
        // The chunks still being written end first (their errors stop the commit).
        for state in self.tables.values_mut() {
            state.settle().await?;
        }
        // Chunked copies this batch completes: their copiers learn it once it is durable.
        let completing: Vec<(TableName, Lsn, Option<i64>)> = touched
            .iter()
            .filter_map(|name| {
                let (at, resync) = self.tables.get(name)?.here()?.raw.chunked_completing()?;
                Some((name.clone(), at, resync))
            })
            .collect();
        let mut commits = Vec::new();
        for (name, state) in self.tables.iter_mut() {
            if !touched.contains(name) {
                continue;
            }
            commits.push(async move {
                let (builder, state) = state.parts().await?;
                if builder.rows() > 0 {
                    let batch = builder.finish().map_err(|source| LakeError::Arrow {
                        table: name.to_string(),
                        source,
                    })?;
                    state.write_chunk(batch).await?;
                }
                // A table never moves its position back (after a crash between the two
                // commits, one of them may already hold the batch). The two commits are
                // independent (each carries its own position), so they go out together: on
                // an object store each is a round trip.
                let label = name.to_string();
                let chunked = state.raw.chunked_pending();
                let resync = chunked && state.raw.chunked_resync().is_some();
                let raw = async {
                    if state.raw.applied().is_none_or(|a| a < through) {
                        let started = Instant::now();
                        state.raw.commit(through).await?;
                        crate::telemetry::commit_duration(&label, "raw", started.elapsed());
                    }
                    Ok::<_, LakeError>(())
                };
                let curated = async {
                    if state.curated.applied().is_none_or(|a| a < through) {
                        let started = Instant::now();
                        state.curated.commit(through).await?;
                        crate::telemetry::commit_duration(&label, "curated", started.elapsed());
                    }
                    Ok::<_, LakeError>(())
                };
                if resync {
                    // A resync's chunk deletes rows: raw goes first, so a crash between the
                    // two commits leaves the deletes in raw, and catch-up from raw brings
                    // the curated table (which has a position) up at the next start.
                    raw.await?;
                    curated.await?;
                } else if chunked {
                    // The raw commit records a chunked copy's progress: it goes last, so a
                    // chunk counted as copied is in curated too (catch-up does not reach a
                    // curated table with no position yet, and the stream sends the chunk's
                    // watermark again with a token no copier waits for).
                    curated.await?;
                    raw.await?;
                } else {
                    tokio::try_join!(raw, curated)?;
                }
                Ok::<_, ApplyError>(())
            });
        }
        futures::future::try_join_all(commits).await?;
        let record = CheckpointRecord {
            lsn: end,
            commit_ts: Some(self.batch.last_commit_ts),
            versions: self.versions().await?,
        };
        self.checkpoint.record(record).await?;
        for (table, at, resync) in completing {
            if resync.is_some() {
                // In the checkpoint's reset history, as a resync from an exported snapshot.
                self.record_resync(&table, at, serde_json::json!({ "method": "chunks" }))
                    .await?;
            }
            if let Some(watermarks) = &self.watermarks {
                watermarks.completed(&table, at, resync);
            }
        }
        for (table, ops) in &self.batch.changes {
            let table = table.to_string();
            for (op, n) in ops {
                crate::telemetry::change(&table, op.code(), *n);
            }
        }
        crate::telemetry::batch_committed(
            rows,
            self.batch.transactions,
            self.batch.last_commit_ts,
            end.as_i64(),
        );
        self.batch = Batch::default();
        self.advance(end);
        self.maintain().await;
        self.indexing = true;
        tracing::debug!(rows, tables = touched.len(), through = %end, elapsed_ms = started.elapsed().as_millis() as u64, "batch committed");
        Ok(())
    }
}
