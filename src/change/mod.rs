//! The change model every stage shares: what a change is, where it sits in the source
//! stream, and the shape of a source column.
//!
//! A leaf: it depends only on other leaves (`lsn`, `pg_types`). The source stage produces
//! [`SourceEvent`]s, apply consumes them, and the lake's raw layout encodes changes with
//! the metadata listed in [`METADATA_COLUMNS`]; none of them owns these types.
//!
//! - [`message`]: the decoded pgoutput messages (the stream's vocabulary);
//! - [`Op`]: the change kinds tagged in `_op`;
//! - [`ChangeMeta`]: a change's place in the stream;
//! - [`ColumnSpec`]: a source column as the lake stores it;
//! - [`ChangeEncoder`]: how a producer (the snapshot's copy tasks) encodes rows without
//!   knowing the storage layout that implements it.

pub mod message;

use std::fmt;

use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;

use crate::lsn::Lsn;
use crate::pg_types::ColumnKind;
use message::{OldTuple, PgOutputMessage, Tuple};

/// The kind of a change, as tagged in the raw tables' `_op` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// `c`: a row was inserted (created).
    Insert,
    /// `u`: a row was updated.
    Update,
    /// `d`: a row was deleted.
    Delete,
    /// `t`: the table was truncated.
    Truncate,
    /// `r`: a row read by the initial snapshot.
    Read,
}

impl Op {
    /// The one-letter code stored in `_op`.
    pub const fn code(self) -> &'static str {
        match self {
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
            Op::Read => "r",
        }
    }

    /// The op an `_op` code stands for; `None` for anything else.
    pub fn from_code(code: &str) -> Option<Op> {
        Some(match code {
            "c" => Op::Insert,
            "u" => Op::Update,
            "d" => Op::Delete,
            "t" => Op::Truncate,
            "r" => Op::Read,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A Postgres transaction id (32 bits, as pgoutput sends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Xid(pub u32);

impl fmt::Display for Xid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A relation's OID as the stream names it (in Relation, Insert, Update, … messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RelId(pub u32);

impl fmt::Display for RelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A table's `REPLICA IDENTITY`: which old values updates and deletes carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key (none without one).
    Default,
    /// `n`: nothing; updates and deletes cannot be identified.
    Nothing,
    /// `f`: the whole old row.
    Full,
    /// `i`: the columns of one unique index.
    Index,
    /// A code this version does not know (kept, never guessed at).
    Other(u8),
}

impl ReplicaIdentity {
    /// From `pg_class.relreplident` / the Relation message's byte.
    pub fn from_code(code: u8) -> ReplicaIdentity {
        match code {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            other => ReplicaIdentity::Other(other),
        }
    }

    /// The one-byte code Postgres uses.
    pub fn code(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
            ReplicaIdentity::Other(c) => c,
        }
    }
}

/// Names of the metadata columns every raw change row carries after the source columns
/// (in this order). A source column may not take one of these names.
pub const METADATA_COLUMNS: [&str; 9] = [
    "_op",
    "_commit_lsn",
    "_lsn",
    "_commit_ts",
    "_xid",
    "_seq",
    "_before",
    "_unchanged_toast",
    "_fallback",
];

/// A source column as the lake stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnSpec {
    pub name: String,
    pub kind: ColumnKind,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Where one change sits in the source stream.
#[derive(Debug, Clone, Copy)]
pub struct ChangeMeta {
    /// Commit LSN of the change's transaction (the snapshot's consistent point for reads).
    pub commit_lsn: Lsn,
    /// WAL position the change was sent at.
    pub lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts: i64,
    pub xid: Xid,
    /// Position of the change in its transaction (in the snapshot, in the table's copy).
    pub seq: i64,
}

/// What the source stage hands to apply, in stream order.
#[derive(Debug)]
pub enum SourceEvent {
    /// Decoded pgoutput messages in stream order, each with the WAL position it was sent
    /// at: as many as the source had ready together (one channel hand-over each, not one
    /// per message). `budget` holds their share of the in-flight byte budget until apply
    /// drops the event.
    Messages {
        messages: Vec<(Lsn, PgOutputMessage)>,
        budget: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    /// A server keepalive: everything before `wal_end` has been sent.
    Keepalive { wal_end: Lsn },
}

/// Encodes change rows into Arrow batches of one table's storage layout. Producers that
/// encode in their own tasks (the snapshot's parallel copies) take an encoder from the
/// pipeline, which hands them the lake's raw layout.
pub trait ChangeEncoder: Send + 'static {
    /// Appends one change. `positions[i]` is the index in `row` of stored column `i`
    /// (`None`: the row does not have it). Returns how many values had no typed form.
    fn append(
        &mut self,
        op: Op,
        meta: ChangeMeta,
        row: Option<&Tuple>,
        positions: &[Option<usize>],
        before: Option<&OldTuple>,
    ) -> usize;
    /// Appends one row of text values borrowed from where they were read (`None`: NULL),
    /// `positions` as for [`ChangeEncoder::append`]. Returns the same count.
    fn append_text(
        &mut self,
        op: Op,
        meta: ChangeMeta,
        values: &[Option<std::borrow::Cow<'_, [u8]>>],
        positions: &[Option<usize>],
    ) -> usize;
    /// Appends one row of binary COPY values (`None`: NULL), `types[j]` reading copied
    /// value `j`, `positions` as for [`ChangeEncoder::append`]. Returns the same count,
    /// or the stored column whose value is not one of its type.
    fn append_binary(
        &mut self,
        op: Op,
        meta: ChangeMeta,
        values: &[Option<&[u8]>],
        types: &[crate::pg_binary::BinaryType],
        positions: &[Option<usize>],
    ) -> Result<usize, usize>;
    /// Rows buffered.
    fn rows(&self) -> usize;
    /// Approximate bytes buffered.
    fn bytes(&self) -> usize;
    /// Takes the buffered rows as one batch and starts empty again.
    fn finish(&mut self) -> Result<RecordBatch, ArrowError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_codes_round_trip() {
        for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate, Op::Read] {
            assert_eq!(Op::from_code(op.code()), Some(op));
        }
        assert_eq!(Op::from_code("x"), None);
    }

    #[test]
    fn replica_identity_keeps_unknown_codes() {
        for code in [b'd', b'n', b'f', b'i', b'z'] {
            assert_eq!(ReplicaIdentity::from_code(code).code(), code);
        }
    }
}
