//! The keys a curated table holds in a key range, read from its latest version while the
//! apply stage goes on writing it: a chunked resync (`pipeline::chunked`) deletes those
//! the source no longer has (rows a lost change left behind).
//!
//! One integer key column; each call reads the table's new log entries, then only the
//! files whose statistics admit the range (delta-rs's scan, which applies deletion
//! vectors).

use deltalake::DeltaTable;
use deltalake::arrow::array::{Array, AsArray};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Int64Type};
use deltalake::datafusion::common::Column;
use deltalake::datafusion::prelude::{SessionContext, col, lit};
use futures::StreamExt;

use crate::lake::{Lake, LakeError};
use crate::table_name::TableName;

/// A curated table opened for key lookups.
pub struct StoredKeys {
    table: Option<DeltaTable>,
    url: url::Url,
    label: String,
    key: String,
}

impl StoredKeys {
    pub fn new(lake: &Lake, name: &TableName, key: &str) -> StoredKeys {
        StoredKeys {
            table: None,
            url: lake.curated_table_url(name),
            label: format!("curated.{name}"),
            key: key.to_string(),
        }
    }

    /// The keys in `(after, through]` (`None`: unbounded), in no particular order.
    pub async fn between(
        &mut self,
        after: Option<i64>,
        through: Option<i64>,
    ) -> Result<Vec<i64>, LakeError> {
        let table = match self.table.as_mut() {
            Some(t) => {
                t.update_incremental(None)
                    .await
                    .map_err(|e| error(&self.label, e))?;
                t
            }
            None => {
                if super::super::table::surely_missing(&self.url) {
                    return Ok(Vec::new());
                }
                let t = DeltaTable::try_from_url(self.url.clone())
                    .await
                    .map_err(|e| error(&self.label, e))?;
                self.table.insert(t)
            }
        };
        if table.version().is_none() {
            return Ok(Vec::new());
        }
        let ctx = SessionContext::new();
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| error(&self.label, e))?;
        let provider = table
            .table_provider()
            .await
            .map_err(|e| error(&self.label, e))?;
        let key = col(Column::from_name(&self.key));
        let mut frame = ctx
            .read_table(provider)
            .map_err(|e| error(&self.label, e))?;
        let mut filter = None;
        if let Some(after) = after {
            filter = Some(key.clone().gt(lit(after)));
        }
        if let Some(through) = through {
            let upper = key.clone().lt_eq(lit(through));
            filter = Some(match filter {
                Some(f) => f.and(upper),
                None => upper,
            });
        }
        if let Some(filter) = filter {
            frame = frame.filter(filter).map_err(|e| error(&self.label, e))?;
        }
        frame = frame.select(vec![key]).map_err(|e| error(&self.label, e))?;
        let mut stream = frame
            .execute_stream()
            .await
            .map_err(|e| error(&self.label, e))?;
        let mut keys = Vec::new();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| error(&self.label, e))?;
            let column =
                cast(batch.column(0), &DataType::Int64).map_err(|e| error(&self.label, e))?;
            let column = column.as_primitive::<Int64Type>();
            keys.extend(
                (0..column.len())
                    .filter(|i| column.is_valid(*i))
                    .map(|i| column.value(i)),
            );
        }
        Ok(keys)
    }
}

fn error(label: &str, message: impl std::fmt::Display) -> LakeError {
    LakeError::Delta {
        table: label.to_string(),
        source: deltalake::DeltaTableError::Generic(message.to_string()),
    }
}
