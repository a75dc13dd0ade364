//! What a forward consumes ([`Batch`]: token ids and the padding mask) and what incremental
//! decoding carries between steps ([`KvCache`]).

use dfdx::prelude::*;

use crate::dims::{Dims, RuntimeDims};
use crate::error::ModelError;

/// `[batch, S::KvHeads, len, S::HeadDim]` keys or values.
pub(crate) type Kv<S, D, T> = Tensor<(usize, <S as Dims>::KvHeads, usize, <S as Dims>::HeadDim), f32, D, T>;

/// Cached (keys, values) of one layer.
pub(crate) type KvPair<D, S> = (Kv<S, D, NoneTape>, Kv<S, D, NoneTape>);

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
    pub(crate) layers: Vec<Option<KvPair<D, S>>>,
    /// `[batch][len]`: which cached positions are real tokens.
    pub(crate) key_mask: Vec<Vec<bool>>,
    /// Next position id per row.
    pub(crate) next_pos: Vec<usize>,
}

impl<D: Storage<f32>, S: Dims> KvCache<D, S> {
    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Additive attention-mask value for hidden keys (large enough that `exp` underflows to 0).
const MASKED: f32 = -1e9;

/// Positions and the attention mask of one forward, with the cache's bookkeeping advanced.
pub(crate) struct Positions {
    /// Position id of every token, `[batch * seq]`: `cumsum(attention_mask) - 1` per row after the
    /// cached prefix (what transformers' `generate` uses, so left padding works).
    pub ids: Vec<usize>,
    /// Additive causal + padding mask `[batch, seq, past + seq]` (0 or [`MASKED`]).
    pub mask: Vec<f32>,
    /// Cached positions before this batch.
    pub past: usize,
}

impl Positions {
    /// Checks `batch` against the cache and computes the positions and mask; the cache (if any)
    /// records the new keys' mask and next positions (its layers are filled by the attention).
    pub fn new<D: Storage<f32>, S: Dims>(
        batch: &Batch,
        mut cache: Option<&mut KvCache<D, S>>,
        layers: usize,
    ) -> Result<Self, ModelError> {
        let (b, s) = (batch.batch, batch.seq);
        if let Some(c) = cache.as_deref() {
            if !c.key_mask.is_empty() && c.key_mask.len() != b {
                return Err(ModelError::Batch(format!("the KV cache holds {} rows, the batch {b}", c.key_mask.len())));
            }
        }
        let past = cache.as_deref().map_or(0, KvCache::len);
        let skv = past + s;
        let mut ids = vec![0usize; b * s];
        let mut keymask: Vec<Vec<bool>> = Vec::with_capacity(b);
        for r in 0..b {
            let (mut next, mut km) = match cache.as_deref() {
                Some(c) if !c.key_mask.is_empty() => (c.next_pos[r], c.key_mask[r].clone()),
                _ => (0, Vec::new()),
            };
            for t in 0..s {
                let m = batch.mask[r * s + t];
                ids[r * s + t] = next.saturating_sub(usize::from(!m));
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
        let mut mask = vec![MASKED; b * s * skv];
        for r in 0..b {
            for t in 0..s {
                for j in 0..=past + t {
                    if keymask[r][j] {
                        mask[(r * s + t) * skv + j] = 0.0;
                    }
                }
            }
        }
        if let Some(c) = cache {
            c.key_mask = keymask;
            if c.layers.len() != layers {
                c.layers = vec![None; layers];
            }
        }
        Ok(Positions { ids, mask, past })
    }
}
