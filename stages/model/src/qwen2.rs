//! Qwen2 / Llama decoder-only transformer on dfdx, generic over the device `D` and the dimension
//! types `S: Dims` (compile-time for the built-in preset, runtime for checkpoints; see [`crate::dims`]).
//!
//! Follows transformers' `modeling_qwen2.py` (Qwen2 technical report, arXiv:2407.10671) and
//! `modeling_llama.py`: token embedding → N × [RMSNorm → grouped-query self-attention with rotary
//! position embeddings (rotate-half convention, θ = `rope_theta`), q/k/v bias for Qwen2 → residual →
//! RMSNorm → SwiGLU MLP (`down(silu(gate(x)) * up(x))`) → residual] → RMSNorm → LM head (optionally
//! tied to the embedding). Weights are bound by their Hugging Face names; a linear layer's weight is
//! `[out, in]`. LoRA (peft semantics): `y = W x + b + (alpha/r) · B(A(x))`, no dropout.
//!
//! Positions are `cumsum(attention_mask) - 1` per row (what transformers' `generate` uses), so left
//! padding works for batched generation; for unpadded or right-padded rows this is `0..len`.
//!
//! # Dimensions
//! There is one implementation of the architecture: [`Qwen2<D, S>`]. Every activation of the
//! forward pass is typed with `S`'s dimension types (`[tokens, S::Hidden]`,
//! `[batch, S::KvHeads, len, S::HeadDim]`, ...); the batch, sequence and vocabulary axes are
//! `usize`. `Qwen2<D>` (= `Qwen2<D, RuntimeDims>`) is what checkpoints from disk load into;
//! `Qwen2<D, TinyDims>` is the built-in preset, checked at construction against the config.
//! Parameters are stored as flat `(usize,)` device vectors for every `S` (the trainable ones in one
//! [`FlatParams`], which dfdx's optimisers need to be a fixed tensor collection), and each weight is
//! viewed with its typed shape when used, `[S::QDim, S::Hidden]` for `q_proj` and so on. So training
//! (`FlatParams`), LoRA, generation, saving and loading work unchanged for every `S`, and
//! [`Qwen2::into_runtime`] / [`Qwen2::into_dims`] convert without copying a weight; the logits
//! (`[batch, seq, vocab]`, all `usize`) have the same type either way.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checkpoint;
use crate::config::{Arch, ModelConfig};
use crate::dims::{DimValues, Dims, RuntimeDims};
use crate::error::ModelError;
use crate::host::{HostTensor, HostTensors};
use crate::params::FlatParams;

type T1<D, T> = Tensor<(usize,), f32, D, T>;
type T2<D, T> = Tensor<(usize, usize), f32, D, T>;
type T3<D, T> = Tensor<(usize, usize, usize), f32, D, T>;

/// `[tokens, X]` activations.
type Rows<X, D, T> = Tensor<(usize, X), f32, D, T>;
/// `[batch, S::KvHeads, len, S::HeadDim]` keys or values.
type Kv<S, D, T> = Tensor<(usize, <S as Dims>::KvHeads, usize, <S as Dims>::HeadDim), f32, D, T>;

/// Cached (keys, values) of one layer.
type KvPair<D, S> = (Kv<S, D, NoneTape>, Kv<S, D, NoneTape>);

/// Additive attention-mask value for hidden keys (large enough that `exp` underflows to 0).
const MASKED: f32 = -1e9;

/// A linear projection of the decoder that LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
    /// The module name transformers / peft use (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }
    fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        }
    }
    pub fn from_hf_name(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.hf_name() == s)
    }
}

/// LoRA hyper-parameters (peft's `LoraConfig` subset).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub targets: Vec<Proj>,
    /// peft's `lora_dropout`: during training (see [`Qwen2::forward_train`]) the LoRA branch sees
    /// `dropout(x)`, `y = W x + b + (alpha/r) · B(A(dropout(x)))`; inference is unaffected.
    pub dropout: f32,
}

