//! Forward, LoRA training-step and generation throughput on CPU (tokens/s).
//!
//! `cargo bench -p pipeline-model --bench throughput` (release). Models: the tiny preset with a
//! remapped 4,096-token vocabulary and with the full padded Qwen2.5 vocabulary (151,936), random
//! weights; SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to f32) when
//! `$PIPELINE_TEST_ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf` (default `target/test-assets/`) exists
//! (`python3 scripts/fetch_assets.py smollm2`). Figures are printed, never asserted.

use std::path::PathBuf;
use std::time::Instant;

use dfdx::prelude::*;
use pipeline_model::loss::masked_cross_entropy;
use pipeline_model::{generate, Batch, GenerationConfig, LoraConfig, ModelConfig, Qwen2, Trainable};

fn bench_model(name: &str, mut m: Qwen2<Cpu>, batch: usize, seq: usize, gen_tokens: usize, train: bool) {
    let v = m.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..batch * seq).map(|i| (i as u32 * 7919) % v).collect();
    let b = Batch::new(ids.clone(), batch, seq).unwrap();
    let _ = m.forward(&b).unwrap(); // warm-up
    let reps = 3;
    let t = Instant::now();
    for _ in 0..reps {
        let _ = m.forward(&b).unwrap().as_vec();
    }
    let fwd = (reps * batch * seq) as f64 / t.elapsed().as_secs_f64();
    println!("{name}: forward [{batch}x{seq}]            {fwd:>10.0} tokens/s");

    if train {
        m.set_trainable(Trainable::Lora(LoraConfig::all_linear(8, 16.0)), 0).unwrap();
        let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        let t = Instant::now();
        for _ in 0..reps {
            let g = m.params.alloc_grads();
            let loss = masked_cross_entropy(m.forward_traced(&b, g).unwrap(), &labels).unwrap();
            let _ = loss.backward();
        }
        let tr = (reps * batch * seq) as f64 / t.elapsed().as_secs_f64();
        println!("{name}: LoRA fwd+bwd [{batch}x{seq}]       {tr:>10.0} tokens/s");
        m.set_trainable(Trainable::None, 0).unwrap();
    }

    let cfg = GenerationConfig { max_new_tokens: gen_tokens, ..Default::default() };
    let prompt: Vec<u32> = (1..=16).map(|i| (i * 31) % v).collect();
    let t = Instant::now();
    let out = generate(&m, &[prompt.clone()], &cfg, None).unwrap();
    let n = out[0].tokens.len();
    let g1 = n as f64 / t.elapsed().as_secs_f64();
    println!("{name}: generate batch 1 ({n} tokens)     {g1:>10.1} tokens/s");
    let prompts = vec![prompt; 8];
    let t = Instant::now();
    let out = generate(&m, &prompts, &cfg, None).unwrap();
    let n: usize = out.iter().map(|g| g.tokens.len()).sum();
    let g8 = n as f64 / t.elapsed().as_secs_f64();
    println!("{name}: generate batch 8 ({n} tokens)    {g8:>10.1} tokens/s");
}

fn main() {
    let dev = Cpu::default();
    println!("threads: {}", std::thread::available_parallelism().map_or(1, |n| n.get()));
    for vocab in [4096, 151_936] {
        let cfg = ModelConfig::tiny(vocab);
        let m = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 0), &dev).unwrap();
        bench_model(&format!("tiny (vocab {vocab})"), m, 8, 64, 64, true);
    }
    let assets = std::env::var_os("PIPELINE_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-assets"));
    let gguf = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.is_file() {
        let t = Instant::now();
        let p = pipeline_model::pretrained::load_pretrained(&gguf, &dev).unwrap();
        println!("SmolLM2-135M: load + dequantise {:.2} s", t.elapsed().as_secs_f64());
        bench_model("SmolLM2-135M", p.model, 1, 128, 32, false);
    } else {
        println!("SmolLM2-135M: skipped ({} not found)", gguf.display());
    }
}
