//! Every stage kind `pipeline` knows, one module per kind. Adding a kind: write `src/<kind>.rs`
//! implementing [`pipeline_engine::Stage`], then add one line to [`registry`].

pub mod evaluate;
pub mod evaluate_model;
mod pending;

use pipeline_engine::Registry;

/// All stage kinds, by recipe `kind` name.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    // Built-in engine kinds: `files`, `concat` (and `test-step` under PIPELINE_TEST_STAGES=1).
    pipeline_engine::builtin::register(&mut r);
    for kind in
        ["collect", "dedupe", "clean", "label", "augment", "pretrain", "sft", "align", "evaluate", "quantize", "export"]
    {
        if kind == "evaluate" {
            r.register(evaluate::Evaluate::new(evaluate_model::load_model_predictor));
        } else {
            r.register(pending::Pending(kind));
        }
    }
    r
}
