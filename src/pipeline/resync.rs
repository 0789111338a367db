//! Online resync: copies a table again while replication runs (`wal2delta resync`,
//! `verify --repair`).
//!
//! The request arrives as an object in the lake (`lake::requests`). The copy is taken like an initial
//! snapshot, from a temporary slot's exported snapshot at point P, and written into
//! uncommitted raw (`r` rows) and curated files beside the live tables while the apply
//! stage keeps streaming. The staged copy then goes to the apply stage, which swaps it in
//! between two batches ([`crate::apply::StagedCopy`]): curated replaced in one commit and
//! brought up to the raw change log, the `r` rows added to raw (its history is kept),
//! one checkpoint record for the SQL endpoint, and the resync in the checkpoint's reset
//! history. One table is copied at a time.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use deltalake::arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::PipelineError;
use crate::apply::StagedCopy;
use crate::apply::normalize::Normalizer;
use crate::apply::schema;
use crate::config::Settings;
use crate::lake::curated::CuratedCopy;
use crate::lake::raw::layout::RawBatchBuilder;
use crate::lake::raw::{RawCopy, RawTable};
use crate::lake::requests::{Requests, ResyncOutcome};
use crate::lake::{Lake, LakeError};
use crate::source::catalog::{self, CatalogError};
use crate::source::replication::ReplicationConnection;
use crate::source::snapshot::SnapshotReader;
use crate::table_name::TableName;

/// How often the request directory is looked at.
const POLL: Duration = Duration::from_secs(1);
/// Attempts per request before its failure is reported.
const ATTEMPTS: u32 = 3;

