//! `wal2delta init`: prepares a source database and a configuration in one step.
//!
//! Given an administrator's connection and the tables (or whole schemas) to replicate, it
//! looks at the database and works out the source-side SQL that replication needs and that
//! is not there yet: wal2delta's least-privilege role (`LOGIN REPLICATION`, a SCRAM
//! verifier rather than the password), `USAGE` and `SELECT` grants, `REPLICA IDENTITY
//! FULL` for tables without a primary key, and the publication (with
//! `publish_via_partition_root`, so partitioned tables arrive under their own names). It
//! prints that SQL, or runs it in one transaction with `--apply`, and writes a commented
//! configuration file and the role's password file. Running it again prints only what is
//! still missing.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use tokio_postgres::Client;

use crate::change::ReplicaIdentity;
use crate::secret::Secret;
use crate::source::catalog;
use crate::source::dsn::{ConnParams, Host, SslMode};
use crate::table_name::{TableName, quote_ident, quote_literal};

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct InitRequest {
    /// The administrator's connection (a superuser, or the tables' owner with CREATEROLE).
    pub dsn: String,
    /// Tables as `schema.table` (SQL identifier rules).
    pub tables: Vec<String>,
    /// Schemas whose every table (partitions aside) is replicated.
    pub schemas: Vec<String>,
    /// wal2delta's role.
    pub role: String,
    pub slot: String,
    pub publication: String,
    /// Where the lake goes.
    pub lake: String,
    /// The configuration file to write.
    pub config: PathBuf,
    /// The file holding the role's password (written when the role is created).
    pub password_file: PathBuf,
    /// Overwrite an existing configuration file.
    pub force: bool,
}

/// One SQL statement with the reason it is needed.
#[derive(Debug, Clone)]
pub struct Step {
    pub why: String,
    pub sql: String,
}

/// What `init` found and would do.
#[derive(Debug)]
pub struct Plan {
    pub tables: Vec<TableName>,
    pub steps: Vec<Step>,
    /// Not done by the SQL, but in the way (e.g. `wal_level`).
    pub warnings: Vec<String>,
    /// The password to write to the password file (a new role), if any.
    password: Option<Secret>,
    database: String,
    config_text: String,
}

/// `init` could not work out or carry out its plan; the message says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InitError(String);

impl From<catalog::CatalogError> for InitError {
    fn from(e: catalog::CatalogError) -> InitError {
        InitError(e.to_string())
    }
}

impl From<tokio_postgres::Error> for InitError {
    fn from(e: tokio_postgres::Error) -> InitError {
        InitError(format!(
            "reading the source's catalog failed: {}",
            catalog::describe(&e)
        ))
    }
}

/// Connects with the administrator's DSN (`PGPASSWORD` when it carries no password).
pub async fn connect(request: &InitRequest) -> Result<(Client, ConnParams), InitError> {
    let mut params =
        ConnParams::parse(&request.dsn).map_err(|e| InitError(format!("--dsn: {e}")))?;
    if params.password.is_none()
        && let Ok(pw) = std::env::var("PGPASSWORD")
    {
        params.password = Some(Secret::new(pw));
    }
    let client = catalog::connect(&params).await?;
    Ok((client, params))
}

