//! The global replication checkpoint: the source position durable in *every* table.
//!
//! # Design
//! Each table's own commits carry `txn(AppId::raw) = commit LSN of the last
//! source transaction it holds`. That alone cannot tell where to restart: a table nobody
//! wrote to for a week still holds last week's LSN, and restarting from the minimum over
//! tables would re-read a week of WAL (or be impossible once Postgres recycled it).
//!
//! So after every batch has been committed to all the tables it touched, one more commit
//! goes to the small Delta table `<lake>/_wal2delta/checkpoint` with
//! `txn(AppId::checkpoint) = end LSN of the batch's last transaction` and, in its commit
//! info, the Delta version of every table at that point. A batch's transactions are all at
//! or before that LSN, and every table is complete up to it: tables the batch did not touch
//! simply had nothing to add. On restart:
//!
//! 1. streaming restarts at the checkpoint LSN (Postgres moves it forward to the slot's
//!    `confirmed_flush_lsn` if that is later: idle keepalives may advance the slot without
//!    a new checkpoint, which is safe because nothing was pending);
//! 2. a transaction is skipped for a table when its commit LSN ≤ that table's own `txn`
//!    version: those are the tables a crash between step "commit tables" and step "commit
//!    checkpoint" had already updated.
//!
//! The checkpoint table holds no rows: its log is the record. Delta checkpoints (every
//! 100 commits by default) keep reading it cheap. A record is a [`CheckpointRecord`],
//! written into the commit info and read back (by the SQL endpoint, `serve::view`) by
//! the same serde type. Each new record is also published on a watch channel that the
//! pipeline hands to the SQL endpoint in the same process, so new data is visible at once
//! without the lake knowing who listens.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use deltalake::DeltaTable;
use deltalake::arrow::datatypes::{DataType, Field, Schema};
use deltalake::kernel::Action;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::commit::{AppId, Commit, InfoKey, applied};
use super::table::open_or_create;
use super::{Lake, LakeError};
use crate::lsn::Lsn;
use crate::table_name::TableName;

const LABEL: &str = "_wal2delta.checkpoint";

/// One checkpoint record: a source position and every table's Delta version there. The
/// serde field names are the commit-info keys (unchanged since the first release, so
/// older lakes read back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Every table is complete through this source position.
    #[serde(rename = "wal2delta.end_lsn")]
    pub lsn: Lsn,
    /// Commit time of the batch's last source transaction (Unix microseconds); absent on
    /// records that only show a snapshot copy.
    #[serde(
        rename = "wal2delta.commit_ts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub commit_ts: Option<i64>,
    #[serde(rename = "wal2delta.table_versions")]
    pub versions: TableVersions,
}

/// Each table's Delta version, by source table name (`schema.table`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableVersions {
    #[serde(default)]
    pub raw: BTreeMap<String, u64>,
    #[serde(default)]
    pub curated: BTreeMap<String, u64>,
}

impl TableVersions {
    /// The source tables these versions cover (raw and curated), each once.
    pub fn tables(&self) -> Vec<crate::table_name::TableName> {
        let names: std::collections::BTreeSet<&String> =
            self.raw.keys().chain(self.curated.keys()).collect();
        names
            .into_iter()
            .filter_map(|t| crate::table_name::TableName::parse(t).ok())
            .collect()
    }
}

impl CheckpointRecord {
    /// The record a checkpoint commit's info holds; `None` for other commits (markers,
    /// resets) and for info this version cannot read.
    pub fn from_commit_info(info: &HashMap<String, serde_json::Value>) -> Option<CheckpointRecord> {
        let mut fields = serde_json::Map::new();
        for key in [
            "wal2delta.end_lsn",
            "wal2delta.commit_ts",
            "wal2delta.table_versions",
        ] {
            if let Some(value) = info.get(key) {
                fields.insert(key.to_string(), value.clone());
            }
        }
        serde_json::from_value(serde_json::Value::Object(fields)).ok()
    }

    /// The commit-info entries that hold this record.
    fn to_commit_info(&self) -> Vec<(String, serde_json::Value)> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map.into_iter().collect(),
            // A struct of strings, numbers and maps always serializes to an object.
            _ => Vec::new(),
        }
    }

    /// The commit time as text (`2026-11-21 08:00:00.123456+00`), when known.
    pub fn commit_time_text(&self) -> Option<String> {
        self.commit_ts
            .and_then(chrono::DateTime::from_timestamp_micros)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
    }
}

/// Where a checkpoint publishes each record it writes (the SQL endpoint in the same
/// process listens); the pipeline makes the channel.
pub type RecordSender = watch::Sender<Option<CheckpointRecord>>;

