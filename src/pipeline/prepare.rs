//! Before streaming: check the source, create what is missing and allowed, and copy the
//! tables that have no complete snapshot.
//!
//! A table is copied as of one exported snapshot — the new slot's own, or a temporary
//! slot's — and marked with that snapshot's consistent point, so streaming skips exactly
//! the transactions the copy already holds.

use tokio::sync::mpsc;

use super::{OpenApplier, PipelineError, open_applier};
use crate::apply::Applier;
use crate::config::Settings;
use crate::lake::Lake;
use crate::lake::checkpoint::RecordSender;
use crate::lake::raw::layout::RawBatchBuilder;
use crate::lsn::Lsn;
use crate::source::catalog::{self, CatalogError, TableInfo};
use crate::source::config::{SnapshotMethod, SnapshotMode};
use crate::source::diagnosis::SourceUnusable;
use crate::source::replication::ReplicationConnection;
use crate::source::snapshot::SnapshotReader;
use crate::table_name::TableName;

/// A slot this start created.
pub struct CreatedSlot {
    point: Lsn,
    /// The connection holding the slot's exported snapshot open, and the snapshot's name.
    export: Option<(ReplicationConnection, String)>,
}

/// What [`prepare`] found and did.
pub struct Prepared {
    pub tables: Vec<TableInfo>,
    pub created_slot: Option<CreatedSlot>,
    pub created_publication: bool,
}

/// Checks the source, creates what is missing and allowed, and returns the tables.
pub async fn prepare(settings: &Settings) -> Result<Prepared, PipelineError> {
    let source = &settings.source;
    let client = catalog::connect(&source.conn).await?;
    let report = catalog::check(&client, source, settings.config_path.as_deref()).await?;
    if !report.problems.is_empty() {
        return Err(CatalogError::NotReady(report.problems).into());
    }
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    if report.publication_missing {
        catalog::create_publication(&client, source).await?;
        tracing::info!(publication = %source.publication, "publication created");
    }
    let created_slot = if report.slot_missing {
        Some(create_slot(settings).await?)
    } else {
        None
    };
    Ok(Prepared {
        tables: report.tables,
        created_slot,
        created_publication: report.publication_missing,
    })
}

/// Creates the slot, exporting its snapshot when tables are to be copied.
async fn create_slot(settings: &Settings) -> Result<CreatedSlot, PipelineError> {
    let source = &settings.source;
    if !source.create_slot {
        return Err(SourceUnusable::SlotMissing {
            slot: source.slot.clone(),
        }
        .into());
    }
    let mut conn = ReplicationConnection::connect(&source.conn).await?;
    if source.snapshot == SnapshotMode::Initial {
        let (point, name) = conn
            .create_slot_exporting(&source.slot, false, source.failover)
            .await?;
        tracing::info!(slot = %source.slot, consistent_point = %point, "replication slot created with an exported snapshot");
        Ok(CreatedSlot {
            point,
            export: Some((conn, name)),
        })
    } else {
        let point = conn.create_slot(&source.slot, source.failover).await?;
        conn.close().await;
        tracing::info!(slot = %source.slot, consistent_point = %point, "replication slot created");
        Ok(CreatedSlot {
            point,
            export: None,
        })
    }
}

/// Copies every table that has no complete snapshot from this slot (all of them after the
/// slot was created; one added to the configuration later; one whose copy a crash
/// interrupted; one an operator asked to copy again). Each copied table's record goes to
/// `records`, so the SQL endpoint shows it at once. Returns the tables to copy in chunks
/// while streaming, and the applier that wrote the copies (the first session streams
/// with it instead of opening every table again: 25–35 ms of a benchmark's start).
pub async fn snapshot_missing(
    settings: &Settings,
    lake: &Lake,
    tables: &[TableInfo],
    created: Option<CreatedSlot>,
    records: &RecordSender,
) -> Result<(Vec<TableName>, OpenApplier), PipelineError> {
    let (mut applier, durable) =
        open_applier(settings, lake, tables, Some(records.clone())).await?;
    let (created_point, export) = match created {
        Some(c) => {
            applier.record_slot_created(c.point).await?;
            (Some(c.point), c.export)
        }
        None => (None, None),
    };
    let (missing, chunked) = tables_to_copy(settings, &applier, tables).await?;
    for table in &chunked {
        match applier.chunked_progress(table) {
            Some(p) => {
                tracing::info!(table = %table, last_key = ?p.last_key, "the table's chunked copy resumes while streaming")
            }
            None => tracing::info!(table = %table, "the table is copied in chunks while streaming"),
        }
    }
    if missing.is_empty() {
        if let Some((conn, _)) = export {
            conn.close().await;
        }
        return Ok((chunked, (applier, durable)));
    }
    let (conn, point, name) = match (export, created_point) {
        (Some((conn, name)), Some(point)) => (conn, point, name),
        _ => {
            // The slot is older than these tables' snapshots: take a fresh snapshot from a
            // temporary slot (gone when its connection closes).
            let mut conn = ReplicationConnection::connect(&settings.source.conn).await?;
            let temp = format!("wal2delta_snapshot_{}", std::process::id());
            let (point, name) = conn.create_slot_exporting(&temp, true, false).await?;
            (conn, point, name)
        }
    };
    copy_tables(settings, &mut applier, &missing, point, &name).await?;
    conn.close().await;
    Ok((chunked, (applier, durable)))
}

