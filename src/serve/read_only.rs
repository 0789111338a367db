//! The endpoint is read-only: which parsed statements may run.
//!
//! Decided on the syntax tree, never on the text: an allow-list of statement kinds (queries,
//! EXPLAIN, SET/SHOW/RESET, transaction and cursor control), checked on every statement
//! nested anywhere in the tree, so `WITH x AS (DELETE …) SELECT …` is refused too, as are
//! `SELECT … INTO` and `SELECT … FOR UPDATE`. Everything else is a write or DDL and gets
//! SQLSTATE 25006 (read_only_sql_transaction), as in a Postgres read-only transaction.

use std::ops::ControlFlow;

use deltalake::datafusion::sql::sqlparser::ast::{
    CopySource, CopyTarget, Query, SetExpr, Statement, visit_statements,
};

/// Why a statement is refused: the command's name, for the message.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot execute {} in a read-only transaction: wal2delta serves the lake read-only; write to the source database instead",
            self.0
        )
    }
}

/// `Ok` when `statement` only reads.
pub fn check(statement: &Statement) -> Result<(), Refused> {
    let flow = visit_statements(statement, |s| match allowed(s) {
        Ok(()) => ControlFlow::Continue(()),
        Err(r) => ControlFlow::Break(r),
    });
    match flow {
        ControlFlow::Break(r) => Err(r),
        ControlFlow::Continue(()) => Ok(()),
    }
}

fn allowed(statement: &Statement) -> Result<(), Refused> {
    match statement {
        Statement::Query(q) => query(q),
        // COPY … TO STDOUT only reads (`copy_out`); FROM, or TO a file or program, writes.
        Statement::Copy {
            to: true,
            target: CopyTarget::Stdout,
            source,
            ..
        } => match source {
            CopySource::Query(q) => query(q),
            CopySource::Table { .. } => Ok(()),
        },
        Statement::Explain { .. }
        | Statement::ExplainTable { .. }
        | Statement::Set(_)
        | Statement::Reset(_)
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowViews { .. }
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::Discard { .. }
        | Statement::Deallocate { .. } => Ok(()),
        other => Err(Refused(command(other))),
    }
}

fn query(q: &Query) -> Result<(), Refused> {
    if !q.locks.is_empty() {
        return Err(Refused("SELECT FOR UPDATE/SHARE".into()));
    }
    if let Some(with) = &q.with {
        for cte in &with.cte_tables {
            query(&cte.query)?;
        }
    }
    set_expr(&q.body)
}

fn set_expr(body: &SetExpr) -> Result<(), Refused> {
    match body {
        SetExpr::Select(s) if s.into.is_some() => Err(Refused("SELECT INTO".into())),
        SetExpr::Query(q) => query(q),
        SetExpr::SetOperation { left, right, .. } => {
            set_expr(left)?;
            set_expr(right)
        }
        SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => {
            Err(Refused(command(s)))
        }
        _ => Ok(()),
    }
}

/// The command's leading keywords (`INSERT`, `CREATE TABLE`, `COPY`…).
fn command(statement: &Statement) -> String {
    let text = statement.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    match words.as_slice() {
        [first, second]
            if matches!(
                first.to_ascii_uppercase().as_str(),
                "CREATE" | "DROP" | "ALTER"
            ) =>
        {
            format!(
                "{} {}",
                first.to_ascii_uppercase(),
                second.to_ascii_uppercase()
            )
        }
        [first, ..] => first.to_ascii_uppercase(),
        [] => "this statement".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;

    fn verdict(sql: &str) -> Result<(), Refused> {
        let statements = PostgresCompatibilityParser::new()
            .parse(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        check(&statements[0])
    }

    #[test]
    fn reads_pass() {
        for sql in [
            "SELECT 1",
            "SELECT * FROM transacoes t JOIN imoveis i ON i.id = t.imovel_id ORDER BY 1 LIMIT 3",
            "WITH x AS (SELECT 1 AS a) SELECT a FROM x UNION ALL SELECT 2",
            "EXPLAIN SELECT 1",
            "SET search_path = public",
            "SHOW server_version",
            "BEGIN",
            "COMMIT",
            "ROLLBACK",
            "DISCARD ALL",
            "RESET ALL",
            "COPY t TO STDOUT",
            "COPY (SELECT 1) TO STDOUT WITH (FORMAT csv, HEADER)",
        ] {
            assert_eq!(verdict(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn writes_are_refused_whatever_their_spelling() {
        for (sql, what) in [
            ("INSERT INTO t VALUES (1)", "INSERT"),
            ("  update t set a = 1", "UPDATE"),
            ("DELETE FROM t", "DELETE"),
            ("/* hi */ DELETE FROM t", "DELETE"),
            ("CREATE TABLE x (a int)", "CREATE TABLE"),
            ("DROP TABLE transacoes", "DROP TABLE"),
            ("ALTER TABLE t ADD COLUMN b int", "ALTER TABLE"),
            ("TRUNCATE t", "TRUNCATE"),
            ("COPY t FROM STDIN", "COPY"),
            ("COPY t TO '/tmp/lake.csv'", "COPY"),
            ("COPY t TO PROGRAM 'rm -rf /'", "COPY"),
            (
                "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
                "MERGE",
            ),
            ("CREATE VIEW v AS SELECT 1", "CREATE VIEW"),
            ("SELECT * INTO novo FROM t", "SELECT INTO"),
            ("SELECT * FROM t FOR UPDATE", "SELECT FOR UPDATE/SHARE"),
            ("GRANT SELECT ON t TO bob", "GRANT"),
        ] {
            assert_eq!(verdict(sql), Err(Refused(what.into())), "{sql}");
        }
    }
}
