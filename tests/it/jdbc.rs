//! The PostgreSQL JDBC driver (pgjdbc, Debian's `libpostgresql-jdbc-java`) against the SQL
//! endpoint, run by a JDK: connect, `DatabaseMetaData` (schemas, tables, columns, primary
//! keys), prepared statements with parameters and their types, `Statement.cancel`, and the
//! read-only refusal. The Java side is `jdbc/JdbcCheck.java`.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::Env;

/// The driver's jar: `W2D_JDBC_JAR`, else Debian's.
fn jdbc_jar() -> PathBuf {
    let jar = std::env::var_os("W2D_JDBC_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/java/postgresql.jar"));
    assert!(
        jar.exists(),
        "this test needs the PostgreSQL JDBC driver at {}: apt-get install -y \
         libpostgresql-jdbc-java (or set W2D_JDBC_JAR)",
        jar.display()
    );
    let java = Command::new("java").arg("-version").output();
    assert!(
        matches!(&java, Ok(o) if o.status.success()),
        "this test needs a JDK 11+ (java runs single-file programs): apt-get install -y \
         default-jdk-headless ({java:?})"
    );
    jar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_reads_metadata_prepared_statements_and_cancels() {
    let jar = jdbc_jar();
    let (env, _daemon) = Env::streaming(
        "CREATE TABLE pedidos (id bigint PRIMARY KEY, cliente text NOT NULL, \
             valor numeric(12,2), criado_em timestamptz, dia date, pago boolean); \
         CREATE TABLE itens (pedido_id bigint, linha int, produto text, PRIMARY KEY (pedido_id, linha)); \
         INSERT INTO pedidos VALUES \
             (1, 'Ana', 10.50, '2026-01-02 03:04:05+00', '2026-01-02', true), \
             (2, 'Bruno', 0.75, '2026-02-03 04:05:06.5+00', '2026-02-03', false), \
             (3, 'Ana', 99.99, NULL, NULL, NULL); \
         INSERT INTO itens VALUES (1, 1, 'x'), (1, 2, 'y'); \
         CREATE PUBLICATION w2d_pub FOR TABLE pedidos, itens;",
        &["public.pedidos", "public.itens"],
    )
    .await;
    crate::sql::wait_same(&env, "pedidos served", "SELECT count(*) FROM pedidos").await;
    crate::sql::wait_same(&env, "itens served", "SELECT count(*) FROM itens").await;

    let program = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/jdbc/JdbcCheck.java");
    let url = format!(
        "jdbc:postgresql://127.0.0.1:{}/wal2delta?sslmode=disable&connectTimeout=10",
        env.serve_port
    );
    let out = Command::new("java")
        .arg("-cp")
        .arg(&jar)
        .arg(program)
        .arg(&url)
        .output()
        .expect("run java");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("done"),
        "JdbcCheck failed:\n{text}\n{err}\ndaemon log:\n{}",
        env.daemon_log()
    );
    eprintln!("jdbc figures:\n{text}");
    let line = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
            .to_string()
    };
    let schemas = line("schemas");
    for schema in ["public", "raw", "refined", "pg_catalog"] {
        assert!(
            schemas.split(',').any(|s| s == schema),
            "schemas: {schemas}"
        );
    }
    let tables = line("tables");
    for table in [
        "public.pedidos:TABLE",
        "public.itens:TABLE",
        "raw.pedidos:TABLE",
        "raw.itens:TABLE",
    ] {
        assert!(
            tables.split(',').any(|t| t == table),
            "{table} in tables: {tables}"
        );
    }
    // java.sql.Types: BIGINT -5, VARCHAR 12, NUMERIC 2, TIMESTAMP 93, DATE 91, BIT -7. The
    // curated table's metadata columns follow the source's; the source's NOT NULL is not
    // carried into the lake (README › Limitations).
    assert_eq!(
        line("columns"),
        "1 id int8 -5 nullable,2 cliente text 12 nullable,3 valor numeric 2 nullable,\
         4 criado_em timestamptz 93 nullable,5 dia date 91 nullable,6 pago bool -7 nullable,\
         7 _commit_lsn int8 -5 not-null,8 _commit_ts timestamptz 93 not-null,\
         9 _fallback text 12 nullable"
    );
    assert_eq!(line("primary key"), "id#1");
    assert_eq!(
        line("composite key"),
        "public.pedido_id#1:itens_pkey,public.linha#2:itens_pkey"
    );
    assert_eq!(
        line("result types"),
        "id:int8:java.lang.Long,cliente:text:java.lang.String,valor:numeric:java.math.BigDecimal,\
         criado_em:timestamptz:java.sql.Timestamp,dia:date:java.sql.Date,pago:bool:java.lang.Boolean"
    );
    for round in 0..3 {
        assert_eq!(
            line(&format!("row {round}")),
            "2|Bruno|0.75|2026-02-03T04:05:06.500Z|2026-02-03|false"
        );
    }
    assert_eq!(line("count for Ana"), "2");
    let cancel = line("cancel");
    assert!(cancel.starts_with("57014 after "), "cancel: {cancel}");
    let ms: u64 = cancel
        .trim_start_matches("57014 after ")
        .trim_end_matches(" ms")
        .parse()
        .unwrap();
    assert!(ms < 5_000, "the cancel took {ms} ms");
    assert_eq!(line("after cancel"), "1");
    assert_eq!(line("write"), "25006");
}
