//! Point lookups on a curated table's key, answered without planning a query.
//!
//! # Design
//! - **Why.** `SELECT … FROM t WHERE id = $1` is what drivers, dashboards and services
//!   send most, and through DataFusion each one cost about 5 ms of CPU on a quiet table:
//!   a statement context, the SQL rewrite rules, logical and physical planning (twice
//!   optimized), a Parquet scan and the result encoding (profile in
//!   docs/performance.md). Postgres answers in 0.1–0.3 ms.
//! - **What is recognised** ([`shape`]): exactly `SELECT * | col, … FROM [schema.]table
//!   WHERE key = <integer literal or $n>` (either side of `=`), on a curated table whose
//!   key column the daemon of this process indexes (`lake::curated::published_keys`:
//!   tables keyed by one integer column). Anything else — another clause, an alias, an
//!   expression, a raw table, `wal2delta serve` without a daemon — is planned by
//!   DataFusion as before. The statement is rebuilt from the parts found and must print
//!   exactly as the original, so no clause can be overlooked.
//! - **How it is answered.** On the statement's view (the same source position, as-of
//!   setting and grants as a planned query): the files whose min/max statistics admit the
//!   key; for each, the key index gives the row that holds it (a file without an entry has
//!   its key column read once and indexed); the row is dropped if the file's deletion
//!   vector at that version marks it; the row's projected columns are read from its page
//!   alone (Parquet offset index, footers cached), cast to the types the table presents,
//!   and encoded by the same code as DataFusion's results. The rows are read in blocks of
//!   up to [`BLOCK_ROWS`] (fewer for wide rows, [`block_rows`]) around the one asked for
//!   and kept decoded ([`Blocks`], at most [`BLOCKS_BYTES`]): data files never change, so
//!   a hot key's next lookup (and its neighbours') reads no file and decompresses no
//!   page. Output caps, the deadline,
//!   cancellation and the statement metrics apply as for any statement.
//! - **Same answer as the planner.** The test suite runs each shape both ways and
//!   compares the rows and their encoding.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use datafusion_postgres::pgwire::api::Type;
use deltalake::DeltaTable;
use deltalake::arrow::array::{RecordBatch, new_null_array};
use deltalake::arrow::compute::{cast, concat_batches};
use deltalake::arrow::datatypes::{Schema, SchemaRef};
use deltalake::datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, Ident, ObjectNamePart, SelectItem, SetExpr, Statement, TableFactor,
    UnaryOperator, Value,
};
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, RowSelection, RowSelector,
};
#[allow(deprecated)]
use deltalake::parquet::arrow::async_reader::ParquetObjectReader;
use deltalake::parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use deltalake::parquet::errors::{ParquetError, Result as ParquetResult};
use deltalake::parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use futures::TryStreamExt;
use futures::future::BoxFuture;
use roaring::RoaringTreemap;
use std::ops::Range;
use tokio::sync::{OnceCell, Semaphore};

use super::bounded_map::BoundedMap;
use crate::lake::curated::{FileKeys, PublishedKeys};
use crate::lake::deletion_vector;

/// What a recognised lookup asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Served schema (`public` when the name has none) and table, normalised as the
    /// planner does (unquoted names in lower case).
    pub schema: String,
    pub table: String,
    /// The columns asked for, `None` for `*`.
    pub columns: Option<Vec<String>>,
    /// The column compared.
    pub column: String,
    pub value: KeyValue,
}

/// The value the key is compared with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyValue {
    Literal(i64),
    /// `$n`, 0-based.
    Parameter(usize),
}

fn normalised(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_ascii_lowercase(),
    }
}

