//! One client session: parse, refuse writes, answer the `wal2delta.*` settings, and run
//! everything else on one lake view with the statement limits.
//!
//! # Design
//! Query execution, the Postgres type mapping and the `SET`/`SHOW`/transaction/cursor
//! emulation come from datafusion-postgres (`DfSessionService`). What it does not do is
//! done here, around it:
//! - every statement gets a fresh `SessionContext` over the view it reads, so one
//!   statement sees one source position from planning to its last row, and a session's
//!   `SET` cannot change another session's state;
//! - that context has its own memory pool (`serve.query_memory_mb`) inside the budget
//!   all statements share (`serve.memory_mb`), with the functions that build large values
//!   guarded and the batches it holds counted (`budget`, `growth`, `held_batches`), and
//!   the statement a deadline
//!   (`serve.query_timeout_secs`) that also covers streaming the rows, whose values and
//!   total size are capped (`serve.max_value_mb`, `serve.max_result_mb`);
//! - a prepared statement is planned again on the current view at each execution, so a
//!   client that prepares once and executes for hours still sees new data;
//! - writes are refused from the parsed statement (`read_only`);
//! - DataFusion errors become Postgres SQLSTATEs (42601, 42P01, 42703, 53200, 54000,
//!   57014…);
//! - a response leaves in one TCP segment, sent at `Sync`, `Flush` or the end of a simple
//!   query, as Postgres sends it (`cork`).

use std::fmt::Debug;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion_postgres::DfSessionService;
use datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_postgres::pgwire;
use deltalake::datafusion::common::DataFusionError;
use deltalake::datafusion::execution::SessionStateBuilder;
use deltalake::datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use deltalake::datafusion::execution::memory_pool::MemoryPool;
use deltalake::datafusion::execution::runtime_env::RuntimeEnvBuilder;
use deltalake::datafusion::logical_expr::LogicalPlan;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::datafusion::sql::sqlparser::ast::{Reset, Set, Statement};
use futures::{Sink, StreamExt};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use tokio::sync::watch;

use super::bounded_map::BoundedMap;
use super::budget::{Budget, Output, Sent, StatementPool, TooLarge};
use super::read_only;
use super::view::{Position, Target, View, Views};

/// A parsed statement as datafusion-postgres stores it (its cursor hook needs this type).
pub type DfStatement = (String, Option<(Statement, LogicalPlan)>);

/// What every session shares.
pub struct Shared {
    pub views: Arc<Views>,
    /// The newest checkpoint record known (updated by `super::follow`).
    pub latest: watch::Receiver<Option<Position>>,
    pub timeout: Option<Duration>,
    /// Each statement's memory limit (`serve.query_memory_mb`).
    pub statement_memory: usize,
    /// What all statements together may reserve (`serve.memory_mb`).
    pub budget: Arc<Budget>,
    pub output: Output,
    /// Answers describe requests, which only look at a plan.
    describer: Arc<DfSessionService>,
    /// Users restricted to some tables.
    grants: std::collections::HashMap<String, Arc<super::grants::Grants>>,
    /// What the other users read: every table.
    everything: Arc<super::grants::Grants>,
    /// The source's primary keys, for JDBC's `getPrimaryKeys`.
    keys: super::primary_keys::PrimaryKeys,
}

impl Shared {
    pub fn new(
        views: Arc<Views>,
        latest: watch::Receiver<Option<Position>>,
        settings: &super::config::ServeSettings,
        keys: super::primary_keys::PrimaryKeys,
    ) -> Shared {
        Shared {
            views,
            latest,
            timeout: settings.query_timeout,
            statement_memory: settings.query_memory_bytes,
            budget: Arc::new(Budget::new(settings.memory_bytes)),
            grants: settings.grants.clone(),
            everything: Arc::new(super::grants::Grants::everything()),
            output: settings.output,
            keys,
            describer: Arc::new(DfSessionService::new(Arc::new(SessionContext::new()))),
        }
    }
}

/// `SET wal2delta.as_of`: what the user wrote and the position it resolved to.
#[derive(Clone)]
struct AsOf {
    text: String,
    position: Position,
}

/// The per-connection query handler (simple and extended protocol).
pub struct Session {
    shared: Arc<Shared>,
    as_of: Arc<std::sync::Mutex<Option<AsOf>>>,
    parser: Arc<SessionParser>,
    /// Plans of prepared statements on the current view.
    plans: std::sync::Mutex<super::plan_cache::PlanCache>,
    /// Holds the socket's output until a response is complete.
    cork: super::cork::Cork,
    /// Whether a statement is a point lookup, by its text (`lookup::shape`).
    shapes: std::sync::Mutex<BoundedMap<String, Option<super::lookup::Shape>>>,
}

/// Statements a session remembers facts of, by text (prepared statements are few)…
const REMEMBERED: usize = 256;

/// …when their text is at most this long (so that a session keeps at most 1 MiB of
/// texts per cache; longer statements are rare and dearer to run than to look at).
const REMEMBERED_TEXT: usize = 4096;

