//! Forward, LoRA training-step and generation throughput (tokens/s), on the CPU or a CUDA GPU.
//!
//! CPU: `cargo bench -p pipeline-model --bench throughput` (release). Models: the tiny preset with
//! a remapped 4,096-token vocabulary and with the full padded Qwen2.5 vocabulary (151,936), random
//! weights; SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to f32) when
//! `$PIPELINE_TEST_ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf` (default `target/test-assets/`) exists
//! (`python3 scripts/fetch_assets.py smollm2`).
//!
//! GPU: build with `--features cuda` and run with `PIPELINE_BENCH_DEVICE=cuda` (see
//! `scripts/gpu/README.md`; `scripts/gpu/run-on-device.sh` runs it next to
//! `scripts/gpu/bench_transformers.py`, which times transformers + peft on the same shapes).
//! Models: random-weight Llama with SmolLM2-135M's dimensions and Qwen2 with Qwen2.5-0.5B's.
//! Each figure is printed as `bench<TAB>dfdx<TAB>model<TAB>metric<TAB>value<TAB>unit` so the two
//! outputs can be tabulated together. Figures are printed, never asserted.

use std::path::PathBuf;
use std::time::Instant;

use dfdx::optim::{Adam, AdamConfig};
use dfdx::prelude::*;
use pipeline_model::{generate, profile, Arch, Batch, GenerationConfig, LoraConfig, ModelConfig, Qwen2, Trainable};

/// Shapes of one benchmark run (the transformers script takes the same numbers).
struct Shapes {
    /// `[batch, seq]` of the forward and the LoRA SFT step.
    batch: usize,
    seq: usize,
    /// New tokens per generated row (prompt of 16 tokens, greedy, batch 1 and 8).
    gen_tokens: usize,
    /// Timed repetitions after one warm-up.
    reps: usize,
    train: bool,
}

/// Which kernels the LoRA step runs: the fused/frozen-weight ones, or with
/// `PIPELINE_REFERENCE_KERNELS=1` dfdx's reference ops (what the model ran before they existed).
fn kernels() -> &'static str {
    if std::env::var("PIPELINE_BENCH_GC").is_ok_and(|v| v == "1") {
        return match (std::env::var("PIPELINE_REFERENCE_KERNELS").is_ok_and(|v| v == "1"), bf16_base()) {
            (true, _) => "reference kernels, gradient checkpointing",
            (false, false) => "fused kernels, gradient checkpointing",
            (false, true) => "fused kernels, bf16 base, gradient checkpointing",
        };
    }
    let bf16 = bf16_base();
    match (std::env::var("PIPELINE_REFERENCE_KERNELS").is_ok_and(|v| v == "1"), bf16) {
        (true, false) => "reference kernels",
        (true, true) => "reference kernels, bf16 base",
        (false, false) => "fused kernels",
        (false, true) => "fused kernels, bf16 base",
    }
}

/// `PIPELINE_BENCH_DTYPE=bf16`: the frozen base matrices held as bf16 on the GPU
/// (`torch_dtype = "bfloat16"`), as the transformers + peft peer holds them.
fn bf16_base() -> bool {
    std::env::var("PIPELINE_BENCH_DTYPE").is_ok_and(|v| v == "bf16")
}

/// This process's user + system CPU time (Linux `/proc/self/stat`), so a figure taken on a busy
/// machine still compares with the peer's (`time.process_time()`).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn report(model: &str, metric: &str, value: f64, unit: &str) {
    if unit == "nats" {
        println!("bench\tdfdx\t{model}\t{metric}\t{value:.4}\t{unit}");
    } else {
        println!("bench\tdfdx\t{model}\t{metric}\t{value:.1}\t{unit}");
    }
}

/// Memory in use on GPU 0 as `nvidia-smi` sees it (MiB; CUDA context and allocator caches
/// included — the transformers script reads the same figure).
fn gpu_mem_used_mib() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Samples [`gpu_mem_used_mib`] on a thread until dropped; `peak()` is the largest reading.
struct MemSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<f64>>,
}

impl MemSampler {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0f64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(gpu_mem_used_mib().unwrap_or(0.0));
            }
            peak
        });
        MemSampler { stop, handle: Some(handle) }
    }
    fn peak(mut self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().map_or(0.0, |h| h.join().unwrap_or(0.0))
    }
}

