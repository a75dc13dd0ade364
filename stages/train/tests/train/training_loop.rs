//! The loop on the tiny model: memorisation, determinism, exact resume after a kill, gradient
//! accumulation, early stopping with best-checkpoint selection, checkpoint rotation.

use std::path::Path;

use pipeline_train::params::read_params;
use pipeline_train::{
    split_indices, train, Callbacks, Control, Record, StopReason, Subset, TrainConfig, TrainError, TrainOutcome,
    TrainPaths,
};

use crate::tiny::{contradicting_set, memorisation_set, model, CausalLm};

fn paths(root: &Path, name: &str) -> TrainPaths {
    TrainPaths { checkpoints: root.join(name).join("scratch"), report: root.join(name).join("out") }
}

fn cfg() -> TrainConfig {
    TrainConfig {
        learning_rate: 3e-2,
        max_steps: 12,
        per_device_train_batch_size: 2,
        per_device_eval_batch_size: 3,
        gradient_accumulation_steps: 2,
        warmup_ratio: 0.2,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        logging_steps: 1,
        eval_steps: Some(3),
        save_steps: 4,
        split_ratio: 0.2,
        ..Default::default()
    }
}

/// Stops (as a kill would, or with a checkpoint) before step `at`.
struct StopAt(u64, Control);
impl Callbacks for StopAt {
    fn control(&mut self, next_step: u64) -> Control {
        if next_step == self.0 {
            self.1
        } else {
            Control::Continue
        }
    }
}

struct Quiet;
impl Callbacks for Quiet {}

fn run(cfg: &TrainConfig, init_seed: u64, p: &TrainPaths, cb: &mut dyn Callbacks) -> (TrainOutcome, Vec<f32>) {
    let data = memorisation_set(20);
    let (tr, ev) = split_indices(data.examples.len(), cfg.split_ratio, 7);
    let (train_set, eval_set) = (Subset { inner: &data, indices: tr }, Subset { inner: &data, indices: ev });
    let (dev, mut m) = model(init_seed);
    let out = train(cfg, 7, &dev, &mut m, &mut CausalLm, &train_set, Some(&eval_set), p, cb).unwrap();
    let flat = read_params(&m).unwrap().into_iter().flat_map(|t| t.data).collect();
    (out, flat)
}

fn train_losses(h: &[Record]) -> Vec<f64> {
    h.iter().filter_map(|r| if let Record::Train(t) = r { Some(t.loss) } else { None }).collect()
}

/// The history without the wall-clock figure.
fn curve(h: &[Record]) -> Vec<String> {
    h.iter()
        .map(|r| match r {
            Record::Train(t) => {
                format!("train {} {} {:e} {:e} {:e}", t.step, t.epoch, t.loss, t.learning_rate, t.grad_norm)
            }
            Record::Eval(e) => format!("eval {} {:e}", e.step, e.eval_loss),
        })
        .collect()
}

#[test]
fn loss_decreases_on_a_memorisation_set() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        learning_rate: 5e-2,
        num_train_epochs: 40.0,
        per_device_train_batch_size: 4,
        warmup_ratio: 0.0,
        weight_decay: 0.0,
        lr_scheduler_type: pipeline_train::SchedulerType::Constant,
        logging_steps: 5,
        save_steps: 1000,
        ..Default::default()
    };
    let data = memorisation_set(12);
    let (dev, mut m) = model(1);
    let out = train(&cfg, 1, &dev, &mut m, &mut CausalLm, &data, None, &paths(dir.path(), "m"), &mut Quiet).unwrap();
    let l = train_losses(&out.history);
    assert_eq!(out.global_step, 120);
    assert_eq!(out.stop, StopReason::Completed);
    assert!(l[0] > 2.0, "starts near ln(16) = 2.77: {l:?}");
    assert!(*l.last().unwrap() < 0.1, "memorised: {l:?}");
    assert!(out.metrics_path.is_file() && out.loss_curve_path.is_file());
}

#[test]
fn same_seed_same_curve() {
    let dir = tempfile::tempdir().unwrap();
    let (a, pa) = run(&cfg(), 3, &paths(dir.path(), "a"), &mut Quiet);
    let (b, pb) = run(&cfg(), 3, &paths(dir.path(), "b"), &mut Quiet);
    assert_eq!(curve(&a.history), curve(&b.history));
    assert_eq!(pa, pb);
}

