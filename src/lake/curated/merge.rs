//! Merging a batch of changes into a curated table.
//!
//! A batch arrives as raw change rows in stream order (commit LSN, then position in the
//! transaction), possibly in several chunks when it is large. Each chunk is:
//!
//! 1. normalized by the apply stage (`apply::normalize`), then **reduced** to the
//!    final state of every key it touches ([`reduce`]): delete, or upsert with each
//!    column's source (the change, an earlier change, or the current curated row for
//!    unchanged TOAST values);
//! 2. matched against the table's data files: a file is a **candidate** when the min/max
//!    statistics of the first key column admit one of the chunk's keys (`files`); a candidate is read back, key
//!    columns only, and dropped from the plan when it holds none of the keys;
//! 3. every file that does hold an affected key is **rewritten** without those rows (its
//!    other rows keep their file, so its key range stays narrow), capturing the current
//!    rows the TOAST fill needs;
//! 4. the upserted rows, sorted by key, go to one new file.
//!
//! The batch's Delta commit removes the rewritten files and adds the new ones, and carries
//! `txn(AppId::curated) = commit LSN of the batch's last transaction`, so
//! a restart skips what the table already holds, as for raw tables. Files written by a
//! chunk but replaced by a later chunk of the same batch are never committed (vacuum
//! removes them). A one-row update therefore rewrites exactly one file.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use deltalake::DeltaTableError;
use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, new_null_array,
};
use deltalake::arrow::compute::{cast, filter_record_batch, interleave};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::arrow::datatypes::{DataType, Int64Type};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::row::Rows;
use deltalake::kernel::Add;
// Deprecated in parquet 59.3 in favour of each caller's own `AsyncFileReader`; it still
// does exactly what a key read needs (footer, then the key columns' ranges).
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
#[allow(deprecated)]
use deltalake::parquet::arrow::async_reader::ParquetObjectReader;
use deltalake::parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use deltalake::writer::DeltaWriter;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use roaring::RoaringTreemap;

/// Affected keys by value, for a single integer key column.
type IntKeys = HashMap<i64, u32, ahash::RandomState>;

use super::files::{DataFile, FileState, KeyScalar};
use super::reduce::{Cell, Change, Final, Reduced, reduce};
use super::{CuratedTable, Indexing};
use crate::change::Op;
use crate::lake::raw::layout::parse_column;
use crate::lake::{LakeError, deletion_vector};

