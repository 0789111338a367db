//! Prometheus metrics: `/metrics` serves the documented metrics with the right values
//! after a snapshot, streamed changes and a normalization failure.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::{Env, wait_for};

pub fn scrape(addr: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

/// The value of the first sample of `name` carrying every label in `labels`
/// (`key="value"`), whatever their order.
pub fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let metric = series.split('{').next().unwrap_or("");
            metric == name && labels.iter().all(|lb| series.contains(lb))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_the_documented_metrics() {
    let setup = "CREATE TABLE pagamentos (id int PRIMARY KEY, valor_pago text);
                 INSERT INTO pagamentos VALUES (1, '1,00'), (2, '2,00');
                 ANALYZE pagamentos;
                 CREATE PUBLICATION w2d_pub FOR TABLE pagamentos;";
    let env = Env::new(setup).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    env.write_config(
        "postgres",
        &["public.pagamentos"],
        &format!(
            "[metrics]\nlisten = \"{addr}\"\nretained_wal_warn_mb = 0\n[curated]\nkey_index_mb = 0"
        ),
    );
    let _daemon = env.daemon();
    env.wait_streaming().await;
    env.pg
        .client()
        .await
        .batch_execute(
            "INSERT INTO pagamentos VALUES (3, 'abc'); UPDATE pagamentos SET valor_pago = '9' WHERE id = 1;",
        )
        .await
        .unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let table = "table=\"public.pagamentos\"";
    let op = |o: &str| format!("op=\"{o}\"");
    wait_for(
        "the metrics to show the streamed changes and the retained WAL",
        Duration::from_secs(30),
        || {
            let text = scrape(&addr);
            async move {
                value(&text, "wal2delta_changes_total", &["op=\"u\""]).is_some()
                    && value(&text, "wal2delta_slot_retained_wal_bytes", &[]).is_some()
            }
        },
        || scrape(&addr),
    )
    .await;
    let text = scrape(&addr);
    let get = |name: &str, labels: &[&str]| {
        value(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    assert_eq!(get("wal2delta_changes_total", &[table, &op("r")]), 2.0);
    assert_eq!(get("wal2delta_changes_total", &[table, &op("c")]), 1.0);
    assert_eq!(get("wal2delta_changes_total", &[table, &op("u")]), 1.0);
    assert!(get("wal2delta_transactions_total", &[]) >= 1.0);
    assert!(get("wal2delta_flushed_lsn", &[]) > 0.0);
    // Caught up: at most the WAL of the last keepalive interval (an idle server still
    // writes a little).
    assert!(get("wal2delta_replication_lag_bytes", &[]) < 1_000_000.0);
    assert!(get("wal2delta_replication_lag_seconds", &[]) >= 0.0);
    assert_eq!(get("wal2delta_snapshot_rows_copied", &[table]), 2.0);
    assert_eq!(get("wal2delta_snapshot_rows_estimated", &[table]), 2.0);
    assert_eq!(
        get(
            "wal2delta_normalization_failures_total",
            &[table, "column=\"valor_pago\""]
        ),
        1.0
    );
    assert!(
        get(
            "wal2delta_delta_commit_duration_seconds_count",
            &[table, "layer=\"curated\""]
        ) >= 1.0
    );
    assert!(get("wal2delta_batch_rows_count", &[]) >= 1.0);
    // The update of id 1 marked its row in the snapshot's curated file deleted (a
    // deletion vector) instead of rewriting the file, reading the file's key column (the
    // key index is off here).
    assert!(get("wal2delta_merge_seconds_count", &[table]) >= 1.0);
    assert!(get("wal2delta_merge_scanned_files_total", &[table]) >= 1.0);
    assert!(get("wal2delta_merge_marked_rows_total", &[table]) >= 1.0);
    assert_eq!(get("wal2delta_merge_rewritten_files_total", &[table]), 0.0);
    assert_eq!(get("wal2delta_build_info", &["version="]), 1.0);
    assert!(
        text.contains("# HELP wal2delta_replication_lag_bytes"),
        "{text}"
    );
    // retained_wal_warn_mb = 0: the slot always retains more, so the warning is logged.
    assert!(
        env.daemon_log()
            .contains("retains more WAL than metrics.retained_wal_warn_mb")
    );
}

#[test]
fn the_dashboard_and_the_readme_name_only_real_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let source = std::fs::read_to_string(format!("{root}/src/telemetry.rs")).unwrap();
    let readme = std::fs::read_to_string(format!("{root}/docs/operations.md")).unwrap();
    let dashboard = std::fs::read_to_string(format!("{root}/docs/grafana-dashboard.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let names = |text: &str| -> std::collections::BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("wal2delta_") && w.len() > "wal2delta_".len())
            .map(|w| {
                w.trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum")
                    .to_string()
            })
            .collect()
    };
    let defined = names(&source);
    for name in names(&dashboard) {
        assert!(
            defined.contains(&name),
            "the dashboard uses {name}, which wal2delta does not export"
        );
    }
    for name in &defined {
        assert!(
            readme.contains(&format!("`{name}`")),
            "docs/operations.md does not document {name}"
        );
    }
}
