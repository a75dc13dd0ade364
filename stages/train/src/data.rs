//! Data plumbing: the [`Dataset`] / [`Batch`] traits the trainer consumes, the deterministic
//! per-epoch batch order (optionally length-grouped), train/eval splitting, packing of documents
//! into blocks for pretraining, and [`TokenDataset`], the padded causal-LM batch used by pretrain
//! and SFT.
//!
//! Every order is a pure function of `(seed, epoch)`, so a resumed run recomputes the exact batch
//! sequence from the step number alone.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::TrainError;

/// A micro-batch as the trainer sees it.
pub trait Batch {
    /// This batch's share of the step's loss: the number of loss-bearing tokens for token-level
    /// objectives (SFT/pretrain: the loss of a step is the sum over all its micro-batches' tokens
    /// divided by their total count, SPECS §4), the number of examples for sequence-level ones
    /// (DPO, KTO). The trainer scales each micro-batch's mean loss by `weight / step total`.
    fn loss_weight(&self) -> f64;
    /// Tokens processed (padding excluded), for the tokens/s figure.
    fn num_tokens(&self) -> usize;
}

/// Indexable examples that can be collated into batches.
pub trait Dataset {
    type Batch: Batch;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Length of example `index` in tokens (for length grouping).
    fn example_len(&self, index: usize) -> usize;
    /// Build one batch from these examples, in this order.
    fn collate(&self, indices: &[usize]) -> Result<Self::Batch, TrainError>;
}

/// A view of some examples of another dataset.
pub struct Subset<'a, D> {
    pub inner: &'a D,
    pub indices: Vec<usize>,
}

impl<D: Dataset> Dataset for Subset<'_, D> {
    type Batch = D::Batch;
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn example_len(&self, index: usize) -> usize {
        self.inner.example_len(self.indices[index])
    }
    fn collate(&self, indices: &[usize]) -> Result<Self::Batch, TrainError> {
        let mapped: Vec<usize> = indices.iter().map(|&i| self.indices[i]).collect();
        self.inner.collate(&mapped)
    }
}

/// A ChaCha8 stream for one purpose (`tag`) of one seed; streams for different tags are
/// independent, and `tag` values are stable across versions.
pub fn rng_for(seed: u64, tag: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(tag);
    rng
}

const TAG_SPLIT: u64 = 1;
const TAG_EPOCH: u64 = 1 << 32;

/// Hold out `ceil(n * ratio)` examples for evaluation (a seeded permutation, like
/// `datasets.train_test_split(test_size=ratio)`); returns `(train, eval)` index lists, each sorted.
/// With `ratio == 0` nothing is held out. At least one example stays for training.
pub fn split_indices(n: usize, ratio: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    if ratio <= 0.0 || n < 2 {
        return (idx, Vec::new());
    }
    let n_eval = ((n as f64 * ratio).ceil() as usize).clamp(1, n - 1);
    idx.shuffle(&mut rng_for(seed, TAG_SPLIT));
    let mut eval = idx[..n_eval].to_vec();
    let mut train = idx[n_eval..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    (train, eval)
}

/// The micro-batches of one epoch, as lists of example indices.
///
/// A seeded permutation of `0..n` per epoch; with `group_by_length`, transformers'
/// `get_length_grouped_indices`: the permutation is cut into mega-batches of `50 * batch_size`,
/// each sorted by length (longest first, ties in permutation order), then cut into batches, and
/// the batch holding the longest example goes first (so an out-of-memory shows up at once).
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    group_by_length: bool,
) -> Vec<Vec<usize>> {
    let n = lengths.len();
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rng_for(seed, TAG_EPOCH + epoch));
    if group_by_length {
        let mega = 50 * batch_size;
        for chunk in perm.chunks_mut(mega) {
            chunk.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
        }
    }
    let mut batches: Vec<Vec<usize>> = perm.chunks(batch_size).map(<[usize]>::to_vec).collect();
    if group_by_length && !batches.is_empty() {
        let longest = (0..batches.len()).max_by_key(|&i| (lengths[batches[i][0]], std::cmp::Reverse(i))).unwrap_or(0);
        batches.swap(0, longest);
    }
    batches
}

