//! Integration tests: the real daemon binary against real PostgreSQL clusters started by
//! `testcontainers/pg.sh`, reading back real Delta tables. One test binary, so linking
//! happens once.

mod azurite;
mod cli;
mod curated;
mod deletion_vectors;
mod failover;
mod faults;
mod harness;
mod init;
mod jdbc;
mod lookups;
mod maintenance;
mod memory;
mod neighbour;
mod object_storage;
mod ops;
mod partitioned;
mod progress;
mod raw_changes;
mod readers;
mod row_filters;
mod s3_server;
mod secrets;
mod service;
mod sql;
mod standby;
mod stops;
mod telemetry;
mod tls;
mod verify;
mod watermark;
