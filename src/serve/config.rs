//! `[serve]`: the SQL endpoint's address, users, TLS and limits, with their documented
//! defaults and validation.

use std::path::PathBuf;

use serde::Deserialize;

use super::auth::ScramVerifier;

/// The default SQL endpoint address: loopback, on a port clear of Postgres (5432, a second
/// Debian cluster on 5433) and PgBouncer (6432).
pub const DEFAULT_SERVE_LISTEN: &str = "127.0.0.1:5480";

/// `[serve]`: the SQL endpoint (Postgres wire protocol over the lake).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// `host:port` to serve on, or `"off"` for no endpoint in `run`.
    #[serde(default = "default_serve_listen")]
    pub listen: String,
    /// Who may connect; empty: anyone, and then only on a loopback address.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// PEM certificate chain and private key; both set: TLS offered.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse clients that do not use TLS.
    #[serde(default)]
    pub require_tls: bool,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Per-statement time limit (seconds; 0: none).
    #[serde(default = "default_query_timeout")]
    pub query_timeout_secs: u64,
    /// Per-statement memory limit for joins, sorts, aggregates and the results of
    /// functions that build large values (MiB).
    #[serde(default = "default_query_memory")]
    pub query_memory_mb: u64,
    /// Memory all statements together may reserve (MiB).
    #[serde(default = "default_memory")]
    pub memory_mb: u64,
    /// Largest single value a statement may build or send (MiB).
    #[serde(default = "default_max_value")]
    pub max_value_mb: u64,
    /// Largest result a statement may send (MiB; 0: no cap).
    #[serde(default)]
    pub max_result_mb: u64,
    /// Directory of `<view>.sql` files served as `refined.<view>`; relative paths are
    /// taken from the configuration file's directory. Default: `sql/refined` there.
    pub refined_dir: Option<PathBuf>,
    /// How often `wal2delta serve` looks for new lake versions (milliseconds).
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Schema of the raw change logs of source schema `public`; those of schema S are in
    /// `<raw_schema>_S`.
    #[serde(default = "default_raw_schema")]
    pub raw_schema: String,
    /// Schema of the refined views.
    #[serde(default = "default_refined_schema")]
    pub refined_schema: String,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: default_serve_listen(),
            users: Vec::new(),
            tls_cert: None,
            tls_key: None,
            require_tls: false,
            max_connections: default_max_connections(),
            query_timeout_secs: default_query_timeout(),
            query_memory_mb: default_query_memory(),
            memory_mb: default_memory(),
            max_value_mb: default_max_value(),
            max_result_mb: 0,
            refined_dir: None,
            poll_interval_ms: default_poll_ms(),
            raw_schema: default_raw_schema(),
            refined_schema: default_refined_schema(),
        }
    }
}

/// `[[serve.users]]`: a user and the SCRAM-SHA-256 verifier of their password, as printed
/// by `wal2delta hash-password`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub scram: String,
    /// Served tables the user may read (`schema.table`, `schema.*`); absent: all.
    pub tables: Option<Vec<String>>,
}

fn default_serve_listen() -> String {
    DEFAULT_SERVE_LISTEN.to_string()
}
fn default_max_connections() -> usize {
    64
}
fn default_query_timeout() -> u64 {
    300
}
fn default_query_memory() -> u64 {
    256
}
fn default_memory() -> u64 {
    512
}
fn default_max_value() -> u64 {
    64
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_raw_schema() -> String {
    super::namespace::DEFAULT_RAW_SCHEMA.to_string()
}
fn default_refined_schema() -> String {
    super::namespace::DEFAULT_REFINED_SCHEMA.to_string()
}

/// The validated `[serve]` section.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub listen: std::net::SocketAddr,
    pub users: Vec<(String, ScramVerifier)>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub require_tls: bool,
    pub max_connections: usize,
    pub query_timeout: Option<std::time::Duration>,
    pub query_memory_bytes: usize,
    /// `serve.memory_mb` in bytes.
    pub memory_bytes: usize,
    pub output: super::budget::Output,
    pub refined_dir: PathBuf,
    /// `serve.refined_dir` was set: a missing directory is a mistake, not "no views".
    pub refined_dir_set: bool,
    pub poll_interval: std::time::Duration,
    /// Where each lake table is served.
    pub namespace: super::namespace::Namespace,
    /// Users restricted to some tables (`[[serve.users]] tables`).
    pub grants: std::collections::HashMap<String, std::sync::Arc<super::grants::Grants>>,
}

