//! The training loop on pipeline-model's [`Qwen2`]: the trainable view ([`TrainModel`]), and
//! the objectives of the `pretrain` / `sft` stages ([`CausalLmObjective`]) and of the `align`
//! stage ([`DpoObjective`], [`KtoObjective`]) on already-tokenised data.
//!
//! Reference log-probabilities (DPO, KTO) are computed once before training
//! ([`precompute_dpo_reference`], [`precompute_kto_reference`]; TRL's
//! `precompute_ref_log_probs`): with LoRA the reference is the same model with its adapters
//! disabled, with full fine-tuning it is the initial weights. Only the policy runs during training.

use std::collections::BTreeMap;

use dfdx::nn::tensor_collection::{ModuleVisitor, TensorCollection};
use dfdx::prelude::*;
use pipeline_model::{Batch as ModelBatch, Dims, FlatParams, Proj, Qwen2, RuntimeDims, Trainable};

use crate::data::{Batch, Dataset};
use crate::objectives::{dpo_loss, kto_loss, masked_mean_nll, sequence_logprobs, DpoConfig, KtoConfig, PerToken};
use crate::trainer::{Objective, StepInfo};
use crate::{LmBatch, LossOutput, TrainError};

/// A [`Qwen2`] seen by the trainer: its trainable tensors are the model's
/// [`FlatParams`] (every weight, or the LoRA adapters alone, per `Qwen2::set_trainable`), named
/// `params.flat` in checkpoints; objectives reach the whole model through `.0`. Generic over the
/// model's dimension types `S` (`TinyDims` for the built-in preset, `RuntimeDims` by default).
pub struct TrainModel<D: Device<f32>, S: Dims = RuntimeDims>(pub Qwen2<D, S>);

impl<D: Device<f32>, S: Dims> TensorCollection<f32, D> for TrainModel<D, S> {
    type To<E2: Dtype, D2: Device<E2>> = FlatParams<E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(visitor: &mut V) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(Self::module("params", |s| &s.0.params, |s| &mut s.0.params), |p| p)
    }
}

fn model_err(e: pipeline_model::ModelError) -> TrainError {
    TrainError::Device(e.to_string())
}

fn model_batch(ids: &[usize], mask: &[f32], batch: usize, seq: usize) -> Result<ModelBatch, TrainError> {
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let mask: Vec<bool> = mask.iter().map(|&m| m > 0.0).collect();
    ModelBatch::with_mask(ids, mask, batch, seq).map_err(model_err)
}

/// `log p(target)` per token `[batch, seq]` of an [`LmBatch`] ([`Qwen2::forward_logprobs`]: the
/// fused LM head where it applies); positions outside the loss mask are 0 and get no gradient.
fn batch_logprobs<D: Device<f32>, S: Dims, T: Tape<f32, D>>(
    model: &Qwen2<D, S>,
    b: &LmBatch,
    tape: T,
    dropout_seed: Option<u64>,
) -> Result<PerToken<D, T>, TrainError> {
    let mb = model_batch(&b.input_ids, &b.attention_mask, b.batch, b.seq)?;
    let needed: Vec<bool> = b.loss_mask.iter().map(|&m| m != 0.0).collect();
    model.forward_logprobs(&mb, &b.targets, Some(&needed), tape, dropout_seed).map_err(model_err)
}

