//! The general_mcq CSV reader on an arbitrary file: items or an error naming a line, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x_val.csv");
    std::fs::write(&p, data).unwrap();
    if let Err(e) = pipeline_metrics::mcq::load_mcq_csv(&p) {
        let _ = e.to_string();
    }
});
