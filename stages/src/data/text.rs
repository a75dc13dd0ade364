//! Text helpers shared by the data stages: a fast deterministic hash, word/CJK tokenisation for
//! shingles and n-grams, script classification.

/// A fast, seedable, platform-independent 64-bit hash (FxHash-style mixing with a splitmix64
/// finaliser). Not cryptographic; used for shingles and buckets. Exact dedupe uses SHA-256.
pub fn hash64(bytes: &[u8], seed: u64) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(buf)).wrapping_mul(K);
    }
    mix64(h)
}

/// splitmix64's finaliser.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// CJK ideographs, kana and hangul: each such character is a word of its own.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0xAC00..=0xD7AF | 0x20000..=0x2FA1F)
}

/// Words of `s`, lowercased: runs of alphanumerics, each CJK character alone; punctuation and
/// whitespace separate words and are dropped. Calls `f` on each word.
///
/// ASCII is handled byte by byte, and a word that is already lowercase ASCII is passed as a slice
/// of `s` (no copy); only words that need lowercasing go through a buffer.
pub fn for_each_word(s: &str, mut f: impl FnMut(&str)) {
    let b = s.as_bytes();
    let mut buf = String::new();
    // The current word starts at `start`; while `copy` is false it is `s[start..i]` verbatim,
    // otherwise it is accumulated (lowercased) in `buf`.
    let mut start: Option<usize> = None;
    let mut copy = false;
    let mut i = 0;
    macro_rules! emit {
        () => {
            if let Some(st) = start.take() {
                if copy {
                    f(&buf);
                } else {
                    f(&s[st..i]);
                }
            }
        };
    }
    while i < b.len() {
        let c = b[i];
        if c < 0x80 {
            if c.is_ascii_alphanumeric() {
                let st = *start.get_or_insert(i);
                if st == i {
                    copy = false;
                }
                if !copy && c.is_ascii_uppercase() {
                    buf.clear();
                    buf.push_str(&s[st..i]);
                    copy = true;
                }
                if copy {
                    buf.push(c.to_ascii_lowercase() as char);
                }
            } else {
                emit!();
            }
            i += 1;
            continue;
        }
        let Some(ch) = s[i..].chars().next() else { break };
        let len = ch.len_utf8();
        if is_cjk(ch) {
            emit!();
            f(&s[i..i + len]);
        } else if ch.is_alphanumeric() {
            let st = *start.get_or_insert(i);
            if st == i {
                copy = false;
            }
            if !copy {
                buf.clear();
                buf.push_str(&s[st..i]);
                copy = true;
            }
            buf.extend(ch.to_lowercase());
        } else {
            emit!();
        }
        i += len;
    }
    emit!();
}

/// 64-bit hashes of the words of `s` (see [`for_each_word`]).
pub fn word_hashes(s: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for_each_word(s, |w| out.push(hash64(w.as_bytes(), 0)));
    out
}

/// Hashes of the word n-grams (shingles) of `s`, sorted and deduplicated (a set). A text with
/// fewer than `n` words yields one shingle of all its words (none when empty).
pub fn shingle_set(s: &str, n: usize) -> Vec<u64> {
    shingles_of_words(&word_hashes(s), n)
}

/// [`shingle_set`] from the word hashes of a text (see [`word_hashes`]).
pub fn shingles_of_words(words: &[u64], n: usize) -> Vec<u64> {
    let n = n.max(1);
    let mut out: Vec<u64> = if words.is_empty() {
        Vec::new()
    } else if words.len() < n {
        vec![ngram_hash(words)]
    } else {
        words.windows(n).map(ngram_hash).collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// Hash of a sequence of word hashes.
pub fn ngram_hash(ws: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for w in ws {
        h = mix64(h ^ w).wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    h
}

/// Jaccard similarity of two sorted, deduplicated sets.
pub fn jaccard_sorted(a: &[u64], b: &[u64]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let (mut i, mut j, mut inter) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
        }
    }
    inter as f64 / (a.len() + b.len() - inter) as f64
}

/// The script of a character, for the language filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    Latin,
    Han,
    Kana,
    Hangul,
    Cyrillic,
    Arabic,
    Other,
}

pub fn script_of(c: char) -> Option<Script> {
    if !c.is_alphabetic() {
        return None;
    }
    let u = c as u32;
    Some(match u {
        0x0041..=0x024F | 0x1E00..=0x1EFF => Script::Latin,
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F => Script::Han,
        0x3040..=0x30FF => Script::Kana,
        0xAC00..=0xD7AF | 0x1100..=0x11FF => Script::Hangul,
        0x0400..=0x04FF => Script::Cyrillic,
        0x0600..=0x06FF => Script::Arabic,
        _ => Script::Other,
    })
}

/// Language guess from scripts: `zh` (Han), `ja` (any kana), `ko`, `en` (Latin), `ru`, `ar`;
/// `None` without letters. Returns the language and the fraction of letters in its script.
pub fn guess_language(s: &str) -> Option<(&'static str, f64)> {
    let mut counts = [0usize; 7];
    let mut total = 0usize;
    for c in s.chars() {
        if let Some(sc) = script_of(c) {
            counts[sc as usize] += 1;
            total += 1;
        }
    }
    if total == 0 {
        return None;
    }
    if counts[Script::Kana as usize] > 0 && counts[Script::Kana as usize] * 10 >= total {
        let n = counts[Script::Kana as usize] + counts[Script::Han as usize];
        return Some(("ja", n as f64 / total as f64));
    }
    let (best, n) = counts.iter().enumerate().max_by_key(|(i, n)| (**n, std::cmp::Reverse(*i)))?;
    let lang = match best {
        0 => "en",
        1 => "zh",
        3 => "ko",
        4 => "ru",
        5 => "ar",
        _ => "other",
    };
    Some((lang, *n as f64 / total as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_cjk_and_lowercase() {
        let mut w = Vec::new();
        for_each_word("Hello, 世界! It's OK", |x| w.push(x.to_string()));
        assert_eq!(w, ["hello", "世", "界", "it", "s", "ok"]);
        w.clear();
        for_each_word("ab ÀbC dÉf GHI été x1Y 中a", |x| w.push(x.to_string()));
        assert_eq!(w, ["ab", "àbc", "déf", "ghi", "été", "x1y", "中", "a"]);
    }

    #[test]
    fn jaccard_of_known_sets() {
        assert_eq!(jaccard_sorted(&[1, 2, 3], &[2, 3, 4]), 0.5);
        let a = shingle_set("the quick brown fox jumps over the lazy dog", 3);
        let b = shingle_set("The quick brown fox jumps over the lazy cat", 3);
        assert_eq!(jaccard_sorted(&a, &b), 6.0 / 8.0);
    }

    #[test]
    fn languages_by_script() {
        assert_eq!(guess_language("你好，世界").unwrap().0, "zh");
        assert_eq!(guess_language("hello world").unwrap().0, "en");
        assert_eq!(guess_language("こんにちは世界").unwrap().0, "ja");
        assert!(guess_language("123 !!").is_none());
    }
}
