//! The curated table's file index: every data file with the key range its statistics
//! give, so a merge reads only the files that may hold a changed key.
//!
//! A file is a **candidate** for a chunk of changes when the min/max statistics of the
//! first key column admit one of the chunk's keys (integer and text keys; other key types
//! make every file a candidate). Files written by the open batch are indexed too, so a
//! later chunk of the same batch finds rows an earlier chunk wrote.

use deltalake::arrow::array::{Array, AsArray, Int64Array};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::DataType;
use deltalake::arrow::error::ArrowError;
use deltalake::kernel::{Add, Remove};
use roaring::RoaringTreemap;

use super::CuratedTable;
use super::reduce::Reduced;
use crate::lake::LakeError;
use crate::pg_types::ColumnKind;

/// A key value usable for min/max pruning.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
pub(super) enum KeyScalar {
    Int(i64),
    Str(String),
}

/// One data file of the table, committed or written by the open batch.
pub(super) struct DataFile {
    pub(super) path: String,
    /// Min and max of the first key column, when known.
    pub(super) range: Option<(KeyScalar, KeyScalar)>,
    pub(super) state: FileState,
}

pub(super) enum FileState {
    /// In the table.
    Committed(Committed),
    /// Written by the open batch; the action that adds it.
    New(Add),
}

/// A file in the table, as its `add` action is in the log (with its deletion vector).
pub(super) struct Committed {
    pub(super) add: Add,
    /// The row positions deleted: read from its DV when first needed, grown by the open
    /// batch.
    pub(super) deleted: Option<RoaringTreemap>,
    /// The open batch deleted rows of it (by deletion vector).
    pub(super) changed: bool,
}

impl Committed {
    pub(super) fn new(add: Add) -> Committed {
        Committed {
            add,
            deleted: None,
            changed: false,
        }
    }

    /// The action that removes the file as the log has it.
    pub(super) fn remove(&self) -> Remove {
        remove_for(&self.add)
    }
}

impl DataFile {
    /// Whether the file may hold one of `keys` (sorted first-key values); always true
    /// when the file's range or the keys are unknown.
    pub(super) fn may_hold(&self, keys: Option<&[KeyScalar]>) -> bool {
        let (Some(values), Some((min, max))) = (keys, &self.range) else {
            return true;
        };
        let start = values.partition_point(|v| v < min);
        values.get(start).is_some_and(|v| v <= max)
    }
}

impl CuratedTable {
    pub(super) fn load_files(&mut self) -> Result<(), LakeError> {
        let snapshot = self.table.snapshot().map_err(self.delta_err())?;
        let mut files = Vec::new();
        for view in snapshot.log_data().iter() {
            let add = Add {
                path: view.path().to_string(),
                partition_values: view.partition_values_map(),
                size: view.size(),
                modification_time: view.modification_time(),
                data_change: true,
                stats: view.stats(),
                tags: None,
                deletion_vector: view.deletion_vector_descriptor(),
                base_row_id: None,
                default_row_commit_version: None,
                clustering_provider: None,
            };
            files.push(DataFile {
                path: add.path.clone(),
                range: add.stats.as_deref().and_then(|s| self.key_range(s)),
                state: FileState::Committed(Committed::new(add)),
            });
        }
        self.files = files;
        self.key_index
            .keep_only(self.files.iter().map(|f| f.path.as_str()));
        Ok(())
    }

    /// The first key column's min and max from a file's statistics JSON.
    pub(super) fn key_range(&self, stats: &str) -> Option<(KeyScalar, KeyScalar)> {
        let col = &self.columns[self.key[0]];
        let stats: serde_json::Value = serde_json::from_str(stats).ok()?;
        let get = |side: &str| -> Option<KeyScalar> {
            let v = stats.get(side)?.get(&col.name)?;
            match col.kind {
                ColumnKind::Int64 => v.as_i64().map(KeyScalar::Int),
                ColumnKind::Text => v.as_str().map(|s| KeyScalar::Str(s.to_string())),
                _ => None,
            }
        };
        Some((get("minValues")?, get("maxValues")?))
    }

    /// The first key column of every affected key, sorted, when pruning can use it.
    pub(super) fn key_scalars(
        &self,
        reduced: &Reduced,
    ) -> Result<Option<Vec<KeyScalar>>, ArrowError> {
        let kind = &self.columns[self.key[0]].kind;
        if !matches!(kind, ColumnKind::Int64 | ColumnKind::Text) || reduced.keys.is_empty() {
            return Ok(None);
        }
        let parser = self.converter.parser();
        let arrays = self
            .converter
            .convert_rows(reduced.keys.iter().map(|k| parser.parse(k)))?;
        let first = cast(&arrays[0], &DataType::Int64).ok();
        let mut values: Vec<KeyScalar> = match kind {
            ColumnKind::Text => arrays[0]
                .as_string_opt::<i32>()
                .map(|a| {
                    a.iter()
                        .flatten()
                        .map(|s| KeyScalar::Str(s.to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            _ => first
                .as_ref()
                .and_then(|a| a.as_any().downcast_ref::<Int64Array>())
                .map(|a| a.iter().flatten().map(KeyScalar::Int).collect())
                .unwrap_or_default(),
        };
        if values.len() != reduced.keys.len() {
            // NULL keys (identity FULL without a primary key): no pruning.
            return Ok(None);
        }
        values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        Ok(Some(values))
    }
}

/// The action that removes the file `add` added (with the deletion vector it has).
pub(super) fn remove_for(add: &Add) -> Remove {
    Remove {
        path: add.path.clone(),
        data_change: true,
        deletion_timestamp: Some(chrono::Utc::now().timestamp_millis()),
        extended_file_metadata: Some(true),
        partition_values: Some(add.partition_values.clone()),
        size: Some(add.size),
        tags: None,
        deletion_vector: add.deletion_vector.clone(),
        base_row_id: None,
        default_row_commit_version: None,
    }
}
