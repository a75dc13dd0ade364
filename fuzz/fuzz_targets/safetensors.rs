//! The safetensors loader on an arbitrary file: f32 tensors or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    std::fs::write(&p, data).unwrap();
    if let Err(e) = pipeline_model::checkpoint::read_safetensors(&p) {
        let _ = e.to_string();
    }
});
