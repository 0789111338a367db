//! `DeltaSink`: one Delta table we append to, each commit carrying its source position.
//!
//! Rows are streamed into Parquet files as they arrive (bounded memory, whatever the
//! transaction size); the files become visible only when [`DeltaSink::commit`] writes a
//! Delta commit that adds them *and* records, in the same commit, an application
//! transaction (`txn` action) `wal2delta:<slot>:<table>` whose version is the commit LSN of
//! the last source transaction included. Files written but never committed (a crash
//! mid-batch) are unreferenced and invisible to readers; vacuum removes them.

use std::collections::HashMap;

use deltalake::arrow::datatypes::SchemaRef;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, StructType, Transaction};
use deltalake::parquet::basic::Compression;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

use super::LakeError;
use crate::lsn::Lsn;

/// Target size of one raw data file (and of raw compaction's output).
pub const RAW_FILE_SIZE: u64 = 128 * 1024 * 1024;
/// Target size of one curated data file. Smaller than raw: a merge rewrites every file
/// that holds a changed key, so the file size is the unit of a merge's write cost
/// (docs/performance.md, merge scaling).
pub const CURATED_FILE_SIZE: u64 = 4 * 1024 * 1024;
/// Largest row group buffered in memory before it is written out.
const ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;

/// An open Delta table that receives appends.
pub struct DeltaSink {
    label: String,
    table: DeltaTable,
    writer: RecordBatchWriter,
    app_id: String,
    /// Commit LSN of the last source transaction durably in this table.
    applied: Option<Lsn>,
    /// A grown schema the next commit records (columns added at the source).
    new_schema: Option<SchemaRef>,
    /// Files written under the previous schema, waiting for the next commit.
    pending: Vec<deltalake::kernel::Add>,
}

/// A writer producing files of `schema` for `table` (which may still have an older
/// schema: the commit that adds the files records the new one).
pub fn writer_for(
    table: &DeltaTable,
    schema: &SchemaRef,
) -> Result<RecordBatchWriter, DeltaTableError> {
    keyed_writer_for(table, schema, &[], RAW_FILE_SIZE)
}

/// [`writer_for`] with Parquet bloom filters on the `key` columns (a point lookup by key
/// then skips the row groups that do not hold it, however the rows were ordered: the
/// snapshot interleaves its parallel copies; about 80 KB per key column and row group),
/// and files of `target_size` bytes.
pub fn keyed_writer_for(
    table: &DeltaTable,
    schema: &SchemaRef,
    key: &[String],
    target_size: u64,
) -> Result<RecordBatchWriter, DeltaTableError> {
    Ok(
        RecordBatchWriter::try_new(table.table_url().as_str(), schema.clone(), None, None)?
            .with_target_file_size(target_size)
            .with_writer_properties(keyed_properties(key)),
    )
}

/// The Parquet settings of every file we write, with bloom filters on `key`.
pub fn keyed_properties(key: &[String]) -> WriterProperties {
    let mut properties = writer_properties().into_builder();
    for column in key {
        let path = deltalake::parquet::schema::types::ColumnPath::from(column.as_str());
        properties = properties
            // A key is unique: a dictionary would only cost CPU (see writer_properties).
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_bloom_filter_enabled(path.clone(), true)
            .set_column_bloom_filter_max_ndv(path.clone(), 64 * 1024)
            .set_column_bloom_filter_fpp(path, 0.01);
    }
    properties.build()
}

/// The Arrow schema of an existing table; `None` when the table does not exist yet.
pub async fn existing_schema(url: &Url, label: &str) -> Result<Option<SchemaRef>, LakeError> {
    use deltalake::kernel::engine::arrow_conversion::TryIntoArrow;
    let delta_err = |source| LakeError::Delta {
        table: label.to_string(),
        source,
    };
    if url.scheme() == "file"
        && url
            .to_file_path()
            .map(|p| !p.join("_delta_log").exists())
            .unwrap_or(true)
    {
        return Ok(None);
    }
    let table = DeltaTable::try_from_url(url.clone())
        .await
        .map_err(delta_err)?;
    if table.version().is_none() {
        return Ok(None);
    }
    let kernel = table.snapshot().map_err(delta_err)?.schema();
    let arrow: deltalake::arrow::datatypes::Schema = kernel
        .as_ref()
        .try_into_arrow()
        .map_err(|e| delta_err(DeltaTableError::from(e)))?;
    Ok(Some(std::sync::Arc::new(arrow)))
}

