//! The engine's behaviour, tested through `plan` + `exec::run` on a real cache directory with a
//! test-only stage kind (`support::Step`) these tests register themselves: no ML crate is built,
//! and the whole binary runs in seconds.
//!
//! - `caching`: cold / warm / edit / revert, early cutoff, local files keyed by content, a copied
//!   project keeps its cache, the device stays out of the key.
//! - `corruption`: a corrupt or truncated artifact is a warning and a re-run.
//! - `processes`: kill -9 mid-stage then resume from the checkpoint; two runs and the cache lock.
//! - `selection`: `--only` / `--until` / `--force`, `--jobs`, a failing stage.
//! - `dirty`: why a stage will run ([`pipeline_engine::DirtyReason`]), as `plan` and `explain`
//!   render it (insta snapshots in `snapshots/engine/`).

mod caching;
mod corruption;
mod dirty;
mod dist;
mod processes;
mod selection;
mod support;
