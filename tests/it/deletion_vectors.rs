//! Deletion vectors in curated tables: updates, deletes and key changes mark rows in
//! deletion vectors instead of rewriting files; every reader (the SQL endpoint, Python
//! `deltalake`, DuckDB's delta extension) agrees with the source, also across several DVs
//! on one file; vacuum keeps the DV files the table references; switching them off purges.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::curated::assert_mirror;
use crate::harness::{Daemon, Env, free_port, psql, require_python_deltalake};
use crate::telemetry::{scrape, value};

const SETUP: &str = "
CREATE TABLE dv (id bigint PRIMARY KEY, grupo int NOT NULL, v text);
INSERT INTO dv SELECT g, g % 7, 'v' || g FROM generate_series(1, 20000) g;
CREATE PUBLICATION w2d_pub FOR TABLE dv;
";

/// The current version of a local Delta table.
async fn open_local(path: &std::path::Path) -> deltalake::DeltaTable {
    let url = url::Url::from_directory_path(path).unwrap();
    deltalake::open_table(url).await.unwrap()
}

/// The live files of a local Delta table: path → (DV cardinality, numRecords).
async fn live_files(path: &std::path::Path) -> BTreeMap<String, (i64, Option<usize>)> {
    open_local(path)
        .await
        .snapshot()
        .unwrap()
        .log_data()
        .iter()
        .map(|f| {
            (
                f.path().to_string(),
                (
                    f.deletion_vector_descriptor().map_or(0, |d| d.cardinality),
                    f.num_records(),
                ),
            )
        })
        .collect()
}

/// count, sum(id), sum(grupo) as an independent reader sees them.
fn python_reads(path: &std::path::Path) -> Result<String, String> {
    require_python_deltalake();
    let script = "import sys, os, deltalake\n\
        t = deltalake.DeltaTable(sys.argv[1])\n\
        r = deltalake.QueryBuilder().register('t', t).execute('SELECT count(*), sum(id), sum(grupo) FROM t').read_all()\n\
        print(*[r.column(i)[0].as_py() for i in range(3)], flush=True)\n\
        os._exit(0)\n";
    run_python(script, path)
}

fn duckdb_reads(path: &std::path::Path) -> Result<String, String> {
    let script = "import sys, os, glob, duckdb\n\
        import duckdb_extension_delta as d\n\
        ext = glob.glob(os.path.dirname(d.__file__) + '/extensions/*/delta.duckdb_extension')[0]\n\
        c = duckdb.connect(config={'allow_unsigned_extensions': 'true', 'autoinstall_known_extensions': 'false', 'autoload_known_extensions': 'false'})\n\
        c.execute(f\"LOAD '{ext}'\")\n\
        r = c.execute(f\"SELECT count(*), sum(id), sum(grupo) FROM delta_scan('{sys.argv[1]}')\").fetchone()\n\
        print(*r, flush=True)\n\
        os._exit(0)\n";
    run_python(script, path)
}

