//! # clean
//!
//! ## What it does
//! Normalises every text field of every row, then filters rows. In order:
//! 1. Unicode NFKC, except that CJK full-width punctuation is kept as written (`，` `：` `！`
//!    `（）` `？` `；` `～` `￥`, every full-width form of an ASCII symbol, and the ellipsis `…`),
//!    since NFKC would turn Chinese punctuation into ASCII (`，` → `,`) and change the training
//!    text; full-width letters and digits are still folded (`ＡＢ１` → `AB1`, so PII masking sees
//!    them). `fold_fullwidth_punctuation = true` gives plain NFKC; 2. control and invisible characters removed (zero-width, bidi controls, soft
//!    hyphen, BOM; `\n` and `\t` kept); 3. HTML remnants (tags other than the `<image>` /
//!    `<audio>` / `<video>` media tags, comments, character entities decoded); 4. whitespace
//!    (runs of spaces collapsed, lines trimmed, at most one blank line, ends trimmed);
//!    5. optional PII masking: e-mail → `[EMAIL]`; IPv4 → `[IP]`; 18-digit resident IDs (ISO 7064
//!    MOD 11-2 check digit, `X` included), 15-digit IDs and US SSNs → `[ID]`; bank card numbers
//!    (Luhn-checked, plain or grouped by four) → `[CARD]`; mainland mobiles (`1[3-9]` + 9 digits,
//!    optional `+86`) and phone numbers with separators → `[PHONE]`. A number is masked only when
//!    no ASCII letter or digit touches it, so it is found beside Chinese text too
//!    (`身份证号是110101199003074514，电话13812345678` → `身份证号是[ID]，电话[PHONE]`).
//!
//! Then the filters, each off when its param is unset, applied to the row's joined text: length
//! in characters, length in tokens (with `tokenizer`), language (script-based guess), and the
//! Gopher-style repetition rules (Rae et al. 2021, "Scaling Language Models", appendix A): the
//! fraction of duplicate lines, the fraction of characters covered by the most frequent word
//! n-gram, and the symbol-to-word ratio (`#` and `…`/`...`); repetition rules only look at rows
//! with at least `repetition_min_words` words. The report counts rows changed by each
//! normalisation and rows dropped by each filter (a row is counted under the first filter it
//! fails). Streams row groups.
//!
//! ## Inputs
//! `data`: a canonical dataset.
//!
//! ## Outputs
//! `data`: the cleaned rows. `rejected`: `rejected.jsonl`, one `{id, filter, value}` per
//! dropped row.
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `nfkc`, `remove_control`, `strip_html`, `normalize_whitespace` | `true` | normalisations |
//! | `fold_fullwidth_punctuation` | `false` | with `nfkc`, fold CJK full-width punctuation to ASCII too (plain NFKC) |
//! | `mask_pii` | `false` | mask e-mails, IPv4 addresses, ID numbers, bank cards, phone numbers |
//! | `min_chars`, `max_chars` | unset | character bounds on the joined text |
//! | `tokenizer` | unset | path to a HF `tokenizer.json`, needed by the token bounds |
//! | `min_tokens`, `max_tokens` | unset | token bounds on the joined text |
//! | `languages` | unset | keep rows whose guessed language is listed (`zh`, `en`, `ja`, `ko`, `ru`, `ar`); rows without letters are kept |
//! | `min_language_fraction` | `0.5` | fraction of letters that must be in the language's script |
//! | `max_duplicate_line_fraction` | `0.3` | Gopher: duplicate lines / lines |
//! | `max_top_ngram_fraction` | `0.2` | Gopher: chars in the most frequent `top_ngram_n`-gram / chars in words |
//! | `top_ngram_n` | `2` | n for the rule above |
//! | `max_symbol_ratio` | `0.1` | Gopher: (`#` + ellipses) / words |
//! | `repetition_min_words` | `50` | rows with fewer words skip the repetition rules |
//!
//! ## Cache key
//! Params, the input artifact's digest and the tokenizer file's content (declared as a file).
//!
//! ## Example
//! ```toml
//! [stages.clean]
//! kind = "clean"
//! inputs.data = "dedupe.data"
//! params = { max_chars = 8000, languages = ["zh", "en"], mask_pii = true }
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Instant;

