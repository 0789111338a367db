//! Lake views: every table of the lake at one source position, ready for DataFusion.
//!
//! # Design
//! Raw and curated tables are committed one by one, then the checkpoint table records the
//! batch's end LSN, its last commit time and the Delta version of every table
//! (`lake::checkpoint`). A reader that took each table's latest version could see a
//! source transaction in `transacoes` but not yet in `imoveis`. The endpoint therefore reads
//! tables only at the versions of one checkpoint record: a [`Position`]. A [`View`] is the
//! DataFusion state (catalog, `pg_catalog`, functions, refined views) with every table
//! pinned at the versions of one position; a statement runs on one view from planning to
//! its last row.
//!
//! Views are built lazily, when a statement needs a position no view has yet, so an idle
//! endpoint costs nothing per batch. Delta tables are cached and moved forward
//! incrementally. Older positions (time travel, `SET wal2delta.as_of`) are found by
//! walking the checkpoint's history; a few such views are kept.
//!
//! Names ([`Namespace`]): curated tables keep their source schema and name, raw change
//! logs are `raw.<table>` (source schema `public`) or `raw_<schema>.<table>`, views from
//! `<refined_dir>/<name>.sql` are `refined.<name>`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use deltalake::DeltaTable;
use deltalake::datafusion::arrow::datatypes::DataType;
use deltalake::datafusion::catalog::{MemorySchemaProvider, TableFunctionImpl};
use deltalake::datafusion::common::{DataFusionError, ScalarValue, plan_err};
use deltalake::datafusion::datasource::TableProvider;
use deltalake::datafusion::execution::SessionState;
use deltalake::datafusion::logical_expr::{ColumnarValue, Expr, Volatility, create_udf};
use deltalake::datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;
use tokio::sync::Mutex;
use url::Url;

use super::namespace::Namespace;
use crate::lake::Lake;
use crate::lake::checkpoint::{CheckpointRecord, TableVersions};
use crate::lsn::Lsn;
use crate::table_name::TableName;

/// The catalog (database) name clients see.
pub const DATABASE: &str = "wal2delta";

/// One checkpoint record: a source position and every table's Delta version there.
pub type Position = CheckpointRecord;

/// What `SET wal2delta.as_of` asks for.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Lsn(Lsn),
    /// Unix microseconds.
    Time(i64),
}

impl Target {
    /// Parses an LSN (`0/16B3748`) or a timestamp (`2026-11-21 10:00:00+00`, RFC 3339, or
    /// without zone meaning UTC).
    pub fn parse(text: &str) -> Result<Target, String> {
        let text = text.trim();
        if let Ok(lsn) = text.parse::<Lsn>() {
            return Ok(Target::Lsn(lsn));
        }
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
            return Ok(Target::Time(t.timestamp_micros()));
        }
        for format in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z"] {
            if let Ok(t) = chrono::DateTime::parse_from_str(text, format) {
                return Ok(Target::Time(t.timestamp_micros()));
            }
        }
        for format in [
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%d %H:%M:%S",
            "%Y-%m-%dT%H:%M:%S%.f",
        ] {
            if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, format) {
                return Ok(Target::Time(t.and_utc().timestamp_micros()));
            }
        }
        Err(format!(
            "`{text}` is neither an LSN (0/16B3748) nor a timestamp (2026-11-21 10:00:00+00); use 'latest' to read the newest data"
        ))
    }
}

/// Every table at one position, as DataFusion state.
pub struct View {
    pub position: Position,
    pub state: SessionState,
    /// Restricted users' catalog lists, kept with the view so that the OIDs their
    /// `pg_catalog` hands out stay the same from one statement to the next (psql's `\d`
    /// looks a table up in one statement and its columns in the next).
    restricted: std::sync::Mutex<
        HashMap<String, Arc<dyn deltalake::datafusion::catalog::CatalogProviderList>>,
    >,
    /// Curated tables point lookups can answer without planning (`lookup`), by served
    /// schema and name.
    lookups: HashMap<(String, String), Arc<super::lookup::Target>>,
}

impl View {
    /// The lookup target served as `schema`.`table`, if lookups can answer it.
    pub fn lookup_target(&self, schema: &str, table: &str) -> Option<&Arc<super::lookup::Target>> {
        self.lookups.get(&(schema.to_string(), table.to_string()))
    }

