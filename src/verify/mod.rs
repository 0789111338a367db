//! `wal2delta verify`: proves that the curated tables equal the source, while the daemon
//! runs, without exporting the source.
//!
//! 1. A temporary slot exports a snapshot of the source at consistent point P
//!    ([`source_side`]).
//! 2. Verify waits until the daemon's slot has confirmed P: the lake then holds every
//!    transaction committed before P. The curated table is read at its latest version
//!    (which may hold later ones too) and the raw change log names the keys changed at or
//!    after P; those are left out ([`lake_side`]).
//! 3. Both sides hash every row in the same canonical form ([`canonical`]) and sum the
//!    hashes per key range (a range of the key hash's space, sized so a range holds about
//!    a thousand rows). Only the sums leave the source.
//! 4. For the ranges whose sums differ, both sides list keys and row hashes, which names
//!    the rows missing from the lake, extra in it and different.
//!
//! Columns that `[transform]` rules normalize are not compared (their curated values are
//! parsed from text the lake does not keep); the report names them.

pub mod canonical;
mod lake_side;
mod source_side;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;

use self::canonical::{Compared, bucket, split_pieces};
use self::lake_side::LakeTable;
use self::source_side::{SourceSnapshot, TableQuery};
use crate::apply::normalize::Normalizer;
use crate::config::Settings;
use crate::lake::{Lake, LakeError};
use crate::lsn::Lsn;
use crate::source::catalog::{self, CatalogError, TableInfo};
use crate::source::replication::ReplicationError;
use crate::table_name::TableName;

/// Rows per key range the ranges are sized for.
const ROWS_PER_RANGE: u64 = 1000;
/// At most 2^16 ranges.
const MAX_RANGE_BITS: u32 = 16;
/// Rows (both sides together) listed key by key at most: the ranges beyond are counted,
/// not examined.
const DETAIL_ROWS: u64 = 2_000_000;
/// Example keys reported per kind of difference.
const EXAMPLES: usize = 5;

/// Verify could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// The lake cannot be opened (boxed: the error is large).
    #[error(transparent)]
    Lake(#[from] Box<LakeError>),
    #[error("reading the lake table {table}: {message}")]
    LakeRead { table: String, message: String },
    #[error("hashing {table} on the source: {message}")]
    SourceQuery { table: String, message: String },
    #[error("{0} is not a configured table; verify checks the tables in source.tables")]
    NotConfigured(String),
    #[error(
        "the lake has not caught up with the source's position {point} after {waited_s} s \
         (slot {slot} has confirmed {confirmed}): verify compares while the daemon runs; \
         start it (or let it catch up: `wal2delta status`), or wait longer with --wait"
    )]
    NotCaughtUp {
        point: Lsn,
        slot: String,
        confirmed: String,
        waited_s: u64,
    },
}

/// A key range's row count and hash sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    pub rows: u64,
    pub sum: u128,
}

impl Bucket {
    fn add(&mut self, hash: u64) {
        self.rows += 1;
        self.sum = self.sum.wrapping_add(u128::from(hash));
    }
}

/// What to verify.
pub struct VerifyOptions {
    /// Empty: every configured table.
    pub tables: Vec<TableName>,
    /// How long to wait for the daemon to pass the snapshot's position.
    pub wait: Duration,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The source snapshot's consistent point.
    pub source_position: String,
    /// How long the lake took to reach it.
    pub waited_ms: u64,
    pub tables: Vec<TableReport>,
}

