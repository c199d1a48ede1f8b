//! Bucket layout: how paths become object keys and how POSIX attributes travel as object
//! user metadata (the names s3fs uses). Pure functions, no I/O.

use std::collections::HashMap;

use object_store::{Attribute, AttributeValue, Attributes};

/// Zero-byte object that keeps an empty folder alive (object_store paths cannot end in `/`,
/// so the s3fs-style `dir/` marker cannot be written; `dir/` markers written by other tools
/// are still read as folders).
pub const FOLDER_MARKER: &str = ".autosync-folder";
/// Names starting with this are reserved for autosync and hidden from listings.
pub const RESERVED_PREFIX: &str = ".autosync-";

pub const S_IFMT: u32 = 0o170000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;

/// Metadata names, shared with s3fs so buckets stay readable by both.
pub const META_MODE: &str = "mode";
pub const META_UID: &str = "uid";
pub const META_GID: &str = "gid";
pub const META_MTIME: &str = "mtime";
/// Written only when it differs from `mtime` (s3fs writes it always; absent means `mtime`).
pub const META_ATIME: &str = "atime";
/// The device number of a device node (s3fs's name and format: a decimal `dev_t`).
pub const META_RDEV: &str = "rdev";
/// The link group of a file with several names (hard links): each name is a full copy of
/// the object and carries the same group id.
pub const META_LINK: &str = "autosync-link";
/// blake3 of the content, to settle ambiguous conditional writes by reading back.
pub const META_HASH: &str = "autosync-hash";
/// `WRITER:INO`: the mount state (a random id per state dir) and the inode that uploaded
/// the object, so a mount recognises its own upload that a crash kept it from recording.
pub const META_ORIGIN: &str = "autosync-origin";
/// The host name of the machine whose autosync uploaded the object (for `--conflict
/// priority`), as in conflict copy names.
pub const META_HOST: &str = "autosync-host";
/// The user whose autosync wrote the object (the `priority` policy can rank users).
pub const META_USER: &str = "autosync-user";

/// The longest name of a file or folder, in bytes, as on Linux filesystems.
pub const NAME_MAX: usize = 255;

/// Why a listed key cannot become a file name.
pub fn invalid_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty path component")
    } else if name == "." || name == ".." {
        Some("`.` or `..` component")
    } else if name.len() > NAME_MAX {
        Some("component longer than 255 bytes")
    } else if name.contains('\0') {
        Some("NUL byte in name")
    } else {
        None
    }
}

/// object_store's local-folder store writes uploads to `NAME#N` first and refuses such
/// names as keys.
pub fn is_local_temp_name(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Hidden from listings: autosync's own markers and probes.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

/// Joins the mount prefix and a relative path (`a/b`) into a key without leading `/`.
pub fn join_key(prefix: &str, rel: &str) -> String {
    match (prefix.is_empty(), rel.is_empty()) {
        (true, _) => rel.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}/{rel}"),
    }
}

pub fn marker_key(dir_key: &str) -> String {
    join_key(dir_key, FOLDER_MARKER)
}

/// Splits `name.ext` to build `name.conflict-HOST-STAMP.ext`.
pub fn conflict_name(name: &str, host: &str, stamp: &str) -> String {
    match name.rfind('.') {
        Some(i) if i > 0 => format!("{}.conflict-{host}-{stamp}{}", &name[..i], &name[i..]),
        _ => format!("{name}.conflict-{host}-{stamp}"),
    }
}

/// POSIX attributes as stored on an object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PosixAttrs {
    /// Full st_mode including the type bits, as s3fs writes it.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Nanoseconds since the epoch; on the object `SECONDS[.NNNNNNNNN]` (see [`format_time`]).
    pub mtime_ns: Option<i64>,
    /// Last access, when it differs from the modification time.
    pub atime_ns: Option<i64>,
    /// The device of a device node.
    pub rdev: Option<u32>,
    /// Extended attributes, as the `xattr` value s3fs writes (`crate::xattrs`).
    pub xattr: Option<String>,
    /// The link group, for a file with several names (`autosync-link`).
    pub link: Option<String>,
}

