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
//! A point lookup (`col = v`, `col IN (…)` on an integer column) skips the files whose
//! min/max in the Delta log excludes it without opening them, as delta-rs's scan does;
//! on the key column of a table this process's daemon keeps a key index of, it also
//! skips every indexed file that does not hold the key (`lake::curated::published_keys`):
//! the upsert files of changes spread over the key range each span all of it.
//!
//! Curated tables without any DV yet are read through it too: delta-rs's provider
//! replays the table's log at every scan (parsing each file's JSON statistics for its
//! data skipping), which took most of the endpoint's CPU when a client polled a table
//! that five batches a second extend (docs/performance.md). Here the file list and each
//! file's bounds are made once per lake position and kept per file. Integer ranges
//! (`col >= v`, `BETWEEN`) skip files by those bounds as delta-rs's data skipping does;
//! other predicates prune row groups inside the Parquet reader. The live row count of
//! every file (`numRecords` less its deleted rows) is handed to DataFusion as exact
//! statistics, so `count(*)` is answered from the log, as delta-rs's provider answers
//! it — also at a past position whose files vacuum has removed.
//!
//! It is used only where it is exact: tables without partition columns or column mapping,
//! whose reader features are `deletionVectors` (and `timestampNtz`), and whose DV'd files
//! record `numRecords`; anything else is read by delta-rs's provider as before. Files are
//! kept per path and DV, so a new lake position re-reads only new DVs.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use deltalake::DeltaTable;
use deltalake::arrow::datatypes::{DataType, Schema, SchemaRef};
use deltalake::datafusion::catalog::Session;
use deltalake::datafusion::common::stats::Precision;
use deltalake::datafusion::common::{DFSchema, DataFusionError, Result, ScalarValue, Statistics};
use deltalake::datafusion::datasource::TableProvider;
use deltalake::datafusion::datasource::listing::PartitionedFile;
use deltalake::datafusion::datasource::physical_plan::parquet::{
    CachedParquetFileReaderFactory, ParquetRowSelection,
};
use deltalake::datafusion::datasource::physical_plan::{
    FileGroup, FileScanConfigBuilder, ParquetSource,
};
use deltalake::datafusion::datasource::source::DataSourceExec;
use deltalake::datafusion::execution::object_store::ObjectStoreUrl;
use deltalake::datafusion::execution::runtime_env::RuntimeEnv;
use deltalake::datafusion::logical_expr::utils::conjunction;
use deltalake::datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown, TableType};
use deltalake::datafusion::physical_plan::ExecutionPlan;
use deltalake::logstore::LogStore;
use deltalake::parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use roaring::RoaringTreemap;
use tokio::sync::Mutex;

use crate::lake::curated::{PublishedKeys, published_keys};
use crate::lake::deletion_vector;

/// Reader features a table may have for this provider to read it.
const UNDERSTOOD: [&str; 2] = ["deletionVectors", "timestampNtz"];

/// Files as DataFusion scans them (statistics, the DV's row selection), by table, file
/// path and DV, kept while the file and its DV are live (a selection takes 16 bytes per
/// run of kept or deleted rows; purging bounds the deleted share of a file).
#[derive(Default)]
pub struct Selections {
    by_table: Mutex<HashMap<String, TableFiles>>,
}

/// One table's files by (path, DV).
type TableFiles = HashMap<(String, String), ScanFile>;

/// A file as DataFusion scans it, with the bounds of its integer columns.
#[derive(Debug, Clone)]
struct ScanFile {
    /// As the Delta log names it.
    path: String,
    file: PartitionedFile,
    bounds: Arc<Bounds>,
    /// Rows not deleted, when the log records the file's `numRecords`.
    rows: Option<u64>,
}

/// Min and max of a file's integer columns (Delta statistics), by column name.
type Bounds = HashMap<String, (i64, i64)>;

/// A table whose live files skip their deleted rows through row selections.
pub struct DvScan {
    schema: SchemaRef,
    store: ObjectStoreUrl,
    files: Vec<ScanFile>,
    /// The keys of each file, when the daemon in this process indexes them.
    keys: Option<Arc<PublishedKeys>>,
}

