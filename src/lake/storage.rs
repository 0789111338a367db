//! Where the lake's objects live: a local directory or an object store (S3 and
//! S3-compatible servers, Azure Blob Storage / ADLS Gen2, Google Cloud Storage).
//!
//! # Design
//! - **Credentials as each cloud's users expect.** A store starts from its cloud's standard
//!   environment variables and credential chain (`object_store`'s builders `from_env`:
//!   `AWS_*`, `AZURE_*`, `GOOGLE_*`; instance, task and pod roles, web identity, managed
//!   identity, service-account files; for S3 also the AWS profile, `super::aws_profile`),
//!   then takes the `[lake.storage]` options, whose keys are `object_store`'s option names
//!   (`endpoint`, `region`, `allow_http`, …).
//! - **No secret in the file.** A secret option (`secret_access_key`, `session_token`,
//!   `access_key`, `sas_key`, `client_secret`, `service_account_key`, …) is refused as a
//!   literal; it is given as `<key>_env = "VARIABLE"` or `<key>_file = "/path"` and held as a
//!   [`Secret`], which never prints.
//! - **One registration, every reader.** [`register`] installs the lake's store factory
//!   with deltalake for the lake's URL scheme, so every table opened by URL — by the
//!   daemon, the SQL endpoint, the CLI — reaches the same store with the same options. A
//!   process works on one lake.
//! - **Commits are conditional writes.** deltalake's default log store writes each commit
//!   with `PutMode::Create` (`If-None-Match: *` on S3), so two writers racing for a version
//!   cannot both succeed, without a lock service.

use std::collections::BTreeMap;
use std::sync::Arc;

use deltalake::logstore::{
    LogStore, LogStoreFactory, ObjectStoreFactory, ObjectStoreRef, StorageConfig, default_logstore,
    logstore_factories, object_store_factories,
};
use deltalake::{DeltaResult, DeltaTableError};
use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path;
use url::Url;

use super::aws_profile::{self, Profile};
use crate::secret::Secret;

/// The object stores a lake URL may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    S3,
    Azure,
    Gcs,
}

impl Cloud {
    /// The cloud a lake URL names, if it names one.
    pub fn of(url: &Url) -> Option<Cloud> {
        match url.scheme() {
            "s3" | "s3a" => Some(Cloud::S3),
            "az" | "azure" | "abfs" | "abfss" | "adl" => Some(Cloud::Azure),
            "gs" => Some(Cloud::Gcs),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cloud::S3 => "S3",
            Cloud::Azure => "Azure",
            Cloud::Gcs => "GCS",
        }
    }

    /// `Some(is_secret)` when `key` is an option of this cloud's store.
    fn option(self, key: &str) -> Option<bool> {
        let key = key.to_ascii_lowercase();
        match self {
            Cloud::S3 => key.parse::<AmazonS3ConfigKey>().ok().map(|k| {
                matches!(
                    k,
                    AmazonS3ConfigKey::SecretAccessKey | AmazonS3ConfigKey::Token
                ) || key.contains("sse_customer_key")
            }),
            Cloud::Azure => key.parse::<AzureConfigKey>().ok().map(|k| {
                matches!(
                    k,
                    AzureConfigKey::AccessKey
                        | AzureConfigKey::SasKey
                        | AzureConfigKey::ClientSecret
                        | AzureConfigKey::Token
                )
            }),
            Cloud::Gcs => key
                .parse::<GoogleConfigKey>()
                .ok()
                .map(|k| matches!(k, GoogleConfigKey::ServiceAccountKey)),
        }
    }
}

/// The `[lake.storage]` options, resolved: plain values and secrets read from the
/// environment or files. `Debug` shows secrets as `<redacted>`.
#[derive(Debug, Clone, Default)]
pub struct StorageOptions {
    plain: BTreeMap<String, String>,
    secret: BTreeMap<String, Secret>,
    /// S3: the AWS profile in effect (`super::aws_profile`).
    profile: Option<Profile>,
}

