//! SOURCE parsing and backend construction: turns `s3://`, `gs://`, `az://`, `file://`,
//! a plain path or `memory://` into an object store plus a key prefix. No I/O except
//! creating a missing local bucket folder.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::RetryConfig;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::memory::InMemory;

use crate::store::Store;
use crate::store::local::LocalAttrStore;
use crate::store::s3list::{RawS3Lister, SharedLister};

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

/// S3-compatible connection settings from the command line (the rest comes from `AWS_*`).
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: bool,
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

    /// The store, and for S3 a raw lister for folders holding keys object_store refuses.
    pub fn build(&self, ep: &Endpoint) -> Result<(Store, Option<SharedLister>), SourceError> {
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
                let s3 = b.clone().build().map_err(cfg)?;
                let lister = RawS3Lister::new(&b, Arc::clone(s3.credentials())).map(Arc::new);
                return Ok((Arc::new(s3), lister));
            }
            Source::Gcs { bucket, .. } => Arc::new(
                GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .build()
                    .map_err(cfg)?,
            ),
            Source::Azure { container, .. } => {
                let mut b = MicrosoftAzureBuilder::from_env().with_container_name(container).with_retry(retry);
                if ep.allow_http {
                    b = b.with_allow_http(true);
                }
                if let Some(e) = &ep.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                Arc::new(b.build().map_err(cfg)?)
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