/// Pack tokenised documents for causal-LM pretraining: each document followed by `eos`, all
/// concatenated, cut into blocks of exactly `block` tokens. The last partial block is dropped
/// (transformers' `run_clm.py` `group_texts`), unless it is the only one.
pub fn pack_documents(docs: &[Vec<u32>], eos: u32, block: usize) -> Vec<Vec<u32>> {
    let mut stream = Vec::with_capacity(docs.iter().map(|d| d.len() + 1).sum());
    for d in docs {
        stream.extend_from_slice(d);
        stream.push(eos);
    }
    if block == 0 || stream.is_empty() {
        return Vec::new();
    }
    if stream.len() < block {
        return vec![stream];
    }
    stream.chunks_exact(block).map(<[u32]>::to_vec).collect()
}

/// One tokenised causal-LM example: `labels[i]` says whether token `i` is a prediction target
/// (assistant tokens in SFT, every token in pretraining).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenExample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<bool>,
}

impl TokenExample {
    /// Every token is a target (pretraining).
    pub fn all_targets(input_ids: Vec<u32>) -> Self {
        let labels = vec![true; input_ids.len()];
        TokenExample { input_ids, labels }
    }
}

/// Causal-LM examples, truncated to `max_length`, right-padded per batch.
#[derive(Debug, Clone)]
pub struct TokenDataset {
    pub examples: Vec<TokenExample>,
    pub pad_id: u32,
}

impl TokenDataset {
    /// Truncate every example to `max_length` tokens. An example left with no target token after
    /// the first position is an error naming it (it would contribute nothing).
    pub fn new(mut examples: Vec<TokenExample>, pad_id: u32, max_length: usize) -> Result<Self, TrainError> {
        for (i, e) in examples.iter_mut().enumerate() {
            if e.input_ids.len() != e.labels.len() {
                return Err(TrainError::Data(format!(
                    "example {i}: {} tokens but {} labels",
                    e.input_ids.len(),
                    e.labels.len()
                )));
            }
            e.input_ids.truncate(max_length);
            e.labels.truncate(max_length);
            if !e.labels.iter().skip(1).any(|&l| l) {
                return Err(TrainError::Data(format!("example {i}: no target token within max_length = {max_length}")));
            }
        }
        Ok(TokenDataset { examples, pad_id })
    }
}

/// A right-padded causal-LM batch, shifted for next-token prediction: position `t` of row `b`
/// reads `input_ids[b, t]` and predicts `targets[b, t]` (= the input token at `t + 1`) where
/// `loss_mask[b, t] == 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct LmBatch {
    pub batch: usize,
    pub seq: usize,
    /// `batch * seq`, row-major, padded with the pad id.
    pub input_ids: Vec<usize>,
    /// `batch * seq`: 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<f32>,
    /// `batch * seq`: the next token (pad id where there is none).
    pub targets: Vec<usize>,
    /// `batch * seq`: 1 where `targets` is a labelled token.
    pub loss_mask: Vec<f32>,
    /// Number of ones in `loss_mask`.
    pub n_targets: usize,
    /// Real tokens in the batch.
    pub n_tokens: usize,
}

impl Batch for LmBatch {
    fn loss_weight(&self) -> f64 {
        self.n_targets as f64
    }
    fn num_tokens(&self) -> usize {
        self.n_tokens
    }
}

impl LmBatch {
    /// Collate token examples (right padding).
    pub fn from_examples(examples: &[&TokenExample], pad_id: u32) -> Self {
        let batch = examples.len();
        let seq = examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
        let mut b = LmBatch {
            batch,
            seq,
            input_ids: vec![pad_id as usize; batch * seq],
            attention_mask: vec![0.0; batch * seq],
            targets: vec![pad_id as usize; batch * seq],
            loss_mask: vec![0.0; batch * seq],
            n_targets: 0,
            n_tokens: 0,
        };
        for (r, e) in examples.iter().enumerate() {
            let row = r * seq;
            for (t, &id) in e.input_ids.iter().enumerate() {
                b.input_ids[row + t] = id as usize;
                b.attention_mask[row + t] = 1.0;
                if t + 1 < e.input_ids.len() {
                    b.targets[row + t] = e.input_ids[t + 1] as usize;
                    if e.labels[t + 1] {
                        b.loss_mask[row + t] = 1.0;
                        b.n_targets += 1;
                    }
                }
            }
            b.n_tokens += e.input_ids.len();
        }
        b
    }
}

