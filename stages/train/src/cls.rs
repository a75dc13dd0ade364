//! Sequence classification and sentence embeddings on pipeline-model's [`Qwen2`] (ms-swift's
//! `task_type = "seq_cls"` and `"embedding"` of `swift sft`).
//!
//! - **seq_cls** ([`HeadModel`], [`SeqClsObjective`] on [`ClsDataset`]): transformers'
//!   `Qwen2ForSequenceClassification` — a linear head `score` `[num_labels, hidden]` without bias
//!   on the final hidden state of each row's last non-padding token (rows are right-padded, so
//!   that is position `len − 1`), cross-entropy against the integer label (`problem_type =
//!   "single_label_classification"`), accuracy logged beside the loss. The head is always trained
//!   in full, with LoRA too (peft's `modules_to_save = ["score"]`); it is initialised as
//!   transformers does, `N(0, initializer_range = 0.02)`.
//! - **embedding** ([`EmbeddingObjective`] on [`EmbeddingDataset`]): each row is a pair of texts
//!   and a float target; both texts are pooled ([`Pooling::Last`]: the last token's hidden state,
//!   as Qwen embedding models and ms-swift do; [`Pooling::Mean`]: the mean over the real tokens)
//!   and the loss is ms-swift's `cosine_similarity` loss, `MSE(cos(u, v), label)`. The eval
//!   figure is the Spearman rank correlation between `cos(u, v)` and the labels ([`spearman`]),
//!   computed over the whole split by [`embedding_similarities`] (a rank statistic does not
//!   average over batches).
//!
//! Saving: [`save_seq_cls_head`] turns a saved decoder folder into one transformers loads as
//! `Qwen2ForSequenceClassification` (`score.weight` beside the decoder's tensors, `config.json`
//! with `architectures`, `num_labels`, `id2label` / `label2id`, `problem_type`, `pad_token_id`);
//! [`save_seq_cls_adapter_head`] adds the head to a peft adapter folder under the name peft saves
//! `modules_to_save` with (`base_model.model.score.weight`, `task_type = "SEQ_CLS"`).

use std::collections::BTreeMap;
use std::path::Path;

use dfdx::nn::tensor_collection::{ModuleVisitor, TensorCollection};
use dfdx::prelude::*;
use pipeline_model::{Batch as ModelBatch, Dims, FlatParams, HostTensor, Qwen2, RuntimeDims, SEQ_CLS_HEAD};
use rand::Rng;

use crate::data::{rng_for, Batch, Dataset};
use crate::lm::{full_decay_mask, TrainModel};
use crate::objectives::LossOutput;
use crate::trainer::{Objective, StepInfo};
use crate::TrainError;

type T2<D, T> = Tensor<(usize, usize), f32, D, T>;
type T1<D, T> = Tensor<(usize,), f32, D, T>;

fn dev_err<E: std::fmt::Debug>(e: E) -> TrainError {
    TrainError::Device(format!("{e:?}"))
}

fn model_err(e: pipeline_model::ModelError) -> TrainError {
    TrainError::Device(e.to_string())
}

/// transformers' `initializer_range` default for Qwen2 (the head's init std).
pub const INITIALIZER_RANGE: f32 = 0.02;
/// The stream of [`rng_for`] the head's initial weights come from.
const TAG_HEAD_INIT: u64 = 3;

/// How an embedding is read off the hidden states of a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The hidden state of the last real token (Qwen embedding models, ms-swift's default).
    Last,
    /// The mean of the hidden states of the real tokens.
    Mean,
}

// ------------------------------------------------------------------------------- data

/// One classification example: token ids (the model's) and the class index.
#[derive(Debug, Clone, PartialEq)]
pub struct ClsExample {
    pub input_ids: Vec<u32>,
    pub label: usize,
}

/// Classification examples, truncated to `max_length`, right-padded per batch.
#[derive(Debug, Clone)]
pub struct ClsDataset {
    pub examples: Vec<ClsExample>,
    pub pad_id: u32,
}

impl ClsDataset {
    /// An example without a token is an error naming it.
    pub fn new(mut examples: Vec<ClsExample>, pad_id: u32, max_length: usize) -> Result<Self, TrainError> {
        for (i, e) in examples.iter_mut().enumerate() {
            e.input_ids.truncate(max_length.max(1));
            if e.input_ids.is_empty() {
                return Err(TrainError::Data(format!("example {i}: no tokens")));
            }
        }
        Ok(ClsDataset { examples, pad_id })
    }
}

