//! The two tokenisers evalscope's BLEU and ROUGE use, reproduced exactly.
//!
//! * Chinese text (any char in U+4E00..=U+9FA5): jieba 0.42.1 accurate mode with HMM. The
//!   segmentation of Chinese/alphanumeric blocks is `jieba-rs` with jieba's standard dictionary;
//!   the block split around it is python jieba's (`re_han_default` = `[\u4E00-\u9FD5a-zA-Z0-9+#&._%-]+`,
//!   everything else one token per char, `\r\n` kept together), because jieba-rs' own block
//!   classes are wider (U+9FD6.. and CJK extensions).
//! * Other text: nltk 3.10.4's `NLTKWordTokenizer.tokenize` (what `word_tokenize` runs per
//!   sentence), its regex rules ported one by one in order.
//!
//! Python's notion of whitespace (`str.isspace`, `\s`, `str.split()`) includes U+001C..U+001F,
//! which Rust's `char::is_whitespace` does not; [`py_isspace`] is used wherever Python would.

use std::borrow::Cow;
use std::sync::OnceLock;

use jieba_rs::Jieba;
use regex::Regex;

/// evalscope's `is_contains_chinese`: any char in U+4E00..=U+9FA5.
pub fn is_chinese(text: &str) -> bool {
    text.chars().any(|c| ('\u{4e00}'..='\u{9fa5}').contains(&c))
}

/// Python's `str.isspace` for one char.
pub fn py_isspace(c: char) -> bool {
    matches!(c, '\u{1c}'..='\u{1f}') || c.is_whitespace()
}

/// Python's `str.split()` (no argument).
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_isspace).filter(|w| !w.is_empty())
}

/// Python's `str.rstrip()` (no argument).
pub fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(py_isspace)
}

/// Python `re`'s `\w` for one char (str.isalnum() or `_`).
fn py_is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn jieba() -> &'static Jieba {
    static JIEBA: OnceLock<Jieba> = OnceLock::new();
    JIEBA.get_or_init(|| {
        let mut j = Jieba::new();
        // jieba-rs drops this one entry of jieba 0.42.1's dict.txt (`B超 3 n`); put it back so the
        // dictionary is the one python jieba ships.
        j.add_word("B超", Some(3), Some("n"));
        j
    })
}

/// python jieba's `re_han_default` class.
fn is_han_default(c: char) -> bool {
    ('\u{4e00}'..='\u{9fd5}').contains(&c)
        || c.is_ascii_alphanumeric()
        || matches!(c, '+' | '#' | '&' | '.' | '_' | '%' | '-')
}

