//! Curated tables: one Delta table per source table holding its current rows (the silver
//! layer), kept exact by merging each committed batch of changes.
//!
//! How a merge works is in [`merge`]; which files a change may touch, in [`files`].
//! Normalization (legacy text columns → typed) happens before, in the apply stage: the
//! table stores each source column as the type it is handed ([`CuratedTable::open`]'s
//! `stored_types`).
//!
//! The curated table has the source columns (normalized types where a rule applies), then
//! `_commit_lsn` and `_commit_ts` (the change that last wrote the row) and `_fallback`
//! (exact text of values with no typed form, as in raw).

mod files;
mod key_index;
mod merge;
pub mod reduce;
pub mod splice;
mod stored_keys;

use std::collections::HashSet;
use std::sync::Arc;

use deltalake::arrow::array::{Array, ArrayRef, RecordBatch, new_null_array};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::row::{RowConverter, SortField};
use deltalake::kernel::{Action, Add, Remove};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use object_store::ObjectStoreExt;

use self::files::{Committed, DataFile, FileState};
use self::key_index::KeyIndex;
pub use self::key_index::{
    FileKeys, Published as PublishedKeys, published as published_keys, published_or_new as keys_of,
};
pub use self::stored_keys::StoredKeys;
use super::commit::{AppId, Commit, InfoKey, applied};
use super::deletion_vector;
use super::maintenance::{self, Compacted, Policy};
use super::table::{
    CURATED_FILE_SIZE, existing_schema, file_location, keyed_properties, keyed_writer_for,
    open_for_schema, schema_action,
};
use super::{Lake, LakeError};
use crate::change::ColumnSpec;
use crate::lsn::Lsn;
use crate::table_name::TableName;

/// What one step of indexing a curated table's keys while idle did
/// ([`CuratedTable::index_one_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indexing {
    /// A file's keys are being indexed; more files may lack an entry.
    Started,
    /// A file was read but its entry did not fit the key index's budget now: try again
    /// after the next commit.
    Refused,
    /// Every file has an entry or cannot get one (or the table has no integer key).
    Done,
}

/// `[curated]`: how curated tables are written.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CuratedConfig {
    /// Mark deleted and replaced rows in deletion vectors instead of rewriting their files
    /// (default); `false` for lakes read by tools without deletion-vector support.
    #[serde(default = "default_true")]
    pub deletion_vectors: bool,
    /// Memory, in MiB, all curated tables together may hold in their key indexes
    /// (`key_index`); 0 turns the index off.
    #[serde(default = "default_key_index_mb")]
    pub key_index_mb: usize,
}

fn default_key_index_mb() -> usize {
    64
}

fn default_true() -> bool {
    true
}

impl Default for CuratedConfig {
    fn default() -> Self {
        CuratedConfig {
            deletion_vectors: true,
            key_index_mb: default_key_index_mb(),
        }
    }
}

/// A file whose deletion vector marks at least this share of its rows is rewritten
/// without them at the next maintenance check, so reads do not slow down over time.
pub const PURGE_FRACTION: f64 = 0.3;
/// Files purged at most per maintenance check (4 MiB each).
pub const PURGE_FILES: usize = 16;

/// Columns after the source columns.
pub const CURATED_METADATA: [&str; 3] = ["_commit_lsn", "_commit_ts", "_fallback"];
/// The type OID of a column the source dropped (see `apply::schema::reconcile`).
const DROPPED: u32 = 0;

/// An open curated table.
pub struct CuratedTable {
    label: String,
    table: DeltaTable,
    app_id: AppId,
    applied: Option<Lsn>,
    schema: SchemaRef,
    columns: Vec<ColumnSpec>,
    /// Indices of the key columns among the source columns.
    key: Vec<usize>,
    converter: RowConverter,
    files: Vec<DataFile>,
    removes: Vec<Remove>,
    /// Rows appended by a snapshot, flushed at commit.
    bulk: Option<RecordBatchWriter>,
    /// The schema has columns the table's log does not record yet.
    schema_grew: bool,
    /// Deleted and replaced rows are marked in deletion vectors instead of rewriting
    /// their files (`[curated] deletion_vectors`, `lake::deletion_vector`).
    deletion_vectors: bool,
    /// Where the rows of integer keys are, per data file (`key_index`).
    key_index: KeyIndex,
}

