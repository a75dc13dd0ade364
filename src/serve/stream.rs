//! Server-sent events: a request's channel of engine events turned into OpenAI's stream — for chat,
//! one `chat.completion.chunk` per choice with `delta.role = "assistant"` first, then one chunk per
//! token, then each choice's chunk with its `finish_reason` (exactly one per choice); with
//! `stream_options.include_usage` one more chunk with `choices: []` and the usage; finally
//! `data: [DONE]`. A request that fails part-way sends `data: {"error": …}` and then `[DONE]`.
//!
//! Dropping the stream (the client disconnected) drops the receiver, which frees the request's
//! sequences in the engine before its next token.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::IntoResponse;
use futures_util::stream;
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::Event;
use super::openai::{
    finish_reason, ChatCompletionChunk, ChatLogprobs, ChunkChoice, Completion, CompletionChoice, CompletionLogprobs,
    Delta, Usage,
};
use super::request::failure;

/// Which endpoint's chunk shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Chat,
    Completion,
}

/// What every chunk of one stream repeats.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_tokens: usize,
    pub include_usage: bool,
    pub shape: Shape,
}

struct State {
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    n: usize,
    pending: VecDeque<String>,
    finished: usize,
    completion_tokens: usize,
    /// Bytes of text sent per choice (`text_offset` of the completions logprobs).
    offsets: Vec<usize>,
    done: bool,
}

impl State {
    fn chunk(
        &self,
        choice: usize,
        text: Option<String>,
        logprob: Option<&super::sequence::TokenLogprob>,
        finish: Option<&'static str>,
    ) -> String {
        let m = &self.meta;
        match m.shape {
            Shape::Chat => {
                let c = ChunkChoice {
                    index: choice,
                    delta: Delta { role: None, content: text },
                    logprobs: logprob.map(|t| ChatLogprobs { content: vec![t.into()] }),
                    finish_reason: finish,
                };
                json(&ChatCompletionChunk {
                    id: m.id.clone(),
                    object: "chat.completion.chunk",
                    created: m.created,
                    model: m.model.clone(),
                    choices: vec![c],
                    usage: None,
                })
            }
            Shape::Completion => {
                let logprobs = logprob.map(|t| {
                    let mut l = CompletionLogprobs::default();
                    l.push(t, self.offsets[choice]);
                    l
                });
                json(&Completion {
                    id: m.id.clone(),
                    object: "text_completion",
                    created: m.created,
                    model: m.model.clone(),
                    choices: vec![CompletionChoice {
                        index: choice,
                        text: text.unwrap_or_default(),
                        logprobs,
                        finish_reason: finish,
                    }],
                    usage: None,
                })
            }
        }
    }

    fn usage_chunk(&self) -> String {
        let m = &self.meta;
        let usage = Some(Usage::new(m.prompt_tokens, self.completion_tokens));
        match m.shape {
            Shape::Chat => json(&ChatCompletionChunk {
                id: m.id.clone(),
                object: "chat.completion.chunk",
                created: m.created,
                model: m.model.clone(),
                choices: Vec::new(),
                usage,
            }),
            Shape::Completion => json(&Completion {
                id: m.id.clone(),
                object: "text_completion",
                created: m.created,
                model: m.model.clone(),
                choices: Vec::new(),
                usage,
            }),
        }
    }

    fn on(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Token { choice, text, logprob }) => {
                let c = self.chunk(choice, Some(text.clone()), logprob.as_ref(), None);
                self.offsets[choice] += text.len();
                self.pending.push_back(c);
            }
            Some(Event::Finished { choice, reason, completion_tokens }) => {
                let text = match self.meta.shape {
                    Shape::Chat => None,
                    Shape::Completion => Some(String::new()),
                };
                let c = self.chunk(choice, text, None, Some(finish_reason(reason)));
                self.pending.push_back(c);
                self.completion_tokens += completion_tokens;
                self.finished += 1;
                if self.finished == self.n {
                    if self.meta.include_usage {
                        let u = self.usage_chunk();
                        self.pending.push_back(u);
                    }
                    self.end();
                }
            }
            Some(Event::Failed(f)) => {
                self.pending.push_back(failure(f).json());
                self.end();
            }
            None => {
                self.pending
                    .push_back(super::error::ApiError::internal("the engine stopped while generating".into()).json());
                self.end();
            }
        }
    }

    fn end(&mut self) {
        self.pending.push_back("[DONE]".into());
        self.done = true;
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serialisable")
}

/// The SSE response for a submitted request with `n` choices.
pub fn respond(rx: UnboundedReceiver<Event>, meta: Meta, n: usize) -> axum::response::Response {
    let mut st = State {
        rx,
        n,
        pending: VecDeque::new(),
        finished: 0,
        completion_tokens: 0,
        offsets: vec![0; n],
        done: false,
        meta,
    };
    for choice in 0..n {
        let first = match st.meta.shape {
            Shape::Chat => json(&ChatCompletionChunk {
                id: st.meta.id.clone(),
                object: "chat.completion.chunk",
                created: st.meta.created,
                model: st.meta.model.clone(),
                choices: vec![ChunkChoice {
                    index: choice,
                    delta: Delta { role: Some("assistant"), content: Some(String::new()) },
                    logprobs: None,
                    finish_reason: None,
                }],
                usage: None,
            }),
            Shape::Completion => continue,
        };
        st.pending.push_back(first);
    }
    let events = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(Sse::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            let ev = st.rx.recv().await;
            st.on(ev);
        }
    });
    axum::response::Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))).into_response()
}
