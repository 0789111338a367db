//! Deletion vectors: marking rows of a curated data file deleted with a small bitmap
//! instead of rewriting the file (Delta protocol, table feature `deletionVectors`).
//!
//! # Design
//! - **The protocol's format, the kernel's code.** A DV is a RoaringBitmap of row
//!   positions in the portable 64-bit format; the delta kernel's writer frames it (version
//!   byte, big-endian size, magic, big-endian CRC-32) and its reader reads every storage
//!   type (`u`, `i`, `p`), so what we write is what every kernel-based reader reads.
//! - **One DV file per commit.** A batch's new DVs go into one `deletion_vector_<uuid>.bin`
//!   at the table root, written before the commit that references it (storage type `u`:
//!   the UUID in z85). A crash in between leaves an unreferenced file, which vacuum removes.
//! - **Same path, new DV.** A file that loses rows is committed as `remove` (with its old
//!   DV) plus `add` of the same path with the union of old and new positions; its stats
//!   stay those of the physical file (`numRecords` counts every row), marked
//!   `tightBounds: false`. A file whose every row is deleted is only removed.
//! - **Vacuum keeps what time travel needs**: a DV file no current version references,
//!   or a data file whose earlier same-path `remove`s have expired, may still be read by
//!   a version within the retention; `lake::maintenance::vacuum` keeps them (delta-rs's
//!   full vacuum does not).

use delta_kernel::actions::deletion_vector_writer::{
    KernelDeletionVector, StreamingDeletionVectorWriter,
};
use deltalake::kernel::{DeletionVectorDescriptor, StorageType};
use deltalake::{DeltaTable, DeltaTableError};
use object_store::{ObjectStoreExt, PutPayload};
use roaring::RoaringTreemap;

/// The table property that turns the feature on.
pub const ENABLE: &str = "delta.enableDeletionVectors";

/// Whether the table's protocol has the `deletionVectors` feature (readers must apply
/// DVs; writers may add them).
pub fn supported(table: &DeltaTable) -> bool {
    let Ok(snapshot) = table.snapshot() else {
        return false;
    };
    let protocol = snapshot.protocol();
    protocol.min_reader_version() >= 3
        && protocol
            .reader_features()
            .is_some_and(|f| f.iter().any(|f| f.as_ref() == "deletionVectors"))
}

/// Whether writers may add DVs to the table: the feature, and the property `true` (a
/// table whose property was set `false` gets it back when the switch is on).
pub fn enabled(table: &DeltaTable) -> bool {
    supported(table)
        && table.snapshot().is_ok_and(|s| {
            s.metadata()
                .configuration()
                .get(ENABLE)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        })
}

/// Turns the feature on for `table` (protocol reader 3 / writer 7 and the property), in
/// one commit.
pub async fn enable(table: &mut DeltaTable) -> Result<(), DeltaTableError> {
    super::lock::fence().map_err(|e| DeltaTableError::Generic(e.to_string()))?;
    let upgraded = table
        .clone()
        .set_tbl_properties()
        .with_properties([(ENABLE.to_string(), "true".to_string())].into())
        .with_commit_properties(super::maintenance::no_log_cleanup())
        .await?;
    *table = upgraded;
    Ok(())
}

/// The positions a file's DV marks deleted.
pub async fn read(
    table: &DeltaTable,
    dv: &DeletionVectorDescriptor,
) -> Result<RoaringTreemap, DeltaTableError> {
    let descriptor: delta_kernel::actions::deletion_vector::DeletionVectorDescriptor = dv
        .clone()
        .try_into()
        .map_err(|e: delta_kernel::Error| DeltaTableError::Generic(e.to_string()))?;
    let storage = table.log_store().engine(None).storage_handler();
    let root = table.table_url().clone();
    tokio::task::spawn_blocking(move || descriptor.read(storage, &root))
        .await
        .map_err(|e| DeltaTableError::Generic(format!("reading a deletion vector: {e}")))?
        .map_err(|e| DeltaTableError::Generic(format!("reading a deletion vector: {e}")))
}

