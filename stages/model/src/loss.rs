//! Losses on logits `[batch, seq, vocab]` with transformers' label convention: `labels` has the
//! shape of the input ids, position `t` predicts `labels[t + 1]`, and `-100` masks a position
//! (SPECS.md §4).

use dfdx::prelude::*;

use crate::error::ModelError;

/// The ignored label.
pub const IGNORE: i64 = -100;

/// Per predicted position: target id (0 when masked) and weight (1 or 0), shifted by one.
fn shifted(labels: &[i64], b: usize, s: usize, vocab: usize) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
    if labels.len() != b * s {
        return Err(ModelError::Batch(format!("{} labels for logits of [batch {b}, seq {s}]", labels.len())));
    }
    let mut idx = vec![0usize; b * s];
    let mut w = vec![0f32; b * s];
    for r in 0..b {
        for t in 0..s.saturating_sub(1) {
            let l = labels[r * s + t + 1];
            if l == IGNORE {
                continue;
            }
            if l < 0 || l as usize >= vocab {
                return Err(ModelError::TokenOutOfRange { id: l as u32, pos: r * s + t + 1, vocab });
            }
            idx[r * s + t] = l as usize;
            w[r * s + t] = 1.0;
        }
    }
    Ok((idx, w))
}

/// log p(label) at every position `[batch * seq]` (0 where masked), and the 0/1 weights.
fn target_logprobs<D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    logits: Tensor<(usize, usize, usize), f32, D, T>,
    labels: &[i64],
) -> Result<(Tensor<(usize,), f32, D, T>, Tensor<(usize,), f32, D>, f32), ModelError> {
    let (b, s, v) = *logits.shape();
    let (idx, w) = shifted(labels, b, s, v)?;
    let count: f32 = w.iter().sum();
    let dev = logits.device().clone();
    let idx: Tensor<(usize,), usize, D> = dev.tensor_from_vec(idx, (b * s,));
    let w: Tensor<(usize,), f32, D> = dev.tensor_from_vec(w, (b * s,));
    let lp = logits.reshape_like(&(b * s, v)).log_softmax::<Axis<1>>().select(idx);
    Ok((lp * w.clone(), w, count))
}

/// Mean next-token cross-entropy over the unmasked labels (sum / count; 0 when all are masked).
pub fn masked_cross_entropy<D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    logits: Tensor<(usize, usize, usize), f32, D, T>,
    labels: &[i64],
) -> Result<Tensor<(), f32, D, T>, ModelError> {
    let (lp, _, count) = target_logprobs(logits, labels)?;
    Ok(lp.sum::<(), _>() * (-1.0 / count.max(1.0)))
}

/// Summed cross-entropy and the number of unmasked labels (for gradient accumulation that
/// divides by the total token count across micro-batches).
pub fn summed_cross_entropy<D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    logits: Tensor<(usize, usize, usize), f32, D, T>,
    labels: &[i64],
) -> Result<(Tensor<(), f32, D, T>, usize), ModelError> {
    let (lp, _, count) = target_logprobs(logits, labels)?;
    Ok((lp.sum::<(), _>().negate(), count as usize))
}

/// log π(y|x) per row: the SUM of the log-probs of the unmasked (completion) labels, `[batch]`.
pub fn sequence_logprobs<D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    logits: Tensor<(usize, usize, usize), f32, D, T>,
    labels: &[i64],
) -> Result<Tensor<(usize,), f32, D, T>, ModelError> {
    let (b, s, _) = *logits.shape();
    let (lp, _, _) = target_logprobs(logits, labels)?;
    Ok(lp.reshape_like(&(b, s)).sum::<(usize,), Axis<1>>())
}
