//! The TOML configuration file: structure, documented defaults and validation.
//!
//! Every key is listed in the README's configuration reference. Unknown keys are errors
//! (a typo must not silently fall back to a default), and [`Config::validate`] names the
//! field and the rule it breaks.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::secret::Secret;
use crate::source::dsn::ConnParams;
use crate::table_name::TableName;

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    pub lake: LakeConfig,
    #[serde(default)]
    pub apply: ApplyConfig,
    #[serde(default)]
    pub transform: TransformConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub serve: ServeConfig,
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
}

/// `[maintenance]`: compaction and vacuum of the lake's tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Compact a table once it has this many files under 64 MiB; 0: never.
    #[serde(default = "default_compact_min_files")]
    pub compact_min_files: usize,
    /// Seconds between checks (after a batch commit).
    #[serde(default = "default_check_interval")]
    pub check_interval_secs: u64,
    /// Vacuum deletes unreferenced files older than this many hours (fractions allowed).
    #[serde(default = "default_retention_hours")]
    pub vacuum_retention_hours: f64,
    /// Hours between vacuums (fractions allowed); 0: never vacuum.
    #[serde(default = "default_vacuum_interval")]
    pub vacuum_interval_hours: f64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            compact_min_files: default_compact_min_files(),
            check_interval_secs: default_check_interval(),
            vacuum_retention_hours: default_retention_hours(),
            vacuum_interval_hours: default_vacuum_interval(),
        }
    }
}

fn default_compact_min_files() -> usize {
    64
}
fn default_check_interval() -> u64 {
    60
}
fn default_retention_hours() -> f64 {
    168.0
}
fn default_vacuum_interval() -> f64 {
    24.0
}

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
    /// Per-statement memory limit for joins, sorts and aggregates (MiB).
    #[serde(default = "default_query_memory")]
    pub query_memory_mb: u64,
    /// Directory of `<view>.sql` files served as `refined.<view>`; relative paths are
    /// taken from the configuration file's directory. Default: `sql/refined` there.
    pub refined_dir: Option<PathBuf>,
    /// How often `wal2delta serve` looks for new lake versions (milliseconds).
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
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
            refined_dir: None,
            poll_interval_ms: default_poll_ms(),
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
    1024
}
fn default_poll_ms() -> u64 {
    1000
}

/// The validated `[serve]` section.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub listen: std::net::SocketAddr,
    pub users: Vec<(String, crate::serve::auth::ScramVerifier)>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub require_tls: bool,
    pub max_connections: usize,
    pub query_timeout: Option<std::time::Duration>,
    pub query_memory_bytes: usize,
    pub refined_dir: PathBuf,
    pub poll_interval: std::time::Duration,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` serving `/metrics` (e.g. `127.0.0.1:9734`); unset: no endpoint.
    pub listen: Option<String>,
    /// Log a warning when the slot retains more WAL than this (MiB).
    pub retained_wal_warn_mb: Option<u64>,
}

/// `[source]`: the Postgres database to replicate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style URL or key=value string.
    pub dsn: String,
    /// File holding the password (first line; trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Logical replication slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Tables to replicate, as `schema.table` (unquoted names fold to lower case, as in SQL).
    pub tables: Vec<String>,
    /// Create the slot when it does not exist.
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// Create the publication (for exactly `tables`) when it does not exist.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// Seconds between standby status updates sent to Postgres.
    #[serde(default = "default_status_interval")]
    pub status_interval_secs: u64,
    /// `initial`: copy every table's existing rows when a table has no snapshot yet (the
    /// first start, a new slot, a newly configured table); `never`: only stream changes.
    #[serde(default = "default_snapshot")]
    pub snapshot: String,
    /// Connections copying a snapshot in parallel.
    #[serde(default = "default_snapshot_workers")]
    pub snapshot_workers: usize,
    /// Size of the table ranges (in MiB of heap) the snapshot copies as one unit.
    #[serde(default = "default_snapshot_chunk_mb")]
    pub snapshot_chunk_mb: u64,
    /// Seconds between heartbeats (`pg_logical_emit_message`); unset: none.
    pub heartbeat_secs: Option<u64>,
}

/// `[transform]`: normalization rules for the curated tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Tried in order; the first rule whose pattern matches a text column applies.
    #[serde(default = "default_rules")]
    pub rules: Vec<RuleConfig>,
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            rules: default_rules(),
        }
    }
}

/// One `[[transform.rules]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Column-name pattern; `*` matches any run of characters, case-insensitive.
    pub column: String,
    /// `date`, `timestamp` (UTC) or `decimal(p,s)`.
    pub target: String,
    /// strftime formats (dates, timestamps) or `1234.56` / `1.234,56` (decimals), in order.
    pub formats: Vec<String>,
    /// Prefixes removed before parsing (currency symbols).
    #[serde(default)]
    pub strip: Vec<String>,
}

