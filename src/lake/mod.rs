//! The lake: where the Delta tables live, their formats, and the one commit path.
//!
//! ```text
//! <lake>/raw/<schema>/<table>/        raw change log of one source table (`raw`)
//! <lake>/curated/<schema>/<table>/    current rows of one source table (`curated`)
//! <lake>/_wal2delta/checkpoint/       global replication checkpoint (`checkpoint`)
//! <lake>/_wal2delta/daemon.lock       held by the running daemon, local lakes (`lock`)
//! <lake>/_wal2delta/lease.json        held by the running daemon, object stores (`lock`)
//! <lake>/_wal2delta/requests/         operator requests to the daemon (`requests`)
//! ```
//!
//! The lake is a local directory or a prefix in an object store ([`storage`]).
//!
//! The lake owns every table format: the raw layout and writer ([`raw`]), the curated
//! table and its merge ([`curated`]), the checkpoint record ([`checkpoint`]). Every
//! commit goes through [`commit`], which writes data and source position together. The
//! lake depends only on the leaves (`change`, `lsn`, `table_name`, `pg_types`,
//! `telemetry`); it tells the rest of the process about new checkpoint records on a
//! channel the pipeline hands it.
//! Schema and table names are path segments with every byte outside `[A-Za-z0-9_-]`
//! written as `~XX`, so two schemas may hold tables of the same name and no name escapes
//! its directory. Every table is a standard Delta table: any Delta reader can open it.

pub mod aws_profile;
pub mod checkpoint;
pub mod commit;
pub mod curated;
pub mod deletion_vector;
pub mod lock;
pub mod maintenance;
pub mod raw;
pub mod requests;
pub mod storage;
pub mod table;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deltalake::DeltaTableError;
use serde::Deserialize;
use url::Url;

use self::storage::{Cloud, StorageOptions};
use crate::table_name::TableName;

/// Default `lake.lease_seconds`.
const DEFAULT_LEASE_SECONDS: u64 = 30;

/// `[lake]`: where the Delta tables live.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeConfig {
    /// A local directory (created if missing) or an object-store URL.
    pub path: String,
    /// How long a daemon's lease on an object-store lake lasts unless renewed: a daemon
    /// killed without releasing it is replaced after this long.
    #[serde(default)]
    pub lease_seconds: Option<u64>,
    /// Object-store options (`endpoint`, `region`, `allow_http`, …; secrets as
    /// `<key>_env` or `<key>_file`).
    #[serde(default)]
    pub storage: BTreeMap<String, toml::Value>,
}

/// `[lake]`, checked: the location, its storage options (secrets read) and the lease.
#[derive(Debug, Clone)]
pub struct LakeSettings {
    pub path: String,
    pub storage: StorageOptions,
    pub lease: Duration,
}

impl LakeConfig {
    /// Checks the section (problems name `lake.<field>`).
    pub fn validate(self, problems: &mut Vec<String>) -> LakeSettings {
        if self.path.trim().is_empty() {
            problems.push("lake.path: must name a directory or an object-store URL".into());
        }
        if self.path.contains("://") {
            match Url::parse(&self.path) {
                Ok(url) if url.scheme() == "file" || Cloud::of(&url).is_some() => {}
                Ok(url) => problems.push(format!(
                    "lake.path: `{}://` is not a lake location wal2delta knows; use a local \
                     directory, s3://bucket/prefix, az://container/prefix, \
                     abfss://container@account.dfs.core.windows.net/prefix or \
                     gs://bucket/prefix",
                    url.scheme()
                )),
                Err(e) => problems.push(format!("lake.path: not a URL: {e}")),
            }
        }
        let lease = self.lease_seconds.unwrap_or(DEFAULT_LEASE_SECONDS);
        if lease < 2 {
            problems.push("lake.lease_seconds: must be at least 2".into());
        }
        let storage = StorageOptions::resolve(&self.path, &self.storage, problems);
        LakeSettings {
            path: self.path,
            storage,
            lease: Duration::from_secs(lease),
        }
    }
}