/// Right-padded rows: ids and mask `rows * seq`, each row's length.
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedRows {
    pub rows: usize,
    pub seq: usize,
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<bool>,
    pub lengths: Vec<usize>,
}

impl PaddedRows {
    pub fn new(rows: &[&[u32]], pad_id: u32) -> Self {
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let mut p = PaddedRows {
            rows: rows.len(),
            seq,
            input_ids: vec![pad_id; rows.len() * seq],
            attention_mask: vec![false; rows.len() * seq],
            lengths: rows.iter().map(|r| r.len()).collect(),
        };
        for (r, ids) in rows.iter().enumerate() {
            p.input_ids[r * seq..r * seq + ids.len()].copy_from_slice(ids);
            p.attention_mask[r * seq..r * seq + ids.len()].iter_mut().for_each(|m| *m = true);
        }
        p
    }

    fn model_batch(&self) -> Result<ModelBatch, TrainError> {
        ModelBatch::with_mask(self.input_ids.clone(), self.attention_mask.clone(), self.rows, self.seq)
            .map_err(model_err)
    }

    /// Flat index (`row * seq + len − 1`) of each row's last real token.
    pub fn last_positions(&self) -> Vec<usize> {
        self.lengths.iter().enumerate().map(|(r, &l)| r * self.seq + l.max(1) - 1).collect()
    }

    fn num_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// `[rows.len(), self.rows * seq]` weights that pool the hidden states of rows `rows`
    /// (one-hot on the last token, or `1/len` on each real token).
    fn pooling_matrix(&self, rows: std::ops::Range<usize>, pooling: Pooling) -> Vec<f32> {
        let width = self.rows * self.seq;
        let mut m = vec![0f32; rows.len() * width];
        for (i, r) in rows.enumerate() {
            let len = self.lengths[r].max(1);
            match pooling {
                Pooling::Last => m[i * width + r * self.seq + len - 1] = 1.0,
                Pooling::Mean => {
                    for t in 0..len {
                        m[i * width + r * self.seq + t] = 1.0 / len as f32;
                    }
                }
            }
        }
        m
    }
}

/// A batch of classification examples.
#[derive(Debug, Clone, PartialEq)]
pub struct ClsBatch {
    pub rows: PaddedRows,
    pub labels: Vec<usize>,
}

impl Batch for ClsBatch {
    /// Sequence-level: the step's loss is the mean over its examples.
    fn loss_weight(&self) -> f64 {
        self.labels.len() as f64
    }
    fn num_tokens(&self) -> usize {
        self.rows.num_tokens()
    }
}

impl Dataset for ClsDataset {
    type Batch = ClsBatch;
    fn len(&self) -> usize {
        self.examples.len()
    }
    fn example_len(&self, index: usize) -> usize {
        self.examples[index].input_ids.len()
    }
    fn collate(&self, indices: &[usize]) -> Result<ClsBatch, TrainError> {
        let rows: Vec<&[u32]> = indices.iter().map(|&i| self.examples[i].input_ids.as_slice()).collect();
        Ok(ClsBatch {
            rows: PaddedRows::new(&rows, self.pad_id),
            labels: indices.iter().map(|&i| self.examples[i].label).collect(),
        })
    }
}

/// One embedding pair: both texts' token ids and the cosine-similarity target.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingExample {
    pub first: Vec<u32>,
    pub second: Vec<u32>,
    pub label: f32,
}

/// Embedding pairs, each text truncated to `max_length`.
#[derive(Debug, Clone)]
pub struct EmbeddingDataset {
    pub examples: Vec<EmbeddingExample>,
    pub pad_id: u32,
}

impl EmbeddingDataset {
    pub fn new(mut examples: Vec<EmbeddingExample>, pad_id: u32, max_length: usize) -> Result<Self, TrainError> {
        for (i, e) in examples.iter_mut().enumerate() {
            e.first.truncate(max_length.max(1));
            e.second.truncate(max_length.max(1));
            if e.first.is_empty() || e.second.is_empty() {
                return Err(TrainError::Data(format!("example {i}: a text without tokens")));
            }
            if !e.label.is_finite() {
                return Err(TrainError::Data(format!("example {i}: label {} is not finite", e.label)));
            }
        }
        Ok(EmbeddingDataset { examples, pad_id })
    }
}

/// `n` pairs as `2n` rows: the first texts, then the second texts (same order).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingBatch {
    pub rows: PaddedRows,
    pub labels: Vec<f32>,
}

