//! Statement rewrites for SQL that Postgres accepts and DataFusion does not, run on the
//! parsed statement before planning.
//!
//! # Design
//! - **`ARRAY(SELECT …)`**, the array constructor from a subquery, which psql's `\d+` and
//!   `\du` use: rewritten to `(SELECT array_agg(…) …)` when the subquery selects one
//!   column. `array_agg` over no rows is NULL where Postgres gives an empty array: psql
//!   shows an empty cell instead of `{}`.
//! - **`SELECT x::text … ORDER BY x`**: DataFusion names a cast after what it casts, then
//!   adds the sort's `x` as a hidden column of the same name and refuses the plan
//!   ("Projections require unique expression names"). A bare `ORDER BY x` that names
//!   exactly one output column, an unaliased cast of `x`, becomes `ORDER BY <its
//!   position>`: Postgres's own rule (a bare name in ORDER BY is an output column first).
//!   Nothing else changes, so HAVING, expressions in ORDER BY and joins mean what they
//!   meant.
//!   An `ARRAY(SELECT … FROM unnest(<column>) …)` over one of the catalog columns that are
//!   always NULL here ([`super::catalog_columns::NULL_ARRAY_COLUMNS`]) is NULL itself:
//!   DataFusion cannot plan an `unnest` of an outer query's column.
//! - **`pg_table_is_visible(oid)`** (psql's `\d name` and `\dt` without a schema):
//!   datafusion-postgres answers true for every table, so `\d transacoes` described
//!   `arquivo.transacoes` and the raw tables too. It becomes "the relation is in `public`
//!   or `pg_catalog`", the schemas of the endpoint's search path, as in Postgres.
//! - **`FROM unnest(a) x`**: in Postgres the alias of a one-column function names its
//!   column too, which psql's `\d+` relies on (`select 'toast.' || x from
//!   unnest(tc.reloptions) x`); DataFusion names the column after the call. The alias
//!   gets the column alias `x (x)` when it has none.
//! - **`typinput = 'array_in'::regproc`**: `pg_type`'s function columns hold names here,
//!   so a comparison with a `regproc` literal compares names (pgjdbc asks it of every
//!   array type it meets).

use std::ops::ControlFlow;

use deltalake::datafusion::sql::sqlparser::ast::{
    ArrayElemTypeDef, BinaryOperator, CastKind, DataType, Expr, Function, FunctionArg,
    FunctionArgExpr, FunctionArgumentList, FunctionArguments, Ident, ObjectName, OrderBy,
    OrderByKind, Select, SelectItem, SetExpr, Statement, TableAliasColumnDef, TableFactor, Value,
    VisitMut, VisitorMut, visit_expressions_mut,
};
use deltalake::datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use deltalake::datafusion::sql::sqlparser::parser::Parser;

/// Applies the rewrites; returns whether anything changed.
pub fn rewrite(statement: &mut Statement) -> bool {
    let casts = order_by_cast_columns(statement);
    let procs = regproc_names(statement);
    let unnests = unnest_aliases(statement);
    let visible = table_visibility(statement);
    array_subqueries(statement) || casts || procs || unnests || visible
}

/// The relations `pg_table_is_visible` accepts: those of the search path's schemas.
const VISIBLE_RELATIONS: &str = "SELECT visible_c.oid FROM pg_catalog.pg_class visible_c \
     JOIN pg_catalog.pg_namespace visible_n ON visible_n.oid = visible_c.relnamespace \
     WHERE visible_n.nspname IN ('public', 'pg_catalog')";

/// `pg_table_is_visible(x)` → `x IN (<the relations of public and pg_catalog>)`.
fn table_visibility(statement: &mut Statement) -> bool {
    let mut rewritten = false;
    let _ = visit_expressions_mut(statement, |expr| {
        if let Expr::Function(f) = expr
            && names(&f.name, "pg_table_is_visible")
            && let FunctionArguments::List(list) = &f.args
            && let [FunctionArg::Unnamed(FunctionArgExpr::Expr(arg))] = list.args.as_slice()
            && let Ok(subquery) = Parser::new(&PostgreSqlDialect {})
                .try_with_sql(VISIBLE_RELATIONS)
                .and_then(|mut p| p.parse_query())
        {
            *expr = Expr::Nested(Box::new(Expr::InSubquery {
                expr: Box::new(arg.clone()),
                subquery,
                negated: false,
            }));
            rewritten = true;
        }
        ControlFlow::<()>::Continue(())
    });
    rewritten
}

