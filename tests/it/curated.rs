//! Curated tables: the initial snapshot and the exactly-once merge keep each curated table
//! an exact mirror of its source table, compared row by row (both directions) against the
//! source after random workloads, SIGKILLs (also during the snapshot), TOAST-only updates
//! and key changes; a one-row update rewrites at most one data file.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::harness::{Env, query_delta, query_delta_at, require_python_deltalake};

const FOUR_TABLES: [&str; 4] = [
    "public.condominios",
    "public.imoveis",
    "public.moradores",
    "public.transacoes",
];

/// The demo schema and sample data, plus enough extra rows that the snapshot takes a while
/// and is copied in several chunks.
fn demo_setup(extra_rows: u32) -> String {
    format!(
        "{}\n{}\nINSERT INTO transacoes (imovel_id, tipo, status, valor, competencia, vencimento, detalhes) \
         SELECT 1 + g % 400, 'taxa_condominial', 'aberta', (g % 1000) + 0.5, '2025-01', date '2025-01-10', \
         jsonb_build_object('lote', g) FROM generate_series(1, {extra_rows}) g;\n\
         CREATE PUBLICATION w2d_pub FOR TABLE condominios, imoveis, moradores, transacoes;",
        include_str!("../../sql/schema.sql"),
        include_str!("../../sql/sample_data.sql").replace("\\gset", ";"),
    )
}

/// Canonical text of every row, but for the columns `skip`: the same expression per
/// column on both sides.
async fn source_rows_without(env: &Env, table: &str, skip: &[&str]) -> (Vec<String>, Vec<String>) {
    let client = env.pg.client().await;
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&table],
        )
        .await
        .expect("columns");
    let mut pg_exprs = Vec::new();
    let mut df_exprs = Vec::new();
    for row in cols {
        let name: String = row.get(0);
        if skip.contains(&name.as_str()) {
            continue;
        }
        let ty: String = row.get(1);
        let q = format!("\"{name}\"");
        let (pg, df) = if ty.starts_with("timestamp") {
            (
                format!("((extract(epoch from {q}) * 1000000)::bigint)::text"),
                format!("CAST(CAST({q} AS BIGINT) AS VARCHAR)"),
            )
        } else if ty == "bytea" {
            (format!("encode({q}, 'hex')"), format!("encode({q}, 'hex')"))
        } else if ty.ends_with("[]") {
            (
                format!("'[' || array_to_string({q}, ', ') || ']'"),
                format!("CAST({q} AS VARCHAR)"),
            )
        } else {
            (format!("{q}::text"), format!("CAST({q} AS VARCHAR)"))
        };
        pg_exprs.push(format!("coalesce({pg}, '<null>')"));
        df_exprs.push(format!("coalesce({df}, '<null>')"));
    }
    let pg_sql = format!(
        "SELECT concat_ws(' | ', {}) FROM {table}",
        pg_exprs.join(", ")
    );
    let source: Vec<String> = client
        .query(&pg_sql, &[])
        .await
        .expect("source rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The lake's path segments (escaped names), as the daemon writes them.
    let segments = wal2delta::table_name::TableName::parse(table)
        .expect("table name")
        .path_segments();
    let (schema, name) = segments.split_once('/').unwrap();
    let df_sql = format!("SELECT concat_ws(' | ', {}) FROM t", df_exprs.join(", "));
    let curated: Vec<String> =
        query_delta_at(&env.table_location("curated", schema, name), &df_sql)
            .await
            .into_iter()
            .map(|r| r[0].clone().unwrap_or_default())
            .collect();
    (source, curated)
}

/// Asserts the curated table holds exactly the source table's rows.
pub async fn assert_mirror(env: &Env, table: &str) {
    assert_mirror_without(env, table, &[]).await
}

