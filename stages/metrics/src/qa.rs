//! evalscope's `general_qa`: `{subset}.jsonl` in one folder, rows
//! `{"system"?, "query"|"question", "response"|"answer"}` or `{"messages": [...], "response"}`
//! (`messages` ending in the user turn to answer; a leading `system` turn is the system prompt).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::mcq::read_utf8;
use crate::DataError;

/// One chat turn: the workspace's one type ([`pipeline_chat::Message`]), which the evaluate
/// stage hands to the model's chat template as it is.
pub use pipeline_chat::Message;

/// One question with its reference answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaItem {
    /// The row's `id` when it has one, else its line number.
    pub id: String,
    /// The conversation to answer: optional system turn, earlier turns, the final user turn.
    pub messages: Vec<Message>,
    pub reference: String,
    pub line: usize,
}

fn str_field<'a>(row: &'a serde_json::Map<String, Value>, keys: &[&str]) -> Result<Option<&'a str>, String> {
    for k in keys {
        match row.get(*k) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => return Ok(Some(s)),
            Some(other) => return Err(format!("field `{k}` must be a string, got {other}")),
        }
    }
    Ok(None)
}

fn parse_row(row: &Value) -> Result<(Vec<Message>, String, Option<String>), String> {
    let obj = row.as_object().ok_or("row is not a JSON object")?;
    let reference = str_field(obj, &["response", "answer"])?.ok_or("missing `response` (or `answer`)")?.to_string();
    let id = obj.get("id").map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
    let messages = if let Some(msgs) = obj.get("messages") {
        let arr = msgs.as_array().ok_or("`messages` must be a list")?;
        let mut out = Vec::new();
        for (i, m) in arr.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).ok_or(format!("messages[{i}] has no string `role`"))?;
            let content =
                m.get("content").and_then(Value::as_str).ok_or(format!("messages[{i}] has no string `content`"))?;
            if !matches!(role, "system" | "user" | "assistant") {
                return Err(format!("messages[{i}]: unknown role `{role}`"));
            }
            out.push(Message::new(role, content));
        }
        if out.last().map(|m| m.role.as_str()) != Some("user") {
            return Err("`messages` must end with a user turn".into());
        }
        out
    } else {
        let query = str_field(obj, &["query", "question"])?.ok_or("missing `query` (or `question`, or `messages`)")?;
        let mut out = Vec::new();
        if let Some(system) = str_field(obj, &["system"])? {
            out.push(Message::new("system", system));
        }
        out.push(Message::new("user", query));
        out
    };
    Ok((messages, reference, id))
}

/// Load one general_qa JSONL file (blank lines are skipped).
pub fn load_qa_jsonl(path: &Path) -> Result<Vec<QaItem>, DataError> {
    let text = read_utf8(path)?;
    let mut items = Vec::new();
    for (k, line) in text.lines().enumerate() {
        let lineno = k + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| DataError::new(path, Some(lineno), format!("invalid JSON: {e}")))?;
        let (messages, reference, id) = parse_row(&v).map_err(|m| DataError::new(path, Some(lineno), m))?;
        items.push(QaItem { id: id.unwrap_or_else(|| lineno.to_string()), messages, reference, line: lineno });
    }
    Ok(items)
}

/// The subsets of a general_qa folder: every `{subset}.jsonl`, sorted.
pub fn list_qa_subsets(dir: &Path) -> Result<Vec<String>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::new(dir, None, e))?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".jsonl")).map(str::to_string))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(DataError::new(dir, None, "no `{subset}.jsonl` file in this general_qa folder"));
    }
    Ok(names)
}
