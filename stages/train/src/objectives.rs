//! Training objectives as functions on dfdx tensors (SPECS.md §4), generic over the tape so the
//! same code computes training losses (with `OwnedTape`) and evaluation losses (`NoneTape`).
//!
//! - [`token_logprobs`]: `log softmax(logits)[target]` per position.
//! - [`masked_mean_nll`]: SFT / pretraining cross-entropy, sum over labelled tokens / their count.
//! - [`sequence_logprobs`]: `log π(y|x)` = SUM of completion-token log-probs.
//! - [`dpo_loss`]: sigmoid DPO with label smoothing and the RPO NLL term (TRL's `DPOTrainer`).
//! - [`kto_loss`]: KTO with the detached KL baseline `z` (TRL's `KTOTrainer`), see
//!   [`kto_kl_baseline`] and [`rotate_by_one`].
//!
//! The DPO/KTO loss values and gradients are checked in `tests/train/golden.rs` against
//! `scripts/oracles/train_golden.py` (TRL's formulas written in PyTorch, gradients by autograd).

use dfdx::prelude::*;

use crate::TrainError;

/// `(batch, seq, vocab)` logits.
pub type Logits<D, T> = Tensor<(usize, usize, usize), f32, D, T>;
/// `(batch, seq)` per-token values.
pub type PerToken<D, T> = Tensor<(usize, usize), f32, D, T>;
/// `(batch,)` per-sequence values.
pub type PerSeq<D, T> = Tensor<(usize,), f32, D, T>;
/// A scalar loss.
pub type Scalar<D, T> = Tensor<(), f32, D, T>;

fn dev_err<E: std::fmt::Debug>(e: E) -> TrainError {
    TrainError::Device(format!("{e:?}"))
}

/// `log_softmax(logits)` at `targets` (`batch * seq`, row-major): `(batch, seq)`.
pub fn token_logprobs<D: Device<f32>, T: Tape<f32, D>>(
    logits: Logits<D, T>,
    targets: &[usize],
) -> Result<PerToken<D, T>, TrainError> {
    let (b, s, v) = *logits.shape();
    if targets.len() != b * s {
        return Err(TrainError::Shape(format!("{} targets for logits of shape ({b}, {s}, {v})", targets.len())));
    }
    if let Some(bad) = targets.iter().find(|&&t| t >= v) {
        return Err(TrainError::Shape(format!("target id {bad} is outside the vocabulary of {v}")));
    }
    let idx = logits.device().try_tensor_from_vec(targets.to_vec(), (b, s)).map_err(dev_err)?;
    logits.try_log_softmax::<Axis<2>>().and_then(|l| l.try_select(idx)).map_err(dev_err)
}

fn mask_tensor<D: Device<f32>>(
    dev: &D,
    mask: &[f32],
    shape: (usize, usize),
) -> Result<PerToken<D, NoneTape>, TrainError> {
    if mask.len() != shape.0 * shape.1 {
        return Err(TrainError::Shape(format!("mask of {} values for shape {shape:?}", mask.len())));
    }
    dev.try_tensor_from_vec(mask.to_vec(), shape).map_err(dev_err)
}

/// Per-row sum of the masked token log-probs: `log π(y|x)` of each sequence.
pub fn sequence_logprobs<D: Device<f32>, T: Tape<f32, D>>(
    token_logps: PerToken<D, T>,
    mask: &[f32],
) -> Result<PerSeq<D, T>, TrainError> {
    let shape = *token_logps.shape();
    let m = mask_tensor(token_logps.device(), mask, shape)?;
    token_logps.try_mul(m).and_then(|x| x.try_sum::<(usize,), Axis<1>>()).map_err(dev_err)
}