use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use regex::Regex;
use unicode_normalization::{is_nfkc_quick, IsNormalized, UnicodeNormalization};

use crate::data::text::{for_each_word, guess_language, hash64, mask_pii, mix64};
use crate::data::{write_jsonl, DatasetReader, DatasetWriter, Sample};

pub(crate) struct Clean;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Params {
    #[serde(default = "yes")]
    pub nfkc: bool,
    #[serde(default)]
    pub fold_fullwidth_punctuation: bool,
    #[serde(default = "yes")]
    pub remove_control: bool,
    #[serde(default = "yes")]
    pub strip_html: bool,
    #[serde(default = "yes")]
    pub normalize_whitespace: bool,
    #[serde(default)]
    pub mask_pii: bool,
    pub min_chars: Option<usize>,
    pub max_chars: Option<usize>,
    pub tokenizer: Option<PathBuf>,
    pub min_tokens: Option<usize>,
    pub max_tokens: Option<usize>,
    pub languages: Option<Vec<String>>,
    #[serde(default = "d_lang_frac")]
    pub min_language_fraction: f64,
    #[serde(default = "d_dup_line")]
    pub max_duplicate_line_fraction: Option<f64>,
    #[serde(default = "d_top_ngram")]
    pub max_top_ngram_fraction: Option<f64>,
    #[serde(default = "d_two")]
    pub top_ngram_n: usize,
    #[serde(default = "d_symbol")]
    pub max_symbol_ratio: Option<f64>,
    #[serde(default = "d_rep_words")]
    pub repetition_min_words: usize,
}

fn yes() -> bool {
    true
}
fn d_lang_frac() -> f64 {
    0.5
}
fn d_dup_line() -> Option<f64> {
    Some(0.3)
}
fn d_top_ngram() -> Option<f64> {
    Some(0.2)
}
fn d_two() -> usize {
    2
}
fn d_symbol() -> Option<f64> {
    Some(0.1)
}
fn d_rep_words() -> usize {
    50
}

impl Params {
    fn check(&self) -> Result<(), StageError> {
        if (self.min_tokens.is_some() || self.max_tokens.is_some()) && self.tokenizer.is_none() {
            return Err(StageError::Params(
                "`min_tokens`/`max_tokens` need `tokenizer` (a tokenizer.json path)".into(),
            ));
        }
        if self.top_ngram_n == 0 {
            return Err(StageError::Params("`top_ngram_n` must be at least 1".into()));
        }
        Ok(())
    }
}

static HTML_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)<!--.*?-->|</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>").expect("static regex"));
static ENTITY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});").expect("static regex"));
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' |
        '\u{2066}'..='\u{2069}' | '\u{FEFF}' | '\u{180E}')
        || (c.is_control() && c != '\n' && c != '\t')
}

pub(crate) fn remove_control(s: &str) -> Cow<'_, str> {
    // ASCII text only needs a byte scan: the invisible characters above are all non-ASCII
    // except the C0 controls and DEL.
    let found = if s.is_ascii() {
        s.bytes().any(|b| (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f)
    } else {
        s.chars().any(is_invisible)
    };
    if found {
        Cow::Owned(s.chars().filter(|c| !is_invisible(*c)).map(|c| if c == '\r' { '\n' } else { c }).collect())
    } else {
        Cow::Borrowed(s)
    }
}

fn decode_entity(e: &str) -> Option<String> {
    let body = &e[1..e.len() - 1];
    let c = if let Some(num) = body.strip_prefix("#x").or_else(|| body.strip_prefix("#X")) {
        char::from_u32(u32::from_str_radix(num, 16).ok()?)?
    } else if let Some(num) = body.strip_prefix('#') {
        char::from_u32(num.parse().ok()?)?
    } else {
        match body {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            "nbsp" => ' ',
            "mdash" => '—',
            "ndash" => '–',
            "hellip" => '…',
            "copy" => '©',
            _ => return None,
        }
    };
    Some(c.to_string())
}

