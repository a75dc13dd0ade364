//! # dedupe
//!
//! ## What it does
//! Removes exact duplicates (SHA-256 of the row's normalised text: every text field joined,
//! lowercased, whitespace collapsed) and near duplicates (MinHash over word n-gram shingles +
//! LSH banding, then the *true* Jaccard similarity of the shingle sets verified on every
//! candidate pair). The first occurrence of a group is kept. Streams the dataset three times
//! (hash, verify, write) so memory holds hashes and LSH buckets, not the rows.
//!
//! ## Inputs
//! `data`: a canonical dataset.
//!
//! ## Outputs
//! `data`: the kept rows, in input order. `removed`: `removed.jsonl`, one
//! `{id, duplicate_of, method, jaccard}` per removed row (method `exact` or `near`).
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `exact` | `true` | exact (normalised-text hash) dedupe |
//! | `near` | `true` | MinHash + LSH near-duplicate dedupe |
//! | `ngram` | `5` | shingle size in words (CJK characters count as words) |
//! | `bands`, `rows_per_band` | `14`, `8` | LSH banding; permutations = bands × rows |
//! | `num_perm` | bands × rows | must equal bands × rows when given |
//! | `threshold` | `0.8` | verified Jaccard at or above which a row is a near duplicate |
//! | `seed` | recipe seed | seeds the MinHash permutations |
//!
//! ## Cache key
//! Params, seed, the input artifact's digest.
//!
//! ## Example
//! ```toml
//! [stages.dedupe]
//! kind = "dedupe"
//! inputs.data = "collect.data"
//! params = { threshold = 0.85, ngram = 5 }
//! ```

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::data::text::{hash64, is_cjk, jaccard_sorted, mix64, shingle_set, shingles_of_words};
use crate::data::{write_jsonl, DatasetReader, DatasetWriter, Sample};

pub(crate) struct Dedupe;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Params {
    #[serde(default = "yes")]
    pub exact: bool,
    #[serde(default = "yes")]
    pub near: bool,
    #[serde(default = "d_ngram")]
    pub ngram: usize,
    #[serde(default = "d_bands")]
    pub bands: usize,
    #[serde(default = "d_rows")]
    pub rows_per_band: usize,
    #[serde(default)]
    pub num_perm: Option<usize>,
    #[serde(default = "d_threshold")]
    pub threshold: f64,
    #[serde(default)]
    pub seed: Option<u64>,
}

fn yes() -> bool {
    true
}
fn d_ngram() -> usize {
    5
}
fn d_bands() -> usize {
    14
}
fn d_rows() -> usize {
    8
}
fn d_threshold() -> f64 {
    0.8
}

impl Params {
    fn check(&self) -> Result<(), StageError> {
        if self.ngram == 0 || self.bands == 0 || self.rows_per_band == 0 {
            return Err(StageError::Params("`ngram`, `bands` and `rows_per_band` must be at least 1".into()));
        }
        if let Some(n) = self.num_perm {
            if n != self.bands * self.rows_per_band {
                return Err(StageError::Params(format!(
                    "`num_perm` = {n} but bands × rows_per_band = {} × {} = {}",
                    self.bands,
                    self.rows_per_band,
                    self.bands * self.rows_per_band
                )));
            }
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(StageError::Params(format!("`threshold` must be in [0, 1], got {}", self.threshold)));
        }
        Ok(())
    }
}

/// MinHash with multiply-shift permutations `h_p(x) = (a_p·x + b_p) >> 32` over 64-bit shingle
/// hashes; seeded, so signatures are reproducible.
pub(crate) struct MinHasher {
    a: Vec<u64>,
    b: Vec<u64>,
    bands: usize,
    rows: usize,
}

