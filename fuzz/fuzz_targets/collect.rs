//! The collect stage's JSONL / JSON / CSV readers on an arbitrary file (the first byte picks the
//! format), with `on_error = "quarantine"`: rows or quarantined rows or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use pipeline_engine::{NullSink, RunCtx, RunParts};

fuzz_target!(|data: &[u8]| {
    static REGISTRY: OnceLock<pipeline_engine::Registry> = OnceLock::new();
    let registry = REGISTRY.get_or_init(pipeline_stages::registry);
    let Some((&sel, body)) = data.split_first() else { return };
    let ext = ["jsonl", "json", "csv"][usize::from(sel) % 3];
    let dir = tempfile::tempdir().unwrap();
    let file = format!("data.{ext}");
    std::fs::write(dir.path().join(&file), body).unwrap();
    let params: toml::Table =
        toml::from_str(&format!("datasets = [{file:?}]\non_error = \"quarantine\"\nshuffle = false")).unwrap();
    let mut outputs = BTreeMap::new();
    for o in ["data", "quarantine", "report"] {
        let d = dir.path().join("out").join(o);
        std::fs::create_dir_all(&d).unwrap();
        outputs.insert(o.to_string(), d);
    }
    let ctx = RunCtx::new(RunParts {
        stage_id: "collect".into(),
        params: params.clone(),
        seed: 1,
        recipe_dir: dir.path().to_path_buf(),
        inputs: BTreeMap::new(),
        outputs,
        scratch: dir.path().join("scratch"),
        sink: Arc::new(NullSink),
        cancel: Arc::new(AtomicBool::new(false)),
    });
    let stage = registry.get("collect").expect("collect is registered");
    if let Err(e) = stage.run(&ctx) {
        let _ = e.to_string();
    }
});
