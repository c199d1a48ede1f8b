//! Extended attributes as object metadata, in s3fs's `use_xattr` layout: one `xattr`
//! metadata value holding `urlencode({"NAME":"BASE64(VALUE)",...})`, so s3fs mounts with
//! `-o use_xattr` see the same attributes. The size budget that keeps every object's
//! metadata within S3's 2 KiB. Pure functions, no I/O.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// The metadata name (s3fs: `x-amz-meta-xattr`).
pub const META_XATTR: &str = "xattr";

/// The longest `xattr` value written. S3 keeps at most 2,048 bytes of user metadata per
/// object (names and values together); this leaves 512 of them to the other names
/// (mode, owner, times, hash, origin, host, user) and 5 to the name `xattr` itself. GCS
/// and Azure keep 8 KiB; the one budget everywhere makes a mount behave the same
/// whatever the bucket, and keeps a bucket's objects copyable between them.
pub const MAX_ENCODED: usize = 2048 - 512 - META_XATTR.len();

/// Attribute names and their values.
pub type XattrMap = BTreeMap<String, Vec<u8>>;

/// What s3fs's `urlEncodePath` leaves as it is: letters, digits and `.-_~/`.
const KEPT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_').remove(b'~').remove(b'/');

/// s3fs writes padded base64; read it whether padded or not.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Whether s3fs's format can hold the name: its reader splits entries at `,` and takes
/// the name between `"`s, with no escapes.
pub fn storable_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['"', ','])
}

/// The `xattr` value for `map`, or None for no attributes (no value is written then).
pub fn encode(map: &XattrMap) -> Option<String> {
    if map.is_empty() {
        return None;
    }
    let mut json = String::from("{");
    for (i, (name, value)) in map.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push('"');
        json.push_str(name);
        json.push_str("\":\"");
        json.push_str(&B64.encode(value));
        json.push('"');
    }
    json.push('}');
    Some(utf8_percent_encode(&json, KEPT).to_string())
}

/// Reads an `xattr` value as s3fs does: URL-decode, take what lies between the first `{`
/// and the last `}`, split at `,`, each entry `"NAME":"BASE64"` split at its last `:`.
/// Entries that do not parse are skipped (s3fs skips them too).
pub fn decode(header: &str) -> XattrMap {
    let bytes: Vec<u8> = percent_decode_str(header).collect();
    let json = String::from_utf8_lossy(&bytes);
    let mut out = XattrMap::new();
    let (Some(start), Some(end)) = (json.find('{'), json.rfind('}')) else { return out };
    if end <= start {
        return out;
    }
    for entry in json[start + 1..end].split(',') {
        let Some((name, value)) = entry.rsplit_once(':') else { continue };
        let (Some(name), Some(value)) = (unquote(name), unquote(value)) else { continue };
        let Ok(value) = B64.decode(value.trim()) else { continue };
        if !name.is_empty() {
            out.insert(name.to_string(), value);
        }
    }
    out
}

/// The text between a pair of `"` (s3fs's `takeout_str_dquart`), or the text itself when
/// it has none.
fn unquote(s: &str) -> Option<&str> {
    let Some(open) = s.find('"') else { return Some(s) };
    let rest = &s[open + 1..];
    let close = rest.rfind('"')?;
    let inner = &rest[..close];
    (!inner.contains('"')).then_some(inner)
}

/// Whether an `xattr` value fits the budget.
pub fn fits(encoded: Option<&str>) -> bool {
    encoded.is_none_or(|e| e.len() <= MAX_ENCODED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &[u8])]) -> XattrMap {
        entries.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect()
    }

    #[test]
    fn round_trip_keeps_names_and_binary_values() {
        let m =
            map(&[("user.a", b"1"), ("user.empty", b""), ("user.bin", &[0, 255, 10, b'"', b',']), ("user.x:y", b"z")]);
        let e = encode(&m).unwrap();
        assert!(e.bytes().all(|b| b.is_ascii_alphanumeric() || b"%.-_~/".contains(&b)), "{e}");
        assert_eq!(decode(&e), m);
        assert_eq!(encode(&XattrMap::new()), None);
    }

    #[test]
    fn the_layout_is_s3fs_s() {
        // {"user.k":"dmFsdWU="} as s3fs's urlEncodePath writes it.
        let e = encode(&map(&[("user.k", b"value")])).unwrap();
        assert_eq!(e, "%7B%22user.k%22%3A%22dmFsdWU%3D%22%7D");
        // s3fs writes `{}` when the last attribute goes, and may use lowercase hex.
        assert!(decode("%7B%7D").is_empty());
        assert_eq!(decode("%7b%22user.k%22%3a%22dmFsdWU%3d%22%7d"), map(&[("user.k", b"value")]));
        // Two entries, one of them damaged: the other is kept.
        assert_eq!(decode("%7B%22user.a%22%3A%22YQ%3D%3D%22%2C%22broken%7D"), map(&[("user.a", b"a")]));
        assert!(decode("not json").is_empty());
    }

    #[test]
    fn names_s3fs_cannot_read_back_are_refused() {
        assert!(storable_name("user.mime_type"));
        assert!(!storable_name("user.a,b"));
        assert!(!storable_name("user.\"q\""));
        assert!(!storable_name(""));
    }

    #[test]
    fn the_budget_holds_about_a_kilobyte_of_values() {
        let v = vec![7u8; 1000];
        assert!(fits(encode(&map(&[("user.big", &v)])).as_deref()));
        let v = vec![7u8; 1200];
        assert!(!fits(encode(&map(&[("user.big", &v)])).as_deref()));
        assert!(fits(None));
    }
}