/// The global checkpoint table.
pub struct Checkpoint {
    table: DeltaTable,
    slot: String,
    app_id: AppId,
    position: Option<Lsn>,
    /// The Delta version of the newest record this process wrote.
    record_version: Option<u64>,
    slot_created_at: Option<Lsn>,
    publication_created: bool,
    published: Option<RecordSender>,
}

impl Checkpoint {
    pub async fn open(lake: &Lake, slot: &str) -> Result<Checkpoint, LakeError> {
        let schema = Arc::new(Schema::new(vec![Field::new("lsn", DataType::Int64, true)]));
        let table = open_or_create(&lake.checkpoint_url(), LABEL, &schema, &[]).await?;
        let app_id = AppId::checkpoint(slot);
        let position = applied(&table, LABEL, &app_id).await?;
        let slot_created_at = applied(&table, LABEL, &AppId::slot_created(slot)).await?;
        let created = applied(&table, LABEL, &AppId::publication(slot, true)).await?;
        let dropped = applied(&table, LABEL, &AppId::publication(slot, false)).await?;
        Ok(Checkpoint {
            table,
            slot: slot.to_string(),
            app_id,
            position,
            record_version: None,
            slot_created_at,
            publication_created: created > dropped,
            published: None,
        })
    }

    /// Publishes every record written from now on to `sender`.
    pub fn publish_to(&mut self, sender: RecordSender) {
        self.published = Some(sender);
    }

    /// The LSN durable in every table, if any batch was ever committed.
    pub fn position(&self) -> Option<Lsn> {
        self.position
    }

    /// Whether this daemon created the publication (then `teardown` may drop it).
    pub fn publication_created(&self) -> bool {
        self.publication_created
    }

    /// Records that the daemon created the publication (`true`) or that `teardown`
    /// dropped it (`false`).
    pub async fn record_publication(&mut self, created: bool) -> Result<(), LakeError> {
        let now = chrono::Utc::now().timestamp_micros();
        Commit::record()
            .txn(&AppId::publication(&self.slot, created), now)
            .write(&mut self.table, LABEL)
            .await?;
        self.publication_created = created;
        Ok(())
    }

    /// When an operator asked for `table` to be copied again (`reset-checkpoint
    /// --resnapshot`): the WAL position at that moment.
    pub async fn resnapshot_requested(&self, table: &TableName) -> Result<Option<Lsn>, LakeError> {
        applied(&self.table, LABEL, &AppId::resnapshot(&self.slot, table)).await
    }

    /// Records an operator's reset in one commit: a new position (`--to-lsn`), tables to
    /// copy again, and `wal2delta.reset` (what and why) in the commit info.
    pub async fn record_reset(
        &mut self,
        position: Option<Lsn>,
        resnapshot: &[(TableName, Lsn)],
        record: serde_json::Value,
    ) -> Result<(), LakeError> {
        let mut commit = Commit::record();
        if let Some(lsn) = position {
            commit = commit.position(&self.app_id, lsn);
        }
        for (table, lsn) in resnapshot {
            commit = commit.position(&AppId::resnapshot(&self.slot, table), *lsn);
        }
        commit
            .txn(
                &AppId::resets(&self.slot),
                chrono::Utc::now().timestamp_millis(),
            )
            .info(InfoKey::Reset, record)
            .write(&mut self.table, LABEL)
            .await?;
        if position.is_some() {
            self.position = position;
        }
        Ok(())
    }

    /// The tables the latest checkpoint covered (`None` when no checkpoint says). Reads
    /// the table's recent history: call it when deciding snapshots, not per session.
    pub async fn tracked_tables(&self) -> Option<HashSet<String>> {
        self.position?;
        use futures::StreamExt;
        let mut history = self.table.history(Some(50));
        while let Some(Ok(commit)) = history.next().await {
            if let Some(record) = CheckpointRecord::from_commit_info(&commit.info) {
                return Some(record.versions.raw.into_keys().collect());
            }
        }
        None
    }

    /// The consistent point of the slot when this daemon created it, if it did.
    pub fn slot_created_at(&self) -> Option<Lsn> {
        self.slot_created_at
    }

    /// Records the consistent point of a slot this daemon just created. Snapshots taken
    /// before it belong to an older slot of the same name and are redone.
    pub async fn record_slot_created(&mut self, lsn: Lsn) -> Result<(), LakeError> {
        Commit::record()
            .position(&AppId::slot_created(&self.slot), lsn)
            .info_lsn(InfoKey::SlotCreatedAt, lsn)
            .write(&mut self.table, LABEL)
            .await?;
        self.slot_created_at = Some(lsn);
        Ok(())
    }

