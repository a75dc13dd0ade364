//! Content-addressed artifact store, cache keys and locks for `pipeline`.
//!
//! # Design note
//!
//! A *cache key* is the sha256 of the canonical JSON of a serialisable struct (see [`key_of`]):
//! `serde_json` maps are sorted, so the same struct always gives the same bytes. The engine's key
//! struct (`pipeline_engine::key::StageKey`) holds:
//!
//! | field       | what enters the key                                              | what does not      |
//! |-------------|------------------------------------------------------------------|--------------------|
//! | `schema`    | the engine's key-format number                                   |                    |
//! | `kind`      | the stage kind (`sft`, `files`, ...)                             | the stage id       |
//! | `version`   | `Stage::version()` — bumped when a kind's outputs change         |                    |
//! | `params`    | the stage's params merged over `[pipeline.defaults.<kind>]`, canonical JSON | key order, comments, formatting |
//! | `inputs`    | input name → digests of the bound artifacts (their *content*)    | upstream ids, keys |
//! | `files`     | each local file a stage reads: path relative to the recipe dir + content digest | mtimes, absolute paths |
//! | `seed`      | the recipe's global `[pipeline] seed`                             |                    |
//!
//! Because inputs enter by *content digest*, a re-run upstream stage that produces byte-identical
//! outputs leaves its downstream keys unchanged (early cutoff). Nothing machine-specific enters a
//! key, so a copied project keeps its cache valid.
//!
//! # Layout (`<cache-dir>/v1/`; bump the suffix instead of migrating)
//!
//! - `artifacts/<digest>/` — one directory per artifact, named by its tree digest ([`digest_tree`]);
//!   `artifacts/<digest>.stamp` — local stat stamp (relative path, size, mtime) used for the cheap
//!   check below. Stamps are a memo, never part of a key.
//! - `entries/<key>.json` — a committed entry ([`Entry`]): the key's JSON (for `explain`), the
//!   output digests and sizes, the stage's report, duration, creation time.
//! - `last/<recipe>/<stage>` — the key of the latest entry of each recipe stage (for `explain` and
//!   `cache gc`).
//! - `scratch/<key>/` — a running stage's scratch directory; survives an interrupted run of the same
//!   key (training checkpoints), removed after commit.
//! - `tmp/` — staging for running stages' outputs; emptied by the next run holding the lock.
//! - `files.json` — memo of local-file digests by (path, size, mtime); only a memo.
//! - `lock` — `pipeline run` holds an exclusive lock on it for the whole run ([`Store::lock`]).
//!
//! # Atomicity and corruption
//!
//! A stage writes into `tmp/`; after it succeeds each output is digested and *renamed* into
//! `artifacts/`, then the entry is written with [`fs::write_atomic`] (unique temp file, fsync,
//! rename, directory fsync — the one atomic write every crate of the workspace uses). The entry is
//! the commit point: a process killed at any moment leaves either no entry (the stage re-runs) or a
//! complete one. Unreferenced artifacts and `tmp/` leftovers are harmless and removed by
//! `tmp` cleaning and `cache gc`.
//!
//! Corruption is checked at three costs:
//! - *cheap*, on every cache hit: the artifact's files are `stat`ed and compared with its stamp
//!   (set of relative paths, sizes, mtimes). Any difference triggers the full check. A missing
//!   artifact or an unreadable entry is a miss with a warning.
//! - *while read*, for every artifact a command loads (the inputs of a stage that runs, the model
//!   of `generate` / `chat` / `serve --recipe`): [`Store::expect_reads`] checks that the stamp's
//!   per-file hashes combine into the artifact's name (no content read) and arms [`checked`]; the
//!   loaders hash the bytes they read or map as they read them, and [`Store::finish_reads`] hashes,
//!   after a stage ran, the files no checked read covered. Each byte is hashed once, never by a
//!   second pass over a file that is read anyway. A mismatch is a warning; the artifact and its
//!   entry are removed, what the stage made from it is dropped, and the producing stage re-runs
//!   (`generate` and friends fail saying so).
//! - *full*, whenever the stamp disagrees or has no hashes: the tree digest is recomputed and
//!   compared with the name.
//!
//! `pipeline cache verify` runs the full check on every artifact.

pub mod checked;
mod digest;
pub mod fs;
mod store;

pub use digest::{digest_file_memo, digest_tree, FileMemo, Tree, TreeFile};
pub use fs::write_atomic;
pub use store::{
    ArtifactCheck, CacheError, Corruption, Entry, EntryDefect, EntryOutput, LockGuard, Staging, Store, LAYOUT,
};

use sha2::{Digest as _, Sha256};

/// sha256 (hex) of the canonical JSON of `value`, and that JSON (stored beside the digest so a
/// changed key can be explained field by field).
pub fn key_of<T: serde::Serialize>(value: &T) -> Result<(String, serde_json::Value), serde_json::Error> {
    let json = serde_json::to_value(value)?;
    let bytes = serde_json::to_vec(&json)?;
    Ok((hex::encode(Sha256::digest(&bytes)), json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct K {
        b: u32,
        a: std::collections::BTreeMap<String, u32>,
    }

    #[test]
    fn key_is_canonical_and_order_independent() {
        let mut m1 = std::collections::BTreeMap::new();
        m1.insert("y".to_string(), 1);
        m1.insert("x".to_string(), 2);
        let (k1, j) = key_of(&K { b: 1, a: m1.clone() }).unwrap();
        let v: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"x":2,"y":1}}"#).unwrap();
        let (k2, _) = key_of(&v).unwrap();
        assert_eq!(k1, k2);
        assert_eq!(j, v);
        let (k3, _) = key_of(&K { b: 2, a: m1 }).unwrap();
        assert_ne!(k1, k3);
    }
}
