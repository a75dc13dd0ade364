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

/// Per-layer key/value cache for incremental decoding. Keys are stored after the rotary embedding.
///
/// Two layouts, chosen when the cache is made ([`crate::Qwen2::new_cache`]): on the CPU (unless
/// `PIPELINE_REFERENCE_KERNELS=1`) each row keeps its own host buffers that grow in place
/// ([`HostLayer`]; a step appends its keys, nothing is concatenated, and stacking or splitting
/// rows moves buffers without copying them); elsewhere one dfdx tensor per layer,
/// `[batch, kv_heads, len, head_dim]`, that each step concatenates onto.
#[derive(Debug, Clone)]
pub struct KvCache<D: Storage<f32>, S: Dims = RuntimeDims> {
    pub(crate) layers: Vec<Option<KvPair<D, S>>>,
    /// The host layout, one entry per layer (`None`: the tensor layout in `layers`).
    pub(crate) host: Option<Vec<HostLayer>>,
    /// `[batch][len]`: which cached positions are real tokens.
    pub(crate) key_mask: Vec<Vec<bool>>,
    /// Next position id per row.
    pub(crate) next_pos: Vec<usize>,
}

/// One layer of a host cache: per row, its keys and values position-major, `[len, kv_heads *
/// head_dim]`, so a step appends with one `extend_from_slice` (amortised by the buffer's spare
/// capacity) and a head's key at a position is `head_dim` contiguous floats. A row's buffers may
/// hold fewer positions than the cache's [`KvCache::len`]: [`KvCache::stack`] left-pads rows
/// with masked positions logically only, so row `r`'s buffer position `p` is the cache's position
/// `p + len - rows_len(r)`.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostLayer {
    pub rows: Vec<HostKv>,
}

/// One row's keys and values of one layer ([`HostLayer`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct HostKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl HostKv {
    /// Appends whole positions of `width` floats each to the keys and values. An empty buffer
    /// starts with room for 64 more positions than the first append brings; after that the
    /// buffer's amortised doubling keeps a decoding step's cost its own position's copy.
    pub fn append(&mut self, k: &[f32], v: &[f32], width: usize) {
        for (buf, new) in [(&mut self.k, k), (&mut self.v, v)] {
            if buf.capacity() == 0 {
                buf.reserve_exact(new.len() + 64 * width);
            }
            buf.extend_from_slice(new);
        }
    }
}

impl<D: Storage<f32>, S: Dims> KvCache<D, S> {
    /// An empty cache of `layers` layers, in the host layout when `host`.
    pub(crate) fn empty(layers: usize, host: bool) -> Self {
        KvCache {
            layers: vec![None; layers],
            host: host.then(|| vec![HostLayer::default(); layers]),
            key_mask: Vec::new(),
            next_pos: Vec::new(),
        }
    }

    /// Whether every layer holds this cache's rows (a forward has run on it).
    fn filled(&self) -> bool {
        match &self.host {
            Some(h) => h.iter().all(|l| l.rows.len() == self.rows() && self.rows() > 0),
            None => self.layers.iter().all(Option::is_some),
        }
    }

    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Rows (sequences) the cache holds.
    pub fn rows(&self) -> usize {
        self.key_mask.len()
    }
}

