//! Memory for SQL statements: one budget all statements share (`serve.memory_mb`), a
//! limit for each (`serve.query_memory_mb`), and the size limits on what a statement
//! sends (`serve.max_value_mb`, `serve.max_result_mb`).
//!
//! # Design
//! - Every statement gets its own [`StatementPool`], DataFusion's memory pool for its
//!   joins, sorts and aggregates. Each reservation is taken from the statement's limit
//!   and from the shared [`Budget`] together, so many statements at once cannot add up
//!   to more than the budget: the one that would pass it fails with `53200`.
//! - Expression results are not seen by DataFusion's pools. The functions that can build
//!   results far larger than their arguments (`super::growth`) reserve their estimated
//!   output from the statement's pool before building it; that reservation is held as
//!   long as the statement runs (its largest result, not their sum).
//! - A value or a result over its cap fails with `54000` (program_limit_exceeded),
//!   checked on every row sent ([`Output`]).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use deltalake::datafusion::common::{DataFusionError, Result, resources_datafusion_err};
use deltalake::datafusion::execution::memory_pool::{
    MemoryLimit, MemoryPool, MemoryReservation, human_readable_size,
};

const MB: usize = 1024 * 1024;

/// The memory all statements together may reserve (`serve.memory_mb`).
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Takes `bytes`, or returns what was in use.
    fn take(&self, bytes: usize) -> std::result::Result<(), usize> {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|n| *n <= self.limit)
            })
            .map(|_| ())
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes reserved by all statements now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// A value or a result over its cap (SQLSTATE `54000`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TooLarge(pub String);

impl TooLarge {
    pub fn into_datafusion(self) -> DataFusionError {
        DataFusionError::External(Box::new(self))
    }
}

/// One statement's memory pool: its own limit, inside the shared budget.
#[derive(Debug)]
pub struct StatementPool {
    budget: Arc<Budget>,
    limit: usize,
    used: AtomicUsize,
    /// Held for expression results (`reserve_results`).
    results: Mutex<usize>,
    /// The largest single value the statement may build.
    pub max_value: usize,
}

impl StatementPool {
    pub fn new(budget: Arc<Budget>, limit: usize, max_value: usize) -> StatementPool {
        StatementPool {
            budget,
            limit,
            used: AtomicUsize::new(0),
            results: Mutex::new(0),
            max_value,
        }
    }

    /// Takes `bytes` for `what` from the statement's limit and the shared budget.
    fn take(&self, bytes: usize, what: &str) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|n| *n <= self.limit)
            })
            .map_err(|used| {
                resources_datafusion_err!(
                    "this statement needs more memory than serve.query_memory_mb allows ({} for {what}, with {} already in use of {}); filter or aggregate earlier, select fewer columns, or raise serve.query_memory_mb",
                    human_readable_size(bytes),
                    human_readable_size(used),
                    human_readable_size(self.limit)
                )
            })?;
        if let Err(used) = self.budget.take(bytes) {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return Err(resources_datafusion_err!(
                "the SQL endpoint's statements together would use more memory than serve.memory_mb allows ({} more for {what}, with {} in use by all statements of {}); retry once other statements finish, or raise serve.memory_mb",
                human_readable_size(bytes),
                human_readable_size(used),
                human_readable_size(self.budget.limit)
            ));
        }
        Ok(())
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.budget.release(bytes);
    }

    /// Holds `bytes` for an expression result about to be built, for as long as the
    /// statement runs: the reservation grows to the largest result asked for.
    pub fn reserve_results(&self, bytes: usize, what: &str) -> Result<()> {
        let mut held = self.results.lock().expect("results lock");
        if bytes > *held {
            self.take(bytes - *held, what)?;
            *held = bytes;
        }
        Ok(())
    }

    /// The error for a value of `bytes` built by `what`, over `serve.max_value_mb`.
    pub fn value_too_large(&self, bytes: usize, what: &str) -> DataFusionError {
        TooLarge(format!(
            "{what} would build a value of {}, more than serve.max_value_mb ({}) allows; build a smaller value, or raise serve.max_value_mb",
            human_readable_size(bytes),
            human_readable_size(self.max_value)
        ))
        .into_datafusion()
    }
}

impl Drop for StatementPool {
    fn drop(&mut self) {
        // Operators' reservations are gone by now (each holds the pool); what is left is
        // the expression results' reservation.
        self.budget.release(self.used.load(Ordering::Relaxed));
    }
}

impl std::fmt::Display for StatementPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "statement(used: {}, limit: {})",
            human_readable_size(self.used.load(Ordering::Relaxed)),
            human_readable_size(self.limit)
        )
    }
}

impl MemoryPool for StatementPool {
    fn name(&self) -> &str {
        "wal2delta statement"
    }

