//! The daemon's background tasks: the SQL endpoint, the slot watcher and the WAL
//! heartbeat, next to replication.
//!
//! They live in one [`Background`] set with their own cancellation token: stopping it
//! cancels every task and then *joins* them, so none is aborted in the middle of what it
//! does, and a task that panicked is reported instead of vanishing.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::lake::requests::Requests;
use crate::source::catalog;
use crate::source::config::SourceSettings;
use crate::source::diagnosis::{self, CopiedParts, SourceUnusable, TableShape};
use crate::source::dsn::ConnParams;
use crate::table_name::TableName;

/// Running background tasks.
pub struct Background {
    tasks: JoinSet<()>,
    cancel: CancellationToken,
}

impl Background {
    /// An empty set whose tasks stop when `parent` is cancelled or [`Background::stop`]
    /// is called.
    pub fn new(parent: &CancellationToken) -> Background {
        Background {
            tasks: JoinSet::new(),
            cancel: parent.child_token(),
        }
    }

    /// The token the set's tasks watch.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Starts the slot watcher, the publication guard (which cancels `replication` and
    /// reports on `diverged` when a configured table can no longer be followed exactly, and
    /// asks `requests` for a resync of a table whose partitions changed) and, when
    /// configured, the WAL heartbeat.
    pub fn spawn_source_tasks(
        &mut self,
        settings: &Settings,
        requests: Option<Requests>,
        copied: CopiedParts,
        replication: CancellationToken,
        diverged: oneshot::Sender<SourceUnusable>,
    ) {
        let watch = SlotWatch::from_settings(settings);
        self.tasks.spawn(watch_slot(watch, self.token()));
        self.tasks.spawn(guard_publication(
            settings.source.clone(),
            settings.config_path.clone(),
            requests,
            copied,
            replication,
            diverged,
            self.token(),
        ));
        if let Some(every) = settings.source.heartbeat {
            let source = settings.source.conn.clone();
            self.tasks.spawn(heartbeat(source, every, self.token()));
        }
    }

    /// Adds a task that ends when [`Background::token`] is cancelled.
    pub fn add(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Cancels every task and waits for each to finish.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = joined {
                crate::telemetry::error("task");
                tracing::error!(error = %e, "a background task failed");
            }
        }
    }
}

/// `source.heartbeat_secs`: writes a tiny non-transactional logical message into this
/// database's WAL now and then, so the walsender has something of this database to decode
/// and the slot advances even when the database sees no writes (e.g. only other databases
/// of the cluster are busy). The message is not published; it only moves positions.
async fn heartbeat(source: ConnParams, every: Duration, cancel: CancellationToken) {
    let mut warned = false;
    let mut client = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if client.is_none() {
            client = tokio::select! {
                _ = cancel.cancelled() => return,
                connected = catalog::connect(&source) => connected.ok(),
            };
        }
        let Some(c) = client.as_ref() else { continue };
        let emitted = tokio::select! {
            _ = cancel.cancelled() => return,
            emitted = c.simple_query("SELECT pg_logical_emit_message(false, 'wal2delta.heartbeat', '')") => emitted,
        };
        match emitted {
            Ok(_) => warned = false,
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "heartbeat failed (pg_logical_emit_message); grant it with: GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) TO <wal2delta role> (PostgreSQL 17+: pg_logical_emit_message(boolean, text, text, boolean))");
                    warned = true;
                }
                client = None;
            }
        }
    }
}

