//! The raw change-log layout: the Arrow schema of a raw table and the builder that
//! encodes change rows into it, one table at a time.
//!
//! A [`RawBatchBuilder`] holds one typed Arrow builder per source column plus the metadata
//! columns (`_op`, `_commit_lsn`, `_lsn`, `_commit_ts`, `_xid`, `_seq`, `_before`,
//! `_unchanged_toast`, `_fallback`). Values arrive in Postgres text form and are parsed
//! once, straight into the builder; values with no exact typed form go to `_fallback`.

use std::collections::BTreeMap;
use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int64Builder, ListArray, ListBuilder, NullBufferBuilder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use deltalake::arrow::buffer::OffsetBuffer;
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;

use crate::change::message::{OldTuple, Tuple, TupleValue};
use crate::change::{ChangeEncoder, ChangeMeta, ColumnSpec, METADATA_COLUMNS, Op};
use crate::pg_binary::{self, BinaryType, Decoded};
use crate::pg_types::{ColumnKind, Value, parse_value};

/// The Arrow schema of a raw table with these source columns.
pub fn raw_schema(columns: &[ColumnSpec]) -> SchemaRef {
    let utc = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut fields: Vec<Field> = columns
        .iter()
        .map(|c| Field::new(&c.name, c.kind.arrow_type(), true))
        .collect();
    fields.extend([
        Field::new("_op", DataType::Utf8, false),
        Field::new("_commit_lsn", DataType::Int64, false),
        Field::new("_lsn", DataType::Int64, false),
        Field::new("_commit_ts", utc(), false),
        Field::new("_xid", DataType::Int64, false),
        Field::new("_seq", DataType::Int64, false),
        Field::new("_before", DataType::Utf8, true),
        Field::new(
            "_unchanged_toast",
            DataType::List(Arc::new(Field::new("element", DataType::Utf8, true))),
            true,
        ),
        Field::new("_fallback", DataType::Utf8, true),
    ]);
    Arc::new(Schema::new(fields))
}

/// `batch` (read back from a raw table, whose files may predate columns or use other
/// Arrow encodings of the same types) shaped as `schema`: columns matched by name, cast
/// where the encoding differs, NULL where the batch lacks them.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(array) if array.data_type() == field.data_type() => Ok(array.clone()),
            Some(array) => deltalake::arrow::compute::cast(array, field.data_type()),
            None => Ok(deltalake::arrow::array::new_null_array(
                field.data_type(),
                batch.num_rows(),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &deltalake::arrow::record_batch::RecordBatchOptions::new()
            .with_row_count(Some(batch.num_rows())),
    )
}