/// The built-in rules: `*data*` text columns hold dates or timestamps, `*valor*` text
/// columns hold amounts.
pub fn default_rules() -> Vec<RuleConfig> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        RuleConfig {
            column: "*data*".into(),
            target: "timestamp".into(),
            formats: s(&[
                "%Y-%m-%d",
                "%d/%m/%Y",
                "%Y-%m-%d %H:%M:%S%#z",
                "%Y-%m-%dT%H:%M:%S%#z",
                "%Y-%m-%dT%H:%M:%SZ",
                "%Y-%m-%d %H:%M:%S",
                "%Y-%m-%dT%H:%M:%S",
                "%d/%m/%Y %H:%M:%S",
            ]),
            strip: vec![],
        },
        RuleConfig {
            column: "*valor*".into(),
            target: "decimal(18,2)".into(),
            formats: s(&["1234.56", "1.234,56"]),
            strip: s(&["R$", "$"]),
        },
    ]
}

/// Whether a missing snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    Initial,
    Never,
}

fn default_snapshot() -> String {
    "initial".into()
}
fn default_snapshot_workers() -> usize {
    4
}
fn default_snapshot_chunk_mb() -> u64 {
    64
}

/// `[lake]`: where the Delta tables live.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeConfig {
    /// A local directory (created if missing) or an object-store URL.
    pub path: String,
}

/// `[apply]`: batching limits. A batch always holds whole source transactions; it is
/// committed when any limit is reached at a transaction boundary.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Rows across all tables that trigger a commit.
    #[serde(default = "default_max_rows")]
    pub max_batch_rows: usize,
    /// Approximate bytes of change data that trigger a commit.
    #[serde(default = "default_max_bytes")]
    pub max_batch_bytes: usize,
    /// Milliseconds after the first change of a batch before it is committed.
    #[serde(default = "default_max_age_ms")]
    pub max_batch_age_ms: u64,
    /// Rows buffered in memory per table before they are streamed into a Parquet file
    /// (still uncommitted). Bounds memory for huge transactions.
    #[serde(default = "default_spill_rows")]
    pub spill_rows: usize,
    /// Bytes of change data buffered in memory per table before they are streamed into a
    /// Parquet file (bounds memory for huge values).
    #[serde(default = "default_spill_bytes")]
    pub spill_bytes: usize,
}

fn yes() -> bool {
    true
}
fn default_status_interval() -> u64 {
    10
}
fn default_max_rows() -> usize {
    100_000
}
fn default_max_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_max_age_ms() -> u64 {
    1000
}
fn default_spill_rows() -> usize {
    131_072
}
fn default_spill_bytes() -> usize {
    32 * 1024 * 1024
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            max_batch_rows: default_max_rows(),
            max_batch_bytes: default_max_bytes(),
            max_batch_age_ms: default_max_age_ms(),
            spill_rows: default_spill_rows(),
            spill_bytes: default_spill_bytes(),
        }
    }
}

/// The configuration could not be read or breaks a rule. The message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration problems:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

/// A validated configuration with the pieces other modules need already parsed.
#[derive(Debug)]
pub struct Settings {
    /// The file these settings came from (for messages naming commands to run).
    pub config_path: Option<PathBuf>,
    pub source: ConnParams,
    pub slot: String,
    pub publication: String,
    pub tables: Vec<TableName>,
    pub create_slot: bool,
    pub create_publication: bool,
    pub status_interval: std::time::Duration,
    pub lake_path: String,
    pub apply: ApplyConfig,
    pub snapshot: SnapshotMode,
    pub snapshot_workers: usize,
    pub snapshot_chunk_bytes: i64,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub retained_wal_warn_bytes: Option<i64>,
    pub normalization: crate::curated::transform::Normalization,
    /// The SQL endpoint; `None` when `serve.listen = "off"`.
    pub serve: Option<ServeSettings>,
    pub maintenance: crate::lake::maintenance::Policy,
    /// Interval of the optional WAL heartbeat.
    pub heartbeat: Option<std::time::Duration>,
}

impl Config {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads, parses and validates a configuration file.
    pub fn load_settings(path: &Path) -> Result<Settings, ConfigError> {
        let mut settings = Config::load(path)?.validate()?;
        settings.config_path = Some(path.to_path_buf());
        if let Some(serve) = settings.serve.as_mut()
            && serve.refined_dir.is_relative()
        {
            let base = path.parent().unwrap_or(Path::new("."));
            serve.refined_dir = base.join(&serve.refined_dir);
        }
        Ok(settings)
    }