/// `-(sum of masked token log-probs) / count`: the SFT / pretraining loss of one batch, with
/// `count` the number of ones in `mask` (an all-masked batch is an error).
pub fn masked_mean_nll<D: Device<f32>, T: Tape<f32, D>>(
    token_logps: PerToken<D, T>,
    mask: &[f32],
) -> Result<Scalar<D, T>, TrainError> {
    let count: f32 = mask.iter().sum();
    if count <= 0.0 {
        return Err(TrainError::Data("a batch has no labelled token".into()));
    }
    let shape = *token_logps.shape();
    let m = mask_tensor(token_logps.device(), mask, shape)?;
    token_logps.try_mul(m).and_then(|x| x.try_sum::<(), _>()).and_then(|x| x.try_mul(-1.0 / count)).map_err(dev_err)
}

/// Numerically stable `log σ(x)` with the exact gradient `1 − σ(x)` everywhere, zero included:
/// `−ln(1 + e^{−x})` where `x ≥ 0`, `x − ln(1 + e^{x})` where `x < 0`, selected by masks (the
/// unused branch sees 0, so nothing overflows). The `relu`/`abs` form has a kink at 0 where dfdx's
/// subgradient is 0, which froze DPO at its starting point (policy = reference, logits = 0).
pub fn log_sigmoid<S: Shape, D: Device<f32>, T: Tape<f32, D>>(x: Tensor<S, f32, D, T>) -> Tensor<S, f32, D, T> {
    let shape = *x.shape();
    let dev = x.device().clone();
    let pos: Vec<f32> = x.as_vec().iter().map(|&v| if v >= 0.0 { 1.0 } else { 0.0 }).collect();
    let neg: Vec<f32> = pos.iter().map(|p| 1.0 - p).collect();
    let pos = dev.tensor_from_vec(pos, shape);
    let neg = dev.tensor_from_vec(neg, shape);
    let (x, tape) = x.split_tape();
    let pos_branch = ((x.clone().put_tape(tape) * pos.clone()).negate().exp() + 1.0).ln().negate() * pos;
    let neg_branch = (x.retaped::<T>() * neg.clone() - ((x.retaped::<T>() * neg.clone()).exp() + 1.0).ln()) * neg;
    pos_branch + neg_branch
}

/// A loss with the figures logged beside it.
pub struct LossOutput<D: Device<f32>, T> {
    pub loss: Scalar<D, T>,
    /// `(name, value)`; averaged over micro-batches with the loss weights, like the loss.
    pub metrics: Vec<(String, f64)>,
}

/// DPO hyper-parameters (TRL names).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    pub beta: f64,
    pub label_smoothing: f64,
    /// Weight of the chosen-completion NLL term (RPO); `None` = off.
    pub rpo_alpha: Option<f64>,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig { beta: 0.1, label_smoothing: 0.0, rpo_alpha: None }
    }
}

fn split_rows(rows: usize, what: &str) -> Result<usize, TrainError> {
    if rows == 0 || !rows.is_multiple_of(2) {
        return Err(TrainError::Shape(format!(
            "{what} needs chosen and rejected rows (an even, non-zero count), got {rows}"
        )));
    }
    Ok(rows / 2)
}

