//! Reconciles chunked (watermark) copies with the stream (see `source::watermark`).
//!
//! Between a chunk's low and high watermark the stream's changes to the table are noted:
//! transaction, key, whether an update left a TOAST value unsent, truncates. At the high
//! watermark the chunk's snapshot S says which of those transactions the copy did not see:
//! their keys are dropped from the chunk (the stream already applied the newer state),
//! and the rest of the chunk joins the batch as `r` rows of the watermark's transaction.
//!
//! A chunk is read again instead when the stream cannot be reconciled with it exactly:
//! - a truncate in the window that S does not see (the copy holds rows it removed);
//! - an update in the window, unseen by S, that left a TOAST value unsent for a key of
//!   the chunk (the curated row would lack the value);
//! - a transaction streamed *before* the low watermark that S does not see: its commit
//!   record was written, but it was not yet visible when S was taken (a commit waiting
//!   for a synchronous standby). The copy lacks it and the stream already delivered it.
//!   The last [`RECENT`] transactions are remembered for this check.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::lsn::Lsn;
use crate::source::watermark::{Chunk, Verdict, XidSnapshot};
use crate::table_name::TableName;

/// Transactions remembered for the check against a chunk's snapshot.
const RECENT: usize = 65_536;

/// A change seen in a window.
struct Seen {
    xid: u32,
    key: Option<i64>,
    unsent_toast: bool,
    truncate: bool,
}

/// One chunk's open window.
struct Window {
    table: TableName,
    low: Lsn,
    seen: Vec<Seen>,
}

/// The windows open (a table has two when its copier reads a chunk ahead), by token, and
/// the transactions streamed lately.
#[derive(Default)]
pub struct Reconciler {
    windows: HashMap<String, Window>,
    recent: VecDeque<(u32, Lsn)>,
}

/// A chunk that passed: the rows to add and where its copy began.
pub struct Taken {
    pub chunk: Chunk,
    /// The rows of the chunk to add (indexes into `chunk.rows`).
    pub keep: Vec<usize>,
    /// The keys transactions the chunk's snapshot did not see changed (the stream holds
    /// their state).
    pub dropped: HashSet<i64>,
    pub start: Lsn,
}

impl Reconciler {
    /// Whether `table` has a window open (its changes are noted).
    pub fn watching(&self, table: &TableName) -> bool {
        !self.windows.is_empty() && self.windows.values().any(|w| &w.table == table)
    }

    /// Keeps the windows whose token `keep` accepts.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.windows.retain(|token, _| keep(token));
    }

    /// A transaction committed at `commit_lsn`.
    pub fn committed(&mut self, xid: u32, commit_lsn: Lsn) {
        if self.recent.len() >= RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((xid, commit_lsn));
    }

    /// A low watermark of `table` with `token`, in a transaction committed at `at`.
    pub fn low(&mut self, table: TableName, token: &str, at: Lsn) {
        self.windows.insert(
            token.to_string(),
            Window {
                table,
                low: at,
                seen: Vec::new(),
            },
        );
    }

    /// A change of a watched `table` by transaction `xid`: the keys it touched (an update
    /// changing the key touches both).
    pub fn saw(&mut self, table: &TableName, xid: u32, keys: &[Option<i64>], unsent_toast: bool) {
        for w in self.windows.values_mut().filter(|w| &w.table == table) {
            for key in keys {
                w.seen.push(Seen {
                    xid,
                    key: *key,
                    unsent_toast,
                    truncate: false,
                });
            }
        }
    }

    /// A truncate of a watched `table` by transaction `xid`.
    pub fn saw_truncate(&mut self, table: &TableName, xid: u32) {
        for w in self.windows.values_mut().filter(|w| &w.table == table) {
            w.seen.push(Seen {
                xid,
                key: None,
                unsent_toast: false,
                truncate: true,
            });
        }
    }

    /// The high watermark of `chunk`: closes its window and decides.
    pub fn high(&mut self, token: &str, chunk: Chunk) -> Option<Taken> {
        let Some(window) = self.windows.remove(token) else {
            let _ = chunk
                .verdict
                .send(Verdict::Again("its low watermark was not seen".into()));
            return None;
        };
        match judge(&window, &self.recent, &chunk.snapshot, &chunk.keys) {
            Ok(dropped) => {
                let keep = (0..chunk.rows.len())
                    .filter(|i| !dropped.contains(&chunk.keys[*i]))
                    .collect();
                Some(Taken {
                    start: chunk.start.unwrap_or(window.low),
                    keep,
                    dropped,
                    chunk,
                })
            }
            Err(why) => {
                let _ = chunk.verdict.send(Verdict::Again(why));
                None
            }
        }
    }
}

