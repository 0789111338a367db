//! The pipeline: prepares the source and the lake, then runs replication sessions.
//!
//! A session is one replication connection plus one apply stage, both started from the
//! positions durable in the lake. Transient failures (connection lost, Postgres
//! restarting, lake storage errors) end the session; a new one starts after a backoff,
//! again from what is durable, so nothing received-but-uncommitted can be lost or doubled.
//! Definite failures (permissions, missing slot or publication, schema conflicts) stop the
//! daemon with a message saying what to do.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::apply::{Applier, ApplyError};
use crate::config::{Settings, SnapshotMode};
use crate::lake::checkpoint::Checkpoint;
use crate::lake::lock::LakeLock;
use crate::lake::{Lake, LakeError};
use crate::lsn::Lsn;
use crate::source::catalog::{self, CatalogError, TableInfo};
use crate::source::replication::{ReplicationConnection, ReplicationError};
use crate::source::snapshot::{SnapshotError, SnapshotReader};
use crate::source::stream;

/// What to do about a lost slot, naming the command with this daemon's configuration.
/// What to do about a lost slot, naming this configuration file.
pub fn slot_lost_action(settings: &Settings) -> String {
    format!(
        "the changes Postgres no longer keeps for it cannot be recovered from this slot; run \
         `wal2delta reset-checkpoint --config {} --recreate-slot --yes`, then start wal2delta \
         again: it copies every table afresh (the raw tables miss the individual changes in \
         between)",
        settings
            .config_path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<config file>".into())
    )
}

/// Events buffered between the source and apply tasks.
const CHANNEL_CAPACITY: usize = 4096;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(
        "replication slot {slot} does not exist and source.create_slot is false; create it with \
         SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); or set create_slot = true"
    )]
    SlotMissing { slot: String },
    #[error("the replication slot {slot} is gone or unusable: {detail}; {action}")]
    SlotLost {
        slot: String,
        detail: String,
        action: String,
    },
    #[error(
        "the publication {publication} is gone or unusable: {detail}; Postgres cannot decode \
         changes made before a new publication existed, so recreate the publication \
         (wal2delta does so on start when source.create_publication is true) and drop the slot \
         (SELECT pg_drop_replication_slot('{slot}');) so a new one is created, accepting that \
         the lake misses the changes in between"
    )]
    PublicationLost {
        publication: String,
        slot: String,
        detail: String,
    },
    #[error(
        "permission denied: {detail}; grant the role REPLICATION and SELECT on the tables \
         (see sql/setup.sql), then start again"
    )]
    PermissionDenied { detail: String },
    #[error("{0}; pick another [metrics] listen address, or remove it")]
    Metrics(String),
    #[error("the SQL endpoint cannot start: {0}")]
    Serve(#[from] crate::serve::ServeError),
    #[error("a pipeline task failed: {0}")]
    Task(String),
}

