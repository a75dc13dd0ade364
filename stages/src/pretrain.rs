//! # pretrain
//!
//! ## What it does
//! Causal-LM pretraining, every token a target. Without a `model` it builds the built-in tiny
//! Qwen2 preset (`ModelConfig::tiny`: hidden 64, 2 layers; built as `Qwen2<D, TinyDims>` on the run's device, its
//! dimensions fixed at compile time, the vocabulary a runtime one) from random init with the real
//! Qwen2.5 tokenizer and a *restricted vocabulary*: the embedding covers only the tokenizer ids
//! that occur in its inputs (`data` and `vocab_data`: the learned part) plus `<|endoftext|>`,
//! `<|im_start|>`, `<|im_end|>` and the 256 byte-level base tokens (pipeline-model's `VocabMap`,
//! stored as `vocab_map.json`); a later stage's text outside the learned part encodes as bytes,
//! losslessly, and its report counts those tokens (`tokens_outside_vocab`). Pass the downstream
//! chat data as `vocab_data` (or in `data`) so that the SFT conversations are in the vocabulary.
//! Documents are the `text` column of rows that have one, and the chat-template rendering of the
//! other rows' conversations (so the model also learns the chat format); they are packed into
//! blocks of `max_length` tokens, each document followed by `<|endoftext|>`. With a `model` it
//! continues pretraining that model (full fine-tuning) on the same packed documents.
//!
//! ## Inputs
//! `data` (required; one or several datasets): the corpus. `vocab_data` (optional; one or several):
//! datasets whose tokens join the vocabulary without being trained on. `model` (optional): a
//! model folder to continue from.
//!
//! ## Outputs
//! `model`: a complete HF folder (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, `vocab_map.json` for the tiny preset, `chat_defaults.json` when
//! `system` is set). `metrics`: `metrics.jsonl` + `loss_curve.png` + TensorBoard event files in
//! `tensorboard/`.
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `model` | input `model`, else the tiny preset | HF folder (`${VAR}` expanded) |
//! | `train_type` / `tuner_type` | `"full"` | only `"full"` (pretraining trains every weight) |
//! | `system` | unset | default system prompt when rendering chat rows |
//! | `report_to`, `logging_dir` | `["tensorboard"]`, see `training.rs` | TensorBoard event files (`"none"`: off) and where `pipeline run` puts the run's copy |
//! | every `TrainConfig` key | see pipeline-train | `max_length` is the packing block size |
//!
//! ## Cache key
//! Params, the recipe seed, the input artifacts and the content of a `model` path param.
//!
//! ## Example
//! ```toml
//! [stages.pretrain]
//! kind = "pretrain"
//! inputs = { data = ["corpus.data", "clean.data"], vocab_data = "clean.data" }
//! params = { learning_rate = 3e-3, num_train_epochs = 4, max_length = 128, per_device_train_batch_size = 8 }
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use dfdx::prelude::Device;
use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use pipeline_model::chat::ChatTemplate;
use pipeline_model::tokenizer::Tokenizer;
use pipeline_model::vocab::VocabMap;
use pipeline_model::{Dims, ModelConfig, Qwen2, TinyDims, Trainable};
use pipeline_train::lm::CausalLmObjective;
use pipeline_train::{pack_documents, split_indices, Subset, TokenDataset, TokenExample, TrainConfig};

use crate::data::{read_dataset, Label, Sample};
use crate::training::{self, stage_error, TrainType};

pub(crate) struct Pretrain;

training::stage_params! {
    /// `pretrain`'s `[params]` (see the module docs).
    struct Params {
        /// HF folder to continue from; absent = the `model` input, else the tiny preset.
        model: Option<String> = None,
        /// Only `"full"`: pretraining trains every weight.
        #[serde(alias = "tuner_type")]
        train_type: Option<TrainType> = None,
        /// Default system prompt when rendering chat rows.
        system: Option<String> = None,
    }
    groups {
        train: TrainConfig = pipeline_train::with_train_args,
        report: training::ReportParams = training::with_report_args,
    }
}

