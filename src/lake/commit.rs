//! The one exactly-once commit path.
//!
//! Every Delta commit wal2delta writes — raw appends, curated merges, snapshot copies,
//! checkpoint records, operator resets — is a [`Commit`] written by [`Commit::write`]:
//! its data actions and its application transactions (`txn` actions) go into the *same*
//! Delta commit, so a table's recorded source position can never disagree with its data
//! (invariant 1 in `docs/architecture.md`). [`AppId`] is the only place that spells an
//! application-transaction id, and [`InfoKey`] the only place that spells a commit-info
//! key; [`applied`] reads a position back.

use std::collections::HashMap;
use std::fmt;

use deltalake::DeltaTable;
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::kernel::{Action, Transaction};
use deltalake::protocol::DeltaOperation;

use super::LakeError;
use crate::lsn::Lsn;
use crate::table_name::TableName;

/// An application-transaction id: which source position (or marker) a `txn` records.
/// Built only by these constructors, so every writer and reader spells it the same way.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppId(String);

impl AppId {
    /// The global checkpoint of `slot` (end LSN of the last committed batch).
    pub fn checkpoint(slot: &str) -> AppId {
        AppId(format!("wal2delta:{slot}"))
    }

    /// A raw table's position (commit LSN of the last source transaction it holds).
    pub fn raw(slot: &str, table: &TableName) -> AppId {
        AppId(format!("wal2delta:{slot}:{table}"))
    }

    /// A curated table's position.
    pub fn curated(slot: &str, table: &TableName) -> AppId {
        AppId(format!("wal2delta:{slot}:curated:{table}"))
    }

    /// A raw table's completed snapshot (version: the snapshot's consistent point).
    pub fn snapshot(slot: &str, table: &TableName) -> AppId {
        AppId(format!("wal2delta:{slot}:snapshot:{table}"))
    }

    /// A raw table's snapshot copied only part of the source table, the part a
    /// publication's row filter and column list publish (version: the snapshot's
    /// consistent point): `part` is `partial` for every such copy, and the part's
    /// fingerprint for the one it was.
    pub fn published(slot: &str, table: &TableName, part: &str) -> AppId {
        AppId(format!("wal2delta:{slot}:published-{part}:{table}"))
    }

    /// Where a raw table's chunked (watermark) copy began (version: the WAL position of
    /// its first low watermark).
    pub fn chunked_start(slot: &str, table: &TableName) -> AppId {
        AppId(format!("wal2delta:{slot}:chunked-start:{table}"))
    }

    /// When a raw table's chunked copy began (version: milliseconds since the Unix epoch).
    pub fn chunked_began(slot: &str, table: &TableName) -> AppId {
        AppId(format!("wal2delta:{slot}:chunked-began:{table}"))
    }

    /// The last key a raw table's chunked copy holds (version: the key itself).
    pub fn chunked_key(slot: &str, table: &TableName) -> AppId {
        AppId(format!("wal2delta:{slot}:chunked-key:{table}"))
    }

    /// The resync a raw table's chunked copy is for (version: the request's time in
    /// milliseconds since the Unix epoch); absent for the table's first copy.
    pub fn chunked_resync(slot: &str, table: &TableName) -> AppId {
        AppId(format!("wal2delta:{slot}:chunked-resync:{table}"))
    }

    /// An operator's request to copy `table` again (version: the WAL position then).
    pub fn resnapshot(slot: &str, table: &TableName) -> AppId {
        AppId(format!("wal2delta:{slot}:resnapshot:{table}"))
    }

    /// The consistent point of the slot when this daemon created it.
    pub fn slot_created(slot: &str) -> AppId {
        AppId(format!("wal2delta:{slot}:slot-created"))
    }

    /// When the daemon created (`true`) or teardown dropped (`false`) the publication
    /// (version: a time; two markers because `txn` versions only grow).
    pub fn publication(slot: &str, created: bool) -> AppId {
        let marker = if created {
            "publication-created"
        } else {
            "publication-dropped"
        };
        AppId(format!("wal2delta:{slot}:{marker}"))
    }