impl MinHasher {
    pub(crate) fn new(bands: usize, rows: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d69_6e68_6173_6821);
        let n = bands * rows;
        let a = (0..n).map(|_| rng.gen::<u64>() | 1).collect();
        let b = (0..n).map(|_| rng.gen::<u64>()).collect();
        MinHasher { a, b, bands, rows }
    }

    pub(crate) fn signature(&self, shingles: &[u64]) -> Vec<u32> {
        // Permutation-major over the shingles split into 32-bit halves: the same value as
        // `((a·x + b) mod 2^64) >> 32`, since with a = ah·2^32 + al and x = xh·2^32 + xl,
        // (a·x + b) >> 32 ≡ ((al·xl + b) >> 32) + ah·xl + al·xh (mod 2^32). Written this way the
        // inner loop is 32×32-bit multiplies and a min, which the compiler vectorises.
        let xl: Vec<u32> = shingles.iter().map(|&x| x as u32).collect();
        let xh: Vec<u32> = shingles.iter().map(|&x| (x >> 32) as u32).collect();
        let mut sig = vec![u32::MAX; self.a.len()];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { minhash_avx2(&self.a, &self.b, &xl, &xh, &mut sig) };
                return sig;
            }
        }
        minhash_portable(&self.a, &self.b, &xl, &xh, &mut sig);
        sig
    }

    /// One bucket key per band (the band index is mixed in).
    pub(crate) fn band_keys(&self, sig: &[u32]) -> impl Iterator<Item = u64> + '_ {
        let sig = sig.to_vec();
        (0..self.bands).map(move |b| {
            let band = &sig[b * self.rows..(b + 1) * self.rows];
            let bytes: Vec<u8> = band.iter().flat_map(|v| v.to_le_bytes()).collect();
            mix64(hash64(&bytes, b as u64) ^ b as u64)
        })
    }
}

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

/// Without AVX2 the split kernel is no faster than the direct 64-bit formula; use that.
fn minhash_portable(a: &[u64], b: &[u64], xl: &[u32], xh: &[u32], sig: &mut [u32]) {
    for (&l, &h) in xl.iter().zip(xh) {
        let x = (u64::from(h) << 32) | u64::from(l);
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

/// The normalised text used for exact matching: the texts lowercased, runs of whitespace as one
/// space (none leading), joined by U+0001.
pub(crate) fn normalise_for_exact(s: &Sample) -> String {
    normalise(s, None)
}

/// [`normalise_for_exact`] and the word hashes of its result ([`word_hashes`] of the normalised
/// text), in one pass: every character appended to the normalised text is classified as
/// `for_each_word` would classify it there, so the words are the same.
pub(crate) fn normalise_with_words(s: &Sample) -> (String, Vec<u64>) {
    let mut words = Vec::new();
    let norm = normalise(s, Some(&mut words));
    (norm, words)
}

/// Feeds the characters appended to the normalised text to the word splitter of `for_each_word`
/// (runs of alphanumerics; each CJK character alone; anything else separates).
struct Words<'a> {
    out: &'a mut Vec<u64>,
    start: Option<usize>,
}

impl Words<'_> {
    /// Appends a separator byte (space, U+0001), which ends the current word.
    #[inline]
    fn separator(&mut self, out: &mut Vec<u8>, byte: u8, track: bool) {
        if track {
            self.end(out);
        }
        out.push(byte);
    }
    #[inline]
    fn end(&mut self, buf: &[u8]) {
        if let Some(st) = self.start.take() {
            self.out.push(hash64(&buf[st..], 0));
        }
    }
    /// `buf` ends with the bytes of `c`, just appended.
    #[inline]
    fn push_char(&mut self, buf: &[u8], c: char) {
        let at = buf.len() - c.len_utf8();
        if is_cjk(c) {
            self.end(&buf[..at]);
            self.out.push(hash64(&buf[at..], 0));
        } else if c.is_alphanumeric() {
            self.start.get_or_insert(at);
        } else {
            self.end(&buf[..at]);
        }
    }
}

fn normalise(s: &Sample, words: Option<&mut Vec<u64>>) -> String {
    // Built as bytes: ASCII (the common case) is one byte operation per input byte.
    let mut out: Vec<u8> = Vec::with_capacity(s.texts().map(str::len).sum::<usize>() + 8);
    let mut scratch = Vec::new();
    let (track, wv) = match words {
        Some(w) => (true, w),
        None => (false, &mut scratch),
    };
    let mut w = Words { out: wv, start: None };
    for (i, t) in s.texts().enumerate() {
        if i > 0 {
            w.separator(&mut out, 1, track);
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
                    if std::mem::take(&mut space) {
                        w.separator(&mut out, b' ', track);
                    }
                    let lc = c.to_ascii_lowercase();
                    out.push(lc);
                    if track {
                        if lc.is_ascii_alphanumeric() {
                            w.start.get_or_insert(out.len() - 1);
                        } else {
                            w.end(&out[..out.len() - 1]);
                        }
                    }
                }
                k += 1;
                continue;
            }
            let Some(c) = t[k..].chars().next() else { break };
            k += c.len_utf8();
            if c.is_whitespace() {
                space = !out.is_empty();
            } else {
                if std::mem::take(&mut space) {
                    w.separator(&mut out, b' ', track);
                }
                let mut tmp = [0u8; 4];
                for l in c.to_lowercase() {
                    out.extend_from_slice(l.encode_utf8(&mut tmp).as_bytes());
                    if track {
                        w.push_char(&out, l);
                    }
                }
            }
        }
    }
    if track {
        w.end(&out);
    }
    // Only whole characters were written, so this cannot fail; the lossy form keeps it panic-free.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Keep,
    Exact(u32),
    Near(u32, f64),
}