/// Lake storage failed. Disk-full and I/O errors are transient: the daemon keeps the slot,
/// confirms nothing new, and retries.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("the lake location `{location}` is not usable: {message}")]
    Location { location: String, message: String },
    #[error("Delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },
    #[error("building Arrow data for {table}: {source}")]
    Arrow {
        table: String,
        #[source]
        source: deltalake::arrow::error::ArrowError,
    },
    #[error(
        "another wal2delta daemon is running on this lake ({owner}, lock file {path}); stop it \
         first, or give this one its own lake.path"
    )]
    Locked { path: String, owner: String },
    #[error(
        "the lake's storage failed at {what}: {source}; the daemon retries (check the \
         endpoint, credentials and permissions if it persists)"
    )]
    Storage {
        what: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "this daemon's lease on the lake was last renewed {seconds} s ago and may have \
         expired; it commits nothing until a renewal succeeds (is the object store \
         reachable?)"
    )]
    LeaseExpired { seconds: u64 },
    #[error(
        "another daemon took over this lake's lease ({holder}) while this one could not renew \
         it (paused, or cut off from the object store); this one stopped without committing \
         further. Stop one of them: two daemons must not share a lake"
    )]
    LeaseLost { holder: String },
    #[error(
        "table {table} has no key wal2delta can use for its curated table: give it a primary \
         key, or ALTER TABLE ... REPLICA IDENTITY FULL (or USING INDEX a unique index)"
    )]
    NoKey { table: String },
    #[error(
        "the Delta table {table} has columns {existing:?}, which the columns wal2delta would \
         write ({incoming:?}) do not include; it was written by another configuration or \
         version: move the table aside and start again (it is re-created and, with \
         source.snapshot = \"initial\", copied afresh)"
    )]
    SchemaChanged {
        table: String,
        existing: Vec<String>,
        incoming: Vec<String>,
    },
    #[error(
        "the Delta table {table} stores column {column} as {existing}, but wal2delta would now \
         write {incoming} (was a normalization rule added, removed or changed for it?); \
         restore the rule, or move the table aside and start again (it is re-created and, \
         with source.snapshot = \"initial\", copied afresh)"
    )]
    TypeMismatch {
        table: String,
        column: String,
        existing: String,
        incoming: String,
    },
}

impl LakeError {
    /// Whether retrying later may succeed (storage trouble) or an operator must act.
    pub fn is_transient(&self) -> bool {
        match self {
            LakeError::Delta { source, .. } => storage_trouble(source),
            LakeError::Storage { .. } | LakeError::LeaseExpired { .. } => true,
            _ => false,
        }
    }
}

/// Disk full, I/O errors, an object store out of reach: worth retrying. A broken table, a
/// missing feature, a second writer's conflicting commit: an operator must look.
fn storage_trouble(error: &DeltaTableError) -> bool {
    use deltalake::kernel::transaction::TransactionError;
    match error {
        DeltaTableError::ObjectStore { .. }
        | DeltaTableError::Io { .. }
        | DeltaTableError::Parquet { .. } => true,
        DeltaTableError::KernelError(kernel) => match kernel {
            delta_kernel::Error::ObjectStore(_)
            | delta_kernel::Error::IOError(_)
            | delta_kernel::Error::Parquet(_) => true,
            // A version this daemon just committed that the log's listing does not show:
            // the storage lost sight of the log (a directory moved away, an unmounted
            // disk). The commit may or may not have landed; the retry's transaction
            // check tells which.
            delta_kernel::Error::Generic(message) => {
                message.starts_with("Requested snapshot version")
                    && message.contains("is not available")
            }
            _ => false,
        },
        // delta-rs passes some object-store errors on as text (a log listing that failed
        // because the log directory is gone or is not a directory).
        DeltaTableError::Generic(message) => {
            message.starts_with("Error interacting with object store")
        }
        DeltaTableError::Transaction { source } => matches!(
            source,
            TransactionError::ObjectStore { .. } | TransactionError::LogStoreError { .. }
        ),
        _ => false,
    }
}