fn bench_model<D: Device<f32> + Synchronize + Cache + TensorToArray<(), f32, Array = f32>>(
    name: &str,
    mut m: Qwen2<D>,
    s: &Shapes,
    gpu: bool,
) {
    let (batch, seq, reps) = (s.batch, s.seq, s.reps);
    let v = m.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..batch * seq).map(|i| (i as u32 * 7919) % v).collect();
    let b = Batch::new(ids.clone(), batch, seq).unwrap();
    let _ = m.forward(&b).unwrap().as_vec(); // warm-up (and kernel loading)
    let t = Instant::now();
    for _ in 0..reps {
        let _ = m.forward(&b).unwrap(); // logits stay on the device, as in the transformers script
    }
    m.device().synchronize();
    report(
        name,
        &format!("forward [{batch}x{seq}]"),
        (reps * batch * seq) as f64 / t.elapsed().as_secs_f64(),
        "tokens/s",
    );

    m.device().empty_cache(); // the forward's cached logits do not count against the LoRA steps
    if s.train {
        // one SFT step: LoRA r=8 on all linear layers, forward + backward + Adam update
        m.set_trainable(Trainable::Lora(LoraConfig::all_linear(8, 16.0)), 0).unwrap();
        // the training objectives' path: log p(next token) per position, mean over the labelled ones
        let targets: Vec<usize> =
            (0..batch * seq).map(|k| if (k + 1) % seq == 0 { 0 } else { ids[k + 1] as usize }).collect();
        let needed: Vec<bool> = (0..batch * seq).map(|k| (k + 1) % seq != 0).collect();
        let count = needed.iter().filter(|&&x| x).count() as f32;
        let mut opt = Adam::new(&m.params, AdamConfig { lr: 1e-4, ..Default::default() });
        let mut step = |m: &mut Qwen2<D>| {
            let (_, tape) = m.params.flat.trace(m.params.alloc_grads()).split_tape();
            let lp = m.forward_logprobs(&b, &targets, Some(&needed), tape, None).unwrap();
            let loss = lp.sum::<(), _>() * (-1.0 / count);
            let l = loss.array(); // logged loss, as a training loop would
            profile::record(m.device(), "loss (to host)");
            let g = loss.backward();
            profile::record(m.device(), "backward (rest)");
            opt.update(&mut m.params, &g).unwrap();
            profile::record(m.device(), "optimizer (Adam)");
            l
        };
        let l0 = step(&mut m);
        report(name, &format!("loss step 1 [{batch}x{seq}]"), l0 as f64, "nats");
        profile::reset();
        m.device().synchronize();
        let sampler = gpu.then(MemSampler::start);
        let (t, c) = (Instant::now(), cpu_seconds());
        let mut losses = Vec::with_capacity(reps);
        for _ in 0..reps {
            losses.push(step(&mut m));
        }
        m.device().synchronize();
        if profile::enabled() {
            eprintln!(
                "{name} [{batch}x{seq}], {}: where a step's time goes (PIPELINE_PROFILE=1)\n{}",
                kernels(),
                profile::report(reps)
            );
        }
        for (k, l) in losses.iter().enumerate() {
            report(name, &format!("loss step {} [{batch}x{seq}]", k + 2), *l as f64, "nats");
        }
        let tr = (reps * batch * seq) as f64 / t.elapsed().as_secs_f64();
        let what = format!("LoRA SFT step [{batch}x{seq}] ({})", kernels());
        report(name, &what, tr, "tokens/s");
        if let (Some(c0), Some(c1)) = (c, cpu_seconds()) {
            report(name, &what, (reps * batch * seq) as f64 / (c1 - c0), "tokens per CPU-second");
        }
        if gpu {
            report(name, &format!("MFU [{batch}x{seq}] (6N + attention, of 989 TFLOPS)"), mfu(&m.cfg, seq, tr), "%");
        }
        if let Some(sampler) = sampler {
            report(name, "GPU memory peak in LoRA steps (nvidia-smi)", sampler.peak(), "MiB");
        }
        m.set_trainable(Trainable::None, 0).unwrap();
    }

    if s.gen_tokens == 0 {
        return;
    }
    let cfg = GenerationConfig { max_new_tokens: s.gen_tokens, ..Default::default() };
    let prompt: Vec<u32> = (1..=16).map(|i| (i * 31) % v).collect();
    let _ = generate(&m, std::slice::from_ref(&prompt), &GenerationConfig { max_new_tokens: 2, ..cfg.clone() }, None);
    for rows in [1, 8] {
        let prompts = vec![prompt.clone(); rows];
        let t = Instant::now();
        let out = generate(&m, &prompts, &cfg, None).unwrap();
        let n: usize = out.iter().map(|g| g.tokens.len()).sum();
        report(name, &format!("generate batch {rows} ({n} tokens)"), n as f64 / t.elapsed().as_secs_f64(), "tokens/s");
    }
}

