//! Faults: the daemon SIGKILLed at random moments, Postgres restarted mid-stream. After
//! recovery every source change is in the raw tables exactly once, compared against a
//! ground truth recorded on the source side by triggers (an unpublished `audit` table that
//! commits or rolls back together with the change itself, savepoints included).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;

use crate::harness::{Env, count_delta, query_delta, query_delta_at};

const SETUP: &str = r#"
CREATE TABLE acct (id int PRIMARY KEY, v bigint NOT NULL, note text);
CREATE TABLE item (id int PRIMARY KEY, v bigint NOT NULL, payload text);
CREATE TABLE audit (n bigserial PRIMARY KEY, tbl text NOT NULL, op text NOT NULL, id int NOT NULL, v bigint);
CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO audit (tbl, op, id, v) VALUES (TG_TABLE_NAME, 'd', OLD.id, NULL);
  ELSE
    INSERT INTO audit (tbl, op, id, v) VALUES (TG_TABLE_NAME, CASE TG_OP WHEN 'INSERT' THEN 'c' ELSE 'u' END, NEW.id, NEW.v);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER acct_audit AFTER INSERT OR UPDATE OR DELETE ON acct FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER item_audit AFTER INSERT OR UPDATE OR DELETE ON item FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE PUBLICATION w2d_pub FOR TABLE acct, item;
"#;

/// Random transactions written until stopped, reconnecting after errors (Postgres restarts).
struct Workload {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// What the workload's transactions look like.
#[derive(Clone, Copy)]
enum Shape {
    /// Mostly 1 to 8 changes, 3% of 400.
    Small,
    /// As `Small`, and one in five of 1,500 changes with savepoints, some rolled back,
    /// a quarter of them aborted whole: past a 64 kB `logical_decoding_work_mem`, Postgres
    /// streams them while they run.
    Large,
}

impl Workload {
    fn start(dsn: String) -> Workload {
        Workload::start_shaped(dsn, Shape::Small)
    }

    fn start_shaped(dsn: String, shape: Shape) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let task = spawn_workload(dsn, stop.clone(), committed.clone(), shape);
        Workload {
            stop,
            committed,
            task,
        }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
    }
}

