//! The control connection (tokio-postgres): catalog lookups, checks and set-up SQL.
//!
//! Used by `validate` to list everything that would stop replication, each with the fix,
//! and by `run` to read table shapes and create the publication when allowed. Identifiers
//! are always passed as parameters or quoted with [`quote_ident`], never pasted raw.

use tokio_postgres::{Client, NoTls};

use super::config::SourceSettings;
use super::dsn::{ConnParams, Host, SslMode};
use super::tls;
use crate::change::{ColumnSpec, METADATA_COLUMNS, ReplicaIdentity};
use crate::lsn::Lsn;
use crate::pg_types::ColumnKind;
use crate::table_name::{TableName, quote_ident};

/// The control connection failed or a catalog check failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot connect to the source {target}: {message}")]
    Connect { target: String, message: String },
    #[error("catalog query failed: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("the source is not ready for replication:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    NotReady(Vec<String>),
}

impl CatalogError {
    /// Connection trouble is transient once the daemon has started; the rest is not.
    pub fn is_transient(&self) -> bool {
        match self {
            CatalogError::Connect { .. } => true,
            CatalogError::Query(e) => match e.as_db_error() {
                Some(db) => super::sqlstate::is_transient(db.code().code()),
                None => true,
            },
            _ => false,
        }
    }
}

/// Formats a tokio-postgres error with its SQLSTATE and detail, never the DSN.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            s
        }
    }
}

/// Opens the control connection with the same TLS rules as the replication connection.
pub async fn connect(params: &ConnParams) -> Result<Client, CatalogError> {
    let mut config = tokio_postgres::Config::new();
    match &params.host {
        Host::Tcp(h) => config.host(h),
        Host::Unix(dir) => config.host_path(dir),
    };
    config
        .port(params.port)
        .user(&params.user)
        .dbname(&params.dbname)
        .application_name(format!("{} control", params.application_name))
        .connect_timeout(std::time::Duration::from_secs(
            params.connect_timeout_secs.max(1),
        ))
        .options("-c TimeZone=UTC -c DateStyle=ISO");
    if let Some(pw) = &params.password {
        config.password(pw.expose());
    }
    let connect_err = |e: tokio_postgres::Error| CatalogError::Connect {
        target: params.to_string(),
        message: describe(&e),
    };
    let tls_config = match params.host {
        Host::Unix(_) => None,
        Host::Tcp(_) => tls::client_config(params)?,
    };
    match tls_config {
        None => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, conn) = config.connect(NoTls).await.map_err(connect_err)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "control connection closed");
                }
            });
            Ok(client)
        }
        Some(tls_config) => {
            config.ssl_mode(match params.sslmode {
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_config).clone());
            let (client, conn) = config.connect(connector).await.map_err(connect_err)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "control connection closed");
                }
            });
            Ok(client)
        }
    }
}

/// A table's catalog facts.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub name: TableName,
    pub columns: Vec<ColumnSpec>,
    pub key_columns: Vec<String>,
    /// The primary key's columns (none without one), whatever identifies the changes.
    pub primary_key: Vec<String>,
    pub replica_identity: ReplicaIdentity,
    pub can_select: bool,
    /// A partitioned table (its rows live in its partitions).
    pub partitioned: bool,
    /// How the publication publishes it: only rows matching a row filter, only the
    /// columns of a column list (PostgreSQL 15+). `columns` holds only published ones.
    pub published: PublishedPart,
}

/// The part of a table a publication publishes: a row filter (the `WHERE` clause, as
/// Postgres prints it) and a column list; `None` for each when the whole is published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishedPart {
    pub row_filter: Option<String>,
    pub columns: Option<Vec<String>>,
}

impl PublishedPart {
    /// `None` for the whole table, else a fingerprint of the filter and the column list:
    /// the lake records the one each copy was made with, and a table copied with
    /// another is copied again.
    pub fn fingerprint(&self) -> Option<String> {
        if self.row_filter.is_none() && self.columns.is_none() {
            return None;
        }
        let mut text = format!("filter:{}", self.row_filter.as_deref().unwrap_or(""));
        for column in self.columns.iter().flatten() {
            text.push('\0');
            text.push_str(column);
        }
        Some(format!(
            "{:016x}",
            super::config::stable_hash(text.as_bytes())
        ))
    }
}

