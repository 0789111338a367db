//! Curated tables: one Delta table per source table holding its current rows (the silver
//! layer), kept exact by merging each committed batch of changes.
//!
//! # How a merge works
//! A batch arrives as raw change rows in stream order (commit LSN, then position in the
//! transaction), possibly in several chunks when it is large. Each chunk is:
//!
//! 1. normalized (legacy text columns → typed, see [`transform`]) and **reduced** to the
//!    final state of every key it touches ([`reduce`]): delete, or upsert with each
//!    column's source (the change, an earlier change, or the current curated row for
//!    unchanged TOAST values);
//! 2. matched against the table's data files: a file is a **candidate** when the min/max
//!    statistics of the first key column admit one of the chunk's keys (integer and text
//!    keys; other key types make every file a candidate); a candidate is read back, key
//!    columns only, and dropped from the plan when it holds none of the keys;
//! 3. every file that does hold an affected key is **rewritten** without those rows (its
//!    other rows keep their file, so its key range stays narrow), capturing the current
//!    rows the TOAST fill needs;
//! 4. the upserted rows, sorted by key, go to one new file.
//!
//! The batch's Delta commit removes the rewritten files and adds the new ones, and carries
//! `txn(wal2delta:<slot>:curated:<table>) = commit LSN of the batch's last transaction`, so
//! a restart skips what the table already holds, as for raw tables. Files written by a
//! chunk but replaced by a later chunk of the same batch are never committed (vacuum
//! removes them). A one-row update therefore rewrites exactly one file.
//!
//! The curated table has the source columns (normalized types where a rule applies), then
//! `_commit_lsn` and `_commit_ts` (the change that last wrote the row) and `_fallback`
//! (exact text of values with no typed form, as in raw).

pub mod reduce;
pub mod transform;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray, new_null_array,
};
use deltalake::arrow::compute::{cast, filter_record_batch, interleave};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::row::{RowConverter, Rows, SortField};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, Remove, Transaction};
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use object_store::ObjectStoreExt;

use self::reduce::{Cell, Change, Final, Reduced, reduce};
use self::transform::{Normalization, Normalizer};
use crate::apply::builder::{ColumnSpec, op, parse_column};
use crate::lake::table::{
    CURATED_FILE_SIZE, applied_position, existing_schema, keyed_writer_for, open_or_create,
    schema_action,
};
use crate::lake::{Lake, LakeError};
use crate::lsn::Lsn;
use crate::pg_types::ColumnKind;
use crate::table_name::TableName;

/// Columns after the source columns.
pub const CURATED_METADATA: [&str; 3] = ["_commit_lsn", "_commit_ts", "_fallback"];
/// The type OID of a column the source dropped (see `apply::schema::reconcile`).
const DROPPED: u32 = 0;
/// Postgres text types the normalization rules may apply to.
const TEXT_TYPES: [u32; 3] = [25, 1043, 1042];

/// The curated tables' application-transaction id.
pub fn curated_app_id(slot: &str, table: &TableName) -> String {
    format!("wal2delta:{slot}:curated:{table}")
}

/// A key value usable for min/max pruning.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
enum KeyScalar {
    Int(i64),
    Str(String),
}

/// One data file of the table, committed or written by the open batch.
struct DataFile {
    path: String,
    /// Min and max of the first key column, when known.
    range: Option<(KeyScalar, KeyScalar)>,
    state: FileState,
}

enum FileState {
    /// In the table; the action that removes it.
    Committed(Remove),
    /// Written by the open batch; the action that adds it.
    New(Add),
}

/// An open curated table.
pub struct CuratedTable {
    label: String,
    table: DeltaTable,
    app_id: String,
    applied: Option<Lsn>,
    schema: SchemaRef,
    columns: Vec<ColumnSpec>,
    /// Indices of the key columns among the source columns.
    key: Vec<usize>,
    normalizer: Normalizer,
    converter: RowConverter,
    files: Vec<DataFile>,
    removes: Vec<Remove>,
    /// Rows appended by a snapshot, flushed at commit.
    bulk: Option<RecordBatchWriter>,
    normalization: Normalization,
    /// The schema has columns the table's log does not record yet.
    schema_grew: bool,
}