/// The result of the hashing and verification passes: each row's fate, by index.
pub(crate) struct DedupePlan {
    fates: Vec<Fate>,
    pub candidate_pairs: usize,
    pub verified_pairs: usize,
}

impl DedupePlan {
    pub(crate) fn removed(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.fates.iter().enumerate().filter_map(|(i, f)| match f {
            Fate::Keep => None,
            Fate::Exact(j) | Fate::Near(j, _) => Some((i, *j as usize)),
        })
    }
}

/// Decide every row's fate from batches of rows (called twice with the same batches: hashing,
/// then verification of candidate pairs against their texts).
/// `cancelled` is polled before each row (Ctrl-C: `Err(Cancelled)`), in both passes.
pub(crate) fn plan<I, F>(
    p: &Params,
    seed: u64,
    mut batches: F,
    cancelled: &dyn Fn() -> Result<(), StageError>,
) -> Result<DedupePlan, StageError>
where
    F: FnMut() -> Result<I, StageError>,
    I: Iterator<Item = Result<Vec<Sample>, StageError>>,
{
    let mh = MinHasher::new(p.bands, p.rows_per_band, seed);
    let mut exact_seen: HashMap<[u8; 16], u32> = HashMap::new();
    let mut buckets: HashMap<u64, u32> = HashMap::new();
    let mut fates: Vec<Fate> = Vec::new();
    // candidate pairs: later row -> earlier bucket occupants, verified below.
    let mut cands: Vec<(u32, u32)> = Vec::new();
    let mut idx = 0u32;
    for batch in batches()? {
        for s in batch? {
            cancelled()?;
            let mut fate = Fate::Keep;
            let (norm, words) = if p.near { normalise_with_words(&s) } else { (normalise_for_exact(&s), Vec::new()) };
            if p.exact {
                let d = Sha256::digest(norm.as_bytes());
                let mut key = [0u8; 16];
                key.copy_from_slice(&d[..16]);
                match exact_seen.get(&key) {
                    Some(&j) => fate = Fate::Exact(j),
                    None => {
                        exact_seen.insert(key, idx);
                    }
                }
            }
            if p.near && fate == Fate::Keep {
                let sh = shingles_of_words(&words, p.ngram);
                if !sh.is_empty() {
                    let sig = mh.signature(&sh);
                    let mut mine: Vec<u32> = Vec::new();
                    for k in mh.band_keys(&sig) {
                        match buckets.get(&k) {
                            Some(&j) => mine.push(j),
                            None => {
                                buckets.insert(k, idx);
                            }
                        }
                    }
                    mine.sort_unstable();
                    mine.dedup();
                    cands.extend(mine.into_iter().map(|j| (idx, j)));
                }
            }
            fates.push(fate);
            idx += 1;
        }
    }
    drop(buckets);
    drop(exact_seen);
    let candidate_pairs = cands.len();
    let mut verified_pairs = 0;
    if !cands.is_empty() {
        // Load the shingle sets of every row in a candidate pair, then verify.
        let need: BTreeSet<u32> = cands.iter().flat_map(|&(a, b)| [a, b]).collect();
        let mut sets: HashMap<u32, Vec<u64>> = HashMap::new();
        let mut i = 0u32;
        for batch in batches()? {
            for s in batch? {
                cancelled()?;
                if need.contains(&i) {
                    sets.insert(i, shingle_set(&normalise_for_exact(&s), p.ngram));
                }
                i += 1;
            }
        }
        // cands are in increasing order of the later row, so earlier fates are final.
        for (a, b) in cands {
            if fates[a as usize] != Fate::Keep || fates[b as usize] != Fate::Keep {
                continue;
            }
            let j = jaccard_sorted(&sets[&a], &sets[&b]);
            if j >= p.threshold {
                verified_pairs += 1;
                fates[a as usize] = Fate::Near(b, j);
            }
        }
    }
    Ok(DedupePlan { fates, candidate_pairs, verified_pairs })
}

