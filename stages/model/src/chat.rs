//! Chat templates: Hugging Face Jinja chat templates rendered with minijinja, and chat encoding
//! with an assistant-token mask for SFT.
//!
//! Rendering matches transformers' `apply_chat_template(..., tokenize=False)` byte for byte on the
//! fixtures in `tests/fixtures/chat/` (Qwen2.5's template and SmolLM2's GGUF template; golden file
//! from `scripts/oracles/chat_golden.py`). As in transformers the environment has
//! `trim_blocks` and `lstrip_blocks` on, Python string methods (`.strip()`, `.startswith()`, ...),
//! `raise_exception(msg)`, a `tojson` that prints like Python's `json.dumps`, and the context
//! `messages`, `add_generation_prompt` and the tokenizer's `bos_token` / `eos_token` /
//! `pad_token` / `unk_token` (only those the tokenizer declares).
//!
//! API: [`ChatTemplate::new`] (also `str::parse`), [`ChatTemplate::from_tokenizer_config`],
//! [`ChatTemplate::from_tokenizer`], [`ChatTemplate::qwen25_default`]; [`ChatTemplate::render`];
//! [`ChatTemplate::encode_chat`] -> [`Encoded`] `{ ids, assistant_mask }`;
//! [`ChatTemplate::encode_prompt`] for generation.
//!
//! ## The assistant mask rule
//! For each assistant message `i`, render `messages[..i]` with the generation prompt (prefix `P`)
//! and `messages[..=i]` without it (`F`); `F` must start with `P` and the full conversation must
//! start with `F` (else [`ChatError::NotPrefix`]). The assistant span is `F[len(P)..]` cut right
//! after the last eos token in it (`<|im_end|>` for ChatML), so it holds the reply and its
//! end-of-turn token but not the newline the template adds after it; without an eos token in it,
//! the span is `F[len(P)..]` minus trailing whitespace. A token is marked when its byte range
//! overlaps a span — transformers' `return_assistant_tokens_mask` rule (`char_to_token` of the span
//! ends). With ChatML this marks exactly the reply tokens plus `<|im_end|>`, as ms-swift's loss does.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::tokenizer::{SpecialTokens, Tokenizer, TokenizerError};

/// One chat message: the workspace's one type ([`pipeline_chat::Message`]), shared with the
/// datasets and evaluation.
pub use pipeline_chat::Message;

/// Token ids of a rendered conversation and which of them are assistant output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub assistant_mask: Vec<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template {what}: {msg}")]
    Template { what: String, msg: String },
    #[error("{what}: no chat template")]
    NoTemplate { what: String },
    #[error("{path}: {msg}")]
    Config { path: String, msg: String },
    #[error(
        "chat template: rendering up to message {index} ({role}) is not a prefix of the longer conversation; cannot locate the assistant tokens"
    )]
    NotPrefix { index: usize, role: String },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// A compiled chat template plus the special-token strings it sees.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    special: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source_len", &self.source.len()).field("special", &self.special).finish()
    }
}

const NAME: &str = "chat_template";

impl FromStr for ChatTemplate {
    type Err = ChatError;
    fn from_str(s: &str) -> Result<Self, ChatError> {
        Self::new(s, SpecialTokens::default())
    }
}

