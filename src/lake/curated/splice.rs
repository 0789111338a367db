//! Curated snapshot files spliced from the raw table's files.
//!
//! A snapshot writes every row to both tables with the same values: the curated columns
//! are raw columns (the source columns, `_commit_lsn`, `_commit_ts`, `_fallback`), except
//! those a normalization rule converts. Instead of encoding the rows a second time, a
//! curated file is made of a just-written raw file's encoded column chunks, copied byte
//! for byte with their Parquet statistics, page indexes and bloom filters; only the
//! converted columns are encoded, row group by row group alongside. Its Delta statistics
//! are the raw file's for the copied columns, computed for the converted ones. Parquet
//! encoding was about half of the daemon's CPU in a snapshot, and the copy is CPU-bound
//! (docs/performance.md).
//!
//! Only when every other curated column is stored exactly as its raw column (same Arrow
//! type and nullability, hence the same Parquet column); otherwise the snapshot encodes
//! the curated rows itself.

use std::collections::HashSet;

use bytes::Bytes;
use chrono::Timelike;
use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Decimal128Array, TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use deltalake::kernel::Add;
use deltalake::parquet::arrow::arrow_writer::compute_leaves;
use deltalake::parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use deltalake::parquet::bloom_filter::Sbbf;
use deltalake::parquet::column::writer::ColumnCloseResult;
use deltalake::parquet::errors::{ParquetError, Result};
use deltalake::parquet::file::metadata::{PageIndexPolicy, ParquetMetaDataReader};
use deltalake::parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

/// Where a curated column's chunks come from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    /// The raw file's leaf column with this index.
    Raw(usize),
    /// Encoded from the `i`th of the arrays handed to [`Splice::file`].
    Encoded(usize),
}

/// How the curated file of a raw file is assembled.
pub struct Splice {
    /// The curated table's Arrow schema.
    schema: SchemaRef,
    /// Per leaf column of the curated file (one per field: nested fields are only
    /// copied, never encoded), where it comes from.
    leaves: Vec<Source>,
    /// The curated columns copied from raw (whose Delta statistics are kept).
    copied: HashSet<String>,
    /// The converted columns, in the order of the arrays handed to [`Splice::file`].
    encoded: Vec<String>,
    properties: WriterProperties,
}

impl Splice {
    /// The splice of files of `raw` schema into files of `curated` schema, whose fields
    /// at the indices `converted` are encoded from arrays handed over, the others copied
    /// from the raw column of the same name; `None` when one of those is stored
    /// differently (or a converted one is not a date, timestamp or decimal).
    pub fn plan(
        raw: &SchemaRef,
        curated: &SchemaRef,
        converted: &[usize],
        properties: WriterProperties,
    ) -> Option<Splice> {
        let converter = ArrowSchemaConverter::new();
        let raw_leaves = converter.convert(raw).ok()?;
        let curated_leaves = converter.convert(curated).ok()?;
        let mut leaves = Vec::new();
        let mut copied = HashSet::new();
        let mut encoded = Vec::new();
        let mut next_leaf = curated_leaves.columns().iter().peekable();
        for (i, field) in curated.fields().iter().enumerate() {
            if converted.contains(&i) {
                if !matches!(
                    field.data_type(),
                    DataType::Date32
                        | DataType::Timestamp(TimeUnit::Microsecond, _)
                        | DataType::Decimal128(..)
                ) {
                    return None;
                }
                next_leaf.next()?;
                leaves.push(Source::Encoded(encoded.len()));
                encoded.push(field.name().clone());
                continue;
            }
            let r = raw.field_with_name(field.name()).ok()?;
            if r.data_type() != field.data_type() || r.is_nullable() != field.is_nullable() {
                return None;
            }
            // Every leaf of the field, in order (a list has one, a struct several).
            let path = field.name().as_str();
            let mut any = false;
            while let Some(leaf) = next_leaf
                .next_if(|leaf| leaf.path().parts().first().map(String::as_str) == Some(path))
            {
                let at = raw_leaves.columns().iter().position(|r| r == leaf)?;
                leaves.push(Source::Raw(at));
                any = true;
            }
            if !any {
                return None;
            }
            copied.insert(field.name().clone());
        }
        Some(Splice {
            schema: curated.clone(),
            leaves,
            copied,
            encoded,
            properties,
        })
    }

