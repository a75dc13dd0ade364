//! Data-parallel training over the TCP communicator, ranks as threads of this test: W ranks with
//! the global batch of one process train the same model (loss curve and final LoRA weights within
//! float tolerance), a checkpoint resumes at another world size, and a rank that dies ends the
//! others with an error naming it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use dfdx::prelude::*;
use pipeline_model::{HostTensor, LoraConfig, ModelConfig, Qwen2, Trainable};
use pipeline_train::dist::{Rendezvous, TcpComm};
use pipeline_train::lm::{CausalLmObjective, TrainModel};
use pipeline_train::{
    train_distributed, Callbacks, Control, Record, SchedulerType, TokenDataset, TokenExample, TrainConfig, TrainPaths,
};

const VOCAB: usize = 40;

fn data() -> TokenDataset {
    // Different lengths and label counts, so the loss weights of the shards differ.
    let ex = (0..10u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..(2 + i % 3)).map(|k| 2 + (i + k) % 8).collect();
            let answer: Vec<u32> = (0..(1 + i % 4)).map(|k| 20 + (i * 3 + k * 5) % 17).chain([1]).collect();
            let labels = [vec![false; prompt.len()], vec![true; answer.len()]].concat();
            TokenExample { input_ids: [prompt, answer].concat(), labels }
        })
        .collect();
    TokenDataset::new(ex, 0, 32).unwrap()
}

fn cfg() -> TrainConfig {
    TrainConfig {
        learning_rate: 5e-2,
        per_device_train_batch_size: 1,
        // micro-batches per optimizer step over all ranks (the stages pass per-device × world)
        gradient_accumulation_steps: 4,
        max_steps: 9,
        warmup_ratio: 0.1,
        lr_scheduler_type: SchedulerType::Cosine,
        max_grad_norm: 0.5,
        logging_steps: 1,
        save_steps: 3,
        split_ratio: 0.0,
        ..Default::default()
    }
}

struct StopAt(Option<u64>);
impl Callbacks for StopAt {
    fn control(&mut self, next: u64) -> Control {
        if Some(next) == self.0 {
            Control::Abort
        } else {
            Control::Continue
        }
    }
}

/// The tiny Qwen2 (random init, seed 2) with dropout-carrying LoRA adapters.
fn model(dev: &Cpu) -> Qwen2<Cpu> {
    let mc = ModelConfig::tiny(VOCAB);
    let mut m: Qwen2<Cpu> = Qwen2::from_host_with_dims(&mc, &Qwen2::<Cpu>::random_host(&mc, 2), dev).unwrap();
    m.set_trainable(Trainable::Lora(LoraConfig::all_linear(4, 8.0).with_dropout(0.1).unwrap()), 2).unwrap();
    m
}

type Run = (Vec<Record>, BTreeMap<String, HostTensor>);