/// Writes `dvs` into one new DV file of `table`; their descriptors, in order.
pub async fn write(
    table: &DeltaTable,
    dvs: &[&RoaringTreemap],
) -> Result<Vec<DeletionVectorDescriptor>, DeltaTableError> {
    let uuid = uuid::Uuid::new_v4();
    let mut bytes: Vec<u8> = Vec::new();
    let mut results = Vec::with_capacity(dvs.len());
    {
        let mut writer = StreamingDeletionVectorWriter::new(&mut bytes);
        for dv in dvs {
            let mut kernel = KernelDeletionVector::new();
            kernel.add_deleted_row_indexes(dv.iter());
            results.push(
                writer
                    .write_deletion_vector(kernel)
                    .map_err(|e| DeltaTableError::Generic(e.to_string()))?,
            );
        }
        writer
            .finalize()
            .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
    }
    let path = deltalake::Path::from(file_name(&uuid).as_str());
    table
        .object_store()
        .put(&path, PutPayload::from(bytes))
        .await?;
    let encoded = z85::encode(uuid.as_bytes());
    Ok(results
        .into_iter()
        .map(|r| DeletionVectorDescriptor {
            storage_type: StorageType::UuidRelativePath,
            path_or_inline_dv: encoded.clone(),
            offset: Some(r.offset),
            size_in_bytes: r.size_in_bytes,
            cardinality: r.cardinality,
        })
        .collect())
}

/// The file a `u` DV with no prefix lives in, relative to the table root.
fn file_name(uuid: &uuid::Uuid) -> String {
    format!("deletion_vector_{uuid}.bin")
}

/// The table-relative file of a DV stored as a file next to the data (`u`).
pub fn relative_file(dv: &DeletionVectorDescriptor) -> Option<String> {
    if dv.storage_type != StorageType::UuidRelativePath || dv.path_or_inline_dv.len() < 20 {
        return None;
    }
    let (prefix, encoded) = dv
        .path_or_inline_dv
        .split_at(dv.path_or_inline_dv.len() - 20);
    let bytes = z85::decode(encoded).ok()?;
    let uuid = uuid::Uuid::from_slice(&bytes).ok()?;
    Some(if prefix.is_empty() {
        file_name(&uuid)
    } else {
        format!("{prefix}/{}", file_name(&uuid))
    })
}

/// A file's statistics with the bounds marked loose: after rows are deleted its min and
/// max may be wider than the rows left (the protocol's `tightBounds: false`).
pub fn loose_stats(stats: Option<&str>) -> Option<String> {
    let mut value: serde_json::Value = serde_json::from_str(stats?).ok()?;
    value
        .as_object_mut()?
        .insert("tightBounds".into(), serde_json::Value::Bool(false));
    Some(value.to_string())
}

/// The physical row count in a file's statistics.
pub fn num_records(stats: Option<&str>) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(stats?).ok()?;
    value.get("numRecords")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_descriptor_names_its_file_and_stats_turn_loose() {
        let uuid = uuid::Uuid::new_v4();
        let dv = DeletionVectorDescriptor {
            storage_type: StorageType::UuidRelativePath,
            path_or_inline_dv: z85::encode(uuid.as_bytes()),
            offset: Some(1),
            size_in_bytes: 10,
            cardinality: 2,
        };
        assert_eq!(relative_file(&dv).unwrap(), file_name(&uuid));
        let stats = loose_stats(Some(r#"{"numRecords":3,"minValues":{"id":1}}"#)).unwrap();
        assert!(stats.contains(r#""tightBounds":false"#), "{stats}");
        assert_eq!(num_records(Some(&stats)), Some(3));
    }

    #[test]
    fn kernel_framing_round_trips_through_the_kernel_reader_format() {
        let mut bytes = Vec::new();
        let mut writer = StreamingDeletionVectorWriter::new(&mut bytes);
        let mut dv = KernelDeletionVector::new();
        dv.add_deleted_row_indexes([0u64, 5, 1 << 33]);
        let r = writer.write_deletion_vector(dv).unwrap();
        writer.finalize().unwrap();
        assert_eq!((r.offset, r.cardinality), (1, 3));
        assert_eq!(bytes[0], 1, "version byte");
        let size = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(size as i32, r.size_in_bytes);
        let magic = u32::from_le_bytes(bytes[5..9].try_into().unwrap());
        assert_eq!(magic, 1681511377);
        let back = RoaringTreemap::deserialize_from(&bytes[9..5 + size]).unwrap();
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![0, 5, 1 << 33]);
    }
}