#[test]
fn resume_after_kill_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (full, full_params) = run(&cfg(), 3, &paths(dir.path(), "full"), &mut Quiet);
    assert_eq!(full.global_step, 12);

    // Killed before step 7: the last checkpoint is step 4; steps 5 and 6 are lost.
    let p = paths(dir.path(), "killed");
    let (part, _) = run(&cfg(), 3, &p, &mut StopAt(6, Control::Abort));
    assert_eq!((part.stop, part.global_step), (StopReason::Interrupted, 6));
    assert!(p.checkpoints.join("checkpoint-4").is_dir());
    assert!(!p.checkpoints.join("checkpoint-6").exists());

    // Everything in memory is dropped; a model from another init seed proves the params are restored.
    let (resumed, resumed_params) = run(&cfg(), 99, &p, &mut Quiet);
    assert_eq!(resumed.plan.resumed_from, Some(4));
    assert_eq!(resumed.stop, StopReason::Completed);
    assert_eq!(curve(&resumed.history), curve(&full.history), "loss curve after resume");
    assert_eq!(resumed_params, full_params, "final parameters, bit for bit");
    let jsonl = std::fs::read_to_string(&resumed.metrics_path).unwrap();
    assert_eq!(jsonl.lines().count(), full.history.len());
}

#[test]
fn interrupt_saves_a_checkpoint_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (full, full_params) = run(&cfg(), 3, &paths(dir.path(), "full"), &mut Quiet);
    let p = paths(dir.path(), "int");
    let (part, _) = run(&cfg(), 3, &p, &mut StopAt(5, Control::Interrupt));
    assert_eq!(part.stop, StopReason::Interrupted);
    assert!(p.checkpoints.join("checkpoint-5").is_dir());
    let (resumed, params) = run(&cfg(), 3, &p, &mut Quiet);
    assert_eq!(resumed.plan.resumed_from, Some(5));
    assert_eq!(curve(&resumed.history), curve(&full.history));
    assert_eq!(params, full_params);
}

#[test]
fn other_settings_refuse_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let p = paths(dir.path(), "x");
    run(&cfg(), 3, &p, &mut StopAt(5, Control::Interrupt));
    let data = memorisation_set(20);
    let (dev, mut m) = model(3);
    let other = TrainConfig { learning_rate: 1e-3, ..cfg() };
    let err = train(&other, 7, &dev, &mut m, &mut CausalLm, &data, None, &p, &mut Quiet).unwrap_err();
    assert!(matches!(err, TrainError::Resume(_)), "{err}");
    assert!(err.to_string().contains("checkpoint-5"), "{err}");
}

#[test]
fn accumulation_equals_a_larger_batch() {
    // 2 micro-batches of 2 with token-weighted averaging == one batch of 4 (SPECS §4).
    let dir = tempfile::tempdir().unwrap();
    let base = TrainConfig { split_ratio: 0.0, group_by_length: false, eval_steps: None, ..cfg() };
    let a_cfg = TrainConfig { per_device_train_batch_size: 4, gradient_accumulation_steps: 1, ..base.clone() };
    let b_cfg = TrainConfig { per_device_train_batch_size: 2, gradient_accumulation_steps: 2, ..base };
    let data = memorisation_set(16);
    let mut results = Vec::new();
    for (name, c) in [("a", a_cfg), ("b", b_cfg)] {
        let (dev, mut m) = model(5);
        let out = train(&c, 7, &dev, &mut m, &mut CausalLm, &data, None, &paths(dir.path(), name), &mut Quiet).unwrap();
        results.push((train_losses(&out.history), read_params(&m).unwrap()));
    }
    let ((la, pa), (lb, pb)) = (&results[0], &results[1]);
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(lb) {
        assert!((x - y).abs() < 1e-5 * x.abs().max(1.0), "{la:?} vs {lb:?}");
    }
    for (ta, tb) in pa.iter().zip(pb) {
        for (x, y) in ta.data.iter().zip(&tb.data) {
            assert!((x - y).abs() < 1e-4, "{}: {x} vs {y}", ta.name);
        }
    }
}