impl Report {
    /// 0 when every table is equal, 1 when one differs, 2 when one could not be checked.
    pub fn exit_code(&self) -> u8 {
        if self.tables.iter().any(|t| t.outcome == Outcome::Differs) {
            1
        } else if self.tables.iter().any(|t| t.outcome == Outcome::Error) {
            2
        } else {
            0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Equal,
    Differs,
    Error,
}

/// One table's result.
#[derive(Debug, Serialize)]
pub struct TableReport {
    pub table: String,
    pub outcome: Outcome,
    /// Why the table could not be checked.
    pub error: Option<String>,
    pub lake_version: Option<u64>,
    pub source_rows: u64,
    pub lake_rows: u64,
    pub ranges: u64,
    pub ranges_differing: u64,
    /// Differing ranges listed key by key (the rest only counted).
    pub ranges_examined: u64,
    pub missing: u64,
    pub extra: u64,
    pub different: u64,
    pub examples: Examples,
    /// Keys changed at or after the source position, left out of the comparison.
    pub changed_during_check: u64,
    pub not_compared: Vec<NotCompared>,
    pub source_read_ms: u64,
    pub lake_read_ms: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Examples {
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    pub different: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct NotCompared {
    pub column: String,
    pub reason: String,
}

impl TableReport {
    fn new(table: &TableName) -> TableReport {
        TableReport {
            table: table.to_string(),
            outcome: Outcome::Equal,
            error: None,
            lake_version: None,
            source_rows: 0,
            lake_rows: 0,
            ranges: 0,
            ranges_differing: 0,
            ranges_examined: 0,
            missing: 0,
            extra: 0,
            different: 0,
            examples: Examples::default(),
            changed_during_check: 0,
            not_compared: vec![],
            source_read_ms: 0,
            lake_read_ms: 0,
            elapsed_ms: 0,
        }
    }

    fn failed(mut self, message: String) -> TableReport {
        self.outcome = Outcome::Error;
        self.error = Some(message);
        self
    }
}

/// Runs the check. An error means nothing could be checked (exit 2); a table that could not
/// be checked is reported as such.
pub async fn verify(settings: &Settings, options: &VerifyOptions) -> Result<Report, VerifyError> {
    let source = &settings.source;
    let tables = if options.tables.is_empty() {
        source.tables.clone()
    } else {
        for t in &options.tables {
            if !source.tables.contains(t) {
                return Err(VerifyError::NotConfigured(t.to_string()));
            }
        }
        options.tables.clone()
    };
    let lake = Lake::open(&settings.lake).map_err(Box::new)?;
    let client = catalog::connect(&source.conn).await?;
    let snapshot = SourceSnapshot::take(&source.conn).await?;
    let point = snapshot.point;
    let started = Instant::now();
    wait_for_lake(&client, &source.slot, point, options.wait).await?;
    let waited_ms = started.elapsed().as_millis() as u64;
    let mut reports = Vec::new();
    for table in &tables {
        let started = Instant::now();
        let report = TableReport::new(table);
        let mut report = match catalog::table_info(&client, table, &settings.source.publication)
            .await
        {
            Err(e) => report.failed(e.to_string()),
            Ok(None) => report.failed(format!("{table} does not exist on the source")),
            Ok(Some(info)) => match check_table(settings, &lake, &snapshot, &info, report).await {
                Ok(r) => r,
                Err((r, e)) => r.failed(e.to_string()),
            },
        };
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        reports.push(report);
    }
    Ok(Report {
        source_position: point.to_string(),
        waited_ms,
        tables: reports,
    })
}

/// Waits until the slot has confirmed `point`: everything committed before it is durable
/// in the lake.
async fn wait_for_lake(
    client: &tokio_postgres::Client,
    slot: &str,
    point: Lsn,
    wait: Duration,
) -> Result<(), VerifyError> {
    let started = Instant::now();
    loop {
        let info = catalog::slot_info(client, slot).await?;
        let confirmed = info.as_ref().and_then(|s| s.confirmed_flush);
        if confirmed.is_some_and(|c| c >= point) {
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(VerifyError::NotCaughtUp {
                point,
                slot: slot.to_string(),
                confirmed: match (info, confirmed) {
                    (None, _) => "nothing (it does not exist)".into(),
                    (_, None) => "nothing yet".into(),
                    (_, Some(c)) => c.to_string(),
                },
                waited_s: wait.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The columns compared (source order, the key's first) and those left out, with why.
fn compared_columns(
    settings: &Settings,
    info: &TableInfo,
    lake_columns: &[String],
) -> (Vec<Compared>, Vec<NotCompared>) {
    let normalizer = Normalizer::for_table(
        &info.name,
        &info.columns,
        &info.key_columns,
        &settings.normalization,
    );
    let stored = normalizer.stored_types();
    let mut compared = Vec::new();
    let mut skipped = Vec::new();
    for (i, c) in info.columns.iter().enumerate() {
        let reason = if stored.get(i).is_some_and(|t| t.is_some()) {
            Some("normalized by a [transform] rule")
        } else if !lake_columns.contains(&c.name) {
            Some("not in the lake yet (added at the source, no change since)")
        } else {
            None
        };
        match reason {
            Some(r) => skipped.push(NotCompared {
                column: c.name.clone(),
                reason: r.into(),
            }),
            None => compared.push(Compared {
                name: c.name.clone(),
                kind: c.kind.clone(),
                type_oid: c.type_oid,
            }),
        }
    }
    (compared, skipped)
}

type Failed = (TableReport, VerifyError);

async fn check_table(
    settings: &Settings,
    lake: &Lake,
    snapshot: &SourceSnapshot,
    info: &TableInfo,
    mut report: TableReport,
) -> Result<TableReport, Failed> {
    let name = &info.name;
    let label = format!("{name} (curated)");
    // Curated first, raw second: raw commits before curated, so the raw log read later
    // holds every change the curated version does.
    let curated = match LakeTable::open(&lake.curated_table_url(name), &label).await {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(report.failed(format!("{name} has no curated table yet"))),
        Err(e) => return Err((report, e)),
    };
    report.lake_version = Some(curated.version());
    let raw_label = format!("{name} (raw)");
    let raw = match LakeTable::open(&lake.raw_table_url(name), &raw_label).await {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(report.failed(format!("{name} has no raw table yet"))),
        Err(e) => return Err((report, e)),
    };
    let lake_columns = match curated.columns() {
        Ok(c) => c,
        Err(e) => return Err((report, e)),
    };
    let (columns, skipped) = compared_columns(settings, info, &lake_columns);
    report.not_compared = skipped;
    // A table without a key is compared as a multiset of whole rows.
    let key: Vec<usize> = if info.key_columns.is_empty() {
        (0..columns.len()).collect()
    } else {
        let key: Vec<usize> = info
            .key_columns
            .iter()
            .filter_map(|k| columns.iter().position(|c| &c.name == k))
            .collect();
        if key.len() != info.key_columns.len() {
            return Ok(report.failed(format!(
                "the key of {name} ({}) is not all in the lake",
                info.key_columns.join(", ")
            )));
        }
        key
    };
    let key_columns: Vec<Compared> = key.iter().map(|i| columns[*i].clone()).collect();

    // The lake: every row's range at the finest split, folded later.
    let lake_started = Instant::now();
    let mut fine: HashMap<u32, Bucket> = HashMap::new();
    if let Err(e) = curated
        .hash_rows(&columns, &key, |k, h| {
            fine.entry(bucket(k, MAX_RANGE_BITS)).or_default().add(h)
        })
        .await
    {
        return Err((report, e));
    }
    let changed = match raw.changed_since(snapshot.point, &key_columns).await {
        Ok(c) => c,
        Err(e) => return Err((report, e)),
    };
    report.lake_read_ms = lake_started.elapsed().as_millis() as u64;
    if changed.truncated || changed.copied {
        let what = if changed.truncated {
            "truncated"
        } else {
            "copied again"
        };
        return Ok(report.failed(format!(
            "{name} was {what} while verify ran; run verify again"
        )));
    }
    report.lake_rows = fine.values().map(|b| b.rows).sum();
    report.changed_during_check = changed.keys.len() as u64;

    // The source at the finest split too; the ranges are sized by the larger side.
    let source_started = Instant::now();
    let query = TableQuery::new(
        name,
        info.partitioned,
        info.published.row_filter.as_deref(),
        &columns,
        &key,
    );
    let source_fine = match snapshot.buckets(&query, MAX_RANGE_BITS).await {
        Ok(b) => b,
        Err(e) => return Err((report, e)),
    };
    report.source_read_ms = source_started.elapsed().as_millis() as u64;
    report.source_rows = source_fine.values().map(|b| b.rows).sum();
    let bits = range_bits(report.lake_rows.max(report.source_rows));
    report.ranges = 1 << bits;
    let lake_buckets = fold(fine, bits);
    let source_buckets = fold(source_fine, bits);

    let all: HashSet<u32> = lake_buckets
        .keys()
        .chain(source_buckets.keys())
        .copied()
        .collect();
    let mut differing: Vec<(u32, u64)> = all
        .into_iter()
        .filter_map(|b| {
            let l = lake_buckets.get(&b).copied().unwrap_or_default();
            let s = source_buckets.get(&b).copied().unwrap_or_default();
            (l != s).then_some((b, l.rows + s.rows))
        })
        .collect();
    differing.sort();
    report.ranges_differing = differing.len() as u64;
    if differing.is_empty() {
        return Ok(report);
    }

    // List the differing ranges key by key, as many as the budget allows.
    let mut budget = DETAIL_ROWS;
    let mut examined = Vec::new();
    for (b, rows) in &differing {
        if *rows > budget && !examined.is_empty() {
            break;
        }
        budget = budget.saturating_sub(*rows);
        examined.push(*b);
    }
    report.ranges_examined = examined.len() as u64;
    let wanted: HashSet<u32> = examined.iter().copied().collect();
    let source_started = Instant::now();
    let source_rows = match snapshot.rows_in(&query, bits, &examined).await {
        Ok(r) => r,
        Err(e) => return Err((report, e)),
    };
    report.source_read_ms += source_started.elapsed().as_millis() as u64;
    let lake_started = Instant::now();
    let mut lake_rows: HashMap<String, Vec<u64>> = HashMap::new();
    if let Err(e) = curated
        .hash_rows(&columns, &key, |k, h| {
            if wanted.contains(&bucket(k, bits)) {
                lake_rows.entry(k.to_string()).or_default().push(h);
            }
        })
        .await
    {
        return Err((report, e));
    }
    report.lake_read_ms += lake_started.elapsed().as_millis() as u64;
    let mut source_map: HashMap<String, Vec<u64>> = HashMap::new();
    for (k, h) in source_rows {
        source_map.entry(k).or_default().push(h);
    }
    compare_rows(
        &mut report,
        source_map,
        lake_rows,
        &changed.keys,
        &key_columns,
    );
    if report.missing + report.extra + report.different > 0 {
        report.outcome = Outcome::Differs;
    } else if report.ranges_examined < report.ranges_differing {
        // The listed ranges differed only by keys changed meanwhile; the others could not
        // be listed: no verdict either way.
        let unlisted = report.ranges_differing - report.ranges_examined;
        return Ok(report.failed(format!(
            "{unlisted} key ranges differed beyond what verify lists key by key (mostly \
             rows changed while it ran, it seems); run it again at a quieter time"
        )));
    }
    Ok(report)
}

/// Ranges at the finest split, merged into `2^bits` ranges.
fn fold(fine: HashMap<u32, Bucket>, bits: u32) -> HashMap<u32, Bucket> {
    let mut out: HashMap<u32, Bucket> = HashMap::new();
    for (b, v) in fine {
        let folded = out.entry(b >> (MAX_RANGE_BITS - bits)).or_default();
        folded.rows += v.rows;
        folded.sum = folded.sum.wrapping_add(v.sum);
    }
    out
}

/// The number of range bits for a table of `rows` rows.
fn range_bits(rows: u64) -> u32 {
    let ranges = rows.div_ceil(ROWS_PER_RANGE).max(1);
    (u64::BITS - (ranges - 1).leading_zeros()).min(MAX_RANGE_BITS)
}

/// Classifies the rows of the examined ranges, leaving out keys changed meanwhile.
fn compare_rows(
    report: &mut TableReport,
    source: HashMap<String, Vec<u64>>,
    lake: HashMap<String, Vec<u64>>,
    changed: &HashSet<String>,
    key_columns: &[Compared],
) {
    let show = |k: &str| show_key(k, key_columns);
    let mut keys: BTreeMap<&String, ()> = BTreeMap::new();
    for k in source.keys().chain(lake.keys()) {
        keys.insert(k, ());
    }
    for k in keys.keys() {
        if changed.contains(*k) {
            continue;
        }
        let mut s = source.get(*k).cloned().unwrap_or_default();
        let mut l = lake.get(*k).cloned().unwrap_or_default();
        s.sort_unstable();
        l.sort_unstable();
        if s == l {
            continue;
        }
        // Pair equal hashes off; what remains is missing, extra or different.
        let (mut only_s, mut only_l) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < s.len() || j < l.len() {
            match (s.get(i), l.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a < b => {
                    only_s.push(*a);
                    i += 1;
                }
                (Some(_), Some(b)) => {
                    only_l.push(*b);
                    j += 1;
                }
                (Some(a), None) => {
                    only_s.push(*a);
                    i += 1;
                }
                (None, Some(b)) => {
                    only_l.push(*b);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        let different = only_s.len().min(only_l.len()) as u64;
        let missing = (only_s.len() as u64).saturating_sub(different);
        let extra = (only_l.len() as u64).saturating_sub(different);
        for (count, total, examples) in [
            (
                different,
                &mut report.different,
                &mut report.examples.different,
            ),
            (missing, &mut report.missing, &mut report.examples.missing),
            (extra, &mut report.extra, &mut report.examples.extra),
        ] {
            if count > 0 {
                *total += count;
                if examples.len() < EXAMPLES {
                    examples.push(show(k));
                }
            }
        }
    }
}

/// `id=42`, or `(a=1, b=x)` for a composite key.
fn show_key(key: &str, key_columns: &[Compared]) -> String {
    let values = split_pieces(key);
    let parts: Vec<String> = key_columns
        .iter()
        .zip(values)
        .map(|(c, v)| format!("{}={}", c.name, v.as_deref().unwrap_or("NULL")))
        .collect();
    if parts.len() == 1 {
        parts.into_iter().next().unwrap_or_default()
    } else {
        format!("({})", parts.join(", "))
    }
}

/// The report for people.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "verified at source position {} (the lake reached it in {:.1} s)\n",
        report.source_position,
        report.waited_ms as f64 / 1000.0
    );
    for t in &report.tables {
        let timing = format!(
            "source read {:.1} s, lake read {:.1} s, {:.1} s in all",
            t.source_read_ms as f64 / 1000.0,
            t.lake_read_ms as f64 / 1000.0,
            t.elapsed_ms as f64 / 1000.0
        );
        match t.outcome {
            Outcome::Error => out.push_str(&format!(
                "{}: NOT CHECKED: {}\n",
                t.table,
                t.error.as_deref().unwrap_or("unknown error")
            )),
            Outcome::Equal => out.push_str(&format!(
                "{}: equal: {} rows in {} key ranges ({timing})\n",
                t.table, t.source_rows, t.ranges
            )),
            Outcome::Differs => {
                out.push_str(&format!(
                    "{}: DIFFERS: {} rows missing from the lake, {} extra, {} different \
                     (source {} rows, lake {}; {} of {} key ranges differ; {timing})\n",
                    t.table,
                    t.missing,
                    t.extra,
                    t.different,
                    t.source_rows,
                    t.lake_rows,
                    t.ranges_differing,
                    t.ranges
                ));
                for (what, keys) in [
                    ("missing", &t.examples.missing),
                    ("extra", &t.examples.extra),
                    ("different", &t.examples.different),
                ] {
                    if !keys.is_empty() {
                        out.push_str(&format!("    {what}: {}\n", keys.join(", ")));
                    }
                }
                if t.ranges_examined < t.ranges_differing {
                    out.push_str(&format!(
                        "    only {} of the {} differing key ranges were listed key by key; \
                         the counts cover those\n",
                        t.ranges_examined, t.ranges_differing
                    ));
                }
                out.push_str(&format!(
                    "    to repair: wal2delta resync --config FILE --table {}\n",
                    t.table
                ));
            }
        }
        if t.changed_during_check > 0 {
            out.push_str(&format!(
                "    {} keys changed while verify ran were left out\n",
                t.changed_during_check
            ));
        }
        for n in &t.not_compared {
            out.push_str(&format!(
                "    column {} not compared: {}\n",
                n.column, n.reason
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hold_about_a_thousand_rows() {
        assert_eq!(range_bits(0), 0);
        assert_eq!(range_bits(1000), 0);
        assert_eq!(range_bits(1001), 1);
        assert_eq!(range_bits(1_000_000), 10);
        assert_eq!(range_bits(u64::MAX / 2), MAX_RANGE_BITS);
    }
}
