//! The recipe parser and planner on arbitrary text, with the engine's own kinds (`files`,
//! `concat`) and a permissive stand-in for each stage kind of the real registry (any params; the
//! outputs the real kinds declare): TOML parsing, `[pipeline]` / `[pipeline.defaults.*]`, input
//! references, the DAG (cycles, unknown stages), `${VAR}` paths; an error, never a panic. Builds
//! without polars and the trainer (the `recipe` target runs the real kinds' param checks too).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

use pipeline_engine::{Declared, PlanCtx, Registry, RunCtx, Stage, StageError};

struct AnyParams(&'static str);

impl Stage for AnyParams {
    fn kind(&self) -> &'static str {
        self.0
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "fuzz stand-in"
    }
    fn declare(&self, _: &PlanCtx<'_>) -> Result<Declared, StageError> {
        let outputs = ["data", "quarantine", "report", "removed", "model", "gguf", "metrics"];
        Ok(Declared { outputs: outputs.iter().map(|s| s.to_string()).collect(), files: vec![] })
    }
    fn run(&self, _: &RunCtx) -> Result<(), StageError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    let registry = REGISTRY.get_or_init(|| {
        let mut r = Registry::new();
        pipeline_engine::builtin::register(&mut r);
        for k in [
            "collect", "dedupe", "clean", "label", "augment", "pretrain", "sft", "align", "evaluate", "export",
            "quantize",
        ] {
            r.register(AnyParams(k));
        }
        r
    });
    let Ok(text) = std::str::from_utf8(data) else { return };
    let src = pipeline_engine::Source { path: "fuzz/recipe.toml".into(), text: text.to_string() };
    if let Err(e) = pipeline_engine::plan_source(&src, registry) {
        let _ = e.to_string();
    }
});
