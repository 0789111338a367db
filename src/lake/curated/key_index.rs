//! The key index: for data files of tables keyed by one integer column, which keys a file
//! holds and at which row, kept in memory so a merge finds the rows a change touches
//! without reading the file's key column again.
//!
//! A file's key column is read by the apply loop while it is idle (after a start, a
//! snapshot, a resync or a commit, one file at a time while nothing waits in the stream:
//! `CuratedTable::index_one_file`), or else the first time a merge has to look into the
//! file (its min/max statistics admit a changed key); the entry is built from it on a
//! blocking thread, off the merge's path, and from the next merge on the file's entry
//! answers. Data
//! files never change once written (a deletion vector marks rows, it does not move them),
//! so an entry stays right for as long as the file is in the table; it is dropped when
//! the file leaves. Keys are held as a compressed bitmap (a few KB for a file of
//! consecutive ids) plus, for a file whose rows are not in key order, the row of each key
//! (4 bytes a row).
//!
//! All curated tables share one memory budget (`[curated] key_index_mb`); a file whose
//! entry does not fit is read as before, every time.
//!
//! The SQL endpoint of the same process reads the entries too ([`published`]): a point
//! lookup on the key skips every indexed file that does not hold the key, where the
//! files' min/max statistics (which the upsert files of uniform changes stretch over the
//! whole key range) would have it open them all. A file without an entry is read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock, Weak};

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Int64Type};
use roaring::RoaringTreemap;

/// Bytes held by every table's entries.
static USED: AtomicUsize = AtomicUsize::new(0);

/// The shared budget (`[curated] key_index_mb`) as the daemon last opened a table with
/// it; the default until then (`wal2delta serve`, or before the first change).
static LIMIT: AtomicUsize = AtomicUsize::new(64 << 20);

/// Bytes of key columns held by builds still running (every table's); a build also needs
/// 16 bytes a row while it runs. Kept under the same budget.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Gives back a build's share of [`IN_FLIGHT`] when the build ends, however it ends.
struct InFlight(usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(self.0, Ordering::AcqRel);
    }
}

/// Maps an `i64` to a `u64` in the same order.
fn ordered(v: i64) -> u64 {
    (v as u64) ^ (1 << 63)
}

/// The keys of one data file.
pub struct FileKeys {
    keys: RoaringTreemap,
    /// The row of the n-th smallest key, when the rows are not in key order.
    rows: Option<Vec<u32>>,
    bytes: usize,
}

impl FileKeys {
    /// From the key column of a whole file (its batches in order); `None` when a key is
    /// NULL or repeats (no index then).
    fn build(batches: &[RecordBatch], column: &str) -> Option<FileKeys> {
        let mut pairs: Vec<(i64, u32)> = Vec::new();
        for batch in batches {
            let values = cast(batch.column_by_name(column)?, &DataType::Int64).ok()?;
            let values = values.as_primitive::<Int64Type>();
            if values.null_count() > 0 {
                return None;
            }
            let start = u32::try_from(pairs.len()).ok()?;
            let end = start.checked_add(u32::try_from(values.len()).ok()?)?;
            pairs.extend(values.values().iter().copied().zip(start..end));
        }
        let in_order = pairs.windows(2).all(|w| w[0].0 < w[1].0);
        if !in_order {
            // Stable sort: it merges the sorted runs a file is made of (each copying
            // task's batches are in key order) instead of partitioning them again.
            pairs.sort();
            if pairs.windows(2).any(|w| w[0].0 == w[1].0) {
                return None;
            }
        }
        // Runs of consecutive keys (dense ids) go in as ranges, far faster than key by key.
        let mut keys = RoaringTreemap::new();
        let mut i = 0;
        while i < pairs.len() {
            let start = pairs[i].0;
            let mut end = start;
            i += 1;
            while i < pairs.len() && Some(pairs[i].0) == end.checked_add(1) {
                end = pairs[i].0;
                i += 1;
            }
            keys.insert_range(ordered(start)..=ordered(end));
        }
        keys.optimize();
        let rows = (!in_order).then(|| pairs.iter().map(|p| p.1).collect::<Vec<u32>>());
        let bytes = keys.serialized_size() + rows.as_ref().map_or(0, |r| r.len() * 4) + 64;
        Some(FileKeys { keys, rows, bytes })
    }

