//! Why a stage is out of date, as data (after cargo's `DirtyReason`): the executor computes a
//! [`DirtyReason`] for every stage that will run, and a list of [`KeyChange`]s between the stage's
//! key now and the key of its latest entry (the key JSON stored in that entry). `pipeline plan`
//! prints the reason (`will run: changed: params.separator`); `pipeline explain` prints each change
//! on its own line (`dirty: params.separator: "\n" → "\n\n"`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use crate::key::{StageKey, PENDING};

/// Why a stage will run.
#[derive(Debug, Clone, PartialEq)]
pub enum DirtyReason {
    /// No entry of this stage of this recipe is in the cache (it never ran, or `cache gc` dropped it).
    NeverRan,
    /// Key fields differ from those of the stage's latest entry (never empty).
    Changed(Vec<KeyChange>),
    /// The key equals the latest entry's, but that entry or one of its outputs is gone or corrupt.
    OutputsLost,
    /// The entry for this key could not be read (a warning said why); it was discarded.
    EntryUnreadable,
    /// Output `output` of the entry for this key is missing from the store.
    ArtifactMissing { output: String },
    /// Output `output` of the entry for this key failed its digest check; it was discarded.
    ArtifactCorrupt { output: String },
    /// `--force`.
    Forced,
}

impl fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyReason::NeverRan => f.write_str("no cache entry (never ran)"),
            DirtyReason::Changed(changes) => {
                let fields: Vec<String> = changes.iter().map(KeyChange::field).collect();
                write!(f, "changed: {}", fields.join(", "))
            }
            DirtyReason::OutputsLost => f.write_str("cached output missing or corrupt"),
            DirtyReason::EntryUnreadable => f.write_str("cache entry was unreadable"),
            DirtyReason::ArtifactMissing { output } => write!(f, "output `{output}` was missing from the cache"),
            DirtyReason::ArtifactCorrupt { output } => write!(f, "output `{output}` was corrupt"),
            DirtyReason::Forced => f.write_str("forced (--force)"),
        }
    }
}

/// One input artifact as a key records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputDigest {
    /// The content digest of a committed artifact.
    Artifact(String),
    /// The output of `stage`, which has still to run (only in keys that are explained, never looked up).
    Pending { stage: String },
}

impl InputDigest {
    pub(crate) fn parse(s: &str) -> InputDigest {
        match s.strip_prefix(PENDING) {
            Some(stage) => InputDigest::Pending { stage: stage.to_string() },
            None => InputDigest::Artifact(s.to_string()),
        }
    }
    fn render(&self) -> String {
        match self {
            InputDigest::Artifact(d) => d.clone(),
            InputDigest::Pending { stage } => format!("new output of {stage}"),
        }
    }
}

/// One key field that differs between a stage's latest entry and its key now. `None` on a side
/// means the field is absent there (an added or removed param, input or file).
#[derive(Debug, Clone, PartialEq)]
pub enum KeyChange {
    /// The key format itself ([`crate::key::KEY_SCHEMA`]); the other fields are not compared.
    /// `old` is `None` when the stored key is not readable as a key at all.
    Schema {
        old: Option<u64>,
        new: u32,
    },
    Kind {
        old: String,
        new: String,
    },
    /// `Stage::version()` was bumped.
    Version {
        old: u32,
        new: u32,
    },
    /// One param leaf: `path` is dotted (`optim.lr`), with `[i]` for tables inside arrays.
    Param {
        path: String,
        old: Option<Value>,
        new: Option<Value>,
    },
    /// The artifacts bound to input `name`.
    Input {
        name: String,
        old: Option<Vec<InputDigest>>,
        new: Option<Vec<InputDigest>>,
    },
    /// The content digest of a local file the stage reads (`path` relative to the recipe).
    File {
        path: String,
        old: Option<String>,
        new: Option<String>,
    },
    /// The same local files with the same content, read in another order.
    FileOrder {
        old: Vec<String>,
        new: Vec<String>,
    },
    /// `[pipeline] seed`.
    Seed {
        old: u64,
        new: u64,
    },
}