/// Looks at the database and works out the SQL and the configuration.
pub async fn plan(
    client: &Client,
    admin: &ConnParams,
    request: &InitRequest,
) -> Result<Plan, InitError> {
    check_names(request)?;
    if request.config.exists() && !request.force {
        return Err(InitError(format!(
            "{} exists; init does not replace it: pass --force, or --config for another file",
            request.config.display()
        )));
    }
    let tables = resolve_tables(client, request).await?;
    let mut steps = Vec::new();
    let mut warnings = Vec::new();

    let wal_level: String = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await?
        .get(0);
    if wal_level != "logical" {
        warnings.push(format!(
            "wal_level is {wal_level}, and logical replication needs logical: run ALTER SYSTEM \
             SET wal_level = logical; and restart PostgreSQL (init does not restart it)"
        ));
    }

    let role = quote_ident(&request.role);
    let existing = client
        .query_opt(
            "SELECT rolcanlogin, rolreplication FROM pg_roles WHERE rolname = $1",
            &[&request.role],
        )
        .await?;
    let role_exists = existing.is_some();
    let mut password = None;
    match existing {
        None => {
            let secret = match read_password_file(&request.password_file)? {
                Some(pw) => pw,
                None => Secret::new(new_password()),
            };
            steps.push(Step {
                why: format!(
                    "wal2delta's own role: it logs in, replicates, and reads only what is \
                     granted below (its password is in {}; the SQL holds only its SCRAM \
                     verifier)",
                    request.password_file.display()
                ),
                sql: format!(
                    "CREATE ROLE {role} LOGIN REPLICATION PASSWORD {};",
                    quote_literal(&postgres_protocol::password::scram_sha_256(
                        secret.expose().as_bytes()
                    ))
                ),
            });
            password = Some(secret);
        }
        Some(row) => {
            let (login, replication): (bool, bool) = (row.get(0), row.get(1));
            if !login || !replication {
                steps.push(Step {
                    why: format!(
                        "role {} exists but cannot log in and replicate",
                        request.role
                    ),
                    sql: format!("ALTER ROLE {role} LOGIN REPLICATION;"),
                });
            }
            if !request.password_file.exists() {
                warnings.push(format!(
                    "role {} exists, and init does not change its password: write it into {} \
                     (first line; chmod 0600), or set one with ALTER ROLE {role} PASSWORD …",
                    request.role,
                    request.password_file.display()
                ));
            }
        }
    }

    let schemas: BTreeSet<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    for schema in schemas {
        let has: bool = role_exists
            && client
                .query_one(
                    "SELECT has_schema_privilege($1::name, $2::text, 'USAGE')",
                    &[&request.role, &schema],
                )
                .await?
                .get(0);
        if !has {
            steps.push(Step {
                why: format!("the role looks tables up in schema {schema}"),
                sql: format!("GRANT USAGE ON SCHEMA {} TO {role};", quote_ident(schema)),
            });
        }
    }
    let mut partitioned = false;
    for table in &tables {
        let can_select: bool = role_exists
            && client
                .query_one(
                    "SELECT has_table_privilege($1::name, $2::text::regclass, 'SELECT')",
                    &[&request.role, &table.quoted()],
                )
                .await?
                .get(0);
        if !can_select {
            steps.push(Step {
                why: format!("the initial snapshot and resyncs read {table}"),
                sql: format!("GRANT SELECT ON {} TO {role};", table.quoted()),
            });
        }
        let Some(info) = catalog::table_info(client, table, &request.publication).await? else {
            return Err(InitError(format!(
                "table {table} disappeared while init ran"
            )));
        };
        partitioned |= info.partitioned;
        let needs_full = match info.replica_identity {
            ReplicaIdentity::Nothing => true,
            ReplicaIdentity::Default => info.key_columns.is_empty(),
            _ => false,
        };
        if needs_full {
            steps.push(Step {
                why: format!(
                    "{table} has no primary key: its updates and deletes are identified by the \
                     whole row (a primary key is better: smaller WAL, faster merges)"
                ),
                sql: format!("ALTER TABLE {} REPLICA IDENTITY FULL;", table.quoted()),
            });
        }
    }

    let publication = quote_ident(&request.publication);
    match catalog::publication_state(client, &request.publication).await? {
        None => {
            let list: Vec<String> = tables.iter().map(TableName::quoted).collect();
            steps.push(Step {
                why: "the publication the slot streams: exactly these tables, partitioned \
                      ones under their own names"
                    .into(),
                sql: format!(
                    "CREATE PUBLICATION {publication} FOR TABLE {} WITH (publish_via_partition_root = true);",
                    list.join(", ")
                ),
            });
        }
        Some(published) => {
            let via_root: bool = client
                .query_one(
                    "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
                    &[&request.publication],
                )
                .await?
                .get(0);
            if partitioned && !via_root {
                steps.push(Step {
                    why: "partitioned tables must arrive under their own names, not their \
                          partitions'"
                        .into(),
                    sql: format!(
                        "ALTER PUBLICATION {publication} SET (publish_via_partition_root = true);"
                    ),
                });
            }
            // Members named in the publication: a partitioned table published through
            // its partitions (no publish_via_partition_root) is a member too, though
            // pg_publication_tables lists only its partitions.
            let named: Vec<TableName> = client
                .query(
                    "SELECT n.nspname::text, c.relname::text FROM pg_publication_rel pr \
                     JOIN pg_publication p ON p.oid = pr.prpubid \
                     JOIN pg_class c ON c.oid = pr.prrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1",
                    &[&request.publication],
                )
                .await?
                .iter()
                .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect();
            for table in &tables {
                // A row filter or column list is the operator's choice: the lake holds
                // that part of the table.
                let listed = published.iter().any(|p| &p.table == table);
                if !listed && !named.contains(table) {
                    steps.push(Step {
                        why: format!(
                            "publication {} does not publish {table} yet",
                            request.publication
                        ),
                        sql: format!(
                            "ALTER PUBLICATION {publication} ADD TABLE {};",
                            table.quoted()
                        ),
                    });
                }
            }
        }
    }

    let config_text = config_text(admin, request, &tables);
    Ok(Plan {
        tables,
        steps,
        warnings,
        password,
        database: admin.dbname.clone(),
        config_text,
    })
}

