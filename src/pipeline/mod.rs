//! The pipeline: prepares the source and the lake, then runs replication sessions.
//!
//! A session is one replication connection plus one apply stage, both started from the
//! positions durable in the lake. Transient failures (connection lost, Postgres
//! restarting, lake storage errors) end the session; a new one starts after a backoff,
//! again from what is durable, so nothing received-but-uncommitted can be lost or doubled.
//! Definite failures (permissions, missing slot or publication, schema conflicts) stop the
//! daemon with a message saying what to do.
//!
//! The pipeline is where the stages meet: it hands the source's events to apply, the
//! lake's checkpoint records to the SQL endpoint, and the lake's raw layout to the
//! snapshot. [`prepare`] checks the source and copies snapshots; [`background`] runs the
//! endpoint, the slot watcher and the heartbeat.

mod background;
mod chunked;
mod prepare;
mod resync;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use self::background::Background;
use self::prepare::{Prepared, prepare, snapshot_missing};
use crate::apply::{Applier, ApplyError, StagedCopies};
use crate::config::Settings;
use crate::lake::checkpoint::{Checkpoint, CheckpointRecord, RecordSender};
use crate::lake::lock::LakeLock;
use crate::lake::{Lake, LakeError};
use crate::lsn::Lsn;
use crate::source::catalog::{self, CatalogError, TableInfo};
use crate::source::diagnosis::{self, CopiedParts, SourceUnusable};
use crate::source::replication::{ReplicationConnection, ReplicationError};
use crate::source::snapshot::SnapshotError;
use crate::source::spill::Spills;
use crate::source::stream;

/// Events buffered between the source and apply tasks. An event carries up to 512
/// messages (`stream::HAND_OVER_MESSAGES`): at most 16,384 decoded messages wait.
const CHANNEL_CAPACITY: usize = 32;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a session waits for its source task to report the final position after the
/// apply stage stopped.
const SOURCE_STOP_WAIT: Duration = Duration::from_secs(30);

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
    #[error(transparent)]
    Unusable(#[from] SourceUnusable),
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

/// Runs the daemon until `cancel` fires (clean exit) or a definite error.
pub async fn run(settings: Settings, cancel: CancellationToken) -> Result<(), PipelineError> {
    let lake = Lake::open(&settings.lake)?;
    if lake.is_object_store() {
        // Fail closed on a store that would let two writers commit the same version.
        crate::lake::storage::probe(lake.root(), lake.store().as_ref())
            .await
            .map_err(|message| LakeError::Location {
                location: lake.root().to_string(),
                message,
            })?;
    }
    let lock = LakeLock::acquire(&lake).await?;
    // This daemon's own subdirectory of the spill directory, held until it ends.
    let mut settings = settings;
    let _spill_dir = match settings.source.stream_in_progress {
        true => {
            let own = crate::source::spill::SpillDir::acquire(&settings.source.spill_dir)
                .map_err(|e| ReplicationError::Streamed(e.into()))?;
            settings.source.spill_dir = own.path().to_path_buf();
            Some(own)
        }
        false => None,
    };
    crate::service::spawn_watchdog();
    if let Some(listen) = settings.metrics_listen {
        crate::telemetry::install(listen).map_err(PipelineError::Metrics)?;
        tracing::info!(%listen, "serving Prometheus metrics at /metrics");
    }
    let mut background = Background::new(&cancel);
    // Checkpoint records flow from the applier to the SQL endpoint in this process.
    let (records, records_rx) = watch::channel(None::<CheckpointRecord>);
    // The source's primary keys, read at the start of replication, for the endpoint.
    let keys = crate::serve::primary_keys::PrimaryKeys::default();
    if let Some(serve) = &settings.serve {
        let endpoint = crate::serve::start(
            serve,
            lake.clone(),
            Some(records_rx),
            keys.clone(),
            background.token(),
        )
        .await?;
        background.add(endpoint);
    }
    // Replication stops on shutdown, or when the publication guard finds a table it can
    // no longer follow exactly (then the guard's reason is the daemon's error).
    let replication = cancel.child_token();
    let (diverged, mut divergence) = oneshot::channel();
    // Another daemon taking over the lease (this one was paused or cut off for longer
    // than the lease) stops replication; the fence has already stopped the commits.
    let (lease_lost, mut lease_holder) = oneshot::channel();
    let lost = lock.lost();
    let stop_on_loss = replication.clone();
    tokio::spawn(async move {
        tokio::select! {
            holder = lost => {
                let _ = lease_lost.send(holder);
                stop_on_loss.cancel();
            }
            _ = stop_on_loss.cancelled() => {}
        }
    });
    let requests = Some(crate::lake::requests::Requests::open(&lake));
    let copied = CopiedParts::default();
    background.spawn_source_tasks(
        &settings,
        requests,
        copied.clone(),
        replication.clone(),
        diverged,
    );
    // Tables copied again on request (`resync`) are swapped in by whichever session runs.
    let (staged, copies) = mpsc::channel(1);
    background.add(resync::serve_requests(
        settings.clone(),
        lake.clone(),
        staged,
        background.token(),
    ));
    let copies: StagedCopies = Arc::new(tokio::sync::Mutex::new(copies));
    let result = replicate(
        &settings,
        &lake,
        &records,
        &copies,
        &keys,
        &copied,
        replication,
    )
    .await;
    background.stop().await;
    if let Ok(holder) = lease_holder.try_recv() {
        return Err(LakeError::LeaseLost { holder }.into());
    }
    lock.release().await;
    // A stop the guard caused ends replication cleanly: its reason is the error. An
    // error of replication's own (e.g. the start's checks) comes first.
    match (result, divergence.try_recv()) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(found)) => Err(found.into()),
        (Ok(()), Err(_)) => Ok(()),
    }
}