impl std::fmt::Debug for DvScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DvScan")
            .field("files", &self.files.len())
            .field("keys", &self.keys.as_ref().map(|k| k.column()))
            .finish()
    }
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
                // As delta-rs does: the log's (decoded) path, or its parts when it does
                // not parse as a store path.
                let location = deltalake::Path::parse(&path)
                    .unwrap_or_else(|_| deltalake::Path::from(path.as_str()));
                let mut file = PartitionedFile::new(location.to_string(), view.size() as u64);
                file.object_meta.location = location;
                let mut rows = view.num_records().and_then(|n| u64::try_from(n).ok());
                if let Some(dv) = &dv {
                    let Some(all) = rows else {
                        return Ok(None);
                    };
                    let deleted = deletion_vector::read(table, dv).await.map_err(to_df)?;
                    let kept = selection(&deleted, all);
                    rows = Some(kept.row_count() as u64);
                    file = file.with_extension(ParquetRowSelection::new(kept));
                }
                ScanFile {
                    path: path.clone(),
                    file,
                    bounds: Arc::new(bounds(&logical, view.stats().as_deref())),
                    rows,
                }
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
        keys: published_keys(table.table_url().as_str()),
    })))
}

/// The min and max of a file's integer columns from its Delta statistics. A DV only
/// removes rows, so they stay bounds of the rows left. (Handed to DataFusion as inexact
/// statistics they would be ignored, and exact ones could answer `min()` from a deleted
/// row; strings are left out as Delta truncates them.)
fn bounds(schema: &Schema, stats: Option<&str>) -> Bounds {
    let Some(stats) = stats.and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()) else {
        return Bounds::new();
    };
    schema
        .fields()
        .iter()
        .filter(|f| {
            matches!(
                f.data_type(),
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
            )
        })
        .filter_map(|f| {
            let side = |s: &str| stats.get(s)?.get(f.name())?.as_i64();
            Some((f.name().clone(), (side("minValues")?, side("maxValues")?)))
        })
        .collect()
}