/// A typed Arrow builder for one column.
enum ColumnBuilder {
    Bool(BooleanBuilder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Text(StringBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder, bool),
    Bytes(BinaryBuilder),
    List {
        field: Arc<Field>,
        values: Box<ColumnBuilder>,
        offsets: Vec<i32>,
        validity: NullBufferBuilder,
    },
}

impl ColumnBuilder {
    fn new(kind: &ColumnKind) -> ColumnBuilder {
        match kind {
            ColumnKind::Bool => ColumnBuilder::Bool(BooleanBuilder::new()),
            ColumnKind::Int64 => ColumnBuilder::Int64(Int64Builder::new()),
            ColumnKind::Float32 => ColumnBuilder::Float32(Float32Builder::new()),
            ColumnKind::Float64 => ColumnBuilder::Float64(Float64Builder::new()),
            ColumnKind::Decimal { precision, scale } => {
                ColumnBuilder::Decimal(Decimal128Builder::new(), *precision, *scale)
            }
            ColumnKind::Text => ColumnBuilder::Text(StringBuilder::new()),
            ColumnKind::Date => ColumnBuilder::Date(Date32Builder::new()),
            ColumnKind::Timestamp => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::new(), false)
            }
            ColumnKind::TimestampTz => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::new(), true)
            }
            ColumnKind::Bytea => ColumnBuilder::Bytes(BinaryBuilder::new()),
            ColumnKind::List(elem) => ColumnBuilder::List {
                field: Arc::new(Field::new("element", elem.arrow_type(), true)),
                values: Box::new(ColumnBuilder::new(elem)),
                offsets: vec![0],
                validity: NullBufferBuilder::new(0),
            },
        }
    }

    fn append_null(&mut self) {
        match self {
            ColumnBuilder::Bool(b) => b.append_null(),
            ColumnBuilder::Int64(b) => b.append_null(),
            ColumnBuilder::Float32(b) => b.append_null(),
            ColumnBuilder::Float64(b) => b.append_null(),
            ColumnBuilder::Decimal(b, ..) => b.append_null(),
            ColumnBuilder::Text(b) => b.append_null(),
            ColumnBuilder::Date(b) => b.append_null(),
            ColumnBuilder::Timestamp(b, _) => b.append_null(),
            ColumnBuilder::Bytes(b) => b.append_null(),
            ColumnBuilder::List {
                offsets, validity, ..
            } => {
                offsets.push(*offsets.last().unwrap_or(&0));
                validity.append_null();
            }
        }
    }

    /// Appends a parsed value. The value always matches the builder: both come from the
    /// same `ColumnKind`; a mismatch (a bug) appends NULL rather than panicking.
    fn append_value(&mut self, value: Value) {
        match (self, value) {
            (ColumnBuilder::Bool(b), Value::Bool(v)) => b.append_value(v),
            (ColumnBuilder::Int64(b), Value::Int64(v)) => b.append_value(v),
            (ColumnBuilder::Float32(b), Value::Float32(v)) => b.append_value(v),
            (ColumnBuilder::Float64(b), Value::Float64(v)) => b.append_value(v),
            (ColumnBuilder::Decimal(b, ..), Value::Decimal(v)) => b.append_value(v),
            (ColumnBuilder::Text(b), Value::Text(v)) => b.append_value(v),
            (ColumnBuilder::Date(b), Value::Date(v)) => b.append_value(v),
            (ColumnBuilder::Timestamp(b, _), Value::Micros(v)) => b.append_value(v),
            (ColumnBuilder::Bytes(b), Value::Bytes(v)) => b.append_value(v),
            (
                ColumnBuilder::List {
                    values,
                    offsets,
                    validity,
                    ..
                },
                Value::List(items),
            ) => {
                let len = i32::try_from(items.len()).unwrap_or(i32::MAX);
                for item in items {
                    match item {
                        Some(v) => values.append_value(v),
                        None => values.append_null(),
                    }
                }
                offsets.push(offsets.last().unwrap_or(&0).saturating_add(len));
                validity.append_non_null();
            }
            (b, _) => b.append_null(),
        }
    }

    fn finish(&mut self) -> Result<ArrayRef, ArrowError> {
        Ok(match self {
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::Int64(b) => Arc::new(b.finish()),
            ColumnBuilder::Float32(b) => Arc::new(b.finish()),
            ColumnBuilder::Float64(b) => Arc::new(b.finish()),
            ColumnBuilder::Decimal(b, p, s) => {
                Arc::new(b.finish().with_precision_and_scale(*p, *s)?)
            }
            ColumnBuilder::Text(b) => Arc::new(b.finish()),
            ColumnBuilder::Date(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b, tz) => {
                let a = b.finish();
                Arc::new(if *tz { a.with_timezone("UTC") } else { a })
            }
            ColumnBuilder::Bytes(b) => Arc::new(b.finish()),
            ColumnBuilder::List {
                field,
                values,
                offsets,
                validity,
            } => {
                let offsets = OffsetBuffer::new(std::mem::replace(offsets, vec![0]).into());
                let nulls = validity.finish();
                Arc::new(ListArray::try_new(
                    field.clone(),
                    offsets,
                    values.finish()?,
                    nulls,
                )?)
            }
        })
    }
}

/// Parses text values of one column into an Arrow array (NULL where a value has no typed
/// form).
pub fn parse_column(kind: &ColumnKind, values: &[Option<&str>]) -> Result<ArrayRef, ArrowError> {
    let mut builder = ColumnBuilder::new(kind);
    for value in values {
        match value.and_then(|text| parse_value(kind, text)) {
            Some(v) => builder.append_value(v),
            None => builder.append_null(),
        }
    }
    builder.finish()
}

