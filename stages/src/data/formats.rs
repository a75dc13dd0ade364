//! Row-format detection and normalisation to [`Sample`] (SPECS.md §1, ms-swift conventions plus
//! LLaMA-Factory's spellings).
//!
//! Detection looks at the keys of each row, in this order: `messages`; `conversations`
//! (LLaMA-Factory sharegpt, `{from, value}` turns, `chosen`/`rejected` for DPO, `kto_tag`);
//! `conversation` (ms-swift sharegpt, `{human, assistant}` pairs); `instruction` + `output`
//! (alpaca); `query` + `response` (with `history`, self-cognition rows carry `tag`); `text`
//! (a pretraining document). Every format may also carry `system`, `rejected_response` (or
//! ms-swift's `positive_messages`, whose first conversation is an embedding pair's second text), `label`,
//! `label2` and `images` / `audios` / `videos`.

use std::path::Path;

use serde_json::{Map, Value};

use super::{Label, Message, Sample};

/// Which layout a row was recognised as (reported per source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Messages,
    ShareGpt,
    LlamaFactorySharegpt,
    Alpaca,
    QueryResponse,
    Text,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Messages => "messages",
            Format::ShareGpt => "sharegpt",
            Format::LlamaFactorySharegpt => "sharegpt_from_value",
            Format::Alpaca => "alpaca",
            Format::QueryResponse => "query_response",
            Format::Text => "text",
        }
    }
}

/// A row that cannot be normalised: which field and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.message)
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> RowError {
    RowError { field: field.into(), message: message.into() }
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, RowError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(err(key, format!("expected a string, found {}", kind(other)))),
    }
}

fn req_str<'a>(obj: &'a Map<String, Value>, key: &str, ctx: &str) -> Result<&'a str, RowError> {
    get_str(obj, key)?.ok_or_else(|| err(ctx, format!("missing string `{key}`")))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn norm_role(role: &str) -> Option<&'static str> {
    Some(match role {
        "system" => "system",
        "user" | "human" => "user",
        "assistant" | "gpt" | "bot" | "function_call" => "assistant",
        "tool" | "observation" | "function" => "tool",
        _ => return None,
    })
}

fn parse_label(v: &Value, field: &str) -> Result<Option<Label>, RowError> {
    Ok(match v {
        Value::Null => None,
        Value::Bool(b) => Some(Label::Bool(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(Label::Int(i))
            } else {
                Some(Label::Float(n.as_f64().ok_or_else(|| err(field, "label is not a finite number"))?))
            }
        }
        Value::String(s) => Some(Label::Text(s.clone())),
        other => return Err(err(field, format!("expected a bool, number or string label, found {}", kind(other)))),
    })
}

/// The text of `positive_messages[0]` (its non-system turns, one per line).
fn positive_text(v: &Value) -> Result<String, RowError> {
    let f = "positive_messages";
    let Value::Array(convs) = v else {
        return Err(err(f, format!("expected a list of conversations, found {}", kind(v))));
    };
    let Some(first) = convs.first() else { return Err(err(f, "empty: expected at least one conversation")) };
    let Value::Array(turns) = first else {
        return Err(err(format!("{f}[0]"), format!("expected a list of messages, found {}", kind(first))));
    };
    let mut texts = Vec::new();
    for (i, m) in turns.iter().enumerate() {
        let field = format!("{f}[0][{i}]");
        let Value::Object(m) = m else { return Err(err(field, format!("expected an object, found {}", kind(m)))) };
        if m.get("role").and_then(Value::as_str) == Some("system") {
            continue;
        }
        texts.push(req_str(m, "content", &field)?.to_string());
    }
    if texts.is_empty() {
        return Err(err(format!("{f}[0]"), "has no message with content"));
    }
    Ok(texts.join("\n"))
}

fn media_list(obj: &Map<String, Value>, key: &str) -> Result<Vec<String>, RowError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Object(o) => match o.get("path") {
                    Some(Value::String(s)) => Ok(s.clone()),
                    _ => Err(err(format!("{key}[{i}]"), "expected a path string or {\"path\": ...}")),
                },
                other => Err(err(format!("{key}[{i}]"), format!("expected a path string, found {}", kind(other)))),
            })
            .collect(),
        Some(other) => Err(err(key, format!("expected a list of paths, found {}", kind(other)))),
    }
}