    /// The row that holds `key`, if any (a row a deletion vector removed still counts).
    pub fn row_of(&self, key: i64) -> Option<u64> {
        let k = ordered(key);
        if !self.keys.contains(k) {
            return None;
        }
        let n = self.keys.rank(k) - 1;
        match &self.rows {
            Some(rows) => rows.get(n as usize).map(|&r| r as u64),
            None => Some(n),
        }
    }
}

/// One table's entries as the SQL endpoint sees them: the key column and, by data file
/// path (as the Delta log names it), the file's keys.
pub struct Published {
    column: String,
    files: RwLock<HashMap<String, Arc<FileKeys>>>,
}

impl Published {
    /// The key column the entries are of.
    pub fn column(&self) -> &str {
        &self.column
    }

    /// Whether the file at `path` may hold one of `keys`: false only when its entry says
    /// it holds none of them (a key whose row a deletion vector removed still counts).
    pub fn may_hold(&self, path: &str, keys: &[i64]) -> bool {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        match files.get(path) {
            Some(entry) => keys.iter().any(|&k| entry.keys.contains(ordered(k))),
            None => true,
        }
    }

    /// Where `key` is in the file at `path`: `None` when the file has no entry, else the
    /// row that holds it, if any (a row a deletion vector removed still counts).
    pub fn row_of(&self, path: &str, key: i64) -> Option<Option<u64>> {
        self.entry(path).map(|entry| entry.row_of(key))
    }

    /// The entry of the file at `path`, if it has one (entries never change).
    pub fn entry(&self, path: &str) -> Option<Arc<FileKeys>> {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        files.get(path).cloned()
    }

    /// Whether the shared budget has room for another entry.
    pub fn has_room(&self) -> bool {
        USED.load(Ordering::Acquire) < LIMIT.load(Ordering::Acquire)
    }

    /// Indexes the file at `path` from its whole key column (`batches`, in order), read by
    /// the endpoint for a lookup, when the keys allow it and the shared budget has room.
    /// The daemon's index drops the entry with the others once the file leaves the table
    /// (files never change, so an entry is right whoever builds it). Runs on the caller's
    /// thread: call it from a blocking one.
    pub fn learn(&self, path: &str, batches: &[RecordBatch]) -> bool {
        let limit = LIMIT.load(Ordering::Acquire);
        if limit == 0
            || self
                .files
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(path)
        {
            return false;
        }
        let Some(keys) = FileKeys::build(batches, &self.column) else {
            return false;
        };
        let reserved = USED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            (used + keys.bytes <= limit).then_some(used + keys.bytes)
        });
        if reserved.is_err() {
            return false;
        }
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        if files.contains_key(path) {
            USED.fetch_sub(keys.bytes, Ordering::AcqRel);
            return false;
        }
        files.insert(path.to_string(), Arc::new(keys));
        true
    }
}

impl Drop for Published {
    /// Entries still held (the endpoint's, of a table whose daemon index never adopted
    /// them) give their bytes back to the shared budget.
    fn drop(&mut self) {
        let files = self.files.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, keys) in files.drain() {
            USED.fetch_sub(keys.bytes, Ordering::AcqRel);
        }
    }
}

/// Each key-indexed table's entries, by table location (without a trailing `/`).
static PUBLISHED: LazyLock<Mutex<HashMap<String, Weak<Published>>>> =
    LazyLock::new(Default::default);

/// The entries of the curated table at `location`, when a daemon in this process keeps
/// them (`wal2delta serve` has none).
pub fn published(location: &str) -> Option<Arc<Published>> {
    let all = PUBLISHED.lock().unwrap_or_else(|e| e.into_inner());
    all.get(location.trim_end_matches('/'))?.upgrade()
}

/// The entries of the curated table at `location`, created (keyed by `column`) when
/// nobody keeps them yet: the endpoint's lookups index the files they read, and a daemon
/// that opens the table later adopts the entries when its key is the same column.
pub fn published_or_new(location: &str, column: &str) -> Arc<Published> {
    let location = location.trim_end_matches('/');
    let mut all = PUBLISHED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(kept) = all.get(location).and_then(Weak::upgrade) {
        return kept;
    }
    all.retain(|_, table| table.strong_count() > 0);
    let created = Arc::new(Published {
        column: column.to_string(),
        files: RwLock::new(HashMap::new()),
    });
    all.insert(location.to_string(), Arc::downgrade(&created));
    created
}

