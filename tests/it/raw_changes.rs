//! Every operation on every supported type lands in the raw change log with the right tag
//! and value: NULLs, unicode, numeric precision, timestamptz, jsonb, bytea, arrays, values
//! kept in `_fallback`, a TOASTed value left unchanged by an update, key changes, deletes,
//! truncate. Connects with a SCRAM-SHA-256 password role to cover authentication.

use std::time::Duration;

use crate::harness::{Env, count_delta, query_delta};

const SETUP: &str = r#"
CREATE TABLE typed (
    id    int PRIMARY KEY,
    b     boolean,
    i2    smallint,
    i8    bigint,
    f4    real,
    f8    double precision,
    n     numeric(12,3),
    nu    numeric,
    t     text,
    vc    varchar(10),
    d     date,
    tm    time,
    ts    timestamp,
    tstz  timestamptz,
    u     uuid,
    jb    jsonb,
    by    bytea,
    ai    int[],
    at    text[],
    iv    interval,
    big   text
);
ALTER TABLE typed ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE ROLE repl_scram LOGIN REPLICATION PASSWORD 'sc-ram pass' IN ROLE w2d_scram;
GRANT SELECT ON typed TO repl_scram;
CREATE PUBLICATION w2d_pub FOR TABLE typed;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operation_and_type_lands_in_the_raw_log() {
    let env = Env::new(SETUP).await;
    env.write_config(
        "repl_scram",
        &["public.typed"],
        "password_env = \"W2D_TEST_PW\"",
    );
    let _daemon = crate::harness::Daemon::start(
        &env.config,
        &env.dir.path().join("daemon.log"),
        &[("W2D_TEST_PW", "sc-ram pass")],
    );
    env.wait_streaming().await;

    let pg = env.pg.client().await;
    pg.batch_execute(
        r#"INSERT INTO typed VALUES (1, true, -32768, 9223372036854775807, 'Infinity', 'NaN',
              123456789.123, '12345678901234567890.12345678901234567890', 'ação ☃ 🚀 "quoted" \ back',
              'abc', 'infinity', '13:14:15.123456', '2024-02-29 23:59:59.999999',
              '2024-01-05 10:00:00-03', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
              '{"a": [1, 2], "b": null}', '\x00ff10', '{1,NULL,3}', '{"a b","c,d",NULL}',
              '1 day 02:03:04', repeat('x', 30000000));
           INSERT INTO typed (id) VALUES (2);"#,
    )
    .await
    .unwrap();
    pg.batch_execute("UPDATE typed SET i2 = 5 WHERE id = 1")
        .await
        .unwrap();
    pg.batch_execute("UPDATE typed SET id = 10 WHERE id = 2")
        .await
        .unwrap();
    pg.batch_execute("DELETE FROM typed WHERE id = 10")
        .await
        .unwrap();
    pg.batch_execute("TRUNCATE typed").await.unwrap();

    let raw = env.raw_path("public", "typed");
    env.wait_raw_rows("public", "typed", 6, Duration::from_secs(60))
        .await;
    assert_eq!(count_delta(&raw).await, 6, "each change exactly once");

    let ops = query_delta(&raw, "SELECT _op, id, i2, _before, _unchanged_toast, length(big) FROM t ORDER BY _commit_lsn, _seq").await;
    let ops: Vec<Vec<Option<&str>>> = ops
        .iter()
        .map(|r| r.iter().map(|v| v.as_deref()).collect())
        .collect();
    assert_eq!(
        ops[0],
        vec![
            Some("c"),
            Some("1"),
            Some("-32768"),
            None,
            None,
            Some("30000000")
        ]
    );
    assert_eq!(ops[1], vec![Some("c"), Some("2"), None, None, None, None]);
    // The TOASTed column did not change: marked unchanged, not turned into a value or NULL-as-data.
    assert_eq!(
        ops[2],
        vec![Some("u"), Some("1"), Some("5"), None, Some("[big]"), None]
    );
    // A key change keeps the old key.
    assert_eq!(
        ops[3],
        vec![
            Some("u"),
            Some("10"),
            None,
            Some(r#"{"id":"2"}"#),
            None,
            None
        ]
    );
    // REPLICA IDENTITY DEFAULT deletes carry the key only.
    assert_eq!(ops[4], vec![Some("d"), Some("10"), None, None, None, None]);
    assert_eq!(ops[5], vec![Some("t"), None, None, None, None, None]);

    let row = &query_delta(
        &raw,
        "SELECT b, i8, f4, f8, n, nu, t, vc, d, tm, ts, tstz, u, jb, by, ai, at, iv, _fallback, _xid > 0, _lsn <= _commit_lsn, _commit_ts IS NOT NULL \
         FROM t WHERE _op = 'c' AND id = 1",
    )
    .await[0];
    let row: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
    let expected = vec![
        Some("true"),
        Some("9223372036854775807"),
        Some("inf"),
        Some("NaN"),
        Some("123456789.123"),
        Some("12345678901234567890.12345678901234567890"),
        Some("ação ☃ 🚀 \"quoted\" \\ back"),
        Some("abc"),
        None, // infinity has no Date32 form: kept in _fallback
        Some("13:14:15.123456"),
        Some("2024-02-29T23:59:59.999999"),
        Some("2024-01-05T13:00:00Z"),
        Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        Some(r#"{"a": [1, 2], "b": null}"#),
        Some("00ff10"),
        Some("[1, , 3]"),
        Some("[a b, c,d, ]"),
        Some("P1DT2H3M4S"),
        Some(r#"{"d":"infinity"}"#),
        Some("true"),
        Some("true"),
        Some("true"),
    ];
    assert_eq!(row, expected);
}

/// Values with no exact typed form keep their exact text in `_fallback`; odd identifiers,
/// a composite key, enums and domains, empty strings versus NULLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_values_keep_their_exact_text() {
    let setup = r#"
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE DOMAIN positive_int AS int CHECK (VALUE > 0);
        CREATE TABLE "Ocorrências" (
            "Chave Um" int,
            k2 text,
            m mood,
            p positive_int,
            n numeric(10,2),
            tstz timestamptz,
            ts timestamp,
            grid int[],
            s text,
            empty_arr int[],
            PRIMARY KEY ("Chave Um", k2)
        );
        CREATE PUBLICATION w2d_pub FOR TABLE "Ocorrências";
    "#;
    let (env, _daemon) = Env::streaming(setup, &["public.\"Ocorrências\""]).await;
    env.pg
        .client()
        .await
        .batch_execute(
            r#"INSERT INTO "Ocorrências" VALUES
                 (1, '', 'happy', 5, 'NaN', '-infinity', 'infinity', '{{1,2},{3,4}}', '', '{}'),
                 (2, 'b', NULL, NULL, -0.5, NULL, NULL, NULL, NULL, NULL);
               UPDATE "Ocorrências" SET k2 = 'c' WHERE "Chave Um" = 2;"#,
        )
        .await
        .unwrap();
    env.wait_raw_rows("public", "Ocorr~C3~AAncias", 3, Duration::from_secs(60))
        .await;
    let raw = env.raw_path("public", "Ocorr~C3~AAncias");
    let types = query_delta(&raw, "SELECT arrow_typeof(p) FROM t LIMIT 1").await;
    assert_eq!(
        types[0][0].as_deref(),
        Some("Int64"),
        "a domain over int is typed as an integer (all integers are stored as 64-bit)"
    );
    let rows = query_delta(
        &raw,
        r#"SELECT _op, "Chave Um", k2, m, p, n, tstz, ts, grid, s, empty_arr, _fallback, _before, _seq
           FROM t ORDER BY _commit_lsn, _seq"#,
    )
    .await;
    let rows: Vec<Vec<Option<&str>>> = rows
        .iter()
        .map(|r| r.iter().map(|v| v.as_deref()).collect())
        .collect();
    assert_eq!(
        rows[0],
        vec![
            Some("c"),
            Some("1"),
            Some(""),
            Some("happy"),
            Some("5"),
            None,
            None,
            None,
            None,
            Some(""),
            Some("[]"),
            Some(r#"{"grid":"{{1,2},{3,4}}","n":"NaN","ts":"infinity","tstz":"-infinity"}"#),
            None,
            Some("0"),
        ]
    );
    assert_eq!(
        rows[1],
        vec![
            Some("c"),
            Some("2"),
            Some("b"),
            None,
            None,
            Some("-0.50"),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            Some("1")
        ]
    );
    // Changing part of a composite key keeps the whole old key.
    assert_eq!(rows[2][0..3], [Some("u"), Some("2"), Some("c")]);
    assert_eq!(rows[2][12], Some(r#"{"Chave Um":"2","k2":"b"}"#));
}

/// A table whose every type has a binary reading is snapshotted with binary COPY: each
/// value lands exactly as the same value streamed (as text) afterwards, NULLs, fallbacks
/// (NaN, infinity, years past chrono's range, digits a decimal cannot hold) and edge
/// values included. A table with an array column is copied as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_snapshot_values_equal_the_streamed_ones() {
    let setup = r#"
        CREATE TABLE "Tipos" (
            id int PRIMARY KEY, b bool, i2 smallint, i4 int, i8 bigint, o oid, f4 real,
            f8 float8, n numeric(12,2), n38 numeric(38,0), nu numeric, d date, ts timestamp,
            tstz timestamptz, t text, vc varchar(10), c char(4), nm name, j json, jb jsonb,
            u uuid, by bytea);
        INSERT INTO "Tipos" VALUES
          (1, true, 1, 2, 3, 4, 1.5, 2.25, 12.34, 12345678901234567890123456789012345678,
           123.4500, '2024-02-29', '2024-01-05 13:00:00.123456', '2024-01-05 13:00:00.5-03',
           E'olá\ttab\nline\\', 'ação', 'ab', 'nome', '{"a": [1, 2]}', '{"b": 1, "a": "x"}',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\x00ff10'),
          (2, false, -32768, -2147483648, -9223372036854775808, 4294967295, 'NaN',
           '-Infinity', 'NaN', -99999999999999999999999999999999999999, 'Infinity',
           'infinity', '-infinity', 'infinity', '', '', '', '', 'null', '[]', NULL, '\x'),
          (3, NULL, 32767, NULL, 9223372036854775807, 0, 3.4028235e38, '-0', -0.5, 0,
           '-0.000000000000000000001', '5874897-12-31', '294276-12-31 23:59:59.999999',
           '4713-01-01 00:00:00+00 BC', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
          (4, NULL, NULL, NULL, NULL, NULL, 1e-45, 1e-300, 0, NULL, '-Infinity',
           '0044-03-15 BC', '0001-01-01 00:00:00 BC', '262143-12-31 23:59:59+00', NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL),
          (5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 100000000.000, '1970-01-01',
           '262144-01-01 00:00:00', '262144-01-01 00:00:00.000001+00', NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL),
          (6, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'NaN', NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
        CREATE TABLE listas (id int PRIMARY KEY, a int[], s text);
        INSERT INTO listas VALUES (1, '{1,NULL,3}', 'x'), (2, NULL, NULL);
        CREATE PUBLICATION w2d_pub FOR TABLE "Tipos", listas;
    "#;
    let (env, _daemon) = Env::streaming(setup, &["public.\"Tipos\"", "public.listas"]).await;
    let log = env.daemon_log();
    assert!(
        log.lines()
            .any(|l| l.contains("copying in binary format") && l.contains("Tipos")),
        "the typed table is copied in binary format:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("copying as text") && l.contains("listas")),
        "a table with an array column is copied as text:\n{log}"
    );
    env.pg
        .client()
        .await
        .batch_execute(
            r#"INSERT INTO "Tipos" SELECT id + 100, b, i2, i4, i8, o, f4, f8, n, n38, nu, d, ts,
                      tstz, t, vc, c, nm, j, jb, u, by FROM "Tipos";
               INSERT INTO listas SELECT id + 100, a, s FROM listas;"#,
        )
        .await
        .unwrap();
    for (table, dir, columns, rows) in [
        (
            "Tipos",
            "Tipos",
            "b, i2, i4, i8, o, f4, f8, n, n38, nu, d, ts, tstz, t, vc, c, nm, j, jb, u, by",
            6,
        ),
        ("listas", "listas", "a, s", 2),
    ] {
        env.wait_raw_rows("public", dir, rows * 2, Duration::from_secs(60))
            .await;
        let raw = env.raw_path("public", dir);
        let read = |op: &'static str| {
            let sql = format!(
                "SELECT id % 100, {columns}, _fallback FROM t WHERE _op = '{op}' ORDER BY id"
            );
            let raw = raw.clone();
            async move { query_delta(&raw, &sql).await }
        };
        let (copied, streamed) = (read("r").await, read("c").await);
        assert_eq!(copied.len() as i64, rows, "{table}: snapshot rows");
        assert_eq!(
            copied, streamed,
            "{table}: copied and streamed values differ"
        );
    }
    let fallbacks = query_delta(
        &env.raw_path("public", "Tipos"),
        "SELECT _fallback FROM t WHERE _op = 'r' ORDER BY id",
    )
    .await;
    let fallbacks: Vec<Option<&str>> = fallbacks.iter().map(|r| r[0].as_deref()).collect();
    assert_eq!(
        fallbacks,
        [
            None,
            Some(r#"{"d":"infinity","n":"NaN","ts":"-infinity","tstz":"infinity"}"#),
            Some(r#"{"d":"5874897-12-31","ts":"294276-12-31 23:59:59.999999"}"#),
            // chrono's last year is 262142.
            Some(r#"{"tstz":"262143-12-31 23:59:59+00"}"#),
            Some(r#"{"ts":"262144-01-01 00:00:00","tstz":"262144-01-01 00:00:00.000001+00"}"#),
            None,
        ]
    );
}
