//! The `pipeline` engine: recipe (wire types) → plan (validated petgraph DAG) → execution with a
//! content-hashed cache, reporting through events.
//!
//! # Design note
//!
//! - [`recipe`]: strict serde wire types; every error is a [`RecipeError`] with file, line, the
//!   offending line and a hint (known keys, known kinds, the cycle path).
//! - [`plan::plan`]: pure; checks kinds, lets each stage validate its params (`Stage::declare`),
//!   resolves `inputs.<name> = "<stage>.<output>"`, rejects cycles, orders stages topologically
//!   (ties keep recipe order). `[pipeline.defaults.<kind>]` tables are merged key by key under
//!   each stage's own params (the stage's value wins) before `declare` and before keying.
//! - [`exec::run`]: for each stage whose inputs are resolved, computes its key, looks it up, and
//!   either reuses the entry or runs the stage on a worker thread (at most `jobs` at once), then
//!   commits its outputs. Events go to a [`exec::Reporter`]; only the CLI draws.
//! - [`dirty`]: why a stage will run, as data ([`DirtyReason`], [`KeyChange`]): computed by
//!   [`exec::run`] and [`exec::statuses`] from the key JSON stored in the stage's latest entry,
//!   rendered by `pipeline plan` / `explain` through `Display`.
//! - [`device`]: the typed `--device` ([`Device`]) stages read from [`RunCtx::device`].
//! - [`dist`]: the rank of a data-parallel run ([`DistEnv`], torchrun's variables); with a world
//!   size above 1 only rank 0 writes the cache, the others wait for its entries and join the
//!   stages that train together.
//!
//! ## What enters the key ([`key::StageKey`])
//!
//! | field     | source                                                               | a change reads ([`KeyChange`])          |
//! |-----------|----------------------------------------------------------------------|------------------------------------------|
//! | `schema`  | [`key::KEY_SCHEMA`] (the key format itself)                          | `schema`                                 |
//! | `kind`    | `kind = "..."`                                                       | `kind`                                   |
//! | `version` | `Stage::version()`                                                   | `version`                                |
//! | `params`  | merged params (defaults + stage), canonical JSON                     | `params.<dotted path>`, one per leaf     |
//! | `inputs`  | input name → content digests of the bound upstream artifacts         | `inputs.<name>`                          |
//! | `files`   | `Declared::files`: path relative to the recipe dir + content digest  | `files.<path>`; `files` when reordered   |
//! | `seed`    | `[pipeline] seed`                                                    | `seed`                                   |
//!
//! A stage with no usable entry runs for one [`DirtyReason`]: it never ran, its key changed
//! (the list of [`KeyChange`]s above, against the key JSON stored in its latest entry), its entry
//! or an output was missing, unreadable or corrupt, or `--force`.
//!
//! Not in the key: the world size of a data-parallel run as such (a distributed stage's params are
//! keyed as they read at the world size — for training, the global batch — see [`dist`]); stage ids, the recipe's name or location, mtimes, absolute paths, `--jobs`,
//! `--only` / `--until` / `--force`, the [`Device`] (`--device`: a stage trained on the CPU stays
//! cached for a CUDA run) and the other run options ([`ExecOptions::options`]; a stage whose output
//! depends on an option must put it in its params). Inputs enter by content, so a re-run producing
//! identical bytes leaves downstream stages cached (early cutoff). Corruption checks are described
//! in `pipeline_cache`.

pub mod builtin;
pub mod device;
pub mod dirty;
pub mod dist;
pub mod exec;
pub mod key;
pub mod plan;
pub mod recipe;
pub mod stage;

pub use device::{Device, ParseDeviceError};
pub use dirty::{DirtyReason, InputDigest, KeyChange};
pub use dist::{DistEnv, DistEnvError};
pub use exec::{
    ExecError, ExecOptions, Freshness, KeyError, NullReporter, Reporter, RunSummary, StageOutcome, StageStatus, Status,
};
pub use plan::{plan, plan_source, Plan, PlannedStage, UnknownStage};
pub use recipe::{RecipeError, Source};
pub use stage::{Declared, EventSink, NullSink, PlanCtx, Registry, RunCtx, RunParts, Stage, StageError, StageEvent};
