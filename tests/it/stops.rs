//! Definite failures while running: the publication or the slot dropped under the daemon,
//! or a configured table dropped from the publication. It stops with a non-zero exit and
//! a message that names the problem and the way out, instead of retrying forever or
//! losing changes silently.

use std::time::Duration;

use crate::harness::{Env, wal2delta};

const SETUP: &str = r#"
CREATE TABLE t1 (id int PRIMARY KEY, v text);
CREATE PUBLICATION w2d_pub FOR TABLE t1;
"#;

async fn streaming_env() -> (Env, crate::harness::Daemon) {
    let (env, daemon) = Env::streaming(SETUP, &["public.t1"]).await;
    env.pg
        .client()
        .await
        .batch_execute("INSERT INTO t1 VALUES (1, 'before')")
        .await
        .unwrap();
    env.wait_raw_rows("public", "t1", 1, Duration::from_secs(60))
        .await;
    (env, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_publication_stops_with_what_to_do() {
    let (env, mut daemon) = streaming_env().await;
    let pg = env.pg.client().await;
    pg.batch_execute("DROP PUBLICATION w2d_pub").await.unwrap();
    pg.batch_execute("INSERT INTO t1 VALUES (2, 'after')")
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "the daemon must stop on a dropped publication"
    );
    let log = env.daemon_log();
    assert!(log.contains("publication w2d_pub is gone"), "{log}");
    assert!(log.contains("recreate the publication"), "{log}");
    assert!(
        log.contains("pg_drop_replication_slot('w2d_test')"),
        "{log}"
    );
}

/// `ALTER PUBLICATION … DROP TABLE` on a configured table: its later changes are not in
/// the stream. The publication guard stops the daemon, naming the table and the fix,
/// rather than confirming positions that silently miss them; the fix named works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_dropped_from_the_publication_stops_with_what_to_do() {
    let setup = "CREATE TABLE t1 (id int PRIMARY KEY, v text);
                 CREATE TABLE t2 (id int PRIMARY KEY, v text);
                 CREATE PUBLICATION w2d_pub FOR TABLE t1, t2;";
    let (env, mut daemon) = Env::streaming(setup, &["public.t1", "public.t2"]).await;
    let pg = env.pg.client().await;
    pg.batch_execute("INSERT INTO t1 VALUES (1, 'a'); INSERT INTO t2 VALUES (1, 'a')")
        .await
        .unwrap();
    env.wait_raw_rows("public", "t2", 1, Duration::from_secs(60))
        .await;
    pg.batch_execute("ALTER PUBLICATION w2d_pub DROP TABLE t2")
        .await
        .unwrap();
    pg.batch_execute("INSERT INTO t2 VALUES (2, 'not in the stream')")
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "the daemon must stop when a configured table leaves the publication"
    );
    let log = env.daemon_log();
    assert!(
        log.contains("table public.t2 can no longer be followed exactly"),
        "{log}"
    );
    assert!(
        log.contains("publication w2d_pub no longer includes it"),
        "{log}"
    );
    assert!(log.contains("--resnapshot --table public.t2"), "{log}");

    // The way out the message names: publish it again, copy it again, start.
    pg.batch_execute("ALTER PUBLICATION w2d_pub ADD TABLE t2")
        .await
        .unwrap();
    let (code, text) = wal2delta(
        &env,
        &[
            "reset-checkpoint",
            "--resnapshot",
            "--table",
            "public.t2",
            "--yes",
        ],
    );
    assert_eq!(code, 0, "{text}");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    crate::curated::assert_mirror(&env, "public.t2").await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_slot_stops_with_what_to_do() {
    let (env, mut daemon) = streaming_env().await;
    let pg = env.pg.client().await;
    // The daemon reconnects quickly: terminate its walsender and drop the slot in one go,
    // retrying until the slot is free at the moment of the drop.
    pg.batch_execute(
        "DO $$ BEGIN
           FOR i IN 1..200 LOOP
             PERFORM pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'w2d_test' AND active;
             PERFORM pg_sleep(0.01);
             BEGIN
               PERFORM pg_drop_replication_slot('w2d_test');
               RETURN;
             EXCEPTION WHEN object_in_use THEN NULL;
             END;
           END LOOP;
           RAISE EXCEPTION 'could not drop the slot';
         END $$",
    )
    .await
    .unwrap();
    let status = daemon.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "the daemon must stop when its slot is dropped"
    );
    let log = env.daemon_log();
    assert!(log.contains("replication slot w2d_test is gone"), "{log}");
    assert!(
        log.contains("reset-checkpoint --config") && log.contains("--recreate-slot --yes"),
        "{log}"
    );
}