/// Whether `name` (possibly schema-qualified) names `function`, in any case.
fn names(name: &ObjectName, function: &str) -> bool {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .is_some_and(|i| i.value.eq_ignore_ascii_case(function))
}

/// `FROM unnest(a) x` → `FROM unnest(a) AS x (x)`: the alias names the column too.
fn unnest_aliases(statement: &mut Statement) -> bool {
    struct Aliases(bool);
    impl VisitorMut for Aliases {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
            let is_unnest = |name: &ObjectName| names(name, "unnest");
            let alias = match factor {
                TableFactor::Table {
                    name,
                    args: Some(args),
                    alias: Some(alias),
                    ..
                } if is_unnest(name) && args.args.len() == 1 => alias,
                TableFactor::Function {
                    name,
                    args,
                    alias: Some(alias),
                    ..
                } if is_unnest(name) && args.len() == 1 => alias,
                TableFactor::UNNEST {
                    array_exprs,
                    alias: Some(alias),
                    with_offset: false,
                    ..
                } if array_exprs.len() == 1 => alias,
                _ => return ControlFlow::Continue(()),
            };
            if alias.columns.is_empty() {
                alias.columns = vec![TableAliasColumnDef::from_name(alias.name.value.clone())];
                self.0 = true;
            }
            ControlFlow::Continue(())
        }
    }
    let mut aliases = Aliases(false);
    let _ = statement.visit(&mut aliases);
    aliases.0
}

/// `pg_type`'s function columns hold the function's name here, where Postgres holds a
/// `regproc`: `typinput = 'pg_catalog.array_in'::regproc` (pgjdbc's array-type check),
/// which the pg_catalog parser turns into a comparison with `pg_proc`'s oid, becomes a
/// comparison of names.
fn regproc_names(statement: &mut Statement) -> bool {
    const COLUMNS: [&str; 7] = [
        "typinput",
        "typoutput",
        "typreceive",
        "typsend",
        "typmodin",
        "typmodout",
        "typanalyze",
    ];
    const PREFIX: &str = "SELECT oid FROM pg_catalog.pg_proc WHERE proname = '";
    let mut rewritten = false;
    let _ = visit_expressions_mut(statement, |expr| {
        if let Expr::BinaryOp { left, op, right } = expr
            && matches!(op, BinaryOperator::Eq | BinaryOperator::NotEq)
            && let Some(column) = match left.as_ref() {
                Expr::Identifier(i) => Some(i),
                Expr::CompoundIdentifier(parts) => parts.last(),
                _ => None,
            }
            && COLUMNS.contains(&column.value.to_ascii_lowercase().as_str())
            && let Expr::Subquery(query) = right.as_ref()
            && let Some(name) = query
                .to_string()
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.strip_suffix('\''))
                .filter(|name| !name.contains('\''))
        {
            let name = name.strip_prefix("pg_catalog.").unwrap_or(name).to_string();
            **right = Expr::Value(Value::SingleQuotedString(name).into());
            rewritten = true;
        }
        ControlFlow::<()>::Continue(())
    });
    rewritten
}

