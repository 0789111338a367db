//! A good neighbour on the database host: the snapshot's read rate is capped by
//! `source.snapshot_max_mb_per_sec`.

use std::time::Duration;

use crate::curated::assert_mirror;
use crate::harness::Env;

/// About 4 MiB of COPY text.
const SETUP: &str = "
CREATE TABLE largo (id int PRIMARY KEY, texto text);
INSERT INTO largo SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, 20000) g;
";

/// The `elapsed_ms` of the daemon's `table snapshot committed` line.
fn snapshot_ms(log: &str) -> u64 {
    log.lines()
        .find(|l| l.contains("table snapshot committed"))
        .and_then(|l| l.split("elapsed_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no snapshot line in:\n{log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_reads_no_faster_than_its_limit() {
    let env = Env::new(SETUP).await;
    let bytes: i64 = env
        .pg
        .client()
        .await
        .query_one(
            "SELECT sum(octet_length(id::text) + octet_length(texto) + 2)::bigint FROM largo",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // 1 MiB/s over about 4 MiB: at least 3 s (the first chunk is free), where an
    // unthrottled copy takes a fraction of a second.
    env.write_config("postgres", &["public.largo"], "snapshot_max_mb_per_sec = 1");
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let ms = snapshot_ms(&env.daemon_log());
    let floor = (bytes as f64 / (1024.0 * 1024.0) * 1000.0 * 0.8) as u64;
    assert!(
        ms >= floor,
        "{bytes} bytes copied in {ms} ms at 1 MiB/s (expected at least {floor} ms)"
    );
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_mirror(&env, "public.largo").await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}
