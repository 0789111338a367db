//! AWS shared configuration files and named profiles (`~/.aws/credentials`,
//! `~/.aws/config`, `AWS_PROFILE`) for S3 lakes, which `object_store`'s credential chain
//! does not read.
//!
//! # Design
//! - **The AWS CLI's precedence.** Credentials in the environment (`AWS_ACCESS_KEY_ID`, …)
//!   win over the profile; the profile's credentials come before web identity, task roles
//!   and the instance metadata service (which `object_store` tries when no key is set).
//!   `[lake.storage]` options win over everything.
//! - **Which profile.** `[lake.storage] profile`, else `AWS_PROFILE`, else `default`. A
//!   profile that was named but is in neither file is an error; a missing `default` is not.
//! - **Static values only.** Keys, session token, `region` and `endpoint_url`. A profile
//!   that gets its credentials another way (`role_arn`, `sso_session`, `credential_process`,
//!   …) is refused with what to do instead, never silently skipped.
//! - **Files.** `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE`, else the two files
//!   under `$HOME/.aws`. Sections are `[name]` in the credentials file and `[profile name]`
//!   (or `[default]`) in the config file; the credentials file wins for a key in both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::secret::Secret;

/// What a profile supplies, by `object_store` option name.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub name: String,
    pub plain: BTreeMap<String, String>,
    pub secret: BTreeMap<String, Secret>,
}

/// Keys that mean "credentials come from somewhere this module does not go".
const UNSUPPORTED: &[&str] = &[
    "role_arn",
    "source_profile",
    "credential_source",
    "credential_process",
    "sso_session",
    "sso_start_url",
    "web_identity_token_file",
];

/// The profile for an S3 lake, from the process's environment and files; `named` is
/// `[lake.storage] profile`. `Ok(None)` when no profile applies.
pub fn load(named: Option<&str>) -> Result<Option<Profile>, String> {
    let env_name = std::env::var("AWS_PROFILE").ok().filter(|s| !s.is_empty());
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    let explicit = named.map(str::to_string).or(env_name);
    load_from(
        file("AWS_SHARED_CREDENTIALS_FILE", "credentials").as_deref(),
        file("AWS_CONFIG_FILE", "config").as_deref(),
        explicit.as_deref(),
    )
}

/// Like [`load`], with the files and the explicitly named profile given.
pub fn load_from(
    credentials: Option<&Path>,
    config: Option<&Path>,
    explicit: Option<&str>,
) -> Result<Option<Profile>, String> {
    let name = explicit.unwrap_or("default");
    let read = |path: Option<&Path>| -> Result<Option<String>, String> {
        match path {
            None => Ok(None),
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("cannot read the AWS file {}: {e}", p.display())),
            },
        }
    };
    let config_section = if name == "default" {
        "default".to_string()
    } else {
        format!("profile {name}")
    };
    let from_config = read(config)?
        .map(|t| section(&t, &config_section))
        .unwrap_or_default();
    let from_credentials = read(credentials)?
        .map(|t| section(&t, name))
        .unwrap_or_default();
    if from_config.is_none() && from_credentials.is_none() {
        return match explicit {
            Some(_) => Err(format!(
                "the AWS profile `{name}` is in neither {} nor {}; add it (`aws configure \
                 --profile {name}`), or name another in lake.storage.profile / AWS_PROFILE",
                shown(credentials),
                shown(config)
            )),
            None => Ok(None),
        };
    }
    let mut values = from_config.unwrap_or_default();
    values.extend(from_credentials.unwrap_or_default());
    if let Some(key) = UNSUPPORTED.iter().find(|k| values.contains_key(**k)) {
        return Err(format!(
            "the AWS profile `{name}` gets its credentials through `{key}`, which wal2delta \
             does not follow; give the daemon the resulting credentials another way: \
             `aws configure export-credentials --profile {name} --format env` into its \
             environment, an instance or task role, or web identity"
        ));
    }
    let mut profile = Profile {
        name: name.to_string(),
        ..Profile::default()
    };
    for (file_key, option) in [
        ("aws_access_key_id", "access_key_id"),
        ("region", "region"),
        ("endpoint_url", "endpoint"),
    ] {
        if let Some(v) = values.get(file_key) {
            profile.plain.insert(option.to_string(), v.clone());
        }
    }
    for (file_key, option) in [
        ("aws_secret_access_key", "secret_access_key"),
        ("aws_session_token", "token"),
    ] {
        if let Some(v) = values.get(file_key) {
            profile
                .secret
                .insert(option.to_string(), Secret::new(v.clone()));
        }
    }
    if profile.plain.contains_key("access_key_id")
        != profile.secret.contains_key("secret_access_key")
    {
        return Err(format!(
            "the AWS profile `{name}` has only one of aws_access_key_id and \
             aws_secret_access_key; give both"
        ));
    }
    Ok(Some(profile))
}