impl KeyChange {
    /// The field's name as `plan` lists it: `params.separator`, `inputs.data`, `files.data/a.txt`,
    /// `version`...
    pub fn field(&self) -> String {
        match self {
            KeyChange::Schema { .. } => "schema".into(),
            KeyChange::Kind { .. } => "kind".into(),
            KeyChange::Version { .. } => "version".into(),
            KeyChange::Param { path, .. } => format!("params.{path}"),
            KeyChange::Input { name, .. } => format!("inputs.{name}"),
            KeyChange::File { path, .. } => format!("files.{path}"),
            KeyChange::FileOrder { .. } => "files".into(),
            KeyChange::Seed { .. } => "seed".into(),
        }
    }

    /// (old, new) rendered as JSON, digests shortened to 12 hex digits.
    fn sides(&self) -> (Option<String>, Option<String>) {
        let json = |v: &Value| shorten(&v.to_string());
        let string = |s: &str| json(&Value::from(s));
        let inputs = |l: &[InputDigest]| json(&Value::from(l.iter().map(InputDigest::render).collect::<Vec<_>>()));
        let paths = |l: &[String]| json(&Value::from(l.to_vec()));
        match self {
            KeyChange::Schema { old, new } => {
                (Some(old.map_or_else(|| "(not a readable key)".into(), |o| o.to_string())), Some(new.to_string()))
            }
            KeyChange::Kind { old, new } => (Some(string(old)), Some(string(new))),
            KeyChange::Version { old, new } => (Some(old.to_string()), Some(new.to_string())),
            KeyChange::Param { old, new, .. } => (old.as_ref().map(json), new.as_ref().map(json)),
            KeyChange::Input { old, new, .. } => (old.as_deref().map(inputs), new.as_deref().map(inputs)),
            KeyChange::File { old, new, .. } => (old.as_deref().map(string), new.as_deref().map(string)),
            KeyChange::FileOrder { old, new } => (Some(paths(old)), Some(paths(new))),
            KeyChange::Seed { old, new } => (Some(old.to_string()), Some(new.to_string())),
        }
    }
}

/// `field: old → new`, `field: added (new)` or `field: removed (was old)`.
impl fmt::Display for KeyChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = self.field();
        match self.sides() {
            (Some(old), Some(new)) => write!(f, "{field}: {old} → {new}"),
            (None, Some(new)) => write!(f, "{field}: added ({new})"),
            (Some(old), None) => write!(f, "{field}: removed (was {old})"),
            (None, None) => f.write_str(&field),
        }
    }
}

/// Abbreviate every 64-hex-digit run (a digest) to its first 12 digits and `…`.
fn shorten(s: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    for c in s.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() {
            run.push(c);
            continue;
        }
        if run.len() == 64 {
            out.push_str(&run[..12]);
            out.push('…');
        } else {
            out.push_str(&run);
        }
        run.clear();
        out.push(c);
    }
    out.pop();
    out
}

/// Param leaves by dotted path: tables are walked, arrays holding tables are walked by index, every
/// other value (arrays of scalars included) is a leaf; an empty nested table is a leaf `{}`.
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            if m.is_empty() && !prefix.is_empty() {
                out.insert(prefix.to_string(), v.clone());
            }
            for (k, x) in m {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&p, x, out);
            }
        }
        Value::Array(a) if a.iter().any(Value::is_object) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The changes from `old` (a key JSON stored in an entry) to `new`, ordered by field name. Empty