impl<D: Device<f32>, S: Dims> KvCache<D, S> {
    /// One cache of `caches.len()` rows from caches of one row each (of one model; lengths may
    /// differ): shorter rows are left-padded with masked positions, so a decoding step over the
    /// result attends to each row's own tokens only, at each row's own positions — what
    /// continuous batching in a server needs. Returns the stacked cache and each row's padding,
    /// which [`KvCache::split`] takes back.
    pub fn stack(caches: Vec<KvCache<D, S>>) -> Result<(KvCache<D, S>, Vec<usize>), ModelError> {
        let first = caches.first().ok_or_else(|| ModelError::Batch("no KV cache to stack".into()))?;
        let layers = first.layers.len();
        let host = first.host.is_some();
        if let Some(c) =
            caches.iter().find(|c| c.rows() != 1 || c.layers.len() != layers || c.host.is_some() != host || !c.filled())
        {
            return Err(ModelError::Batch(format!(
                "only filled one-row caches of one model and layout stack (got {} rows, {} layers, {})",
                c.rows(),
                c.layers.len(),
                if c.filled() { "filled" } else { "unfilled" }
            )));
        }
        let longest = caches.iter().map(KvCache::len).max().unwrap_or(0);
        let pads: Vec<usize> = caches.iter().map(|c| longest - c.len()).collect();
        if host {
            return Ok((stack_rows(caches, &pads), pads));
        }
        if crate::kernels::is_cpu::<D>() {
            return Ok((stack_host(caches, &pads, longest), pads));
        }
        let mut key_mask = Vec::with_capacity(caches.len());
        let mut next_pos = Vec::with_capacity(caches.len());
        let mut stacked: Vec<Option<KvPair<D, S>>> = vec![None; layers];
        for (c, &pad) in caches.into_iter().zip(&pads) {
            let mut km = vec![false; pad];
            km.extend_from_slice(&c.key_mask[0]);
            key_mask.push(km);
            next_pos.push(c.next_pos.first().copied().unwrap_or(0));
            for (slot, layer) in stacked.iter_mut().zip(c.layers) {
                let (k, v) = layer.expect("checked above");
                let (k, v) = (left_pad::<D, S>(k, pad), left_pad::<D, S>(v, pad));
                *slot = Some(match slot.take() {
                    None => (k, v),
                    Some((sk, sv)) => ((sk, k).concat_along(Axis::<0>), (sv, v).concat_along(Axis::<0>)),
                });
            }
        }
        Ok((KvCache { layers: stacked, host: None, key_mask, next_pos }, pads))
    }

    /// The one-row caches [`KvCache::stack`] was given, each grown by what was appended to its row
    /// since (`pads`: what `stack` returned).
    pub fn split(self, pads: &[usize]) -> Result<Vec<KvCache<D, S>>, ModelError> {
        if pads.len() != self.rows() {
            return Err(ModelError::Batch(format!("{} paddings for a cache of {} rows", pads.len(), self.rows())));
        }
        let len = self.len();
        if self.host.is_some() {
            return Ok(self.split_rows(pads));
        }
        if crate::kernels::is_cpu::<D>() {
            return Ok(self.split_host(pads, len));
        }
        let mut out = self.empty_rows(pads);
        for layer in self.layers {
            let (k, v) = layer.ok_or_else(|| ModelError::Batch("an empty layer in a stacked cache".into()))?;
            for (r, (c, &pad)) in out.iter_mut().zip(pads).enumerate() {
                c.layers.push(Some((
                    k.clone().slice((r..r + 1, .., pad..len, ..)),
                    v.clone().slice((r..r + 1, .., pad..len, ..)),
                )));
            }
        }
        Ok(out)
    }
}

impl<D: Device<f32>, S: Dims> KvCache<D, S> {
    /// One single-row cache per row of this stacked one, without layers yet: row `r`'s key mask
    /// from its first unpadded position `pads[r]` and its next position.
    fn empty_rows(&self, pads: &[usize]) -> Vec<KvCache<D, S>> {
        pads.iter()
            .enumerate()
            .map(|(r, &pad)| KvCache {
                layers: Vec::with_capacity(self.layers.len()),
                host: None,
                key_mask: vec![self.key_mask[r][pad..].to_vec()],
                next_pos: vec![self.next_pos[r]],
            })
            .collect()
    }

