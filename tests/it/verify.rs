//! `wal2delta verify` and `resync`: equal tables pass while a workload runs; rows removed
//! or changed in a curated file by hand, and a `reset-checkpoint --to-lsn` gap, are named
//! by key and exit 1; `resync` (and `verify --repair`) repairs them while a workload runs,
//! and an SQL reader polling the table never sees it empty or short.

use std::time::Duration;

use crate::harness::{Env, wal2delta};

/// Every type family the lake stores typed, values the lake keeps in `_fallback`
/// (`infinity`, `NaN`), a normalized column (`valor`), NULLs and non-ASCII text.
const SETUP: &str = "
CREATE TABLE contas (
    id bigint PRIMARY KEY, nome text, saldo numeric(12,2), aberta timestamptz,
    nascimento date, ativo boolean, taxa float8, fator real, foto bytea, tags int[],
    apelidos text[], codigo char(4), valor text, livre numeric, hora time, sem_tz timestamp,
    ip inet, siglas char(3)[], nan_ou_nao float8);
INSERT INTO contas
SELECT g, CASE WHEN g % 10 = 0 THEN NULL ELSE 'cliente ' || g || ' ção' END,
       CASE WHEN g = 3 THEN 'NaN' ELSE g * 1.25 END,
       CASE WHEN g = 4 THEN 'infinity'::timestamptz
            ELSE timestamptz '2024-01-01 00:00:00.123456+00' + g * interval '1 hour 1 microsecond' END,
       date '1990-01-01' + g, g % 2 = 0, g / 7.0, g / 3.0, decode(lpad(to_hex(g), 4, '0'), 'hex'),
       ARRAY[g, NULL, g + 1], ARRAY['a' || g, 'b\"c'], lpad((g % 100)::text, 2),
       'R$ ' || g || ',50', g / 9.0, time '10:00' + g * interval '1 second',
       timestamp '2000-02-29 12:00' + g * interval '1 day',
       ('10.0.' || (g % 250) || '.1')::inet, ARRAY['a', 'bc'],
       CASE WHEN g % 100 = 0 THEN 'NaN'::float8 ELSE g END
FROM generate_series(1, 3000) g;
";