/// The tables whose snapshot is missing, from an older slot of the same name, from a
/// time the table was left out of the configuration, or older than an operator's
/// `reset-checkpoint --resnapshot`: those to copy from an exported snapshot now, and
/// those to copy in chunks while streaming (`source.snapshot_method = "watermark"`).
async fn tables_to_copy<'a>(
    settings: &Settings,
    applier: &Applier,
    tables: &'a [TableInfo],
) -> Result<(Vec<&'a TableInfo>, Vec<TableName>), PipelineError> {
    let slot_born = applier.slot_created_at();
    let tracked = applier.tracked_tables().await;
    let was_tracked = |t: &TableInfo| {
        tracked
            .as_ref()
            .is_none_or(|set| set.contains(&t.name.to_string()))
    };
    let mut missing = Vec::new();
    let mut chunked = Vec::new();
    for t in tables {
        let requested = applier.resnapshot_requested(&t.name).await?;
        let taken = applier.snapshot_position(&t.name);
        let needed = match taken {
            // An operator's request is honoured even with snapshot = "never".
            _ if settings.source.snapshot == SnapshotMode::Never => {
                if taken.is_some() {
                    // Said, not done: the operator chose never to copy.
                    reshaped(applier, t, false).await?;
                }
                requested.is_some_and(|r| taken.is_none_or(|at| at < r))
            }
            None => true,
            Some(at) => {
                slot_born.is_some_and(|born| at < born)
                    || !was_tracked(t)
                    || requested.is_some_and(|r| at < r)
                    || reshaped(applier, t, true).await?
            }
        };
        if !needed {
            continue;
        }
        // In chunks only a table with nothing in the lake yet, or whose chunked copy can
        // go on: chunks add and update rows but remove none, so a table whose lake rows
        // may be stale is copied whole (rows streamed under snapshot = "never", a copy
        // begun before the slot or before a request, a table left out of the
        // configuration meanwhile).
        let resumable = match applier.chunked_progress(&t.name) {
            None => !applier.has_position(&t.name),
            Some(p) => {
                was_tracked(t)
                    && slot_born.is_none_or(|born| p.start >= born)
                    && requested.is_none_or(|r| r <= p.start)
            }
        };
        if settings.source.snapshot_method == SnapshotMethod::Watermark
            && settings.source.snapshot == SnapshotMode::Initial
            && taken.is_none()
            && resumable
            && crate::source::watermark::chunk_key(t).is_some()
        {
            chunked.push(t.name.clone());
        } else {
            missing.push(t);
        }
    }
    Ok((missing, chunked))
}

/// Whether the publication now publishes another part of `table` (row filter, column
/// list) than its copy holds: changed while wal2delta was stopped, so rows that entered
/// the part unchanged, or columns added to it, are not in the lake. Logged and counted;
/// `copy` says whether the start copies the table again (not with `snapshot = "never"`).
async fn reshaped(applier: &Applier, table: &TableInfo, copy: bool) -> Result<bool, PipelineError> {
    let part = table.published.fingerprint();
    if applier.copied_part(&table.name, part.as_deref()).await? {
        return Ok(false);
    }
    crate::telemetry::divergence(&table.name.to_string(), "publication_reshaped");
    if copy {
        tracing::warn!(
            table = %table.name,
            published = %table.published,
            "the publication publishes another part of this table (row filter or column list) \
             than the lake copied; copying it again"
        );
    } else {
        tracing::warn!(
            table = %table.name,
            published = %table.published,
            "the publication publishes another part of this table (row filter or column list) \
             than the lake copied, and source.snapshot = \"never\" copies nothing: the lake \
             lacks the rows and columns the new part adds; run `wal2delta resync --table {}`",
            table.name
        );
    }
    Ok(true)
}

/// Copies `tables` as of the exported snapshot `name` taken at `point`, committing each
/// table when its copy is complete.
async fn copy_tables(
    settings: &Settings,
    applier: &mut Applier,
    tables: &[&TableInfo],
    point: Lsn,
    name: &str,
) -> Result<(), PipelineError> {
    let source = &settings.source;
    let reader = SnapshotReader::open(
        &source.conn,
        name,
        source.snapshot_workers,
        source.snapshot_chunk_bytes,
        &source.snapshot_limits,
    )
    .await?;
    tracing::info!(tables = tables.len(), at = %point, workers = source.snapshot_workers, "initial snapshot started");
    crate::service::status(&format!(
        "copying the initial snapshot of {} tables",
        tables.len()
    ));
    for info in tables {
        let started = std::time::Instant::now();
        let (tx, rx) = mpsc::channel(2 * source.snapshot_workers);
        let columns = applier
            .lake_columns(&info.name)
            .unwrap_or_else(|| info.columns.clone());
        let (copied, written) = tokio::join!(
            reader.copy_table(info, &columns, point, RawBatchBuilder::new, tx),
            applier.write_snapshot(&info.name, rx)
        );
        // A failed write closes the channel, which the copy reports too: the write's
        // error is the cause.
        written?;
        let rows = copied?;
        applier
            .commit_snapshot(&info.name, point, info.published.fingerprint().as_deref())
            .await?;
        crate::telemetry::change(&info.name.to_string(), crate::change::Op::Read.code(), rows);
        tracing::info!(table = %info.name, rows, elapsed_ms = started.elapsed().as_millis() as u64, "table snapshot committed");
    }
    reader.close().await;
    Ok(())
}
