//! Bounded memory: one source transaction far larger than any buffer streams through the
//! daemon into uncommitted Parquet files and lands whole, while the daemon's peak resident
//! memory stays a fraction of the transaction's size.

use std::time::Duration;

use crate::harness::{Env, count_delta, peak_rss, query_delta};

const ROWS: i64 = 2_000_000;

const SETUP: &str = r#"
CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL);
CREATE PUBLICATION w2d_pub FOR TABLE big;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_transaction_streams_with_bounded_memory() {
    let (env, mut daemon) = Env::streaming(SETUP, &["public.big"]).await;
    let pg = env.pg.client().await;
    // About 400 MB of row data in one transaction. The daemon's peak stays near 200 MB
    // whatever the size (198-208 MB with 200 MB and 207 MB with 300 MB of data), 270 MB
    // since a chunk is written while the next one is built: with 300 MB the margin was
    // too thin to tell bounded from growing.
    pg.batch_execute(&format!(
        "INSERT INTO big SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, {ROWS}) g"
    ))
    .await
    .unwrap();
    let data_bytes: i64 = pg
        .query_one("SELECT sum(length(payload) + 8)::bigint FROM big", &[])
        .await
        .unwrap()
        .get(0);
    let raw = env.raw_path("public", "big");
    env.wait_raw_rows("public", "big", 1, Duration::from_secs(600))
        .await;
    // The transaction is committed in one Delta commit: all rows or none.
    assert_eq!(count_delta(&raw).await, ROWS);
    let peak = peak_rss(daemon.pid());
    println!(
        "figure: one transaction of {ROWS} rows ({} MB of row data): daemon peak RSS {} MB",
        data_bytes / 1_000_000,
        peak / 1_000_000
    );
    assert!(peak > 0, "could not read the daemon's peak RSS");
    assert!(
        (peak as i64) < data_bytes,
        "peak RSS {peak} is not below the transaction's {data_bytes} bytes: memory grows with transaction size"
    );
    assert!(daemon.terminate(Duration::from_secs(60)).success());
}

/// Large TOASTed values (10 MB each, 800 MB in one transaction) pass through a byte-bounded
/// pipeline: the peak RSS stays below the transaction's size and every value arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_toasted_values_stream_with_bounded_memory() {
    let setup = "CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL);
                 ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
                 CREATE PUBLICATION w2d_pub FOR TABLE docs;";
    let (env, mut daemon) = Env::streaming(setup, &["public.docs"]).await;
    let pg = env.pg.client().await;
    let values = 80;
    let size = 10_000_000;
    pg.batch_execute(&format!(
        "INSERT INTO docs SELECT g, repeat(chr(65 + g % 26), {size}) FROM generate_series(1, {values}) g"
    ))
    .await
    .unwrap();
    env.wait_raw_rows("public", "docs", values, Duration::from_secs(600))
        .await;
    let raw = env.raw_path("public", "docs");
    let check = query_delta(
        &raw,
        "SELECT count(*), min(length(body)), max(length(body)) FROM t",
    )
    .await;
    assert_eq!(
        check[0],
        [
            Some(values.to_string()),
            Some(size.to_string()),
            Some(size.to_string())
        ]
    );
    let peak = peak_rss(daemon.pid());
    let data = values * size;
    println!(
        "figure: one transaction of {values} values of {} MB: daemon peak RSS {} MB",
        size / 1_000_000,
        peak / 1_000_000
    );
    assert!(
        (peak as i64) < data,
        "peak RSS {peak} is not below the transaction's {data} bytes"
    );
    assert!(daemon.terminate(Duration::from_secs(60)).success());
}