/// An integer literal's value, when it fits an `i64`.
fn integer(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::Int8(Some(v)) => Some(*v as i64),
        ScalarValue::Int16(Some(v)) => Some(*v as i64),
        ScalarValue::Int32(Some(v)) => Some(*v as i64),
        ScalarValue::Int64(Some(v)) => Some(*v),
        ScalarValue::UInt8(Some(v)) => Some(*v as i64),
        ScalarValue::UInt16(Some(v)) => Some(*v as i64),
        ScalarValue::UInt32(Some(v)) => Some(*v as i64),
        ScalarValue::UInt64(Some(v)) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// The integer values `filters` pin columns to (`col = v`, `col IN (v, …)`), by column
/// name; several filters on one column keep the values all of them allow.
fn pinned(filters: &[Expr]) -> HashMap<String, Vec<i64>> {
    fn column(e: &Expr) -> Option<&str> {
        match e {
            Expr::Column(c) => Some(&c.name),
            // A cast keeps an integer or makes it NULL (never another integer).
            Expr::Cast(c) => column(&c.expr),
            Expr::TryCast(c) => column(&c.expr),
            _ => None,
        }
    }
    fn int(e: &Expr) -> Option<i64> {
        match e {
            Expr::Literal(v, _) => integer(v),
            Expr::Cast(c) => int(&c.expr),
            _ => None,
        }
    }
    let mut out: HashMap<String, Vec<i64>> = HashMap::new();
    for filter in filters {
        let found = match filter {
            Expr::BinaryExpr(b) if b.op == Operator::Eq => {
                match (
                    column(&b.left),
                    int(&b.right),
                    column(&b.right),
                    int(&b.left),
                ) {
                    (Some(c), Some(v), _, _) | (_, _, Some(c), Some(v)) => Some((c, vec![v])),
                    _ => None,
                }
            }
            Expr::InList(l) if !l.negated => column(&l.expr).and_then(|c| {
                let values: Option<Vec<i64>> = l.list.iter().map(int).collect();
                values.map(|v| (c, v))
            }),
            _ => None,
        };
        if let Some((c, values)) = found {
            out.entry(c.to_string())
                .and_modify(|held| held.retain(|v| values.contains(v)))
                .or_insert(values);
        }
    }
    out
}

/// The inclusive range `filters` hold integer columns to (`col > v`, `col <= v`,
/// `col BETWEEN a AND b`, either side), by column name; several filters on one column
/// keep what all of them allow. Only bare columns: a cast to text would compare
/// otherwise.
fn ranges(filters: &[Expr]) -> HashMap<String, (i64, i64)> {
    fn int(e: &Expr) -> Option<i64> {
        match e {
            Expr::Literal(v, _) => integer(v),
            _ => None,
        }
    }
    // `column op value` as an inclusive range (None: the filter is not such a range).
    fn range(op: Operator, v: i64) -> Option<(i64, i64)> {
        match op {
            Operator::Gt => Some((v.checked_add(1)?, i64::MAX)),
            Operator::GtEq => Some((v, i64::MAX)),
            Operator::Lt => Some((i64::MIN, v.checked_sub(1)?)),
            Operator::LtEq => Some((i64::MIN, v)),
            _ => None,
        }
    }
    let mut out: HashMap<String, (i64, i64)> = HashMap::new();
    for filter in filters {
        let found = match filter {
            Expr::BinaryExpr(b) => match (&*b.left, &*b.right) {
                (Expr::Column(c), value) => int(value).and_then(|v| Some((c, range(b.op, v)?))),
                (value, Expr::Column(c)) => {
                    int(value).and_then(|v| Some((c, range(b.op.swap()?, v)?)))
                }
                _ => None,
            },
            Expr::Between(between) if !between.negated => match &*between.expr {
                Expr::Column(c) => match (int(&between.low), int(&between.high)) {
                    (Some(low), Some(high)) => Some((c, (low, high))),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        if let Some((c, (low, high))) = found {
            let held = out.entry(c.name.clone()).or_insert((i64::MIN, i64::MAX));
            *held = (held.0.max(low), held.1.min(high));
        }
    }
    out
}

/// Whether a file with `bounds` may hold a row with the `pinned` values, within the
/// `ranges`.
fn may_match(
    bounds: &Bounds,
    pinned: &HashMap<String, Vec<i64>>,
    ranges: &HashMap<String, (i64, i64)>,
) -> bool {
    let values = pinned
        .iter()
        .all(|(column, values)| match bounds.get(column) {
            Some((min, max)) => values.iter().any(|v| min <= v && v <= max),
            None => true,
        });
    values
        && ranges
            .iter()
            .all(|(column, (low, high))| match bounds.get(column) {
                Some((min, max)) => low <= high && low <= max && min <= high,
                None => true,
            })
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
        let options = deltalake::datafusion::config::TableParquetOptions {
            global: state.config_options().execution.parquet.clone(),
            ..Default::default()
        };
        // Footers and page indexes come from the session's metadata cache (bounded by
        // DataFusion's `metadata_cache_limit`), as DataFusion's own Parquet tables do: read
        // from disk at every query they made a lookup 1.35× slower than copy-on-write.
        let runtime = state.runtime_env();
        let readers = CachedParquetFileReaderFactory::new(
            runtime.object_store(&self.store)?,
            runtime.cache_manager.get_file_metadata_cache(),
        );
        let mut source = ParquetSource::new(self.schema.clone())
            .with_table_parquet_options(options)
            .with_parquet_file_reader_factory(Arc::new(readers))
            // Filters run inside the reader (late materialization), as delta-rs's own
            // scans do: a lookup decodes the other columns of the matching rows only.
            .with_pushdown_filters(true);
        if let Some(predicate) = conjunction(filters.to_vec()) {
            let df_schema = DFSchema::try_from(self.schema.as_ref().clone())?;
            source = source.with_predicate(state.create_physical_expr(predicate, &df_schema)?);
        }
        let pinned = pinned(filters);
        let ranges = ranges(filters);
        let key_values = self
            .keys
            .as_ref()
            .and_then(|k| Some((k, pinned.get(k.column())?)));
        let chosen: Vec<&ScanFile> = self
            .files
            .iter()
            .filter(|f| may_match(&f.bounds, &pinned, &ranges))
            .filter(|f| key_values.is_none_or(|(keys, values)| keys.may_hold(&f.path, values)))
            .collect();
        // Exact row counts let DataFusion answer `count(*)` without reading a file (with a
        // filter it marks them inexact itself).
        let mut statistics = Statistics::new_unknown(&self.schema);
        statistics.num_rows = chosen
            .iter()
            .map(|f| f.rows)
            .sum::<Option<u64>>()
            .and_then(|n| usize::try_from(n).ok())
            .map_or(Precision::Absent, Precision::Exact);
        statistics.total_byte_size = Precision::Inexact(
            chosen
                .iter()
                .map(|f| f.file.object_meta.size as usize)
                .sum(),
        );
        let files: Vec<PartitionedFile> = chosen.into_iter().map(|f| f.file.clone()).collect();
        let partitions = state.config_options().execution.target_partitions.max(1);
        let groups = FileGroup::new(files).split_files(partitions);
        let config = FileScanConfigBuilder::new(self.store.clone(), Arc::new(source))
            .with_file_groups(groups)
            .with_statistics(statistics)
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

#[cfg(test)]
mod pruning_tests {
    use super::*;
    use deltalake::datafusion::prelude::{col, in_list, lit};

    #[test]
    fn lookups_pin_integer_values_and_files_outside_them_are_skipped() {
        let filters = vec![col("id").eq(lit(7i64)), col("v").eq(lit("x"))];
        let id = pinned(&filters);
        assert_eq!(id.len(), 1, "{id:?}");
        let file = |min, max| Bounds::from([("id".to_string(), (min, max))]);
        let none = HashMap::new();
        assert!(may_match(&file(1, 10), &id, &none));
        assert!(!may_match(&file(8, 10), &id, &none));
        // No bounds for the column: the file is read.
        assert!(may_match(&Bounds::new(), &id, &none));
        let listed = pinned_of(in_list(col("id"), vec![lit(3i32), lit(40i32)], false));
        assert!(may_match(&file(30, 50), &listed, &none));
        assert!(!may_match(&file(5, 30), &listed, &none));
        // NOT IN, ranges and ORs pin nothing.
        assert!(pinned_of(in_list(col("id"), vec![lit(3i32)], true)).is_empty());
        assert!(pinned_of(col("id").gt(lit(3i64))).is_empty());
        assert!(pinned_of(col("id").eq(lit(3i64)).or(col("id").eq(lit(9i64)))).is_empty());
        // Two filters on one column keep what both allow.
        let both = pinned(&[
            in_list(col("id"), vec![lit(1i64), lit(2i64)], false),
            col("id").eq(lit(2i64)),
        ]);
        assert_eq!(both["id"], vec![2]);
    }

    #[test]
    fn integer_ranges_skip_the_files_outside_them() {
        let file = |min, max| Bounds::from([("id".to_string(), (min, max))]);
        let none = HashMap::new();
        let at_least = ranges(&[col("id").gt_eq(lit(100i64))]);
        assert_eq!(at_least["id"], (100, i64::MAX));
        assert!(!may_match(&file(1, 99), &none, &at_least));
        assert!(may_match(&file(1, 100), &none, &at_least));
        // The literal on the left: 100 > id is id < 100.
        let below = ranges(&[lit(100i32).gt(col("id"))]);
        assert_eq!(below["id"], (i64::MIN, 99));
        assert!(!may_match(&file(100, 200), &none, &below));
        // Several filters and BETWEEN keep what all allow; an empty range matches nothing.
        let both = ranges(&[
            col("id").gt(lit(10i64)),
            col("id").between(lit(5i64), lit(20i64)),
        ]);
        assert_eq!(both["id"], (11, 20));
        assert!(!may_match(&file(21, 30), &none, &both));
        assert!(may_match(&file(20, 30), &none, &both));
        let empty = ranges(&[col("id").gt(lit(10i64)), col("id").lt(lit(5i64))]);
        assert!(!may_match(&file(i64::MIN, i64::MAX), &none, &empty));
        // Columns without bounds, casts, NOT BETWEEN, overflow and non-integers: no range.
        assert!(may_match(&Bounds::new(), &none, &at_least));
        assert!(ranges(&[col("id").not_between(lit(1i64), lit(2i64))]).is_empty());
        assert!(ranges(&[col("id").gt(lit(i64::MAX))]).is_empty());
        assert!(ranges(&[col("v").gt(lit("x"))]).is_empty());
        let cast = deltalake::datafusion::logical_expr::cast(col("id"), DataType::Utf8);
        assert!(ranges(&[cast.gt(lit(5i64))]).is_empty());
    }

    fn pinned_of(e: Expr) -> HashMap<String, Vec<i64>> {
        pinned(&[e])
    }
}
