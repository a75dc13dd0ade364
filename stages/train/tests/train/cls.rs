//! Sequence classification and embeddings on the tiny Qwen2 (random init): training on a
//! trivially separable fixture lowers the loss and reaches accuracy / Spearman well above chance.

use dfdx::prelude::*;
use pipeline_model::{LoraConfig, ModelConfig, Qwen2, Trainable};
use pipeline_train::cls::{
    classify, embedding_similarities, spearman, ClsDataset, ClsExample, EmbeddingDataset, EmbeddingExample,
    EmbeddingObjective, HeadModel, Pooling, SeqClsObjective,
};
use pipeline_train::lm::TrainModel;
use pipeline_train::{
    evaluate, split_indices, train, NoCallbacks, Record, SchedulerType, Subset, TrainConfig, TrainPaths,
};
use rand::{Rng, SeedableRng};

const VOCAB: usize = 40;

fn tiny(seed: u64) -> Qwen2<Cpu> {
    let cfg = ModelConfig::tiny(VOCAB);
    Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, seed), &Cpu::default()).unwrap()
}

fn cfg(steps: i64) -> TrainConfig {
    TrainConfig {
        learning_rate: 5e-3,
        per_device_train_batch_size: 8,
        warmup_ratio: 0.0,
        lr_scheduler_type: SchedulerType::Constant,
        logging_steps: 1,
        save_steps: 1000,
        max_steps: steps,
        split_ratio: 0.0,
        ..Default::default()
    }
}

fn train_losses(h: &[Record]) -> Vec<f64> {
    h.iter().filter_map(|r| if let Record::Train(t) = r { Some(t.loss) } else { None }).collect()
}

/// Three classes; a row's class is its last token (30, 31 or 32) after 2–6 noise tokens.
fn cls_rows(n: usize, seed: u64) -> Vec<ClsExample> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let label = i % 3;
            let mut ids: Vec<u32> = (0..rng.gen_range(2..7)).map(|_| rng.gen_range(1..25)).collect();
            ids.push(30 + label as u32);
            ClsExample { input_ids: ids, label }
        })
        .collect()
}

#[test]
fn seq_cls_with_lora_trains_the_head_and_separates_the_classes() {
    let dir = tempfile::tempdir().unwrap();
    let mut lm = tiny(1);
    lm.set_trainable(Trainable::Lora(LoraConfig::all_linear(4, 8.0)), 1).unwrap();
    let mut model = HeadModel::new(lm, 3, 7, None).unwrap();
    let head0 = model.score_host();
    let data = ClsDataset::new(cls_rows(60, 2), 0, 64).unwrap();
    let (tr, ev) = split_indices(data.examples.len(), 0.25, 3);
    let (train_set, eval_set) = (Subset { inner: &data, indices: tr }, Subset { inner: &data, indices: ev });
    let before = evaluate(&model, &mut SeqClsObjective, &eval_set, 8, 1, 0).unwrap();
    let paths = TrainPaths { checkpoints: dir.path().join("ck"), report: dir.path().join("out") };
    let out = train(
        &cfg(40),
        1,
        &Cpu::default(),
        &mut model,
        &mut SeqClsObjective,
        &train_set,
        Some(&eval_set),
        &paths,
        &mut NoCallbacks,
    )
    .unwrap();
    let l = train_losses(&out.history);
    assert!(l.last().unwrap() < &(l[0] * 0.5), "loss did not halve: {l:?}");
    let after = evaluate(&model, &mut SeqClsObjective, &eval_set, 8, 1, 0).unwrap();
    assert!(after.0 < before.0 * 0.5, "eval loss {} -> {}", before.0, after.0);
    let preds = classify(&model, &eval_set, 4).unwrap();
    let acc = preds.iter().filter(|(p, l)| p == l).count() as f64 / preds.len() as f64;
    assert!(acc >= 0.9, "eval accuracy {acc} (chance 1/3): {preds:?}");
    assert!((after.1["accuracy"] - acc).abs() < 1e-9, "the logged accuracy is the split's: {:?}", after.1);
    assert_ne!(model.score_host(), head0, "the head is trained with LoRA (modules_to_save)");
    assert!(model.lm.lora_config().is_some());
}

/// Two topics (tokens 1–12 and 13–24): pairs from one topic have target 0.9, across topics 0.1.
fn pair_rows(n: usize, seed: u64) -> Vec<EmbeddingExample> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let text = |topic: u32, rng: &mut rand_chacha::ChaCha8Rng| -> Vec<u32> {
        (0..rng.gen_range(3..7)).map(|_| 1 + topic * 12 + rng.gen_range(0..12)).collect()
    };
    (0..n)
        .map(|i| {
            let (a, b) = (i as u32 % 2, (i as u32 / 2) % 2);
            EmbeddingExample {
                first: text(a, &mut rng),
                second: text(b, &mut rng),
                label: if a == b { 0.9 } else { 0.1 },
            }
        })
        .collect()
}