impl std::fmt::Display for PublishedPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.row_filter, &self.columns) {
            (None, None) => write!(f, "every row and column"),
            (Some(filter), None) => write!(f, "only rows WHERE {filter}"),
            (None, Some(columns)) => write!(f, "only columns ({})", columns.join(", ")),
            (Some(filter), Some(columns)) => write!(
                f,
                "only rows WHERE {filter}, only columns ({})",
                columns.join(", ")
            ),
        }
    }
}

/// The server's `server_version_num` (170002 for 17.2).
pub async fn server_version(client: &Client) -> Result<i32, CatalogError> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0))
}

/// Whether `publication` publishes stored generated columns (PostgreSQL 18's
/// `publish_generated_columns = stored`) on a server of `version`. Before 18 pgoutput
/// never sends them.
async fn publishes_generated(
    client: &Client,
    publication: &str,
    version: i32,
) -> Result<bool, CatalogError> {
    if version < 180000 {
        return Ok(false);
    }
    let row = client
        .query_opt(
            "SELECT pubgencols::text = 's' FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// Looks a table up as `publication` streams it; `None` when it does not exist.
/// Generated columns are left out unless the publication publishes them (stored ones on
/// PostgreSQL 18; virtual ones never): the stream would not carry their values, and a
/// lake column filled by the snapshot only would diverge from the source at the first
/// change.
pub async fn table_info(
    client: &Client,
    table: &TableName,
    publication: &str,
) -> Result<Option<TableInfo>, CatalogError> {
    let version = server_version(client).await?;
    let generated = publishes_generated(client, publication, version).await?;
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, has_table_privilege(c.oid, 'SELECT'), \
                    c.relkind = 'p' \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let ident: String = row.get(1);
    let can_select: bool = row.get(2);
    let partitioned: bool = row.get(3);
    let cols = client
        .query(
            // Domains (possibly nested) are typed by their base type; the stream still
            // sends the domain's own OID, which is what change detection compares.
            "WITH RECURSIVE cols AS ( \
                 SELECT a.attnum, a.attname::text AS name, a.atttypid AS sent_oid, \
                        a.atttypmod AS sent_mod, a.atttypid AS oid, a.atttypmod AS mod \
                 FROM pg_attribute a \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
                   AND (a.attgenerated = '' OR (a.attgenerated = 's' AND $2)) \
               UNION ALL \
                 SELECT c.attnum, c.name, c.sent_oid, c.sent_mod, t.typbasetype, t.typtypmod \
                 FROM cols c JOIN pg_type t ON t.oid = c.oid WHERE t.typtype = 'd') \
             SELECT c.name, c.sent_oid, c.sent_mod, c.oid, c.mod \
             FROM cols c JOIN pg_type t ON t.oid = c.oid \
             WHERE t.typtype <> 'd' ORDER BY c.attnum",
            &[&oid, &generated],
        )
        .await?;
    let published = published_part(client, table, publication, version).await?;
    let columns: Vec<ColumnSpec> = cols
        .iter()
        .map(|r| ColumnSpec {
            name: r.get(0),
            type_oid: r.get(1),
            type_modifier: r.get(2),
            kind: ColumnKind::from_pg(r.get(3), r.get(4)),
        })
        // A column the publication's column list leaves out is not in the lake at all.
        .filter(|c: &ColumnSpec| {
            published
                .columns
                .as_ref()
                .is_none_or(|list| list.contains(&c.name))
        })
        .collect();
    // The primary key's columns and the replica identity index's, each in index order.
    let keys = client
        .query(
            "SELECT a.attname::text, i.indisprimary, i.indisreplident FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident) \
             ORDER BY i.indexrelid, array_position(i.indkey, a.attnum)",
            &[&oid],
        )
        .await?;
    let columns_where = |col: usize| -> Vec<String> {
        keys.iter()
            .filter(|r| r.get::<_, bool>(col))
            .map(|r| r.get(0))
            .collect()
    };
    let primary_key = columns_where(1);
    let mut key_columns = if ident == "i" {
        columns_where(2)
    } else {
        primary_key.clone()
    };
    if key_columns.is_empty() && ident == "f" {
        // REPLICA IDENTITY FULL without a primary key: the whole row identifies it.
        key_columns = columns
            .iter()
            .map(|c: &ColumnSpec| c.name.clone())
            .collect();
    }
    Ok(Some(TableInfo {
        name: table.clone(),
        columns,
        key_columns,
        primary_key,
        replica_identity: ReplicaIdentity::from_code(ident.bytes().next().unwrap_or(b'd')),
        can_select,
        partitioned,
        published,
    }))
}

/// How `publication` publishes `table` on a server of `version` (whole when it does not
/// publish it, or before PostgreSQL 15).
async fn published_part(
    client: &Client,
    table: &TableName,
    publication: &str,
    version: i32,
) -> Result<PublishedPart, CatalogError> {
    if version < 150000 {
        return Ok(PublishedPart::default());
    }
    let row = client
        .query_opt(
            &format!("{PUBLISHED_PARTS} AND p.schemaname = $2 AND p.tablename = $3"),
            &[&publication, &table.schema, &table.name],
        )
        .await?;
    Ok(row
        .map(|r| PublishedPart {
            row_filter: r.get(2),
            columns: r.get(3),
        })
        .unwrap_or_default())
}

/// Each table a publication (`$1`) publishes with its row filter and column list
/// (`attnames` lists every column when the publication has no column list).
const PUBLISHED_PARTS: &str = "SELECT p.schemaname::text, p.tablename::text, p.rowfilter, \
        CASE WHEN pr.prattrs IS NULL THEN NULL ELSE p.attnames::text[] END \
     FROM pg_publication_tables p \
     JOIN pg_publication pub ON pub.pubname = p.pubname \
     LEFT JOIN pg_publication_rel pr ON pr.prpubid = pub.oid \
          AND pr.prrelid = format('%I.%I', p.schemaname, p.tablename)::regclass \
     WHERE p.pubname = $1";

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    pub confirmed_flush: Option<Lsn>,
    pub wal_status: Option<String>,
    pub restart_lsn: Option<Lsn>,
    /// WAL the slot keeps from being recycled: current WAL position (on a standby: the
    /// replayed one) minus `restart_lsn`.
    pub retained_bytes: Option<i64>,
}