pub(crate) fn strip_html(s: &str) -> Cow<'_, str> {
    if !s.contains('<') && !s.contains('&') {
        return Cow::Borrowed(s);
    }
    let no_tags = HTML_TAG.replace_all(s, |c: &regex::Captures<'_>| {
        let t = &c[0];
        if matches!(t, "<image>" | "<audio>" | "<video>") {
            t.to_string()
        } else if t.starts_with("<br") || t.starts_with("</p") || t.starts_with("</div") || t.starts_with("</li") {
            "\n".to_string()
        } else {
            String::new()
        }
    });
    let decoded = ENTITY
        .replace_all(&no_tags, |c: &regex::Captures<'_>| decode_entity(&c[0]).unwrap_or_else(|| c[0].to_string()));
    if decoded == s {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(decoded.into_owned())
    }
}

/// True when [`normalize_whitespace`] would leave `s` unchanged (a sufficient condition checked
/// in one allocation-free scan): the only whitespace is single spaces and newlines, no space
/// touches a line end, at most one blank line in a row, no newline at either end.
fn whitespace_is_normal(s: &str) -> bool {
    let b = s.as_bytes();
    if matches!(b.first(), Some(b' ' | b'\n')) || matches!(b.last(), Some(b' ' | b'\n')) {
        return false;
    }
    let (mut p1, mut p2) = (0u8, 0u8);
    for (i, &c) in b.iter().enumerate() {
        match c {
            b' ' if p1 == b' ' || p1 == b'\n' => return false,
            b'\n' if p1 == b' ' || (p1 == b'\n' && p2 == b'\n') => return false,
            b'\t' | 0x0b | 0x0c | b'\r' => return false,
            0xc0.. if s[i..].chars().next().is_some_and(char::is_whitespace) => return false,
            _ => {}
        }
        p2 = p1;
        p1 = c;
    }
    true
}

pub(crate) fn normalize_whitespace(s: &str) -> Cow<'_, str> {
    if whitespace_is_normal(s) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut blank_run = 0usize;
    for line in s.split('\n') {
        let mut l = String::with_capacity(line.len());
        let mut space = false;
        for c in line.chars() {
            if c.is_whitespace() {
                space = !l.is_empty();
            } else {
                if space {
                    l.push(' ');
                    space = false;
                }
                l.push(c);
            }
        }
        if l.is_empty() {
            blank_run += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        blank_run = 0;
        out.push_str(&l);
    }
    if out == s {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(out)
    }
}

/// A `Hasher` over [`hash64`]: keys here are lines and already-mixed 64-bit n-gram hashes, so
/// SipHash's DoS resistance buys nothing. Map iteration order never reaches the output.
#[derive(Default)]
struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = hash64(bytes, self.0);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = mix64(self.0 ^ v);
    }
    fn write_u8(&mut self, v: u8) {
        self.0 = mix64(self.0 ^ u64::from(v));
    }
    fn write_usize(&mut self, v: usize) {
        self.0 = mix64(self.0 ^ v as u64);
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

/// Gopher repetition statistics of a text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Repetition {
    pub words: usize,
    pub duplicate_line_fraction: f64,
    pub top_ngram_fraction: f64,
    pub symbol_ratio: f64,
}

