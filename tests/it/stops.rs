//! Definite failures while running: the publication or the slot dropped under the daemon.
//! It stops with a non-zero exit and a message that names the problem and the way out,
//! instead of retrying forever.

use std::time::Duration;

use crate::harness::Env;

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
