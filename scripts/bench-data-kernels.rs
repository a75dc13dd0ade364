//! Old-vs-new kernel benchmark for the dedupe/clean hot paths (no polars, no I/O), used when the
//! full `stages/benches/data.rs` build did not fit the time available. Holds verbatim copies of
//! the previous (`old`, `rold`, `oldn`) and current (`new`, `rnew`, `newn`, `minhash_*`)
//! functions, checks both produce identical checksums and prints CPU-seconds per 64 MiB corpus
//! generated like the bench's. Run: `rustc -O --edition 2021 scripts/bench-data-kernels.rs -o
//! /tmp/kb && /tmp/kb` (x86-64 with AVX2).
#![allow(dead_code, clippy::all)]
use std::borrow::Cow;
fn is_cjk(c: char) -> bool { matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0xAC00..=0xD7AF | 0x20000..=0x2FA1F) }
fn is_invisible(c: char) -> bool { matches!(c, '\u{00AD}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}' | '\u{180E}') || (c.is_control() && c != '\n' && c != '\t') }
mod old { use super::*;
pub fn for_each_word(s: &str, mut f: impl FnMut(&str)) {
    let mut buf = String::new();
    for c in s.chars() {
        if is_cjk(c) {
            if !buf.is_empty() {
                f(&buf);
                buf.clear();
            }
            let mut tmp = [0u8; 4];
            f(c.encode_utf8(&mut tmp));
        } else if c.is_alphanumeric() {
            if c.is_ascii() {
                buf.push(c.to_ascii_lowercase());
            } else {
                buf.extend(c.to_lowercase());
            }
        } else if !buf.is_empty() {
            f(&buf);
            buf.clear();
        }
    }
    if !buf.is_empty() {
        f(&buf);
    }
}
pub(crate) fn normalize_whitespace(s: &str) -> Cow<'_, str> {
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
pub(crate) fn remove_control(s: &str) -> Cow<'_, str> {
    if s.chars().any(is_invisible) {
        Cow::Owned(s.chars().filter(|c| !is_invisible(*c)).map(|c| if c == '\r' { '\n' } else { c }).collect())
    } else {
        Cow::Borrowed(s)
    }
}}
mod new { use super::*;
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
            0xc0.. => {
                if s[i..].chars().next().is_some_and(char::is_whitespace) {
                    return false;
                }
            }
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
}}
#[inline(always)]
fn minhash_kernel(a: &[u64], b: &[u64], xl: &[u32], xh: &[u32], sig: &mut [u32]) {
    for ((s, &a), &b) in sig.iter_mut().zip(a).zip(b) {
        let (al, ah) = (a as u32, (a >> 32) as u32);
        let mut m = *s;
        for (&l, &h) in xl.iter().zip(xh) {
            let lo = ((u64::from(al) * u64::from(l)).wrapping_add(b) >> 32) as u32;
            let v = lo.wrapping_add(ah.wrapping_mul(l)).wrapping_add(al.wrapping_mul(h));
            m = m.min(v);
        }
        *s = m;
    }
}

fn minhash_portable(a: &[u64], b: &[u64], xl: &[u32], xh: &[u32], sig: &mut [u32]) {
    for (&l, &h) in xl.iter().zip(xh) {
        let x = u64::from(h) << 32 | u64::from(l);
        for ((s, a), b) in sig.iter_mut().zip(a).zip(b) {
            let v = (a.wrapping_mul(x).wrapping_add(*b) >> 32) as u32;
            if v < *s {
                *s = v;
            }
        }
    }
}

/// [`minhash_kernel`] compiled for AVX2 (chosen at run time; CI builds for baseline x86-64).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn minhash_avx2(a: &[u64], b: &[u64], xl: &[u32], xh: &[u32], sig: &mut [u32]) {
    minhash_kernel(a, b, xl, xh, sig)
}


mod oldn { pub(crate) fn normalise_for_exact(s: &[&str]) -> String {
    let mut out = String::new();
    for (i, t) in s.iter().enumerate() {
        if i > 0 {
            out.push('\u{1}');
        }
        let mut space = false;
        for c in t.chars() {
            if c.is_whitespace() {
                space = !out.is_empty();
            } else {
                if space {
                    out.push(' ');
                    space = false;
                }
                out.extend(c.to_lowercase());
            }
        }
    }
    out
}}
mod newn { pub(crate) fn normalise_for_exact(s: &[&str]) -> String {
    let mut out = String::with_capacity(s.iter().map(|t| t.len()).sum::<usize>() + 8);
    for (i, t) in s.iter().enumerate() {
        if i > 0 {
            out.push('\u{1}');
        }
        let mut space = false;
        let b = t.as_bytes();
        let mut k = 0;
        while k < b.len() {
            let c = b[k];
            if c < 0x80 {
                // ASCII: `char::is_whitespace` is exactly space and \t..=\r here.
                if matches!(c, b' ' | b'\t'..=b'\r') {
                    space = !out.is_empty();
                } else {
                    if space {
                        out.push(' ');
                        space = false;
                    }
                    out.push(c.to_ascii_lowercase() as char);
                }
                k += 1;
                continue;
            }
            let Some(c) = t[k..].chars().next() else { break };
            k += c.len_utf8();
            if c.is_whitespace() {
                space = !out.is_empty();
            } else {
                if space {
                    out.push(' ');
                    space = false;
                }
                out.extend(c.to_lowercase());
            }
        }
    }
    out
}}

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


