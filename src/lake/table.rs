//! Delta table plumbing shared by the raw and curated layouts: opening or creating a
//! table, reading its schema, the Parquet settings of every file we write, the Metadata
//! action that grows a schema, and the newest state this process committed to each
//! table (`committed`). Commits go through `lake::commit`.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use deltalake::arrow::datatypes::SchemaRef;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::{Action, StructType};
use deltalake::parquet::basic::Compression;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::SaveMode;
use deltalake::writer::RecordBatchWriter;
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

use super::LakeError;

/// The newest state this process committed to each table, by table location (without a
/// trailing `/`). The endpoint's views start from it: a Delta snapshot moved to a new
/// version replays the log and parses every file's statistics again (18–20 ms per
/// table and commit in the freshness benchmark), which the commit has just done.
/// One entry per table this process writes, replaced at each commit.
static COMMITTED: LazyLock<Mutex<HashMap<String, DeltaTable>>> = LazyLock::new(Default::default);

/// Keeps `table`'s state (just committed) for [`committed`], unless a newer one is kept.
pub(super) fn keep_committed(table: &DeltaTable) {
    let Some(version) = table.version() else {
        return;
    };
    let location = table.table_url().as_str().trim_end_matches('/').to_string();
    let mut all = COMMITTED.lock().unwrap_or_else(|e| e.into_inner());
    let newer = all
        .get(&location)
        .and_then(|t| t.version())
        .is_some_and(|kept| kept >= version);
    if !newer {
        all.insert(location, table.clone());
    }
}

/// The state of the table at `url` this process committed last, if at `version` or
/// below (a state to move forward from).
pub fn committed(url: &Url, version: u64) -> Option<DeltaTable> {
    let all = COMMITTED.lock().unwrap_or_else(|e| e.into_inner());
    let table = all.get(url.as_str().trim_end_matches('/'))?;
    table
        .version()
        .is_some_and(|kept| kept <= version)
        .then(|| table.clone())
}

/// Target size of one raw data file (and of raw compaction's output).
pub const RAW_FILE_SIZE: u64 = 128 * 1024 * 1024;
/// Target size of one curated data file. Smaller than raw: a merge rewrites every file
/// that holds a changed key, so the file size is the unit of a merge's write cost
/// (docs/performance.md, merge scaling).
pub const CURATED_FILE_SIZE: u64 = 4 * 1024 * 1024;
/// Largest row group buffered in memory before it is written out.
const ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;

/// A writer producing files of `schema` for `table` (which may still have an older
/// schema: the commit that adds the files records the new one).
pub fn writer_for(
    table: &DeltaTable,
    schema: &SchemaRef,
) -> Result<RecordBatchWriter, DeltaTableError> {
    keyed_writer_for(table, schema, &[], RAW_FILE_SIZE)
}

/// [`writer_for`] with Parquet bloom filters on the `key` columns (a point lookup by key
/// then skips the row groups that do not hold it, however the rows were ordered: the
/// snapshot interleaves its parallel copies; about 80 KB per key column and row group),
/// and files of `target_size` bytes.
pub fn keyed_writer_for(
    table: &DeltaTable,
    schema: &SchemaRef,
    key: &[String],
    target_size: u64,
) -> Result<RecordBatchWriter, DeltaTableError> {
    Ok(
        RecordBatchWriter::try_new(table.table_url().as_str(), schema.clone(), None, None)?
            .with_target_file_size(target_size)
            .with_writer_properties(keyed_properties(key)),
    )
}

/// The Parquet settings of every file we write, with bloom filters on `key`.
pub fn keyed_properties(key: &[String]) -> WriterProperties {
    let mut properties = writer_properties().into_builder();
    for column in key {
        let path = deltalake::parquet::schema::types::ColumnPath::from(column.as_str());
        properties = properties
            // A key is unique: a dictionary would only cost CPU (see writer_properties).
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_bloom_filter_enabled(path.clone(), true)
            .set_column_bloom_filter_max_ndv(path.clone(), 64 * 1024)
            .set_column_bloom_filter_fpp(path, 0.01);
    }
    properties.build()
}

/// Where a data file of an Add action (`path` relative to the table) is in the table's
/// object store.
pub fn file_location(path: &str) -> deltalake::Path {
    deltalake::Path::parse(path).unwrap_or_else(|_| deltalake::Path::from(path))
}

/// The table at `url` at its latest version; `None` when it does not exist yet.
pub async fn open_existing(url: &Url, label: &str) -> Result<Option<DeltaTable>, LakeError> {
    if surely_missing(url) {
        return Ok(None);
    }
    let table = DeltaTable::try_from_url(url.clone())
        .await
        .map_err(|source| LakeError::Delta {
            table: label.to_string(),
            source,
        })?;
    Ok(table.version().is_some().then_some(table))
}

