//! SOURCE parsing and backend construction: turns `s3://`, `gs://`, `az://`, `file://`,
//! a plain path or `memory://` into an object store plus a key prefix. No I/O except
//! creating a missing local bucket folder.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::ClientConfigKey;
use object_store::RetryConfig;
use object_store::aws::AmazonS3Builder;
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::memory::InMemory;

use crate::store::S3Extras;
use crate::store::Store;
use crate::store::compat::{AzureMetaNames, GcsGeneration};
use crate::store::local::LocalAttrStore;
use crate::store::s3list::RawS3Lister;
use crate::store::s3parts::S3Parts;
use crate::store::s3raw::RawS3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    S3 { bucket: String, prefix: String },
    Gcs { bucket: String, prefix: String },
    Azure { container: String, prefix: String },
    Local { root: PathBuf },
    Memory,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    #[error("malformed source `{0}`: {1}")]
    Malformed(String, &'static str),
    #[error("cannot use local folder {0}: {1}")]
    LocalFolder(String, String),
    #[error("cannot configure {0}: {1}")]
    Config(String, String),
}

/// Connection settings from the command line; the rest comes from the environment
/// (`AWS_*`, `GOOGLE_*`, `AZURE_*`), and these override it.
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    /// S3: the endpoint URL. GCS: the base URL (in place of `https://storage.googleapis.com`).
    /// Azure: the account's blob service URL, or with `AZURE_STORAGE_USE_EMULATOR` the
    /// emulator's address (in place of `AZURITE_BLOB_STORAGE_URL`).
    pub endpoint: Option<String>,
    /// S3 only.
    pub region: Option<String>,
    pub allow_http: bool,
}

/// Azurite's fixed account and key (public, documented by Microsoft).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Applies `--endpoint` to an Azure builder. object_store ignores an endpoint in emulator
/// mode and reads `AZURITE_BLOB_STORAGE_URL` instead, so there the flag is taken as the
/// emulator's address: the same requests are built without emulator mode, with the account
/// in the URL path, and the emulator's account and key unless others are set.
fn azure_endpoint(b: MicrosoftAzureBuilder, endpoint: &str) -> MicrosoftAzureBuilder {
    let truthy = |v: Option<String>| {
        v.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "on" | "yes" | "y"))
    };
    if !truthy(b.get_config_value(&AzureConfigKey::UseEmulator)) {
        return b.with_endpoint(endpoint.to_string());
    }
    let account = b.get_config_value(&AzureConfigKey::AccountName).unwrap_or_else(|| AZURITE_ACCOUNT.into());
    let has_credential = [AzureConfigKey::AccessKey, AzureConfigKey::SasKey, AzureConfigKey::Token]
        .iter()
        .any(|k| b.get_config_value(k).is_some());
    let mut b = b
        .with_use_emulator(false)
        .with_allow_http(true)
        .with_endpoint(format!("{}/{account}", endpoint.trim_end_matches('/')))
        .with_account(account);
    if !has_credential {
        b = b.with_access_key(AZURITE_KEY);
    }
    b
}

const FIX: &str = "use s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX], az://CONTAINER[/PREFIX], file:///ABS/DIR, a local path, or memory://";

