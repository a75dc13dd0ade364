//! The one Hugging Face ↔ llama.cpp tensor-name table and the one RoPE row permutation, used by
//! both reading ([`super::load_gguf`]: GGUF → HF) and export ([`super::export_gguf`]: HF → GGUF).
//!
//! | Hugging Face | llama.cpp | Q/K RoPE rows (llama) |
//! |---|---|---|
//! | `model.embed_tokens.weight` | `token_embd.weight` | |
//! | `model.norm.weight` | `output_norm.weight` | |
//! | `lm_head.weight` | `output.weight` | |
//! | `model.layers.{i}.input_layernorm.{weight,bias}` | `blk.{i}.attn_norm.*` | |
//! | `model.layers.{i}.self_attn.q_proj.*` | `blk.{i}.attn_q.*` | permuted, `n_head` heads |
//! | `model.layers.{i}.self_attn.k_proj.*` | `blk.{i}.attn_k.*` | permuted, `n_head_kv` heads |
//! | `model.layers.{i}.self_attn.v_proj.*` | `blk.{i}.attn_v.*` | |
//! | `model.layers.{i}.self_attn.o_proj.*` | `blk.{i}.attn_output.*` | |
//! | `model.layers.{i}.post_attention_layernorm.*` | `blk.{i}.ffn_norm.*` | |
//! | `model.layers.{i}.mlp.gate_proj.*` | `blk.{i}.ffn_gate.*` | |
//! | `model.layers.{i}.mlp.up_proj.*` | `blk.{i}.ffn_up.*` | |
//! | `model.layers.{i}.mlp.down_proj.*` | `blk.{i}.ffn_down.*` | |
//!
//! llama.cpp's `convert_hf_to_gguf.py` stores llama's Q/K projection rows in the order its
//! interleaved RoPE expects (`permute`: `w.reshape(h, 2, hd/2, d).swapaxes(1, 2)`); Qwen2 uses
//! NeoX RoPE and keeps the HF order. [`permute_rope`] and [`unpermute_rope`] are the two
//! directions of one index map.

use crate::host::HostTensor;

/// Whole-model tensors: (HF name, llama.cpp name).
const GLOBAL: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Which head count a block tensor's rows are RoPE-permuted by (llama only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeRows {
    /// Not permuted.
    No,
    /// Q: `num_attention_heads`.
    Query,
    /// K: `num_key_value_heads`.
    Key,
}

/// One per-layer module: HF module path (under `model.layers.{i}.`), llama.cpp name (under
/// `blk.{i}.`), and its RoPE permutation.
pub(crate) struct BlockTensor {
    pub hf: &'static str,
    pub gguf: &'static str,
    pub rope: RopeRows,
}

/// Every per-layer module, in llama.cpp's order; each has a `.weight` (required on load) and may
/// have a `.bias`.
pub(crate) const BLOCK: [BlockTensor; 9] = [
    BlockTensor { hf: "input_layernorm", gguf: "attn_norm", rope: RopeRows::No },
    BlockTensor { hf: "self_attn.q_proj", gguf: "attn_q", rope: RopeRows::Query },
    BlockTensor { hf: "self_attn.k_proj", gguf: "attn_k", rope: RopeRows::Key },
    BlockTensor { hf: "self_attn.v_proj", gguf: "attn_v", rope: RopeRows::No },
    BlockTensor { hf: "self_attn.o_proj", gguf: "attn_output", rope: RopeRows::No },
    BlockTensor { hf: "post_attention_layernorm", gguf: "ffn_norm", rope: RopeRows::No },
    BlockTensor { hf: "mlp.gate_proj", gguf: "ffn_gate", rope: RopeRows::No },
    BlockTensor { hf: "mlp.up_proj", gguf: "ffn_up", rope: RopeRows::No },
    BlockTensor { hf: "mlp.down_proj", gguf: "ffn_down", rope: RopeRows::No },
];

