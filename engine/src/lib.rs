//! The `pipeline` engine: recipe (wire types) → plan (validated petgraph DAG) → execution with a
//! content-hashed cache, reporting through events.
//!
//! See `stage.rs` for the contract every stage implements.

pub mod stage;

pub use stage::{Declared, EventSink, NullSink, PlanCtx, Registry, RunCtx, RunParts, Stage, StageError, StageEvent};
