//! `wal2delta status`: the slot, the daemon and every table's durable position, read-only.
//!
//! Everything is read from where it is authoritative: the slot from
//! `pg_replication_slots`, whether a daemon runs from the lake lock, and each table's
//! position, version, files and rows from its own Delta log. The source being unreachable
//! does not hide the lake's state: the slot section then says why it is unknown.

use serde::Serialize;

use crate::config::Settings;
use crate::lake::commit::{AppId, applied};
use crate::lake::lock::LakeLock;
use crate::lake::{Lake, LakeError};
use crate::source::catalog;
use crate::table_name::TableName;

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Status {
    pub slot: SlotStatus,
    /// The lake lock's holder (e.g. `pid 1234`) when a daemon runs on this lake.
    pub daemon: Option<String>,
    pub daemon_running: bool,
    /// The global checkpoint: every table is durable up to this source position.
    pub checkpoint_lsn: Option<String>,
    pub tables: Vec<TableStatus>,
}

#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub exists: Option<bool>,
    pub active: Option<bool>,
    pub plugin: Option<String>,
    pub restart_lsn: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    pub wal_status: Option<String>,
    pub retained_wal_bytes: Option<i64>,
    /// Why the slot could not be read.
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TableStatus {
    pub table: String,
    pub raw: LayerStatus,
    pub curated: LayerStatus,
    /// The consistent point of the table's completed snapshot, if it has one.
    pub snapshot_lsn: Option<String>,
    /// A chunked (watermark) copy under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunked: Option<ChunkedStatus>,
}

/// How far a table's chunked copy is: the lake's record, and the source's key range.
#[derive(Debug, Default, Serialize)]
pub struct ChunkedStatus {
    /// The last key durably copied (`None`: no chunk yet).
    pub last_key: Option<i64>,
    /// When the copy began (RFC 3339).
    pub began: Option<String>,
    /// The source table's smallest and largest key now (`None`: source unreachable).
    pub min_key: Option<i64>,
    pub max_key: Option<i64>,
    /// The share of the rows copied, in percent: from the key column's histogram in
    /// `pg_stats` when the table was analyzed, else from the key range.
    pub percent: Option<f64>,
    /// Rows the source's statistics count (`pg_class.reltuples`).
    pub rows_estimated: Option<f64>,
    /// Rows copied per second since the copy began (estimated), and the seconds left at
    /// that rate.
    pub rows_per_sec: Option<f64>,
    pub eta_secs: Option<f64>,
    /// The copy is a resync (of a table with a completed copy) asked for and not done.
    pub resync: bool,
    #[serde(skip)]
    began_ms: i64,
}

/// One Delta table of a source table.
#[derive(Debug, Default, Serialize)]
pub struct LayerStatus {
    pub exists: bool,
    /// Commit LSN of the last source transaction the table holds.
    pub position_lsn: Option<String>,
    pub version: Option<u64>,
    pub files: usize,
    pub bytes: i64,
    pub rows: i64,
}

/// Gathers the report.
pub async fn gather(settings: &Settings) -> Result<Status, LakeError> {
    let lake = Lake::open(&settings.lake)?;
    let daemon = LakeLock::holder(&lake).await?;
    let slot = slot_status(settings).await;
    let checkpoint = layer(
        &lake.checkpoint_url(),
        "_wal2delta.checkpoint",
        &AppId::checkpoint(&settings.source.slot),
    )
    .await?;
    let resyncs = crate::lake::requests::Requests::open(&lake)
        .pending_requests()
        .await;
    let mut tables = Vec::new();
    for name in &settings.source.tables {
        tables.push(table_status(&lake, &settings.source.slot, name, &resyncs).await?);
    }
    chunked_progress(settings, &mut tables).await;
    Ok(Status {
        slot,
        daemon_running: daemon.is_some(),
        daemon,
        checkpoint_lsn: checkpoint.0.position_lsn,
        tables,
    })
}