impl Batch for EmbeddingBatch {
    fn loss_weight(&self) -> f64 {
        self.labels.len() as f64
    }
    fn num_tokens(&self) -> usize {
        self.rows.num_tokens()
    }
}

impl Dataset for EmbeddingDataset {
    type Batch = EmbeddingBatch;
    fn len(&self) -> usize {
        self.examples.len()
    }
    fn example_len(&self, index: usize) -> usize {
        let e = &self.examples[index];
        e.first.len().max(e.second.len())
    }
    fn collate(&self, indices: &[usize]) -> Result<EmbeddingBatch, TrainError> {
        let ex: Vec<&EmbeddingExample> = indices.iter().map(|&i| &self.examples[i]).collect();
        let rows: Vec<&[u32]> =
            ex.iter().map(|e| e.first.as_slice()).chain(ex.iter().map(|e| e.second.as_slice())).collect();
        Ok(EmbeddingBatch { rows: PaddedRows::new(&rows, self.pad_id), labels: ex.iter().map(|e| e.label).collect() })
    }
}

// ------------------------------------------------------------------------------- model

/// A decoder with a classification head: `lm`'s trainable tensors (every weight, or the LoRA
/// adapters) and the head `score` (`[num_labels, hidden]`, row-major, always trained), named
/// `params.flat` and `score.flat` in checkpoints.
pub struct HeadModel<D: Device<f32>, S: Dims = RuntimeDims> {
    pub lm: Qwen2<D, S>,
    pub score: FlatParams<f32, D>,
    pub num_labels: usize,
}

/// What [`HeadModel`]'s tensors convert to (dfdx's `TensorCollection::To`).
pub struct HeadParams<E: Dtype, D: Storage<E>> {
    pub params: FlatParams<E, D>,
    pub score: FlatParams<E, D>,
}

impl<D: Device<f32>, S: Dims> TensorCollection<f32, D> for HeadModel<D, S> {
    type To<E2: Dtype, D2: Device<E2>> = HeadParams<E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, f32, D>>(visitor: &mut V) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::module("params", |s| &s.lm.params, |s| &mut s.lm.params),
                Self::module("score", |s| &s.score, |s| &mut s.score),
            ),
            |(params, score)| HeadParams { params, score },
        )
    }
}

impl<D: Device<f32>, S: Dims> HeadModel<D, S> {
    /// A fresh head, `N(0, 0.02)` from `seed` (transformers' init), or `init` when given (a head
    /// read back from a folder; its shape must be `[num_labels, hidden]`).
    pub fn new(lm: Qwen2<D, S>, num_labels: usize, seed: u64, init: Option<&HostTensor>) -> Result<Self, TrainError> {
        let h = lm.cfg.hidden_size;
        if num_labels < 2 {
            return Err(TrainError::Config(format!("`num_labels = {num_labels}`: a classifier needs at least 2")));
        }
        let data = match init {
            Some(t) if t.shape == [num_labels, h] => t.data.clone(),
            Some(t) => {
                return Err(TrainError::Shape(format!(
                    "`{SEQ_CLS_HEAD}` is {:?}, expected [{num_labels}, {h}] (num_labels, hidden_size)",
                    t.shape
                )))
            }
            None => {
                let mut rng = rng_for(seed, TAG_HEAD_INIT);
                (0..num_labels * h).map(|_| normal(&mut rng) * INITIALIZER_RANGE).collect()
            }
        };
        let score = FlatParams { flat: lm.device().tensor_from_vec(data, (num_labels * h,)) };
        Ok(HeadModel { lm, score, num_labels })
    }

    /// The head as a host tensor `[num_labels, hidden]` under its HF name's shape.
    pub fn score_host(&self) -> HostTensor {
        HostTensor::new(vec![self.num_labels, self.lm.cfg.hidden_size], self.score.flat.as_vec())
    }