/// The curated schema for `columns`, each stored as `stored_types[i]` when given (a
/// normalization rule's target), a dropped column keeping the type it has.
fn curated_schema(
    columns: &[ColumnSpec],
    stored_types: &[Option<DataType>],
    existing: Option<&Schema>,
) -> SchemaRef {
    let mut fields: Vec<Field> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let kept = existing
                .and_then(|e| e.field_with_name(&c.name).ok())
                .map(|f| f.data_type().clone());
            let ty = match (stored_types.get(i).cloned().flatten(), kept) {
                // A column the source dropped keeps the type it has.
                (_, Some(kept)) if c.type_oid == DROPPED => kept,
                (Some(stored), _) => stored,
                (None, _) => c.kind.arrow_type(),
            };
            Field::new(&c.name, ty, true)
        })
        .collect();
    fields.extend([
        Field::new("_commit_lsn", DataType::Int64, false),
        Field::new(
            "_commit_ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("_fallback", DataType::Utf8, true),
    ]);
    Arc::new(Schema::new(fields))
}

/// Raw change rows → curated rows of `schema`: `values` are the source `columns` as the
/// table stores them (normalized by the apply stage), then the metadata from `raw`.
fn project(
    schema: &SchemaRef,
    columns: &[ColumnSpec],
    raw: &RecordBatch,
    values: Vec<ArrayRef>,
) -> Result<RecordBatch, ArrowError> {
    if values.len() != columns.len() {
        return Err(ArrowError::SchemaError(format!(
            "{} columns handed to a curated table of {}",
            values.len(),
            columns.len()
        )));
    }
    let mut arrays = Vec::with_capacity(schema.fields().len());
    for (i, (col, array)) in columns.iter().zip(values).enumerate() {
        let field = schema.field(i);
        if array.data_type() == field.data_type() {
            arrays.push(array);
        } else if col.type_oid == DROPPED {
            // Never filled any more; it keeps its curated type.
            arrays.push(new_null_array(field.data_type(), raw.num_rows()));
        } else {
            return Err(ArrowError::SchemaError(format!(
                "column {} is {} but the curated table stores {}",
                col.name,
                array.data_type(),
                field.data_type()
            )));
        }
    }
    for name in CURATED_METADATA {
        let array = raw
            .column_by_name(name)
            .ok_or_else(|| ArrowError::SchemaError(format!("raw batch lacks {name}")))?;
        arrays.push(array.clone());
    }
    RecordBatch::try_new(schema.clone(), arrays)
}

/// A copy of a whole table (`resync`) written into uncommitted files next to the live
/// table, while the daemon keeps merging into it; [`CuratedTable::replace_with`] swaps it
/// in with one commit.
pub struct CuratedCopy {
    label: String,
    schema: SchemaRef,
    columns: Vec<ColumnSpec>,
    writer: RecordBatchWriter,
}

impl CuratedCopy {
    /// A copy of `name`'s curated table with these columns, key and stored types (as for
    /// [`CuratedTable::open`]); the table must exist.
    pub async fn open(
        lake: &Lake,
        name: &TableName,
        columns: &[ColumnSpec],
        key_columns: &[String],
        stored_types: &[Option<DataType>],
    ) -> Result<CuratedCopy, LakeError> {
        let label = format!("curated.{name}");
        let url = lake.curated_table_url(name);
        let existing = existing_schema(&url, &label).await?;
        let schema = curated_schema(columns, stored_types, existing.as_deref());
        let delta_err = |source| LakeError::Delta {
            table: label.clone(),
            source,
        };
        let table = DeltaTable::try_from_url(url).await.map_err(delta_err)?;
        let bloom: Vec<String> = if key_columns.len() <= 4 {
            key_columns.to_vec()
        } else {
            Vec::new()
        };
        let writer =
            keyed_writer_for(&table, &schema, &bloom, CURATED_FILE_SIZE).map_err(delta_err)?;
        Ok(CuratedCopy {
            label,
            schema,
            columns: columns.to_vec(),
            writer,
        })
    }

