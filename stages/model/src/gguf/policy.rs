//! Which ggml type each tensor gets in a GGUF file of a given file type, as llama.cpp's
//! `llama-quantize` chooses it (`llama_tensor_get_type` in `llama-quant.cpp`, non-`pure` mode):
//!
//! | tensor | F32 / F16 / BF16 | Q8_0 | Q4_0 | Q4_K_M |
//! |---|---|---|---|---|
//! | 1-D (norms, biases) | F32 | F32 | F32 | F32 |
//! | `output` (or a tied `token_embd`) | the file type | Q8_0 | Q6_K | Q6_K |
//! | `attn_v`, `ffn_down` of a `use_more_bits` layer | the file type | Q8_0 | Q4_0 | Q6_K |
//! | every other matrix | the file type | Q8_0 | Q4_0 | Q4_K |
//!
//! `use_more_bits(i, n) = i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2` (integer division). A
//! matrix whose rows are not a multiple of the chosen type's block falls back as llama.cpp's
//! `convert_incompatible_tensor` does: Q4_K → Q5_0, Q6_K → Q8_0 (the output head: Q8_0 at once),
//! and anything whose rows are not a multiple of 32 → F16.

use super::GgmlType;

/// A GGUF file type (`general.file_type`, llama.cpp's `llama_ftype`).
#[allow(non_camel_case_types)] // llama.cpp's names
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_K_M,
}

impl FileType {
    pub const ALL: [FileType; 6] =
        [FileType::F32, FileType::F16, FileType::BF16, FileType::Q8_0, FileType::Q4_0, FileType::Q4_K_M];

    /// `general.file_type` (`LLAMA_FTYPE_ALL_F32` = 0, `MOSTLY_F16` = 1, `MOSTLY_Q4_0` = 2,
    /// `MOSTLY_Q8_0` = 7, `MOSTLY_Q4_K_M` = 15, `MOSTLY_BF16` = 32).
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q8_0 => 7,
            FileType::Q4_K_M => 15,
            FileType::BF16 => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "F32",
            FileType::F16 => "F16",
            FileType::BF16 => "BF16",
            FileType::Q8_0 => "Q8_0",
            FileType::Q4_0 => "Q4_0",
            FileType::Q4_K_M => "Q4_K_M",
        }
    }

    /// By llama.cpp's name (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// The type of every matrix that no rule below singles out.
    fn base(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_K_M => GgmlType::Q4_K,
        }
    }

    fn is_quantized(self) -> bool {
        matches!(self, FileType::Q8_0 | FileType::Q4_0 | FileType::Q4_K_M)
    }

    /// The type of HF tensor `name` with row-major `shape` in a model of `n_layers` layers whose
    /// embedding is tied to the head when `tied` (module docs).
    pub fn tensor_type(self, name: &str, shape: &[usize], n_layers: usize, tied: bool) -> GgmlType {
        if shape.len() < 2 {
            return GgmlType::F32;
        }
        let row = *shape.last().unwrap_or(&0);
        let is_head = name == "lm_head.weight" || (tied && name == "model.embed_tokens.weight");
        let mut ty = self.base();
        if self.is_quantized() && is_head {
            ty = if !row.is_multiple_of(256) {
                GgmlType::Q8_0
            } else if ty == GgmlType::Q8_0 {
                ty
            } else {
                GgmlType::Q6_K
            };
        } else if self == FileType::Q4_K_M {
            if let Some(layer) = layer_of(name, &["self_attn.v_proj.weight", "mlp.down_proj.weight"]) {
                if use_more_bits(layer, n_layers) {
                    ty = GgmlType::Q6_K;
                }
            }
        }
        if !row.is_multiple_of(ty.block().0) {
            ty = match ty {
                GgmlType::Q4_K => GgmlType::Q5_0,
                GgmlType::Q6_K => GgmlType::Q8_0,
                other => other,
            };
        }
        if !row.is_multiple_of(ty.block().0) {
            ty = GgmlType::F16;
        }
        ty
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The layer of `model.layers.N.<suffix>` for one of `suffixes`.
fn layer_of(name: &str, suffixes: &[&str]) -> Option<usize> {
    let (layer, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
    suffixes.contains(&rest).then(|| layer.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-0.5B (24 layers, hidden 896 = 3.5 × 256, FFN 4864 = 19 × 256): llama.cpp's
    /// Q4_K_M file of it has Q8_0 for the tied head (896 is not a multiple of 256), Q5_0 for the
    /// 896-wide matrices, and Q6_K/Q4_K on the 4864-wide `ffn_down` by `use_more_bits`.
    #[test]
    fn q4_k_m_choices_follow_llama_cpp() {
        let t = FileType::Q4_K_M;
        let n = 24;
        assert_eq!(t.tensor_type("model.embed_tokens.weight", &[151936, 896], n, true), GgmlType::Q8_0);
        assert_eq!(t.tensor_type("model.norm.weight", &[896], n, true), GgmlType::F32);
        assert_eq!(t.tensor_type("model.layers.0.self_attn.q_proj.bias", &[896], n, true), GgmlType::F32);
        assert_eq!(t.tensor_type("model.layers.5.self_attn.q_proj.weight", &[896, 896], n, true), GgmlType::Q5_0);
        // use_more_bits layer: Q6_K, which falls back to Q8_0 on 896-wide rows.
        assert_eq!(t.tensor_type("model.layers.0.self_attn.v_proj.weight", &[128, 896], n, true), GgmlType::Q8_0);
        // `ffn_down` rows are 4864 wide (19 × 256): layer 1 has more bits, layer 4 not.
        assert_eq!(t.tensor_type("model.layers.1.mlp.down_proj.weight", &[896, 4864], n, true), GgmlType::Q6_K);
        assert_eq!(t.tensor_type("model.layers.4.mlp.down_proj.weight", &[896, 4864], n, true), GgmlType::Q4_K);
        // An untied head over 4096-wide rows: Q6_K; the embedding then stays Q4_K.
        assert_eq!(t.tensor_type("lm_head.weight", &[32000, 4096], 32, false), GgmlType::Q6_K);
        assert_eq!(t.tensor_type("model.embed_tokens.weight", &[32000, 4096], 32, false), GgmlType::Q4_K);
        // Rows not a multiple of 32: F16.
        assert_eq!(t.tensor_type("model.layers.3.mlp.up_proj.weight", &[8, 40], n, false), GgmlType::F16);
        // Q4_0 and Q8_0 files: the head is Q6_K / Q8_0; F16 files keep it F16.
        assert_eq!(FileType::Q4_0.tensor_type("lm_head.weight", &[10, 512], 2, false), GgmlType::Q6_K);
        assert_eq!(FileType::Q8_0.tensor_type("lm_head.weight", &[10, 512], 2, false), GgmlType::Q8_0);
        assert_eq!(FileType::F16.tensor_type("lm_head.weight", &[10, 512], 2, false), GgmlType::F16);
        assert_eq!(
            FileType::Q4_0.tensor_type("model.layers.0.mlp.down_proj.weight", &[4, 64], 2, false),
            GgmlType::Q4_0
        );
    }

    /// The layers llama.cpp gives more bits in a 32-layer model (Llama-2-7B Q4_K_M's `attn_v`
    /// at Q6_K): 0–3, 6, 9, ..., 27, 28–31.
    #[test]
    fn use_more_bits_layers() {
        let got: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        let two: Vec<usize> = (0..2).filter(|&i| use_more_bits(i, 2)).collect();
        assert_eq!(two, vec![1], "n/8 = 0, 7n/8 = 1; (0 - 0) % 3 = 0 is not 2");
    }
}
