//! The GGUF reader on an arbitrary file: header, metadata, tensor table and every tensor's data
//! (dequantised), or an error; never a panic, an abort on a huge allocation, or a hang.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, data).unwrap();
    let Ok(f) = pipeline_model::gguf::GgufFile::open(&p) else { return };
    let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
    for n in names.iter().take(8) {
        let _ = f.dequantize(n);
    }
});
