//! Key lookups (`SELECT … FROM t WHERE key = v`), which the endpoint answers without
//! planning a query: every lookup gives the same rows, column types and bytes (text and
//! binary, simple and extended protocol) as the planner gives for the same query with a
//! clause added, on a mixed-case, non-ASCII table in another schema, across snapshot
//! files nobody indexed yet, deletion vectors, key changes, deleted keys, a column added
//! later, time travel and grants; the metrics show the lookups were answered so.

use std::time::Duration;

use tokio_postgres::types::{FromSql, Type};

use crate::harness::{Env, free_port, wait_for};
use crate::sql::{connect, endpoint_dsn, hash_password, rows};
use crate::telemetry::{scrape, value};

const SETUP: &str = r#"
CREATE SCHEMA "Arquivo";
CREATE TABLE "Arquivo"."Conta Ñ" (
    "Id" bigint PRIMARY KEY, "Valor" numeric(12,2), nome text, quando timestamptz,
    dia date, dur interval, ativo boolean, dados bytea, nota float8, codigo uuid);
INSERT INTO "Arquivo"."Conta Ñ"
SELECT g - 1000, g * 1.25, CASE WHEN g % 7 = 0 THEN NULL ELSE 'nome ' || g END,
       timestamptz '2026-01-01 00:00+00' + g * interval '1 minute', date '2026-01-01' + g,
       g * interval '1 second', g % 2 = 0, decode(lpad(to_hex(g), 8, '0'), 'hex'), g / 3.0,
       md5(g::text)::uuid
FROM generate_series(1, 3000) g;
CREATE TABLE itens (id int PRIMARY KEY, v text);
INSERT INTO itens SELECT g, 'v' || g FROM generate_series(1, 3000) g;
CREATE PUBLICATION w2d_pub FOR TABLE "Arquivo"."Conta Ñ", itens;
"#;

/// A column's bytes as sent, whatever its type.
#[derive(Debug, PartialEq)]
struct Raw(Option<Vec<u8>>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Names, types and bytes (binary format) of every row of a prepared statement.
async fn prepared(
    lake: &tokio_postgres::Client,
    sql: &str,
    key: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Vec<Vec<(String, Type, Raw)>> {
    lake.query(sql, &[key])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|row| {
            row.columns()
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name().to_string(), c.type_().clone(), row.get(i)))
                .collect()
        })
        .collect()
}

