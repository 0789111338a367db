//! The global replication checkpoint: the source position durable in *every* table.
//!
//! # Design
//! Each table's own commits carry `txn(wal2delta:<slot>:<table>) = commit LSN of the last
//! source transaction it holds`. That alone cannot tell where to restart: a table nobody
//! wrote to for a week still holds last week's LSN, and restarting from the minimum over
//! tables would re-read a week of WAL (or be impossible once Postgres recycled it).
//!
//! So after every batch has been committed to all the tables it touched, one more commit
//! goes to the small Delta table `<lake>/_wal2delta/checkpoint` with
//! `txn(wal2delta:<slot>) = end LSN of the batch's last transaction` and, in its commit
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
//! 100 commits by default) keep reading it cheap.

use std::collections::HashMap;

use deltalake::DeltaTable;
use deltalake::arrow::datatypes::{DataType, Field, Schema};
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::protocol::DeltaOperation;
use std::sync::Arc;

use super::table::{applied_position, open_or_create};
use super::{Lake, LakeError};
use crate::lsn::Lsn;
use crate::table_name::TableName;

const LABEL: &str = "_wal2delta.checkpoint";

/// The global checkpoint table.
pub struct Checkpoint {
    table: DeltaTable,
    app_id: String,
    position: Option<Lsn>,
    created_app_id: String,
    slot_created_at: Option<Lsn>,
    publication_created: bool,
}

fn resnapshot_app_id(base: &str, table: &TableName) -> String {
    format!("{base}:resnapshot:{table}")
}

