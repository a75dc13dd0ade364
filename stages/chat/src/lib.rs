//! The one chat message type of `pipeline`: a turn of a conversation, `{"role", "content"}`.
//!
//! Used unchanged by the canonical dataset (`messages: list<struct<role, content>>` in
//! `data.parquet`), by chat-template rendering and encoding (`pipeline_model::chat`) and by
//! evaluation prompts (`pipeline_metrics::qa`), so a conversation flows from a dataset row to a
//! template to an evaluation without conversion. It lives in its own crate because
//! `pipeline-metrics` does not (and must not) depend on `pipeline-model`.
//!
//! Its serde form is exactly `{"role": ..., "content": ...}` (field order as declared), the
//! layout of the JSONL/Parquet datasets, of transformers' `messages` and of the golden files.

use serde::{Deserialize, Serialize};

/// One chat turn. Roles are `system`, `user` and `assistant` (free-form strings: templates may
/// know others, e.g. `tool`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The on-disk form the datasets and golden files rely on.
    #[test]
    fn serde_form_is_role_then_content() {
        let m = Message::user("hi \"there\"");
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"role":"user","content":"hi \"there\""}"#);
        let back: Message = serde_json::from_str(r#"{"content":"ok","role":"assistant"}"#).unwrap();
        assert_eq!(back, Message::assistant("ok"));
        assert_eq!(Message::system("s"), Message::new("system", "s"));
    }
}
