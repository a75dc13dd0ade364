//! `pipeline generate`: load a model (Hugging Face folder, `.gguf`, a peft LoRA adapter folder on
//! its base, or the `model` output of a recipe's training stage from the cache) and continue one
//! prompt.
//!
//! With `--recipe`, the model is the `model` artifact of the latest committed run of `--stage`
//! (default: the last stage, in execution order, that declares a `model` output). A model folder
//! with a `vocab_map.json` (the tiny preset) is read through its restricted vocabulary, and its
//! `chat_defaults.json` system prompt is used when `--system` is absent (for an adapter folder:
//! the adapter's, else its base's).

use std::path::PathBuf;

use anyhow::Context;

use crate::common::{arm_checked_reads, corrupt_reads, default_system, model_path, Usage};
use crate::report::LogFormat;
use crate::serve::ModelArgs;
use dfdx::prelude::Cpu;
use pipeline_engine::Device;
use pipeline_model::chat::Message;
use pipeline_model::pretrained::ModelSource;
use pipeline_model::{generate, GenerationConfig};

/// Generate text with a model (greedy by default; the chat template is applied unless `--raw`).
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// `--model` / `--base` / `--recipe` / `--stage` / `--cache-dir` / `--device`, as `serve` and
    /// `chat` take them.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user message (or, with --raw, the text to continue).
    #[arg(long)]
    pub prompt: String,
    /// A system message (chat mode only; the template's default applies when absent).
    #[arg(long)]
    pub system: Option<String>,
    /// A peft LoRA adapter folder to apply (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Print the text as it is generated (same text; runs on `pipeline serve`'s engine).
    #[arg(long)]
    pub stream: bool,
}

pub fn run(args: GenerateArgs, fmt: LogFormat) -> anyhow::Result<()> {
    // With `--log-format json` the generation is one event (`--stream` only changes when text
    // appears on a terminal).
    if args.stream && fmt == LogFormat::Human {
        return crate::cmd_chat::generate_stream(&args);
    }
    match args.model.device {
        Device::Cpu => run_on(args, Cpu::default(), fmt),
        #[cfg(feature = "cuda")]
        Device::Cuda { ordinal } => {
            let dev = pipeline_stages::cuda_device(ordinal)?;
            run_on(args, dev, fmt)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda { .. } => Err(Usage(pipeline_stages::cuda_not_built(args.model.device).to_string()).into()),
    }
}

fn run_on<D: dfdx::prelude::Device<f32>>(args: GenerateArgs, dev: D, fmt: LogFormat) -> anyhow::Result<()> {
    let m = &args.model;
    let (model, store) = model_path(m.model.as_deref(), m.recipe.as_deref(), m.stage.as_deref(), &m.cache)?;
    let src = ModelSource::resolve(&model, m.base.as_deref()).map_err(|e| Usage(e.to_string()))?;
    if let Some(store) = &store {
        arm_checked_reads(store, &src)?;
    }
    let system = args.system.clone().or_else(|| default_system(&src));
    let loaded = src.load_for_inference(&dev);
    corrupt_reads(store.as_ref(), loaded.as_ref().err())?;
    let mut p = loaded.with_context(|| format!("loading {}", model.display()))?;
    if let Some(a) = &args.adapter {
        p.model.load_peft_adapter(a).with_context(|| format!("loading adapter {}", a.display()))?;
    }
    let ids = if args.raw {
        p.to_model_ids(&p.tokenizer.encode(&args.prompt, true)?)
    } else {
        let chat = p.chat.as_ref().context("the model has no chat template (use --raw to continue plain text)")?;
        let mut msgs = Vec::new();
        if let Some(s) = &system {
            msgs.push(Message::system(s.clone()));
        }
        msgs.push(Message::user(args.prompt.clone()));
        p.to_model_ids(&chat.encode_prompt(&p.tokenizer, &msgs, None)?)
    };
    let cfg = GenerationConfig {
        max_new_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        stop_token_ids: p.stop_ids(),
        stop_strings: args.stop.clone(),
        seed: args.seed,
    };
    let decode = |ids: &[u32]| p.decode_model_ids(ids).unwrap_or_default();
    let context = p.model.cfg.max_position_embeddings;
    if ids.len().checked_add(args.max_tokens).is_none_or(|n| n > context) {
        return Err(Usage(format!(
            "--max-tokens {} after a prompt of {} tokens exceeds the model's context of {context} tokens",
            args.max_tokens,
            ids.len()
        ))
        .into());
    }
    let prompt_tokens = ids.len();
    let out = generate(&p.model, &[ids], &cfg, Some(&decode))?;
    let text = out[0].text.as_deref().unwrap_or_default();
    match fmt {
        LogFormat::Human => println!("{text}"),
        LogFormat::Json => crate::report::print_json(serde_json::json!({
            "event": "generation",
            "model": model.display().to_string(),
            "text": text,
            "finish_reason": match out[0].finish {
                pipeline_model::FinishReason::Stop => "stop",
                pipeline_model::FinishReason::Length => "length",
            },
            "prompt_tokens": prompt_tokens,
            "completion_tokens": out[0].tokens.len(),
        })),
    }
    Ok(())
}