fn run_python(script: &str, path: &std::path::Path) -> Result<String, String> {
    let out = std::process::Command::new("python3")
        .args(["-c", script, path.to_str().unwrap()])
        .output()
        .expect("run python3");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

async fn source_figures(env: &Env) -> String {
    let row = env
        .pg
        .client()
        .await
        .query_one(
            "SELECT count(*), sum(id)::bigint, sum(grupo)::bigint FROM dv",
            &[],
        )
        .await
        .unwrap();
    let (a, b, c): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    format!("{a} {b} {c}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_vectors_mark_rows_and_every_reader_sees_the_truth() {
    let env = Env::new(SETUP).await;
    env.write_config(
        "postgres",
        &["public.dv"],
        "[maintenance]\ncheck_interval_secs = 1\nvacuum_retention_hours = 0\n\
         vacuum_interval_hours = 0.0005",
    );
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    let curated = env.lake.join("curated/public/dv");
    let snapshot_files: BTreeSet<String> = live_files(&curated).await.into_keys().collect();

    // Updates, deletes, key changes and inserts in many small batches.
    let client = env.pg.client().await;
    let mut rng = StdRng::seed_from_u64(16);
    let mut next = 1_000_000;
    for round in 0..30 {
        let mut sql = String::from("BEGIN;");
        for _ in 0..20 {
            sql += &format!(
                "UPDATE dv SET v = 'u{round}', grupo = grupo + 1 WHERE id = {};",
                rng.random_range(1..20000)
            );
        }
        for _ in 0..8 {
            sql += &format!("DELETE FROM dv WHERE id = {};", rng.random_range(1..20000));
        }
        for _ in 0..3 {
            next += 1;
            sql += &format!(
                "UPDATE dv SET id = {next} WHERE id = {};",
                rng.random_range(1..20000)
            );
        }
        sql += &format!(
            "INSERT INTO dv VALUES ({}, 1, 'novo'); COMMIT;",
            50_000 + round
        );
        client.batch_execute(&sql).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.dv").await;

    // The snapshot's file was not rewritten: it carries a DV with the rows changed since.
    let live = live_files(&curated).await;
    let marked: i64 = snapshot_files
        .iter()
        .filter_map(|p| live.get(p))
        .map(|(dv, _)| *dv)
        .sum();
    assert!(
        marked >= 500,
        "the snapshot's files carry {marked} deleted rows in DVs: {live:?}"
    );
    // Several DVs replaced each other on one file over the run.
    let mut dvs_per_file: BTreeMap<String, usize> = BTreeMap::new();
    for entry in std::fs::read_dir(curated.join("_delta_log")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(add) = action.get("add")
                && add.get("deletionVector").is_some_and(|d| !d.is_null())
            {
                *dvs_per_file
                    .entry(add["path"].as_str().unwrap().to_string())
                    .or_default() += 1;
                let stats: serde_json::Value =
                    serde_json::from_str(add["stats"].as_str().unwrap()).unwrap();
                assert_eq!(stats["tightBounds"], false, "{add}");
            }
        }
    }
    let most = dvs_per_file.values().max().copied().unwrap_or(0);
    assert!(
        most >= 5,
        "at most {most} DVs on one file: {dvs_per_file:?}"
    );
    // Every DV file a live file references exists (vacuum keeps them).
    let dv_files = dv_files_on_disk(&curated);
    assert!(!dv_files.is_empty(), "no DV file in {curated:?}");

    // Every reader agrees with the source.
    let source = source_figures(&env).await;
    let (ok, out) = psql(
        env.serve_port,
        "postgres",
        &[],
        &[
            "-c",
            "SELECT count(*), sum(id), sum(grupo) FROM dv",
            "-A",
            "-t",
            "-F",
            " ",
        ],
    );
    assert!(ok, "psql: {out}");
    assert_eq!(out.trim(), source, "the SQL endpoint");
    // Row by row through key lookups (pruned scans), where the selections of deleted rows
    // must line up with the rows read.
    let lookup =
        "SELECT id, grupo, v FROM dv WHERE id BETWEEN 1 AND 400 OR id > 999999 ORDER BY id";
    let (served, expected) = served_and_source(&env, &client, lookup).await;
    assert!(expected.len() > 300, "{expected:?}");
    assert_eq!(served, expected.join("\n"), "the SQL endpoint, row by row");
    let (ok, plan) = psql(
        env.serve_port,
        "postgres",
        &[],
        &["-c", "EXPLAIN SELECT v FROM dv WHERE id = 7", "-A", "-t"],
    );
    assert!(ok, "psql: {plan}");
    assert!(
        plan.contains("DataSourceExec") && !plan.contains("DeltaScan"),
        "a table with DVs is read as a plain Parquet scan with row selections: {plan}"
    );
    assert_eq!(
        python_reads(&curated).expect("Python deltalake reads a table with DVs"),
        source,
        "Python deltalake"
    );
    assert_eq!(
        duckdb_reads(&curated).expect("DuckDB reads a table with DVs"),
        source,
        "DuckDB's delta extension"
    );
    // Point lookups by key: the endpoint skips every file the daemon's key index says
    // does not hold the key, and still finds changed, moved, deleted and missing keys as
    // the source has them.
    let mut keys: Vec<i64> = (0..40).map(|_| rng.random_range(1..20000)).collect();
    keys.extend([50_000, 50_029, next, next + 1, 999_999]);
    for key in &keys {
        let one = format!("SELECT id, grupo, v FROM dv WHERE id = {key}");
        let (served, expected) = served_and_source(&env, &client, &one).await;
        assert_eq!(served, expected.join("\n"), "lookup of key {key}");
    }
    let (ok, plan) = psql(
        env.serve_port,
        "postgres",
        &[],
        &[
            "-c",
            &format!("EXPLAIN SELECT v FROM dv WHERE id = {}", keys[0]),
            "-A",
            "-t",
        ],
    );
    assert!(ok, "psql: {plan}");
    let opened = plan.matches(".parquet").count();
    let live_now = live_files(&curated).await.len();
    println!("figure: a key lookup opens {opened} of {live_now} live files");
    assert!(
        opened * 2 <= live_now,
        "a key lookup opens {opened} of {live_now} files: the key index did not prune\n{plan}"
    );
    println!(
        "figure: deletion vectors: {marked} rows marked in the snapshot's file, up to {most} DVs on one file, {} DV files on disk",
        dv_files.len()
    );

    // Switched off: the next maintenance purges every DV, and the table stays exact.
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("{text}\n[curated]\ndeletion_vectors = false\n"),
    )
    .unwrap();
    let _daemon = env.daemon();
    env.wait_streaming().await;
    client
        .batch_execute("INSERT INTO dv VALUES (900000, 1, 'after')")
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    nudge_until(
        &env,
        &client,
        900_001,
        "DVs gone after switching them off",
        || async { live_files(&curated).await.values().all(|(dv, _)| *dv == 0) },
    )
    .await;
    assert!(
        env.daemon_log().contains("purged rows marked deleted"),
        "{}",
        env.daemon_log()
    );
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.dv").await;
    assert_eq!(
        duckdb_reads(&curated).unwrap(),
        source_figures(&env).await,
        "DuckDB after the purge"
    );
}

/// The DV files in a curated table's directory.
/// `sql` (selecting `id, grupo, v` of `dv`) through psql on the endpoint, and its rows
/// from the source in the same text form.
async fn served_and_source(
    env: &Env,
    client: &tokio_postgres::Client,
    sql: &str,
) -> (String, Vec<String>) {
    let (ok, served) = psql(
        env.serve_port,
        "postgres",
        &[],
        &["-c", sql, "-A", "-t", "-F", " "],
    );
    assert!(ok, "psql: {served}");
    let expected = client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let (id, grupo, v): (i64, i32, Option<String>) = (r.get(0), r.get(1), r.get(2));
            format!("{id} {grupo} {}", v.unwrap_or_default())
        })
        .collect();
    (served.trim().to_string(), expected)
}

