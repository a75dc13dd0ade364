//! `POST /v1/completions`: plain-text continuation (no chat template), as `pipeline generate --raw`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::error::ApiError;
use super::openai::{finish_reason, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage};
use super::request::{collect, new_id, now_secs, parse_body, pick_model, plan, submit};
use super::stream::{self, Meta, Shape};
use super::AppState;

/// `prompt`: a string, or a list of token ids; a list holding one of those is accepted too.
fn prompt_ids(state: &AppState, v: &Value) -> Result<Vec<u32>, ApiError> {
    let bad = || ApiError::invalid("prompt", "`prompt` must be a string or a list of token ids");
    match v {
        Value::String(s) => state.codec.encode_raw(s).map_err(|e| ApiError::invalid("prompt", e)),
        Value::Array(items) if items.len() == 1 && (items[0].is_string() || items[0].is_array()) => {
            prompt_ids(state, &items[0])
        }
        Value::Array(items) if items.iter().all(Value::is_u64) => {
            let ids: Vec<u32> = items
                .iter()
                .map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            state.codec.model_ids_of(&ids).map_err(|e| ApiError::invalid("prompt", e))
        }
        Value::Array(items) if items.len() > 1 && items.iter().all(|x| x.is_string() || x.is_array()) => Err(
            ApiError::invalid("prompt", format!("`prompt` holds {} prompts; send one prompt per request", items.len())),
        ),
        _ => Err(bad()),
    }
}

pub async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match handle(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(state: Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&body)?;
    let model = pick_model(&state, req.model.as_deref())?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    let prompt = prompt_ids(&state, &req.prompt)?;
    let planned = plan(&state, model, prompt, &req.common(), "prompt")?;
    let (n, prompt_tokens, logprobs) =
        (planned.req.n, planned.req.prompt.len(), planned.req.sampling.logprobs.is_some());
    let rx = submit(&state, planned.req)?;
    let (id, created, name) = (new_id("cmpl"), now_secs(), state.models[model].clone());
    if planned.stream {
        let meta = Meta {
            id,
            created,
            model: name,
            prompt_tokens,
            include_usage: planned.include_usage,
            shape: Shape::Completion,
        };
        return Ok(stream::respond(rx, meta, n));
    }
    let choices = collect(rx, n).await?;
    let completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
    let body = Completion {
        id,
        object: "text_completion",
        created,
        model: name,
        choices: choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| CompletionChoice {
                index,
                logprobs: logprobs.then(|| {
                    let mut l = CompletionLogprobs::default();
                    let mut offset = 0;
                    for t in &c.logprobs {
                        l.push(t, offset);
                        offset += t.text.len();
                    }
                    l
                }),
                text: c.text,
                finish_reason: c.finish.map(finish_reason),
            })
            .collect(),
        usage: Some(Usage::new(prompt_tokens, completion_tokens)),
    };
    Ok(Json(body).into_response())
}