pub(crate) fn repetition(s: &str, n: usize) -> Repetition {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut seen: FastMap<&str, usize> = FastMap::default();
    for l in &lines {
        *seen.entry(l).or_default() += 1;
    }
    let dup_lines: usize = seen.values().filter(|&&c| c > 1).map(|&c| c - 1).sum();
    // Words as (hash, char length): no per-word allocation.
    let mut words: Vec<(u64, usize)> = Vec::new();
    for_each_word(s, |w| {
        let chars = if w.is_ascii() { w.len() } else { w.chars().count() };
        words.push((hash64(w.as_bytes(), 0), chars))
    });
    let word_chars: usize = words.iter().map(|w| w.1).sum();
    let mut top = 0.0;
    if words.len() >= n && word_chars > 0 {
        // n-gram hash -> (count, first position); ties broken by the earliest first position.
        let mut counts: FastMap<u64, (usize, usize)> =
            FastMap::with_capacity_and_hasher(words.len(), Default::default());
        for (i, g) in words.windows(n).enumerate() {
            let h = g.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, w| mix64(h ^ w.0));
            counts.entry(h).or_insert((0, i)).0 += 1;
        }
        // Gopher: characters of the most frequent n-gram times its count / characters in words.
        if let Some(&(c, first)) = counts.values().max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1))) {
            if c > 1 {
                let len: usize = words[first..first + n].iter().map(|w| w.1).sum();
                top = (len * c) as f64 / word_chars as f64;
            }
        }
    }
    let symbols = s.matches('#').count() + s.matches('…').count() + s.matches("...").count();
    Repetition {
        words: words.len(),
        duplicate_line_fraction: if lines.is_empty() { 0.0 } else { dup_lines as f64 / lines.len() as f64 },
        top_ngram_fraction: top,
        symbol_ratio: if words.is_empty() { 0.0 } else { symbols as f64 / words.len() as f64 },
    }
}

/// NFKC; text that is ASCII or passes the NFKC quick check is already normalised.
fn nfkc(x: &str) -> Cow<'_, str> {
    if x.is_ascii() || is_nfkc_quick(x.chars()) == IsNormalized::Yes {
        Cow::Borrowed(x)
    } else {
        Cow::Owned(x.nfkc().collect())
    }
}

/// CJK full-width punctuation that NFKC folds to ASCII or to a narrower form: the full-width
/// forms of the ASCII symbols (U+FF01-FF0F, FF1A-FF20, FF3B-FF40, FF5B-FF60: `！（），：；？～`),
/// the full-width currency and sign forms (U+FFE0-FFE6: `￥`), and the ellipsis `…` (U+2026, which
/// NFKC turns into `...`).
fn is_cjk_punctuation(c: char) -> bool {
    matches!(c,
        '\u{FF01}'..='\u{FF0F}' | '\u{FF1A}'..='\u{FF20}' | '\u{FF3B}'..='\u{FF40}' | '\u{FF5B}'..='\u{FF60}' |
        '\u{FFE0}'..='\u{FFE6}' | '\u{2026}')
}

/// NFKC that keeps CJK full-width punctuation ([`is_cjk_punctuation`]) as written. Each kept
/// character is a starter that composes with nothing, so normalising the text between them
/// piece by piece equals normalising the whole.
fn nfkc_keeping_cjk_punctuation(x: &str) -> Cow<'_, str> {
    if x.is_ascii() || is_nfkc_quick(x.chars()) == IsNormalized::Yes {
        return Cow::Borrowed(x);
    }
    if !x.chars().any(is_cjk_punctuation) {
        return nfkc(x);
    }
    let mut out = String::with_capacity(x.len());
    let mut rest = x;
    while let Some((i, c)) = rest.char_indices().find(|&(_, c)| is_cjk_punctuation(c)) {
        out.push_str(&nfkc(&rest[..i]));
        out.push(c);
        rest = &rest[i + c.len_utf8()..];
    }
    out.push_str(&nfkc(rest));
    if out == x {
        Cow::Borrowed(x)
    } else {
        Cow::Owned(out)
    }
}

/// One text normalisation: returns `Borrowed` when nothing changed.
type Step = fn(&str) -> Cow<'_, str>;

struct Cleaner {
    p: Params,
    tokenizer: Option<tokenizers::Tokenizer>,
    changed: BTreeMap<&'static str, usize>,
    dropped: BTreeMap<&'static str, usize>,
}

impl Cleaner {
    fn apply(&mut self, s: &mut Sample) {
        let mut changed = [false; 5];
        for t in s.texts_mut() {
            let steps: [(bool, Step); 5] = [
                (self.p.nfkc, if self.p.fold_fullwidth_punctuation { nfkc } else { nfkc_keeping_cjk_punctuation }),
                (self.p.remove_control, remove_control),
                (self.p.strip_html, strip_html),
                (self.p.normalize_whitespace, normalize_whitespace),
                (self.p.mask_pii, mask_pii),
            ];
            for (k, (on, f)) in steps.iter().enumerate() {
                if !on {
                    continue;
                }
                if let Cow::Owned(o) = f(t) {
                    if o != *t {
                        changed[k] = true;
                        *t = o;
                    }
                }
            }
        }
        for (k, name) in ["nfkc", "remove_control", "strip_html", "normalize_whitespace", "mask_pii"].iter().enumerate()
        {
            if changed[k] {
                *self.changed.entry(name).or_default() += 1;
            }
        }
    }