/// Writes random transactions until stopped, reconnecting after errors (Postgres restarts).
fn spawn_workload(
    dsn: String,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    shape: Shape,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let Ok((client, conn)) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await
            else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = conn.await;
            });
            while !stop.load(Ordering::Relaxed) {
                let sql = {
                    let mut rng = rand::rng();
                    let large = matches!(shape, Shape::Large) && rng.random_bool(0.2);
                    let ops = if large {
                        1500
                    } else if rng.random_bool(0.03) {
                        400
                    } else {
                        rng.random_range(1..=8)
                    };
                    let mut sql = String::from("BEGIN;");
                    for op in 0..ops {
                        if large && op % 250 == 0 {
                            if op > 0 {
                                sql.push_str(if rng.random_bool(0.4) {
                                    "ROLLBACK TO SAVEPOINT s;"
                                } else {
                                    "RELEASE SAVEPOINT s;"
                                });
                            }
                            sql.push_str("SAVEPOINT s;");
                        }
                        let table = if rng.random_bool(0.5) { "acct" } else { "item" };
                        let id: u32 = rng.random_range(1..=300);
                        let v: u32 = rng.random_range(0..1_000_000);
                        match rng.random_range(0..10) {
                            0..=4 => sql.push_str(&format!(
                                "INSERT INTO {table} (id, v, {col}) VALUES ({id}, {v}, repeat('p', {len})) ON CONFLICT (id) DO NOTHING;",
                                col = if table == "acct" { "note" } else { "payload" },
                                len = v % 300
                            )),
                            5..=7 => sql.push_str(&format!("UPDATE {table} SET v = v + 1 WHERE id = {id};")),
                            _ => sql.push_str(&format!("DELETE FROM {table} WHERE id = {id};")),
                        }
                    }
                    sql.push_str(if large && rng.random_bool(0.25) {
                        "ROLLBACK;"
                    } else {
                        "COMMIT;"
                    });
                    sql
                };
                if client.batch_execute(&sql).await.is_err() {
                    break;
                }
                committed.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

type Multiset = BTreeMap<(String, String, String, Option<String>), usize>;

/// The audit table's changes, as a multiset of (table, op, id, value).
async fn ground_truth(env: &Env) -> Multiset {
    let pg = env.pg.client().await;
    let mut out = Multiset::new();
    for row in pg
        .query("SELECT tbl, op, id::text, v::text FROM audit", &[])
        .await
        .unwrap()
    {
        *out.entry((row.get(0), row.get(1), row.get(2), row.get(3)))
            .or_default() += 1;
    }
    out
}

/// The raw tables' changes in the same shape, checking no change position repeats.
async fn lake_changes(env: &Env) -> Multiset {
    let mut out = Multiset::new();
    for table in ["acct", "item"] {
        let raw = env.table_location("raw", "public", table);
        let dups = query_delta_at(
            &raw,
            "SELECT _commit_lsn, _seq, count(*) FROM t GROUP BY 1, 2 HAVING count(*) > 1",
        )
        .await;
        assert!(
            dups.is_empty(),
            "raw.{table} holds duplicated changes: {dups:?}"
        );
        for row in query_delta_at(
            &raw,
            "SELECT _op, CAST(id AS VARCHAR), CAST(v AS VARCHAR) FROM t",
        )
        .await
        {
            let [op, id, v] = [row[0].clone(), row[1].clone(), row[2].clone()];
            let key = (
                table.to_string(),
                op.unwrap_or_default(),
                id.unwrap_or_default(),
                v,
            );
            *out.entry(key).or_default() += 1;
        }
    }
    out
}

fn compare(truth: &Multiset, lake: &Multiset, label: &str, faults: usize) {
    let total: usize = truth.values().sum();
    let mut lost = 0usize;
    let mut duplicated = 0usize;
    for (k, n) in truth {
        let m = lake.get(k).copied().unwrap_or(0);
        lost += n.saturating_sub(m);
        duplicated += m.saturating_sub(*n);
    }
    for (k, m) in lake {
        if !truth.contains_key(k) {
            duplicated += m;
        }
    }
    println!(
        "figure: {label}: faults injected {faults}, rows compared {total}, rows lost {lost}, rows duplicated {duplicated}"
    );
    assert!(total > 0, "the workload produced no changes");
    assert_eq!(
        (lost, duplicated),
        (0, 0),
        "{label}: the raw tables differ from the source's audit log"
    );
}

/// Waits until everything written is durable, then compares lake and audit log.
async fn verify_exactly_once(env: &Env, label: &str, faults: usize, timeout: Duration) {
    env.wait_caught_up(timeout).await;
    let truth = ground_truth(env).await;
    let lake = lake_changes(env).await;
    compare(&truth, &lake, label, faults);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let (env, daemon) = Env::streaming(SETUP, &["public.acct", "public.item"]).await;
    sigkill_rounds(env, daemon, "sigkill").await;
}

/// Transactions past `logical_decoding_work_mem` stream while they run (protocol 2):
/// SIGKILLs land in the middle of streamed, aborted and partly rolled-back ones, and the
/// lake still holds every committed change once and nothing of the aborted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_transactions_stream_loses_and_duplicates_nothing() {
    let env = Env::new(SETUP).await;
    let pg = env.pg.client().await;
    pg.batch_execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'")
        .await
        .unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    env.write_config("postgres", &["public.acct", "public.item"], "");
    let daemon = env.daemon();
    env.wait_streaming().await;
    let label = "sigkill with streamed transactions";
    let daemon = kill_rounds(&env, daemon, Shape::Large, label).await;
    let streamed: i64 = pg
        .query_one(
            "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    println!("figure: {label}: transactions streamed by Postgres {streamed}");
    assert!(streamed > 0, "Postgres streamed no transaction");
    for table in ["acct", "item"] {
        crate::curated::assert_mirror(&env, table).await;
    }
    stop_cleanly(&env, daemon);
}

/// The same on a lake in S3: each new daemon first waits out the killed one's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_on_an_s3_lake_loses_and_duplicates_nothing() {
    let env = Env::new_s3(SETUP).await;
    env.write_config("postgres", &["public.acct", "public.item"], "");
    let daemon = env.daemon();
    env.wait_streaming().await;
    sigkill_rounds(env, daemon, "sigkill on S3").await;
}

/// SIGKILLs the daemon at random moments under a random workload, then checks the raw
/// tables against the source's audit log.
async fn sigkill_rounds(env: Env, daemon: crate::harness::Daemon, label: &str) {
    let daemon = kill_rounds(&env, daemon, Shape::Small, label).await;
    stop_cleanly(&env, daemon);
}