impl Session {
    pub fn new(shared: Arc<Shared>, cork: super::cork::Cork) -> Session {
        let as_of = Arc::new(std::sync::Mutex::new(None));
        Session {
            parser: Arc::new(SessionParser {
                shared: shared.clone(),
                as_of: as_of.clone(),
                names: std::sync::Mutex::new(BoundedMap::new(REMEMBERED)),
            }),
            shared,
            as_of,
            plans: Default::default(),
            cork,
            shapes: std::sync::Mutex::new(BoundedMap::new(REMEMBERED)),
        }
    }
}

pub fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

/// What stops a running statement: its deadline (`serve.query_timeout_secs`) or a cancel
/// request from the client (`cancel`).
#[derive(Clone)]
struct Stop {
    deadline: Option<Instant>,
    cancelled: tokio_util::sync::CancellationToken,
}

impl Stop {
    /// The error to send if the statement must stop now. Checked before each row: a
    /// result whose rows are always ready (a fast scan, a COPY) never waits on
    /// [`Stop::reached`].
    fn passed(&self) -> Option<PgWireError> {
        if self.cancelled.is_cancelled() {
            Some(cancel_error())
        } else if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(timeout_error())
        } else {
            None
        }
    }

    /// Resolves, with the error to send, when the statement must stop.
    async fn reached(&self) -> PgWireError {
        let deadline = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = deadline => timeout_error(),
            _ = self.cancelled.cancelled() => cancel_error(),
        }
    }
}

fn cancel_error() -> PgWireError {
    user_error("57014", "canceling statement due to user request")
}

fn timeout_error() -> PgWireError {
    user_error(
        "57014",
        "canceling statement due to statement timeout (serve.query_timeout_secs)",
    )
}

/// The SQLSTATE for a DataFusion error.
fn sqlstate(e: &DataFusionError) -> &'static str {
    match e.find_root() {
        DataFusionError::SQL(..) => "42601",
        DataFusionError::ResourcesExhausted(_) => "53200",
        DataFusionError::External(e) if e.is::<TooLarge>() => "54000",
        DataFusionError::NotImplemented(_) => "0A000",
        DataFusionError::SchemaError(..) => {
            let m = e.to_string();
            if m.contains("No field named") || m.contains("not found") {
                "42703"
            } else if m.contains("mbiguous") {
                "42702"
            } else {
                "42P18"
            }
        }
        DataFusionError::Plan(m) => {
            if m.starts_with("permission denied") {
                "42501"
            } else if m.contains("table") && m.contains("not found") {
                "42P01"
            } else if m.contains("function") || m.contains("Function") {
                "42883"
            } else {
                "42601"
            }
        }
        DataFusionError::ArrowError(e, _)
            if matches!(
                **e,
                deltalake::datafusion::arrow::error::ArrowError::DivideByZero
            ) =>
        {
            "22012"
        }
        DataFusionError::ArrowError(..) => "22000",
        _ => "XX000",
    }
}

/// Gives DataFusion and parser errors their Postgres SQLSTATE.
fn classify(e: PgWireError) -> PgWireError {
    match e {
        PgWireError::ApiError(inner) => {
            let message = inner.to_string();
            let code = match inner.downcast_ref::<DataFusionError>() {
                Some(df) => sqlstate(df),
                None if inner
                    .downcast_ref::<deltalake::datafusion::sql::sqlparser::parser::ParserError>()
                    .is_some() =>
                {
                    "42601"
                }
                None => "XX000",
            };
            // A cap's own message, without DataFusion's "External error: ".
            let message = match inner
                .downcast_ref::<DataFusionError>()
                .map(|e| e.find_root())
            {
                Some(DataFusionError::External(e)) if e.is::<TooLarge>() => e.to_string(),
                _ => message,
            };
            let message = if code == "22012" {
                "division by zero".to_string()
            } else {
                message
            };
            // Some operators replace the pool's message with their own.
            let message = if code == "53200" && !message.contains("serve.") {
                format!(
                    "{message} (serve.query_memory_mb limits each statement, serve.memory_mb all statements together)"
                )
            } else {
                message
            };
            user_error(code, message)
        }
        other => other,
    }
}

/// Counts the statement's outcome for the metrics.
fn counted<T>(result: PgWireResult<T>) -> PgWireResult<T> {
    match &result {
        Ok(_) => crate::telemetry::sql_statement("ok"),
        Err(PgWireError::UserError(info)) => {
            crate::telemetry::sql_statement(info.code.get(..2).unwrap_or("XX"))
        }
        Err(_) => crate::telemetry::sql_statement("XX"),
    }
    result
}

fn parse(sql: &str) -> PgWireResult<Vec<Statement>> {
    // Built once: its blacklist and rewrite rules took part of every statement's time.
    static PARSER: std::sync::LazyLock<PostgresCompatibilityParser> =
        std::sync::LazyLock::new(PostgresCompatibilityParser::new);
    PARSER
        .parse(sql)
        .map_err(|e| user_error("42601", format!("syntax error: {e}")))
}

fn guard(statement: &Statement) -> PgWireResult<()> {
    read_only::check(statement).map_err(|r| user_error("25006", r.to_string()))
}

/// A `wal2delta.*` setting a statement is about.
enum Setting {
    ShowPosition,
    ShowAsOf,
    SetAsOf(Option<String>),
    ResetAll,
    Discard,
    Deallocate,
}