    /// The curated file holding the rows of the raw file `raw` (whose contents are
    /// `bytes`): its contents and its Add action (same file name, in the curated table),
    /// and how many rows it holds. The converted columns are the next rows of `arrays`
    /// from `offset` on.
    pub fn file(
        &self,
        raw: &Add,
        bytes: &Bytes,
        arrays: &[ArrayRef],
        offset: usize,
    ) -> Result<(Bytes, Add, usize)> {
        if arrays.len() != self.encoded.len() {
            return Err(ParquetError::General(format!(
                "{} converted columns handed over for {} ({:?})",
                arrays.len(),
                self.encoded.len(),
                self.encoded
            )));
        }
        let metadata = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Optional)
            .parse_and_finish(bytes)?;
        let rows = metadata.file_metadata().num_rows() as usize;
        if arrays.iter().any(|a| a.len() < offset + rows) {
            return Err(ParquetError::General(format!(
                "raw file {} holds {rows} rows from row {offset}, more than the rows converted",
                raw.path
            )));
        }
        let (mut file, columns) = ArrowWriter::try_new(
            Vec::with_capacity(bytes.len()),
            self.schema.clone(),
            Some(self.properties.clone()),
        )?
        .into_serialized_writer()?;
        let mut at = offset;
        for (i, group) in metadata.row_groups().iter().enumerate() {
            let group_rows = group.num_rows() as usize;
            let mut writers: Vec<_> = if self.encoded.is_empty() {
                Vec::new()
            } else {
                columns
                    .create_column_writers(i)?
                    .into_iter()
                    .map(Some)
                    .collect()
            };
            let mut out = file.next_row_group()?;
            for (leaf_index, source) in self.leaves.iter().enumerate() {
                match *source {
                    Source::Encoded(k) => {
                        let mut writer = writers
                            .get_mut(leaf_index)
                            .and_then(Option::take)
                            .ok_or_else(|| {
                                ParquetError::General(format!("no writer for column {leaf_index}"))
                            })?;
                        let field = self.schema.field_with_name(&self.encoded[k])?;
                        for leaf in compute_leaves(field, &arrays[k].slice(at, group_rows))? {
                            writer.write(&leaf)?;
                        }
                        writer.close()?.append_to_row_group(&mut out)?;
                    }
                    Source::Raw(leaf) => {
                        let column = group.columns().get(leaf).ok_or_else(|| {
                            ParquetError::General(format!(
                                "raw file {} lacks column {leaf}",
                                raw.path
                            ))
                        })?;
                        let column_index = metadata
                            .column_index()
                            .and_then(|c| c.get(i))
                            .and_then(|c| c.get(leaf))
                            .cloned();
                        let offset_index = metadata
                            .offset_index()
                            .and_then(|c| c.get(i))
                            .and_then(|c| c.get(leaf))
                            .cloned();
                        out.append_column(
                            bytes,
                            ColumnCloseResult {
                                bytes_written: column.compressed_size() as u64,
                                rows_written: group_rows as u64,
                                metadata: column.clone(),
                                bloom_filter: Sbbf::read_from_column_chunk(column, bytes)?,
                                column_index,
                                offset_index,
                            },
                        )?;
                    }
                }
            }
            out.close()?;
            at += group_rows;
        }
        file.finish()?;
        let contents = Bytes::from(std::mem::take(file.inner_mut()));
        let converted: Vec<ArrayRef> = arrays.iter().map(|a| a.slice(offset, rows)).collect();
        let add = Add {
            size: contents.len() as i64,
            modification_time: chrono::Utc::now().timestamp_millis(),
            stats: raw.stats.as_deref().and_then(|s| self.stats(s, &converted)),
            ..raw.clone()
        };
        Ok((contents, add, rows))
    }

    /// The raw file's Delta statistics restricted to the copied columns, with those of
    /// the `converted` columns (written as delta-rs writes them).
    fn stats(&self, raw: &str, converted: &[ArrayRef]) -> Option<String> {
        let mut stats: Value = serde_json::from_str(raw).ok()?;
        for key in ["minValues", "maxValues", "nullCount"] {
            match stats.get_mut(key) {
                Some(Value::Object(values)) => values.retain(|name, _| self.copied.contains(name)),
                _ => {
                    if let Some(all) = stats.as_object_mut() {
                        all.insert(key.to_string(), Value::Object(Map::new()));
                    }
                }
            }
        }
        for (name, array) in self.encoded.iter().zip(converted) {
            if let Some(Value::Object(nulls)) = stats.get_mut("nullCount") {
                nulls.insert(name.clone(), Value::from(array.null_count()));
            }
            if let Some((min, max)) = min_max(array) {
                if let Some(Value::Object(mins)) = stats.get_mut("minValues") {
                    mins.insert(name.clone(), min);
                }
                if let Some(Value::Object(maxs)) = stats.get_mut("maxValues") {
                    maxs.insert(name.clone(), max);
                }
            }
        }
        Some(stats.to_string())
    }
}

