//! KV-cached decoding speed on the CPU (batch 1 and 8, greedy): the tiny preset (vocabulary 4,096,
//! random weights) and, when present, SmolLM2-135M-Instruct
//! (`$PIPELINE_TEST_ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf`, default `target/test-assets/`;
//! `python3 scripts/fetch_assets.py smollm2`) or the model given as `PIPELINE_BENCH_MODEL`.
//! `cargo bench -p pipeline-model --bench decode`. Prints tokens per wall second and per CPU
//! second of the process (`/proc/self/stat`; the machine is shared, CPU time is the stabler
//! figure). `PIPELINE_NO_HOST_MATMUL=1` times dfdx's gemm instead of the host few-row product.
use std::time::Instant;

use dfdx::prelude::*;
use pipeline_model::{Batch, Qwen2};

fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn decode(name: &str, m: &Qwen2<Cpu>, steps: usize) {
    // (steps: enough for the 10 ms resolution of the CPU clock)
    let v = m.cfg.vocab_size as u32;
    let prompt: Vec<u32> = (1..=16).map(|i| (i * 31) % v).collect();
    for rows in [1usize, 8] {
        let mut cache = m.new_cache();
        let ids: Vec<u32> = (0..rows).flat_map(|_| prompt.clone()).collect();
        m.forward_cached(&Batch::new(ids, rows, 16).unwrap(), &mut cache).unwrap();
        let (t, c) = (Instant::now(), cpu_s());
        let mut next = vec![1u32; rows];
        for _ in 0..steps {
            let logits = m.forward_cached(&Batch::new(next.clone(), rows, 1).unwrap(), &mut cache).unwrap();
            next = logits.iter().map(|l| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32).collect();
        }
        let (w, cpu) = (t.elapsed().as_secs_f64(), cpu_s() - c);
        let n = (steps * rows) as f64;
        println!(
            "{name}\tbatch {rows}\t{:.1} tokens/s wall\t{:.1} tokens/s per CPU-second\t({:.1} ms CPU/step)",
            n / w,
            n / cpu,
            cpu * 1e3 / steps as f64
        );
    }
}

fn main() {
    let dev = Cpu::default();
    let steps = 32;
    let cfg = pipeline_model::ModelConfig::tiny(4096);
    let tiny = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 0), &dev).unwrap();
    decode("tiny (vocab 4096)", &tiny, 1000);
    let path = std::env::var_os("PIPELINE_BENCH_MODEL").map(std::path::PathBuf::from).unwrap_or_else(|| {
        let assets = std::env::var_os("PIPELINE_TEST_ASSETS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-assets"));
        assets.join("SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if path.exists() {
        let p = pipeline_model::pretrained::load_pretrained(&path, &dev).unwrap();
        decode(&path.file_name().unwrap_or_default().to_string_lossy(), &p.model, steps);
    } else {
        eprintln!("{} not found: SmolLM2 skipped", path.display());
    }
}