impl Plan {
    /// The SQL as a script for psql, with a comment before each statement.
    pub fn script(&self) -> String {
        let mut out = format!(
            "-- Source-side set-up for wal2delta in database {}, written by `wal2delta init`.\n\
             -- Run it as a superuser (or the tables' owner with CREATEROLE):\n\
             --   psql -d {} -v ON_ERROR_STOP=1 -1 -f this-file.sql\n",
            self.database,
            quote_ident(&self.database)
        );
        if self.steps.is_empty() {
            out.push_str("-- Nothing to do: the database is ready.\n");
        }
        for step in &self.steps {
            let _ = write!(out, "\n-- {}\n{}\n", step.why, step.sql);
        }
        out
    }

    /// Runs every step in one transaction: all of them or none.
    pub async fn apply(&self, client: &Client) -> Result<(), InitError> {
        if self.steps.is_empty() {
            return Ok(());
        }
        let mut sql = String::from("BEGIN;\n");
        for step in &self.steps {
            sql.push_str(&step.sql);
            sql.push('\n');
        }
        sql.push_str("COMMIT;");
        if let Err(e) = client.batch_execute(&sql).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(InitError(format!(
                "applying the set-up failed and changed nothing: {}; run init again with a \
                 superuser's --dsn, or run the printed SQL yourself",
                catalog::describe(&e)
            )));
        }
        Ok(())
    }

    /// Writes the configuration file and, for a new role, the password file (mode 0600).
    /// Returns whether it wrote the password file.
    pub fn write_files(&self, request: &InitRequest) -> Result<bool, InitError> {
        let mut wrote_password = false;
        if let Some(password) = &self.password
            && !request.password_file.exists()
        {
            write_private(&request.password_file, &format!("{}\n", password.expose()))?;
            wrote_password = true;
        }
        write_private(&request.config, &self.config_text)?;
        Ok(wrote_password)
    }

    pub fn config_text(&self) -> &str {
        &self.config_text
    }
}

fn check_names(request: &InitRequest) -> Result<(), InitError> {
    if request.tables.is_empty() && request.schemas.is_empty() {
        return Err(InitError(
            "name what to replicate: --table schema.table (repeatable) or --schema name".into(),
        ));
    }
    let slot_ok = !request.slot.is_empty()
        && request
            .slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !slot_ok {
        return Err(InitError(format!(
            "--slot {:?}: a slot name is lower-case letters, digits and underscores",
            request.slot
        )));
    }
    if request.role.is_empty() || request.publication.is_empty() {
        return Err(InitError(
            "--role and --publication must not be empty".into(),
        ));
    }
    Ok(())
}

