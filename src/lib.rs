//! wal2delta: Postgres change-data-capture into Delta Lake tables, exactly once.
//!
//! The pipeline stages are modules: [`source`] (Postgres: control and replication
//! connections, pgoutput decoding, snapshots), [`apply`] (transaction-aligned batches,
//! schema changes, normalization), [`lake`] (every Delta table format, the one commit
//! path, positions, checkpoint) and [`serve`] (the SQL endpoint), wired together by
//! [`pipeline`]; [`ops`], [`status`], [`verify`] and [`resync`] are the operator commands. They share the leaves:
//! [`change`] (the change model), [`lsn`], [`table_name`], [`pg_types`],
//! [`pg_binary`], [`secret`],
//! [`telemetry`] and [`service`]. Imports run one way, from the top down to the leaves
//! (`docs/architecture.md`). `main.rs` only parses the command line.

pub mod apply;
pub mod change;
pub mod config;
pub mod crash_point;
pub mod init;
pub mod lake;
pub mod lsn;
pub mod ops;
pub mod pg_binary;
pub mod pg_types;
pub mod pipeline;
pub mod resync;
pub mod secret;
pub mod serve;
pub mod service;
pub mod source;
pub mod status;
pub mod table_name;
pub mod telemetry;
pub mod verify;
