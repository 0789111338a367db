//! Faults: the daemon SIGKILLed at random moments, Postgres restarted mid-stream. After
//! recovery every source change is in the raw tables exactly once, compared against a
//! ground truth recorded on the source side by triggers (an unpublished `audit` table that
//! commits or rolls back together with the change itself).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;

use crate::harness::{Env, count_delta, query_delta};

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

impl Workload {
    fn start(dsn: String) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let task = spawn_workload(dsn, stop.clone(), committed.clone());
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
                    let ops = if rng.random_bool(0.03) {
                        400
                    } else {
                        rng.random_range(1..=8)
                    };
                    let mut sql = String::from("BEGIN;");
                    for _ in 0..ops {
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
                    sql.push_str("COMMIT;");
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
        let raw = env.raw_path("public", table);
        let dups = query_delta(
            &raw,
            "SELECT _commit_lsn, _seq, count(*) FROM t GROUP BY 1, 2 HAVING count(*) > 1",
        )
        .await;
        assert!(
            dups.is_empty(),
            "raw.{table} holds duplicated changes: {dups:?}"
        );
        for row in query_delta(
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
    let (env, mut daemon) = Env::streaming(SETUP, &["public.acct", "public.item"]).await;
    let workload = Workload::start(env.pg.dsn("postgres"));
    let kills = 12;
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
    }
    workload.stop().await;
    verify_exactly_once(&env, "sigkill", kills, Duration::from_secs(180)).await;
    // A clean stop after all that exits 0.
    let status = daemon.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "SIGTERM exit status {status:?}\n{}",
        env.daemon_log()
    );
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
    let (env, mut daemon) = Env::streaming(setup, &["public.wide"]).await;
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
