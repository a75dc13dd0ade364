//! The cache key of a stage (see the crate's design note for the "what enters the key" table).
//! The field-by-field comparison behind `pipeline explain` is [`crate::dirty`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Bump when the key struct's meaning changes.
pub const KEY_SCHEMA: u32 = 1;

/// Prefix of an input digest whose producing stage has still to run (`pending:<stage id>`).
pub const PENDING: &str = "pending:";

/// A local file a stage reads: path relative to the recipe directory (or its file name when it is
/// outside), and its content digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileKey {
    pub path: String,
    pub digest: String,
}

/// What a stage's cache key is the sha256 of. Entries store it as JSON; [`crate::dirty::changes`]
/// reads it back to say what changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        !self.inputs.values().flatten().any(|d| d.starts_with(PENDING))
    }
}

/// The path under which a local file enters the key.
pub fn key_path(recipe_dir: &Path, file: &Path) -> String {
    match file.strip_prefix(recipe_dir) {
        Ok(rel) => rel.to_string_lossy().replace('\\', "/"),
        Err(_) => file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    }
}
