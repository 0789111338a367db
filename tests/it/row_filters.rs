//! Publication row filters and column lists (PostgreSQL 15+): the lake holds exactly the
//! part of a table the publication publishes (rows entering and leaving the filter, a
//! column left out absent, not NULL), and a change of the filter or the list, while
//! wal2delta runs or while it is stopped, copies the table again.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::curated::assert_mirror;
use crate::harness::{Env, query_delta_at, wait_for, wal2delta};

/// The source's rows `WHERE filter` and the curated table's, as `a|b|…` lines of `columns`.
async fn part_rows(
    env: &Env,
    table: &str,
    columns: &str,
    filter: &str,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let line = columns
        .split(", ")
        .map(|c| format!("coalesce(CAST({c} AS VARCHAR), '<null>')"))
        .collect::<Vec<_>>()
        .join(" || '|' || ");
    let source: BTreeSet<String> = env
        .pg
        .client()
        .await
        .query(&format!("SELECT {line} FROM {table} WHERE {filter}"), &[])
        .await
        .expect("source rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let curated: BTreeSet<String> = query_delta_at(
        &env.table_location("curated", "public", table),
        &format!("SELECT {line} FROM t"),
    )
    .await
    .into_iter()
    .map(|r| r[0].clone().unwrap_or_default())
    .collect();
    (source, curated)
}

async fn wait_part(env: &Env, table: &str, columns: &str, filter: &str) {
    wait_for(
        &format!("curated {table} to hold the source's rows WHERE {filter}"),
        Duration::from_secs(90),
        || async move {
            // A column added to the list reaches the lake first (or with the copy).
            let present = curated_columns(env, table).await;
            if !columns.split(", ").all(|c| present.iter().any(|p| p == c)) {
                return false;
            }
            let (source, curated) = part_rows(env, table, columns, filter).await;
            source == curated
        },
        || env.daemon_log(),
    )
    .await;
}