impl ChatTemplate {
    /// Compile `source`; `special` supplies `bos_token`, `eos_token`, ... to the template and the
    /// eos token used by the mask rule.
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ChatError::Template { what: "compile".into(), msg: describe(&e) })?;
        Ok(ChatTemplate { env, source: source.to_string(), special })
    }

    /// The `chat_template` and special tokens of a `tokenizer_config.json`.
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Self, ChatError> {
        let path = path.as_ref();
        let bytes = pipeline_cache::checked::read(path)
            .map_err(|e| ChatError::Config { path: path.display().to_string(), msg: e.to_string() })?;
        let special = crate::tokenizer::parse_tokenizer_config(&bytes, &path.display().to_string())?;
        let src =
            special.chat_template.clone().ok_or_else(|| ChatError::NoTemplate { what: path.display().to_string() })?;
        Self::new(&src, special)
    }

    /// The tokenizer's own template (tokenizer_config.json or GGUF metadata).
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self, ChatError> {
        let special = tok.special_tokens().clone();
        let src = special.chat_template.clone().ok_or_else(|| ChatError::NoTemplate { what: "tokenizer".into() })?;
        Self::new(&src, special)
    }

    /// Qwen2.5-Instruct's template (shipped in `assets/qwen2.5/tokenizer_config.json`).
    pub fn qwen25_default() -> Result<Self, ChatError> {
        let special = crate::tokenizer::parse_tokenizer_config(
            crate::tokenizer::QWEN25_TOKENIZER_CONFIG,
            "embedded Qwen2.5 tokenizer_config.json",
        )?;
        let src = special.chat_template.clone().ok_or_else(|| ChatError::NoTemplate { what: "Qwen2.5".into() })?;
        Self::new(&src, special)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render like `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        for (k, v) in [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("pad_token", &self.special.pad),
            ("unk_token", &self.special.unk),
        ] {
            if let Some(v) = v {
                ctx.insert(k, Value::from(v.as_str()));
            }
        }
        let tmpl =
            self.env.get_template(NAME).map_err(|e| ChatError::Template { what: "load".into(), msg: describe(&e) })?;
        tmpl.render(ctx).map_err(|e| ChatError::Template { what: "render".into(), msg: describe(&e) })
    }

    /// Tokenise a whole conversation (no generation prompt) and mark assistant tokens (see the
    /// module docs for the rule). `system_default` is prepended as a system message when the
    /// conversation has none (templates with their own default, like Qwen2.5's, need `None`).
    pub fn encode_chat(
        &self,
        tok: &Tokenizer,
        messages: &[Message],
        system_default: Option<&str>,
    ) -> Result<Encoded, ChatError> {
        self.encode(tok, &with_system(messages, system_default), false)
    }

    /// Render `messages` (optionally with the generation prompt), tokenise, and mark the
    /// assistant tokens.
    pub fn encode(&self, tok: &Tokenizer, msgs: &[Message], add_generation_prompt: bool) -> Result<Encoded, ChatError> {
        let full = self.render(msgs, add_generation_prompt)?;
        let mut spans = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let p = self.render(&msgs[..i], true)?;
            let f = self.render(&msgs[..=i], false)?;
            if !f.starts_with(&p) || !full.starts_with(&f) {
                return Err(ChatError::NotPrefix { index: i, role: m.role.clone() });
            }
            let part = &f[p.len()..];
            let eos = self.special.eos.as_deref().filter(|e| !e.is_empty());
            let end = match eos.and_then(|e| part.rfind(e).map(|at| at + e.len())) {
                Some(end) => end,
                None => part.trim_end().len(),
            };
            spans.push((p.len(), p.len() + end));
        }
        let (ids, offsets) = tok.encode_with_offsets(&full)?;
        let assistant_mask =
            offsets.iter().map(|&(s, e)| e > s && spans.iter().any(|&(a, b)| s < b && e > a)).collect();
        Ok(Encoded { ids, assistant_mask })
    }

    /// Token ids of the conversation plus the generation prompt (what a model continues).
    pub fn encode_prompt(
        &self,
        tok: &Tokenizer,
        messages: &[Message],
        system_default: Option<&str>,
    ) -> Result<Vec<u32>, ChatError> {
        let text = self.render(&with_system(messages, system_default), true)?;
        Ok(tok.encode(&text, false)?)
    }
}

fn with_system(messages: &[Message], system_default: Option<&str>) -> Vec<Message> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(sys) = system_default {
        if messages.first().is_none_or(|m| m.role != "system") {
            out.push(Message::system(sys));
        }
    }
    out.extend_from_slice(messages);
    out
}

/// minijinja's error with its source location.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        if !s.contains("line") {
            s.push_str(&format!(" (line {line})"));
        }
    }
    s
}

/// Python's `json.dumps(v, ensure_ascii=False, indent=indent)` (what transformers' `tojson` does).
fn tojson(v: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&v, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&py_float(f));
            }
        }
        ValueKind::String => out.push_str(&serde_json::to_string(v.as_str().unwrap_or_default()).unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(it, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let ks = k.as_str().map(str::to_string).unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::to_string(&ks).unwrap_or_default());
                out.push_str(": ");
                write_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: cannot serialise {v}")));
        }
    }
    Ok(())
}

/// Python's float repr for the common cases (`1.0`, `0.5`, `1e-05`).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let s = format!("{f:?}");
    if let Some((m, e)) = s.split_once('e') {
        let (sign, digits) = e.strip_prefix('-').map_or(("+", e), |d| ("-", d));
        return format!("{m}e{sign}{digits:0>2}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_prints_like_python() {
        let src =
            r#"{% set x = {"b": [1, 2.5, "é<"], "a": none, "c": true} %}{{ x | tojson }}|{{ x | tojson(indent=2) }}"#;
        let t: ChatTemplate = src.parse().unwrap();
        let out = t.render(&[], false).unwrap();
        assert_eq!(
            out,
            "{\"b\": [1, 2.5, \"é<\"], \"a\": null, \"c\": true}|{\n  \"b\": [\n    1,\n    2.5,\n    \"é<\"\n  ],\n  \"a\": null,\n  \"c\": true\n}"
        );
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(1.0), "1.0");
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let t: ChatTemplate = "{{ raise_exception('roles must alternate') }}".parse().unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn broken_template_is_a_compile_error() {
        let e = "{% if %}".parse::<ChatTemplate>().unwrap_err().to_string();
        assert!(e.contains("compile"), "{e}");
    }
}