impl Source {
    pub fn parse(s: &str) -> Result<Self, SourceError> {
        let bad = |why| SourceError::Malformed(s.to_string(), why);
        if let Some((scheme, rest)) = s.split_once("://") {
            let (bucket, prefix) = match rest.split_once('/') {
                Some((b, p)) => (b, p.trim_matches('/')),
                None => (rest, ""),
            };
            let check_bucket = || -> Result<(String, String), SourceError> {
                if bucket.is_empty() {
                    return Err(bad("the bucket name is empty"));
                }
                if !bucket.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                    return Err(bad("the bucket name may only hold letters, digits, `-`, `_` and `.`"));
                }
                if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
                    return Err(bad("the prefix may not contain `.`, `..` or empty components"));
                }
                Ok((bucket.to_string(), prefix.to_string()))
            };
            match scheme {
                "s3" => check_bucket().map(|(bucket, prefix)| Source::S3 { bucket, prefix }),
                "gs" => check_bucket().map(|(bucket, prefix)| Source::Gcs { bucket, prefix }),
                "az" => check_bucket().map(|(container, prefix)| Source::Azure { container, prefix }),
                "memory" => {
                    if rest.is_empty() {
                        Ok(Source::Memory)
                    } else {
                        Err(bad("memory:// takes no bucket or path"))
                    }
                }
                "file" => {
                    if !rest.starts_with('/') {
                        return Err(bad("file:// needs an absolute path, as in file:///srv/bucket"));
                    }
                    Ok(Source::Local { root: PathBuf::from(rest) })
                }
                _ => Err(bad(FIX)),
            }
        } else if s.is_empty() || (s.contains(':') && !s.starts_with('/') && !s.starts_with('.')) {
            Err(bad(FIX))
        } else {
            Ok(Source::Local { root: PathBuf::from(s) })
        }
    }

    /// Stable text naming this source, used to key the state and cache directories.
    pub fn identity(&self) -> String {
        match self {
            Source::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            Source::Gcs { bucket, prefix } => format!("gs://{bucket}/{prefix}"),
            Source::Azure { container, prefix } => format!("az://{container}/{prefix}"),
            Source::Local { root } => format!("file://{}", root.display()),
            Source::Memory => "memory://".to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        match self {
            Source::S3 { prefix, .. } | Source::Gcs { prefix, .. } | Source::Azure { prefix, .. } => prefix,
            Source::Local { .. } | Source::Memory => "",
        }
    }

    /// Makes local paths absolute, creating the folder when it is missing.
    pub fn prepare(self) -> Result<Self, SourceError> {
        match self {
            Source::Local { root } => {
                let shown = root.display().to_string();
                std::fs::create_dir_all(&root).map_err(|e| SourceError::LocalFolder(shown.clone(), e.to_string()))?;
                let root = root.canonicalize().map_err(|e| SourceError::LocalFolder(shown.clone(), e.to_string()))?;
                if !root.is_dir() {
                    return Err(SourceError::LocalFolder(shown, "not a directory".into()));
                }
                Ok(Source::Local { root })
            }
            other => Ok(other),
        }
    }

    /// The store, and for S3 what it offers beyond object_store's calls (a raw lister for
    /// folders holding keys object_store refuses, multipart uploads with copied parts).
    pub fn build(&self, ep: &Endpoint) -> Result<(Store, Option<S3Extras>), SourceError> {
        let cfg = |e: object_store::Error| SourceError::Config(self.identity(), e.to_string());
        // Bounded retries so a dead endpoint fails a mount in seconds, not minutes; the
        // uploader has its own backoff loop on top for long outages.
        let retry = RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(20), ..Default::default() };
        let store: Store = match self {
            Source::S3 { bucket, .. } => {
                // Client options come from the environment (AWS_ALLOW_HTTP, proxies...);
                // the flags only add to them.
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry);
                if ep.allow_http {
                    b = b.with_allow_http(true);
                }
                if let Some(e) = &ep.endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(r) = &ep.region {
                    b = b.with_region(r);
                }
                let s3 = Arc::new(b.clone().build().map_err(cfg)?);
                let extras = |creds: &_| {
                    Some(S3Extras {
                        lister: Arc::new(RawS3Lister::new(RawS3::new(&b, Arc::clone(creds))?)),
                        parts: Arc::new(S3Parts::new(Arc::clone(&s3), RawS3::new(&b, Arc::clone(creds))?)),
                    })
                };
                let extras = extras(s3.credentials());
                return Ok((s3, extras));
            }
            Source::Gcs { bucket, .. } => {
                let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket).with_retry(retry);
                if ep.allow_http {
                    b = b.with_config(GoogleConfigKey::Client(ClientConfigKey::AllowHttp), "true");
                }
                if let Some(e) = &ep.endpoint {
                    b = b.with_base_url(e);
                }
                GcsGeneration::wrap(Arc::new(b.build().map_err(cfg)?))
            }
            Source::Azure { container, .. } => {
                let mut b = MicrosoftAzureBuilder::from_env().with_container_name(container).with_retry(retry);
                if ep.allow_http {
                    b = b.with_allow_http(true);
                }
                if let Some(e) = &ep.endpoint {
                    b = azure_endpoint(b, e);
                }
                AzureMetaNames::wrap(Arc::new(b.build().map_err(cfg)?))
            }
            Source::Local { root } => Arc::new(LocalAttrStore::new(root).map_err(cfg)?),
            Source::Memory => Arc::new(InMemory::new()),
        };
        Ok((store, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(Source::parse("s3://bkt/a/b/").unwrap(), Source::S3 { bucket: "bkt".into(), prefix: "a/b".into() });
        assert_eq!(Source::parse("gs://g").unwrap(), Source::Gcs { bucket: "g".into(), prefix: "".into() });
        assert_eq!(Source::parse("az://c/p").unwrap(), Source::Azure { container: "c".into(), prefix: "p".into() });
        assert_eq!(Source::parse("file:///srv/x").unwrap(), Source::Local { root: "/srv/x".into() });
        assert_eq!(Source::parse("./bucket").unwrap(), Source::Local { root: "./bucket".into() });
        assert_eq!(Source::parse("memory://").unwrap(), Source::Memory);
    }

    #[test]
    fn malformed_sources_say_why() {
        for bad in ["s3://", "ftp://x", "s3://bad bucket", "file://rel/path", "s3://b/../x", "memory://x", ""] {
            let e = Source::parse(bad).unwrap_err();
            assert!(matches!(e, SourceError::Malformed(..)), "{bad}: {e}");
        }
    }
}