/// Per-element weight-decay flags for full fine-tuning: the flat vector holds every weight, and
/// transformers excludes biases and norm weights from decay ([`crate::optim::decays`]). The layout
/// is reconstructed from the model's parameter order and verified value by value against
/// `to_host()`; `None` when it cannot be (the caller then decays everything and says so).
pub fn full_decay_mask<D: Device<f32>, S: Dims>(model: &Qwen2<D, S>) -> Option<Vec<bool>> {
    if *model.trainable() != Trainable::Full {
        return None;
    }
    let host = model.to_host();
    let lora = model.lora_to_host();
    let mut order: Vec<String> = vec!["model.embed_tokens.weight".into()];
    for l in 0..model.cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        order.push(format!("{p}.input_layernorm.weight"));
        order.push(format!("{p}.post_attention_layernorm.weight"));
        for proj in Proj::ALL {
            let parent = if matches!(proj, Proj::Q | Proj::K | Proj::V | Proj::O) { "self_attn" } else { "mlp" };
            let base = format!("{p}.{parent}.{}", proj.hf_name());
            order.push(format!("{base}.weight"));
            if host.contains_key(&format!("{base}.bias")) {
                order.push(format!("{base}.bias"));
            }
            let (a, b) = pipeline_model::lora::peft_names(l, proj);
            if lora.contains_key(&a) {
                order.push(a);
                order.push(b);
            }
        }
    }
    order.push("model.norm.weight".into());
    if host.contains_key("lm_head.weight") {
        order.push("lm_head.weight".into());
    }
    let flat = model.params.flat.as_vec();
    let mut mask = Vec::with_capacity(flat.len());
    for name in &order {
        let t = host.get(name).or_else(|| lora.get(name))?;
        let off = mask.len();
        if flat.get(off..off + t.data.len())? != t.data.as_slice() {
            return None;
        }
        mask.extend(std::iter::repeat_n(crate::optim::decays(name), t.data.len()));
    }
    (mask.len() == flat.len()).then_some(mask)
}

/// Next-token cross-entropy on the labelled tokens of an [`LmBatch`] (pretraining: every token;
/// SFT: assistant tokens only). Weight decay follows [`full_decay_mask`] for full fine-tuning.
pub struct CausalLmObjective;

impl<D: Device<f32>, S: Dims> Objective<TrainModel<D, S>, D> for CausalLmObjective {
    type Batch = LmBatch;
    fn loss<T: Tape<f32, D>>(
        &mut self,
        model: &TrainModel<D, S>,
        b: &LmBatch,
        tape: T,
        info: &StepInfo,
    ) -> Result<LossOutput<D, T>, TrainError> {
        // LoRA dropout (the adapters' `lora_dropout`) in training forwards, masks from the step's seed.
        let lp = batch_logprobs(&model.0, b, tape, info.training.then_some(info.seed))?;
        Ok(LossOutput { loss: masked_mean_nll(lp, &b.loss_mask)?, metrics: vec![] })
    }
    fn weight_decay_masks(&self, model: &TrainModel<D, S>) -> BTreeMap<String, Vec<bool>> {
        full_decay_mask(&model.0).map(|m| [("params.flat".to_string(), m)].into()).unwrap_or_default()
    }
}

/// Rows of `prompt ++ completion`, truncated to `max_length`, with a loss mask on the completion
/// tokens that remain. Returns (ids, attention mask, targets, loss mask) of one padded block.
fn completion_rows(
    rows: &[(&[u32], &[u32])],
    pad: u32,
    max_length: usize,
) -> (usize, Vec<usize>, Vec<f32>, Vec<usize>, Vec<f32>) {
    let seqs: Vec<(Vec<u32>, usize)> = rows
        .iter()
        .map(|(p, c)| {
            let mut s: Vec<u32> = p.iter().chain(c.iter()).copied().collect();
            s.truncate(max_length);
            (s, p.len())
        })
        .collect();
    let seq = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(1).max(1);
    let n = rows.len();
    let (mut ids, mut att, mut tgt, mut lm) =
        (vec![pad as usize; n * seq], vec![0.0; n * seq], vec![pad as usize; n * seq], vec![0.0; n * seq]);
    for (r, (s, plen)) in seqs.iter().enumerate() {
        for t in 0..s.len() {
            ids[r * seq + t] = s[t] as usize;
            att[r * seq + t] = 1.0;
            if t + 1 < s.len() {
                tgt[r * seq + t] = s[t + 1] as usize;
                // Position t predicts token t+1, a completion token when t+1 >= prompt length.
                if t + 1 >= *plen {
                    lm[r * seq + t] = 1.0;
                }
            }
        }
    }
    (seq, ids, att, tgt, lm)
}