    /// [`KvCache::split`] of a host cache: each row's buffers move to its own cache (no copy; the
    /// padding [`stack_rows`] added was never stored).
    fn split_rows(mut self, pads: &[usize]) -> Vec<KvCache<D, S>> {
        let mut out = self.empty_rows(pads);
        let host = self.host.take().unwrap_or_default();
        for c in out.iter_mut() {
            c.layers = vec![None; self.layers.len()];
            c.host = Some(Vec::with_capacity(host.len()));
        }
        for layer in host {
            let mut rows = layer.rows.into_iter();
            for c in out.iter_mut() {
                let row = rows.next().unwrap_or_default();
                c.host.as_mut().expect("set above").push(HostLayer { rows: vec![row] });
            }
        }
        out
    }

    /// [`KvCache::split`] on the CPU: one copy of each row's positions per layer (dfdx's slices
    /// and concatenations cost several times the copy, and the server splits and stacks its
    /// batch's caches at every step).
    fn split_host(self, pads: &[usize], len: usize) -> Vec<KvCache<D, S>> {
        let rows = pads.len();
        let mut out = self.empty_rows(pads);
        for layer in self.layers {
            let Some((k, v)) = layer else {
                out.iter_mut().for_each(|c| c.layers.push(None));
                continue;
            };
            let (_, h, _, d) = *k.shape();
            let dev = k.device().clone();
            let (kh, vh) = (k.as_vec(), v.as_vec());
            let (hs, ds) = (h.size(), d.size());
            for (r, (c, &pad)) in out.iter_mut().zip(pads).enumerate() {
                let keep = len - pad;
                let rows_of = |all: &[f32]| {
                    let mut o = Vec::with_capacity(hs * keep * ds);
                    for head in 0..hs {
                        let at = ((r * hs + head) * len + pad) * ds;
                        o.extend_from_slice(&all[at..at + keep * ds]);
                    }
                    o
                };
                let shape = (1, h, keep, d);
                c.layers
                    .push(Some((dev.tensor_from_vec(rows_of(&kh), shape), dev.tensor_from_vec(rows_of(&vh), shape))));
            }
            debug_assert_eq!(kh.len(), rows * hs * len * ds);
        }
        out
    }
}

/// [`KvCache::stack`] on the CPU: each row's positions copied once per layer into the stacked
/// tensors (zeros in the padding).
fn stack_host<D: Device<f32>, S: Dims>(caches: Vec<KvCache<D, S>>, pads: &[usize], longest: usize) -> KvCache<D, S> {
    let rows = caches.len();
    let layers = caches.first().map_or(0, |c| c.layers.len());
    let mut key_mask = Vec::with_capacity(rows);
    let mut next_pos = Vec::with_capacity(rows);
    let mut host: Vec<Vec<(Vec<f32>, Vec<f32>)>> = Vec::with_capacity(rows);
    let mut shape = None;
    let mut dev = None;
    for (c, &pad) in caches.into_iter().zip(pads) {
        let mut km = vec![false; pad];
        km.extend_from_slice(&c.key_mask[0]);
        key_mask.push(km);
        next_pos.push(c.next_pos.first().copied().unwrap_or(0));
        host.push(
            c.layers
                .into_iter()
                .map(|l| {
                    let (k, v) = l.expect("checked by KvCache::stack");
                    let (_, h, _, d) = *k.shape();
                    shape.get_or_insert((h, d));
                    dev.get_or_insert_with(|| k.device().clone());
                    (k.as_vec(), v.as_vec())
                })
                .collect(),
        );
    }
    let (Some((h, d)), Some(dev)) = (shape, dev) else {
        return KvCache { layers: vec![None; layers], host: None, key_mask, next_pos };
    };
    let (hs, ds) = (h.size(), d.size());
    let mut stacked = Vec::with_capacity(layers);
    for l in 0..layers {
        let mut kv = (vec![0f32; rows * hs * longest * ds], vec![0f32; rows * hs * longest * ds]);
        for (r, (row, &pad)) in host.iter().zip(pads).enumerate() {
            let len = longest - pad;
            let (k, v) = &row[l];
            for head in 0..hs {
                let (src, dst) = (head * len * ds, ((r * hs + head) * longest + pad) * ds);
                kv.0[dst..dst + len * ds].copy_from_slice(&k[src..src + len * ds]);
                kv.1[dst..dst + len * ds].copy_from_slice(&v[src..src + len * ds]);
            }
        }
        let shape = (rows, h, longest, d);
        stacked.push(Some((dev.tensor_from_vec(kv.0, shape), dev.tensor_from_vec(kv.1, shape))));
    }
    KvCache { layers: stacked, host: None, key_mask, next_pos }
}