    /// When the last operator reset happened (version: a time).
    pub fn resets(slot: &str) -> AppId {
        AppId(format!("wal2delta:{slot}:resets"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The commit-info keys wal2delta writes next to Delta's own, for people and tools
/// reading a table's history. The checkpoint record's keys are its serde field names
/// (`checkpoint::CheckpointRecord`).
#[derive(Debug, Clone, Copy)]
pub enum InfoKey {
    /// On raw and curated batch commits: the commit LSN they hold through.
    CommitLsn,
    /// On snapshot commits: the snapshot's consistent point.
    SnapshotLsn,
    /// On checkpoint commits of `reset-checkpoint`: what, why and when.
    Reset,
    /// On the checkpoint commit recording a slot this daemon created.
    SlotCreatedAt,
}

impl InfoKey {
    pub const fn as_str(self) -> &'static str {
        match self {
            InfoKey::CommitLsn => "wal2delta.commit_lsn",
            InfoKey::SnapshotLsn => "wal2delta.snapshot_lsn",
            InfoKey::Reset => "wal2delta.reset",
            InfoKey::SlotCreatedAt => "wal2delta.slot_created_at",
        }
    }
}

/// One Delta commit under construction: data actions, application transactions and
/// commit info, written together or not at all.
pub struct Commit {
    operation: DeltaOperation,
    actions: Vec<Action>,
    txns: Vec<Transaction>,
    info: HashMap<String, serde_json::Value>,
}

impl Commit {
    /// An appending write (raw tables).
    pub fn append() -> Commit {
        Commit::new(DeltaOperation::Write {
            mode: deltalake::protocol::SaveMode::Append,
            partition_by: None,
            predicate: None,
        })
    }

    /// A merge (curated tables: files removed and added).
    pub fn merge() -> Commit {
        Commit::new(DeltaOperation::Merge {
            predicate: None,
            merge_predicate: None,
            matched_predicates: vec![],
            not_matched_predicates: vec![],
            not_matched_by_source_predicates: vec![],
        })
    }

    /// A rewrite that changes no rows (purging deleted rows out of files): its actions
    /// carry `dataChange: false`.
    pub fn rewrite() -> Commit {
        Commit::new(DeltaOperation::Optimize {
            predicate: None,
            target_size: 0,
        })
    }

    /// A commit with no data (the checkpoint table's records and markers).
    pub fn record() -> Commit {
        Commit::new(DeltaOperation::Update { predicate: None })
    }

    fn new(operation: DeltaOperation) -> Commit {
        Commit {
            operation,
            actions: Vec::new(),
            txns: Vec::new(),
            info: HashMap::new(),
        }
    }

    /// Adds data or metadata actions.
    pub fn actions(mut self, actions: impl IntoIterator<Item = Action>) -> Commit {
        self.actions.extend(actions);
        self
    }

    /// Records `app_id = version` in this commit.
    pub fn txn(mut self, app_id: &AppId, version: i64) -> Commit {
        self.txns.push(Transaction::new_with_last_update(
            app_id.as_str(),
            version,
            Some(chrono::Utc::now().timestamp_millis()),
        ));
        self
    }

    /// Records the source position `app_id` holds through.
    pub fn position(self, app_id: &AppId, lsn: Lsn) -> Commit {
        self.txn(app_id, lsn.as_i64())
    }

    /// Adds a commit-info entry.
    pub fn info(mut self, key: InfoKey, value: serde_json::Value) -> Commit {
        self.info.insert(key.as_str().to_string(), value);
        self
    }

    /// Adds an LSN-valued commit-info entry (written as `16/B374D848`).
    pub fn info_lsn(self, key: InfoKey, lsn: Lsn) -> Commit {
        self.info(key, serde_json::Value::String(lsn.to_string()))
    }

    /// Adds already-keyed commit-info entries (a serialized checkpoint record).
    pub(super) fn info_entries(
        mut self,
        entries: impl IntoIterator<Item = (String, serde_json::Value)>,
    ) -> Commit {
        self.info.extend(entries);
        self
    }

    /// Writes the commit to `table` (labelled `label` in errors) and moves the table's
    /// state to it. Returns the new Delta version.
    pub async fn write(self, table: &mut DeltaTable, label: &str) -> Result<u64, LakeError> {
        let delta_err = |source| LakeError::Delta {
            table: label.to_string(),
            source,
        };
        // A daemon that may have lost its lease on an object-store lake commits nothing.
        super::lock::fence()?;
        let properties = super::maintenance::no_log_cleanup()
            .with_application_transactions(self.txns)
            .with_metadata(self.info);
        let snapshot = table.snapshot().map_err(delta_err)?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(self.actions)
            .build(Some(snapshot), table.log_store(), self.operation)
            .await
            .map_err(delta_err)?;
        let version = finalized.version();
        table.state = Some(finalized.snapshot());
        super::table::keep_committed(table);
        Ok(version)
    }
}

/// The version a table's log records for `app_id`, if any, as it is (a key, a time).
pub async fn txn_version(
    table: &DeltaTable,
    label: &str,
    app_id: &AppId,
) -> Result<Option<i64>, LakeError> {
    let snapshot = table.snapshot().map_err(|source| LakeError::Delta {
        table: label.to_string(),
        source,
    })?;
    snapshot
        .transaction_version(table.log_store().as_ref(), app_id.as_str())
        .await
        .map_err(|source| LakeError::Delta {
            table: label.to_string(),
            source,
        })
}

/// The source position a table's log records for `app_id`, if any.
pub async fn applied(
    table: &DeltaTable,
    label: &str,
    app_id: &AppId,
) -> Result<Option<Lsn>, LakeError> {
    Ok(txn_version(table, label, app_id).await?.map(Lsn::from_i64))
}