    fn grow(&self, _reservation: &MemoryReservation, additional: usize) {
        // Infallible by contract: counted even beyond the limits, so later `try_grow`s
        // of this statement and the others see it.
        self.used.fetch_add(additional, Ordering::Relaxed);
        self.budget.used.fetch_add(additional, Ordering::Relaxed);
    }

    fn shrink(&self, _reservation: &MemoryReservation, shrink: usize) {
        self.give_back(shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        self.take(additional, reservation.consumer().name())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

/// Size caps on what a statement sends, checked row by row.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// `serve.max_value_mb`, in bytes.
    pub max_value: usize,
    /// `serve.max_result_mb`, in bytes; `None`: no cap.
    pub max_result: Option<usize>,
}

/// Counts one statement's rows against [`Output`].
pub struct Sent {
    limits: Output,
    bytes: usize,
}

impl Sent {
    pub fn new(limits: Output) -> Sent {
        Sent { limits, bytes: 0 }
    }

    /// Checks one encoded row (`DataRow` body: per field an i32 length, -1 for NULL,
    /// then the bytes); the message when it passes a cap.
    pub fn row(&mut self, data: &[u8]) -> std::result::Result<(), String> {
        let mut rest = data;
        while rest.len() >= 4 {
            let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            rest = &rest[4..];
            let Ok(len) = usize::try_from(len) else {
                continue;
            };
            if len > self.limits.max_value {
                return Err(format!(
                    "a result value of {} is more than serve.max_value_mb ({}) allows; select a part of it (substr) or raise serve.max_value_mb",
                    human_readable_size(len),
                    human_readable_size(self.limits.max_value)
                ));
            }
            rest = rest.get(len..).unwrap_or_default();
        }
        self.bytes = self.bytes.saturating_add(data.len());
        match self.limits.max_result {
            Some(max) if self.bytes > max => Err(format!(
                "the result is larger than serve.max_result_mb ({}) allows; add a WHERE or LIMIT, or raise serve.max_result_mb",
                human_readable_size(max)
            )),
            _ => Ok(()),
        }
    }
}

/// `mb` MiB in bytes, saturating.
pub fn mib(mb: u64) -> usize {
    usize::try_from(mb).unwrap_or(usize::MAX).saturating_mul(MB)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::datafusion::execution::memory_pool::MemoryConsumer;

    #[test]
    fn statements_share_the_budget_and_give_it_back() {
        let budget = Arc::new(Budget::new(100));
        let a = Arc::new(StatementPool::new(budget.clone(), 80, 10)) as Arc<dyn MemoryPool>;
        let b = Arc::new(StatementPool::new(budget.clone(), 80, 10)) as Arc<dyn MemoryPool>;
        let ra = MemoryConsumer::new("sort a").register(&a);
        let rb = MemoryConsumer::new("sort b").register(&b);
        ra.try_grow(70).unwrap();
        // Within b's own limit, but not within what the budget has left.
        let e = rb.try_grow(40).unwrap_err().to_string();
        assert!(e.contains("serve.memory_mb"), "{e}");
        assert!(
            ra.try_grow(20)
                .unwrap_err()
                .to_string()
                .contains("serve.query_memory_mb")
        );
        rb.try_grow(30).unwrap();
        assert_eq!(budget.used(), 100);
        drop(ra);
        drop(rb);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn expression_results_are_held_until_the_statement_ends() {
        let budget = Arc::new(Budget::new(100));
        let pool = StatementPool::new(budget.clone(), 100, 10);
        pool.reserve_results(30, "repeat").unwrap();
        pool.reserve_results(20, "repeat").unwrap();
        assert_eq!(budget.used(), 30, "the largest result, not the sum");
        pool.reserve_results(60, "repeat").unwrap();
        assert_eq!(budget.used(), 60);
        assert!(pool.reserve_results(200, "repeat").is_err());
        drop(pool);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn rows_are_checked_value_by_value_and_in_total() {
        let row = |values: &[Option<&[u8]>]| {
            let mut data = Vec::new();
            for v in values {
                match v {
                    Some(v) => {
                        data.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        data.extend_from_slice(v);
                    }
                    None => data.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
            data
        };
        let mut sent = Sent::new(Output {
            max_value: 4,
            max_result: Some(25),
        });
        sent.row(&row(&[Some(b"abcd"), None, Some(b"")])).unwrap();
        let e = sent.row(&row(&[None, Some(b"abcde")])).unwrap_err();
        assert!(e.contains("serve.max_value_mb"), "{e}");
        sent.row(&row(&[Some(b"ab")])).unwrap();
        let e = sent.row(&row(&[Some(b"ab")])).unwrap_err();
        assert!(e.contains("serve.max_result_mb"), "{e}");
    }
}