    /// Writes copied rows (raw-shaped, op `r`, with their stored `values`).
    pub async fn write(
        &mut self,
        raw: &RecordBatch,
        values: Vec<ArrayRef>,
    ) -> Result<(), LakeError> {
        let rows = project(&self.schema, &self.columns, raw, values).map_err(|source| {
            LakeError::Arrow {
                table: self.label.clone(),
                source,
            }
        })?;
        self.writer
            .write(rows)
            .await
            .map_err(|source| LakeError::Delta {
                table: self.label.clone(),
                source,
            })
    }

    /// Closes the copy's files; their Add actions are for [`CuratedTable::replace_with`].
    pub async fn finish(mut self) -> Result<Vec<Add>, LakeError> {
        self.writer
            .flush()
            .await
            .map_err(|source| LakeError::Delta {
                table: self.label.clone(),
                source,
            })
    }
}

impl CuratedTable {
    /// Opens (or creates) the curated table of `name` and reads back its position and
    /// files. `stored_types[i]`, when given, is the type source column `i` is stored as
    /// (the target of its normalization rule).
    pub async fn open(
        lake: &Lake,
        slot: &str,
        name: &TableName,
        columns: &[ColumnSpec],
        key_columns: &[String],
        stored_types: &[Option<DataType>],
        config: &CuratedConfig,
    ) -> Result<CuratedTable, LakeError> {
        let deletion_vectors = config.deletion_vectors;
        let label = format!("curated.{name}");
        let key: Vec<usize> = key_columns
            .iter()
            .filter_map(|k| columns.iter().position(|c| &c.name == k))
            .collect();
        if key.is_empty() || key.len() != key_columns.len() {
            return Err(LakeError::NoKey {
                table: name.to_string(),
            });
        }
        let existing = existing_schema(&lake.curated_table_url(name), &label).await?;
        let schema = curated_schema(columns, stored_types, existing.as_deref());
        if let Some(existing) = &existing {
            for old in existing.fields() {
                if let Ok(new) = schema.field_with_name(old.name())
                    && !new.data_type().equals_datatype(old.data_type())
                {
                    return Err(LakeError::TypeMismatch {
                        table: label,
                        column: old.name().clone(),
                        existing: old.data_type().to_string(),
                        incoming: new.data_type().to_string(),
                    });
                }
            }
        }
        // A new table starts with the feature when it is on; an existing one is upgraded.
        let properties: &[(&str, &str)] = if deletion_vectors {
            &[(deletion_vector::ENABLE, "true")]
        } else {
            &[]
        };
        let (mut table, schema_grew) =
            open_for_schema(&lake.curated_table_url(name), &label, &schema, properties).await?;
        if deletion_vectors && !deletion_vector::enabled(&table) {
            deletion_vector::enable(&mut table)
                .await
                .map_err(|source| LakeError::Delta {
                    table: label.clone(),
                    source,
                })?;
            tracing::info!(table = %label, "deletion vectors turned on: the table's protocol is now reader 3 / writer 7 with the deletionVectors feature; readers must support it (docs/lake.md › Deletion vectors)");
        }
        let app_id = AppId::curated(slot, name);
        let applied = applied(&table, &label, &app_id).await?;
        let converter = RowConverter::new(
            key.iter()
                .map(|&i| SortField::new(schema.field(i).data_type().clone()))
                .collect(),
        )
        .map_err(|source| LakeError::Arrow {
            table: label.clone(),
            source,
        })?;
        let key_index = KeyIndex::new(
            config.key_index_mb.saturating_mul(1 << 20),
            table.table_url().as_str(),
            &columns[key[0]].name,
        );
        let mut curated = CuratedTable {
            label,
            table,
            app_id,
            applied,
            schema,
            columns: columns.to_vec(),
            key,
            converter,
            files: Vec::new(),
            removes: Vec::new(),
            bulk: None,
            schema_grew,
            deletion_vectors,
            key_index,
        };
        curated.load_files()?;
        Ok(curated)
    }

    fn writer(&self) -> Result<RecordBatchWriter, LakeError> {
        // Bloom filters on the key make point lookups skip row groups; a whole-row key
        // (REPLICA IDENTITY FULL without a primary key) is not worth filtering.
        keyed_writer_for(
            &self.table,
            &self.schema,
            &self.bloom_key(),
            CURATED_FILE_SIZE,
        )
        .map_err(self.delta_err())
    }

