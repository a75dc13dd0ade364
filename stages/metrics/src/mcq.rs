//! evalscope's `general_mcq`: `{subset}_val.csv` (evaluated) and `{subset}_dev.csv` (few-shot
//! examples) in one folder, header `id,question,A,B,C,D,answer` (`id` optional, options `A`..`J`
//! read until the first missing column), the Chinese single-answer prompt, and the answer
//! extraction of evalscope 1.14.1's `parse_answers_zh`.
//!
//! Where evalscope would silently score a broken row (an answer that is no option, a gap in the
//! options), loading fails instead with the file and line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::tokenize::py_isspace;
use crate::DataError;

/// Option letters general_mcq knows (`A`..`J`).
pub const LETTERS: [&str; 10] = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"];

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McqItem {
    /// The `id` column, or the row number when the file has none.
    pub id: String,
    pub question: String,
    pub choices: Vec<String>,
    /// The correct letter.
    pub answer: String,
    /// 1-based line of the row in its file.
    pub line: usize,
}

/// Read text, naming the line of the first invalid UTF-8 byte.
pub(crate) fn read_utf8(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::new(path, None, e))?;
    match String::from_utf8(bytes) {
        Ok(mut s) => {
            if s.starts_with('\u{feff}') {
                s.drain(..3);
            }
            Ok(s)
        }
        Err(e) => {
            let upto = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..upto].iter().filter(|&&b| b == b'\n').count() + 1;
            Err(DataError::new(path, Some(line), format!("invalid UTF-8 (byte {upto})")))
        }
    }
}

/// Load one general_mcq CSV file.
pub fn load_mcq_csv(path: &Path) -> Result<Vec<McqItem>, DataError> {
    let text = read_utf8(path)?;
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(text.as_bytes());
    let header = rdr.headers().map_err(|e| csv_error(path, &e))?.clone();
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let question_col =
        col("question").ok_or_else(|| DataError::new(path, Some(1), "header has no `question` column"))?;
    let answer_col = col("answer").ok_or_else(|| DataError::new(path, Some(1), "header has no `answer` column"))?;
    let id_col = col("id");
    let option_cols: Vec<usize> = LETTERS.iter().map_while(|l| col(l)).collect();
    if option_cols.len() < 2 {
        return Err(DataError::new(
            path,
            Some(1),
            format!("header needs option columns A, B, ... (found {})", option_cols.len()),
        ));
    }
    let mut items = Vec::new();
    for (k, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| csv_error(path, &e))?;
        let line = rec.position().map_or(k + 2, |p| p.line() as usize);
        let get = |c: usize| rec.get(c).unwrap_or("").to_string();
        let mut choices: Vec<String> = option_cols.iter().map(|&c| get(c)).collect();
        while choices.last().is_some_and(|c| c.trim().is_empty()) {
            choices.pop();
        }
        if choices.len() < 2 {
            return Err(DataError::new(
                path,
                Some(line),
                format!("wrong option count: {} non-empty option(s), need at least 2", choices.len()),
            ));
        }
        if let Some(gap) = choices.iter().position(|c| c.trim().is_empty()) {
            return Err(DataError::new(
                path,
                Some(line),
                format!("wrong option count: option {} is empty but later options are not", LETTERS[gap]),
            ));
        }
        let answer = get(answer_col).trim().to_string();
        if !LETTERS[..choices.len()].contains(&answer.as_str()) {
            return Err(DataError::new(
                path,
                Some(line),
                format!("answer `{answer}` is not among the options {}", LETTERS[..choices.len()].join(",")),
            ));
        }
        let id = id_col.map(get).filter(|s| !s.is_empty()).unwrap_or_else(|| (k + 1).to_string());
        items.push(McqItem { id, question: get(question_col), choices, answer, line });
    }
    Ok(items)
}

fn csv_error(path: &Path, e: &csv::Error) -> DataError {
    let line = e.position().map(|p| p.line() as usize);
    let msg = match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("wrong option count: row has {len} fields, the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "invalid UTF-8".to_string(),
        _ => e.to_string(),
    };
    DataError::new(path, line, msg)
}

