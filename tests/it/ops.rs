//! Operator commands: `reset-checkpoint` (skip ahead, copy again, re-create the slot) and
//! `teardown`, each refused while a daemon runs, acting only with `--yes`, and recorded in
//! the checkpoint table's history.

use std::time::Duration;

use crate::curated::assert_mirror;
use crate::harness::{Env, query_delta, wal2delta};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_checkpoint_and_teardown_do_what_they_say() {
    let setup = "CREATE TABLE t (id int PRIMARY KEY, v text);
                 INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c');
                 CREATE PUBLICATION w2d_pub FOR TABLE t;";
    let env = Env::new(setup).await;
    // Without a snapshot, the curated table lacks the three existing rows.
    env.write_config("postgres", &["public.t"], "snapshot = \"never\"");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let client = env.pg.client().await;
    client
        .batch_execute("INSERT INTO t VALUES (4, 'd')")
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let curated = env.lake.join("curated/public/t");
    let raw = env.raw_path("public", "t");
    assert_eq!(
        query_delta(&curated, "SELECT count(*) FROM t").await[0][0].as_deref(),
        Some("1")
    );

    // Refused while the daemon runs.
    let (code, text) = wal2delta(&env, &["reset-checkpoint", "--resnapshot", "--yes"]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("daemon is running on this lake"), "{text}");
    assert!(daemon.terminate(Duration::from_secs(30)).success());

    // --resnapshot: a dry run changes nothing; with --yes the next start copies again.
    let (code, text) = wal2delta(
        &env,
        &["reset-checkpoint", "--resnapshot", "--table", "public.t"],
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("would copy public.t again") && text.contains("--yes"),
        "{text}"
    );
    let (code, text) = wal2delta(
        &env,
        &[
            "reset-checkpoint",
            "--resnapshot",
            "--table",
            "public.t",
            "--yes",
        ],
    );
    assert_eq!(code, 0, "{text}");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.t").await;
    let ops = query_delta(
        &raw,
        "SELECT _op, count(*) FROM t GROUP BY _op ORDER BY _op",
    )
    .await;
    assert_eq!(
        ops,
        vec![
            vec![Some("c".into()), Some("1".into())],
            vec![Some("r".into()), Some("4".into())]
        ],
        "raw keeps its history and gets the copy"
    );
    assert!(daemon.terminate(Duration::from_secs(30)).success());

    // --to-lsn: the changes in between are skipped (a data gap), later ones stream.
    client
        .batch_execute("INSERT INTO t VALUES (5, 'e'), (6, 'f')")
        .await
        .unwrap();
    let target = env.current_wal_lsn().await;
    let (code, text) = wal2delta(&env, &["reset-checkpoint", "--to-lsn", &target, "--yes"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("data gap"), "{text}");
    let (code, text) = wal2delta(&env, &["reset-checkpoint", "--to-lsn", "0/1", "--yes"]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("only moves forward"), "{text}");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    client
        .batch_execute("INSERT INTO t VALUES (7, 'g')")
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let ids = query_delta(&raw, "SELECT id FROM t WHERE _op = 'c' ORDER BY id").await;
    assert_eq!(
        ids,
        vec![vec![Some("4".into())], vec![Some("7".into())]],
        "5 and 6 skipped"
    );
    assert!(daemon.terminate(Duration::from_secs(30)).success());

    // --recreate-slot: a new slot, and (snapshot = initial) every table copied afresh.
    env.write_config("postgres", &["public.t"], "");
    let (code, text) = wal2delta(&env, &["reset-checkpoint", "--recreate-slot", "--yes"]);
    assert_eq!(code, 0, "{text}");
    let _daemon = env.daemon();
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.t").await;

    // Every reset is in the checkpoint table's history.
    let log_dir = env.lake.join("_wal2delta/checkpoint/_delta_log");
    let resets: usize = std::fs::read_dir(&log_dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .map(|text| text.matches("wal2delta.reset").count())
        .sum();
    assert_eq!(resets, 3, "one recorded reset per --yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_drops_the_slot_and_only_a_publication_wal2delta_created() {
    let setup = "CREATE TABLE t (id int PRIMARY KEY);";
    let env = Env::new(setup).await;
    env.write_config("postgres", &["public.t"], "");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let (code, text) = wal2delta(&env, &["teardown", "--yes"]);
    assert_ne!(code, 0, "refused while running: {text}");
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    let (code, text) = wal2delta(&env, &["teardown"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("would drop replication slot w2d_test; drop publication w2d_pub"),
        "{text}"
    );
    let (code, text) = wal2delta(&env, &["teardown", "--yes"]);
    assert_eq!(code, 0, "{text}");
    let client = env.pg.client().await;
    let left: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // A publication the operator made is kept.
    client
        .batch_execute("CREATE PUBLICATION w2d_pub FOR TABLE t")
        .await
        .unwrap();
    let _daemon = env.daemon();
    env.wait_streaming().await;
    drop(_daemon);
    let (_, text) = wal2delta(&env, &["teardown"]);
    assert!(
        text.contains("keep publication w2d_pub (wal2delta did not create it)"),
        "{text}"
    );
}
