//! Text helpers shared by the data stages: a fast deterministic hash, word/CJK tokenisation for
//! shingles and n-grams, script classification, PII masking.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

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

/// E-mail addresses. The character classes are ASCII, so an address ends where CJK text starts.
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}").expect("static regex")
});
/// `inner` as a regex that only matches where no ASCII letter or digit touches it, nor a
/// `.digit` continuation (so `1.2.3.4.5` holds no address): the boundary `\b` fails to be beside
/// CJK text, since `是` and `，` are word characters to `\b` but not ASCII alphanumerics. The
/// regex crate has no look-around, so the characters either side are matched (group 0 spans
/// them) and `inner` is capture group 1; the trailing one is searched again for the next match.
fn standalone(inner: &str) -> Regex {
    Regex::new(&format!(r"(?:^|[^0-9A-Za-z.]|(?:^|[^0-9])\.)({inner})(?:$|[^0-9A-Za-z.]|\.(?:$|[^0-9]))"))
        .expect("static regex")
}

/// Dotted quads; each octet is range-checked by [`is_ipv4`].
static IPV4: LazyLock<Regex> = LazyLock::new(|| standalone(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}"));
/// Mainland mobile numbers, with an optional `+86` / `0086` / `86` prefix.
static MOBILE_CN: LazyLock<Regex> = LazyLock::new(|| standalone(r"(?:(?:\+|00)?86[ -]?)?1[3-9][0-9]{9}"));
/// Unseparated digit runs (resident IDs, bank cards, the old 15-digit IDs), classified by
/// [`classify_digit_run`].
static DIGIT_RUN: LazyLock<Regex> = LazyLock::new(|| standalone(r"[0-9]{13,19}[Xx]?"));
/// Bank card numbers written in groups of four (`6222 0202 0000 1234 567`), Luhn-checked.
static GROUPED_CARD: LazyLock<Regex> =
    LazyLock::new(|| standalone(r"[0-9]{4}(?:[ -][0-9]{4}){2,3}(?:[ -][0-9]{1,3})?"));
/// US social security numbers.
static SSN: LazyLock<Regex> = LazyLock::new(|| standalone(r"[0-9]{3}-[0-9]{2}-[0-9]{4}"));
/// Phone numbers with separators: `138 0013 8000`, `010-12345678`, `(0755) 1234567`,
/// `(555) 123-4567`, `555.123.4567`, each with an optional `+CC` / `00CC` country code.
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    standalone(concat!(
        r"(?:(?:\+|00)[0-9]{1,3}[ .-]?)?",
        r"(?:1[3-9][0-9][ .-][0-9]{4}[ .-][0-9]{4}",
        r"|\(0[0-9]{2,3}\)[ -]?[0-9]{7,8}",
        r"|0[0-9]{2,3}-[0-9]{7,8}",
        r"|\([0-9]{3}\)[ .-]?[0-9]{3}[ .-]?[0-9]{4}",
        r"|[0-9]{3}[ .-]?[0-9]{3}[ .-]?[0-9]{4})"
    ))
});

/// ISO 7064 MOD 11-2, the check digit of an 18-digit PRC resident identity number (GB 11643):
/// true when `id` is 17 digits followed by the right check character (`0`-`9` or `X`).
pub fn is_resident_id(id: &str) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let b = id.as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = b[..17].iter().zip(WEIGHTS).map(|(d, w)| u32::from(d - b'0') * w).sum();
    b[17].to_ascii_uppercase() == CHECK[(sum % 11) as usize]
}

/// The Luhn checksum of a card number's digits (separators ignored).
pub fn luhn_valid(number: &str) -> bool {
    let digits: Vec<u32> = number.bytes().filter(u8::is_ascii_digit).map(|d| u32::from(d - b'0')).collect();
    if digits.len() < 12 {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        // every second digit from the right doubled, then its digits summed
        .map(|(i, &d)| d * (1 + (i % 2) as u32))
        .map(|x| x / 10 + x % 10)
        .sum();
    sum.is_multiple_of(10)
}

fn is_ipv4(s: &str) -> bool {
    s.split('.').all(|o| o.parse::<u8>().is_ok() && (o == "0" || !o.starts_with('0')))
}

/// What an unseparated run of 13-19 digits (18 may end in `X`) is, if anything.
fn classify_digit_run(run: &str) -> Option<&'static str> {
    if run.len() == 18 && is_resident_id(run) {
        return Some("[ID]");
    }
    if !run.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if luhn_valid(run) {
        return Some("[CARD]");
    }
    // The 15-digit resident ID of before 1999 has no check digit.
    (run.len() == 15).then_some("[ID]")
}

/// Replaces group 1 of each match of a [`standalone`] regex that `label` accepts with the label
/// it returns. A rejected match is retried one character further on.
fn replace_standalone<'a>(s: &'a str, re: &Regex, label: impl Fn(&str) -> Option<&'static str>) -> Cow<'a, str> {
    let mut out = String::new();
    let (mut last, mut pos) = (0, 0);
    while pos < s.len() {
        let Some(m) = re.captures_at(s, pos).and_then(|c| c.get(1)) else { break };
        match label(m.as_str()) {
            Some(l) => {
                out.push_str(&s[last..m.start()]);
                out.push_str(l);
                last = m.end();
                pos = m.end();
            }
            None => pos = m.start() + s[m.start()..].chars().next().map_or(1, char::len_utf8),
        }
    }
    if last == 0 {
        return Cow::Borrowed(s);
    }
    out.push_str(&s[last..]);
    Cow::Owned(out)
}

/// The label for a PII match, or `None` when the match fails its check (Luhn, ID check digit).
type Labeller = fn(&str) -> Option<&'static str>;

