//! Operator commands that change replication state: `reset-checkpoint` and `teardown`.
//!
//! Each takes the lake lock first, so it refuses while a daemon runs on the lake and no
//! daemon can start while it works. Each prints its plan and acts only with `--yes`, and
//! every reset is recorded durably: a commit to the checkpoint table whose commit info
//! holds `wal2delta.reset` (what, why, when), plus a log line.
//!
//! - `--to-lsn LSN` moves the replication position forward: the slot is advanced and the
//!   checkpoint records LSN, so the changes in between never reach the lake (a data gap).
//! - `--resnapshot [--table T]…` asks the next start to copy those tables again from a
//!   fresh snapshot: the curated tables are rebuilt, the raw tables keep their history and
//!   get the snapshot's `r` rows.
//! - `--recreate-slot` drops the slot (if it still exists) and creates it again; the next
//!   start copies every table afresh (with `source.snapshot = "initial"`).

use tokio_postgres::Client;

use crate::config::Settings;
use crate::lake::checkpoint::Checkpoint;
use crate::lake::lock::LakeLock;
use crate::lake::{Lake, LakeError};
use crate::lsn::Lsn;
use crate::source::catalog::{self, CatalogError, SlotInfo};
use crate::source::config::SnapshotMode;
use crate::source::config::SourceSettings;
use crate::table_name::{TableName, quote_ident};

/// What `reset-checkpoint` should do.
#[derive(Debug, Clone)]
pub enum Reset {
    ToLsn(Lsn),
    Resnapshot(Vec<TableName>),
    RecreateSlot,
}

/// An operator command failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    Refused(String),
}

fn sql_err(what: &str) -> impl Fn(tokio_postgres::Error) -> OpsError + '_ {
    move |e| OpsError::Refused(format!("{what}: {}", catalog::describe(&e)))
}

/// Runs `reset-checkpoint`. Returns what was (or, without `yes`, would be) done.
pub async fn reset_checkpoint(
    settings: &Settings,
    reset: Reset,
    yes: bool,
) -> Result<String, OpsError> {
    let lake = Lake::open(&settings.lake)?;
    let lock = LakeLock::acquire(&lake).await?;
    let result = reset_locked(settings, &lake, reset, yes).await;
    lock.release().await;
    result
}

async fn reset_locked(
    settings: &Settings,
    lake: &Lake,
    reset: Reset,
    yes: bool,
) -> Result<String, OpsError> {
    let source = &settings.source;
    // No table named: all of them.
    let reset = match reset {
        Reset::Resnapshot(tables) if tables.is_empty() => Reset::Resnapshot(source.tables.clone()),
        other => other,
    };
    let client = catalog::connect(&source.conn).await?;
    let slot = catalog::slot_info(&client, &source.slot).await?;
    let mut checkpoint = Checkpoint::open(lake, &source.slot).await?;
    let plan = match &reset {
        Reset::ToLsn(lsn) => plan_to_lsn(source, *lsn, slot.as_ref(), &checkpoint)?,
        Reset::Resnapshot(tables) => plan_resnapshot(source, tables)?,
        Reset::RecreateSlot => plan_recreate_slot(source, slot.as_ref()),
    };
    if !yes {
        return Ok(format!(
            "would {plan}.\nNothing was changed; run again with --yes to do it."
        ));
    }
    let record = serde_json::json!({
        "action": match &reset {
            Reset::ToLsn(_) => "to-lsn",
            Reset::Resnapshot(_) => "resnapshot",
            Reset::RecreateSlot => "recreate-slot",
        },
        "plan": plan,
        "at": chrono::Utc::now().to_rfc3339(),
    });
    carry_out(
        source,
        reset,
        &client,
        slot.is_some(),
        &mut checkpoint,
        record.clone(),
    )
    .await?;
    tracing::warn!(reset = %record, "replication checkpoint reset");
    Ok(format!("done: {plan}."))
}

/// `--to-lsn`: refused unless it moves forward from where the slot and lake are.
fn plan_to_lsn(
    source: &SourceSettings,
    lsn: Lsn,
    slot: Option<&SlotInfo>,
    checkpoint: &Checkpoint,
) -> Result<String, OpsError> {
    let Some(slot) = slot else {
        return Err(OpsError::Refused(format!(
            "replication slot {} does not exist; use --recreate-slot",
            source.slot
        )));
    };
    let from = slot
        .confirmed_flush
        .unwrap_or(Lsn::ZERO)
        .max(checkpoint.position().unwrap_or(Lsn::ZERO));
    if lsn <= from {
        return Err(OpsError::Refused(format!(
            "{lsn} is not after the current position {from}: --to-lsn only moves forward"
        )));
    }
    Ok(format!(
        "move the replication position of slot {} from {from} to {lsn}. Every change \
         committed in between is skipped and never reaches the lake: a data gap \
         (use --resnapshot afterwards to make the curated tables exact again)",
        source.slot
    ))
}

