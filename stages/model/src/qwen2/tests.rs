//! Unit tests of the decoder that need its private fields (parity with transformers and peft is
//! in `tests/model.rs`).

use dfdx::prelude::*;

use super::*;
use crate::kernels::host_matmul::HOST_MATMUL_MIN_WEIGHT;
use crate::lora::LoraConfig;

#[test]
fn lora_dropout_acts_in_seeded_training_forwards_only() {
    let dev = Cpu::default();
    let cfg = ModelConfig::tiny(300);
    let base = Qwen2::<Cpu>::random_host(&cfg, 4);
    let batch = Batch::new((0..24).map(|i| (i * 13 % 300) as u32).collect(), 2, 12).unwrap();
    let with = |p: f32| {
        let mut m = Qwen2::from_host(&cfg, &base, &dev).unwrap();
        m.set_trainable(Trainable::Lora(LoraConfig::all_linear(4, 8.0).with_dropout(p).unwrap()), 1).unwrap();
        // non-zero B (peft initialises it to 0, which would hide the LoRA branch)
        let n = m.params.flat.shape().0;
        let v: Vec<f32> = (0..n).map(|i| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.2).collect();
        m.params.flat = dev.tensor_from_vec(v, (n,));
        m
    };
    let m = with(0.3);
    let plain = m.forward(&batch).unwrap().as_vec();
    assert_eq!(m.forward_train(&batch, NoneTape, None).unwrap().as_vec(), plain);
    let a = m.forward_train(&batch, NoneTape, Some(11)).unwrap().as_vec();
    assert_eq!(a, m.forward_train(&batch, NoneTape, Some(11)).unwrap().as_vec(), "same seed, same masks");
    assert_ne!(a, plain);
    assert_ne!(a, m.forward_train(&batch, NoneTape, Some(12)).unwrap().as_vec());
    // p = 0: a training forward is the inference forward
    let m0 = with(0.0);
    assert_eq!(m0.forward_train(&batch, NoneTape, Some(11)).unwrap().as_vec(), plain);
    // the mask is on the LoRA branch only: merged weights (no branch) ignore it
    let mut merged = with(0.3);
    merged.merge_lora().unwrap();
    let mp = merged.forward(&batch).unwrap().as_vec();
    assert_eq!(merged.forward_train(&batch, NoneTape, Some(11)).unwrap().as_vec(), mp);
}

/// The tiny preset with a 4,096-row head: the cached batch-1 step takes the host product for
/// the head (262,144 elements), the full forward dfdx's gemm.
#[test]
fn host_path_decoding_matches_the_full_forward() {
    let dev = Cpu::default();
    let cfg = ModelConfig::tiny(4096);
    let m = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 4), &dev).unwrap();
    assert!(m.embed_tokens.numel() >= HOST_MATMUL_MIN_WEIGHT);
    let p: Vec<u32> = vec![17, 4000, 3, 999, 64];
    let full = m.forward(&Batch::new(p.clone(), 1, 5).unwrap()).unwrap().as_vec();
    let mut cache = m.new_cache();
    m.forward_cached(&Batch::new(p[..4].to_vec(), 1, 4).unwrap(), &mut cache).unwrap();
    let last = m.forward_cached(&Batch::new(p[4..].to_vec(), 1, 1).unwrap(), &mut cache).unwrap();
    assert!(m.embed_tokens.has_host_copy(), "the host path was taken");
    let want = &full[4 * 4096..];
    let worst = last[0].iter().zip(want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(worst <= 1e-5, "{worst}");
}