impl LoraConfig {
    /// `target_modules = all-linear`: q, k, v, o, gate, up, down (not the LM head).
    pub fn all_linear(r: usize, alpha: f32) -> Self {
        LoraConfig { r, alpha, targets: Proj::ALL.to_vec(), dropout: 0.0 }
    }
    /// Parses a target list: `["all-linear"]` or module names (`q_proj`, `v_proj`, ...).
    pub fn with_targets(r: usize, alpha: f32, names: &[String]) -> Result<Self, ModelError> {
        if names.iter().any(|n| n == "all-linear") {
            return Ok(Self::all_linear(r, alpha));
        }
        let mut targets = Vec::new();
        for n in names {
            let p = Proj::from_hf_name(n).ok_or_else(|| {
                ModelError::Lora(format!(
                    "unknown target module `{n}` (expected all-linear or q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                ))
            })?;
            if !targets.contains(&p) {
                targets.push(p);
            }
        }
        targets.sort();
        Ok(LoraConfig { r, alpha, targets, dropout: 0.0 })
    }
    pub fn scale(&self) -> f32 {
        self.alpha / self.r as f32
    }
    /// The same adapters with `lora_dropout = p` (0 ≤ p < 1).
    pub fn with_dropout(mut self, p: f32) -> Result<Self, ModelError> {
        if !(0.0..1.0).contains(&p) {
            return Err(ModelError::config("lora_dropout", format!("{p} is not in [0, 1)")));
        }
        self.dropout = p;
        Ok(self)
    }
    /// peft's `adapter_config.json`.
    pub fn to_peft_json(&self, base_model: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets.iter().map(|p| p.hf_name()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_rslora": false,
            "use_dora": false,
        })
    }
    /// Reads peft's `adapter_config.json` (only plain LoRA is accepted).
    pub fn from_peft_json(v: &serde_json::Value) -> Result<Self, ModelError> {
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(t) = field("peft_type").and_then(|x| x.as_str()) {
            if t != "LORA" {
                return Err(ModelError::config("peft_type", format!("`{t}` is not supported (LORA only)")));
            }
        }
        for (k, bad) in [("use_rslora", true), ("use_dora", true)] {
            if field(k).and_then(|x| x.as_bool()) == Some(bad) {
                return Err(ModelError::config(k, "is not supported"));
            }
        }
        let r = field("r")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| ModelError::config("r", "missing in adapter_config.json"))? as usize;
        let alpha = field("lora_alpha")
            .and_then(|x| x.as_f64())
            .ok_or_else(|| ModelError::config("lora_alpha", "missing in adapter_config.json"))?
            as f32;
        let names: Vec<String> = match field("target_modules") {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
            _ => return Err(ModelError::config("target_modules", "missing in adapter_config.json")),
        };
        if r == 0 {
            return Err(ModelError::config("r", "must be positive"));
        }
        let dropout = field("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32;
        Self::with_targets(r, alpha, &names)?.with_dropout(dropout)
    }
}

/// Where a weight lives: a frozen device tensor, or a view into the trainable flat vector.
#[derive(Debug, Clone)]
enum Store<D: Storage<f32>> {
    Frozen(T1<D, NoneTape>),
    Flat(usize),
}

#[derive(Debug, Clone)]
struct Param<D: Storage<f32>> {
    name: String,
    shape: Vec<usize>,
    store: Store<D>,
    /// Host copy of a frozen weight for the CPU few-row product ([`host_matmul_wt`]), made on first
    /// use (inference only) and dropped whenever `store` changes ([`Param::set_store`]).
    host: HostCopy,
}

/// See [`Param::host`].
#[derive(Debug, Clone, Default)]
struct HostCopy(OnceLock<Arc<Vec<f32>>>);

impl<D: Storage<f32>> Param<D> {
    fn new(name: String, shape: Vec<usize>, store: Store<D>) -> Self {
        Param { name, shape, store, host: HostCopy::default() }
    }
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn set_store(&mut self, store: Store<D>) {
        self.store = store;
        self.host = HostCopy::default();
    }
}

/// A no-gradient product `x Wᵀ` on the CPU with at most this many rows (batch-1 decoding) and a
/// weight of at least [`HOST_MATMUL_MIN_WEIGHT`] elements is computed by [`host_matmul_wt`]
/// instead of dfdx's gemm (`benches/decode.rs`: with more rows, or small weights, gemm wins).
const HOST_MATMUL_MAX_ROWS: usize = 1;
const HOST_MATMUL_MIN_WEIGHT: usize = 1 << 17;

/// The kernel of [`host_matmul_wt`]: `cols[r][j - j0] = w[j] · x[r]` for `j` in `j0..j1`.
#[inline(always)]
fn dot_rows(x: &[f32], w: &[f32], n: usize, k: usize, j0: usize, j1: usize, cols: &mut [f32]) {
    let width = j1 - j0;
    for j in j0..j1 {
        let wr = &w[j * k..(j + 1) * k];
        for r in 0..n {
            let xr = &x[r * k..(r + 1) * k];
            // 16 independent partial sums: two 8-lane vectors with AVX2, four with SSE
            let mut acc = [0f32; 16];
            let (wc, xc) = (wr.chunks_exact(16), xr.chunks_exact(16));
            let (wt, xt) = (wc.remainder(), xc.remainder());
            for (a, b) in wc.zip(xc) {
                for l in 0..16 {
                    acc[l] += a[l] * b[l];
                }
            }
            let mut sum = 0f32;
            for l in 0..8 {
                sum += acc[l] + acc[l + 8];
            }
            for (a, b) in wt.iter().zip(xt) {
                sum += a * b;
            }
            cols[r * width + (j - j0)] = sum;
        }
    }
}

/// [`dot_rows`] compiled for AVX2 (chosen at run time; the default x86-64 target has only SSE2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_avx2(x: &[f32], w: &[f32], n: usize, k: usize, j0: usize, j1: usize, cols: &mut [f32]) {
    dot_rows(x, w, n, k, j0, j1, cols)
}

/// [`host_matmul_wt`] is used unless `PIPELINE_NO_HOST_MATMUL` is set (read once; for benchmarks
/// comparing it with dfdx's gemm, `benches/throughput.rs`).
fn host_matmul_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PIPELINE_NO_HOST_MATMUL").is_none())
}

/// splitmix64 of `seed ^ salt`: independent seeds for the dropout masks of one forward.
fn mix_seed(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Inverted-dropout mask of `len` elements: 0 with probability `p`, else `1 / (1 - p)` (what
/// `torch.nn.Dropout` multiplies by in training), drawn from ChaCha8 seeded with `seed`.
fn dropout_mask(len: usize, p: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p);
    (0..len).map(|_| if rng.gen::<f32>() < p { 0.0 } else { keep }).collect()
}

/// `y[r][j] = Σ_k x[r][k] · w[j][k]` for `x: [n, k]`, `w: [out, k]` row-major (a linear layer's HF
/// layout), `n` ≤ [`HOST_MATMUL_MAX_ROWS`]. Decoding is bound by reading the weights: dfdx 0.13's
/// gemm runs `[1, k] × Wᵀ` at ~0.6 GFLOP/s here (its m = 1 path walks the transposed weight
/// through the general kernel), while this reads each weight row once, contiguously, for all `n`
/// rows, with 8 independent accumulators the compiler vectorises. Large weights are split over the
/// available cores.
fn host_matmul_wt(x: &[f32], n: usize, w: &[f32], out: usize) -> Vec<f32> {
    let k = x.len() / n;
    debug_assert_eq!(w.len(), out * k);
    let mut y = vec![0f32; n * out];
    // each task owns output columns [j0, j1) of all rows: `cols` is [n][j1 - j0]
    let work = |j0: usize, j1: usize, cols: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { dot_rows_avx2(x, w, n, k, j0, j1, cols) };
            return;
        }
        dot_rows(x, w, n, k, j0, j1, cols);
    };
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(8);
    if threads < 2 || out * k < (1 << 20) {
        work(0, out, &mut y);
        return y;
    }
    let chunk = out.div_ceil(threads);
    let parts: Vec<(usize, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..out)
            .step_by(chunk)
            .map(|j0| {
                let j1 = (j0 + chunk).min(out);
                s.spawn(move || {
                    let mut cols = vec![0f32; n * (j1 - j0)];
                    work(j0, j1, &mut cols);
                    (j0, cols)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("host matmul worker")).collect()
    });
    for (j0, cols) in parts {
        let width = cols.len() / n;
        for r in 0..n {
            y[r * out + j0..r * out + j0 + width].copy_from_slice(&cols[r * width..(r + 1) * width]);
        }
    }
    y
}

#[derive(Debug, Clone)]
struct Lin<D: Storage<f32>> {
    w: Param<D>,
    b: Option<Param<D>>,
    /// (A `[r, in]`, B `[out, r]`)
    lora: Option<(Param<D>, Param<D>)>,
}

#[derive(Debug, Clone)]
struct Layer<D: Storage<f32>> {
    input_norm: Param<D>,
    post_norm: Param<D>,
    /// q, k, v, o, gate, up, down
    lins: [Lin<D>; 7],
}

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Trainable {
    /// Nothing (inference).
    None,
    /// The LoRA adapters alone.
    Lora(LoraConfig),
    /// Every weight (full fine-tuning).
    Full,
}

/// A token batch: `ids` and `mask` are row-major `[batch, seq]`; `mask[i] = false` marks padding.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
    pub batch: usize,
    pub seq: usize,
}