/// The stage's params, parsed and checked.
fn parse(params: &toml::Table) -> Result<Params, StageError> {
    let p = Params::parse(params)?;
    if p.train_type == Some(TrainType::Lora) {
        return Err(StageError::Params("pretrain trains every weight: `train_type` must be \"full\"".into()));
    }
    Ok(p)
}

/// Tokenizer ids of every document: the `text` column, else the rendered conversation.
fn documents(
    tok: &Tokenizer,
    chat: &ChatTemplate,
    rows: &[Sample],
    system: Option<&str>,
) -> Result<Vec<Vec<u32>>, StageError> {
    let mut docs = Vec::with_capacity(rows.len());
    for s in rows {
        let ids = match &s.text {
            Some(t) if !t.trim().is_empty() => {
                tok.encode(t, false).map_err(|e| StageError::failed(format!("row {}: {e}", s.id)))?
            }
            _ if !s.messages.is_empty() => match chat.encode_chat(tok, &s.messages, system) {
                Ok(enc) => enc.ids,
                // The seed's embedding pair (one assistant turn, `rejected_response`, a float
                // `label`; `sft`'s `task_type = "embedding"`) is two texts, not a conversation a
                // template renders (issue 15, point 1): each text is a document of its own.
                Err(_) if s.rejected_response.is_some() && matches!(s.label, Some(Label::Float(_))) => {
                    for t in s.messages.iter().map(|m| m.content.as_str()).chain(s.rejected_response.as_deref()) {
                        let ids = tok.encode(t, false).map_err(|e| StageError::failed(format!("row {}: {e}", s.id)))?;
                        if !ids.is_empty() {
                            docs.push(ids);
                        }
                    }
                    continue;
                }
                Err(e) => return Err(StageError::failed(format!("row {}: {e}", s.id))),
            },
            _ => continue,
        };
        if !ids.is_empty() {
            docs.push(ids);
        }
    }
    Ok(docs)
}

fn read_all(dirs: &[PathBuf]) -> Result<Vec<Sample>, StageError> {
    let mut rows = Vec::new();
    for d in dirs {
        rows.extend(read_dataset(d)?);
    }
    Ok(rows)
}

fn special(tok: &Tokenizer, name: &str) -> Result<u32, StageError> {
    tok.token_to_id(name).ok_or_else(|| StageError::failed(format!("the tokenizer has no {name}")))
}

impl Stage for Pretrain {
    fn kind(&self) -> &'static str {
        "pretrain"
    }
    fn version(&self) -> u32 {
        // 2: the tiny preset's vocabulary holds the 256 byte-level base tokens (byte fallback);
        // TensorBoard event files in `metrics/tensorboard/` (`report_to`).
        // 3: gradient accumulation sums every micro-batch's gradient (it kept only the last one's:
        // issue 17); data-parallel training.
        // 4: a model trained over a bf16 base (CUDA) is written in bf16, as its base was held
        // (issue 11); f32 bases are written as before.
        4
    }
    fn distributed_params(&self, params: &toml::Table, world_size: usize) -> Option<toml::Table> {
        Some(training::distributed_params(params, world_size))
    }
    fn summary(&self) -> &'static str {
        "Causal-LM pretraining on packed documents (the tiny Qwen2 preset from random init by default)"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&["data"], &["vocab_data", "model"])?;
        let p = parse(ctx.params)?;
        let files = p.model.iter().map(|m| ctx.resolve(training::shellexpand_env(m))).collect();
        Ok(Declared { outputs: vec!["model".into(), "metrics".into()], files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        training::on_device!(ctx, |dev| run_on(ctx, &dev))
    }
}