impl Checkpoint {
    pub async fn open(lake: &Lake, slot: &str) -> Result<Checkpoint, LakeError> {
        let schema = Arc::new(Schema::new(vec![Field::new("lsn", DataType::Int64, true)]));
        let table = open_or_create(&lake.checkpoint_url(), LABEL, &schema).await?;
        let app_id = format!("wal2delta:{slot}");
        let created_app_id = format!("wal2delta:{slot}:slot-created");
        let delta_err = |source| LakeError::Delta {
            table: LABEL.into(),
            source,
        };
        let position = applied_position(&table, &app_id).await.map_err(delta_err)?;
        let slot_created_at = applied_position(&table, &created_app_id)
            .await
            .map_err(delta_err)?;
        let created = applied_position(&table, &format!("{app_id}:publication-created"))
            .await
            .map_err(delta_err)?;
        let dropped = applied_position(&table, &format!("{app_id}:publication-dropped"))
            .await
            .map_err(delta_err)?;
        let publication_created = created > dropped;
        Ok(Checkpoint {
            table,
            app_id,
            position,
            created_app_id,
            slot_created_at,
            publication_created,
        })
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
    /// dropped it (`false`). Two markers holding times, as `txn` versions only grow.
    pub async fn record_publication(&mut self, created: bool) -> Result<(), LakeError> {
        let marker = if created {
            "publication-created"
        } else {
            "publication-dropped"
        };
        self.commit(
            vec![self.txn(
                &format!("{}:{marker}", self.app_id),
                chrono::Utc::now().timestamp_micros(),
            )],
            HashMap::new(),
        )
        .await?;
        self.publication_created = created;
        Ok(())
    }

    /// When an operator asked for `table` to be copied again (`reset-checkpoint
    /// --resnapshot`): the WAL position at that moment.
    pub async fn resnapshot_requested(&self, table: &TableName) -> Result<Option<Lsn>, LakeError> {
        applied_position(&self.table, &resnapshot_app_id(&self.app_id, table))
            .await
            .map_err(|source| LakeError::Delta {
                table: LABEL.into(),
                source,
            })
    }

    /// Records an operator's reset in one commit: a new position (`--to-lsn`), tables to
    /// copy again, and `wal2delta.reset` (what and why) in the commit info.
    pub async fn record_reset(
        &mut self,
        position: Option<Lsn>,
        resnapshot: &[(TableName, Lsn)],
        record: serde_json::Value,
    ) -> Result<(), LakeError> {
        let mut txns = Vec::new();
        if let Some(lsn) = position {
            txns.push(self.txn(&self.app_id, lsn.as_i64()));
        }
        for (table, lsn) in resnapshot {
            txns.push(self.txn(&resnapshot_app_id(&self.app_id, table), lsn.as_i64()));
        }
        txns.push(self.txn(
            &format!("{}:resets", self.app_id),
            chrono::Utc::now().timestamp_millis(),
        ));
        self.commit(
            txns,
            HashMap::from([("wal2delta.reset".to_string(), record)]),
        )
        .await?;
        if position.is_some() {
            self.position = position;
        }
        Ok(())
    }

    fn txn(&self, app_id: &str, version: i64) -> Transaction {
        Transaction::new_with_last_update(
            app_id,
            version,
            Some(chrono::Utc::now().timestamp_millis()),
        )
    }

    /// The tables the latest checkpoint covered (`None` when no checkpoint says). Reads
    /// the table's recent history: call it when deciding snapshots, not per session.
    pub async fn tracked_tables(&self) -> Option<std::collections::HashSet<String>> {
        if self.position.is_none() {
            return None;
        }
        tracked_tables(&self.table).await
    }

    /// The consistent point of the slot when this daemon created it, if it did.
    pub fn slot_created_at(&self) -> Option<Lsn> {
        self.slot_created_at
    }

    /// Records the consistent point of a slot this daemon just created. Snapshots taken
    /// before it belong to an older slot of the same name and are redone.
    pub async fn record_slot_created(&mut self, lsn: Lsn) -> Result<(), LakeError> {
        self.commit(
            vec![self.txn(&self.created_app_id, lsn.as_i64())],
            HashMap::from([(
                "wal2delta.slot_created_at".to_string(),
                serde_json::json!(lsn.to_string()),
            )]),
        )
        .await?;
        self.slot_created_at = Some(lsn);
        Ok(())
    }

    async fn commit(
        &mut self,
        txns: Vec<Transaction>,
        metadata: HashMap<String, serde_json::Value>,
    ) -> Result<(), LakeError> {
        let delta_err = |source| LakeError::Delta {
            table: LABEL.into(),
            source,
        };
        let properties = CommitProperties::default()
            .with_application_transactions(txns)
            .with_metadata(metadata);
        let snapshot = self.table.snapshot().map_err(delta_err)?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(vec![])
            .build(
                Some(snapshot),
                self.table.log_store(),
                DeltaOperation::Update { predicate: None },
            )
            .await
            .map_err(delta_err)?;
        self.table.state = Some(finalized.snapshot());
        Ok(())
    }

    /// Records new table versions after a snapshot copy without moving the replication
    /// position: readers (the SQL endpoint) see the copy now. `shown` is the source
    /// position the copy stands for.
    pub async fn record_versions(
        &mut self,
        shown: Lsn,
        versions: &serde_json::Value,
    ) -> Result<(), LakeError> {
        self.commit(
            vec![],
            HashMap::from([
                (
                    "wal2delta.end_lsn".to_string(),
                    serde_json::json!(shown.max(self.position.unwrap_or(Lsn::ZERO)).to_string()),
                ),
                ("wal2delta.table_versions".to_string(), versions.clone()),
            ]),
        )
        .await?;
        crate::serve::lake_advanced();
        Ok(())
    }

    /// Records that every table is durable through `end_lsn`; `versions` gives each
    /// table's Delta version at this point and `commit_ts` (Unix microseconds) the commit
    /// time of the batch's last source transaction: the SQL endpoint reads these records
    /// to serve every table at one source position.
    pub async fn record(
        &mut self,
        end_lsn: Lsn,
        commit_ts: Option<i64>,
        versions: &serde_json::Value,
    ) -> Result<(), LakeError> {
        let txn = Transaction::new_with_last_update(
            &self.app_id,
            end_lsn.as_i64(),
            Some(chrono::Utc::now().timestamp_millis()),
        );
        self.commit(
            vec![txn],
            HashMap::from([
                (
                    "wal2delta.end_lsn".to_string(),
                    serde_json::json!(end_lsn.to_string()),
                ),
                ("wal2delta.table_versions".to_string(), versions.clone()),
                (
                    "wal2delta.commit_ts".to_string(),
                    serde_json::json!(commit_ts),
                ),
            ]),
        )
        .await?;
        self.position = Some(end_lsn);
        crate::serve::lake_advanced();
        Ok(())
    }
}

/// The raw tables named in the most recent checkpoint commit that lists table versions.
async fn tracked_tables(table: &DeltaTable) -> Option<std::collections::HashSet<String>> {
    use futures::StreamExt;
    let mut history = table.history(Some(50));
    while let Some(Ok(commit)) = history.next().await {
        if let Some(versions) = commit.info.get("wal2delta.table_versions") {
            return versions
                .get("raw")
                .and_then(|raw| raw.as_object())
                .map(|raw| raw.keys().cloned().collect());
        }
    }
    None
}