impl PipelineError {
    /// The error's kind, for the metrics.
    fn kind(&self) -> &'static str {
        match self {
            PipelineError::Catalog(_) => "catalog",
            PipelineError::Replication(_) => "replication",
            PipelineError::Apply(_) => "apply",
            PipelineError::Lake(_) => "lake",
            PipelineError::Snapshot(_) => "snapshot",
            _ => "other",
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            PipelineError::Replication(e) => e.is_transient(),
            PipelineError::Apply(e) => e.is_transient(),
            PipelineError::Lake(e) => e.is_transient(),
            PipelineError::Catalog(e) => e.is_transient(),
            PipelineError::Snapshot(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// A slot this start created.
struct CreatedSlot {
    point: Lsn,
    /// The connection holding the slot's exported snapshot open, and the snapshot's name.
    export: Option<(ReplicationConnection, String)>,
}

/// Checks the source, creates what is missing and allowed, and returns the tables.
async fn prepare(
    settings: &Settings,
) -> Result<(Vec<TableInfo>, Option<CreatedSlot>, bool), PipelineError> {
    let client = catalog::connect(&settings.source).await?;
    let report = catalog::check(&client, settings).await?;
    if !report.problems.is_empty() {
        return Err(CatalogError::NotReady(report.problems).into());
    }
    if report.publication_missing {
        catalog::create_publication(&client, settings).await?;
        tracing::info!(publication = %settings.publication, "publication created");
    }
    let created_publication = report.publication_missing;
    let mut created = None;
    if report.slot_missing {
        if !settings.create_slot {
            return Err(PipelineError::SlotMissing {
                slot: settings.slot.clone(),
            });
        }
        let mut conn = ReplicationConnection::connect(&settings.source).await?;
        if settings.snapshot == SnapshotMode::Initial {
            let (point, name) = conn.create_slot_exporting(&settings.slot, false).await?;
            tracing::info!(slot = %settings.slot, consistent_point = %point, "replication slot created with an exported snapshot");
            created = Some(CreatedSlot {
                point,
                export: Some((conn, name)),
            });
        } else {
            let point = conn.create_slot(&settings.slot).await?;
            conn.close().await;
            tracing::info!(slot = %settings.slot, consistent_point = %point, "replication slot created");
            created = Some(CreatedSlot {
                point,
                export: None,
            });
        }
    }
    Ok((report.tables, created, created_publication))
}

/// Copies every table that has no complete snapshot from this slot (all of them after the
/// slot was created; one added to the configuration later; one whose copy a crash
/// interrupted). A table is copied as of one exported snapshot — the new slot's own, or a
/// temporary slot's — and marked with that snapshot's consistent point, so streaming skips
/// exactly the transactions the copy already holds.
async fn snapshot_missing(
    settings: &Settings,
    lake: &Lake,
    tables: &[TableInfo],
    created: Option<CreatedSlot>,
) -> Result<(), PipelineError> {
    let (mut applier, _durable) = open_applier(settings, lake, tables).await?;
    let (created_point, export) = match created {
        Some(c) => {
            applier.record_slot_created(c.point).await?;
            (Some(c.point), c.export)
        }
        None => (None, None),
    };
    let slot_born = applier.slot_created_at();
    let tracked = applier.tracked_tables().await;
    let was_tracked = |t: &TableInfo| {
        tracked
            .as_ref()
            .is_none_or(|set| set.contains(&t.name.to_string()))
    };
    let mut missing: Vec<&TableInfo> = Vec::new();
    for t in tables {
        let requested = applier.resnapshot_requested(&t.name).await?;
        let needed = match applier.snapshot_position(&t.name) {
            // An operator's request is honoured even with snapshot = "never".
            _ if settings.snapshot == SnapshotMode::Never => requested
                .is_some_and(|r| applier.snapshot_position(&t.name).is_none_or(|at| at < r)),
            None => true,
            // A snapshot from an older slot of the same name, a table that was left out
            // of the configuration for a while (it missed changes), or an operator's
            // `reset-checkpoint --resnapshot`.
            Some(at) => {
                slot_born.is_some_and(|born| at < born)
                    || !was_tracked(t)
                    || requested.is_some_and(|r| at < r)
            }
        };
        if needed {
            missing.push(t);
        }
    }
    if missing.is_empty() {
        if let Some((conn, _)) = export {
            conn.close().await;
        }
        return Ok(());
    }
    let (conn, point, name) = match (export, created_point) {
        (Some((conn, name)), Some(point)) => (conn, point, name),
        _ => {
            // The slot is older than these tables' snapshots: take a fresh snapshot from a
            // temporary slot (gone when its connection closes).
            let mut conn = ReplicationConnection::connect(&settings.source).await?;
            let temp = format!("wal2delta_snapshot_{}", std::process::id());
            let (point, name) = conn.create_slot_exporting(&temp, true).await?;
            (conn, point, name)
        }
    };
    let reader = SnapshotReader::open(
        &settings.source,
        &name,
        settings.snapshot_workers,
        settings.snapshot_chunk_bytes,
    )
    .await?;
    tracing::info!(tables = missing.len(), at = %point, workers = settings.snapshot_workers, "initial snapshot started");
    crate::service::status(&format!(
        "copying the initial snapshot of {} tables",
        missing.len()
    ));
    for info in missing {
        let started = std::time::Instant::now();
        let (tx, rx) = mpsc::channel(2 * settings.snapshot_workers);
        let columns = applier
            .lake_columns(&info.name)
            .unwrap_or_else(|| info.columns.clone());
        let (copied, written) = tokio::join!(
            reader.copy_table(info, &columns, point, tx),
            applier.write_snapshot(&info.name, rx)
        );
        // A failed write closes the channel, which the copy reports too: the write's
        // error is the cause.
        written?;
        let rows = copied?;
        applier
            .commit_snapshot(&settings.slot, &info.name, point)
            .await?;
        crate::telemetry::change(&info.name.to_string(), "r", rows);
        tracing::info!(table = %info.name, rows, elapsed_ms = started.elapsed().as_millis() as u64, "table snapshot committed");
    }
    reader.close().await;
    conn.close().await;
    Ok(())
}

/// Runs the daemon until `cancel` fires (clean exit) or a definite error.
pub async fn run(settings: Settings, cancel: CancellationToken) -> Result<(), PipelineError> {
    let lake = Lake::open(&settings.lake_path)?;
    let _lock = LakeLock::acquire(&lake)?;
    crate::service::spawn_watchdog();
    if let Some(listen) = settings.metrics_listen {
        crate::telemetry::install(listen).map_err(PipelineError::Metrics)?;
        tracing::info!(%listen, "serving Prometheus metrics at /metrics");
    }
    let endpoint = match &settings.serve {
        Some(serve) => Some(crate::serve::start(serve, lake.clone(), cancel.clone()).await?),
        None => None,
    };
    let watch = tokio::spawn(watch_slot(settings.clone_for_watch(), cancel.clone()));
    let heartbeat = settings
        .heartbeat
        .map(|every| tokio::spawn(heartbeat(settings.source.clone(), every, cancel.clone())));
    let result = replicate(&settings, &lake, cancel).await;
    watch.abort();
    if let Some(h) = heartbeat {
        h.abort();
    }
    if let Some(endpoint) = endpoint {
        endpoint.abort();
    }
    result
}

/// `source.heartbeat_secs`: writes a tiny non-transactional logical message into this
/// database's WAL now and then, so the walsender has something of this database to decode
/// and the slot advances even when the database sees no writes (e.g. only other databases
/// of the cluster are busy). The message is not published; it only moves positions.
async fn heartbeat(
    source: crate::source::dsn::ConnParams,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut warned = false;
    let mut client = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if client.is_none() {
            client = catalog::connect(&source).await.ok();
        }
        let Some(c) = client.as_ref() else { continue };
        match c
            .simple_query("SELECT pg_logical_emit_message(false, 'wal2delta.heartbeat', '')")
            .await
        {
            Ok(_) => warned = false,
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "heartbeat failed (pg_logical_emit_message); grant it with: GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) TO <wal2delta role>");
                    warned = true;
                }
                client = None;
            }
        }
    }
}

