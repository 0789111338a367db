//! Replicating from a hot standby (logical decoding on a standby, PostgreSQL 16+): the
//! slot lives on the standby, changes made on the primary reach the lake exactly once, also
//! across a SIGKILL, and `verify` compares against the standby. Before 16, `validate`
//! refuses a standby and says what to do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::curated::assert_mirror;
use crate::harness::{Env, PgCluster, assert_raw_ops, wal2delta};

/// Calls `pg_log_standby_snapshot()` on the primary every 300 ms until `stop`: a logical
/// slot on a standby is made only once the primary has logged its running transactions,
/// which an idle primary does rarely (Postgres documents this call for it).
fn nudge(primary: &PgCluster, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let dsn = primary.dsn("postgres");
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .expect("connect to the primary");
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            let _ = client
                .batch_execute("SELECT pg_log_standby_snapshot()")
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

async fn primary_lsn(primary: &PgCluster) -> String {
    primary
        .client()
        .await
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("the primary's WAL position")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_standby_is_replicated_from_on_16_and_refused_before() {
    let mut env = Env::new(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'a' FROM generate_series(1, 1000) g;
         CREATE PUBLICATION w2d_pub FOR TABLE t;
         SELECT pg_create_physical_replication_slot('sb', true);",
    )
    .await;
    let major = env.pg.major().await;
    let standby = env.pg.standby_with("sb", false);
    let primary = std::mem::replace(&mut env.pg, standby);
    env.write_config("postgres", &["public.t"], "");
    let (code, out) = tokio::task::block_in_place(|| wal2delta(&env, &["validate"]));
    if major < 16 {
        assert_ne!(code, 0, "validate passed a standby on {major}: {out}");
        assert!(
            out.contains("logical decoding on a standby needs PostgreSQL 16 or newer")
                && out.contains("point source.dsn at the primary"),
            "{out}"
        );
        return;
    }
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("this server is a standby"), "{out}");

    let stop = Arc::new(AtomicBool::new(false));
    let nudging = nudge(&primary, stop.clone());
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let writes = primary.client().await;
    writes
        .batch_execute(
            "INSERT INTO t SELECT g, 'b' FROM generate_series(1001, 3000) g; \
             UPDATE t SET v = 'c' WHERE id <= 200;",
        )
        .await
        .unwrap();
    env.wait_confirmed(&primary_lsn(&primary).await, Duration::from_secs(60))
        .await;

    // A SIGKILL while 20 transactions stream in; the restarted daemon goes on from the
    // standby's slot.
    let inserting = tokio::spawn(async move {
        for chunk in 0..20 {
            let from = 3001 + chunk * 100;
            writes
                .batch_execute(&format!(
                    "INSERT INTO t SELECT g, 'd' FROM generate_series({from}, {}) g",
                    from + 99
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        writes
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    daemon.kill9();
    let writes = inserting.await.unwrap();
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    writes
        .batch_execute("DELETE FROM t WHERE id <= 50")
        .await
        .unwrap();
    env.wait_confirmed(&primary_lsn(&primary).await, Duration::from_secs(60))
        .await;
    assert_mirror(&env, "public.t").await;
    assert_raw_ops(
        &env,
        "t",
        &[("c", 4000), ("d", 50), ("r", 1000), ("u", 200)],
    )
    .await;

    // verify's own snapshot (a temporary slot) is taken on the standby too.
    let (code, text) = tokio::task::block_in_place(|| wal2delta(&env, &["verify", "--wait", "60"]));
    assert_eq!(code, 0, "{text}\n{}", env.daemon_log());
    assert!(text.contains("public.t: equal"), "{text}");
    // status reads the slot on the standby, with the WAL it retains there.
    let (code, text) = tokio::task::block_in_place(|| wal2delta(&env, &["status"]));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("w2d_test"), "{text}");
    stop.store(true, Ordering::Relaxed);
    nudging.await.unwrap();
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    drop(primary);
}
