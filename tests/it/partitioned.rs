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
