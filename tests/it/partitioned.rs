//! Partitioned source tables land as one lake table: the daemon publishes them through
//! their root (`publish_via_partition_root`), so changes to any partition arrive under
//! the configured table's name, and `validate` names the fix for a publication that
//! publishes them through their partitions.

use std::time::Duration;

use crate::curated::assert_mirror;
use crate::harness::{Env, wal2delta};

const SETUP: &str = "
CREATE TABLE pagamentos (id int, mes date, valor numeric(12,2), nota text,
                         PRIMARY KEY (id, mes)) PARTITION BY RANGE (mes);
CREATE TABLE pagamentos_2026_01 PARTITION OF pagamentos
    FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE pagamentos_2026_02 PARTITION OF pagamentos
    FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
INSERT INTO pagamentos SELECT g, DATE '2026-01-01' + (g % 59), g * 1.5, 'n' || g
    FROM generate_series(1, 500) g;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_is_snapshotted_and_streamed_as_one_table() {
    // No publication yet: the daemon creates it (through the root).
    let (env, mut daemon) = Env::streaming(SETUP, &["public.pagamentos"]).await;
    let pg = env.pg.client().await;
    pg.batch_execute(
        "INSERT INTO pagamentos SELECT g, DATE '2026-02-10', g, 'novo' FROM generate_series(501, 600) g;
         UPDATE pagamentos SET nota = 'alterada' WHERE id % 7 = 0;
         -- moves rows between partitions (a DELETE and an INSERT underneath)
         UPDATE pagamentos SET mes = DATE '2026-02-20' WHERE id BETWEEN 1 AND 20 AND mes < '2026-02-01';
         DELETE FROM pagamentos WHERE id % 11 = 0;",
    )
    .await
    .unwrap();
    env.wait_caught_up(Duration::from_secs(90)).await;
    assert_mirror(&env, "public.pagamentos").await;
    // The partitions are not lake tables of their own.
    assert!(!env.lake.join("raw/public/pagamentos_2026_01").exists());
    // Still following after a restart.
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    pg.batch_execute("DELETE FROM pagamentos WHERE mes >= '2026-02-01' AND id % 3 = 0")
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(90)).await;
    assert_mirror(&env, "public.pagamentos").await;
    assert!(daemon.is_running(), "{}", env.daemon_log());
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_names_the_fix_for_a_publication_through_partitions() {
    let env = Env::new(&format!(
        "{SETUP}\nCREATE PUBLICATION w2d_pub FOR TABLE pagamentos;"
    ))
    .await;
    env.write_config("postgres", &["public.pagamentos"], "");
    let (code, text) = wal2delta(&env, &["validate"]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("table public.pagamentos is partitioned")
            && text.contains("publish_via_partition_root = true"),
        "{text}"
    );
}

/// Waits until the daemon's log shows `n` completed resyncs.
async fn wait_resyncs(env: &Env, n: usize) {
    crate::harness::wait_for(
        &format!("{n} completed resyncs"),
        Duration::from_secs(90),
        || async { env.daemon_log().matches("resync complete").count() >= n },
        || env.daemon_log(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_created_attached_detached_or_truncated_leave_curated_equal_to_the_source() {
    let (env, mut daemon) = Env::streaming(SETUP, &["public.pagamentos"]).await;
    let pg = env.pg.client().await;
    // A new (empty) partition: its rows arrive through the root like any other, and it
    // needs no copy.
    pg.batch_execute(
        "CREATE TABLE pagamentos_2026_03 PARTITION OF pagamentos
             FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // the guard looks every second
    pg.batch_execute(
        "INSERT INTO pagamentos SELECT g, DATE '2026-03-05', g, 'março' FROM generate_series(1, 50) g;",
    )
    .await
    .unwrap();
    env.wait_caught_up(Duration::from_secs(90)).await;
    assert_mirror(&env, "public.pagamentos").await;
    assert!(
        !env.daemon_log().contains("resync complete"),
        "{}",
        env.daemon_log()
    );

    // ATTACH brings rows that never pass through the stream: the guard copies the table.
    pg.batch_execute(
        "CREATE TABLE pagamentos_2026_04 (LIKE pagamentos INCLUDING ALL);
         INSERT INTO pagamentos_2026_04 SELECT g, DATE '2026-04-10', g, 'abril' FROM generate_series(1, 70) g;
         ALTER TABLE pagamentos ATTACH PARTITION pagamentos_2026_04
             FOR VALUES FROM ('2026-04-01') TO ('2026-05-01');",
    )
    .await
    .unwrap();
    wait_resyncs(&env, 1).await;
    env.wait_caught_up(Duration::from_secs(90)).await;
    assert_mirror(&env, "public.pagamentos").await;

    // DETACH removes rows without a DELETE in the stream.
    pg.batch_execute("ALTER TABLE pagamentos DETACH PARTITION pagamentos_2026_01")
        .await
        .unwrap();
    wait_resyncs(&env, 2).await;
    env.wait_caught_up(Duration::from_secs(90)).await;
    assert_mirror(&env, "public.pagamentos").await;

    // TRUNCATE of one partition is not published through the root at all.
    pg.batch_execute("TRUNCATE pagamentos_2026_02")
        .await
        .unwrap();
    wait_resyncs(&env, 3).await;
    env.wait_caught_up(Duration::from_secs(90)).await;
    assert_mirror(&env, "public.pagamentos").await;
    let log = env.daemon_log();
    for what in [
        "attached: public.pagamentos_2026_04",
        "detached: public.pagamentos_2026_01",
        "truncated (or rewritten): public.pagamentos_2026_02",
    ] {
        assert!(log.contains(what), "{what} not logged:\n{log}");
    }

    // A change made while the daemon is stopped is found at the next start.
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    pg.batch_execute(
        "ALTER TABLE pagamentos ATTACH PARTITION pagamentos_2026_01
                          FOR VALUES FROM ('2026-01-01') TO ('2026-02-01')",
    )
    .await
    .unwrap();
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    wait_resyncs(&env, 4).await;
    env.wait_caught_up(Duration::from_secs(90)).await;
    assert_mirror(&env, "public.pagamentos").await;
    assert!(daemon.is_running(), "{}", env.daemon_log());
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}