/// The normalizer and the curated schema for `columns`.
fn shape(
    label: &str,
    columns: &[ColumnSpec],
    key: &[usize],
    normalization: &Normalization,
    existing: Option<&Schema>,
) -> (Normalizer, SchemaRef) {
    let eligible: Vec<(String, bool)> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                c.name.clone(),
                TEXT_TYPES.contains(&c.type_oid) && !key.contains(&i),
                // (a dropped column has type OID 0: never eligible)
            )
        })
        .collect();
    let normalizer = Normalizer::new(label, &eligible, normalization);
    let mut fields: Vec<Field> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let kept = existing
                .and_then(|e| e.field_with_name(&c.name).ok())
                .map(|f| f.data_type().clone());
            let ty = match (normalizer.rule(i), kept) {
                // A column the source dropped keeps the type it has.
                (_, Some(kept)) if c.type_oid == DROPPED => kept,
                (Some(rule), _) => rule.target.arrow_type(),
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
    (normalizer, Arc::new(Schema::new(fields)))
}

impl CuratedTable {
    /// Opens (or creates) the curated table of `name` and reads back its position and files.
    pub async fn open(
        lake: &Lake,
        slot: &str,
        name: &TableName,
        columns: &[ColumnSpec],
        key_columns: &[String],
        normalization: &Normalization,
    ) -> Result<CuratedTable, LakeError> {
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
        let (normalizer, schema) = shape(&label, columns, &key, normalization, existing.as_deref());
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
        let table = open_or_create(&lake.curated_table_url(name), &label, &schema).await?;
        let delta_err = |source| LakeError::Delta {
            table: label.clone(),
            source,
        };
        let existing: Vec<String> = table
            .snapshot()
            .map_err(delta_err)?
            .schema()
            .fields()
            .map(|f| f.name().clone())
            .collect();
        let incoming: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        if existing.iter().any(|e| !incoming.contains(e)) {
            return Err(LakeError::SchemaChanged {
                table: label,
                existing,
                incoming,
            });
        }
        let schema_grew = existing != incoming;
        let app_id = curated_app_id(slot, name);
        let applied = applied_position(&table, &app_id).await.map_err(delta_err)?;
        let converter = RowConverter::new(
            key.iter()
                .map(|&i| SortField::new(schema.field(i).data_type().clone()))
                .collect(),
        )
        .map_err(|source| LakeError::Arrow {
            table: label.clone(),
            source,
        })?;
        let mut curated = CuratedTable {
            label,
            table,
            app_id,
            applied,
            schema,
            columns: columns.to_vec(),
            key,
            normalizer,
            normalization: normalization.clone(),
            converter,
            files: Vec::new(),
            removes: Vec::new(),
            bulk: None,
            schema_grew,
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
    fn bloom_key(&self) -> Vec<String> {
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

    fn load_files(&mut self) -> Result<(), LakeError> {
        let snapshot = self.table.snapshot().map_err(self.delta_err())?;
        let mut files = Vec::new();
        for view in snapshot.log_data().iter() {
            files.push(DataFile {
                path: view.path().to_string(),
                range: view.stats().and_then(|s| self.key_range(&s)),
                state: FileState::Committed(view.remove_action(true)),
            });
        }
        self.files = files;
        Ok(())
    }

    /// The first key column's min and max from a file's statistics JSON.
    fn key_range(&self, stats: &str) -> Option<(KeyScalar, KeyScalar)> {
        let col = &self.columns[self.key[0]];
        let stats: serde_json::Value = serde_json::from_str(stats).ok()?;
        let get = |side: &str| -> Option<KeyScalar> {
            let v = stats.get(side)?.get(&col.name)?;
            match col.kind {
                ColumnKind::Int64 => v.as_i64().map(KeyScalar::Int),
                ColumnKind::Text => v.as_str().map(|s| KeyScalar::Str(s.to_string())),
                _ => None,
            }
        };
        Some((get("minValues")?, get("maxValues")?))
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

    pub fn table(&self) -> &DeltaTable {
        &self.table
    }

    /// Raw change rows → curated rows (source columns normalized, then the metadata).
    fn project(&mut self, raw: &RecordBatch) -> Result<RecordBatch, ArrowError> {
        let mut arrays = Vec::with_capacity(self.schema.fields().len());
        for (i, col) in self.columns.iter().enumerate() {
            let array = self.normalizer.convert(i, &col.name, raw.column(i))?;
            let field = self.schema.field(i);
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
        RecordBatch::try_new(self.schema.clone(), arrays)
    }

    /// Switches to grown source columns (added at the source, same order otherwise); the
    /// next commit records the new schema. Files written before keep the old one and read
    /// back with NULL in the new columns.
    pub fn evolve(&mut self, columns: &[ColumnSpec]) -> Result<(), LakeError> {
        let (normalizer, schema) = shape(
            &self.label,
            columns,
            &self.key,
            &self.normalization,
            Some(&self.schema),
        );
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
        self.normalizer = normalizer;
        self.schema = schema;
        self.schema_grew = true;
        Ok(())
    }

    /// Starts replacing the whole table (a snapshot): every current file goes at commit.
    pub fn begin_replace(&mut self) {
        for file in self.files.drain(..) {
            if let FileState::Committed(remove) = file.state {
                self.removes.push(remove);
            }
        }
    }

    /// Appends snapshot rows (raw-shaped, op `r`) without merging.
    pub async fn append(&mut self, raw: &RecordBatch) -> Result<(), LakeError> {
        let rows = self.project(raw).map_err(self.arrow_err())?;
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

    /// Merges a chunk of raw change rows (stream order) into the open batch.
    pub async fn merge(&mut self, raw: &RecordBatch) -> Result<(), LakeError> {
        if raw.num_rows() == 0 {
            return Ok(());
        }
        let rows = self.project(raw).map_err(self.arrow_err())?;
        let ops = string_column(raw, "_op").map_err(self.arrow_err())?;
        let (old_keys, old_arrays) = self.old_keys(raw).map_err(self.arrow_err())?;
        let old_rows = self
            .converter
            .convert_columns(&old_arrays)
            .map_err(self.arrow_err())?;
        let unchanged = self.unchanged_columns(raw);
        let mut key_arrays: Vec<ArrayRef> =
            self.key.iter().map(|&i| rows.column(i).clone()).collect();
        // A key column an update left as unchanged TOAST (possible when the key is the
        // whole row, REPLICA IDENTITY FULL without a primary key) keeps its old value,
        // which the old row image carries.
        for (k, &col) in self.key.iter().enumerate() {
            let sources: Vec<(usize, usize)> = (0..raw.num_rows())
                .map(|i| match old_keys[i] {
                    Some(o) if unchanged[i].contains(&col) => (1, o),
                    _ => (0, i),
                })
                .collect();
            if sources.iter().any(|(a, _)| *a == 1) {
                key_arrays[k] =
                    interleave(&[key_arrays[k].as_ref(), old_arrays[k].as_ref()], &sources)
                        .map_err(self.arrow_err())?;
            }
        }
        let new_keys = self
            .converter
            .convert_columns(&key_arrays)
            .map_err(self.arrow_err())?;
        let changes = (0..raw.num_rows()).map(|i| {
            match ops.value(i) {
                op::DELETE => Change::Delete {
                    key: slice(&new_keys, i),
                },
                op::TRUNCATE => Change::Truncate,
                op::UPDATE => Change::Update {
                    key: slice(&new_keys, i),
                    old_key: old_keys[i].map(|r| slice(&old_rows, r)),
                    unchanged: &unchanged[i],
                },
                // Inserts and snapshot reads.
                _ => Change::Insert {
                    key: slice(&new_keys, i),
                },
            }
        });
        let reduced = reduce(changes, self.columns.len());
        drop(new_keys);
        self.apply(&rows, reduced).await
    }

    /// For updates that carry an old key (`_before`), its key columns: per row the index
    /// into the returned arrays.
    fn old_keys(
        &self,
        raw: &RecordBatch,
    ) -> Result<(Vec<Option<usize>>, Vec<ArrayRef>), ArrowError> {
        let before = string_column(raw, "_before")?;
        let mut which = vec![None; raw.num_rows()];
        let mut texts: Vec<Vec<Option<String>>> = vec![Vec::new(); self.key.len()];
        let mut n = 0;
        for (i, slot) in which.iter_mut().enumerate() {
            if before.is_null(i) {
                continue;
            }
            let Ok(serde_json::Value::Object(image)) = serde_json::from_str(before.value(i)) else {
                continue;
            };
            let values: Vec<Option<String>> = self
                .key
                .iter()
                .map(|&k| {
                    image
                        .get(&self.columns[k].name)
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                })
                .collect();
            if values.iter().all(Option::is_none) {
                continue;
            }
            for (k, v) in values.into_iter().enumerate() {
                texts[k].push(v);
            }
            *slot = Some(n);
            n += 1;
        }
        let arrays: Vec<ArrayRef> = self
            .key
            .iter()
            .zip(&texts)
            .map(|(&k, values)| {
                let refs: Vec<Option<&str>> = values.iter().map(|v| v.as_deref()).collect();
                parse_column(&self.columns[k].kind, &refs)
            })
            .collect::<Result<_, _>>()?;
        Ok((which, arrays))
    }

    /// Per row, the indices of the source columns sent as unchanged TOAST.
    fn unchanged_columns(&self, raw: &RecordBatch) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); raw.num_rows()];
        let Some(list) = raw
            .column_by_name("_unchanged_toast")
            .and_then(|a| a.as_list_opt::<i32>())
        else {
            return out;
        };
        for (i, cols) in out.iter_mut().enumerate() {
            if list.is_null(i) {
                continue;
            }
            let names = list.value(i);
            if let Some(names) = names.as_string_opt::<i32>() {
                for name in names.iter().flatten() {
                    if let Some(c) = self.columns.iter().position(|c| c.name == name) {
                        cols.push(c);
                    }
                }
            }
        }
        out
    }

    /// Applies a reduced chunk to the working set of files.
    async fn apply(&mut self, rows: &RecordBatch, reduced: Reduced) -> Result<(), LakeError> {
        if reduced.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let (mut scanned, mut rewritten_bytes) = (0u64, 0u64);
        if reduced.truncated {
            self.begin_replace();
        }
        // Which files may hold an affected key.
        let key_values = self.key_scalars(&reduced).map_err(self.arrow_err())?;
        let mut captured: Vec<RecordBatch> = Vec::new();
        let mut captured_at: HashMap<u32, (usize, usize)> = HashMap::new();
        let mut replaced: Vec<usize> = Vec::new();
        let mut new_files: Vec<Add> = Vec::new();
        for fi in 0..self.files.len() {
            if let (Some(values), Some((min, max))) = (&key_values, &self.files[fi].range) {
                let start = values.partition_point(|v| v < min);
                if !values.get(start).is_some_and(|v| v <= max) {
                    continue;
                }
            }
            let data = self.fetch(fi).await?;
            scanned += 1;
            if !self.file_holds_any(&data, &reduced)? {
                continue;
            }
            rewritten_bytes += data.len() as u64;
            let adds = self
                .rewrite(data, &reduced, &mut captured, &mut captured_at)
                .await?;
            new_files.extend(adds);
            replaced.push(fi);
        }
        // The upserted rows, sorted by key, into one new file.
        let mut upserts: Vec<(u32, usize, Option<&Vec<Cell>>)> = reduced
            .finals
            .iter()
            .enumerate()
            .filter_map(|(id, f)| match f {
                Final::Upsert { row, cells } => Some((id as u32, *row, cells.as_ref())),
                Final::Delete => None,
            })
            .collect();
        upserts.sort_by(|a, b| reduced.keys[a.0 as usize].cmp(&reduced.keys[b.0 as usize]));
        if !upserts.is_empty() {
            let batch = self
                .build_upserts(rows, &upserts, &captured, &captured_at)
                .map_err(self.arrow_err())?;
            let mut writer = self.writer()?;
            writer.write(batch).await.map_err(self.delta_err())?;
            new_files.extend(writer.flush().await.map_err(self.delta_err())?);
        }
        crate::telemetry::merged(
            self.label.strip_prefix("curated.").unwrap_or(&self.label),
            started.elapsed(),
            scanned,
            replaced.len() as u64,
            rewritten_bytes,
        );
        replaced.sort_unstable();
        for fi in replaced.into_iter().rev() {
            if let FileState::Committed(remove) = self.files.remove(fi).state {
                self.removes.push(remove);
            }
        }
        for add in new_files {
            self.files.push(DataFile {
                path: add.path.clone(),
                range: add.stats.as_deref().and_then(|s| self.key_range(s)),
                state: FileState::New(add),
            });
        }
        Ok(())
    }

    /// The first key column of every affected key, sorted, when pruning can use it.
    fn key_scalars(&self, reduced: &Reduced) -> Result<Option<Vec<KeyScalar>>, ArrowError> {
        let kind = &self.columns[self.key[0]].kind;
        if !matches!(kind, ColumnKind::Int64 | ColumnKind::Text) || reduced.keys.is_empty() {
            return Ok(None);
        }
        let parser = self.converter.parser();
        let arrays = self
            .converter
            .convert_rows(reduced.keys.iter().map(|k| parser.parse(k)))?;
        let first = cast(&arrays[0], &DataType::Int64).ok();
        let mut values: Vec<KeyScalar> = match kind {
            ColumnKind::Text => arrays[0]
                .as_string_opt::<i32>()
                .map(|a| {
                    a.iter()
                        .flatten()
                        .map(|s| KeyScalar::Str(s.to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            _ => first
                .as_ref()
                .and_then(|a| a.as_any().downcast_ref::<Int64Array>())
                .map(|a| a.iter().flatten().map(KeyScalar::Int).collect())
                .unwrap_or_default(),
        };
        if values.len() != reduced.keys.len() {
            // NULL keys (identity FULL without a primary key): no pruning.
            return Ok(None);
        }
        values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        Ok(Some(values))
    }

    /// Fetches a data file (at most the target file size).
    async fn fetch(&self, fi: usize) -> Result<Bytes, LakeError> {
        let path = deltalake::Path::from(self.files[fi].path.as_str());
        let store = self.table.object_store();
        let fetched = async { store.get(&path).await?.bytes().await }.await;
        fetched.map_err(|e| (self.delta_err())(DeltaTableError::from(e)))
    }

    /// Says whether a file holds any affected key, reading its key columns only.
    fn file_holds_any(&self, data: &Bytes, reduced: &Reduced) -> Result<bool, LakeError> {
        let parquet_err = |e: deltalake::parquet::errors::ParquetError| {
            (self.delta_err())(DeltaTableError::from(e))
        };
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(data.clone()).map_err(parquet_err)?;
        let names: Vec<&str> = self
            .key
            .iter()
            .map(|&k| self.columns[k].name.as_str())
            .collect();
        let roots: Vec<usize> = builder
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| names.contains(&f.name().as_str()))
            .map(|(i, _)| i)
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let reader = builder.with_projection(mask).build().map_err(parquet_err)?;
        for batch in reader {
            let batch = batch.map_err(self.arrow_err())?;
            let keys = self.batch_keys(&batch).map_err(self.arrow_err())?;
            if keys.iter().any(|k| reduced.index.contains_key(k.as_ref())) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Key rows of a batch read from a file (any column order, older schemas).
    fn batch_keys(&self, batch: &RecordBatch) -> Result<Rows, ArrowError> {
        let arrays: Vec<ArrayRef> = self
            .key
            .iter()
            .map(|&k| {
                let field = self.schema.field(k);
                match batch.column_by_name(field.name()) {
                    Some(a) if a.data_type() == field.data_type() => Ok(a.clone()),
                    Some(a) => cast(a, field.data_type()),
                    None => Ok(new_null_array(field.data_type(), batch.num_rows())),
                }
            })
            .collect::<Result<_, _>>()?;
        self.converter.convert_columns(&arrays)
    }

    /// Rewrites file `fi` without the affected keys' rows, capturing those the TOAST fill
    /// needs. Returns the replacement file(s).
    async fn rewrite(
        &self,
        data: Bytes,
        reduced: &Reduced,
        captured: &mut Vec<RecordBatch>,
        captured_at: &mut HashMap<u32, (usize, usize)>,
    ) -> Result<Vec<Add>, LakeError> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(data)
            .and_then(|b| b.build())
            .map_err(|e| (self.delta_err())(DeltaTableError::from(e)))?;
        let mut writer = self.writer()?;
        for batch in reader {
            let batch = batch.map_err(self.arrow_err())?;
            let batch = align(&batch, &self.schema).map_err(self.arrow_err())?;
            let keys = self.batch_keys(&batch).map_err(self.arrow_err())?;
            let mut keep = Vec::with_capacity(batch.num_rows());
            let mut take = Vec::with_capacity(batch.num_rows());
            let mut taken_ids = Vec::new();
            for i in 0..batch.num_rows() {
                let id = reduced.index.get(keys.row(i).as_ref()).copied();
                keep.push(id.is_none());
                let wanted = id.filter(|id| reduced.needs_target.contains(id));
                take.push(wanted.is_some());
                taken_ids.extend(wanted);
            }
            if !taken_ids.is_empty() {
                let rows = filter_record_batch(&batch, &BooleanArray::from(take))
                    .map_err(self.arrow_err())?;
                for (r, id) in taken_ids.into_iter().enumerate() {
                    captured_at.insert(id, (captured.len(), r));
                }
                captured.push(rows);
            }
            let kept =
                filter_record_batch(&batch, &BooleanArray::from(keep)).map_err(self.arrow_err())?;
            if kept.num_rows() > 0 {
                writer.write(kept).await.map_err(self.delta_err())?;
            }
        }
        writer.flush().await.map_err(self.delta_err())
    }

    /// Builds the upserted rows: each column from the change row or, for unchanged TOAST
    /// values, from the captured current row.
    fn build_upserts(
        &self,
        rows: &RecordBatch,
        upserts: &[(u32, usize, Option<&Vec<Cell>>)],
        captured: &[RecordBatch],
        captured_at: &HashMap<u32, (usize, usize)>,
    ) -> Result<RecordBatch, ArrowError> {
        let ncols = self.columns.len();
        // Every change row is a final row, in order, with all its values: no copy needed
        // (inserts of ascending keys, the usual bulk case).
        let identity = upserts.len() == rows.num_rows()
            && upserts
                .iter()
                .enumerate()
                .all(|(i, (_, row, cells))| *row == i && cells.is_none());
        if identity {
            return Ok(rows.clone());
        }
        let null_source = 1 + captured.len();
        let mut missing = 0usize;
        let mut locate = |cell: Cell| -> (usize, usize) {
            match cell {
                Cell::Row(r) => (0, r),
                Cell::Target(id) => match captured_at.get(&id) {
                    Some((b, r)) => (1 + b, *r),
                    None => {
                        missing += 1;
                        (null_source, 0)
                    }
                },
                Cell::Null => {
                    missing += 1;
                    (null_source, 0)
                }
            }
        };
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for c in 0..ncols {
            let null = new_null_array(self.schema.field(c).data_type(), 1);
            let mut sources: Vec<&dyn Array> = vec![rows.column(c).as_ref()];
            sources.extend(captured.iter().map(|b| b.column(c).as_ref()));
            sources.push(null.as_ref());
            let indices: Vec<(usize, usize)> = upserts
                .iter()
                .map(|(_, row, cells)| match cells {
                    Some(cells) => locate(cells[c]),
                    None => (0, *row),
                })
                .collect();
            arrays.push(interleave(&sources, &indices)?);
        }
        let row_indices: Vec<(usize, usize)> = upserts.iter().map(|(_, r, _)| (0, *r)).collect();
        for c in ncols..ncols + 2 {
            arrays.push(interleave(&[rows.column(c).as_ref()], &row_indices)?);
        }
        // `_fallback`: the change's own, plus the current row's entries for columns whose
        // value was carried over.
        let fallback = rows.column(ncols + 2).as_string::<i32>();
        let merged: StringArray = upserts
            .iter()
            .map(|(_, row, cells)| {
                let own = (!fallback.is_null(*row)).then(|| fallback.value(*row).to_string());
                let Some(cells) = cells else { return own };
                let mut map: serde_json::Map<String, serde_json::Value> = own
                    .as_deref()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or_default();
                for (c, cell) in cells.iter().enumerate() {
                    let (col, r) = match cell {
                        Cell::Target(id) => match captured_at.get(id) {
                            Some((b, r)) => (captured[*b].column(ncols + 2).as_string::<i32>(), *r),
                            None => continue,
                        },
                        Cell::Row(r) if r != row => (fallback, *r),
                        _ => continue,
                    };
                    if col.is_null(r) {
                        continue;
                    }
                    let theirs: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(col.value(r)).unwrap_or_default();
                    let name = &self.columns[c].name;
                    if let Some(v) = theirs.get(name) {
                        map.insert(name.clone(), v.clone());
                    }
                }
                (!map.is_empty()).then(|| serde_json::Value::Object(map).to_string())
            })
            .collect();
        arrays.push(Arc::new(merged));
        if missing > 0 {
            tracing::warn!(
                table = %self.label,
                values = missing,
                "unchanged TOAST values with no current row to take them from were set to NULL; \
                 the curated table did not hold those rows (was it created with snapshot = \
                 \"never\"?)"
            );
        }
        RecordBatch::try_new(self.schema.clone(), arrays)
    }

    /// Commits the open batch: removed and added files plus the source position `through`.
    pub async fn commit(
        &mut self,
        through: Lsn,
        metadata: HashMap<String, serde_json::Value>,
    ) -> Result<u64, LakeError> {
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
        let properties = CommitProperties::default()
            .with_application_transaction(Transaction::new_with_last_update(
                &self.app_id,
                through.as_i64(),
                Some(chrono::Utc::now().timestamp_millis()),
            ))
            .with_metadata(metadata);
        let operation = DeltaOperation::Merge {
            predicate: None,
            merge_predicate: None,
            matched_predicates: vec![],
            not_matched_predicates: vec![],
            not_matched_by_source_predicates: vec![],
        };
        let snapshot = self.table.snapshot().map_err(self.delta_err())?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), self.table.log_store(), operation)
            .await
            .map_err(|e| (self.delta_err())(e))?;
        let version = finalized.version();
        self.table.state = Some(finalized.snapshot());
        self.applied = Some(through);
        self.schema_grew = false;
        for file in &mut self.files {
            if let FileState::New(add) = &file.state
                && new_paths.contains(&add.path)
            {
                file.state = FileState::Committed(remove_for(add));
            }
        }
        Ok(version)
    }

    /// Compacts small files when due and vacuums when `vacuum` is given; call only between
    /// batches. Returns (files, compacted, vacuumed).
    pub async fn maintain(
        &mut self,
        policy: &crate::lake::maintenance::Policy,
        vacuum: Option<std::time::Duration>,
    ) -> Result<(usize, Option<crate::lake::maintenance::Compacted>, usize), LakeError> {
        let properties = crate::lake::table::keyed_properties(&self.bloom_key());
        let (compacted, vacuumed) = crate::lake::maintenance::run(
            &mut self.table,
            &self.label,
            policy,
            CURATED_FILE_SIZE,
            properties,
            vacuum,
        )
        .await?;
        if compacted.is_some() || vacuumed > 0 {
            self.load_files()?;
        }
        Ok((self.files.len(), compacted, vacuumed))
    }

    /// Drops what the open batch wrote (nothing was committed).
    pub fn abandon(&mut self) -> Result<(), LakeError> {
        self.bulk = None;
        self.removes.clear();
        self.load_files()
    }
}

fn slice(rows: &Rows, i: usize) -> &[u8] {
    rows.row(i).data()
}

fn string_column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray, ArrowError> {
    batch
        .column_by_name(name)
        .and_then(|a| a.as_string_opt::<i32>())
        .ok_or_else(|| ArrowError::SchemaError(format!("batch lacks text column {name}")))
}

/// A batch read from a file, shaped as `schema` (columns added later are NULL).
fn align(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    let arrays = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(a) if a.data_type() == f.data_type() => Ok(a.clone()),
            Some(a) => cast(a, f.data_type()),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), arrays)
}

/// The action that removes a file this daemon added.
fn remove_for(add: &Add) -> Remove {
    Remove {
        path: add.path.clone(),
        data_change: true,
        deletion_timestamp: Some(chrono::Utc::now().timestamp_millis()),
        extended_file_metadata: Some(true),
        partition_values: Some(add.partition_values.clone()),
        size: Some(add.size),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
    }
}