fn setting(statement: &Statement) -> Option<Setting> {
    let is_as_of = |name: &str| name.eq_ignore_ascii_case("wal2delta.as_of");
    match statement {
        Statement::ShowVariable { variable } => {
            let name = variable
                .iter()
                .map(|i| i.value.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(".");
            match name.as_str() {
                "wal2delta.position" => Some(Setting::ShowPosition),
                "wal2delta.as_of" => Some(Setting::ShowAsOf),
                _ => None,
            }
        }
        Statement::Set(Set::SingleAssignment {
            variable, values, ..
        }) if is_as_of(&variable.to_string()) => {
            let value = values
                .first()
                .map(|v| v.to_string().trim_matches('\'').to_string())
                .filter(|v| {
                    !v.eq_ignore_ascii_case("latest") && !v.eq_ignore_ascii_case("default")
                });
            Some(Setting::SetAsOf(value))
        }
        Statement::Reset(r) => match &r.reset {
            Reset::ALL => Some(Setting::ResetAll),
            Reset::ConfigurationParameter(name) if is_as_of(&name.to_string()) => {
                Some(Setting::SetAsOf(None))
            }
            Reset::ConfigurationParameter(_) => Some(Setting::ResetAll),
        },
        Statement::Discard { .. } => Some(Setting::Discard),
        Statement::Deallocate { .. } => Some(Setting::Deallocate),
        _ => None,
    }
}

impl Session {
    fn as_of(&self) -> Option<AsOf> {
        self.as_of.lock().expect("as_of lock").clone()
    }
}

/// The view a statement of this session reads.
async fn view_for(
    shared: &Shared,
    as_of: &std::sync::Mutex<Option<AsOf>>,
) -> PgWireResult<Arc<View>> {
    let pinned = as_of.lock().expect("as_of lock").clone();
    let latest = shared.latest.borrow().clone();
    let result = match (pinned, latest) {
        (Some(a), _) => shared.views.view(a.position, false).await,
        (None, Some(p)) => shared.views.view(p, true).await,
        (None, None) => shared.views.empty().await,
    };
    result.map_err(|e| {
        user_error(
            "58030",
            format!(
                "cannot open the lake tables: {e}; check the lake directory and the daemon's log"
            ),
        )
    })
}

/// pgjdbc's `getPrimaryKeys`, answered from the source's keys for the tables the user
/// may read (`primary_keys`).
fn primary_keys<C: ClientInfo + ?Sized>(
    shared: &Shared,
    client: &C,
    sql: &str,
    statement: &mut Statement,
) -> bool {
    let grants = client
        .metadata()
        .get(pgwire::api::METADATA_USER)
        .and_then(|u| shared.grants.get(u));
    super::primary_keys::answer_jdbc(sql, statement, &shared.keys, |schema, table| {
        grants.is_none_or(|g| g.allows(schema, table))
    })
}

/// A context over `view` for one statement: own memory pool (returned too, to wait for
/// its end), the client's time zone.
fn service_for<C: ClientInfo + ?Sized>(
    shared: &Shared,
    view: &View,
    client: &C,
) -> PgWireResult<(
    Arc<DfSessionService>,
    Weak<StatementPool>,
    Arc<SessionContext>,
)> {
    let base = view.state.runtime_env();
    let pool = Arc::new(StatementPool::new(
        shared.budget.clone(),
        shared.statement_memory,
        shared.output.max_value,
    ));
    let mut runtime = RuntimeEnvBuilder::new()
        .with_object_store_registry(base.object_store_registry.clone())
        .with_memory_pool(pool.clone())
        // No spilling: the limit is a limit, and the database host's disk is not ours.
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build()
        .map_err(|e| user_error("XX000", e.to_string()))?;
    // Parquet footers and page indexes stay cached across statements and positions.
    runtime.cache_manager = base.cache_manager.clone();
    let runtime = Arc::new(runtime);
    let mut config = view.state.config().clone();
    if let Some(tz) = client.metadata().get("timezone") {
        config.options_mut().execution.time_zone = Some(tz.clone());
    }
    let mut builder = SessionStateBuilder::new_from_existing(view.state.clone())
        .with_config(config)
        .with_runtime_env(runtime)
        .with_physical_optimizer_rule(Arc::new(super::held_batches::CountHeld));
    let user = client.metadata().get(pgwire::api::METADATA_USER);
    // Every session gets its own `pg_catalog` (its role, and only the tables it may read).
    if let Some(user) = user {
        let grants = shared
            .grants
            .get(user)
            .cloned()
            .unwrap_or_else(|| shared.everything.clone());
        let restricted = view
            .restricted(user, &grants)
            .map_err(|e| user_error("XX000", e.to_string()))?;
        builder = builder.with_catalog_list(restricted);
    }
    let mut state = builder.build();
    super::growth::guard(&mut state, &pool);
    let ctx = Arc::new(SessionContext::new_with_state(state));
    // `current_user`, `session_user` and `user` (rewritten to `session_user()`): the
    // session's user, where datafusion-postgres answers `postgres`.
    if let Some(user) = user.cloned() {
        ctx.register_udf(deltalake::datafusion::logical_expr::create_udf(
            "session_user",
            vec![],
            deltalake::datafusion::arrow::datatypes::DataType::Utf8,
            deltalake::datafusion::logical_expr::Volatility::Stable,
            Arc::new(move |_| {
                Ok(deltalake::datafusion::logical_expr::ColumnarValue::Scalar(
                    deltalake::datafusion::common::ScalarValue::Utf8(Some(user.clone())),
                ))
            }),
        ));
    }
    if let Some(grants) = user.and_then(|u| shared.grants.get(u)) {
        shared.views.restrict_functions(&ctx, view, grants.clone());
    }
    let service = Arc::new(DfSessionService::new(ctx.clone()));
    Ok((service, Arc::downgrade(&pool), ctx))
}

/// How long a finished statement waits for its plan's tasks to end.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Waits until the statement whose pool is `pool` holds no memory any more (or is gone):
/// its plan's tasks ended and gave their memory back to the shared budget. A failed plan's other tasks stop at their
/// next await, which can take a moment on a busy host; without this wait, the client's
/// next statement could be refused for `serve.memory_mb` by memory its last one held.
async fn released(pool: Weak<StatementPool>) {
    let until = Instant::now() + RELEASE_WAIT;
    while pool.upgrade().is_some_and(|p| p.reserved() > 0) {
        if Instant::now() >= until {
            tracing::debug!(
                "a finished statement's tasks still hold its memory after {RELEASE_WAIT:?}"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Rows of `response` stop with 57014 at `stop` and with 54000 past the `output`
/// caps, errors get their SQLSTATE, and the statement's duration (from `started` to the
/// last row) is recorded. `service` (the statement's context and memory pool) is kept
/// until the last row: the running plan does not hold it. Before the last message (the
/// end or the error), the plan is dropped and its memory waited for ([`released`]).
fn limited(
    response: Response,
    names: Option<&[Option<String>]>,
    stop: Stop,
    started: Instant,
    output: Output,
    statement: (Option<Arc<DfSessionService>>, Weak<StatementPool>),
) -> Response {
    let (service, pool) = statement;
    let Response::Query(mut query) = response else {
        crate::telemetry::sql_statement_duration(started.elapsed());
        return response;
    };
    let fields = query.row_schema();
    let fields = names
        .and_then(|n| super::column_names::rename(&fields, n))
        .map(Arc::new)
        .unwrap_or(fields);
    let tag = query.command_tag().to_string();
    let rows = std::mem::replace(query.data_rows(), Box::pin(futures::stream::empty()));
    let sent = Sent::new(output);
    let stream = futures::stream::unfold(Some((rows, sent, service)), move |running| {
        let (pool, stop) = (pool.clone(), stop.clone());
        async move {
            let (mut rows, mut sent, service) = running?;
            let next = match stop.passed() {
                Some(error) => Some(Err(error)),
                None => tokio::select! {
                    biased;
                    next = rows.next() => next,
                    error = stop.reached() => Some(Err(error)),
                },
            };
            let last = match next {
                Some(Ok(row)) => match sent.row(&row.data) {
                    Ok(()) => return Some((Ok(row), Some((rows, sent, service)))),
                    Err(message) => Some(user_error("54000", message)),
                },
                Some(Err(e)) => Some(classify(e)),
                None => None,
            };
            drop((rows, service));
            released(pool).await;
            crate::telemetry::sql_statement_duration(started.elapsed());
            last.map(|e| (Err(e), None))
        }
    });
    let mut limited = QueryResponse::new(fields, stream);
    limited.set_command_tag(&tag);
    Response::Query(limited)
}

async fn within<T>(
    stop: &Stop,
    work: impl std::future::Future<Output = PgWireResult<T>>,
) -> PgWireResult<T> {
    tokio::select! {
        biased;
        result = work => result,
        error = stop.reached() => Err(error),
    }
}

/// The SQL answering `SHOW wal2delta.position` on `view`.
fn position_sql(view: &View, as_of: Option<&AsOf>) -> String {
    let p = &view.position;
    let lsn = if p.versions.raw.is_empty() && p.versions.curated.is_empty() {
        "NULL".to_string()
    } else {
        format!("'{}'", p.lsn)
    };
    let time = p
        .commit_time_text()
        .map(|t| format!("CAST('{t}' AS TIMESTAMPTZ)"))
        .unwrap_or_else(|| "CAST(NULL AS TIMESTAMPTZ)".into());
    let reading = as_of
        .map(|a| a.text.replace('\'', "''"))
        .unwrap_or_else(|| "latest".into());
    format!("SELECT CAST({lsn} AS VARCHAR) AS lsn, {time} AS commit_time, '{reading}' AS as_of")
}

impl Session {
    /// Answers a `wal2delta.*` setting or session-reset statement.
    async fn answer(&self, setting: Setting, format: &Format) -> PgWireResult<Response> {
        match setting {
            Setting::ShowPosition | Setting::ShowAsOf => {
                let as_of = self.as_of();
                let view = view_for(&self.shared, &self.as_of).await?;
                let sql = match setting {
                    Setting::ShowPosition => position_sql(&view, as_of.as_ref()),
                    _ => format!(
                        "SELECT '{}' AS \"wal2delta.as_of\"",
                        as_of
                            .map(|a| a.text.replace('\'', "''"))
                            .unwrap_or_else(|| "latest".into())
                    ),
                };
                let ctx = SessionContext::new_with_state(view.state.clone());
                let df = ctx
                    .sql(&sql)
                    .await
                    .map_err(|e| classify(PgWireError::ApiError(Box::new(e))))?;
                Ok(Response::Query(encode_dataframe(df, format, None).await?))
            }
            Setting::SetAsOf(None) => {
                *self.as_of.lock().expect("as_of lock") = None;
                Ok(Response::Execution(Tag::new("SET")))
            }
            Setting::SetAsOf(Some(text)) => {
                let target = Target::parse(&text).map_err(|m| user_error("22023", m))?;
                let position = self
                    .shared
                    .views
                    .position_at(target)
                    .await
                    .map_err(|e| user_error("58030", format!("cannot read the checkpoint history: {e}")))?
                    .ok_or_else(|| {
                        user_error(
                            "22023",
                            format!(
                                "the lake has no position at or before {text}: nothing had been replicated yet, or that history is older than the daemon's maintenance.log_retention_hours and was cleaned up"
                            ),
                        )
                    })?;
                *self.as_of.lock().expect("as_of lock") = Some(AsOf { text, position });
                Ok(Response::Execution(Tag::new("SET")))
            }
            Setting::ResetAll => {
                *self.as_of.lock().expect("as_of lock") = None;
                Ok(Response::Execution(Tag::new("RESET")))
            }
            Setting::Discard => {
                *self.as_of.lock().expect("as_of lock") = None;
                Ok(Response::Execution(Tag::new("DISCARD ALL")))
            }
            Setting::Deallocate => Ok(Response::Execution(Tag::new("DEALLOCATE"))),
        }
    }

    /// Runs a `COPY … TO STDOUT`: its query on the statement's context, the rows as COPY
    /// data.
    async fn copy(
        &self,
        copy: super::copy_out::CopyOut,
        stop: Stop,
        started: Instant,
        statement: (
            Arc<DfSessionService>,
            Weak<StatementPool>,
            Arc<SessionContext>,
        ),
    ) -> PgWireResult<Response> {
        let (service, pool, ctx) = statement;
        let format = if copy.format.binary() {
            Format::UnifiedBinary
        } else {
            Format::UnifiedText
        };
        let rows = within(&stop, async {
            let df = ctx
                .sql(&copy.query)
                .await
                .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
            encode_dataframe(df, &format, None).await
        })
        .await
        .map_err(classify)?;
        match limited(
            Response::Query(rows),
            copy.names.as_deref(),
            stop,
            started,
            self.shared.output,
            (Some(service), pool),
        ) {
            Response::Query(rows) => Ok(super::copy_out::response(copy.format, rows)),
            other => Ok(other),
        }
    }

    /// `statement` answered as a point lookup (`lookup`) at the position the session
    /// reads, when it is one and the user may read the table; `None` to plan it as
    /// usual. `portal` holds the parameters of an extended-protocol statement; `text`
    /// is the SQL the statement was parsed from, when nothing rewrote it since (its
    /// shape is then remembered by that text).
    async fn lookup<C: ClientInfo + ?Sized>(
        &self,
        client: &C,
        (statement, text): (&Statement, Option<&str>),
        portal: Option<&Portal<DfStatement>>,
        format: &Format,
        stop: &Stop,
    ) -> PgWireResult<Option<Response>> {
        use super::lookup::{KeyValue, parameter, rows, shape};
        let text = text.filter(|t| t.len() <= REMEMBERED_TEXT);
        let known = text.and_then(|t| {
            let shapes = self.shapes.lock().unwrap_or_else(|e| e.into_inner());
            shapes.get(t)
        });
        let found = match known {
            Some(found) => found,
            None => {
                let found = shape(statement);
                if let Some(t) = text {
                    let mut shapes = self.shapes.lock().unwrap_or_else(|e| e.into_inner());
                    shapes.insert(t.to_string(), found.clone());
                }
                found
            }
        };
        let Some(shape) = found else {
            return Ok(None);
        };
        // The live position needs no view (`Views::lookup_target_at`); a pinned one
        // (`wal2delta.as_of`) reads its view's tables.
        let pinned = self.as_of.lock().expect("as_of lock").is_some();
        let latest = self.shared.latest.borrow().clone();
        let target = match (pinned, latest) {
            (false, Some(position)) => self
                .shared
                .views
                .lookup_target_at(&position, &shape.schema, &shape.table)
                .await
                .ok()
                .flatten(),
            (true, _) => view_for(&self.shared, &self.as_of)
                .await?
                .lookup_target(&shape.schema, &shape.table)
                .cloned(),
            (false, None) => None,
        };
        let Some(target) = target else {
            return Ok(None);
        };
        if target.keys.column() != shape.column {
            return Ok(None);
        }
        let user = client.metadata().get(pgwire::api::METADATA_USER);
        if let Some(grants) = user.and_then(|u| self.shared.grants.get(u))
            && !grants.allows(&shape.schema, &shape.table)
        {
            return Ok(None); // refused by the planner, with its message
        }
        let key = match shape.value {
            KeyValue::Literal(v) => v,
            KeyValue::Parameter(i) => {
                let Some(portal) = portal else {
                    return Ok(None);
                };
                let bytes = portal.parameters.get(i).and_then(|p| p.as_deref());
                let declared = portal
                    .statement
                    .parameter_types
                    .get(i)
                    .and_then(Option::as_ref);
                match parameter(bytes, portal.parameter_format.is_binary(i), declared) {
                    Some(v) => v,
                    None => return Ok(None),
                }
            }
        };
        let caches = self.shared.views.lookup_caches.clone();
        let found = within(stop, async {
            Ok(rows(&caches, &target, shape.columns.as_deref(), key).await)
        })
        .await?;
        let batch = match found {
            Ok(batch) => batch,
            Err(why) => {
                tracing::debug!(reason = %why.0, "a point lookup is planned instead");
                return Ok(None);
            }
        };
        let options = pgwire::types::format::FormatOptions::from_client_metadata(client.metadata());
        let fields = Arc::new(
            datafusion_postgres::arrow_pg::datatypes::arrow_schema_to_pg_fields(
                batch.schema().as_ref(),
                format,
                Some(Arc::new(options)),
            )?,
        );
        let encoded: Vec<_> =
            datafusion_postgres::arrow_pg::datatypes::encode_recordbatch(fields.clone(), batch)
                .collect();
        crate::telemetry::sql_lookup();
        Ok(Some(Response::Query(QueryResponse::new(
            fields,
            futures::stream::iter(encoded),
        ))))
    }

    /// The limits of a statement the session starts now.
    async fn stop(&self, client: &impl ClientInfo) -> Stop {
        Stop {
            deadline: self.shared.timeout.map(|t| Instant::now() + t),
            cancelled: super::cancel::statement_token(client).await,
        }
    }
}

/// An error pgwire sends for a statement of this session goes out at once, as Postgres
/// sends errors, even while the socket is held for the next `Sync` (the client may wait
/// for it after a `Flush`, which pgwire drops while it waits for `Sync`).
impl pgwire::api::ErrorHandler for Session {
    fn on_error<C: ClientInfo>(&self, _client: &C, _error: &mut PgWireError) {
        self.cork.release();
    }
}

#[async_trait]
impl SimpleQueryHandler for Session {
    /// pgwire's handling, except for a lone `COPY … TO STDOUT`, whose response the session
    /// sends itself so that an error ends it the Postgres way (`copy_out::send`).
    async fn on_query<C>(
        &self,
        client: &mut C,
        query: pgwire::messages::simplequery::Query,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        self.cork.hold();
        let answered = async {
            // Only a statement that mentions COPY can be one (a parse costs more than a look).
            let mentions_copy = query
                .query
                .as_bytes()
                .windows(4)
                .any(|w| w.eq_ignore_ascii_case(b"copy"));
            let lone_copy = match mentions_copy.then(|| parse(&query.query)) {
                Some(Ok(statements)) => match statements.as_slice() {
                    [s] => super::copy_out::parse(s).and_then(Result::ok),
                    _ => None,
                },
                _ => None,
            };
            let Some(header) = lone_copy.map(|c| c.format.header_message()) else {
                return self._on_query(client, query).await;
            };
            if !matches!(
                client.state(),
                pgwire::api::PgWireConnectionState::ReadyForQuery
            ) {
                return self._on_query(client, query).await;
            }
            let status = client.transaction_status();
            client.set_state(pgwire::api::PgWireConnectionState::QueryInProgress);
            for response in SimpleQueryHandler::do_query(self, client, &query.query).await? {
                match response {
                    Response::CopyOut(copy) => super::copy_out::send(client, copy, header).await?,
                    other => {
                        return Err(user_error(
                            "XX000",
                            format!("COPY answered with an unexpected response: {other:?}"),
                        ));
                    }
                }
            }
            client.set_state(pgwire::api::PgWireConnectionState::ReadyForQuery);
            client.set_transaction_status(status);
            pgwire::api::query::send_ready_for_query(client, status).await
        }
        .await;
        // Also before an error goes out: pgwire sends it after this returns.
        self.cork.release();
        answered
    }

    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        counted(
            async {
                let statements = parse(query)?;
                if statements.is_empty() {
                    return Ok(vec![Response::EmptyQuery]);
                }
                let single = statements.len() == 1;
                let mut responses = Vec::new();
                // One token for the whole message: its statements' rows stream only after
                // all are planned, and a cancel stops whichever is running.
                let cancelled = super::cancel::statement_token(client).await;
                for mut statement in statements {
                    guard(&statement)?;
                    let rewritten = super::rewrite::rewrite(&mut statement)
                        | primary_keys(&self.shared, client, query, &mut statement);
                    if let Some(s) = setting(&statement) {
                        responses.push(self.answer(s, &Format::UnifiedText).await?);
                        continue;
                    }
                    let started = Instant::now();
                    let stop = Stop {
                        deadline: self.shared.timeout.map(|t| Instant::now() + t),
                        cancelled: cancelled.clone(),
                    };
                    let names = || {
                        if single {
                            super::column_names::of_text(query, &statement)
                        } else {
                            super::column_names::of(&statement)
                        }
                    };
                    let format = Format::UnifiedText;
                    // Not remembered by text: a simple query carries its key as a literal.
                    if let Some(rows) = self
                        .lookup(client, (&statement, None), None, &format, &stop)
                        .await?
                    {
                        let output = self.shared.output;
                        let none = (None, Weak::new());
                        // Named as the served columns, which the statement names.
                        responses.push(limited(rows, None, stop, started, output, none));
                        continue;
                    }
                    let view = view_for(&self.shared, &self.as_of).await?;
                    let (service, pool, ctx) = service_for(&self.shared, &view, client)?;
                    if let Some(copy) = super::copy_out::parse(&statement) {
                        if !single {
                            return Err(user_error(
                                "0A000",
                                "COPY … TO STDOUT must be sent alone, not with other statements in one query string",
                            ));
                        }
                        let (stop, statement) = (stop.clone(), (service, pool, ctx));
                        responses.push(self.copy(copy?, stop, started, statement).await?);
                        continue;
                    }
                    let sql = if single && !rewritten {
                        query.to_string()
                    } else {
                        statement.to_string()
                    };
                    let results = within(
                        &stop,
                        SimpleQueryHandler::do_query(service.as_ref(), client, &sql),
                    )
                    .await
                    .map_err(classify)?;
                    let names = names();
                    responses.extend(results.into_iter().map(|r| {
                        let statement = (Some(service.clone()), pool.clone());
                        let stop = stop.clone();
                        limited(
                            r,
                            names.as_deref(),
                            stop,
                            started,
                            self.shared.output,
                            statement,
                        )
                    }));
                }
                Ok(responses)
            }
            .await,
        )
    }
}

/// Parses for the extended protocol: checks, then plans on the session's current view.
pub struct SessionParser {
    shared: Arc<Shared>,
    as_of: Arc<std::sync::Mutex<Option<AsOf>>>,
    /// Postgres's names of a statement's columns, by its text (`column_names::of_text`);
    /// clients describe a prepared statement at each execution.
    names: std::sync::Mutex<BoundedMap<String, Option<Vec<Option<String>>>>>,
}

#[async_trait]
impl QueryParser for SessionParser {
    type Statement = DfStatement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<DfStatement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = parse(sql)?;
        if statements.is_empty() {
            return Ok(None);
        }
        if statements.len() > 1 {
            return Err(user_error(
                "42601",
                "cannot insert multiple commands into a prepared statement",
            ));
        }
        let mut statement = statements.remove(0);
        guard(&statement)?;
        let rewritten = (super::rewrite::rewrite(&mut statement)
            | primary_keys(&self.shared, client, sql, &mut statement))
        .then(|| statement.to_string());
        let sql = rewritten.as_deref().unwrap_or(sql);
        let view = view_for(&self.shared, &self.as_of).await?;
        if let Some(s) = setting(&statement) {
            // The plan only describes the result; `answer` produces it at execution.
            let sql = match s {
                Setting::ShowPosition => position_sql(&view, None),
                Setting::ShowAsOf => "SELECT 'latest' AS \"wal2delta.as_of\"".into(),
                _ => "SELECT 1 WHERE false".into(),
            };
            let ctx = SessionContext::new_with_state(view.state.clone());
            let mut plan = ctx
                .state()
                .create_logical_plan(&sql)
                .await
                .map_err(|e| classify(PgWireError::ApiError(Box::new(e))))?;
            if !matches!(s, Setting::ShowPosition | Setting::ShowAsOf) {
                plan = LogicalPlan::EmptyRelation(
                    deltalake::datafusion::logical_expr::EmptyRelation {
                        produce_one_row: false,
                        schema: Arc::new(deltalake::datafusion::common::DFSchema::empty()),
                    },
                );
            }
            return Ok(Some((sql, Some((statement, plan)))));
        }
        if let Some(copy) = super::copy_out::parse(&statement) {
            copy?;
            // Described as returning no rows (NoData), as Postgres does; run at Execute.
            let plan =
                LogicalPlan::EmptyRelation(deltalake::datafusion::logical_expr::EmptyRelation {
                    produce_one_row: false,
                    schema: Arc::new(deltalake::datafusion::common::DFSchema::empty()),
                });
            return Ok(Some((sql.to_string(), Some((statement, plan)))));
        }
        let (service, _, _) = service_for(&self.shared, &view, client)?;
        service
            .query_parser()
            .parse_sql(client, sql, types)
            .await
            .map_err(classify)
    }

    fn get_parameter_types(&self, stmt: &DfStatement) -> PgWireResult<Vec<Type>> {
        self.shared
            .describer
            .query_parser()
            .get_parameter_types(stmt)
    }

    fn get_result_schema(
        &self,
        stmt: &DfStatement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let fields = self
            .shared
            .describer
            .query_parser()
            .get_result_schema(stmt, column_format)?;
        let Some((statement, _)) = stmt.1.as_ref() else {
            return Ok(fields);
        };
        let known = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&stmt.0);
        let names = match known {
            Some(names) => names,
            None => {
                let names = super::column_names::of_text(&stmt.0, statement);
                if stmt.0.len() <= REMEMBERED_TEXT {
                    let mut all = self.names.lock().unwrap_or_else(|e| e.into_inner());
                    all.insert(stmt.0.clone(), names.clone());
                }
                names
            }
        };
        let renamed = names.and_then(|names| super::column_names::rename(&fields, &names));
        Ok(renamed.unwrap_or(fields))
    }
}

#[async_trait]
impl ExtendedQueryHandler for Session {
    type Statement = DfStatement;
    type QueryParser = SessionParser;

    /// pgwire's handling, except for a portal of a `COPY … TO STDOUT`, whose response the
    /// session sends itself (`copy_out::send`).
    async fn on_execute<C>(
        &self,
        client: &mut C,
        message: pgwire::messages::extendedquery::Execute,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = DfStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use pgwire::api::PgWireConnectionState;
        let name = message.name.as_deref().unwrap_or(pgwire::api::DEFAULT_NAME);
        let portal = match client.portal_store().get_portal(name) {
            Some(pgwire::api::store::Entry::Value(portal)) => Some(portal),
            _ => None,
        };
        let copy = portal.and_then(|p| {
            let header = match &p.statement.statement.1 {
                Some((s, _)) => super::copy_out::parse(s)?.ok()?.format.header_message(),
                None => return None,
            };
            Some((p, header))
        });
        let Some((portal, header)) = copy else {
            return self._on_execute(client, message).await;
        };
        if !matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            return Err(PgWireError::NotReadyForQuery);
        }
        client.set_state(PgWireConnectionState::QueryInProgress);
        match ExtendedQueryHandler::do_query(self, client, &portal, 0).await? {
            Response::CopyOut(copy) => super::copy_out::send(client, copy, header).await?,
            other => {
                return Err(user_error(
                    "XX000",
                    format!("COPY answered with an unexpected response: {other:?}"),
                ));
            }
        }
        client.set_state(PgWireConnectionState::ReadyForQuery);
        Ok(())
    }

    /// pgwire's handling (the unnamed portal dropped, `ReadyForQuery` sent), then what
    /// waits in the socket leaves; the next messages' answers wait for the next `Sync`.
    async fn on_sync<C>(
        &self,
        client: &mut C,
        _message: pgwire::messages::extendedquery::Sync,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = DfStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        client.portal_store().rm_portal(pgwire::api::DEFAULT_NAME);
        let status = client.transaction_status();
        let sent = pgwire::api::query::send_ready_for_query(client, status).await;
        self.cork.release();
        self.cork.hold();
        sent
    }

    /// Sends what waits, as `Sync` does, without `ReadyForQuery`.
    async fn on_flush<C>(
        &self,
        client: &mut C,
        _message: pgwire::messages::extendedquery::Flush,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let flushed = futures::SinkExt::flush(client).await;
        self.cork.release();
        self.cork.hold();
        flushed?;
        Ok(())
    }

    fn query_parser(&self) -> Arc<SessionParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<DfStatement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = DfStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        counted(
            async {
                let (sql, parsed) = &portal.statement.statement;
                let Some((statement, _)) = parsed else {
                    return Ok(Response::EmptyQuery);
                };
                guard(statement)?;
                if let Some(s) = setting(statement) {
                    return self.answer(s, &portal.result_column_format).await;
                }
                let started = Instant::now();
                let stop = self.stop(client).await;
                let format = &portal.result_column_format;
                if let Some(rows) = self
                    .lookup(client, (statement, Some(sql)), Some(portal), format, &stop)
                    .await?
                {
                    let none = (None, Weak::new());
                    // Named at Describe (get_result_schema).
                    return Ok(limited(rows, None, stop, started, self.shared.output, none));
                }
                let view = view_for(&self.shared, &self.as_of).await?;
                let (service, pool, ctx) = service_for(&self.shared, &view, client)?;
                if let Some(copy) = super::copy_out::parse(statement) {
                    return self.copy(copy?, stop, started, (service, pool, ctx)).await;
                }
                // Planned again on the current view (a prepared statement sees new data),
                // unless this session planned it on this view already.
                let key = (
                    sql.clone(),
                    format!("{:?}", portal.statement.parameter_types),
                    client.metadata().get("timezone").cloned(),
                );
                let kept = self
                    .plans
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&view, &key);
                let replanned = match kept {
                    Some(plan) => plan,
                    None => {
                        let planned = within(
                            &stop,
                            service.query_parser().parse_sql(
                                &*client,
                                sql,
                                &portal.statement.parameter_types,
                            ),
                        )
                        .await
                        .map_err(classify)?;
                        let Some(planned) = planned else {
                            return Ok(Response::EmptyQuery);
                        };
                        self.plans
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .put(&view, key, &planned);
                        planned
                    }
                };
                let mut current = Portal::new_cursor(
                    portal.name.clone(),
                    Arc::new(StoredStatement::new(
                        portal.statement.id.clone(),
                        replanned,
                        portal.statement.parameter_types.clone(),
                    )),
                );
                current.parameter_format = portal.parameter_format.clone();
                current.parameters = portal.parameters.clone();
                current.result_column_format = portal.result_column_format.clone();
                current.state = portal.state.clone();
                let response = within(
                    &stop,
                    ExtendedQueryHandler::do_query(service.as_ref(), client, &current, max_rows),
                )
                .await
                .map_err(classify)?;
                Ok(limited(
                    response,
                    None, // named at Describe (get_result_schema)
                    stop,
                    started,
                    self.shared.output,
                    (Some(service), pool),
                ))
            }
            .await,
        )
    }
}
