//! `wal2delta init` on a fresh database: the printed SQL, `--apply`, a second run that
//! finds nothing to do, and `validate` and `run` with the configuration it wrote — on a
//! partitioned table, a table without a primary key and a mixed-case schema.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Env, binary, count_delta, wal2delta};

fn init(env: &Env, extra: &[&str]) -> (i32, String, String) {
    let dsn = env.pg.dsn("postgres");
    let lake = env.lake.to_str().unwrap();
    let mut args = vec![
        "init",
        "--dsn",
        &dsn,
        "--schema",
        "public",
        "--table",
        "\"Vendas\".\"Itens\"",
        "--config",
        env.config.to_str().unwrap(),
        "--lake",
        lake,
        "--role",
        "w2d_init",
        "--slot",
        &env.slot,
        "--publication",
        "w2d_init_pub",
    ];
    args.extend(extra);
    let out = Command::new(binary())
        .args(&args)
        .output()
        .expect("run wal2delta init");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_prepares_a_fresh_database_and_validate_then_passes() {
    let env = Env::new(
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric); \
         CREATE TABLE events (at timestamptz, what text); \
         CREATE TABLE measures (id int, at date, v float8, PRIMARY KEY (id, at)) PARTITION BY RANGE (at); \
         CREATE TABLE measures_2025 PARTITION OF measures FOR VALUES FROM ('2025-01-01') TO ('2026-01-01'); \
         CREATE TABLE measures_2026 PARTITION OF measures FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); \
         CREATE SCHEMA \"Vendas\"; \
         CREATE TABLE \"Vendas\".\"Itens\" (\"Código\" int PRIMARY KEY, nome text); \
         INSERT INTO orders VALUES (1, 10.5); INSERT INTO \"Vendas\".\"Itens\" VALUES (1, 'um');",
    )
    .await;

    // Without --apply: the SQL is printed, the files are written, nothing is changed.
    let (code, sql, err) = init(&env, &[]);
    assert_eq!(code, 0, "{sql}{err}");
    for expected in [
        "CREATE ROLE \"w2d_init\" LOGIN REPLICATION PASSWORD 'SCRAM-SHA-256$4096:",
        "GRANT USAGE ON SCHEMA \"public\" TO \"w2d_init\";",
        "GRANT USAGE ON SCHEMA \"Vendas\" TO \"w2d_init\";",
        "GRANT SELECT ON \"Vendas\".\"Itens\" TO \"w2d_init\";",
        "GRANT SELECT ON \"public\".\"measures\" TO \"w2d_init\";",
        "ALTER TABLE \"public\".\"events\" REPLICA IDENTITY FULL;",
        "CREATE PUBLICATION \"w2d_init_pub\" FOR TABLE \"Vendas\".\"Itens\", \"public\".\"events\", \
         \"public\".\"measures\", \"public\".\"orders\" WITH (publish_via_partition_root = true);",
    ] {
        assert!(sql.contains(expected), "missing {expected:?} in:\n{sql}");
    }
    assert!(
        !sql.contains("measures_2025"),
        "a partition was listed:\n{sql}"
    );
    for keyed in ["orders", "measures", "Itens"] {
        assert!(
            !sql.contains(&format!("\"{keyed}\" REPLICA IDENTITY")),
            "{keyed} has a primary key:\n{sql}"
        );
    }
    let password_file = env.config.with_extension("password");
    let password = std::fs::read_to_string(&password_file).expect("the password file");
    let password = password.trim_end();
    assert_eq!(password.len(), 32);
    assert!(!sql.contains(password), "the password itself was printed");
    assert!(!err.contains(password), "the password itself was printed");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&password_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "password file mode {mode:o}");
    let client = env.pg.client().await;
    let roles = client
        .query("SELECT 1 FROM pg_roles WHERE rolname = 'w2d_init'", &[])
        .await
        .unwrap();
    assert!(roles.is_empty(), "init without --apply created the role");

    // The config exists now: init does not replace it without --force.
    let (code, _, err) = init(&env, &["--apply"]);
    assert_ne!(code, 0);
    assert!(err.contains("--force"), "{err}");

    let (code, out, err) = init(&env, &["--apply", "--force"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("applied 9 statement(s)"), "{err}");
    // The password file is kept: the role got the password it holds. Make the server ask
    // for it (the test clusters trust loopback users outside w2d_scram).
    assert_eq!(
        std::fs::read_to_string(&password_file).unwrap().trim_end(),
        password
    );
    client
        .batch_execute("GRANT w2d_scram TO w2d_init")
        .await
        .unwrap();

    // A second run finds nothing to do.
    let (code, sql, err) = init(&env, &["--force"]);
    assert_eq!(code, 0, "{sql}{err}");
    assert!(sql.contains("Nothing to do"), "{sql}");

    let (code, out) = wal2delta(&env, &["validate"]);
    assert_eq!(code, 0, "validate after init --apply:\n{out}");
    assert!(out.contains("ready for replication"), "{out}");

    // And the daemon replicates with it, as the role init made.
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    client
        .batch_execute(
            "INSERT INTO measures VALUES (1, '2025-03-01', 1.5), (2, '2026-03-01', 2.5); \
             INSERT INTO events VALUES (now(), 'x'); UPDATE events SET what = 'y'; \
             INSERT INTO \"Vendas\".\"Itens\" VALUES (2, 'dois');",
        )
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_eq!(count_delta(&env.raw_path("public", "measures")).await, 2);
    assert_eq!(count_delta(&env.raw_path("public", "events")).await, 2);
    assert_eq!(count_delta(&env.raw_path("Vendas", "Itens")).await, 2);
    assert_eq!(count_delta(&env.raw_path("public", "orders")).await, 1);
    let walsender: String = client
        .query_one(
            "SELECT usename::text FROM pg_stat_replication r \
             JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        walsender, "w2d_init",
        "the daemon replicates as init's role"
    );
    daemon.terminate(Duration::from_secs(30));
}