/// Sigmoid DPO on a batch of `n` pairs laid out as `2n` rows: rows `0..n` the chosen completions,
/// rows `n..2n` the rejected ones (same prompts, same order).
///
/// `token_logps` and `mask` (`2n * seq`, 1 on completion tokens) are the policy's; `ref_logps` are
/// the reference model's `log π_ref(y|x)` for the same `2n` rows (no gradient).
/// `logits = (log πθ(y_w) − log πθ(y_l)) − (log π_ref(y_w) − log π_ref(y_l))`,
/// `L = mean(−(1−ε) log σ(β·logits) − ε log σ(−β·logits)) + α · NLL(chosen tokens)` where the
/// NLL is the mean over the chosen rows' completion tokens.
/// Metrics: `rewards/chosen`, `rewards/rejected` (means of `β(log πθ − log π_ref)`),
/// `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, and `nll_loss`
/// with RPO.
pub fn dpo_loss<D: Device<f32>, T: Tape<f32, D>>(
    token_logps: PerToken<D, T>,
    mask: &[f32],
    ref_logps: &[f32],
    cfg: &DpoConfig,
) -> Result<LossOutput<D, T>, TrainError> {
    let (rows, seq) = *token_logps.shape();
    let n = split_rows(rows, "DPO")?;
    if ref_logps.len() != rows {
        return Err(TrainError::Shape(format!("{} reference log-probs for {rows} rows", ref_logps.len())));
    }
    let dev = token_logps.device().clone();
    let (tok, tape) = token_logps.split_tape();
    let seq_logps = sequence_logprobs(tok.clone().put_tape(tape), mask)?;
    let host = seq_logps.as_vec();
    let beta = cfg.beta as f32;

    // (log πθ(y_w) − log πθ(y_l)) through the tape: sign the rows, fold the halves.
    let signs: Vec<f32> = (0..rows).map(|i| if i < n { 1.0 } else { -1.0 }).collect();
    let signs = dev.try_tensor_from_vec(signs, (rows,)).map_err(dev_err)?;
    let diff = seq_logps
        .try_mul(signs)
        .and_then(|x| x.try_reshape_like(&(2usize, n)))
        .and_then(|x| x.try_sum::<(usize,), Axis<0>>())
        .map_err(dev_err)?;
    let ref_diff: Vec<f32> = (0..n).map(|i| ref_logps[i] - ref_logps[n + i]).collect();
    let ref_diff = dev.try_tensor_from_vec(ref_diff, (n,)).map_err(dev_err)?;
    let logits = diff.try_sub(ref_diff).and_then(|x| x.try_mul(beta)).map_err(dev_err)?;
    let eps = cfg.label_smoothing as f32;
    let losses = if eps == 0.0 {
        log_sigmoid(logits).negate()
    } else {
        let (l, tape) = logits.split_tape();
        let pos = log_sigmoid(l.clone().put_tape(tape)) * (-(1.0 - eps));
        let neg = log_sigmoid(l.retaped::<T>().negate()) * (-eps);
        pos + neg
    };
    let mut loss = losses.try_mean::<(), _>().map_err(dev_err)?;

    let mut metrics = Vec::new();
    if let Some(alpha) = cfg.rpo_alpha {
        let chosen_mask: Vec<f32> = mask.iter().enumerate().map(|(i, &m)| if i < n * seq { m } else { 0.0 }).collect();
        let nll = masked_mean_nll(tok.retaped::<T>(), &chosen_mask)?;
        metrics.push(("nll_loss".to_string(), f64::from(nll.as_vec()[0])));
        loss = loss.try_add(nll.try_mul(alpha as f32).map_err(dev_err)?).map_err(dev_err)?;
    }

    let chosen: Vec<f64> = (0..n).map(|i| f64::from(beta) * f64::from(host[i] - ref_logps[i])).collect();
    let rejected: Vec<f64> = (0..n).map(|i| f64::from(beta) * f64::from(host[n + i] - ref_logps[n + i])).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let acc = chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count() as f64 / n as f64;
    let margins: Vec<f64> = chosen.iter().zip(&rejected).map(|(c, r)| c - r).collect();
    metrics.extend([
        ("rewards/chosen".to_string(), mean(&chosen)),
        ("rewards/rejected".to_string(), mean(&rejected)),
        ("rewards/accuracies".to_string(), acc),
        ("rewards/margins".to_string(), mean(&margins)),
        ("logps/chosen".to_string(), host[..n].iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64),
        ("logps/rejected".to_string(), host[n..].iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64),
    ]);
    Ok(LossOutput { loss, metrics })
}

/// KTO hyper-parameters (TRL names).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KtoConfig {
    pub beta: f64,
    /// λ_D: weight of desirable examples' losses.
    pub desirable_weight: f64,
    /// λ_U: weight of undesirable examples' losses.
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        KtoConfig { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 }
    }
}

/// The KL baseline `z = max(0, mean(log πθ(y'|x) − log π_ref(y'|x)))` over mismatched pairs
/// `(x, y')` (completions rotated by one, see [`rotate_by_one`]); it carries no gradient.
pub fn kto_kl_baseline(policy_kl_logps: &[f32], ref_kl_logps: &[f32]) -> Result<f32, TrainError> {
    if policy_kl_logps.len() != ref_kl_logps.len() || policy_kl_logps.is_empty() {
        return Err(TrainError::Shape(format!(
            "KL baseline needs as many policy ({}) as reference ({}) log-probs, at least one",
            policy_kl_logps.len(),
            ref_kl_logps.len()
        )));
    }
    let mean = policy_kl_logps.iter().zip(ref_kl_logps).map(|(p, r)| f64::from(p - r)).sum::<f64>()
        / policy_kl_logps.len() as f64;
    Ok(mean.max(0.0) as f32)
}

