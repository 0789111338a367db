//! Per-user grants: which served tables a `[[serve.users]]` user may read.
//!
//! # Design
//! - **Patterns on served names.** `tables = ["public.*", "raw.transacoes",
//!   "\"Vendas\".*", "refined.*"]` names what the user may read, as `\dt` shows it; a user
//!   without `tables` reads everything, as before.
//! - **A filtered catalog, not a second lake view.** A restricted user's statement runs on
//!   the view's catalog seen through [`restrict`]: other tables are absent from
//!   `information_schema`, `pg_catalog` (so `\dt`, `\d` and tools' metadata queries) and
//!   schema listings, and naming one gets `42501 permission denied for table …` (the table
//!   exists; Postgres says the same). Schemas left with no readable table disappear.
//! - **`pg_catalog` over the filtered list.** datafusion-postgres's `pg_catalog` lists the
//!   catalog list it is given, so a restricted session gets its own, over a filtered list
//!   that does not hold it (no reference cycle); its static tables are shared.
//! - **Refined views** run with the rights of their definition, like a Postgres view's
//!   owner: a user granted `refined.x` reads it even without its base tables.
//!   `table_at_version` checks the grants itself (`view`).

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::{
    PgCatalogSchemaProvider, PgCatalogStaticTables,
};
use deltalake::datafusion::catalog::{CatalogProvider, CatalogProviderList, SchemaProvider};
use deltalake::datafusion::common::DataFusionError;
use deltalake::datafusion::datasource::TableProvider;

use crate::table_name::{TableName, TableNameError};

/// Schemas every user reads: the catalogs describe only what the user may read.
const SYSTEM_SCHEMAS: [&str; 2] = ["pg_catalog", "information_schema"];

/// What one user may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    patterns: Vec<Pattern>,
    /// Every table (a user `[[serve.users]]` does not restrict).
    all: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    schema: String,
    /// `None`: every table of the schema.
    table: Option<String>,
}