/// The lookup `statement` is, if it is exactly one of the recognised shapes.
pub fn shape(statement: &Statement) -> Option<Shape> {
    let Statement::Query(query) = statement else {
        return None;
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    let [from] = select.from.as_slice() else {
        return None;
    };
    let TableFactor::Table { name, .. } = &from.relation else {
        return None;
    };
    let parts: Vec<&Ident> = name
        .0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => Some(i),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let (schema, table) = match parts.as_slice() {
        [table] => ("public".to_string(), normalised(table)),
        [schema, table] => (normalised(schema), normalised(table)),
        [catalog, schema, table] if normalised(catalog) == super::view::DATABASE => {
            (normalised(schema), normalised(table))
        }
        _ => return None,
    };
    let mut columns = Vec::new();
    let mut star = false;
    for item in &select.projection {
        match item {
            SelectItem::Wildcard(_) if select.projection.len() == 1 => star = true,
            SelectItem::UnnamedExpr(Expr::Identifier(i)) => columns.push((i, normalised(i))),
            _ => return None,
        }
    }
    let Expr::BinaryOp {
        left,
        op: BinaryOperator::Eq,
        right,
    } = select.selection.as_ref()?
    else {
        return None;
    };
    let (key, value) = match (left.as_ref(), right.as_ref()) {
        (Expr::Identifier(k), v) if key_value(v).is_some() => (k, key_value(v)?),
        (v, Expr::Identifier(k)) if key_value(v).is_some() => (k, key_value(v)?),
        _ => return None,
    };
    // Rebuilt from the parts found, the statement must print as the original: any other
    // clause (DISTINCT, LIMIT, ORDER BY, an alias, EXCLUDE…) makes it differ.
    let projection = if star {
        "*".to_string()
    } else {
        columns
            .iter()
            .map(|(i, _)| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rebuilt = format!(
        "SELECT {projection} FROM {name} WHERE {}",
        select.selection.as_ref()?
    );
    if rebuilt != statement.to_string() {
        return None;
    }
    let names: Vec<String> = columns.into_iter().map(|(_, n)| n).collect();
    if (1..names.len()).any(|i| names[..i].contains(&names[i])) {
        return None; // the planner refuses a repeated column name
    }
    Some(Shape {
        schema,
        table,
        columns: (!star).then_some(names),
        column: normalised(key),
        value,
    })
}

fn key_value(e: &Expr) -> Option<KeyValue> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, false) => n.parse().ok().map(KeyValue::Literal),
            Value::Placeholder(p) => {
                let n: usize = p.strip_prefix('$')?.parse().ok()?;
                n.checked_sub(1).map(KeyValue::Parameter)
            }
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match key_value(expr)? {
            KeyValue::Literal(v) => v.checked_neg().map(KeyValue::Literal),
            KeyValue::Parameter(_) => None,
        },
        _ => None,
    }
}

/// The integer a parameter carries, when the client declared it an integer (`int2`,
/// `int4`, `int8`) or left its type to the server (which describes it as the key
/// column's, `int8`): its text, or its binary form of that type's width. `None` for
/// anything else (then planned as usual).
pub fn parameter(bytes: Option<&[u8]>, binary: bool, declared: Option<&Type>) -> Option<i64> {
    let width = match declared {
        None => 8,
        Some(t) if *t == Type::INT8 => 8,
        Some(t) if *t == Type::INT4 => 4,
        Some(t) if *t == Type::INT2 => 2,
        Some(_) => return None,
    };
    let bytes = bytes?;
    if !binary {
        return std::str::from_utf8(bytes).ok()?.trim().parse().ok();
    }
    match (width, bytes.len()) {
        (2, 2) => Some(i16::from_be_bytes(bytes.try_into().ok()?) as i64),
        (4, 4) => Some(i32::from_be_bytes(bytes.try_into().ok()?) as i64),
        (8, 8) => Some(i64::from_be_bytes(bytes.try_into().ok()?)),
        _ => None,
    }
}

/// A curated table of a view that lookups can answer: the Delta table at the view's
/// version, the schema it is served with, its key index.
pub struct Target {
    pub table: DeltaTable,
    pub schema: SchemaRef,
    pub keys: Arc<PublishedKeys>,
    files: OnceCell<Vec<File>>,
}

impl Target {
    pub fn new(table: DeltaTable, schema: SchemaRef, keys: Arc<PublishedKeys>) -> Target {
        Target {
            table,
            schema,
            keys,
            files: OnceCell::new(),
        }
    }
}

impl Target {
    /// Lists the live files (with their key bounds) ahead of the first lookup.
    pub async fn prepare(&self) {
        let _ = self
            .files
            .get_or_try_init(|| async { live_files(self) })
            .await;
    }
}

