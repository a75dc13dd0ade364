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
//!
//! ## What enters the key ([`key::StageKey`])
//!
//! | field     | source                                                            |
//! |-----------|-------------------------------------------------------------------|
//! | `schema`  | [`key::KEY_SCHEMA`] (the key format itself)                       |
//! | `kind`    | `kind = "..."`                                                     |
//! | `version` | `Stage::version()`                                                 |
//! | `params`  | merged params (defaults + stage), canonical JSON                  |
//! | `inputs`  | input name → content digests of the bound upstream artifacts      |
//! | `files`   | `Declared::files`: path relative to the recipe dir + content digest |
//! | `seed`    | `[pipeline] seed`                                                  |
//!
//! Not in the key: stage ids, the recipe's name or location, mtimes, absolute paths, `--jobs`,
//! `--device` and other run options (a stage whose output depends on an option must put it in its
//! params). Inputs enter by content, so a re-run producing identical bytes leaves downstream stages
//! cached (early cutoff). Corruption checks are described in `pipeline_cache`.

pub mod builtin;
pub mod exec;
pub mod key;
pub mod plan;
pub mod recipe;
pub mod stage;

pub use exec::{
    ExecError, ExecOptions, Freshness, NullReporter, Reporter, RunSummary, StageOutcome, StageStatus, Status,
};
pub use plan::{plan, plan_source, Plan, PlannedStage};
pub use recipe::{RecipeError, Source};
pub use stage::{Declared, EventSink, NullSink, PlanCtx, Registry, RunCtx, RunParts, Stage, StageError, StageEvent};