/// Model FLOPs utilisation of a training step at `tokens_per_s`, in percent: the usual
/// `6·N + 6·L·seq·q_dim` FLOPs per token (N = the matrices every token multiplies through, LM head
/// included, embedding lookup not; causal attention counted at half the square) against one H200's
/// 989 dense bf16 TFLOPS. A LoRA step does fewer (no `dW` for frozen weights): this is the
/// convention that makes trainers comparable, and `bench_transformers.py` uses the same formula.
fn mfu(c: &ModelConfig, seq: usize, tokens_per_s: f64) -> f64 {
    let (h, q, kv) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let layer = h * q * 2 + h * kv * 2 + 3 * h * c.intermediate_size;
    let n = (c.num_hidden_layers * layer + h * c.vocab_size) as f64;
    let attn = (6 * c.num_hidden_layers * seq * q) as f64;
    100.0 * tokens_per_s * (6.0 * n + attn) / 989e12
}

/// A Qwen2 with Qwen2.5-0.5B's dimensions.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn qwen25_05b_shape() -> ModelConfig {
    ModelConfig {
        arch: Arch::Qwen2,
        vocab_size: 151_936,
        hidden_size: 896,
        intermediate_size: 4864,
        num_hidden_layers: 24,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        tie_word_embeddings: true,
        attention_bias: true,
        max_position_embeddings: 32_768,
        bos_token_id: None,
        eos_token_id: vec![],
    }
}

