//! The recipe parser and planner on arbitrary text: an error (exit 2 in the CLI), never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static REGISTRY: OnceLock<pipeline_engine::Registry> = OnceLock::new();
    let registry = REGISTRY.get_or_init(pipeline_stages::registry);
    let Ok(text) = std::str::from_utf8(data) else { return };
    let src = pipeline_engine::Source { path: "fuzz/recipe.toml".into(), text: text.to_string() };
    if let Err(e) = pipeline_engine::plan_source(&src, registry) {
        let _ = e.to_string();
    }
});
