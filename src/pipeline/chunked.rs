//! Chunked copies beside the stream (`source.snapshot_method = "watermark"`): one task
//! per table still being copied, at most `source.snapshot_workers` at once, each resuming
//! where the lake's raw table says its copy is (`source::watermark` copies, the apply
//! stage reconciles). A table whose copy fails for good is logged and left; the others
//! and the stream go on.
//!
//! Resyncs (`wal2delta resync`, `verify --repair`, the publication guard) of tables
//! copied this way run here too, in chunks into the live tables: each chunk's rows
//! replace the lake's, and the lake's rows in the chunk's key range that the source no
//! longer has are deleted, so readers never see the table empty or short. A resync
//! resumes after its last durable chunk; its request is answered once its last chunk is
//! durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::apply::{Applier, schema};
use crate::config::Settings;
use crate::lake::Lake;
use crate::lake::raw::RawTable;
use crate::lake::requests::{Requests, ResyncOutcome};
use crate::source::catalog::TableInfo;
use crate::source::config::SnapshotMethod;
use crate::source::watermark::{self, ChunkError, Copied, Resume, Resync, Watermarks};
use crate::table_name::TableName;

/// The longest pause between two attempts at a table's copy.
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// How often the resync requests are looked at.
const POLL: Duration = Duration::from_secs(1);

/// Whether resyncs of `table` run in chunks beside the stream (else from an exported
/// snapshot, `pipeline::resync`).
pub fn resyncs_in_chunks(settings: &Settings, table: &TableInfo) -> bool {
    settings.source.snapshot_method == SnapshotMethod::Watermark
        && watermark::chunk_key(table).is_some()
}

/// The permits of the copies running at once, first copies and resyncs together
/// (`source.snapshot_workers`).
pub fn permits(settings: &Settings) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(settings.source.snapshot_workers.max(1)))
}

/// Starts the copies of the `chunked` tables not complete yet; they stop with `cancel`.
pub fn spawn_copies(
    settings: &Settings,
    applier: &Applier,
    tables: &[TableInfo],
    chunked: &[TableName],
    watermarks: &Arc<Watermarks>,
    permits: &Arc<Semaphore>,
    cancel: &CancellationToken,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for info in tables.iter().filter(|t| chunked.contains(&t.name)) {
        if applier.snapshot_position(&info.name).is_some() {
            continue; // complete
        }
        let resume = match applier.chunked_progress(&info.name) {
            Some(p) => Resume {
                start: Some(p.start),
                last_key: p.last_key,
            },
            None => Resume {
                start: None,
                last_key: None,
            },
        };
        let columns: Vec<String> = applier
            .lake_columns(&info.name)
            .unwrap_or_else(|| info.columns.clone())
            .into_iter()
            .map(|c| c.name)
            .collect();
        if !watermarks.claim(&info.name) {
            continue;
        }
        let (settings, info, watermarks, cancel, permits) = (
            settings.clone(),
            info.clone(),
            watermarks.clone(),
            cancel.clone(),
            permits.clone(),
        );
        tasks.spawn(async move {
            if let Ok(_permit) = permits.acquire_owned().await {
                let copied = copy_until_done(
                    &settings,
                    &info,
                    &columns,
                    resume,
                    None,
                    &watermarks,
                    &cancel,
                )
                .await;
                if let Some(Err(e)) = copied {
                    tracing::error!(table = %info.name, error = %e, "chunked copy failed; the other tables go on, and the next start tries this one again");
                }
            }
            watermarks.release(&info.name);
        });
    }
    tasks
}

