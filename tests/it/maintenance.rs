//! Delta maintenance under a compressed long run: about 450 one-transaction batches with
//! compaction, vacuum and log cleanup on a short fuse and a SIGKILL in the middle. File
//! counts stay bounded, Delta checkpoints appear, unreferenced files are deleted, the
//! `_delta_log` directories keep only what the log retention asks for while time travel
//! within it still works, and the raw and curated tables still hold every change exactly
//! once.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::curated::assert_mirror;
use crate::harness::{Env, count_delta};

/// The source position the endpoint serves (`SHOW wal2delta.position`'s LSN).
async fn position(lake: &tokio_postgres::Client) -> String {
    let shown = crate::sql::rows(lake, "SHOW wal2delta.position").await;
    shown[0].split('|').next().unwrap().to_string()
}

/// The versions of the commit files in a table's `_delta_log`.
fn commit_versions(dir: &std::path::Path) -> Vec<u64> {
    std::fs::read_dir(dir.join("_delta_log"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".json")?.parse().ok()
        })
        .collect()
}

fn commits(dir: &std::path::Path) -> usize {
    commit_versions(dir).len()
}

fn oldest_commit(dir: &std::path::Path) -> u64 {
    commit_versions(dir).into_iter().min().unwrap_or(0)
}

fn newest_commit(dir: &std::path::Path) -> u64 {
    commit_versions(dir).into_iter().max().unwrap_or(0)
}

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
    // Vacuum keeps 3.6 s: the endpoint reads the version of the last checkpoint record,
    // which a compaction right after it has already replaced.
    env.write_config(
        "postgres",
        &["public.t"],
        "[maintenance]\ncompact_min_files = 8\ncheck_interval_secs = 1\n\
         vacuum_retention_hours = 0.001\nvacuum_interval_hours = 0.0005\n\
         log_retention_hours = 0.002",
    );
    // One batch per transaction: many commits, many small files.
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("max_batch_age_ms = 200", "max_batch_age_ms = 10");
    std::fs::write(&env.config, text).unwrap();
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let lake = crate::sql::connect(&crate::sql::endpoint_dsn(env.serve_port, "analyst"))
        .await
        .unwrap();
    let first_lsn = position(&lake).await;

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
            _ => {
                "DELETE FROM t WHERE id = (SELECT id FROM t ORDER BY random() LIMIT 1)".to_string()
            }
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

    let raw = env.raw_path("public", "t");
    // Past the log retention (7.2 s), one more batch runs a vacuum pass that cleans the
    // logs. The position just before it is within the retention: time travel reaches it.
    // The SIGKILL closed the first connection; the restarted daemon serves a new one.
    let lake = crate::sql::connect(&crate::sql::endpoint_dsn(env.serve_port, "analyst"))
        .await
        .unwrap();
    let within = position(&lake).await;
    let rows_within = crate::sql::rows(&lake, "SELECT count(*) FROM t").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let logs = [
        raw.clone(),
        env.lake.join("curated/public/t"),
        env.lake.join("_wal2delta/checkpoint"),
    ];
    let mut nudge = 0;
    // Cleanup runs only after a batch: nudge until every log is cut, however slow the machine
    // was (a cleanup during the workload may have cut only the oldest commits).
    while logs
        .iter()
        .any(|d| oldest_commit(d) == 0 || commits(d) > 250)
        && nudge < 10
    {
        nudge += 1;
        client
            .execute(
                &format!("UPDATE t SET v = 'nudge{nudge}' WHERE id = (SELECT min(id) FROM t)"),
                &[],
            )
            .await
            .unwrap();
        changes += 1;
        env.wait_caught_up(Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for dir in &logs {
        let (oldest, commits, newest) = (oldest_commit(dir), commits(dir), newest_commit(dir));
        eprintln!(
            "maintenance figures: {dir:?}: commits {oldest}..={newest} in the log ({commits} files)"
        );
        // About 450 transactions: one batch each on a fast machine, a few each on a slow
        // one (group commit); either way far more commits than the log keeps.
        assert!(newest >= 100, "{dir:?}: only {newest} versions");
        assert!(
            oldest > 0 && commits <= 250,
            "{dir:?}: {commits} commit files from version {oldest} to {newest}: log cleanup \
             did not bound the log"
        );
        assert!(
            dir.join("_delta_log/_last_checkpoint").exists(),
            "{dir:?} has no Delta checkpoint"
        );
    }
    crate::sql::rows(&lake, &format!("SET wal2delta.as_of = '{within}'")).await;
    assert_eq!(
        crate::sql::rows(&lake, "SELECT count(*) FROM t").await,
        rows_within,
        "time travel to a position within the log retention"
    );
    let err = lake
        .batch_execute(&format!("SET wal2delta.as_of = '{first_lsn}'"))
        .await
        .expect_err("the snapshot's position is older than the log retention");
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("log_retention_hours")),
        "{err:?}"
    );
    lake.batch_execute("RESET wal2delta.as_of").await.unwrap();

    // Exactly once, across compaction, vacuum, log cleanup and a SIGKILL.
    assert_mirror(&env, "public.t").await;
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
    // Maintenance runs right after a batch, and vacuum keeps files 3.6 s: a batch now and
    // then lets it delete what the last compactions replaced.
    for (name, dir) in [("raw", &raw), ("curated", &curated)] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (mut live, mut on_disk) = (live_files(dir).await, parquet_files(dir));
        while on_disk > live + 24 && std::time::Instant::now() < deadline {
            client
                .execute("UPDATE t SET v = v WHERE id = (SELECT min(id) FROM t)", &[])
                .await
                .unwrap();
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
}
