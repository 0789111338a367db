//! Scanning a Delta table whose files carry deletion vectors as a plain Parquet scan.
//!
//! delta-rs 1.1 reads a table with deletion vectors on a single partition and without
//! pushing predicates into Parquet (no row-group, page-index or bloom-filter pruning), so
//! that it can count rows as it applies each DV: a point lookup on a curated table that
//! absorbed uniform updates read every candidate file whole, 8 times slower than the same
//! table written copy-on-write (docs/performance.md). This provider hands DataFusion each
//! file's deletion vector as a file-level row selection instead (`ParquetRowSelection`,
//! DataFusion's hook for external indexes): the scan then runs like any Parquet scan —
//! on every partition, with statistics, page-index and bloom-filter pruning — and the
//! deleted rows are never decoded.
//!
//! Files carry the min/max of their integer columns from the Delta log as statistics, so
//! a point lookup skips the files whose key range excludes it without opening them.
//!
//! It is used only where it is exact: tables without partition columns or column mapping,
//! whose reader features are `deletionVectors` (and `timestampNtz`), and whose DV'd files
//! record `numRecords`; anything else is read by delta-rs's provider as before. Files are
//! kept per path and DV, so a new lake position re-reads only new DVs.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use deltalake::DeltaTable;
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::datafusion::catalog::Session;
use deltalake::datafusion::common::stats::Precision;
use deltalake::datafusion::common::{DFSchema, DataFusionError, Result, ScalarValue, Statistics};
use deltalake::datafusion::datasource::TableProvider;
use deltalake::datafusion::datasource::listing::PartitionedFile;
use deltalake::datafusion::datasource::physical_plan::parquet::ParquetRowSelection;
use deltalake::datafusion::datasource::physical_plan::{
    FileGroup, FileScanConfigBuilder, ParquetSource,
};
use deltalake::datafusion::datasource::source::DataSourceExec;
use deltalake::datafusion::execution::object_store::ObjectStoreUrl;
use deltalake::datafusion::execution::runtime_env::RuntimeEnv;
use deltalake::datafusion::logical_expr::utils::conjunction;
use deltalake::datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use deltalake::datafusion::physical_plan::ExecutionPlan;
use deltalake::logstore::LogStore;
use deltalake::parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use roaring::RoaringTreemap;
use tokio::sync::Mutex;

use crate::lake::deletion_vector;

/// Reader features a table may have for this provider to read it.
const UNDERSTOOD: [&str; 2] = ["deletionVectors", "timestampNtz"];

/// Files as DataFusion scans them (statistics, the DV's row selection), by table, file
/// path and DV, kept while the file and its DV are live (a selection takes 16 bytes per
/// run of kept or deleted rows; purging bounds the deleted share of a file).
#[derive(Default)]
pub struct Selections {
    by_table: Mutex<HashMap<String, HashMap<(String, String), PartitionedFile>>>,
}

/// A table whose live files skip their deleted rows through row selections.
#[derive(Debug)]
pub struct DvScan {
    schema: SchemaRef,
    store: ObjectStoreUrl,
    files: Vec<PartitionedFile>,
}

/// The provider for `table` when its files carry deletion vectors and this module can
/// read it exactly; `None` otherwise (delta-rs's provider reads it). `logical` is the
/// schema delta-rs's provider presents, kept so both read the same types. With
/// `selections`, DV row selections are cached across calls.
pub async fn provider(
    runtime: &RuntimeEnv,
    table: &DeltaTable,
    logical: SchemaRef,
    selections: Option<&Selections>,
) -> Result<Option<Arc<dyn TableProvider>>> {
    let to_df = |e: deltalake::DeltaTableError| DataFusionError::External(Box::new(e));
    let snapshot = table.snapshot().map_err(to_df)?;
    let protocol = snapshot.protocol();
    let readable = snapshot.metadata().partition_columns().is_empty()
        && !snapshot
            .metadata()
            .configuration()
            .contains_key("delta.columnMapping.mode")
        && protocol
            .reader_features()
            .is_none_or(|features| features.iter().all(|f| UNDERSTOOD.contains(&f.as_ref())));
    if !readable {
        return Ok(None);
    }
    let views: Vec<_> = snapshot.log_data().iter().collect();
    if views
        .iter()
        .all(|v| v.deletion_vector_descriptor().is_none())
    {
        return Ok(None);
    }
    let key = table.table_url().to_string();
    let mut cached = match selections {
        Some(s) => s.by_table.lock().await.remove(&key).unwrap_or_default(),
        None => HashMap::new(),
    };
    let mut kept = HashMap::new();
    let mut files = Vec::with_capacity(views.len());
    for view in &views {
        let path = view.path().to_string();
        let dv = view.deletion_vector_descriptor();
        let dv_id = dv.as_ref().map_or(String::new(), |dv| {
            format!(
                "{}{}@{:?}",
                dv.storage_type, dv.path_or_inline_dv, dv.offset
            )
        });
        let id = (path.clone(), dv_id);
        let file = match cached.remove(&id) {
            Some(file) => file,
            None => {
                let location = deltalake::Path::parse(&path).map_err(|e| {
                    DataFusionError::Execution(format!("data file path {path:?} in the log: {e}"))
                })?;
                let mut file = PartitionedFile::new(location.to_string(), view.size() as u64);
                file.object_meta.location = location;
                if let Some(statistics) = file_statistics(&logical, view.stats().as_deref()) {
                    file = file.with_statistics(statistics);
                }
                if let Some(dv) = &dv {
                    let Some(rows) = view.num_records() else {
                        return Ok(None);
                    };
                    let deleted = deletion_vector::read(table, dv).await.map_err(to_df)?;
                    file = file
                        .with_extension(ParquetRowSelection::new(selection(&deleted, rows as u64)));
                }
                file
            }
        };
        kept.insert(id, file.clone());
        files.push(file);
    }
    if let Some(s) = selections {
        s.by_table.lock().await.insert(key, kept);
    }
    let store = table.log_store().object_store_url();
    if runtime.object_store(&store).is_err() {
        runtime.register_object_store(store.as_ref(), table.log_store().object_store(None));
    }
    Ok(Some(Arc::new(DvScan {
        schema: logical,
        store,
        files,
    })))
}

