//! Failover slots (PostgreSQL 17+): after the primary is lost and a standby promoted, the
//! daemon continues on the standby's synchronized copy of its slot, exactly once.

use std::time::Duration;

use crate::curated::assert_mirror;
use crate::harness::{Env, assert_raw_ops, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 17+; tests/matrix.sh runs it with W2D_PG_VERSION=17 and 18"]
async fn the_daemon_continues_exactly_once_on_a_promoted_standby() {
    let mut env = Env::new(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'a' FROM generate_series(1, 1000) g;
         SELECT pg_create_physical_replication_slot('sb', true);",
    )
    .await;
    assert!(
        env.pg.major().await >= 17,
        "failover slots need PostgreSQL 17 or newer: run with W2D_PG_VERSION=17 (tests/matrix.sh does)"
    );
    let standby = env.pg.standby("sb");
    env.write_config("postgres", &["public.t"], "failover = true");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    env.pg
        .client()
        .await
        .batch_execute(
            "INSERT INTO t SELECT g, 'b' FROM generate_series(1001, 2000) g; \
             UPDATE t SET v = 'c' WHERE id <= 100;",
        )
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    // The standby's copy of the slot has caught up with what the lake holds.
    let confirmed = env.confirmed_flush().await;
    let slot = env.slot.clone();
    {
        let standby_client = standby.client().await;
        let (client, slot, confirmed) = (&standby_client, &slot, &confirmed);
        wait_for(
            &format!("the standby's synchronized slot to reach {confirmed}"),
            Duration::from_secs(90),
            || async move {
                matches!(
                    client
                        .query_opt(
                            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND synced \
                             AND NOT temporary AND confirmed_flush_lsn >= $2::text::pg_lsn",
                            &[slot, confirmed],
                        )
                        .await,
                    Ok(Some(_))
                )
            },
            || standby.server_log(),
        )
        .await;
    }
    assert!(daemon.terminate(Duration::from_secs(30)).success());

    // The primary is lost; the standby takes over and the daemon follows it.
    env.pg.stop("immediate");
    let promoted: bool = standby
        .client()
        .await
        .query_one("SELECT pg_promote(true, 60)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(promoted, "the standby was not promoted within 60 s");
    let _old_primary = std::mem::replace(&mut env.pg, standby);
    env.write_config("postgres", &["public.t"], "failover = true");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    env.pg
        .client()
        .await
        .batch_execute(
            "INSERT INTO t SELECT g, 'd' FROM generate_series(2001, 3000) g; \
             UPDATE t SET v = 'e' WHERE id BETWEEN 101 AND 150; \
             DELETE FROM t WHERE id <= 10;",
        )
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.t").await;
    // Every change once: the snapshot, 2,000 inserts, 150 updates and 10 deletes.
    assert_raw_ops(
        &env,
        "t",
        &[("c", 2000), ("d", 10), ("r", 1000), ("u", 150)],
    )
    .await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}
