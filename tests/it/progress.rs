//! Progress: the slot's confirmed_flush_lsn keeps advancing while only unpublished tables
//! are written, so an idle publication never pins WAL. Connects with an MD5 password role.

use std::time::Duration;

use crate::harness::{Env, count_delta};

const SETUP: &str = r#"
CREATE TABLE published (id int PRIMARY KEY, v text);
CREATE TABLE noise (id bigserial PRIMARY KEY, payload text);
SET password_encryption = 'md5';
CREATE ROLE repl_md5 LOGIN REPLICATION PASSWORD 'md5-pass' IN ROLE w2d_md5;
GRANT SELECT ON published TO repl_md5;
CREATE PUBLICATION w2d_pub FOR TABLE published;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_publication_keeps_confirmed_flush_advancing() {
    let env = Env::new(SETUP).await;
    let pw_file = env.dir.path().join("pw");
    std::fs::write(&pw_file, "md5-pass\n").unwrap();
    env.write_config(
        "repl_md5",
        &["public.published"],
        &format!("password_file = {:?}", pw_file.to_str().unwrap()),
    );
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let pg = env.pg.client().await;
    pg.batch_execute("INSERT INTO published VALUES (1, 'one')")
        .await
        .unwrap();
    let raw = env.raw_path("public", "published");
    env.wait_raw_rows("public", "published", 1, Duration::from_secs(60))
        .await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    let start = env.confirmed_flush().await;
    let wal_start = env.current_wal_lsn().await;
    for _ in 0..3 {
        for _ in 0..50 {
            pg.batch_execute(
                "INSERT INTO noise (payload) SELECT repeat('n', 1000) FROM generate_series(1, 20)",
            )
            .await
            .unwrap();
        }
        // Only unpublished writes: the slot must still confirm the new WAL end.
        env.wait_caught_up(Duration::from_secs(60)).await;
    }
    let end = env.confirmed_flush().await;
    println!("figure: idle slot confirmed_flush_lsn advanced from {start} to {end}");
    assert_ne!(start, end);
    // And the WAL the slot retains stays bounded: once Postgres logs a new restart point
    // (at a checkpoint) the slot lets go of everything the noise wrote.
    let written: i64 = pg
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
            &[&wal_start],
        )
        .await
        .unwrap()
        .get(0);
    let retained = || async {
        pg.batch_execute("CHECKPOINT; INSERT INTO noise (payload) VALUES ('tick')")
            .await
            .unwrap();
        pg.query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    crate::harness::wait_for(
        &format!("the slot to retain less than half of the {written} bytes of WAL written"),
        Duration::from_secs(60),
        || async { retained().await < written / 2 },
        || env.daemon_log(),
    )
    .await;
    println!(
        "figure: {written} bytes of unpublished WAL written; the slot retains {} bytes",
        retained().await
    );
    assert_eq!(
        count_delta(&raw).await,
        1,
        "unpublished writes must not reach the lake"
    );
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

/// SIGTERM right after a write: the daemon commits the complete transaction, reports the
/// final position to Postgres and exits 0, so nothing is re-sent on the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_commits_complete_transactions_and_reports_the_final_position() {
    let env = Env::new(SETUP).await;
    env.write_config("postgres", &["public.published"], "");
    // A ten-minute batch age: only the shutdown path can commit this write in time.
    let config = std::fs::read_to_string(&env.config).unwrap().replace(
        "max_batch_age_ms = 200",
        "max_batch_age_ms = 600000\nmin_batch_age_ms = 600000",
    );
    std::fs::write(&env.config, config).unwrap();
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let pg = env.pg.client().await;
    pg.batch_execute("INSERT INTO published SELECT g, 'row ' || g FROM generate_series(1, 1000) g")
        .await
        .unwrap();
    let written = env.current_wal_lsn().await;
    env.wait_sql(
        "the daemon to receive the write (write_lsn)",
        Duration::from_secs(30),
        "SELECT 1 FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
         WHERE s.slot_name = $1 AND r.write_lsn >= $2::text::pg_lsn",
        &[&env.slot, &written],
    )
    .await;
    let raw = env.raw_path("public", "published");
    assert_eq!(
        count_delta(&raw).await,
        0,
        "the batch must not be committed before the stop"
    );
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        env.daemon_log()
    );
    assert_eq!(
        count_delta(&raw).await,
        1000,
        "the complete transaction is committed on stop"
    );
    let confirmed = env.confirmed_flush().await;
    let reached: bool = pg
        .query_one(
            "SELECT $1::text::pg_lsn >= $2::text::pg_lsn",
            &[&confirmed, &written],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        reached,
        "final position {confirmed} not reported (write ended at {written})\n{}",
        env.daemon_log()
    );
}

/// `source.heartbeat_secs`: on an otherwise idle database the daemon writes heartbeat
/// messages into the WAL, and the slot's confirmed position follows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_optional_heartbeat_moves_the_slot_on_an_idle_database() {
    let env = Env::new(SETUP).await;
    env.write_config("postgres", &["public.published"], "heartbeat_secs = 1");
    let _daemon = env.daemon();
    env.wait_streaming().await;
    let pg = env.pg.client().await;
    let start = env.current_wal_lsn().await;
    // Nothing else writes: only heartbeats can move the WAL and the slot past `start`.
    env.wait_sql(
        "the slot to confirm a position past the idle start (heartbeats)",
        Duration::from_secs(30),
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn > $2::text::pg_lsn",
        &[&env.slot, &start],
    )
    .await;
    let now = env.current_wal_lsn().await;
    let moved: bool = pg
        .query_one(
            "SELECT $1::text::pg_lsn > $2::text::pg_lsn",
            &[&now, &start],
        )
        .await
        .unwrap()
        .get(0);
    assert!(moved, "the WAL did not move: no heartbeat was written");
}
