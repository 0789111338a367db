//! Raw tables: the append-only change log of one source table (the bronze layer).
//!
//! Rows are streamed into Parquet files as they arrive (bounded memory, whatever the
//! transaction size); the files become visible only when [`RawTable::commit`] writes a
//! Delta commit that adds them *and* records, in the same commit, the application
//! transaction [`AppId::raw`] whose version is the commit LSN of the last source
//! transaction included. Files written but never committed (a crash mid-batch) are
//! unreferenced and invisible to readers; vacuum removes them. The row layout is in
//! [`layout`].

pub mod layout;

use deltalake::DeltaTable;
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use object_store::ObjectStoreExt;

use super::commit::{AppId, Commit, InfoKey, applied, txn_version};
use super::maintenance::{self, Compacted, Policy};
use super::table::{
    RAW_FILE_SIZE, file_location, keyed_properties, keyed_writer_for, open_for_schema,
    schema_action, writer_for,
};
use super::{Lake, LakeError};
use crate::change::ColumnSpec;
use crate::lsn::Lsn;
use crate::table_name::TableName;
use layout::raw_schema;

/// An open raw table that receives appends.
pub struct RawTable {
    label: String,
    table: DeltaTable,
    writer: RecordBatchWriter,
    slot: String,
    name: TableName,
    app_id: AppId,
    /// Commit LSN of the last source transaction durably in this table.
    applied: Option<Lsn>,
    /// Where the table's completed snapshot was taken, if it has one.
    snapshot_at: Option<Lsn>,
    snapshot_id: AppId,
    /// A grown schema the next commit records (columns added at the source).
    new_schema: Option<SchemaRef>,
    /// Files written under the previous schema, waiting for the next commit.
    pending: Vec<deltalake::kernel::Add>,
    /// The chunked copy's progress as durable in the table, and as the next commit
    /// records it.
    chunked: Option<ChunkedProgress>,
    chunked_next: Option<ChunkedProgress>,
}

/// How far a table's chunked (watermark) copy is.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkedProgress {
    /// Where the copy began (its first low watermark).
    pub start: Lsn,
    /// When it began, in milliseconds since the Unix epoch.
    pub began_ms: i64,
    /// The last key copied (`None`: no row yet).
    pub last_key: Option<i64>,
    /// Set on the last chunk: the copy is complete at this position, and holds this
    /// part of the table (a publication's row filter and column list, by fingerprint).
    pub done: Option<(Lsn, Option<String>)>,
    /// The resync request the copy is for (its time, ms since the Unix epoch); `None`
    /// for the table's first copy.
    pub resync: Option<i64>,
}

/// The chunked copy's progress `table` (the raw table of `name`) records.
pub async fn read_progress(
    table: &DeltaTable,
    label: &str,
    slot: &str,
    name: &TableName,
) -> Result<Option<ChunkedProgress>, LakeError> {
    let Some(start) = applied(table, label, &AppId::chunked_start(slot, name)).await? else {
        return Ok(None);
    };
    Ok(Some(ChunkedProgress {
        start,
        began_ms: txn_version(table, label, &AppId::chunked_began(slot, name))
            .await?
            .unwrap_or(0),
        last_key: txn_version(table, label, &AppId::chunked_key(slot, name)).await?,
        done: None,
        resync: txn_version(table, label, &AppId::chunked_resync(slot, name)).await?,
    }))
}

/// A copy of a whole table (`resync`): op `r` rows written into uncommitted files while
/// the daemon keeps appending; [`RawTable::add_copy`] commits them.
pub struct RawCopy {
    label: String,
    writer: RecordBatchWriter,
}

impl RawCopy {
    /// A copy into `name`'s raw table (which must exist) with these source columns.
    pub async fn open(
        lake: &Lake,
        name: &TableName,
        columns: &[ColumnSpec],
    ) -> Result<RawCopy, LakeError> {
        let label = label(name);
        let delta_err = |source| LakeError::Delta {
            table: label.clone(),
            source,
        };
        let table = DeltaTable::try_from_url(lake.raw_table_url(name))
            .await
            .map_err(delta_err)?;
        let writer = writer_for(&table, &raw_schema(columns)).map_err(delta_err)?;
        Ok(RawCopy { label, writer })
    }

