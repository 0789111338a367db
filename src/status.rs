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
    /// For a chunked copy under way: the last key durably copied (`Some(None)`: begun,
    /// no row yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunked_key: Option<Option<i64>>,
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
    let mut tables = Vec::new();
    for name in &settings.source.tables {
        tables.push(table_status(&lake, &settings.source.slot, name).await?);
    }
    Ok(Status {
        slot,
        daemon_running: daemon.is_some(),
        daemon,
        checkpoint_lsn: checkpoint.0.position_lsn,
        tables,
    })
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

async fn table_status(lake: &Lake, slot: &str, name: &TableName) -> Result<TableStatus, LakeError> {
    let (raw, snapshot) = layer(
        &lake.raw_table_url(name),
        &format!("raw.{name}"),
        &AppId::raw(slot, name),
    )
    .await?;
    let (snapshot_lsn, chunked_key) = match snapshot {
        Some(table) => {
            let label = format!("raw.{name}");
            let at = applied(&table, &label, &AppId::snapshot(slot, name)).await?;
            // A chunked copy under way: the last key its durable chunks hold.
            let begun = at.is_none()
                && applied(&table, &label, &AppId::chunked_start(slot, name))
                    .await?
                    .is_some();
            let key = match begun {
                true => Some(
                    applied(&table, &label, &AppId::chunked_key(slot, name))
                        .await?
                        .map(|k| k.as_i64()),
                ),
                false => None,
            };
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
        chunked_key,
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
                    match (&t.snapshot_lsn, t.chunked_key) {
                        (Some(at), _) => at.clone(),
                        (None, Some(Some(key))) => format!("copying, through key {key}"),
                        (None, Some(None)) => "copying".into(),
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