impl SlotInfo {
    /// Invalidated: the WAL it needed was removed (`wal_status = lost`).
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// The slot named `slot`, or `None` when it does not exist.
pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, CatalogError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active, confirmed_flush_lsn::text, wal_status, \
                    restart_lsn::text, \
                    pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                                         ELSE pg_current_wal_lsn() END, restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active: r.get(2),
        confirmed_flush: r.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        wal_status: r.get(4),
        restart_lsn: r.get::<_, Option<String>>(5).and_then(|s| s.parse().ok()),
        retained_bytes: r.get(6),
    }))
}

/// Tables the publication publishes, or `None` when the publication does not exist.
pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> Result<Option<Vec<TableName>>, CatalogError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    if exists.is_none() {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect(),
    ))
}

/// How a publication publishes one table: a row filter or a column list (Postgres 15+)
/// means the stream carries only that part of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub table: TableName,
    pub part: PublishedPart,
}

/// The tables `publication` publishes with their row filters and column lists, or `None`
/// when the publication does not exist.
pub async fn publication_state(
    client: &Client,
    publication: &str,
) -> Result<Option<Vec<Published>>, CatalogError> {
    let Some(tables) = publication_tables(client, publication).await? else {
        return Ok(None);
    };
    let version = server_version(client).await?;
    if version < 150000 {
        // No row filters or column lists before Postgres 15.
        return Ok(Some(
            tables
                .into_iter()
                .map(|table| Published {
                    table,
                    part: PublishedPart::default(),
                })
                .collect(),
        ));
    }
    let rows = client.query(PUBLISHED_PARTS, &[&publication]).await?;
    Ok(Some(
        rows.iter()
            .map(|r| Published {
                table: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                part: PublishedPart {
                    row_filter: r.get(2),
                    columns: r.get(3),
                },
            })
            .collect(),
    ))
}

/// What keeps the stream from carrying the changes of `table` at all, by the
/// publication's state (`None` when the publication is missing: the stream reports it).
/// A row filter or column list is no gap: the lake holds that part of the table, and a
/// change of it is the guard's to find (the lake records what each copy was made with).
pub fn publication_gap(
    publication: &str,
    published: &[Published],
    table: &TableName,
) -> Option<String> {
    (!published.iter().any(|p| &p.table == table)).then(|| {
        format!(
            "publication {publication} no longer includes it (a partitioned table is \
             published through its partitions unless the publication sets \
             publish_via_partition_root = true)"
        )
    })
}