/// `wal2delta verify`, letting the runtime's other tasks (a workload) run meanwhile.
async fn verify(env: &Env) -> (i32, String) {
    tokio::task::block_in_place(|| wal2delta(env, &["verify", "--wait", "60"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_equal_tables_and_names_rows_that_differ() {
    let (env, mut daemon) = Env::streaming(SETUP, &["public.contas"]).await;
    let pg = env.pg.client().await;
    pg.batch_execute(
        "UPDATE contas SET nome = 'outro nome' WHERE id % 13 = 0;
         DELETE FROM contas WHERE id % 17 = 0;
         INSERT INTO contas (id, nome) VALUES (5000, 'só o nome');",
    )
    .await
    .unwrap();
    env.wait_caught_up(Duration::from_secs(90)).await;

    // Equal, while a workload keeps changing rows (those are left out, not reported).
    let writer = {
        let client = env.pg.client().await;
        tokio::spawn(async move {
            for i in 0..200 {
                let _ = client
                    .execute(
                        "UPDATE contas SET saldo = saldo + 1, nome = 'w' || $1::int WHERE id = $1::int % 3000 + 1",
                        &[&(i * 37)],
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let (code, text) = verify(&env).await;
    writer.await.unwrap();
    assert_eq!(code, 0, "{text}\n{}", env.daemon_log());
    assert!(text.contains("public.contas: equal"), "{text}");
    assert!(
        text.contains("column valor not compared: normalized by a [transform] rule"),
        "{text}"
    );
    let (code, json) = tokio::task::block_in_place(|| {
        wal2delta(&env, &["verify", "--json", "--table", "public.contas"])
    });
    assert_eq!(code, 0, "{json}");
    let report: serde_json::Value = serde_json::from_str(&json).expect("JSON report");
    assert_eq!(report["tables"][0]["outcome"], "equal", "{json}");
    assert!(report["tables"][0]["source_rows"].as_u64().unwrap() > 2800);

    assert!(daemon.terminate(Duration::from_secs(30)).success());
    damage(&env).await;
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let (code, text) = verify(&env).await;
    eprintln!("{text}");
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("public.contas: DIFFERS: 4 rows missing from the lake, 0 extra, 1 different"),
        "{text}"
    );
    for key in ["id=5", "id=6", "id=6001", "id=6002", "different: id=7"] {
        assert!(text.contains(key), "{key} not named: {text}");
    }
    assert!(
        text.contains("wal2delta resync --config FILE --table public.contas"),
        "{text}"
    );
    assert!(daemon.is_running(), "{}", env.daemon_log());
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

/// With the daemon stopped: rows removed from and changed in the curated table behind its
/// back (ids 5, 6 and 7), and a gap (ids 6001 and 6002) made by moving the checkpoint past
/// their inserts.
async fn damage(env: &Env) {
    let url = url::Url::from_directory_path(env.lake.join("curated/public/contas")).unwrap();
    let table = deltalake::open_table(url).await.unwrap();
    let (table, _) = table
        .delete()
        .with_predicate("id IN (5, 6)")
        .await
        .expect("delete rows from the curated table");
    table
        .update()
        .with_predicate("id = 7")
        .with_update("codigo", "'zz'")
        .await
        .expect("change a row of the curated table");
    env.pg
        .client()
        .await
        .batch_execute(
            "INSERT INTO contas (id, nome) VALUES (6001, 'perdido'), (6002, 'perdido')
             ON CONFLICT (id) DO UPDATE SET nome = 'perdido de novo'",
        )
        .await
        .unwrap();
    let lsn = env.current_wal_lsn().await;
    let (code, text) = wal2delta(env, &["reset-checkpoint", "--to-lsn", &lsn, "--yes"]);
    assert_eq!(code, 0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_repairs_a_table_while_a_workload_runs_and_readers_never_see_it_short() {
    let (env, mut daemon) = Env::streaming(SETUP, &["public.contas"]).await;
    env.wait_caught_up(Duration::from_secs(90)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    damage(&env).await;
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let (code, text) = verify(&env).await;
    assert_eq!(code, 1, "{text}");

    // A workload that only inserts and updates: the row count never goes down.
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let client = env.pg.client().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                client
                    .batch_execute(&format!(
                        "INSERT INTO contas (id, nome) VALUES ({}, 'novo');
                         UPDATE contas SET saldo = saldo + 1 WHERE id = {};",
                        20_000 + i,
                        i % 3000 + 1
                    ))
                    .await
                    .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            i
        })
    };
    let reader = {
        let dsn = crate::sql::endpoint_dsn(env.serve_port, "postgres");
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = crate::sql::connect(&dsn)
                .await
                .expect("connect to the endpoint");
            let mut seen: Vec<i64> = Vec::new();
            while !stop.is_cancelled() {
                let row = client
                    .query_one("SELECT count(*) FROM contas", &[])
                    .await
                    .expect("count over the endpoint");
                seen.push(row.get(0));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    let (code, text) = tokio::task::block_in_place(|| {
        wal2delta(
            &env,
            &["resync", "--table", "public.contas", "--wait", "120"],
        )
    });
    assert_eq!(code, 0, "{text}\n{}", env.daemon_log());
    assert!(text.contains("public.contas: copied again at"), "{text}");
    assert!(
        env.daemon_log().contains("resync swapped in"),
        "{}",
        env.daemon_log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let inserted = writer.await.unwrap();
    let seen = reader.await.unwrap();
    assert!(
        inserted > 0 && seen.len() > 5,
        "{inserted} inserts, {seen:?}"
    );
    let first = seen[0];
    assert!(first > 2800, "{seen:?}");
    for pair in seen.windows(2) {
        assert!(
            pair[1] >= pair[0],
            "the endpoint's count went down during the resync: {seen:?}"
        );
    }
    env.wait_caught_up(Duration::from_secs(90)).await;
    let (code, text) = verify(&env).await;
    assert_eq!(code, 0, "{text}\n{}", env.daemon_log());
    // Raw history is kept, with the copy's `r` rows added.
    let copied = crate::harness::query_delta(
        &env.raw_path("public", "contas"),
        "SELECT count(*) FROM t WHERE _op = 'r'",
    )
    .await;
    let copied: i64 = copied[0][0].as_ref().unwrap().parse().unwrap();
    assert!(copied > 3000 + 2800, "{copied} snapshot rows in raw");
    // The resync is in the checkpoint's history like the other resets.
    let log = env.lake.join("_wal2delta/checkpoint/_delta_log");
    let recorded = std::fs::read_dir(&log)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .any(|text| text.contains(r#""action":"resync""#) && text.contains("public.contas"));
    assert!(recorded, "no resync in {}", log.display());

    // verify --repair: finds, copies again and checks again.
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    damage(&env).await;
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let (code, text) =
        tokio::task::block_in_place(|| wal2delta(&env, &["verify", "--repair", "--wait", "60"]));
    assert_eq!(code, 0, "{text}\n{}", env.daemon_log());
    assert!(
        text.contains("DIFFERS")
            && text.contains("copied again at")
            && text.contains("public.contas: equal"),
        "{text}"
    );
    assert!(daemon.is_running(), "{}", env.daemon_log());
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_without_a_running_daemon_says_so_and_exits_2() {
    let (env, mut daemon) = Env::streaming(SETUP, &["public.contas"]).await;
    env.wait_caught_up(Duration::from_secs(90)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
    let (code, text) = tokio::task::block_in_place(|| wal2delta(&env, &["verify", "--wait", "2"]));
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("the lake has not caught up") && text.contains("start it"),
        "{text}"
    );
    let (code, text) = wal2delta(&env, &["verify", "--table", "public.other"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("public.other is not a configured table"),
        "{text}"
    );
}
