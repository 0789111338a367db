//! Operator requests to the running daemon: files under `<lake>/_wal2delta/requests/`.
//!
//! `wal2delta resync` cannot write the lake itself while a daemon does (one writer per
//! lake, `lake::lock`), so it leaves a request the daemon picks up, and the daemon leaves
//! the outcome next to it. A request survives a restart: a daemon that stops before
//! finishing does it after the next start. Objects in the lake's store, so requests work
//! the same on a local disk and in an object store.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};

use serde::{Deserialize, Serialize};

use super::{Lake, LakeError};
use crate::table_name::TableName;

/// A request to copy a table again.
#[derive(Debug, Serialize, Deserialize)]
struct ResyncRequest {
    table: String,
    requested_at: String,
}

/// How a resync ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResyncOutcome {
    pub table: String,
    /// The error when it failed.
    pub error: Option<String>,
    pub rows: u64,
    /// The consistent point of the copy (in chunks: where its last chunk was taken).
    pub point: Option<String>,
    pub elapsed_ms: u64,
    /// Copied in chunks into the live tables (`pipeline::chunked`): the rows deleted
    /// because the source no longer has them. `None`: from an exported snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_in_chunks: Option<u64>,
}

/// The request directory of one lake. (No `Debug`: the store's may show credentials.)
#[derive(Clone)]
pub struct Requests {
    store: Arc<dyn ObjectStore>,
    location: String,
}

const DIR: &str = "_wal2delta/requests";

impl Requests {
    pub fn open(lake: &Lake) -> Requests {
        Requests {
            store: lake.store().clone(),
            location: format!("{}{DIR}/", lake.root()),
        }
    }

    fn path(&self, table: &TableName, suffix: &str) -> Path {
        let name = table.path_segments().replace('/', ".");
        Path::from(format!("{DIR}/resync.{name}.{suffix}"))
    }

    fn storage_err(&self, what: &str, e: object_store::Error) -> LakeError {
        LakeError::Location {
            location: self.location.clone(),
            message: format!("{what}: {e}"),
        }
    }

    async fn read(&self, path: &Path) -> Option<String> {
        let got = self.store.get(path).await.ok()?;
        let bytes = got.bytes().await.ok()?;
        String::from_utf8(bytes.to_vec()).ok()
    }

    /// Asks the daemon to copy `table` again (forgetting the outcome of an earlier one).
    /// A request still pending is kept unless `again`: its copy goes on (a chunked one
    /// resumes where it got to, which a new request would not). With `again` (the source
    /// changed what a copy holds) a new request replaces it, and the copy under way no
    /// longer answers it.
    pub async fn ask_resync(&self, table: &TableName, again: bool) -> Result<(), LakeError> {
        if !again && self.read(&self.path(table, "request")).await.is_some() {
            return Ok(());
        }
        let _ = self.store.delete(&self.path(table, "outcome")).await;
        let request = ResyncRequest {
            table: table.to_string(),
            requested_at: chrono::Utc::now().to_rfc3339(),
        };
        let text = serde_json::to_string(&request).unwrap_or_default();
        // One put: an object store (and the local store, through a rename) never shows
        // half a request.
        self.store
            .put(&self.path(table, "request"), text.into())
            .await
            .map(|_| ())
            .map_err(|e| self.storage_err("cannot write a request", e))
    }

    /// The tables whose resync is asked for and not done yet, each with its request's
    /// time (milliseconds since the Unix epoch), which names the request.
    pub async fn pending_requests(&self) -> Vec<(TableName, i64)> {
        let listed: Vec<ObjectMeta> =
            match self.store.list(Some(&Path::from(DIR))).try_collect().await {
                Ok(listed) => listed,
                Err(_) => return Vec::new(),
            };
        let mut tables = Vec::new();
        for meta in listed {
            if !meta.location.as_ref().ends_with(".request") {
                continue;
            }
            let Some(text) = self.read(&meta.location).await else {
                continue;
            };
            let Ok(request) = serde_json::from_str::<ResyncRequest>(&text) else {
                continue;
            };
            let at = request_time(&request);
            if let Ok(t) = TableName::parse(&request.table) {
                tables.push((t, at));
            }
        }
        tables.sort_by_key(|(t, _)| t.to_string());
        tables
    }

    /// Whether `table`'s resync is still asked for (when the store cannot say: yes).
    pub async fn is_pending(&self, table: &TableName) -> bool {
        !matches!(
            self.store.head(&self.path(table, "request")).await,
            Err(object_store::Error::NotFound { .. })
        )
    }

    /// Records how `table`'s resync for request `id` ended and drops the request, unless
    /// a newer one replaced it meanwhile.
    pub async fn finish_resync(&self, table: &TableName, outcome: &ResyncOutcome, id: i64) {
        // The request pending now, by its time (unreadable: kept, so that a newer request
        // is never dropped by mistake).
        let current = match self.store.get(&self.path(table, "request")).await {
            Err(object_store::Error::NotFound { .. }) => None,
            Err(_) => Some(i64::MIN),
            Ok(got) => Some(
                got.bytes()
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ResyncRequest>(&b).ok())
                    .map_or(i64::MIN, |r| request_time(&r)),
            ),
        };
        if current.is_some_and(|at| at != id) {
            tracing::info!(table = %table, "a newer resync request came while this one was copied; it is copied again");
            return;
        }
        let text = serde_json::to_string_pretty(outcome).unwrap_or_default();
        if let Err(e) = self
            .store
            .put(&self.path(table, "outcome"), text.into())
            .await
        {
            tracing::warn!(table = %table, error = %e, "cannot record the resync's outcome");
        }
        let _ = self.store.delete(&self.path(table, "request")).await;
    }

    /// What the daemon's publication guard remembered of the tables' shapes (their
    /// partitions), so a change made while it was stopped is found at the next start.
    pub async fn load_guard_state(&self) -> Option<String> {
        self.read(&Path::from(format!("{DIR}/guard-state.json")))
            .await
    }

    pub async fn save_guard_state(&self, text: &str) -> Result<(), LakeError> {
        self.store
            .put(
                &Path::from(format!("{DIR}/guard-state.json")),
                text.to_string().into(),
            )
            .await
            .map(|_| ())
            .map_err(|e| self.storage_err("cannot save the guard state", e))
    }

    /// How `table`'s last resync ended, once it has.
    pub async fn resync_outcome(&self, table: &TableName) -> Option<ResyncOutcome> {
        if self.is_pending(table).await {
            return None;
        }
        let text = self.read(&self.path(table, "outcome")).await?;
        serde_json::from_str(&text).ok()
    }
}

/// A request's time in milliseconds since the Unix epoch, which names it.
fn request_time(request: &ResyncRequest) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&request.requested_at)
        .map(|t| t.timestamp_millis())
        .unwrap_or(0)
}
