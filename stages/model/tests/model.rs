//! Integration tests of pipeline-model. Parity golden values come from PyTorch + transformers +
//! peft (versions in `fixtures/golden.json` → `oracle`), produced by
//! `scripts/oracles/qwen2_parity.py`, which also wrote the fixture checkpoints.

use std::path::{Path, PathBuf};

use dfdx::optim::{Adam, AdamConfig};
use dfdx::prelude::*;
use pipeline_model::loss::{masked_cross_entropy, sequence_logprobs};
use pipeline_model::{
    checkpoint, generate, Batch, GenerationConfig, HostTensor, LoraConfig, ModelConfig, ModelError, Qwen2, Trainable,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Relative error |a - b| / max(|b|, 0.1 * max|b|): the floor (a tenth of the tensor's largest
/// magnitude) keeps entries near zero from turning float summation-order noise into failures.
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let floor = 0.1 * want.iter().fold(0f32, |a, x| a.max(x.abs())).max(1e-6);
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let rel = (g - w).abs() / w.abs().max(floor);
        assert!(rel <= tol, "{what}[{i}]: got {g}, want {w} (rel {rel:e})");
        worst = worst.max(rel);
    }
    eprintln!("{what}: max rel err {worst:e} over {} values", got.len());
}

const TOL: f32 = 1e-4;

fn qwen(dev: &Cpu) -> Qwen2<Cpu> {
    Qwen2::load_hf(&fixtures().join("qwen2_tiny"), dev).unwrap()
}

#[test]
fn qwen2_logits_match_transformers() {
    let dev = Cpu::default();
    let g = golden();
    let m = qwen(&dev);
    for (i, p) in g["prompts"].as_array().unwrap().iter().enumerate() {
        let p = ids(p);
        let logits = m.forward(&Batch::new(p.clone(), 1, p.len()).unwrap()).unwrap();
        assert_close(&logits.as_vec(), &floats(&g["qwen2"]["logits"][i]), TOL, &format!("prompt {i} logits"));
    }
}

#[test]
fn qwen2_padded_batches_match_transformers() {
    let dev = Cpu::default();
    let g = golden();
    let m = qwen(&dev);
    let prompts: Vec<Vec<u32>> = g["prompts"].as_array().unwrap().iter().map(ids).collect();
    let l = g["qwen2"]["padded_len"].as_u64().unwrap() as usize;
    let v = m.cfg.vocab_size;
    // right padding: compare real positions only
    let batch = Batch::right_padded(&prompts, 0).unwrap();
    let got = m.forward(&batch).unwrap().as_vec();
    let want = floats(&g["qwen2"]["right_padded_logits"]);
    for (r, p) in prompts.iter().enumerate() {
        let span = r * l * v..(r * l + p.len()) * v;
        assert_close(&got[span.clone()], &want[span], TOL, &format!("right-padded row {r}"));
    }
    // left padding
    let mut ids_ = Vec::new();
    let mut mask = Vec::new();
    for p in &prompts {
        ids_.extend(std::iter::repeat_n(0, l - p.len()));
        mask.extend(std::iter::repeat_n(false, l - p.len()));
        ids_.extend_from_slice(p);
        mask.extend(std::iter::repeat_n(true, p.len()));
    }
    let got = m.forward(&Batch::with_mask(ids_, mask, 2, l).unwrap()).unwrap().as_vec();
    let want = floats(&g["qwen2"]["left_padded_logits"]);
    for (r, p) in prompts.iter().enumerate() {
        let span = (r * l + l - p.len()) * v..(r + 1) * l * v;
        assert_close(&got[span.clone()], &want[span], TOL, &format!("left-padded row {r}"));
    }
}