    /// The first filter the row fails, with the measured value.
    fn verdict(&self, s: &Sample) -> Result<Option<(&'static str, serde_json::Value)>, StageError> {
        let text = s.joined_text();
        let chars = text.chars().count();
        if let Some(m) = self.p.min_chars {
            if chars < m {
                return Ok(Some(("min_chars", chars.into())));
            }
        }
        if let Some(m) = self.p.max_chars {
            if chars > m {
                return Ok(Some(("max_chars", chars.into())));
            }
        }
        if let Some(tok) = &self.tokenizer {
            let n = tok.encode(text.as_str(), false).map_err(|e| StageError::failed(format!("tokenizer: {e}")))?.len();
            if self.p.min_tokens.is_some_and(|m| n < m) {
                return Ok(Some(("min_tokens", n.into())));
            }
            if self.p.max_tokens.is_some_and(|m| n > m) {
                return Ok(Some(("max_tokens", n.into())));
            }
        }
        if let Some(langs) = &self.p.languages {
            if let Some((lang, frac)) = guess_language(&text) {
                if !langs.iter().any(|l| l == lang) || frac < self.p.min_language_fraction {
                    return Ok(Some(("language", serde_json::json!(format!("{lang} {frac:.2}")))));
                }
            }
        }
        if self.p.max_duplicate_line_fraction.is_some()
            || self.p.max_top_ngram_fraction.is_some()
            || self.p.max_symbol_ratio.is_some()
        {
            let r = repetition(&text, self.p.top_ngram_n);
            if r.words >= self.p.repetition_min_words {
                let round = |x: f64| (x * 1e4).round() / 1e4;
                if self.p.max_duplicate_line_fraction.is_some_and(|m| r.duplicate_line_fraction > m) {
                    return Ok(Some(("duplicate_lines", round(r.duplicate_line_fraction).into())));
                }
                if self.p.max_top_ngram_fraction.is_some_and(|m| r.top_ngram_fraction > m) {
                    return Ok(Some(("top_ngram", round(r.top_ngram_fraction).into())));
                }
                if self.p.max_symbol_ratio.is_some_and(|m| r.symbol_ratio > m) {
                    return Ok(Some(("symbol_ratio", round(r.symbol_ratio).into())));
                }
            }
        }
        Ok(None)
    }
}