fn order_by_cast_columns(statement: &mut Statement) -> bool {
    let Statement::Query(query) = statement else {
        return false;
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return false;
    };
    let Some(OrderBy {
        kind: OrderByKind::Expressions(order),
        ..
    }) = query.order_by.as_mut()
    else {
        return false;
    };
    fn folded(i: &Ident) -> String {
        if i.quote_style.is_some() {
            i.value.clone()
        } else {
            i.value.to_lowercase()
        }
    }
    // The output name of each select item, when the syntax tells it.
    let names: Vec<Option<String>> = select
        .projection
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(Expr::Identifier(i)) => Some(folded(i)),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(p)) => p.last().map(folded),
            SelectItem::UnnamedExpr(Expr::Cast { expr, .. }) => match expr.as_ref() {
                Expr::Identifier(i) => Some(folded(i)),
                Expr::CompoundIdentifier(p) => p.last().map(folded),
                _ => None,
            },
            SelectItem::ExprWithAlias { alias, .. } => Some(folded(alias)),
            _ => None,
        })
        .collect();
    if select.projection.iter().any(|i| {
        matches!(
            i,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
        )
    }) {
        return false;
    }
    let mut rewritten = false;
    for entry in order.iter_mut() {
        let Expr::Identifier(i) = &entry.expr else {
            continue;
        };
        let name = folded(i);
        let mut matching = names
            .iter()
            .enumerate()
            .filter(|(_, n)| n.as_deref() == Some(name.as_str()));
        let (Some((position, _)), None) = (matching.next(), matching.next()) else {
            continue;
        };
        if matches!(
            &select.projection[position],
            SelectItem::UnnamedExpr(Expr::Cast { .. })
        ) {
            entry.expr = Expr::value(Value::Number((position + 1).to_string(), false));
            rewritten = true;
        }
    }
    rewritten
}

/// `ARRAY(subquery)` → `(SELECT array_agg(…) …)`.
fn array_subqueries(statement: &mut Statement) -> bool {
    let mut rewritten = false;
    let _ = visit_expressions_mut(statement, |expr| {
        if let Expr::Function(f) = expr
            && f.name.to_string().eq_ignore_ascii_case("array")
            && let FunctionArguments::Subquery(query) = &f.args
            && let SetExpr::Select(select) = query.body.as_ref()
            && let [item] = select.projection.as_slice()
        {
            let value = match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e.clone(),
                _ => return ControlFlow::<()>::Continue(()),
            };
            if unnests_a_null_column(select) {
                *expr = Expr::Cast {
                    kind: CastKind::DoubleColon,
                    expr: Box::new(Expr::Value(Value::Null.into())),
                    data_type: DataType::Array(ArrayElemTypeDef::SquareBracket(
                        Box::new(DataType::Text),
                        None,
                    )),
                    array: false,
                    format: None,
                };
                rewritten = true;
                return ControlFlow::Continue(());
            }
            let mut query = query.clone();
            if let SetExpr::Select(select) = query.body.as_mut() {
                select.projection = vec![SelectItem::UnnamedExpr(Expr::Function(Function {
                    name: ObjectName::from(vec![Ident::new("array_agg")]),
                    uses_odbc_syntax: false,
                    parameters: FunctionArguments::None,
                    args: FunctionArguments::List(FunctionArgumentList {
                        duplicate_treatment: None,
                        args: vec![FunctionArg::Unnamed(FunctionArgExpr::Expr(value))],
                        clauses: vec![],
                    }),
                    filter: None,
                    null_treatment: None,
                    over: None,
                    within_group: vec![],
                }))];
            }
            *expr = Expr::Subquery(query);
            rewritten = true;
        }
        ControlFlow::Continue(())
    });
    rewritten
}