/// One preference pair, tokenised: the prompt (chat template up to the assistant turn) and the
/// two completions (assistant content + end-of-turn), with the reference log-probs once computed.
#[derive(Debug, Clone, PartialEq)]
pub struct PairExample {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// `log π_ref(chosen|prompt)`, `log π_ref(rejected|prompt)` (set by [`precompute_dpo_reference`]).
    pub reference: Option<(f32, f32)>,
}

/// DPO data: pairs, padded with `pad_id`, truncated to `max_length`.
#[derive(Debug, Clone)]
pub struct PairDataset {
    pub examples: Vec<PairExample>,
    pub pad_id: u32,
    pub max_length: usize,
}

/// `2n` rows: chosen completions first, then rejected ones, with their reference log-probs.
#[derive(Debug, Clone, PartialEq)]
pub struct PairBatch {
    pub lm: LmBatch,
    pub ref_logps: Vec<f32>,
}

impl Batch for PairBatch {
    fn loss_weight(&self) -> f64 {
        (self.lm.batch / 2) as f64
    }
    fn num_tokens(&self) -> usize {
        self.lm.n_tokens
    }
}

fn lm_batch(rows: &[(&[u32], &[u32])], pad: u32, max_length: usize) -> LmBatch {
    let (seq, input_ids, attention_mask, targets, loss_mask) = completion_rows(rows, pad, max_length);
    let n_targets = loss_mask.iter().filter(|&&m| m > 0.0).count();
    let n_tokens = attention_mask.iter().filter(|&&m| m > 0.0).count();
    LmBatch { batch: rows.len(), seq, input_ids, attention_mask, targets, loss_mask, n_targets, n_tokens }
}

impl PairDataset {
    fn rows(&self, indices: &[usize]) -> LmBatch {
        let mut rows: Vec<(&[u32], &[u32])> = Vec::with_capacity(indices.len() * 2);
        rows.extend(indices.iter().map(|&i| (&self.examples[i].prompt[..], &self.examples[i].chosen[..])));
        rows.extend(indices.iter().map(|&i| (&self.examples[i].prompt[..], &self.examples[i].rejected[..])));
        lm_batch(&rows, self.pad_id, self.max_length)
    }
}

impl Dataset for PairDataset {
    type Batch = PairBatch;
    fn len(&self) -> usize {
        self.examples.len()
    }
    fn example_len(&self, i: usize) -> usize {
        let e = &self.examples[i];
        (e.prompt.len() + e.chosen.len().max(e.rejected.len())).min(self.max_length)
    }
    fn collate(&self, indices: &[usize]) -> Result<PairBatch, TrainError> {
        let mut ref_logps = vec![0.0; indices.len() * 2];
        for (k, &i) in indices.iter().enumerate() {
            let (c, r) = self.examples[i]
                .reference
                .ok_or_else(|| TrainError::Data(format!("pair {i}: reference log-probs were not computed")))?;
            ref_logps[k] = c;
            ref_logps[indices.len() + k] = r;
        }
        Ok(PairBatch { lm: self.rows(indices), ref_logps })
    }
}

fn sequence_logps_no_grad<D: Device<f32>, S: Dims>(model: &Qwen2<D, S>, b: &LmBatch) -> Result<Vec<f32>, TrainError> {
    Ok(sequence_logprobs(batch_logprobs(model, b, NoneTape, None)?, &b.loss_mask)?.as_vec())
}

/// Run `f` with the model as the DPO/KTO reference: adapters off for LoRA, as-is otherwise.
fn with_reference<D: Device<f32>, S: Dims, R>(model: &mut Qwen2<D, S>, f: impl FnOnce(&Qwen2<D, S>) -> R) -> R {
    let was = model.adapters_enabled();
    let lora = matches!(model.trainable(), Trainable::Lora(_));
    if lora {
        model.set_adapters_enabled(false);
    }
    let out = f(model);
    model.set_adapters_enabled(was);
    out
}