/// Asserts the curated table holds exactly the source table's rows, but for `skip`.
pub async fn assert_mirror_without(env: &Env, table: &str, skip: &[&str]) {
    let (source, curated) = source_rows_without(env, table, skip).await;
    let s: BTreeSet<&String> = source.iter().collect();
    let c: BTreeSet<&String> = curated.iter().collect();
    let missing: Vec<_> = s.difference(&c).take(5).collect();
    let extra: Vec<_> = c.difference(&s).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && source.len() == curated.len(),
        "{table}: source has {} rows, curated {}; missing from curated {missing:#?}; \
         not in source {extra:#?}\n--- daemon log ---\n{}",
        source.len(),
        curated.len(),
        env.daemon_log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Random changes across the four tables until stopped: inserts, updates (some changing
/// the key, some touching only small columns of rows with TOASTed values), deletes and
/// one truncate. Statements that break a constraint are simply skipped.
fn spawn_workload(dsn: String, seed: u64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .expect("workload connects");
        tokio::spawn(conn);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut done = 0u64;
        let mut truncated = false;
        while !stop.load(Ordering::Relaxed) {
            let n = rng.random_range(1..2000);
            // Random hex over the TOAST threshold that pglz cannot shrink below it.
            let big: String = (0..rng.random_range(100..200))
                .map(|_| format!("{:032x}", rng.random::<u128>()))
                .collect();
            let sql = match rng.random_range(0..14) {
                0 => format!(
                    "INSERT INTO condominios (nome, cnpj, taxa_base) VALUES ('Novo {n}', 'X{}', {n}.25)",
                    rng.random::<u64>()
                ),
                1 => format!(
                    "UPDATE condominios SET taxa_base = taxa_base + 1, endereco = '{{\"n\": {n}}}' WHERE id = 1 + {n} % 10"
                ),
                2 => format!(
                    "UPDATE imoveis SET ocupado = NOT ocupado, area_m2 = {n}.5 WHERE id = 1 + {n} % 400"
                ),
                3 => format!(
                    "INSERT INTO moradores (imovel_id, nome, tipo, tags, foto, observacoes) \
                     VALUES (1 + {n} % 400, 'M{n}', 'inquilino', ARRAY['t{n}'], '\\x{:08x}', '{big}')",
                    rng.random::<u32>()
                ),
                // TOAST-only: the big observacoes column is not sent, only marked unchanged.
                4 => format!(
                    "UPDATE moradores SET telefone = '{n}' WHERE id IN (SELECT id FROM moradores WHERE observacoes IS NOT NULL ORDER BY id OFFSET {} LIMIT 3)",
                    n % 50
                ),
                // Key change of an unreferenced resident (with its TOASTed value unchanged).
                5 => format!(
                    "UPDATE moradores SET id = id + 100000, email = 'k{n}' WHERE id = (SELECT m.id FROM moradores m \
                     WHERE m.id < 100000 AND m.observacoes IS NOT NULL AND NOT EXISTS \
                     (SELECT 1 FROM transacoes t WHERE t.morador_id = m.id) ORDER BY m.id OFFSET {} LIMIT 1)",
                    n % 20
                ),
                6 => format!(
                    "DELETE FROM moradores m WHERE id = (SELECT m2.id FROM moradores m2 WHERE NOT EXISTS (SELECT 1 FROM transacoes t WHERE t.morador_id = m2.id) ORDER BY m2.id DESC OFFSET {} LIMIT 1)",
                    n % 30
                ),
                7 | 8 => format!(
                    "INSERT INTO transacoes (imovel_id, tipo, status, valor, competencia, vencimento, \
                     data_pagamento_informada, valor_informado) \
                     SELECT 1 + (g * {n}) % 400, 'multa', 'aberta', {n}.10, '2025-02', date '2025-02-10', '05/02/2025', 'R$ 1.{n:03},00' \
                     FROM generate_series(1, {}) g",
                    rng.random_range(1..50)
                ),
                9 => format!(
                    "UPDATE transacoes SET status = 'paga', pago_em = now(), valor_informado = '{n},99' WHERE id % 97 = {}",
                    n % 97
                ),
                10 => format!(
                    "UPDATE transacoes SET id = id + 10000000 WHERE id = (SELECT max(id) FROM transacoes WHERE id < 10000000) - {}",
                    n % 10
                ),
                11 => format!("DELETE FROM transacoes WHERE id % 211 = {}", n % 211),
                12 => format!(
                    "BEGIN; INSERT INTO condominios (nome, cnpj) VALUES ('T{n}', 'Y{}'); \
                     UPDATE imoveis SET bloco = 'Z' WHERE id = 1 + {n} % 400; COMMIT",
                    rng.random::<u64>()
                ),
                _ if !truncated && done > 150 => {
                    truncated = true;
                    "TRUNCATE transacoes".to_string()
                }
                _ => format!(
                    "UPDATE moradores SET ativo = NOT ativo WHERE id % 13 = {}",
                    n % 13
                ),
            };
            if client.batch_execute(&sql).await.is_ok() {
                done += 1;
            } else {
                let _ = client.batch_execute("ROLLBACK").await;
            }
        }
        done
    })
}