/// What `validate` found: problems (each with its fix) and notes on what `run` will do.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    /// Not in the way of replication, but worth acting on.
    pub warnings: Vec<String>,
    pub tables: Vec<TableInfo>,
    /// The publication does not exist (yet).
    pub publication_missing: bool,
    /// The slot does not exist (yet).
    pub slot_missing: bool,
}

/// Checks everything replication needs, changing nothing. `config_path` is the
/// configuration file, named in the commands a problem suggests.
pub async fn check(
    client: &Client,
    source: &SourceSettings,
    config_path: Option<&std::path::Path>,
) -> Result<Report, CatalogError> {
    let mut report = Report::default();
    let user = check_server(client, &mut report).await?;
    check_standby(client, source, &mut report).await?;
    check_connections(client, source, &mut report).await?;
    let published = publication_state(client, &source.publication).await?;
    for table in &source.tables {
        check_table(
            client,
            source,
            table,
            &user,
            published.as_deref(),
            &mut report,
        )
        .await?;
    }
    check_publication(source, published.is_some(), &mut report);
    check_slot(client, source, config_path, &mut report).await?;
    if source.failover {
        check_failover(client, source, &mut report).await?;
    }
    if source.snapshot_method == super::config::SnapshotMethod::Watermark {
        check_watermarks(client, &mut report).await?;
    }
    Ok(report)
}

/// `source.snapshot_method = "watermark"` writes watermarks into the WAL
/// (`pg_logical_emit_message`): the role must be allowed to, and the server must be a
/// primary.
async fn check_watermarks(client: &Client, report: &mut Report) -> Result<(), CatalogError> {
    let standby: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    let row = client.query_one(super::watermark::CAN_EMIT, &[]).await?;
    let (can_emit, signature): (bool, Option<String>) = (row.get(0), row.get(1));
    let signature =
        signature.unwrap_or_else(|| "pg_logical_emit_message(boolean,text,text)".into());
    let whole: Vec<String> = report
        .tables
        .iter()
        .filter(|t| super::watermark::chunk_key(t).is_none())
        .map(|t| t.name.to_string())
        .collect();
    if !whole.is_empty() {
        report.notes.push(format!(
            "not keyed by one integer column, so copied from an exported snapshot before they \
             stream (not in chunks): {}",
            whole.join(", ")
        ));
    }
    if standby {
        report.problems.push(
            "source.snapshot_method = \"watermark\" writes watermarks into the WAL, which a \
             standby cannot; use snapshot_method = \"exported\" on a standby"
                .into(),
        );
    } else if !can_emit {
        report.problems.push(format!(
            "source.snapshot_method = \"watermark\" writes watermarks into the WAL with \
             pg_logical_emit_message, which this role may not call; as a superuser run: GRANT \
             EXECUTE ON FUNCTION pg_catalog.{signature} TO <this role>; or use \
             snapshot_method = \"exported\""
        ));
    }
    Ok(())
}

/// The PostgreSQL majors the test suite runs on (`tests/matrix.sh`).
pub const TESTED_MAJORS: std::ops::RangeInclusive<i32> = 14..=18;

/// `source.failover`: the server can keep a failover slot (PostgreSQL 17+), the slot is
/// one, and the primary waits for a standby before sending changes (else a promoted
/// standby may lack transactions the lake already holds).
async fn check_failover(
    client: &Client,
    source: &SourceSettings,
    report: &mut Report,
) -> Result<(), CatalogError> {
    let version = server_version(client).await?;
    if version < 170000 {
        report.problems.push(format!(
            "source.failover = true needs PostgreSQL 17 or newer (this server is {}); set failover = false, or upgrade",
            version / 10000
        ));
        return Ok(());
    }
    let slot = client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&source.slot],
        )
        .await?;
    match slot {
        Some(row) if !row.get::<_, bool>(0) => report.problems.push(format!(
            "replication slot {slot} is not a failover slot; make it one over a replication connection: \
             psql \"dbname=<database> replication=database\" -c 'ALTER_REPLICATION_SLOT {quoted} (FAILOVER true)'",
            slot = source.slot,
            quoted = quote_ident(&source.slot),
        )),
        Some(_) => report
            .notes
            .push(format!("replication slot {} is a failover slot", source.slot)),
        None => report.notes.push(format!(
            "run will create replication slot {} as a failover slot",
            source.slot
        )),
    }
    let standbys: String = client
        .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
        .await?
        .get(0);
    if standbys.trim().is_empty() {
        report.warnings.push(
            "synchronized_standby_slots is empty: the primary may send wal2delta changes its standbys \
             have not received, and a promoted standby would lack transactions the lake holds; \
             set it to the standbys' physical slots (ALTER SYSTEM SET synchronized_standby_slots = \
             'standby1'; SELECT pg_reload_conf();), and on each standby sync_replication_slots = on, \
             hot_standby_feedback = on and primary_slot_name"
                .into(),
        );
    }
    Ok(())
}

