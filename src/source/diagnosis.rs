//! Why the source refuses to stream, and what the operator does about it.
//!
//! A server error on the replication connection says little by itself: `42704`
//! undefined_object may name the slot or the publication, `55000` may be an invalidated
//! slot. Rather than reading the (translatable) message text, [`diagnose`] asks the
//! catalog which object is gone or unusable and returns a [`SourceUnusable`] whose message
//! names the fix.

use std::path::Path;

use super::catalog::{self, SlotInfo};
use super::config::SourceSettings;
use super::replication::ServerError;
use super::sqlstate;
use crate::lsn::Lsn;

/// The slot or publication cannot be used: the daemon stops with the fix.
#[derive(Debug, thiserror::Error)]
pub enum SourceUnusable {
    #[error(
        "replication slot {slot} does not exist and source.create_slot is false; create it with \
         SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); or set create_slot = true"
    )]
    SlotMissing { slot: String },
    #[error("the replication slot {slot} is gone or unusable: {detail}; {action}")]
    SlotLost {
        slot: String,
        detail: String,
        action: String,
    },
    #[error(
        "the publication {publication} is gone or unusable: {detail}; Postgres cannot decode \
         changes made before a new publication existed, so recreate the publication \
         (wal2delta does so on start when source.create_publication is true) and drop the slot \
         (SELECT pg_drop_replication_slot('{slot}');) so a new one is created, accepting that \
         the lake misses the changes in between"
    )]
    PublicationLost {
        publication: String,
        slot: String,
        detail: String,
    },
    #[error(
        "permission denied: {detail}; grant the role REPLICATION and SELECT on the tables \
         (see sql/setup.sql), then start again"
    )]
    PermissionDenied { detail: String },
    #[error(
        "table {table} can no longer be followed exactly: {gap}; its changes since then are \
         not in the stream. wal2delta stopped rather than miss them silently. Publish the \
         whole table again (ALTER PUBLICATION {publication} ADD TABLE {quoted}; after \
         dropping a row filter or column list with ALTER PUBLICATION {publication} DROP \
         TABLE {quoted};), then run `wal2delta reset-checkpoint --config {config} \
         --resnapshot --table {table} --yes` and start wal2delta: the table is copied afresh"
    )]
    PublicationChanged {
        table: String,
        quoted: String,
        publication: String,
        gap: String,
        config: String,
    },
}

/// What to do about a lost slot, naming the command with this configuration file.
pub fn slot_lost_action(config_path: Option<&Path>) -> String {
    format!(
        "the changes Postgres no longer keeps for it cannot be recovered from this slot; run \
         `wal2delta reset-checkpoint --config {} --recreate-slot --yes`, then start wal2delta \
         again: it copies every table afresh (the raw tables miss the individual changes in \
         between)",
        config_path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<config file>".into())
    )
}

/// Where streaming can start from the slot as the catalog shows it: its confirmed
/// position, or why it cannot be used (gone, or invalidated).
pub fn usable_slot(
    source: &SourceSettings,
    slot: Option<SlotInfo>,
    config_path: Option<&Path>,
) -> Result<Lsn, SourceUnusable> {
    let lost = |detail: &str| SourceUnusable::SlotLost {
        slot: source.slot.clone(),
        detail: detail.to_string(),
        action: slot_lost_action(config_path),
    };
    match slot {
        None => Err(lost("it no longer exists")),
        Some(s) if s.is_lost() => Err(lost(
            "it was invalidated (wal_status = lost): the WAL it needed was removed",
        )),
        Some(s) => Ok(s.confirmed_flush.unwrap_or(Lsn::ZERO)),
    }
}

/// Checks that the publication still carries every configured table whole; the first
/// that it does not, as an error naming the fix. `Ok(None)` also when the publication is
/// missing (the stream itself reports that, with its own fix).
pub async fn publication_guard(
    source: &SourceSettings,
    config_path: Option<&Path>,
) -> Result<Option<SourceUnusable>, super::catalog::CatalogError> {
    let client = catalog::connect(&source.conn).await?;
    let Some(published) = catalog::publication_state(&client, &source.publication).await? else {
        return Ok(None);
    };
    for table in &source.tables {
        if let Some(gap) = catalog::publication_gap(&source.publication, &published, table) {
            return Ok(Some(SourceUnusable::PublicationChanged {
                table: table.to_string(),
                quoted: table.quoted(),
                publication: crate::table_name::quote_ident(&source.publication),
                gap,
                config: config_path
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "<config file>".into()),
            }));
        }
    }
    Ok(None)
}

/// Names the object behind a definite server error on the replication connection, by
/// looking the slot and the publication up. `None` when the error is about neither (or
/// the catalog cannot be read): the server's own error then stands.
pub async fn diagnose(
    source: &SourceSettings,
    error: &ServerError,
    config_path: Option<&Path>,
) -> Option<SourceUnusable> {
    if error.code == sqlstate::INSUFFICIENT_PRIVILEGE {
        return Some(SourceUnusable::PermissionDenied {
            detail: error.to_string(),
        });
    }
    if error.code != sqlstate::UNDEFINED_OBJECT
        && error.code != sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE
    {
        return None;
    }
    let client = catalog::connect(&source.conn).await.ok()?;
    let slot = catalog::slot_info(&client, &source.slot).await.ok()?;
    if slot.as_ref().is_none_or(SlotInfo::is_lost) {
        return Some(SourceUnusable::SlotLost {
            slot: source.slot.clone(),
            detail: error.to_string(),
            action: slot_lost_action(config_path),
        });
    }
    // The slot is fine, so an undefined object is the publication: missing now, or
    // dropped and created again (the slot's historic snapshot still misses it).
    let published = catalog::publication_tables(&client, &source.publication)
        .await
        .ok()?;
    (error.code == sqlstate::UNDEFINED_OBJECT || published.is_none()).then(|| {
        SourceUnusable::PublicationLost {
            publication: source.publication.clone(),
            slot: source.slot.clone(),
            detail: error.to_string(),
        }
    })
}