fn push_system(msgs: &mut Vec<Message>, obj: &Map<String, Value>) -> Result<(), RowError> {
    if let Some(s) = get_str(obj, "system")? {
        if !s.is_empty() {
            msgs.push(Message::new("system", s));
        }
    }
    Ok(())
}

/// Normalise one row (a JSON object) to a sample without `id`/`source`. `base_dir` resolves
/// relative media paths; every media path must exist.
pub fn normalise_row(obj: &Map<String, Value>, base_dir: &Path) -> Result<(Format, Sample), RowError> {
    let mut s = Sample::default();
    let format;
    if let Some(v) = obj.get("messages") {
        format = Format::Messages;
        let Value::Array(items) = v else { return Err(err("messages", format!("expected a list, found {}", kind(v)))) };
        // A top-level `system` comes first unless the messages already start with one.
        let starts_with_system =
            items.first().and_then(|m| m.get("role")).and_then(Value::as_str).is_some_and(|r| r == "system");
        if !starts_with_system {
            push_system(&mut s.messages, obj)?;
        }
        for (i, m) in items.iter().enumerate() {
            let f = format!("messages[{i}]");
            let Value::Object(m) = m else { return Err(err(f, format!("expected an object, found {}", kind(m)))) };
            let role = req_str(m, "role", &f)?;
            let role = norm_role(role).ok_or_else(|| err(format!("{f}.role"), format!("unknown role `{role}`")))?;
            let content = match m.get("content") {
                Some(Value::String(c)) => c.as_str(),
                Some(Value::Null) | None => "",
                Some(o) => return Err(err(format!("{f}.content"), format!("expected a string, found {}", kind(o)))),
            };
            s.messages.push(Message::new(role, content));
        }
    } else if let Some(v) = obj.get("conversations") {
        format = Format::LlamaFactorySharegpt;
        let Value::Array(items) = v else {
            return Err(err("conversations", format!("expected a list, found {}", kind(v))));
        };
        push_system(&mut s.messages, obj)?;
        for (i, m) in items.iter().enumerate() {
            let f = format!("conversations[{i}]");
            s.messages.push(from_value_turn(m, &f)?);
        }
        if let Some(c) = obj.get("chosen") {
            s.messages.push(chosen_like(c, "chosen")?);
        }
        if let Some(r) = obj.get("rejected") {
            s.rejected_response = Some(chosen_like(r, "rejected")?.content);
        }
        if let Some(t) = obj.get("kto_tag") {
            s.label = parse_label(t, "kto_tag")?;
        }
    } else if let Some(v) = obj.get("conversation") {
        format = Format::ShareGpt;
        let Value::Array(items) = v else {
            return Err(err("conversation", format!("expected a list, found {}", kind(v))));
        };
        push_system(&mut s.messages, obj)?;
        for (i, t) in items.iter().enumerate() {
            let f = format!("conversation[{i}]");
            let Value::Object(t) = t else { return Err(err(f, format!("expected an object, found {}", kind(t)))) };
            if let Some(h) = get_str(t, "human").map_err(|e| err(format!("{f}.{}", e.field), e.message))? {
                s.messages.push(Message::new("user", h));
            } else {
                return Err(err(format!("{f}.human"), "missing"));
            }
            match get_str(t, "assistant").map_err(|e| err(format!("{f}.{}", e.field), e.message))? {
                Some(a) => s.messages.push(Message::new("assistant", a)),
                None if i + 1 == items.len() => {}
                None => return Err(err(format!("{f}.assistant"), "missing (only the last turn may omit it)")),
            }
        }
    } else if obj.contains_key("instruction") && obj.contains_key("output") {
        format = Format::Alpaca;
        push_system(&mut s.messages, obj)?;
        push_history(&mut s.messages, obj)?;
        let instruction = req_str(obj, "instruction", "instruction")?;
        let input = get_str(obj, "input")?.unwrap_or("");
        let query = if input.is_empty() { instruction.to_string() } else { format!("{instruction}\n{input}") };
        s.messages.push(Message::new("user", query));
        match obj.get("output") {
            Some(Value::String(o)) => s.messages.push(Message::new("assistant", o.as_str())),
            // LLaMA-Factory alpaca-style DPO: `output` absent, `chosen`/`rejected` strings.
            Some(Value::Null) => {}
            Some(o) => return Err(err("output", format!("expected a string, found {}", kind(o)))),
            None => {}
        }
    } else if obj.contains_key("query") || obj.contains_key("response") {
        format = Format::QueryResponse;
        push_system(&mut s.messages, obj)?;
        push_history(&mut s.messages, obj)?;
        s.messages.push(Message::new("user", req_str(obj, "query", "query")?));
        if let Some(r) = get_str(obj, "response")? {
            s.messages.push(Message::new("assistant", r));
        }
    } else if obj.contains_key("text") {
        format = Format::Text;
        s.text = Some(req_str(obj, "text", "text")?.to_string());
    } else {
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        return Err(err(
            "(row)",
            format!(
                "unrecognised row format with keys [{}]; expected one of messages, conversations, conversation, \
                 instruction+output, query+response, text",
                keys.join(", ")
            ),
        ));
    }
    if format == Format::Alpaca {
        if let (Some(Value::String(c)), None) = (obj.get("chosen"), obj.get("output").filter(|o| !o.is_null())) {
            s.messages.push(Message::new("assistant", c.as_str()));
        }
        if let Some(Value::String(r)) = obj.get("rejected") {
            s.rejected_response = Some(r.clone());
        }
    }
    if let Some(r) = get_str(obj, "rejected_response")? {
        s.rejected_response = Some(r.to_string());
    }
    // ms-swift's embedding rows: `positive_messages` is a list of conversations whose first one is
    // the pair's second text, kept where the seed's rows keep it (`rejected_response`).
    if let (None, Some(v)) = (&s.rejected_response, obj.get("positive_messages").filter(|v| !v.is_null())) {
        s.rejected_response = Some(positive_text(v)?);
    }
    if let Some(l) = obj.get("label") {
        s.label = parse_label(l, "label")?;
    }
    if let Some(l) = obj.get("label2") {
        s.label2 = parse_label(l, "label2")?;
    }
    s.images = media_list(obj, "images")?;
    s.audios = media_list(obj, "audios")?;
    s.videos = media_list(obj, "videos")?;
    check_media(&mut s, base_dir)?;
    if format != Format::Text && s.messages.iter().all(|m| m.role == "system") {
        return Err(err("messages", "no user or assistant turn"));
    }
    Ok((format, s))
}