/// On an object-store lake, waits until the `nth` daemon started on `env` holds the lease.
pub async fn wait_for_lease(env: &Env, nth: usize) {
    if env.object_lake.is_none() {
        return;
    }
    crate::harness::wait_for(
        "the new daemon to hold the lake's lease",
        Duration::from_secs(60),
        || async { env.daemon_log().matches("holding the lake's lease").count() >= nth },
        || env.daemon_log(),
    )
    .await;
}

async fn config_for(env: &Env) {
    env.write_config(
        "postgres",
        &FOUR_TABLES,
        "snapshot_workers = 3\nsnapshot_chunk_mb = 1\n[transform]\nrules = []",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curated_tables_mirror_a_random_workload_during_and_after_the_snapshot() {
    let env = Env::new(&demo_setup(120_000)).await;
    config_for(&env).await;
    let stop = Arc::new(AtomicBool::new(false));
    let _daemon = env.daemon();
    // Writes start while the snapshot is being taken.
    let workload = spawn_workload(env.pg.dsn("postgres"), 7, stop.clone());
    env.wait_streaming().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let changes = workload.await.unwrap();
    assert!(changes > 100, "workload made only {changes} changes");
    env.wait_caught_up(Duration::from_secs(120)).await;
    let log = env.daemon_log();
    assert!(log.contains("table snapshot committed"), "{log}");
    for table in FOUR_TABLES {
        assert_mirror(&env, table).await;
    }
    // Snapshot rows are in raw with op `r`: the 10 seeded ones, plus any the workload
    // inserted before the slot's snapshot point (it starts with the daemon); the mirror
    // checks above show none of those came twice.
    let raw_reads = query_delta(
        &env.raw_path("public", "condominios"),
        "SELECT count(*) FROM t WHERE _op = 'r'",
    )
    .await;
    let reads: i64 = raw_reads[0][0].as_deref().unwrap_or("0").parse().unwrap();
    assert!(
        reads >= 10,
        "{reads} snapshot reads of condominios, expected at least 10"
    );
    // An independent Delta reader (Python deltalake) sees the same curated rows.
    assert_python_reader_agrees(&env).await;
    // The workload did exercise TOAST-only updates, key changes and the truncate.
    let moradores = env.raw_path("public", "moradores");
    let transacoes = env.raw_path("public", "transacoes");
    for (path, filter) in [
        (&moradores, "_unchanged_toast IS NOT NULL"),
        (&moradores, "_op = 'u' AND _before IS NOT NULL"),
        (&transacoes, "_op = 'u' AND _before IS NOT NULL"),
        (&transacoes, "_op = 't'"),
    ] {
        let n = query_delta(path, &format!("SELECT count(*) FROM t WHERE {filter}")).await;
        assert_ne!(
            n[0][0].as_deref(),
            Some("0"),
            "no change with {filter} in {path:?}"
        );
    }
}

const PY_CURATED: &str = r#"
import json, os, sys, pyarrow
from deltalake import DeltaTable, QueryBuilder
out = {}
for name in sys.argv[2:]:
    # QueryBuilder applies deletion vectors; to_pyarrow_table() refuses such tables.
    table = DeltaTable(sys.argv[1] + "/" + name)
    rows = pyarrow.table(QueryBuilder().register("t", table).execute("SELECT * FROM t").read_all()).to_pylist()
    out[name] = {
        "count": len(rows),
        "ids": sum(r["id"] for r in rows),
        "text": sum(len(r.get("observacoes") or "") + len(r.get("nome") or "") for r in rows),
        "valor": str(sum(r["valor"] for r in rows if r.get("valor") is not None)) if rows and "valor" in rows[0] else None,
    }
print(json.dumps(out))
sys.stdout.flush()
# Skip interpreter teardown: the native reader's background threads can abort it
# ("terminate called without an active exception") after the work is done.
os._exit(0)
"#;

async fn assert_python_reader_agrees(env: &Env) {
    require_python_deltalake();
    let names = ["condominios", "imoveis", "moradores", "transacoes"];
    let root = env.lake.join("curated").join("public");
    let mut args = vec![
        "-c".to_string(),
        PY_CURATED.to_string(),
        root.display().to_string(),
    ];
    args.extend(names.iter().map(|n| n.to_string()));
    let out = std::process::Command::new("python3")
        .args(&args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python reader: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    for name in names {
        let text = if name == "moradores" {
            "coalesce(length(observacoes), 0) + coalesce(length(nome), 0)"
        } else {
            "coalesce(length(nome), 0)"
        };
        let has_nome = name != "imoveis" && name != "transacoes";
        let text = if has_nome || name == "moradores" {
            text
        } else {
            "0"
        };
        let valor = if name == "transacoes" {
            "CAST(sum(valor) AS VARCHAR)"
        } else {
            "NULL"
        };
        let ours = query_delta(
            &root.join(name),
            &format!(
                "SELECT count(*), coalesce(sum(id), 0), coalesce(sum({text}), 0), {valor} FROM t"
            ),
        )
        .await;
        let t = &theirs[name];
        assert_eq!(
            ours[0][0].as_deref(),
            Some(t["count"].to_string().as_str()),
            "{name}: {t}"
        );
        assert_eq!(
            ours[0][1].as_deref(),
            Some(t["ids"].to_string().as_str()),
            "{name}: {t}"
        );
        assert_eq!(
            ours[0][2].as_deref(),
            Some(t["text"].to_string().as_str()),
            "{name}: {t}"
        );
        if name == "transacoes" {
            assert_eq!(ours[0][3].as_deref(), t["valor"].as_str(), "{name}: {t}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curated_tables_survive_sigkill_at_random_moments_including_the_snapshot() {
    let env = Env::new(&demo_setup(150_000)).await;
    curated_kill_rounds(env).await;
}

/// The same with the lake on the S3 server: each daemon is killed only once it holds the
/// lease (the wait for a killed holder's lease is no moment to test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curated_tables_on_s3_survive_sigkill_at_random_moments_including_the_snapshot() {
    let env = Env::new_s3(&demo_setup(150_000)).await;
    curated_kill_rounds(env).await;
}

async fn curated_kill_rounds(env: Env) {
    config_for(&env).await;
    let stop = Arc::new(AtomicBool::new(false));
    let workload = spawn_workload(env.pg.dsn("postgres"), 11, stop.clone());
    let mut rng = StdRng::seed_from_u64(99);
    let mut killed_in_snapshot = 0;
    for round in 0..12 {
        let runs_before = env.daemon_log().matches("source ready").count();
        let mut daemon = env.daemon();
        wait_for_lease(&env, round + 1).await;
        let this_run = || {
            let log = env.daemon_log();
            let runs = log.matches("source ready").count();
            let run = log.rsplit("source ready").next().unwrap_or_default();
            (runs > runs_before).then(|| run.to_string())
        };
        let copying =
            |run: &str| run.contains("initial snapshot started") && !run.contains("streaming");
        if round < 3 {
            // The first rounds die while the snapshot is copying: from the moment this run
            // says it started (a copy takes under a second: a fixed delay from the start
            // would miss it on a fast day; since each row is encoded once it takes less).
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match this_run() {
                    Some(run)
                        if run.contains("initial snapshot started")
                            || run.contains("streaming") =>
                    {
                        break;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
        } else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..2500))).await;
        }
        daemon.kill9();
        if this_run().is_some_and(|run| copying(&run)) {
            killed_in_snapshot += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    workload.await.unwrap();
    let _daemon = env.daemon();
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(180)).await;
    assert!(
        killed_in_snapshot > 0,
        "no kill landed during the snapshot\n{}",
        env.daemon_log()
    );
    for table in FOUR_TABLES {
        assert_mirror(&env, table).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_keeps_its_value_under_default_and_full_identity() {
    let setup = r#"
        CREATE TABLE doc_default (id int PRIMARY KEY, n int, body text);
        CREATE TABLE doc_full (id int PRIMARY KEY, n int, body text);
        ALTER TABLE doc_full REPLICA IDENTITY FULL;
        CREATE TABLE doc_nokey (a int, b text, body text);
        ALTER TABLE doc_nokey REPLICA IDENTITY FULL;
        CREATE PUBLICATION w2d_pub FOR TABLE doc_default, doc_full, doc_nokey;
    "#;
    let (env, _daemon) = Env::streaming(
        setup,
        &["public.doc_default", "public.doc_full", "public.doc_nokey"],
    )
    .await;
    let client = env.pg.client().await;
    // Incompressible values well over the TOAST threshold.
    client
        .batch_execute(
            "INSERT INTO doc_default SELECT g, 0, (SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 300) i) FROM generate_series(1, 5) g;
             INSERT INTO doc_full SELECT * FROM doc_default;
             INSERT INTO doc_nokey SELECT id, 'k' || id, body FROM doc_default;",
        )
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    // Separate batches: the value must come from the curated table itself.
    for sql in [
        "UPDATE doc_default SET n = 1 WHERE id = 1; UPDATE doc_full SET n = 1 WHERE id = 1; UPDATE doc_nokey SET a = 10 WHERE a = 1",
        "UPDATE doc_default SET id = 11 WHERE id = 2; UPDATE doc_full SET id = 11 WHERE id = 2; UPDATE doc_nokey SET b = 'x' WHERE a = 2",
        "BEGIN; UPDATE doc_default SET n = 2 WHERE id = 3; UPDATE doc_default SET id = 13 WHERE id = 3; UPDATE doc_default SET n = 3 WHERE id = 13; COMMIT",
        // Keyed by the whole row (FULL, no primary key): two updates of one row in one
        // batch, the TOASTed column part of the key and unchanged.
        "BEGIN; UPDATE doc_nokey SET a = 20 WHERE a = 10; UPDATE doc_nokey SET a = 30 WHERE a = 20; COMMIT",
        "DELETE FROM doc_default WHERE id = 4; DELETE FROM doc_full WHERE id = 4; DELETE FROM doc_nokey WHERE a = 4",
    ] {
        client.batch_execute(sql).await.unwrap();
        env.wait_caught_up(Duration::from_secs(60)).await;
    }
    for table in ["public.doc_default", "public.doc_full", "public.doc_nokey"] {
        assert_mirror(&env, table).await;
    }
    let raw_toast = query_delta(
        &env.raw_path("public", "doc_default"),
        "SELECT count(*) FROM t WHERE _unchanged_toast IS NOT NULL",
    )
    .await;
    assert_ne!(
        raw_toast[0][0].as_deref(),
        Some("0"),
        "the test made no TOAST-only update"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_row_update_rewrites_at_most_one_file() {
    let setup = "CREATE TABLE big (id bigint PRIMARY KEY, v text); CREATE PUBLICATION w2d_pub FOR TABLE big;";
    let (env, _daemon) = Env::streaming(setup, &["public.big"]).await;
    let client = env.pg.client().await;
    // Many batches → many data files, each holding a narrow key range.
    for b in 0..25 {
        client
            .batch_execute(&format!(
                "INSERT INTO big SELECT g, 'v' || g FROM generate_series({}, {}) g",
                b * 2000 + 1,
                (b + 1) * 2000
            ))
            .await
            .unwrap();
        env.wait_caught_up(Duration::from_secs(60)).await;
    }
    let curated = env.lake.join("curated/public/big");
    let files = |path: &std::path::Path| {
        let url = url::Url::from_directory_path(path).unwrap();
        async move {
            let t = deltalake::open_table(url).await.unwrap();
            (t.version().unwrap(), t.get_file_uris().unwrap().count())
        }
    };
    let (before_version, before_files) = files(&curated).await;
    assert!(before_files >= 20, "only {before_files} files");
    client
        .batch_execute("UPDATE big SET v = 'changed' WHERE id = 31337")
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let (after_version, _) = files(&curated).await;
    let mut removed = 0;
    let mut added = 0;
    for v in before_version + 1..=after_version {
        let log =
            std::fs::read_to_string(curated.join(format!("_delta_log/{v:020}.json"))).unwrap();
        removed += log.matches("\"remove\"").count();
        added += log.matches("\"add\"").count();
    }
    assert!(removed <= 1, "{removed} files rewritten for one row");
    assert!(added <= 2, "{added} files added for one row");
    assert_mirror(&env, "public.big").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_text_dates_and_amounts_are_normalized_in_curated_only() {
    let setup = r#"
        CREATE TABLE pagamentos (
            id int PRIMARY KEY,
            data_pagamento text,
            valor_pago varchar(40),
            data_real date,
            observacao text
        );
        INSERT INTO pagamentos VALUES
            (1, '2024-01-05', '1234.56', '2024-01-05', 'a'),
            (2, '05/01/2024', '1.234,56', NULL, 'b'),
            (3, '2024-01-05 10:00:00-03', 'R$ 1.234,56', NULL, 'c'),
            (4, '2024-01-05T13:00:00Z', 'R$ 7,5', NULL, 'd'),
            (5, 'ontem', 'muito', NULL, 'e'),
            (6, NULL, NULL, NULL, 'f');
        CREATE PUBLICATION w2d_pub FOR TABLE pagamentos;
    "#;
    let (env, _daemon) = Env::streaming(setup, &["public.pagamentos"]).await;
    env.pg
        .client()
        .await
        .batch_execute(
            "INSERT INTO pagamentos VALUES (7, '31/12/2024', '0,01', '2024-12-31', 'g');
             UPDATE pagamentos SET valor_pago = '12.345.678,90', data_pagamento = '13/13/2024' WHERE id = 1;",
        )
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let rows = query_delta(
        &env.lake.join("curated/public/pagamentos"),
        "SELECT id, CAST(data_pagamento AS VARCHAR), CAST(valor_pago AS VARCHAR), \
         arrow_typeof(data_pagamento), arrow_typeof(valor_pago), CAST(data_real AS VARCHAR) FROM t ORDER BY id",
    )
    .await;
    let got: Vec<(String, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone(), r[2].clone()))
        .collect();
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        got,
        vec![
            ("1".into(), None, s("12345678.90")),
            ("2".into(), s("2024-01-05T00:00:00Z"), s("1234.56")),
            ("3".into(), s("2024-01-05T13:00:00Z"), s("1234.56")),
            ("4".into(), s("2024-01-05T13:00:00Z"), s("7.50")),
            ("5".into(), None, None),
            ("6".into(), None, None),
            ("7".into(), s("2024-12-31T00:00:00Z"), s("0.01")),
        ],
        "{rows:?}"
    );
    let ts_type = rows[0][3].clone().unwrap_or_default();
    assert!(
        ts_type.starts_with("Timestamp") && ts_type.contains("UTC"),
        "{rows:?}"
    );
    assert_eq!(rows[0][4].as_deref(), Some("Decimal128(18, 2)"));
    // Typed columns pass through unchanged.
    assert_eq!(rows[6][5].as_deref(), Some("2024-12-31"));
    // Raw keeps the original text.
    let raw = query_delta(
        &env.raw_path("public", "pagamentos"),
        "SELECT data_pagamento, valor_pago FROM t WHERE id = 5",
    )
    .await;
    assert_eq!(raw[0], vec![s("ontem"), s("muito")]);
    // Failures are logged once per column, with an example.
    let log = env.daemon_log();
    assert_eq!(
        log.matches("matches none of the column's normalization formats")
            .count(),
        2,
        "{log}"
    );
    assert!(log.contains("ontem") && log.contains("muito"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_apply_without_restart_or_stop_with_the_options() {
    let setup = r#"
        CREATE TABLE evo (id int PRIMARY KEY, qty int, name varchar(10), amount numeric(10,2), data_antiga text);
        INSERT INTO evo VALUES (1, 1, 'um', 1.50, '2024-01-05');
        CREATE PUBLICATION w2d_pub FOR TABLE evo;
    "#;
    let (env, mut daemon) = Env::streaming(setup, &["public.evo"]).await;
    let client = env.pg.client().await;
    let steps = [
        "INSERT INTO evo VALUES (2, 2, 'dois', 2.50, '06/01/2024')",
        // A new column appears mid-stream, inside a transaction that also uses it.
        "BEGIN; ALTER TABLE evo ADD COLUMN note text; INSERT INTO evo VALUES (3, 3, 'três', 3.50, NULL, 'n3'); UPDATE evo SET note = 'n1' WHERE id = 1; COMMIT",
        // Widening type changes.
        "ALTER TABLE evo ALTER COLUMN qty TYPE bigint, ALTER COLUMN name TYPE text, ALTER COLUMN amount TYPE numeric(14,2); \
         INSERT INTO evo VALUES (4, 5000000000, 'a name much longer than ten', 123456789012.34, '2024-01-07', 'n4')",
        // A dropped (normalized) column stops being filled.
        "ALTER TABLE evo DROP COLUMN data_antiga; INSERT INTO evo VALUES (5, 5, 'cinco', 5.00, 'n5'); UPDATE evo SET qty = 20 WHERE id = 2",
    ];
    for sql in steps {
        client.batch_execute(sql).await.unwrap();
        env.wait_caught_up(Duration::from_secs(60)).await;
        assert!(
            daemon.is_running(),
            "the daemon stopped\n{}",
            env.daemon_log()
        );
    }
    assert_mirror(&env, "public.evo").await;
    // Raw history keeps the dropped column's old values and has the new column.
    let raw = query_delta(
        &env.raw_path("public", "evo"),
        "SELECT count(*) FILTER (WHERE data_antiga IS NOT NULL), count(*) FILTER (WHERE note IS NOT NULL), max(qty) FROM t",
    )
    .await;
    assert_eq!(
        raw[0],
        vec![
            Some("4".into()),
            Some("4".into()),
            Some("5000000000".into())
        ],
        "{raw:?}"
    );

    let curated = query_delta(
        &env.lake.join("curated/public/evo"),
        "SELECT count(data_antiga), arrow_typeof(data_antiga) FROM t GROUP BY 2",
    )
    .await;
    // Rows 1 and 4 keep their value; row 2 was written after the drop, so it is NULL.
    assert_eq!(curated[0][0].as_deref(), Some("2"), "{curated:?}");
    // A column added while the daemon is stopped is picked up at start (and the dropped,
    // normalized column keeps its curated type).
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    client
        .batch_execute("ALTER TABLE evo ADD COLUMN later date; INSERT INTO evo VALUES (6, 6, 'seis', 6.00, 'n6', '2024-02-29')")
        .await
        .unwrap();
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.evo").await;

    // A change the lake cannot hold losslessly stops the daemon with the options.
    client
        .batch_execute("ALTER TABLE evo ALTER COLUMN amount TYPE numeric(16,3); INSERT INTO evo VALUES (7, 7, 'sete', 7.125, 'n7', NULL)")
        .await
        .unwrap();
    let status = daemon.wait(Duration::from_secs(60));
    assert!(!status.success());
    let log = env.daemon_log();
    assert!(
        log.contains("table public.evo: column amount changed from numeric(14,2) to numeric(16,3)")
            && log.contains("revert the change"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_left_out_of_the_configuration_for_a_while_is_copied_again() {
    let setup = r#"
        CREATE TABLE kept (id int PRIMARY KEY, v text);
        CREATE TABLE paused (id int PRIMARY KEY, v text);
        INSERT INTO paused VALUES (1, 'a'), (2, 'b');
        CREATE PUBLICATION w2d_pub FOR TABLE kept, paused;
    "#;
    let (env, mut daemon) = Env::streaming(setup, &["public.kept", "public.paused"]).await;
    let client = env.pg.client().await;
    client
        .batch_execute("INSERT INTO kept VALUES (1, 'x'); UPDATE paused SET v = 'c' WHERE id = 1")
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    // Without `paused` for a while: its changes are not followed.
    env.write_config("postgres", &["public.kept"], "");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    client.batch_execute("INSERT INTO kept VALUES (2, 'y'); DELETE FROM paused WHERE id = 2; INSERT INTO paused VALUES (3, 'd')").await.unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    // Back in the configuration: copied again, then followed.
    env.write_config("postgres", &["public.kept", "public.paused"], "");
    let _daemon = env.daemon();
    env.wait_streaming().await;
    client
        .batch_execute("UPDATE paused SET v = 'e' WHERE id = 3")
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.paused").await;
    assert_mirror(&env, "public.kept").await;
}

/// Stored generated columns: pgoutput sends them only when the publication says
/// `publish_generated_columns = stored` (PostgreSQL 18). Published, they are replicated
/// like any column; otherwise they are left out of raw and curated, rather than filled by
/// the snapshot and left NULL by every change after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_generated_columns_are_replicated_when_published_and_absent_otherwise() {
    let env = Env::new(
        "CREATE TABLE gen (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) STORED);
         INSERT INTO gen (id, a) SELECT g, g FROM generate_series(1, 100) g;",
    )
    .await;
    let pg = env.pg.client().await;
    let published = env.pg.major().await >= 18;
    if published {
        // A virtual generated column (18) is never published, whatever the publication says.
        pg.batch_execute(
            "ALTER TABLE gen ADD COLUMN c int GENERATED ALWAYS AS (a + 1) VIRTUAL;
             CREATE PUBLICATION w2d_pub FOR TABLE gen WITH (publish_generated_columns = stored)",
        )
        .await
        .unwrap();
    }
    env.write_config("postgres", &["public.gen"], "");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    pg.batch_execute(
        "INSERT INTO gen (id, a) VALUES (101, 101); UPDATE gen SET a = a + 1000 WHERE id <= 10; \
         DELETE FROM gen WHERE id = 50;",
    )
    .await
    .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let (present, absent) = if published { ("b", "c") } else { ("a", "b") };
    assert_mirror_without(&env, "public.gen", &[absent]).await;
    let path = env.lake.join("curated").join("public").join("gen");
    let table = deltalake::open_table(url::Url::from_directory_path(&path).unwrap())
        .await
        .unwrap();
    let schema = table.snapshot().unwrap().schema();
    let names: Vec<&str> = schema.fields().map(|f| f.name().as_str()).collect();
    assert!(
        names.contains(&present) && !names.contains(&absent),
        "curated columns: {names:?}"
    );
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

/// `REPLICA IDENTITY USING INDEX` on a table without a primary key: curated is keyed by
/// the index's columns, through updates of the key and deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_identity_index_keys_the_curated_table() {
    let env = Env::new(
        "CREATE TABLE contas (id int, codigo text NOT NULL, saldo int);
         CREATE UNIQUE INDEX contas_codigo ON contas (codigo);
         ALTER TABLE contas REPLICA IDENTITY USING INDEX contas_codigo;
         INSERT INTO contas SELECT g % 10, 'c' || g, g FROM generate_series(1, 200) g;",
    )
    .await;
    env.write_config("postgres", &["public.contas"], "");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    env.pg
        .client()
        .await
        .batch_execute(
            "UPDATE contas SET saldo = saldo + 1 WHERE id = 3; \
             UPDATE contas SET codigo = codigo || 'x' WHERE id = 4; \
             DELETE FROM contas WHERE id = 5; \
             INSERT INTO contas VALUES (3, 'novo', 0);",
        )
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    // id repeats: only `codigo` tells the rows apart.
    assert_mirror(&env, "public.contas").await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}