/// Checks every status interval that the publication still carries every configured
/// table whole (`diagnosis::publication_guard`) and that each table keeps its key and
/// partitions (`diagnosis::table_shapes`). A table dropped from the publication, given a
/// row filter or column list, or keyed by other columns would lose changes silently: the
/// guard stops replication (a clean stop: what is complete is committed) and hands the
/// reason over. Partitions attached, detached or truncated change rows the stream never
/// carries: the guard asks for the table to be copied again (`resync`). Both are counted
/// in `wal2delta_divergences_total`.
async fn guard_publication(
    source: SourceSettings,
    config_path: Option<std::path::PathBuf>,
    requests: Option<Requests>,
    copied: CopiedParts,
    replication: CancellationToken,
    diverged: oneshot::Sender<SourceUnusable>,
    cancel: CancellationToken,
) {
    let every = source.status_interval;
    let mut warned = false;
    // The shapes seen last; partitions also from before this start.
    let mut shapes: Option<BTreeMap<String, TableShape>> = None;
    let mut stored: Option<BTreeMap<String, TableShape>> = match &requests {
        Some(r) => r.load_guard_state().await,
        None => None,
    }
    .and_then(|text| serde_json::from_str(&text).ok());
    // The first look is at once: it is the baseline the key is compared with.
    // One connection for every look, opened again after an error.
    let mut client: Option<tokio_postgres::Client> = None;
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
        first = false;
        let checked = tokio::select! {
            _ = cancel.cancelled() => return,
            checked = async {
                let c = match client.take() {
                    Some(c) => c,
                    None => catalog::connect(&source.conn).await?,
                };
                let found = diagnosis::publication_guard(&c, &source, config_path.as_deref()).await?;
                let now = diagnosis::table_shapes(&c, &source).await?;
                client = Some(c);
                Ok::<_, catalog::CatalogError>((found, now))
            } => checked,
        };
        let now = match checked {
            Ok((None, now)) => {
                warned = false;
                now
            }
            Ok((Some(found), _)) => {
                stop(found, diverged, &replication);
                return;
            }
            Err(e) => {
                if !warned {
                    warned = true;
                    tracing::warn!(error = %e, "cannot check the publication; retrying at the next status interval");
                }
                continue;
            }
        };
        // The first look compares partitions with what was stored before this start, and
        // takes the key as it is now.
        let was = shapes.take().or_else(|| {
            stored.take().map(|mut s| {
                for (table, shape) in s.iter_mut() {
                    if let Some(current) = now.get(table) {
                        shape.key = current.key.clone();
                    }
                }
                s
            })
        });
        for (table, shape) in &now {
            let (Some(old), Ok(name)) = (
                was.as_ref().and_then(|w| w.get(table)),
                TableName::parse(table),
            ) else {
                continue;
            };
            match diagnosis::shape_change(&name, old, shape) {
                Err(found) => {
                    stop(found, diverged, &replication);
                    return;
                }
                Ok(mut changed) if !changed.is_empty() => {
                    if let Some(c) = &client {
                        diagnosis::drop_empty_attached(c, &mut changed).await;
                    }
                    if changed.is_empty() {
                        continue;
                    }
                    crate::telemetry::divergence(table, changed.reason());
                    tracing::warn!(table = %table, partitions = %changed, "partitions changed without their rows passing through the stream; copying the table again (resync)");
                    if let Some(requests) = &requests
                        && let Err(e) = requests.ask_resync(&name, true).await
                    {
                        tracing::error!(table = %table, error = %e, "cannot ask for a resync; run `wal2delta resync --table {table}`");
                    }
                }
                Ok(_) => {}
            }
        }
        for table in reshaped(&copied, &now) {
            crate::telemetry::divergence(&table.to_string(), "publication_reshaped");
            let asked = match &requests {
                Some(requests) => requests
                    .ask_resync(&table, true)
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("no resync here".to_string()),
            };
            match asked {
                Ok(()) => {
                    tracing::warn!(table = %table, "the publication's row filter or column list of this table changed: copying the table again (resync)")
                }
                Err(e) => {
                    tracing::error!(table = %table, error = %e, "cannot ask for a resync");
                    let found = SourceUnusable::PublicationChanged {
                        table: table.to_string(),
                        quoted: table.quoted(),
                        publication: crate::table_name::quote_ident(&source.publication),
                        gap: "the publication's row filter or column list of it changed".into(),
                        config: config_path
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "<config file>".into()),
                    };
                    stop(found, diverged, &replication);
                    return;
                }
            }
        }
        if was.as_ref() != Some(&now)
            && let Some(requests) = &requests
        {
            let text = serde_json::to_string_pretty(&now).unwrap_or_default();
            if let Err(e) = requests.save_guard_state(&text).await {
                tracing::warn!(error = %e, "cannot remember the tables' partitions");
            }
        }
        shapes = Some(now);
    }
}

/// The tables whose published part (row filter, column list) differs from the part
/// their copy holds; each is recorded as copied anew (the resync asked for copies what
/// the publication publishes then; a later change is found at a later look).
fn reshaped(copied: &CopiedParts, now: &BTreeMap<String, TableShape>) -> Vec<TableName> {
    let Ok(mut copied) = copied.lock() else {
        return Vec::new();
    };
    let mut changed = Vec::new();
    for (table, shape) in now {
        if let Some(part) = copied.get_mut(table)
            && *part != shape.part
            && let Ok(name) = TableName::parse(table)
        {
            *part = shape.part.clone();
            changed.push(name);
        }
    }
    changed
}

/// Stops replication for a divergence the guard cannot repair.
fn stop(
    found: SourceUnusable,
    diverged: oneshot::Sender<SourceUnusable>,
    replication: &CancellationToken,
) {
    crate::telemetry::error("divergence");
    crate::telemetry::divergence(found.table().unwrap_or(""), found.reason());
    tracing::error!(error = %found, "stopping replication: a configured table can no longer be followed exactly");
    let _ = diverged.send(found);
    replication.cancel();
}

/// What the slot watcher needs.
struct SlotWatch {
    source: ConnParams,
    slot: String,
    every: Duration,
    warn_bytes: Option<i64>,
}

impl SlotWatch {
    fn from_settings(settings: &Settings) -> SlotWatch {
        SlotWatch {
            source: settings.source.conn.clone(),
            slot: settings.source.slot.clone(),
            every: (settings.source.status_interval * 3)
                .clamp(Duration::from_secs(3), Duration::from_secs(60)),
            warn_bytes: settings.retained_wal_warn_bytes,
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
        // Stopping must not wait for a slow or unreachable server.
        let looked_up = tokio::select! {
            _ = cancel.cancelled() => return,
            slot = async {
                let client = catalog::connect(&watch.source).await.ok()?;
                catalog::slot_info(&client, &watch.slot).await.ok().flatten()
            } => slot,
        };
        let Some(slot) = looked_up else {
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