/// `… FROM unnest(<alias>.<column>) …` with one of the always-NULL catalog columns.
fn unnests_a_null_column(select: &Select) -> bool {
    let [from] = select.from.as_slice() else {
        return false;
    };
    let arg = match &from.relation {
        TableFactor::Table {
            name,
            args: Some(args),
            ..
        } if names(name, "unnest") => match args.args.as_slice() {
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => e,
            _ => return false,
        },
        TableFactor::UNNEST { array_exprs, .. } => match array_exprs.as_slice() {
            [e] => e,
            _ => return false,
        },
        _ => return false,
    };
    let column = match arg {
        Expr::Identifier(i) => i,
        Expr::CompoundIdentifier(parts) => match parts.last() {
            Some(i) => i,
            None => return false,
        },
        _ => return false,
    };
    super::catalog_columns::NULL_ARRAY_COLUMNS.contains(&column.value.to_ascii_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_order_by_of_a_cast_column_becomes_its_position() {
        let rewritten = |sql: &str| {
            let mut s = Parser::parse_sql(&PostgreSqlDialect {}, sql)
                .unwrap()
                .remove(0);
            rewrite(&mut s).then(|| s.to_string())
        };
        assert_eq!(
            rewritten("SELECT v, id::text FROM t ORDER BY ID DESC, v").as_deref(),
            Some("SELECT v, id::TEXT FROM t ORDER BY 2 DESC, v")
        );
        // Not a cast, an expression, ambiguous, or with a wildcard: unchanged.
        for sql in [
            "SELECT id FROM t ORDER BY id",
            "SELECT id::text FROM t ORDER BY id + 1",
            "SELECT a.id::text, b.id FROM a JOIN b ON true ORDER BY id",
            "SELECT *, id::text FROM t ORDER BY id",
            "SELECT d::date, count(*) FROM t GROUP BY d HAVING d > '2024-06-01'",
        ] {
            assert_eq!(rewritten(sql), None, "{sql}");
        }
    }

    #[test]
    fn regproc_comparisons_of_type_functions_compare_names() {
        let mut s = datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser::new()
            .parse("SELECT typinput='pg_catalog.array_in'::regproc as is_array FROM pg_catalog.pg_type WHERE pg_type.oid = 1034")
            .unwrap()
            .remove(0);
        assert!(rewrite(&mut s));
        assert_eq!(
            s.to_string(),
            "SELECT typinput = 'array_in' AS is_array FROM pg_catalog.pg_type WHERE pg_type.oid = 1034"
        );
    }

    /// `sql` parsed and rewritten (which must change it), as text.
    fn rewritten(sql: &str) -> String {
        let mut statement = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        assert!(rewrite(&mut statement), "{sql} is rewritten");
        statement.to_string()
    }

    #[test]
    fn table_visibility_is_the_search_paths_schemas() {
        let sql = "SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relname ~ '^(t)$' \
                   AND pg_catalog.pg_table_is_visible(c.oid)";
        let text = rewritten(sql);
        assert!(
            text.contains("AND (c.oid IN (SELECT visible_c.oid FROM pg_catalog.pg_class")
                && text.contains("nspname IN ('public', 'pg_catalog')")
                && !text.contains("pg_table_is_visible"),
            "{text}"
        );
    }

    #[test]
    fn an_unnest_alias_names_its_column_too() {
        let sql = "SELECT pg_catalog.array_to_string(c.reloptions || array(select 'toast.' || x \
                   from pg_catalog.unnest(tc.reloptions) x), ', ') FROM pg_catalog.pg_class c \
                   LEFT JOIN pg_catalog.pg_class tc ON (c.reltoastrelid = tc.oid)";
        let text = rewritten(sql);
        assert!(
            text.contains("c.reloptions || NULL::TEXT[]"),
            "the always-NULL reloptions' array subquery is NULL: {text}"
        );
        let mut plain =
            Parser::parse_sql(&PostgreSqlDialect {}, "SELECT x FROM unnest(a) AS x (y)")
                .unwrap()
                .remove(0);
        assert!(!unnest_aliases(&mut plain), "an alias with columns stays");
    }

    #[test]
    fn array_subqueries_become_array_agg() {
        let mut s = Parser::parse_sql(
            &PostgreSqlDialect {},
            "SELECT r.rolname, ARRAY(SELECT b.rolname FROM pg_roles b WHERE b.oid = r.oid) AS memberof FROM pg_roles r",
        )
        .unwrap()
        .remove(0);
        assert!(rewrite(&mut s));
        assert_eq!(
            s.to_string(),
            "SELECT r.rolname, (SELECT array_agg(b.rolname) FROM pg_roles b WHERE b.oid = r.oid) AS memberof FROM pg_roles r"
        );
        let mut plain = Parser::parse_sql(&PostgreSqlDialect {}, "SELECT ARRAY[1, 2]")
            .unwrap()
            .remove(0);
        assert!(!rewrite(&mut plain));
    }
}
