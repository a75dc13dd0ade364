//! Values checked against `tests/data/train_golden.json`, written by
//! `scripts/oracles/train_golden.py`: a NumPy transcription of torch 2.x `AdamW` (single-tensor
//! path) and `clip_grad_norm_` in f32, transformers' schedule lambdas, and TRL's `dpo_loss` /
//! `kto_loss` with hand-derived gradients (finite-difference checked by the script). NumPy, not
//! torch itself: PyPI's Linux torch wheel pulls gigabytes of CUDA libraries.

use dfdx::prelude::*;
use pipeline_train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use pipeline_train::{
    dpo_loss, kto_kl_baseline, kto_loss, DpoConfig, KtoConfig, LrSchedule, NamedTensor, SchedulerType, TrainConfig,
};
use serde_json::Value;

fn golden() -> Value {
    serde_json::from_str(include_str!("../data/train_golden.json")).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a - b).abs() <= abs + rel * b.abs()
}

#[test]
fn schedules_match_transformers() {
    for case in golden()["schedules"].as_array().unwrap() {
        let kind: SchedulerType = serde_json::from_value(case["kind"].clone()).unwrap();
        let cfg = TrainConfig {
            lr_scheduler_type: kind,
            warmup_ratio: case["warmup_ratio"].as_f64().unwrap(),
            warmup_steps: case["warmup_steps_arg"].as_u64().unwrap(),
            learning_rate: 2.0,
            ..Default::default()
        };
        let total = case["total_steps"].as_u64().unwrap();
        let s = LrSchedule::from_config(&cfg, total);
        assert_eq!(s.warmup_steps, case["warmup_steps"].as_u64().unwrap(), "{case}");
        for (step, want) in case["factors"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            assert!(
                close(s.factor(step as u64), want, 1e-12, 1e-15),
                "{kind:?} total {total} step {step}: {} vs {want}",
                s.factor(step as u64)
            );
            assert!(close(s.lr(step as u64), 2.0 * want, 1e-12, 1e-15));
        }
    }
}

