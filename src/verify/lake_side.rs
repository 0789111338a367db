//! The lake side of `verify`: the curated table read at one version and hashed row by row
//! as the source's SQL does, and the keys the raw change log says changed after the
//! source's snapshot (they differ for a good reason and are left out).
//!
//! Both are streamed batch by batch; nothing holds a whole table.

use std::collections::HashSet;
use std::sync::Arc;

use deltalake::DeltaTable;
use deltalake::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::DataType;
use deltalake::datafusion::prelude::{Expr, SessionContext, col, lit};
use futures::StreamExt;
use url::Url;

use super::VerifyError;
use super::canonical::{Compared, ValueWriter, fallbacks, push_piece};
use crate::lake::raw::layout::parse_column;
use crate::lsn::Lsn;

/// One table's Delta files at the version it was opened at.
pub struct LakeTable {
    table: DeltaTable,
    label: String,
}

impl LakeTable {
    /// The table's latest version, or `None` when it does not exist.
    pub async fn open(url: &Url, label: &str) -> Result<Option<LakeTable>, VerifyError> {
        let delta = |e: deltalake::DeltaTableError| VerifyError::LakeRead {
            table: label.to_string(),
            message: e.to_string(),
        };
        if crate::lake::table::surely_missing(url) {
            return Ok(None);
        }
        let table = DeltaTable::try_from_url(url.clone()).await.map_err(delta)?;
        if table.version().is_none() {
            return Ok(None);
        }
        Ok(Some(LakeTable {
            table,
            label: label.to_string(),
        }))
    }

    pub fn version(&self) -> u64 {
        self.table.version().unwrap_or_default()
    }

    /// The table's column names.
    pub fn columns(&self) -> Result<Vec<String>, VerifyError> {
        let snapshot = self.table.snapshot().map_err(|e| self.error(e))?;
        Ok(snapshot
            .schema()
            .fields()
            .map(|f| f.name().to_string())
            .collect())
    }

    fn error(&self, e: impl std::fmt::Display) -> VerifyError {
        VerifyError::LakeRead {
            table: self.label.clone(),
            message: e.to_string(),
        }
    }