impl StorageOptions {
    /// Reads `[lake.storage]` for a lake at `location`; problems name `lake.storage.<key>`.
    pub fn resolve(
        location: &str,
        table: &BTreeMap<String, toml::Value>,
        problems: &mut Vec<String>,
    ) -> StorageOptions {
        let mut options = StorageOptions::default();
        let cloud = Url::parse(location).ok().as_ref().and_then(Cloud::of);
        if cloud == Some(Cloud::S3) {
            let named = match table.get("profile") {
                None => None,
                Some(toml::Value::String(s)) => Some(s.as_str()),
                Some(_) => {
                    problems.push("lake.storage.profile: give the profile's name".into());
                    None
                }
            };
            match aws_profile::load(named) {
                Ok(profile) => options.profile = profile,
                Err(e) => problems.push(format!("lake.storage: {e}")),
            }
        }
        if table.is_empty() {
            return options;
        }
        let Some(cloud) = cloud else {
            problems.push(format!(
                "lake.storage: options apply to object-store lakes only (s3://, az://, \
                 abfss://, gs://), and lake.path `{location}` is a local directory; remove \
                 [lake.storage]"
            ));
            return options;
        };
        for (key, value) in table {
            if cloud == Cloud::S3 && key == "profile" {
                continue; // read above
            }
            let value = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => {
                    problems.push(format!(
                        "lake.storage.{key}: give a string, number or boolean"
                    ));
                    continue;
                }
            };
            match cloud.option(key) {
                Some(true) => problems.push(format!(
                    "lake.storage.{key}: secrets are not written into the configuration; give \
                     `{key}_env = \"VARIABLE\"` (an environment variable holding it) or \
                     `{key}_file = \"/path\"` (a file holding it)"
                )),
                Some(false) => {
                    options.plain.insert(key.to_ascii_lowercase(), value);
                }
                None => {
                    let reference = key
                        .strip_suffix("_env")
                        .map(|base| (base, true))
                        .or_else(|| key.strip_suffix("_file").map(|base| (base, false)));
                    match reference {
                        Some((base, from_env)) if cloud.option(base).is_some() => {
                            let read = if from_env {
                                std::env::var(&value).map_err(|_| {
                                    format!("the environment variable `{value}` is not set")
                                })
                            } else {
                                // The whole file (a service-account key is JSON over
                                // many lines), less the trailing newline.
                                std::fs::read_to_string(&value)
                                    .map(|text| text.trim_end_matches(['\n', '\r']).to_string())
                                    .map_err(|e| format!("cannot read {value}: {e}"))
                            };
                            match read {
                                Ok(secret) => {
                                    options
                                        .secret
                                        .insert(base.to_ascii_lowercase(), Secret::new(secret));
                                }
                                Err(e) => problems.push(format!("lake.storage.{key}: {e}")),
                            }
                        }
                        _ => problems.push(format!(
                            "lake.storage.{key}: not an option of {} storage (docs/lake.md › \
                             Lakes on object storage lists them)",
                            cloud.name()
                        )),
                    }
                }
            }
        }
        options
    }

    /// Every option as the store builder takes it.
    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.plain
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(self.secret.iter().map(|(k, v)| (k.as_str(), v.expose())))
    }

    /// The options that are not secrets, for `validate` and `status` to show.
    pub fn shown(&self) -> String {
        self.plain
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(self.secret.keys().map(|k| format!("{k}=<redacted>")))
            .chain(self.profile.iter().map(|p| {
                format!(
                    "AWS profile {} ({}, unless set in the environment)",
                    p.name,
                    p.plain
                        .keys()
                        .chain(p.secret.keys())
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// An S3 builder from the environment, with the AWS profile's values where the
    /// environment set none (credentials only when it set no access key at all).
    fn s3_defaults(&self) -> AmazonS3Builder {
        let mut builder = AmazonS3Builder::from_env();
        let Some(profile) = &self.profile else {
            return builder;
        };
        let has_key = builder
            .get_config_value(&AmazonS3ConfigKey::AccessKeyId)
            .is_some();
        let values = profile
            .plain
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(profile.secret.iter().map(|(k, v)| (k.as_str(), v.expose())));
        for (key, value) in values {
            let Ok(key) = key.parse::<AmazonS3ConfigKey>() else {
                continue;
            };
            let credential = matches!(
                key,
                AmazonS3ConfigKey::AccessKeyId
                    | AmazonS3ConfigKey::SecretAccessKey
                    | AmazonS3ConfigKey::Token
            );
            if (credential && has_key) || (!credential && builder.get_config_value(&key).is_some())
            {
                continue;
            }
            builder = builder.with_config(key, value);
        }
        builder
    }
}

/// The store holding the bucket or container `url` names (rooted there, not at the path).
fn cloud_store(url: &Url, options: &StorageOptions) -> Result<ObjectStoreRef, object_store::Error> {
    let unknown = |key: &str| object_store::Error::Generic {
        store: "lake.storage",
        source: format!("unknown option {key}").into(),
    };
    // The three builders share no trait: the same steps, spelled once.
    macro_rules! build {
        ($start:expr) => {{
            let mut builder = $start.with_url(url.as_str());
            for (key, value) in options.pairs() {
                builder = builder.with_config(key.parse().map_err(|_| unknown(key))?, value);
            }
            Ok(Arc::new(builder.build()?))
        }};
    }
    match Cloud::of(url) {
        Some(Cloud::S3) => build!(options.s3_defaults()),
        Some(Cloud::Azure) => build!(MicrosoftAzureBuilder::from_env()),
        Some(Cloud::Gcs) => build!(GoogleCloudStorageBuilder::from_env()),
        None => Err(object_store::Error::Generic {
            store: "lake",
            source: format!(
                "`{}://` is not an object store wal2delta knows",
                url.scheme()
            )
            .into(),
        }),
    }
}

/// The store rooted at the lake `root` (a local directory or an object-store prefix).
pub fn lake_store(
    root: &Url,
    options: &StorageOptions,
) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
    if root.scheme() == "file" {
        let path = root
            .to_file_path()
            .map_err(|_| object_store::Error::Generic {
                store: "lake",
                source: format!("{root} is not a local path").into(),
            })?;
        return Ok(Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(path)?,
        ));
    }
    let store = cloud_store(root, options)?;
    let prefix = Path::from_url_path(root.path())?;
    Ok(Arc::new(object_store::prefix::PrefixStore::new(
        store, prefix,
    )))
}

/// Checks the lake's store the way the daemon will use it: list, write, conditional write
/// (a second create of the same object must fail), read back, delete. Returns what it
/// found, or what went wrong with the fix.
pub async fn probe(root: &Url, store: &dyn ObjectStore) -> Result<String, String> {
    use futures::TryStreamExt;
    use object_store::{ObjectStoreExt, PutMode, PutOptions};
    let at = |what: &str, e: object_store::Error| explain(root, what, e);
    let key = Path::from(format!(
        "_wal2delta/probe-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    ));
    store
        .list(Some(&Path::from("_wal2delta")))
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| at("listing", e))?;
    let create = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let first = store
        .put_opts(&key, "probe".into(), create())
        .await
        .map_err(|e| at("writing", e))?;
    let unsafe_store = |header: &str| {
        format!(
            "the store at {root} overwrote an object a conditional write ({header}) should \
             have refused: two writers could both commit the same Delta version, or both hold \
             the lease. Use a store that supports conditional writes (AWS S3 does; for other \
             S3-compatible servers, check their documentation)"
        )
    };
    let refused = |result: object_store::Result<object_store::PutResult>, header: &str| match result
    {
        Err(object_store::Error::AlreadyExists { .. })
        | Err(object_store::Error::Precondition { .. }) => Ok(()),
        Ok(_) => Err(unsafe_store(header)),
        Err(e) => Err(at(&format!("a conditional write ({header})"), e)),
    };
    // Create over an existing object: refused (Delta commits).
    let mut conditional = refused(
        store.put_opts(&key, "probe again".into(), create()).await,
        "If-None-Match: *",
    );
    // Update against a version that is no longer current: refused (the lease).
    if conditional.is_ok() {
        let stale = object_store::UpdateVersion {
            e_tag: first.e_tag.clone(),
            version: first.version.clone(),
        };
        let current = store
            .put_opts(
                &key,
                "probe updated".into(),
                PutMode::Update(stale.clone()).into(),
            )
            .await
            .map_err(|e| at("a conditional update (If-Match)", e))?;
        conditional = match current.e_tag {
            None => Err(format!(
                "the store at {root} gives objects no ETag, which the lease needs; use a store \
                 that supports conditional writes"
            )),
            Some(_) => refused(
                store
                    .put_opts(&key, "probe stale".into(), PutMode::Update(stale).into())
                    .await,
                "If-Match",
            ),
        };
    }
    store.get(&key).await.map_err(|e| at("reading", e))?;
    store.delete(&key).await.map_err(|e| at("deleting", e))?;
    conditional?;
    Ok(format!(
        "lake store {root}: list, write, read, delete and conditional writes (If-None-Match, \
         If-Match) work"
    ))
}

/// An object-store error in words an operator can act on.
fn explain(root: &Url, what: &str, error: object_store::Error) -> String {
    let text = error.to_string();
    let lower = text.to_ascii_lowercase();
    let fix = if matches!(error, object_store::Error::Unauthenticated { .. })
        || lower.contains("invalidaccesskeyid")
        || lower.contains("signaturedoesnotmatch")
    {
        "the credentials were refused: check the access key and secret (AWS_ACCESS_KEY_ID / \
         AWS_SECRET_ACCESS_KEY, lake.storage.access_key_id, secret_access_key_env or _file)"
    } else if matches!(error, object_store::Error::PermissionDenied { .. })
        || lower.contains("accessdenied")
        || lower.contains("403")
    {
        "permission denied: grant the daemon's identity list, get, put and delete on the \
         lake's prefix (docs/lake.md › Lakes on object storage has the minimal policy)"
    } else if lower.contains("nosuchbucket")
        || lower.contains("containernotfound")
        || lower.contains("bucket") && lower.contains("not found")
    {
        "the bucket (or container) does not exist: create it first, e.g. `aws s3 mb \
         s3://BUCKET` or `az storage container create`"
    } else if lower.contains("region") || lower.contains("301") || lower.contains("redirect") {
        "wrong region: set lake.storage.region (or AWS_REGION) to the bucket's region"
    } else if lower.contains("connect") || lower.contains("dns") || lower.contains("timed out") {
        "the endpoint is unreachable: check lake.storage.endpoint (or AWS_ENDPOINT_URL), the \
         network and, for plain http, lake.storage.allow_http = true"
    } else {
        "check the location, the credentials and the endpoint"
    };
    format!("the lake store {root} failed at {what}: {text}; {fix}")
}

/// Makes deltalake open every table under `root`'s scheme with these options.
pub fn register(root: &Url, options: &StorageOptions) {
    let Some(cloud) = Cloud::of(root) else {
        return;
    };
    let schemes: &[&str] = match cloud {
        Cloud::S3 => &["s3", "s3a"],
        Cloud::Azure => &["az", "azure", "abfs", "abfss", "adl"],
        Cloud::Gcs => &["gs"],
    };
    let stores = Arc::new(LakeStores {
        options: options.clone(),
        built: Default::default(),
    });
    for scheme in schemes {
        let Ok(url) = Url::parse(&format!("{scheme}://")) else {
            continue;
        };
        object_store_factories().insert(url.clone(), stores.clone());
        logstore_factories().insert(url, Arc::new(ConditionalCommits));
    }
}

/// deltalake's store factory for the lake's scheme. One client per bucket (or container),
/// so credentials are fetched once, not once per table.
struct LakeStores {
    options: StorageOptions,
    built: std::sync::Mutex<std::collections::HashMap<String, ObjectStoreRef>>,
}

impl ObjectStoreFactory for LakeStores {
    fn parse_url_opts(&self, url: &Url, _: &StorageConfig) -> DeltaResult<(ObjectStoreRef, Path)> {
        let key = format!("{}://{}", url.scheme(), url.authority());
        let cached = self
            .built
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let store = match cached {
            Some(store) => store,
            None => {
                let store = cloud_store(url, &self.options)?;
                self.built
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, store.clone());
                store
            }
        };
        let path = Path::from_url_path(url.path())
            .map_err(|e| DeltaTableError::InvalidTableLocation(format!("{url}: {e}")))?;
        Ok((store, path))
    }
}

/// deltalake's default log store: commits are `PutMode::Create` writes.
struct ConditionalCommits;

impl LogStoreFactory for ConditionalCommits {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(location: &str, toml_text: &str) -> (StorageOptions, Vec<String>) {
        let table: BTreeMap<String, toml::Value> = toml::from_str(toml_text).unwrap();
        let mut problems = Vec::new();
        let options = StorageOptions::resolve(location, &table, &mut problems);
        (options, problems)
    }

    #[test]
    fn secrets_come_from_the_environment_or_a_file_never_the_config() {
        let (_, problems) = resolve("s3://b/p", "secret_access_key = \"x\"");
        assert!(
            problems[0].contains("secret_access_key_env"),
            "{problems:?}"
        );
        // SAFETY: the variable is unique to this test.
        unsafe { std::env::set_var("W2D_TEST_S3_SECRET", "hunter2") };
        let (options, problems) = resolve(
            "s3://b/p",
            "secret_access_key_env = \"W2D_TEST_S3_SECRET\"\nendpoint = \"http://127.0.0.1:9\"\nallow_http = true",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let shown = format!("{options:?} {}", options.shown());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            options
                .pairs()
                .any(|(k, v)| k == "secret_access_key" && v == "hunter2")
        );
    }

    #[test]
    fn unknown_options_and_options_on_a_local_lake_are_refused() {
        let (_, problems) = resolve("s3://b/p", "endpiont = \"x\"");
        assert!(problems[0].contains("not an option of S3"), "{problems:?}");
        let (_, problems) = resolve("/var/lib/lake", "region = \"x\"");
        assert!(problems[0].contains("local directory"), "{problems:?}");
        let (_, problems) = resolve("az://c/p", "account_name = \"dev\"\nuse_emulator = true");
        assert!(problems.is_empty(), "{problems:?}");
        let (_, problems) = resolve("gs://b/p", "service_account_key = \"{}\"");
        assert!(
            problems[0].contains("service_account_key_env"),
            "{problems:?}"
        );
    }
}
