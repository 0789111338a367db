//! Delta maintenance under a compressed long run: about 450 one-transaction batches with
//! compaction and vacuum on a short fuse and a SIGKILL in the middle. File counts stay
//! bounded, Delta checkpoints appear, unreferenced files are deleted, and the raw and
//! curated tables still hold every change exactly once.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::curated::assert_mirror;
use crate::harness::{Env, count_delta};

fn parquet_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
                .count()
        })
        .unwrap_or(0)
}

/// Data files in the table's current version, as wal2delta's reader sees them.
async fn live_files(path: &std::path::Path) -> usize {
    let url = url::Url::from_directory_path(path).unwrap();
    let table = deltalake::open_table(url).await.unwrap();
    table.snapshot().unwrap().log_data().iter().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_vacuum_keep_files_bounded_and_changes_exactly_once() {
    let env = Env::new(
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL); \
         INSERT INTO t SELECT g, 'seed' FROM generate_series(1, 100) g; \
         CREATE PUBLICATION w2d_pub FOR TABLE t;",
    )
    .await;
    env.write_config(
        "postgres",
        &["public.t"],
        "[maintenance]\ncompact_min_files = 8\ncheck_interval_secs = 1\n\
         vacuum_retention_hours = 0\nvacuum_interval_hours = 0.0005",
    );
    // One batch per transaction: many commits, many small files.
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("max_batch_age_ms = 200", "max_batch_age_ms = 10");
    std::fs::write(&env.config, text).unwrap();
    let mut daemon = env.daemon();
    env.wait_streaming().await;

    let client = env.pg.client().await;
    let mut rng = StdRng::seed_from_u64(7);
    let mut changes = 100i64; // the snapshot's rows
    let mut next_id = 101;
    for i in 0..450 {
        let sql = match rng.random_range(0..3) {
            0 => {
                next_id += 1;
                format!("INSERT INTO t VALUES ({}, 'n{i}')", next_id - 1)
            }
            1 => format!(
                "UPDATE t SET v = 'u{i}' WHERE id = (SELECT id FROM t ORDER BY random() LIMIT 1)"
            ),
            _ => format!("DELETE FROM t WHERE id = (SELECT id FROM t ORDER BY random() LIMIT 1)"),
        };
        let n = client.execute(sql.as_str(), &[]).await.unwrap();
        changes += n as i64;
        tokio::time::sleep(Duration::from_millis(30)).await;
        if i == 220 {
            daemon.kill9();
            daemon = env.daemon();
        }
    }
    env.wait_caught_up(Duration::from_secs(90)).await;
    // Let a last maintenance check run after the final batch.
    client
        .execute(
            "UPDATE t SET v = 'last' WHERE id = (SELECT min(id) FROM t)",
            &[],
        )
        .await
        .unwrap();
    changes += 1;
    env.wait_caught_up(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    client
        .execute(
            "UPDATE t SET v = 'last2' WHERE id = (SELECT min(id) FROM t)",
            &[],
        )
        .await
        .unwrap();
    changes += 1;
    env.wait_caught_up(Duration::from_secs(60)).await;

    // Exactly once, across compaction, vacuum and a SIGKILL.
    assert_mirror(&env, "public.t").await;
    let raw = env.raw_path("public", "t");
    assert_eq!(count_delta(&raw).await, changes, "raw rows vs changes made");

    let curated = env.lake.join("curated/public/t");
    let log = env.daemon_log();
    assert!(
        log.contains("compacted small files"),
        "no compaction ran:\n{log}"
    );
    assert!(
        log.contains("vacuumed unreferenced files"),
        "no vacuum ran:\n{log}"
    );
    // ~400 batches would leave ~400 files per table without compaction.
    // Maintenance runs right after a batch is confirmed, so the last batch's vacuum may
    // still be running when the test sees the position: give it a bounded time to finish.
    for (name, dir) in [("raw", &raw), ("curated", &curated)] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (mut live, mut on_disk) = (live_files(dir).await, parquet_files(dir));
        while on_disk > live + 24 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            (live, on_disk) = (live_files(dir).await, parquet_files(dir));
        }
        eprintln!(
            "maintenance figures: {name}: {live} live files, {on_disk} Parquet files on disk, {changes} changes"
        );
        assert!(live <= 24, "{name}: {live} live files after ~400 batches");
        assert!(
            on_disk <= live + 24,
            "{name}: {on_disk} Parquet files on disk for {live} live ones: vacuum did not run"
        );
    }
    // Delta checkpoints keep the logs short to replay.
    for dir in [&raw, &curated, &env.lake.join("_wal2delta/checkpoint")] {
        let commits = std::fs::read_dir(dir.join("_delta_log"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "json")
            })
            .count();
        assert!(commits > 100, "{dir:?}: only {commits} commits");
        eprintln!("maintenance figures: {dir:?}: {commits} commits in the log, checkpointed");
        assert!(
            dir.join("_delta_log/_last_checkpoint").exists(),
            "{dir:?} has no Delta checkpoint after {commits} commits"
        );
    }
}