impl CuratedTable {
    /// Merges a chunk of raw change rows (stream order) into the open batch; `values`
    /// are its source columns as the table stores them (normalized).
    pub async fn merge(
        &mut self,
        raw: &RecordBatch,
        values: Vec<ArrayRef>,
    ) -> Result<(), LakeError> {
        if raw.num_rows() == 0 {
            return Ok(());
        }
        let rows = self.project(raw, values).map_err(self.arrow_err())?;
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
            match Op::from_code(ops.value(i)) {
                Some(Op::Delete) => Change::Delete {
                    key: slice(&new_keys, i),
                },
                Some(Op::Truncate) => Change::Truncate,
                Some(Op::Update) => Change::Update {
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
        let int_keys = self.int_keys(&reduced).map_err(self.arrow_err())?;
        // The same, in key order, for files the key index answers for.
        self.key_index.settle();
        let sorted_int_keys: Option<Vec<(i64, u32)>> = int_keys.as_ref().map(|map| {
            let mut keys: Vec<(i64, u32)> = map.iter().map(|(&k, &id)| (k, id)).collect();
            keys.sort_unstable();
            keys
        });
        let mut captured: Vec<RecordBatch> = Vec::new();
        let mut captured_at: HashMap<u32, (usize, usize)> = HashMap::new();
        let mut replaced: Vec<usize> = Vec::new();
        let mut new_files: Vec<Add> = Vec::new();
        let mut marked = 0u64;
        for fi in 0..self.files.len() {
            if !self.files[fi].may_hold(key_values.as_deref()) {
                continue;
            }
            self.load_deleted(fi).await?;
            let file = &self.files[fi];
            let deleted = match &file.state {
                FileState::Committed(c) => c.deleted.as_ref(),
                FileState::New(_) => None,
            };
            let found = match (&sorted_int_keys, self.key_index.get(&file.path)) {
                (Some(sorted), Some(index)) => {
                    let candidates = match &file.range {
                        Some((KeyScalar::Int(lo), KeyScalar::Int(hi))) => {
                            let start = sorted.partition_point(|(k, _)| k < lo);
                            let end = sorted.partition_point(|(k, _)| k <= hi);
                            &sorted[start..end.max(start)]
                        }
                        _ => &sorted[..],
                    };
                    let mut found: Vec<(u64, u32)> = candidates
                        .iter()
                        .filter_map(|&(key, id)| index.row_of(key).map(|pos| (pos, id)))
                        .filter(|(pos, _)| !deleted.is_some_and(|d| d.contains(*pos)))
                        .collect();
                    found.sort_unstable();
                    found
                }
                _ => {
                    let keys = self.key_batches(fi).await?;
                    scanned += 1;
                    let found = self.positions_of(&keys, &reduced, int_keys.as_ref(), deleted)?;
                    if int_keys.is_some() {
                        let column = &self.columns[self.key[0]].name;
                        let _ = self.key_index.learn(&file.path, keys, column);
                    }
                    found
                }
            };
            if found.is_empty() {
                continue;
            }
            let by_dv =
                self.deletion_vectors && matches!(self.files[fi].state, FileState::Committed(_));
            if by_dv {
                // Mark the rows deleted; the file stays. Rows the TOAST fill needs are
                // read back first.
                if found
                    .iter()
                    .any(|(_, id)| reduced.needs_target.contains(id))
                {
                    let data = self.fetch(fi).await?;
                    self.capture(data, &found, &reduced, &mut captured, &mut captured_at)?;
                }
                marked += found.len() as u64;
                if let FileState::Committed(c) = &mut self.files[fi].state {
                    let deleted = c.deleted.get_or_insert_with(RoaringTreemap::new);
                    deleted.extend(found.iter().map(|(pos, _)| *pos));
                    c.changed = true;
                }
                continue;
            }
            let data = self.fetch(fi).await?;
            rewritten_bytes += data.len() as u64;
            let adds = self
                .rewrite(
                    data,
                    deleted.cloned(),
                    &reduced,
                    &mut captured,
                    &mut captured_at,
                )
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
            // The new file's keys are at hand: index it now, so that the next merge and
            // the endpoint's lookups need not open it (when it is one file, its rows are
            // the batch's, in order).
            let column = self.columns[self.key[0]].name.clone();
            let keys = match int_keys {
                Some(_) => batch.schema().index_of(&column).ok(),
                None => None,
            }
            .and_then(|i| batch.project(&[i]).ok());
            let mut writer = self.writer()?;
            writer.write(batch).await.map_err(self.delta_err())?;
            let adds = writer.flush().await.map_err(self.delta_err())?;
            if let (Some(keys), [add]) = (keys, adds.as_slice()) {
                let _ = self.key_index.learn(&add.path, vec![keys], &column);
            }
            new_files.extend(adds);
        }
        crate::telemetry::merged(
            self.label.strip_prefix("curated.").unwrap_or(&self.label),
            started.elapsed(),
            scanned,
            replaced.len() as u64,
            rewritten_bytes,
            marked,
        );
        replaced.sort_unstable();
        for fi in replaced.into_iter().rev() {
            if let FileState::Committed(c) = self.files.remove(fi).state {
                self.removes.push(c.remove());
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

    /// Fetches a data file (at most the target file size).
    pub(super) async fn fetch(&self, fi: usize) -> Result<Bytes, LakeError> {
        let path = deltalake::Path::from(self.files[fi].path.as_str());
        let store = self.table.object_store();
        let fetched = async { store.get(&path).await?.bytes().await }.await;
        fetched.map_err(|e| (self.delta_err())(DeltaTableError::from(e)))
    }

    /// Reads a committed file's deletion vector into its state, once.
    pub(super) async fn load_deleted(&mut self, fi: usize) -> Result<(), LakeError> {
        let FileState::Committed(c) = &self.files[fi].state else {
            return Ok(());
        };
        let (Some(dv), None) = (&c.add.deletion_vector, &c.deleted) else {
            return Ok(());
        };
        let read = deletion_vector::read(&self.table, dv)
            .await
            .map_err(self.delta_err())?;
        if let FileState::Committed(c) = &mut self.files[fi].state {
            c.deleted = Some(read);
        }
        Ok(())
    }

    /// The key columns of data file `fi`, reading from the store only the footer and
    /// their byte ranges.
    async fn key_batches(&self, fi: usize) -> Result<Vec<RecordBatch>, LakeError> {
        let parquet_err = |e: deltalake::parquet::errors::ParquetError| {
            (self.delta_err())(DeltaTableError::from(e))
        };
        let file = &self.files[fi];
        let size = match &file.state {
            FileState::Committed(c) => c.add.size,
            FileState::New(add) => add.size,
        };
        #[allow(deprecated)]
        let reader = ParquetObjectReader::new(
            self.table.object_store(),
            deltalake::Path::from(file.path.as_str()),
        )
        .with_file_size(size as u64);
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(parquet_err)?;
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
        builder
            .with_projection(mask)
            .build()
            .map_err(parquet_err)?
            .try_collect()
            .await
            .map_err(parquet_err)
    }

    /// Whether the table is keyed by one integer column (what the key index serves).
    fn has_int_key(&self) -> bool {
        self.key.len() == 1
            && matches!(
                self.schema.field(self.key[0]).data_type(),
                DataType::Int16 | DataType::Int32 | DataType::Int64
            )
    }

    /// Reads the key column of one committed file the key index has no entry for and
    /// starts indexing it, so that the first merges after a start or a snapshot find
    /// their rows in the index instead of reading the key column of every file a change
    /// may touch (with keys spread over the table: every file). A file whose keys cannot
    /// be read is left to the merges (it is not tried again).
    pub async fn index_one_file(&mut self) -> Result<Indexing, LakeError> {
        if !self.has_int_key() {
            return Ok(Indexing::Done);
        }
        // Entries built meanwhile first. The next file is read while the last one's entry
        // builds, but with two building, wait for them: their key columns count against
        // the in-flight budget until taken in.
        self.key_index.settle();
        if self.key_index.building() > 1 {
            self.key_index.settle_all().await;
        }
        let Some(fi) = (0..self.files.len()).find(|&fi| {
            matches!(self.files[fi].state, FileState::Committed(_))
                && self.key_index.wants(&self.files[fi].path)
        }) else {
            return Ok(Indexing::Done);
        };
        let path = self.files[fi].path.clone();
        let keys = match self.key_batches(fi).await {
            Ok(keys) => keys,
            Err(e) => {
                self.key_index.refuse(&path);
                return Err(e);
            }
        };
        let column = self.columns[self.key[0]].name.clone();
        Ok(if self.key_index.learn(&path, keys, &column) {
            Indexing::Started
        } else {
            Indexing::Refused
        })
    }

    /// For a single integer key column, the affected keys by value (a fast path around
    /// the row format).
    fn int_keys(&self, reduced: &Reduced) -> Result<Option<IntKeys>, ArrowError> {
        if !self.has_int_key() || reduced.keys.is_empty() {
            return Ok(None);
        }
        let parser = self.converter.parser();
        let arrays = self
            .converter
            .convert_rows(reduced.keys.iter().map(|k| parser.parse(k)))?;
        let values = cast(&arrays[0], &DataType::Int64)?;
        let values = values.as_primitive::<Int64Type>();
        let mut map = IntKeys::with_capacity_and_hasher(values.len(), Default::default());
        for (id, v) in values.iter().enumerate() {
            if let Some(v) = v {
                map.insert(v, id as u32);
            }
        }
        Ok(Some(map))
    }

    /// The position in the file and the key id of every live row (not in `deleted`) that
    /// holds an affected key, from the file's key columns (`key_batches`).
    fn positions_of(
        &self,
        batches: &[RecordBatch],
        reduced: &Reduced,
        int_keys: Option<&IntKeys>,
        deleted: Option<&RoaringTreemap>,
    ) -> Result<Vec<(u64, u32)>, LakeError> {
        let mut found = Vec::new();
        let mut offset = 0u64;
        let live = |pos: u64| !deleted.is_some_and(|d| d.contains(pos));
        for batch in batches {
            match int_keys {
                Some(map) => {
                    let name = &self.columns[self.key[0]].name;
                    if let Some(column) = batch.column_by_name(name) {
                        let column = cast(column, &DataType::Int64).map_err(self.arrow_err())?;
                        for (i, v) in column.as_primitive::<Int64Type>().iter().enumerate() {
                            let pos = offset + i as u64;
                            if let Some(&id) = v.and_then(|v| map.get(&v))
                                && live(pos)
                            {
                                found.push((pos, id));
                            }
                        }
                    }
                }
                None => {
                    let keys = self.batch_keys(batch).map_err(self.arrow_err())?;
                    for i in 0..batch.num_rows() {
                        let pos = offset + i as u64;
                        if let Some(&id) = reduced.index.get(keys.row(i).as_ref())
                            && live(pos)
                        {
                            found.push((pos, id));
                        }
                    }
                }
            }
            offset += batch.num_rows() as u64;
        }
        Ok(found)
    }

    /// Captures the current rows at `found` positions that the TOAST fill needs.
    fn capture(
        &self,
        data: Bytes,
        found: &[(u64, u32)],
        reduced: &Reduced,
        captured: &mut Vec<RecordBatch>,
        captured_at: &mut HashMap<u32, (usize, usize)>,
    ) -> Result<(), LakeError> {
        let wanted: HashMap<u64, u32> = found
            .iter()
            .filter(|(_, id)| reduced.needs_target.contains(id))
            .copied()
            .collect();
        let reader = ParquetRecordBatchReaderBuilder::try_new(data)
            .and_then(|b| b.build())
            .map_err(|e| (self.delta_err())(DeltaTableError::from(e)))?;
        let mut offset = 0u64;
        for batch in reader {
            let batch = batch.map_err(self.arrow_err())?;
            let batch = align(&batch, &self.schema).map_err(self.arrow_err())?;
            let mut take = Vec::with_capacity(batch.num_rows());
            let mut ids = Vec::new();
            for i in 0..batch.num_rows() {
                let id = wanted.get(&(offset + i as u64));
                take.push(id.is_some());
                ids.extend(id.copied());
            }
            offset += batch.num_rows() as u64;
            if ids.is_empty() {
                continue;
            }
            let rows =
                filter_record_batch(&batch, &BooleanArray::from(take)).map_err(self.arrow_err())?;
            for (r, id) in ids.into_iter().enumerate() {
                captured_at.insert(id, (captured.len(), r));
            }
            captured.push(rows);
        }
        Ok(())
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

    /// Rewrites a file without the affected keys' rows and without the rows its
    /// deletion vector (`deleted`) marks, capturing those the TOAST fill needs. Returns
    /// the replacement file(s).
    pub(super) async fn rewrite(
        &self,
        data: Bytes,
        deleted: Option<RoaringTreemap>,
        reduced: &Reduced,
        captured: &mut Vec<RecordBatch>,
        captured_at: &mut HashMap<u32, (usize, usize)>,
    ) -> Result<Vec<Add>, LakeError> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(data)
            .and_then(|b| b.build())
            .map_err(|e| (self.delta_err())(DeltaTableError::from(e)))?;
        let mut writer = self.writer()?;
        let mut offset = 0u64;
        for batch in reader {
            let batch = batch.map_err(self.arrow_err())?;
            let batch = align(&batch, &self.schema).map_err(self.arrow_err())?;
            let keys = self.batch_keys(&batch).map_err(self.arrow_err())?;
            let mut keep = Vec::with_capacity(batch.num_rows());
            let mut take = Vec::with_capacity(batch.num_rows());
            let mut taken_ids = Vec::new();
            for i in 0..batch.num_rows() {
                if deleted
                    .as_ref()
                    .is_some_and(|d| d.contains(offset + i as u64))
                {
                    keep.push(false);
                    take.push(false);
                    continue;
                }
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
            offset += batch.num_rows() as u64;
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
                 \"never\"? during a chunked copy, the rows' chunk brings the values)"
            );
        }
        RecordBatch::try_new(self.schema.clone(), arrays)
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