/// One table's entries, by data file path.
pub(super) struct KeyIndex {
    shared: Arc<Published>,
    /// Entries being built, by path (their key columns count in [`IN_FLIGHT`]).
    building: HashMap<String, tokio::task::JoinHandle<Option<FileKeys>>>,
    /// Files that cannot be indexed (NULL or repeated keys) or did not fit the budget.
    refused: std::collections::HashSet<String>,
    /// The shared budget in bytes.
    limit: usize,
}

impl KeyIndex {
    /// An index of the table at `location` keyed by `column`, shared with this process's
    /// SQL endpoint.
    pub(super) fn new(limit_bytes: usize, location: &str, column: &str) -> KeyIndex {
        LIMIT.store(limit_bytes, Ordering::Release);
        let location = location.trim_end_matches('/');
        let mut all = PUBLISHED.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|_, table| table.strong_count() > 0);
        // The endpoint's lookups may have started the entries (`published_or_new`).
        let shared = match all.get(location).and_then(Weak::upgrade) {
            Some(kept) if kept.column == column => kept,
            _ => {
                let created = Arc::new(Published {
                    column: column.to_string(),
                    files: RwLock::new(HashMap::new()),
                });
                all.insert(location.to_string(), Arc::downgrade(&created));
                created
            }
        };
        drop(all);
        KeyIndex {
            shared,
            building: HashMap::new(),
            refused: Default::default(),
            limit: limit_bytes,
        }
    }

    fn files(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<FileKeys>>> {
        self.shared.files.read().unwrap_or_else(|e| e.into_inner())
    }

    fn files_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<FileKeys>>> {
        self.shared.files.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn get(&self, path: &str) -> Option<Arc<FileKeys>> {
        self.files().get(path).cloned()
    }

    /// Whether file `path` could get an entry it does not have: it is neither indexed nor
    /// being indexed nor refused, and the budget has room.
    pub(super) fn wants(&self, path: &str) -> bool {
        self.limit > 0
            && USED.load(Ordering::Acquire) < self.limit
            && !self.building.contains_key(path)
            && !self.refused.contains(path)
            && !self.files().contains_key(path)
    }

    /// Starts indexing file `path` from its key column `column` (all of its batches);
    /// the entry is there from a later [`KeyIndex::settle`] on, when the keys allow it and
    /// the budget has room. Returns whether building started.
    pub(super) fn learn(&mut self, path: &str, batches: Vec<RecordBatch>, column: &str) -> bool {
        if !self.wants(path) {
            return false;
        }
        let bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
        let limit = self.limit;
        let reserved = IN_FLIGHT.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            (held + bytes * 3 <= limit).then_some(held + bytes * 3)
        });
        if reserved.is_err() {
            if bytes * 3 > limit {
                // It can never fit.
                self.refused.insert(path.to_string());
            }
            // Else a later merge that reads the file tries again.
            return false;
        }
        let guard = InFlight(bytes * 3);
        let column = column.to_string();
        let build = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            FileKeys::build(&batches, &column)
        });
        self.building.insert(path.to_string(), build);
        true
    }

    /// Takes in the entries whose building has finished.
    pub(super) fn settle(&mut self) {
        let done: Vec<String> = self
            .building
            .iter()
            .filter(|(_, build)| build.is_finished())
            .map(|(path, _)| path.clone())
            .collect();
        for path in done {
            let Some(mut build) = self.building.remove(&path) else {
                continue;
            };
            // Polling a finished task can still be refused by tokio's cooperative budget.
            let built = match futures::FutureExt::now_or_never(&mut build) {
                Some(built) => built,
                None => {
                    self.building.insert(path, build);
                    continue;
                }
            };
            self.take_in(path, built);
        }
    }

    /// Leaves file `path` without an entry (its keys could not be read): merges read it.
    pub(super) fn refuse(&mut self, path: &str) {
        self.refused.insert(path.to_string());
    }

    /// How many entries are being built.
    pub(super) fn building(&self) -> usize {
        self.building.len()
    }

    /// Waits for every entry being built, then takes them in (their key columns leave
    /// the in-flight budget).
    pub(super) async fn settle_all(&mut self) {
        for (path, build) in std::mem::take(&mut self.building) {
            let built = build.await;
            self.take_in(path, built);
        }
    }

    fn take_in(&mut self, path: String, built: Result<Option<FileKeys>, tokio::task::JoinError>) {
        let Ok(Some(keys)) = built else {
            self.refused.insert(path);
            return;
        };
        let reserved = USED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            (used + keys.bytes <= self.limit).then_some(used + keys.bytes)
        });
        if reserved.is_ok() {
            // The endpoint may have indexed the file meanwhile (`Published::learn`).
            if let Some(old) = self.files_mut().insert(path, Arc::new(keys)) {
                USED.fetch_sub(old.bytes, Ordering::AcqRel);
            }
        } else {
            self.refused.insert(path);
        }
    }

    /// Drops the entries of files not in `paths` (they left the table).
    pub(super) fn keep_only<'a>(&mut self, paths: impl Iterator<Item = &'a str>) {
        let live: std::collections::HashSet<&str> = paths.collect();
        self.building.retain(|path, _| live.contains(path.as_str()));
        self.refused.retain(|path| live.contains(path.as_str()));
        let mut files = self.files_mut();
        let gone: Vec<String> = files
            .keys()
            .filter(|p| !live.contains(p.as_str()))
            .cloned()
            .collect();
        for path in gone {
            if let Some(keys) = files.remove(&path) {
                USED.fetch_sub(keys.bytes, Ordering::AcqRel);
            }
        }
    }
}