#[test]
fn qwen2_loss_and_seq_logprob_match_transformers() {
    let dev = Cpu::default();
    let g = golden();
    let m = qwen(&dev);
    let p = ids(&g["prompts"][1]);
    let labels: Vec<i64> = g["qwen2"]["loss_labels"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    let batch = Batch::new(p.clone(), 1, p.len()).unwrap();
    let loss = masked_cross_entropy(m.forward(&batch).unwrap(), &labels).unwrap().array();
    assert_close(&[loss], &[g["qwen2"]["loss"].as_f64().unwrap() as f32], TOL, "loss");
    let lp = sequence_logprobs(m.forward(&batch).unwrap(), &labels).unwrap().as_vec();
    assert_close(&lp, &[g["qwen2"]["seq_logprob"].as_f64().unwrap() as f32], TOL, "seq logprob");
}

#[test]
fn greedy_generation_matches_transformers() {
    let dev = Cpu::default();
    let g = golden();
    let m = qwen(&dev);
    let cfg = GenerationConfig { max_new_tokens: 12, ..Default::default() };
    let p = ids(&g["prompts"][0]);
    let out = generate(&m, &[p.clone()], &cfg, None).unwrap();
    assert_eq!(out[0].tokens, ids(&g["qwen2"]["greedy"]));
    // batched with a longer prompt (left padding) gives the same row
    let out2 = generate(&m, &[ids(&g["prompts"][1]), p], &cfg, None).unwrap();
    assert_eq!(out2[1].tokens, ids(&g["qwen2"]["greedy"]));

    let l = Qwen2::load_hf(&fixtures().join("llama_tiny_sharded"), &dev).unwrap();
    let out = generate(&l, &[ids(&g["prompts"][1])], &cfg, None).unwrap();
    assert_eq!(out[0].tokens, ids(&g["llama"]["greedy"]));
}

#[test]
fn llama_sharded_bf16_tied_matches_transformers() {
    let dev = Cpu::default();
    let g = golden();
    let m = Qwen2::load_hf(&fixtures().join("llama_tiny_sharded"), &dev).unwrap();
    assert!(m.cfg.tie_word_embeddings && !m.cfg.attention_bias);
    for (i, p) in g["prompts"].as_array().unwrap().iter().enumerate() {
        let p = ids(p);
        let logits = m.forward(&Batch::new(p.clone(), 1, p.len()).unwrap()).unwrap();
        assert_close(&logits.as_vec(), &floats(&g["llama"]["logits"][i]), TOL, &format!("llama prompt {i}"));
    }
}

#[test]
fn lora_loss_gradients_and_merge_match_peft() {
    let dev = Cpu::default();
    let g = golden();
    let mut m = qwen(&dev);
    m.load_peft_adapter(&fixtures().join("lora_tiny")).unwrap();
    let p = ids(&g["prompts"][1]);
    let mut labels: Vec<i64> = p.iter().map(|&x| x as i64).collect();
    labels[..5].fill(-100);
    let batch = Batch::new(p.clone(), 1, p.len()).unwrap();
    let grads = m.params.alloc_grads();
    let logits = m.forward_traced(&batch, grads).unwrap();
    let loss = masked_cross_entropy(logits, &labels).unwrap();
    assert_close(&[loss.array()], &[g["lora"]["loss"].as_f64().unwrap() as f32], TOL, "lora loss");
    let grads = loss.backward();
    let flat_grad = grads.get(&m.params.flat).as_vec();
    // the flat vector holds the adapters in model order; map each slice to its peft name
    let host = m.lora_to_host();
    let mut off = 0;
    let mut order: Vec<(String, usize)> = Vec::new();
    for l in 0..m.cfg.num_hidden_layers {
        for proj in pipeline_model::Proj::ALL {
            let (a, b) = pipeline_model::qwen2::peft_names(l, proj);
            order.push((a.clone(), host[&a].numel()));
            order.push((b.clone(), host[&b].numel()));
        }
    }
    let want = g["lora"]["grads"].as_object().unwrap();
    assert_eq!(want.len(), order.len());
    for (name, n) in order {
        let w = floats(&want[&name]);
        // gradients can be tiny: compare relative to the tensor's largest entry
        let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
        let got = &flat_grad[off..off + n];
        for (i, (a, b)) in got.iter().zip(&w).enumerate() {
            assert!((a - b).abs() <= TOL * scale, "{name}[{i}]: got {a}, want {b}");
        }
        off += n;
    }
    assert_eq!(off, flat_grad.len());

    // forward with adapters, then merged
    let p0 = ids(&g["prompts"][0]);
    let b0 = Batch::new(p0.clone(), 1, p0.len()).unwrap();
    assert_close(&m.forward(&b0).unwrap().as_vec(), &floats(&g["lora"]["logits"]), TOL, "lora logits");
    m.set_adapters_enabled(false);
    assert_close(&m.forward(&b0).unwrap().as_vec(), &floats(&g["qwen2"]["logits"][0]), TOL, "adapters off");
    m.set_adapters_enabled(true);
    m.merge_lora().unwrap();
    assert_close(&m.forward(&b0).unwrap().as_vec(), &floats(&g["lora"]["merged_logits"]), TOL, "merged");
}

#[test]
fn one_lora_step_changes_only_adapters_and_lowers_loss() {
    let dev = Cpu::default();
    let mut m = qwen(&dev);
    let base = m.to_host();
    m.set_trainable(Trainable::Lora(LoraConfig::all_linear(4, 8.0)), 7).unwrap();
    let n = m.params.num_trainable_params();
    assert_eq!(n, 2 * (4 * (32 + 32) + 4 * (32 + 16) * 2 + 4 * (32 + 32) + 3 * 4 * (32 + 64)));
    let p: Vec<u32> = (1..20).collect();
    let labels: Vec<i64> = p.iter().map(|&x| x as i64).collect();
    let batch = Batch::new(p.clone(), 1, p.len()).unwrap();
    let mut opt = Adam::new(&m.params, AdamConfig { lr: 1e-2, ..Default::default() });
    let mut losses = Vec::new();
    for _ in 0..5 {
        let grads = m.params.alloc_grads();
        let loss = masked_cross_entropy(m.forward_traced(&batch, grads).unwrap(), &labels).unwrap();
        losses.push(loss.array());
        let g = loss.backward();
        opt.update(&mut m.params, &g).unwrap();
    }
    assert!(losses[4] < losses[0], "{losses:?}");
    assert_eq!(m.to_host(), base, "base weights must stay frozen");
}

#[test]
fn save_and_reload_roundtrip() {
    let dev = Cpu::default();
    let dir = tempfile::tempdir().unwrap();
    let mut m = qwen(&dev);
    m.set_trainable(Trainable::Lora(LoraConfig::all_linear(2, 4.0)), 3).unwrap();
    // make B non-zero
    let v: Vec<f32> = (0..m.params.flat.shape().0).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    m.params.flat = dev.tensor_from_vec(v.clone(), (v.len(),));
    let p: Vec<u32> = vec![3, 4, 5, 6];
    let b = Batch::new(p.clone(), 1, 4).unwrap();
    let want = m.forward(&b).unwrap().as_vec();
    m.save_pretrained(&dir.path().join("base")).unwrap();
    m.save_adapter(&dir.path().join("adapter"), "base").unwrap();
    let mut m2 = Qwen2::load_hf(&dir.path().join("base"), &dev).unwrap();
    m2.load_peft_adapter(&dir.path().join("adapter")).unwrap();
    assert_eq!(m2.forward(&b).unwrap().as_vec(), want);
    // merged full model
    m.merge_lora().unwrap();
    m.save_pretrained(&dir.path().join("merged")).unwrap();
    let m3 = Qwen2::load_hf(&dir.path().join("merged"), &dev).unwrap();
    assert_close(&m3.forward(&b).unwrap().as_vec(), &want, 1e-5, "merged reload");
}

#[test]
fn full_finetune_trains_every_weight() {
    let dev = Cpu::default();
    let cfg = ModelConfig::tiny(50);
    let mut m = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 1), &dev).unwrap();
    m.set_trainable(Trainable::Full, 0).unwrap();
    let total: usize = m.to_host().values().map(HostTensor::numel).sum();
    assert_eq!(m.params.num_trainable_params(), total);
    let p: Vec<u32> = (0..16).map(|i| (i * 7) % 50).collect();
    let labels: Vec<i64> = p.iter().map(|&x| x as i64).collect();
    let batch = Batch::new(p, 1, 16).unwrap();
    let grads = m.params.alloc_grads();
    let loss = masked_cross_entropy(m.forward_traced(&batch, grads).unwrap(), &labels).unwrap();
    let g = loss.backward();
    let gv = g.get(&m.params.flat).as_vec();
    // every tensor receives gradient (embedding rows of unused ids excepted)
    assert!(gv.iter().filter(|x| **x != 0.0).count() > total / 2);
}