/// exactly when the two keys are equal.
pub fn changes(old: &Value, new: &StageKey) -> Vec<KeyChange> {
    let Ok(old_key) = StageKey::deserialize(old) else {
        return vec![KeyChange::Schema { old: old.get("schema").and_then(Value::as_u64), new: new.schema }];
    };
    if old_key.schema != new.schema {
        return vec![KeyChange::Schema { old: Some(old_key.schema.into()), new: new.schema }];
    }
    let mut out = Vec::new();
    if old_key.kind != new.kind {
        out.push(KeyChange::Kind { old: old_key.kind.clone(), new: new.kind.clone() });
    }
    if old_key.version != new.version {
        out.push(KeyChange::Version { old: old_key.version, new: new.version });
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &old_key.params, &mut a);
    flatten("", &new.params, &mut b);
    for path in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
        let (x, y) = (a.get(path), b.get(path));
        if x != y {
            out.push(KeyChange::Param { path: path.clone(), old: x.cloned(), new: y.cloned() });
        }
    }
    let digests = |l: &Vec<String>| l.iter().map(|d| InputDigest::parse(d)).collect::<Vec<_>>();
    for name in old_key.inputs.keys().chain(new.inputs.keys()).collect::<BTreeSet<_>>() {
        let (x, y) = (old_key.inputs.get(name), new.inputs.get(name));
        if x != y {
            out.push(KeyChange::Input { name: name.clone(), old: x.map(digests), new: y.map(digests) });
        }
    }
    let by_path = |k: &StageKey| k.files.iter().map(|f| (f.path.clone(), f.digest.clone())).collect::<BTreeMap<_, _>>();
    let (a, b) = (by_path(&old_key), by_path(new));
    let mut files_changed = false;
    for path in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
        let (x, y) = (a.get(path), b.get(path));
        if x != y {
            files_changed = true;
            out.push(KeyChange::File { path: path.clone(), old: x.cloned(), new: y.cloned() });
        }
    }
    let order = |k: &StageKey| k.files.iter().map(|f| f.path.clone()).collect::<Vec<_>>();
    if !files_changed && order(&old_key) != order(new) {
        out.push(KeyChange::FileOrder { old: order(&old_key), new: order(new) });
    }
    if old_key.seed != new.seed {
        out.push(KeyChange::Seed { old: old_key.seed, new: new.seed });
    }
    out.sort_by_key(KeyChange::field);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{FileKey, KEY_SCHEMA};

    fn key(params: Value, inputs: &[(&str, &[&str])], files: &[(&str, &str)]) -> StageKey {
        StageKey {
            schema: KEY_SCHEMA,
            kind: "k".into(),
            version: 1,
            params,
            inputs: inputs.iter().map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect())).collect(),
            files: files.iter().map(|(p, d)| FileKey { path: p.to_string(), digest: d.to_string() }).collect(),
            seed: 1,
        }
    }

    #[test]
    fn equal_keys_have_no_changes_and_every_difference_is_one() {
        let a = key(serde_json::json!({"lr": 0.1, "opt": {"b": [1, 2]}}), &[("data", &["x"])], &[("f", "d")]);
        assert!(changes(&serde_json::to_value(&a).unwrap(), &a).is_empty());
        let mut b = a.clone();
        b.params = serde_json::json!({"lr": 0.1, "opt": {"b": [1, 3]}, "new": true});
        b.seed = 2;
        let c = changes(&serde_json::to_value(&a).unwrap(), &b);
        let fields: Vec<String> = c.iter().map(KeyChange::field).collect();
        assert_eq!(fields, ["params.new", "params.opt.b", "seed"]);
        assert_eq!(c[0].to_string(), "params.new: added (true)");
        assert_eq!(c[1].to_string(), "params.opt.b: [1,2] → [1,3]");
    }

    #[test]
    fn digests_are_shortened_and_pending_inputs_named() {
        let (x, y) = ("a".repeat(64), "b".repeat(64));
        let a = key(serde_json::json!({"lr": 0.1}), &[("data", &[&x]), ("more", &[&x])], &[]);
        let b = key(serde_json::json!({"lr": 0.2}), &[("data", &[&y]), ("more", &["pending:up"])], &[]);
        let c: Vec<String> = changes(&serde_json::to_value(&a).unwrap(), &b).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            c,
            [
                "inputs.data: [\"aaaaaaaaaaaa…\"] → [\"bbbbbbbbbbbb…\"]",
                "inputs.more: [\"aaaaaaaaaaaa…\"] → [\"new output of up\"]",
                "params.lr: 0.1 → 0.2",
            ]
        );
    }

    #[test]
    fn reordered_files_are_a_change() {
        let a = key(serde_json::json!({}), &[], &[("a", "1"), ("b", "2")]);
        let b = key(serde_json::json!({}), &[], &[("b", "2"), ("a", "1")]);
        let c = changes(&serde_json::to_value(&a).unwrap(), &b);
        assert_eq!(
            c,
            vec![KeyChange::FileOrder { old: vec!["a".into(), "b".into()], new: vec!["b".into(), "a".into()] }]
        );
    }

    #[test]
    fn an_unreadable_stored_key_is_a_schema_change() {
        let b = key(serde_json::json!({}), &[], &[]);
        let c = changes(&serde_json::json!({"schema": 0, "something": "else"}), &b);
        assert_eq!(c, vec![KeyChange::Schema { old: Some(0), new: KEY_SCHEMA }]);
    }
}
