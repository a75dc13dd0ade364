//! `pipeline chat`: an interactive multi-turn chat in the terminal (ms-swift's `swift infer`) on the
//! server's engine — tokens are printed as they are produced, the conversation is kept and
//! re-rendered with the chat template each turn; `/clear` forgets it, `/exit` (or end of input)
//! quits. Also `pipeline generate --stream`, which prints one completion as it is produced.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use pipeline_model::chat::Message;
use pipeline_model::{FinishReason, GenerationConfig};

use crate::common::Usage;
use crate::serve::codec::TextCodec;
use crate::serve::engine::{EngineHandle, EngineLimits, Event, GenRequest};
use crate::serve::sequence::Sampling;
use crate::serve::{self, ModelArgs};

/// Chat with a model in the terminal (streaming; `/clear` starts over, `/exit` quits).
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A peft LoRA adapter folder to apply (unmerged) on the model.
    #[arg(long, value_name = "PATH")]
    pub adapters: Option<PathBuf>,
    /// The system message [default: the one the model was trained with, else the template's].
    #[arg(long)]
    pub system: Option<String>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Model index 1 when an adapter was loaded beside the base, else the base.
fn start(
    model: &ModelArgs,
    adapter: Option<&PathBuf>,
) -> anyhow::Result<(EngineHandle, std::sync::Arc<TextCodec>, usize)> {
    let adapters: Vec<PathBuf> = adapter.into_iter().cloned().collect();
    let loaded = serve::load(
        model,
        &adapters,
        EngineLimits { max_running: 1, max_queue: 1, max_batch: 1, prefill_tokens: usize::MAX },
    )?;
    Ok((loaded.engine, loaded.codec, adapters.len()))
}

/// Prints a request's text as it arrives; returns the text and why it ended.
fn print_stream(
    engine: &EngineHandle,
    req: GenRequest,
    out: &mut impl Write,
) -> anyhow::Result<(String, FinishReason)> {
    let mut rx = engine.submit(req).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut text = String::new();
    loop {
        match rx.blocking_recv() {
            Some(Event::Token { text: t, .. }) => {
                out.write_all(t.as_bytes())?;
                out.flush()?;
                text.push_str(&t);
            }
            Some(Event::Finished { reason, .. }) => return Ok((text, reason)),
            Some(Event::Failed(f)) => return Err(f.into()),
            None => anyhow::bail!("the engine stopped"),
        }
    }
}

fn request(model: usize, prompt: Vec<u32>, gen: GenerationConfig, codec: &TextCodec) -> anyhow::Result<GenRequest> {
    if prompt.len() >= codec.context_len {
        return Err(Usage(format!(
            "the prompt has {} tokens, the model's context is {} (/clear starts over)",
            prompt.len(),
            codec.context_len
        ))
        .into());
    }
    let gen = GenerationConfig { max_new_tokens: gen.max_new_tokens.min(codec.context_len - prompt.len()), ..gen };
    Ok(GenRequest {
        model,
        prompt,
        sampling: Sampling { gen, presence_penalty: 0.0, frequency_penalty: 0.0, logprobs: None },
        n: 1,
        deadline: None,
    })
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let (engine, codec, model) = start(&args.model, args.adapters.as_ref())?;
    if !codec.has_chat_template() {
        return Err(Usage("the model has no chat template (use `pipeline generate --raw`)".into()).into());
    }
    let gen = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: 1.0,
        stop_token_ids: codec.stop_ids.clone(),
        stop_strings: Vec::new(),
        seed: args.seed,
    };
    let base: Vec<Message> = args.system.iter().map(|s| Message::system(s.clone())).collect();
    let mut history = base.clone();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    eprintln!(
        "chatting with {} (/clear starts over, /exit quits)",
        args.model.model.as_ref().or(args.model.recipe.as_ref()).map_or_else(String::new, |p| p.display().to_string())
    );
    let mut line = String::new();
    loop {
        write!(stdout, "<<< ")?;
        stdout.flush()?;
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            writeln!(stdout)?;
            return Ok(());
        }
        let input = line.trim_end_matches(['\n', '\r']);
        match input.trim() {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/clear" => {
                history = base.clone();
                writeln!(stdout, "(the conversation is cleared)")?;
                continue;
            }
            _ => {}
        }
        history.push(Message::user(input));
        let prompt = codec.encode_chat(&history).map_err(|e| anyhow::anyhow!(e))?;
        let req = match request(model, prompt, gen.clone(), &codec) {
            Ok(r) => r,
            Err(e) => {
                history.pop();
                writeln!(stdout, "error: {e}")?;
                continue;
            }
        };
        write!(stdout, ">>> ")?;
        let (reply, _) = print_stream(&engine, req, &mut stdout)?;
        writeln!(stdout)?;
        history.push(Message::assistant(reply));
    }
}

/// `pipeline generate --stream`: the same completion as `pipeline generate`, printed token by token.
pub fn generate_stream(args: &crate::cmd_generate::GenerateArgs) -> anyhow::Result<()> {
    let (engine, codec, index) = start(&args.model, args.adapter.as_ref())?;
    let prompt = if args.raw {
        codec.encode_raw(&args.prompt)
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(Message::system(s.clone()));
        }
        msgs.push(Message::user(args.prompt.clone()));
        codec.encode_chat(&msgs)
    }
    .map_err(|e| anyhow::anyhow!(e))
    .context("encoding the prompt")?;
    let gen = GenerationConfig {
        max_new_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        stop_token_ids: codec.stop_ids.clone(),
        stop_strings: args.stop.clone(),
        seed: args.seed,
    };
    let mut stdout = std::io::stdout();
    print_stream(&engine, request(index, prompt, gen, &codec)?, &mut stdout)?;
    writeln!(stdout)?;
    Ok(())
}