    /// The key columns that get Parquet bloom filters (none for a whole-row key).
    pub fn bloom_key(&self) -> Vec<String> {
        if self.key.len() <= 4 {
            self.key
                .iter()
                .map(|&i| self.columns[i].name.clone())
                .collect()
        } else {
            Vec::new()
        }
    }

    fn delta_err(&self) -> impl Fn(DeltaTableError) -> LakeError + '_ {
        |source| LakeError::Delta {
            table: self.label.clone(),
            source,
        }
    }

    fn arrow_err(&self) -> impl Fn(ArrowError) -> LakeError + '_ {
        |source| LakeError::Arrow {
            table: self.label.clone(),
            source,
        }
    }

    /// Commit LSN of the last source transaction this table holds, if any.
    pub fn applied(&self) -> Option<Lsn> {
        self.applied
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn version(&self) -> Option<u64> {
        self.table.version()
    }

    /// Raw change rows → curated rows (see [`project`]).
    fn project(&self, raw: &RecordBatch, values: Vec<ArrayRef>) -> Result<RecordBatch, ArrowError> {
        project(&self.schema, &self.columns, raw, values)
    }

    /// Switches to grown source columns (added at the source, same order otherwise); the
    /// next commit records the new schema. Files written before keep the old one and read
    /// back with NULL in the new columns. `stored_types` as for [`CuratedTable::open`].
    pub fn evolve(
        &mut self,
        columns: &[ColumnSpec],
        stored_types: &[Option<DataType>],
    ) -> Result<(), LakeError> {
        let schema = curated_schema(columns, stored_types, Some(&self.schema));
        // A rule may only apply to a column from the start: a column keeps its type.
        for old in self.schema.fields() {
            let kept = schema
                .field_with_name(old.name())
                .is_ok_and(|new| new.data_type() == old.data_type());
            if !kept {
                return Err(LakeError::SchemaChanged {
                    table: self.label.clone(),
                    existing: self
                        .schema
                        .fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .collect(),
                    incoming: schema.fields().iter().map(|f| f.name().clone()).collect(),
                });
            }
        }
        self.columns = columns.to_vec();
        self.schema = schema;
        self.schema_grew = true;
        Ok(())
    }

    /// Starts replacing the whole table (a snapshot): every current file goes at commit.
    pub fn begin_replace(&mut self) {
        for file in self.files.drain(..) {
            if let FileState::Committed(c) = file.state {
                self.removes.push(c.remove());
            }
        }
    }

    /// Appends snapshot rows (raw-shaped, op `r`, with their stored `values`) without
    /// merging.
    pub async fn append(
        &mut self,
        raw: &RecordBatch,
        values: Vec<ArrayRef>,
    ) -> Result<(), LakeError> {
        let rows = self.project(raw, values).map_err(self.arrow_err())?;
        if self.bulk.is_none() {
            let writer = self.writer()?;
            self.bulk = Some(writer);
        }
        let label = self.label.clone();
        if let Some(writer) = self.bulk.as_mut() {
            writer
                .write(rows)
                .await
                .map_err(|source| LakeError::Delta {
                    table: label,
                    source,
                })?;
        }
        Ok(())
    }

    /// How a snapshot's curated files can be spliced from raw files of `raw` schema
    /// (with bloom filters on [`CuratedTable::bloom_key`]), the source columns at the
    /// indices `converted` (by a normalization rule) encoded alongside ([`splice`]).
    pub fn splice_from(&self, raw: &SchemaRef, converted: &[usize]) -> Option<splice::Splice> {
        splice::Splice::plan(
            raw,
            &self.schema,
            converted,
            keyed_properties(&self.bloom_key()),
        )
    }

    /// Adds snapshot rows without merging, as the curated file spliced from the raw file
    /// `raw` (whose contents are `bytes`; the converted columns are the next rows of
    /// `arrays` from `offset` on): written now, committed with the snapshot. Returns the
    /// rows it holds.
    pub async fn append_spliced(
        &mut self,
        splice: &splice::Splice,
        raw: &Add,
        bytes: &bytes::Bytes,
        arrays: &[ArrayRef],
        offset: usize,
    ) -> Result<usize, LakeError> {
        let (contents, add, rows) = splice
            .file(raw, bytes, arrays, offset)
            .map_err(|source| self.delta_err()(DeltaTableError::Parquet { source }))?;
        let location = file_location(&add.path);
        self.table
            .object_store()
            .put(&location, contents.into())
            .await
            .map_err(|source| LakeError::Storage {
                what: format!("writing {} of {}", add.path, self.label),
                source,
            })?;
        self.files.push(DataFile {
            path: add.path.clone(),
            range: add.stats.as_deref().and_then(|s| self.key_range(s)),
            state: FileState::New(add),
        });
        Ok(rows)
    }

    /// Commits the open batch of a stream: removed and added files plus the source
    /// position `through` (the commit LSN of its last transaction).
    pub async fn commit(&mut self, through: Lsn) -> Result<u64, LakeError> {
        let commit = Commit::merge().info_lsn(InfoKey::CommitLsn, through);
        self.commit_files(commit, through).await
    }

    /// Commits a snapshot copy taken at `point` that holds the source through `held`.
    pub async fn commit_snapshot(&mut self, held: Lsn, point: Lsn) -> Result<u64, LakeError> {
        let commit = Commit::merge().info_lsn(InfoKey::SnapshotLsn, point);
        self.commit_files(commit, held).await
    }

    /// Replaces the whole table with a copy ([`CuratedCopy`]) taken at `point`, holding
    /// the source through `held`, in one commit: readers see the old rows or the copy,
    /// never a mix. The position becomes `held` (possibly behind where it was: the
    /// caller catches up from the raw change log).
    pub async fn replace_with(
        &mut self,
        copy: Vec<Add>,
        held: Lsn,
        point: Lsn,
    ) -> Result<u64, LakeError> {
        self.begin_replace();
        for add in copy {
            self.files.push(DataFile {
                path: add.path.clone(),
                range: add.stats.as_deref().and_then(|s| self.key_range(s)),
                state: FileState::New(add),
            });
        }
        self.commit_snapshot(held, point).await
    }

    async fn commit_files(&mut self, commit: Commit, through: Lsn) -> Result<u64, LakeError> {
        if let Some(mut writer) = self.bulk.take() {
            let adds = writer.flush().await.map_err(self.delta_err())?;
            for add in adds {
                self.files.push(DataFile {
                    path: add.path.clone(),
                    range: add.stats.as_deref().and_then(|s| self.key_range(s)),
                    state: FileState::New(add),
                });
            }
        }
        let mut actions: Vec<Action> = Vec::new();
        if self.schema_grew {
            actions.push(schema_action(&self.table, &self.schema).map_err(self.delta_err())?);
        }
        actions.extend(self.removes.drain(..).map(Action::Remove));
        let marked = self.deletion_vector_actions(&mut actions).await?;
        let new_paths: HashSet<String> = self
            .files
            .iter()
            .filter_map(|f| match &f.state {
                FileState::New(add) => Some(add.path.clone()),
                FileState::Committed(_) => None,
            })
            .collect();
        actions.extend(self.files.iter().filter_map(|f| match &f.state {
            FileState::New(add) => Some(Action::Add(add.clone())),
            FileState::Committed(_) => None,
        }));
        let version = commit
            .actions(actions)
            .position(&self.app_id, through)
            .write(&mut self.table, &self.label)
            .await?;
        self.applied = Some(through);
        self.schema_grew = false;
        for file in &mut self.files {
            if let FileState::New(add) = &file.state
                && new_paths.contains(&add.path)
            {
                file.state = FileState::Committed(Committed::new(add.clone()));
            }
        }
        // Files that lost rows by DV now are as committed; files that lost all are gone.
        let mut marked = marked
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>();
        self.files.retain_mut(|file| {
            let FileState::Committed(c) = &mut file.state else {
                return true;
            };
            if !c.changed {
                return true;
            }
            match marked.remove(&file.path) {
                Some(Some(add)) => {
                    c.add = add;
                    c.changed = false;
                    true
                }
                _ => false,
            }
        });
        self.key_index
            .keep_only(self.files.iter().map(|f| f.path.as_str()));
        Ok(version)
    }

    /// The actions for files the open batch deleted rows of by deletion vector: the new
    /// DVs written into one file, then per file `remove` (old DV) + `add` (new DV), or
    /// only `remove` when no row is left. Returns per path the new `add` (`None`: gone).
    async fn deletion_vector_actions(
        &self,
        actions: &mut Vec<Action>,
    ) -> Result<Vec<(String, Option<Add>)>, LakeError> {
        let mut kept: Vec<&Committed> = Vec::new();
        let mut out = Vec::new();
        for file in &self.files {
            let FileState::Committed(c) = &file.state else {
                continue;
            };
            if !c.changed {
                continue;
            }
            let deleted = c.deleted.as_ref().map_or(0, |d| d.len());
            actions.push(Action::Remove(c.remove()));
            if deletion_vector::num_records(c.add.stats.as_deref()) == Some(deleted) {
                out.push((c.add.path.clone(), None));
            } else {
                kept.push(c);
            }
        }
        if kept.is_empty() {
            return Ok(out);
        }
        let empty = roaring::RoaringTreemap::new();
        let dvs: Vec<&roaring::RoaringTreemap> = kept
            .iter()
            .map(|c| c.deleted.as_ref().unwrap_or(&empty))
            .collect();
        let descriptors = deletion_vector::write(&self.table, &dvs)
            .await
            .map_err(self.delta_err())?;
        crate::crash_point::reached("deletion_vector_written");
        for (c, dv) in kept.into_iter().zip(descriptors) {
            let add = Add {
                deletion_vector: Some(dv),
                stats: deletion_vector::loose_stats(c.add.stats.as_deref())
                    .or_else(|| c.add.stats.clone()),
                data_change: true,
                ..c.add.clone()
            };
            actions.push(Action::Add(add.clone()));
            out.push((c.add.path.clone(), Some(add)));
        }
        Ok(out)
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

    /// Compacts small files when due and vacuums when `vacuum` is given; call only between
    /// batches. Returns (files, compacted, vacuumed).
    pub async fn maintain(
        &mut self,
        policy: &Policy,
        vacuum: Option<std::time::Duration>,
    ) -> Result<(usize, Option<Compacted>, usize), LakeError> {
        let properties = keyed_properties(&self.bloom_key());
        let before = self.table.version();
        let result = maintenance::run(
            &mut self.table,
            &self.label,
            policy,
            CURATED_FILE_SIZE,
            properties,
            vacuum,
        )
        .await;
        // A compaction that committed before a failing vacuum changed the files too: the
        // file index must follow, or the next merge would remove files no longer there.
        if self.table.version() != before {
            self.load_files()?;
        }
        let (compacted, vacuumed) = result?;
        let purged = self.purge().await?;
        if purged > 0 {
            tracing::info!(table = %self.label, files = purged, "purged rows marked deleted out of their files");
        }
        Ok((self.files.len(), compacted, vacuumed))
    }

    /// Rewrites without their deleted rows the files whose deletion vectors mark at
    /// least [`PURGE_FRACTION`] of their rows (every file with one when deletion vectors
    /// are off), at most [`PURGE_FILES`] per check so replication pauses briefly, in one
    /// commit that changes no rows. Returns how many were purged.
    async fn purge(&mut self) -> Result<usize, LakeError> {
        let due: Vec<usize> = (0..self.files.len())
            .filter(|&fi| {
                let FileState::Committed(c) = &self.files[fi].state else {
                    return false;
                };
                let Some(dv) = &c.add.deletion_vector else {
                    return false;
                };
                let total = deletion_vector::num_records(c.add.stats.as_deref()).unwrap_or(0);
                !self.deletion_vectors
                    || total == 0
                    || dv.cardinality as f64 >= PURGE_FRACTION * total as f64
            })
            .take(PURGE_FILES)
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        let nothing = reduce::Reduced::default();
        let mut actions = Vec::new();
        for &fi in &due {
            self.load_deleted(fi).await?;
            let data = self.fetch(fi).await?;
            let FileState::Committed(c) = &self.files[fi].state else {
                continue;
            };
            let mut remove = c.remove();
            remove.data_change = false;
            let adds = self
                .rewrite(
                    data,
                    c.deleted.clone(),
                    &nothing,
                    &mut Vec::new(),
                    &mut Default::default(),
                )
                .await?;
            actions.push(Action::Remove(remove));
            actions.extend(adds.into_iter().map(|add| {
                Action::Add(Add {
                    data_change: false,
                    ..add
                })
            }));
        }
        Commit::rewrite()
            .actions(actions)
            .write(&mut self.table, &self.label)
            .await?;
        self.load_files()?;
        Ok(due.len())
    }
}