/// A live data file of a target.
struct File {
    path: String,
    size: u64,
    /// Min and max of the key column (Delta statistics), when recorded.
    bounds: Option<(i64, i64)>,
    dv: Option<deltalake::kernel::DeletionVectorDescriptor>,
    /// The file's key-index entry, once found (entries never change).
    keys: std::sync::OnceLock<Arc<FileKeys>>,
    /// Its deleted rows, once read (the cache's copy): found again without the cache's
    /// key and lock by every lookup that meets this file in this target.
    deleted: std::sync::OnceLock<Arc<RoaringTreemap>>,
}

impl File {
    /// Where `key` is in the file: `None` when it has no key-index entry yet, else the
    /// row that holds it, if any.
    fn row_of(&self, published: &PublishedKeys, key: i64) -> Option<Option<u64>> {
        if let Some(entry) = self.keys.get() {
            return Some(entry.row_of(key));
        }
        let found = published.entry(&self.path)?;
        Some(self.keys.get_or_init(|| found).row_of(key))
    }
}

/// What lookups keep across views: Parquet footers, deletion vectors and decoded row
/// blocks of immutable files, bounded in count (and the blocks in bytes).
pub struct Caches {
    footers: std::sync::Mutex<BoundedMap<String, ArrowReaderMetadata>>,
    blocks: std::sync::Mutex<Blocks>,
    deleted: std::sync::Mutex<BoundedMap<String, Arc<RoaringTreemap>>>,
    /// Files whose keys could not be indexed (NULL or repeated keys, no room).
    unindexable: std::sync::Mutex<BoundedMap<String, ()>>,
    /// One endpoint-side key-column read at a time (they can be a file's whole column).
    indexing: Semaphore,
}

/// Footers (and deletion vectors, unindexable files) kept at most; past that the
/// cache starts over.
const MOST: usize = 4096;

impl Default for Caches {
    fn default() -> Caches {
        Caches::new()
    }
}

impl Caches {
    fn unindexable(&self, id: &str) -> bool {
        let refused = self.unindexable.lock().unwrap_or_else(|e| e.into_inner());
        refused.get(id).is_some()
    }

    fn refuse(&self, id: String) {
        let mut refused = self.unindexable.lock().unwrap_or_else(|e| e.into_inner());
        refused.insert(id, ());
    }

    pub fn new() -> Caches {
        Caches {
            footers: std::sync::Mutex::new(BoundedMap::new(MOST)),
            blocks: Default::default(),
            deleted: std::sync::Mutex::new(BoundedMap::new(MOST)),
            unindexable: std::sync::Mutex::new(BoundedMap::new(MOST)),
            indexing: Semaphore::new(1),
        }
    }
}

/// Rows a lookup reads and keeps together at most: decoding the page that holds one row
/// costs about as much as decoding its neighbours too.
pub const BLOCK_ROWS: u64 = 256;

/// What a block should hold, in uncompressed bytes: wide rows make shorter blocks.
const BLOCK_BYTES: u64 = 256 << 10;

/// The rows of `file`'s blocks: [`BLOCK_ROWS`], or fewer so that a block holds about
/// [`BLOCK_BYTES`] at the file's mean row size (from its footer, so the same for every
/// lookup of the file).
fn block_rows(meta: &ArrowReaderMetadata) -> u64 {
    let data = meta.metadata();
    let rows = u64::try_from(data.file_metadata().num_rows())
        .unwrap_or(0)
        .max(1);
    let bytes: u64 = data
        .row_groups()
        .iter()
        .map(|g| u64::try_from(g.total_byte_size()).unwrap_or(0))
        .sum();
    let mean = (bytes / rows).max(1);
    (BLOCK_BYTES / mean).clamp(1, BLOCK_ROWS)
}

/// Decoded blocks kept at most, in bytes of their Arrow buffers.
pub const BLOCKS_BYTES: usize = 32 << 20;

/// Decoded row blocks of data files (all of a file's columns, as the file has them),
/// keyed by file and block number. Past [`BLOCKS_BYTES`] the oldest block not used
/// since it last came round is dropped (second chance, as in a buffer cache's clock).
struct Blocks {
    map: HashMap<(String, u64), (RecordBatch, bool)>,
    order: std::collections::VecDeque<(String, u64)>,
    bytes: usize,
    limit: usize,
}

impl Default for Blocks {
    fn default() -> Blocks {
        Blocks::new(BLOCKS_BYTES)
    }
}