#[test]
fn kv_cache_matches_full_forward() {
    let dev = Cpu::default();
    let m = qwen(&dev);
    let p: Vec<u32> = vec![9, 8, 7, 6, 5, 4, 3];
    let full = m.forward(&Batch::new(p.clone(), 1, 7).unwrap()).unwrap().as_vec();
    let mut cache = m.new_cache();
    m.forward_cached(&Batch::new(p[..4].to_vec(), 1, 4).unwrap(), &mut cache).unwrap();
    m.forward_cached(&Batch::new(p[4..6].to_vec(), 1, 2).unwrap(), &mut cache).unwrap();
    let last = m.forward_cached(&Batch::new(p[6..].to_vec(), 1, 1).unwrap(), &mut cache).unwrap();
    let v = m.cfg.vocab_size;
    assert_close(&last[0], &full[6 * v..], 1e-5, "cached step");
}

#[test]
fn sampling_is_reproducible_and_respects_stops() {
    let dev = Cpu::default();
    let m = qwen(&dev);
    let cfg = GenerationConfig {
        max_new_tokens: 20,
        temperature: 0.9,
        top_k: 50,
        top_p: 0.9,
        repetition_penalty: 1.3,
        seed: 42,
        ..Default::default()
    };
    let p = vec![vec![1u32, 2, 3], vec![4u32, 5, 6, 7, 8]];
    let a = generate(&m, &p, &cfg, None).unwrap();
    let b = generate(&m, &p, &cfg, None).unwrap();
    assert_eq!(a, b);
    let c = generate(&m, &p, &GenerationConfig { seed: 43, ..cfg.clone() }, None).unwrap();
    assert_ne!(a, c);
    // stop at the 3rd token id of run `a`
    let stop = a[0].tokens[2];
    let first = a[0].tokens.iter().position(|&t| t == stop).unwrap();
    let d = generate(&m, &p[..1], &GenerationConfig { stop_token_ids: vec![stop], ..cfg.clone() }, None).unwrap();
    assert_eq!(d[0].tokens, a[0].tokens[..=first]);
    // stop strings with a toy decoder
    let dec = |ids: &[u32]| ids.iter().map(|i| format!("<{i}>")).collect::<String>();
    let s = format!("<{stop}>");
    let e = generate(&m, &p[..1], &GenerationConfig { stop_strings: vec![s], ..cfg }, Some(&dec)).unwrap();
    assert_eq!(e[0].tokens, a[0].tokens[..=first]);
    assert_eq!(e[0].text.as_deref(), Some(dec(&a[0].tokens[..first]).as_str()));
}