/// `{prefix}{layer}.{module}.{weight|bias}` -> (layer, module, suffix).
fn split_block<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str, &'a str)> {
    let (layer, part) = name.strip_prefix(prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = part.rsplit_once('.')?;
    matches!(suffix, "weight" | "bias").then_some((layer, module, suffix))
}

/// The table row and layer of an HF tensor name (None for whole-model tensors and unknown names).
pub(crate) fn hf_block(hf: &str) -> Option<(usize, &'static BlockTensor)> {
    let (layer, module, _) = split_block(hf, "model.layers.")?;
    Some((layer, BLOCK.iter().find(|b| b.hf == module)?))
}

/// llama.cpp name -> HF name (None for names without a counterpart).
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((hf, _)) = GLOBAL.iter().find(|(_, g)| *g == gguf) {
        return Some((*hf).to_string());
    }
    let (layer, module, suffix) = split_block(gguf, "blk.")?;
    let b = BLOCK.iter().find(|b| b.gguf == module)?;
    Some(format!("model.layers.{layer}.{}.{suffix}", b.hf))
}

/// HF name -> llama.cpp name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL.iter().find(|(h, _)| *h == hf) {
        return Some((*g).to_string());
    }
    let (layer, module, suffix) = split_block(hf, "model.layers.")?;
    let b = BLOCK.iter().find(|b| b.hf == module)?;
    Some(format!("blk.{layer}.{}.{suffix}", b.gguf))
}

/// How many heads the rows of HF tensor `hf` are RoPE-permuted by in a llama GGUF file (None:
/// stored as in HF).
pub(crate) fn rope_heads(hf: &str, n_head: usize, n_head_kv: usize) -> Option<usize> {
    match hf_block(hf)?.1.rope {
        RopeRows::No => None,
        RopeRows::Query => Some(n_head),
        RopeRows::Key => Some(n_head_kv),
    }
}

/// llama.cpp's `permute` (HF -> GGUF row order for interleaved RoPE):
/// `w.reshape(h, 2, hd/2, rest).swapaxes(1, 2)`. Works on weights `[h*hd, d]` and biases `[h*hd]`.
pub fn permute_rope(t: &HostTensor, n_head: usize) -> Result<HostTensor, String> {
    reorder_rope_rows(t, n_head, Direction::HfToGguf)
}

/// Undo llama.cpp's `permute` (GGUF -> HF row order): `w.reshape(h, hd/2, 2, rest).swapaxes(1, 2)`.
pub fn unpermute_rope(t: &HostTensor, n_head: usize) -> Result<HostTensor, String> {
    reorder_rope_rows(t, n_head, Direction::GgufToHf)
}

#[derive(Clone, Copy)]
enum Direction {
    HfToGguf,
    GgufToHf,
}