#[test]
fn early_stopping_restores_the_best_checkpoint() {
    // Training on the cycle makes the contradicting eval set worse and worse.
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        learning_rate: 5e-2,
        max_steps: 60,
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 1,
        warmup_ratio: 0.0,
        eval_steps: Some(2),
        save_steps: 2,
        save_total_limit: Some(2),
        early_stopping_patience: Some(3),
        ..cfg()
    };
    let train_set = memorisation_set(12);
    let eval_set = contradicting_set(6);
    let (dev, mut m) = model(2);
    let p = paths(dir.path(), "es");
    let out = train(&c, 7, &dev, &mut m, &mut CausalLm, &train_set, Some(&eval_set), &p, &mut Quiet).unwrap();
    assert_eq!(out.stop, StopReason::EarlyStopped);
    assert!(out.global_step < 60);
    let best = out.best_step.unwrap();
    assert_eq!(out.global_step, best + 3 * 2, "three evaluations without improvement");
    let evals: Vec<f64> =
        out.history.iter().filter_map(|r| if let Record::Eval(e) = r { Some(e.eval_loss) } else { None }).collect();
    assert_eq!(evals.iter().cloned().fold(f64::INFINITY, f64::min), out.best_eval_loss.unwrap());
    // The model holds the best parameters, not the last ones.
    let stored =
        pipeline_train::checkpoint::load::<serde_json::Value>(&p.checkpoints.join(format!("best-{best}"))).unwrap();
    let mut now = read_params(&m).unwrap();
    now.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(now, stored.params);
    // save_total_limit = 2.
    let kept = pipeline_train::checkpoint::list(&p.checkpoints, "checkpoint").unwrap();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert_eq!(kept.last().unwrap().0, out.global_step);
}

/// Slow steps (a sleep in `control`), then a kill (`Abort`, nothing saved) at `kill_at`.
struct SlowThenKilled {
    step_time: std::time::Duration,
    kill_at: u64,
    resumed: Vec<(u64, String)>,
}
impl Callbacks for SlowThenKilled {
    fn control(&mut self, next_step: u64) -> Control {
        if next_step == self.kill_at {
            return Control::Abort;
        }
        std::thread::sleep(self.step_time);
        Control::Continue
    }
    fn on_resume(&mut self, step: u64, checkpoint: &str) {
        self.resumed.push((step, checkpoint.to_string()));
    }
}

/// Regression (issue 14, defect 2): with `save_steps` larger than the run, a kill lost every step
/// done, and the re-run started at step 0 without a word. Checkpoints are now also taken by wall
/// clock (`save_interval_secs`), and the re-run says where it resumes.
#[test]
fn kill_before_the_first_save_step_loses_at_most_the_save_interval() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { save_steps: 1000, eval_steps: Some(1000), save_interval_secs: 1, ..cfg() };
    let (full, full_params) = run(&cfg, 3, &paths(dir.path(), "full"), &mut Quiet);
    let p = paths(dir.path(), "killed");
    // 300 ms a step: a wall-clock checkpoint after step 4 (1.2 s), killed before step 8.
    let mut cb = SlowThenKilled { step_time: std::time::Duration::from_millis(300), kill_at: 8, resumed: vec![] };
    let (part, _) = run(&cfg, 3, &p, &mut cb);
    assert_eq!(part.stop, StopReason::Interrupted);
    let saved: Vec<u64> =
        pipeline_train::checkpoint::list(&p.checkpoints, "checkpoint").unwrap().into_iter().map(|c| c.0).collect();
    assert!(saved.last().is_some_and(|&s| (2..=8).contains(&s)), "checkpoints by wall clock: {saved:?}");
    let mut cb = SlowThenKilled { step_time: std::time::Duration::ZERO, kill_at: u64::MAX, resumed: vec![] };
    let (resumed, params) = run(&cfg, 99, &p, &mut cb);
    let last = *saved.last().unwrap();
    assert_eq!(cb.resumed, vec![(last, format!("checkpoint-{last}"))]);
    assert_eq!(resumed.plan.resumed_from, Some(last));
    assert_eq!(curve(&resumed.history), curve(&full.history));
    assert_eq!(params, full_params, "a wall-clock checkpoint resumes exactly");
}
