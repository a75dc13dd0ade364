//! Recipe wire format (strict serde over TOML) and the errors that point into a recipe file.
//!
//! ```toml
//! [pipeline]
//! name = "demo"
//! seed = 42                      # global seed, part of every cache key
//! [pipeline.defaults.concat]      # per-kind default params, merged key by key under each
//! separator = "\n"               # stage's own params (the stage's value wins)
//!
//! [stages.notes]
//! kind = "files"
//! params.paths = ["data/notes"]   # relative paths resolve against the recipe's directory
//!
//! [stages.joined]
//! kind = "concat"
//! inputs.parts = ["notes.data"]   # `<stage>.<output>`, or a list of them
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// An error located in a recipe file: rendered like a compiler diagnostic with file, line, the
/// offending line and a hint.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeError {
    pub file: PathBuf,
    /// 1-based; 0 when the error has no location (unreadable file).
    pub line: usize,
    pub col: usize,
    pub len: usize,
    pub message: String,
    pub hint: Option<String>,
    pub source_line: Option<String>,
}

impl std::error::Error for RecipeError {}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        if self.line == 0 {
            write!(f, "  --> {}", self.file.display())?;
        } else {
            write!(f, "  --> {}:{}:{}", self.file.display(), self.line, self.col)?;
            if let Some(src) = &self.source_line {
                let w = self.line.to_string().len();
                write!(
                    f,
                    "\n{:w$} |\n{} | {}\n{:w$} | {}{}",
                    "",
                    self.line,
                    src,
                    "",
                    " ".repeat(self.col - 1),
                    "^".repeat(self.len.max(1))
                )?;
            }
        }
        if let Some(h) = &self.hint {
            write!(f, "\n  = hint: {h}")?;
        }
        Ok(())
    }
}

/// The recipe text plus its path, for locating errors.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    /// An error at byte span `span` (clamped to its first line).
    pub fn error_at(
        &self,
        span: std::ops::Range<usize>,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> RecipeError {
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line_end = self.text[start..].find('\n').map(|i| start + i).unwrap_or(self.text.len());
        let line = self.text[..start].matches('\n').count() + 1;
        let col = self.text[line_start..start].chars().count() + 1;
        let end = span.end.clamp(start, line_end);
        let len = self.text[start..end].chars().count();
        RecipeError {
            file: self.path.clone(),
            line,
            col,
            len,
            message: message.into(),
            hint,
            source_line: Some(self.text[line_start..line_end].trim_end_matches('\r').to_string()),
        }
    }
    /// An error on 1-based line `line`, pointing at the first non-blank character.
    pub fn error_at_line(&self, line: usize, message: impl Into<String>, hint: Option<String>) -> RecipeError {
        let mut off = 0;
        for (i, l) in self.text.split_inclusive('\n').enumerate() {
            if i + 1 == line {
                let indent = l.len() - l.trim_start().len();
                let len = l.trim().len();
                return self.error_at(off + indent..off + indent + len, message, hint);
            }
            off += l.len();
        }
        self.error_at(0..0, message, hint)
    }
    pub fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())].matches('\n').count() + 1
    }
}

/// Split serde's "unknown field `x`, expected one of `a`, `b`" into message and hint.
pub(crate) fn split_serde_message(msg: &str) -> (String, Option<String>) {
    let msg = msg.trim().replace('\n', " ");
    if msg.starts_with("unknown field") || msg.starts_with("unknown variant") {
        for pat in [", expected one of ", ", expected "] {
            if let Some(i) = msg.find(pat) {
                let rest = msg[i + pat.len()..].replace('`', "").replace(" or ", ", ");
                return (msg[..i].to_string(), Some(format!("known keys: {rest}")));
            }
        }
        if let Some(i) = msg.find(", there are no fields") {
            return (msg[..i].to_string(), Some("this table takes no keys".into()));
        }
    }
    (msg, None)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireRecipe {
    pub pipeline: Option<Spanned<WirePipeline>>,
    #[serde(default)]
    pub stages: BTreeMap<Spanned<String>, Spanned<WireStage>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WirePipeline {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    #[allow(dead_code)]
    pub description: Option<String>,
    #[serde(default)]
    pub defaults: BTreeMap<Spanned<String>, toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireStage {
    pub kind: Spanned<String>,
    #[serde(default)]
    pub inputs: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    #[serde(default)]
    pub params: toml::Table,
    #[serde(default)]
    #[allow(dead_code)]
    pub description: Option<String>,
}

/// Parse the wire format, turning TOML and serde errors into located [`RecipeError`]s.
pub(crate) fn parse_wire(src: &Source) -> Result<WireRecipe, RecipeError> {
    match toml::from_str::<WireRecipe>(&src.text) {
        Ok(w) => Ok(w),
        Err(e) => {
            let raw = e.message().trim();
            let (mut message, mut hint) = split_serde_message(raw);
            if let Some(dup) = raw.lines().find(|l| l.contains("duplicate key")) {
                message = if dup.contains("in table `stages`") {
                    dup.replace("duplicate key", "duplicate stage id")
                } else {
                    dup.to_string()
                };
                hint = Some("stage ids (and keys) must be unique within a recipe: rename or merge one of them".into());
            }
            if message.starts_with("missing field `kind`") {
                hint = Some("every `[stages.<id>]` table needs `kind = \"...\"`".into());
            }
            if let (Some(h), Some(name)) = (&hint, message.strip_prefix("unknown field ")) {
                let place = if h.contains("kind, inputs") {
                    "in a `[stages.<id>]` table"
                } else if h.contains("name, seed") {
                    "in `[pipeline]`"
                } else {
                    "at the top level of the recipe"
                };
                message = format!("unknown key {name} {place}");
            }
            match e.span() {
                Some(span) => Err(src.error_at(span, message, hint)),
                None => Err(RecipeError {
                    file: src.path.clone(),
                    line: 0,
                    col: 0,
                    len: 0,
                    message,
                    hint,
                    source_line: None,
                }),
            }
        }
    }
}

/// Read a recipe file.
pub fn read_source(path: &Path) -> Result<Source, RecipeError> {
    std::fs::read_to_string(path).map(|text| Source { path: path.to_path_buf(), text }).map_err(|e| RecipeError {
        file: path.to_path_buf(),
        line: 0,
        col: 0,
        len: 0,
        message: format!("cannot read recipe: {e}"),
        hint: None,
        source_line: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_a_diagnostic() {
        let src = Source { path: "r.toml".into(), text: "[pipeline]\nname = \"x\"\nbogus = 1\n".into() };
        let err = parse_wire(&src).unwrap_err();
        let s = err.to_string();
        assert!(s.contains("r.toml:3:1"), "{s}");
        assert!(s.contains("unknown key `bogus` in `[pipeline]`"), "{s}");
        assert!(s.contains("known keys: name, seed, description, defaults"), "{s}");
    }
}