impl ServeConfig {
    /// Checks the section (problems name `serve.<field>`); `None` when the endpoint is
    /// off or its address does not parse.
    pub fn validate(&self, problems: &mut Vec<String>) -> Option<ServeSettings> {
        if self.listen == "off" {
            return None;
        }
        let listen: Option<std::net::SocketAddr> = match self.listen.parse() {
            Ok(a) => Some(a),
            Err(e) => {
                problems.push(format!(
                    "serve.listen: `{}` is not a host:port address ({e}); e.g. \"{DEFAULT_SERVE_LISTEN}\", or \"off\"",
                    self.listen
                ));
                None
            }
        };
        let mut users = Vec::new();
        let mut grants = std::collections::HashMap::new();
        for (i, user) in self.users.iter().enumerate() {
            if let Some(tables) = &user.tables {
                match super::grants::Grants::parse(tables) {
                    Ok(g) => {
                        grants.insert(user.name.clone(), std::sync::Arc::new(g));
                    }
                    Err(e) => problems.push(format!(
                        "serve.users[{i}].tables: {e}; or schema.* for a whole schema"
                    )),
                }
            }
            if user.name.is_empty() {
                problems.push(format!("serve.users[{i}].name: must not be empty"));
            }
            if users.iter().any(|(n, _)| n == &user.name) {
                problems.push(format!(
                    "serve.users[{i}]: user `{}` is listed twice",
                    user.name
                ));
            }
            match user.scram.parse::<ScramVerifier>() {
                Ok(v) => users.push((user.name.clone(), v)),
                Err(e) => problems.push(format!(
                    "serve.users[{i}].scram: {e}; `wal2delta hash-password` prints one"
                )),
            }
        }
        if let Some(addr) = listen
            && self.users.is_empty()
            && !addr.ip().is_loopback()
        {
            problems.push(format!(
                "serve.listen: {addr} is not a loopback address and no [[serve.users]] are \
                 configured, so anyone who reaches the port could read the lake; add users \
                 (`wal2delta hash-password` prints a verifier) or listen on 127.0.0.1"
            ));
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                problems.push("serve.tls_cert and serve.tls_key: set both (TLS) or neither".into());
                None
            }
        };
        if self.require_tls && tls.is_none() {
            problems.push("serve.require_tls: needs serve.tls_cert and serve.tls_key".into());
        }
        if self.max_connections == 0 || self.max_connections > 10_000 {
            problems.push("serve.max_connections: must be from 1 to 10000".into());
        }
        if self.query_memory_mb == 0 {
            problems.push("serve.query_memory_mb: must be at least 1".into());
        }
        if self.memory_mb < self.query_memory_mb {
            problems.push(format!(
                "serve.memory_mb ({}) is less than serve.query_memory_mb ({}): all statements together would have less memory than one; raise serve.memory_mb or lower serve.query_memory_mb",
                self.memory_mb, self.query_memory_mb
            ));
        }
        if self.max_value_mb == 0 || self.max_value_mb > 1024 {
            problems.push("serve.max_value_mb: must be from 1 to 1024 (Postgres's own cap on a value is 1 GB)".into());
        }
        if self.poll_interval_ms < 10 {
            problems.push("serve.poll_interval_ms: must be at least 10".into());
        }
        for (field, name) in [
            ("raw_schema", &self.raw_schema),
            ("refined_schema", &self.refined_schema),
        ] {
            if name.is_empty() || name.starts_with("pg_") || name == "information_schema" {
                problems.push(format!(
                    "serve.{field}: `{name}` cannot name a schema (empty, `pg_…` and \
                     information_schema are Postgres's own)"
                ));
            }
        }
        if self.refined_schema == self.raw_schema
            || self
                .refined_schema
                .starts_with(&format!("{}_", self.raw_schema))
        {
            problems.push(format!(
                "serve.refined_schema: `{}` is a raw change-log schema (serve.raw_schema is \
                 `{}`); choose another name",
                self.refined_schema, self.raw_schema
            ));
        }
        Some(ServeSettings {
            listen: listen?,
            users,
            tls,
            require_tls: self.require_tls,
            max_connections: self.max_connections,
            query_timeout: (self.query_timeout_secs > 0)
                .then(|| std::time::Duration::from_secs(self.query_timeout_secs)),
            query_memory_bytes: super::budget::mib(self.query_memory_mb),
            memory_bytes: super::budget::mib(self.memory_mb),
            output: super::budget::Output {
                max_value: super::budget::mib(self.max_value_mb),
                max_result: (self.max_result_mb > 0)
                    .then(|| super::budget::mib(self.max_result_mb)),
            },
            refined_dir: self
                .refined_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("sql/refined")),
            refined_dir_set: self.refined_dir.is_some(),
            poll_interval: std::time::Duration::from_millis(self.poll_interval_ms),
            namespace: super::namespace::Namespace::new(&self.raw_schema, &self.refined_schema),
            grants,
        })
    }
}
