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

const LABEL: &str = "_wal2delta.checkpoint";

/// The global checkpoint table.
pub struct Checkpoint {
    table: DeltaTable,
    app_id: String,
    position: Option<Lsn>,
}

impl Checkpoint {
    pub async fn open(lake: &Lake, slot: &str) -> Result<Checkpoint, LakeError> {
        let schema = Arc::new(Schema::new(vec![Field::new("lsn", DataType::Int64, true)]));
        let table = open_or_create(&lake.checkpoint_url(), LABEL, &schema).await?;
        let app_id = format!("wal2delta:{slot}");
        let position =
            applied_position(&table, &app_id)
                .await
                .map_err(|source| LakeError::Delta {
                    table: LABEL.into(),
                    source,
                })?;
        Ok(Checkpoint {
            table,
            app_id,
            position,
        })
    }

    /// The LSN durable in every table, if any batch was ever committed.
    pub fn position(&self) -> Option<Lsn> {
        self.position
    }

    /// Records that every table is durable through `end_lsn`; `versions` maps each table
    /// to its Delta version at this point (for consistent reads).
    pub async fn record(
        &mut self,
        end_lsn: Lsn,
        versions: &HashMap<String, u64>,
    ) -> Result<(), LakeError> {
        let delta_err = |source| LakeError::Delta {
            table: LABEL.into(),
            source,
        };
        let properties = CommitProperties::default()
            .with_application_transaction(Transaction::new_with_last_update(
                &self.app_id,
                end_lsn.as_i64(),
                Some(chrono::Utc::now().timestamp_millis()),
            ))
            .with_metadata([
                (
                    "wal2delta.end_lsn".to_string(),
                    serde_json::json!(end_lsn.to_string()),
                ),
                (
                    "wal2delta.table_versions".to_string(),
                    serde_json::json!(versions),
                ),
            ]);
        let snapshot = self.table.snapshot().map_err(delta_err)?;
        let finalized = CommitBuilder::from(properties)
            .with_actions(vec![])
            .build(
                Some(snapshot),
                self.table.log_store(),
                DeltaOperation::Update { predicate: None },
            )
            .await
            .map_err(|e| delta_err(e.into()))?;
        self.table.state = Some(finalized.snapshot());
        self.position = Some(end_lsn);
        Ok(())
    }
}