    /// Checks every rule and collects every problem, each naming its field.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        let mut source = match ConnParams::parse(&self.source.dsn) {
            Ok(p) => Some(p),
            Err(e) => {
                problems.push(format!("source.dsn: {e}"));
                None
            }
        };
        let password = match (&self.source.password_file, &self.source.password_env) {
            (Some(_), Some(_)) => {
                problems.push(
                    "source.password_file and source.password_env are both set; keep one".into(),
                );
                None
            }
            (Some(file), None) => match std::fs::read_to_string(file) {
                Ok(text) => Some(Secret::new(text.lines().next().unwrap_or("").to_string())),
                Err(e) => {
                    problems.push(format!(
                        "source.password_file: cannot read {}: {e}",
                        file.display()
                    ));
                    None
                }
            },
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) => Some(Secret::new(v)),
                Err(_) => {
                    problems.push(format!(
                        "source.password_env: the environment variable `{var}` is not set"
                    ));
                    None
                }
            },
            (None, None) => None,
        };
        if let (Some(src), Some(pw)) = (source.as_mut(), password) {
            src.password = Some(pw);
        }
        {
            let (field, value) = ("source.slot", &self.source.slot);
            // Slot names: what pg_create_logical_replication_slot accepts.
            let valid = !value.is_empty()
                && value.len() <= 63
                && value
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                problems.push(format!(
                    "{field}: `{value}` is not a valid slot name (1 to 63 characters: lower-case letters, digits, underscore)"
                ));
            }
        }
        if self.source.publication.is_empty() || self.source.publication.len() > 63 {
            problems.push("source.publication: must be 1 to 63 characters long".into());
        }
        let mut tables = Vec::new();
        if self.source.tables.is_empty() {
            problems.push("source.tables: list at least one table, as \"schema.table\"".into());
        }
        for t in &self.source.tables {
            match TableName::parse(t) {
                Ok(name) if tables.contains(&name) => {
                    problems.push(format!("source.tables: `{t}` is listed twice"))
                }
                Ok(name) => tables.push(name),
                Err(e) => problems.push(format!("source.tables: {e}")),
            }
        }
        if self.source.status_interval_secs == 0 || self.source.status_interval_secs > 3600 {
            problems.push("source.status_interval_secs: must be from 1 to 3600".into());
        }
        let snapshot = match self.source.snapshot.as_str() {
            "initial" => SnapshotMode::Initial,
            "never" => SnapshotMode::Never,
            other => {
                problems.push(format!(
                    "source.snapshot: `{other}` is not a snapshot mode; use \"initial\" or \"never\""
                ));
                SnapshotMode::Initial
            }
        };
        if !(1..=64).contains(&self.source.snapshot_workers) {
            problems.push("source.snapshot_workers: must be from 1 to 64".into());
        }
        if !(1..=65536).contains(&self.source.snapshot_chunk_mb) {
            problems.push("source.snapshot_chunk_mb: must be from 1 to 65536".into());
        }
        let metrics_listen = match self.metrics.listen.as_deref().map(str::parse) {
            None => None,
            Some(Ok(addr)) => Some(addr),
            Some(Err(e)) => {
                problems.push(format!(
                    "metrics.listen: `{}` is not a host:port address ({e}); e.g. \"127.0.0.1:9734\"",
                    self.metrics.listen.as_deref().unwrap_or_default()
                ));
                None
            }
        };
        let serve = self.serve.validate(&mut problems);
        if self.source.heartbeat_secs == Some(0) {
            problems
                .push("source.heartbeat_secs: must be at least 1 (or unset: no heartbeat)".into());
        }
        let heartbeat = self
            .source
            .heartbeat_secs
            .map(|s| std::time::Duration::from_secs(s.max(1)));
        let m = &self.maintenance;
        if m.check_interval_secs == 0 {
            problems.push("maintenance.check_interval_secs: must be at least 1".into());
        }
        let hours = |field: &str, h: f64, problems: &mut Vec<String>| {
            if !(0.0..=1e6).contains(&h) {
                problems.push(format!(
                    "maintenance.{field}: must be from 0 to 1000000 hours"
                ));
                return std::time::Duration::ZERO;
            }
            std::time::Duration::from_secs_f64(h * 3600.0)
        };
        let retention = hours(
            "vacuum_retention_hours",
            m.vacuum_retention_hours,
            &mut problems,
        );
        let vacuum_every = hours(
            "vacuum_interval_hours",
            m.vacuum_interval_hours,
            &mut problems,
        );
        let maintenance = crate::lake::maintenance::Policy {
            compact_min_files: m.compact_min_files,
            check_interval: std::time::Duration::from_secs(m.check_interval_secs.max(1)),
            vacuum_retention: (!vacuum_every.is_zero()).then_some(retention),
            vacuum_interval: vacuum_every,
        };
        let mut rules = Vec::new();
        for (i, rule) in self.transform.rules.iter().enumerate() {
            match crate::curated::transform::Rule::from_config(rule) {
                Ok(r) => rules.push(r),
                Err(e) => problems.push(format!("transform.rules[{i}]: {e}")),
            }
        }
        if self.lake.path.trim().is_empty() {
            problems.push("lake.path: must name a directory or an object-store URL".into());
        }
        let a = &self.apply;
        if a.max_batch_rows == 0 {
            problems.push("apply.max_batch_rows: must be at least 1".into());
        }
        if a.max_batch_bytes < 1024 {
            problems.push("apply.max_batch_bytes: must be at least 1024".into());
        }
        if a.max_batch_age_ms == 0 {
            problems.push("apply.max_batch_age_ms: must be at least 1".into());
        }
        if a.spill_rows == 0 {
            problems.push("apply.spill_rows: must be at least 1".into());
        }
        if a.spill_bytes < 1024 {
            problems.push("apply.spill_bytes: must be at least 1024".into());
        }
        match (problems.is_empty(), source) {
            (true, Some(source)) => Ok(Settings {
                config_path: None,
                source,
                slot: self.source.slot,
                publication: self.source.publication,
                tables,
                create_slot: self.source.create_slot,
                create_publication: self.source.create_publication,
                status_interval: std::time::Duration::from_secs(self.source.status_interval_secs),
                lake_path: self.lake.path,
                apply: self.apply,
                snapshot,
                snapshot_workers: self.source.snapshot_workers,
                snapshot_chunk_bytes: (self.source.snapshot_chunk_mb * 1024 * 1024) as i64,
                metrics_listen,
                retained_wal_warn_bytes: self
                    .metrics
                    .retained_wal_warn_mb
                    .map(|mb| (mb.min(1 << 40) * 1024 * 1024) as i64),
                normalization: crate::curated::transform::Normalization {
                    rules,
                    failures: Default::default(),
                },
                serve,
                maintenance,
                heartbeat,
            }),
            _ => Err(ConfigError::Invalid(problems)),
        }
    }
}