fn shown(path: Option<&Path>) -> String {
    path.map(|p| p.display().to_string())
        .unwrap_or_else(|| "~/.aws (HOME is not set)".into())
}

/// The `key = value` pairs of `[name]` in an INI text (lower-case keys; indented lines,
/// which are nested settings such as `s3 =` blocks, are skipped).
fn section(text: &str, name: &str) -> Option<BTreeMap<String, String>> {
    let mut found = None;
    let mut inside = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(header) = trimmed.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            let header = header.split_whitespace().collect::<Vec<_>>().join(" ");
            inside = header == name;
            if inside {
                found.get_or_insert_with(BTreeMap::new);
            }
            continue;
        }
        if !inside || line.starts_with([' ', '\t']) {
            continue;
        }
        if let (Some(map), Some((k, v))) = (found.as_mut(), trimmed.split_once('=')) {
            map.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(credentials: &str, config: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (c, f) = (dir.path().join("credentials"), dir.path().join("config"));
        std::fs::write(&c, credentials).unwrap();
        std::fs::write(&f, config).unwrap();
        (dir, c, f)
    }

    #[test]
    fn a_named_profile_takes_keys_from_credentials_and_region_from_config() {
        let (_dir, c, f) = files(
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = d\n\n\
             [dev]\naws_access_key_id=AKDEV\naws_secret_access_key = s3cr3t\naws_session_token = tok\n",
            "[default]\nregion = us-east-1\n[profile dev]\nregion = eu-west-1\n\
             s3 =\n  max_concurrent_requests = 20\nendpoint_url = http://127.0.0.1:9000\n",
        );
        let p = load_from(Some(&c), Some(&f), Some("dev")).unwrap().unwrap();
        assert_eq!(p.plain["access_key_id"], "AKDEV");
        assert_eq!(p.plain["region"], "eu-west-1");
        assert_eq!(p.plain["endpoint"], "http://127.0.0.1:9000");
        assert_eq!(p.secret["secret_access_key"].expose(), "s3cr3t");
        assert_eq!(p.secret["token"].expose(), "tok");
        assert!(!format!("{p:?}").contains("s3cr3t"));
        let d = load_from(Some(&c), Some(&f), None).unwrap().unwrap();
        assert_eq!(d.plain["access_key_id"], "AKDEFAULT");
        assert_eq!(d.plain["region"], "us-east-1");
    }

    #[test]
    fn a_missing_named_profile_or_a_role_profile_is_an_error_and_no_default_is_none() {
        let (_dir, c, f) = files(
            "",
            "[profile admin]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = default\n",
        );
        assert!(load_from(Some(&c), Some(&f), None).unwrap().is_none());
        let e = load_from(Some(&c), Some(&f), Some("prod")).unwrap_err();
        assert!(e.contains("`prod` is in neither"), "{e}");
        let e = load_from(Some(&c), Some(&f), Some("admin")).unwrap_err();
        assert!(
            e.contains("role_arn") && e.contains("export-credentials"),
            "{e}"
        );
        assert!(load_from(None, None, None).unwrap().is_none());
    }
}