impl Dataset for TokenDataset {
    type Batch = LmBatch;
    fn len(&self) -> usize {
        self.examples.len()
    }
    fn example_len(&self, index: usize) -> usize {
        self.examples[index].input_ids.len()
    }
    fn collate(&self, indices: &[usize]) -> Result<LmBatch, TrainError> {
        let ex: Vec<&TokenExample> = indices.iter().map(|&i| &self.examples[i]).collect();
        Ok(LmBatch::from_examples(&ex, self.pad_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_and_disjoint() {
        let (t1, e1) = split_indices(100, 0.1, 7);
        let (t2, e2) = split_indices(100, 0.1, 7);
        assert_eq!((t1.clone(), e1.clone()), (t2, e2));
        assert_eq!(e1.len(), 10);
        assert_eq!(t1.len(), 90);
        assert!(e1.iter().all(|i| !t1.contains(i)));
        let (_, e3) = split_indices(100, 0.1, 8);
        assert_ne!(e1, e3);
        assert_eq!(split_indices(5, 0.0, 1).1.len(), 0);
        assert_eq!(split_indices(3, 0.01, 1).1.len(), 1);
    }

    #[test]
    fn epoch_batches_cover_everything_once_and_differ_per_epoch() {
        let lengths: Vec<usize> = (0..23).map(|i| (i * 7) % 11 + 1).collect();
        for group in [false, true] {
            let b0 = epoch_batches(&lengths, 4, 3, 0, group);
            let mut all: Vec<usize> = b0.concat();
            all.sort_unstable();
            assert_eq!(all, (0..23).collect::<Vec<_>>());
            assert_eq!(b0, epoch_batches(&lengths, 4, 3, 0, group));
            assert_ne!(b0, epoch_batches(&lengths, 4, 3, 1, group));
        }
    }

    #[test]
    fn length_grouping_sorts_within_megabatches_and_puts_longest_first() {
        let lengths: Vec<usize> = (0..40).map(|i| (i * 13) % 17 + 1).collect();
        let b = epoch_batches(&lengths, 4, 5, 0, true);
        let max = *lengths.iter().max().unwrap();
        assert_eq!(lengths[b[0][0]], max);
        // One mega-batch (50 * 4 > 40): every batch but the swapped ones is sorted descending.
        for batch in &b {
            let l: Vec<usize> = batch.iter().map(|&i| lengths[i]).collect();
            assert!(l.windows(2).all(|w| w[0] >= w[1]), "{l:?}");
        }
    }

    #[test]
    fn packing_separates_documents_with_eos() {
        let docs = vec![vec![1, 2, 3], vec![4, 5], vec![6]];
        assert_eq!(pack_documents(&docs, 0, 3), vec![vec![1, 2, 3], vec![0, 4, 5], vec![0, 6, 0]]);
        assert_eq!(pack_documents(&docs, 0, 4), vec![vec![1, 2, 3, 0], vec![4, 5, 0, 6]]);
        assert_eq!(pack_documents(&[vec![1]], 9, 8), vec![vec![1, 9]]);
    }

    #[test]
    fn lm_batch_shifts_masks_and_pads() {
        let a = TokenExample { input_ids: vec![10, 11, 12, 13], labels: vec![false, false, true, true] };
        let b = TokenExample::all_targets(vec![20, 21]);
        let batch = LmBatch::from_examples(&[&a, &b], 0);
        assert_eq!((batch.batch, batch.seq), (2, 4));
        assert_eq!(batch.input_ids, vec![10, 11, 12, 13, 20, 21, 0, 0]);
        assert_eq!(batch.targets, vec![11, 12, 13, 0, 21, 0, 0, 0]);
        assert_eq!(batch.loss_mask, vec![0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(batch.attention_mask, vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(batch.n_targets, 3);
        assert_eq!(batch.n_tokens, 6);
    }

    #[test]
    fn truncation_and_empty_targets() {
        let e = TokenExample { input_ids: vec![1, 2, 3, 4], labels: vec![false, false, false, true] };
        let err = TokenDataset::new(vec![e.clone()], 0, 3).unwrap_err().to_string();
        assert!(err.contains("example 0"), "{err}");
        let ds = TokenDataset::new(vec![e], 0, 4).unwrap();
        assert_eq!(ds.example_len(0), 4);
    }
}