/// What the slot watcher needs.
pub struct SlotWatch {
    source: crate::source::dsn::ConnParams,
    slot: String,
    every: Duration,
    warn_bytes: Option<i64>,
}

impl Settings {
    fn clone_for_watch(&self) -> SlotWatch {
        SlotWatch {
            source: self.source.clone(),
            slot: self.slot.clone(),
            every: (self.status_interval * 3)
                .clamp(Duration::from_secs(3), Duration::from_secs(60)),
            warn_bytes: self.retained_wal_warn_bytes,
        }
    }
}

/// Reads the WAL the slot retains now and then: the metric, and a warning when it passes
/// `[metrics] retained_wal_warn_mb` (once per crossing).
async fn watch_slot(watch: SlotWatch, cancel: CancellationToken) {
    let mut warned = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(watch.every) => {}
        }
        let Ok(client) = catalog::connect(&watch.source).await else {
            continue;
        };
        let Ok(Some(slot)) = catalog::slot_info(&client, &watch.slot).await else {
            continue;
        };
        let Some(bytes) = slot.retained_bytes else {
            continue;
        };
        crate::telemetry::retained_wal(bytes);
        match watch.warn_bytes {
            Some(limit) if bytes > limit && !warned => {
                tracing::warn!(
                    slot = %watch.slot,
                    retained_mb = bytes / (1024 * 1024),
                    limit_mb = limit / (1024 * 1024),
                    "the replication slot retains more WAL than metrics.retained_wal_warn_mb; \
                     check that wal2delta keeps up (wal2delta status) and the disk of pg_wal"
                );
                warned = true;
            }
            Some(limit) if bytes <= limit => warned = false,
            _ => {}
        }
    }
}

