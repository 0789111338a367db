//! Primary keys of the curated tables, for the tools that ask for them.
//!
//! # Design
//! - **From the source.** The lake does not record keys; the daemon reads each table's
//!   primary key from the source's catalog when it starts (`run`) and hands them here.
//!   `wal2delta serve`, which never connects to the source, reports none.
//! - **pgjdbc's `DatabaseMetaData.getPrimaryKeys`**, which Metabase, DBeaver and other JDBC
//!   tools call, expands `pg_index.indkey` with `information_schema._pg_expandarray`, a
//!   set-returning function DataFusion has no equivalent of. That one statement is
//!   recognised (it names `_pg_expandarray` and `indisprimary`) and answered from the keys
//!   here instead: same columns, same order, same filters on schema and table, and only
//!   tables the user may read.
//! - `pg_constraint` and `pg_index` stay as the pg_catalog emulation ships them (empty of
//!   our tables): psql's `\d` shows no primary key.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::{Arc, RwLock};

use deltalake::datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, Statement, Value, visit_expressions,
};

use crate::table_name::{TableName, quote_literal};

/// The primary key columns of each source table, in key order (shared, set by `run`).
#[derive(Debug, Clone, Default)]
pub struct PrimaryKeys(Arc<RwLock<BTreeMap<TableName, Vec<String>>>>);

impl PrimaryKeys {
    /// Replaces every table's key (tables without a primary key are left out).
    pub fn set(&self, keys: impl IntoIterator<Item = (TableName, Vec<String>)>) {
        let keys = keys.into_iter().filter(|(_, k)| !k.is_empty()).collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    /// The primary key of `table`, when known.
    pub fn of(&self, table: &TableName) -> Option<Vec<String>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(table)
            .cloned()
    }