#[test]
fn init_names_a_missing_table_and_what_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let pg = crate::harness::PgCluster::start();
    let out = Command::new(binary())
        .args([
            "init",
            "--dsn",
            &pg.dsn("postgres"),
            "--table",
            "Orders",
            "--config",
            dir.path().join("w.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("there is no table public.orders") && err.contains("quoted"),
        "{err}"
    );
    assert!(!dir.path().join("w.toml").exists());
}

/// An existing publication: a partitioned table published through its partitions and a
/// missing table are put right, and `--apply` runs what was printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_completes_an_existing_publication() {
    let env = Env::new(
        "CREATE TABLE m (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at); \
         CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01'); \
         CREATE TABLE o (id int PRIMARY KEY); \
         CREATE PUBLICATION w2d_init_pub FOR TABLE m;",
    )
    .await;
    let dsn = env.pg.dsn("postgres");
    let args = |apply: bool| {
        let mut a = vec![
            "init".to_string(),
            "--dsn".into(),
            dsn.clone(),
            "--table".into(),
            "m".into(),
            "--table".into(),
            "o".into(),
            "--config".into(),
            env.config.to_str().unwrap().into(),
            "--publication".into(),
            "w2d_init_pub".into(),
            "--force".into(),
        ];
        if apply {
            a.push("--apply".into());
        }
        a
    };
    let out = Command::new(binary()).args(args(false)).output().unwrap();
    let sql = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{sql}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        sql.contains("ALTER PUBLICATION \"w2d_init_pub\" SET (publish_via_partition_root = true);")
            && sql.contains("ALTER PUBLICATION \"w2d_init_pub\" ADD TABLE \"public\".\"o\";")
            && !sql.contains("ADD TABLE \"public\".\"m\""),
        "{sql}"
    );
    let out = Command::new(binary()).args(args(true)).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let published = env
        .pg
        .client()
        .await
        .query(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'w2d_init_pub' ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<String> = published.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, ["m", "o"]);
}