fn run_on<D: Device<f32>>(ctx: &RunCtx, dev: &D) -> Result<(), StageError> {
    let t0 = Instant::now();
    let p = parse(ctx.raw_params())?;
    let seed = p.train.seed_or(ctx.seed());
    let rows = read_all(ctx.inputs("data"))?;
    let src = match (&p.model, ctx.input_opt("model")) {
        (None, None) => None,
        (m, _) => Some(training::model_path(ctx, m.as_deref())?),
    };
    match &src {
        Some(path) => {
            // a checkpoint from disk: runtime dimensions
            let pre = training::load_for_training(path, dev, &p.train)?;
            let chat = training::chat_template(&pre)?;
            let docs = documents(&pre.tokenizer, chat, &rows, p.system.as_deref())?;
            let docs: Vec<_> = docs.iter().map(|d| pre.to_model_ids_counted(d)).collect();
            let outside = docs.iter().map(|d| d.outside).sum();
            let docs: Vec<Vec<u32>> = docs.into_iter().map(|d| d.ids).collect();
            let eos = pre.to_model_ids(&[special(&pre.tokenizer, "<|endoftext|>")?])[0];
            let run = Fit {
                ctx,
                p: &p,
                seed,
                eos,
                vocab: None,
                outside,
                src: Some(path),
                tokenizer: Some(&pre.tokenizer),
                t0,
            };
            run.fit(pre.model, &docs)
        }
        None => {
            let tok = Tokenizer::qwen25().map_err(StageError::failed)?;
            let chat = ChatTemplate::qwen25_default().map_err(StageError::failed)?;
            let docs = documents(&tok, &chat, &rows, p.system.as_deref())?;
            let extra = documents(&tok, &chat, &read_all(ctx.inputs("vocab_data"))?, p.system.as_deref())?;
            let required =
                [special(&tok, "<|endoftext|>")?, special(&tok, "<|im_start|>")?, special(&tok, "<|im_end|>")?];
            // The learned part (the inputs' tokens), the specials and the 256 byte-level base
            // tokens, so that text outside the learned part still encodes (as bytes).
            let vocab = VocabMap::with_byte_fallback(&tok, &required, docs.iter().chain(&extra).flatten().copied())
                .map_err(StageError::failed)?;
            let mut mc = ModelConfig::tiny(vocab.len());
            // <|im_end|>, <|endoftext|> (model ids: `required` order)
            mc.eos_token_id = vec![2, 0];
            // The built-in preset with its dimensions fixed at compile time (`TinyDims`); only
            // the vocabulary (chosen from the data above) is a runtime dimension.
            let model = Qwen2::<D, TinyDims>::from_host_with_dims(&mc, &Qwen2::<D>::random_host(&mc, seed), dev)
                .map_err(StageError::failed)?;
            // Every token of `docs` is in the map by construction: `outside` is 0.
            let docs: Vec<_> = docs.iter().map(|d| vocab.encode(&tok, d, 0)).collect();
            let outside = docs.iter().map(|d| d.outside).sum();
            let docs: Vec<Vec<u32>> = docs.into_iter().map(|d| d.ids).collect();
            let eos = vocab.to_model(&[required[0]], 0)[0];
            let run = Fit { ctx, p: &p, seed, eos, vocab: Some(&vocab), outside, src: None, tokenizer: None, t0 };
            run.fit(model, &docs)
        }
    }
}

/// What [`Fit::fit`] needs besides the model and the documents.
struct Fit<'a> {
    ctx: &'a RunCtx,
    p: &'a Params,
    seed: u64,
    /// `<|endoftext|>` as a model id: the packing separator.
    eos: u32,
    /// The tiny preset's restricted vocabulary.
    vocab: Option<&'a VocabMap>,
    /// Corpus tokens outside a restricted vocabulary (re-encoded as byte-level tokens).
    outside: usize,
    /// The model folder continued from (`None`: the tiny preset).
    src: Option<&'a Path>,
    /// Its tokenizer (written beside the model when `src` is a `.gguf` file).
    tokenizer: Option<&'a Tokenizer>,
    t0: Instant,
}