/// Continuous batching: caches of sequences of different lengths stacked into one batch, stepped
/// together and split back give each sequence the logits (and caches) of decoding it alone.
#[test]
fn stacked_caches_decode_like_each_sequence_alone() {
    let dev = Cpu::default();
    let cfg = ModelConfig::tiny(300);
    let m = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 5), &dev).unwrap();
    let prompts: [Vec<u32>; 3] = [vec![5, 17, 250, 3, 9, 44, 71], vec![1, 2], vec![200, 100, 50, 25]];
    let alone = |p: &[u32], next: &[u32]| {
        let mut c = m.new_cache();
        m.forward_cached(&Batch::new(p.to_vec(), 1, p.len()).unwrap(), &mut c).unwrap();
        next.iter()
            .map(|&t| m.forward_cached(&Batch::new(vec![t], 1, 1).unwrap(), &mut c).unwrap().remove(0))
            .collect::<Vec<_>>()
    };
    let nexts: [Vec<u32>; 3] = [vec![8, 9, 10], vec![30, 31, 32], vec![7, 6, 5]];
    let want: Vec<Vec<Vec<f32>>> = prompts.iter().zip(&nexts).map(|(p, n)| alone(p, n)).collect();
    let mut caches: Vec<KvCache<Cpu>> = prompts
        .iter()
        .map(|p| {
            let mut c = m.new_cache();
            m.forward_cached(&Batch::new(p.clone(), 1, p.len()).unwrap(), &mut c).unwrap();
            c
        })
        .collect();
    for step in 0..3 {
        let (mut stacked, pads) = KvCache::stack(std::mem::take(&mut caches)).unwrap();
        assert_eq!(stacked.rows(), 3);
        let tokens: Vec<u32> = nexts.iter().map(|n| n[step]).collect();
        let got = m.forward_cached(&Batch::new(tokens, 3, 1).unwrap(), &mut stacked).unwrap();
        for (r, row) in got.iter().enumerate() {
            let worst = row.iter().zip(&want[r][step]).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(worst <= 1e-5, "step {step} row {r}: {worst}");
        }
        caches = stacked.split(&pads).unwrap();
        for (c, p) in caches.iter().zip(&prompts) {
            assert_eq!(c.len(), p.len() + step + 1, "split gives each row its own length back");
        }
    }
    assert!(KvCache::<Cpu>::stack(vec![]).is_err());
    assert!(KvCache::stack(vec![m.new_cache()]).is_err(), "an unfilled cache does not stack");
}

/// The fused head + log-softmax (CPU, frozen head) equals the reference path — logits from
/// `forward`, log-softmax, select — in value and in the LoRA gradients it sends back.
#[test]
fn forward_logprobs_equals_log_softmax_of_the_logits() {
    let dev = Cpu::default();
    let cfg = ModelConfig::tiny(3000);
    let mut m = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 9), &dev).unwrap();
    m.set_trainable(Trainable::Lora(LoraConfig::all_linear(4, 8.0)), 1).unwrap();
    let n = m.params.flat.shape().0;
    let v: Vec<f32> = (0..n).map(|i| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.2).collect();
    m.params.flat = dev.tensor_from_vec(v, (n,));
    let (b, s) = (2, 12);
    let batch = Batch::new((0..24).map(|i| (i * 131 % 3000) as u32).collect(), b, s).unwrap();
    let targets: Vec<usize> = (0..24).map(|i| (i * 577 + 5) % 3000).collect();
    let needed: Vec<bool> = (0..24).map(|i| i % 4 != 0).collect();
    let weights: Vec<f32> = (0..24).map(|i| (i % 5) as f32 - 1.5).collect();
    let w: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(weights, (b, s));

    let fused =
        m.forward_logprobs(&batch, &targets, Some(&needed), m.params.flat.leaky_trace().split_tape().1, None).unwrap();
    let fused_v = fused.as_vec();
    let g1 = (fused * w.clone()).sum::<(), _>().backward().get(&m.params.flat).as_vec();

    let logits = m.forward_traced(&batch, m.params.alloc_grads()).unwrap();
    let idx: Tensor<(usize, usize), usize, Cpu> = dev.tensor_from_vec(targets.clone(), (b, s));
    let keep: Tensor<(usize, usize), f32, Cpu> =
        dev.tensor_from_vec(needed.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect(), (b, s));
    let reference = logits.log_softmax::<Axis<2>>().select(idx) * keep;
    let ref_v = reference.as_vec();
    let g2 = (reference * w).sum::<(), _>().backward().get(&m.params.flat).as_vec();

    for (a, r) in fused_v.iter().zip(&ref_v) {
        assert!((a - r).abs() <= 1e-5 * (1.0 + r.abs()), "{a} vs {r}");
    }
    let scale = g2.iter().fold(0f32, |a, x| a.max(x.abs()));
    assert!(scale > 0.0);
    for (a, r) in g1.iter().zip(&g2) {
        assert!((a - r).abs() <= 1e-4 * scale, "{a} vs {r}");
    }
    // a trained head (full fine-tuning) takes the reference path: same values
    m.set_trainable(Trainable::Full, 0).unwrap();
    let full = m.forward_logprobs(&batch, &targets, Some(&needed), NoneTape, None).unwrap().as_vec();
    for (a, r) in full.iter().zip(&fused_v) {
        assert!((a - r).abs() <= 1e-4 * (1.0 + r.abs()), "{a} vs {r}");
    }
}

