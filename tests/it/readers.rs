//! The lake is standard Delta: an independent reader (the Python `deltalake` package, a
//! separately released delta-rs build, installed by `.ci/run`) opens the raw tables and the
//! checkpoint table and sees the same rows, types and positions as wal2delta's own reader.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Env, query_delta, require_python_deltalake};

const SETUP: &str = r#"
CREATE TABLE mixed (
    id int PRIMARY KEY,
    amount numeric(12,2),
    at timestamp,
    at_tz timestamptz,
    tags text[],
    blob bytea,
    note text
);
CREATE PUBLICATION w2d_pub FOR TABLE mixed;
"#;

const READER: &str = r#"
import json, os, sys
from deltalake import DeltaTable
raw = DeltaTable(sys.argv[1]).to_pyarrow_table().to_pylist()
raw.sort(key=lambda r: (r["_commit_lsn"], r["_seq"]))
checkpoint = DeltaTable(sys.argv[2])
print(json.dumps({
    "rows": [[r["id"], r["_op"], str(r["amount"]) if r["amount"] is not None else None,
              r["at"].isoformat() if r["at"] else None,
              r["at_tz"].isoformat() if r["at_tz"] else None,
              r["tags"], r["blob"].hex() if r["blob"] else None, r["_commit_lsn"], r["_seq"]]
             for r in raw],
    "checkpoint_version": checkpoint.version(),
}))
sys.stdout.flush()
# Skip interpreter teardown: the native reader's background threads can abort it
# ("terminate called without an active exception") after the work is done.
os._exit(0)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_delta_reader_sees_the_same_rows() {
    require_python_deltalake();
    let (env, mut daemon) = Env::streaming(SETUP, &["public.mixed"]).await;
    env.pg
        .client()
        .await
        .batch_execute(
            r#"INSERT INTO mixed VALUES
                 (1, 1234.50, '2024-01-05 10:00:00.25', '2024-01-05 10:00:00-03', '{a,"b c"}', '\xcafe', 'ação'),
                 (2, NULL, NULL, NULL, NULL, NULL, NULL);
               UPDATE mixed SET amount = -0.01 WHERE id = 1;
               DELETE FROM mixed WHERE id = 2;"#,
        )
        .await
        .unwrap();
    env.wait_raw_rows("public", "mixed", 4, Duration::from_secs(60))
        .await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());

    let raw = env.raw_path("public", "mixed");
    let checkpoint = env.lake.join("_wal2delta").join("checkpoint");
    let out = Command::new("python3")
        .args([
            "-c",
            READER,
            raw.to_str().unwrap(),
            checkpoint.to_str().unwrap(),
        ])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the Python reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("reader output is JSON");
    let expected = serde_json::json!([
        [
            1,
            "c",
            "1234.50",
            "2024-01-05T10:00:00.250000",
            "2024-01-05T13:00:00+00:00",
            ["a", "b c"],
            "cafe"
        ],
        [2, "c", null, null, null, null, null],
        [
            1,
            "u",
            "-0.01",
            "2024-01-05T10:00:00.250000",
            "2024-01-05T13:00:00+00:00",
            ["a", "b c"],
            "cafe"
        ],
        [2, "d", null, null, null, null, null],
    ]);
    let rows = seen["rows"].as_array().expect("rows");
    let python_view: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::Value::Array(r.as_array().unwrap()[..7].to_vec()))
        .collect();
    assert_eq!(serde_json::Value::Array(python_view), expected);
    // Same change positions as our own reader.
    let ours = query_delta(
        &raw,
        "SELECT _commit_lsn, _seq FROM t ORDER BY _commit_lsn, _seq",
    )
    .await;
    let theirs: Vec<Vec<Option<String>>> = rows
        .iter()
        .map(|r| vec![Some(r[7].to_string()), Some(r[8].to_string())])
        .collect();
    assert_eq!(ours, theirs);
    assert!(
        seen["checkpoint_version"].as_i64().unwrap_or(0) >= 1,
        "{seen}"
    );
}
