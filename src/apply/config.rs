//! `[apply]`: batching limits, with their documented defaults and validation.

use serde::Deserialize;

/// `[apply]`: batching limits. A batch always holds whole source transactions; it is
/// committed when any limit is reached at a transaction boundary.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Rows across all tables that trigger a commit.
    #[serde(default = "default_max_rows")]
    pub max_batch_rows: usize,
    /// Approximate bytes of change data that trigger a commit.
    #[serde(default = "default_max_bytes")]
    pub max_batch_bytes: usize,
    /// Milliseconds after the first change of a batch before it is committed, at the
    /// latest.
    #[serde(default = "default_max_age_ms")]
    pub max_batch_age_ms: u64,
    /// A batch this old is committed as soon as nothing more is waiting in the stream
    /// (group commit): sparse changes are visible within about this time, while a
    /// backlog still gathers into batches of up to `max_batch_age_ms`.
    /// Unset: 200 ms, or `max_batch_age_ms` if that is lower ([`Self::min_batch_age`]).
    #[serde(default)]
    pub min_batch_age_ms: Option<u64>,
    /// Rows buffered in memory per table before they are streamed into a Parquet file
    /// (still uncommitted). Bounds memory for huge transactions.
    #[serde(default = "default_spill_rows")]
    pub spill_rows: usize,
    /// Bytes of change data buffered in memory per table before they are streamed into a
    /// Parquet file (bounds memory for huge values).
    #[serde(default = "default_spill_bytes")]
    pub spill_bytes: usize,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            max_batch_rows: default_max_rows(),
            max_batch_bytes: default_max_bytes(),
            max_batch_age_ms: default_max_age_ms(),
            min_batch_age_ms: None,
            spill_rows: default_spill_rows(),
            spill_bytes: default_spill_bytes(),
        }
    }
}

impl ApplyConfig {
    /// The age at which a batch is committed when nothing more is waiting.
    pub fn min_batch_age(&self) -> u64 {
        self.min_batch_age_ms
            .unwrap_or(DEFAULT_MIN_AGE_MS.min(self.max_batch_age_ms))
    }

    /// Checks the limits; problems name `apply.<field>`.
    pub fn validate(&self, problems: &mut Vec<String>) {
        let at_least = |field: &str, value: usize, min: usize, problems: &mut Vec<String>| {
            if value < min {
                problems.push(format!("apply.{field}: must be at least {min}"));
            }
        };
        at_least("max_batch_rows", self.max_batch_rows, 1, problems);
        at_least("max_batch_bytes", self.max_batch_bytes, 1024, problems);
        if self.max_batch_age_ms == 0 {
            problems.push("apply.max_batch_age_ms: must be at least 1".into());
        }
        if let Some(min) = self.min_batch_age_ms
            && min > self.max_batch_age_ms
        {
            problems.push(format!(
                "apply.min_batch_age_ms: {min} is more than apply.max_batch_age_ms ({}); lower it or raise max_batch_age_ms",
                self.max_batch_age_ms
            ));
        }
        at_least("spill_rows", self.spill_rows, 1, problems);
        at_least("spill_bytes", self.spill_bytes, 1024, problems);
    }
}

fn default_max_rows() -> usize {
    100_000
}
fn default_max_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_max_age_ms() -> u64 {
    1000
}
const DEFAULT_MIN_AGE_MS: u64 = 200;
fn default_spill_rows() -> usize {
    131_072
}
fn default_spill_bytes() -> usize {
    32 * 1024 * 1024
}
