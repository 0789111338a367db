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
//!   ("Projections require unique expression names"). An unaliased cast of a column gets
//!   that column's name as an explicit alias, which is also the name Postgres gives it;
//!   `ORDER BY x` then sorts by the output column, as Postgres does.

use std::ops::ControlFlow;

use deltalake::datafusion::sql::sqlparser::ast::{
    Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments, Ident,
    ObjectName, SelectItem, SetExpr, Statement, visit_expressions_mut,
};

/// Applies the rewrites; returns whether anything changed.
pub fn rewrite(statement: &mut Statement) -> bool {
    let casts = alias_column_casts(statement);
    array_subqueries(statement) || casts
}

fn alias_column_casts(statement: &mut Statement) -> bool {
    let Statement::Query(query) = statement else {
        return false;
    };
    let SetExpr::Select(select) = query.body.as_mut() else {
        return false;
    };
    let mut rewritten = false;
    for item in select.projection.iter_mut() {
        if let SelectItem::UnnamedExpr(Expr::Cast { expr, .. }) = item {
            let column = match expr.as_ref() {
                Expr::Identifier(i) => i.clone(),
                Expr::CompoundIdentifier(parts) => match parts.last() {
                    Some(i) => i.clone(),
                    None => continue,
                },
                _ => continue,
            };
            let SelectItem::UnnamedExpr(cast) =
                std::mem::replace(item, SelectItem::Wildcard(Default::default()))
            else {
                unreachable!("matched above")
            };
            *item = SelectItem::ExprWithAlias {
                expr: cast,
                alias: column,
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use deltalake::datafusion::sql::sqlparser::parser::Parser;

    #[test]
    fn casts_of_columns_are_named_after_them() {
        let mut s = Parser::parse_sql(
            &PostgreSqlDialect {},
            "SELECT id::text, CAST(t.\"V\" AS int), 1::int, x AS y FROM t ORDER BY id",
        )
        .unwrap()
        .remove(0);
        assert!(rewrite(&mut s));
        assert_eq!(
            s.to_string(),
            "SELECT id::TEXT AS id, CAST(t.\"V\" AS INT) AS \"V\", 1::INT, x AS y FROM t ORDER BY id"
        );
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