/// The Arrow schema of an existing table; `None` when the table does not exist yet.
pub async fn existing_schema(url: &Url, label: &str) -> Result<Option<SchemaRef>, LakeError> {
    use deltalake::kernel::engine::arrow_conversion::TryIntoArrow;
    let delta_err = |source| LakeError::Delta {
        table: label.to_string(),
        source,
    };
    let Some(table) = open_existing(url, label).await? else {
        return Ok(None);
    };
    let kernel = table.snapshot().map_err(delta_err)?.schema();
    let arrow: deltalake::arrow::datatypes::Schema = kernel
        .as_ref()
        .try_into_arrow()
        .map_err(|e| delta_err(DeltaTableError::from(e)))?;
    Ok(Some(std::sync::Arc::new(arrow)))
}

/// A local table with no Delta log yet (object stores are asked instead).
pub fn surely_missing(url: &Url) -> bool {
    url.scheme() == "file"
        && url
            .to_file_path()
            .map(|p| !p.join("_delta_log").exists())
            .unwrap_or(true)
}

/// The Metadata action that records `schema` as the table's new schema.
pub fn schema_action(table: &DeltaTable, schema: &SchemaRef) -> Result<Action, DeltaTableError> {
    use deltalake::kernel::MetadataExt;
    let kernel: StructType = schema.as_ref().try_into_kernel()?;
    let metadata = table.snapshot()?.metadata().clone().with_schema(&kernel)?;
    Ok(Action::Metadata(metadata))
}

/// Parquet settings for every data file wal2delta writes (raw and curated).
fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(64 * 1024))
        // Row groups are buffered until flushed: cap them by size too, so rows with huge
        // values do not pile up in memory.
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        // Dictionary encoding of a column that turns out to be unique (ids, timestamps,
        // free text) costs a hash-table insert per value until the dictionary page limit,
        // then falls back to plain encoding. The 1 MiB default kept whole row groups of
        // such columns in the dictionary: about 40% of a curated merge's CPU went there
        // (perf, docs/performance.md). At 128 KiB low-cardinality columns (status, type,
        // foreign keys) still get a dictionary and unique ones give up early.
        .set_dictionary_page_size_limit(128 * 1024)
        .set_column_dictionary_enabled("_lsn".into(), false)
        .set_column_dictionary_enabled("_seq".into(), false)
        // Statistics stay truncated (64 bytes): a truncated string minimum is a prefix and
        // parquet increments a truncated maximum, so both remain valid bounds for the
        // curated merge's pruning, and huge values never bloat the Delta log.
        .build()
}

/// Opens a Delta table, or creates it with `schema` (and the table `properties`) when it
/// does not exist yet.
pub async fn open_or_create(
    url: &Url,
    label: &str,
    schema: &SchemaRef,
    properties: &[(&str, &str)],
) -> Result<DeltaTable, LakeError> {
    let delta_err = |source| LakeError::Delta {
        table: label.to_string(),
        source,
    };
    if url.scheme() == "file" {
        // The Delta kernel refuses local paths that do not exist yet.
        let path = url
            .to_file_path()
            .map_err(|_| delta_err(DeltaTableError::InvalidTableLocation(url.to_string())))?;
        std::fs::create_dir_all(&path)
            .map_err(|source| delta_err(DeltaTableError::Io { source }))?;
    }
    let table = DeltaTable::try_from_url(url.clone())
        .await
        .map_err(delta_err)?;
    if table.version().is_some() {
        return Ok(table);
    }
    let kernel: StructType = schema
        .as_ref()
        .try_into_kernel()
        .map_err(|e| delta_err(DeltaTableError::from(e)))?;
    table
        .create()
        .with_columns(kernel.fields().cloned())
        .with_table_name(label)
        .with_configuration(properties.iter().map(|(k, v)| (*k, Some(*v))))
        .with_save_mode(SaveMode::Ignore)
        .await
        .map_err(delta_err)
}

/// Opens (or creates) a table that is to receive rows of `schema`. The table may lack
/// columns of `schema` (columns added at the source: the next commit records them) but
/// must not have columns `schema` lacks. Returns the table and whether `schema` grew it.
pub async fn open_for_schema(
    url: &Url,
    label: &str,
    schema: &SchemaRef,
    properties: &[(&str, &str)],
) -> Result<(DeltaTable, bool), LakeError> {
    let table = open_or_create(url, label, schema, properties).await?;
    let existing: Vec<String> = table
        .snapshot()
        .map_err(|source| LakeError::Delta {
            table: label.to_string(),
            source,
        })?
        .schema()
        .fields()
        .map(|f| f.name().clone())
        .collect();
    let incoming: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    if existing.iter().any(|e| !incoming.contains(e)) {
        return Err(LakeError::SchemaChanged {
            table: label.to_string(),
            existing,
            incoming,
        });
    }
    let grew = existing != incoming;
    Ok((table, grew))
}
