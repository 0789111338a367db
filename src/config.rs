//! The TOML configuration file: its structure, and the validated [`Settings`].
//!
//! Every key is listed in docs/configuration.md (Configuration reference). Unknown keys are errors
//! (a typo must not silently fall back to a default). Each stage owns its section — its
//! fields, defaults and checks — and [`Config::validate`] collects every section's
//! problems, each naming its field and the rule it breaks.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::apply::config::ApplyConfig;
use crate::apply::normalize::{Normalization, TransformConfig};
use crate::lake::curated::CuratedConfig;
use crate::lake::maintenance::{MaintenanceConfig, Policy};
use crate::lake::{LakeConfig, LakeSettings};
use crate::serve::config::{ServeConfig, ServeSettings};
use crate::source::config::{SourceConfig, SourceSettings};
use crate::telemetry::MetricsConfig;

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
    #[serde(default)]
    pub curated: CuratedConfig,
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
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file these settings came from (for messages naming commands to run).
    pub config_path: Option<PathBuf>,
    /// `[source]`: the database, slot, publication, tables and snapshot settings.
    pub source: SourceSettings,
    /// `[lake]`: where the tables live and how to reach the store.
    pub lake: LakeSettings,
    pub apply: ApplyConfig,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub retained_wal_warn_bytes: Option<i64>,
    pub normalization: Normalization,
    /// The SQL endpoint; `None` when `serve.listen = "off"`.
    pub serve: Option<ServeSettings>,
    pub maintenance: Policy,
    /// `[curated]`: how curated tables are written.
    pub curated: CuratedConfig,
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
        if let Some(serve) = &settings.serve
            && serve.refined_dir_set
            && !serve.refined_dir.is_dir()
        {
            return Err(ConfigError::Invalid(vec![format!(
                "serve.refined_dir: {} is not a directory; create it, correct the path, or \
                 remove the key to serve no refined views",
                serve.refined_dir.display()
            )]));
        }
        Ok(settings)
    }

    /// Checks every section and collects every problem, each naming its field.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        let lake = self.lake.validate(&mut problems);
        let source = self.source.validate(&lake.path, &mut problems);
        let (metrics_listen, retained_wal_warn_bytes) = self.metrics.validate(&mut problems);
        let serve = self.serve.validate(&mut problems);
        let maintenance = self.maintenance.validate(&mut problems);
        let normalization = self.transform.validate(&mut problems);
        self.apply.validate(&mut problems);
        if let (Some(source), Some(serve)) = (&source, &serve) {
            problems.extend(serve.namespace.clashes(&source.tables));
        }
        match (problems.is_empty(), source) {
            (true, Some(source)) => Ok(Settings {
                config_path: None,
                source,
                lake,
                apply: self.apply,
                metrics_listen,
                retained_wal_warn_bytes,
                normalization,
                serve,
                maintenance,
                curated: self.curated,
            }),
            _ => Err(ConfigError::Invalid(problems)),
        }
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
    fn the_default_spill_directory_is_the_slots_and_the_lakes() {
        let one = parse(GOOD).unwrap().source.spill_dir;
        let again = parse(GOOD).unwrap().source.spill_dir;
        let other = parse(&GOOD.replace("/tmp/lake", "/tmp/lake2"))
            .unwrap()
            .source
            .spill_dir;
        assert_eq!(one, again, "a restart finds the same directory");
        assert_ne!(one, other, "two lakes, one slot name: two directories");
        let name = one.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("wal2delta-w2d-"), "{name}");
    }

    #[test]
    fn accepts_minimal_config_with_defaults() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.source.tables.len(), 2);
        assert_eq!(s.source.tables[1].name, "Big Table");
        assert_eq!(s.apply.max_batch_rows, 100_000);
        assert!(s.source.create_slot);
    }

    #[test]
    fn a_source_schema_named_like_an_endpoint_schema_is_refused_with_the_fix() {
        let clash = GOOD.replace(r#""public.a""#, r#""raw.events""#);
        let err = parse(&clash).unwrap_err();
        assert!(
            err.contains("source schema `raw`") && err.contains("serve.raw_schema"),
            "{err}"
        );
        let moved = clash.replace("[lake]", "[serve]\nraw_schema = \"changes\"\n[lake]");
        assert!(parse(&moved).is_ok());
        let err = parse(&GOOD.replace("[lake]", "[serve]\nrefined_schema = \"raw_x\"\n[lake]"))
            .unwrap_err();
        assert!(err.contains("serve.refined_schema"), "{err}");
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

    #[test]
    fn snapshot_limits_by_table_name_their_table() {
        let limits = |extra: &str| {
            parse(&GOOD.replace("[lake]", &format!("{extra}\n[lake]")))
                .map(|s| s.source.snapshot_limits)
        };
        let l = limits(
            "snapshot_max_rows_per_sec = 1000\n\
             snapshot_table_limits = { 'sales.\"Big Table\"' = { max_mb_per_sec = 2 } }",
        )
        .unwrap();
        assert_eq!(l.overall.rows_per_sec, Some(1000.0));
        assert_eq!(l.overall.bytes_per_sec, None);
        let big = l.tables[&crate::table_name::TableName::parse("sales.\"Big Table\"")
            .unwrap()
            .to_string()];
        assert_eq!(big.bytes_per_sec, Some(2.0 * 1024.0 * 1024.0));
        let err = limits("snapshot_table_limits = { \"public.b\" = { max_rows_per_sec = 5 } }")
            .unwrap_err();
        assert!(err.contains("`public.b` is not in source.tables"), "{err}");
        let err = limits("snapshot_max_rows_per_sec = -1").unwrap_err();
        assert!(err.contains("source.snapshot_max_rows_per_sec"), "{err}");
        let err = parse(&GOOD.replace(
            "path = \"/tmp/lake\"",
            "path = \"/tmp/lake\"\n[serve]\nmemory_mb = 64\nquery_memory_mb = 128",
        ))
        .unwrap_err();
        assert!(
            err.contains("serve.memory_mb (64) is less than serve.query_memory_mb (128)"),
            "{err}"
        );
    }
}
