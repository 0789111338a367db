//! The parts of `pg_catalog` psql's describe commands read that datafusion-postgres's
//! emulation lacks: the access-privilege and storage-option columns, and the session's
//! own role.
//!
//! # Design
//! - **Columns.** `pg_class.reloptions`/`relacl` (`\d+`, `\dp`) are absent and
//!   `pg_namespace.nspacl` (`\dn+`), `pg_proc.proacl` (`\df+`) and
//!   `pg_attribute.attacl` (`\dp`) are text where psql passes them to `array_to_string`.
//!   The patched table is a view over the emulated one with those columns as typed NULL
//!   text arrays: a lake table has no storage options, and grants are the endpoint's
//!   (`[[serve.users]]`), not Postgres ACLs, so psql shows empty cells.
//! - **Roles.** The emulation lists roles from a context provider; [`SessionRole`]
//!   gives it the session's user (a login role, nothing else), so `\du` and
//!   `pg_roles` show who one is connected as and no other user's name.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::{
    PgCatalogContextProvider, Role,
};
use deltalake::datafusion::arrow::datatypes::{DataType, Field};
use deltalake::datafusion::catalog::view::ViewTable;
use deltalake::datafusion::catalog::{SchemaProvider, TableProvider};
use deltalake::datafusion::common::{Column, DataFusionError, ScalarValue};
use deltalake::datafusion::datasource::provider_as_source;
use deltalake::datafusion::logical_expr::{Expr, LogicalPlanBuilder, cast, lit};

/// The session's user as the only role `pg_catalog` knows.
#[derive(Debug, Clone)]
pub struct SessionRole {
    pub user: String,
}

#[async_trait]
impl PgCatalogContextProvider for SessionRole {
    async fn roles(&self) -> Vec<String> {
        vec![self.user.clone()]
    }

    async fn role(&self, name: &str) -> Option<Role> {
        (name == self.user).then(|| Role {
            name: self.user.clone(),
            is_superuser: false,
            can_login: true,
            can_create_db: false,
            can_create_role: false,
            can_create_user: false,
            can_replication: false,
            grants: Vec::new(),
            inherited_roles: Vec::new(),
        })
    }
}

/// `pg_catalog` with the columns psql needs added (or retyped) as NULL text arrays.
#[derive(Debug)]
pub struct Patched {
    pub inner: Arc<dyn SchemaProvider>,
}

/// Every column the patches add: always NULL.
pub const NULL_ARRAY_COLUMNS: [&str; 5] = ["reloptions", "relacl", "nspacl", "proacl", "attacl"];

/// The text-array columns each patched table gets.
fn patched_columns(table: &str) -> &'static [&'static str] {
    match table {
        "pg_class" => &["reloptions", "relacl"],
        "pg_namespace" => &["nspacl"],
        "pg_proc" => &["proacl"],
        "pg_attribute" => &["attacl"],
        _ => &[],
    }
}

#[async_trait]
impl SchemaProvider for Patched {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        let Some(table) = self.inner.table(name).await? else {
            return Ok(None);
        };
        let columns = patched_columns(name);
        if columns.is_empty() {
            return Ok(Some(table));
        }
        Ok(Some(with_null_arrays(table, name, columns)?))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

/// A view of `table` in which `columns` are NULL text arrays (replacing a column of that
/// name in place, else added at the end).
fn with_null_arrays(
    table: Arc<dyn TableProvider>,
    name: &str,
    columns: &[&str],
) -> Result<Arc<dyn TableProvider>, DataFusionError> {
    let text_array = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    let null_array = |column: &str| cast(lit(ScalarValue::Null), text_array.clone()).alias(column);
    let schema = table.schema();
    let mut exprs: Vec<Expr> = schema
        .fields()
        .iter()
        .map(|f| match columns.contains(&f.name().as_str()) {
            true => null_array(f.name()),
            false => Expr::Column(Column::new(Some(name), f.name())),
        })
        .collect();
    for column in columns {
        if schema.field_with_name(column).is_err() {
            exprs.push(null_array(column));
        }
    }
    let plan = LogicalPlanBuilder::scan(name, provider_as_source(table), None)?
        .project(exprs)?
        .build()?;
    Ok(Arc::new(ViewTable::new(plan, None)))
}