/// Serves the resync requests of tables copied in chunks (see the module's header) until
/// `cancel` fires, each copy holding one of `permits`.
pub async fn serve_resyncs(
    settings: Settings,
    lake: Lake,
    tables: Vec<TableInfo>,
    watermarks: Arc<Watermarks>,
    permits: Arc<Semaphore>,
    cancel: CancellationToken,
) {
    let requests = Requests::open(&lake);
    let mut running = JoinSet::new();
    // The request each running resync serves, and its stop.
    let mut serving: HashMap<TableName, (i64, CancellationToken)> = HashMap::new();
    while !cancel.is_cancelled() {
        while let Some(done) = running.try_join_next() {
            if let Ok(table) = done {
                serving.remove(&table);
            }
        }
        for (table, id) in requests.pending_requests().await {
            if let Some((serves, stop)) = serving.get(&table) {
                if *serves != id {
                    // A newer request (the source changed what the copy holds): this
                    // copy stops, and the next look starts the new one.
                    tracing::info!(table = %table, "a newer resync request replaced the one being copied; copying again");
                    stop.cancel();
                }
                continue;
            }
            let Some(info) = tables.iter().find(|t| t.name == table) else {
                continue; // refused by `pipeline::resync`
            };
            if !resyncs_in_chunks(&settings, info) || !watermarks.claim(&table) {
                continue;
            }
            let stop = cancel.child_token();
            serving.insert(table.clone(), (id, stop.clone()));
            let (settings, lake, info, watermarks, permits, requests) = (
                settings.clone(),
                lake.clone(),
                info.clone(),
                watermarks.clone(),
                permits.clone(),
                requests.clone(),
            );
            running.spawn(async move {
                if let Ok(_permit) = permits.acquire_owned().await {
                    resync(&settings, &lake, &info, id, &watermarks, &requests, &stop).await;
                }
                watermarks.release(&info.name);
                info.name
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cancel.cancelled() => {}
        }
    }
    while running.join_next().await.is_some() {}
}

/// The lake's curated keys, for a resync's chunks.
#[async_trait::async_trait]
impl watermark::StoredKeys for crate::lake::curated::StoredKeys {
    async fn first(&mut self, after: Option<i64>, limit: usize) -> Result<Vec<i64>, String> {
        crate::lake::curated::StoredKeys::first(self, after, limit)
            .await
            .map_err(|e| e.to_string())
    }
}

/// One resync in chunks, from where its durable chunks got to; answers the request when
/// its last chunk is durable (or it failed for good).
async fn resync(
    settings: &Settings,
    lake: &Lake,
    info: &TableInfo,
    id: i64,
    watermarks: &Arc<Watermarks>,
    requests: &Requests,
    cancel: &CancellationToken,
) {
    let table = &info.name;
    let started = Instant::now();
    // The publication as it is now: a row filter or column list changed since the session
    // began is what a guard's resync is for.
    let fresh = async {
        let client = crate::source::catalog::connect(&settings.source.conn).await?;
        crate::source::catalog::table_info(&client, table, &settings.source.publication).await
    };
    let info = match fresh.await {
        Ok(Some(info)) => info,
        Ok(None) => {
            // Gone from the source or the publication: the stream's guard says what to do.
            tracing::warn!(table = %table, "resync: the table is no longer published; the request waits");
            tokio::select! {
                _ = tokio::time::sleep(POLL * 30) => {}
                _ = cancel.cancelled() => {}
            }
            return;
        }
        Err(e) => {
            tracing::warn!(table = %table, error = %e, "resync: cannot read the table's columns; trying again");
            tokio::select! {
                _ = tokio::time::sleep(POLL * 5) => {}
                _ = cancel.cancelled() => {}
            }
            return;
        }
    };
    let info = &info;
    let answer = |copied: Copied, point: Option<String>, error: Option<String>| ResyncOutcome {
        table: table.to_string(),
        error,
        rows: copied.rows,
        point,
        elapsed_ms: started.elapsed().as_millis() as u64,
        removed_in_chunks: Some(copied.removed),
    };
    let prepared = async {
        let label = table.to_string();
        let existing = RawTable::stored_schema(lake, table)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!("{table} has no lake tables yet; the daemon copies it when it starts")
            })?;
        let columns =
            schema::reconcile(&label, Some(&existing), &info.columns).map_err(|e| e.to_string())?;
        let progress = RawTable::durable_progress(lake, &settings.source.slot, table)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((columns, progress))
    };
    let (columns, progress) = match prepared.await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(table = %table, error = %e, "resync failed");
            requests
                .finish_resync(table, &answer(Copied::default(), None, Some(e)), id)
                .await;
            return;
        }
    };
    let resume = match progress.filter(|p| p.resync == Some(id)) {
        Some(p) => {
            tracing::info!(table = %table, last_key = ?p.last_key, "the table's resync resumes in chunks while streaming");
            Resume {
                start: Some(p.start),
                last_key: p.last_key,
            }
        }
        None => {
            tracing::info!(table = %table, "resync: copying the table again in chunks while streaming");
            Resume {
                start: None,
                last_key: None,
            }
        }
    };
    let names: Vec<String> = columns.into_iter().map(|c| c.name).collect();
    let key = watermark::chunk_key(info).unwrap_or_default();
    let mut stored = crate::lake::curated::StoredKeys::new(lake, table, key);
    let copied = copy_until_done(
        settings,
        info,
        &names,
        resume,
        Some((id, &mut stored)),
        watermarks,
        cancel,
    )
    .await;
    match copied {
        None => {} // the session ended: the next one resumes
        Some(Err(e)) => {
            crate::telemetry::error("resync");
            tracing::error!(table = %table, error = %e, "resync failed");
            requests
                .finish_resync(table, &answer(Copied::default(), None, Some(e)), id)
                .await;
        }
        Some(Ok(copied)) => {
            let at = tokio::select! {
                at = watermarks.wait_completed(table, Some(id)) => at,
                _ = cancel.cancelled() => return,
            };
            tracing::info!(table = %table, rows = copied.rows, removed = copied.removed, at = %at, elapsed_ms = started.elapsed().as_millis() as u64, "resync complete");
            requests
                .finish_resync(table, &answer(copied, Some(at.to_string()), None), id)
                .await;
        }
    }
}

