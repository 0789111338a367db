//! Why the source refuses to stream, and what the operator does about it.
//!
//! A server error on the replication connection says little by itself: `42704`
//! undefined_object may name the slot or the publication, `55000` may be an invalidated
//! slot. Rather than reading the (translatable) message text, [`diagnose`] asks the
//! catalog which object is gone or unusable and returns a [`SourceUnusable`] whose message
//! names the fix.

use std::path::Path;

use tokio_postgres::Client;

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
         table again (ALTER PUBLICATION {publication} ADD TABLE {quoted};), then run \
         `wal2delta reset-checkpoint --config {config} --resnapshot --table {table} --yes` \
         and start wal2delta: the table is copied afresh"
    )]
    PublicationChanged {
        table: String,
        quoted: String,
        publication: String,
        gap: String,
        config: String,
    },
    #[error(
        "the replica identity of {table} changed from ({was}) to ({now}): its updates and \
         deletes now name rows by columns the curated table is not keyed by, so they could \
         not be applied exactly. wal2delta stopped before applying one (nothing past them \
         is confirmed). Restore it (ALTER TABLE {quoted} REPLICA IDENTITY …) and start \
         wal2delta again; to key the lake by the new columns, move the table's lake tables \
         away and let wal2delta copy it afresh"
    )]
    KeyChanged {
        table: String,
        quoted: String,
        was: String,
        now: String,
    },
}

impl SourceUnusable {
    /// Which divergence the guard found, for the metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SourceUnusable::PublicationChanged { .. } => "publication_changed",
            SourceUnusable::KeyChanged { .. } => "replica_identity_changed",
            SourceUnusable::PublicationLost { .. } => "publication_lost",
            SourceUnusable::SlotLost { .. } | SourceUnusable::SlotMissing { .. } => "slot_lost",
            SourceUnusable::PermissionDenied { .. } => "permission_denied",
        }
    }

    /// The table concerned, when one is.
    pub fn table(&self) -> Option<&str> {
        match self {
            SourceUnusable::PublicationChanged { table, .. }
            | SourceUnusable::KeyChanged { table, .. } => Some(table),
            _ => None,
        }
    }
}

/// What the guard remembers of a configured table: the columns its changes name rows by,
/// and for a partitioned table its partitions (name → relfilenode, which `TRUNCATE`
/// changes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableShape {
    pub key: Vec<String>,
    #[serde(default)]
    pub partitions: std::collections::BTreeMap<String, i64>,
    /// The fingerprint of the part the publication publishes (row filter, column list;
    /// `None`: all of it).
    #[serde(default)]
    pub part: Option<String>,
}

/// The part of each table (by `schema.table`) the lake's copy holds, as
/// [`crate::source::catalog::PublishedPart::fingerprint`]: filled once the start's copies
/// are done, and compared by the publication guard with what the publication publishes.
pub type CopiedParts =
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, Option<String>>>>;

/// How a partitioned table's partitions changed without their rows passing through the
/// stream (`ATTACH`/`DETACH PARTITION`, `TRUNCATE` of one partition, which Postgres does
/// not publish through the root): the table must be copied again.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartitionsChanged {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    pub truncated: Vec<String>,
}

impl PartitionsChanged {
    pub fn is_empty(&self) -> bool {
        self.attached.is_empty() && self.detached.is_empty() && self.truncated.is_empty()
    }

    /// `attached`, `detached` or `truncated`: the first that applies, for the metrics.
    pub fn reason(&self) -> &'static str {
        if !self.attached.is_empty() {
            "partition_attached"
        } else if !self.detached.is_empty() {
            "partition_detached"
        } else {
            "partition_truncated"
        }
    }

    fn between(was: &TableShape, now: &TableShape) -> PartitionsChanged {
        let mut changed = PartitionsChanged::default();
        for (name, node) in &now.partitions {
            match was.partitions.get(name) {
                None => changed.attached.push(name.clone()),
                Some(old) if old != node => changed.truncated.push(name.clone()),
                Some(_) => {}
            }
        }
        for name in was.partitions.keys() {
            if !now.partitions.contains_key(name) {
                changed.detached.push(name.clone());
            }
        }
        changed
    }
}

impl std::fmt::Display for PartitionsChanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (what, names) in [
            ("attached", &self.attached),
            ("detached", &self.detached),
            ("truncated (or rewritten)", &self.truncated),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what}: {}", names.join(", ")));
            }
        }
        write!(f, "{}", parts.join("; "))
    }
}

/// The shape of every configured table that exists now.
pub async fn table_shapes(
    client: &Client,
    source: &SourceSettings,
) -> Result<std::collections::BTreeMap<String, TableShape>, super::catalog::CatalogError> {
    let mut shapes = std::collections::BTreeMap::new();
    for table in &source.tables {
        let Some(info) = catalog::table_info(client, table, &source.publication).await? else {
            continue; // dropped: the publication guard reports it
        };
        let mut partitions = std::collections::BTreeMap::new();
        if info.partitioned {
            let rows = client
                .query(
                    "SELECT format('%I.%I', n.nspname, c.relname), c.relfilenode::bigint \
                     FROM pg_partition_tree($1::text::regclass) AS t \
                     JOIN pg_class c ON c.oid = t.relid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE t.isleaf AND c.relkind = 'r'",
                    &[&table.quoted()],
                )
                .await?;
            for row in rows {
                partitions.insert(row.get(0), row.get(1));
            }
        }
        // A whole-row key (REPLICA IDENTITY FULL, no primary key) grows with the columns:
        // that is not a change of key.
        let whole_row = info.replica_identity == crate::change::ReplicaIdentity::Full
            && info.key_columns.len() == info.columns.len();
        let key = if whole_row {
            vec!["(the whole row)".to_string()]
        } else {
            info.key_columns
        };
        let part = info.published.fingerprint();
        shapes.insert(
            table.to_string(),
            TableShape {
                key,
                partitions,
                part,
            },
        );
    }
    Ok(shapes)
}

/// Leaves out of `changed.attached` the partitions that hold no rows: a partition created
/// empty (`CREATE TABLE … PARTITION OF`, partitions made ahead of time) brings nothing the
/// stream did not carry, and needs no copy. A partition it cannot look at stays in (copying
/// is the safe side).
pub async fn drop_empty_attached(client: &Client, changed: &mut PartitionsChanged) {
    let mut kept = Vec::new();
    for name in changed.attached.drain(..) {
        // `name` is the catalog's own quoted `schema.table`.
        let holds_rows = client
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM ONLY {name})"), &[])
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(true);
        if holds_rows {
            kept.push(name);
        }
    }
    changed.attached = kept;
}

/// Compares a table's shape with the one remembered: a changed key stops the daemon
/// (`Err`), changed partitions are for a resync (`Ok`).
pub fn shape_change(
    table: &crate::table_name::TableName,
    was: &TableShape,
    now: &TableShape,
) -> Result<PartitionsChanged, SourceUnusable> {
    if was.key != now.key {
        return Err(SourceUnusable::KeyChanged {
            table: table.to_string(),
            quoted: table.quoted(),
            was: was.key.join(", "),
            now: now.key.join(", "),
        });
    }
    Ok(PartitionsChanged::between(was, now))
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
    client: &Client,
    source: &SourceSettings,
    config_path: Option<&Path>,
) -> Result<Option<SourceUnusable>, super::catalog::CatalogError> {
    let Some(published) = catalog::publication_state(client, &source.publication).await? else {
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