impl Blocks {
    fn new(limit: usize) -> Blocks {
        Blocks {
            map: HashMap::new(),
            order: Default::default(),
            bytes: 0,
            limit,
        }
    }

    fn get(&mut self, key: &(String, u64)) -> Option<RecordBatch> {
        let (batch, used) = self.map.get_mut(key)?;
        *used = true;
        Some(batch.clone())
    }

    fn insert(&mut self, key: (String, u64), batch: RecordBatch) {
        let size = batch.get_array_memory_size();
        // A block larger than an eighth of the cache is not kept: it would push out the
        // many blocks of hot narrow rows.
        if size > self.limit / 8 || self.map.contains_key(&key) {
            return;
        }
        while self.bytes + size > self.limit {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            match self.map.get_mut(&oldest) {
                Some((_, used)) if *used => {
                    *used = false;
                    self.order.push_back(oldest);
                }
                Some(_) => {
                    if let Some((gone, _)) = self.map.remove(&oldest) {
                        self.bytes -= gone.get_array_memory_size();
                    }
                }
                None => {}
            }
        }
        self.bytes += size;
        self.order.push_back(key.clone());
        self.map.insert(key, (batch, false));
    }
}

/// Why a lookup was not answered here: the statement is then planned as usual.
#[derive(Debug)]
pub struct Declined(pub String);

fn declined(e: impl std::fmt::Display) -> Declined {
    Declined(e.to_string())
}

/// The rows of `target` whose key column equals `key`, with the `columns` asked for
/// (`None`: all), cast to the served types.
pub async fn rows(
    caches: &Caches,
    target: &Target,
    columns: Option<&[String]>,
    key: i64,
) -> Result<RecordBatch, Declined> {
    let indices: Vec<usize> = match columns {
        None => (0..target.schema.fields().len()).collect(),
        Some(names) => names
            .iter()
            .map(|n| target.schema.index_of(n).map_err(declined))
            .collect::<Result<_, _>>()?,
    };
    let projected: SchemaRef = Arc::new(target.schema.project(&indices).map_err(declined)?);
    let files = target
        .files
        .get_or_try_init(|| async { live_files(target) })
        .await?;
    let mut found = Vec::new();
    for file in files {
        if file.bounds.is_some_and(|(lo, hi)| key < lo || key > hi) {
            continue;
        }
        let row = match file.row_of(&target.keys, key) {
            Some(row) => row,
            None => index(caches, target, file, key).await?,
        };
        let Some(row) = row else {
            continue;
        };
        if let Some(dv) = &file.dv
            && deleted(caches, target, file, dv).await?.contains(row)
        {
            continue;
        }
        found.push(read_row(caches, target, file, row, &projected).await?);
    }
    concat_batches(&projected, &found).map_err(declined)
}

/// The target's live files at its version.
fn live_files(target: &Target) -> Result<Vec<File>, Declined> {
    let snapshot = target.table.snapshot().map_err(declined)?;
    if !snapshot.metadata().partition_columns().is_empty()
        || snapshot
            .metadata()
            .configuration()
            .contains_key("delta.columnMapping.mode")
    {
        return Err(Declined("partitioned or column-mapped table".to_string()));
    }
    let column = target.keys.column();
    Ok(snapshot
        .log_data()
        .iter()
        .map(|view| {
            let bounds = view.stats().and_then(|s| {
                let stats: serde_json::Value = serde_json::from_str(&s).ok()?;
                let side = |k: &str| stats.get(k)?.get(column)?.as_i64();
                Some((side("minValues")?, side("maxValues")?))
            });
            File {
                path: view.path().to_string(),
                size: view.size() as u64,
                bounds,
                dv: view.deletion_vector_descriptor(),
                keys: Default::default(),
                deleted: Default::default(),
            }
        })
        .collect())
}

