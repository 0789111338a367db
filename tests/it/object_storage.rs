//! Lakes on object storage, against moto's S3 server (`s3_server`): the daemon streams
//! into an `s3://` lake and keeps curated tables equal to the source; two writers racing
//! for a Delta version cannot both commit; one daemon per lake through the lease, with a
//! SIGKILLed holder replaced and a SIGSTOPped one fenced off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::datatypes::{DataType, Field, Schema};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::curated::assert_mirror;
use crate::harness::{Daemon, Env, psql, query_delta_at, wait_for, wal2delta, wal2delta_with};
use crate::s3_server;

const SETUP: &str = r#"
CREATE TABLE conta (id int PRIMARY KEY, saldo bigint NOT NULL, nota text);
CREATE TABLE "Pedidos Ñ" (id bigint PRIMARY KEY, item text);
INSERT INTO conta SELECT g, g * 10, 'inicial ' || g FROM generate_series(1, 500) g;
INSERT INTO "Pedidos Ñ" SELECT g, 'item ' || g FROM generate_series(1, 50) g;
CREATE PUBLICATION w2d_pub FOR TABLE conta, "Pedidos Ñ";
"#;

const TABLES: &[&str] = &["public.conta", "public.\"Pedidos Ñ\""];

async fn change_rows(env: &Env, from: i32, to: i32) {
    env.pg
        .client()
        .await
        .batch_execute(&format!(
            "INSERT INTO conta SELECT g, g, 'nova' FROM generate_series({from}, {to}) g; \
             UPDATE conta SET saldo = saldo + 1 WHERE id % 7 = 0; \
             DELETE FROM conta WHERE id % 11 = 0 AND id < {to}; \
             INSERT INTO \"Pedidos Ñ\" VALUES ({to}, 'pedido {to}') ON CONFLICT DO NOTHING;"
        ))
        .await
        .expect("source changes");
}

