//! Reduces a run of changes (in stream order) to the final state of every key it touches.
//!
//! The result says, per key, whether the curated table ends up without the row (`Delete`)
//! or with one (`Upsert`), and where each column of that row comes from: the change row
//! itself, an earlier change of the same batch, or — for unchanged TOAST columns whose
//! value the stream did not send — the row the curated table holds now (`Target`, possibly
//! under the old key when an update changed the key). A truncate forgets everything
//! before it.

use std::collections::{HashMap, HashSet};

/// Key ids by key. ahash, not SipHash: a 2,000,000-row transaction looks up every key
/// (with SipHash this map took 14% of the apply thread replaying it); seeded per map.
pub type KeyIds = HashMap<Box<[u8]>, u32, ahash::RandomState>;

/// Where one column of a final row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// Row `n` of the change batch.
    Row(usize),
    /// The curated table's current row for key id `n`.
    Target(u32),
    /// Nothing known (an unchanged TOAST value after the row was deleted in the same
    /// batch, which a consistent stream never sends).
    Null,
}

/// The final state of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Final {
    Delete,
    /// The row comes from change row `row`; `cells`, when present, overrides the source of
    /// individual source columns (unchanged TOAST values).
    Upsert {
        row: usize,
        cells: Option<Vec<Cell>>,
    },
}

/// One change as the reducer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    Insert {
        key: &'a [u8],
    },
    Update {
        key: &'a [u8],
        old_key: Option<&'a [u8]>,
        unchanged: &'a [usize],
    },
    Delete {
        key: &'a [u8],
    },
    Truncate,
}

/// The reduced batch.
#[derive(Debug, Default)]
pub struct Reduced {
    /// A truncate happened: every row the curated table held before is gone.
    pub truncated: bool,
    /// Key bytes (Arrow row format) by key id.
    pub keys: Vec<Box<[u8]>>,
    pub index: KeyIds,
    /// Final state by key id.
    pub finals: Vec<Final>,
    /// Key ids whose current curated row is needed to fill unchanged TOAST values.
    pub needs_target: HashSet<u32>,
}

impl Reduced {
    pub fn is_empty(&self) -> bool {
        !self.truncated && self.keys.is_empty()
    }
}

#[derive(Default)]
struct Work {
    truncated: bool,
    keys: Vec<Box<[u8]>>,
    index: KeyIds,
    /// `None`: the key has no decision from this batch yet.
    finals: Vec<Option<Final>>,
    needs_target: HashSet<u32>,
}

impl Work {
    fn id(&mut self, key: &[u8]) -> u32 {
        if let Some(id) = self.index.get(key) {
            return *id;
        }
        let id = self.keys.len() as u32;
        self.keys.push(key.into());
        self.index.insert(key.into(), id);
        self.finals.push(None);
        id
    }
}

/// Reduces `changes` (row `n` of the batch is `changes[n]`) over `ncols` source columns.
pub fn reduce<'a>(changes: impl IntoIterator<Item = Change<'a>>, ncols: usize) -> Reduced {
    let mut w = Work::default();
    for (row, change) in changes.into_iter().enumerate() {
        match change {
            Change::Insert { key } => {
                let id = w.id(key);
                w.finals[id as usize] = Some(Final::Upsert { row, cells: None });
            }
            Change::Delete { key } => {
                let id = w.id(key);
                w.finals[id as usize] = Some(Final::Delete);
            }
            Change::Truncate => {
                w = Work {
                    truncated: true,
                    ..Work::default()
                };
            }
            Change::Update {
                key,
                old_key,
                unchanged,
            } => {
                let new_id = w.id(key);
                let old_id = match old_key {
                    Some(old) if old != key => w.id(old),
                    _ => new_id,
                };
                let prior = w.finals[old_id as usize].clone();
                if old_id != new_id {
                    w.finals[old_id as usize] = Some(Final::Delete);
                }
                let cells = if unchanged.is_empty() {
                    None
                } else {
                    let mut cells: Vec<Cell> = vec![Cell::Row(row); ncols];
                    for &c in unchanged.iter().filter(|&&c| c < ncols) {
                        cells[c] = match &prior {
                            // Nothing earlier in the batch: the curated row has the value
                            // (unless a truncate emptied the table in this batch).
                            None if w.truncated => Cell::Null,
                            None => {
                                w.needs_target.insert(old_id);
                                Cell::Target(old_id)
                            }
                            Some(Final::Upsert { row: pr, cells: pc }) => match pc {
                                Some(pc) => pc[c],
                                None => Cell::Row(*pr),
                            },
                            Some(Final::Delete) => Cell::Null,
                        };
                    }
                    Some(cells)
                };
                w.finals[new_id as usize] = Some(Final::Upsert { row, cells });
            }
        }
    }
    Reduced {
        truncated: w.truncated,
        keys: w.keys,
        index: w.index,
        finals: w
            .finals
            .into_iter()
            .map(|f| f.unwrap_or(Final::Delete))
            .collect(),
        needs_target: w.needs_target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_change_per_key_wins() {
        let r = reduce(
            [
                Change::Insert { key: b"1" },
                Change::Update {
                    key: b"1",
                    old_key: None,
                    unchanged: &[],
                },
                Change::Insert { key: b"2" },
                Change::Delete { key: b"2" },
            ],
            3,
        );
        assert_eq!(
            r.finals[r.index[b"1".as_slice()] as usize].clone(),
            Final::Upsert {
                row: 1,
                cells: None
            }
        );
        assert_eq!(r.finals[r.index[b"2".as_slice()] as usize], Final::Delete);
    }

    #[test]
    fn key_change_deletes_old_key_and_carries_toast() {
        // 1 → 2 with column 1 unchanged: the value is the curated row of key 1.
        let r = reduce(
            [Change::Update {
                key: b"2",
                old_key: Some(b"1"),
                unchanged: &[1],
            }],
            3,
        );
        let one = r.index[b"1".as_slice()];
        assert_eq!(r.finals[one as usize], Final::Delete);
        assert_eq!(
            r.finals[r.index[b"2".as_slice()] as usize],
            Final::Upsert {
                row: 0,
                cells: Some(vec![Cell::Row(0), Cell::Target(one), Cell::Row(0)])
            }
        );
        assert!(r.needs_target.contains(&one));
    }

    #[test]
    fn toast_after_insert_in_same_batch_comes_from_the_insert() {
        let r = reduce(
            [
                Change::Insert { key: b"1" },
                Change::Update {
                    key: b"1",
                    old_key: None,
                    unchanged: &[2],
                },
                Change::Update {
                    key: b"3",
                    old_key: Some(b"1"),
                    unchanged: &[2],
                },
            ],
            3,
        );
        assert!(r.needs_target.is_empty());
        assert_eq!(
            r.finals[r.index[b"3".as_slice()] as usize],
            Final::Upsert {
                row: 2,
                cells: Some(vec![Cell::Row(2), Cell::Row(2), Cell::Row(0)])
            }
        );
        assert_eq!(r.finals[r.index[b"1".as_slice()] as usize], Final::Delete);
    }

    #[test]
    fn truncate_forgets_what_came_before() {
        let r = reduce(
            [
                Change::Insert { key: b"1" },
                Change::Truncate,
                Change::Insert { key: b"2" },
            ],
            1,
        );
        assert!(r.truncated);
        assert_eq!(r.keys.len(), 1);
        assert_eq!(
            r.finals[0],
            Final::Upsert {
                row: 2,
                cells: None
            }
        );
    }
}