    pub async fn write(&mut self, batch: RecordBatch) -> Result<(), LakeError> {
        self.writer
            .write(batch)
            .await
            .map_err(|source| LakeError::Delta {
                table: self.label.clone(),
                source,
            })
    }

    /// Closes the copy's files; their Add actions are for [`RawTable::add_copy`].
    pub async fn finish(mut self) -> Result<Vec<deltalake::kernel::Add>, LakeError> {
        self.writer
            .flush()
            .await
            .map_err(|source| LakeError::Delta {
                table: self.label.clone(),
                source,
            })
    }
}

/// The label of `name`'s raw table in logs and errors.
fn label(name: &TableName) -> String {
    format!("raw.{name}")
}

impl RawTable {
    /// The schema the raw table of `name` has now; `None` when it does not exist yet.
    pub async fn stored_schema(
        lake: &Lake,
        name: &TableName,
    ) -> Result<Option<SchemaRef>, LakeError> {
        super::table::existing_schema(&lake.raw_table_url(name), &label(name)).await
    }

    /// The chunked copy's progress durable in the raw table of `name` now (read by a
    /// copier while the apply stage writes the table).
    pub async fn durable_progress(
        lake: &Lake,
        slot: &str,
        name: &TableName,
    ) -> Result<Option<ChunkedProgress>, LakeError> {
        let label = label(name);
        match super::table::open_existing(&lake.raw_table_url(name), &label).await? {
            Some(table) => read_progress(&table, &label, slot, name).await,
            None => Ok(None),
        }
    }

    /// Opens (or creates) the raw table of `name` with these source columns and reads
    /// back the source position and snapshot point it holds.
    pub async fn open(
        lake: &Lake,
        slot: &str,
        name: &TableName,
        columns: &[ColumnSpec],
    ) -> Result<RawTable, LakeError> {
        let label = label(name);
        let schema = raw_schema(columns);
        let (table, grew) =
            open_for_schema(&lake.raw_table_url(name), &label, &schema, &[]).await?;
        let delta_err = |source| LakeError::Delta {
            table: label.clone(),
            source,
        };
        let new_schema = grew.then(|| schema.clone());
        let app_id = AppId::raw(slot, name);
        let snapshot_id = AppId::snapshot(slot, name);
        let applied_at = applied(&table, &label, &app_id).await?;
        let snapshot_at = applied(&table, &label, &snapshot_id).await?;
        let chunked = read_progress(&table, &label, slot, name).await?;
        let writer = writer_for(&table, &schema).map_err(delta_err)?;
        Ok(RawTable {
            label,
            table,
            writer,
            slot: slot.to_string(),
            name: name.clone(),
            app_id,
            applied: applied_at,
            snapshot_at,
            snapshot_id,
            new_schema,
            pending: Vec::new(),
            chunked,
            chunked_next: None,
        })
    }