impl Drop for KeyIndex {
    fn drop(&mut self) {
        self.keep_only(std::iter::empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::{Int32Array, Int64Array};
    use deltalake::arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn batch(values: Vec<Option<i64>>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values))]).unwrap()
    }

    #[test]
    fn rows_are_found_in_key_order_and_out_of_it() {
        let sorted = FileKeys::build(
            &[
                batch(vec![Some(-5), Some(3)]),
                batch(vec![Some(7), Some(1 << 40)]),
            ],
            "id",
        )
        .unwrap();
        assert!(sorted.rows.is_none());
        assert_eq!(sorted.row_of(-5), Some(0));
        assert_eq!(sorted.row_of(7), Some(2));
        assert_eq!(sorted.row_of(1 << 40), Some(3));
        assert_eq!(sorted.row_of(4), None);
        let shuffled = FileKeys::build(&[batch(vec![Some(9), Some(-1), Some(4)])], "id").unwrap();
        assert_eq!(shuffled.row_of(9), Some(0));
        assert_eq!(shuffled.row_of(-1), Some(1));
        assert_eq!(shuffled.row_of(4), Some(2));
        assert_eq!(shuffled.row_of(5), None);
    }

    #[test]
    fn repeated_or_null_keys_are_not_indexed() {
        assert!(FileKeys::build(&[batch(vec![Some(2), Some(1), Some(2)])], "id").is_none());
        assert!(FileKeys::build(&[batch(vec![Some(1), None])], "id").is_none());
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
        let narrow =
            RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![3, 1]))]).unwrap();
        assert_eq!(FileKeys::build(&[narrow], "id").unwrap().row_of(3), Some(0));
    }

    async fn settled(index: &mut KeyIndex) {
        while !index.building.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            index.settle();
        }
    }

    #[tokio::test]
    async fn the_budget_is_shared_and_given_back() {
        let dense = vec![batch((0..100_000).map(Some).collect())];
        let mut a = KeyIndex::new(usize::MAX, "mem:///a", "id");
        a.learn("a", dense.clone(), "id");
        settled(&mut a).await;
        assert!(a.get("a").is_some());
        // Dense keys in order take a few KB, not 8 bytes a row.
        assert!(a.get("a").unwrap().bytes < 64 * 1024);
        let mut none = KeyIndex::new(0, "mem:///none", "id");
        none.learn("b", dense, "id");
        settled(&mut none).await;
        assert!(none.get("b").is_none());
        a.keep_only(std::iter::once("x"));
        assert!(a.get("a").is_none());
    }

    #[tokio::test]
    async fn the_endpoint_skips_only_indexed_files_without_the_key() {
        let mut index = KeyIndex::new(usize::MAX, "mem:///t/", "id");
        index.learn("a", vec![batch(vec![Some(1), Some(5), Some(9)])], "id");
        settled(&mut index).await;
        let keys = published("mem:///t").expect("published under its location");
        assert_eq!(keys.column(), "id");
        assert!(keys.may_hold("a", &[5]));
        assert!(keys.may_hold("a", &[2, 9]));
        assert!(!keys.may_hold("a", &[2, 3]));
        // A file without an entry may hold anything.
        assert!(keys.may_hold("b", &[2]));
        // The file left the table: no entry, so it is read.
        index.keep_only(std::iter::empty());
        assert!(keys.may_hold("a", &[2]));
        drop(index);
        drop(keys);
        assert!(published("mem:///t").is_none(), "gone with its table");
    }
}
