//! Chunked copies beside the stream (`source.snapshot_method = "watermark"`): one task
//! per table still being copied, at most `source.snapshot_workers` at once, each resuming
//! where the lake's raw table says its copy is (`source::watermark` copies, the apply
//! stage reconciles). A table whose copy fails for good is logged and left; the others
//! and the stream go on.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::apply::Applier;
use crate::config::Settings;
use crate::source::catalog::TableInfo;
use crate::source::watermark::{self, ChunkError, Resume, Watermarks};
use crate::table_name::TableName;

/// The longest pause between two attempts at a table's copy.
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// Starts the copies of the `chunked` tables not complete yet; they stop with `cancel`.
pub fn spawn_copies(
    settings: &Settings,
    applier: &Applier,
    tables: &[TableInfo],
    chunked: &[TableName],
    watermarks: &Arc<Watermarks>,
    cancel: &CancellationToken,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let permits = Arc::new(Semaphore::new(settings.source.snapshot_workers.max(1)));
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
        let (settings, info, watermarks, cancel, permits) = (
            settings.clone(),
            info.clone(),
            watermarks.clone(),
            cancel.clone(),
            permits.clone(),
        );
        tasks.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            copy_until_done(&settings, &info, &columns, resume, &watermarks, &cancel).await;
        });
    }
    tasks
}

/// Copies one table, trying again after transient failures from where it got to.
async fn copy_until_done(
    settings: &Settings,
    info: &TableInfo,
    columns: &[String],
    mut resume: Resume,
    watermarks: &Arc<Watermarks>,
    cancel: &CancellationToken,
) {
    let mut pause = Duration::from_millis(500);
    let started = std::time::Instant::now();
    loop {
        let result = watermark::copy_table(
            &settings.source.conn,
            &settings.source.publication,
            info,
            columns,
            &mut resume,
            settings.source.snapshot_chunk_rows,
            watermarks.clone(),
            cancel.clone(),
        )
        .await;
        match result {
            Ok(rows) => {
                tracing::info!(table = %info.name, rows, elapsed_ms = started.elapsed().as_millis() as u64, "chunked copy taken in whole; durable with the next batch");
                return;
            }
            Err(ChunkError::Ended) => return,
            Err(e) => {
                crate::telemetry::error("snapshot");
                let transient = match &e {
                    ChunkError::Catalog(c) => c.is_transient(),
                    _ => false,
                };
                if !transient {
                    tracing::error!(table = %info.name, error = %e, "chunked copy failed; the other tables go on, and the next start tries this one again");
                    return;
                }
                tracing::warn!(table = %info.name, error = %e, retry_in_ms = pause.as_millis() as u64, "chunked copy interrupted; resuming");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = cancel.cancelled() => return,
                }
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}