/// The mismatched completions for the KL baseline: example `i`'s prompt with example `i − 1`'s
/// completion (TRL rotates the completion list by one: `[y_n, y_1, ..., y_{n−1}]`).
pub fn rotate_by_one<T: Clone>(completions: &[T]) -> Vec<T> {
    let mut v = completions.to_vec();
    v.rotate_right(1);
    v
}

/// KTO on `n` examples: `r = log πθ(y|x) − log π_ref(y|x)`; desirable examples lose
/// `λ_D (1 − σ(β(r − z)))`, undesirable ones `λ_U (1 − σ(β(z − r)))`; the loss is the mean over
/// examples. `z` comes from [`kto_kl_baseline`]. Metrics: `kl`, `rewards/chosen`,
/// `rewards/rejected` (means of `β r` over desirable / undesirable examples, when present) and
/// `rewards/margins` when both are.
pub fn kto_loss<D: Device<f32>, T: Tape<f32, D>>(
    token_logps: PerToken<D, T>,
    mask: &[f32],
    ref_logps: &[f32],
    desirable: &[bool],
    z: f32,
    cfg: &KtoConfig,
) -> Result<LossOutput<D, T>, TrainError> {
    let (n, _) = *token_logps.shape();
    if ref_logps.len() != n || desirable.len() != n || n == 0 {
        return Err(TrainError::Shape(format!(
            "KTO: {n} rows, {} reference log-probs, {} labels",
            ref_logps.len(),
            desirable.len()
        )));
    }
    let dev = token_logps.device().clone();
    let seq_logps = sequence_logprobs(token_logps, mask)?;
    let host = seq_logps.as_vec();
    let beta = cfg.beta as f32;
    let refs = dev.try_tensor_from_vec(ref_logps.to_vec(), (n,)).map_err(dev_err)?;
    let signs: Vec<f32> = desirable.iter().map(|&d| if d { 1.0 } else { -1.0 }).collect();
    let weights: Vec<f32> = desirable
        .iter()
        .map(|&d| if d { cfg.desirable_weight as f32 } else { cfg.undesirable_weight as f32 })
        .collect();
    let signs = dev.try_tensor_from_vec(signs, (n,)).map_err(dev_err)?;
    let weights = dev.try_tensor_from_vec(weights, (n,)).map_err(dev_err)?;
    // β·s·(r − z), s = +1 desirable / −1 undesirable; loss_i = w_i (1 − σ(·)).
    let losses = seq_logps
        .try_sub(refs)
        .and_then(|r| r.try_sub(z))
        .and_then(|x| x.try_mul(signs))
        .and_then(|x| x.try_mul(beta))
        .map_err(dev_err)?;
    let losses = (losses.sigmoid().negate() + 1.0) * weights;
    let loss = losses.try_mean::<(), _>().map_err(dev_err)?;

    let rewards: Vec<f64> = (0..n).map(|i| f64::from(beta) * f64::from(host[i] - ref_logps[i])).collect();
    let pick = |want: bool| -> Option<f64> {
        let v: Vec<f64> = (0..n).filter(|&i| desirable[i] == want).map(|i| rewards[i]).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mut metrics = vec![("kl".to_string(), f64::from(z))];
    let (c, r) = (pick(true), pick(false));
    if let Some(c) = c {
        metrics.push(("rewards/chosen".to_string(), c));
    }
    if let Some(r) = r {
        metrics.push(("rewards/rejected".to_string(), r));
    }
    if let (Some(c), Some(r)) = (c, r) {
        metrics.push(("rewards/margins".to_string(), c - r));
    }
    Ok(LossOutput { loss, metrics })
}
