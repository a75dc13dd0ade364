//! The loop on pipeline-model's real Qwen2 (the built-in tiny preset, random init): pretraining
//! on a packed corpus, LoRA SFT with assistant-only loss, exact resume, DPO and KTO with the
//! adapters-disabled reference.

use std::path::Path;

use dfdx::prelude::*;
use pipeline_model::{Dims, LoraConfig, ModelConfig, Qwen2, RuntimeDims, TinyDims, Trainable};
use pipeline_train::lm::{
    full_decay_mask, precompute_dpo_reference, precompute_kto_reference, CausalLmObjective, DpoObjective, KtoDataset,
    KtoObjective, PairDataset, PairExample, TrainModel,
};
use pipeline_train::{
    pack_documents, train, Callbacks, Control, DpoConfig, KtoConfig, Record, SchedulerType, TokenDataset, TokenExample,
    TrainConfig, TrainPaths,
};

const VOCAB: usize = 40;

fn tiny(seed: u64) -> (Cpu, Qwen2<Cpu>) {
    tiny_as(seed)
}

/// The tiny preset with dimension types `S` (`TinyDims`: compile-time, as the pretrain stage
/// builds it; `RuntimeDims`: as a checkpoint from disk loads).
fn tiny_as<S: Dims>(seed: u64) -> (Cpu, Qwen2<Cpu, S>) {
    let dev = Cpu::default();
    let cfg = ModelConfig::tiny(VOCAB);
    let m = Qwen2::from_host_with_dims(&cfg, &Qwen2::<Cpu>::random_host(&cfg, seed), &dev).unwrap();
    (dev, m)
}

fn paths(root: &Path, name: &str) -> TrainPaths {
    TrainPaths { checkpoints: root.join(name).join("scratch"), report: root.join(name).join("out") }
}

fn losses(h: &[Record]) -> Vec<f64> {
    h.iter().filter_map(|r| if let Record::Train(t) = r { Some(t.loss) } else { None }).collect()
}

struct Quiet;
impl Callbacks for Quiet {}

fn base_cfg() -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-2,
        per_device_train_batch_size: 4,
        warmup_ratio: 0.0,
        lr_scheduler_type: SchedulerType::Constant,
        logging_steps: 1,
        save_steps: 1000,
        split_ratio: 0.0,
        ..Default::default()
    }
}

#[test]
fn pretrain_tiny_from_random_init_on_a_packed_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<Vec<u32>> =
        (0..12).map(|d| (0..(5 + d % 4)).map(|t| ((d * 7 + t * 3) % 37 + 2) as u32).collect()).collect();
    let blocks = pack_documents(&docs, 1, 16);
    assert!(blocks.iter().all(|b| b.len() == 16));
    let data = TokenDataset::new(blocks.into_iter().map(TokenExample::all_targets).collect(), 0, 16).unwrap();
    let (dev, mut m) = tiny(1);
    m.set_trainable(Trainable::Full, 1).unwrap();
    let mask = full_decay_mask(&m).expect("flat layout verified");
    assert_eq!(mask.len(), m.params.flat.as_vec().len());
    // 2 layers × (2 norms + 3 q/k/v biases) + the final norm are not decayed.
    let h = 64;
    let kv = 2 * 16;
    assert_eq!(mask.iter().filter(|d| !**d).count(), 2 * (2 * h + h + 2 * kv) + h);
    let cfg = TrainConfig { max_steps: 40, weight_decay: 0.1, ..base_cfg() };
    let mut tm = TrainModel(m);
    let out = train(&cfg, 1, &dev, &mut tm, &mut CausalLmObjective, &data, None, &paths(dir.path(), "pt"), &mut Quiet)
        .unwrap();
    let l = losses(&out.history);
    assert!(l[0] > 3.4, "starts near ln(40) = 3.69: {l:?}");
    assert!(*l.last().unwrap() < 0.5 * l[0], "{l:?}");
}

fn sft_set() -> TokenDataset {
    // "prompt" tokens 2..=9 (unlabelled), "answer" tokens from 20 (labelled): a memorisation set.
    let ex = (0..8u32)
        .map(|i| {
            let prompt = vec![2 + i, 3 + (i % 5), 10];
            let answer = vec![20 + (i * 3) % 17, 21 + (i * 5) % 13, 1];
            let labels = [vec![false; prompt.len()], vec![true; answer.len()]].concat();
            TokenExample { input_ids: [prompt, answer].concat(), labels }
        })
        .collect();
    TokenDataset::new(ex, 0, 32).unwrap()
}

struct StopAt(u64);
impl Callbacks for StopAt {
    fn control(&mut self, next: u64) -> Control {
        if next == self.0 {
            Control::Abort
        } else {
            Control::Continue
        }
    }
}

fn sft_run(p: &TrainPaths, cb: &mut dyn Callbacks) -> (Vec<Record>, Qwen2<Cpu>) {
    sft_run_as(p, cb)
}

