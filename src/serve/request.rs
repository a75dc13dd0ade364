//! What both generation endpoints do with a request: parse the body, pick the model, check the
//! sampling fields against OpenAI's ranges and the server's limits (each error names its
//! parameter and the limit), submit to the engine, and — without `stream` — collect the choices.

use std::time::Instant;

use pipeline_model::{FinishReason, GenerationConfig};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::{Event, GenRequest, SubmitError};
use super::error::ApiError;
use super::openai::CommonFields;
use super::sequence::{Sampling, TokenLogprob};
use super::AppState;

/// Most alternatives per token (`top_logprobs`; OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// Most stop strings per request.
pub const MAX_STOP: usize = 16;

/// A JSON body; malformed JSON or a field of the wrong type is a 400 with serde's message (which
/// names the field and the position).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() { "malformed JSON" } else { "invalid request" };
        ApiError::invalid(None, format!("{what}: {e}"))
    })
}

/// The index of the requested model: the base (its served name, or no `model` at all) or an
/// adapter; anything else is a 404.
pub fn pick_model(state: &AppState, model: Option<&str>) -> Result<usize, ApiError> {
    match model {
        None => Ok(0),
        Some(m) => state.models.iter().position(|n| n == m).ok_or_else(|| ApiError::model_not_found(m)),
    }
}

/// A validated request, ready for the engine.
pub struct Planned {
    pub req: GenRequest,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(
    v: Option<T>,
    name: &'static str,
    lo: T,
    hi: T,
    default: T,
) -> Result<T, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x >= lo && x <= hi => Ok(x),
        Some(x) => Err(ApiError::invalid(name, format!("`{name}` is {x}; it must be between {lo} and {hi}"))),
    }
}

/// `stop`: a string, a list of strings, or null.
fn stop_strings(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::invalid_at(format!("stop[{i}]"), format!("`stop[{i}]` must be a string")))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid("stop", "`stop` must be a string or a list of strings")),
    };
    if list.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("`stop` has {} strings; at most {MAX_STOP} are allowed", list.len()),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "`stop` strings must not be empty"));
    }
    Ok(list)
}

/// Checks the common fields for a prompt of `prompt` model ids (`prompt_param` names the field
/// that holds it, for the context-length error).
pub fn plan(
    state: &AppState,
    model: usize,
    prompt: Vec<u32>,
    f: &CommonFields,
    prompt_param: &'static str,
) -> Result<Planned, ApiError> {
    let ctx = state.codec.context_len;
    let p = prompt.len();
    if p == 0 {
        return Err(ApiError::invalid(prompt_param, format!("`{prompt_param}` is empty")));
    }
    if p >= ctx {
        return Err(ApiError::invalid(
            prompt_param,
            format!("This model's maximum context length is {ctx} tokens, but the prompt has {p} tokens."),
        )
        .with_code("context_length_exceeded"));
    }
    let limit = state.limits.max_tokens;
    let max_tokens = match f.max_tokens {
        Some(0) => return Err(ApiError::invalid("max_tokens", "`max_tokens` must be at least 1")),
        Some(m) if m > limit as u64 => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("`max_tokens` is {m}, more than this server allows per completion ({limit}, --max-tokens)"),
            ))
        }
        Some(m) if p + m as usize > ctx => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({p} in the prompt, {m} in the completion).",
                    p + m as usize
                ),
            )
            .with_code("context_length_exceeded"))
        }
        Some(m) => m as usize,
        None => limit.min(ctx - p),
    };
    let max_n = state.engine.limits().max_running as u64;
    let n = range(f.n, "n", 1, max_n, 1)? as usize;
    let temperature = range(f.temperature, "temperature", 0.0, 2.0, 1.0)?;
    let top_p = match f.top_p {
        None => 1.0,
        Some(p) if p > 0.0 && p <= 1.0 => p,
        Some(p) => return Err(ApiError::invalid("top_p", format!("`top_p` is {p}; it must be above 0 and at most 1"))),
    };
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` is {k}; use -1 or 0 for off, or a positive number"),
            ))
        }
    };
    let presence_penalty = range(f.presence_penalty, "presence_penalty", -2.0, 2.0, 0.0)?;
    let frequency_penalty = range(f.frequency_penalty, "frequency_penalty", -2.0, 2.0, 0.0)?;
    let repetition_penalty = range(f.repetition_penalty, "repetition_penalty", 0.01, 10.0, 1.0)?;
    let logprobs = match f.logprobs {
        Some(k) if k > MAX_TOP_LOGPROBS => {
            let name = f.logprobs_param;
            return Err(ApiError::invalid(
                name,
                format!("`{name}` is {k}; at most {MAX_TOP_LOGPROBS} alternatives per token are allowed"),
            ));
        }
        other => other.map(|k| k as usize),
    };
    if f.include_usage.is_some() && !f.stream {
        return Err(ApiError::invalid("stream_options", "`stream_options` is only allowed with `stream: true`"));
    }
    let seed = f.seed.map_or_else(rand::random::<u64>, |s| s as u64);
    let gen = GenerationConfig {
        max_new_tokens: max_tokens,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        stop_token_ids: state.codec.stop_ids.clone(),
        stop_strings: stop_strings(f.stop.as_ref())?,
        seed,
    };
    let deadline = Some(Instant::now() + state.limits.request_timeout);
    Ok(Planned {
        req: GenRequest {
            model,
            prompt,
            sampling: Sampling { gen, presence_penalty, frequency_penalty, logprobs },
            n,
            deadline,
        },
        stream: f.stream,
        include_usage: f.include_usage.unwrap_or(false),
    })
}

/// Queues the request (429 when the queue is full).
pub fn submit(state: &AppState, req: GenRequest) -> Result<UnboundedReceiver<Event>, ApiError> {
    state.engine.submit(req).map_err(|e| match e {
        SubmitError::QueueFull { .. } => ApiError::busy(e.to_string()),
        SubmitError::Stopped => ApiError::unavailable(e.to_string()),
    })
}

/// One finished choice.
#[derive(Debug, Default)]
pub struct Choice {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
}

/// Waits for all `n` choices (the engine's timeout ends a request that runs too long).
pub async fn collect(mut rx: UnboundedReceiver<Event>, n: usize) -> Result<Vec<Choice>, ApiError> {
    let mut choices: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
    let mut done = 0;
    while done < n {
        match rx.recv().await {
            Some(Event::Token { choice, text, logprob }) => {
                let c = &mut choices[choice];
                c.text.push_str(&text);
                c.logprobs.extend(logprob);
            }
            Some(Event::Finished { choice, reason, completion_tokens }) => {
                choices[choice].finish = Some(reason);
                choices[choice].completion_tokens = completion_tokens;
                done += 1;
            }
            Some(Event::Failed(f)) => return Err(failure(f)),
            None => return Err(ApiError::internal("the engine stopped while generating".into())),
        }
    }
    Ok(choices)
}

/// A failed request's error answer.
pub fn failure(f: super::engine::Failure) -> ApiError {
    match f {
        super::engine::Failure::Timeout(_) => ApiError::timeout(f.to_string()),
        super::engine::Failure::Model(_) => ApiError::internal(f.to_string()),
    }
}

/// `chatcmpl-…` / `cmpl-…` ids and `created` stamps.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