impl PosixAttrs {
    pub fn to_attributes(&self, hash: Option<&str>, origin: Option<&str>) -> Attributes {
        let mut a = Attributes::new();
        let mut put = |k: &'static str, v: String| {
            a.insert(Attribute::Metadata(k.into()), AttributeValue::from(v));
        };
        if let Some(m) = self.mode {
            put(META_MODE, m.to_string());
        }
        if let Some(u) = self.uid {
            put(META_UID, u.to_string());
        }
        if let Some(g) = self.gid {
            put(META_GID, g.to_string());
        }
        if let Some(t) = self.mtime_ns {
            put(META_MTIME, format_time(t));
        }
        if let Some(t) = self.atime_ns {
            put(META_ATIME, format_time(t));
        }
        if let Some(d) = self.rdev {
            put(META_RDEV, d.to_string());
        }
        if let Some(x) = &self.xattr {
            put(crate::xattrs::META_XATTR, x.clone());
        }
        if let Some(g) = &self.link {
            put(META_LINK, g.clone());
        }
        if let Some(h) = hash {
            put(META_HASH, h.to_string());
        }
        if let Some(o) = origin {
            put(META_ORIGIN, o.to_string());
        }
        a
    }

    pub fn from_attributes(a: &Attributes) -> (Self, Option<String>) {
        let map = metadata_map(a);
        let num = |k: &str| map.get(k).and_then(|v| parse_leading_int(v));
        let attrs = PosixAttrs {
            mode: num(META_MODE).and_then(|v| u32::try_from(v).ok()),
            uid: num(META_UID).and_then(|v| u32::try_from(v).ok()),
            gid: num(META_GID).and_then(|v| u32::try_from(v).ok()),
            mtime_ns: map.get(META_MTIME).and_then(|v| parse_time(v)),
            atime_ns: map.get(META_ATIME).and_then(|v| parse_time(v)),
            rdev: num(META_RDEV).and_then(|v| u32::try_from(v).ok()),
            xattr: map.get(crate::xattrs::META_XATTR).cloned(),
            link: map.get(META_LINK).cloned(),
        };
        (attrs, map.get(META_HASH).cloned())
    }

    /// The `autosync-origin` an object carries, if any.
    pub fn origin(a: &Attributes) -> Option<String> {
        metadata_map(a).remove(META_ORIGIN)
    }

    /// The modification time in whole seconds.
    pub fn mtime(&self) -> Option<i64> {
        self.mtime_ns.map(|t| t.div_euclid(NANOS))
    }

    pub fn is_symlink(&self) -> bool {
        self.mode.is_some_and(|m| m & S_IFMT == S_IFLNK)
    }
}

const NANOS: i64 = 1_000_000_000;

/// A time on an object, as s3fs and rclone write it: whole seconds since the epoch, then
/// `.` and nine digits of nanoseconds when there are any. Before 1970 the seconds are
/// negative and the nanoseconds still count forward (a `timespec`).
pub fn format_time(ns: i64) -> String {
    let (s, n) = (ns.div_euclid(NANOS), ns.rem_euclid(NANOS));
    if n == 0 { s.to_string() } else { format!("{s}.{n:09}") }
}