#[test]
fn embedding_cosine_loss_trains_and_ranks_the_pairs() {
    for pooling in [Pooling::Last, Pooling::Mean] {
        let dir = tempfile::tempdir().unwrap();
        let mut lm = tiny(4);
        lm.set_trainable(Trainable::Lora(LoraConfig::all_linear(8, 16.0)), 4).unwrap();
        let mut model = TrainModel(lm);
        let data = EmbeddingDataset::new(pair_rows(64, 5), 0, 64).unwrap();
        let (tr, ev) = split_indices(data.examples.len(), 0.25, 6);
        let (train_set, eval_set) = (Subset { inner: &data, indices: tr }, Subset { inner: &data, indices: ev });
        let mut obj = EmbeddingObjective { pooling };
        let paths = TrainPaths { checkpoints: dir.path().join("ck"), report: dir.path().join("out") };
        let out = train(
            &cfg(60),
            1,
            &Cpu::default(),
            &mut model,
            &mut obj,
            &train_set,
            Some(&eval_set),
            &paths,
            &mut NoCallbacks,
        )
        .unwrap();
        let l = train_losses(&out.history);
        let head: f64 = l[..3].iter().sum::<f64>() / 3.0;
        let tail: f64 = l[l.len() - 3..].iter().sum::<f64>() / 3.0;
        assert!(tail < head * 0.5, "{pooling:?}: loss {head} -> {tail}: {l:?}");
        let sims = embedding_similarities(&model.0, &eval_set, pooling, 4).unwrap();
        let rho = spearman(&sims).unwrap();
        assert!(rho > 0.6, "{pooling:?}: eval Spearman {rho} (chance 0): {sims:?}");
    }
}

/// Golden logits from transformers' `Qwen2ForSequenceClassification` (scripts/oracles/seq_cls_golden.py,
/// torch 2.15.0, transformers 5.24.0): its saved folder loads into a [`HeadModel`] whose logits and
/// loss on right-padded rows are transformers' (the last non-padding token pooled), and the folder
/// we write back from it holds the same model and the config transformers reads.
#[test]
fn seq_cls_logits_match_transformers_and_the_written_folder_round_trips() {
    use pipeline_train::cls::{read_seq_cls_head, save_seq_cls_head, ClsBatch, PaddedRows};
    use pipeline_train::{Objective, StepInfo};

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("data/seq_cls_golden.json")).unwrap()).unwrap();
    let rows: Vec<Vec<u32>> = serde_json::from_value(g["rows"].clone()).unwrap();
    let labels: Vec<usize> = serde_json::from_value(g["labels"].clone()).unwrap();
    let want: Vec<f32> = g["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().clone())
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let dir = root.join("fixtures/seq_cls_tiny");
    let dev = Cpu::default();
    let load = |dir: &std::path::Path| {
        let lm = Qwen2::<Cpu>::load_hf(dir, &dev).unwrap();
        let head = read_seq_cls_head(dir).unwrap().expect("score.weight");
        HeadModel::new(lm, 3, 0, Some(&head)).unwrap()
    };
    let model = load(&dir);
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let padded = PaddedRows::new(&refs, 0);
    let got = model.logits(&padded, NoneTape, None).unwrap().as_vec();
    let worst = got.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(worst <= 2e-5, "max |Δlogit| {worst}: {got:?} vs {want:?} ({})", g["oracle"]);
    let batch = ClsBatch { rows: padded.clone(), labels };
    let info = StepInfo { step: 0, micro: 0, training: false, seed: 0 };
    let loss = SeqClsObjective.loss(&model, &batch, NoneTape, &info).unwrap().loss.as_vec()[0];
    assert!((f64::from(loss) - g["loss"].as_f64().unwrap()).abs() < 1e-5, "loss {loss} vs {}", g["loss"]);

    let out = tempfile::tempdir().unwrap();
    model.lm.save_pretrained(out.path()).unwrap();
    let names: Vec<String> = (0..3).map(|i| format!("LABEL_{i}")).collect();
    save_seq_cls_head(out.path(), &model.score_host(), &names, 0).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for key in ["architectures", "id2label", "label2id", "problem_type", "pad_token_id"] {
        assert_eq!(cfg[key], theirs[key], "config.json `{key}`");
    }
    assert_eq!(cfg["num_labels"], 3);
    let back = load(out.path());
    assert_eq!(back.logits(&padded, NoneTape, None).unwrap().as_vec(), got, "the written folder is the same model");
}