/// The snapshot phase, then replication sessions until stopped.
async fn replicate(
    settings: &Settings,
    lake: &Lake,
    records: &RecordSender,
    copies: &StagedCopies,
    keys: &crate::serve::primary_keys::PrimaryKeys,
    copied: &CopiedParts,
    cancel: CancellationToken,
) -> Result<(), PipelineError> {
    let Prepared {
        tables,
        created_slot,
        created_publication,
    } = prepare(settings).await?;
    keys.set(
        tables
            .iter()
            .map(|t| (t.name.clone(), t.primary_key.clone())),
    );
    if created_publication {
        // So that `teardown` knows it may drop it.
        Checkpoint::open(lake, &settings.source.slot)
            .await?
            .record_publication(true)
            .await?;
    }
    tracing::info!(source = %settings.source.conn, lake = %lake.root(), tables = tables.len(), "source ready");
    let mut created_slot = created_slot;
    let mut backoff = Backoff::new("snapshot");
    let (chunked, opened) = loop {
        let result = tokio::select! {
            result = snapshot_missing(settings, lake, &tables, created_slot.take(), records) => result,
            _ = cancel.cancelled() => {
                tracing::info!("stopped during the initial snapshot; unfinished tables are copied again on the next start");
                return Ok(());
            }
        };
        match result {
            Ok((chunked, applier)) => break (chunked, applier),
            Err(e) if e.is_transient() => {
                let what = "initial snapshot interrupted; unfinished tables are copied again";
                if !backoff.pause(&e, what, &cancel).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(explain(e, settings).await),
        }
    };
    // Every table's copy now holds the part the publication published when the start
    // read it (copied now, or checked against the lake's record of its copy): the
    // publication guard compares later changes with it.
    if let Ok(mut parts) = copied.lock() {
        for t in &tables {
            parts.insert(t.name.to_string(), t.published.fingerprint());
        }
    }
    let mut backoff = Backoff::new("replication");
    let mut opened = Some(opened);
    loop {
        let started = std::time::Instant::now();
        match session(
            settings,
            lake,
            &tables,
            &chunked,
            records,
            copies,
            opened.take(),
            cancel.clone(),
        )
        .await
        {
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
            Err(e) => return Err(explain(e, settings).await),
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

/// An applier and the receiver of the positions it makes durable.
type OpenApplier = (Applier, watch::Receiver<Lsn>);

/// Opens the apply stage (every table's positions read back) and the watch it publishes
/// the durable position on; new checkpoint records go to `records` when given.
async fn open_applier(
    settings: &Settings,
    lake: &Lake,
    tables: &[TableInfo],
    records: Option<RecordSender>,
) -> Result<(Applier, watch::Receiver<Lsn>), PipelineError> {
    let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
    let mut applier = Applier::open(
        lake,
        &settings.source.slot,
        tables,
        &settings.normalization,
        &settings.curated,
        settings.apply.clone(),
        durable_tx,
        records,
    )
    .await?;
    if let Some(vacuum) = settings.maintenance.vacuum_retention
        && vacuum < settings.maintenance.log_retention
    {
        tracing::warn!(
            vacuum_retention_hours = vacuum.as_secs_f64() / 3600.0,
            log_retention_hours = settings.maintenance.log_retention.as_secs_f64() / 3600.0,
            "maintenance.vacuum_retention_hours is shorter than maintenance.log_retention_hours: \
             time travel (SET wal2delta.as_of) to a position older than the vacuum retention may \
             find its files deleted; raise vacuum_retention_hours to at least log_retention_hours"
        );
    }
    applier.set_maintenance(settings.maintenance.clone());
    Ok((applier, durable_rx))
}

/// Turns a server error an operator must act on into the slot or publication problem
/// and its fix (`source::diagnosis`).
async fn explain(e: PipelineError, settings: &Settings) -> PipelineError {
    let PipelineError::Replication(ReplicationError::Server(server)) = &e else {
        return e;
    };
    match diagnosis::diagnose(&settings.source, server, settings.config_path.as_deref()).await {
        Some(unusable) => unusable.into(),
        None => e,
    }
}

/// One replication session: open positions, connect, stream and apply until stopped.
/// `opened`: the applier the start's snapshot wrote with (the first session); later
/// sessions open every table again.
#[allow(clippy::too_many_arguments)]
async fn session(
    settings: &Settings,
    lake: &Lake,
    tables: &[TableInfo],
    chunked: &[crate::table_name::TableName],
    records: &RecordSender,
    copies: &StagedCopies,
    opened: Option<OpenApplier>,
    cancel: CancellationToken,
) -> Result<(), PipelineError> {
    let source = &settings.source;
    // The slot's confirmed position is durable too (we only ever confirm durable
    // positions), and Postgres 15 lets a lower confirmation move it backwards: start from
    // the later of the two. Looking the slot up here also catches a dropped or
    // invalidated slot with a clear message.
    let lookup = async {
        let client = catalog::connect(&source.conn).await?;
        let slot = catalog::slot_info(&client, &source.slot).await?;
        // Running transactions are streamed from PostgreSQL 14 (pgoutput protocol 2).
        let version = catalog::server_version(&client).await?;
        Ok::<_, PipelineError>((slot, version))
    };
    // With the applier at hand the replication connection is opened meanwhile (each
    // connection takes a few ms); else after opening the tables, which may take long
    // (catching up), so that it does not sit idle meanwhile.
    let usable = |slot| diagnosis::usable_slot(source, slot, settings.config_path.as_deref());
    let (confirmed, version, (mut applier, durable_rx), mut conn) = match opened {
        Some(opened) => {
            let (looked_up, conn) =
                tokio::join!(lookup, ReplicationConnection::connect(&source.conn));
            let (slot, version) = looked_up?;
            (usable(slot)?, version, opened, conn?)
        }
        None => {
            let (slot, version) = lookup.await?;
            let confirmed = usable(slot)?;
            let opened = open_applier(settings, lake, tables, Some(records.clone())).await?;
            let conn = ReplicationConnection::connect(&source.conn).await?;
            (confirmed, version, opened, conn)
        }
    };
    let streaming = source.stream_in_progress && version >= 140000;
    applier.take_copies_from(copies.clone());
    let start = applier.restart_position().max(confirmed);
    applier.advance(start);
    for (table, pos) in applier.table_positions() {
        tracing::debug!(%table, position = ?pos.map(|p| p.to_string()), "table position");
    }
    let identity = conn.identify_system().await?;
    if streaming && let Some(mb) = source.decoding_work_mem_mb {
        // A user setting, which any role may change for its own connection: lowered to
        // `mb`, never raised (a lower server setting stays).
        conn.simple_query(&format!(
            "SELECT set_config('logical_decoding_work_mem', least(setting::bigint, {kb})::text || 'kB', false) \
             FROM pg_settings WHERE name = 'logical_decoding_work_mem'",
            kb = mb * 1024
        ))
        .await?;
    }
    let spills = match streaming {
        true => Some(
            Spills::open(&source.spill_dir).map_err(|e| ReplicationError::Streamed(e.into()))?,
        ),
        false => None,
    };
    conn.start_replication(&source.slot, start, &source.publication, streaming)
        .await?;
    tracing::info!(slot = %source.slot, from = %start, checkpoint = %applier.restart_position(), server_wal = %identity.xlogpos, "streaming");
    crate::service::ready(&format!("streaming slot {} from {start}", source.slot));
    let (events_tx, events_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let mut reader = tokio::spawn(stream::run(
        conn,
        events_tx,
        durable_rx,
        cancel.clone(),
        source.status_interval,
        spills,
    ));
    // Tables copied in chunks beside the stream, from where the lake says they are.
    let watermarks = Arc::new(crate::source::watermark::Watermarks::default());
    let copying = cancel.child_token();
    let permits = chunked::permits(settings);
    let mut copiers = chunked::spawn_copies(
        settings,
        &applier,
        tables,
        chunked,
        &watermarks,
        &permits,
        &copying,
    );
    // Resyncs of tables copied in chunks run beside the stream too. Only with this method
    // does apply note what it needs to reconcile chunks with the stream (nothing is added
    // to the stream's hot path otherwise).
    if source.snapshot_method == crate::source::config::SnapshotMethod::Watermark {
        copiers.spawn(chunked::serve_resyncs(
            settings.clone(),
            lake.clone(),
            tables.to_vec(),
            watermarks.clone(),
            permits.clone(),
            copying.clone(),
        ));
        applier.take_chunks_from(watermarks.clone());
    }
    let applied = applier.run(events_rx).await;
    copying.cancel();
    // A copier stuck in a statement on a dead network does not hold the session up.
    if tokio::time::timeout(SOURCE_STOP_WAIT, async {
        while copiers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        copiers.abort_all();
    }
    // The applier is gone, and with it the durable-position channel: the source task
    // reports the final durable position and ends by itself.
    let read = match tokio::time::timeout(SOURCE_STOP_WAIT, &mut reader).await {
        Ok(Ok(result)) => result.map_err(PipelineError::from),
        Ok(Err(e)) => Err(PipelineError::Task(format!("source task: {e}"))),
        Err(_) => {
            // The connection hangs (a dead network): what is durable is in the lake and
            // Postgres learns the position at the next start. A retry, unless stopping.
            reader.abort();
            tracing::warn!(
                "the replication connection did not close within {SOURCE_STOP_WAIT:?}; \
                 the final position is reported at the next connection"
            );
            if cancel.is_cancelled() {
                Ok(())
            } else {
                Err(ReplicationError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the replication connection stopped answering",
                ))
                .into())
            }
        }
    };
    match (applied, read) {
        (Err(apply), Err(read)) => {
            // Both failed: apply's error is the cause (the source stops when apply
            // does); the source's is reported, not dropped.
            tracing::warn!(error = %read, "the source task also failed");
            Err(apply.into())
        }
        (Err(apply), Ok(())) => Err(apply.into()),
        (Ok(()), read) => read,
    }
}