    /// Records new table versions after a snapshot copy without moving the replication
    /// position: readers (the SQL endpoint) see the copy now. `shown` is the source
    /// position the copy stands for.
    pub async fn record_versions(
        &mut self,
        shown: Lsn,
        versions: TableVersions,
    ) -> Result<(), LakeError> {
        let record = CheckpointRecord {
            lsn: shown.max(self.position.unwrap_or(Lsn::ZERO)),
            commit_ts: None,
            versions,
        };
        let version = Commit::record()
            .info_entries(record.to_commit_info())
            .write(&mut self.table, LABEL)
            .await?;
        self.record_version = Some(version);
        self.publish(record);
        Ok(())
    }

    /// Records that every table is durable through `record.lsn` (the end LSN of the
    /// batch's last transaction), with every table's Delta version at this point and the
    /// commit time of that transaction: the SQL endpoint reads these records to serve
    /// every table at one source position.
    pub async fn record(&mut self, record: CheckpointRecord) -> Result<(), LakeError> {
        let version = Commit::record()
            .position(&self.app_id, record.lsn)
            .info_entries(record.to_commit_info())
            .write(&mut self.table, LABEL)
            .await?;
        self.record_version = Some(version);
        self.position = Some(record.lsn);
        self.publish(record);
        Ok(())
    }

    /// Deletes this table's log entries older than `retention` (never the newest record
    /// this process wrote, nor anything it needs), then returns the oldest record still
    /// in the log: readers can still pick it (`SET wal2delta.as_of`), so every table must
    /// keep its version there loadable. `None` when the log holds no record.
    pub async fn clean_log(
        &self,
        retention: std::time::Duration,
    ) -> Result<(usize, Option<CheckpointRecord>), LakeError> {
        let removed = match self.record_version {
            Some(keep_from) => {
                super::maintenance::clean_log(&self.table, LABEL, Some(keep_from), retention)
                    .await?
            }
            None => 0,
        };
        Ok((removed, self.oldest_record().await?))
    }

    /// The oldest record in the log (reads commits from the oldest on; a record is
    /// almost always the first or second commit kept).
    async fn oldest_record(&self) -> Result<Option<CheckpointRecord>, LakeError> {
        use futures::TryStreamExt;
        let delta_err = |source| LakeError::Delta {
            table: LABEL.to_string(),
            source,
        };
        let store = self.table.log_store();
        let listed: Vec<deltalake::ObjectMeta> = store
            .object_store(None)
            .list(Some(store.log_path()))
            .try_collect()
            .await
            .map_err(|e| delta_err(e.into()))?;
        let mut versions: Vec<u64> = listed
            .iter()
            .filter_map(|m| m.location.filename())
            .filter_map(|name| name.strip_suffix(".json"))
            .filter(|stem| stem.len() == 20)
            .filter_map(|stem| stem.parse().ok())
            .collect();
        versions.sort_unstable();
        for version in versions.into_iter().take(1000) {
            let Some(bytes) = store
                .read_commit_entry(version as _)
                .await
                .map_err(delta_err)?
            else {
                continue;
            };
            // As delta-rs reads a commit's info for `history()`.
            let actions = serde_json::Deserializer::from_slice(&bytes).into_iter::<Action>();
            for action in actions.flatten() {
                if let Action::CommitInfo(commit) = action
                    && let Some(record) = CheckpointRecord::from_commit_info(&commit.info)
                {
                    return Ok(Some(record));
                }
            }
        }
        Ok(None)
    }

    fn publish(&self, record: CheckpointRecord) {
        if let Some(sender) = &self.published {
            sender.send_replace(Some(record));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_commit_info() {
        let record = CheckpointRecord {
            lsn: "16/B374D848".parse().unwrap(),
            commit_ts: Some(1_764_000_000_000_000),
            versions: TableVersions {
                raw: BTreeMap::from([("public.a".into(), 3)]),
                curated: BTreeMap::from([("public.a".into(), 4)]),
            },
        };
        let info: HashMap<String, serde_json::Value> =
            record.to_commit_info().into_iter().collect();
        // The keys older lakes hold.
        assert_eq!(info["wal2delta.end_lsn"], "16/B374D848");
        assert_eq!(info["wal2delta.table_versions"]["raw"]["public.a"], 3);
        assert_eq!(CheckpointRecord::from_commit_info(&info), Some(record));
        assert_eq!(CheckpointRecord::from_commit_info(&HashMap::new()), None);
    }
}
