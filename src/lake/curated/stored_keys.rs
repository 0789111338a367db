//! The keys a curated table holds, read in key order from its latest version while the
//! apply stage goes on writing it: a chunked resync (`pipeline::chunked`) deletes those
//! the source no longer has (rows a lost change left behind).
//!
//! One integer key column; each call reads the table's new log entries, then the files
//! whose statistics admit keys past the start (delta-rs's scan, which applies deletion
//! vectors), keeping only the first keys asked for (a top-k sort: memory bounded by it).

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

    /// The first `limit` keys after `after` (`None`: from the first), ascending.
    pub async fn first(&mut self, after: Option<i64>, limit: usize) -> Result<Vec<i64>, LakeError> {
        let table = match self.table.as_mut() {
            Some(t) => {
                t.update_incremental(None)
                    .await
                    .map_err(|e| error(&self.label, e))?;
                t
            }
            None => match super::super::table::open_existing(&self.url, &self.label).await? {
                Some(t) => self.table.insert(t),
                None => return Ok(Vec::new()),
            },
        };
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
        if let Some(after) = after {
            frame = frame
                .filter(key.clone().gt(lit(after)))
                .map_err(|e| error(&self.label, e))?;
        }
        frame = frame
            .select(vec![key.clone()])
            .and_then(|f| f.sort(vec![key.sort(true, false)]))
            .and_then(|f| f.limit(0, Some(limit)))
            .map_err(|e| error(&self.label, e))?;
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
