//! Result column names as Postgres gives them: `select 1` is headed `?column?`,
//! `count(*)` is `count`, `x::int` is `x`, where DataFusion says `Int64(1)`, `count(*)`
//! and `CAST(x AS Int32)`.
//!
//! # Design
//! Postgres names an unaliased select item from its syntax (`FigureColname`): a column
//! reference by its last name, a function call by its function's name, a cast by what it
//! casts (or the type, for a constant), a few constructs by a keyword (`case`, `exists`,
//! `array`, `coalesce`…), anything else `?column?`. The same rules run here on the parsed
//! statement, and the names replace DataFusion's in the row description only: the plan is
//! untouched, so two items both named `?column?` do not clash inside DataFusion.
//! Aliased items keep their alias; a select list with `*` keeps DataFusion's names.

use datafusion_postgres::pgwire::api::results::FieldInfo;
use deltalake::datafusion::sql::sqlparser::ast::{
    CastKind, DataType, Expr, FunctionArguments, Ident, ObjectName, Query, SelectItem, SetExpr,
    Statement,
};

const UNNAMED: &str = "?column?";

/// The names of the columns of `sql`, a single statement as the client sent it: parsed
/// without datafusion-postgres's rewrites, which turn `current_user` into
/// `session_user()`. Falls back to `statement`, the rewritten parse.
pub fn of_text(sql: &str, statement: &Statement) -> Option<Vec<Option<String>>> {
    use deltalake::datafusion::sql::sqlparser::{dialect::PostgreSqlDialect, parser::Parser};
    match Parser::parse_sql(&PostgreSqlDialect {}, sql).as_deref() {
        Ok([original]) => of(original),
        _ => of(statement),
    }
}

/// The Postgres name of each column of `statement`'s result, or `None` when the names
/// cannot be told from the syntax (not a query, `*` in the select list).
pub fn of(statement: &Statement) -> Option<Vec<Option<String>>> {
    match statement {
        Statement::Query(q) => of_query(q),
        _ => None,
    }
}

fn of_query(query: &Query) -> Option<Vec<Option<String>>> {
    of_body(&query.body)
}

fn of_body(body: &SetExpr) -> Option<Vec<Option<String>>> {
    match body {
        SetExpr::Select(select) => select
            .projection
            .iter()
            .map(|item| match item {
                SelectItem::UnnamedExpr(e) => {
                    Some(Some(name(e).unwrap_or_else(|| UNNAMED.to_string())))
                }
                SelectItem::ExprWithAlias { .. } => Some(None),
                _ => None, // a wildcard: as many columns as the table has
            })
            .collect(),
        SetExpr::Query(q) => of_query(q),
        // The first branch names a UNION's columns.
        SetExpr::SetOperation { left, .. } => of_body(left),
        _ => None,
    }
}

fn ident(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

fn last(name: &ObjectName) -> Option<String> {
    name.0.last().and_then(|p| p.as_ident()).map(ident)
}

/// The name Postgres gives `e`, or `None` for `?column?` (weak: a cast may do better).
fn name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(ident(i)),
        Expr::CompoundIdentifier(parts) => parts.last().map(ident),
        Expr::Function(f) => {
            let n = last(&f.name)?;
            // A scalar subquery's ARRAY(…) is named `array`.
            if matches!(f.args, FunctionArguments::Subquery(_)) && n == "array" {
                return Some(n);
            }
            Some(match n.as_str() {
                "trim" => "btrim".into(),
                _ => n,
            })
        }
        Expr::Cast {
            expr,
            data_type,
            kind,
            ..
        } => name(expr).or_else(|| match kind {
            CastKind::Cast | CastKind::DoubleColon => type_name(data_type),
            _ => None,
        }),
        Expr::Nested(inner) => name(inner),
        Expr::Case { .. } => Some("case".into()),
        Expr::Exists { .. } => Some("exists".into()),
        Expr::Subquery(q) => of_query(q)
            .and_then(|names| names.into_iter().next().flatten())
            .filter(|n| n != UNNAMED),
        Expr::Array(_) => Some("array".into()),
        Expr::Extract { .. } => Some("extract".into()),
        Expr::Substring { .. } => Some("substring".into()),
        Expr::Trim { .. } => Some("btrim".into()),
        Expr::Position { .. } => Some("position".into()),
        Expr::Overlay { .. } => Some("overlay".into()),
        Expr::Ceil { .. } => Some("ceil".into()),
        Expr::Floor { .. } => Some("floor".into()),
        Expr::Interval(_) => Some("interval".into()),
        Expr::TypedString(t) => type_name(&t.data_type),
        _ => None,
    }
}