/// File statistics DataFusion can prune whole files by: the min and max of integer
/// columns from the file's Delta statistics, as bounds (a DV only removes rows, so they
/// stay bounds). Other types are left out: Delta truncates long strings in statistics, and
/// DataFusion would take a column whose exact min equals its max for a constant.
fn file_statistics(schema: &Schema, stats: Option<&str>) -> Option<Arc<Statistics>> {
    let stats: serde_json::Value = serde_json::from_str(stats?).ok()?;
    let bound = |side: &str, field: &Field| -> Option<ScalarValue> {
        let n = stats.get(side)?.get(field.name())?.as_i64()?;
        Some(match field.data_type() {
            DataType::Int8 => ScalarValue::Int8(Some(i8::try_from(n).ok()?)),
            DataType::Int16 => ScalarValue::Int16(Some(i16::try_from(n).ok()?)),
            DataType::Int32 => ScalarValue::Int32(Some(i32::try_from(n).ok()?)),
            DataType::Int64 => ScalarValue::Int64(Some(n)),
            _ => return None,
        })
    };
    let mut statistics = Statistics::new_unknown(schema);
    let mut any = false;
    for (field, column) in schema
        .fields()
        .iter()
        .zip(&mut statistics.column_statistics)
    {
        if let (Some(min), Some(max)) = (bound("minValues", field), bound("maxValues", field)) {
            column.min_value = Precision::Inexact(min);
            column.max_value = Precision::Inexact(max);
            any = true;
        }
    }
    any.then(|| Arc::new(statistics))
}

/// The rows of a file of `rows` rows that are not in `deleted`.
fn selection(deleted: &RoaringTreemap, rows: u64) -> RowSelection {
    let mut selectors = Vec::new();
    let mut at = 0u64;
    for pos in deleted.iter().take_while(|&p| p < rows) {
        if pos > at {
            selectors.push(RowSelector::select((pos - at) as usize));
        }
        selectors.push(RowSelector::skip(1));
        at = pos + 1;
    }
    if at < rows {
        selectors.push(RowSelector::select((rows - at) as usize));
    }
    selectors.into_iter().collect()
}

#[async_trait]
impl TableProvider for DvScan {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Used for pruning; DataFusion still filters the rows.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut options = deltalake::datafusion::config::TableParquetOptions::default();
        options.global = state.config_options().execution.parquet.clone();
        let mut source =
            ParquetSource::new(self.schema.clone()).with_table_parquet_options(options);
        if let Some(predicate) = conjunction(filters.to_vec()) {
            let df_schema = DFSchema::try_from(self.schema.as_ref().clone())?;
            source = source.with_predicate(state.create_physical_expr(predicate, &df_schema)?);
        }
        let partitions = state.config_options().execution.target_partitions.max(1);
        let groups = FileGroup::new(self.files.clone()).split_files(partitions);
        let config = FileScanConfigBuilder::new(self.store.clone(), Arc::new(source))
            .with_file_groups(groups)
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_skips_exactly_the_deleted_rows() {
        let deleted: RoaringTreemap = [0u64, 3, 4, 9].into_iter().collect();
        let s = selection(&deleted, 10);
        let selectors: Vec<RowSelector> = s.iter().copied().collect();
        assert_eq!(
            selectors,
            vec![
                RowSelector::skip(1),
                RowSelector::select(2),
                RowSelector::skip(2),
                RowSelector::select(4),
                RowSelector::skip(1),
            ]
        );
        assert_eq!(s.row_count(), 6);
        let none = selection(&RoaringTreemap::new(), 5);
        assert_eq!(none.row_count(), 5);
    }
}