/// The smallest and largest value of a converted column as Delta statistics (as
/// delta-rs writes them: dates `YYYY-MM-DD`, timestamps in UTC truncated to
/// milliseconds, decimals as numbers); `None` when all are NULL.
fn min_max(array: &ArrayRef) -> Option<(Value, Value)> {
    use deltalake::arrow::compute::{max, min};
    match array.data_type() {
        DataType::Date32 => {
            let a: &Date32Array = array.as_primitive();
            let day = |d: i32| {
                let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?
                    .checked_add_signed(chrono::TimeDelta::days(i64::from(d)))?;
                Some(Value::from(date.format("%Y-%m-%d").to_string()))
            };
            Some((day(min(a)?)?, day(max(a)?)?))
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            let a: &TimestampMicrosecondArray = array.as_primitive();
            let at = |m: i64| {
                let t = chrono::DateTime::from_timestamp_micros(m)?.naive_utc();
                let format = if t.nanosecond() == 0 {
                    "%Y-%m-%dT%H:%M:%SZ"
                } else {
                    "%Y-%m-%dT%H:%M:%S%.3fZ"
                };
                Some(Value::from(t.format(format).to_string()))
            };
            Some((at(min(a)?)?, at(max(a)?)?))
        }
        DataType::Decimal128(_, scale) => {
            let a: &Decimal128Array = array.as_primitive();
            let scale = i32::from(*scale);
            let number = |v: i128| {
                if scale == 0 {
                    Some(Value::from(v as i64))
                } else {
                    Some(Value::from(v as f64 / 10f64.powi(scale)))
                }
            };
            Some((number(min(a)?)?, number(max(a)?)?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use deltalake::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use deltalake::arrow::datatypes::{DataType, Field, Schema};
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReader;

    use super::*;

    #[test]
    fn a_spliced_file_reads_back_as_the_curated_columns_with_the_raw_bloom_filter() {
        let raw: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("_op", DataType::Utf8, false),
            Field::new("_commit_lsn", DataType::Int64, false),
        ]));
        let curated: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("_commit_lsn", DataType::Int64, false),
        ]));
        let properties = crate::lake::table::keyed_properties(&["id".to_string()]);
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..50_000));
        let names: ArrayRef = Arc::new(StringArray::from_iter(
            (0..50_000).map(|i| (i % 7 != 0).then(|| format!("n{}", i % 13))),
        ));
        let ops: ArrayRef = Arc::new(StringArray::from(vec!["r"; 50_000]));
        let lsns: ArrayRef = Arc::new(Int64Array::from(vec![42; 50_000]));
        let batch = RecordBatch::try_new(
            raw.clone(),
            vec![ids.clone(), names.clone(), ops, lsns.clone()],
        )
        .unwrap();
        let mut writer =
            ArrowWriter::try_new(Vec::new(), raw.clone(), Some(properties.clone())).unwrap();
        // Two row groups.
        writer.write(&batch.slice(0, 30_000)).unwrap();
        writer.flush().unwrap();
        writer.write(&batch.slice(30_000, 20_000)).unwrap();
        let raw_bytes = Bytes::from(writer.into_inner().unwrap());
        let add = Add {
            path: "part-1.parquet".into(),
            size: raw_bytes.len() as i64,
            stats: Some(
                r#"{"numRecords":50000,"minValues":{"id":0,"name":"n0","_op":"r","_commit_lsn":42},"maxValues":{"id":49999,"name":"n9","_op":"r","_commit_lsn":42},"nullCount":{"id":0,"name":7143,"_op":0,"_commit_lsn":0}}"#.into(),
            ),
            data_change: true,
            ..Default::default()
        };

        let splice = Splice::plan(&raw, &curated, &[], properties).expect("same columns");
        let (bytes, spliced, rows) = splice.file(&add, &raw_bytes, &[], 0).unwrap();
        assert_eq!(rows, 50_000);
        assert_eq!(spliced.path, "part-1.parquet");
        assert_eq!(spliced.size, bytes.len() as i64);
        let stats: serde_json::Value =
            serde_json::from_str(spliced.stats.as_deref().unwrap()).unwrap();
        assert_eq!(stats["numRecords"], 50_000);
        assert!(stats["minValues"].get("_op").is_none());
        assert_eq!(stats["maxValues"]["id"], 49_999);

        let read: Vec<RecordBatch> = ParquetRecordBatchReader::try_new(bytes.clone(), 100_000)
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        let read = deltalake::arrow::compute::concat_batches(&read[0].schema(), &read).unwrap();
        assert_eq!(read.schema(), curated);
        assert_eq!(read.columns(), &[ids, names, lsns]);

        let metadata = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Required)
            .parse_and_finish(&bytes)
            .unwrap();
        assert_eq!(metadata.num_row_groups(), 2);
        let id = metadata.row_group(1).column(0);
        let bloom = Sbbf::read_from_column_chunk(id, &bytes)
            .unwrap()
            .expect("bloom filter");
        assert!(bloom.check(&30_000i64));
        assert!(metadata.offset_index().is_some());
    }

    #[test]
    fn converted_columns_are_encoded_beside_the_copied_ones_with_their_statistics() {
        let raw: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("paid", DataType::Utf8, true),
            Field::new("_op", DataType::Utf8, false),
        ]));
        let curated: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("paid", DataType::Date32, true),
        ]));
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..1000));
        let text: ArrayRef =
            Arc::new(StringArray::from_iter((0..1000).map(|i| {
                (i % 3 != 0).then(|| format!("2024-01-{:02}", 1 + i % 28))
            })));
        let ops: ArrayRef = Arc::new(StringArray::from(vec!["r"; 1000]));
        let batch = RecordBatch::try_new(raw.clone(), vec![ids.clone(), text, ops]).unwrap();
        let mut writer = ArrowWriter::try_new(Vec::new(), raw.clone(), None).unwrap();
        writer.write(&batch.slice(0, 600)).unwrap();
        writer.flush().unwrap();
        writer.write(&batch.slice(600, 400)).unwrap();
        let raw_bytes = Bytes::from(writer.into_inner().unwrap());
        // The converted column, with 5 rows of an earlier file before these.
        let days: ArrayRef =
            Arc::new(Date32Array::from_iter((0..1005).map(|i| {
                (i >= 5 && (i - 5) % 3 != 0).then(|| 19_723 + (i - 5) % 28)
            })));
        let add = Add {
            path: "part-2.parquet".into(),
            stats: Some(r#"{"numRecords":1000,"minValues":{"id":0,"paid":"2024-01-01"},"maxValues":{"id":999,"paid":"2024-01-28"},"nullCount":{"id":0,"paid":334,"_op":0}}"#.into()),
            ..Default::default()
        };
        let splice = Splice::plan(&raw, &curated, &[1], WriterProperties::default()).unwrap();
        let (bytes, spliced, rows) = splice
            .file(&add, &raw_bytes, std::slice::from_ref(&days), 5)
            .unwrap();
        assert_eq!(rows, 1000);
        let stats: serde_json::Value =
            serde_json::from_str(spliced.stats.as_deref().unwrap()).unwrap();
        assert_eq!(stats["minValues"]["paid"], "2024-01-01");
        assert_eq!(stats["maxValues"]["paid"], "2024-01-28");
        assert_eq!(stats["nullCount"]["paid"], 334);
        assert!(stats["nullCount"].get("_op").is_none());
        let read: Vec<RecordBatch> = ParquetRecordBatchReader::try_new(bytes, 100_000)
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        let read = deltalake::arrow::compute::concat_batches(&read[0].schema(), &read).unwrap();
        assert_eq!(read.schema(), curated);
        assert_eq!(read.column(0), &ids);
        assert_eq!(read.column(1), &days.slice(5, 1000));
        // Too few converted rows for the file: an error, not a short file.
        assert!(splice.file(&add, &raw_bytes, &[days], 10).is_err());
    }

    #[test]
    fn a_column_stored_differently_is_not_spliced() {
        let raw: SchemaRef = Arc::new(Schema::new(vec![Field::new("v", DataType::Utf8, true)]));
        let curated: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("v", DataType::Date32, true)]));
        assert!(Splice::plan(&raw, &curated, &[], WriterProperties::default()).is_none());
    }
}