impl Stage for Clean {
    fn kind(&self) -> &'static str {
        "clean"
    }
    fn version(&self) -> u32 {
        // 2: PII masking finds numbers beside CJK text, validates IDs and cards, masks IPv4.
        2
    }
    fn summary(&self) -> &'static str {
        "Normalise text (NFKC, control chars, HTML, whitespace, PII) and filter rows by length, language, repetition"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&["data"], &[])?;
        let p: Params = ctx.params()?;
        p.check()?;
        let files = p.tokenizer.iter().map(|t| ctx.resolve(t)).collect();
        Ok(Declared { outputs: vec!["data".into(), "rejected".into()], files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let p: Params = ctx.params()?;
        p.check()?;
        let t0 = Instant::now();
        let tokenizer = match &p.tokenizer {
            Some(t) => {
                let path = ctx.resolve(t);
                Some(
                    tokenizers::Tokenizer::from_file(&path)
                        .map_err(|e| StageError::input(&path, None, format!("cannot load tokenizer: {e}")))?,
                )
            }
            None => None,
        };
        let mut c = Cleaner { p, tokenizer, changed: BTreeMap::new(), dropped: BTreeMap::new() };
        let reader = DatasetReader::open(ctx.input("data")?)?;
        let total = reader.len();
        ctx.progress_start("clean", Some(total as u64));
        let mut w = DatasetWriter::create(ctx.output("data")?)?;
        let mut rejected = Vec::new();
        let mut done = 0u64;
        for batch in reader {
            ctx.check_cancelled()?;
            for mut s in batch? {
                // Per row (an atomic load): a batch of long rows takes seconds (issue 14, defect 7).
                ctx.check_cancelled()?;
                c.apply(&mut s);
                match c.verdict(&s)? {
                    None => w.push(s)?,
                    Some((filter, value)) => {
                        *c.dropped.entry(filter).or_default() += 1;
                        rejected.push(serde_json::json!({"id": s.id, "filter": filter, "value": value}));
                    }
                }
                done += 1;
            }
            ctx.progress_set(done);
        }
        ctx.progress_finish();
        let rows_out = w.finish()?;
        let rdir = ctx.output("rejected")?;
        std::fs::create_dir_all(rdir).map_err(|e| StageError::io(rdir, e))?;
        write_jsonl(&rdir.join("rejected.jsonl"), &rejected)?;
        ctx.set_report(serde_json::json!({
            "rows_in": total,
            "rows_out": rows_out,
            "changed": c.changed,
            "dropped": c.dropped,
            "elapsed_ms": crate::data::ms_since(t0),
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisations() {
        assert_eq!(strip_html("<p>Hi &amp; bye</p><image>"), "Hi & bye\n<image>");
        assert_eq!(remove_control("a\u{200B}b\u{0007}c\u{FEFF}"), "abc");
        assert_eq!(normalize_whitespace("  a   b \n\n\n\n c\t \n"), "a b\n\nc");
        for already in ["a b\n\nc", "x", "", "é ü\nß"] {
            assert!(whitespace_is_normal(already) && matches!(normalize_whitespace(already), Cow::Borrowed(_)));
        }
        for not in [" a", "a ", "a  b", "a\n\n\nb", "a \nb", "a\n b", "a\tb", "a\u{a0}b", "\na", "a\n"] {
            assert!(!whitespace_is_normal(not), "{not:?}");
            assert_ne!(normalize_whitespace(not), not);
        }
        assert_eq!(
            mask_pii("mail bob@example.com or call 138 0013 8000? no: 13800138000, id 11010519491231002X"),
            "mail [EMAIL] or call [PHONE]? no: [PHONE], id [ID]"
        );
        assert_eq!(mask_pii("call (555) 123-4567 now, ssn 123-45-6789"), "call [PHONE] now, ssn [ID]");
        assert_eq!("ｈｅｌｌｏ①".nfkc().collect::<String>(), "hello1");
    }

    // Regression (issue 15, point 4): NFKC rewrote Chinese punctuation (`，` → `,`, `：` → `:`).
    #[test]
    fn default_normalisation_keeps_cjk_punctuation() {
        let zh = "注意：你好，世界！（测试）……价格￥５０？ｈｅｌｌｏ①";
        assert_eq!(nfkc_keeping_cjk_punctuation(zh), "注意：你好，世界！（测试）……价格￥50？hello1");
        assert_eq!(nfkc(zh), "注意:你好,世界!(测试)......价格¥50?hello1");
        // Text whose only non-NFKC characters are kept punctuation comes back borrowed.
        assert!(matches!(nfkc_keeping_cjk_punctuation("你好，世界！"), Cow::Borrowed(_)));
        // Composition still happens between kept characters: e + combining acute → é.
        assert_eq!(nfkc_keeping_cjk_punctuation("cafe\u{301}，ﬁ"), "café，fi");
        assert_eq!(nfkc_keeping_cjk_punctuation("Ｈｅｌｌｏ, world"), "Hello, world");
    }

    #[test]
    fn gopher_statistics() {
        let r = repetition("a b\na b\nc d\n", 2);
        assert!((r.duplicate_line_fraction - 1.0 / 3.0).abs() < 1e-9);
        // most frequent 2-gram "a b" occurs twice (2 chars each) over 6 word chars.
        assert!((r.top_ngram_fraction - 4.0 / 6.0).abs() < 1e-9, "{r:?}");
        assert_eq!(repetition("# a # b", 2).symbol_ratio, 1.0);
    }
}