#[test]
fn adamw_and_clipping_match_torch() {
    for case in golden()["adamw"].as_array().unwrap() {
        let names: Vec<String> =
            case["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
        let shapes: Vec<Vec<usize>> = case["shapes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())
            .collect();
        let mut params: Vec<NamedTensor> = case["init"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&names)
            .zip(&shapes)
            .map(|((d, n), s)| NamedTensor { name: n.clone(), shape: s.clone(), data: f32s(d) })
            .collect();
        let mut opt = AdamW::new(AdamWConfig {
            beta1: case["beta1"].as_f64().unwrap(),
            beta2: case["beta2"].as_f64().unwrap(),
            eps: case["eps"].as_f64().unwrap(),
            weight_decay: case["weight_decay"].as_f64().unwrap(),
        });
        let cfg = TrainConfig {
            lr_scheduler_type: serde_json::from_value(case["kind"].clone()).unwrap(),
            warmup_ratio: case["warmup_ratio"].as_f64().unwrap(),
            learning_rate: case["lr"].as_f64().unwrap(),
            ..Default::default()
        };
        let sched = LrSchedule::from_config(&cfg, case["total"].as_u64().unwrap());
        let mut max_err = 0.0f64;
        for (s, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let mut grads: Vec<NamedTensor> = step["grads"]
                .as_array()
                .unwrap()
                .iter()
                .zip(&params)
                .map(|(g, p)| NamedTensor { name: p.name.clone(), shape: p.shape.clone(), data: f32s(g) })
                .collect();
            let norm = clip_grad_norm(&mut grads, case["max_grad_norm"].as_f64().unwrap());
            assert!(close(norm, step["grad_norm"].as_f64().unwrap(), 1e-6, 0.0), "grad norm step {s}");
            let lr = sched.lr(s as u64);
            assert!(close(lr, step["lr"].as_f64().unwrap(), 1e-12, 1e-15), "lr step {s}");
            opt.update_host(&mut params, &grads, lr).unwrap();
            for (p, want) in params.iter().zip(step["params"].as_array().unwrap()) {
                for (a, b) in p.data.iter().zip(f32s(want)) {
                    max_err = max_err.max(f64::from((a - b).abs()));
                    assert!(close(f64::from(*a), f64::from(b), 2e-6, 2e-7), "{} step {s}: {a} vs {b}", p.name);
                }
            }
        }
        eprintln!("adamw case lr={}: max |rust - torch formula| = {max_err:e}", case["lr"]);
    }
}

fn leaf(dev: &Cpu, data: Vec<f32>, rows: usize, seq: usize) -> Tensor<(usize, usize), f32, Cpu> {
    dev.tensor_from_vec(data, (rows, seq))
}

fn check_metrics(got: &[(String, f64)], want: &Value, skip: &[&str]) {
    let want = want.as_object().unwrap();
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (k, v) in got.iter().filter(|(k, _)| !skip.contains(&k.as_str())) {
        let w = want[k].as_f64().unwrap();
        assert!(close(*v, w, 1e-5, 1e-6), "metric {k}: {v} vs {w}");
    }
}

#[test]
fn dpo_matches_trl() {
    let dev = Cpu::default();
    for case in golden()["dpo"].as_array().unwrap() {
        let (rows, seq) = (case["rows"].as_u64().unwrap() as usize, case["seq"].as_u64().unwrap() as usize);
        let x = leaf(&dev, f32s(&case["token_logps"]), rows, seq);
        let cfg = DpoConfig {
            beta: case["beta"].as_f64().unwrap(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
            rpo_alpha: case["rpo_alpha"].as_f64(),
        };
        let out = dpo_loss(x.leaky_trace(), &f32s(&case["mask"]), &f32s(&case["ref_logps"]), &cfg).unwrap();
        let loss = f64::from(out.loss.array());
        let want = case["loss"].as_f64().unwrap();
        assert!(close(loss, want, 1e-5, 1e-6), "{cfg:?}: loss {loss} vs {want}");
        // At the reference (logits ~ 0) "chosen > rejected" compares rounding noise.
        let skip: &[&str] = if case["at_reference"].as_bool().unwrap() { &["rewards/accuracies"] } else { &[] };
        check_metrics(&out.metrics, &case["metrics"], skip);
        let g = out.loss.backward();
        for (a, b) in g.get(&x).as_vec().iter().zip(f32s(&case["grad"])) {
            assert!(close(f64::from(*a), f64::from(b), 1e-4, 1e-6), "{cfg:?}: grad {a} vs {b}");
        }
    }
}

#[test]
fn kto_matches_trl() {
    let dev = Cpu::default();
    for case in golden()["kto"].as_array().unwrap() {
        let (rows, seq) = (case["rows"].as_u64().unwrap() as usize, case["seq"].as_u64().unwrap() as usize);
        let x = leaf(&dev, f32s(&case["token_logps"]), rows, seq);
        let cfg = KtoConfig {
            beta: case["beta"].as_f64().unwrap(),
            desirable_weight: case["desirable_weight"].as_f64().unwrap(),
            undesirable_weight: case["undesirable_weight"].as_f64().unwrap(),
        };
        let z = kto_kl_baseline(&f32s(&case["policy_kl_logps"]), &f32s(&case["ref_kl_logps"])).unwrap();
        assert!(close(f64::from(z), case["z"].as_f64().unwrap(), 1e-5, 1e-6), "z {z} vs {}", case["z"]);
        let desirable: Vec<bool> = case["desirable"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect();
        let out =
            kto_loss(x.leaky_trace(), &f32s(&case["mask"]), &f32s(&case["ref_logps"]), &desirable, z, &cfg).unwrap();
        let loss = f64::from(out.loss.array());
        let want = case["loss"].as_f64().unwrap();
        assert!(close(loss, want, 1e-5, 1e-6), "{cfg:?}: loss {loss} vs {want}");
        check_metrics(&out.metrics, &case["metrics"], &[]);
        let g = out.loss.backward();
        for (a, b) in g.get(&x).as_vec().iter().zip(f32s(&case["grad"])) {
            assert!(close(f64::from(*a), f64::from(b), 1e-4, 1e-7), "{cfg:?}: grad {a} vs {b}");
        }
    }
}

#[test]
fn dpo_rejects_odd_rows() {
    let dev = Cpu::default();
    let x = leaf(&dev, vec![0.0; 3], 3, 1);
    assert!(dpo_loss(x.leaky_trace(), &[1.0; 3], &[0.0; 3], &DpoConfig::default()).is_err());
}

#[test]
fn log_sigmoid_is_stable_and_has_the_right_gradient_at_zero() {
    let dev = Cpu::default();
    let x = dev.tensor_from_vec(vec![0.0f32, -200.0, 200.0, 1.5, -1.5], (5,));
    let y = pipeline_train::objectives::log_sigmoid(x.leaky_trace());
    let v = y.as_vec();
    assert!((v[0] + std::f32::consts::LN_2).abs() < 1e-7);
    assert_eq!(v[1], -200.0);
    assert_eq!(v[2], 0.0);
    assert!((v[3] - (-0.201_413_f32)).abs() < 1e-5 && (v[4] - (-1.701_413_f32)).abs() < 1e-5);
    let g = y.sum().backward();
    let g = g.get(&x).as_vec();
    let want = [0.5f32, 1.0, 0.0, 0.182_426, 0.817_574];
    for (a, b) in g.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{g:?}");
    }
}