/// The tables named, and those of the schemas named (partitions aside: their changes
/// arrive under their partitioned table), each checked to exist.
async fn resolve_tables(
    client: &Client,
    request: &InitRequest,
) -> Result<Vec<TableName>, InitError> {
    let mut tables = Vec::new();
    for text in &request.tables {
        let table = TableName::parse(text).map_err(|e| InitError(format!("--table: {e}")))?;
        let row = client
            .query_opt(
                "SELECT c.relkind::text, c.relispartition FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&table.schema, &table.name],
            )
            .await?;
        match row {
            None => {
                return Err(InitError(format!(
                    "--table {text}: there is no table {table} in this database (names fold to \
                     lower case unless quoted: --table 'sales.\"Orders\"')"
                )));
            }
            Some(r) if !matches!(r.get::<_, String>(0).as_str(), "r" | "p") => {
                return Err(InitError(format!(
                    "--table {text}: {table} is not a table (a view, sequence or foreign table \
                     cannot be replicated)"
                )));
            }
            Some(r) if r.get::<_, bool>(1) => {
                return Err(InitError(format!(
                    "--table {text}: {table} is a partition; name its partitioned table, whose \
                     changes include every partition's"
                )));
            }
            Some(_) => tables.push(table),
        }
    }
    for schema in &request.schemas {
        let name = TableName::parse(&format!("{schema}.x"))
            .map_err(|_| InitError(format!("--schema {schema}: not a schema name")))?
            .schema;
        let rows = client
            .query(
                "SELECT c.relname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition \
                 ORDER BY c.relname",
                &[&name],
            )
            .await?;
        if rows.is_empty() {
            return Err(InitError(format!(
                "--schema {schema}: schema {name} has no tables (or does not exist)"
            )));
        }
        tables.extend(
            rows.iter()
                .map(|r| TableName::new(name.clone(), r.get::<_, String>(0))),
        );
    }
    let mut seen = BTreeSet::new();
    tables.retain(|t| seen.insert(t.clone()));
    Ok(tables)
}

/// The first line of an existing password file.
fn read_password_file(path: &Path) -> Result<Option<Secret>, InitError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let line = text.lines().next().unwrap_or_default().to_string();
            if line.is_empty() {
                return Err(InitError(format!(
                    "{} is empty; delete it and init writes a new password",
                    path.display()
                )));
            }
            Ok(Some(Secret::new(line)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(InitError(format!("cannot read {}: {e}", path.display()))),
    }
}

/// 24 random bytes, URL-safe base64: 32 characters with no quoting trouble anywhere.
fn new_password() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 24];
    // The system's random source failing is not something to carry on from.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random number generator works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn write_private(path: &Path, text: &str) -> Result<(), InitError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let fail = |e: std::io::Error| InitError(format!("cannot write {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)
}

/// A TOML string literal.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// The administrator's DSN with wal2delta's role and without a password.
fn role_dsn(admin: &ConnParams, role: &str) -> String {
    let value = |v: &str| {
        if !v.is_empty() && !v.contains([' ', '\'', '\\']) {
            v.to_string()
        } else {
            format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
        }
    };
    let host = match &admin.host {
        Host::Tcp(h) | Host::Unix(h) => h,
    };
    let mut dsn = format!(
        "host={} port={} user={} dbname={}",
        value(host),
        admin.port,
        value(role),
        value(&admin.dbname)
    );
    let mode = match admin.sslmode {
        SslMode::Disable => Some("disable"),
        SslMode::Prefer => None,
        SslMode::Require => Some("require"),
        SslMode::VerifyCa => Some("verify-ca"),
        SslMode::VerifyFull => Some("verify-full"),
    };
    if let Some(mode) = mode {
        let _ = write!(dsn, " sslmode={mode}");
    }
    if let Some(root) = &admin.sslrootcert {
        let _ = write!(dsn, " sslrootcert={}", value(root));
    }
    dsn
}