    /// The catalog list `user` sees with `grants` (`grants::restrict`), built once per view.
    pub fn restricted(
        &self,
        user: &str,
        grants: &Arc<super::grants::Grants>,
    ) -> Result<Arc<dyn deltalake::datafusion::catalog::CatalogProviderList>, DataFusionError> {
        let mut cache = self.restricted.lock().expect("restricted catalogs lock");
        if let Some(list) = cache.get(user) {
            return Ok(list.clone());
        }
        let list =
            super::grants::restrict(self.state.catalog_list().clone(), grants.clone(), user)?;
        cache.insert(user.to_string(), list.clone());
        Ok(list)
    }
}

impl Drop for View {
    /// datafusion-postgres's `pg_catalog` schema holds the catalog list it is registered
    /// in: a reference cycle that kept every view ever built (all its table states and
    /// pg_catalog's tables, several MB) alive. At five positions a second a SQL reader
    /// grew the daemon by about 28 MB/s. Unregistering the schema breaks the cycle.
    fn drop(&mut self) {
        if let Some(catalog) = self.state.catalog_list().catalog(DATABASE) {
            let _ = catalog.deregister_schema("pg_catalog", true);
        }
    }
}

/// Builds and caches views of one lake.
pub struct Views {
    lake: Lake,
    checkpoint_url: Url,
    checkpoint: Mutex<Option<DeltaTable>>,
    /// Object stores and caches (Parquet metadata) shared by every view.
    runtime: Arc<deltalake::datafusion::execution::runtime_env::RuntimeEnv>,
    refined: Vec<(String, String)>,
    namespace: Namespace,
    tables: Mutex<HashMap<Url, DeltaTable>>,
    /// Curated tables' files as `dv_scan` reads them: bounds, live row counts, and each
    /// deletion vector as a row selection.
    selections: super::dv_scan::Selections,
    /// Footers and deletion vectors point lookups read (`lookup`).
    pub lookup_caches: Arc<super::lookup::Caches>,
    /// Lookup targets by table version, made table by table as lookups ask for them and
    /// again for each new position before it is served (`prepare_lookups`): a lookup on
    /// the live position waits for no view build (which covers every table,
    /// `pg_catalog` and the refined views).
    lookup_targets: std::sync::Mutex<LookupTargets>,
    /// Held while any lookup target is made (one at a time), so that the sessions asking
    /// for the same one wait for one making instead of each making their own.
    lookup_making: Mutex<()>,
    /// The source's primary keys, when the daemon runs in this process.
    keys: super::primary_keys::PrimaryKeys,
    latest: Mutex<Option<Arc<View>>>,
    past: Mutex<Vec<Arc<View>>>,
    /// Refined views that failed to plan, with the error: logged once per change.
    refined_errors: std::sync::Mutex<HashMap<String, String>>,
}

/// Lookup targets by served schema and name (`None`: the table cannot be looked up), for
/// the newest [`TARGET_VERSIONS`] versions asked for. Only tables whose source keys are
/// known are kept; a target then depends on its table's version only, so one survives
/// positions that moved other tables.
#[derive(Default)]
struct LookupTargets(HashMap<(String, String), Vec<(u64, MaybeTarget)>>);

/// A table's lookup target at one version; `None` when lookups cannot answer it.
type MaybeTarget = Option<Arc<super::lookup::Target>>;

/// Versions of a table whose lookup targets are kept: the live one and the one before,
/// which sessions still read while the next is made (`Views::prepare_lookups`).
const TARGET_VERSIONS: usize = 2;

/// How long a new position waits for its lookup targets before it is served anyway.
const PREPARE_AT_MOST: std::time::Duration = std::time::Duration::from_millis(200);

impl LookupTargets {
    fn get(&self, id: &(String, String), version: u64) -> Option<MaybeTarget> {
        let kept = self.0.get(id)?;
        kept.iter()
            .find(|(v, _)| *v == version)
            .map(|(_, target)| target.clone())
    }

    fn keep(&mut self, id: (String, String), version: u64, target: MaybeTarget) {
        let kept = self.0.entry(id).or_default();
        kept.retain(|(v, _)| *v != version);
        kept.push((version, target));
        kept.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
        kept.truncate(TARGET_VERSIONS);
    }
}

