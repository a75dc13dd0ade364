//! What the `pretrain` / `sft` / `align` stages share: [`RunCtxCallbacks`] maps the loop's
//! callbacks onto the engine's `RunCtx` (progress bar, metrics, messages, Ctrl-C), [`paths`]
//! puts checkpoints in the stage's scratch directory (so a killed run resumes) and the metrics in
//! its output, [`report`] is the JSON summary the run summary shows, and [`stage_error`] turns a
//! [`TrainError`] into a `StageError`.

use pipeline_engine::{RunCtx, StageError};

use crate::metrics::Record;
use crate::trainer::{Callbacks, Control, StopReason, TrainOutcome, TrainPaths, TrainPlan};
use crate::TrainError;

/// Reports a training run through a stage's [`RunCtx`]:
/// a progress bar over optimizer steps, `ctx.metric` for `loss`, `learning_rate`, `grad_norm`,
/// `tokens_per_second`, `eval_loss` and every objective figure (DPO rewards...), a message per
/// resume / early stop / best-checkpoint load, and a checkpoint-then-stop on Ctrl-C.
pub struct RunCtxCallbacks<'a> {
    pub ctx: &'a RunCtx,
    /// Progress-bar label, e.g. `"sft"`.
    pub label: String,
}

impl Callbacks for RunCtxCallbacks<'_> {
    fn on_start(&mut self, plan: &TrainPlan) {
        self.ctx.progress_start(self.label.clone(), Some(plan.total_steps));
        if let Some(step) = plan.resumed_from {
            self.ctx.progress_set(step);
        }
    }
    fn on_step(&mut self, step: u64, _total: u64) {
        self.ctx.progress_set(step);
    }
    fn on_record(&mut self, record: &Record) {
        match record {
            Record::Train(t) => {
                self.ctx.metric("loss", t.step, t.loss);
                self.ctx.metric("learning_rate", t.step, t.learning_rate);
                self.ctx.metric("grad_norm", t.step, t.grad_norm);
                self.ctx.metric("tokens_per_second", t.step, t.tokens_per_second);
                for (k, v) in &t.metrics {
                    self.ctx.metric(k, t.step, *v);
                }
            }
            Record::Eval(e) => {
                self.ctx.metric("eval_loss", e.step, e.eval_loss);
                for (k, v) in &e.metrics {
                    self.ctx.metric(&format!("eval_{k}"), e.step, *v);
                }
            }
        }
    }
    fn on_message(&mut self, message: &str) {
        self.ctx.message(message.to_string());
    }
    fn control(&mut self, _next_step: u64) -> Control {
        if self.ctx.is_cancelled() {
            Control::Interrupt
        } else {
            Control::Continue
        }
    }
}

/// Checkpoints under the stage's scratch directory, report files in `report_dir` (an output).
pub fn paths(ctx: &RunCtx, report_dir: &std::path::Path) -> TrainPaths {
    TrainPaths { checkpoints: ctx.scratch_dir().join("checkpoints"), report: report_dir.to_path_buf() }
}

/// The stage's JSON report: sizes, steps, final/best losses, why it stopped, and the metrics and
/// loss-curve files relative to `output_root` (the output directory that holds them).
pub fn report(outcome: &TrainOutcome, output_root: &std::path::Path) -> serde_json::Value {
    let rel = |p: &std::path::Path| p.strip_prefix(output_root).unwrap_or(p).display().to_string();
    let last_eval = outcome.history.iter().rev().find_map(|r| match r {
        Record::Eval(e) => Some(e.eval_loss),
        Record::Train(_) => None,
    });
    serde_json::json!({
        "train_examples": outcome.plan.train_examples,
        "eval_examples": outcome.plan.eval_examples,
        "trainable_params": outcome.plan.trainable_params,
        "total_steps": outcome.plan.total_steps,
        "global_step": outcome.global_step,
        "resumed_from": outcome.plan.resumed_from,
        "stop": outcome.stop,
        "final_train_loss": outcome.final_train_loss,
        "final_eval_loss": last_eval,
        "best_eval_loss": outcome.best_eval_loss,
        "best_step": outcome.best_step,
        "metrics": rel(&outcome.metrics_path),
        "loss_curve": rel(&outcome.loss_curve_path),
    })
}

/// A training error as the stage reports it.
pub fn stage_error(e: TrainError) -> StageError {
    match e {
        TrainError::Config(m) => StageError::Params(m),
        TrainError::Io { path, source } => StageError::Io { path, source },
        other => StageError::failed(other),
    }
}

/// `Err(Cancelled)` when the loop stopped on Ctrl-C (its checkpoint is in the scratch
/// directory, so the next run resumes); `Ok` otherwise.
pub fn check_stopped(outcome: &TrainOutcome) -> Result<(), StageError> {
    if outcome.stop == StopReason::Interrupted {
        Err(StageError::Cancelled)
    } else {
        Ok(())
    }
}