fn from_value_turn(m: &Value, f: &str) -> Result<Message, RowError> {
    let Value::Object(m) = m else { return Err(err(f, format!("expected an object, found {}", kind(m)))) };
    // Both {from, value} and {role, content} appear in LLaMA-Factory files.
    let (rk, ck) = if m.contains_key("from") { ("from", "value") } else { ("role", "content") };
    let role = req_str(m, rk, f)?;
    let role = norm_role(role).ok_or_else(|| err(format!("{f}.{rk}"), format!("unknown role `{role}`")))?;
    let content = req_str(m, ck, f)?;
    Ok(Message::new(role, content))
}

fn chosen_like(v: &Value, field: &str) -> Result<Message, RowError> {
    match v {
        Value::String(s) => Ok(Message::new("assistant", s.as_str())),
        other => from_value_turn(other, field),
    }
}

fn push_history(msgs: &mut Vec<Message>, obj: &Map<String, Value>) -> Result<(), RowError> {
    match obj.get("history") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(turns)) => {
            for (i, t) in turns.iter().enumerate() {
                let f = format!("history[{i}]");
                match t {
                    Value::Array(pair) if pair.len() == 2 => {
                        let q = pair[0].as_str().ok_or_else(|| err(format!("{f}[0]"), "expected a string"))?;
                        let r = pair[1].as_str().ok_or_else(|| err(format!("{f}[1]"), "expected a string"))?;
                        msgs.push(Message::new("user", q));
                        msgs.push(Message::new("assistant", r));
                    }
                    other => return Err(err(f, format!("expected a [query, response] pair, found {}", kind(other)))),
                }
            }
            Ok(())
        }
        Some(other) => {
            Err(err("history", format!("expected a list of [query, response] pairs, found {}", kind(other))))
        }
    }
}