    fn delta_err(&self) -> impl Fn(deltalake::DeltaTableError) -> LakeError + '_ {
        |source| LakeError::Delta {
            table: self.label.clone(),
            source,
        }
    }

    /// Switches to grown source columns: files written so far keep the old schema,
    /// later rows use the new one, and the next commit records it.
    pub async fn evolve(&mut self, columns: &[ColumnSpec]) -> Result<(), LakeError> {
        let schema = raw_schema(columns);
        let written = self.writer.flush().await.map_err(self.delta_err())?;
        self.pending.extend(written);
        self.writer = writer_for(&self.table, &schema).map_err(self.delta_err())?;
        self.new_schema = Some(schema);
        Ok(())
    }

    /// Commit LSN of the last source transaction this table holds, if any.
    pub fn applied(&self) -> Option<Lsn> {
        self.applied
    }

    /// Marks a snapshot taken at `point` as a copy of only `part` of the source table
    /// (a publication's row filter or column list, by its fingerprint).
    fn mark_part(&self, commit: Commit, point: Lsn, part: Option<&str>) -> Commit {
        match part {
            None => commit,
            Some(part) => commit
                .position(&AppId::published(&self.slot, &self.name, "partial"), point)
                .position(&AppId::published(&self.slot, &self.name, part), point),
        }
    }

    /// Whether the table's snapshot copied `part` of the source table (`None`: all of
    /// it), as the publication publishes it now; `true` without a snapshot.
    pub async fn copied_part(&self, part: Option<&str>) -> Result<bool, LakeError> {
        let Some(at) = self.snapshot_at else {
            return Ok(true);
        };
        let marked = |part: &str| AppId::published(&self.slot, &self.name, part);
        let partial = applied(&self.table, &self.label, &marked("partial")).await? == Some(at);
        Ok(match part {
            None => !partial,
            Some(part) => {
                partial && applied(&self.table, &self.label, &marked(part)).await? == Some(at)
            }
        })
    }

    /// Where the table's completed snapshot was taken, if it has one.
    pub fn snapshot_at(&self) -> Option<Lsn> {
        self.snapshot_at
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The table's current Delta version.
    pub fn version(&self) -> Option<u64> {
        self.table.version()
    }

    /// Deletes log entries older than `retention`, keeping every version from
    /// `keep_from` on (the oldest a checkpoint record still points to) loadable.
    pub async fn clean_log(
        &self,
        keep_from: Option<u64>,
        retention: std::time::Duration,
    ) -> Result<usize, LakeError> {
        maintenance::clean_log(&self.table, &self.label, keep_from, retention).await
    }

    /// Compacts small files when due and vacuums when `vacuum` is given; call only with
    /// nothing uncommitted. Returns (files, compacted, vacuumed).
    pub async fn maintain(
        &mut self,
        policy: &Policy,
        vacuum: Option<std::time::Duration>,
    ) -> Result<(usize, Option<Compacted>, usize), LakeError> {
        let (compacted, vacuumed) = maintenance::run(
            &mut self.table,
            &self.label,
            policy,
            RAW_FILE_SIZE,
            keyed_properties(&[]),
            vacuum,
        )
        .await?;
        let files = maintenance::file_counts(&self.table, RAW_FILE_SIZE).map_or(0, |(f, _)| f);
        Ok((files, compacted, vacuumed))
    }

    /// Streams rows into the table's uncommitted data files.
    pub async fn write(&mut self, batch: RecordBatch) -> Result<(), LakeError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.writer
            .write(batch)
            .await
            .map_err(|source| LakeError::Delta {
                table: self.label.clone(),
                source,
            })
    }

    /// Bytes written into the files not yet flushed ([`RawTable::flush_files`]).
    pub fn buffered(&self) -> usize {
        self.writer.buffer_len()
    }

    /// Finishes the files written so far (they are committed with the next commit) and
    /// returns their Add actions.
    pub async fn flush_files(&mut self) -> Result<Vec<deltalake::kernel::Add>, LakeError> {
        let written = self.writer.flush().await.map_err(self.delta_err())?;
        self.pending.extend(written.iter().cloned());
        Ok(written)
    }

    /// The contents of a data file written by [`RawTable::flush_files`].
    pub async fn read_file(&self, add: &deltalake::kernel::Add) -> Result<bytes::Bytes, LakeError> {
        let location = file_location(&add.path);
        let storage_err = |source| LakeError::Storage {
            what: format!("reading back {} of {}", add.path, self.label),
            source,
        };
        self.table
            .object_store()
            .get(&location)
            .await
            .map_err(storage_err)?
            .bytes()
            .await
            .map_err(storage_err)
    }

    /// Gives the files written from now on Parquet bloom filters on the `key` columns
    /// (none when empty), as the curated table's files have them: a snapshot's curated
    /// files are spliced from its raw files (`curated::splice`). Flushes what was
    /// written before.
    pub async fn set_bloom_key(&mut self, key: &[String]) -> Result<(), LakeError> {
        let written = self.writer.flush().await.map_err(self.delta_err())?;
        self.pending.extend(written);
        let schema = self.writer.arrow_schema();
        self.writer =
            keyed_writer_for(&self.table, &schema, key, RAW_FILE_SIZE).map_err(self.delta_err())?;
        Ok(())
    }

    /// The Arrow schema of the files written now.
    pub fn schema(&self) -> deltalake::arrow::datatypes::SchemaRef {
        self.writer.arrow_schema()
    }

    /// Commits everything written since the last commit, together with the source
    /// position `through` (the commit LSN of the last transaction included).
    /// Returns the new Delta version.
    pub async fn commit(&mut self, through: Lsn) -> Result<u64, LakeError> {
        let mut commit = Commit::append().info_lsn(InfoKey::CommitLsn, through);
        let progress = self.chunked_next.take();
        if let Some(p) = &progress {
            commit = commit
                .position(&AppId::chunked_start(&self.slot, &self.name), p.start)
                .txn(&AppId::chunked_began(&self.slot, &self.name), p.began_ms);
            if let Some(key) = p.last_key {
                commit = commit.txn(&AppId::chunked_key(&self.slot, &self.name), key);
            }
            if let Some(resync) = p.resync {
                commit = commit.txn(&AppId::chunked_resync(&self.slot, &self.name), resync);
            }
            if let Some((point, part)) = &p.done {
                commit = commit
                    .info_lsn(InfoKey::SnapshotLsn, *point)
                    .position(&self.snapshot_id, *point);
                commit = self.mark_part(commit, *point, part.as_deref());
            }
        }
        let version = self.commit_data(commit, through).await?;
        if let Some(p) = progress {
            if let Some((point, _)) = p.done {
                self.snapshot_at = Some(point);
            }
            self.chunked = Some(p);
        }
        Ok(version)
    }

    /// The chunked copy's progress durable in the table, if one began.
    pub fn chunked(&self) -> Option<&ChunkedProgress> {
        self.chunked.as_ref()
    }

    /// Whether the next commit records a chunked copy's progress.
    pub fn chunked_pending(&self) -> bool {
        self.chunked_next.is_some()
    }

    /// The last key of the chunked copy's latest chunk, committed or not.
    pub fn chunked_last_key(&self) -> Option<i64> {
        (self.chunked_next.as_ref())
            .or(self.chunked.as_ref())
            .and_then(|p| p.last_key)
    }

    /// Where and when (ms since the Unix epoch) the chunked copy under way began,
    /// committed or not.
    pub fn chunked_start(&self) -> Option<(Lsn, i64)> {
        (self.chunked_next.as_ref())
            .or(self.chunked.as_ref())
            .map(|p| (p.start, p.began_ms))
    }

    /// The resync the chunked copy under way is for, committed or not (`None`: the
    /// table's first copy, or no copy).
    pub fn chunked_resync(&self) -> Option<i64> {
        (self.chunked_next.as_ref())
            .or(self.chunked.as_ref())
            .and_then(|p| p.resync)
    }

    /// The position and resync of a copy the next commit completes.
    pub fn chunked_completing(&self) -> Option<(Lsn, Option<i64>)> {
        let next = self.chunked_next.as_ref()?;
        next.done.as_ref().map(|(at, _)| (*at, next.resync))
    }

    /// Records `progress` with the next commit.
    pub fn set_chunked(&mut self, mut progress: ChunkedProgress) {
        if progress.last_key.is_none() && progress.resync == self.chunked_resync() {
            progress.last_key = self.chunked_last_key();
        }
        self.chunked_next = Some(progress);
    }

    /// Commits a completely copied snapshot taken at `point` that holds the source
    /// through `held`, with the snapshot marker in the same commit.
    pub async fn commit_snapshot(
        &mut self,
        held: Lsn,
        point: Lsn,
        part: Option<&str>,
    ) -> Result<u64, LakeError> {
        let commit = Commit::append()
            .info_lsn(InfoKey::SnapshotLsn, point)
            .position(&self.snapshot_id, point);
        let commit = self.mark_part(commit, point, part);
        let version = self.commit_data(commit, held).await?;
        self.snapshot_at = Some(point);
        Ok(version)
    }

    /// Adds a copy's files ([`RawCopy`], op `r` rows taken at `point`) with the snapshot
    /// marker, in one commit. The position stays where it is: the change log keeps every
    /// change, also those the stream delivers later from before the copy's point.
    pub async fn add_copy(
        &mut self,
        copy: Vec<deltalake::kernel::Add>,
        held: Lsn,
        point: Lsn,
        part: Option<&str>,
    ) -> Result<u64, LakeError> {
        let through = self.applied.unwrap_or(held);
        let commit = Commit::append()
            .info_lsn(InfoKey::SnapshotLsn, point)
            .position(&self.snapshot_id, point);
        let version = self
            .mark_part(commit, point, part)
            .actions(copy.into_iter().map(deltalake::kernel::Action::Add))
            .position(&self.app_id, through)
            .write(&mut self.table, &self.label)
            .await?;
        self.applied = Some(through);
        self.snapshot_at = Some(point);
        Ok(version)
    }

    /// The committed change rows (no snapshot rows) of transactions committed after
    /// `after` and up to `through`, in commit order, shaped as `schema` (the table's
    /// current raw layout). Used to bring the curated table up to the raw one.
    pub async fn changes(
        &self,
        after: Option<Lsn>,
        through: Lsn,
        schema: &SchemaRef,
    ) -> Result<Vec<RecordBatch>, LakeError> {
        use deltalake::datafusion::prelude::{SessionContext, col, lit};
        let df_err = |e: deltalake::datafusion::error::DataFusionError| LakeError::Delta {
            table: self.label.clone(),
            source: deltalake::DeltaTableError::Generic(e.to_string()),
        };
        let ctx = SessionContext::new();
        self.table
            .update_datafusion_session(&ctx.state())
            .map_err(self.delta_err())?;
        let provider = self.table.table_provider().await.map_err(df_err)?;
        // Snapshot and resync copies (`r` rows of no transaction) are not changes; a
        // chunked copy's rows are, of their high watermark's transaction.
        let mut filter = col("_commit_lsn").lt_eq(lit(through.as_i64())).and(
            col("_op")
                .not_eq(lit(crate::change::Op::Read.code()))
                .or(col("_xid").not_eq(lit(0i64))),
        );
        if let Some(after) = after {
            filter = filter.and(col("_commit_lsn").gt(lit(after.as_i64())));
        }
        let batches = ctx
            .read_table(provider)
            .and_then(|f| f.filter(filter))
            .and_then(|f| {
                f.sort(vec![
                    col("_commit_lsn").sort(true, false),
                    col("_seq").sort(true, false),
                ])
            })
            .map_err(df_err)?
            .collect()
            .await
            .map_err(df_err)?;
        batches
            .iter()
            .map(|b| layout::conform(b, schema))
            .collect::<Result<_, _>>()
            .map_err(|source| LakeError::Arrow {
                table: self.label.clone(),
                source,
            })
    }

    /// Adds the written files (and a grown schema) to `commit` with the position
    /// `through`, and writes it.
    async fn commit_data(&mut self, commit: Commit, through: Lsn) -> Result<u64, LakeError> {
        let mut actions = Vec::new();
        if let Some(schema) = &self.new_schema {
            actions.push(schema_action(&self.table, schema).map_err(self.delta_err())?);
        }
        let written = self.writer.flush().await.map_err(self.delta_err())?;
        actions.extend(
            self.pending
                .drain(..)
                .chain(written)
                .map(deltalake::kernel::Action::Add),
        );
        let version = commit
            .actions(actions)
            .position(&self.app_id, through)
            .write(&mut self.table, &self.label)
            .await?;
        self.applied = Some(through);
        self.new_schema = None;
        Ok(version)
    }
}
