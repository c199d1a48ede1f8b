//! How a conflict is decided: the policies (`--conflict`), per-path rules
//! (`--conflict-rules`), the ranking of hosts and users (`--conflict-priority`), and the
//! record each conflict leaves. Plain data and parsing: no I/O.

use serde::{Deserialize, Serialize};

/// What decides a conflict (`--conflict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The bucket's version keeps the path; ours becomes a conflict copy.
    #[default]
    KeepBoth,
    /// The newer mtime wins.
    Newest,
    /// This mount's version wins.
    Local,
    /// The bucket's version wins.
    Remote,
    /// The host or user ranked higher in `--conflict-priority` wins.
    Priority,
    /// A three-way merge of text files from the cached base version; keep-both when the
    /// merge conflicts, the file is binary, or the base is not at hand.
    Merge,
}

impl Policy {
    pub const NAMES: [&'static str; 6] = ["keep-both", "newest", "local", "remote", "priority", "merge"];

    pub fn name(self) -> &'static str {
        match self {
            Policy::KeepBoth => "keep-both",
            Policy::Newest => "newest",
            Policy::Local => "local",
            Policy::Remote => "remote",
            Policy::Priority => "priority",
            Policy::Merge => "merge",
        }
    }

    /// Keeps both versions whatever happens (no loser to discard): keep-both, and merge
    /// (whose fallback is keep-both).
    pub fn keeps_both(self) -> bool {
        matches!(self, Policy::KeepBoth | Policy::Merge)
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep-both" => Ok(Policy::KeepBoth),
            "newest" => Ok(Policy::Newest),
            "local" => Ok(Policy::Local),
            "remote" => Ok(Policy::Remote),
            "priority" => Ok(Policy::Priority),
            "merge" => Ok(Policy::Merge),
            _ => Err(format!("unknown conflict policy {s:?}: use one of {}", Policy::NAMES.join(", "))),
        }
    }
}

/// How conflicts are resolved: the policy, whether the losing version is kept as a
/// conflict copy (always, with keep-both) or discarded, and per-path rules that override
/// both (`--conflict-rules`).
#[derive(Debug, Clone, Default)]
pub struct ConflictConfig {
    pub policy: Policy,
    pub discard_loser: bool,
    pub rules: std::sync::Arc<Vec<ConflictRule>>,
    /// Host names and `@USER` entries, highest rank first, for the `priority` policy.
    pub priority: std::sync::Arc<Vec<String>>,
}

/// `PATTERN POLICY [keep|discard]`: files matching PATTERN use POLICY.
#[derive(Debug, Clone)]
pub struct ConflictRule {
    pub pattern: String,
    matcher: globset::GlobMatcher,
    pub policy: Policy,
    pub discard_loser: Option<bool>,
}

impl ConflictConfig {
    /// The rank in `priority` of a version written on `host` by `user` (0 is the highest):
    /// the better of its host's and its user's places, `usize::MAX` if neither is listed.
    pub fn rank(&self, host: Option<&str>, user: Option<&str>) -> usize {
        self.priority
            .iter()
            .position(|p| match p.strip_prefix('@') {
                Some(u) => user.is_some_and(|x| !x.is_empty() && x == u),
                None => host == Some(p.as_str()),
            })
            .unwrap_or(usize::MAX)
    }

    /// The policy and loser handling for a file at `path` (relative to the mount root):
    /// the first rule that matches, else the defaults.
    pub fn for_path(&self, path: &str) -> (Policy, bool) {
        match self.rules.iter().find(|r| r.matcher.is_match(path)) {
            Some(r) => (r.policy, r.discard_loser.unwrap_or(self.discard_loser && !r.policy.keeps_both())),
            None => (self.policy, self.discard_loser),
        }
    }

