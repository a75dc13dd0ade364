//! `pipeline generate`: load a model (Hugging Face folder or `.gguf`) and continue one prompt.

use std::path::PathBuf;

use anyhow::Context;
use dfdx::prelude::Cpu;
use pipeline_model::chat::Message;
use pipeline_model::pretrained::load_pretrained;
use pipeline_model::{generate, GenerationConfig};

/// Generate text with a model (greedy by default; the chat template is applied unless `--raw`).
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
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
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let dev = Cpu::default();
    let mut p = load_pretrained(&args.model, &dev).with_context(|| format!("loading {}", args.model.display()))?;
    if let Some(a) = &args.adapter {
        p.model.load_peft_adapter(a).with_context(|| format!("loading adapter {}", a.display()))?;
    }
    let ids = if args.raw {
        p.tokenizer.encode(&args.prompt, true)?
    } else {
        let chat = p.chat.as_ref().context("the model has no chat template (use --raw to continue plain text)")?;
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(Message::system(s.clone()));
        }
        msgs.push(Message::user(args.prompt.clone()));
        chat.encode_prompt(&p.tokenizer, &msgs, None)?
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
    let tok = &p.tokenizer;
    let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
    let out = generate(&p.model, &[ids], &cfg, Some(&decode))?;
    println!("{}", out[0].text.as_deref().unwrap_or_default());
    Ok(())
}