/// One subset of a general_mcq folder.
#[derive(Debug, Clone)]
pub struct McqSubset {
    pub name: String,
    pub val_path: PathBuf,
    pub val: Vec<McqItem>,
    /// Few-shot examples (`{subset}_dev.csv`), empty when the file is absent.
    pub dev: Vec<McqItem>,
}

/// The subsets of a general_mcq folder: every `{subset}_val.csv`, sorted by name.
pub fn list_mcq_subsets(dir: &Path) -> Result<Vec<String>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::new(dir, None, e))?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix("_val.csv")).map(str::to_string))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(DataError::new(dir, None, "no `{subset}_val.csv` file in this general_mcq folder"));
    }
    Ok(names)
}

/// Load `{subset}_val.csv` and, when present, `{subset}_dev.csv`.
pub fn load_mcq_subset(dir: &Path, subset: &str) -> Result<McqSubset, DataError> {
    let val_path = dir.join(format!("{subset}_val.csv"));
    let val = load_mcq_csv(&val_path)?;
    if val.is_empty() {
        // Regression (issue 14, defect 8): a header-only file scored 0.0 with success.
        return Err(DataError::new(&val_path, None, "has a header but no questions: nothing to score"));
    }
    let dev_path = dir.join(format!("{subset}_dev.csv"));
    let dev = if dev_path.exists() { load_mcq_csv(&dev_path)? } else { Vec::new() };
    Ok(McqSubset { name: subset.to_string(), val_path, val, dev })
}

/// evalscope's `answer_options`: `A) text` lines.
fn answer_options(choices: &[String]) -> String {
    choices.iter().enumerate().map(|(i, c)| format!("{}) {c}", LETTERS[i])).collect::<Vec<_>>().join("\n")
}

/// evalscope's `format_example` for one few-shot demonstration.
fn format_example(item: &McqItem) -> String {
    format!("{}\n{}\nANSWER: {}", item.question, answer_options(&item.choices), item.answer)
}

/// The user prompt evalscope's general_mcq sends (CHINESE_SINGLE_ANSWER_TEMPLATE, preceded by
/// FEW_SHOT_TEMPLATE with the examples joined by blank lines when `fewshot` is not empty).
pub fn mcq_prompt(item: &McqItem, fewshot: &[McqItem]) -> String {
    let letters = LETTERS[..item.choices.len()].join(",");
    let body = format!(
        "回答下面的单项选择题，请选出其中的正确答案。你的回答的全部内容应该是这样的格式：\"答案：[LETTER]\"（不带引号），其中 [LETTER] 是 {letters} 中的一个。\n\n问题：{}\n选项：\n{}\n",
        item.question,
        answer_options(&item.choices)
    );
    if fewshot.is_empty() {
        body
    } else {
        let examples: Vec<String> = fewshot.iter().map(format_example).collect();
        format!("Here are some examples of how to answer similar questions:\n\n{}\n\n{body}", examples.join("\n\n"))
    }
}

/// The first `n` dev rows (evalscope takes `examples[:few_shot_num]`).
pub fn fewshot_examples(subset: &McqSubset, n: usize) -> Result<&[McqItem], DataError> {
    if n == 0 {
        return Ok(&[]);
    }
    if subset.dev.len() < n {
        let dev = subset.val_path.with_file_name(format!("{}_dev.csv", subset.name));
        return Err(DataError::new(
            dev,
            None,
            format!("few_shot_num = {n} but only {} dev example(s)", subset.dev.len()),
        ));
    }
    Ok(&subset.dev[..n])
}

struct Extract {
    marker: Regex,
    latex: Regex,
    bracketed: Regex,
    plain: Regex,
    token: Regex,
}

