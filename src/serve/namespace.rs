//! The endpoint's namespace: the SQL schema and name each lake table is served under.
//!
//! # Design
//! - **Curated tables keep their source names.** `public.transacoes` is
//!   `public.transacoes`, `arquivo.transacoes` is `arquivo.transacoes`,
//!   `"Vendas"."Pedidos"` is `"Vendas"."Pedidos"`: a query written against the source runs
//!   unchanged, and adding a table to the configuration never renames another.
//! - **Raw change logs get one schema per source schema**: those of `public` are in `raw`
//!   (`raw.transacoes`), those of any other source schema S in `raw_S`
//!   (`raw_arquivo.transacoes`). Refined views are in `refined`.
//! - **Clashes are refused, never resolved by renaming.** A source schema named like a raw
//!   schema (`raw`, `raw_…`) or the refined one would hide tables; configuration
//!   validation names it and the setting that moves ours out of the way
//!   (`serve.raw_schema`, `serve.refined_schema`).

use crate::table_name::TableName;

/// The raw change-log schema prefix by default.
pub const DEFAULT_RAW_SCHEMA: &str = "raw";
/// The refined views' schema by default.
pub const DEFAULT_REFINED_SCHEMA: &str = "refined";

/// Where the endpoint serves each lake table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    raw: String,
    refined: String,
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace::new(DEFAULT_RAW_SCHEMA, DEFAULT_REFINED_SCHEMA)
    }
}

impl Namespace {
    pub fn new(raw: &str, refined: &str) -> Namespace {
        Namespace {
            raw: raw.to_string(),
            refined: refined.to_string(),
        }
    }

    /// The curated table of `table`: its source schema and name.
    pub fn curated(&self, table: &TableName) -> TableName {
        table.clone()
    }

    /// The raw change log of `table`: `raw.<table>` for schema `public`, else
    /// `raw_<schema>.<table>`.
    pub fn raw(&self, table: &TableName) -> TableName {
        TableName::new(self.raw_schema_of(&table.schema), table.name.clone())
    }

    /// The schema of the raw change logs of source schema `schema`.
    pub fn raw_schema_of(&self, schema: &str) -> String {
        if schema == "public" {
            self.raw.clone()
        } else {
            format!("{}_{schema}", self.raw)
        }
    }

    /// The refined views' schema.
    pub fn refined(&self) -> &str {
        &self.refined
    }

    /// The source table a served name stands for, and whether it is its raw change log.
    /// `tables` are the lake's tables.
    pub fn resolve<'a>(
        &self,
        served: &TableName,
        tables: impl IntoIterator<Item = &'a TableName>,
    ) -> Option<(TableName, bool)> {
        tables.into_iter().find_map(|t| {
            if self.curated(t) == *served {
                Some((t.clone(), false))
            } else if self.raw(t) == *served {
                Some((t.clone(), true))
            } else {
                None
            }
        })
    }

    /// Source schemas whose tables cannot be served under their own names, one problem
    /// per schema, naming the setting that resolves it.
    pub fn clashes<'a>(&self, tables: impl IntoIterator<Item = &'a TableName>) -> Vec<String> {
        let mut schemas: Vec<&str> = tables.into_iter().map(|t| t.schema.as_str()).collect();
        schemas.sort_unstable();
        schemas.dedup();
        let mut problems = Vec::new();
        for schema in schemas {
            if schema == self.raw || schema.starts_with(&format!("{}_", self.raw)) {
                problems.push(format!(
                    "source schema `{schema}` has a name the SQL endpoint gives raw change logs \
                     (`{raw}` for public, `{raw}_<schema>` for the others), so its curated \
                     tables could not be served under their own names; set serve.raw_schema \
                     to a prefix no source schema starts with, e.g. \"changes\"",
                    raw = self.raw
                ));
            } else if schema == self.refined {
                problems.push(format!(
                    "source schema `{schema}` is the SQL endpoint's schema for refined views, \
                     so its curated tables could not be served under their own names; set \
                     serve.refined_schema to another name, e.g. \"gold\""
                ));
            } else if schema == "pg_catalog" || schema == "information_schema" {
                problems.push(format!(
                    "source schema `{schema}` is a system catalog; it cannot be replicated"
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> TableName {
        TableName::parse(text).unwrap()
    }

    #[test]
    fn curated_tables_keep_their_source_names_and_raw_logs_get_a_schema_per_source_schema() {
        let ns = Namespace::default();
        for name in ["transacoes", "arquivo.transacoes", "\"Vendas\".\"Pedidos\""] {
            assert_eq!(ns.curated(&t(name)), t(name));
        }
        assert_eq!(ns.raw(&t("transacoes")), t("raw.transacoes"));
        assert_eq!(
            ns.raw(&t("arquivo.transacoes")),
            t("raw_arquivo.transacoes")
        );
        assert_eq!(
            ns.raw(&t("\"Vendas\".\"Pedidos\"")),
            TableName::new("raw_Vendas", "Pedidos")
        );
        let lake = [t("transacoes"), t("arquivo.transacoes")];
        assert_eq!(
            ns.resolve(&t("raw_arquivo.transacoes"), &lake),
            Some((t("arquivo.transacoes"), true))
        );
        assert_eq!(
            ns.resolve(&t("transacoes"), &lake),
            Some((t("transacoes"), false))
        );
        assert_eq!(ns.resolve(&t("raw.imoveis"), &lake), None);
    }

    #[test]
    fn a_source_schema_named_like_ours_is_refused_with_the_setting_that_resolves_it() {
        let ns = Namespace::default();
        let tables = [t("raw.events"), t("raw_x.y"), t("refined.z"), t("public.a")];
        let problems = ns.clashes(&tables);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("serve.raw_schema"), "{problems:?}");
        assert!(problems[2].contains("serve.refined_schema"), "{problems:?}");
        let moved = Namespace::new("changes", "gold");
        assert!(moved.clashes(&tables).is_empty());
        assert_eq!(moved.raw(&t("raw.events")), t("changes_raw.events"));
    }
}