impl Fit<'_> {
    /// Packs the documents, trains every weight and writes the model folder. Generic over the
    /// model's device and dimension types: the tiny preset trains as `Qwen2<D, TinyDims>`, a model
    /// from disk as `Qwen2<D>`.
    fn fit<D: Device<f32>, S: Dims>(&self, mut model: Qwen2<D, S>, docs: &[Vec<u32>]) -> Result<(), StageError> {
        let (ctx, cfg, seed) = (self.ctx, &self.p.train, self.seed);
        if docs.is_empty() {
            return Err(StageError::failed("input `data` has no document (no `text` and no messages)"));
        }
        let n_tokens: usize = docs.iter().map(|d| d.len() + 1).sum();
        let blocks = pack_documents(docs, self.eos, cfg.max_length);
        let examples: Vec<TokenExample> = blocks.into_iter().map(TokenExample::all_targets).collect();
        let data = TokenDataset::new(examples, self.eos, cfg.max_length).map_err(stage_error)?;
        let (tr, ev) = split_indices(data.examples.len(), cfg.split_ratio, seed);
        let train_set = Subset { inner: &data, indices: tr };
        let held = Subset { inner: &data, indices: ev };
        let eval_ref: Option<&dyn pipeline_train::Dataset<Batch = _>> =
            if held.indices.is_empty() { None } else { Some(&held) };
        model.set_trainable(Trainable::Full, seed).map_err(StageError::failed)?;
        let metrics_dir = ctx.output("metrics")?.to_path_buf();
        let model_dir = ctx.output("model")?.to_path_buf();
        let dev = model.device().clone();
        let (outcome, model) =
            training::fit(ctx, "pretrain", cfg, seed, &dev, model, &mut CausalLmObjective, &train_set, eval_ref)?;
        training::write_model(&model_dir, model, self.src, self.tokenizer, self.p.system.as_deref())?;
        if let Some(v) = self.vocab {
            v.save(&model_dir.join("vocab_map.json")).map_err(StageError::failed)?;
        }
        ctx.set_report(training::report(
            ctx,
            &outcome,
            &metrics_dir,
            &model_dir,
            serde_json::json!({
                "documents": docs.len(),
                "corpus_tokens": n_tokens,
                "blocks": data.examples.len(),
                "vocab_size": self.vocab.map(VocabMap::len),
                "tokens_outside_vocab": self.outside,
                "seconds": self.t0.elapsed().as_secs_f64(),
            }),
        ));
        Ok(())
    }
}

#[cfg(test)]
mod document_tests {
    use pipeline_model::chat::ChatTemplate;
    use pipeline_model::tokenizer::Tokenizer;

    use super::*;
    use crate::data::Message;

    /// Regression (issue 15, point 1): the seed's embedding row in `vocab_data` failed the stage
    /// with `chat template render: undefined value` (Qwen2.5's template wants a user turn first).
    #[test]
    fn an_embedding_pair_gives_its_two_texts_as_documents() {
        let tok = Tokenizer::qwen25().unwrap();
        let chat = ChatTemplate::qwen25_default().unwrap();
        let pair = Sample {
            id: "pairs.jsonl:1".into(),
            messages: vec![Message::new("assistant", "A dog runs in the park.")],
            rejected_response: Some("Stock prices fell sharply.".into()),
            label: Some(Label::Float(0.15)),
            ..Default::default()
        };
        let docs = documents(&tok, &chat, std::slice::from_ref(&pair), None).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(tok.decode(&docs[1], false).unwrap(), "Stock prices fell sharply.");
        // A conversation is still one rendered document; the same row without its label still fails.
        let chat_row = Sample {
            id: "c:1".into(),
            messages: vec![Message::new("user", "hi"), Message::new("assistant", "yo")],
            ..Default::default()
        };
        assert_eq!(documents(&tok, &chat, &[chat_row], None).unwrap().len(), 1);
        let unlabelled = Sample { label: None, ..pair };
        let e = documents(&tok, &chat, &[unlabelled], None).unwrap_err().to_string();
        assert!(e.contains("pairs.jsonl:1") && e.contains("chat template"), "{e}");
    }
}
