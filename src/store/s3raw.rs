//! Signed S3 requests that object_store has no call for, made with object_store's own SigV4
//! authorizer and credentials, at the bucket the store was built for. It knows requests and
//! answers, not what they are for.

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer, AwsCredentialProvider};
use object_store::client::HttpRequestBody;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// What S3 keys keep unencoded in a URL path (object_store's own set, so signatures match).
const KEY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'/').remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// A key as it goes into a URL path or an `x-amz-copy-source` header.
pub fn encode_key(key: &str) -> String {
    utf8_percent_encode(key, KEY_ENCODE).to_string()
}

#[derive(Debug)]
pub struct RawS3 {
    http: reqwest::Client,
    /// Bucket URL without a trailing slash, path-style or virtual-hosted.
    base: String,
    bucket: String,
    region: String,
    credentials: AwsCredentialProvider,
}

impl RawS3 {
    /// Built from the same settings as the store, so it reaches the same bucket.
    pub fn new(builder: &AmazonS3Builder, credentials: AwsCredentialProvider) -> Option<Self> {
        let bucket = builder.get_config_value(&AmazonS3ConfigKey::Bucket)?;
        let region = builder.get_config_value(&AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
        let base = match builder.get_config_value(&AmazonS3ConfigKey::Endpoint) {
            Some(ep) => {
                let virtual_hosted = builder
                    .get_config_value(&AmazonS3ConfigKey::VirtualHostedStyleRequest)
                    .is_some_and(|v| v == "true");
                if virtual_hosted {
                    ep.trim_end_matches('/').to_string()
                } else {
                    format!("{}/{bucket}", ep.trim_end_matches('/'))
                }
            }
            None => format!("https://{bucket}.s3.{region}.amazonaws.com"),
        };
        Some(RawS3 { http: reqwest::Client::new(), base, bucket, region, credentials })
    }

    /// The bucket's URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Sends a bodiless request to `url` with `headers`, signed.
    pub async fn send(
        &self,
        method: http::Method,
        url: &url::Url,
        headers: &[(&str, String)],
    ) -> Result<reqwest::Response, String> {
        let mut builder = http::Request::builder().method(method.clone()).uri(url.as_str());
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let mut req: http::Request<HttpRequestBody> =
            builder.body(HttpRequestBody::from(Vec::new())).map_err(|e| e.to_string())?;
        let credential = self.credentials.get_credential().await.map_err(|e| e.to_string())?;
        AwsAuthorizer::new(&credential, "s3", &self.region).try_authorize(&mut req, None).map_err(|e| e.to_string())?;
        let mut send = self.http.request(method, url.as_str());
        for (name, value) in req.headers() {
            send = send.header(name.as_str(), value.as_bytes());
        }
        send.send().await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_as_object_store_encodes_them() {
        assert_eq!(encode_key("a/b c/ü+x~y.z_-"), "a/b%20c/%C3%BC%2Bx~y.z_-");
    }
}