/// One rank: the tiny Qwen2 with dropout-carrying LoRA, trained on `data()`.
fn rank_run(rv: &Rendezvous, checkpoints: &Path, stop: Option<u64>) -> Result<Run, String> {
    let dev = Cpu::default();
    let m = model(&dev);
    let paths = TrainPaths {
        checkpoints: checkpoints.to_path_buf(),
        report: checkpoints.parent().unwrap().join(format!("report-{}", rv.rank)),
    };
    let mut comm = TcpComm::connect(rv).map_err(|e| e.to_string())?;
    let mut tm = TrainModel(m);
    let out = train_distributed(
        &cfg(),
        3,
        &dev,
        &mut tm,
        &mut CausalLmObjective,
        &data(),
        None,
        &paths,
        &mut StopAt(stop),
        &mut comm,
    )
    .map_err(|e| e.to_string())?;
    Ok((out.history, tm.0.lora_to_host()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `world` ranks as threads; rank 0's result.
fn run(world: usize, checkpoints: &Path, stop: Option<u64>) -> Run {
    let port = free_port();
    let results: Vec<Result<Run, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let rv = Rendezvous {
                        rank,
                        world_size: world,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        timeout: Duration::from_secs(60),
                        tag: "sft".into(),
                    };
                    rank_run(&rv, checkpoints, stop)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut it = results.into_iter();
    let first = it.next().unwrap().unwrap();
    for (r, other) in it.enumerate() {
        let other = other.unwrap();
        assert_eq!(other.1, first.1, "rank {} ends with rank 0's weights (same reduced gradients)", r + 1);
    }
    first
}

fn curve(h: &[Record]) -> Vec<(u64, f64, f64, f64)> {
    h.iter()
        .filter_map(
            |r| if let Record::Train(t) = r { Some((t.step, t.loss, t.learning_rate, t.grad_norm)) } else { None },
        )
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + a.abs().max(b.abs()))
}

fn assert_same(a: &Run, b: &Run, what: &str) {
    let (ca, cb) = (curve(&a.0), curve(&b.0));
    assert_eq!(ca.len(), cb.len(), "{what}");
    for (x, y) in ca.iter().zip(&cb) {
        assert!(x.0 == y.0 && close(x.1, y.1) && x.2 == y.2 && close(x.3, y.3), "{what}: {x:?} vs {y:?}");
    }
    assert_eq!(a.1.keys().collect::<Vec<_>>(), b.1.keys().collect::<Vec<_>>());
    for (k, t) in &a.1 {
        let u = &b.1[k];
        let worst = t.data.iter().zip(&u.data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{what}: {k} differs by {worst}");
    }
}

#[test]
fn two_and_three_ranks_train_as_one_process_with_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let one = run(1, &dir.path().join("w1/ck"), None);
    let l = curve(&one.0);
    assert!(l.last().unwrap().1 < l[0].1, "it learns: {l:?}");
    let two = run(2, &dir.path().join("w2/ck"), None);
    assert_same(&one, &two, "2 ranks");
    // 4 micro-batches per step over 3 ranks: uneven shards (one rank idles in the epoch's last step).
    let three = run(3, &dir.path().join("w3/ck"), None);
    assert_same(&one, &three, "3 ranks");
    // Rank 0 alone wrote checkpoints and its report; the others wrote no checkpoint.
    assert!(dir.path().join("w2/ck/checkpoint-9").is_dir());
}

#[test]
fn a_checkpoint_resumes_at_another_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let full = run(1, &dir.path().join("full/ck"), None);
    // Killed after step 5 on 2 ranks (its last checkpoint is step 3), resumed on 3 ranks, then on 1.
    let ck = dir.path().join("resumed/ck");
    let (part, _) = run(2, &ck, Some(5));
    assert_eq!(curve(&part).len(), 5);
    assert!(ck.join("checkpoint-3").is_dir());
    let (part2, _) = run(3, &ck, Some(7));
    assert_eq!(curve(&part2).first().map(|c| c.0), Some(1), "the history is carried over");
    let resumed = run(1, &ck, None);
    assert_same(&full, &resumed, "resumed across world sizes");
}

struct DieAt(u64);
impl Callbacks for DieAt {
    fn on_step(&mut self, step: u64, _total: u64) {
        assert!(step < self.0, "rank 1 dies at step {step}");
    }
}

#[test]
fn a_rank_that_dies_ends_the_others_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let t0 = Instant::now();
    let err = std::thread::scope(|s| {
        let rv = |rank| Rendezvous {
            rank,
            world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_secs(5),
            tag: "sft".into(),
        };
        let ck = dir.path().join("ck");
        let ck1 = ck.clone();
        let dying = s.spawn(move || {
            let dev = Cpu::default();
            let mut tm = TrainModel(model(&dev));
            let mut comm = TcpComm::connect(&rv(1)).unwrap();
            let paths = TrainPaths { checkpoints: ck1.clone(), report: ck1.join("r1") };
            let _ = train_distributed(
                &cfg(),
                3,
                &dev,
                &mut tm,
                &mut CausalLmObjective,
                &data(),
                None,
                &paths,
                &mut DieAt(2),
                &mut comm,
            );
        });
        let lead = s.spawn(move || {
            let dev = Cpu::default();
            let mut tm = TrainModel(model(&dev));
            let mut comm = TcpComm::connect(&rv(0)).unwrap();
            let paths = TrainPaths { checkpoints: ck.clone(), report: ck.join("r0") };
            train_distributed(
                &cfg(),
                3,
                &dev,
                &mut tm,
                &mut CausalLmObjective,
                &data(),
                None,
                &paths,
                &mut StopAt(None),
                &mut comm,
            )
            .map(|_| ())
            .unwrap_err()
            .to_string()
        });
        assert!(dying.join().is_err(), "rank 1 panicked");
        lead.join().unwrap()
    });
    assert!(err.contains("rank 1") && err.contains("data-parallel training"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}