#[test]
fn bad_checkpoints_name_the_tensor_or_field() {
    let dev = Cpu::default();
    let ck = checkpoint::load_hf_folder(&fixtures().join("qwen2_tiny")).unwrap();
    let mut t = ck.tensors.clone();
    t.remove("model.layers.1.mlp.up_proj.weight");
    let e = Qwen2::from_host(&ck.config, &t, &dev).unwrap_err();
    assert!(matches!(e, ModelError::MissingTensor { .. }));
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");

    let mut t = ck.tensors.clone();
    t.insert("model.layers.0.self_attn.k_proj.weight".into(), HostTensor::new(vec![32, 32], vec![0.0; 1024]));
    let e = Qwen2::from_host(&ck.config, &t, &dev).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.self_attn.k_proj.weight") && e.contains("num_key_value_heads"), "{e}");

    // config disagrees with the weights
    let mut cfg = ck.config.clone();
    cfg.vocab_size = 300;
    let e = Qwen2::from_host(&cfg, &ck.tensors, &dev).unwrap_err().to_string();
    assert!(e.contains("model.embed_tokens.weight") && e.contains("vocab_size"), "{e}");
    let mut cfg = ck.config.clone();
    cfg.arch = pipeline_model::Arch::Llama;
    cfg.attention_bias = false;
    let e = Qwen2::from_host(&cfg, &ck.tensors, &dev).unwrap_err().to_string();
    assert!(e.contains("_proj.bias") && e.contains("attention_bias"), "{e}");

    // tokenizer larger than the embedding
    let e = ck.config.check_tokenizer_vocab(1000).unwrap_err().to_string();
    assert!(e.contains("1000") && e.contains("256"), "{e}");

    // token id out of range
    let m = Qwen2::from_host(&ck.config, &ck.tensors, &dev).unwrap();
    let e = m.forward(&Batch::new(vec![1, 999], 1, 2).unwrap()).unwrap_err().to_string();
    assert!(e.contains("999") && e.contains("vocab_size"), "{e}");

    // adapter with a wrong rank
    let mut lora = checkpoint::load_peft_adapter(&fixtures().join("lora_tiny")).unwrap().1;
    lora.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
        HostTensor::new(vec![2, 32], vec![0.0; 64]),
    );
    let mut m = m;
    let e = m.load_lora_host(LoraConfig::all_linear(4, 8.0), &lora).unwrap_err().to_string();
    assert!(e.contains("layers.0.self_attn.q_proj.lora_A.weight"), "{e}");

    // missing config field
    let dir = tempfile::tempdir().unwrap();
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("qwen2_tiny/config.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("intermediate_size");
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    std::fs::copy(fixtures().join("qwen2_tiny/model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let e = Qwen2::<Cpu>::load_hf(dir.path(), &dev).unwrap_err().to_string();
    assert!(e.contains("intermediate_size"), "{e}");
}
