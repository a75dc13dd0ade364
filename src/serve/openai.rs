//! OpenAI's wire types, our own serde structs with OpenAI's field names. Requests ignore fields
//! they do not know (clients send many optional ones); fields whose shape varies (`stop`,
//! `messages[].content`, `prompt`) arrive as JSON values and are checked by the handlers, so an
//! error can name the exact field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Value,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub n: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// vLLM's extension (transformers' `repetition_penalty`).
    pub repetition_penalty: Option<f32>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Value,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub n: Option<u64>,
    /// The number of alternatives to report per token (the legacy completions shape).
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The sampling fields both endpoints share, as given.
#[derive(Debug, Default)]
pub struct CommonFields {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub n: Option<u64>,
    pub stream: bool,
    pub include_usage: Option<bool>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Alternatives per token: `Some(0)` = the chosen token's logprob only.
    pub logprobs: Option<u64>,
    /// The field that holds that number (`top_logprobs` for chat, `logprobs` for completions).
    pub logprobs_param: &'static str,
}

impl ChatCompletionRequest {
    /// `top_logprobs` without `logprobs: true` is OpenAI's 400; checked by the caller.
    pub fn common(&self) -> CommonFields {
        CommonFields {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.clone(),
            n: self.n,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.as_ref().map(|o| o.include_usage.unwrap_or(false)),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            logprobs: match self.logprobs {
                Some(true) => Some(self.top_logprobs.unwrap_or(0)),
                _ => None,
            },
            logprobs_param: "top_logprobs",
        }
    }
}

impl CompletionRequest {
    pub fn common(&self) -> CommonFields {
        CommonFields {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.clone(),
            n: self.n,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.as_ref().map(|o| o.include_usage.unwrap_or(false)),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            logprobs: self.logprobs,
            logprobs_param: "logprobs",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl From<&super::sequence::TokenLogprob> for ChatTokenLogprob {
    fn from(t: &super::sequence::TokenLogprob) -> Self {
        ChatTokenLogprob {
            token: t.text.clone(),
            logprob: t.logprob,
            bytes: t.text.as_bytes().to_vec(),
            top_logprobs: t
                .top
                .iter()
                .map(|(s, l)| TopLogprob { token: s.clone(), logprob: *l, bytes: s.as_bytes().to_vec() })
                .collect(),
        }
    }
}

/// One server-sent event of a chat stream.
#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// Only on the final chunk of a stream with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `/v1/completions`' answer, and (with `object = "text_completion"` too) each streamed event.
#[derive(Debug, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The legacy completions logprobs: parallel lists, alternatives as `{token: logprob}` maps.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends a token whose text starts at byte `offset` of the choice's text.
    pub fn push(&mut self, t: &super::sequence::TokenLogprob, offset: usize) {
        self.tokens.push(t.text.clone());
        self.token_logprobs.push(t.logprob);
        let mut top = BTreeMap::new();
        for (s, l) in &t.top {
            top.entry(s.clone()).or_insert(*l);
        }
        self.top_logprobs.push(top);
        self.text_offset.push(offset);
    }
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The base model's id (the model itself for the base), as vLLM lists LoRA adapters.
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
}

/// `finish_reason` on the wire.
pub fn finish_reason(r: pipeline_model::FinishReason) -> &'static str {
    match r {
        pipeline_model::FinishReason::Stop => "stop",
        pipeline_model::FinishReason::Length => "length",
    }
}