/// Two reference log-probs per example (DPO: chosen, rejected; KTO: completion, KL row), from the
/// base model (adapters disabled under LoRA), `batch_size` examples per no-gradient forward.
fn reference_pairs<D: Device<f32>, S: Dims>(
    model: &mut Qwen2<D, S>,
    n: usize,
    batch_size: usize,
    mut chunk_logps: impl FnMut(&Qwen2<D, S>, &[usize]) -> Result<Vec<(f32, f32)>, TrainError>,
) -> Result<Vec<(f32, f32)>, TrainError> {
    let mut refs = Vec::with_capacity(n);
    with_reference(model, |m| -> Result<(), TrainError> {
        for chunk in (0..n).collect::<Vec<_>>().chunks(batch_size.max(1)) {
            refs.extend(chunk_logps(m, chunk)?);
        }
        Ok(())
    })?;
    Ok(refs)
}

/// Fill in `reference` for every pair, `batch_size` pairs at a time.
pub fn precompute_dpo_reference<D: Device<f32>, S: Dims>(
    model: &mut Qwen2<D, S>,
    data: &mut PairDataset,
    batch_size: usize,
) -> Result<(), TrainError> {
    let refs = reference_pairs(model, data.examples.len(), batch_size, |m, chunk| {
        let lp = sequence_logps_no_grad(m, &data.rows(chunk))?;
        let k = chunk.len();
        Ok((0..k).map(|j| (lp[j], lp[k + j])).collect())
    })?;
    for (e, r) in data.examples.iter_mut().zip(refs) {
        e.reference = Some(r);
    }
    Ok(())
}

/// Sigmoid DPO (optionally with label smoothing and RPO) on [`PairBatch`]es.
pub struct DpoObjective {
    pub cfg: DpoConfig,
}

impl<D: Device<f32>, S: Dims> Objective<TrainModel<D, S>, D> for DpoObjective {
    type Batch = PairBatch;
    fn loss<T: Tape<f32, D>>(
        &mut self,
        model: &TrainModel<D, S>,
        b: &PairBatch,
        tape: T,
        _info: &StepInfo,
    ) -> Result<LossOutput<D, T>, TrainError> {
        let lp = batch_logprobs(&model.0, &b.lm, tape, None)?;
        dpo_loss(lp, &b.lm.loss_mask, &b.ref_logps, &self.cfg)
    }
    fn weight_decay_masks(&self, model: &TrainModel<D, S>) -> BTreeMap<String, Vec<bool>> {
        full_decay_mask(&model.0).map(|m| [("params.flat".to_string(), m)].into()).unwrap_or_default()
    }
}

/// One KTO example, tokenised; `kl_completion` is another example's completion (see
/// [`crate::rotate_by_one`]) for the KL baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoExample {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub desirable: bool,
    pub kl_completion: Vec<u32>,
    /// `log π_ref(completion|prompt)`, `log π_ref(kl_completion|prompt)`.
    pub reference: Option<(f32, f32)>,
}

/// KTO data.
#[derive(Debug, Clone)]
pub struct KtoDataset {
    pub examples: Vec<KtoExample>,
    pub pad_id: u32,
    pub max_length: usize,
}

impl KtoDataset {
    /// Build examples from `(prompt, completion, desirable)`, pairing each prompt with the
    /// previous example's completion for the KL baseline (completions rotated by one).
    pub fn new(rows: Vec<(Vec<u32>, Vec<u32>, bool)>, pad_id: u32, max_length: usize) -> Self {
        let completions: Vec<Vec<u32>> = rows.iter().map(|r| r.1.clone()).collect();
        let rotated = crate::rotate_by_one(&completions);
        let examples = rows
            .into_iter()
            .zip(rotated)
            .map(|((prompt, completion, desirable), kl_completion)| KtoExample {
                prompt,
                completion,
                desirable,
                kl_completion,
                reference: None,
            })
            .collect();
        KtoDataset { examples, pad_id, max_length }
    }
    fn rows(&self, indices: &[usize], kl: bool) -> LmBatch {
        let rows: Vec<(&[u32], &[u32])> = indices
            .iter()
            .map(|&i| {
                let e = &self.examples[i];
                (&e.prompt[..], if kl { &e.kl_completion[..] } else { &e.completion[..] })
            })
            .collect();
        lm_batch(&rows, self.pad_id, self.max_length)
    }
}