/// Copies one table, trying again after transient failures from where it got to.
/// `None`: stopped (`cancel`, or the session ended); an error: failed for good.
async fn copy_until_done(
    settings: &Settings,
    info: &TableInfo,
    columns: &[String],
    mut resume: Resume,
    mut resync: Option<(i64, &mut dyn watermark::StoredKeys)>,
    watermarks: &Arc<Watermarks>,
    cancel: &CancellationToken,
) -> Option<Result<Copied, String>> {
    let mut pause = Duration::from_millis(500);
    let started = Instant::now();
    let mut total = Copied::default();
    loop {
        let result = watermark::copy_table(
            &settings.source.conn,
            &settings.source.publication,
            info,
            columns,
            &mut resume,
            settings.source.snapshot_chunk_rows,
            resync.as_mut().map(|(id, stored)| Resync {
                id: *id,
                stored: &mut **stored,
            }),
            watermarks.clone(),
            cancel.clone(),
        )
        .await;
        match result {
            Ok(copied) => {
                total.rows += copied.rows;
                total.removed += copied.removed;
                tracing::info!(table = %info.name, rows = total.rows, elapsed_ms = started.elapsed().as_millis() as u64, "chunked copy taken in whole; durable with the next batch");
                return Some(Ok(total));
            }
            Err(ChunkError::Ended) => return None,
            Err(e) => {
                crate::telemetry::error("snapshot");
                let transient = match &e {
                    ChunkError::Catalog(c) => c.is_transient(),
                    ChunkError::Lake { .. } => true,
                    _ => false,
                };
                if !transient {
                    return Some(Err(e.to_string()));
                }
                tracing::warn!(table = %info.name, error = %e, retry_in_ms = pause.as_millis() as u64, "chunked copy interrupted; resuming");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = cancel.cancelled() => return None,
                }
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}
