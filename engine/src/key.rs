//! The cache key of a stage (see the `pipeline_cache` design note for the "what enters the key"
//! table) and the field-by-field comparison behind `pipeline explain`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

/// Bump when the key struct's meaning changes.
pub const KEY_SCHEMA: u32 = 1;

/// A local file a stage reads: path relative to the recipe directory (or its file name when it is
/// outside), and its content digest.
#[derive(Debug, Clone, Serialize)]
pub struct FileKey {
    pub path: String,
    pub digest: String,
}

/// What a stage's cache key is the sha256 of.
#[derive(Debug, Clone, Serialize)]
pub struct StageKey {
    pub schema: u32,
    pub kind: String,
    pub version: u32,
    pub params: serde_json::Value,
    /// Input name → digests of the bound artifacts (`pending:<stage>` while an upstream stage has
    /// still to run: such a key is never looked up, only explained).
    pub inputs: BTreeMap<String, Vec<String>>,
    pub files: Vec<FileKey>,
    pub seed: u64,
}

impl StageKey {
    pub fn is_complete(&self) -> bool {
        !self.inputs.values().flatten().any(|d| d.starts_with("pending:"))
    }
}

/// The path under which a local file enters the key.
pub fn key_path(recipe_dir: &Path, file: &Path) -> String {
    match file.strip_prefix(recipe_dir) {
        Ok(rel) => rel.to_string_lossy().replace('\\', "/"),
        Err(_) => file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    }
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(m) => {
            if m.is_empty() && !prefix.is_empty() {
                out.insert(prefix.to_string(), "{}".into());
            }
            for (k, x) in m {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&p, x, out);
            }
        }
        serde_json::Value::Array(a) if a.iter().any(|x| x.is_object()) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn shorten(s: &str) -> String {
    // Abbreviate 64-hex digests (inside JSON strings and arrays) to 12 digits.
    let mut out = String::new();
    let mut run = String::new();
    for c in s.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() {
            run.push(c);
        } else {
            if run.len() == 64 {
                out.push_str(&run[..12]);
                out.push('…');
            } else {
                out.push_str(&run);
            }
            run.clear();
            out.push(c);
        }
    }
    out.pop();
    out
}

/// Differences between an old and a new key JSON: `field: old → new` lines, in field order.
pub fn diff(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x != y => out.push(format!("{k}: {} → {}", shorten(x), shorten(y))),
            (Some(x), None) => out.push(format!("{k}: removed (was {})", shorten(x))),
            (None, Some(y)) => out.push(format!("{k}: added ({})", shorten(y))),
            _ => {}
        }
    }
    out
}

/// The top-level-ish field names that differ (`params.lr`, `inputs.data`, `version`...).
pub fn changed_fields(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    diff(old, new).into_iter().map(|l| l.split(':').next().unwrap_or_default().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_fields() {
        let a = serde_json::json!({"params": {"lr": 0.1, "n": 1}, "inputs": {"data": ["a".repeat(64)]}, "version": 1});
        let b = serde_json::json!({"params": {"lr": 0.2, "n": 1}, "inputs": {"data": ["b".repeat(64)]}, "version": 1});
        let d = diff(&a, &b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("inputs.data: [\"aaaaaaaaaaaa…\"] → [\"bbbbbbbbbbbb…\"]"), "{d:?}");
        assert_eq!(d[1], "params.lr: 0.1 → 0.2");
        assert_eq!(changed_fields(&a, &b), vec!["inputs.data", "params.lr"]);
    }
}
