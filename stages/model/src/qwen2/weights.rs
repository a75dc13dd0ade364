//! How a [`Qwen2`]'s weights are bound, stored and exported: building from HF-named host tensors
//! (every name and shape checked against the config), random initialisation, what is trained
//! ([`Trainable`]: nothing, LoRA adapters, every weight — moved in and out of the one
//! [`FlatParams`] vector), peft adapters (install, merge), and saving.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::layers::{Attention, DecoderLayer, Mlp, RmsNorm};
use super::{rot_matrix, Qwen2, Trainable};
use crate::checkpoint;
use crate::config::{Arch, ModelConfig};
use crate::dims::{DimValues, Dims};
use crate::error::ModelError;
use crate::host::{HostTensor, HostTensors};
use crate::linear::{Adapter, Linear};
use crate::lora::{peft_names, LoraConfig, Proj};
use crate::params::{FlatParams, FrozenDtype, Param, Store};
use crate::QMatrix;

pub(crate) fn hf_names(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, &'static str)> {
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

/// The tensor name of a sequence-classification head, `[num_labels, hidden]` (transformers'
/// `Qwen2ForSequenceClassification.score`, no bias).
pub const SEQ_CLS_HEAD: &str = "score.weight";

impl<D: Device<f32>, S: Dims> Qwen2<D, S> {
    /// [`Qwen2::from_host`] with dimension types `S`: the config is also checked against `S`
    /// (e.g. `Qwen2::<Cpu, TinyDims>::from_host_with_dims(&ModelConfig::tiny(v), ..)`); a
    /// mismatch is an error naming the config field.
    pub fn from_host_with_dims(cfg: &ModelConfig, tensors: &HostTensors, dev: &D) -> Result<Self, ModelError> {
        Self::from_host_with_dtype(cfg, tensors, dev, FrozenDtype::F32)
    }

    /// [`Qwen2::from_host_with_dims`] holding the frozen matrices in `dtype` on the device: with
    /// bf16 on CUDA each matrix is rounded on the host and uploaded as bf16, so no f32 copy of the
    /// model ever exists on the device ([`Qwen2::set_frozen_dtype`] converts a loaded model).
    pub fn from_host_with_dtype(
        cfg: &ModelConfig,
        tensors: &HostTensors,
        dev: &D,
        dtype: FrozenDtype,
    ) -> Result<Self, ModelError> {
        Self::from_parts(cfg, tensors, &BTreeMap::new(), &BTreeMap::new(), dev, dtype)
    }

    /// Reads a Hugging Face folder with the frozen matrices in `dtype`: for bf16 on CUDA they are
    /// read as bf16 bits ([`checkpoint::load_hf_folder_bf16`]) and uploaded as they are, so
    /// neither the host nor the device ever holds an f32 copy of the model (a 7B checkpoint is
    /// 15 GB in bf16 against 30 GB in f32). Elsewhere this is [`Qwen2::load_hf_with_dims`].
    pub fn load_hf_with_dtype(dir: &std::path::Path, dev: &D, dtype: FrozenDtype) -> Result<Self, ModelError> {
        let bf16 = dtype == FrozenDtype::Bf16 && !crate::kernels::is_cpu::<D>();
        let ck = if bf16 { checkpoint::load_hf_folder_bf16(dir)? } else { checkpoint::load_hf_folder(dir)? };
        Self::from_parts(&ck.config, &ck.tensors, &BTreeMap::new(), &ck.bf16, dev, dtype)
    }

    /// [`Qwen2::from_host_with_dims`] with some matrices in quantised GGUF blocks (`quantized`,
    /// HF names; each name in `tensors` or `quantized`): they stay quantised
    /// ([`crate::params::Store::Quant`]) and products through them run on the block kernels
    /// (CPU inference; a taped product or another device multiplies through a dequantised copy).
    pub fn from_host_quantized_with_dims(
        cfg: &ModelConfig,
        tensors: &HostTensors,
        quantized: &BTreeMap<String, QMatrix>,
        dev: &D,
    ) -> Result<Self, ModelError> {
        Self::from_parts(cfg, tensors, quantized, &BTreeMap::new(), dev, FrozenDtype::F32)
    }

    /// The model from its tensors: `tensors` in f32, some matrices in quantised blocks
    /// (`quantized`) or as bf16 bits (`bf16`); each name in exactly one of them.
    fn from_parts(
        cfg: &ModelConfig,
        tensors: &HostTensors,
        quantized: &BTreeMap<String, QMatrix>,
        bf16: &BTreeMap<String, checkpoint::Bf16Host>,
        dev: &D,
        dtype: FrozenDtype,
    ) -> Result<Self, ModelError> {
        let dims = DimValues::<S>::from_config(cfg)?;
        let expected = hf_names(cfg);
        let mut known: BTreeMap<&str, ()> = BTreeMap::new();
        for (name, shape, field) in &expected {
            known.insert(name.as_str(), ());
            if let Some(q) = quantized.get(name) {
                if &q.shape() != shape {
                    return Err(ModelError::ShapeMismatch {
                        name: name.clone(),
                        got: q.shape(),
                        expected: shape.clone(),
                        field: field.to_string(),
                    });
                }
                continue;
            }
            if let Some(b) = bf16.get(name) {
                if &b.shape != shape || b.bits.len() != shape.iter().product::<usize>() {
                    return Err(ModelError::ShapeMismatch {
                        name: name.clone(),
                        got: b.shape.clone(),
                        expected: shape.clone(),
                        field: field.to_string(),
                    });
                }
                continue;
            }
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
        for name in tensors.keys().chain(quantized.keys()).chain(bf16.keys()) {
            // `score.weight`: the head of a sequence-classification folder (transformers'
            // `Qwen2ForSequenceClassification`, the `sft` stage's `task_type = "seq_cls"`), which
            // is not part of the decoder; `pipeline_train::cls` reads it.
            let ignorable = name.ends_with("rotary_emb.inv_freq")
                || (cfg.tie_word_embeddings && name == "lm_head.weight")
                || name == SEQ_CLS_HEAD;
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
        // a matrix in `dtype`, or in its quantised blocks
        let matrix = |name: &str| -> Result<Param<D>, ModelError> {
            if let Some(q) = quantized.get(name) {
                return Ok(Param::new(name.to_string(), q.shape(), Store::Quant(Arc::new(q.clone()))));
            }
            if let Some(b) = bf16.get(name) {
                #[cfg(feature = "cuda")]
                if let (FrozenDtype::Bf16, Some(cuda)) = (dtype, (dev as &dyn std::any::Any).downcast_ref::<Cuda>()) {
                    let w = crate::params::Bf16Weight::from_bits(cuda, &b.bits)
                        .map_err(|e| ModelError::Kernel(format!("uploading `{name}` as bf16: {e}")))?;
                    return Ok(Param::new(name.to_string(), b.shape.clone(), Store::FrozenBf16(w)));
                }
                let data: Vec<f32> = b.bits.iter().map(|&x| f32::from_bits(u32::from(x) << 16)).collect();
                let t = dev.tensor_from_vec(data, (b.bits.len(),));
                return Ok(Param::new(name.to_string(), b.shape.clone(), Store::Frozen(t)));
            }
            #[cfg(feature = "cuda")]
            if let (FrozenDtype::Bf16, Some(cuda)) = (dtype, (dev as &dyn std::any::Any).downcast_ref::<Cuda>()) {
                let t = &tensors[name];
                let w = crate::params::Bf16Weight::from_host(cuda, &t.data)
                    .map_err(|e| ModelError::Kernel(format!("uploading `{name}` as bf16: {e}")))?;
                return Ok(Param::new(name.to_string(), t.shape.clone(), Store::FrozenBf16(w)));
            }
            let _ = dtype;
            Ok(frozen(name))
        };
        let eps = cfg.rms_norm_eps as f32;
        let norm = |name: &str| RmsNorm { weight: frozen(name), eps };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let lin = |proj: Proj| -> Result<Linear<D>, ModelError> {
                let base = format!("{p}.{}.{}", proj.parent(), proj.hf_name());
                let bias = (cfg.attention_bias && matches!(proj, Proj::Q | Proj::K | Proj::V))
                    .then(|| frozen(&format!("{base}.bias")));
                let salt = l as u64 * 8 + Proj::ALL.iter().position(|&x| x == proj).expect("a projection") as u64;
                Ok(Linear { weight: matrix(&format!("{base}.weight"))?, bias, lora: None, salt })
            };
            layers.push(DecoderLayer {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight")),
                self_attn: Attention {
                    q_proj: lin(Proj::Q)?,
                    k_proj: lin(Proj::K)?,
                    v_proj: lin(Proj::V)?,
                    o_proj: lin(Proj::O)?,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight")),
                mlp: Mlp { gate_proj: lin(Proj::Gate)?, up_proj: lin(Proj::Up)?, down_proj: lin(Proj::Down)? },
            });
        }
        Ok(Qwen2 {
            cfg: cfg.clone(),
            dims,
            dev: dev.clone(),
            embed_tokens: matrix("model.embed_tokens.weight")?,
            layers,
            norm: norm("model.norm.weight"),
            lm_head: (!cfg.tie_word_embeddings).then(|| matrix("lm_head.weight")).transpose()?,
            lora: None,
            adapters_enabled: true,
            trainable: Trainable::None,
            params: FlatParams { flat: dev.zeros_like(&(1,)) },
            rot: rot_matrix(dev, dims.head_dim),
            checkpointing: false,
            flash_attention: true,
            fused_mlp: true,
        })
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

    fn all_params_mut(&mut self) -> Vec<&mut Param<D>> {
        let mut v: Vec<&mut Param<D>> = vec![&mut self.embed_tokens];
        for l in &mut self.layers {
            let DecoderLayer { input_layernorm, self_attn, post_attention_layernorm, mlp } = l;
            v.push(&mut input_layernorm.weight);
            v.push(&mut post_attention_layernorm.weight);
            let Attention { q_proj, k_proj, v_proj, o_proj } = self_attn;
            let Mlp { gate_proj, up_proj, down_proj } = mlp;
            for lin in [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] {
                v.push(&mut lin.weight);
                if let Some(b) = &mut lin.bias {
                    v.push(b);
                }
                if let Some(ad) = &mut lin.lora {
                    v.push(&mut ad.a);
                    v.push(&mut ad.b);
                }
            }
        }
        v.push(&mut self.norm.weight);
        if let Some(h) = &mut self.lm_head {
            v.push(h);
        }
        v
    }

    fn all_params(&self) -> Vec<&Param<D>> {
        let mut v: Vec<&Param<D>> = vec![&self.embed_tokens];
        for l in &self.layers {
            v.push(&l.input_layernorm.weight);
            v.push(&l.post_attention_layernorm.weight);
            for p in Proj::ALL {
                let lin = l.linear(p);
                v.push(&lin.weight);
                if let Some(b) = &lin.bias {
                    v.push(b);
                }
                if let Some(ad) = &lin.lora {
                    v.push(&ad.a);
                    v.push(&ad.b);
                }
            }
        }
        v.push(&self.norm.weight);
        if let Some(h) = &self.lm_head {
            v.push(h);
        }
        v
    }

    /// Host copy of a parameter's values.
    fn host_of(&self, p: &Param<D>) -> Vec<f32> {
        match &p.store {
            Store::Frozen(t) => t.as_vec(),
            Store::FrozenBf16(w) => crate::params::bf16_to_host(w),
            Store::Quant(q) => q.dequantize(),
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
                    // trained weights are f32 (full fine-tuning of a bf16 base trains in f32)
                    Store::FrozenBf16(w) => crate::params::bf16_to_host(w),
                    // training from a quantised base trains its dequantised values
                    Store::Quant(q) => q.dequantize(),
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
            for p in Proj::ALL {
                layer.linear_mut(p).lora = None;
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
                layer.linear_mut(p).lora = Some(Adapter { a, b });
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
        let dev = self.dev.clone();
        for layer in &mut self.layers {
            for p in Proj::ALL {
                let lin = layer.linear_mut(p);
                if let Some(Adapter { a, b }) = lin.lora.take() {
                    let (r, i) = (a.shape[0], a.shape[1]);
                    let o = b.shape[0];
                    let (Store::Frozen(at), Store::Frozen(bt), Some(wt)) =
                        (&a.store, &b.store, lin.weight.frozen_f32(&dev))
                    else {
                        unreachable!("freeze_all ran first")
                    };
                    let was_bf16 = matches!(lin.weight.store, Store::FrozenBf16(_));
                    let ba = bt.clone().reshape_like(&(o, r)).matmul(at.clone().reshape_like(&(r, i)));
                    let w2 = (wt.reshape_like(&(o, i)) + ba * s).reshape_like(&(o * i,));
                    lin.weight.set_store(Store::Frozen(w2));
                    if was_bf16 {
                        // the merged weight goes back to the precision its base was held in
                        to_bf16_store(&mut lin.weight)?;
                    }
                }
            }
        }
        self.lora = None;
        Ok(())
    }

    /// Holds the frozen base matrices (projections, embedding, LM head) in `dtype` on the device:
    /// bf16 (`torch_dtype = "bfloat16"`) rounds each to bf16 on the device and frees its f32
    /// copy; products through them then run on tensor cores with f32 accumulation. Norm weights,
    /// biases and LoRA adapters stay f32, and trained (flat) weights are not touched. Only a CUDA
    /// device holds bf16 weights: on other devices this does nothing and returns `false`.
    pub fn set_frozen_dtype(&mut self, dtype: FrozenDtype) -> Result<bool, ModelError> {
        #[cfg(feature = "cuda")]
        if crate::kernels::is_cuda::<D>() {
            let dev = self.dev.clone();
            for p in self.all_params_mut() {
                match (&p.store, dtype) {
                    (Store::Frozen(_), FrozenDtype::Bf16) if p.shape.len() == 2 && !p.name.contains(".lora_") => {
                        to_bf16_store(p)?
                    }
                    (Store::FrozenBf16(_), FrozenDtype::F32) => {
                        let t = p.frozen_f32(&dev).expect("frozen");
                        p.set_store(Store::Frozen(t));
                    }
                    _ => {}
                }
            }
            return Ok(true);
        }
        let _ = dtype;
        Ok(false)
    }

    /// How many weights are held in quantised GGUF blocks (0 unless loaded with
    /// [`Qwen2::from_host_quantized`]).
    pub fn quantized_weights(&self) -> usize {
        self.all_params().iter().filter(|p| matches!(p.store, Store::Quant(_))).count()
    }

    /// The precision the frozen base matrices are held in.
    pub fn frozen_dtype(&self) -> FrozenDtype {
        let bf16 = self.all_params().iter().any(|p| matches!(p.store, Store::FrozenBf16(_)));
        if bf16 {
            FrozenDtype::Bf16
        } else {
            FrozenDtype::F32
        }
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

    /// [`Qwen2::save_pretrained`] in the precision the frozen base is held in: bf16 weights (and
    /// `"torch_dtype": "bfloat16"`) for a bf16 base, as transformers saves a model loaded with
    /// `torch_dtype=torch.bfloat16` — a 7B model is then 15 GB on disk, not 30 — and f32 otherwise.
    pub fn save_pretrained_native(&self, dir: &Path) -> Result<(), ModelError> {
        if self.frozen_dtype() != FrozenDtype::Bf16 {
            return self.save_pretrained(dir);
        }
        let mut cfg = self.cfg.to_hf_json();
        cfg["torch_dtype"] = "bfloat16".into();
        let text = serde_json::to_string_pretty(&cfg).expect("json");
        checkpoint::write_atomic(&dir.join("config.json"), text.as_bytes())?;
        crate::export::write_safetensors_as(
            &dir.join("model.safetensors"),
            &self.to_host(),
            crate::export::Dtype::Bfloat16,
        )
    }

    /// Writes peft's `adapter_config.json` + `adapter_model.safetensors`.
    pub fn save_adapter(&self, dir: &Path, base_model: &str) -> Result<(), ModelError> {
        let lc = self.lora.as_ref().ok_or_else(|| ModelError::Lora("the model has no adapters to save".into()))?;
        let cfg = serde_json::to_string_pretty(&lc.to_peft_json(base_model)).expect("json");
        checkpoint::write_atomic(&dir.join("adapter_config.json"), cfg.as_bytes())?;
        checkpoint::write_safetensors(&dir.join("adapter_model.safetensors"), &self.lora_to_host())
    }
}

/// Replaces a frozen f32 weight on the CUDA device by its bf16 rounding (a no-op elsewhere).
fn to_bf16_store<D: Device<f32>>(p: &mut Param<D>) -> Result<(), ModelError> {
    #[cfg(feature = "cuda")]
    if let Store::Frozen(t) = &p.store {
        if let Some(t) = crate::kernels::cast::<_, Tensor<(usize,), f32, Cuda>>(t.clone()) {
            let w = crate::params::Bf16Weight::from_device(&t)
                .map_err(|e| ModelError::Kernel(format!("`{}` to bf16: {e}", p.name)))?;
            p.set_store(Store::FrozenBf16(w));
        }
    }
    let _ = p;
    Ok(())
}

/// Which architecture a tensor set looks like (biases on q → Qwen2).
pub fn guess_arch(tensors: &HostTensors) -> Arch {
    if tensors.contains_key("model.layers.0.self_attn.q_proj.bias") {
        Arch::Qwen2
    } else {
        Arch::Llama
    }
}