fn dv_files_on_disk(curated: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(curated)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("deletion_vector_"))
        .collect()
}

/// The DV files the current version of a local Delta table references.
async fn referenced_dv_files(curated: &std::path::Path) -> BTreeSet<String> {
    open_local(curated)
        .await
        .snapshot()
        .unwrap()
        .log_data()
        .iter()
        .filter_map(|f| f.deletion_vector_descriptor())
        .map(|d| {
            wal2delta::lake::deletion_vector::relative_file(&d)
                .unwrap_or_else(|| panic!("a DV stored next to the data: {d:?}"))
        })
        .collect()
}

/// The first merge after the snapshot, and the first after a restart, find their rows
/// in the key index: an idle daemon indexes the curated files' keys, so the merge reads
/// no file's key column (`wal2delta_merge_scanned_files_total` stays 0), where it used
/// to read every file a change may touch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_indexes_the_keys_so_the_first_merge_reads_no_file() {
    let env = Env::new(SETUP).await;
    let addr = format!("127.0.0.1:{}", free_port());
    env.write_config(
        "postgres",
        &["public.dv"],
        &format!("[metrics]\nlisten = \"{addr}\""),
    );
    let client = env.pg.client().await;
    for round in 0..2 {
        let mut daemon = env.daemon();
        env.wait_streaming().await;
        // Idle: one file's keys take milliseconds to index.
        tokio::time::sleep(Duration::from_secs(3)).await;
        // About 200 keys spread over the whole table.
        let updated = client
            .execute(
                "UPDATE dv SET v = v || 'x' WHERE id % 97 = $1",
                &[&(round as i64)],
            )
            .await
            .unwrap();
        assert!(updated > 150, "{updated} rows updated");
        env.wait_caught_up(Duration::from_secs(60)).await;
        let table = "table=\"public.dv\"";
        let text = scrape(&addr);
        let get = |name: &str| {
            value(&text, name, &[table]).unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        assert_eq!(
            get("wal2delta_merge_marked_rows_total"),
            updated as f64,
            "{text}"
        );
        assert_eq!(
            get("wal2delta_merge_scanned_files_total"),
            0.0,
            "round {round}: the merge read key columns the idle daemon should have indexed\n{}",
            env.daemon_log()
        );
        daemon.terminate(Duration::from_secs(30));
    }
    assert_mirror(&env, "dv").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_deletion_vector_file_and_its_commit_leaves_only_an_unreferenced_file() {
    let env = Env::new(SETUP).await;
    env.write_config(
        "postgres",
        &["public.dv"],
        "[maintenance]\ncheck_interval_secs = 1\nvacuum_retention_hours = 0\n\
         vacuum_interval_hours = 0.0005",
    );
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::start(
        &env.config,
        &log,
        &[("WAL2DELTA_CRASH_AT", "deletion_vector_written")],
    );
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    let curated = env.lake.join("curated/public/dv");
    assert!(dv_files_on_disk(&curated).is_empty());

    // The first merge that marks rows writes its DV file, then dies before the commit.
    let client = env.pg.client().await;
    client
        .batch_execute(
            "UPDATE dv SET v = 'after the crash' WHERE id <= 5; DELETE FROM dv WHERE id = 6",
        )
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "the daemon should have aborted: {status:?}"
    );
    assert!(
        env.daemon_log()
            .contains("WAL2DELTA_CRASH_AT=deletion_vector_written")
    );
    let orphans = dv_files_on_disk(&curated);
    assert_eq!(
        orphans.len(),
        1,
        "one DV file written before the crash: {orphans:?}"
    );
    assert!(
        referenced_dv_files(&curated).await.is_empty(),
        "no version references a DV yet"
    );
    assert!(
        live_files(&curated).await.values().all(|(dv, _)| *dv == 0),
        "the table's files carry no DV after the crash"
    );

    // Restarted without the crash point: the batch is applied once, by a new DV file.
    let _daemon = env.daemon();
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.dv").await;
    let marked: i64 = live_files(&curated).await.values().map(|(dv, _)| *dv).sum();
    assert_eq!(marked, 6, "five updated rows and one deleted, marked once");
    let referenced = referenced_dv_files(&curated).await;
    assert_eq!(referenced.len(), 1, "{referenced:?}");
    assert!(
        !orphans.is_subset(&referenced),
        "the DV file of the crashed batch is not reused"
    );
    assert_eq!(
        source_figures(&env).await,
        python_reads(&curated).expect("Python deltalake reads the table"),
    );

    // Vacuum removes the unreferenced file and keeps the referenced one.
    let orphan = orphans.into_iter().next().unwrap();
    nudge_until(
        &env,
        &client,
        900_000,
        "vacuum to remove the unreferenced DV file",
        || async { !dv_files_on_disk(&curated).contains(&orphan) },
    )
    .await;
    let on_disk = dv_files_on_disk(&curated);
    let referenced = referenced_dv_files(&curated).await;
    assert!(
        referenced.is_subset(&on_disk),
        "a referenced DV file is missing: {referenced:?} of {on_disk:?}"
    );
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.dv").await;
}

/// Inserts a row into `dv` (ids from `first`) every 500 ms until `done` holds (maintenance
/// runs after a batch), at most 30 s.
async fn nudge_until<F, Fut>(
    env: &Env,
    client: &tokio_postgres::Client,
    first: i64,
    what: &str,
    mut done: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut nudge = first;
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 30 s for {what}\n{}",
            env.daemon_log()
        );
        client
            .batch_execute(&format!("INSERT INTO dv VALUES ({nudge}, 1, 'nudge')"))
            .await
            .unwrap();
        nudge += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
