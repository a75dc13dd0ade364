//! The loop reported through a hand-built engine `RunCtx`: progress, metrics, Ctrl-C.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pipeline_engine::{EventSink, RunCtx, RunParts, StageError, StageEvent};
use pipeline_train::stage::{check_stopped, paths, report, RunCtxCallbacks};
use pipeline_train::{train, TrainConfig};

use crate::tiny::{memorisation_set, model, CausalLm};

#[derive(Default)]
struct Collect(Mutex<Vec<StageEvent>>, Arc<AtomicBool>, u64);
impl EventSink for Collect {
    fn stage_event(&self, _: &str, e: StageEvent) {
        // Press Ctrl-C once step `self.2` is reported.
        if let StageEvent::ProgressSet { pos } = &e {
            if self.2 > 0 && *pos == self.2 {
                self.1.store(true, Ordering::Relaxed);
            }
        }
        self.0.lock().unwrap().push(e);
    }
}

fn ctx(root: &std::path::Path, sink: Arc<Collect>) -> RunCtx {
    RunCtx::new(RunParts {
        stage_id: "sft".into(),
        params: toml::Table::new(),
        seed: 1,
        recipe_dir: root.to_path_buf(),
        inputs: BTreeMap::new(),
        outputs: [("model".to_string(), root.join("out"))].into(),
        scratch: root.join("scratch"),
        options: BTreeMap::new(),
        cancel: sink.1.clone(),
        sink,
    })
}

#[test]
fn progress_metrics_and_ctrl_c_resume() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { max_steps: 6, logging_steps: 2, save_steps: 100, split_ratio: 0.0, ..Default::default() };
    let data = memorisation_set(8);

    // First run: Ctrl-C after step 3 → checkpoint at 3, Cancelled.
    let cancel = Arc::new(AtomicBool::new(false));
    let sink = Arc::new(Collect(Mutex::new(Vec::new()), cancel, 3));
    let c = ctx(dir.path(), sink.clone());
    let out_dir = c.output("model").unwrap().to_path_buf();
    let p = paths(&c, &out_dir);
    let (dev, mut m) = model(1);
    let mut cb = RunCtxCallbacks { ctx: &c, label: "sft".into() };
    let out = train(&cfg, 1, &dev, &mut m, &mut CausalLm, &data, None, &p, &mut cb).unwrap();
    assert!(matches!(check_stopped(&out), Err(StageError::Cancelled)));
    assert!(c.scratch_dir().join("checkpoints/checkpoint-3").is_dir());
    let events = sink.0.lock().unwrap().clone();
    assert_eq!(events[0], StageEvent::ProgressStart { label: "sft".into(), total: Some(6) });
    let losses: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            StageEvent::Metric { name, step, .. } if name == "loss" => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(losses, vec![2]);

    // Second run resumes at 3 and finishes.
    let sink2 = Arc::new(Collect(Mutex::new(Vec::new()), Arc::new(AtomicBool::new(false)), 0));
    let c2 = ctx(dir.path(), sink2.clone());
    let (dev, mut m) = model(1);
    let mut cb = RunCtxCallbacks { ctx: &c2, label: "sft".into() };
    let out = train(&cfg, 1, &dev, &mut m, &mut CausalLm, &data, None, &p, &mut cb).unwrap();
    check_stopped(&out).unwrap();
    assert_eq!(out.plan.resumed_from, Some(3));
    let events = sink2.0.lock().unwrap().clone();
    assert!(
        matches!(&events[0], StageEvent::Message(m) if m.contains("resuming from") && m.contains("checkpoint-3")),
        "{events:?}"
    );
    let r = report(&out, &out_dir);
    assert_eq!(r["global_step"], 6);
    assert_eq!(r["metrics"], "metrics.jsonl");
    assert_eq!(r["loss_curve"], "loss_curve.png");
    assert!(out_dir.join("loss_curve.png").is_file());
}