/// A reader of `file`: with `local`, straight from the file system for a local lake
/// (reads of a few pages from the page cache, where the object store's reader hands
/// every read to a blocking thread and back), through the table's object store otherwise
/// (and for whole columns, which should not hold up the runtime's thread).
fn reader(target: &Target, file: &File, local: bool) -> Box<dyn AsyncFileReader> {
    let table = target.table.table_url();
    // The log's path, already decoded, under the table's directory.
    let local = (local && table.scheme() == "file")
        .then(|| table.to_file_path().ok())
        .flatten()
        .and_then(|dir| std::fs::File::open(dir.join(&file.path)).ok());
    if let Some(local) = local {
        return Box::new(LocalFile {
            file: local,
            size: file.size,
        });
    }
    #[allow(deprecated)]
    let remote = ParquetObjectReader::new(
        target.table.log_store().object_store(None),
        crate::lake::table::file_location(&file.path),
    )
    .with_file_size(file.size);
    Box::new(remote)
}

/// A Parquet file of a local lake, read with `pread` on the calling thread.
struct LocalFile {
    file: std::fs::File,
    size: u64,
}

impl AsyncFileReader for LocalFile {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, ParquetResult<Bytes>> {
        use std::os::unix::fs::FileExt;
        let len = usize::try_from(range.end.saturating_sub(range.start)).unwrap_or(usize::MAX);
        let mut buf = Vec::new();
        let read = buf
            .try_reserve_exact(len)
            .map_err(|e| ParquetError::External(Box::new(e)))
            .and_then(|()| {
                buf.resize(len, 0);
                self.file
                    .read_exact_at(&mut buf, range.start)
                    .map_err(|e| ParquetError::External(Box::new(e)))
            })
            .map(|()| Bytes::from(buf));
        Box::pin(futures::future::ready(read))
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, ParquetResult<Arc<ParquetMetaData>>> {
        Box::pin(async move {
            let mut reader = ParquetMetaDataReader::new();
            if let Some(o) = options {
                reader = reader
                    .with_column_index_policy(o.column_index_policy())
                    .with_offset_index_policy(o.offset_index_policy());
            }
            let size = self.size;
            Ok(Arc::new(reader.load_and_finish(self, size).await?))
        })
    }
}

/// A file's key: the table's location and the file's path.
fn cache_key(target: &Target, file: &File) -> String {
    format!("{}\u{0}{}", target.table.table_url(), file.path)
}

/// Reads the key column of `file` (which has no key-index entry), indexes it, and
/// answers where `key` is.
async fn index(
    caches: &Caches,
    target: &Target,
    file: &File,
    key: i64,
) -> Result<Option<u64>, Declined> {
    let id = cache_key(target, file);
    let refused = || Declined(format!("file {} could not be indexed", file.path));
    if !target.keys.has_room() || caches.unindexable(&id) {
        return Err(refused());
    }
    let _permit = caches.indexing.acquire().await.map_err(declined)?;
    if let Some(row) = file.row_of(&target.keys, key) {
        return Ok(row); // indexed while this lookup waited
    }
    let meta = footer(caches, target, file).await?;
    let builder =
        ParquetRecordBatchStreamBuilder::new_with_metadata(reader(target, file, false), meta);
    let column = target.keys.column().to_string();
    let root = builder
        .schema()
        .index_of(&column)
        .map_err(|_| Declined(format!("file {} has no key column", file.path)))?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [root]);
    let batches: Vec<RecordBatch> = builder
        .with_projection(mask)
        .build()
        .map_err(declined)?
        .try_collect()
        .await
        .map_err(declined)?;
    let keys = target.keys.clone();
    let path = file.path.clone();
    let learned = tokio::task::spawn_blocking(move || keys.learn(&path, &batches))
        .await
        .map_err(declined)?;
    match file.row_of(&target.keys, key) {
        Some(row) => Ok(row),
        None => {
            if !learned {
                caches.refuse(id); // NULL or repeated keys, or no room: not read again
            }
            Err(refused())
        }
    }
}

async fn footer(
    caches: &Caches,
    target: &Target,
    file: &File,
) -> Result<ArrowReaderMetadata, Declined> {
    let id = cache_key(target, file);
    let cached = caches
        .footers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id);
    if let Some(meta) = cached {
        return Ok(meta);
    }
    let mut reader = reader(target, file, true);
    let meta = ArrowReaderMetadata::load_async(
        &mut reader,
        ArrowReaderOptions::new().with_offset_index_policy(PageIndexPolicy::Optional),
    )
    .await
    .map_err(declined)?;
    let mut footers = caches.footers.lock().unwrap_or_else(|e| e.into_inner());
    footers.insert(id, meta.clone());
    Ok(meta)
}