/// python jieba's HMM fallback (`finalseg.cut`) on a non-Chinese run: `re_skip` =
/// `[a-zA-Z0-9]+(?:\.\d+)?%?` matches are tokens and so is each gap between them. jieba-rs 0.11
/// matches `[a-zA-Z0-9]+(?:[._-][a-zA-Z0-9]+)*%?` instead (`state-of-the-art`, `U.S` whole), so
/// its tokens holding `.`, `_` or `-` are split again here. No dictionary word holds those
/// characters, so such a token always comes from that matcher; python's matches always lie inside
/// jieba-rs' and the gaps line up, so re-splitting the token gives python's tokens.
fn python_skip_split<'a>(tok: &'a str, out: &mut Vec<&'a str>) {
    let b = tok.as_bytes();
    let (mut i, mut gap) = (0, 0);
    while i < b.len() {
        if !b[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        if gap < i {
            out.push(&tok[gap..i]);
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_alphanumeric() {
            i += 1;
        }
        if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
        if i < b.len() && b[i] == b'%' {
            i += 1;
        }
        out.push(&tok[start..i]);
        gap = i;
    }
    if gap < b.len() {
        out.push(&tok[gap..]);
    }
}

/// `jieba.cut(text)` (accurate mode, HMM on), as python jieba 0.42.1 yields it.
pub fn jieba_cut(text: &str) -> Vec<&str> {
    let jieba = jieba();
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(first) = rest.chars().next() {
        let han = is_han_default(first);
        let end = rest.char_indices().find(|&(_, c)| is_han_default(c) != han).map_or(rest.len(), |(i, _)| i);
        let (block, tail) = rest.split_at(end);
        if han {
            for t in jieba.cut(block, true) {
                if t.word.len() > 1 && t.word.bytes().any(|b| matches!(b, b'.' | b'_' | b'-')) {
                    python_skip_split(t.word, &mut out);
                } else {
                    out.push(t.word);
                }
            }
        } else {
            // re_skip_default = (\r\n|\s): each whitespace char (or \r\n) is a token, and every
            // other char of a non-Chinese block is one token too.
            let mut it = block.char_indices().peekable();
            while let Some((i, c)) = it.next() {
                if c == '\r' && matches!(it.peek(), Some((_, '\n'))) {
                    it.next();
                    out.push(&block[i..i + 2]);
                } else {
                    out.push(&block[i..i + c.len_utf8()]);
                }
            }
        }
        rest = tail;
    }
    out
}

struct NltkRules {
    starting: Vec<(Regex, &'static str)>,
    punctuation: Vec<(Regex, &'static str)>,
    parens: Regex,
    double_dash: Regex,
    ending: Vec<(Regex, &'static str)>,
    contractions: Vec<Regex>,
}

fn rx(pattern: &str) -> Regex {
    Regex::new(pattern).expect("static regex")
}

fn nltk_rules() -> &'static NltkRules {
    static RULES: OnceLock<NltkRules> = OnceLock::new();
    // `\s` is Python's (adds U+001C..U+001F); `$` is only ever preceded by `\s*`, which takes a
    // final newline itself, so `\z` is equivalent.
    RULES.get_or_init(|| NltkRules {
        starting: vec![
            (rx(r"([«“‘„]|[`]+)"), " ${1} "),
            (rx(r#"^""#), "``"),
            (rx(r"(``)"), " ${1} "),
            (rx(r#"([ (\[{<])("|'{2})"#), "${1} `` "),
        ],
        punctuation: vec![
            // The possessive `*+` of nltk 3.10.4 matches what plain greedy `*` matches here: the
            // class holds the space, and `\s*$` must take everything after the run.
            (rx(r#"([^.])(\.)([\])}>"'»”’ ]*)[\s\x1C-\x1F]*\z"#), "${1} ${2} ${3} "),
            (rx(r"([:,])([^\d])"), " ${1} ${2}"),
            (rx(r"([:,])(\n?)\z"), " ${1} ${2}"),
            (rx(r"\.{2,}"), " ${0} "),
            (rx(r"[;@#$%&]"), " ${0} "),
            (rx(r"[\u{2012}-\u{2015}]"), " ${0} "),
            (rx(r#"([^.])(\.)([\])}>"']*)[\s\x1C-\x1F]*\z"#), "${1} ${2}${3} "),
            (rx(r"[?!]"), " ${0} "),
            (rx(r"([^'])' "), "${1} ' "),
            (rx(r"[*]"), " ${0} "),
        ],
        parens: rx(r"[\]\[(){}<>]"),
        double_dash: rx(r"--"),
        ending: vec![
            (rx(r"([»”’])"), " ${1} "),
            (rx(r"''"), " '' "),
            (rx(r#"""#), " '' "),
            (rx(r"[\s\x1C-\x1F]+"), " "),
            (rx(r"([^' ])('[sS]|'[mM]|'[dD]|') "), "${1} ${2} "),
            (rx(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), "${1} ${2} "),
        ],
        // MacIntyre's CONTRACTIONS2 and CONTRACTIONS3 (replacement ` \1 \2 `). `(?=\s)` after
        // "wanna" becomes a third group put back unchanged.
        contractions: [
            r"(?i)\b(can)(not)\b",
            r"(?i)\b(d)('ye)\b",
            r"(?i)\b(gim)(me)\b",
            r"(?i)\b(gon)(na)\b",
            r"(?i)\b(got)(ta)\b",
            r"(?i)\b(lem)(me)\b",
            r"(?i)\b(more)('n)\b",
            r"(?i)\b(wan)(na)([\s\x1C-\x1F])",
            r"(?i) ('t)(is)\b",
            r"(?i) ('t)(was)\b",
        ]
        .iter()
        .map(|p| rx(p))
        .collect(),
    })
}

/// nltk's `(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)` → `\1 `: a leading apostrophe that
/// does not start a clitic gets split off. (Lookaround, which the `regex` crate lacks.)
fn split_leading_apostrophes(text: &str) -> Cow<'_, str> {
    if !text.contains('\'') {
        return Cow::Borrowed(text);
    }
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = String::with_capacity(text.len() + 8);
    let mut last = 0;
    for (k, &(i, c)) in chars.iter().enumerate() {
        if c != '\'' {
            continue;
        }
        let prev_word = k > 0 && py_is_word(chars[k - 1].1);
        let next_word = chars.get(k + 1).is_some_and(|&(_, n)| py_is_word(n));
        if prev_word || !next_word {
            continue;
        }
        let clitic = ["re", "ve", "ll", "m", "t", "s", "d", "n"].iter().any(|cl| {
            let n = cl.len();
            let matches = chars
                .get(k + 1..k + 1 + n)
                .is_some_and(|s| s.iter().zip(cl.chars()).all(|(&(_, a), b)| a.to_ascii_lowercase() == b));
            matches && !chars.get(k + 1 + n).is_some_and(|&(_, a)| py_is_word(a))
        });
        if clitic {
            continue;
        }
        out.push_str(&text[last..i + 1]);
        out.push(' ');
        last = i + 1;
    }
    out.push_str(&text[last..]);
    Cow::Owned(out)
}

fn apply(text: String, re: &Regex, rep: &str) -> String {
    match re.replace_all(&text, rep) {
        Cow::Borrowed(_) => text,
        Cow::Owned(s) => s,
    }
}

/// `nltk.tokenize.NLTKWordTokenizer().tokenize(text)` (nltk 3.10.4).
pub fn nltk_word_tokenize(text: &str) -> Vec<String> {
    let r = nltk_rules();
    let mut t = text.to_string();
    for (re, rep) in &r.starting {
        t = apply(t, re, rep);
    }
    t = split_leading_apostrophes(&t).into_owned();
    for (re, rep) in &r.punctuation {
        t = apply(t, re, rep);
    }
    t = apply(t, &r.parens, " ${0} ");
    t = apply(t, &r.double_dash, " -- ");
    t = format!(" {t} ");
    for (re, rep) in &r.ending {
        t = apply(t, re, rep);
    }
    for (k, re) in r.contractions.iter().enumerate() {
        let rep = if k == 7 { " ${1} ${2} ${3}" } else { " ${1} ${2} " };
        t = apply(t, re, rep);
    }
    py_split(&t).map(str::to_string).collect()
}

/// The BLEU tokens evalscope's `bleu_ngram_one_sample` makes of one string.
pub fn bleu_tokens(text: &str) -> Vec<String> {
    if is_chinese(text) {
        jieba_cut(text).into_iter().map(str::to_string).collect()
    } else {
        nltk_word_tokenize(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jieba_keeps_crlf_and_splits_other_whitespace() {
        assert_eq!(jieba_cut("我 喜欢\r\n苹果\n\n"), ["我", " ", "喜欢", "\r\n", "苹果", "\n", "\n"]);
    }

    #[test]
    fn nltk_rules_from_the_specs() {
        assert_eq!(
            nltk_word_tokenize("I don't know, 1,000 C++ 50% 3.14..."),
            ["I", "do", "n't", "know", ",", "1,000", "C++", "50", "%", "3.14", "..."]
        );
        assert_eq!(nltk_word_tokenize("'tis gonna"), ["'", "tis", "gon", "na"]);
        assert_eq!(nltk_word_tokenize("\"Hi\" (x)."), ["``", "Hi", "''", "(", "x", ")", "."]);
    }

    #[test]
    fn chinese_detection_ignores_other_cjk_blocks() {
        assert!(!is_chinese("㐀〇ひらがな"));
        assert!(is_chinese("a中"));
    }
}
