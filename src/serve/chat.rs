//! `POST /v1/chat/completions`: messages rendered with the model's chat template (and the system
//! prompt it was trained with when the conversation has none, as `pipeline generate` does).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pipeline_model::chat::Message;
use serde_json::Value;

use super::error::ApiError;
use super::openai::{
    finish_reason, ChatChoice, ChatCompletion, ChatCompletionRequest, ChatLogprobs, ChatMessageOut, Usage,
};
use super::request::{collect, new_id, now_secs, parse_body, pick_model, plan, submit};
use super::stream::{self, Meta, Shape};
use super::AppState;

/// Content part types that need a model with other modalities.
const MEDIA_PARTS: [&str; 7] = ["image_url", "image", "input_image", "input_audio", "audio_url", "video_url", "file"];

/// `messages` → chat messages: `role` one of system / developer (read as system) / user / assistant /
/// tool, `content` a string, a list of `text` parts (joined by newlines), or null for an
/// assistant turn.
pub fn messages(v: &Value) -> Result<Vec<Message>, ApiError> {
    let items = v.as_array().ok_or_else(|| ApiError::invalid("messages", "`messages` must be a list of messages"))?;
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must not be empty"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}]{field}");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid_at(at(".role"), format!("`{}` must be a string", at(".role"))))?;
        let role = match role {
            "system" | "user" | "assistant" | "tool" => role,
            "developer" => "system",
            other => {
                return Err(ApiError::invalid_at(
                    at(".role"),
                    format!("`{}` is `{other}`; expected system, developer, user, assistant or tool", at(".role")),
                ))
            }
        };
        let content = match m.get("content") {
            None | Some(Value::Null) if role == "assistant" => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    let pat = at(&format!(".content[{j}]"));
                    let kind = p.get("type").and_then(Value::as_str).ok_or_else(|| {
                        ApiError::invalid_at(format!("{pat}.type"), format!("`{pat}.type` must be a string"))
                    })?;
                    match kind {
                        "text" | "input_text" => texts.push(
                            p.get("text")
                                .and_then(Value::as_str)
                                .ok_or_else(|| {
                                    ApiError::invalid_at(
                                        format!("{pat}.text"),
                                        format!("`{pat}.text` must be a string"),
                                    )
                                })?
                                .to_string(),
                        ),
                        k if MEDIA_PARTS.contains(&k) => {
                            return Err(ApiError::invalid_at(
                                format!("{pat}.type"),
                                format!("`{pat}` is an `{k}` part, but this model is text-only: send `text` parts"),
                            )
                            .with_code("unsupported_content_type"))
                        }
                        k => {
                            return Err(ApiError::invalid_at(
                                format!("{pat}.type"),
                                format!("`{pat}.type` is `{k}`; expected `text`"),
                            ))
                        }
                    }
                }
                texts.join("\n")
            }
            _ => {
                return Err(ApiError::invalid_at(
                    at(".content"),
                    format!("`{}` must be a string or a list of content parts", at(".content")),
                ))
            }
        };
        out.push(Message::new(role, content));
    }
    Ok(out)
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match handle(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(state: Arc<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse_body(&body)?;
    let model = pick_model(&state, req.model.as_deref())?;
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
    }
    let msgs = messages(&req.messages)?;
    let prompt = state.codec.encode_chat(&msgs).map_err(|e| ApiError::invalid("messages", e))?;
    let planned = plan(&state, model, prompt, &req.common(), "messages")?;
    let (n, prompt_tokens, logprobs) =
        (planned.req.n, planned.req.prompt.len(), planned.req.sampling.logprobs.is_some());
    let rx = submit(&state, planned.req)?;
    let (id, created, name) = (new_id("chatcmpl"), now_secs(), state.models[model].clone());
    if planned.stream {
        let meta =
            Meta { id, created, model: name, prompt_tokens, include_usage: planned.include_usage, shape: Shape::Chat };
        return Ok(stream::respond(rx, meta, n));
    }
    let choices = collect(rx, n).await?;
    let completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
    let body = ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model: name,
        choices: choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| ChatChoice {
                index,
                logprobs: logprobs.then(|| ChatLogprobs { content: c.logprobs.iter().map(Into::into).collect() }),
                message: ChatMessageOut { role: "assistant", content: c.text },
                finish_reason: c.finish.map(finish_reason),
            })
            .collect(),
        usage: Usage::new(prompt_tokens, completion_tokens),
    };
    Ok(Json(body).into_response())
}