async fn deleted(
    caches: &Caches,
    target: &Target,
    file: &File,
    dv: &deltalake::kernel::DeletionVectorDescriptor,
) -> Result<Arc<RoaringTreemap>, Declined> {
    if let Some(d) = file.deleted.get() {
        return Ok(d.clone());
    }
    let id = format!(
        "{}\u{0}{}{}@{:?}",
        cache_key(target, file),
        dv.storage_type,
        dv.path_or_inline_dv,
        dv.offset
    );
    let cached = caches
        .deleted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id);
    if let Some(d) = cached {
        return Ok(file.deleted.get_or_init(|| d).clone());
    }
    let d = Arc::new(
        deletion_vector::read(&target.table, dv)
            .await
            .map_err(declined)?,
    );
    let mut all = caches.deleted.lock().unwrap_or_else(|e| e.into_inner());
    all.insert(id, d.clone());
    Ok(file.deleted.get_or_init(|| d).clone())
}

/// Row `row` of `file`, its `projected` columns cast to the served types (a column the
/// file lacks, added later, is NULL), from the row's decoded block.
async fn read_row(
    caches: &Caches,
    target: &Target,
    file: &File,
    row: u64,
    projected: &SchemaRef,
) -> Result<RecordBatch, Declined> {
    let meta = footer(caches, target, file).await?;
    let rows = block_rows(&meta);
    let number = row / rows;
    let key = (cache_key(target, file), number);
    let cached = caches
        .blocks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key);
    let block = match cached {
        Some(block) => block,
        None => {
            let block = read_block(target, file, meta, number * rows, rows).await?;
            let mut blocks = caches.blocks.lock().unwrap_or_else(|e| e.into_inner());
            blocks.insert(key, block.clone());
            block
        }
    };
    let at = (row % rows) as usize;
    if at >= block.num_rows() {
        return Err(Declined(format!(
            "row {row} of {} is past its block's {} rows",
            file.path,
            block.num_rows()
        )));
    }
    served(&block.slice(at, 1), projected)
}

/// The block of `file` (footer `meta`) of up to `rows` rows from row `first`, every
/// column, read from the pages that hold them (the offset index locates them).
async fn read_block(
    target: &Target,
    file: &File,
    meta: ArrowReaderMetadata,
    first: u64,
    rows: u64,
) -> Result<RecordBatch, Declined> {
    let total = u64::try_from(meta.metadata().file_metadata().num_rows()).unwrap_or(0);
    let count = total.saturating_sub(first).min(rows) as usize;
    let builder =
        ParquetRecordBatchStreamBuilder::new_with_metadata(reader(target, file, true), meta);
    let selection = RowSelection::from(vec![
        RowSelector::skip(first as usize),
        RowSelector::select(count),
    ]);
    let batches: Vec<RecordBatch> = builder
        .with_row_selection(selection)
        .with_batch_size(count.max(1))
        .build()
        .map_err(declined)?
        .try_collect()
        .await
        .map_err(declined)?;
    let schema = batches
        .first()
        .map(|b| b.schema())
        .ok_or_else(|| Declined(format!("rows from {first} of {} are empty", file.path)))?;
    let block = concat_batches(&schema, &batches).map_err(declined)?;
    if block.num_rows() != count {
        return Err(Declined(format!(
            "rows from {first} of {} read as {} rows, not {count}",
            file.path,
            block.num_rows()
        )));
    }
    Ok(block)
}