/// Reads [`format_time`]'s form; fewer than nine digits of fraction are a decimal fraction.
pub fn parse_time(v: &str) -> Option<i64> {
    let v = v.trim();
    let (whole, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = whole.parse().ok()?;
    let digits: String = frac.chars().take_while(char::is_ascii_digit).take(9).collect();
    let nanos = if digits.is_empty() { 0 } else { format!("{digits:0<9}").parse::<i64>().ok()? };
    secs.checked_mul(NANOS)?.checked_add(nanos)
}

/// A number at the start of a value (`644`, or `-2` of `-2.5`).
fn parse_leading_int(v: &str) -> Option<i64> {
    let v = v.trim();
    let end =
        v.char_indices().find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-'))).map_or(v.len(), |(i, _)| i);
    v[..end].parse().ok()
}

pub fn metadata_map(a: &Attributes) -> HashMap<String, String> {
    a.iter()
        .filter_map(|(k, v)| match k {
            Attribute::Metadata(name) => Some((name.to_ascii_lowercase(), v.as_ref().to_string())),
            _ => None,
        })
        .collect()
}

/// ETags compare equal whether or not a server quoted them.
pub fn etag_eq(a: &str, b: &str) -> bool {
    a.trim_matches('"') == b.trim_matches('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_s3fs_names() {
        let a = PosixAttrs {
            mode: Some(S_IFREG | 0o640),
            uid: Some(1000),
            gid: Some(100),
            mtime_ns: Some(1_700_000_000 * NANOS),
            atime_ns: Some(-1),
            rdev: None,
            xattr: crate::xattrs::encode(&[("user.k".to_string(), b"v".to_vec())].into()),
            link: Some("g1".into()),
        };
        let attrs = a.to_attributes(Some("abc"), None);
        let map = metadata_map(&attrs);
        assert_eq!(map["mode"], (0o100640).to_string());
        assert_eq!(map["mtime"], "1700000000");
        assert_eq!(map["atime"], "-1.999999999");
        assert_eq!(map["xattr"], "%7B%22user.k%22%3A%22dg%3D%3D%22%7D");
        assert_eq!(map["autosync-link"], "g1");
        assert_eq!(PosixAttrs::from_attributes(&attrs), (a, Some("abc".into())));
    }

    #[test]
    fn times_keep_their_nanoseconds_before_and_after_the_epoch() {
        for ns in [0, 1, 1_700_000_000_123_456_789, 4_294_967_296 * NANOS, -1, -NANOS, -315_619_140 * NANOS + 5] {
            assert_eq!(parse_time(&format_time(ns)), Some(ns), "{ns} as {}", format_time(ns));
        }
        assert_eq!(format_time(1_700_000_000 * NANOS), "1700000000", "whole seconds as s3fs wrote them");
        assert_eq!(format_time(1_500_000_000), "1.500000000");
        assert_eq!(parse_time("1700000000.5"), Some(1_700_000_000_500_000_000), "a short fraction");
        assert_eq!(parse_time("-315619140.000000123"), Some(-315_619_140 * NANOS + 123), "s3fs before 1970");
        assert_eq!(parse_time("junk"), None);
    }

    #[test]
    fn bad_names_are_named() {
        assert!(invalid_name("..").is_some());
        assert!(invalid_name("").is_some());
        assert!(invalid_name(&"x".repeat(256)).is_some());
        assert!(invalid_name("ok name+%#ü").is_none());
    }

    #[test]
    fn local_temp_names_are_recognised() {
        assert!(is_local_temp_name("x#1"));
        assert!(!is_local_temp_name("x#"));
        assert!(!is_local_temp_name("issue#12b"));
        assert!(!is_local_temp_name("plain"));
    }

    #[test]
    fn conflict_names_keep_the_extension() {
        assert_eq!(conflict_name("report.txt", "h", "20260101-000000"), "report.conflict-h-20260101-000000.txt");
        assert_eq!(conflict_name(".bashrc", "h", "s"), ".bashrc.conflict-h-s");
        assert_eq!(conflict_name("Makefile", "h", "s"), "Makefile.conflict-h-s");
    }

    #[test]
    fn etags_compare_without_quotes() {
        assert!(etag_eq("\"abc\"", "abc"));
        assert!(!etag_eq("abc", "abd"));
    }

    #[test]
    fn keys_join_under_a_prefix() {
        assert_eq!(join_key("", "a/b"), "a/b");
        assert_eq!(join_key("p", "a"), "p/a");
        assert_eq!(join_key("p", ""), "p");
        assert_eq!(marker_key("p/d"), "p/d/.autosync-folder");
    }
}