/// Masks personal data in `s`: e-mail addresses → `[EMAIL]`, IPv4 addresses → `[IP]`, 18-digit
/// resident IDs (MOD 11-2 check digit), 15-digit IDs and US SSNs → `[ID]`, bank card numbers
/// (Luhn-checked, plain or in groups of four) → `[CARD]`, mainland mobiles and phone numbers with
/// separators → `[PHONE]`. A number counts only when no ASCII letter or digit touches it, which
/// works beside Chinese text (`身份证号是…，电话…`) where `\b` does not.
pub fn mask_pii(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b.is_ascii_digit() || b == b'@') {
        return Cow::Borrowed(s);
    }
    let mut t: Cow<'_, str> = EMAIL.replace_all(s, "[EMAIL]");
    let passes: [(&Regex, Labeller); 6] = [
        (&IPV4, |m| is_ipv4(m).then_some("[IP]")),
        (&MOBILE_CN, |_| Some("[PHONE]")),
        (&DIGIT_RUN, classify_digit_run),
        (&GROUPED_CARD, |m| luhn_valid(m).then_some("[CARD]")),
        (&SSN, |_| Some("[ID]")),
        (&PHONE, |_| Some("[PHONE]")),
    ];
    for (re, label) in passes {
        if let Cow::Owned(o) = replace_standalone(&t, re, label) {
            t = Cow::Owned(o);
        }
    }
    if t == s {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(t.into_owned())
    }
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

    #[test]
    fn resident_id_check_digit_and_luhn() {
        assert!(is_resident_id("110101199003074514"));
        assert!(is_resident_id("11010519491231002X") && is_resident_id("11010519491231002x"));
        assert!(!is_resident_id("110101199003074515"), "wrong check digit");
        assert!(!is_resident_id("11010119900307451"), "17 digits");
        assert!(luhn_valid("4111 1111 1111 1111") && luhn_valid("6222020200001234562"));
        assert!(!luhn_valid("4111111111111112") && !luhn_valid("6222020200001234567"));
    }

    // Regression (issue 15, point 3): `\b` never matches between a CJK character and a digit, so
    // `身份证号是110101199003074514，电话13812345678` came out unchanged.
    #[test]
    fn pii_beside_chinese_text_is_masked() {
        assert_eq!(mask_pii("身份证号是110101199003074514，电话13812345678"), "身份证号是[ID]，电话[PHONE]");
    }

    #[test]
    fn pii_resident_ids() {
        assert_eq!(mask_pii("证件号码：11010519491231002X。"), "证件号码：[ID]。");
        assert_eq!(mask_pii("ID 11010519491231002x on file"), "ID [ID] on file");
        // A wrong check digit is not an ID (nor a Luhn-valid card): an order number stays.
        assert_eq!(mask_pii("订单号110101199003074515已发货"), "订单号110101199003074515已发货");
        assert_eq!(mask_pii("order 110101199003074515 shipped"), "order 110101199003074515 shipped");
        // Inside a longer run of digits or glued to letters, nothing is masked.
        assert_eq!(mask_pii("x1101011990030745149"), "x1101011990030745149");
        assert_eq!(mask_pii("abc110101199003074514"), "abc110101199003074514");
    }

    #[test]
    fn pii_mobiles() {
        assert_eq!(mask_pii("请拨打13812345678或+86 139-1234-5678联系"), "请拨打[PHONE]或[PHONE]联系");
        assert_eq!(mask_pii("call 13812345678, or +8613912345678."), "call [PHONE], or [PHONE].");
        assert_eq!(mask_pii("电话：138 0013 8000"), "电话：[PHONE]");
        // `12` is no mobile prefix, and 12 digits are no mobile.
        assert_eq!(mask_pii("编号12812345678"), "编号12812345678");
        assert_eq!(mask_pii("n 138123456789 x"), "n 138123456789 x");
    }

    #[test]
    fn pii_emails() {
        assert_eq!(mask_pii("邮箱是bob.li@example.com，欢迎来信"), "邮箱是[EMAIL]，欢迎来信");
        assert_eq!(mask_pii("write to bob+ml@mail.example.org."), "write to [EMAIL].");
    }

    #[test]
    fn pii_phones_with_separators() {
        assert_eq!(mask_pii("座机010-12345678，传真(0755) 1234567"), "座机[PHONE]，传真[PHONE]");
        assert_eq!(mask_pii("call (555) 123-4567 or +1 555.123.4567 now"), "call [PHONE] or [PHONE] now");
    }

    #[test]
    fn pii_ipv4() {
        assert_eq!(mask_pii("服务器地址192.168.1.10，端口8080"), "服务器地址[IP]，端口8080");
        assert_eq!(mask_pii("ping 10.0.0.255 then 8.8.8.8."), "ping [IP] then [IP].");
        // Octets past 255, leading zeros and five-part versions are no addresses.
        assert_eq!(mask_pii("版本1.2.3.4.5与300.1.1.1"), "版本1.2.3.4.5与300.1.1.1");
    }

    #[test]
    fn pii_bank_cards() {
        assert_eq!(mask_pii("银行卡号6222020200001234562，请核对"), "银行卡号[CARD]，请核对");
        assert_eq!(mask_pii("card 4111 1111 1111 1111 expires"), "card [CARD] expires");
        assert_eq!(mask_pii("卡号：4111-1111-1111-1111"), "卡号：[CARD]");
        // Luhn fails: left alone.
        assert_eq!(mask_pii("流水号6222020200001234567"), "流水号6222020200001234567");
        assert_eq!(mask_pii("ref 4111 1111 1111 1112"), "ref 4111 1111 1111 1112");
    }
}