/// The lake root and the locations of its tables. (`Debug` leaves the store out: some
/// stores' own `Debug` shows their credentials.)
#[derive(Clone)]
pub struct Lake {
    root: Url,
    /// The store rooted at `root`, for the lake's own objects (lease, requests).
    store: Arc<dyn object_store::ObjectStore>,
    lease: Duration,
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lake")
            .field("root", &self.root.as_str())
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Lake {
    /// Opens the lake at a local directory (created if missing) or an object-store URL,
    /// and makes deltalake reach it with the configured storage options.
    pub fn open(settings: &LakeSettings) -> Result<Lake, LakeError> {
        let location = settings.path.as_str();
        let err = |message: String| LakeError::Location {
            location: location.to_string(),
            message,
        };
        let root = if location.contains("://") {
            let mut url = Url::parse(location).map_err(|e| err(e.to_string()))?;
            if !url.path().ends_with('/') {
                url.set_path(&format!("{}/", url.path()));
            }
            url
        } else {
            let path = Path::new(location);
            std::fs::create_dir_all(path).map_err(|e| err(format!("cannot create it: {e}")))?;
            let path = path
                .canonicalize()
                .map_err(|e| err(format!("cannot resolve it: {e}")))?;
            Url::from_directory_path(&path).map_err(|_| err("not an absolute path".into()))?
        };
        storage::register(&root, &settings.storage);
        let store =
            storage::lake_store(&root, &settings.storage).map_err(|e| err(e.to_string()))?;
        Ok(Lake {
            root,
            store,
            lease: settings.lease,
        })
    }

    pub fn root(&self) -> &Url {
        &self.root
    }

    /// Whether the lake is in an object store (not a local directory).
    pub fn is_object_store(&self) -> bool {
        self.root.scheme() != "file"
    }

    /// The store rooted at the lake, for its own objects under `_wal2delta/`.
    pub fn store(&self) -> &Arc<dyn object_store::ObjectStore> {
        &self.store
    }

    /// How long the daemon's lease on an object-store lake lasts unless renewed.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn join(&self, rel: &str) -> Url {
        // `rel` is built from escaped segments, so joining cannot fail or escape the root.
        self.root.join(rel).unwrap_or_else(|_| self.root.clone())
    }

    /// The raw change-log table of a source table.
    pub fn raw_table_url(&self, table: &TableName) -> Url {
        self.join(&format!("raw/{}/", table.path_segments()))
    }

    /// The curated (current-state mirror) table of a source table.
    pub fn curated_table_url(&self, table: &TableName) -> Url {
        self.join(&format!("curated/{}/", table.path_segments()))
    }

    /// The global checkpoint table.
    pub fn checkpoint_url(&self) -> Url {
        self.join("_wal2delta/checkpoint/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_that_vanished_from_the_listing_is_storage_trouble() {
        let vanished = DeltaTableError::KernelError(delta_kernel::Error::Generic(
            "Requested snapshot version 7 is not available: no new commits were found after existing snapshot version 6".into(),
        ));
        assert!(storage_trouble(&vanished));
        let other = DeltaTableError::KernelError(delta_kernel::Error::Generic(
            "Invalid table: a broken schema".into(),
        ));
        assert!(!storage_trouble(&other));
        let unlisted = DeltaTableError::Generic(
            "Error interacting with object store: Generic LocalFileSystem error: Unable to walk dir: IO error for operation on /lake/raw/public/acct/_delta_log: Not a directory (os error 20)".into(),
        );
        assert!(storage_trouble(&unlisted));
        assert!(!storage_trouble(&DeltaTableError::Generic(
            "a table's schema is broken".into()
        )));
    }
}