    /// Streams `columns` of the rows matching `filter`, batch by batch, into `visit`.
    async fn scan(
        &self,
        columns: &[&str],
        filter: Option<Expr>,
        mut visit: impl FnMut(&RecordBatch) -> Result<(), VerifyError>,
    ) -> Result<(), VerifyError> {
        let ctx = SessionContext::new();
        self.table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| self.error(e))?;
        let provider = self
            .table
            .table_provider()
            .await
            .map_err(|e| self.error(e))?;
        let mut frame = ctx.read_table(provider).map_err(|e| self.error(e))?;
        if let Some(filter) = filter {
            frame = frame.filter(filter).map_err(|e| self.error(e))?;
        }
        let exprs: Vec<Expr> = columns
            .iter()
            .map(|c| col(deltalake::datafusion::common::Column::from_name(*c)))
            .collect();
        frame = frame.select(exprs).map_err(|e| self.error(e))?;
        let mut stream = frame.execute_stream().await.map_err(|e| self.error(e))?;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| self.error(e))?;
            visit(&batch)?;
        }
        Ok(())
    }

    /// Every row's canonical key and row hash, as [`super::canonical`] defines them.
    pub async fn hash_rows(
        &self,
        columns: &[Compared],
        key: &[usize],
        mut visit: impl FnMut(&str, u64),
    ) -> Result<(), VerifyError> {
        let mut names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        names.push("_fallback");
        let label = self.label.clone();
        self.scan(&names, None, |batch| {
            let writers = writers(batch, columns, &label)?;
            let fallback = text_column(batch, columns.len(), &label)?;
            let fallback = &fallback;
            let mut key_text = String::new();
            let mut row_text = String::new();
            let mut values: Vec<Option<String>> = Vec::with_capacity(columns.len());
            for row in 0..batch.num_rows() {
                let fallback = fallbacks(Some(fallback), row);
                values.clear();
                for (writer, column) in writers.iter().zip(columns) {
                    let text = fallback.get(&column.name).and_then(|v| v.as_str());
                    values.push(writer.value(row, text));
                }
                key_text.clear();
                row_text.clear();
                for i in key {
                    push_piece(&mut key_text, values[*i].as_deref());
                }
                for v in &values {
                    push_piece(&mut row_text, v.as_deref());
                }
                visit(&key_text, super::canonical::row_hash(&row_text));
            }
            Ok(())
        })
        .await
    }

    /// The canonical keys of rows changed at or after `point` (the source snapshot's
    /// consistent point): their current values differ from the snapshot's for a good
    /// reason. Also says whether the table was truncated or copied again meanwhile.
    pub async fn changed_since(
        &self,
        point: Lsn,
        key_columns: &[Compared],
    ) -> Result<Changed, VerifyError> {
        let mut names: Vec<&str> = key_columns.iter().map(|c| c.name.as_str()).collect();
        names.extend(["_op", "_before", "_fallback"]);
        let filter = col("_commit_lsn").gt_eq(lit(point.as_i64()));
        let mut changed = Changed::default();
        let label = self.label.clone();
        self.scan(&names, Some(filter), |batch| {
            let writers = writers(batch, key_columns, &label)?;
            let n = key_columns.len();
            let ops = text_column(batch, n, &label)?;
            let ops = ops.as_string_opt::<i32>();
            let before = text_column(batch, n + 1, &label)?;
            let before = before.as_string_opt::<i32>();
            let fallback = &text_column(batch, n + 2, &label)?;
            for row in 0..batch.num_rows() {
                match ops.map(|o| o.value(row)) {
                    Some("t") => changed.truncated = true,
                    Some("r") => changed.copied = true,
                    _ => {}
                }
                let fallback = fallbacks(Some(fallback), row);
                let mut key = String::new();
                for (writer, column) in writers.iter().zip(key_columns) {
                    let text = fallback.get(&column.name).and_then(|v| v.as_str());
                    push_piece(&mut key, writer.value(row, text).as_deref());
                }
                changed.keys.insert(key);
                // An update that changed the key also removed the old one.
                if let Some(image) = before.filter(|b| !b.is_null(row))
                    && let Some(key) = old_key(image.value(row), key_columns)
                {
                    changed.keys.insert(key);
                }
            }
            Ok(())
        })
        .await?;
        Ok(changed)
    }
}

/// What the raw change log says happened after the snapshot.
#[derive(Default)]
pub struct Changed {
    pub keys: HashSet<String>,
    pub truncated: bool,
    /// A snapshot copy (`r` rows) landed: the table was copied again.
    pub copied: bool,
}

fn writers(
    batch: &RecordBatch,
    columns: &[Compared],
    label: &str,
) -> Result<Vec<ValueWriter>, VerifyError> {
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            ValueWriter::new(batch.column(i), &c.kind).map_err(|e| VerifyError::LakeRead {
                table: label.to_string(),
                message: format!("column {}: {e}", c.name),
            })
        })
        .collect()
}

/// Column `i` of `batch` as plain `Utf8` (the reader may hand out string views).
fn text_column(batch: &RecordBatch, i: usize, label: &str) -> Result<ArrayRef, VerifyError> {
    let array = batch.column(i);
    if array.data_type() == &DataType::Utf8 {
        return Ok(array.clone());
    }
    cast(array, &DataType::Utf8).map_err(|e| VerifyError::LakeRead {
        table: label.to_string(),
        message: format!("column {}: {e}", batch.schema().field(i).name()),
    })
}

/// The canonical key of an old-key image (`_before`: column → Postgres text).
fn old_key(image: &str, key_columns: &[Compared]) -> Option<String> {
    let serde_json::Value::Object(values) = serde_json::from_str(image).ok()? else {
        return None;
    };
    let mut key = String::new();
    for column in key_columns {
        let text = values.get(&column.name).and_then(|v| v.as_str());
        let value = match text {
            None => None,
            Some(text) => {
                let array: ArrayRef = parse_column(&column.kind, &[Some(text)]).ok()?;
                let array: Arc<dyn Array> = array;
                ValueWriter::new(&array, &column.kind)
                    .ok()?
                    .value(0, Some(text))
            }
        };
        push_piece(&mut key, value.as_deref());
    }
    Some(key)
}