/// For the chunked copies under way: the source's key range, the share copied, the rate
/// since the copy began and the time left at that rate. Left empty when the source cannot
/// be read.
async fn chunked_progress(settings: &Settings, tables: &mut [TableStatus]) {
    if tables.iter().all(|t| t.chunked.is_none()) {
        return;
    }
    let Ok(client) = catalog::connect(&settings.source.conn).await else {
        return;
    };
    for t in tables.iter_mut() {
        let Some(c) = t.chunked.as_mut() else {
            continue;
        };
        let Ok(name) = TableName::parse(&t.table) else {
            continue;
        };
        let Ok(Some(info)) =
            catalog::table_info(&client, &name, &settings.source.publication).await
        else {
            continue;
        };
        let Some(key_name) = crate::source::watermark::chunk_key(&info) else {
            continue;
        };
        let key = crate::table_name::quote_ident(key_name);
        let sql = format!(
            "SELECT min({key})::bigint, max({key})::bigint, \
                    (SELECT reltuples FROM pg_class WHERE oid = to_regclass($1))::float8, \
                    (SELECT histogram_bounds::text FROM pg_stats \
                     WHERE schemaname = $2 AND tablename = $3 AND attname = $4 LIMIT 1) \
             FROM {}",
            name.quoted()
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&name.quoted(), &name.schema, &name.name, &key_name];
        let Ok(row) = client.query_one(&sql, &params).await else {
            continue;
        };
        c.min_key = row.get(0);
        c.max_key = row.get(1);
        c.rows_estimated = row.get::<_, Option<f64>>(2).filter(|r| *r >= 0.0);
        let bounds: Vec<i64> = row
            .get::<_, Option<String>>(3)
            .map(|b| {
                b.trim_matches(|c| c == '{' || c == '}')
                    .split(',')
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let share = match (c.last_key, c.min_key, c.max_key) {
            (None, _, _) => Some(0.0),
            (Some(k), _, _) if bounds.len() >= 2 => Some(share_below(&bounds, k)),
            (Some(k), Some(min), Some(max)) => {
                let span = (max as f64 - min as f64 + 1.0).max(1.0);
                Some(((k as f64 - min as f64 + 1.0) / span).clamp(0.0, 1.0))
            }
            _ => None,
        };
        if let Some(share) = share {
            c.percent = Some((1000.0 * share).round() / 10.0);
            let elapsed = (chrono::Utc::now().timestamp_millis() - c.began_ms) as f64 / 1000.0;
            if elapsed > 0.0 && c.began_ms > 0 && share > 0.0 {
                let rows = c.rows_estimated.unwrap_or(0.0);
                c.rows_per_sec = Some((share * rows / elapsed).round());
                c.eta_secs = Some((elapsed * (1.0 - share) / share).round());
            }
        }
    }
}

async fn slot_status(settings: &Settings) -> SlotStatus {
    let mut status = SlotStatus {
        name: settings.source.slot.clone(),
        exists: None,
        active: None,
        plugin: None,
        restart_lsn: None,
        confirmed_flush_lsn: None,
        wal_status: None,
        retained_wal_bytes: None,
        error: None,
    };
    let info = match catalog::connect(&settings.source.conn).await {
        Ok(client) => catalog::slot_info(&client, &settings.source.slot).await,
        Err(e) => Err(e),
    };
    match info {
        Err(e) => status.error = Some(e.to_string()),
        Ok(None) => status.exists = Some(false),
        Ok(Some(slot)) => {
            status.exists = Some(true);
            status.active = Some(slot.active);
            status.plugin = slot.plugin;
            status.restart_lsn = slot.restart_lsn.map(|l| l.to_string());
            status.confirmed_flush_lsn = slot.confirmed_flush.map(|l| l.to_string());
            status.wal_status = slot.wal_status;
            status.retained_wal_bytes = slot.retained_bytes;
        }
    }
    status
}

async fn table_status(
    lake: &Lake,
    slot: &str,
    name: &TableName,
    resyncs: &[(TableName, i64)],
) -> Result<TableStatus, LakeError> {
    let (raw, snapshot) = layer(
        &lake.raw_table_url(name),
        &format!("raw.{name}"),
        &AppId::raw(slot, name),
    )
    .await?;
    let (snapshot_lsn, chunked) = match snapshot {
        Some(table) => {
            let label = format!("raw.{name}");
            let at = applied(&table, &label, &AppId::snapshot(slot, name)).await?;
            // A chunked copy under way: the last key its durable chunks hold. A resync's
            // is under way while its request is pending.
            let progress = crate::lake::raw::read_progress(&table, &label, slot, name).await?;
            let key = progress
                .filter(|p| match p.resync {
                    Some(id) => at.is_none() || resyncs.contains(&(name.clone(), id)),
                    None => at.is_none(),
                })
                .map(|p| ChunkedStatus {
                    last_key: p.last_key,
                    began: chrono::DateTime::from_timestamp_millis(p.began_ms)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                    began_ms: p.began_ms,
                    resync: p
                        .resync
                        .is_some_and(|id| resyncs.contains(&(name.clone(), id))),
                    ..Default::default()
                });
            (at.map(|l| l.to_string()), key)
        }
        None => (None, None),
    };
    let (curated, _) = layer(
        &lake.curated_table_url(name),
        &format!("curated.{name}"),
        &AppId::curated(slot, name),
    )
    .await?;
    Ok(TableStatus {
        table: name.to_string(),
        raw,
        curated,
        snapshot_lsn,
        chunked,
    })
}

/// One Delta table's facts (and the open table, for further lookups).
async fn layer(
    url: &url::Url,
    label: &str,
    app_id: &AppId,
) -> Result<(LayerStatus, Option<deltalake::DeltaTable>), LakeError> {
    let delta_err = |source| LakeError::Delta {
        table: label.to_string(),
        source,
    };
    if url
        .to_file_path()
        .is_ok_and(|p| !p.join("_delta_log").exists())
    {
        return Ok((LayerStatus::default(), None));
    }
    let table = deltalake::DeltaTable::try_from_url(url.clone())
        .await
        .map_err(delta_err)?;
    let Some(version) = table.version() else {
        return Ok((LayerStatus::default(), None));
    };
    let mut status = LayerStatus {
        exists: true,
        version: Some(version),
        position_lsn: applied(&table, label, app_id).await?.map(|l| l.to_string()),
        ..LayerStatus::default()
    };
    for file in table.snapshot().map_err(delta_err)?.log_data().iter() {
        status.files += 1;
        status.bytes += file.size();
        // Rows a deletion vector marks deleted are not in the table.
        let deleted = file
            .deletion_vector_descriptor()
            .map_or(0, |dv| dv.cardinality);
        status.rows += file.num_records().unwrap_or(0) as i64 - deleted;
    }
    Ok((status, Some(table)))
}

/// The share of rows with a key at most `key`, from a histogram's bucket bounds (each
/// bucket holds as many rows), interpolated within its bucket.
fn share_below(bounds: &[i64], key: i64) -> f64 {
    let buckets = (bounds.len() - 1) as f64;
    if key < bounds[0] {
        return 0.0;
    }
    match bounds.windows(2).position(|w| key < w[1]) {
        None => 1.0,
        Some(i) => {
            let (lo, hi) = (bounds[i] as f64, bounds[i + 1] as f64);
            (i as f64 + (key as f64 - lo) / (hi - lo).max(1.0)) / buckets
        }
    }
}

/// A chunked copy's progress in a few words: `copying, through key 1200 of 5000, 24% of
/// the rows, ETA 1m 40s`.
fn chunked_text(c: &ChunkedStatus) -> String {
    let doing = if c.resync { "resyncing" } else { "copying" };
    let mut text = match c.last_key {
        Some(k) => format!("{doing}, through key {k}"),
        None => doing.to_string(),
    };
    if let Some(max) = c.max_key {
        text.push_str(&format!(" of {max}"));
    }
    if let Some(p) = c.percent {
        text.push_str(&format!(", {p}% of the rows"));
    }
    if let Some(eta) = c.eta_secs {
        let eta = eta as u64;
        text.push_str(&match eta {
            0..60 => format!(", ETA {eta}s"),
            60..3600 => format!(", ETA {}m {}s", eta / 60, eta % 60),
            _ => format!(", ETA {}h {}m", eta / 3600, eta % 3600 / 60),
        });
    }
    text
}

/// The report as aligned text for people.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let s = &status.slot;
    let dash = || "-".to_string();
    match (&s.error, s.exists) {
        (Some(e), _) => out.push_str(&format!("slot {}: unknown ({e})\n", s.name)),
        (None, Some(false)) => out.push_str(&format!("slot {}: does not exist\n", s.name)),
        _ => out.push_str(&format!(
            "slot {}: {}, plugin {}, wal_status {}, restart {}, confirmed flush {}, retained WAL {}\n",
            s.name,
            if s.active == Some(true) { "active" } else { "inactive" },
            s.plugin.clone().unwrap_or_else(dash),
            s.wal_status.clone().unwrap_or_else(dash),
            s.restart_lsn.clone().unwrap_or_else(dash),
            s.confirmed_flush_lsn.clone().unwrap_or_else(dash),
            s.retained_wal_bytes.map(human_bytes).unwrap_or_else(dash),
        )),
    }
    out.push_str(&match &status.daemon {
        Some(owner) => format!("daemon: running ({owner})\n"),
        None => "daemon: not running on this lake\n".to_string(),
    });
    out.push_str(&format!(
        "checkpoint: {}\n\n",
        status
            .checkpoint_lsn
            .clone()
            .unwrap_or_else(|| "none yet".into())
    ));
    let mut rows = vec![
        [
            "TABLE", "LAYER", "POSITION", "VERSION", "FILES", "SIZE", "ROWS", "SNAPSHOT",
        ]
        .map(String::from),
    ];
    for t in &status.tables {
        for (i, (name, l)) in [("raw", &t.raw), ("curated", &t.curated)]
            .into_iter()
            .enumerate()
        {
            rows.push([
                if i == 0 {
                    t.table.clone()
                } else {
                    String::new()
                },
                name.to_string(),
                l.position_lsn.clone().unwrap_or_else(dash),
                l.version.map(|v| v.to_string()).unwrap_or_else(dash),
                l.files.to_string(),
                human_bytes(l.bytes),
                l.rows.to_string(),
                if i == 0 {
                    match (&t.snapshot_lsn, &t.chunked) {
                        (_, Some(c)) if c.resync => chunked_text(c),
                        (Some(at), _) => at.clone(),
                        (None, Some(c)) => chunked_text(c),
                        (None, None) => "none".into(),
                    }
                } else {
                    String::new()
                },
            ]);
        }
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn human_bytes(n: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_copied_follows_the_histogram() {
        // Four buckets of equal row counts over keys 0..1000, dense at the low end.
        let bounds = [0, 10, 20, 30, 1000];
        assert_eq!(share_below(&bounds, -5), 0.0);
        assert_eq!(share_below(&bounds, 0), 0.0);
        assert_eq!(share_below(&bounds, 10), 0.25);
        assert_eq!(share_below(&bounds, 25), 0.625);
        assert_eq!(share_below(&bounds, 515), 0.875);
        assert_eq!(share_below(&bounds, 1000), 1.0);
        let c = ChunkedStatus {
            last_key: Some(25),
            max_key: Some(1000),
            percent: Some(62.5),
            eta_secs: Some(95.0),
            ..Default::default()
        };
        assert_eq!(
            chunked_text(&c),
            "copying, through key 25 of 1000, 62.5% of the rows, ETA 1m 35s"
        );
    }
}
