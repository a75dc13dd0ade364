//! A tiny dfdx language model for the loop tests: an embedding and a linear head (a bigram
//! model), trained with the real causal-LM objective of the crate.

use dfdx::prelude::*;
use pipeline_train::{
    masked_mean_nll, token_logprobs, LmBatch, LossOutput, Objective, StepInfo, TokenDataset, TokenExample, TrainError,
};

pub const VOCAB: usize = 16;
pub type Arch = (Embedding<VOCAB, 8>, Linear<8, VOCAB>);
pub type Model = <Arch as BuildOnDevice<Cpu, f32>>::Built;

pub fn model(seed: u64) -> (Cpu, Model) {
    let dev = Cpu::seed_from_u64(seed);
    let m = dev.build_module::<Arch, f32>();
    (dev, m)
}

/// Next-token cross-entropy on the labelled tokens.
pub struct CausalLm;

impl Objective<Model, Cpu> for CausalLm {
    type Batch = LmBatch;
    fn loss<T: Tape<f32, Cpu>>(
        &mut self,
        m: &Model,
        b: &LmBatch,
        tape: T,
        _info: &StepInfo,
    ) -> Result<LossOutput<Cpu, T>, TrainError> {
        let dev = m.0.weight.device().clone();
        let ids = dev.tensor_from_vec(b.input_ids.clone(), (b.batch, b.seq)).put_tape(tape);
        let logits = m.forward(ids).reshape_like(&(b.batch, b.seq, VOCAB));
        let lp = token_logprobs(logits, &b.targets)?;
        Ok(LossOutput { loss: masked_mean_nll(lp, &b.loss_mask)?, metrics: vec![] })
    }
}

/// Windows of the cycle 1 → 2 → … → 15 → 1 (every token has one successor, so the set can be
/// memorised), of varied lengths; the first two tokens of each are a "prompt" without labels.
pub fn memorisation_set(n: usize) -> TokenDataset {
    let examples = (0..n)
        .map(|i| {
            let len = 3 + (i * 5) % 7;
            let ids: Vec<u32> = (0..len).map(|t| ((i * 3 + t) % 15 + 1) as u32).collect();
            let labels = (0..len).map(|t| t >= 2).collect();
            TokenExample { input_ids: ids, labels }
        })
        .collect();
    TokenDataset::new(examples, 0, 64).unwrap()
}

/// Sequences that contradict the memorisation set (every token followed by its predecessor).
pub fn contradicting_set(n: usize) -> TokenDataset {
    let examples = (0..n)
        .map(|i| {
            let ids: Vec<u32> = (0..6).map(|t| (((i * 2 + 30) - t) % 15 + 1) as u32).collect();
            TokenExample::all_targets(ids)
        })
        .collect();
    TokenDataset::new(examples, 0, 64).unwrap()
}