/// A `<refined_dir>/*.sql` file is not a usable view.
#[derive(Debug, thiserror::Error)]
#[error("refined view {path}: {message}")]
pub struct RefinedError {
    path: String,
    message: String,
}

/// Reads `<dir>/<name>.sql` files (one SELECT each). A missing directory means no views;
/// a file that does not parse stops the start with an error naming it.
pub fn load_refined(dir: &Path) -> Result<Vec<(String, String)>, RefinedError> {
    let err = |path: &Path, message: String| RefinedError {
        path: path.display().to_string(),
        message,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(dir = %dir.display(), "no refined views directory; serving no refined.* views");
            return Ok(Vec::new());
        }
        Err(e) => return Err(err(dir, format!("cannot read the directory: {e}"))),
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    let mut views = Vec::new();
    for path in files {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(err(
                &path,
                "the file name must be the view name: lower-case letters, digits and _".into(),
            ));
        }
        let sql = std::fs::read_to_string(&path).map_err(|e| err(&path, e.to_string()))?;
        let body = sql.trim().trim_end_matches(';').trim().to_string();
        let statements =
            datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser::new()
                .parse(&body)
                .map_err(|e| err(&path, format!("does not parse: {e}")))?;
        match statements.as_slice() {
            [deltalake::datafusion::sql::sqlparser::ast::Statement::Query(_)] => {}
            _ => {
                return Err(err(
                    &path,
                    "must hold exactly one SELECT (the view's query)".into(),
                ));
            }
        }
        views.push((name, body));
    }
    Ok(views)
}

impl Views {
    pub fn new(lake: Lake, refined: Vec<(String, String)>, namespace: Namespace) -> Views {
        Views {
            namespace,
            checkpoint_url: lake.checkpoint_url(),
            checkpoint: Mutex::new(None),
            runtime: Arc::new(deltalake::datafusion::execution::runtime_env::RuntimeEnv::default()),
            lake,
            refined,
            tables: Mutex::new(HashMap::new()),
            selections: Default::default(),
            lookup_caches: Arc::new(super::lookup::Caches::new()),
            lookup_targets: Default::default(),
            lookup_making: Mutex::new(()),
            keys: Default::default(),
            latest: Mutex::new(None),
            past: Mutex::new(Vec::new()),
            refined_errors: Default::default(),
        }
    }

    /// Views that know the source's primary keys (`run`): lookups on a table keyed by one
    /// integer column are answered from key-index entries the endpoint builds itself
    /// when the daemon has not started them.
    pub fn with_keys(mut self, keys: super::primary_keys::PrimaryKeys) -> Views {
        self.keys = keys;
        self
    }

    /// The key-index entries lookups on curated table `name` use: the daemon's, or new
    /// ones for its primary key; only for one integer key column.
    fn lookup_keys(
        &self,
        name: &TableName,
        table: &DeltaTable,
        schema: &deltalake::arrow::datatypes::SchemaRef,
    ) -> Option<Arc<crate::lake::curated::PublishedKeys>> {
        // The source's key must be this one column: the daemon indexes the first key
        // column of any key (`REPLICA IDENTITY USING INDEX` may name another).
        let key = self.keys.of(name)?;
        let [column] = key.as_slice() else {
            return None;
        };
        let location = table.table_url();
        let keys = crate::lake::curated::published_keys(location.as_str())
            .unwrap_or_else(|| crate::lake::curated::keys_of(location.as_str(), column));
        if keys.column() != column {
            return None;
        }
        let integer = schema
            .field_with_name(keys.column())
            .is_ok_and(|f| f.data_type().is_integer());
        integer.then_some(keys)
    }