/// The server's version against the tested ones, `wal_level` and the role's REPLICATION
/// attribute; returns the role's name.
async fn check_server(client: &Client, report: &mut Report) -> Result<String, CatalogError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), \
                    current_setting('server_version_num')::int / 10000",
            &[],
        )
        .await?;
    let (version, major): (String, i32) = (row.get(0), row.get(1));
    let (first, last) = (TESTED_MAJORS.start(), TESTED_MAJORS.end());
    if TESTED_MAJORS.contains(&major) {
        let lacks = if major < 15 {
            " (no publication row filters or column lists before 15; wal2delta needs neither)"
        } else {
            ""
        };
        report.notes.push(format!(
            "PostgreSQL {version}: supported (wal2delta is tested on PostgreSQL {first} to {last}){lacks}"
        ));
    } else {
        let side = if major < *first { "older" } else { "newer" };
        report.warnings.push(format!(
            "PostgreSQL {version} is {side} than the versions wal2delta is tested on ({first} to {last}): \
             replication may work, but no test shows it; run a tested version"
        ));
    }
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        report.problems.push(format!(
            "wal_level is `{wal_level}`; run ALTER SYSTEM SET wal_level = logical; and restart Postgres"
        ));
    }
    let role = client
        .query_one(
            "SELECT current_user::text, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let user: String = role.get(0);
    let (replication, superuser): (bool, bool) = (role.get(1), role.get(2));
    if !replication && !superuser {
        report.problems.push(format!(
            "role {user} lacks the REPLICATION attribute; run ALTER ROLE {} REPLICATION;",
            quote_ident(&user)
        ));
    }
    Ok(user)
}

/// A hot standby as the source (logical decoding on a standby, PostgreSQL 16+): the
/// slot lives on the standby, which needs `hot_standby_feedback` (else the primary's
/// vacuum removes rows the slot still needs and the slot is invalidated), and wal2delta
/// writes nothing to it (no heartbeats, no failover slot).
async fn check_standby(
    client: &Client,
    source: &SourceSettings,
    report: &mut Report,
) -> Result<(), CatalogError> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int / 10000, \
                    current_setting('hot_standby_feedback')::bool",
            &[],
        )
        .await?;
    let (standby, major, feedback): (bool, i32, bool) = (row.get(0), row.get(1), row.get(2));
    if !standby {
        return Ok(());
    }
    if major < 16 {
        report.problems.push(format!(
            "this server is a standby (in recovery), and logical decoding on a standby needs \
             PostgreSQL 16 or newer (this one is {major}); point source.dsn at the primary, or \
             upgrade"
        ));
        return Ok(());
    }
    report.notes.push(
        "this server is a standby: wal2delta decodes here (the primary needs wal_level = logical \
         too); creating the slot waits until the primary logs its running transactions, which \
         SELECT pg_log_standby_snapshot(); on the primary does at once"
            .into(),
    );
    if !feedback {
        report.problems.push(
            "hot_standby_feedback is off on this standby, so the primary's vacuum may remove rows \
             the slot still needs and Postgres then invalidates the slot; on the standby run \
             ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf(); (and give it a \
             physical slot on the primary: primary_slot_name)"
                .into(),
        );
    }
    if source.heartbeat.is_some() {
        report.problems.push(
            "source.heartbeat_secs is set, but heartbeats write to the source \
             (pg_logical_emit_message), which a standby cannot; remove heartbeat_secs (the \
             primary's own WAL traffic moves the slot)"
                .into(),
        );
    }
    if source.failover {
        report.problems.push(
            "source.failover = true, but Postgres makes failover slots on a primary only; set \
             failover = false for a slot on a standby"
                .into(),
        );
    }
    Ok(())
}