fn config_text(admin: &ConnParams, request: &InitRequest, tables: &[TableName]) -> String {
    let tables: Vec<String> = tables.iter().map(|t| toml_string(&t.to_string())).collect();
    let config = request.config.display();
    format!(
        r#"# wal2delta configuration written by `wal2delta init`. Every key is described in
# docs/configuration.md. Check it (changes nothing): wal2delta validate --config {config}

[source]
# wal2delta's own least-privilege role (LOGIN REPLICATION, SELECT on the tables below).
dsn = {dsn}
# The role's password: the first line of this file (keep it readable by the daemon only).
password_file = {password_file}
# The replication slot `run` creates, and the publication it streams.
slot = {slot}
publication = {publication}
tables = [
    {tables},
]
# snapshot = "initial"        # copy the existing rows first ("never": only changes)
# snapshot_workers = 4        # connections copying a snapshot in parallel

[lake]
# A local directory, or s3://, az://, gs:// (docs/lake.md).
path = {lake}

[metrics]
# Prometheus /metrics (remove the key for none).
listen = "127.0.0.1:9734"

[serve]
# The SQL endpoint: psql "host=127.0.0.1 port=5480 dbname=wal2delta user=analyst"
# listen = "127.0.0.1:5480"
# Refined views: one SELECT per <name>.sql file, served as refined.<name>.
# refined_dir = "/etc/wal2delta/refined"
"#,
        dsn = toml_string(&role_dsn(admin, &request.role)),
        password_file = toml_string(&request.password_file.to_string_lossy()),
        slot = toml_string(&request.slot),
        publication = toml_string(&request.publication),
        tables = tables.join(",\n    "),
        lake = toml_string(&request.lake),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(dsn: &str) -> ConnParams {
        ConnParams::parse(dsn).unwrap()
    }

    #[test]
    fn the_role_dsn_keeps_where_and_how_but_not_who_or_the_password() {
        let a = admin(
            "postgresql://root:s3cret@db1:6543/app?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        );
        assert_eq!(
            role_dsn(&a, "wal2delta"),
            "host=db1 port=6543 user=wal2delta dbname=app sslmode=verify-full sslrootcert=/etc/ca.pem"
        );
        let a = admin("host=/var/run/postgresql dbname='my db' user=postgres");
        let dsn = role_dsn(&a, "w2d");
        assert_eq!(
            dsn,
            "host=/var/run/postgresql port=5432 user=w2d dbname='my db'"
        );
        let back = ConnParams::parse(&dsn).unwrap();
        assert_eq!(back.dbname, "my db");
        assert_eq!(back.user, "w2d");
    }

    #[test]
    fn the_config_parses_and_names_tables_as_in_sql() {
        let request = InitRequest {
            dsn: String::new(),
            tables: vec![],
            schemas: vec![],
            role: "wal2delta".into(),
            slot: "wal2delta".into(),
            publication: "wal2delta".into(),
            lake: "/var/lib/wal2delta/lake".into(),
            config: "/etc/wal2delta/wal2delta.toml".into(),
            password_file: "/etc/wal2delta/password".into(),
            force: false,
        };
        let tables = [
            TableName::new("public", "orders"),
            TableName::new("Vendas", "Itens \"2024\""),
        ];
        let text = config_text(
            &admin("host=127.0.0.1 user=postgres dbname=app"),
            &request,
            &tables,
        );
        let value: toml::Value = toml::from_str(&text).unwrap();
        let listed: Vec<TableName> = value["source"]["tables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| TableName::parse(t.as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(listed, tables);
        assert_eq!(
            value["source"]["password_file"].as_str(),
            Some("/etc/wal2delta/password")
        );
    }

    #[test]
    fn passwords_are_long_and_differ() {
        let (a, b) = (new_password(), new_password());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