    /// The lookup target served as `schema`.`table` at `position` (the live one), without
    /// building a view; `None` when lookups cannot answer it.
    pub async fn lookup_target_at(
        &self,
        position: &Position,
        schema: &str,
        table: &str,
    ) -> Result<MaybeTarget, DataFusionError> {
        let found = position
            .versions
            .curated
            .iter()
            .find_map(|(name, version)| {
                let name = TableName::parse(name).ok()?;
                let served = self.namespace.curated(&name);
                (served.schema == schema && served.name == table).then_some((name, *version))
            });
        let Some((name, version)) = found else {
            return Ok(None);
        };
        if self.keys.of(&name).is_none() {
            // `wal2delta serve`, or `run` before the source's keys are read.
            return Ok(None);
        }
        let id = (schema.to_string(), table.to_string());
        let kept = |id: &(String, String)| {
            let targets = self
                .lookup_targets
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            targets.get(id, version)
        };
        if let Some(target) = kept(&id) {
            return Ok(target);
        }
        let _making = self.lookup_making.lock().await;
        if let Some(target) = kept(&id) {
            return Ok(target);
        }
        let url = self.lake.curated_table_url(&name);
        let delta = self.table_at(&url, version).await?;
        let provider = delta
            .table_provider()
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let served = provider.schema();
        let target = self
            .lookup_keys(&name, &delta, &served)
            .map(|keys| Arc::new(super::lookup::Target::new(delta, served, keys)));
        if let Some(target) = &target {
            // Parse the files' statistics now, once, rather than in the first lookup.
            target.prepare().await;
        }
        let mut targets = self
            .lookup_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        targets.keep(id, version, target.clone());
        Ok(target)
    }

    /// Makes the lookup targets of `position` (about to be published) for the tables
    /// lookups answered before, so that sessions find them made instead of waiting for
    /// their making at their next lookup; tables gone from `position` are forgotten.
    /// Gives up after [`PREPARE_AT_MOST`], leaving the rest (and any failure) to the
    /// lookups that meet them: the position is served either way.
    pub async fn prepare_lookups(&self, position: &Position) {
        let served: std::collections::HashSet<(String, String)> = position
            .versions
            .curated
            .keys()
            .filter_map(|name| {
                let served = self.namespace.curated(&TableName::parse(name).ok()?);
                Some((served.schema, served.name))
            })
            .collect();
        let asked: Vec<(String, String)> = {
            let mut targets = self
                .lookup_targets
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            targets.0.retain(|id, _| served.contains(id));
            targets
                .0
                .iter()
                .filter(|(_, kept)| kept.first().is_some_and(|(_, t)| t.is_some()))
                .map(|(id, _)| id.clone())
                .collect()
        };
        let prepare = async {
            for (schema, table) in asked {
                if let Err(e) = self.lookup_target_at(position, &schema, &table).await {
                    tracing::debug!(error = %e, %schema, %table, "a lookup target is made at the next lookup");
                }
            }
        };
        if tokio::time::timeout(PREPARE_AT_MOST, prepare)
            .await
            .is_err()
        {
            tracing::debug!("lookup targets not all made ahead; the next lookups make them");
        }
    }

    /// The checkpoint table moved to its newest version (opened on first use).
    async fn checkpoint_table(&self) -> Result<Option<DeltaTable>, DataFusionError> {
        let to_df = |e: deltalake::DeltaTableError| DataFusionError::External(Box::new(e));
        let mut cached = self.checkpoint.lock().await;
        if let Some(table) = cached.as_mut() {
            table.update_incremental(None).await.map_err(to_df)?;
            return Ok(Some(table.clone()));
        }
        if self.checkpoint_url.scheme() == "file"
            && self
                .checkpoint_url
                .to_file_path()
                .map(|p| !p.join("_delta_log").exists())
                .unwrap_or(true)
        {
            return Ok(None);
        }
        let table = DeltaTable::try_from_url(self.checkpoint_url.clone())
            .await
            .map_err(to_df)?;
        if table.version().is_none() {
            return Ok(None); // an object-store lake whose daemon has not committed yet
        }
        *cached = Some(table.clone());
        Ok(Some(table))
    }

    /// The newest checkpoint record, if the lake has one.
    pub async fn latest_position(&self) -> Result<Option<Position>, DataFusionError> {
        // The newest commit is almost always a record; markers (resets, publication
        // changes) are rare.
        match self.find_position(|_| true, Some(1)).await? {
            Some(p) => Ok(Some(p)),
            None => self.find_position(|_| true, Some(100)).await,
        }
    }

    /// The newest checkpoint record at or before `target`.
    pub async fn position_at(&self, target: Target) -> Result<Option<Position>, DataFusionError> {
        self.find_position(
            |p| match target {
                Target::Lsn(lsn) => p.lsn <= lsn,
                Target::Time(t) => p.commit_ts.is_some_and(|c| c <= t),
            },
            None,
        )
        .await
    }