impl Grants {
    /// Parses `schema.table` and `schema.*` patterns (SQL identifier rules: unquoted
    /// parts fold to lower case).
    pub fn parse(patterns: &[String]) -> Result<Grants, TableNameError> {
        let patterns = patterns
            .iter()
            .map(|p| match p.trim().strip_suffix(".*") {
                Some(schema) => TableName::parse(&format!("{schema}.x")).map(|n| Pattern {
                    schema: n.schema,
                    table: None,
                }),
                None => TableName::parse(p).map(|n| Pattern {
                    schema: n.schema,
                    table: Some(n.name),
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok(Grants {
            patterns,
            all: false,
        })
    }

    /// Every table: what a user without `tables` in `[[serve.users]]` reads.
    pub fn everything() -> Grants {
        Grants {
            patterns: Vec::new(),
            all: true,
        }
    }

    /// Whether the user may read the served table `schema.table`.
    pub fn allows(&self, schema: &str, table: &str) -> bool {
        self.all
            || SYSTEM_SCHEMAS.contains(&schema)
            || self
                .patterns
                .iter()
                .any(|p| p.schema == schema && p.table.as_deref().is_none_or(|t| t == table))
    }
}

/// The error for a table the user may not read.
pub fn denied(schema: &str, table: &str) -> DataFusionError {
    DataFusionError::Plan(format!(
        "permission denied for table {}",
        TableName::new(schema, table)
    ))
}

/// `catalog_list` as `grants` let the user see it, with a `pg_catalog` that lists only
/// that.
pub fn restrict(
    catalog_list: Arc<dyn CatalogProviderList>,
    grants: Arc<Grants>,
    user: &str,
) -> Result<Arc<dyn CatalogProviderList>, DataFusionError> {
    static STATIC_TABLES: OnceLock<Arc<PgCatalogStaticTables>> = OnceLock::new();
    let static_tables = match STATIC_TABLES.get() {
        Some(t) => t.clone(),
        None => {
            let t = Arc::new(PgCatalogStaticTables::try_new()?);
            STATIC_TABLES.get_or_init(|| t).clone()
        }
    };
    let listed: Arc<dyn CatalogProviderList> = Arc::new(Filtered {
        inner: catalog_list.clone(),
        grants: grants.clone(),
        pg_catalog: None,
    });
    let pg_catalog: Arc<dyn SchemaProvider> = Arc::new(super::catalog_columns::Patched {
        inner: Arc::new(PgCatalogSchemaProvider::try_new(
            listed,
            static_tables,
            super::catalog_columns::SessionRole {
                user: user.to_string(),
            },
        )?),
    });
    Ok(Arc::new(Filtered {
        inner: catalog_list,
        grants,
        pg_catalog: Some(pg_catalog),
    }))
}

/// A catalog list, its catalogs and schemas, less what the grants hide.
#[derive(Debug, Clone)]
struct Filtered {
    inner: Arc<dyn CatalogProviderList>,
    grants: Arc<Grants>,
    /// The session's own `pg_catalog`, in place of the inner one.
    pg_catalog: Option<Arc<dyn SchemaProvider>>,
}

impl CatalogProviderList for Filtered {
    fn register_catalog(
        &self,
        name: String,
        catalog: Arc<dyn CatalogProvider>,
    ) -> Option<Arc<dyn CatalogProvider>> {
        self.inner.register_catalog(name, catalog)
    }

    fn catalog_names(&self) -> Vec<String> {
        self.inner.catalog_names()
    }

    fn catalog(&self, name: &str) -> Option<Arc<dyn CatalogProvider>> {
        let inner = self.inner.catalog(name)?;
        Some(Arc::new(FilteredCatalog {
            inner,
            filter: self.clone(),
        }))
    }
}

#[derive(Debug)]
struct FilteredCatalog {
    inner: Arc<dyn CatalogProvider>,
    filter: Filtered,
}

impl CatalogProvider for FilteredCatalog {
    fn schema_names(&self) -> Vec<String> {
        self.inner
            .schema_names()
            .into_iter()
            .filter(|s| {
                // Unrestricted: every schema, empty ones too (as Postgres lists them).
                self.filter.grants.all
                    || SYSTEM_SCHEMAS.contains(&s.as_str())
                    || self.inner.schema(s).is_some_and(|schema| {
                        schema
                            .table_names()
                            .iter()
                            .any(|t| self.filter.grants.allows(s, t))
                    })
            })
            .collect()
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if name == "pg_catalog"
            && let Some(pg_catalog) = &self.filter.pg_catalog
        {
            return Some(pg_catalog.clone());
        }
        let inner = self.inner.schema(name)?;
        if SYSTEM_SCHEMAS.contains(&name) {
            return Some(inner);
        }
        Some(Arc::new(FilteredSchema {
            inner,
            schema: name.to_string(),
            grants: self.filter.grants.clone(),
        }))
    }
}

#[derive(Debug)]
struct FilteredSchema {
    inner: Arc<dyn SchemaProvider>,
    schema: String,
    grants: Arc<Grants>,
}

#[async_trait]
impl SchemaProvider for FilteredSchema {
    fn table_names(&self) -> Vec<String> {
        self.inner
            .table_names()
            .into_iter()
            .filter(|t| self.grants.allows(&self.schema, t))
            .collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        if self.grants.allows(&self.schema, name) {
            self.inner.table(name).await
        } else if self.inner.table_exist(name) {
            Err(denied(&self.schema, name))
        } else {
            Ok(None)
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.grants.allows(&self.schema, name) && self.inner.table_exist(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_name_served_tables_and_whole_schemas() {
        let g = Grants::parse(&[
            "public.transacoes".into(),
            "raw.*".into(),
            r#""Vendas".*"#.into(),
        ])
        .unwrap();
        assert!(g.allows("public", "transacoes"));
        assert!(!g.allows("public", "moradores"));
        assert!(g.allows("raw", "moradores"));
        assert!(g.allows("Vendas", "Pedidos"));
        assert!(!g.allows("vendas", "Pedidos"));
        assert!(!g.allows("arquivo", "transacoes"));
        assert!(g.allows("pg_catalog", "pg_class"));
        assert!(Grants::parse(&["not a name".into()]).is_err());
    }
}