async fn curated_columns(env: &Env, table: &str) -> Vec<String> {
    let path = env.lake.join("curated").join("public").join(table);
    let table = deltalake::open_table(url::Url::from_directory_path(&path).unwrap())
        .await
        .unwrap();
    let schema = table.snapshot().unwrap().schema();
    schema
        .fields()
        .map(|f| f.name().to_string())
        .filter(|n| !n.starts_with('_'))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_filters_and_column_lists_are_honoured_and_their_changes_copy_again() {
    let env = Env::new(
        "CREATE TABLE orders (region text, id int, amount int, PRIMARY KEY (region, id));
         INSERT INTO orders SELECT (ARRAY['eu','us','br'])[g % 3 + 1], g, g * 10
           FROM generate_series(1, 300) g;
         CREATE TABLE people (id int PRIMARY KEY, name text, ssn text, note text);
         INSERT INTO people SELECT g, 'n' || g, 'ssn' || g, 'x' FROM generate_series(1, 100) g;
         CREATE TABLE events (id int, kind text, v int, PRIMARY KEY (id, kind)) PARTITION BY RANGE (id);
         CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (1000);
         CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (1000) TO (2000);
         INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, g FROM generate_series(1, 900) g;
         INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, g FROM generate_series(1500, 1700) g;
         CREATE PUBLICATION w2d_pub FOR TABLE orders WHERE (region = 'eu'), people (id, name, note), \
           events WHERE (kind = 'a') WITH (publish_via_partition_root = true);",
    )
    .await;
    assert!(
        env.pg.major().await >= 15,
        "row filters and column lists need PostgreSQL 15 or newer"
    );
    env.write_config(
        "postgres",
        &["public.orders", "public.people", "public.events"],
        "",
    );
    let (code, out) = tokio::task::block_in_place(|| wal2delta(&env, &["validate"]));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("publishes only rows WHERE (region = 'eu'::text) of public.orders")
            && out.contains("publishes only columns (id, name, note) of public.people"),
        "{out}"
    );
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let pg = env.pg.client().await;
    pg.batch_execute(
        "INSERT INTO orders VALUES ('eu', 1001, 1), ('us', 1002, 2);
         UPDATE orders SET amount = amount + 1 WHERE id <= 30;
         UPDATE orders SET region = 'us' WHERE region = 'eu' AND id BETWEEN 31 AND 60;
         UPDATE orders SET region = 'eu' WHERE region = 'br' AND id BETWEEN 61 AND 90;
         DELETE FROM orders WHERE id BETWEEN 91 AND 120;
         UPDATE people SET ssn = 'changed', note = 'y' WHERE id <= 10;
         INSERT INTO people VALUES (101, 'new', 'secret', 'z');
         DELETE FROM people WHERE id = 50;",
    )
    .await
    .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let (source, curated) = part_rows(&env, "orders", "region, id, amount", "region = 'eu'").await;
    assert_eq!(
        source, curated,
        "curated orders: the rows WHERE region = 'eu'"
    );
    assert!(source.len() > 90, "{}", source.len());
    let (source, curated) = part_rows(&env, "people", "id, name, note", "true").await;
    assert_eq!(source, curated, "curated people: the published columns");
    assert_eq!(
        curated_columns(&env, "people").await,
        ["id", "name", "note"]
    );
    // A partitioned table published through its root with a filter: rows moving between
    // partitions and in and out of the filter.
    pg.batch_execute(
        "UPDATE events SET id = id + 1000 WHERE id BETWEEN 10 AND 40; \
         UPDATE events SET kind = 'b' WHERE id BETWEEN 1500 AND 1520 AND kind = 'a'; \
         UPDATE events SET kind = 'a' WHERE id BETWEEN 1600 AND 1620 AND kind = 'b'; \
         DELETE FROM events WHERE id BETWEEN 500 AND 520;",
    )
    .await
    .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let (source, curated) = part_rows(&env, "events", "id, kind, v", "kind = 'a'").await;
    assert_eq!(source, curated, "curated events: the rows WHERE kind = 'a'");
    assert!(source.len() > 500, "{}", source.len());

    // A wider filter and a column added to the list while the daemon runs: both tables
    // are copied again (resync), values of the new column included, and the stream
    // carries the new parts from then on.
    pg.batch_execute(
        "ALTER PUBLICATION w2d_pub SET TABLE orders WHERE (region IN ('eu', 'br')), \
         people (id, name, ssn, note), events WHERE (kind = 'a')",
    )
    .await
    .unwrap();
    let wider = "region IN ('eu', 'br')";
    wait_part(&env, "orders", "region, id, amount", wider).await;
    wait_part(&env, "people", "id, name, ssn, note", "true").await;
    pg.batch_execute(
        "UPDATE orders SET amount = 0 WHERE region = 'br' AND id < 200; \
         UPDATE people SET ssn = 'later' WHERE id BETWEEN 30 AND 35;",
    )
    .await
    .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    wait_part(&env, "orders", "region, id, amount", wider).await;
    assert_mirror(&env, "public.people").await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());

    // A narrower filter while the daemon is stopped: the start copies the table again.
    pg.batch_execute(
        "ALTER PUBLICATION w2d_pub SET TABLE orders WHERE (region = 'br'), \
         people (id, name, ssn, note), events WHERE (kind = 'a'); \
         UPDATE orders SET amount = -1 WHERE id BETWEEN 150 AND 160;",
    )
    .await
    .unwrap();
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    let (source, curated) = part_rows(&env, "orders", "region, id, amount", "region = 'br'").await;
    assert_eq!(
        source, curated,
        "curated orders after a narrower filter while stopped"
    );
    assert!(
        env.daemon_log()
            .contains("the publication publishes another part of this table"),
        "{}",
        env.daemon_log()
    );
    let (code, text) = tokio::task::block_in_place(|| wal2delta(&env, &["verify", "--wait", "60"]));
    assert_eq!(code, 0, "{text}\n{}", env.daemon_log());
    assert!(
        text.contains("public.orders: equal") && text.contains("public.people: equal"),
        "{text}"
    );
    assert!(daemon.terminate(Duration::from_secs(30)).success());

    // With snapshot = "never" a changed part is not copied, but said, not silent.
    pg.batch_execute(
        "ALTER PUBLICATION w2d_pub SET TABLE orders WHERE (region = 'us'), \
         people (id, name, ssn, note), events WHERE (kind = 'a')",
    )
    .await
    .unwrap();
    env.write_config(
        "postgres",
        &["public.orders", "public.people", "public.events"],
        "snapshot = \"never\"",
    );
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    assert!(
        env.daemon_log().contains(
            "source.snapshot = \"never\" copies nothing: the lake lacks the rows and columns"
        ) && env.daemon_log().contains("resync --table public.orders"),
        "{}",
        env.daemon_log()
    );
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}