/// A Qwen2 with Qwen2.5-7B's dimensions (Qwen/Qwen2.5-7B-Instruct's config.json).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn qwen25_7b_shape() -> ModelConfig {
    ModelConfig {
        vocab_size: 152_064,
        hidden_size: 3584,
        intermediate_size: 18_944,
        num_hidden_layers: 28,
        num_attention_heads: 28,
        num_key_value_heads: 4,
        head_dim: 128,
        tie_word_embeddings: false,
        ..qwen25_05b_shape()
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[cfg(feature = "cuda")]
fn run_gpu() {
    let dev = Cuda::default();
    let tf32 = std::env::var("PIPELINE_BENCH_TF32").is_ok_and(|v| v == "1");
    pipeline_model::set_tf32(&dev, tf32);
    let flash = !std::env::var("PIPELINE_BENCH_FLASH").is_ok_and(|v| v == "0");
    // PIPELINE_BENCH_FUSED_MLP=0: the MLP's projections one by one with f32 activations
    let fused_mlp = !std::env::var("PIPELINE_BENCH_FUSED_MLP").is_ok_and(|v| v == "0");
    eprintln!(
        "kernels: {}, TF32 {}, flash attention {}, fused bf16 MLP {}",
        kernels(),
        if tf32 { "on" } else { "off" },
        if flash { "on where it applies" } else { "off" },
        if fused_mlp { "on where it applies" } else { "off" }
    );
    let s = Shapes {
        batch: env_usize("PIPELINE_BENCH_BATCH", 8),
        seq: env_usize("PIPELINE_BENCH_SEQ", 256),
        gen_tokens: env_usize("PIPELINE_BENCH_GEN", 64),
        reps: env_usize("PIPELINE_BENCH_REPS", 5),
        train: true,
    };
    let only = std::env::var("PIPELINE_BENCH_MODELS").unwrap_or_default();
    let save = std::env::var_os("PIPELINE_BENCH_SAVE").map(PathBuf::from);
    for (name, cfg) in [
        ("SmolLM2-135M-shape", ModelConfig::smollm2_135m_shape()),
        ("Qwen2.5-0.5B-shape", qwen25_05b_shape()),
        ("Qwen2.5-7B-shape", qwen25_7b_shape()),
    ] {
        let big = name.starts_with("Qwen2.5-7B");
        // the 7B shape runs only when asked for by name (PIPELINE_BENCH_MODELS=Qwen2.5-7B)
        if !only.split(',').any(|m| !m.is_empty() && name.starts_with(m)) && (big || !only.is_empty()) {
            continue;
        }
        let t = Instant::now();
        let dtype = if bf16_base() { pipeline_model::FrozenDtype::Bf16 } else { pipeline_model::FrozenDtype::F32 };
        let mut m: Qwen2<Cuda> = if big {
            // a random 7B init on the host would take minutes: the checkpoint transformers wrote on
            // the device (scripts/gpu/make_random_qwen.py --shape 7b), which the peer loads too,
            // read as the training stages read it (bf16 matrices straight to the card)
            let dir = save.as_ref().map(|d| d.join(name)).filter(|d| d.join("config.json").is_file());
            let dir = dir.unwrap_or_else(|| {
                panic!("{name} loads $PIPELINE_BENCH_SAVE/{name}: write it with make_random_qwen.py --shape 7b")
            });
            let m: Qwen2<Cuda> = Qwen2::load_hf_with_dtype(&dir, &dev, dtype).unwrap();
            assert_eq!(m.cfg.hidden_size, cfg.hidden_size, "{}: not a 7B-shaped checkpoint", dir.display());
            m
        } else {
            let host = Qwen2::<Cpu>::random_host(&cfg, 0);
            if let Some(dir) = &save {
                // the same weights for the transformers peer (bench_transformers.py --weights)
                let dir = dir.join(name);
                if !dir.join("model.safetensors").is_file() {
                    pipeline_model::checkpoint::save_hf_folder(&dir, &cfg, &host).unwrap();
                }
            }
            Qwen2::from_host_with_dtype(&cfg, &host, &dev, dtype).unwrap()
        };
        m.set_gradient_checkpointing(std::env::var("PIPELINE_BENCH_GC").is_ok_and(|v| v == "1"));
        m.set_flash_attention(flash);
        m.set_fused_mlp(fused_mlp);
        eprintln!("{name}: attention {}", if m.flash_attention() { "fused (flash) kernel" } else { "dfdx ops (f32)" });
        eprintln!("{name}: weights + upload {:.1} s", t.elapsed().as_secs_f64());
        bench_model(name, m, &s, true);
        dev.empty_cache();
    }
}

fn main() {
    let want_gpu = std::env::var("PIPELINE_BENCH_DEVICE").as_deref() == Ok("cuda");
    #[cfg(feature = "cuda")]
    {
        if want_gpu {
            return run_gpu();
        }
    }
    assert!(!want_gpu, "PIPELINE_BENCH_DEVICE=cuda needs a build with --features cuda");
    let dev = Cpu::default();
    println!("threads: {}", std::thread::available_parallelism().map_or(1, |n| n.get()));
    let tiny = Shapes { batch: 8, seq: 64, gen_tokens: 64, reps: 3, train: true };
    for vocab in [4096, 151_936] {
        let cfg = ModelConfig::tiny(vocab);
        let m = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 0), &dev).unwrap();
        bench_model(&format!("tiny (vocab {vocab})"), m, &tiny, false);
    }
    let assets = std::env::var_os("PIPELINE_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-assets"));
    let gguf = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.is_file() {
        let t = Instant::now();
        let p = pipeline_model::pretrained::load_pretrained(&gguf, &dev).unwrap();
        println!("SmolLM2-135M: load + dequantise {:.2} s", t.elapsed().as_secs_f64());
        let s = Shapes { batch: 1, seq: 128, gen_tokens: 32, reps: 3, train: false };
        bench_model("SmolLM2-135M", p.model, &s, false);
    } else {
        println!("SmolLM2-135M: skipped ({} not found)", gguf.display());
    }
}