/// The host attention over a host KV cache (the CPU's no-gradient decoding path) equals dfdx's
/// attention ops over the tensor-layout cache: left-padded rows, multi-token chunks and single
/// steps at several cache lengths (short ones on the calling thread, a long one split over the
/// pool), and caches of different lengths stacked into one batch and split back.
#[test]
fn host_attention_equals_the_dfdx_path() {
    let dev = Cpu::default();
    let cfg = ModelConfig::tiny(300);
    let m = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 6), &dev).unwrap();
    assert!(m.new_cache().host.is_some() && m.new_dense_cache().host.is_none());
    let close = |got: &[Vec<f32>], want: &[Vec<f32>], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (r, (g, w)) in got.iter().zip(want).enumerate() {
            let worst = g.iter().zip(w).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(worst <= 1e-5, "{what} row {r}: {worst}");
        }
    };
    // three left-padded rows (2, 0 and 4 padding tokens), then chunks of 3, 1, 1, 1 tokens
    let (mut host, mut dense) = (m.new_cache(), m.new_dense_cache());
    let ids: Vec<u32> = (0..18).map(|i| (i * 37 % 300) as u32).collect();
    let mask: Vec<bool> = (0..18).map(|i| !matches!(i, 0 | 1 | 12..=15)).collect();
    let first = Batch::with_mask(ids, mask, 3, 6).unwrap();
    close(&m.forward_cached(&first, &mut host).unwrap(), &m.forward_cached(&first, &mut dense).unwrap(), "prefill");
    for (step, len) in [3, 1, 1, 1].into_iter().enumerate() {
        let b = Batch::new((0..3 * len).map(|i| ((i * 53 + step * 11) % 300) as u32).collect(), 3, len).unwrap();
        let what = format!("chunk {step} (cache {})", host.len());
        close(&m.forward_cached(&b, &mut host).unwrap(), &m.forward_cached(&b, &mut dense).unwrap(), &what);
    }
    assert_eq!((host.len(), dense.len()), (12, 12));
    // one long row: the attention splits over the pool
    let (mut host, mut dense) = (m.new_cache(), m.new_dense_cache());
    let long = Batch::new((0..180).map(|i| (i * 7 % 300) as u32).collect(), 1, 180).unwrap();
    close(&m.forward_cached(&long, &mut host).unwrap(), &m.forward_cached(&long, &mut dense).unwrap(), "long prefill");
    let next = Batch::new(vec![42], 1, 1).unwrap();
    close(&m.forward_cached(&next, &mut host).unwrap(), &m.forward_cached(&next, &mut dense).unwrap(), "long step");
    // one-row caches of lengths 7, 2 and 180 stacked, stepped twice, split back
    let prompts: [Vec<u32>; 3] =
        [vec![5, 17, 250, 3, 9, 44, 71], vec![1, 2], (0..180).map(|i| (i * 11 % 300) as u32).collect()];
    let fill = |mut c: KvCache<Cpu>, p: &[u32]| {
        m.forward_cached(&Batch::new(p.to_vec(), 1, p.len()).unwrap(), &mut c).unwrap();
        c
    };
    let (host, pads) = KvCache::stack(prompts.iter().map(|p| fill(m.new_cache(), p)).collect()).unwrap();
    let (dense, dense_pads) = KvCache::stack(prompts.iter().map(|p| fill(m.new_dense_cache(), p)).collect()).unwrap();
    assert_eq!(pads, dense_pads);
    let (mut host, mut dense) = (host, dense);
    for step in 0..2u32 {
        let b = Batch::new(vec![10 + step, 20 + step, 30 + step], 3, 1).unwrap();
        let what = format!("stacked step {step}");
        close(&m.forward_cached(&b, &mut host).unwrap(), &m.forward_cached(&b, &mut dense).unwrap(), &what);
    }
    let (host, dense) = (host.split(&pads).unwrap(), dense.split(&pads).unwrap());
    for (r, (mut h, mut d)) in host.into_iter().zip(dense).enumerate() {
        assert_eq!((h.len(), h.rows()), (prompts[r].len() + 2, 1));
        let b = Batch::new(vec![99], 1, 1).unwrap();
        close(
            &m.forward_cached(&b, &mut h).unwrap(),
            &m.forward_cached(&b, &mut d).unwrap(),
            &format!("split row {r}"),
        );
    }
    // a host cache records no gradients
    let grads = m.params.alloc_grads();
    let (_, tape) = m.params.flat.trace(grads).split_tape();
    assert!(m.hidden(&next, Some(&mut m.new_cache()), tape, None).is_err());
}