/// `batch` (a file's columns) as `schema` presents them.
fn served(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, Declined> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => cast(c, f.data_type()).map_err(declined),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let schema = Arc::new(Schema::new(schema.fields().clone()));
    RecordBatch::try_new(schema, columns).map_err(declined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use deltalake::datafusion::sql::sqlparser::parser::Parser;

    fn of(sql: &str) -> Option<Shape> {
        shape(
            &Parser::parse_sql(&PostgreSqlDialect {}, sql)
                .unwrap()
                .remove(0),
        )
    }

    #[test]
    fn only_exact_key_lookups_are_recognised() {
        let s = of("select * from transacoes where id = $1").unwrap();
        assert_eq!(
            (
                s.schema.as_str(),
                s.table.as_str(),
                s.columns,
                s.column.as_str(),
                s.value
            ),
            ("public", "transacoes", None, "id", KeyValue::Parameter(0))
        );
        let s = of(r#"SELECT "Valor", id FROM "Arquivo"."Conta Ñ" WHERE -7 = "Id""#).unwrap();
        assert_eq!(s.schema, "Arquivo");
        assert_eq!(s.table, "Conta Ñ");
        assert_eq!(s.columns, Some(vec!["Valor".to_string(), "id".to_string()]));
        assert_eq!((s.column.as_str(), s.value), ("Id", KeyValue::Literal(-7)));
        assert_eq!(
            of("select * from wal2delta.public.t where ID = 3")
                .unwrap()
                .column,
            "id"
        );
        for other in [
            "select * from t where id = 1 limit 1",
            "select distinct * from t where id = 1",
            "select * from t where id = 1 order by id",
            "select * from t where id = 1 and v = 2",
            "select id as k from t where id = 1",
            "select count(*) from t where id = 1",
            "select * from t x where id = 1",
            "select * from t where id = '1'",
            "select * from t where id = 1.5",
            "select * from t where id < 1",
            "select * from t, u where id = 1",
            "select * from t where id = $1 + 1",
            "select *, id from t where id = 1",
            "select * from t where id = 1 for update",
            "with a as (select 1) select * from t where id = 1",
            "select * from other.wal2delta.public.t where id = 1",
            "select id, id from t where id = 1",
        ] {
            assert_eq!(of(other), None, "{other}");
        }
    }

    #[test]
    fn decoded_blocks_stay_within_their_bytes_and_keep_the_used_ones() {
        use deltalake::arrow::array::Int64Array;
        let batch = |n: i64| {
            RecordBatch::try_from_iter([("id", Arc::new(Int64Array::from_iter_values(0..n)) as _)])
                .unwrap()
        };
        let size = batch(100).get_array_memory_size();
        let mut blocks = Blocks::new(size * 24);
        let key = |n: u64| ("f".to_string(), n);
        for n in 0..24 {
            blocks.insert(key(n), batch(100));
        }
        assert!(blocks.get(&key(0)).is_some());
        blocks.insert(key(24), batch(100));
        // Block 0 was used since it came in: block 1, the oldest unused, made room.
        assert!(blocks.get(&key(0)).is_some());
        assert!(blocks.get(&key(1)).is_none());
        assert!(blocks.get(&key(24)).is_some());
        assert_eq!(blocks.bytes, size * 24);
        for n in 25..90 {
            blocks.insert(key(n), batch(100));
            assert!(blocks.bytes <= size * 24);
        }
        blocks.insert(key(99), batch(400)); // over an eighth of the cache: not kept
        assert!(blocks.get(&key(99)).is_none());
        assert_eq!(blocks.map.len(), blocks.order.len());
    }

    #[test]
    fn integer_parameters_are_read_in_text_and_binary() {
        let (int2, int4, int8) = (Some(&Type::INT2), Some(&Type::INT4), Some(&Type::INT8));
        assert_eq!(parameter(Some(b" 42"), false, None), Some(42));
        assert_eq!(parameter(Some(b"42"), false, int4), Some(42));
        assert_eq!(parameter(Some(b"4.2"), false, None), None);
        assert_eq!(
            parameter(Some(&(-3i16).to_be_bytes()), true, int2),
            Some(-3)
        );
        assert_eq!(parameter(Some(&7i32.to_be_bytes()), true, int4), Some(7));
        let big = (1i64 << 40).to_be_bytes();
        assert_eq!(parameter(Some(&big), true, int8), Some(1 << 40));
        assert_eq!(parameter(Some(&big), true, None), Some(1 << 40));
        // Declared otherwise, or a width that is not the declared type's: planned.
        let float = 1.0f64.to_be_bytes();
        assert_eq!(parameter(Some(&float), true, Some(&Type::FLOAT8)), None);
        assert_eq!(parameter(Some(b"42"), true, Some(&Type::TEXT)), None);
        assert_eq!(parameter(Some(b"42"), false, Some(&Type::TEXT)), None);
        assert_eq!(parameter(Some(&7i32.to_be_bytes()), true, None), None);
        assert_eq!(parameter(Some(&7i32.to_be_bytes()), true, int8), None);
        assert_eq!(parameter(None, false, None), None);
    }
}