/// The raw table of `conta` holds no change twice.
async fn assert_no_duplicates(env: &Env) {
    let dups = query_delta_at(
        &env.table_location("raw", "public", "conta"),
        "SELECT _commit_lsn, _seq, count(*) FROM t GROUP BY 1, 2 HAVING count(*) > 1",
    )
    .await;
    assert!(
        dups.is_empty(),
        "raw.conta holds duplicated changes: {dups:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_lake_mirrors_the_source_and_serves_sql() {
    let env = Env::new_s3(SETUP).await;
    env.write_config("postgres", TABLES, "");
    let (code, out) = wal2delta(&env, &["validate"]);
    assert_eq!(code, 0, "validate refused the S3 lake:\n{out}");
    assert!(
        out.contains("lake:") && out.contains("conditional writes"),
        "validate does not report the probe:\n{out}"
    );
    assert!(
        !out.contains(s3_server::SECRET_KEY),
        "validate printed the secret:\n{out}"
    );
    let _daemon = env.daemon();
    env.wait_streaming().await;
    change_rows(&env, 501, 900).await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    assert_mirror(&env, "public.conta").await;
    assert_mirror(&env, "public.\"Pedidos Ñ\"").await;
    assert_no_duplicates(&env).await;

    // Everything lives under the lake's prefix in the bucket.
    let bucket = &env.object_lake.as_ref().unwrap().bucket;
    let keys = s3_server::keys(bucket, "");
    assert!(
        keys.iter().all(|k| k.starts_with("lake/")),
        "objects outside the lake prefix: {:?}",
        keys.iter()
            .filter(|k| !k.starts_with("lake/"))
            .collect::<Vec<_>>()
    );
    assert!(
        keys.iter().any(|k| k == "lake/_wal2delta/lease.json"),
        "no lease object: {keys:?}"
    );

    // The SQL endpoint reads the same lake.
    let count: i64 = env
        .pg
        .client()
        .await
        .query_one("SELECT count(*) FROM conta", &[])
        .await
        .unwrap()
        .get(0);
    let (ok, out) = psql(
        env.serve_port,
        "postgres",
        &[],
        &["-c", "SELECT count(*) FROM conta"],
    );
    assert!(ok, "psql against the S3 lake failed: {out}");
    assert_eq!(out.trim(), count.to_string(), "endpoint count");

    // An independent reader (Python deltalake, on delta-kernel) reads both layers straight
    // from S3 and agrees with the source.
    crate::harness::require_python_deltalake();
    let lake_url = &env.object_lake.as_ref().unwrap().url;
    let script = format!(
        "import deltalake\n\
         o = {{'AWS_ENDPOINT_URL': '{endpoint}', 'AWS_ALLOW_HTTP': 'true', 'AWS_REGION': '{region}', \
         'AWS_ACCESS_KEY_ID': '{key}', 'AWS_SECRET_ACCESS_KEY': '{secret}'}}\n\
         import pyarrow\n\
         q = lambda t: pyarrow.table(deltalake.QueryBuilder().register('t', t).execute('SELECT * FROM t').read_all())\n\
         cur = q(deltalake.DeltaTable('{lake_url}curated/public/conta/', storage_options=o))\n\
         raw = deltalake.DeltaTable('{lake_url}raw/public/conta/', storage_options=o).to_pyarrow_table()\n\
         print(cur.num_rows, sum(cur.column('saldo').to_pylist()), raw.num_rows, flush=True)\n\
         import os; os._exit(0)  # deltalake's runtime can abort at interpreter exit\n",
        endpoint = s3_server::endpoint(),
        region = s3_server::REGION,
        key = s3_server::ACCESS_KEY,
        secret = s3_server::SECRET_KEY,
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "Python deltalake cannot read the S3 lake: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source: (i64, i64) = {
        let row = env
            .pg
            .client()
            .await
            .query_one("SELECT count(*), sum(saldo)::bigint FROM conta", &[])
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    let fields: Vec<i64> = text
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert_eq!(
        (fields[0], fields[1]),
        source,
        "Python deltalake's curated conta differs from the source"
    );
    let raw_rows = query_delta_at(
        &env.table_location("raw", "public", "conta"),
        "SELECT count(*) FROM t",
    )
    .await;
    assert_eq!(
        Some(fields[2].to_string()),
        raw_rows[0][0].clone(),
        "Python deltalake and wal2delta disagree on raw conta"
    );

    // A second independent reader: DuckDB's delta extension (delta-kernel) over httpfs.
    let script = format!(
        "import duckdb, glob, os\n\
         import duckdb_extension_delta as d, duckdb_extension_httpfs as h\n\
         ext = lambda m, n: glob.glob(os.path.dirname(m.__file__) + f'/extensions/*/{{n}}.duckdb_extension')[0]\n\
         c = duckdb.connect(config={{'allow_unsigned_extensions': 'true', 'autoinstall_known_extensions': 'false', 'autoload_known_extensions': 'false'}})\n\
         c.execute(f\"LOAD '{{ext(h, 'httpfs')}}'\"); c.execute(f\"LOAD '{{ext(d, 'delta')}}'\")\n\
         c.execute(\"CREATE SECRET (TYPE s3, KEY_ID '{key}', SECRET '{secret}', REGION '{region}', ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)\")\n\
         cur = c.execute(\"SELECT count(*), sum(saldo) FROM delta_scan('{lake_url}curated/public/conta')\").fetchone()\n\
         raw = c.execute(\"SELECT count(*) FROM delta_scan('{lake_url}raw/public/conta')\").fetchone()\n\
         print(cur[0], cur[1], raw[0], flush=True)\n\
         os._exit(0)\n",
        host = s3_server::endpoint().trim_start_matches("http://"),
        region = s3_server::REGION,
        key = s3_server::ACCESS_KEY,
        secret = s3_server::SECRET_KEY,
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "DuckDB cannot read the S3 lake (python3 -m pip install duckdb==1.5.5 \
         duckdb-extension-delta==1.5.5 duckdb-extension-httpfs==1.5.5): {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let duck: Vec<i64> = text
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert_eq!(
        duck, fields,
        "DuckDB and Python deltalake disagree on conta"
    );

    // `wal2delta serve` as a second, read-only process on the same bucket.
    let port = crate::harness::free_port();
    let serve_config = env.dir.path().join("serve.toml");
    std::fs::write(
        &serve_config,
        std::fs::read_to_string(&env.config).unwrap().replace(
            &format!("127.0.0.1:{}", env.serve_port),
            &format!("127.0.0.1:{port}"),
        ),
    )
    .unwrap();
    let mut serve = std::process::Command::new(crate::harness::binary())
        .args(["serve", "--config", serve_config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start wal2delta serve");
    let mut served = String::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let (ok, out) = psql(port, "postgres", &[], &["-c", "SELECT count(*) FROM conta"]);
        served = out;
        if ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = serve.kill();
    let _ = serve.wait();
    assert_eq!(
        served.trim(),
        count.to_string(),
        "wal2delta serve over S3: {served}"
    );

    // status names the lease holder and never the secret.
    let (code, out) = wal2delta(&env, &["status"]);
    assert_eq!(code, 0, "status failed:\n{out}");
    assert!(
        out.contains("pid"),
        "status does not name the daemon:\n{out}"
    );
    assert!(
        !out.contains(s3_server::SECRET_KEY),
        "status printed the secret:\n{out}"
    );
    assert!(
        !env.daemon_log().contains(s3_server::SECRET_KEY),
        "the daemon logged the secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_racing_for_a_version_cannot_both_commit() {
    use wal2delta::lake::commit::{AppId, Commit};
    use wal2delta::table_name::TableName;
    s3_server::register_in_process();
    let bucket = s3_server::bucket();
    let url = url::Url::parse(&format!("s3://{bucket}/race/")).unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let table = wal2delta::lake::table::open_or_create(&url, "race", &schema, &[])
        .await
        .expect("create the table on S3");
    let start = table.version().unwrap_or(0);
    let name = TableName::parse("public.race").unwrap();
    let mut wins = 0;
    let mut conflicts = 0;
    for round in 0..5 {
        // Two writers read the same version, then both try to commit the next one.
        let mut a = deltalake::open_table(url.clone()).await.unwrap();
        let mut b = deltalake::open_table(url.clone()).await.unwrap();
        let commit = |lsn: i64| Commit::append().txn(&AppId::raw("race", &name), lsn);
        let (ra, rb) = tokio::join!(
            commit(round * 2 + 1).write(&mut a, "race"),
            commit(round * 2 + 2).write(&mut b, "race")
        );
        match (&ra, &rb) {
            (Ok(_), Err(_)) | (Err(_), Ok(_)) => {
                wins += 1;
                conflicts += 1;
            }
            _ => panic!("round {round}: both or neither committed: {ra:?} / {rb:?}"),
        }
    }
    let table = deltalake::open_table(url.clone()).await.unwrap();
    assert_eq!(table.version(), Some(start + wins), "one version per round");
    println!("figure: racing writers on S3: rounds 5, commits {wins}, refused {conflicts}");
}

/// `Env::wait_caught_up`, showing the log of the daemon that should be catching up.
async fn caught_up(env: &Env, log: &std::path::Path) {
    let target = env.current_wal_lsn().await;
    let client = env.pg.client().await;
    wait_for(
        &format!("the slot to confirm {target}"),
        Duration::from_secs(120),
        || {
            let (client, target, slot) = (&client, &target, &env.slot);
            async move {
                matches!(
                    client
                        .query_opt(
                            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 \
                             AND confirmed_flush_lsn >= $2::text::pg_lsn",
                            &[slot, target],
                        )
                        .await,
                    Ok(Some(_))
                )
            }
        },
        || std::fs::read_to_string(log).unwrap_or_default(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_per_s3_lake_a_killed_one_is_replaced_and_a_paused_one_fenced() {
    // Postgres drops a frozen daemon's replication connection after 3 s, so a newcomer
    // can take the slot over.
    let env = Env::new_s3(SETUP).await;
    let pg = env.pg.client().await;
    pg.batch_execute("ALTER SYSTEM SET wal_sender_timeout = '3s'")
        .await
        .unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    env.write_config("postgres", TABLES, "");
    let mut first = env.daemon();
    env.wait_streaming().await;
    change_rows(&env, 501, 600).await;
    env.wait_caught_up(Duration::from_secs(120)).await;

    // The others run beside the frozen first one on this host: their own SQL port.
    let config = env.dir.path().join("others.toml");
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        &format!("127.0.0.1:{}", env.serve_port),
        &format!("127.0.0.1:{}", crate::harness::free_port()),
    );
    std::fs::write(&config, text).unwrap();

    // A second daemon is refused, naming the holder.
    let log2 = env.dir.path().join("second.log");
    let mut second = Daemon::start(&config, &log2, &[]);
    let status = second.wait(Duration::from_secs(30));
    let text = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(
        !status.success(),
        "a second daemon ran on the same lake:\n{text}"
    );
    assert!(
        text.contains("another wal2delta daemon is running on this lake")
            && text.contains(&format!("pid {}", first.pid())),
        "the refusal does not name the holder:\n{text}"
    );

    // Paused past its lease: a newcomer takes over; the paused one, resumed, commits
    // nothing and stops.
    kill(Pid::from_raw(first.pid()), Signal::SIGSTOP).unwrap();
    let log3 = env.dir.path().join("third.log");
    let mut third = Daemon::start(&config, &log3, &[]);
    change_rows(&env, 601, 700).await;
    let took_over = Instant::now();
    wait_for(
        "the newcomer to take the paused daemon's lease over",
        Duration::from_secs(60),
        || async {
            std::fs::read_to_string(&log3)
                .unwrap_or_default()
                .contains("holding the lake's lease")
        },
        || std::fs::read_to_string(&log3).unwrap_or_default(),
    )
    .await;
    println!(
        "figure: lease taken over {} ms after the holder froze",
        took_over.elapsed().as_millis()
    );
    caught_up(&env, &log3).await;
    kill(Pid::from_raw(first.pid()), Signal::SIGCONT).unwrap();
    let status = first.wait(Duration::from_secs(60));
    let first_log = env.daemon_log();
    assert!(
        !status.success() && first_log.contains("took over this lake's lease"),
        "the resumed daemon did not stop on losing its lease ({status:?}):\n{}",
        first_log
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    change_rows(&env, 701, 800).await;
    caught_up(&env, &log3).await;
    assert_no_duplicates(&env).await;
    assert_mirror(&env, "public.conta").await;

    // SIGKILLed: its lease is taken over after the lease time.
    third.kill9();
    change_rows(&env, 801, 900).await;
    let log4 = env.dir.path().join("fourth.log");
    let _fourth = Daemon::start(&config, &log4, &[]);
    caught_up(&env, &log4).await;
    let text = std::fs::read_to_string(&log4).unwrap_or_default();
    assert!(
        text.contains("taking over the lake's lease"),
        "the newcomer did not take the killed daemon's lease over:\n{text}"
    );
    assert_no_duplicates(&env).await;
    assert_mirror(&env, "public.conta").await;
    assert_mirror(&env, "public.\"Pedidos Ñ\"").await;
    println!(
        "figure: lease fencing on S3: refused 1, frozen holder fenced 1, killed holder replaced 1, duplicates 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_lake_mirrors_the_source_and_holds_a_lease() {
    let env = Env::new_azure(SETUP).await;
    env.write_config("postgres", TABLES, "");
    let (code, out) = wal2delta(&env, &["validate"]);
    assert_eq!(code, 0, "validate refused the Azure lake:\n{out}");
    assert!(
        out.contains("conditional writes"),
        "validate does not report the probe:\n{out}"
    );
    assert!(
        !out.contains(crate::azurite::KEY),
        "validate printed the key:\n{out}"
    );
    let first = env.daemon();
    env.wait_streaming().await;
    change_rows(&env, 501, 900).await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    assert_mirror(&env, "public.conta").await;
    assert_mirror(&env, "public.\"Pedidos Ñ\"").await;
    assert_no_duplicates(&env).await;
    // One daemon per lake there too.
    let config = env.dir.path().join("second.toml");
    std::fs::write(
        &config,
        std::fs::read_to_string(&env.config).unwrap().replace(
            &format!("127.0.0.1:{}", env.serve_port),
            &format!("127.0.0.1:{}", crate::harness::free_port()),
        ),
    )
    .unwrap();
    let log2 = env.dir.path().join("second.log");
    let mut second = Daemon::start(&config, &log2, &[]);
    let status = second.wait(Duration::from_secs(30));
    let text = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(
        !status.success() && text.contains(&format!("pid {}", first.pid())),
        "a second daemon on the Azure lake was not refused by name:\n{text}"
    );
    assert!(
        !env.daemon_log().contains(crate::azurite::KEY),
        "the daemon logged the key"
    );
}

/// Data files (`.parquet` outside `_delta_log`) under `prefix`, and Delta checkpoints.
fn objects(bucket: &str, prefix: &str) -> (usize, usize) {
    let keys = s3_server::keys(bucket, prefix);
    let data = keys
        .iter()
        .filter(|k| k.ends_with(".parquet") && !k.contains("/_delta_log/"))
        .count();
    let checkpoints = keys
        .iter()
        .filter(|k| k.contains("/_delta_log/") && k.ends_with(".checkpoint.parquet"))
        .count();
    (data, checkpoints)
}

/// Everything else works on S3 unchanged: schema changes mid-stream, compaction, vacuum
/// (including a SIGKILLed batch's files), Delta checkpoints, time travel, `status`,
/// `resync` while the daemon runs, `reset-checkpoint` (refused while a daemon holds the
/// lease) and `teardown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_maintenance_time_travel_and_operator_commands_work_on_s3() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    s3_server::register_in_process();
    let env = Env::new_s3(SETUP).await;
    env.write_config(
        "postgres",
        TABLES,
        // Vacuum keeps 3.6 s: the endpoint reads the version of the last checkpoint
        // record, which a compaction right after it has already replaced.
        "[maintenance]\ncompact_min_files = 8\ncheck_interval_secs = 1\n\
         vacuum_retention_hours = 0.001\nvacuum_interval_hours = 0.003",
    );
    // One batch per transaction: many commits and small files for maintenance to handle.
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("max_batch_age_ms = 200", "max_batch_age_ms = 10");
    std::fs::write(&env.config, text).unwrap();
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    let bucket = env.object_lake.as_ref().unwrap().bucket.clone();

    // Where time travel will go back to: right after the snapshot.
    let lake = crate::sql::connect(&crate::sql::endpoint_dsn(env.serve_port, "analyst"))
        .await
        .expect("connect to the endpoint");
    let first_lsn = wait_for_position(&lake, "500").await;

    // A column added mid-stream, inside the transaction that first fills it, and one dropped.
    let client = env.pg.client().await;
    client
        .batch_execute(
            "BEGIN; ALTER TABLE conta ADD COLUMN categoria text; \
             INSERT INTO conta VALUES (1001, 1, 'com categoria', 'A'); \
             UPDATE conta SET categoria = 'B' WHERE id = 1; COMMIT; \
             ALTER TABLE \"Pedidos Ñ\" DROP COLUMN item; INSERT INTO \"Pedidos Ñ\" VALUES (1001);",
        )
        .await
        .unwrap();

    // Many one-transaction batches, with a SIGKILL among them, until the curated table and
    // the checkpoint table both have a Delta checkpoint.
    let mut rng = StdRng::seed_from_u64(15);
    let mut next_id = 2000;
    let mut i = 0;
    let started = Instant::now();
    loop {
        let sql = match rng.random_range(0..3) {
            0 => {
                next_id += 1;
                format!("INSERT INTO conta VALUES ({next_id}, {i}, 'n', 'C')")
            }
            1 => format!(
                "UPDATE conta SET saldo = saldo + 1 WHERE id = {}",
                rng.random_range(1..600)
            ),
            _ => format!("DELETE FROM conta WHERE id = {}", rng.random_range(1..600)),
        };
        client.batch_execute(&sql).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        i += 1;
        if i == 120 {
            daemon.kill9();
            daemon = env.daemon();
        }
        if i % 40 == 0 && i >= 200 {
            // Batches group transactions while S3 commits run: wait for 100 commits by time.
            let (_, curated) = objects(&bucket, "lake/curated/public/conta/");
            let (_, checkpoint) = objects(&bucket, "lake/_wal2delta/checkpoint/");
            if curated > 0 && checkpoint > 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "no Delta checkpoint after {i} transactions: {:?}",
                s3_server::keys(&bucket, "lake/_wal2delta/checkpoint/_delta_log/")
                    .iter()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>(),
            );
            assert!(
                daemon.is_running(),
                "the daemon stopped:\n{}",
                env.daemon_log()
            );
        }
    }
    // Vacuum comes every vacuum_interval_hours (10.8 s) after the restart, with a batch:
    // a daemon that reached the Delta checkpoints sooner gets a few more transactions.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !env.daemon_log().contains("vacuumed unreferenced files") && Instant::now() < deadline {
        client
            .batch_execute("UPDATE conta SET saldo = saldo + 1 WHERE id = 1001")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.wait_caught_up(Duration::from_secs(120)).await;
    assert_mirror(&env, "public.conta").await;
    assert_mirror(&env, "public.\"Pedidos Ñ\"").await;
    assert_no_duplicates(&env).await;
    let log = env.daemon_log();
    assert!(
        log.contains("compacted small files"),
        "no compaction ran:\n{log}"
    );
    assert!(
        log.contains("vacuumed unreferenced files"),
        "no vacuum ran:\n{log}"
    );

    // Vacuum keeps the bucket near the live files (the last batch's may still be running).
    let location = env.table_location("curated", "public", "conta");
    let deadline = Instant::now() + Duration::from_secs(90);
    let (live, on_store) = loop {
        let table = deltalake::open_table(url::Url::parse(&location).unwrap())
            .await
            .unwrap();
        let live = table.snapshot().unwrap().log_data().iter().count();
        let (on_store, _) = objects(&bucket, "lake/curated/public/conta/");
        if on_store <= live + 24 || Instant::now() > deadline {
            break (live, on_store);
        }
        // Maintenance runs after a batch, and vacuum keeps files 3.6 s: a batch now and
        // then lets it delete what the last compactions replaced. Not more often: each
        // batch writes a file and its compaction replaces some, and files replaced within
        // a vacuum interval (10.8 s) are rightly still on the store (two batches a second
        // kept the store right at the bound).
        client
            .batch_execute("UPDATE conta SET saldo = saldo WHERE id = (SELECT min(id) FROM conta)")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
    };
    println!(
        "figure: S3 maintenance: {i} transactions in {:?}, curated conta {live} live files, {on_store} on the store",
        started.elapsed()
    );
    assert!(
        live <= 24,
        "{live} live files after {i} batches: compaction did not keep up"
    );
    assert!(
        on_store <= live + 24,
        "{on_store} data files on S3 for {live} live ones: vacuum did not run"
    );

    // Time travel back to right after the snapshot, then to the present (the endpoint
    // went down with the SIGKILLed daemon: connect again).
    let lake = crate::sql::connect(&crate::sql::endpoint_dsn(env.serve_port, "analyst"))
        .await
        .expect("connect to the endpoint");
    lake.batch_execute(&format!("SET wal2delta.as_of = '{first_lsn}'"))
        .await
        .unwrap();
    assert_eq!(
        crate::sql::rows(&lake, "SELECT count(*) FROM conta").await,
        vec!["500"],
        "as of the snapshot"
    );
    lake.batch_execute("RESET wal2delta.as_of").await.unwrap();
    let now: i64 = client
        .query_one("SELECT count(*) FROM conta", &[])
        .await
        .unwrap()
        .get(0);
    wait_for_position(&lake, &now.to_string()).await;

    // status, and resync while the daemon runs.
    let (code, out) = wal2delta(&env, &["status"]);
    assert_eq!(code, 0, "status on S3:\n{out}");
    assert!(out.contains("conta"), "status names no table:\n{out}");
    let (code, out) = tokio::task::block_in_place(|| {
        wal2delta(
            &env,
            &["resync", "--table", "public.conta", "--wait", "120"],
        )
    });
    assert_eq!(code, 0, "resync on S3: {out}\n{}", env.daemon_log());
    assert_mirror(&env, "public.conta").await;

    // reset-checkpoint: refused while the lease is held, then copies the table again.
    let (code, out) = wal2delta(&env, &["reset-checkpoint", "--resnapshot", "--yes"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("daemon is running on this lake"), "{out}");
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    let (code, out) = wal2delta(
        &env,
        &[
            "reset-checkpoint",
            "--resnapshot",
            "--table",
            "public.conta",
            "--yes",
        ],
    );
    assert_eq!(code, 0, "reset-checkpoint on S3: {out}");
    client
        .batch_execute("INSERT INTO conta VALUES (9999, 9, 'depois', 'D')")
        .await
        .unwrap();
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    assert_mirror(&env, "public.conta").await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());

    // teardown drops the slot and the publication it did not create is kept.
    let (code, out) = wal2delta(&env, &["teardown", "--yes"]);
    assert_eq!(code, 0, "teardown on S3: {out}");
    let slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "teardown left the slot: {out}");
}

/// Waits until the endpoint counts `count` rows of `conta`; returns its position's LSN.
async fn wait_for_position(lake: &tokio_postgres::Client, count: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let position = crate::sql::rows(lake, "SHOW wal2delta.position").await[0].clone();
        let seen = crate::sql::rows(lake, "SELECT count(*) FROM conta").await;
        let again = crate::sql::rows(lake, "SHOW wal2delta.position").await[0].clone();
        if seen == vec![count.to_string()] && position == again {
            return position.split('|').next().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the endpoint serves {seen:?} rows of conta, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An AWS profile in the shared files supplies the credentials, region and endpoint, as
/// the AWS CLI's users expect; a profile named but absent is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_profile_supplies_credentials_region_and_endpoint() {
    let mut env = Env::new_s3(SETUP).await;
    let dir = env.dir.path().to_path_buf();
    let (credentials, config) = (dir.join("aws-credentials"), dir.join("aws-config"));
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = WRONG\naws_secret_access_key = wrong\n\n\
             [w2d]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            s3_server::ACCESS_KEY,
            s3_server::SECRET_KEY
        ),
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "[profile w2d]\nregion = {}\nendpoint_url = {}\n",
            s3_server::REGION,
            s3_server::endpoint()
        ),
    )
    .unwrap();
    // Only what a profile cannot say stays in the file.
    env.object_lake.as_mut().unwrap().storage = "[lake.storage]\nallow_http = true\n".into();
    env.write_config("postgres", TABLES, "");
    let files = [
        ("AWS_SHARED_CREDENTIALS_FILE", credentials.to_str().unwrap()),
        ("AWS_CONFIG_FILE", config.to_str().unwrap()),
    ];
    let with = |profile: &'static str| {
        let mut vars = files.to_vec();
        vars.push(("AWS_PROFILE", profile));
        vars
    };

    let (code, out) = wal2delta_with(&env, &["validate"], &with("w2d"));
    assert_eq!(code, 0, "validate with AWS_PROFILE=w2d:\n{out}");
    assert!(
        out.contains("AWS profile w2d") && out.contains("conditional writes"),
        "validate does not say where the credentials came from:\n{out}"
    );
    assert!(!out.contains(s3_server::SECRET_KEY), "{out}");
    let (code, out) = wal2delta_with(&env, &["validate"], &with("nope"));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("the AWS profile `nope` is in neither"),
        "a missing profile is not named:\n{out}"
    );

    let mut daemon = Daemon::start(&env.config, &dir.join("daemon.log"), &with("w2d"));
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.conta").await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}
