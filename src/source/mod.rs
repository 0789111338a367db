//! Source: everything that talks to Postgres.
//!
//! - [`config`] is the `[source]` section; [`dsn`] parses connection strings; [`tls`]
//!   builds fail-closed TLS settings;
//! - [`catalog`] is the control connection (tokio-postgres) for checks and set-up SQL;
//! - [`replication`] speaks the streaming replication protocol itself;
//! - [`pgoutput`] decodes the logical replication messages into the change model;
//! - [`snapshot`] copies tables as of a slot's exported snapshot; [`watermark`] copies
//!   them in key-ordered chunks while the stream runs;
//! - [`stream`] is the task that reads the stream and reports progress; [`spill`] keeps
//!   the transactions the server streams before their commit;
//! - [`sqlstate`] names the server error codes we act on, and [`diagnosis`] turns a
//!   refusal into the slot or publication problem and its fix.
//!
//! The source depends only on the leaves (`change`, `lsn`, `table_name`, `pg_types`,
//! `secret`, `telemetry`): it produces [`crate::change::SourceEvent`]s and never knows
//! how they are stored.

pub mod catalog;
pub mod config;
mod copy_binary;
pub mod cursor;
pub mod diagnosis;
pub mod dsn;
pub mod pgoutput;
pub mod replication;
pub mod snapshot;
pub mod spill;
pub mod sqlstate;
pub mod stream;
pub mod tls;
pub mod watermark;