/// Hash of a sequence of word hashes.
pub fn ngram_hash(ws: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for w in ws {
        h = mix64(h ^ w).wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    h
}


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

type FastMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;


#[derive(Debug)] pub struct Repetition { pub words: usize, pub duplicate_line_fraction: f64, pub top_ngram_fraction: f64, pub symbol_ratio: f64 }
mod rold { use super::*; use std::collections::HashMap; use old::for_each_word; pub(crate) fn repetition(s: &str, n: usize) -> Repetition {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for l in &lines {
        *seen.entry(l).or_default() += 1;
    }
    let dup_lines: usize = seen.values().filter(|&&c| c > 1).map(|&c| c - 1).sum();
    // Words as (hash, char length): no per-word allocation.
    let mut words: Vec<(u64, usize)> = Vec::new();
    for_each_word(s, |w| words.push((hash64(w.as_bytes(), 0), w.chars().count())));
    let word_chars: usize = words.iter().map(|w| w.1).sum();
    let mut top = 0.0;
    if words.len() >= n && word_chars > 0 {
        // n-gram hash -> (count, first position); ties broken by the earliest first position.
        let mut counts: HashMap<u64, (usize, usize)> = HashMap::new();
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

}
mod rnew { use super::*; use std::collections::HashMap; use new::for_each_word; pub(crate) fn repetition(s: &str, n: usize) -> Repetition {
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

}

fn cpu() -> f64 { let s = std::fs::read_to_string("/proc/self/stat").unwrap(); let r = s.rsplit_once(')').unwrap().1; let f: Vec<&str> = r.split_whitespace().collect(); (f[11].parse::<f64>().unwrap()+f[12].parse::<f64>().unwrap())/100.0 }
fn shingles(norm: &str, newf: bool) -> Vec<u64> {
    let mut words = Vec::new();
    if newf { new::for_each_word(norm, |w| words.push(hash64(w.as_bytes(), 0))) } else { old::for_each_word(norm, |w| words.push(hash64(w.as_bytes(), 0))) }
    let mut out: Vec<u64> = if words.len() < 5 { vec![ngram_hash(&words)] } else { words.windows(5).map(ngram_hash).collect() };
    out.sort_unstable(); out.dedup(); out
}
fn band_keys(sig: &[u32]) -> u64 { let mut acc = 0; for b in 0..14 { let band = &sig[b*8..(b+1)*8]; let bytes: Vec<u8> = band.iter().flat_map(|v| v.to_le_bytes()).collect(); acc ^= mix64(hash64(&bytes, b as u64) ^ b as u64); } acc }
fn main() {
    let mut seed = 7u64;
    let mut rnd = || { seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17; seed };
    let vocab: Vec<String> = (0..20_000).map(|i: usize| { let len = 2 + (i % 9); (0..len).map(|k| (b'a' + ((i * 31 + k * 7) % 26) as u8) as char).collect::<String>() + &format!("{}", i % 97) }).collect();
    let mut docs = Vec::new(); let mut bytes = 0usize;
    while bytes < 64 << 20 {
        let mut d = String::new();
        for s in 0..(20 + rnd() % 40) { if s > 0 { d.push_str(if s % 6 == 0 { "\n" } else { " " }); } for k in 0..(6 + rnd() % 10) { if k > 0 { d.push(' '); } d.push_str(&vocab[(rnd() % 20000) as usize]); } d.push('.'); }
        bytes += d.len(); docs.push(d);
    }
    let mb = bytes as f64 / (1 << 20) as f64;
    let a: Vec<u64> = (0..112u64).map(|i| mix64(i) | 1).collect();
    let b: Vec<u64> = (0..112u64).map(|i| mix64(i + 1000)).collect();
    for newf in [false, true] {
        let t = cpu(); let mut acc = 0u64;
        for d in &docs {
            let norm = if newf { newn::normalise_for_exact(&[d.as_str()]) } else { oldn::normalise_for_exact(&[d.as_str()]) };
            let sh = shingles(&norm, newf);
            let sig = if newf {
                let xl: Vec<u32> = sh.iter().map(|&x| x as u32).collect(); let xh: Vec<u32> = sh.iter().map(|&x| (x >> 32) as u32).collect();
                let mut sig = vec![u32::MAX; 112]; unsafe { minhash_avx2(&a,&b,&xl,&xh,&mut sig) }; sig
            } else {
                let mut sig = vec![u32::MAX; 112];
                for &x in &sh { for ((s, a), b) in sig.iter_mut().zip(&a).zip(&b) { let h = (a.wrapping_mul(x).wrapping_add(*b) >> 32) as u32; if h < *s { *s = h; } } }
                sig
            };
            acc ^= band_keys(&sig);
        }
        let td = cpu() - t;
        let t = cpu(); let mut n = 0usize;
        for d in &docs {
            n += if newf { new::remove_control(d).len() + new::normalize_whitespace(d).len() + rnew::repetition(d, 2).words } else { old::remove_control(d).len() + old::normalize_whitespace(d).len() + rold::repetition(d, 2).words };
        }
        let tc = cpu() - t;
        println!("{}: {mb:.0} MiB, dedupe hashing compute (excl. SHA-256, I/O) {td:.2} CPU-s = {:.1} MiB/s; clean compute (ctl+ws+repetition) {tc:.2} CPU-s = {:.1} MiB/s  [{acc} {n}]", if newf {"new"} else {"old"}, mb / td, mb / tc);
    }
}