    async fn find_position(
        &self,
        accept: impl Fn(&Position) -> bool,
        limit: Option<usize>,
    ) -> Result<Option<Position>, DataFusionError> {
        let Some(table) = self.checkpoint_table().await? else {
            return Ok(None);
        };
        let mut history = table.history(limit);
        while let Some(commit) = history.next().await {
            let commit = commit.map_err(|e| DataFusionError::External(Box::new(e)))?;
            if let Some(p) = CheckpointRecord::from_commit_info(&commit.info)
                && accept(&p)
            {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    /// The view at `position`, built unless cached. `latest` marks the live position.
    pub async fn view(
        &self,
        position: Position,
        latest: bool,
    ) -> Result<Arc<View>, DataFusionError> {
        if latest {
            let mut current = self.latest.lock().await;
            if let Some(v) = current.as_ref()
                && v.position == position
            {
                return Ok(v.clone());
            }
            let view = Arc::new(self.build(position).await?);
            *current = Some(view.clone());
            return Ok(view);
        }
        let mut past = self.past.lock().await;
        if let Some(v) = past.iter().find(|v| v.position == position) {
            return Ok(v.clone());
        }
        let view = Arc::new(self.build(position).await?);
        past.push(view.clone());
        if past.len() > 4 {
            past.remove(0);
        }
        Ok(view)
    }

    /// A view with no tables (the lake has no checkpoint yet): catalogs still answer.
    pub async fn empty(&self) -> Result<Arc<View>, DataFusionError> {
        let position = Position {
            lsn: Lsn(0),
            commit_ts: None,
            versions: TableVersions::default(),
        };
        self.view(position, true).await
    }

    /// Replaces `table_at_version` in a restricted user's statement context by one that
    /// checks the user's grants.
    pub fn restrict_functions(
        &self,
        ctx: &SessionContext,
        view: &View,
        grants: Arc<super::grants::Grants>,
    ) {
        let tables = view.position.versions.tables();
        ctx.register_udtf(
            "table_at_version",
            Arc::new(TableAtVersion {
                lake: self.lake.clone(),
                runtime: view.state.runtime_env().clone(),
                namespace: self.namespace.clone(),
                tables,
                grants: Some(grants),
            }),
        );
    }

    /// A Delta table at `version`: from the state the daemon in this process committed
    /// (when it is that version or nearer than the cache's) or the cache, moved forward;
    /// else loaded.
    async fn table_at(&self, url: &Url, version: u64) -> Result<DeltaTable, DataFusionError> {
        let to_df = |e: deltalake::DeltaTableError| DataFusionError::External(Box::new(e));
        let cached = self.tables.lock().await.get(url).cloned();
        let committed = crate::lake::table::committed(url, version);
        let cached = match (cached, committed) {
            (Some(c), Some(d)) if c.version() <= Some(version) && c.version() >= d.version() => {
                Some(c)
            }
            (_, Some(d)) => Some(d),
            (c, None) => c,
        };
        let mut table = match cached {
            Some(t) => t,
            None => DeltaTable::try_from_url(url.clone()).await.map_err(to_df)?,
        };
        match table.version() {
            Some(v) if v == version => {}
            Some(v) if v < version => table
                .update_incremental(Some(version))
                .await
                .map_err(to_df)?,
            _ => table.load_version(version).await.map_err(to_df)?,
        }
        let mut tables = self.tables.lock().await;
        let newer = tables
            .get(url)
            .and_then(|t| t.version())
            .is_some_and(|v| v > version);
        if !newer {
            tables.insert(url.clone(), table.clone());
        }
        Ok(table)
    }

    async fn provider(
        &self,
        ctx: &SessionContext,
        url: &Url,
        version: u64,
        curated: bool,
    ) -> Result<(Arc<dyn TableProvider>, DeltaTable), DataFusionError> {
        let table = self.table_at(url, version).await?;
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let provider = table
            .table_provider()
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        if !curated {
            return Ok((provider, table));
        }
        let runtime = ctx.runtime_env();
        let dv =
            super::dv_scan::provider(&runtime, &table, provider.schema(), Some(&self.selections));
        Ok((dv.await?.unwrap_or(provider), table))
    }

    async fn build(&self, position: Position) -> Result<View, DataFusionError> {
        let build_started = std::time::Instant::now();
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema(DATABASE, "public")
            .with_information_schema(true);
        config.options_mut().sql_parser.dialect = "PostgreSQL".parse()?;
        let ctx = SessionContext::new_with_config_rt(config, self.runtime.clone());
        let catalog = ctx
            .catalog(DATABASE)
            .ok_or_else(|| DataFusionError::Internal("default catalog missing".into()))?;
        let versions = &position.versions;
        let tables = versions.tables();
        let clashes = self.namespace.clashes(&tables);
        if let Some(clash) = clashes.first() {
            return Err(DataFusionError::Configuration(clash.clone()));
        }
        let ns = &self.namespace;
        for schema in [ns.raw_schema_of("public").as_str(), ns.refined()] {
            catalog.register_schema(schema, Arc::new(MemorySchemaProvider::new()))?;
        }
        let mut lookups = HashMap::new();
        for (kind, versions) in [("raw", &versions.raw), ("curated", &versions.curated)] {
            for (table, version) in versions {
                let Ok(name) = TableName::parse(table) else {
                    continue;
                };
                let (url, served) = if kind == "raw" {
                    (self.lake.raw_table_url(&name), ns.raw(&name))
                } else {
                    (self.lake.curated_table_url(&name), ns.curated(&name))
                };
                let (provider, table) = self
                    .provider(&ctx, &url, *version, kind == "curated")
                    .await?;
                if kind == "curated"
                    && let Some(keys) = self.lookup_keys(&name, &table, &provider.schema())
                {
                    let target = super::lookup::Target::new(table, provider.schema(), keys);
                    lookups.insert(
                        (served.schema.clone(), served.name.clone()),
                        Arc::new(target),
                    );
                }
                let schema = match catalog.schema(&served.schema) {
                    Some(schema) => schema,
                    None => {
                        let schema = Arc::new(MemorySchemaProvider::new());
                        catalog.register_schema(&served.schema, schema.clone())?;
                        schema
                    }
                };
                schema.register_table(served.name, provider)?;
            }
        }
        let tables_us = build_started.elapsed().as_micros() as u64;
        install_functions(&ctx, self.lake.clone(), ns.clone(), tables);
        for (name, sql) in &self.refined {
            let result = ctx
                .sql(&format!(
                    "CREATE VIEW {}.{name} AS {sql}",
                    crate::table_name::quote_ident(ns.refined())
                ))
                .await;
            let mut errors = self.refined_errors.lock().expect("refined errors lock");
            match result {
                Ok(_) => {
                    errors.remove(name);
                }
                Err(e) => {
                    let message = e.to_string();
                    if errors.get(name) != Some(&message) {
                        tracing::warn!(view = %name, error = %message, "refined view is not served (its tables may not exist yet)");
                        errors.insert(name.clone(), message);
                    }
                }
            }
        }
        let catalog_started = std::time::Instant::now();
        datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog(
            &ctx,
            DATABASE,
            datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
        )
        .map_err(|e| *e)?;
        super::catalog_functions::register(&ctx);
        tracing::debug!(
            total_us = build_started.elapsed().as_micros() as u64,
            tables_us,
            pg_catalog_us = catalog_started.elapsed().as_micros() as u64,
            "view built"
        );
        Ok(View {
            position,
            state: ctx.state(),
            restricted: Default::default(),
            lookups,
        })
    }
}

/// `version()` in Postgres form, and `table_at_version('<schema>.<table>', <version>)`.
fn install_functions(
    ctx: &SessionContext,
    lake: Lake,
    namespace: Namespace,
    tables: Vec<TableName>,
) {
    let version = format!(
        "PostgreSQL 16.6 (wal2delta {}, Apache DataFusion) on x86_64-pc-linux-gnu",
        env!("CARGO_PKG_VERSION")
    );
    ctx.register_udf(create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |_| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(
                version.clone(),
            ))))
        }),
    ));
    ctx.register_udtf(
        "table_at_version",
        Arc::new(TableAtVersion {
            lake,
            runtime: ctx.runtime_env(),
            namespace,
            tables,
            grants: None,
        }),
    );
}