impl Stage for Dedupe {
    fn kind(&self) -> &'static str {
        "dedupe"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Remove exact (hash) and near (MinHash + LSH, verified Jaccard) duplicate rows"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&["data"], &[])?;
        let p: Params = ctx.params()?;
        p.check()?;
        Ok(Declared { outputs: vec!["data".into(), "removed".into()], files: vec![] })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let p: Params = ctx.params()?;
        p.check()?;
        let t0 = Instant::now();
        let seed = p.seed.unwrap_or(ctx.seed());
        let input = ctx.input("data")?.to_path_buf();
        let total = DatasetReader::open(&input)?.len();
        ctx.progress_start("dedupe: hashing", Some(total as u64));
        let plan = plan(&p, seed, || DatasetReader::open(&input), &|| ctx.check_cancelled())?;
        let t_plan = crate::data::ms_since(t0);
        ctx.progress_finish();
        ctx.check_cancelled()?;
        // Write kept rows and the removal record.
        let referenced: BTreeSet<usize> = plan.removed().map(|(_, j)| j).collect();
        let mut ids: HashMap<usize, String> = HashMap::new();
        let mut removed = Vec::new();
        let mut w = DatasetWriter::create(ctx.output("data")?)?;
        let (mut exact, mut near) = (0usize, 0usize);
        let mut i = 0usize;
        // Rows are only selected, never changed: filter each Parquet batch with a mask instead of
        // decoding every row; only the `id` column is read row by row, for the removal record.
        for frame in DatasetReader::open(&input)?.frames() {
            ctx.check_cancelled()?;
            let frame = frame?;
            let ids_col = frame
                .column("id")
                .and_then(|c| c.str().cloned())
                .map_err(|e| StageError::failed(format!("{}: column `id`: {e}", input.display())))?;
            let mut keep = Vec::with_capacity(frame.height());
            for id in ids_col.iter() {
                ctx.check_cancelled()?;
                let id = id.unwrap_or_default();
                if referenced.contains(&i) {
                    ids.insert(i, id.to_string());
                }
                keep.push(plan.fates[i] == Fate::Keep);
                match plan.fates[i] {
                    Fate::Keep => {}
                    Fate::Exact(j) => {
                        exact += 1;
                        removed.push(serde_json::json!({"id": id, "duplicate_of": ids[&(j as usize)], "method": "exact", "jaccard": 1.0}));
                    }
                    Fate::Near(j, jac) => {
                        near += 1;
                        let jac = (jac * 1e4).round() / 1e4;
                        removed.push(serde_json::json!({"id": id, "duplicate_of": ids[&(j as usize)], "method": "near", "jaccard": jac}));
                    }
                }
                i += 1;
            }
            let mask: polars::prelude::BooleanChunked = keep.iter().copied().collect();
            let kept = frame
                .filter(&mask)
                .map_err(|e| StageError::failed(format!("{}: filtering rows: {e}", input.display())))?;
            w.push_frame(&kept)?;
        }
        let rows_out = w.finish()?;
        let rdir = ctx.output("removed")?;
        std::fs::create_dir_all(rdir).map_err(|e| StageError::io(rdir, e))?;
        write_jsonl(&rdir.join("removed.jsonl"), &removed)?;
        ctx.set_report(serde_json::json!({
            "rows_in": total,
            "rows_out": rows_out,
            "removed_exact": exact,
            "removed_near": near,
            "candidate_pairs": plan.candidate_pairs,
            "verified_pairs": plan.verified_pairs,
            "params": {"ngram": p.ngram, "bands": p.bands, "rows_per_band": p.rows_per_band, "threshold": p.threshold, "seed": seed},
            "elapsed_ms": crate::data::ms_since(t0),
            "hash_ms": t_plan,
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Message;

    fn row(t: &str) -> Sample {
        Sample { messages: vec![Message::new("user", t)], ..Default::default() }
    }

    #[test]
    fn one_pass_words_equal_the_words_of_the_normalised_text() {
        use crate::data::text::word_hashes;
        let texts = [
            "Hello,  World!\tIt's   OK\n",
            "  leading space",
            "İstanbul ǅemal ẞtraße ÉCOLE café",
            "你好，世界！混合 text 中文123",
            "a\u{1}b",
            "emoji 😀 and ümlauts ÄÖÜ x1Y2",
            "",
            "   ",
            "-- ++ ..",
            "ﬁne ligature Ⅻ roman ①②",
            "日本語のテキストと한국어",
        ];
        for (k, t) in texts.iter().enumerate() {
            let mut s = Sample { id: "x".into(), messages: vec![Message::new("user", *t)], ..Default::default() };
            if k % 2 == 0 {
                s.messages.push(Message::new("assistant", texts[(k + 3) % texts.len()]));
            }
            let (norm, words) = normalise_with_words(&s);
            assert_eq!(norm, normalise_for_exact(&s), "{t:?}");
            assert_eq!(words, word_hashes(&norm), "{t:?}");
        }
    }

    #[test]
    fn exact_and_near_are_found_and_distinct_kept() {
        let base: String = (0..60).map(|i| format!("word{i}")).collect::<Vec<_>>().join(" ");
        let base = base.as_str();
        let rows = vec![
            row(base),
            row(&base.to_uppercase()),
            row(&base.replace("word30 ", "changed ")),
            row("a completely different sentence about rust compilers and parquet files and nothing else at all"),
        ];
        let p: Params = toml::from_str("threshold = 0.7\nngram = 2").unwrap();
        let batches = || Ok::<_, StageError>(vec![Ok(rows.clone())].into_iter());
        let plan = plan(&p, 7, batches, &|| Ok(())).unwrap();
        let removed: Vec<_> = plan.removed().collect();
        assert_eq!(removed, vec![(1, 0), (2, 0)]);
        assert!(matches!(plan.fates[1], Fate::Exact(0)));
        assert!(matches!(plan.fates[2], Fate::Near(0, j) if (0.7..1.0).contains(&j)));
    }

    /// Regression (issue 14, defect 7): dedupe's hashing pass (25 s per GB) never looked at
    /// Ctrl-C; it now stops at the row after it.
    #[test]
    fn dedupe_notices_ctrl_c_within_a_row() {
        let rows: Vec<Sample> = (0..100).map(|i| row(&format!("row number {i} of many"))).collect();
        let p: Params = toml::from_str("ngram = 2").unwrap();
        let seen = std::cell::Cell::new(0usize);
        let batches = || Ok::<_, StageError>(vec![Ok(rows.clone())].into_iter());
        let cancelled = || {
            seen.set(seen.get() + 1);
            if seen.get() > 3 {
                Err(StageError::Cancelled)
            } else {
                Ok(())
            }
        };
        assert!(matches!(plan(&p, 7, batches, &cancelled), Err(StageError::Cancelled)));
        assert_eq!(seen.get(), 4);
    }

    #[test]
    fn minhash_estimates_jaccard() {
        let a = shingle_set(&(0..300).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" "), 3);
        let b = shingle_set(
            &(0..300).map(|i| format!("w{}", if i % 10 == 0 { 1000 + i } else { i })).collect::<Vec<_>>().join(" "),
            3,
        );
        let truth = jaccard_sorted(&a, &b);
        // The split 32-bit kernel equals the 64-bit definition `((a·x + b) mod 2^64) >> 32`.
        let mh = MinHasher::new(4, 8, 3);
        let reference: Vec<u32> = (0..mh.a.len())
            .map(|p| a.iter().map(|&x| (mh.a[p].wrapping_mul(x).wrapping_add(mh.b[p]) >> 32) as u32).min().unwrap())
            .collect();
        assert_eq!(mh.signature(&a), reference);
        let mh = MinHasher::new(32, 8, 1);
        let (sa, sb) = (mh.signature(&a), mh.signature(&b));
        let est = sa.iter().zip(&sb).filter(|(x, y)| x == y).count() as f64 / sa.len() as f64;
        assert!((est - truth).abs() < 0.08, "estimate {est} vs truth {truth}");
    }
}