impl Batch {
    /// One unpadded row per sequence; rows must have equal length.
    pub fn new(ids: Vec<u32>, batch: usize, seq: usize) -> Result<Self, ModelError> {
        let mask = vec![true; ids.len()];
        Self::with_mask(ids, mask, batch, seq)
    }
    pub fn with_mask(ids: Vec<u32>, mask: Vec<bool>, batch: usize, seq: usize) -> Result<Self, ModelError> {
        if batch == 0 || seq == 0 {
            return Err(ModelError::Batch("empty batch".into()));
        }
        if ids.len() != batch * seq || mask.len() != batch * seq {
            return Err(ModelError::Batch(format!(
                "{} ids and {} mask entries for [batch {batch}, seq {seq}]",
                ids.len(),
                mask.len()
            )));
        }
        Ok(Batch { ids, mask, batch, seq })
    }
    /// Right-pads variable-length rows with `pad_id` (masked).
    pub fn right_padded(rows: &[Vec<u32>], pad_id: u32) -> Result<Self, ModelError> {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for r in rows {
            ids.extend_from_slice(r);
            mask.extend(std::iter::repeat_n(true, r.len()));
            ids.extend(std::iter::repeat_n(pad_id, seq - r.len()));
            mask.extend(std::iter::repeat_n(false, seq - r.len()));
        }
        Self::with_mask(ids, mask, rows.len(), seq)
    }
}

/// Per-layer key/value cache for incremental decoding. Keys are stored after the rotary embedding,
/// `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache<D: Storage<f32>, S: Dims = RuntimeDims> {
    layers: Vec<Option<KvPair<D, S>>>,
    /// `[batch][len]`: which cached positions are real tokens.
    key_mask: Vec<Vec<bool>>,
    /// Next position id per row.
    next_pos: Vec<usize>,
}

impl<D: Storage<f32>, S: Dims> KvCache<D, S> {
    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The decoder (see the module docs): `Qwen2<D>` has runtime dimensions, `Qwen2<D, TinyDims>`
/// the built-in preset's at compile time.
#[derive(Debug, Clone)]
pub struct Qwen2<D: Device<f32>, S: Dims = RuntimeDims> {
    pub cfg: ModelConfig,
    /// `cfg`'s dimensions typed by `S` (checked against `cfg` at construction).
    dims: DimValues<S>,
    dev: D,
    embed: Param<D>,
    layers: Vec<Layer<D>>,
    norm: Param<D>,
    lm_head: Option<Param<D>>,
    lora: Option<LoraConfig>,
    adapters_enabled: bool,
    trainable: Trainable,
    /// The trained weights (see [`FlatParams`]); hand this to a dfdx optimiser.
    pub params: FlatParams<f32, D>,
    /// `rotate_half` as a `[head_dim, head_dim]` signed permutation matrix.
    rot: Tensor<(S::HeadDim, S::HeadDim), f32, D>,
}

fn hf_names(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, &'static str)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h], "vocab_size/hidden_size")];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h], "hidden_size"));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h], "hidden_size"));
        for proj in Proj::ALL {
            let (o, inp, field) = proj_dims(cfg, proj);
            out.push((format!("{p}.{}.{}.weight", proj.parent(), proj.hf_name()), vec![o, inp], field));
            if cfg.attention_bias && matches!(proj, Proj::Q | Proj::K | Proj::V) {
                out.push((format!("{p}.{}.{}.bias", proj.parent(), proj.hf_name()), vec![o], field));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h], "hidden_size"));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h], "vocab_size/hidden_size"));
    }
    let _ = i;
    out
}

/// (out, in, config fields) of a projection.
fn proj_dims(cfg: &ModelConfig, p: Proj) -> (usize, usize, &'static str) {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    match p {
        Proj::Q => (cfg.q_dim(), h, "num_attention_heads*head_dim/hidden_size"),
        Proj::K | Proj::V => (cfg.kv_dim(), h, "num_key_value_heads*head_dim/hidden_size"),
        Proj::O => (h, cfg.q_dim(), "hidden_size/num_attention_heads*head_dim"),
        Proj::Gate | Proj::Up => (i, h, "intermediate_size/hidden_size"),
        Proj::Down => (h, i, "hidden_size/intermediate_size"),
    }
}