/// `n` examples plus their `n` mismatched (KL) rows.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoBatch {
    pub lm: LmBatch,
    pub kl: LmBatch,
    pub desirable: Vec<bool>,
    pub ref_logps: Vec<f32>,
    pub ref_kl_logps: Vec<f32>,
}

impl Batch for KtoBatch {
    fn loss_weight(&self) -> f64 {
        self.lm.batch as f64
    }
    fn num_tokens(&self) -> usize {
        self.lm.n_tokens + self.kl.n_tokens
    }
}

impl Dataset for KtoDataset {
    type Batch = KtoBatch;
    fn len(&self) -> usize {
        self.examples.len()
    }
    fn example_len(&self, i: usize) -> usize {
        let e = &self.examples[i];
        (e.prompt.len() + e.completion.len()).min(self.max_length)
    }
    fn collate(&self, indices: &[usize]) -> Result<KtoBatch, TrainError> {
        let mut r = Vec::with_capacity(indices.len());
        let mut rk = Vec::with_capacity(indices.len());
        for &i in indices {
            let (a, b) = self.examples[i]
                .reference
                .ok_or_else(|| TrainError::Data(format!("example {i}: reference log-probs were not computed")))?;
            r.push(a);
            rk.push(b);
        }
        Ok(KtoBatch {
            lm: self.rows(indices, false),
            kl: self.rows(indices, true),
            desirable: indices.iter().map(|&i| self.examples[i].desirable).collect(),
            ref_logps: r,
            ref_kl_logps: rk,
        })
    }
}

/// Fill in `reference` for every KTO example.
pub fn precompute_kto_reference<D: Device<f32>, S: Dims>(
    model: &mut Qwen2<D, S>,
    data: &mut KtoDataset,
    batch_size: usize,
) -> Result<(), TrainError> {
    let refs = reference_pairs(model, data.examples.len(), batch_size, |m, chunk| {
        let a = sequence_logps_no_grad(m, &data.rows(chunk, false))?;
        let b = sequence_logps_no_grad(m, &data.rows(chunk, true))?;
        Ok(a.into_iter().zip(b).collect())
    })?;
    for (e, r) in data.examples.iter_mut().zip(refs) {
        e.reference = Some(r);
    }
    Ok(())
}

/// KTO on [`KtoBatch`]es: `z` from the policy (no gradient) on the batch's mismatched rows.
pub struct KtoObjective {
    pub cfg: KtoConfig,
}

impl<D: Device<f32>, S: Dims> Objective<TrainModel<D, S>, D> for KtoObjective {
    type Batch = KtoBatch;
    fn loss<T: Tape<f32, D>>(
        &mut self,
        model: &TrainModel<D, S>,
        b: &KtoBatch,
        tape: T,
        _info: &StepInfo,
    ) -> Result<LossOutput<D, T>, TrainError> {
        let policy_kl = sequence_logps_no_grad(&model.0, &b.kl)?;
        let z = crate::kto_kl_baseline(&policy_kl, &b.ref_kl_logps)?;
        let lp = batch_logprobs(&model.0, &b.lm, tape, None)?;
        kto_loss(lp, &b.lm.loss_mask, &b.ref_logps, &b.desirable, z, &self.cfg)
    }
    fn weight_decay_masks(&self, model: &TrainModel<D, S>) -> BTreeMap<String, Vec<bool>> {
        full_decay_mask(&model.0).map(|m| [("params.flat".to_string(), m)].into()).unwrap_or_default()
    }
}