/// The snapshot phase, then replication sessions until stopped.
async fn replicate(
    settings: &Settings,
    lake: &Lake,
    cancel: CancellationToken,
) -> Result<(), PipelineError> {
    let (tables, created, created_publication) = prepare(settings).await?;
    if created_publication {
        // So that `teardown` knows it may drop it.
        Checkpoint::open(lake, &settings.slot)
            .await?
            .record_publication(true)
            .await?;
    }
    tracing::info!(source = %settings.source, lake = %lake.root(), tables = tables.len(), "source ready");
    let mut created = created;
    let mut backoff = Backoff::new("snapshot");
    loop {
        let result = tokio::select! {
            result = snapshot_missing(settings, lake, &tables, created.take()) => result,
            _ = cancel.cancelled() => {
                tracing::info!("stopped during the initial snapshot; unfinished tables are copied again on the next start");
                return Ok(());
            }
        };
        match result {
            Ok(()) => break,
            Err(e) if e.is_transient() => {
                let what = "initial snapshot interrupted; unfinished tables are copied again";
                if !backoff.pause(&e, what, &cancel).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(explain(e, settings)),
        }
    }
    let mut backoff = Backoff::new("replication");
    loop {
        let started = std::time::Instant::now();
        match session(settings, lake, &tables, cancel.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() && !cancel.is_cancelled() => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Backoff::new("replication");
                }
                if !backoff
                    .pause(&e, "replication interrupted; reconnecting", &cancel)
                    .await
                {
                    return Ok(());
                }
            }
            Err(e) => return Err(explain(e, settings)),
        }
    }
}

/// Growing pauses between retries: 250 ms, doubling up to 30 s.
struct Backoff {
    attempt: u32,
    /// `snapshot` or `replication`, for the metrics.
    phase: &'static str,
}

impl Backoff {
    fn new(phase: &'static str) -> Backoff {
        Backoff { attempt: 0, phase }
    }
}

impl Backoff {
    /// Logs `what` with the error, then waits; false when a stop was requested meanwhile.
    async fn pause(
        &mut self,
        error: &PipelineError,
        what: &str,
        cancel: &CancellationToken,
    ) -> bool {
        // Retrying is healthy: a restart by the watchdog would not help.
        crate::service::beat();
        crate::telemetry::reconnect(self.phase);
        crate::telemetry::error(error.kind());
        crate::service::status(what);
        let delay = Duration::from_millis(250 * 2u64.pow(self.attempt.min(7))).min(MAX_BACKOFF);
        self.attempt += 1;
        tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, attempt = self.attempt, "{what}");
        let resumed = tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        };
        crate::service::beat();
        resumed
    }
}