/// The Metadata action that records `schema` as the table's new schema.
pub fn schema_action(table: &DeltaTable, schema: &SchemaRef) -> Result<Action, DeltaTableError> {
    use deltalake::kernel::MetadataExt;
    let kernel: StructType = schema.as_ref().try_into_kernel()?;
    let metadata = table.snapshot()?.metadata().clone().with_schema(&kernel)?;
    Ok(Action::Metadata(metadata))
}

/// Parquet settings for every data file wal2delta writes (raw and curated).
fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(64 * 1024))
        // Row groups are buffered until flushed: cap them by size too, so rows with huge
        // values do not pile up in memory.
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        // Dictionary encoding of a column that turns out to be unique (ids, timestamps,
        // free text) costs a hash-table insert per value until the dictionary page limit,
        // then falls back to plain encoding. The 1 MiB default kept whole row groups of
        // such columns in the dictionary: about 40% of a curated merge's CPU went there
        // (perf, docs/performance.md). At 128 KiB low-cardinality columns (status, type,
        // foreign keys) still get a dictionary and unique ones give up early.
        .set_dictionary_page_size_limit(128 * 1024)
        .set_column_dictionary_enabled("_lsn".into(), false)
        .set_column_dictionary_enabled("_seq".into(), false)
        // Statistics stay truncated (64 bytes): a truncated string minimum is a prefix and
        // parquet increments a truncated maximum, so both remain valid bounds for the
        // curated merge's pruning, and huge values never bloat the Delta log.
        .build()
}

/// Opens a Delta table, or creates it with `schema` when it does not exist yet.
pub async fn open_or_create(
    url: &Url,
    label: &str,
    schema: &SchemaRef,
) -> Result<DeltaTable, LakeError> {
    let delta_err = |source| LakeError::Delta {
        table: label.to_string(),
        source,
    };
    if url.scheme() == "file" {
        // The Delta kernel refuses local paths that do not exist yet.
        let path = url
            .to_file_path()
            .map_err(|_| delta_err(DeltaTableError::InvalidTableLocation(url.to_string())))?;
        std::fs::create_dir_all(&path)
            .map_err(|source| delta_err(DeltaTableError::Io { source }))?;
    }
    let table = DeltaTable::try_from_url(url.clone())
        .await
        .map_err(delta_err)?;
    if table.version().is_some() {
        return Ok(table);
    }
    let kernel: StructType = schema
        .as_ref()
        .try_into_kernel()
        .map_err(|e| delta_err(DeltaTableError::from(e)))?;
    table
        .create()
        .with_columns(kernel.fields().cloned())
        .with_table_name(label)
        .with_save_mode(SaveMode::Ignore)
        .await
        .map_err(delta_err)
}

impl DeltaSink {
    /// Opens (or creates) the table and reads back the source position it holds.
    pub async fn open(
        url: &Url,
        label: &str,
        schema: &SchemaRef,
        app_id: String,
    ) -> Result<DeltaSink, LakeError> {
        let table = open_or_create(url, label, schema).await?;
        let delta_err = |source| LakeError::Delta {
            table: label.to_string(),
            source,
        };
        let existing: Vec<String> = {
            let snapshot = table.snapshot().map_err(delta_err)?;
            snapshot
                .schema()
                .fields()
                .map(|f| f.name().clone())
                .collect()
        };
        let incoming: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        // The lake may lack columns the source added (they are added with the next
        // commit); it must not have columns the caller does not know.
        if existing.iter().any(|e| !incoming.contains(e)) {
            return Err(LakeError::SchemaChanged {
                table: label.to_string(),
                existing,
                incoming,
            });
        }
        let new_schema = (existing != incoming).then(|| schema.clone());
        let applied = applied_position(&table, &app_id).await.map_err(delta_err)?;
        let writer = writer_for(&table, schema).map_err(delta_err)?;
        Ok(DeltaSink {
            label: label.to_string(),
            table,
            writer,
            app_id,
            applied,
            new_schema,
            pending: Vec::new(),
        })
    }