/// The one index map: within each head, HF row `j * half + i` (`j` in 0..2, `i` in 0..half) is
/// GGUF row `i * 2 + j`; rows are copied in the given direction.
fn reorder_rope_rows(t: &HostTensor, n_head: usize, dir: Direction) -> Result<HostTensor, String> {
    let rows = *t.shape.first().ok_or("a scalar has no rows to permute for RoPE")?;
    let cols: usize = t.shape[1..].iter().product();
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        let what = match dir {
            Direction::HfToGguf => "RoPE permutation",
            Direction::GgufToHf => "RoPE un-permutation",
        };
        return Err(format!("{rows} rows cannot be split into {n_head} heads of even size for {what}"));
    }
    let half = rows / n_head / 2;
    let mut out = vec![0f32; t.data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let hf = (h * 2 + j) * half + i;
                let gguf = (h * half + i) * 2 + j;
                let (src, dst) = match dir {
                    Direction::HfToGguf => (hf, gguf),
                    Direction::GgufToHf => (gguf, hf),
                };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(HostTensor { shape: t.shape.clone(), data: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(hf_name("blk.12.attn_q.bias").as_deref(), Some("model.layers.12.self_attn.q_proj.bias"));
        assert_eq!(hf_name("blk.0.ffn_down.weight").as_deref(), Some("model.layers.0.mlp.down_proj.weight"));
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_qkv.weight"), None);
        assert_eq!(hf_name("blk.0.attn_q.scales"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(gguf_name("model.layers.3.self_attn.o_proj.weight").as_deref(), Some("blk.3.attn_output.weight"));
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"), None);
    }

    /// Every table row maps both ways and back, for weights and biases, and names outside the
    /// table map to nothing in either direction.
    #[test]
    fn names_round_trip_through_the_table() {
        let mut hf_names: Vec<String> = GLOBAL.iter().map(|(h, _)| h.to_string()).collect();
        for layer in [0, 7, 23] {
            for b in &BLOCK {
                for suffix in ["weight", "bias"] {
                    hf_names.push(format!("model.layers.{layer}.{}.{suffix}", b.hf));
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for hf in &hf_names {
            let g = gguf_name(hf).unwrap_or_else(|| panic!("{hf} has no llama.cpp name"));
            assert!(seen.insert(g.clone()), "two HF names map to {g}");
            assert_eq!(hf_name(&g).as_deref(), Some(hf.as_str()), "{hf} -> {g} -> back");
        }
        assert_eq!(seen.len(), 3 + 3 * 9 * 2);
    }

    #[test]
    fn rope_heads_follow_the_table() {
        assert_eq!(rope_heads("model.layers.2.self_attn.q_proj.weight", 14, 2), Some(14));
        assert_eq!(rope_heads("model.layers.2.self_attn.q_proj.bias", 14, 2), Some(14));
        assert_eq!(rope_heads("model.layers.2.self_attn.k_proj.weight", 14, 2), Some(2));
        assert_eq!(rope_heads("model.layers.2.self_attn.v_proj.weight", 14, 2), None);
        assert_eq!(rope_heads("model.embed_tokens.weight", 14, 2), None);
    }

    /// Permute as llama.cpp's converter does (written out independently here), then check we get
    /// the HF rows back, and that our permute is that same map.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (h, hd, d) = (3, 4, 2);
        let rows = h * hd;
        let hf: Vec<f32> = (0..rows * d).map(|x| x as f32).collect();
        // permute: reshape(h, 2, hd/2, d).swapaxes(1, 2): dst (h, i, j) <- src (h, j, i)
        let mut gg = vec![0f32; hf.len()];
        for hh in 0..h {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let dst = (hh * (hd / 2) + i) * 2 + j;
                    let src = (hh * 2 + j) * (hd / 2) + i;
                    gg[dst * d..dst * d + d].copy_from_slice(&hf[src * d..src * d + d]);
                }
            }
        }
        let back = unpermute_rope(&HostTensor::new(vec![rows, d], gg.clone()), h).unwrap();
        assert_eq!(back.data, hf);
        let fwd = permute_rope(&HostTensor::new(vec![rows, d], hf), h).unwrap();
        assert_eq!(fwd.data, gg);
        assert!(unpermute_rope(&HostTensor::new(vec![6, 1], vec![0.0; 6]), 2).is_err());
        assert!(permute_rope(&HostTensor::new(vec![6, 1], vec![0.0; 6]), 0).is_err());
    }

    #[test]
    fn permute_and_unpermute_round_trip() {
        for (h, hd, cols) in [(1, 2, 1), (2, 8, 3), (4, 6, 5), (7, 4, 1)] {
            let rows = h * hd;
            let shape = if cols == 1 { vec![rows] } else { vec![rows, cols] };
            let x = HostTensor::new(shape, (0..rows * cols).map(|v| v as f32 * 0.5 - 3.0).collect());
            let p = permute_rope(&x, h).unwrap();
            assert_eq!(p.shape, x.shape);
            if hd > 2 {
                assert_ne!(p.data, x.data, "h={h} hd={hd}: the permutation moves rows");
            }
            assert_eq!(unpermute_rope(&p, h).unwrap().data, x.data, "h={h} hd={hd}");
            assert_eq!(permute_rope(&unpermute_rope(&x, h).unwrap(), h).unwrap().data, x.data, "h={h} hd={hd}");
        }
    }
}