/// `table_at_version('raw.transacoes', 12)`: one table as of a Delta version.
#[derive(Debug)]
struct TableAtVersion {
    lake: Lake,
    runtime: Arc<deltalake::datafusion::execution::runtime_env::RuntimeEnv>,
    namespace: Namespace,
    /// The lake's tables (source names).
    tables: Vec<TableName>,
    /// A restricted user's grants.
    grants: Option<Arc<super::grants::Grants>>,
}

impl TableFunctionImpl for TableAtVersion {
    #[allow(deprecated)]
    fn call(&self, exprs: &[Expr]) -> Result<Arc<dyn TableProvider>, DataFusionError> {
        let usage =
            "table_at_version('<schema>.<table>', <delta version>), the table named as in \\dt";
        let (Some(Expr::Literal(ScalarValue::Utf8(Some(name)), _)), Some(Expr::Literal(v, _))) =
            (exprs.first(), exprs.get(1))
        else {
            return plan_err!("use {usage}");
        };
        let version = match v {
            ScalarValue::Int64(Some(v)) if *v >= 0 => *v,
            ScalarValue::Int32(Some(v)) if *v >= 0 => *v as i64,
            _ => return plan_err!("use {usage}: the version is a whole number ≥ 0"),
        };
        let Some((source, raw)) = TableName::parse(name)
            .ok()
            .and_then(|served| self.namespace.resolve(&served, &self.tables))
        else {
            return plan_err!("table_at_version: no table `{name}` in the lake; use {usage}");
        };
        let served = if raw {
            self.namespace.raw(&source)
        } else {
            self.namespace.curated(&source)
        };
        if let Some(grants) = &self.grants
            && !grants.allows(&served.schema, &served.name)
        {
            return Err(super::grants::denied(&served.schema, &served.name));
        }
        let url = if raw {
            self.lake.raw_table_url(&source)
        } else {
            self.lake.curated_table_url(&source)
        };
        // Table functions are planned synchronously; loading a Delta version is I/O.
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| DataFusionError::Execution(format!("table_at_version: {e}")))?;
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return plan_err!("table_at_version needs the multi-threaded runtime");
        }
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                let mut t = DeltaTable::try_from_url(url)
                    .await
                    .map_err(|e| DataFusionError::External(Box::new(e)))?;
                t.load_version(version as u64).await.map_err(|e| {
                    DataFusionError::Plan(format!(
                        "table_at_version: {name} has no version {version} ({e})"
                    ))
                })?;
                let provider = t
                    .table_provider()
                    .await
                    .map_err(|e| DataFusionError::External(Box::new(e)))?;
                if raw {
                    return Ok(provider);
                }
                let dv = super::dv_scan::provider(&self.runtime, &t, provider.schema(), None);
                Ok(dv.await?.unwrap_or(provider))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_view_frees_its_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(&crate::lake::LakeSettings {
            path: dir.path().to_string_lossy().into_owned(),
            storage: Default::default(),
            lease: std::time::Duration::from_secs(60),
        })
        .unwrap();
        let views = Views::new(lake, Vec::new(), Namespace::default());
        let view = views
            .build(Position {
                lsn: Lsn(0),
                commit_ts: None,
                versions: TableVersions::default(),
            })
            .await
            .unwrap();
        let catalogs = Arc::downgrade(view.state.catalog_list());
        drop(view);
        assert!(
            catalogs.upgrade().is_none(),
            "the view's catalog list outlived it (a reference cycle through pg_catalog)"
        );
    }

    #[test]
    fn lookup_targets_keep_the_newest_versions_of_each_table() {
        let mut targets = LookupTargets::default();
        let id = |t: &str| ("public".to_string(), t.to_string());
        for version in [3, 5, 4] {
            targets.keep(id("a"), version, None);
        }
        targets.keep(id("b"), 1, None);
        assert!(
            targets.get(&id("a"), 3).is_none(),
            "the oldest version is dropped"
        );
        assert!(targets.get(&id("a"), 4).is_some());
        assert!(targets.get(&id("a"), 5).is_some());
        assert!(
            targets.get(&id("b"), 1).is_some(),
            "other tables keep theirs"
        );
        assert!(targets.get(&id("b"), 2).is_none());
    }
}