/// `--resnapshot`: refused for a table that is not configured.
fn plan_resnapshot(source: &SourceSettings, tables: &[TableName]) -> Result<String, OpsError> {
    let list = |tables: &[TableName]| {
        tables
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(t) = tables.iter().find(|t| !source.tables.contains(t)) {
        return Err(OpsError::Refused(format!(
            "table {t} is not in source.tables; list one of: {}",
            list(&source.tables)
        )));
    }
    Ok(format!(
        "copy {} again from a fresh snapshot at the next start: the curated table{} \
         rebuilt, the raw history kept (the copy adds `r` rows)",
        list(tables),
        if tables.len() == 1 { " is" } else { "s are" }
    ))
}

/// `--recreate-slot`: what happens to the lake depends on `source.snapshot`.
fn plan_recreate_slot(source: &SourceSettings, slot: Option<&SlotInfo>) -> String {
    let state = match slot {
        None => "does not exist".to_string(),
        Some(s) => format!(
            "exists (wal_status {})",
            s.wal_status.as_deref().unwrap_or("unknown")
        ),
    };
    let copy = if source.snapshot == SnapshotMode::Initial {
        "the next start copies every table afresh, so the curated tables are exact again; \
         the raw tables miss the individual changes in between"
    } else {
        "source.snapshot is \"never\": the lake misses every change in between"
    };
    format!(
        "drop replication slot {} (it {state}) and create it again; {copy}",
        source.slot
    )
}

/// Carries a planned reset out and records it in the checkpoint table.
async fn carry_out(
    source: &SourceSettings,
    reset: Reset,
    client: &Client,
    slot_exists: bool,
    checkpoint: &mut Checkpoint,
    record: serde_json::Value,
) -> Result<(), OpsError> {
    match reset {
        Reset::ToLsn(lsn) => {
            client
                .execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&source.slot, &lsn.to_string()],
                )
                .await
                .map_err(sql_err("advancing the slot"))?;
            checkpoint.record_reset(Some(lsn), &[], record).await?;
        }
        Reset::Resnapshot(tables) => {
            let now = current_wal_lsn(client).await?;
            let requested: Vec<(TableName, Lsn)> = tables.into_iter().map(|t| (t, now)).collect();
            checkpoint.record_reset(None, &requested, record).await?;
        }
        Reset::RecreateSlot => {
            if slot_exists {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&source.slot])
                    .await
                    .map_err(sql_err("dropping the slot"))?;
            }
            let row = client
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&source.slot],
                )
                .await
                .map_err(sql_err("creating the slot"))?;
            let lsn: Lsn = row
                .get::<_, String>(0)
                .parse()
                .map_err(|e| OpsError::Refused(format!("the new slot's position: {e}")))?;
            checkpoint.record_slot_created(lsn).await?;
            checkpoint.record_reset(None, &[], record).await?;
        }
    }
    Ok(())
}

async fn current_wal_lsn(client: &Client) -> Result<Lsn, OpsError> {
    let row = client
        // On a standby (the source may be one, PostgreSQL 16+): what it has replayed.
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                     ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(sql_err("reading the WAL position"))?;
    row.get::<_, String>(0)
        .parse()
        .map_err(|e| OpsError::Refused(format!("the WAL position: {e}")))
}

/// Runs `teardown`: drops the slot, and the publication when wal2delta created it.
pub async fn teardown(settings: &Settings, yes: bool) -> Result<String, OpsError> {
    let lake = Lake::open(&settings.lake)?;
    let lock = LakeLock::acquire(&lake).await?;
    let result = teardown_locked(settings, &lake, yes).await;
    lock.release().await;
    result
}

async fn teardown_locked(settings: &Settings, lake: &Lake, yes: bool) -> Result<String, OpsError> {
    let client = catalog::connect(&settings.source.conn).await?;
    let slot = catalog::slot_info(&client, &settings.source.slot).await?;
    let mut checkpoint = Checkpoint::open(lake, &settings.source.slot).await?;
    let created_publication = checkpoint.publication_created();
    let published = catalog::publication_tables(&client, &settings.source.publication)
        .await?
        .is_some();
    let mut steps = Vec::new();
    if slot.is_some() {
        steps.push(format!("drop replication slot {}", settings.source.slot));
    }
    match (published, created_publication) {
        (true, true) => steps.push(format!("drop publication {}", settings.source.publication)),
        (true, false) => steps.push(format!(
            "keep publication {} (wal2delta did not create it)",
            settings.source.publication
        )),
        _ => {}
    }
    if steps.is_empty() {
        return Ok("nothing to do: the slot and the publication are gone".into());
    }
    let plan = steps.join("; ");
    if !yes {
        return Ok(format!(
            "would {plan}. The lake is kept.\nNothing was changed; run again with --yes to do it."
        ));
    }
    if slot.is_some() {
        client
            .execute(
                "SELECT pg_drop_replication_slot($1)",
                &[&settings.source.slot],
            )
            .await
            .map_err(sql_err("dropping the slot"))?;
    }
    if published && created_publication {
        client
            .batch_execute(&format!(
                "DROP PUBLICATION {}",
                quote_ident(&settings.source.publication)
            ))
            .await
            .map_err(sql_err("dropping the publication"))?;
        checkpoint.record_publication(false).await?;
    }
    tracing::warn!(%plan, "teardown");
    Ok(format!("done: {plan}. The lake is kept."))
}