fn normal(rng: &mut ChaCha8Rng, std: f32) -> f32 {
    // Box-Muller
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// `rotate_half` as a matrix: `x @ R` = `cat(-x[half..], x[..half])`.
fn rot_matrix<D: Device<f32>, H: Dim>(dev: &D, hd: H) -> Tensor<(H, H), f32, D> {
    let n = hd.size();
    let mut rot = vec![0f32; n * n];
    let half = n / 2;
    for j in 0..half {
        // out[j] = -x[j + half]; out[j + half] = x[j]; out = x @ R, R[row][col]
        rot[(j + half) * n + j] = -1.0;
        rot[j * n + j + half] = 1.0;
    }
    dev.tensor_from_vec(rot, (hd, hd))
}

/// Constructors of the runtime-dimension model (`Qwen2::from_host(..)` infers `S = RuntimeDims`;
/// Rust does not apply a default type parameter during inference, so the generic constructors
/// have their own names: [`Qwen2::from_host_with_dims`], [`Qwen2::load_hf_with_dims`]).
impl<D: Device<f32>> Qwen2<D> {
    /// Builds the model from HF-named host tensors, checking every name and shape against the
    /// config. Extra tensors are an error, except rotary `inv_freq` buffers and a tied `lm_head`.
    pub fn from_host(cfg: &ModelConfig, tensors: &HostTensors, dev: &D) -> Result<Self, ModelError> {
        Self::from_host_with_dims(cfg, tensors, dev)
    }

    /// Reads a Hugging Face checkpoint folder (see [`checkpoint::load_hf_folder`]).
    pub fn load_hf(dir: &Path, dev: &D) -> Result<Self, ModelError> {
        Self::load_hf_with_dims(dir, dev)
    }
}

impl<D: Device<f32>, S: Dims> Qwen2<D, S> {
    /// [`Qwen2::from_host`] with dimension types `S`: the config is also checked against `S`
    /// (e.g. `Qwen2::<Cpu, TinyDims>::from_host_with_dims(&ModelConfig::tiny(v), ..)`); a
    /// mismatch is an error naming the config field.
    pub fn from_host_with_dims(cfg: &ModelConfig, tensors: &HostTensors, dev: &D) -> Result<Self, ModelError> {
        let dims = DimValues::<S>::from_config(cfg)?;
        let expected = hf_names(cfg);
        let mut known: BTreeMap<&str, ()> = BTreeMap::new();
        for (name, shape, field) in &expected {
            known.insert(name.as_str(), ());
            let t = tensors.get(name).ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
            if &t.shape != shape {
                return Err(ModelError::ShapeMismatch {
                    name: name.clone(),
                    got: t.shape.clone(),
                    expected: shape.clone(),
                    field: field.to_string(),
                });
            }
            if t.data.len() != shape.iter().product::<usize>() {
                return Err(ModelError::ShapeMismatch {
                    name: name.clone(),
                    got: vec![t.data.len()],
                    expected: shape.clone(),
                    field: field.to_string(),
                });
            }
        }
        for name in tensors.keys() {
            let ignorable =
                name.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight");
            if !known.contains_key(name.as_str()) && !ignorable {
                return Err(ModelError::UnexpectedTensor { name: name.clone(), arch: cfg.arch.to_string() });
            }
        }
        let frozen = |name: &str| -> Param<D> {
            let t = &tensors[name];
            Param::new(
                name.to_string(),
                t.shape.clone(),
                Store::Frozen(dev.tensor_from_vec(t.data.clone(), (t.data.len(),))),
            )
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let lin = |proj: Proj| -> Lin<D> {
                let base = format!("{p}.{}.{}", proj.parent(), proj.hf_name());
                let b = (cfg.attention_bias && matches!(proj, Proj::Q | Proj::K | Proj::V))
                    .then(|| frozen(&format!("{base}.bias")));
                Lin { w: frozen(&format!("{base}.weight")), b, lora: None }
            };
            layers.push(Layer {
                input_norm: frozen(&format!("{p}.input_layernorm.weight")),
                post_norm: frozen(&format!("{p}.post_attention_layernorm.weight")),
                lins: Proj::ALL.map(lin),
            });
        }
        Ok(Qwen2 {
            cfg: cfg.clone(),
            dims,
            dev: dev.clone(),
            embed: frozen("model.embed_tokens.weight"),
            layers,
            norm: frozen("model.norm.weight"),
            lm_head: (!cfg.tie_word_embeddings).then(|| frozen("lm_head.weight")),
            lora: None,
            adapters_enabled: true,
            trainable: Trainable::None,
            params: FlatParams { flat: dev.zeros_like(&(1,)) },
            rot: rot_matrix(dev, dims.head_dim),
        })
    }

    /// The same model with other dimension types, checked against the config (an error names the
    /// field). Lossless and cheap: weights, adapters, the trainable vector and the adapter switch
    /// move over as they are (no weight is copied), so `Qwen2<D, TinyDims>` → `Qwen2<D>` → back
    /// gives bit-identical outputs.
    pub fn into_dims<S2: Dims>(self) -> Result<Qwen2<D, S2>, ModelError> {
        let dims = DimValues::<S2>::from_config(&self.cfg)?;
        let rot = rot_matrix(&self.dev, dims.head_dim);
        Ok(Qwen2 {
            cfg: self.cfg,
            dims,
            dev: self.dev,
            embed: self.embed,
            layers: self.layers,
            norm: self.norm,
            lm_head: self.lm_head,
            lora: self.lora,
            adapters_enabled: self.adapters_enabled,
            trainable: self.trainable,
            params: self.params,
            rot,
        })
    }

    /// The runtime-dimension model ([`RuntimeDims`] accepts every config, so this cannot fail):
    /// the boundary to code that takes `Qwen2<D>` only.
    pub fn into_runtime(self) -> Qwen2<D> {
        self.into_dims::<RuntimeDims>().expect("RuntimeDims accepts every config")
    }

    /// The dimension values typed by `S`.
    pub fn dims(&self) -> &DimValues<S> {
        &self.dims
    }

    /// Random weights as transformers initialises them (`normal(0, 0.02)` for linear layers and the
    /// embedding, zero biases, unit norms), reproducible from `seed`.
    pub fn random_host(cfg: &ModelConfig, seed: u64) -> HostTensors {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = HostTensors::new();
        for (name, shape, _) in hf_names(cfg) {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal(&mut rng, 0.02)).collect()
            };
            out.insert(name, HostTensor::new(shape, data));
        }
        out
    }

    /// [`Qwen2::load_hf`] with dimension types `S` (the config is checked against `S`).
    pub fn load_hf_with_dims(dir: &Path, dev: &D) -> Result<Self, ModelError> {
        let ck = checkpoint::load_hf_folder(dir)?;
        Self::from_host_with_dims(&ck.config, &ck.tensors, dev)
    }

    pub fn device(&self) -> &D {
        &self.dev
    }
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }
    pub fn trainable(&self) -> &Trainable {
        &self.trainable
    }

    fn all_params_mut(&mut self) -> Vec<&mut Param<D>> {
        let mut v: Vec<&mut Param<D>> = vec![&mut self.embed];
        for l in &mut self.layers {
            v.push(&mut l.input_norm);
            v.push(&mut l.post_norm);
            for lin in &mut l.lins {
                v.push(&mut lin.w);
                if let Some(b) = &mut lin.b {
                    v.push(b);
                }
                if let Some((a, b)) = &mut lin.lora {
                    v.push(a);
                    v.push(b);
                }
            }
        }
        v.push(&mut self.norm);
        if let Some(h) = &mut self.lm_head {
            v.push(h);
        }
        v
    }

    fn all_params(&self) -> Vec<&Param<D>> {
        let mut v: Vec<&Param<D>> = vec![&self.embed];
        for l in &self.layers {
            v.push(&l.input_norm);
            v.push(&l.post_norm);
            for lin in &l.lins {
                v.push(&lin.w);
                if let Some(b) = &lin.b {
                    v.push(b);
                }
                if let Some((a, b)) = &lin.lora {
                    v.push(a);
                    v.push(b);
                }
            }
        }
        v.push(&self.norm);
        if let Some(h) = &self.lm_head {
            v.push(h);
        }
        v
    }

    /// Host copy of a parameter's values.
    fn host_of(&self, p: &Param<D>) -> Vec<f32> {
        match &p.store {
            Store::Frozen(t) => t.as_vec(),
            Store::Flat(off) => {
                let all = self.params.flat.as_vec();
                all[*off..*off + p.numel()].to_vec()
            }
        }
    }

    /// Moves every parameter back to frozen storage (reading the current flat values).
    fn freeze_all(&mut self) {
        let flat = self.params.flat.as_vec();
        let dev = self.dev.clone();
        for p in self.all_params_mut() {
            if let Store::Flat(off) = p.store {
                let n = p.numel();
                p.set_store(Store::Frozen(dev.tensor_from_vec(flat[off..off + n].to_vec(), (n,))));
            }
        }
        self.params.flat = dev.zeros_like(&(1,));
        self.trainable = Trainable::None;
    }

    /// Moves the parameters selected by `pick` into a fresh flat vector (new tensor id: optimiser
    /// state from before does not carry over).
    fn make_flat(&mut self, pick: impl Fn(&Param<D>) -> bool) {
        let mut flat: Vec<f32> = Vec::new();
        let dev = self.dev.clone();
        for p in self.all_params_mut() {
            if pick(p) {
                let vals = match &p.store {
                    Store::Frozen(t) => t.as_vec(),
                    Store::Flat(_) => unreachable!("freeze_all ran first"),
                };
                p.set_store(Store::Flat(flat.len()));
                flat.extend(vals);
            }
        }
        if flat.is_empty() {
            flat.push(0.0);
        }
        let n = flat.len();
        self.params.flat = dev.tensor_from_vec(flat, (n,));
    }

    /// Selects what is trained: nothing, fresh LoRA adapters (A Kaiming-uniform as peft
    /// initialises it, `U(-1/sqrt(in), 1/sqrt(in))`, B = 0; replaces existing adapters), or all weights.
    pub fn set_trainable(&mut self, what: Trainable, seed: u64) -> Result<(), ModelError> {
        self.freeze_all();
        match &what {
            Trainable::None => {}
            Trainable::Full => self.make_flat(|_| true),
            Trainable::Lora(lc) => {
                if lc.r == 0 {
                    return Err(ModelError::Lora("r must be positive".into()));
                }
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let mut host = HostTensors::new();
                for l in 0..self.cfg.num_hidden_layers {
                    for &p in &lc.targets {
                        let (o, i, _) = proj_dims(&self.cfg, p);
                        let bound = 1.0 / (i as f32).sqrt();
                        let a: Vec<f32> = (0..lc.r * i).map(|_| rng.gen_range(-bound..bound)).collect();
                        let (an, bn) = peft_names(l, p);
                        host.insert(an, HostTensor::new(vec![lc.r, i], a));
                        host.insert(bn, HostTensor::new(vec![o, lc.r], vec![0.0; o * lc.r]));
                    }
                }
                self.install_lora(lc.clone(), &host)?;
                self.make_flat(|p| p.name.contains(".lora_"));
            }
        }
        self.trainable = what;
        Ok(())
    }

    /// Loads a peft adapter (`adapter_config.json` + `adapter_model.safetensors`) and makes its
    /// weights the trainable collection.
    pub fn load_peft_adapter(&mut self, dir: &Path) -> Result<(), ModelError> {
        let (cfg, tensors) = checkpoint::load_peft_adapter(dir)?;
        let lc = LoraConfig::from_peft_json(&cfg)?;
        self.load_lora_host(lc, &tensors)
    }

    /// Installs given adapter weights (peft names) and makes them the trainable collection.
    pub fn load_lora_host(&mut self, lc: LoraConfig, tensors: &HostTensors) -> Result<(), ModelError> {
        self.freeze_all();
        self.install_lora(lc.clone(), tensors)?;
        self.make_flat(|p| p.name.contains(".lora_"));
        self.trainable = Trainable::Lora(lc);
        Ok(())
    }

    fn install_lora(&mut self, lc: LoraConfig, tensors: &HostTensors) -> Result<(), ModelError> {
        let mut used = 0usize;
        let dev = self.dev.clone();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (k, p) in Proj::ALL.into_iter().enumerate() {
                layer.lins[k].lora = None;
                if !lc.targets.contains(&p) {
                    continue;
                }
                let (o, i, _) = proj_dims(&self.cfg, p);
                let (an, bn) = peft_names(l, p);
                let get = |name: &str, shape: Vec<usize>| -> Result<Param<D>, ModelError> {
                    let t = tensors.get(name).ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })?;
                    if t.shape != shape {
                        return Err(ModelError::ShapeMismatch {
                            name: name.to_string(),
                            got: t.shape.clone(),
                            expected: shape,
                            field: "r".into(),
                        });
                    }
                    Ok(Param::new(
                        name.to_string(),
                        t.shape.clone(),
                        Store::Frozen(dev.tensor_from_vec(t.data.clone(), (t.data.len(),))),
                    ))
                };
                let a = get(&an, vec![lc.r, i])?;
                let b = get(&bn, vec![o, lc.r])?;
                layer.lins[k].lora = Some((a, b));
                used += 2;
            }
        }
        if used != tensors.len() {
            let known: Vec<String> = (0..self.cfg.num_hidden_layers)
                .flat_map(|l| {
                    lc.targets.iter().flat_map(move |&p| {
                        let (a, b) = peft_names(l, p);
                        [a, b]
                    })
                })
                .collect();
            if let Some(extra) = tensors.keys().find(|k| !known.contains(k)) {
                return Err(ModelError::UnexpectedTensor {
                    name: extra.clone(),
                    arch: format!("LoRA adapter on {}", self.cfg.arch),
                });
            }
        }
        self.lora = Some(lc);
        self.adapters_enabled = true;
        Ok(())
    }

    /// Turns the LoRA adapters off (the base model, e.g. DPO's reference) or back on.
    pub fn set_adapters_enabled(&mut self, on: bool) {
        self.adapters_enabled = on;
    }
    pub fn adapters_enabled(&self) -> bool {
        self.adapters_enabled
    }

    /// Folds the adapters into the base weights, `W' = W + (alpha/r)·B·A`, and removes them.
    pub fn merge_lora(&mut self) -> Result<(), ModelError> {
        let Some(lc) = self.lora.clone() else {
            return Err(ModelError::Lora("the model has no adapters to merge".into()));
        };
        self.freeze_all();
        let s = lc.scale();
        for layer in &mut self.layers {
            for lin in &mut layer.lins {
                if let Some((a, b)) = lin.lora.take() {
                    let (r, i) = (a.shape[0], a.shape[1]);
                    let o = b.shape[0];
                    let (Store::Frozen(at), Store::Frozen(bt), Store::Frozen(wt)) = (&a.store, &b.store, &lin.w.store)
                    else {
                        unreachable!("freeze_all ran first")
                    };
                    let ba = bt.clone().reshape_like(&(o, r)).matmul(at.clone().reshape_like(&(r, i)));
                    let w2 = wt.clone().reshape_like(&(o, i)) + ba * s;
                    lin.w.set_store(Store::Frozen(w2.reshape_like(&(o * i,))));
                }
            }
        }
        self.lora = None;
        Ok(())
    }

    /// Base weights under their HF names (adapters excluded; merge first to include them).
    pub fn to_host(&self) -> HostTensors {
        self.all_params()
            .into_iter()
            .filter(|p| !p.name.contains(".lora_"))
            .map(|p| (p.name.clone(), HostTensor::new(p.shape.clone(), self.host_of(p))))
            .collect()
    }

    /// Adapter weights under peft's names (`base_model.model.<module>.lora_A.weight`).
    pub fn lora_to_host(&self) -> HostTensors {
        self.all_params()
            .into_iter()
            .filter(|p| p.name.contains(".lora_"))
            .map(|p| (p.name.clone(), HostTensor::new(p.shape.clone(), self.host_of(p))))
            .collect()
    }

    /// Writes `config.json` + `model.safetensors` (transformers' `from_pretrained` layout).
    pub fn save_pretrained(&self, dir: &Path) -> Result<(), ModelError> {
        checkpoint::save_hf_folder(dir, &self.cfg, &self.to_host())
    }

    /// Writes peft's `adapter_config.json` + `adapter_model.safetensors`.
    pub fn save_adapter(&self, dir: &Path, base_model: &str) -> Result<(), ModelError> {
        let lc = self.lora.as_ref().ok_or_else(|| ModelError::Lora("the model has no adapters to save".into()))?;
        let cfg = serde_json::to_string_pretty(&lc.to_peft_json(base_model)).expect("json");
        checkpoint::write_atomic(&dir.join("adapter_config.json"), cfg.as_bytes())?;
        checkpoint::write_safetensors(&dir.join("adapter_model.safetensors"), &self.lora_to_host())
    }

    // ---------------------------------------------------------------- forward

    fn fetch<T: Tape<f32, D>>(&self, p: &Param<D>) -> T1<D, T> {
        match &p.store {
            Store::Frozen(t) => t.retaped::<T>(),
            Store::Flat(off) => self.params.flat.retaped::<T>().slice((*off..*off + p.numel(),)),
        }
    }
    /// A matrix `[o, i]` with typed dimensions (its shape was checked against the config, and the
    /// config against `S`, at construction).
    fn fetch2<O: Dim, I: Dim, T: Tape<f32, D>>(&self, p: &Param<D>, o: O, i: I) -> Tensor<(O, I), f32, D, T> {
        debug_assert_eq!(p.shape, [o.size(), i.size()], "{}", p.name);
        self.fetch::<T>(p).reshape_like(&(o, i))
    }

    /// `x Wᵀ` for a weight `W: [out, in]`: dfdx's matmul, or on the CPU without a gradient tape
    /// and with few rows (decoding), [`host_matmul_wt`] on a host copy of the frozen weight.
    fn matmul_wt<I: Dim, O: Dim, T: Tape<f32, D> + Merge<T>>(
        &self,
        x: Rows<I, D, T>,
        p: &Param<D>,
        out: O,
    ) -> Rows<O, D, T> {
        let (n, inp) = *x.shape();
        if !T::OWNS_TAPE
            && n <= HOST_MATMUL_MAX_ROWS
            && p.numel() >= HOST_MATMUL_MIN_WEIGHT
            && TypeId::of::<D>() == TypeId::of::<Cpu>()
            && host_matmul_on()
        {
            if let Store::Frozen(t) = &p.store {
                let w = p.host.0.get_or_init(|| Arc::new(t.as_vec()));
                let y = host_matmul_wt(&x.as_vec(), n, w, out.size());
                // no tape is recorded (`!OWNS_TAPE`): the result starts a fresh one of type T
                return self.dev.tensor_from_vec(y, (n, out)).retaped::<T>();
            }
        }
        let w = self.fetch2::<O, I, T>(p, out, inp);
        x.matmul(w.permute::<(I, O), Axes2<1, 0>>())
    }

    /// `x Wᵀ + b (+ (alpha/r)·(x Aᵀ) Bᵀ)`: `[tokens, I]` → `[tokens, O]`.
    fn linear<I: Dim, O: Dim, T: Tape<f32, D> + Merge<T>>(
        &self,
        x: Rows<I, D, T>,
        lin: &Lin<D>,
        out: O,
        dropout: Option<u64>,
    ) -> Rows<O, D, T> {
        let (n, inp) = *x.shape();
        let lora_in = match (&lin.lora, self.adapters_enabled) {
            (Some(ab), true) => {
                let xa = x.with_empty_tape();
                let p = self.lora.as_ref().map_or(0.0, |l| l.dropout);
                let xa = match dropout {
                    Some(seed) if p > 0.0 => {
                        let mask = dropout_mask(n * inp.size(), p, seed);
                        xa * self.dev.tensor_from_vec(mask, (n, inp)).retaped::<T>()
                    }
                    _ => xa,
                };
                Some((xa, ab))
            }
            _ => None,
        };
        let mut y = self.matmul_wt(x, &lin.w, out);
        if let Some(b) = &lin.b {
            y = y + self.fetch::<T>(b).reshape_like(&(out,)).broadcast_like::<_, Axis<0>>(&(n, out));
        }
        if let Some((xa, (a, b))) = lora_in {
            let s = self.lora.as_ref().map_or(1.0, LoraConfig::scale);
            let r = a.shape[0];
            let a = self.fetch2::<usize, I, T>(a, r, inp);
            let b = self.fetch2::<O, usize, T>(b, out, r);
            let z = xa.matmul(a.permute::<(I, usize), Axes2<1, 0>>()).matmul(b.permute::<(usize, O), Axes2<1, 0>>());
            y = y + z * s;
        }
        y
    }

    fn rms_norm<X: Dim, T: Tape<f32, D> + Merge<T>>(&self, x: Rows<X, D, T>, w: &Param<D>) -> Rows<X, D, T> {
        let (n, h) = *x.shape();
        let ms = x.with_empty_tape().square().mean::<(usize,), Axis<1>>();
        let inv = (ms + self.cfg.rms_norm_eps as f32).sqrt().recip().broadcast_like::<_, Axis<1>>(&(n, h));
        let w = self.fetch::<T>(w).reshape_like(&(h,)).broadcast_like::<_, Axis<0>>(&(n, h));
        x * inv * w
    }

    /// Rotary embedding on `[tokens, heads * head_dim]` with per-token `cos`/`sin` `[tokens, head_dim]`.
    fn rope<H: Dim, X: Dim, T: Tape<f32, D> + Merge<T>>(
        &self,
        x: Rows<X, D, T>,
        heads: H,
        cos: &Rows<S::HeadDim, D, NoneTape>,
        sin: &Rows<S::HeadDim, D, NoneTape>,
    ) -> Rows<X, D, T> {
        let (n, width) = *x.shape();
        let hd = self.dims.head_dim;
        let x3 = x.reshape_like(&(n, heads, hd));
        let rot = x3
            .with_empty_tape()
            .reshape_like(&(n * heads.size(), hd))
            .matmul(self.rot.clone())
            .reshape_like(&(n, heads, hd));
        let c = cos.clone().broadcast_like::<_, Axis<1>>(&(n, heads, hd));
        let s = sin.clone().broadcast_like::<_, Axis<1>>(&(n, heads, hd));
        (x3 * c + rot * s).reshape_like(&(n, width))
    }

    /// Core forward: the final hidden states `[tokens, hidden]` of every token.
    /// `dropout`: a training forward's seed for the LoRA dropout masks (`None`: no dropout).
    fn hidden<T: Tape<f32, D> + Merge<T>>(
        &self,
        batch: &Batch,
        mut cache: Option<&mut KvCache<D, S>>,
        tape: T,
        dropout: Option<u64>,
    ) -> Result<Rows<S::Hidden, D, T>, ModelError> {
        // One mask seed per (layer, projection), derived from the forward's seed.
        let drop = |layer: usize, proj: u64| dropout.map(|seed| mix_seed(seed, layer as u64 * 8 + proj));
        let cfg = &self.cfg;
        let (b, s) = (batch.batch, batch.seq);
        let n = b * s;
        let DimValues { hidden: h, intermediate, heads: nq, kv_heads: nkv, head_dim: hd, q_dim, kv_dim } = self.dims;
        let hds = hd.size();
        for (pos, &id) in batch.ids.iter().enumerate() {
            if id as usize >= cfg.vocab_size {
                return Err(ModelError::TokenOutOfRange { id, pos, vocab: cfg.vocab_size });
            }
        }
        if let Some(c) = cache.as_deref() {
            if !c.key_mask.is_empty() && c.key_mask.len() != b {
                return Err(ModelError::Batch(format!("the KV cache holds {} rows, the batch {b}", c.key_mask.len())));
            }
        }
        // positions, key mask, additive attention mask
        let past = cache.as_deref().map_or(0, KvCache::len);
        let skv = past + s;
        let mut positions = vec![0usize; n];
        let mut keymask: Vec<Vec<bool>> = Vec::with_capacity(b);
        for r in 0..b {
            let (mut next, mut km) = match cache.as_deref() {
                Some(c) if !c.key_mask.is_empty() => (c.next_pos[r], c.key_mask[r].clone()),
                _ => (0, Vec::new()),
            };
            for t in 0..s {
                let m = batch.mask[r * s + t];
                positions[r * s + t] = next.saturating_sub(usize::from(!m));
                if m {
                    next += 1;
                }
                km.push(m);
            }
            if let Some(c) = cache.as_deref_mut() {
                if c.next_pos.len() < b {
                    c.next_pos.resize(b, 0);
                }
                c.next_pos[r] = next;
            }
            keymask.push(km);
        }
        let mut mask_add = vec![MASKED; b * s * skv];
        for r in 0..b {
            for t in 0..s {
                let qpos = past + t;
                for j in 0..=qpos {
                    if keymask[r][j] {
                        mask_add[(r * s + t) * skv + j] = 0.0;
                    }
                }
            }
        }
        if let Some(c) = cache.as_deref_mut() {
            c.key_mask = keymask;
            if c.layers.len() != cfg.num_hidden_layers {
                c.layers = vec![None; cfg.num_hidden_layers];
            }
        }
        let mask: T3<D, NoneTape> = self.dev.tensor_from_vec(mask_add, (b, s, skv));
        let half = hds / 2;
        let mut cos = vec![0f32; n * hds];
        let mut sin = vec![0f32; n * hds];
        for (k, &p) in positions.iter().enumerate() {
            for i in 0..half {
                let inv = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / hds as f64);
                let a = p as f64 * inv;
                let (sn, cs) = a.sin_cos();
                cos[k * hds + i] = cs as f32;
                cos[k * hds + i + half] = cs as f32;
                sin[k * hds + i] = sn as f32;
                sin[k * hds + i + half] = sn as f32;
            }
        }
        let cos: Rows<S::HeadDim, D, NoneTape> = self.dev.tensor_from_vec(cos, (n, hd));
        let sin: Rows<S::HeadDim, D, NoneTape> = self.dev.tensor_from_vec(sin, (n, hd));

        // embedding
        let ids: Tensor<(usize,), usize, D> =
            self.dev.tensor_from_vec(batch.ids.iter().map(|&i| i as usize).collect(), (n,));
        let v_rows = cfg.vocab_size;
        let mut x: Rows<S::Hidden, D, T> = match &self.embed.store {
            Store::Frozen(e) => e.clone().reshape_like(&(v_rows, h)).gather(ids).put_tape(tape),
            Store::Flat(_) => {
                let (x, t0) = self.fetch2::<usize, S::Hidden, T>(&self.embed, v_rows, h).gather(ids).split_tape();
                x.put_tape(t0.merge(tape))
            }
        };
        let scale = 1.0 / (hds as f32).sqrt();
        let rep = nq.size() / nkv.size();
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = self.rms_norm(x.with_empty_tape(), &layer.input_norm);
            let q = self.linear(xn.with_empty_tape(), &layer.lins[0], q_dim, drop(li, 0));
            let k = self.linear(xn.with_empty_tape(), &layer.lins[1], kv_dim, drop(li, 1));
            let v = self.linear(xn, &layer.lins[2], kv_dim, drop(li, 2));
            let q = self.rope(q, nq, &cos, &sin);
            let k = self.rope(k, nkv, &cos, &sin);
            // Grouped-query attention without repeating K/V: query head `j * rep + r` uses KV head
            // `j` (transformers' `repeat_kv`), so the `rep` query heads of one KV head are stacked
            // along the query axis, [b, nkv, rep * s, hd]. (Repeating K/V by broadcast + reshape
            // trains wrongly on CUDA: dfdx 0.13's reshape backward visits only as many elements as
            // the broadcast input stores, so K/V gradients lose all but 1/rep of their terms.)
            let q =
                q.reshape_like(&(b, s, nq, hd)).permute::<_, Axes4<0, 2, 1, 3>>().reshape_like(&(b, nkv, rep * s, hd));
            let mut k: Kv<S, D, T> = k.reshape_like(&(b, s, nkv, hd)).permute::<_, Axes4<0, 2, 1, 3>>();
            let mut v: Kv<S, D, T> = v.reshape_like(&(b, s, nkv, hd)).permute::<_, Axes4<0, 2, 1, 3>>();
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = c.layers[li].take() {
                    k = (pk.retaped::<T>(), k).concat_along(Axis::<2>);
                    v = (pv.retaped::<T>(), v).concat_along(Axis::<2>);
                } else {
                    k = k.contiguous();
                    v = v.contiguous();
                }
                c.layers[li] = Some((k.retaped::<NoneTape>(), v.retaped::<NoneTape>()));
            }
            let scores = q.matmul(k.permute::<_, Axes4<0, 1, 3, 2>>()) * scale;
            let scores = scores.reshape_like(&(b, nkv, rep, s, skv))
                + mask.clone().broadcast_like::<_, Axes2<1, 2>>(&(b, nkv, rep, s, skv));
            let probs = scores.softmax::<Axis<4>>().reshape_like(&(b, nkv, rep * s, skv));
            let att = probs
                .matmul(v)
                .reshape_like(&(b, nq, s, hd))
                .permute::<_, Axes4<0, 2, 1, 3>>()
                .reshape_like(&(n, q_dim));
            let o = self.linear(att, &layer.lins[3], h, drop(li, 3));
            x = x + o;
            let xn = self.rms_norm(x.with_empty_tape(), &layer.post_norm);
            let g = self.linear(xn.with_empty_tape(), &layer.lins[4], intermediate, drop(li, 4));
            let u = self.linear(xn, &layer.lins[5], intermediate, drop(li, 5));
            let act = g.with_empty_tape().sigmoid() * g;
            let m = self.linear(act * u, &layer.lins[6], h, drop(li, 6));
            x = x + m;
        }
        Ok(self.rms_norm(x, &self.norm))
    }

    fn head<T: Tape<f32, D> + Merge<T>>(&self, hs: Rows<S::Hidden, D, T>) -> T2<D, T> {
        self.matmul_wt(hs, self.lm_head.as_ref().unwrap_or(&self.embed), self.cfg.vocab_size)
    }

    /// Logits `[batch, seq, vocab]` with whatever tape `tape` is (`NoneTape` for inference).
    pub fn forward_with_tape<T: Tape<f32, D> + Merge<T>>(
        &self,
        batch: &Batch,
        tape: T,
    ) -> Result<T3<D, T>, ModelError> {
        self.forward_train(batch, tape, None)
    }

    /// Logits of a training forward: with `dropout_seed`, the LoRA branches apply the adapters'
    /// `lora_dropout` with masks drawn from that seed (one per layer and projection), so a step
    /// replayed with the same seed (a resumed run) draws the same masks. `None`: no dropout.
    pub fn forward_train<T: Tape<f32, D> + Merge<T>>(
        &self,
        batch: &Batch,
        tape: T,
        dropout_seed: Option<u64>,
    ) -> Result<T3<D, T>, ModelError> {
        let hs = self.hidden(batch, None, tape, dropout_seed)?;
        let logits = self.head(hs);
        Ok(logits.reshape_like(&(batch.batch, batch.seq, self.cfg.vocab_size)))
    }

    /// Inference logits `[batch, seq, vocab]`.
    pub fn forward(&self, batch: &Batch) -> Result<T3<D, NoneTape>, ModelError> {
        self.forward_with_tape(batch, NoneTape)
    }

    /// Training logits: gradients (from `self.params.alloc_grads()`) flow to [`Self::params`] only.
    pub fn forward_traced(
        &self,
        batch: &Batch,
        grads: Gradients<f32, D>,
    ) -> Result<T3<D, OwnedTape<f32, D>>, ModelError> {
        let (_, tape) = self.params.flat.trace(grads).split_tape();
        self.forward_with_tape(batch, tape)
    }

    /// A fresh, empty KV cache.
    pub fn new_cache(&self) -> KvCache<D, S> {
        KvCache { layers: vec![None; self.cfg.num_hidden_layers], key_mask: Vec::new(), next_pos: Vec::new() }
    }

    /// Incremental decoding step: appends `batch` to `cache` and returns the logits of each row's
    /// last position, `[batch][vocab]` on the host.
    pub fn forward_cached(&self, batch: &Batch, cache: &mut KvCache<D, S>) -> Result<Vec<Vec<f32>>, ModelError> {
        let hs = self.hidden(batch, Some(cache), NoneTape, None)?;
        let (b, s) = (batch.batch, batch.seq);
        let last: Tensor<(usize,), usize, D> = self.dev.tensor_from_vec((0..b).map(|r| r * s + s - 1).collect(), (b,));
        let logits = self.head(hs.gather(last));
        let v = self.cfg.vocab_size;
        let flat = logits.as_vec();
        Ok(flat.chunks(v).map(<[f32]>::to_vec).collect())
    }
}

