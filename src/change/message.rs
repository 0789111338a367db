//! The decoded replication stream: pgoutput messages as the source stage hands them on.
//!
//! The decoder lives in `source::pgoutput`; these types are shared by every stage that
//! reads changes (apply, the raw layout, the snapshot), so they live in the change model.
//! Column values stay in Postgres's text output form as slices of the received payload.

use bytes::Bytes;

use super::{RelId, ReplicaIdentity, Xid};
use crate::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutputMessage {
    Begin {
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_ts: i64,
        xid: Xid,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relid: RelId,
        new: Tuple,
    },
    Update {
        relid: RelId,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relid: RelId,
        old: OldTuple,
    },
    Truncate {
        options: u8,
        relids: Vec<RelId>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

/// A Relation message: the shape of a table as the stream will send it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub relid: RelId,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One column value in a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value that did not change; its value is not in the stream.
    UnchangedToast,
    /// The value in Postgres's text output format.
    Text(Bytes),
}

/// All column values of a row, in relation column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuple(pub Vec<TupleValue>);

/// The old row image sent with updates and deletes.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// Replica identity columns only (other columns are Null).
    Key(Tuple),
    /// The whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}