/// Accumulates raw change rows for one table.
pub struct RawBatchBuilder {
    schema: SchemaRef,
    columns: Vec<ColumnSpec>,
    builders: Vec<ColumnBuilder>,
    op: StringBuilder,
    commit_lsn: Int64Builder,
    lsn: Int64Builder,
    commit_ts: TimestampMicrosecondBuilder,
    xid: Int64Builder,
    seq: Int64Builder,
    before: StringBuilder,
    unchanged: ListBuilder<StringBuilder>,
    fallback: StringBuilder,
    rows: usize,
    bytes: usize,
}

impl RawBatchBuilder {
    pub fn new(columns: Vec<ColumnSpec>) -> RawBatchBuilder {
        RawBatchBuilder {
            schema: raw_schema(&columns),
            builders: columns
                .iter()
                .map(|c| ColumnBuilder::new(&c.kind))
                .collect(),
            columns,
            op: StringBuilder::new(),
            commit_lsn: Int64Builder::new(),
            lsn: Int64Builder::new(),
            commit_ts: TimestampMicrosecondBuilder::new(),
            xid: Int64Builder::new(),
            seq: Int64Builder::new(),
            before: StringBuilder::new(),
            unchanged: ListBuilder::new(StringBuilder::new()).with_field(Arc::new(Field::new(
                "element",
                DataType::Utf8,
                true,
            ))),
            fallback: StringBuilder::new(),
            rows: 0,
            bytes: 0,
        }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    pub fn columns(&self) -> &[ColumnSpec] {
        &self.columns
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Takes new source types for columns whose storage does not change (checked by
    /// `apply::schema::retype`); anything else is ignored.
    pub fn retype(&mut self, columns: Vec<ColumnSpec>) {
        let same_storage = columns.len() == self.columns.len()
            && columns
                .iter()
                .zip(&self.columns)
                .all(|(a, b)| a.name == b.name && a.kind == b.kind);
        if same_storage {
            self.columns = columns;
        }
    }

    /// Approximate bytes of change data buffered.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends one change. `row` maps each lake column to its value in the tuple
    /// (`positions[i]` is the tuple index of lake column `i`, `None` when the stream's
    /// relation does not have it). Returns the number of values kept in `_fallback`.
    pub fn append(
        &mut self,
        op: Op,
        meta: ChangeMeta,
        row: Option<&Tuple>,
        positions: &[Option<usize>],
        before: Option<&OldTuple>,
    ) -> usize {
        let image = before.map(|old| old_image(&self.columns, positions, old.tuple()));
        self.append_with(op, meta, image, |i| {
            match row.and_then(|t| positions.get(i).copied().flatten().and_then(|p| t.0.get(p))) {
                None | Some(TupleValue::Null) => Cell::Null,
                Some(TupleValue::UnchangedToast) => Cell::Unchanged,
                Some(TupleValue::Text(bytes)) => Cell::Text(bytes),
            }
        })
        .0
    }

    /// Appends one row whose lake column `i` holds `value(i)`, with the old row's `image`.
    /// Returns the number of values kept in `_fallback`, and the first column whose binary
    /// value was not one of its type (appended as NULL).
    fn append_with<'v>(
        &mut self,
        op: Op,
        meta: ChangeMeta,
        image: Option<String>,
        value: impl Fn(usize) -> Cell<'v>,
    ) -> (usize, Option<usize>) {
        let mut malformed = None;
        let mut unchanged: Vec<&str> = Vec::new();
        let mut fallback: BTreeMap<&str, String> = BTreeMap::new();
        for (i, builder) in self.builders.iter_mut().enumerate() {
            match value(i) {
                Cell::Null => builder.append_null(),
                Cell::Unchanged => {
                    builder.append_null();
                    unchanged.push(&self.columns[i].name);
                }
                Cell::Text(bytes) => {
                    self.bytes += bytes.len();
                    // The common case (valid UTF-8) through std's faster check.
                    let text = match std::str::from_utf8(bytes) {
                        Ok(text) => std::borrow::Cow::Borrowed(text),
                        Err(_) => String::from_utf8_lossy(bytes),
                    };
                    // Text is stored as it comes: no owned copy on the way.
                    if let ColumnBuilder::Text(b) = builder {
                        b.append_value(&text);
                        continue;
                    }
                    match parse_value(&self.columns[i].kind, &text) {
                        Some(v) => builder.append_value(v),
                        None => {
                            builder.append_null();
                            fallback.insert(&self.columns[i].name, text.into_owned());
                        }
                    }
                }
                Cell::Binary(bytes, ty) => {
                    self.bytes += bytes.len();
                    match pg_binary::decode(ty, &self.columns[i].kind, bytes) {
                        Some(Decoded::Value(v)) => builder.append_value(v),
                        Some(Decoded::Text(text)) => match builder {
                            ColumnBuilder::Text(b) => b.append_value(&text),
                            b => b.append_null(),
                        },
                        Some(Decoded::Untyped(text)) => {
                            builder.append_null();
                            fallback.insert(&self.columns[i].name, text);
                        }
                        None => {
                            builder.append_null();
                            malformed = malformed.or(Some(i));
                        }
                    }
                }
            }
        }
        self.op.append_value(op.code());
        self.commit_lsn.append_value(meta.commit_lsn.as_i64());
        self.lsn.append_value(meta.lsn.as_i64());
        self.commit_ts.append_value(meta.commit_ts);
        self.xid.append_value(i64::from(meta.xid.0));
        self.seq.append_value(meta.seq);
        match image {
            Some(image) => {
                self.bytes += image.len();
                self.before.append_value(image);
            }
            None => self.before.append_null(),
        }
        if unchanged.is_empty() {
            self.unchanged.append_null();
        } else {
            for name in &unchanged {
                self.unchanged.values().append_value(name);
            }
            self.unchanged.append(true);
        }
        let fallback_count = fallback.len();
        if fallback.is_empty() {
            self.fallback.append_null();
        } else {
            let json = serde_json::to_string(&fallback).unwrap_or_default();
            self.bytes += json.len();
            self.fallback.append_value(json);
        }
        self.rows += 1;
        self.bytes += 64;
        (fallback_count, malformed)
    }

    /// Takes the buffered rows as a record batch and starts empty again.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let mut arrays = Vec::with_capacity(self.builders.len() + METADATA_COLUMNS.len());
        for b in &mut self.builders {
            arrays.push(b.finish()?);
        }
        arrays.push(Arc::new(self.op.finish()));
        arrays.push(Arc::new(self.commit_lsn.finish()));
        arrays.push(Arc::new(self.lsn.finish()));
        arrays.push(Arc::new(self.commit_ts.finish().with_timezone("UTC")));
        arrays.push(Arc::new(self.xid.finish()));
        arrays.push(Arc::new(self.seq.finish()));
        arrays.push(Arc::new(self.before.finish()));
        arrays.push(Arc::new(self.unchanged.finish()));
        arrays.push(Arc::new(self.fallback.finish()));
        self.rows = 0;
        self.bytes = 0;
        RecordBatch::try_new(self.schema.clone(), arrays)
    }
}

impl ChangeEncoder for RawBatchBuilder {
    fn append(
        &mut self,
        op: Op,
        meta: ChangeMeta,
        row: Option<&Tuple>,
        positions: &[Option<usize>],
        before: Option<&OldTuple>,
    ) -> usize {
        RawBatchBuilder::append(self, op, meta, row, positions, before)
    }

