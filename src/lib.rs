//! wal2delta: Postgres change-data-capture into Delta Lake tables, exactly once.
//!
//! The pipeline stages are modules: [`source`] (Postgres: control and replication
//! connections, pgoutput decoding), [`apply`] (transaction-aligned batches into Arrow),
//! [`lake`] (Delta tables, positions, checkpoint), [`curated`] (current-state tables kept
//! by merging, and their normalization rules), wired together by [`pipeline`].
//! `main.rs` only parses the command line.

pub mod apply;
pub mod config;
pub mod curated;
pub mod lake;
pub mod lsn;
pub mod ops;
pub mod pg_types;
pub mod pipeline;
pub mod secret;
pub mod serve;
pub mod service;
pub mod source;
pub mod status;
pub mod table_name;
pub mod telemetry;
