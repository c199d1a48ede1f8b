//! A multipart upload to S3 that copies byte ranges of an object already in the bucket
//! server-side (UploadPartCopy) beside parts sent from here, so that an edit of a big file
//! sends only what changed. The multipart calls are object_store's (`MultipartStore`); the
//! ranged copy, which object_store does not offer, is a signed request of our own
//! (`s3raw`). It knows parts and ranges, not files.

use std::ops::Range;
use std::sync::Arc;

use object_store::aws::AmazonS3;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{Attributes, MultipartId, PutMultipartOptions, PutPayload, PutResult};
use serde::Deserialize;

use super::s3raw::{RawS3, encode_key};

/// S3's largest part, copied or sent.
pub const MAX_COPY_PART: u64 = 5 << 30;

#[derive(Debug)]
pub struct S3Parts {
    store: Arc<AmazonS3>,
    raw: RawS3,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CopyPartResult {
    #[serde(rename = "ETag")]
    e_tag: String,
}

fn generic(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> object_store::Error {
    object_store::Error::Generic { store: "S3", source: e.into() }
}

impl S3Parts {
    pub fn new(store: Arc<AmazonS3>, raw: RawS3) -> Self {
        S3Parts { store, raw }
    }

    pub async fn create(&self, path: &Path, attributes: Attributes) -> object_store::Result<MultipartId> {
        let opts = PutMultipartOptions { attributes, ..Default::default() };
        self.store.create_multipart_opts(path, opts).await
    }

    pub async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        index: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        self.store.put_part(path, id, index, data).await
    }

    /// Part `index` (from 0) of upload `id` at `path` is `range` of the object at
    /// `src_key`, copied by the store, if that object still has the ETag `if_match`
    /// (`Precondition` otherwise; `NotFound` if it is gone).
    pub async fn copy_part(
        &self,
        path: &Path,
        id: &MultipartId,
        index: usize,
        src_key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> object_store::Result<PartId> {
        if range.is_empty() {
            return Err(generic("an empty range cannot be copied"));
        }
        let mut url =
            url::Url::parse(&format!("{}/{}", self.raw.base(), encode_key(path.as_ref()))).map_err(generic)?;
        url.query_pairs_mut().append_pair("partNumber", &(index + 1).to_string()).append_pair("uploadId", id);
        let mut headers = vec![
            ("x-amz-copy-source", format!("{}/{}", self.raw.bucket(), encode_key(src_key))),
            ("x-amz-copy-source-range", format!("bytes={}-{}", range.start, range.end - 1)),
        ];
        if let Some(etag) = if_match {
            headers.push(("x-amz-copy-source-if-match", etag.to_string()));
        }
        let resp = self.raw.send(http::Method::PUT, &url, &headers).await.map_err(generic)?;
        let status = resp.status();
        let body = resp.text().await.map_err(generic)?;
        let failed = |what: &str| format!("copying {range:?} of {src_key} into part {}: {what}", index + 1);
        match status.as_u16() {
            412 => {
                return Err(object_store::Error::Precondition {
                    path: src_key.to_string(),
                    source: failed("the source changed").into(),
                });
            }
            // The source, unless the upload is what is missing (moto says nothing more).
            404 if !body.contains("NoSuchUpload") => {
                return Err(object_store::Error::NotFound {
                    path: src_key.to_string(),
                    source: failed("the source is gone").into(),
                });
            }
            _ if !status.is_success() => return Err(generic(failed(&format!("{status}: {body}")))),
            _ => {}
        }
        // S3 may answer 200 with an error in the body for a copy.
        match quick_xml::de::from_str::<CopyPartResult>(&body) {
            Ok(r) => Ok(PartId { content_id: r.e_tag }),
            Err(_) if body.contains("PreconditionFailed") => Err(object_store::Error::Precondition {
                path: src_key.to_string(),
                source: failed("the source changed").into(),
            }),
            Err(e) => Err(generic(failed(&format!("unreadable answer ({e}): {body}")))),
        }
    }

    pub async fn complete(&self, path: &Path, id: &MultipartId, parts: Vec<PartId>) -> object_store::Result<PutResult> {
        self.store.complete_multipart(path, id, parts).await
    }

    pub async fn abort(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.store.abort_multipart(path, id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_etag_of_a_copied_part() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<CopyPartResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><LastModified>2026-12-07T10:00:00.000Z</LastModified><ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag></CopyPartResult>"#;
        let r: CopyPartResult = quick_xml::de::from_str(xml).unwrap();
        assert_eq!(r.e_tag, "\"9b2cf535f27731c974343645a3985328\"");
        let err = r#"<Error><Code>PreconditionFailed</Code></Error>"#;
        assert!(quick_xml::de::from_str::<CopyPartResult>(err).is_err());
    }
}