fn sft_run_as<S: Dims>(p: &TrainPaths, cb: &mut dyn Callbacks) -> (Vec<Record>, Qwen2<Cpu, S>) {
    let (dev, mut m) = tiny_as::<S>(2);
    // with LoRA dropout: its masks come from the step seeds, so the resume below stays exact
    let lc = LoraConfig::all_linear(4, 8.0).with_dropout(0.1).unwrap();
    m.set_trainable(Trainable::Lora(lc), 2).unwrap();
    let cfg = TrainConfig {
        max_steps: 16,
        learning_rate: 5e-2,
        gradient_accumulation_steps: 2,
        per_device_train_batch_size: 2,
        save_steps: 5,
        warmup_ratio: 0.1,
        lr_scheduler_type: SchedulerType::Cosine,
        ..base_cfg()
    };
    let data = sft_set();
    let mut tm = TrainModel(m);
    let out = train(&cfg, 3, &dev, &mut tm, &mut CausalLmObjective, &data, None, p, cb).unwrap();
    (out.history, tm.0)
}

#[test]
fn lora_sft_learns_trains_only_adapters_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (full, m) = sft_run(&paths(dir.path(), "full"), &mut Quiet);
    let l = losses(&full);
    assert!(*l.last().unwrap() < l[0] - 0.4, "{l:?}");
    // The base weights are untouched: only the adapters moved.
    let (_, fresh) = tiny(2);
    assert_eq!(m.to_host(), fresh.to_host());
    assert!(m.lora_to_host().values().any(|t| t.data.iter().any(|&x| x != 0.0)));

    let p = paths(dir.path(), "killed");
    let (part, _) = sft_run(&p, &mut StopAt(8));
    assert_eq!(losses(&part).len(), 8);
    let (resumed, m2) = sft_run(&p, &mut Quiet);
    let key = |h: &[Record]| -> Vec<String> {
        h.iter()
            .map(|r| match r {
                Record::Train(t) => format!("{} {:e} {:e} {:e}", t.step, t.loss, t.learning_rate, t.grad_norm),
                Record::Eval(e) => format!("eval {} {:e}", e.step, e.eval_loss),
            })
            .collect()
    };
    assert_eq!(key(&resumed), key(&full), "LoRA SFT loss curve after resume");
    assert_eq!(m2.lora_to_host(), m.lora_to_host());

    // The adapter is written in peft's layout.
    let out = dir.path().join("adapter");
    m.save_adapter(&out, "tiny").unwrap();
    assert!(out.join("adapter_config.json").is_file() && out.join("adapter_model.safetensors").is_file());
}

fn pairs() -> PairDataset {
    let examples = (0..6u32)
        .map(|i| PairExample {
            prompt: vec![2 + i, 10],
            chosen: vec![20 + i, 21, 1],
            rejected: vec![30 + i % 5, 31, 1],
            reference: None,
        })
        .collect();
    PairDataset { examples, pad_id: 0, max_length: 32 }
}

#[test]
fn dpo_with_lora_starts_at_ln2_and_learns_the_preference() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, mut m) = tiny(4);
    m.set_trainable(Trainable::Lora(LoraConfig::all_linear(4, 8.0)), 4).unwrap();
    let mut data = pairs();
    precompute_dpo_reference(&mut m, &mut data, 4).unwrap();
    assert!(m.adapters_enabled(), "adapters are back on after the reference pass");
    let cfg = TrainConfig { max_steps: 30, learning_rate: 5e-3, per_device_train_batch_size: 6, ..base_cfg() };
    let mut obj = DpoObjective { cfg: DpoConfig { beta: 0.1, label_smoothing: 0.0, rpo_alpha: None } };
    let mut tm = TrainModel(m);
    let out = train(&cfg, 4, &dev, &mut tm, &mut obj, &data, None, &paths(dir.path(), "dpo"), &mut Quiet).unwrap();
    let recs: Vec<_> =
        out.history.iter().filter_map(|r| if let Record::Train(t) = r { Some(t) } else { None }).collect();
    // B = 0 at init: policy == reference, logits 0, loss -log σ(0) = ln 2.
    assert!((recs[0].loss - std::f64::consts::LN_2).abs() < 1e-5, "{}", recs[0].loss);
    assert!(recs[0].metrics["rewards/chosen"].abs() < 1e-5);
    let last = recs.last().unwrap();
    assert!(
        last.loss < 0.5,
        "{:?}",
        recs.iter().map(|r| (r.loss, r.grad_norm, r.metrics["rewards/margins"])).collect::<Vec<_>>()
    );
    assert_eq!(last.metrics["rewards/accuracies"], 1.0);
    assert!(last.metrics["rewards/margins"] > 0.0);
}

