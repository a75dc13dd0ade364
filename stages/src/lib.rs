//! Every stage kind `pipeline` knows, one module per kind. Adding a kind: write `src/<kind>.rs`
//! implementing [`pipeline_engine::Stage`], then add one line to [`registry`].

mod align;
mod augment;
mod clean;
mod collect;
pub mod data;
mod dedupe;
pub mod evaluate;
pub mod evaluate_model;
mod export;
mod label;
mod pretrain;
mod quantize;
mod sft;
mod training;

use pipeline_engine::Registry;

#[cfg(feature = "cuda")]
pub use training::cuda_device;
pub use training::{cuda_not_built, ReportTo, TENSORBOARD_DIR};

/// All stage kinds, by recipe `kind` name.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    // Built-in engine kinds: `files`, `concat`.
    pipeline_engine::builtin::register(&mut r);
    r.register(collect::Collect);
    r.register(dedupe::Dedupe);
    r.register(clean::Clean);
    r.register(label::LabelStage);
    r.register(augment::Augment);
    r.register(pretrain::Pretrain);
    r.register(sft::Sft);
    r.register(align::Align);
    r.register(evaluate::Evaluate::new(evaluate_model::load_model_predictor));
    r.register(quantize::Quantize);
    r.register(export::Export);
    r
}