    /// A snapshot's COPY rows, without a [`Tuple`] of reference-counted slices per row.
    fn append_text(
        &mut self,
        op: Op,
        meta: ChangeMeta,
        values: &[Option<std::borrow::Cow<'_, [u8]>>],
        positions: &[Option<usize>],
    ) -> usize {
        self.append_with(op, meta, None, |i| {
            match positions
                .get(i)
                .copied()
                .flatten()
                .and_then(|p| values.get(p))
            {
                Some(Some(bytes)) => Cell::Text(bytes.as_ref()),
                _ => Cell::Null,
            }
        })
        .0
    }

    /// A snapshot's binary COPY rows, decoded straight into the builders.
    fn append_binary(
        &mut self,
        op: Op,
        meta: ChangeMeta,
        values: &[Option<&[u8]>],
        types: &[BinaryType],
        positions: &[Option<usize>],
    ) -> Result<usize, usize> {
        let (fallback, malformed) = self.append_with(op, meta, None, |i| {
            let copied = positions.get(i).copied().flatten();
            match copied.and_then(|p| Some((values.get(p)?.as_ref()?, types.get(p)?))) {
                Some((bytes, ty)) => Cell::Binary(bytes, *ty),
                None => Cell::Null,
            }
        });
        malformed.map_or(Ok(fallback), Err)
    }

    fn rows(&self) -> usize {
        self.rows
    }

    fn bytes(&self) -> usize {
        self.bytes
    }

    fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        RawBatchBuilder::finish(self)
    }
}

/// One lake column's value in a row being appended.
enum Cell<'a> {
    Null,
    /// An unchanged TOASTed value the stream did not send.
    Unchanged,
    Text(&'a [u8]),
    /// A binary COPY value of this type.
    Binary(&'a [u8], BinaryType),
}

/// The old row image as a JSON object of column name → text value (or null).
fn old_image(columns: &[ColumnSpec], positions: &[Option<usize>], old: &Tuple) -> String {
    let mut map = serde_json::Map::new();
    for (i, col) in columns.iter().enumerate() {
        let Some(v) = positions
            .get(i)
            .copied()
            .flatten()
            .and_then(|p| old.0.get(p))
        else {
            continue;
        };
        match v {
            TupleValue::Text(b) => {
                map.insert(
                    col.name.clone(),
                    serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
                );
            }
            TupleValue::Null => {}
            TupleValue::UnchangedToast => {}
        }
    }
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn builds_typed_batch_with_fallback_and_toast_markers() {
        let cols = vec![
            ColumnSpec {
                name: "id".into(),
                kind: ColumnKind::Int64,
                type_oid: 20,
                type_modifier: -1,
            },
            ColumnSpec {
                name: "d".into(),
                kind: ColumnKind::Date,
                type_oid: 1082,
                type_modifier: -1,
            },
            ColumnSpec {
                name: "big".into(),
                kind: ColumnKind::Text,
                type_oid: 25,
                type_modifier: -1,
            },
            ColumnSpec {
                name: "tags".into(),
                kind: ColumnKind::List(Box::new(ColumnKind::Int64)),
                type_oid: 1007,
                type_modifier: -1,
            },
        ];
        let mut b = RawBatchBuilder::new(cols);
        let t = |s: &'static str| TupleValue::Text(Bytes::from_static(s.as_bytes()));
        let meta = ChangeMeta {
            commit_lsn: crate::lsn::Lsn(10),
            lsn: crate::lsn::Lsn(5),
            commit_ts: 0,
            xid: crate::change::Xid(7),
            seq: 0,
        };
        let positions = [Some(0), Some(1), Some(2), Some(3)];
        b.append(
            Op::Insert,
            meta,
            Some(&Tuple(vec![t("1"), t("2024-01-05"), t("x"), t("{1,NULL}")])),
            &positions,
            None,
        );
        let n = b.append(
            Op::Update,
            meta,
            Some(&Tuple(vec![
                t("1"),
                t("infinity"),
                TupleValue::UnchangedToast,
                TupleValue::Null,
            ])),
            &positions,
            None,
        );
        assert_eq!(n, 1);
        let batch = b.finish().unwrap();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema().fields().len(), 4 + METADATA_COLUMNS.len());
        let fallback = batch.column_by_name("_fallback").unwrap();
        assert!(fallback.is_null(0) && !fallback.is_null(1));
        assert!(batch.column_by_name("d").unwrap().is_null(1));
        assert!(!batch.column_by_name("_unchanged_toast").unwrap().is_null(1));
        assert_eq!(b.rows(), 0);
    }
}