    /// Parses a rules file: one `PATTERN POLICY [keep|discard]` per line, `#` comments. A
    /// pattern without `/` matches a file name in any folder (`*.docx`); with one, the
    /// path from the mount root (`shared/**`, where `*` stops at `/` and `**` does not).
    pub fn parse_rules(text: &str) -> Result<Vec<ConflictRule>, String> {
        let mut rules = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = |e: String| format!("line {}: {e}", i + 1);
            let words: Vec<&str> = line.split_whitespace().collect();
            let (pattern, policy, loser) = match words.as_slice() {
                [p, pol] => (*p, *pol, None),
                [p, pol, l] => (*p, *pol, Some(*l)),
                _ => return Err(at(format!("{line:?}: write PATTERN POLICY [keep|discard]"))),
            };
            let policy: Policy = policy.parse().map_err(at)?;
            let discard_loser = match loser {
                None => None,
                Some("keep") => Some(false),
                Some("discard") if policy.keeps_both() => {
                    return Err(at(format!(
                        "{} keeps both versions: discard needs newest, local, remote or priority",
                        policy.name()
                    )));
                }
                Some("discard") => Some(true),
                Some(other) => return Err(at(format!("{other:?}: the loser is keep or discard"))),
            };
            let glob = if pattern.contains('/') {
                pattern.trim_start_matches('/').to_string()
            } else {
                format!("**/{pattern}")
            };
            let matcher = globset::GlobBuilder::new(&glob)
                .literal_separator(true)
                .build()
                .map_err(|e| at(format!("pattern {pattern:?}: {e}")))?
                .compile_matcher();
            rules.push(ConflictRule { pattern: pattern.to_string(), matcher, policy, discard_loser });
        }
        Ok(rules)
    }
}

#[cfg(test)]
mod rule_tests {
    use super::*;

    #[test]
    fn rules_pick_the_first_match_and_fall_back_to_the_defaults() {
        let rules = ConflictConfig::parse_rules(
            "# team rules\n*.docx newest\nshared/** local discard\nshared/notes/*.md remote   # never reached\n\n",
        )
        .unwrap();
        let cc = ConflictConfig { policy: Policy::KeepBoth, rules: std::sync::Arc::new(rules), ..Default::default() };
        assert_eq!(cc.for_path("report.docx"), (Policy::Newest, false));
        assert_eq!(cc.for_path("a/b/report.docx"), (Policy::Newest, false));
        assert_eq!(cc.for_path("shared/x/y.txt"), (Policy::Local, true));
        assert_eq!(cc.for_path("shared/notes/n.md"), (Policy::Local, true));
        assert_eq!(cc.for_path("other/shared/x"), (Policy::KeepBoth, false));
        assert_eq!(cc.for_path("notes.txt"), (Policy::KeepBoth, false));
        let ranked = ConflictConfig {
            priority: std::sync::Arc::new(vec!["@alice".into(), "server".into(), "@bob".into()]),
            ..Default::default()
        };
        assert_eq!(ranked.rank(Some("laptop"), Some("alice")), 0);
        assert_eq!(ranked.rank(Some("server"), Some("bob")), 1);
        assert_eq!(ranked.rank(Some("laptop"), Some("bob")), 2);
        assert_eq!(ranked.rank(Some("laptop"), None), usize::MAX);
        assert_eq!(ranked.rank(None, Some("alice")), 0);
    }

    #[test]
    fn bad_rules_name_their_line() {
        let err = |t: &str| ConflictConfig::parse_rules(t).unwrap_err();
        assert!(err("*.a newest\n*.b sometimes").starts_with("line 2: unknown conflict policy \"sometimes\""));
        assert!(err("*.a").starts_with("line 1: \"*.a\": write PATTERN POLICY"));
        assert!(err("*.a keep-both discard").contains("keep-both keeps both versions: discard needs newest"));
        assert!(err("*.a merge discard").contains("merge keeps both versions"));
        assert!(err("*.a local maybe").contains("the loser is keep or discard"));
        assert!(err("a[ local").starts_with("line 1: pattern \"a[\""));
    }
}

/// One conflict, as `autosync conflicts` shows it: when, where, both versions, the policy
/// and what it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// Seconds since the epoch.
    pub time: i64,
    /// The file's path in the mount.
    pub path: String,
    pub policy: String,
    pub outcome: String,
    /// The bucket's version when the conflict was found.
    pub remote: Version,
    /// This mount's version, and where it went.
    pub local: Version,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Version {
    /// Where this version is now (a path in the mount), if anywhere.
    pub path: Option<String>,
    pub size: Option<u64>,
    pub etag: Option<String>,
    /// blake3 of the content, when known.
    pub hash: Option<String>,
    /// Last modified, seconds since the epoch, when known.
    pub modified: Option<i64>,
}