/// Tag counts must equal the media list lengths; relative paths resolve against `base_dir` and
/// must exist.
fn check_media(s: &mut Sample, base_dir: &Path) -> Result<(), RowError> {
    let joined: String = s.messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n");
    for (tag, key) in [("<image>", "images"), ("<audio>", "audios"), ("<video>", "videos")] {
        let list = match key {
            "images" => &mut s.images,
            "audios" => &mut s.audios,
            _ => &mut s.videos,
        };
        let n = joined.matches(tag).count();
        if n != list.len() {
            return Err(err(key, format!("{n} `{tag}` tag(s) in the messages but {} path(s) in `{key}`", list.len())));
        }
        for (i, p) in list.iter_mut().enumerate() {
            let path = base_dir.join(&*p);
            if !path.exists() {
                return Err(err(format!("{key}[{i}]"), format!("file not found: {}", path.display())));
            }
            *p = path.to_string_lossy().into_owned();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(j: &str) -> Result<(Format, Sample), RowError> {
        let v: Value = serde_json::from_str(j).unwrap();
        normalise_row(v.as_object().unwrap(), Path::new("."))
    }

    /// Issue 15, point 1: ms-swift's embedding rows (`positive_messages`) were collected without
    /// their second text.
    #[test]
    fn positive_messages_become_the_pairs_second_text() {
        let (_, s) = row(
            r#"{"messages":[{"role":"user","content":"A dog runs."}],"positive_messages":[[{"role":"user","content":"A puppy plays."}]],"label":0.8}"#,
        )
        .unwrap();
        assert_eq!(s.rejected_response.as_deref(), Some("A puppy plays."));
        assert_eq!(s.label, Some(Label::Float(0.8)));
        let e = row(r#"{"messages":[{"role":"user","content":"x"}],"positive_messages":[]}"#).unwrap_err();
        assert!(e.to_string().contains("positive_messages"), "{e}");
        // The seed's `rejected_response` wins when a row has both.
        let (_, s) = row(
            r#"{"messages":[{"role":"user","content":"a"}],"rejected_response":"b","positive_messages":[[{"role":"user","content":"c"}]]}"#,
        )
        .unwrap();
        assert_eq!(s.rejected_response.as_deref(), Some("b"));
    }

    #[test]
    fn alpaca_joins_instruction_and_input() {
        let (f, s) =
            row(r#"{"instruction":"Translate","input":"hello","output":"bonjour","system":"be brief"}"#).unwrap();
        assert_eq!(f, Format::Alpaca);
        assert_eq!(
            s.messages,
            vec![
                Message::new("system", "be brief"),
                Message::new("user", "Translate\nhello"),
                Message::new("assistant", "bonjour")
            ]
        );
        let (_, s) = row(r#"{"instruction":"Hi","input":"","output":"Hello"}"#).unwrap();
        assert_eq!(s.messages[0].content, "Hi");
    }

    #[test]
    fn errors_name_the_field() {
        let e = row(r#"{"messages":[{"role":"user","content":"a"},{"role":"wizard","content":"b"}]}"#).unwrap_err();
        assert_eq!(e.field, "messages[1].role");
        let e = row(r#"{"query":"q","history":[["a"]]}"#).unwrap_err();
        assert_eq!(e.field, "history[0]");
        let e = row(r#"{"messages":[{"role":"user","content":"<image> what"}],"images":[]}"#).unwrap_err();
        assert_eq!(e.field, "images");
        let e = row(r#"{"foo":1}"#).unwrap_err();
        assert!(e.message.contains("[foo]"), "{e}");
    }
}