    /// Switches to a grown schema: files written so far keep the old one, later rows use
    /// the new one, and the next commit records it.
    pub async fn evolve(&mut self, schema: SchemaRef) -> Result<(), LakeError> {
        let delta_err = |source| LakeError::Delta {
            table: self.label.clone(),
            source,
        };
        let written = self.writer.flush().await.map_err(delta_err)?;
        self.pending.extend(written);
        self.writer = writer_for(&self.table, &schema).map_err(delta_err)?;
        self.new_schema = Some(schema);
        Ok(())
    }

    /// Commit LSN of the last source transaction this table holds, if any.
    pub fn applied(&self) -> Option<Lsn> {
        self.applied
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn table(&self) -> &DeltaTable {
        &self.table
    }

    /// The table's current Delta version.
    pub fn version(&self) -> Option<u64> {
        self.table.version()
    }

    /// Compacts small files when due and vacuums when `vacuum` is given; call only with
    /// nothing uncommitted. Returns (files, compacted, vacuumed).
    pub async fn maintain(
        &mut self,
        policy: &super::maintenance::Policy,
        vacuum: Option<std::time::Duration>,
    ) -> Result<(usize, Option<super::maintenance::Compacted>, usize), LakeError> {
        let (compacted, vacuumed) = super::maintenance::run(
            &mut self.table,
            &self.label,
            policy,
            RAW_FILE_SIZE,
            keyed_properties(&[]),
            vacuum,
        )
        .await?;
        let files =
            super::maintenance::file_counts(&self.table, RAW_FILE_SIZE).map_or(0, |(f, _)| f);
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

    /// Commits everything written since the last commit, together with the source
    /// position `through` (the commit LSN of the last transaction included).
    /// Returns the new Delta version.
    pub async fn commit(
        &mut self,
        through: Lsn,
        metadata: HashMap<String, serde_json::Value>,
    ) -> Result<u64, LakeError> {
        self.commit_with(through, metadata, vec![]).await
    }

    /// [`DeltaSink::commit`], recording further application transactions in the same
    /// commit (the snapshot marker).
    pub async fn commit_with(
        &mut self,
        through: Lsn,
        metadata: HashMap<String, serde_json::Value>,
        extra: Vec<Transaction>,
    ) -> Result<u64, LakeError> {
        let delta_err = |source| LakeError::Delta {
            table: self.label.clone(),
            source,
        };
        let mut adds: Vec<Action> = Vec::new();
        if let Some(schema) = &self.new_schema {
            adds.push(schema_action(&self.table, schema).map_err(delta_err)?);
        }
        let written = self.writer.flush().await.map_err(delta_err)?;
        adds.extend(self.pending.drain(..).chain(written).map(Action::Add));
        let mut txns = vec![Transaction::new_with_last_update(
            &self.app_id,
            through.as_i64(),
            Some(chrono::Utc::now().timestamp_millis()),
        )];
        txns.extend(extra);
        let properties = CommitProperties::default()
            .with_application_transactions(txns)
            .with_metadata(metadata);
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        let snapshot = self.table.snapshot().map_err(delta_err)?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(adds)
            .build(Some(snapshot), self.table.log_store(), operation)
            .await
            .map_err(delta_err)?;
        let version = finalized.version();
        self.table.state = Some(finalized.snapshot());
        self.applied = Some(through);
        self.new_schema = None;
        Ok(version)
    }
}

/// Reads the `txn` version for `app_id` from a table's log.
pub async fn applied_position(
    table: &DeltaTable,
    app_id: &str,
) -> Result<Option<Lsn>, DeltaTableError> {
    let snapshot = table.snapshot()?;
    let version = snapshot
        .transaction_version(table.log_store().as_ref(), app_id)
        .await?;
    Ok(version.map(Lsn::from_i64))
}