/// The slot invalidated by `max_slot_wal_keep_size` while the daemon was stopped: the start
/// fails naming the recovery command, and that command then brings the lake back to an
/// exact mirror of the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_slot_names_the_recovery_and_the_recovery_works() {
    let env = crate::harness::Env::new(
        "CREATE TABLE kept (id int PRIMARY KEY, v text NOT NULL);
         CREATE TABLE noise (id bigint, payload text);
         INSERT INTO kept SELECT g, 'before' FROM generate_series(1, 100) g;
         CREATE PUBLICATION w2d_pub FOR TABLE kept;",
    )
    .await;
    env.write_config("postgres", &["public.kept"], "");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let pg = env.pg.client().await;
    pg.batch_execute("UPDATE kept SET v = 'streamed' WHERE id <= 10")
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());

    // While it is stopped: the slot falls behind max_slot_wal_keep_size and is invalidated.
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
        "UPDATE kept SET v = 'while stopped' WHERE id > 90",
    ] {
        pg.batch_execute(sql).await.unwrap();
    }
    for _ in 0..6 {
        for sql in [
            "INSERT INTO noise SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 20000) g",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ] {
            pg.batch_execute(sql).await.unwrap();
        }
        let status = wal_status(&pg, &env.slot).await;
        if status.as_deref() == Some("lost") {
            break;
        }
    }
    let status = wal_status(&pg, &env.slot).await;
    assert_eq!(
        status.as_deref(),
        Some("lost"),
        "the test could not invalidate the slot"
    );

    let mut daemon = env.daemon();
    let exit = daemon.wait(Duration::from_secs(60));
    assert!(
        !exit.success(),
        "the daemon must not run on an invalidated slot"
    );
    let log = env.daemon_log();
    assert!(
        log.contains("reset-checkpoint --config") && log.contains("--recreate-slot --yes"),
        "the error must name the recovery command:\n{log}"
    );

    // The recovery the message names.
    let out = std::process::Command::new(crate::harness::binary())
        .args([
            "reset-checkpoint",
            "--config",
            env.config.to_str().unwrap(),
            "--recreate-slot",
            "--yes",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reset-checkpoint --recreate-slot: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for sql in [
        "ALTER SYSTEM RESET max_slot_wal_keep_size",
        "SELECT pg_reload_conf()",
    ] {
        pg.batch_execute(sql).await.unwrap();
    }
    let _daemon = env.daemon();
    env.wait_streaming().await;
    pg.batch_execute("UPDATE kept SET v = 'after recovery' WHERE id = 50")
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(90)).await;
    crate::curated::assert_mirror(&env, "public.kept").await;
    println!(
        "figure: invalidated slot: faults injected 1, rows compared 100, rows lost 0, rows duplicated 0"
    );
}