    /// Logits `[rows, num_labels]` of a padded batch on tape `tape`.
    pub fn logits<T: Tape<f32, D>>(
        &self,
        rows: &PaddedRows,
        tape: T,
        dropout_seed: Option<u64>,
    ) -> Result<T2<D, T>, TrainError> {
        let hs = self.lm.forward_hidden(&rows.model_batch()?, tape, dropout_seed).map_err(model_err)?;
        let dev = self.lm.device();
        let last = dev.try_tensor_from_vec(rows.last_positions(), (rows.rows,)).map_err(dev_err)?;
        let pooled = hs.try_gather(last).map_err(dev_err)?;
        let h = self.lm.cfg.hidden_size;
        let w = self.score.flat.retaped::<T>().try_reshape_like(&(self.num_labels, h)).map_err(dev_err)?;
        pooled.try_matmul(w.try_permute::<(usize, usize), Axes2<1, 0>>().map_err(dev_err)?).map_err(dev_err)
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

/// Cross-entropy of the head's logits against the labels; logs `accuracy`.
pub struct SeqClsObjective;

impl<D: Device<f32>, S: Dims> Objective<HeadModel<D, S>, D> for SeqClsObjective {
    type Batch = ClsBatch;
    fn loss<T: Tape<f32, D>>(
        &mut self,
        model: &HeadModel<D, S>,
        b: &ClsBatch,
        tape: T,
        info: &StepInfo,
    ) -> Result<LossOutput<D, T>, TrainError> {
        if let Some(&bad) = b.labels.iter().find(|&&l| l >= model.num_labels) {
            return Err(TrainError::Data(format!("label {bad} is outside num_labels = {}", model.num_labels)));
        }
        let logits = model.logits(&b.rows, tape, info.training.then_some(info.seed))?;
        let (logits, tape) = logits.split_tape();
        let host = logits.as_vec();
        let n = b.labels.len();
        let correct = host.chunks(model.num_labels).zip(&b.labels).filter(|(row, &l)| argmax(row) == l).count() as f64;
        let idx = logits.device().try_tensor_from_vec(b.labels.clone(), (n,)).map_err(dev_err)?;
        let loss = logits
            .put_tape(tape)
            .try_log_softmax::<Axis<1>>()
            .and_then(|l| l.try_select(idx))
            .and_then(|l| l.try_mean::<(), _>())
            .map_err(dev_err)?
            .negate();
        Ok(LossOutput { loss, metrics: vec![("accuracy".into(), correct / n as f64)] })
    }
    fn weight_decay_masks(&self, model: &HeadModel<D, S>) -> BTreeMap<String, Vec<bool>> {
        full_decay_mask(&model.lm).map(|m| [("params.flat".to_string(), m)].into()).unwrap_or_default()
    }
}

/// Pooled embeddings `[rows, hidden]` of rows `range` of a padded batch, from hidden states `hs`.
fn pool<D: Device<f32>, T: Tape<f32, D>>(
    hs: T2<D, T>,
    rows: &PaddedRows,
    range: std::ops::Range<usize>,
    pooling: Pooling,
) -> Result<T2<D, T>, TrainError> {
    let n = range.len();
    let m = rows.pooling_matrix(range, pooling);
    let p = hs.device().try_tensor_from_vec(m, (n, rows.rows * rows.seq)).map_err(dev_err)?;
    p.retaped::<T>().try_matmul(hs).map_err(dev_err)
}

/// `cos(a_i, b_i)` per row.
fn cosine<D: Device<f32>, T: Tape<f32, D>>(a: T2<D, T>, b: T2<D, T>) -> T1<D, T> {
    let (a, ta) = a.split_tape();
    let (b, tb) = b.split_tape();
    let dot = (a.clone().put_tape(ta) * b.clone().put_tape(tb)).sum::<(usize,), Axis<1>>();
    let na = (a.retaped::<T>().square().sum::<(usize,), Axis<1>>() + 1e-12).sqrt();
    let nb = (b.retaped::<T>().square().sum::<(usize,), Axis<1>>() + 1e-12).sqrt();
    dot / (na * nb)
}

/// `cos(u, v)` of each pair of an [`EmbeddingBatch`] (`[n]`).
fn pair_cosines<D: Device<f32>, S: Dims, T: Tape<f32, D>>(
    lm: &Qwen2<D, S>,
    b: &EmbeddingBatch,
    pooling: Pooling,
    tape: T,
    dropout_seed: Option<u64>,
) -> Result<T1<D, T>, TrainError> {
    let n = b.labels.len();
    let hs = lm.forward_hidden(&b.rows.model_batch()?, tape, dropout_seed).map_err(model_err)?;
    let (h, tape) = hs.split_tape();
    let u = pool(h.clone().put_tape(tape), &b.rows, 0..n, pooling)?;
    let v = pool(h.retaped::<T>(), &b.rows, n..2 * n, pooling)?;
    Ok(cosine(u, v))
}

/// ms-swift's `cosine_similarity` loss: `MSE(cos(u, v), label)` over the pairs.
pub struct EmbeddingObjective {
    pub pooling: Pooling,
}

impl<D: Device<f32>, S: Dims> Objective<TrainModel<D, S>, D> for EmbeddingObjective {
    type Batch = EmbeddingBatch;
    fn loss<T: Tape<f32, D>>(
        &mut self,
        model: &TrainModel<D, S>,
        b: &EmbeddingBatch,
        tape: T,
        info: &StepInfo,
    ) -> Result<LossOutput<D, T>, TrainError> {
        let cos = pair_cosines(&model.0, b, self.pooling, tape, info.training.then_some(info.seed))?;
        let labels = cos.device().try_tensor_from_vec(b.labels.clone(), (b.labels.len(),)).map_err(dev_err)?;
        let loss = cos.try_sub(labels).map_err(dev_err)?.square().try_mean::<(), _>().map_err(dev_err)?;
        Ok(LossOutput { loss, metrics: vec![] })
    }
    fn weight_decay_masks(&self, model: &TrainModel<D, S>) -> BTreeMap<String, Vec<bool>> {
        full_decay_mask(&model.0).map(|m| [("params.flat".to_string(), m)].into()).unwrap_or_default()
    }
}

// ------------------------------------------------------------------------------- evaluation

/// `(predicted class, label)` of every example of `data`, in order, without gradients.
pub fn classify<D: Device<f32>, S: Dims>(
    model: &HeadModel<D, S>,
    data: &dyn Dataset<Batch = ClsBatch>,
    batch_size: usize,
) -> Result<Vec<(usize, usize)>, TrainError> {
    let idx: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(batch_size.max(1)) {
        let b = data.collate(chunk)?;
        let logits = model.logits(&b.rows, NoneTape, None)?.as_vec();
        out.extend(logits.chunks(model.num_labels).map(argmax).zip(b.labels.iter().copied()));
    }
    Ok(out)
}

/// `(cos(u, v), label)` of every pair of `data`, in order, without gradients.
pub fn embedding_similarities<D: Device<f32>, S: Dims>(
    lm: &Qwen2<D, S>,
    data: &dyn Dataset<Batch = EmbeddingBatch>,
    pooling: Pooling,
    batch_size: usize,
) -> Result<Vec<(f64, f64)>, TrainError> {
    let idx: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(batch_size.max(1)) {
        let b = data.collate(chunk)?;
        let cos = pair_cosines(lm, &b, pooling, NoneTape, None)?.as_vec();
        out.extend(cos.iter().zip(&b.labels).map(|(&c, &l)| (f64::from(c), f64::from(l))));
    }
    Ok(out)
}

/// Ranks 1..n with ties given their average rank (as scipy's `rankdata`).
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation of the pairs (scipy's `spearmanr`: Pearson on average ranks);
/// `None` for fewer than two pairs or when either side is constant.
pub fn spearman(pairs: &[(f64, f64)]) -> Option<f64> {
    if pairs.len() < 2 {
        return None;
    }
    let a = ranks(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let b = ranks(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(&b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

// ------------------------------------------------------------------------------- saving

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Report(format!("{}: {e}", path.display()))
}

fn read_json(path: &Path) -> Result<serde_json::Value, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io { path: path.to_path_buf(), source: e })?;
    serde_json::from_str(&text).map_err(|e| io_err(path, e))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(v).expect("json");
    pipeline_model::checkpoint::write_atomic(path, text.as_bytes()).map_err(|e| io_err(path, e))
}

/// `tensors` added to (or replaced in) the safetensors file `path`, written atomically.
fn add_tensors(path: &Path, tensors: &[(&str, &HostTensor)]) -> Result<(), TrainError> {
    let mut all = pipeline_model::checkpoint::read_safetensors(path).map_err(|e| io_err(path, e))?;
    for (name, t) in tensors {
        all.insert(name.to_string(), (*t).clone());
    }
    pipeline_model::checkpoint::write_safetensors(path, &all).map_err(|e| io_err(path, e))
}

/// Makes the decoder folder `dir` (`config.json` + `model.safetensors`, as
/// `Qwen2::save_pretrained` writes it) a `Qwen2ForSequenceClassification` /
/// `LlamaForSequenceClassification` folder: `score.weight` joins the weights and `config.json`
/// gets `architectures`, `num_labels` (through `id2label` / `label2id`, as transformers stores
/// it), `problem_type = "single_label_classification"` and `pad_token_id` (transformers finds
/// each row's last token from it).
pub fn save_seq_cls_head(
    dir: &Path,
    score: &HostTensor,
    id2label: &[String],
    pad_token_id: u32,
) -> Result<(), TrainError> {
    add_tensors(&dir.join("model.safetensors"), &[(SEQ_CLS_HEAD, score)])?;
    let path = dir.join("config.json");
    let mut cfg = read_json(&path)?;
    let obj = cfg.as_object_mut().ok_or_else(|| io_err(&path, "not a JSON object"))?;
    let class = match obj.get("model_type").and_then(|v| v.as_str()) {
        Some("llama") => "LlamaForSequenceClassification",
        _ => "Qwen2ForSequenceClassification",
    };
    obj.insert("architectures".into(), serde_json::json!([class]));
    let mut id2 = serde_json::Map::new();
    let mut l2i = serde_json::Map::new();
    for (i, l) in id2label.iter().enumerate() {
        id2.insert(i.to_string(), serde_json::json!(l));
        l2i.insert(l.clone(), serde_json::json!(i));
    }
    obj.insert("num_labels".into(), serde_json::json!(id2label.len()));
    obj.insert("id2label".into(), serde_json::Value::Object(id2));
    obj.insert("label2id".into(), serde_json::Value::Object(l2i));
    obj.insert("problem_type".into(), serde_json::json!("single_label_classification"));
    obj.insert("pad_token_id".into(), serde_json::json!(pad_token_id));
    write_json(&path, &cfg)
}

/// peft's name for a `modules_to_save` head in `adapter_model.safetensors` (its
/// `get_peft_model_state_dict` drops `modules_to_save.default`).
pub const PEFT_SEQ_CLS_HEAD: &str = "base_model.model.score.weight";

/// Adds the trained head to the peft adapter folder `dir` as peft saves a `modules_to_save`
/// module: the tensor [`PEFT_SEQ_CLS_HEAD`], and `modules_to_save = ["score"]`, `task_type =
/// "SEQ_CLS"` in `adapter_config.json`.
pub fn save_seq_cls_adapter_head(dir: &Path, score: &HostTensor) -> Result<(), TrainError> {
    add_tensors(&dir.join("adapter_model.safetensors"), &[(PEFT_SEQ_CLS_HEAD, score)])?;
    let path = dir.join("adapter_config.json");
    let mut cfg = read_json(&path)?;
    let obj = cfg.as_object_mut().ok_or_else(|| io_err(&path, "not a JSON object"))?;
    obj.insert("modules_to_save".into(), serde_json::json!(["score"]));
    obj.insert("task_type".into(), serde_json::json!("SEQ_CLS"));
    write_json(&path, &cfg)
}

/// The classification head of a saved folder (`score.weight` of its `model.safetensors`), when
/// it has one.
pub fn read_seq_cls_head(dir: &Path) -> Result<Option<HostTensor>, TrainError> {
    let path = dir.join("model.safetensors");
    if !path.is_file() {
        return Ok(None);
    }
    let mut all = pipeline_model::checkpoint::read_safetensors(&path).map_err(|e| io_err(&path, e))?;
    Ok(all.remove(SEQ_CLS_HEAD))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_matches_scipy_on_ties_and_order() {
        // scipy.stats.spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) = 0.8207826816681233
        let p: Vec<(f64, f64)> = [(1., 5.), (2., 6.), (3., 7.), (4., 8.), (5., 7.)].into();
        assert!((spearman(&p).unwrap() - 0.820_782_681_668_123_3).abs() < 1e-12);
        let inv: Vec<(f64, f64)> = (0..6).map(|i| (i as f64, -(i as f64) * 3.0)).collect();
        assert!((spearman(&inv).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(spearman(&[(1.0, 2.0)]), None);
        assert_eq!(spearman(&[(1.0, 2.0), (3.0, 2.0)]), None, "a constant side has no correlation");
    }

    #[test]
    fn padded_rows_and_pooling_weights() {
        let p = PaddedRows::new(&[&[5, 6, 7], &[8]], 0);
        assert_eq!((p.rows, p.seq), (2, 3));
        assert_eq!(p.input_ids, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(p.last_positions(), vec![2, 3]);
        assert_eq!(p.pooling_matrix(0..2, Pooling::Last), vec![0., 0., 1., 0., 0., 0., 0., 0., 0., 1., 0., 0.]);
        let m = p.pooling_matrix(1..2, Pooling::Mean);
        assert_eq!(m, vec![0., 0., 0., 1., 0., 0.]);
        let m = p.pooling_matrix(0..1, Pooling::Mean);
        assert!(m[..3].iter().all(|&x| (x - 1.0 / 3.0).abs() < 1e-7) && m[3..].iter().all(|&x| x == 0.0));
    }
}