    fn snapshot(&self) -> BTreeMap<TableName, Vec<String>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// When `sql` is pgjdbc's `getPrimaryKeys` query, replaces `statement` with one that
/// answers it from `keys` for the tables `visible` (served schema, name) allows. Curated
/// tables are served under their source names.
pub fn answer_jdbc(
    sql: &str,
    statement: &mut Statement,
    keys: &PrimaryKeys,
    visible: impl Fn(&str, &str) -> bool,
) -> bool {
    if !(sql.contains("_pg_expandarray") && sql.contains("indisprimary")) {
        return false;
    }
    // pgjdbc filters with `n.nspname = E'…'` and `ct.relname = E'…'` (each optional).
    let (mut schema, mut table) = (None::<String>, None::<String>);
    let _ = visit_expressions(statement, |expr| {
        if let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = expr
            && let Expr::CompoundIdentifier(parts) = left.as_ref()
            && let [qualifier, column] = parts.as_slice()
            && let Expr::Value(value) = right.as_ref()
            && let Value::SingleQuotedString(text) | Value::EscapedStringLiteral(text) =
                &value.value
        {
            match (qualifier.value.as_str(), column.value.as_str()) {
                ("n", "nspname") => schema = Some(text.clone()),
                ("ct", "relname") => table = Some(text.clone()),
                _ => {}
            }
        }
        ControlFlow::<()>::Continue(())
    });
    let mut rows = Vec::new();
    for (name, columns) in keys.snapshot() {
        if schema.as_ref().is_some_and(|s| s != &name.schema)
            || table.as_ref().is_some_and(|t| t != &name.name)
            || !visible(&name.schema, &name.name)
        {
            continue;
        }
        for (i, column) in columns.iter().enumerate() {
            rows.push(format!(
                "({}, {}, {}, {}, {})",
                quote_literal(&name.schema),
                quote_literal(&name.name),
                quote_literal(column),
                i + 1,
                quote_literal(&format!("{}_pkey", name.name))
            ));
        }
    }
    let (values, filter) = if rows.is_empty() {
        ("(NULL, NULL, NULL, 0, NULL)".to_string(), " WHERE false")
    } else {
        (rows.join(", "), "")
    };
    let sql = format!(
        "SELECT CAST(NULL AS TEXT) AS table_cat, k.s AS table_schem, k.t AS table_name, \
         k.c AS column_name, CAST(k.n AS INT) AS key_seq, k.pk AS pk_name \
         FROM (VALUES {values}) AS k(s, t, c, n, pk){filter} \
         ORDER BY table_name, pk_name, key_seq"
    );
    match deltalake::datafusion::sql::sqlparser::parser::Parser::parse_sql(
        &deltalake::datafusion::sql::sqlparser::dialect::PostgreSqlDialect {},
        &sql,
    ) {
        Ok(mut parsed) if parsed.len() == 1 => {
            *statement = parsed.remove(0);
            true
        }
        // Built from quoted literals: cannot fail; if it did, the original statement
        // fails as it did before, with its own error.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use deltalake::datafusion::sql::sqlparser::parser::Parser;

    /// What pgjdbc 42.5 sends for `getPrimaryKeys(null, "public", "itens")`.
    const JDBC: &str = "SELECT result.TABLE_CAT, result.TABLE_SCHEM, result.TABLE_NAME, \
        result.COLUMN_NAME, result.KEY_SEQ, result.PK_NAME FROM (SELECT NULL AS TABLE_CAT, \
        n.nspname AS TABLE_SCHEM,   ct.relname AS TABLE_NAME, a.attname AS COLUMN_NAME,   \
        (information_schema._pg_expandarray(i.indkey)).n AS KEY_SEQ, ci.relname AS PK_NAME,   \
        information_schema._pg_expandarray(i.indkey) AS KEYS, a.attnum AS A_ATTNUM \
        FROM pg_catalog.pg_class ct   JOIN pg_catalog.pg_attribute a ON (ct.oid = a.attrelid)   \
        JOIN pg_catalog.pg_namespace n ON (ct.relnamespace = n.oid)   JOIN pg_catalog.pg_index i \
        ON ( a.attrelid = i.indrelid)   JOIN pg_catalog.pg_class ci ON (ci.oid = i.indexrelid) \
        WHERE true  AND n.nspname = E'public' AND ct.relname = E'itens' AND i.indisprimary  ) \
        result where  result.A_ATTNUM = (result.KEYS).x  ORDER BY result.table_name, \
        result.pk_name, result.key_seq";

    fn keys() -> PrimaryKeys {
        let keys = PrimaryKeys::default();
        keys.set([
            (
                TableName::new("public", "itens"),
                vec!["pedido_id".into(), "linha".into()],
            ),
            (TableName::new("public", "pedidos"), vec!["id".into()]),
            (TableName::new("arquivo", "itens"), vec!["id".into()]),
            (TableName::new("public", "log"), vec![]),
        ]);
        keys
    }

    fn answer(sql: &str, visible: impl Fn(&str, &str) -> bool) -> Option<String> {
        let mut statement = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .ok()
            .map(|mut s| s.remove(0))
            .unwrap_or(Statement::Commit {
                chain: false,
                end: false,
                modifier: None,
            });
        answer_jdbc(sql, &mut statement, &keys(), visible).then(|| statement.to_string())
    }

    #[test]
    fn jdbc_get_primary_keys_is_answered_from_the_keys_with_its_filters() {
        let sql = answer(JDBC, |_, _| true).expect("recognised");
        assert!(
            sql.contains("('public', 'itens', 'pedido_id', 1, 'itens_pkey'), ('public', 'itens', 'linha', 2, 'itens_pkey')"),
            "{sql}"
        );
        assert!(
            !sql.contains("arquivo") && !sql.contains("pedidos"),
            "{sql}"
        );
        // Without a schema filter, both `itens` tables; hidden tables never.
        let any_schema = JDBC.replace("AND n.nspname = E'public' ", "");
        let sql = answer(&any_schema, |s, _| s != "arquivo").unwrap();
        assert!(!sql.contains("arquivo"), "{sql}");
        let sql = answer(&any_schema, |_, _| true).unwrap();
        assert!(sql.contains("'arquivo'"), "{sql}");
        // Nothing matches: an empty result of the same shape.
        let none = JDBC.replace("E'itens'", "E'nope'");
        assert!(
            answer(&none, |_, _| true)
                .unwrap()
                .ends_with("WHERE false ORDER BY table_name, pk_name, key_seq")
        );
    }

    #[test]
    fn other_statements_are_left_alone() {
        assert_eq!(
            answer("SELECT * FROM pg_index WHERE indisprimary", |_, _| true),
            None
        );
    }
}