fn extract_rules() -> &'static Extract {
    static R: OnceLock<Extract> = OnceLock::new();
    // `\s` written as Python's (U+001C..U+001F added).
    R.get_or_init(|| {
        let s = r"[\s\x1C-\x1F]";
        let r = |p: String| Regex::new(&p).expect("static regex");
        Extract {
            marker: r(format!(r"答案{s}*[:：]{s}*\**{s}*")),
            latex: r(format!(r"^(?:(?:\$+|\\\(|\\(?:boxed|fbox|text|textbf|mathbf|mathrm){s}*\{{){s}*)*")),
            bracketed: r(format!(r"^[(\[（【]{s}*([A-Za-z\d](?:{s}*[,，/、]{s}*[A-Za-z\d])*){s}*[)\]）】]")),
            plain: r(r"^([A-Za-z0-9][A-Za-z0-9 ,，/、]*)".to_string()),
            token: r(r"[A-Za-z\d]+".to_string()),
        }
    })
}

fn is_label_word(word: &str, allowed: &BTreeSet<&str>) -> bool {
    allowed.contains(word) || word.chars().all(|c| allowed.contains(c.encode_utf8(&mut [0; 4]) as &str))
}

/// evalscope's `_label_prefix`: the leading part of a capture that holds only labels.
fn label_prefix<'a>(capture: &'a str, allowed: &BTreeSet<&str>) -> &'a str {
    let tokens: Vec<regex::Match<'_>> = extract_rules().token.find_iter(capture).collect();
    let mut end = 0;
    for (i, t) in tokens.iter().enumerate() {
        let word = t.as_str();
        if is_label_word(word, allowed) {
            end = t.end();
            continue;
        }
        let follows = end > 0;
        let precedes = tokens.get(i + 1).is_some_and(|n| is_label_word(n.as_str(), allowed));
        if follows && precedes && matches!(word.to_lowercase().as_str(), "and" | "or") {
            continue;
        }
        break;
    }
    &capture[..end]
}

/// The letter a completion answers, as evalscope 1.14.1's `parse_answers_zh` (single answer)
/// finds it: the label after the last `答案：` marker that carries one (bracketed, LaTeX-wrapped
/// or plain), else the last uppercase letter of the completion if it is a valid option.
pub fn extract_answer(completion: &str, n_choices: usize) -> Option<String> {
    let r = extract_rules();
    let allowed: BTreeSet<&str> = LETTERS[..n_choices.min(LETTERS.len())].iter().copied().collect();
    let markers: Vec<regex::Match<'_>> = r.marker.find_iter(completion).collect();
    let mut matched = None;
    'markers: for m in markers.iter().rev() {
        let mut tail = &completion[m.end()..];
        if let Some(l) = r.latex.find(tail) {
            tail = &tail[l.end()..];
        }
        for re in [&r.bracketed, &r.plain] {
            if let Some(c) = re.captures(tail) {
                let prefix = label_prefix(c.get(1).map_or("", |g| g.as_str()), &allowed);
                if !prefix.is_empty() {
                    matched = Some(prefix);
                    break 'markers;
                }
            }
        }
    }
    match matched {
        Some(m) => {
            let m = m.trim_matches(py_isspace).trim_end_matches(['。', '.']);
            allowed.contains(m).then(|| m.to_string())
        }
        None => {
            let c = completion.chars().rev().find(|c| c.is_uppercase())?;
            let s = c.to_string();
            allowed.contains(s.as_str()).then_some(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_follows_evalscope() {
        assert_eq!(extract_answer("答案：B", 4).as_deref(), Some("B"));
        assert_eq!(extract_answer("我认为答案: (C)。", 4).as_deref(), Some("C"));
        assert_eq!(extract_answer("答案：A 不对，答案：$\\boxed{D}$", 4).as_deref(), Some("D"));
        assert_eq!(extract_answer("答案：[LETTER] 答案：B", 4).as_deref(), Some("B"));
        // No marker: the last uppercase letter, only when it is an option.
        assert_eq!(extract_answer("I think it is C", 4).as_deref(), Some("C"));
        assert_eq!(extract_answer("It is C, says Bob X", 4), None);
        // A label outside the options after a marker is no answer, not a fallback.
        assert_eq!(extract_answer("答案：E", 4), None);
        assert_eq!(extract_answer("答案：AB", 4), None);
        assert_eq!(extract_answer("答案：B and C", 4), None);
        assert_eq!(extract_answer("答案：B, not C", 4).as_deref(), Some("B"));
    }
}