/// The keys to drop from a chunk copied at `snapshot`, or why it must be read again.
fn judge(
    window: &Window,
    recent: &VecDeque<(u32, Lsn)>,
    snapshot: &XidSnapshot,
    keys: &[i64],
) -> Result<HashSet<i64>, String> {
    if let Some((xid, _)) = recent
        .iter()
        .find(|(xid, at)| *at < window.low && snapshot.invisible(*xid))
    {
        return Err(format!(
            "transaction {xid} was streamed before the low watermark but was not visible to the copy"
        ));
    }
    // The chunk's keys, looked up only for an update that left a TOAST value unsent
    // (the chunk is in key order).
    let in_chunk = |key: i64| keys.binary_search(&key).is_ok();
    let mut dropped = HashSet::new();
    for seen in window.seen.iter().filter(|s| snapshot.invisible(s.xid)) {
        if seen.truncate {
            return Err(format!("transaction {} truncated the table", seen.xid));
        }
        let Some(key) = seen.key else {
            return Err(format!(
                "transaction {} changed a row whose key is not an integer",
                seen.xid
            ));
        };
        if seen.unsent_toast && in_chunk(key) {
            return Err(format!(
                "transaction {} updated key {key} without sending a TOAST value",
                seen.xid
            ));
        }
        dropped.insert(key);
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(seen: Vec<Seen>) -> Window {
        Window {
            table: TableName::new("public", "t"),
            low: Lsn(100),
            seen,
        }
    }

    fn seen(xid: u32, key: i64) -> Seen {
        Seen {
            xid,
            key: Some(key),
            unsent_toast: false,
            truncate: false,
        }
    }

    #[test]
    fn keys_changed_by_transactions_the_copy_missed_are_dropped() {
        // S saw everything before 50 but 45.
        let s = XidSnapshot::parse("40:50:45").unwrap();
        let w = window(vec![seen(44, 1), seen(45, 2), seen(51, 3)]);
        let dropped = judge(&w, &VecDeque::new(), &s, &[1, 2, 3, 4]).unwrap();
        assert_eq!(dropped, HashSet::from([2, 3]));
    }

    #[test]
    fn chunks_the_stream_cannot_be_reconciled_with_are_read_again() {
        let s = XidSnapshot::parse("40:50:45").unwrap();
        // A truncate the copy did not see.
        let mut t = seen(52, 0);
        t.truncate = true;
        assert!(judge(&window(vec![t]), &VecDeque::new(), &s, &[1]).is_err());
        // An update without its TOAST value, of a key in the chunk; not outside it.
        let mut u = seen(52, 7);
        u.unsent_toast = true;
        assert!(judge(&window(vec![u]), &VecDeque::new(), &s, &[7]).is_err());
        let mut u = seen(52, 8);
        u.unsent_toast = true;
        assert!(judge(&window(vec![u]), &VecDeque::new(), &s, &[7]).is_ok());
        // A transaction streamed before the low watermark but unseen by the copy.
        let recent = VecDeque::from([(44, Lsn(90)), (45, Lsn(95))]);
        assert!(judge(&window(vec![]), &recent, &s, &[1]).is_err());
        let recent = VecDeque::from([(44, Lsn(90)), (45, Lsn(120))]);
        assert!(judge(&window(vec![]), &recent, &s, &[1]).is_ok());
    }
}
