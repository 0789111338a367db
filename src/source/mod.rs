//! Source: everything that talks to Postgres.
//!
//! - [`dsn`] parses connection strings; [`tls`] builds fail-closed TLS settings;
//! - [`catalog`] is the control connection (tokio-postgres) for checks and set-up SQL;
//! - [`replication`] speaks the streaming replication protocol itself;
//! - [`pgoutput`] decodes the logical replication messages;
//! - [`snapshot`] copies tables as of a slot's exported snapshot;
//! - [`stream`] is the task that reads the stream and reports progress.

pub mod catalog;
pub mod cursor;
pub mod dsn;
pub mod pgoutput;
pub mod replication;
pub mod snapshot;
pub mod stream;
pub mod tls;