/// Opens the apply stage (every table's positions read back) and the watch it publishes
/// the durable position on.
async fn open_applier(
    settings: &Settings,
    lake: &Lake,
    tables: &[TableInfo],
) -> Result<(Applier, watch::Receiver<Lsn>), PipelineError> {
    let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
    let mut applier = Applier::open(
        lake,
        &settings.slot,
        tables,
        &settings.normalization,
        settings.apply.clone(),
        durable_tx,
    )
    .await?;
    applier.set_maintenance(settings.maintenance.clone());
    Ok((applier, durable_rx))
}

/// Turns server errors an operator must act on into messages that say what to do.
fn explain(e: PipelineError, settings: &Settings) -> PipelineError {
    let PipelineError::Replication(ReplicationError::Server(server)) = &e else {
        return e;
    };
    let about_slot = server.message.contains("replication slot");
    if about_slot && (server.code == "42704" || server.code == "55000") {
        return PipelineError::SlotLost {
            slot: settings.slot.clone(),
            detail: server.to_string(),
            action: slot_lost_action(settings),
        };
    }
    if server.code == "42704" && server.message.contains("publication") {
        return PipelineError::PublicationLost {
            publication: settings.publication.clone(),
            slot: settings.slot.clone(),
            detail: server.to_string(),
        };
    }
    if server.code == "42501" {
        return PipelineError::PermissionDenied {
            detail: server.to_string(),
        };
    }
    e
}

/// One replication session: open positions, connect, stream and apply until stopped.
async fn session(
    settings: &Settings,
    lake: &Lake,
    tables: &[TableInfo],
    cancel: CancellationToken,
) -> Result<(), PipelineError> {
    // The slot's confirmed position is durable too (we only ever confirm durable
    // positions), and Postgres 15 lets a lower confirmation move it backwards: start from
    // the later of the two. Looking the slot up here also catches a dropped or
    // invalidated slot with a clear message.
    let client = catalog::connect(&settings.source).await?;
    let slot = catalog::slot_info(&client, &settings.slot).await?;
    drop(client);
    let confirmed = match slot {
        None => {
            return Err(PipelineError::SlotLost {
                slot: settings.slot.clone(),
                detail: "it no longer exists".into(),
                action: slot_lost_action(settings),
            });
        }
        Some(s) if s.wal_status.as_deref() == Some("lost") => {
            return Err(PipelineError::SlotLost {
                slot: settings.slot.clone(),
                detail: "it was invalidated (wal_status = lost): the WAL it needed was removed"
                    .into(),
                action: slot_lost_action(settings),
            });
        }
        Some(s) => s.confirmed_flush.unwrap_or(Lsn::ZERO),
    };
    let (applier, durable_rx) = open_applier(settings, lake, tables).await?;
    let start = applier.restart_position().max(confirmed);
    applier.advance(start);
    for (table, pos) in applier.table_positions() {
        tracing::debug!(%table, position = ?pos.map(|p| p.to_string()), "table position");
    }
    let mut conn = ReplicationConnection::connect(&settings.source).await?;
    let identity = conn.identify_system().await?;
    conn.start_replication(&settings.slot, start, &settings.publication)
        .await?;
    tracing::info!(slot = %settings.slot, from = %start, checkpoint = %applier.restart_position(), server_wal = %identity.xlogpos, "streaming");
    crate::service::ready(&format!("streaming slot {} from {start}", settings.slot));
    let (events_tx, events_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let source = tokio::spawn(stream::run(
        conn,
        events_tx,
        durable_rx,
        cancel.clone(),
        settings.status_interval,
    ));
    let apply_result = applier.run(events_rx).await;
    if apply_result.is_err() {
        // Nothing more can be applied in this session: drop the replication connection.
        source.abort();
    }
    let source_result = source.await;
    apply_result?;
    match source_result {
        Ok(result) => result?,
        Err(e) if e.is_cancelled() => {}
        Err(e) => return Err(PipelineError::Task(format!("source task: {e}"))),
    }
    Ok(())
}