/// Postgres's internal name of a type, as a cast of a constant is headed.
fn type_name(t: &DataType) -> Option<String> {
    let name = match t {
        DataType::Int(_) | DataType::Integer(_) | DataType::Int4(_) => "int4",
        DataType::BigInt(_) | DataType::Int8(_) => "int8",
        DataType::SmallInt(_) | DataType::Int2(_) => "int2",
        DataType::Text => "text",
        DataType::Varchar(_) | DataType::CharacterVarying(_) => "varchar",
        DataType::Char(_) | DataType::Character(_) => "bpchar",
        DataType::Boolean | DataType::Bool => "bool",
        DataType::Numeric(_) | DataType::Decimal(_) => "numeric",
        DataType::Real | DataType::Float4 => "float4",
        DataType::DoublePrecision | DataType::Float8 | DataType::Double(_) => "float8",
        DataType::Date => "date",
        DataType::Timestamp(_, tz) => match tz {
            deltalake::datafusion::sql::sqlparser::ast::TimezoneInfo::WithTimeZone
            | deltalake::datafusion::sql::sqlparser::ast::TimezoneInfo::Tz => "timestamptz",
            _ => "timestamp",
        },
        DataType::Time(..) => "time",
        DataType::Interval { .. } => "interval",
        DataType::JSON => "json",
        DataType::JSONB => "jsonb",
        DataType::Uuid => "uuid",
        DataType::Bytea => "bytea",
        _ => return None,
    };
    Some(name.to_string())
}

/// `fields` with the names of `names` where one is given (and the counts agree).
pub fn rename(fields: &[FieldInfo], names: &[Option<String>]) -> Option<Vec<FieldInfo>> {
    if fields.len() != names.len() || names.iter().all(Option::is_none) {
        return None;
    }
    Some(
        fields
            .iter()
            .zip(names)
            .map(|(f, n)| match n {
                Some(n) if n != f.name() => FieldInfo::new(
                    n.clone(),
                    f.table_id(),
                    f.column_id(),
                    f.datatype().clone(),
                    f.format(),
                )
                .with_format_options(f.format_options().clone())
                .with_type_size(f.type_size())
                .with_type_modifier(f.type_modifier()),
                _ => f.clone(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use deltalake::datafusion::sql::sqlparser::parser::Parser;

    fn names(sql: &str) -> Vec<String> {
        let statement = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        of(&statement)
            .unwrap()
            .into_iter()
            .map(|n| n.unwrap_or_else(|| "<alias>".into()))
            .collect()
    }

    #[test]
    fn names_follow_postgres() {
        assert_eq!(
            names("SELECT 1, count(*), t.id, Valor, \"Mixed\", 1 + 2, sum(x) AS total FROM t"),
            [
                "?column?", "count", "id", "valor", "Mixed", "?column?", "<alias>"
            ]
        );
        assert_eq!(
            names(
                "SELECT x::int, 1::int, '2'::text, CAST(y AS bigint), CASE WHEN a THEN 1 END, current_user, now(), (SELECT max(id) FROM t), EXISTS (SELECT 1)"
            ),
            [
                "x",
                "int4",
                "text",
                "y",
                "case",
                "current_user",
                "now",
                "max",
                "exists"
            ]
        );
        assert_eq!(names("SELECT a FROM t UNION SELECT 2"), ["a"]);
        let star = Parser::parse_sql(&PostgreSqlDialect {}, "SELECT *, 1 FROM t")
            .unwrap()
            .remove(0);
        assert!(of(&star).is_none());
    }
}