/// A clean stop after all that exits 0.
fn stop_cleanly(env: &Env, mut daemon: crate::harness::Daemon) {
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "SIGTERM exit status {status:?}\n{}",
        env.daemon_log()
    );
}

/// The kills of [`sigkill_rounds`] and the comparison; the last daemon is still running.
async fn kill_rounds(
    env: &Env,
    mut daemon: crate::harness::Daemon,
    shape: Shape,
    label: &str,
) -> crate::harness::Daemon {
    let workload = Workload::start_shaped(env.pg.dsn("postgres"), shape);
    // W2D_FAULT_ROUNDS raises the count for the extended run (bench/reliability.sh --extended).
    let kills = std::env::var("W2D_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    for i in 0..kills {
        // A random moment: the fault's timing is the point, not a wait for a condition.
        let pause = rand::rng().random_range(200..1800);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        daemon.kill9();
        println!(
            "kill {i}: after {pause} ms, {} source transactions so far",
            workload.committed()
        );
        daemon = env.daemon();
        crate::curated::wait_for_lease(env, i + 2).await;
    }
    workload.stop().await;
    verify_exactly_once(env, label, kills, Duration::from_secs(180)).await;
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_loses_nothing() {
    let (env, mut daemon) = Env::streaming(SETUP, &["public.acct", "public.item"]).await;
    let workload = Workload::start(env.pg.dsn("postgres"));
    let raw = env.raw_path("public", "acct");
    for mode in ["fast", "immediate"] {
        let before = count_delta(&raw).await;
        env.wait_raw_rows("public", "acct", before + 1, Duration::from_secs(60))
            .await;
        env.pg.restart(mode);
        println!(
            "postgres restarted ({mode}) after {} source transactions",
            workload.committed()
        );
        let after = count_delta(&raw).await;
        env.wait_raw_rows("public", "acct", after + 1, Duration::from_secs(90))
            .await;
    }
    workload.stop().await;
    verify_exactly_once(&env, "postgres restart", 2, Duration::from_secs(120)).await;
    assert!(
        daemon.is_running(),
        "the daemon must survive Postgres restarts\n{}",
        env.daemon_log()
    );
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "SIGTERM exit status {status:?}");
}

/// The replication connection cut while a large transaction is being streamed: the daemon
/// commits nothing of the partial batch, reconnects, and ends with every row exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_inside_a_transaction_reconnects_and_loses_nothing() {
    let setup = "CREATE TABLE wide (id bigint PRIMARY KEY, payload text NOT NULL);
                 CREATE PUBLICATION w2d_pub FOR TABLE wide;";
    // Each transaction (about 50 MB decoded) stays under the server's 64 MB
    // logical_decoding_work_mem, so Postgres sends it over the connection after its
    // commit, where a cut can land inside it. (With the daemon's 8 MiB it would be
    // streamed while it runs and read back from a spill file, which a cut does not stop.)
    let env = Env::new(setup).await;
    env.write_config("postgres", &["public.wide"], "decoding_work_mem_mb = 0");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let pg = env.pg.client().await;
    let per_txn: i64 = 200_000;
    let mut cuts = 0;
    let mut inserted = 0;
    for attempt in 0..8u64 {
        pg.batch_execute(&format!(
            "INSERT INTO wide SELECT g, repeat(md5(g::text), 4) FROM generate_series({}, {}) g",
            inserted + 1,
            inserted + per_txn
        ))
        .await
        .unwrap();
        inserted += per_txn;
        // Give the walsender a moment to start sending the transaction, then cut it. The
        // delay grows per attempt so that machines of any pace land inside the window.
        tokio::time::sleep(Duration::from_millis(200 + 200 * attempt)).await;
        pg.batch_execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'w2d_test' AND active",
        )
        .await
        .unwrap();
        cuts += 1;
        if env
            .daemon_log()
            .contains("stream ended inside a transaction")
        {
            println!("cut inside a transaction on attempt {attempt}");
            break;
        }
        env.wait_caught_up(Duration::from_secs(120)).await;
    }
    assert!(
        env.daemon_log()
            .contains("stream ended inside a transaction"),
        "no cut landed inside a transaction in {cuts} attempts; the test did not exercise its case"
    );
    env.wait_caught_up(Duration::from_secs(180)).await;
    assert!(
        daemon.is_running(),
        "the daemon must reconnect after a cut\n{}",
        env.daemon_log()
    );
    let raw = env.raw_path("public", "wide");
    assert_eq!(count_delta(&raw).await, inserted, "every row exactly once");
    let dups = query_delta(
        &raw,
        "SELECT id FROM t GROUP BY id HAVING count(*) > 1 LIMIT 1",
    )
    .await;
    assert!(dups.is_empty(), "duplicated rows: {dups:?}");
    println!(
        "figure: connection cuts: faults injected {cuts}, rows compared {inserted}, rows lost 0, rows duplicated 0"
    );
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