/// The slot's `wal_status` (`reserved`, `extended`, `unreserved` or `lost`).
async fn wal_status(pg: &tokio_postgres::Client, slot: &str) -> Option<String> {
    pg.query_one(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_changed_to_other_columns_stops_with_what_to_do() {
    let setup = "CREATE TABLE contas (id int PRIMARY KEY, codigo text NOT NULL, v text);
                 CREATE UNIQUE INDEX contas_codigo ON contas (codigo);
                 INSERT INTO contas VALUES (1, 'a', 'x'), (2, 'b', 'y');";
    let (env, mut daemon) = Env::streaming(setup, &["public.contas"]).await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    let pg = env.pg.client().await;
    // Updates and deletes would now name rows by `codigo`, which the lake is not keyed by.
    pg.batch_execute(
        "ALTER TABLE contas REPLICA IDENTITY USING INDEX contas_codigo;
         DELETE FROM contas WHERE id = 1;",
    )
    .await
    .unwrap();
    crate::harness::wait_for(
        "the daemon to report the changed replica identity",
        Duration::from_secs(60),
        || async {
            env.daemon_log()
                .contains("replica identity of public.contas changed")
        },
        || env.daemon_log(),
    )
    .await;
    let status = daemon.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "the daemon must stop when the key changes"
    );
    let log = env.daemon_log();
    assert!(
        log.contains("the replica identity of public.contas changed from (id) to (codigo)"),
        "{log}"
    );
    assert!(log.contains("REPLICA IDENTITY"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_table_stops_with_what_to_do() {
    let setup = "CREATE TABLE t1 (id int PRIMARY KEY, v text); INSERT INTO t1 VALUES (1, 'a');";
    let (env, mut daemon) = Env::streaming(setup, &["public.t1"]).await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    let pg = env.pg.client().await;
    // The stream would carry the table's changes under a name the daemon does not follow.
    pg.batch_execute("ALTER TABLE t1 RENAME TO t1_old; INSERT INTO t1_old VALUES (2, 'b');")
        .await
        .unwrap();
    crate::harness::wait_for(
        "the daemon to report the renamed table",
        Duration::from_secs(60),
        || async {
            env.daemon_log()
                .contains("table public.t1 can no longer be followed exactly")
        },
        || env.daemon_log(),
    )
    .await;
    let status = daemon.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "the daemon must stop when a table is renamed"
    );
}

/// Daemons on one host replicating slots of the same name, each into its own lake, all
/// streaming the same transaction id at the same moment: each keeps its streamed
/// transactions apart, with the default spill directory (named after the lake as well
/// as the slot) and with one directory configured for two of them (each daemon writes
/// a subdirectory of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_on_one_host_never_share_streamed_transactions() {
    let setup = "CREATE TABLE t1 (id int PRIMARY KEY, v text); \
                 CREATE PUBLICATION w2d_pub FOR TABLE t1;";
    let envs = [
        Env::new(setup).await,
        Env::new(setup).await,
        Env::new(setup).await,
    ];
    let shared = envs[0].dir.path().join("spill");
    for (i, env) in envs.iter().enumerate() {
        let pg = env.pg.client().await;
        pg.batch_execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'")
            .await
            .unwrap();
        pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        let extra = match i {
            1 => String::new(),
            _ => format!("spill_dir = {shared:?}"),
        };
        env.write_config("postgres", &["public.t1"], &extra);
    }
    let _daemons: Vec<_> = envs.iter().map(|e| e.daemon()).collect();
    for env in &envs {
        env.wait_streaming().await;
    }
    let clients = [
        envs[0].pg.client().await,
        envs[1].pg.client().await,
        envs[2].pg.client().await,
    ];
    let inserts: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|tag| {
            format!("INSERT INTO t1 SELECT g, '{tag}' || g FROM generate_series(1, 20000) g")
        })
        .collect();
    let (ra, rb, rc) = tokio::join!(
        clients[0].batch_execute(&inserts[0]),
        clients[1].batch_execute(&inserts[1]),
        clients[2].batch_execute(&inserts[2])
    );
    ra.unwrap();
    rb.unwrap();
    rc.unwrap();
    for (env, tag) in envs.iter().zip(["a", "b", "c"]) {
        env.wait_raw_rows("public", "t1", 20000, Duration::from_secs(120))
            .await;
        let rows = crate::harness::query_delta(
            &env.raw_path("public", "t1"),
            &format!("SELECT count(*) FROM t WHERE v LIKE '{tag}%'"),
        )
        .await;
        assert_eq!(rows[0][0].as_deref(), Some("20000"), "lake {tag}");
        assert_eq!(
            crate::harness::count_delta(&env.raw_path("public", "t1")).await,
            20000,
            "lake {tag} holds only its own source's rows"
        );
        assert!(
            env.daemon_log()
                .contains("the server streams a running transaction"),
            "the transaction was not streamed (protocol 2) in lake {tag}"
        );
    }
    // Two daemons, two subdirectories of the configured directory.
    let own: Vec<_> = std::fs::read_dir(&shared)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(own.len(), 2, "{own:?}");
}