/// peft's tensor names for the adapters of one projection.
pub fn peft_names(layer: usize, p: Proj) -> (String, String) {
    let base = format!("base_model.model.model.layers.{layer}.{}.{}", p.parent(), p.hf_name());
    (format!("{base}.lora_A.weight"), format!("{base}.lora_B.weight"))
}

/// Which architecture a tensor set looks like (biases on q → Qwen2).
pub fn guess_arch(tensors: &HostTensors) -> Arch {
    if tensors.contains_key("model.layers.0.self_attn.q_proj.bias") {
        Arch::Qwen2
    } else {
        Arch::Llama
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_mask_is_inverted_dropout() {
        let m = dropout_mask(200_000, 0.25, 3);
        let zeros = m.iter().filter(|&&x| x == 0.0).count() as f64 / m.len() as f64;
        assert!((zeros - 0.25).abs() < 0.005, "{zeros}");
        assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
        let mean = m.iter().map(|&x| x as f64).sum::<f64>() / m.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        assert_eq!(m, dropout_mask(200_000, 0.25, 3));
        assert_ne!(m, dropout_mask(200_000, 0.25, 4));
    }

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
        // peft's adapter_config.json carries it
        let lc = LoraConfig::all_linear(8, 32.0).with_dropout(0.05).unwrap();
        assert_eq!(LoraConfig::from_peft_json(&lc.to_peft_json("base")).unwrap(), lc);
        assert!(LoraConfig::all_linear(8, 32.0).with_dropout(1.0).unwrap_err().to_string().contains("lora_dropout"));
    }

    #[test]
    fn host_matmul_matches_a_f64_reference() {
        // k not a multiple of 16; out * k above the threading threshold
        for (n, k, out) in [(1, 37, 5), (1, 601, 2000), (3, 100, 40)] {
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
            let w: Vec<f32> = (0..out * k).map(|i| ((i * 104_729) % 89) as f32 / 89.0 - 0.5).collect();
            let y = host_matmul_wt(&x, n, &w, out);
            for r in 0..n {
                for j in 0..out {
                    let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
                    let got = y[r * out + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "[{n},{k},{out}] ({r},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The tiny preset with a 4,096-row head: the cached batch-1 step takes the host product for
    /// the head (262,144 elements), the full forward dfdx's gemm.
    #[test]
    fn host_path_decoding_matches_the_full_forward() {
        let dev = Cpu::default();
        let cfg = ModelConfig::tiny(4096);
        let m = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 4), &dev).unwrap();
        assert!(m.embed.numel() >= HOST_MATMUL_MIN_WEIGHT);
        let p: Vec<u32> = vec![17, 4000, 3, 999, 64];
        let full = m.forward(&Batch::new(p.clone(), 1, 5).unwrap()).unwrap().as_vec();
        let mut cache = m.new_cache();
        m.forward_cached(&Batch::new(p[..4].to_vec(), 1, 4).unwrap(), &mut cache).unwrap();
        let last = m.forward_cached(&Batch::new(p[4..].to_vec(), 1, 1).unwrap(), &mut cache).unwrap();
        assert!(m.embed.host.0.get().is_some(), "the host path was taken");
        let want = &full[4 * 4096..];
        let worst = last[0].iter().zip(want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(worst <= 1e-5, "{worst}");
    }
}