#[test]
fn kto_with_lora_starts_at_one_half_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let (dev, mut m) = tiny(5);
    m.set_trainable(Trainable::Lora(LoraConfig::all_linear(4, 8.0)), 5).unwrap();
    let rows: Vec<(Vec<u32>, Vec<u32>, bool)> =
        (0..8u32).map(|i| (vec![2 + i, 10], vec![20 + (i % 4) * 3, 21, 1], i % 2 == 0)).collect();
    let mut data = KtoDataset::new(rows, 0, 32);
    assert_eq!(data.examples[1].kl_completion, data.examples[0].completion);
    precompute_kto_reference(&mut m, &mut data, 4).unwrap();
    // Batches of 3 out of 8: some hold only desirable or only undesirable examples.
    let cfg = TrainConfig { max_steps: 30, learning_rate: 5e-3, per_device_train_batch_size: 3, ..base_cfg() };
    let mut obj = KtoObjective { cfg: KtoConfig::default() };
    let mut tm = TrainModel(m);
    let out = train(&cfg, 5, &dev, &mut tm, &mut obj, &data, None, &paths(dir.path(), "kto"), &mut Quiet).unwrap();
    let recs: Vec<_> =
        out.history.iter().filter_map(|r| if let Record::Train(t) = r { Some(t) } else { None }).collect();
    // r = 0 and z = 0 at init: every loss is 1 − σ(0) = 0.5.
    assert!((recs[0].loss - 0.5).abs() < 1e-6, "{}", recs[0].loss);
    assert_eq!(recs[0].metrics["kl"], 0.0);
    // The last epoch (3 steps) as a whole has learned; margins exist where a batch has both kinds.
    let tail: f64 = recs[recs.len() - 3..].iter().map(|r| r.loss).sum::<f64>() / 3.0;
    assert!(tail < 0.45, "{tail}");
    let with_margins = recs.iter().rev().find(|r| r.metrics.contains_key("rewards/margins")).unwrap();
    assert!(with_margins.metrics["rewards/margins"] > 0.0);
}

/// The trainer runs the compile-time tiny model (`TinyDims`, what the pretrain stage builds) and
/// the runtime one identically: same losses, learning rates and gradient norms at every step,
/// bit-identical adapters at the end.
#[test]
fn compile_time_tiny_trains_exactly_like_the_runtime_model() {
    let dir = tempfile::tempdir().unwrap();
    let (h_rt, m_rt) = sft_run_as::<RuntimeDims>(&paths(dir.path(), "rt"), &mut Quiet);
    let (h_ct, m_ct) = sft_run_as::<TinyDims>(&paths(dir.path(), "ct"), &mut Quiet);
    let key = |h: &[Record]| -> Vec<String> {
        h.iter()
            .map(|r| match r {
                Record::Train(t) => format!("{} {:e} {:e} {:e}", t.step, t.loss, t.learning_rate, t.grad_norm),
                Record::Eval(e) => format!("eval {} {:e}", e.step, e.eval_loss),
            })
            .collect()
    };
    assert_eq!(key(&h_rt).len(), 16);
    assert_eq!(key(&h_ct), key(&h_rt));
    assert_eq!(m_ct.lora_to_host(), m_rt.lora_to_host());
}

/// Regression (issue 17): with `gradient_accumulation_steps > 1` the Qwen2 model trained on the
/// last micro-batch of each step only (dfdx's tape merge replaced the accumulated gradient of
/// `params.flat` with a fresh zero buffer). Two micro-batches of one example now step exactly like
/// one batch of both (equal lengths and label counts, so the token-mean loss is the same).
#[test]
fn gradient_accumulation_steps_like_one_batch_of_the_same_examples() {
    let ex: Vec<TokenExample> = (0..8u32)
        .map(|i| {
            let prompt = vec![2 + i, 3 + (i % 5), 10];
            let answer = vec![20 + (i * 3) % 17, 21 + (i * 5) % 13, 1];
            TokenExample { input_ids: [prompt, answer].concat(), labels: vec![false, false, false, true, true, true] }
        })
        .collect();
    let data = TokenDataset::new(ex, 0, 32).unwrap();
    let run = |bs: usize, accum: usize, name: &str| {
        let dir = tempfile::tempdir().unwrap();
        let (dev, mut m) = tiny(2);
        m.set_trainable(Trainable::Lora(LoraConfig::all_linear(4, 8.0)), 2).unwrap();
        let cfg = TrainConfig {
            max_steps: 6,
            per_device_train_batch_size: bs,
            gradient_accumulation_steps: accum,
            group_by_length: false,
            ..base_cfg()
        };
        let mut tm = TrainModel(m);
        let out =
            train(&cfg, 3, &dev, &mut tm, &mut CausalLmObjective, &data, None, &paths(dir.path(), name), &mut Quiet)
                .unwrap();
        let norms: Vec<f64> = out
            .history
            .iter()
            .filter_map(|r| if let Record::Train(t) = r { Some(t.grad_norm) } else { None })
            .collect();
        (losses(&out.history), norms)
    };
    let (l1, g1) = run(2, 1, "batch");
    let (l2, g2) = run(1, 2, "accum");
    for (a, b) in l1.iter().zip(&l2).chain(g1.iter().zip(&g2)) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "batch of 2 {l1:?} {g1:?}\naccumulated {l2:?} {g2:?}");
    }
}