/// Serves resync requests until `cancel` fires; copies go to the apply stage on `staged`.
pub async fn serve_requests(
    settings: Settings,
    lake: Lake,
    staged: mpsc::Sender<StagedCopy>,
    cancel: CancellationToken,
) {
    let requests = Requests::open(&lake);
    let mut failures: HashMap<TableName, u32> = HashMap::new();
    // Requests the replication session serves (`pipeline::chunked`), while pending.
    let mut in_chunks: HashSet<TableName> = HashSet::new();
    loop {
        let pending = requests.pending_requests().await;
        in_chunks.retain(|t| pending.iter().any(|(p, _)| p == t));
        for (table, id) in pending {
            if cancel.is_cancelled() {
                return;
            }
            if in_chunks.contains(&table) {
                continue;
            }
            let started = Instant::now();
            let result = tokio::select! {
                r = resync(&settings, &lake, &table, &staged) => r,
                _ = cancel.cancelled() => return,
            };
            let outcome = |rows, point: Option<String>, error: Option<String>| ResyncOutcome {
                table: table.to_string(),
                error,
                rows,
                point,
                elapsed_ms: started.elapsed().as_millis() as u64,
                removed_in_chunks: None,
            };
            match result {
                Ok(None) => {
                    in_chunks.insert(table.clone());
                }
                Ok(Some((rows, point))) => {
                    failures.remove(&table);
                    requests
                        .finish_resync(&table, &outcome(rows, Some(point), None), id)
                        .await;
                }
                Err(e) if crate::lake::lock::fence().is_err() => {
                    // This daemon may no longer hold the lake: the request stays for the
                    // one that does.
                    tracing::warn!(table = %table, error = %e.message, "resync interrupted: the lake's lease is in doubt; leaving the request");
                }
                Err(e) => {
                    let attempts = failures.entry(table.clone()).or_insert(0);
                    *attempts += 1;
                    crate::telemetry::error("resync");
                    if *attempts >= ATTEMPTS || !e.transient {
                        tracing::error!(table = %table, error = %e.message, "resync failed");
                        failures.remove(&table);
                        requests
                            .finish_resync(&table, &outcome(0, None, Some(e.message)), id)
                            .await;
                    } else {
                        tracing::warn!(table = %table, error = %e.message, attempt = *attempts, "resync interrupted; trying again");
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Why a resync failed, and whether trying again may help.
struct Failed {
    message: String,
    transient: bool,
}

impl From<PipelineError> for Failed {
    fn from(e: PipelineError) -> Failed {
        Failed {
            transient: e.is_transient(),
            message: e.to_string(),
        }
    }
}

impl From<LakeError> for Failed {
    fn from(e: LakeError) -> Failed {
        PipelineError::from(e).into()
    }
}

impl From<CatalogError> for Failed {
    fn from(e: CatalogError) -> Failed {
        PipelineError::from(e).into()
    }
}

fn refused(message: String) -> Failed {
    Failed {
        message,
        transient: false,
    }
}

/// Copies `table` and hands the copy to the apply stage; returns the rows copied and the
/// copy's point once it is swapped in, or `None` for a table the replication session
/// copies again in chunks (`pipeline::chunked`).
async fn resync(
    settings: &Settings,
    lake: &Lake,
    table: &TableName,
    staged: &mpsc::Sender<StagedCopy>,
) -> Result<Option<(u64, String)>, Failed> {
    let source = &settings.source;
    if !source.tables.contains(table) {
        return Err(refused(format!(
            "{table} is not in source.tables; only configured tables can be copied again"
        )));
    }
    let client = catalog::connect(&source.conn).await?;
    let info = catalog::table_info(&client, table, &source.publication)
        .await?
        .ok_or_else(|| refused(format!("{table} does not exist on the source")))?;
    drop(client);
    let label = table.to_string();
    let existing = RawTable::stored_schema(lake, table).await?;
    if existing.is_none() {
        return Err(refused(format!(
            "{table} has no lake tables yet; the daemon copies it when it starts"
        )));
    }
    if super::chunked::resyncs_in_chunks(settings, &info) {
        return Ok(None);
    }
    let columns = schema::reconcile(&label, existing.as_deref(), &info.columns)
        .map_err(|e| refused(e.to_string()))?;
    let normalizer =
        Normalizer::for_table(table, &columns, &info.key_columns, &settings.normalization);
    let mut raw = RawCopy::open(lake, table, &columns).await?;
    let mut curated = CuratedCopy::open(
        lake,
        table,
        &columns,
        &info.key_columns,
        &normalizer.stored_types(),
    )
    .await?;

    let started = Instant::now();
    let mut conn = ReplicationConnection::connect(&source.conn)
        .await
        .map_err(PipelineError::from)?;
    let slot = format!("wal2delta_resync_{}", std::process::id());
    let (point, name) = conn
        .create_slot_exporting(&slot, true, false)
        .await
        .map_err(PipelineError::from)?;
    let reader = SnapshotReader::open(
        &source.conn,
        &name,
        source.snapshot_workers,
        source.snapshot_chunk_bytes,
        &source.snapshot_limits,
    )
    .await
    .map_err(PipelineError::from);
    // Every worker imported the snapshot: the temporary slot can go.
    conn.close().await;
    let reader = reader?;
    tracing::info!(table = %table, at = %point, "resync: copying the table again while streaming");
    let (tx, mut rx) = mpsc::channel::<RecordBatch>(2 * source.snapshot_workers);
    let write = async {
        let mut rows = 0u64;
        while let Some(batch) = rx.recv().await {
            crate::service::beat();
            rows += batch.num_rows() as u64;
            crate::telemetry::snapshot_progress(&label, rows, None);
            let values = normalizer
                .normalize(&batch)
                .map_err(|source| LakeError::Arrow {
                    table: label.clone(),
                    source,
                })?;
            curated.write(&batch, values).await?;
            raw.write(batch).await?;
        }
        Ok::<_, LakeError>(rows)
    };
    let (copied, written) = tokio::join!(
        reader.copy_table(&info, &columns, point, RawBatchBuilder::new, tx),
        write
    );
    reader.close().await;
    // A failed write closes the channel, which the copy reports too: the write's error
    // is the cause.
    let rows = written?;
    copied.map_err(PipelineError::from)?;
    let raw = raw.finish().await?;
    let curated = curated.finish().await?;
    let (done, swapped) = oneshot::channel();
    let copy = StagedCopy {
        table: table.clone(),
        point,
        columns,
        part: info.published.fingerprint(),
        raw,
        curated,
        rows,
        done,
    };
    if staged.send(copy).await.is_err() {
        return Err(Failed {
            message: "the apply stage stopped before the copy could be swapped in".into(),
            transient: true,
        });
    }
    match swapped.await {
        Ok(Ok(())) => {
            crate::telemetry::change(&label, crate::change::Op::Read.code(), rows);
            tracing::info!(table = %table, rows, elapsed_ms = started.elapsed().as_millis() as u64, "resync complete");
            Ok(Some((rows, point.to_string())))
        }
        Ok(Err(message)) => Err(Failed {
            message,
            transient: true,
        }),
        // The session ended (a transient error) before swapping it in.
        Err(_) => Err(Failed {
            message: "replication restarted before the copy was swapped in".into(),
            transient: true,
        }),
    }
}