/// A TCP proxy between the daemon and Postgres that the test can cut (drop every open
/// connection) or stall (stop forwarding for a while) at will.
struct Proxy {
    port: u16,
    generation: Arc<AtomicU64>,
    stalled: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = Arc::new(AtomicU64::new(0));
        let stalled = Arc::new(AtomicBool::new(false));
        let (g, s) = (generation.clone(), stalled.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let born = g.load(Ordering::SeqCst);
                let (g, s) = (g.clone(), s.clone());
                tokio::spawn(async move {
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let pipe = |mut r: tokio::net::tcp::OwnedReadHalf,
                                mut w: tokio::net::tcp::OwnedWriteHalf,
                                g: Arc<AtomicU64>,
                                s: Arc<AtomicBool>| async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            if g.load(Ordering::SeqCst) != born {
                                return;
                            }
                            if s.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                            let n = match tokio::time::timeout(
                                Duration::from_millis(100),
                                r.read(&mut buf),
                            )
                            .await
                            {
                                Err(_) => continue,
                                Ok(Ok(0)) | Ok(Err(_)) => return,
                                Ok(Ok(n)) => n,
                            };
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let up = pipe(cr, sw, g.clone(), s.clone());
                    let down = pipe(sr, cw, g, s);
                    // Either side ending (or a cut) drops both halves: the TCP connection closes.
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        Proxy {
            port,
            generation,
            stalled,
        }
    }

    fn cut(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }
}

/// The daemon reaches Postgres through a proxy that cuts or stalls its connections at
/// random moments while a workload runs: it reconnects and converges, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cuts_and_stalls_lose_and_duplicate_nothing() {
    let env = Env::new(SETUP).await;
    let proxy = Proxy::start(env.pg.port).await;
    env.write_config("postgres", &["public.acct", "public.item"], "");
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        &format!("port={}", env.pg.port),
        &format!("port={}", proxy.port),
    );
    std::fs::write(&env.config, text).unwrap();
    let daemon = env.daemon();
    env.wait_streaming().await;
    let workload = Workload::start(env.pg.dsn("postgres"));
    let mut faults = 0;
    for i in 0..10 {
        let pause = rand::rng().random_range(300..1500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if i % 3 == 2 {
            proxy.stall(true);
            tokio::time::sleep(Duration::from_millis(rand::rng().random_range(500..3000))).await;
            proxy.stall(false);
            println!(
                "stall {i}: {} source transactions so far",
                workload.committed()
            );
        } else {
            proxy.cut();
            println!(
                "cut {i}: {} source transactions so far",
                workload.committed()
            );
        }
        faults += 1;
    }
    workload.stop().await;
    verify_exactly_once(
        &env,
        "proxy cuts and stalls",
        faults,
        Duration::from_secs(180),
    )
    .await;
    let mut daemon = daemon;
    assert!(
        daemon.is_running(),
        "the daemon must ride out cuts\n{}",
        env.daemon_log()
    );
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

/// Postgres restarted (immediate mode) while the initial snapshot copies: the daemon copies
/// the unfinished tables again and then streams; the snapshot rows and every later change
/// are in the lake exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_during_the_snapshot_loses_and_duplicates_nothing() {
    let env = Env::new(SETUP).await;
    // Rows that exist before the slot: the audit log records them as inserts, the lake
    // as snapshot reads.
    env.pg
        .client()
        .await
        .batch_execute(
            "INSERT INTO acct SELECT g, g, repeat('n', 200) FROM generate_series(1000, 250000) g;
             INSERT INTO item SELECT g, g, repeat('p', 200) FROM generate_series(1000, 250000) g;",
        )
        .await
        .unwrap();
    env.write_config(
        "postgres",
        &["public.acct", "public.item"],
        "snapshot_workers = 2\nsnapshot_chunk_mb = 2",
    );
    let mut daemon = env.daemon();
    crate::harness::wait_for(
        "the snapshot to start",
        Duration::from_secs(60),
        || async { env.daemon_log().contains("initial snapshot started") },
        || env.daemon_log(),
    )
    .await;
    // Soon after the start: the first table's copy (250,000 rows) took well over 100 ms
    // in a debug build, but under 600 ms once each row was encoded once.
    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..100))).await;
    let interrupted = !env.daemon_log().contains("table snapshot committed");
    env.pg.restart("immediate");
    env.wait_streaming().await;
    let workload = Workload::start(env.pg.dsn("postgres"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    workload.stop().await;
    env.wait_caught_up(Duration::from_secs(180)).await;
    let truth = ground_truth(&env).await;
    let lake: Multiset =
        lake_changes(&env)
            .await
            .into_iter()
            .fold(Multiset::new(), |mut m, ((t, op, id, v), n)| {
                let op = if op == "r" { "c".to_string() } else { op };
                *m.entry((t, op, id, v)).or_default() += n;
                m
            });
    compare(&truth, &lake, "postgres restart during the snapshot", 1);
    for table in ["public.acct", "public.item"] {
        crate::curated::assert_mirror(&env, table).await;
    }
    assert!(
        interrupted,
        "the snapshot finished before the restart; the test did not exercise its case"
    );
    assert!(daemon.is_running(), "{}", env.daemon_log());
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

/// The lake's storage fails under the running daemon (a raw table's directory replaced by a
/// file, so every write there fails): the daemon stops applying, confirms nothing past what
/// is durable, says which table fails, keeps the slot, and once the storage is back it
/// resumes with every change exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_storage_failure_pauses_without_confirming_and_resumes_exactly_once() {
    let (env, mut daemon) = Env::streaming(SETUP, &["public.acct", "public.item"]).await;
    let workload = Workload::start(env.pg.dsn("postgres"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let table = env.raw_path("public", "acct");
    let away = table.with_extension("away");
    std::fs::rename(&table, &away).unwrap();
    std::fs::write(&table, "not a directory").unwrap();
    // The failure shows in the log; from then on the confirmed position must not move.
    crate::harness::wait_for(
        "the daemon to report the failing table",
        Duration::from_secs(60),
        || async {
            env.daemon_log().contains("raw.public.acct") && env.daemon_log().contains("WARN")
        },
        || env.daemon_log(),
    )
    .await;
    let during = env.confirmed_flush().await;
    // Not a timed window: wait until the daemon has retried the failing write twice more,
    // each retry a session that found the storage still broken.
    let retries = || {
        env.daemon_log()
            .matches("replication interrupted; reconnecting")
            .count()
    };
    let before = retries();
    crate::harness::wait_for(
        "two more retries of the failing write",
        Duration::from_secs(60),
        || async move { retries() >= before + 2 },
        || env.daemon_log(),
    )
    .await;
    assert_eq!(
        env.confirmed_flush().await,
        during,
        "the slot advanced while the lake could not be written"
    );
    assert!(
        daemon.is_running(),
        "the daemon must wait for the storage, not exit\n{}",
        env.daemon_log()
    );
    std::fs::remove_file(&table).unwrap();
    std::fs::rename(&away, &table).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    workload.stop().await;
    verify_exactly_once(&env, "lake storage failure", 1, Duration::from_secs(180)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

/// An HTTP proxy between the daemon and the S3 server that injects object-store faults on
/// a share of the connections (`per_mille`): a reset before any answer, `503 SlowDown`,
/// `500 InternalError`, a stall past the client's timeout, or a forwarded connection cut
/// after a random number of bytes (a reset mid-request or mid-answer).
struct S3FaultProxy {
    port: u16,
    per_mille: Arc<AtomicU64>,
    injected: Arc<[AtomicU64; 5]>,
}

const S3_FAULTS: [&str; 5] = ["reset", "503 SlowDown", "500", "stall", "cut mid-stream"];

impl S3FaultProxy {
    async fn start(target: u16) -> S3FaultProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let per_mille = Arc::new(AtomicU64::new(0));
        let injected: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
        let (rate, counts) = (per_mille.clone(), injected.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let (rate, counts) = (rate.clone(), counts.clone());
                tokio::spawn(async move {
                    let (roll, kind, cut_after) = {
                        let mut rng = rand::rng();
                        (
                            rng.random_range(0..1000),
                            rng.random_range(0..S3_FAULTS.len()),
                            rng.random_range(100..200_000usize),
                        )
                    };
                    let fault = (roll < rate.load(Ordering::Relaxed)).then_some(kind);
                    if let Some(k) = fault {
                        counts[k].fetch_add(1, Ordering::Relaxed);
                    }
                    let answer = |status: &str, code: &str| {
                        let body = format!(
                            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected</Message></Error>"
                        );
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    match fault {
                        Some(0) => return, // reset: dropped unanswered
                        Some(k @ (1 | 2)) => {
                            let mut head = vec![0u8; 16 * 1024];
                            let _ = client.read(&mut head).await;
                            let text = if k == 1 {
                                answer("503 Slow Down", "SlowDown")
                            } else {
                                answer("500 Internal Server Error", "InternalError")
                            };
                            let _ = client.write_all(text.as_bytes()).await;
                            return;
                        }
                        Some(3) => {
                            tokio::time::sleep(Duration::from_secs(8)).await;
                            return;
                        }
                        _ => {}
                    }
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    if fault == Some(4) {
                        // Forward until `cut_after` bytes went either way, then drop both.
                        let (mut cr, mut cw) = client.split();
                        let (mut sr, mut sw) = server.split();
                        let mut budget = cut_after;
                        let mut up = vec![0u8; 16 * 1024];
                        let mut down = vec![0u8; 16 * 1024];
                        while budget > 0 {
                            tokio::select! {
                                n = cr.read(&mut up) => match n {
                                    Ok(n) if n > 0 => {
                                        let n = n.min(budget);
                                        budget -= n;
                                        if sw.write_all(&up[..n]).await.is_err() { return; }
                                    }
                                    _ => return,
                                },
                                n = sr.read(&mut down) => match n {
                                    Ok(n) if n > 0 => {
                                        let n = n.min(budget);
                                        budget -= n;
                                        if cw.write_all(&down[..n]).await.is_err() { return; }
                                    }
                                    _ => return,
                                },
                            }
                        }
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        S3FaultProxy {
            port,
            per_mille,
            injected,
        }
    }

    fn set_rate(&self, per_mille: u64) {
        self.per_mille.store(per_mille, Ordering::Relaxed);
    }

    fn injected(&self) -> Vec<(&'static str, u64)> {
        S3_FAULTS
            .iter()
            .zip(self.injected.iter())
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Object-store faults between the daemon and S3 while a workload runs: the daemon pauses
/// and retries, never confirms to Postgres what is not durable (a SIGKILL after the faults
/// and a restart would lose those changes), and the raw tables hold every change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_faults_pause_and_retry_and_lose_nothing() {
    let mut env = Env::new_s3(SETUP).await;
    let proxy = S3FaultProxy::start(crate::s3_server::port()).await;
    let lake = env.object_lake.as_mut().unwrap();
    lake.storage = lake.storage.replace(
        &crate::s3_server::endpoint(),
        &format!("http://127.0.0.1:{}", proxy.port),
    ) + "timeout = \"3s\"\nconnect_timeout = \"2s\"\n";
    env.write_config("postgres", &["public.acct", "public.item"], "");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let workload = Workload::start(env.pg.dsn("postgres"));
    // One connection in eight gets a fault, for 25 s.
    proxy.set_rate(125);
    tokio::time::sleep(Duration::from_secs(25)).await;
    let injected = proxy.injected();
    let total: u64 = injected.iter().map(|(_, n)| n).sum();
    println!("faults injected: {injected:?}");
    assert!(
        daemon.is_running(),
        "the daemon stopped under object-store faults instead of pausing and retrying:\n{}",
        env.daemon_log()
    );
    // Whatever it confirmed must be durable: kill it, clear the faults, start again.
    daemon.kill9();
    proxy.set_rate(0);
    let _daemon = env.daemon();
    crate::curated::wait_for_lease(&env, 2).await;
    workload.stop().await;
    verify_exactly_once(
        &env,
        "object-store faults",
        total as usize,
        Duration::from_secs(180),
    )
    .await;
    assert!(
        injected.iter().all(|(_, n)| *n > 0),
        "not every kind of fault was injected: {injected:?}"
    );
}
