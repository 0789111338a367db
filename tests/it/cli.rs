//! The command line: configuration errors, an unreachable source and an unprepared source
//! give clear messages and a non-zero exit; passwords never show.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Env, binary};

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run wal2delta");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn bad_config_names_the_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[source]\ndsn = \"host=127.0.0.1\"\nslot = \"s\"\npublication = \"p\"\ntables = [\"a\"]\nsurprise_key = 1\n[lake]\npath = \"/tmp/x\"\n",
    )
    .unwrap();
    for cmd in ["validate", "run"] {
        let (ok, out) = run(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert!(!ok, "{cmd} accepted a bad config");
        assert!(
            out.contains("surprise_key"),
            "{cmd} output does not name the key: {out}"
        );
    }
    std::fs::write(
        &cfg,
        "[source]\ndsn = \"host=127.0.0.1\"\nslot = \"Bad-Slot\"\npublication = \"p\"\ntables = []\n[lake]\npath = \"/tmp/x\"\n",
    )
    .unwrap();
    let (ok, out) = run(&["validate", "--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("source.slot") && out.contains("source.tables"),
        "{out}"
    );
    // A refined-views directory set but missing is a mistake (the default may be absent).
    std::fs::write(
        &cfg,
        "[source]\ndsn = \"host=127.0.0.1\"\nslot = \"s\"\npublication = \"p\"\ntables = [\"a\"]\n[lake]\npath = \"/tmp/x\"\n[serve]\nrefined_dir = \"views\"\n",
    )
    .unwrap();
    for cmd in ["validate", "run", "serve"] {
        let (ok, out) = run(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert!(!ok, "{cmd} accepted a missing refined_dir");
        assert!(
            out.contains("serve.refined_dir")
                && out.contains(&format!("{}", dir.path().join("views").display())),
            "{cmd}: {out}"
        );
    }
    let (ok, out) = run(&[
        "validate",
        "--config",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(out.contains("missing.toml"), "{out}");
}

#[test]
fn unreachable_source_fails_clearly_without_leaking_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\ndsn = \"postgresql://rep:hunter2secret@127.0.0.1:{port}/app?connect_timeout=3\"\nslot = \"s\"\npublication = \"p\"\ntables = [\"a\"]\n[lake]\npath = {:?}\n[serve]\nlisten = \"off\"\n",
            dir.path().join("lake").to_str().unwrap()
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    for cmd in ["run", "validate"] {
        let (ok, out) = run(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert!(!ok, "{cmd} succeeded against nothing");
        assert!(out.contains("cannot connect"), "{cmd}: {out}");
        assert!(
            !out.contains("hunter2secret"),
            "{cmd} leaked the password: {out}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_lists_what_to_fix_on_an_unprepared_source() {
    let env = Env::new(
        r#"
        CREATE TABLE no_key (a int, b text);
        CREATE TABLE nothing_ident (id int PRIMARY KEY);
        ALTER TABLE nothing_ident REPLICA IDENTITY NOTHING;
        CREATE TABLE ok_table (id int PRIMARY KEY);
        CREATE ROLE plain LOGIN;
        GRANT SELECT ON no_key, nothing_ident TO plain;
        CREATE PUBLICATION w2d_pub FOR TABLE no_key;
        "#,
    )
    .await;
    // Slot creation must not share a transaction with writes.
    env.pg
        .client()
        .await
        .batch_execute("SELECT pg_create_logical_replication_slot('w2d_test', 'test_decoding')")
        .await
        .unwrap();
    env.write_config(
        "plain",
        &[
            "public.no_key",
            "public.nothing_ident",
            "public.ok_table",
            "public.missing",
        ],
        "create_publication = false",
    );
    let (ok, out) = run(&["validate", "--config", env.config.to_str().unwrap()]);
    assert!(!ok, "validate passed an unprepared source:\n{out}");
    for expected in [
        "ALTER ROLE \"plain\" REPLICATION",
        "ALTER TABLE \"public\".\"no_key\" REPLICA IDENTITY FULL",
        "ALTER TABLE \"public\".\"nothing_ident\" REPLICA IDENTITY FULL",
        "GRANT SELECT ON \"public\".\"ok_table\" TO \"plain\"",
        "table public.missing does not exist",
        "ALTER PUBLICATION \"w2d_pub\" ADD TABLE \"public\".\"ok_table\"",
        "uses plugin \"test_decoding\", not pgoutput",
        ": supported (wal2delta is tested on PostgreSQL 14 to 18)",
    ] {
        assert!(
            out.contains(expected),
            "validate output lacks `{expected}`:\n{out}"
        );
    }
    // The version matrix (tests/matrix.sh) runs this against each major.
    if let Ok(major) = std::env::var("W2D_PG_VERSION") {
        assert!(out.contains(&format!("PostgreSQL {major}.")), "{out}");
    }
    // run refuses with the same list and changes nothing.
    let (ok, out) = run(&["run", "--config", env.config.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("not ready for replication"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_lake_is_refused() {
    let setup =
        "CREATE TABLE solo (id int PRIMARY KEY); CREATE PUBLICATION w2d_pub FOR TABLE solo;";
    let (env, mut first) = Env::streaming(setup, &["public.solo"]).await;
    let (ok, out) = run(&["run", "--config", env.config.to_str().unwrap()]);
    assert!(!ok, "a second daemon started on the same lake:\n{out}");
    assert!(
        out.contains("another wal2delta daemon is running on this lake (pid "),
        "{out}"
    );
    assert!(first.is_running());
    // SIGKILL releases the lock: a new daemon starts right away.
    first.kill9();
    let mut second = env.daemon();
    env.wait_streaming().await;
    assert!(second.terminate(Duration::from_secs(30)).success());
}

/// Creates table `t` and its publication on `pg`; returns the config path in `dir`.
async fn one_table_source(
    pg: &crate::harness::PgCluster,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    pg.client()
        .await
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION w2d_pub FOR TABLE t;",
        )
        .await
        .unwrap();
    dir.join("c.toml")
}

/// Writes `dir/c.toml` for table `t` on `pg`, with `source_extra` in `[source]`.
fn write_one_table_config(
    pg: &crate::harness::PgCluster,
    dir: &std::path::Path,
    source_extra: &str,
) {
    std::fs::write(
        dir.join("c.toml"),
        format!(
            "[source]\ndsn = {:?}\nslot = \"s\"\npublication = \"w2d_pub\"\ntables = [\"t\"]\n\
             {source_extra}[lake]\npath = {:?}\n",
            pg.dsn("postgres"),
            dir.join("lake").to_str().unwrap()
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_refuses_a_source_without_logical_wal() {
    let pg = crate::harness::PgCluster::start_with(&[("PG_WAL_LEVEL", "replica")]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = one_table_source(&pg, dir.path()).await;
    write_one_table_config(&pg, dir.path(), "");
    let (ok, out) = run(&["validate", "--config", cfg.to_str().unwrap()]);
    assert!(!ok, "validate accepted wal_level = replica:\n{out}");
    assert!(
        out.contains("wal_level is `replica`")
            && out.contains("ALTER SYSTEM SET wal_level = logical"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_warns_when_snapshot_workers_exceed_the_free_connections() {
    let pg = crate::harness::PgCluster::start_with(&[("PG_MAX_CONNECTIONS", "12")]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = one_table_source(&pg, dir.path()).await;
    let write = |workers: u32| {
        write_one_table_config(&pg, dir.path(), &format!("snapshot_workers = {workers}\n"))
    };
    write(16);
    let (ok, out) = run(&["validate", "--config", cfg.to_str().unwrap()]);
    // A warning, not a problem: the source is ready, the copy would run short.
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: source.snapshot_workers = 16")
            && out.contains("lower snapshot_workers to"),
        "{out}"
    );
    write(2);
    let (ok, out) = run(&["validate", "--config", cfg.to_str().unwrap()]);
    assert!(ok && !out.contains("warning:"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_slot_the_daemon_and_every_tables_position() {
    let setup = "CREATE TABLE ledger (id int PRIMARY KEY, v text);
                 INSERT INTO ledger SELECT g, 'v' FROM generate_series(1, 5) g;
                 CREATE PUBLICATION w2d_pub FOR TABLE ledger;";
    let (env, mut daemon) = Env::streaming(setup, &["public.ledger"]).await;
    env.pg
        .client()
        .await
        .batch_execute("INSERT INTO ledger VALUES (6, 'w'); DELETE FROM ledger WHERE id = 1;")
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let config = env.config.to_str().unwrap();
    let status_json = || {
        let out = Command::new(binary())
            .args(["status", "--config", config, "--json"])
            .output()
            .expect("run status");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON")
    };
    let s = status_json();
    assert_eq!(s["daemon_running"], true, "{s}");
    assert_eq!(s["slot"]["exists"], true, "{s}");
    assert_eq!(s["slot"]["active"], true, "{s}");
    assert_eq!(s["slot"]["plugin"], "pgoutput", "{s}");
    assert!(s["slot"]["retained_wal_bytes"].as_i64().is_some(), "{s}");
    let t = &s["tables"][0];
    assert_eq!(t["table"], "public.ledger", "{s}");
    // 5 snapshot reads + an insert + a delete in raw; 5 current rows in curated.
    assert_eq!(t["raw"]["rows"], 7, "{s}");
    assert_eq!(t["curated"]["rows"], 5, "{s}");
    assert!(t["snapshot_lsn"].is_string(), "{s}");
    assert!(t["curated"]["position_lsn"].is_string(), "{s}");
    let (ok, text) = run(&["status", "--config", config]);
    println!("{text}");
    assert!(
        ok && text.contains("daemon: running") && text.contains("public.ledger"),
        "{text}"
    );
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    let s = status_json();
    assert_eq!(s["daemon_running"], false, "{s}");
    assert_eq!(s["slot"]["active"], false, "{s}");
}

/// `source.failover = true`: on PostgreSQL 17+ the daemon creates a failover slot and
/// validate says what a safe failover also needs; before 17 validate refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_on_17_and_a_clear_refusal_before() {
    let env = Env::new("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);").await;
    let major = env.pg.major().await;
    env.write_config("postgres", &["public.t"], "failover = true");
    let config = env.config.to_str().unwrap();
    let (ok, out) = run(&["validate", "--config", config]);
    if major < 17 {
        assert!(!ok, "{out}");
        assert!(
            out.contains("source.failover = true needs PostgreSQL 17 or newer"),
            "{out}"
        );
        return;
    }
    assert!(ok, "{out}");
    assert!(
        out.contains("as a failover slot") && out.contains("synchronized_standby_slots is empty"),
        "{out}"
    );
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let failover: bool = env
        .pg
        .client()
        .await
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failover, "the slot was created without FAILOVER");
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    let (ok, out) = run(&["validate", "--config", config]);
    assert!(ok && out.contains("is a failover slot"), "{out}");
}