/// The connections wal2delta opens at once during a snapshot or resync (replication,
/// control, publication guard, and `snapshot_workers` copying connections) against what
/// the server has free: running out would fail the copy, or worse, other clients.
async fn check_connections(
    client: &Client,
    source: &SourceSettings,
    report: &mut Report,
) -> Result<(), CatalogError> {
    let row = client
        .query_one(
            "SELECT current_setting('max_connections')::int, \
                    current_setting('superuser_reserved_connections')::int, \
                    (SELECT count(*) FROM pg_stat_activity \
                     WHERE backend_type IN ('client backend', 'walsender'))::int",
            &[],
        )
        .await?;
    let (max, reserved, used): (i32, i32, i32) = (row.get(0), row.get(1), row.get(2));
    let free = max - reserved - used;
    let needed = source.snapshot_workers as i32 + 3;
    if needed > free {
        report.warnings.push(format!(
            "source.snapshot_workers = {workers}: a snapshot or resync opens {needed} \
             connections at once (with the replication, control and guard connections), but \
             the server has {free} free (max_connections {max} - {reserved} reserved - {used} \
             in use now); lower snapshot_workers to {fit} or raise max_connections",
            workers = source.snapshot_workers,
            fit = (free - 3).max(1),
        ));
    }
    Ok(())
}

/// One configured table: it exists, `user` may read it, its changes can be identified,
/// its columns do not clash with ours, and the publication (if it exists) has it.
async fn check_table(
    client: &Client,
    source: &SourceSettings,
    table: &TableName,
    user: &str,
    published: Option<&[Published]>,
    report: &mut Report,
) -> Result<(), CatalogError> {
    let pub_sql = quote_ident(&source.publication);
    let Some(info) = table_info(client, table, &source.publication).await? else {
        report.problems.push(format!(
            "table {table} does not exist (or is not a plain table); create it or remove it from source.tables"
        ));
        return Ok(());
    };
    if !info.can_select {
        report.problems.push(format!(
            "role {user} cannot SELECT from {table}; run GRANT SELECT ON {} TO {};",
            table.quoted(),
            quote_ident(user)
        ));
    }
    match info.replica_identity {
        ReplicaIdentity::Nothing => report.problems.push(format!(
            "table {table} has REPLICA IDENTITY NOTHING, so updates and deletes cannot be replicated; run ALTER TABLE {} REPLICA IDENTITY FULL; (or DEFAULT with a primary key)",
            table.quoted()
        )),
        ReplicaIdentity::Default if info.key_columns.is_empty() => report.problems.push(format!(
            "table {table} has no primary key, so its updates and deletes cannot be identified; add a primary key or run ALTER TABLE {} REPLICA IDENTITY FULL;",
            table.quoted()
        )),
        _ => {}
    }
    let unsent: Vec<&String> = info
        .key_columns
        .iter()
        .filter(|k| !info.columns.iter().any(|c| &c.name == *k))
        .collect();
    if !unsent.is_empty() {
        report.problems.push(format!(
            "the key of table {table} includes generated column(s) {unsent:?}, which publication \
             {} does not send, so rows could not be matched; on PostgreSQL 18 publish stored \
             generated columns (ALTER PUBLICATION {pub_sql} SET (publish_generated_columns = \
             stored);), or key the table by other columns",
            source.publication
        ));
    }
    for col in &info.columns {
        if METADATA_COLUMNS.contains(&col.name.as_str()) {
            report.problems.push(format!(
                "table {table} has a column named {} which clashes with a wal2delta metadata column; rename it",
                col.name
            ));
        }
    }
    match published {
        Some(list) if info.partitioned && !list.iter().any(|p| &p.table == table) => {
            report.problems.push(format!(
                "table {table} is partitioned and publication {} publishes it through its \
                 partitions (or not at all), so its changes would arrive under the \
                 partitions' names; run ALTER PUBLICATION {pub_sql} SET \
                 (publish_via_partition_root = true); (and ALTER PUBLICATION {pub_sql} ADD \
                 TABLE {}; if it is not published)",
                source.publication,
                table.quoted()
            ))
        }
        Some(list) if !list.iter().any(|p| &p.table == table) => report.problems.push(format!(
            "publication {} does not include {table}; run ALTER PUBLICATION {pub_sql} ADD TABLE {};",
            source.publication,
            table.quoted()
        )),
        Some(_) if info.published != PublishedPart::default() => {
            report.notes.push(format!(
                "publication {} publishes {} of {table}: the lake holds the same part (a \
                 change of the row filter or column list copies the table again)",
                source.publication, info.published
            ))
        }
        Some(_) => {}
        None => {}
    }
    report.tables.push(info);
    Ok(())
}