impl ServeConfig {
    fn validate(&self, problems: &mut Vec<String>) -> Option<ServeSettings> {
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
        for (i, user) in self.users.iter().enumerate() {
            if user.name.is_empty() {
                problems.push(format!("serve.users[{i}].name: must not be empty"));
            }
            if users.iter().any(|(n, _)| n == &user.name) {
                problems.push(format!(
                    "serve.users[{i}]: user `{}` is listed twice",
                    user.name
                ));
            }
            match user.scram.parse::<crate::serve::auth::ScramVerifier>() {
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
        if self.poll_interval_ms < 10 {
            problems.push("serve.poll_interval_ms: must be at least 10".into());
        }
        Some(ServeSettings {
            listen: listen?,
            users,
            tls,
            require_tls: self.require_tls,
            max_connections: self.max_connections,
            query_timeout: (self.query_timeout_secs > 0)
                .then(|| std::time::Duration::from_secs(self.query_timeout_secs)),
            query_memory_bytes: (self.query_memory_mb.min(1 << 30) * 1024 * 1024) as usize,
            refined_dir: self
                .refined_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("sql/refined")),
            poll_interval: std::time::Duration::from_millis(self.poll_interval_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
        [source]
        dsn = "host=127.0.0.1 user=rep dbname=app"
        slot = "w2d"
        publication = "w2d_pub"
        tables = ["public.a", "sales.\"Big Table\""]
        [lake]
        path = "/tmp/lake"
    "#;

    #[test]
    fn accepts_minimal_config_with_defaults() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.tables.len(), 2);
        assert_eq!(s.tables[1].name, "Big Table");
        assert_eq!(s.apply.max_batch_rows, 100_000);
        assert!(s.create_slot);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&GOOD.replace("[lake]", "[lake]\nsurprise = 1")).unwrap_err();
        assert!(err.contains("surprise"), "{err}");
    }

    #[test]
    fn rules_name_their_field() {
        let err = parse(&GOOD.replace("\"w2d\"", "\"Bad-Slot\"")).unwrap_err();
        assert!(err.contains("source.slot"), "{err}");
        let err =
            parse(&GOOD.replace("[lake]", "[apply]\nmax_batch_rows = 0\n[lake]")).unwrap_err();
        assert!(err.contains("apply.max_batch_rows"), "{err}");
    }
}