/// [`KvCache::stack`] of host caches: each row's buffers move into the stacked cache as they are;
/// only the key masks are left-padded (a row's buffers are shorter than the cache by its pad).
fn stack_rows<D: Storage<f32>, S: Dims>(caches: Vec<KvCache<D, S>>, pads: &[usize]) -> KvCache<D, S> {
    let layers = caches.first().map_or(0, |c| c.layers.len());
    let mut out = KvCache::empty(layers, true);
    let host = out.host.as_mut().expect("host layout");
    for (c, &pad) in caches.into_iter().zip(pads) {
        let mut km = vec![false; pad];
        km.extend_from_slice(&c.key_mask[0]);
        out.key_mask.push(km);
        out.next_pos.push(c.next_pos.first().copied().unwrap_or(0));
        for (slot, mut layer) in host.iter_mut().zip(c.host.unwrap_or_default()) {
            slot.rows.push(layer.rows.pop().unwrap_or_default());
        }
    }
    out
}

/// `pad` zero positions before a one-row cache tensor's positions (masked out by the key mask).
fn left_pad<D: Device<f32>, S: Dims>(t: Kv<S, D, NoneTape>, pad: usize) -> Kv<S, D, NoneTape> {
    if pad == 0 {
        return t;
    }
    let (b, h, _, d) = *t.shape();
    let zeros: Kv<S, D, NoneTape> = t.device().zeros_like(&(b, h, pad, d));
    (zeros, t).concat_along(Axis::<2>)
}

/// Additive attention-mask value for hidden keys (large enough that `exp` underflows to 0).
const MASKED: f32 = -1e9;

/// Positions and the attention mask of one forward, with the cache's bookkeeping advanced.
pub(crate) struct Positions {
    /// Position id of every token, `[batch * seq]`: `cumsum(attention_mask) - 1` per row after the
    /// cached prefix (what transformers' `generate` uses, so left padding works).
    pub ids: Vec<usize>,
    /// Per row, which of the `past + seq` keys are real tokens (the attention mask).
    pub key_mask: Vec<Vec<bool>>,
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
        if let Some(c) = cache {
            c.key_mask = keymask.clone();
            if c.layers.len() != layers {
                c.layers = vec![None; layers];
            }
            if let Some(h) = c.host.as_mut().filter(|h| h.len() != layers) {
                h.resize_with(layers, Default::default);
            }
        }
        Ok(Positions { ids, key_mask: keymask, past })
    }

    /// The additive causal + padding mask `[batch, seq, past + seq]` (0 or [`MASKED`]) that
    /// dfdx's attention adds to its scores (the fused CUDA kernel needs only [`Self::key_mask`]).
    pub fn dense_mask(&self) -> Vec<f32> {
        let (b, past) = (self.key_mask.len(), self.past);
        let s = self.ids.len() / b.max(1);
        let skv = past + s;
        let mut mask = vec![MASKED; b * s * skv];
        for (r, keys) in self.key_mask.iter().enumerate() {
            for t in 0..s {
                for (j, _) in keys.iter().enumerate().take(past + t + 1).filter(|(_, &k)| k) {
                    mask[(r * s + t) * skv + j] = 0.0;
                }
            }
        }
        mask
    }
}