/// A missing publication: created by `run` when allowed, else a problem.
fn check_publication(source: &SourceSettings, exists: bool, report: &mut Report) {
    let pub_sql = quote_ident(&source.publication);
    report.publication_missing = !exists;
    if !exists {
        if source.create_publication {
            report.notes.push(format!(
                "publication {} does not exist; run will create it for the configured tables",
                source.publication
            ));
        } else {
            let list: Vec<String> = source.tables.iter().map(|t| t.quoted()).collect();
            report.problems.push(format!(
                "publication {} does not exist; run CREATE PUBLICATION {pub_sql} FOR TABLE {} WITH (publish_via_partition_root = true);",
                source.publication,
                list.join(", ")
            ));
        }
    }
}

/// The slot: missing (created by `run` when allowed), or of another plugin or database,
/// or invalidated.
async fn check_slot(
    client: &Client,
    source: &SourceSettings,
    config_path: Option<&std::path::Path>,
    report: &mut Report,
) -> Result<(), CatalogError> {
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    let slot = slot_info(client, &source.slot).await?;
    report.slot_missing = slot.is_none();
    match slot {
        None if source.create_slot => report.notes.push(format!(
            "replication slot {} does not exist; run will create it",
            source.slot
        )),
        None => report.problems.push(format!(
            "replication slot {} does not exist and source.create_slot is false; run SELECT pg_create_logical_replication_slot('{}', 'pgoutput');",
            source.slot, source.slot
        )),
        Some(slot) => {
            if slot.plugin.as_deref() != Some("pgoutput") {
                report.problems.push(format!(
                    "replication slot {} uses plugin {:?}, not pgoutput; pick another slot name or drop it with SELECT pg_drop_replication_slot('{}');",
                    source.slot,
                    slot.plugin.as_deref().unwrap_or_default(),
                    source.slot
                ));
            }
            if slot.database.as_deref() != Some(db.as_str()) {
                report.problems.push(format!(
                    "replication slot {} belongs to database {:?}, not {db}; pick another slot name",
                    source.slot,
                    slot.database.as_deref().unwrap_or_default()
                ));
            }
            if slot.is_lost() {
                report.problems.push(format!(
                    "replication slot {} was invalidated (wal_status = lost): the WAL it needed is gone; {}",
                    source.slot,
                    super::diagnosis::slot_lost_action(config_path)
                ));
            }
        }
    }
    Ok(())
}

/// Creates the publication for exactly the configured tables.
pub async fn create_publication(
    client: &Client,
    settings: &SourceSettings,
) -> Result<(), CatalogError> {
    let list: Vec<String> = settings.tables.iter().map(|t| t.quoted()).collect();
    let sql = format!(
        // Changes to a partitioned table's partitions are published under the table's own
        // name, the one configured (no effect on other tables).
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
        quote_ident(&settings.publication),
        list.join(", ")
    );
    client.batch_execute(&sql).await.map_err(|e| {
        CatalogError::NotReady(vec![format!(
            "could not create publication {}: {}; create it as the table owner with: {sql};",
            settings.publication,
            describe(&e)
        )])
    })
}

#[cfg(test)]
mod tests {
    use super::PublishedPart;

    #[test]
    fn a_published_part_is_fingerprinted_by_its_filter_and_columns() {
        let whole = PublishedPart::default();
        assert_eq!(whole.fingerprint(), None);
        let part = |filter: Option<&str>, columns: Option<&[&str]>| PublishedPart {
            row_filter: filter.map(str::to_string),
            columns: columns.map(|c| c.iter().map(|s| s.to_string()).collect()),
        };
        let eu = part(Some("(region = 'eu'::text)"), None);
        // The same in every build: the lake keeps it across upgrades.
        assert_eq!(
            eu.fingerprint(),
            part(Some("(region = 'eu'::text)"), None).fingerprint()
        );
        let all = [
            eu.fingerprint(),
            part(Some("(region = 'us'::text)"), None).fingerprint(),
            part(None, Some(&["id", "name"])).fingerprint(),
            part(None, Some(&["id", "name", "note"])).fingerprint(),
            part(Some("(region = 'eu'::text)"), Some(&["id", "name"])).fingerprint(),
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(a.is_some());
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(
            part(Some("(id > 10)"), Some(&["id"])).to_string(),
            "only rows WHERE (id > 10), only columns (id)"
        );
    }
}
