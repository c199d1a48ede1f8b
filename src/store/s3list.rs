//! A raw S3 folder listing (ListObjectsV2, signed with object_store's SigV4 authorizer) for
//! folders that hold keys object_store refuses to parse (`a//b`, `..`): it fails the whole
//! listing on one such key, while a mount must skip the key and show the rest.

use std::sync::Arc;

use serde::Deserialize;

use super::s3raw::RawS3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawObject {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RawListing {
    pub prefixes: Vec<String>,
    pub objects: Vec<RawObject>,
}

#[derive(Debug)]
pub struct RawS3Lister {
    raw: RawS3,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListBucketResult {
    #[serde(default)]
    contents: Vec<Contents>,
    #[serde(default)]
    common_prefixes: Vec<CommonPrefix>,
    next_continuation_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Contents {
    key: String,
    size: u64,
    #[serde(rename = "ETag")]
    e_tag: Option<String>,
    last_modified: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CommonPrefix {
    prefix: String,
}

fn parse(xml: &str) -> Result<(RawListing, Option<String>), String> {
    let r: ListBucketResult = quick_xml::de::from_str(xml).map_err(|e| format!("unreadable listing: {e}"))?;
    let listing = RawListing {
        prefixes: r.common_prefixes.into_iter().map(|p| p.prefix).collect(),
        objects: r
            .contents
            .into_iter()
            .map(|c| RawObject { key: c.key, size: c.size, etag: c.e_tag, last_modified: c.last_modified })
            .collect(),
    };
    Ok((listing, r.next_continuation_token))
}

impl RawS3Lister {
    pub fn new(raw: RawS3) -> Self {
        RawS3Lister { raw }
    }

    /// Lists one folder (`prefix` ends with `/`, or is empty for the bucket root).
    pub async fn list_dir(&self, prefix: &str) -> Result<RawListing, String> {
        let mut out = RawListing::default();
        let mut token: Option<String> = None;
        loop {
            let mut url = url::Url::parse(&format!("{}/", self.raw.base())).map_err(|e| e.to_string())?;
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("list-type", "2");
                q.append_pair("delimiter", "/");
                q.append_pair("prefix", prefix);
                if let Some(t) = &token {
                    q.append_pair("continuation-token", t);
                }
            }
            let resp = self.raw.send(http::Method::GET, &url, &[]).await?;
            let status = resp.status();
            let body = resp.text().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("listing {prefix:?} answered {status}"));
            }
            let (page, next) = parse(&body)?;
            out.prefixes.extend(page.prefixes);
            out.objects.extend(page.objects);
            match next {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }
}

pub type SharedLister = Arc<RawS3Lister>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_object_store_refuses() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>a/</Prefix><KeyCount>3</KeyCount><MaxKeys>1000</MaxKeys>
  <Delimiter>/</Delimiter><IsTruncated>true</IsTruncated>
  <Contents><Key>a/ok.txt</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>
    <ETag>&quot;abc&quot;</ETag><Size>3</Size><StorageClass>STANDARD</StorageClass></Contents>
  <CommonPrefixes><Prefix>a//</Prefix></CommonPrefixes>
  <CommonPrefixes><Prefix>a/sub/</Prefix></CommonPrefixes>
  <NextContinuationToken>tok</NextContinuationToken>
</ListBucketResult>"#;
        let (l, next) = parse(xml).unwrap();
        assert_eq!(l.prefixes, vec!["a//".to_string(), "a/sub/".to_string()]);
        assert_eq!(l.objects.len(), 1);
        assert_eq!(l.objects[0].key, "a/ok.txt");
        assert_eq!(l.objects[0].etag.as_deref(), Some("\"abc\""));
        assert_eq!(l.objects[0].size, 3);
        assert_eq!(next.as_deref(), Some("tok"));
    }

    /// S3 quotes ETags (escaped or not); some S3-compatible servers do not. Each is kept as
    /// sent: comparisons ignore the quotes (`layout::etag_eq`), and `If-Match` sends the
    /// server's own spelling back.
    #[test]
    fn keeps_quoted_and_unquoted_etags_as_sent() {
        let xml = r#"<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Contents><Key>escaped</Key><ETag>&quot;aa&quot;</ETag><Size>1</Size></Contents>
  <Contents><Key>literal</Key><ETag>"bb"</ETag><Size>2</Size></Contents>
  <Contents><Key>bare</Key><ETag>cc-3</ETag><Size>3</Size></Contents>
  <Contents><Key>none</Key><Size>4</Size></Contents>
  <IsTruncated>false</IsTruncated>
</ListBucketResult>"#;
        let (l, next) = parse(xml).unwrap();
        let etags: Vec<(&str, Option<&str>)> = l.objects.iter().map(|o| (o.key.as_str(), o.etag.as_deref())).collect();
        assert_eq!(
            etags,
            [("escaped", Some("\"aa\"")), ("literal", Some("\"bb\"")), ("bare", Some("cc-3")), ("none", None)]
        );
        assert!(crate::layout::etag_eq(l.objects[1].etag.as_deref().unwrap(), "bb"));
        assert_eq!(next, None);
    }
}