/// Checks a lookup of `key` both ways, both protocols; returns its rows as text.
async fn same_both_ways(
    lake: &tokio_postgres::Client,
    projection: &str,
    table: &str,
    column: &str,
    key: i64,
) -> Vec<String> {
    let fast = format!("SELECT {projection} FROM {table} WHERE {column} = {key}");
    let planned = format!("{fast} LIMIT 10");
    let text = rows(lake, &fast).await;
    assert_eq!(text, rows(lake, &planned).await, "{fast}, simple protocol");
    let fast = format!("SELECT {projection} FROM {table} WHERE {column} = $1");
    let planned = format!("{fast} LIMIT 10");
    let (a, b) = (
        prepared(lake, &fast, &key).await,
        prepared(lake, &planned, &key).await,
    );
    assert_eq!(a, b, "{fast} with {key}, extended protocol, binary");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lookups_answer_what_the_planner_answers() {
    let env = Env::new(SETUP).await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let verifier = hash_password("s3cret");
    env.write_config_serving(
        "postgres",
        &["\"Arquivo\".\"Conta Ñ\"", "public.itens"],
        &format!("[metrics]\nlisten = \"{metrics}\"\n"),
        &format!(
            "[[serve.users]]\nname = \"analyst\"\nscram = \"{verifier}\"\n\
             [[serve.users]]\nname = \"auditor\"\nscram = \"{verifier}\"\n\
             tables = [\"public.*\"]\n"
        ),
    );
    let _daemon = env.daemon();
    env.wait_streaming().await;
    let dsn = |user: &str| format!("{} password=s3cret", endpoint_dsn(env.serve_port, user));
    let conta = r#""Arquivo"."Conta Ñ""#;
    let source = env.pg.client().await;
    let count = |t: &str| format!("SELECT count(*) FROM {t}");
    wait_for(
        "both tables served",
        Duration::from_secs(60),
        || {
            let dsn = dsn("analyst");
            let sql = count(conta);
            async move {
                let Ok(lake) = connect(&dsn).await else {
                    return false;
                };
                rows(&lake, &sql).await == vec!["3000"]
            }
        },
        || env.daemon_log(),
    )
    .await;
    let lake = connect(&dsn("analyst")).await.unwrap();
    let counted = || async {
        value(&scrape(&metrics), "wal2delta_sql_key_lookups_total", &[]).unwrap_or(0.0)
    };
    let before = counted().await;

    // The snapshot's files: nobody has indexed them yet.
    // -744/-743 and 1816/1817 sit either side of the 256-row block bounds (rows 255/256,
    // 2815/2816) of the snapshot file, 2000 in its last, partial block.
    let keys = [
        -999i64,
        -744,
        -743,
        -1,
        0,
        1,
        500,
        1816,
        1817,
        2000,
        2001,
        -5000,
        i64::MAX,
    ];
    for key in keys {
        let got = same_both_ways(&lake, "*", conta, "\"Id\"", key).await;
        let want = (-999..=2000).contains(&key) as usize;
        assert_eq!(got.len(), want, "key {key}: {got:?}");
    }
    let got = same_both_ways(&lake, "nome, \"Valor\", \"Id\"", conta, "\"Id\"", -993).await;
    assert_eq!(got, vec!["NULL|8.75|-993"]);
    let position = rows(&lake, "SHOW wal2delta.position").await;
    let lsn = position[0].split('|').next().unwrap().to_string();

    // Deletion vectors, deleted and moved keys, a column added later.
    source
        .batch_execute(
            r#"UPDATE "Arquivo"."Conta Ñ" SET "Valor" = "Valor" + 1 WHERE "Id" % 10 = 0;
               DELETE FROM "Arquivo"."Conta Ñ" WHERE "Id" % 97 = 0;
               UPDATE "Arquivo"."Conta Ñ" SET "Id" = "Id" + 100000 WHERE "Id" IN (5, 6);
               ALTER TABLE "Arquivo"."Conta Ñ" ADD COLUMN extra text;
               UPDATE "Arquivo"."Conta Ñ" SET extra = 'x' || "Id" WHERE "Id" % 50 = 1;
               INSERT INTO "Arquivo"."Conta Ñ" ("Id", "Valor", extra) VALUES (7000, 1, 'novo');
               UPDATE itens SET v = 'mudou' WHERE id % 3 = 0;
               DELETE FROM itens WHERE id % 11 = 0;
               UPDATE itens SET id = id + 10000 WHERE id = 7;"#,
        )
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    for sql in [
        r#"SELECT count(*), count(extra), sum("Id") FROM "Arquivo"."Conta Ñ""#,
        "SELECT count(*), max(id) FROM itens",
    ] {
        let want = rows(&source, sql).await;
        wait_for(
            "the changes served",
            Duration::from_secs(60),
            || {
                let (lake, want) = (&lake, &want);
                async move { lake.simple_query(sql).await.is_ok() && &rows(lake, sql).await == want }
            },
            || env.daemon_log(),
        )
        .await;
    }
    let keys = [
        -999i64, -990, -970, -951, 0, 5, 6, 100005, 100006, 97, 194, 1001, 1940, 2000, 7000, 7001,
    ];
    for key in keys {
        let got = same_both_ways(&lake, "*", conta, "\"Id\"", key).await;
        let want = source
            .query_one(
                r#"SELECT count(*) FROM "Arquivo"."Conta Ñ" WHERE "Id" = $1"#,
                &[&key],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(got.len() as i64, want, "key {key}: {got:?}");
        let got = same_both_ways(&lake, "extra, \"Valor\"", conta, "\"Id\"", key).await;
        let want: Vec<String> = source
            .query(
                r#"SELECT coalesce(extra, 'NULL') || '|' || "Valor" FROM "Arquivo"."Conta Ñ" WHERE "Id" = $1"#,
                &[&key],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(got, want, "key {key}");
    }
    for key in [3i64, 7, 10007, 11, 12, 2999, 3000, 3001] {
        let got = same_both_ways(&lake, "v", "itens", "id", key).await;
        let want: Vec<String> = source
            .query("SELECT v FROM itens WHERE id = $1", &[&(key as i32)])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(got, want, "itens key {key}");
        same_both_ways(&lake, "*", "public.itens", "ID", key).await;
        same_both_ways(&lake, "*", "wal2delta.public.itens", "id", key).await;
    }

    // Time travel: the position before the changes, read through lookups.
    lake.batch_execute(&format!("SET wal2delta.as_of = '{lsn}'"))
        .await
        .unwrap();
    let old = same_both_ways(&lake, "\"Valor\"", conta, "\"Id\"", -990).await;
    assert_eq!(old, vec!["12.50"], "as of {lsn}");
    let gone = same_both_ways(&lake, "\"Id\"", conta, "\"Id\"", 100005).await;
    assert!(gone.is_empty(), "{gone:?}");
    lake.batch_execute("SET wal2delta.as_of = 'latest'")
        .await
        .unwrap();
    assert_eq!(
        same_both_ways(&lake, "\"Valor\"", conta, "\"Id\"", -990).await,
        vec!["13.50"]
    );

    // Grants: a user who may not read the table is refused as by the planner.
    let auditor = connect(&dsn("auditor")).await.unwrap();
    for sql in [
        format!("SELECT * FROM {conta} WHERE \"Id\" = 1"),
        format!("SELECT * FROM {conta} WHERE \"Id\" = 1 LIMIT 1"),
    ] {
        let err = auditor.simple_query(&sql).await.unwrap_err();
        assert_eq!(
            err.code().map(|c| c.code()),
            Some("42501"),
            "{sql}: {err:?}"
        );
    }
    assert_eq!(
        rows(&auditor, "SELECT v FROM itens WHERE id = 2").await,
        vec!["v2"]
    );

    let after = counted().await;
    println!(
        "figure: {} statements answered as key lookups",
        after - before
    );
    assert!(
        after - before >= 100.0,
        "only {} statements were answered as key lookups (before {before}, after {after})",
        after - before
    );
}
