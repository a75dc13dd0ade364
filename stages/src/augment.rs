//! # augment
//!
//! ## What it does
//! Adds rows, marked `augmented = true` with ids `<id>:aug<k>`; originals are kept (except
//! rows removed by under-sampling). Three independent operations, each off unless configured:
//! - **noise**: copies whose user turns get character-level (drop / swap with the next
//!   character / insert a random character of the same text) and word-level (drop / swap /
//!   duplicate-insert) edits at the given per-character / per-word rates;
//! - **paraphrase**: copies whose user query is rewritten through a template of its language
//!   (`{query}` is the original; built-in zh and en templates suit self-cognition questions);
//! - **balance**: over-sampling (random copies of rows of under-represented labels) and/or
//!   under-sampling (random removal from over-represented labels) towards a target label
//!   distribution (`uniform` or a table of fractions). Unlabelled rows pass through.
//!
//! Balancing applies to the final output, noise and paraphrase copies included (under-sampling
//! drops copies before originals). A noise copy that comes out equal to its source is not emitted
//! (the report counts it as `noise_unchanged`).
//!
//! Deterministic for a seed: each copy has its own ChaCha8 stream derived from (seed, operation,
//! row, copy), the balancing choices one more. Streams: the input is read in batches once to list
//! what the output would hold, then once for the originals and once per noise / paraphrase pass;
//! memory holds one batch, that list, and the rows that over-sampling copies.
//!
//! ## Inputs
//! `data`: a canonical dataset.
//!
//! ## Outputs
//! `data`: originals (in order) then the augmented rows.
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `noise` | unset | `{char_drop, char_swap, char_insert, word_drop, word_swap, word_insert}` rates in [0, 1], plus `copies` (1) and `fraction` of rows (1.0) |
//! | `paraphrase` | unset | `{copies = 1, templates_en = [...], templates_zh = [...], fraction = 1.0}` |
//! | `balance` | unset | `{target = "uniform" or {label = fraction}, mode = "over" / "under" / "both", size}` |
//! | `seed` | recipe seed | |
//!
//! ## Cache key
//! Params, seed and the input artifact's digest.
//!
//! ## Example
//! ```toml
//! [stages.augment]
//! kind = "augment"
//! inputs.data = "label.data"
//! params = { paraphrase = { copies = 1 }, balance = { target = "uniform", mode = "over" } }
//! ```

use std::collections::BTreeMap;
use std::time::Instant;

use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::text::guess_language;
use crate::data::{DatasetReader, DatasetWriter, Sample};

pub(crate) struct Augment;

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Noise {
    #[serde(default)]
    pub char_drop: f64,
    #[serde(default)]
    pub char_swap: f64,
    #[serde(default)]
    pub char_insert: f64,
    #[serde(default)]
    pub word_drop: f64,
    #[serde(default)]
    pub word_swap: f64,
    #[serde(default)]
    pub word_insert: f64,
    #[serde(default = "one")]
    pub copies: usize,
    #[serde(default = "one_f")]
    pub fraction: f64,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Paraphrase {
    #[serde(default = "one")]
    pub copies: usize,
    #[serde(default = "one_f")]
    pub fraction: f64,
    #[serde(default = "templates_en")]
    pub templates_en: Vec<String>,
    #[serde(default = "templates_zh")]
    pub templates_zh: Vec<String>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub(crate) enum Target {
    Named(String),
    Table(BTreeMap<String, f64>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Mode {
    #[default]
    Over,
    Under,
    Both,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Balance {
    pub target: Target,
    #[serde(default)]
    pub mode: Mode,
    /// Total labelled rows wanted; default: what the mode implies (max class × k for `over`,
    /// min class × k for `under`, the current total for `both`).
    pub size: Option<usize>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Params {
    pub noise: Option<Noise>,
    pub paraphrase: Option<Paraphrase>,
    pub balance: Option<Balance>,
    pub seed: Option<u64>,
}

fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn templates_en() -> Vec<String> {
    [
        "{query}",
        "Quick question: {query}",
        "Could you tell me: {query}",
        "{query} Please answer briefly.",
        "I'd like to know something. {query}",
        "Hey, {query}",
    ]
    .map(String::from)
    .to_vec()
}
fn templates_zh() -> Vec<String> {
    ["{query}", "请问，{query}", "我想问一下：{query}", "{query}请简单回答。", "你好，{query}", "能告诉我吗？{query}"]
        .map(String::from)
        .to_vec()
}

impl Params {
    fn check(&self) -> Result<(), StageError> {
        if let Some(n) = &self.noise {
            for (k, v) in [
                ("char_drop", n.char_drop),
                ("char_swap", n.char_swap),
                ("char_insert", n.char_insert),
                ("word_drop", n.word_drop),
                ("word_swap", n.word_swap),
                ("word_insert", n.word_insert),
                ("fraction", n.fraction),
            ] {
                if !(0.0..=1.0).contains(&v) {
                    return Err(StageError::Params(format!("noise.{k} must be in [0, 1], got {v}")));
                }
            }
        }
        if let Some(p) = &self.paraphrase {
            for t in p.templates_en.iter().chain(&p.templates_zh) {
                if !t.contains("{query}") {
                    return Err(StageError::Params(format!("paraphrase template `{t}` lacks `{{query}}`")));
                }
            }
        }
        if let Some(b) = &self.balance {
            match &b.target {
                Target::Named(n) if n != "uniform" => {
                    return Err(StageError::Params(format!("balance.target: `{n}` is not `uniform` or a table")))
                }
                Target::Table(t) if t.values().any(|v| *v < 0.0) || t.values().sum::<f64>() <= 0.0 => {
                    return Err(StageError::Params("balance.target: fractions must be >= 0 and not all 0".into()))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Character- and word-level noise on one string.
pub(crate) fn noisy(s: &str, n: &Noise, rng: &mut ChaCha8Rng) -> String {
    // Word level (whitespace-separated; CJK text without spaces is one word and is left to the
    // character level).
    let mut words: Vec<&str> = s.split(' ').collect();
    if n.word_drop > 0.0 || n.word_swap > 0.0 || n.word_insert > 0.0 {
        let mut out: Vec<&str> = Vec::with_capacity(words.len());
        let mut i = 0;
        while i < words.len() {
            let w = words[i];
            if words.len() > 1 && rng.gen_bool(n.word_drop) {
                i += 1;
                continue;
            }
            if i + 1 < words.len() && rng.gen_bool(n.word_swap) {
                out.push(words[i + 1]);
                out.push(w);
                i += 2;
                continue;
            }
            out.push(w);
            if rng.gen_bool(n.word_insert) {
                out.push(words[rng.gen_range(0..words.len())]);
            }
            i += 1;
        }
        words = out;
    }
    let joined = words.join(" ");
    if n.char_drop == 0.0 && n.char_swap == 0.0 && n.char_insert == 0.0 {
        return joined;
    }
    let chars: Vec<char> = joined.chars().collect();
    let mut out = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if rng.gen_bool(n.char_drop) {
            i += 1;
            continue;
        }
        if i + 1 < chars.len() && rng.gen_bool(n.char_swap) {
            out.push(chars[i + 1]);
            out.push(c);
            i += 2;
            continue;
        }
        out.push(c);
        if rng.gen_bool(n.char_insert) {
            out.push(chars[rng.gen_range(0..chars.len())]);
        }
        i += 1;
    }
    out.into_iter().collect()
}

fn label_key(s: &Sample) -> Option<String> {
    s.label.as_ref().map(|l| l.text())
}

/// Per-label wanted counts.
fn balance_targets(counts: &BTreeMap<String, usize>, b: &Balance) -> BTreeMap<String, usize> {
    let fractions: BTreeMap<String, f64> = match &b.target {
        Target::Named(_) => counts.keys().map(|k| (k.clone(), 1.0 / counts.len() as f64)).collect(),
        Target::Table(t) => {
            let sum: f64 = t.values().sum();
            counts.keys().map(|k| (k.clone(), t.get(k).copied().unwrap_or(0.0) / sum)).collect()
        }
    };
    let total: usize = counts.values().sum();
    let size = b.size.unwrap_or_else(|| {
        // The smallest total (over) / largest total (under) at which no class needs to shrink /
        // grow respectively.
        let ratios = counts.iter().filter(|(k, _)| fractions[*k] > 0.0).map(|(k, &c)| c as f64 / fractions[k]);
        match b.mode {
            Mode::Over => ratios.fold(0.0, f64::max).round() as usize,
            Mode::Under => ratios.fold(f64::INFINITY, f64::min).round() as usize,
            Mode::Both => total,
        }
    });
    fractions.iter().map(|(k, f)| (k.clone(), (f * size as f64).round() as usize)).collect()
}

/// Batches of the input rows, readable several times (one pass per operation).
pub(crate) type Batches<'a> = Box<dyn Iterator<Item = Result<Vec<Sample>, StageError>> + 'a>;

/// Every row of `source()` in order, with its index.
fn each_row<'a>(
    source: &mut dyn FnMut() -> Result<Batches<'a>, StageError>,
    mut f: impl FnMut(usize, Sample) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let mut i = 0;
    for batch in source()? {
        for s in batch? {
            f(i, s)?;
            i += 1;
        }
    }
    Ok(())
}

/// One row of the output before balancing: an original, or copy `c` of row `i` made by noise or
/// paraphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Item {
    Original(usize),
    Noise(usize, usize),
    Para(usize, usize),
}

impl Item {
    fn row(self) -> usize {
        match self {
            Item::Original(i) | Item::Noise(i, _) | Item::Para(i, _) => i,
        }
    }
}

/// The random stream of one copy: a function of (seed, operation, row, copy) alone, so a copy is
/// the same whenever it is made — when counting what the output will hold, and when writing it.
fn copy_rng(seed: u64, op: u64, row: usize, copy: usize) -> ChaCha8Rng {
    // splitmix64 over the four values.
    let mut z = seed;
    for v in [op, row as u64, copy as u64] {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(v);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    ChaCha8Rng::seed_from_u64(z)
}

/// Noise copy `c` of `s`, or `None` when the row is not picked (`fraction`) or the noise left
/// the text as it was (such a copy is not emitted).
fn noise_copy(s: &Sample, n: &Noise, seed: u64, i: usize, c: usize) -> Option<Sample> {
    let mut rng = copy_rng(seed, 1, i, c);
    if !rng.gen_bool(n.fraction) {
        return None;
    }
    let mut t = s.clone();
    let mut touched = false;
    for m in t.messages.iter_mut().filter(|m| m.role == "user") {
        m.content = noisy(&m.content, n, &mut rng);
        touched = true;
    }
    if let (false, Some(text)) = (touched, t.text.as_mut()) {
        *text = noisy(text, n, &mut rng);
    }
    if t.messages == s.messages && t.text == s.text {
        return None;
    }
    t.id = format!("{}:aug-noise{}", s.id, c + 1);
    t.augmented = true;
    Some(t)
}

/// Paraphrase copy `c` of `s` (its last user turn through a template of its language), or `None`
/// when the row is not picked, has no user turn or no template of its language.
fn para_copy(s: &Sample, pp: &Paraphrase, seed: u64, i: usize, c: usize) -> Option<Sample> {
    let mut rng = copy_rng(seed, 2, i, c);
    if !rng.gen_bool(pp.fraction) {
        return None;
    }
    let qi = s.messages.iter().rposition(|m| m.role == "user")?;
    let q = &s.messages[qi].content;
    let zh = guess_language(q).is_some_and(|(l, _)| l == "zh");
    let pool: Vec<&String> =
        (if zh { &pp.templates_zh } else { &pp.templates_en }).iter().filter(|t| t.as_str() != "{query}").collect();
    if pool.is_empty() {
        return None;
    }
    let text = pool[rng.gen_range(0..pool.len())].replace("{query}", q);
    if &text == q {
        return None;
    }
    let mut t = s.clone();
    t.messages[qi].content = text;
    t.id = format!("{}:aug-para{}", s.id, c + 1);
    t.augmented = true;
    Some(t)
}

/// Item `it` of row `s` as a sample (`None` for a copy that is not made).
fn materialise(it: Item, s: &Sample, p: &Params, seed: u64) -> Option<Sample> {
    match it {
        Item::Original(_) => Some(s.clone()),
        Item::Noise(i, c) => noise_copy(s, p.noise.as_ref()?, seed, i, c),
        Item::Para(i, c) => para_copy(s, p.paraphrase.as_ref()?, seed, i, c),
    }
}

/// The augmentation, streamed. `source` is read once to list what the output would hold before
/// balancing (each original and each noise / paraphrase copy that is made, with its label), then
/// balancing picks over that whole list — so the target distribution holds for the final output,
/// copies included — and three more passes write the kept originals (then the over-sampled
/// copies), the kept noise copies and the kept paraphrase copies. Memory holds one batch, the
/// list, and the rows over-sampling copies. Deterministic for a seed.
pub(crate) fn augment_stream<'a>(
    source: &mut dyn FnMut() -> Result<Batches<'a>, StageError>,
    emit: &mut dyn FnMut(Sample) -> Result<(), StageError>,
    p: &Params,
    seed: u64,
) -> Result<serde_json::Value, StageError> {
    let mut items: Vec<(Item, Option<String>)> = Vec::new();
    let mut before: BTreeMap<String, usize> = BTreeMap::new();
    let (mut rows_in, mut noise_unchanged) = (0usize, 0usize);
    each_row(source, |i, s| {
        rows_in += 1;
        let label = label_key(&s);
        if let Some(l) = &label {
            *before.entry(l.clone()).or_default() += 1;
        }
        items.push((Item::Original(i), label.clone()));
        if let Some(n) = &p.noise {
            for c in 0..n.copies {
                // Picked by `fraction` but unchanged by the noise: counted, not emitted.
                let picked = copy_rng(seed, 1, i, c).gen_bool(n.fraction);
                match noise_copy(&s, n, seed, i, c) {
                    Some(_) => items.push((Item::Noise(i, c), label.clone())),
                    None if picked => noise_unchanged += 1,
                    None => {}
                }
            }
        }
        if let Some(pp) = &p.paraphrase {
            for c in 0..pp.copies {
                if para_copy(&s, pp, seed, i, c).is_some() {
                    items.push((Item::Para(i, c), label.clone()));
                }
            }
        }
        Ok(())
    })?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut dropped: std::collections::HashSet<Item> = std::collections::HashSet::new();
    // (item, copy number) of each over-sampled copy, in output order.
    let mut over_picks: Vec<(Item, usize)> = Vec::new();
    if let Some(b) = &p.balance {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for l in items.iter().filter_map(|(_, l)| l.as_ref()) {
            *counts.entry(l.clone()).or_default() += 1;
        }
        let targets = balance_targets(&counts, b);
        // Under-sampling drops a seeded choice per label, augmentation copies before originals.
        if matches!(b.mode, Mode::Under | Mode::Both) {
            for (label, &want) in &targets {
                let of_label = |copy: bool| -> Vec<Item> {
                    items
                        .iter()
                        .filter(|(it, l)| l.as_deref() == Some(label) && matches!(it, Item::Original(_)) != copy)
                        .map(|(it, _)| *it)
                        .collect()
                };
                let (mut copies, mut originals) = (of_label(true), of_label(false));
                copies.shuffle(&mut rng);
                originals.shuffle(&mut rng);
                let have = copies.len() + originals.len();
                dropped.extend(copies.into_iter().chain(originals).take(have.saturating_sub(want)));
            }
        }
        if matches!(b.mode, Mode::Over | Mode::Both) {
            for (label, &want) in &targets {
                let kept: Vec<Item> = items
                    .iter()
                    .filter(|(it, l)| l.as_deref() == Some(label) && !dropped.contains(it))
                    .map(|(it, _)| *it)
                    .collect();
                if kept.is_empty() {
                    continue;
                }
                for k in 0..want.saturating_sub(kept.len()) {
                    over_picks.push((kept[rng.gen_range(0..kept.len())], k + 1));
                }
            }
        }
    }
    let kept = |it: &Item| !dropped.contains(it);
    let mut after: BTreeMap<String, usize> = BTreeMap::new();
    let (mut rows_out, mut noised, mut paraphrased) = (0usize, 0usize, 0usize);
    let mut put = |s: Sample, after: &mut BTreeMap<String, usize>| -> Result<(), StageError> {
        if let Some(l) = label_key(&s) {
            *after.entry(l).or_default() += 1;
        }
        rows_out += 1;
        emit(s)
    };
    // Originals, and the rows that over-sampling copies.
    let exists: std::collections::HashSet<Item> = items.iter().map(|(it, _)| *it).collect();
    let wanted: std::collections::BTreeSet<usize> = over_picks.iter().map(|(it, _)| it.row()).collect();
    let mut sources: std::collections::HashMap<usize, Sample> = std::collections::HashMap::new();
    each_row(source, |i, s| {
        if wanted.contains(&i) {
            sources.insert(i, s.clone());
        }
        if kept(&Item::Original(i)) {
            put(s, &mut after)?;
        }
        Ok(())
    })?;
    for &(it, k) in &over_picks {
        let Some(mut s) = materialise(it, &sources[&it.row()], p, seed) else { continue };
        s.id = format!("{}:aug-over{k}", s.id);
        s.augmented = true;
        put(s, &mut after)?;
    }
    drop(sources);
    if let Some(n) = &p.noise {
        each_row(source, |i, s| {
            for c in 0..n.copies {
                let it = Item::Noise(i, c);
                if exists.contains(&it) && kept(&it) {
                    if let Some(t) = noise_copy(&s, n, seed, i, c) {
                        put(t, &mut after)?;
                        noised += 1;
                    }
                }
            }
            Ok(())
        })?;
    }
    if let Some(pp) = &p.paraphrase {
        each_row(source, |i, s| {
            for c in 0..pp.copies {
                let it = Item::Para(i, c);
                if exists.contains(&it) && kept(&it) {
                    if let Some(t) = para_copy(&s, pp, seed, i, c) {
                        put(t, &mut after)?;
                        paraphrased += 1;
                    }
                }
            }
            Ok(())
        })?;
    }
    Ok(serde_json::json!({
        "rows_in": rows_in,
        "rows_out": rows_out,
        "noised": noised,
        "noise_unchanged": noise_unchanged,
        "paraphrased": paraphrased,
        "oversampled": over_picks.len(),
        "undersampled": dropped.len(),
        "labels_before": before,
        "labels_after": after,
    }))
}

/// [`augment_stream`] over rows in memory (the unit tests' entry point).
#[cfg(test)]
pub(crate) fn augment(rows: Vec<Sample>, p: &Params, seed: u64) -> (Vec<Sample>, serde_json::Value) {
    let mut out = Vec::new();
    let mut source = || -> Result<Batches<'_>, StageError> { Ok(Box::new(std::iter::once(Ok(rows.clone())))) };
    let mut emit = |s: Sample| -> Result<(), StageError> {
        out.push(s);
        Ok(())
    };
    let report = augment_stream(&mut source, &mut emit, p, seed).expect("in-memory rows cannot fail");
    (out, report)
}

impl Stage for Augment {
    fn kind(&self) -> &'static str {
        "augment"
    }
    fn version(&self) -> u32 {
        // 2: balancing over the final output (copies included), no copy equal to its source,
        // one random stream per copy.
        2
    }
    fn summary(&self) -> &'static str {
        "Text noise, template paraphrase and class balancing (over/under-sampling); augmented rows are marked"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&["data"], &[])?;
        let p: Params = ctx.params()?;
        p.check()?;
        Ok(Declared { outputs: vec!["data".into()], files: vec![] })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let p: Params = ctx.params()?;
        p.check()?;
        let t0 = Instant::now();
        let input = ctx.input("data")?.to_path_buf();
        let mut w = DatasetWriter::create(ctx.output("data")?)?;
        // Ctrl-C is checked before each batch of every pass and before each row written.
        let mut source = || -> Result<Batches<'_>, StageError> {
            ctx.check_cancelled()?;
            Ok(Box::new(DatasetReader::open(&input)?.map(|b| ctx.check_cancelled().and(b))))
        };
        let mut emit = |s: Sample| {
            ctx.check_cancelled()?;
            w.push(s)
        };
        let mut report = augment_stream(&mut source, &mut emit, &p, p.seed.unwrap_or(ctx.seed()))?;
        w.finish()?;
        report["elapsed_ms"] = crate::data::ms_since(t0).into();
        ctx.set_report(report);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Label, Message};

    fn row(id: &str, q: &str, label: &str) -> Sample {
        Sample {
            id: id.into(),
            messages: vec![Message::new("user", q), Message::new("assistant", "a")],
            label: Some(Label::Text(label.into())),
            ..Default::default()
        }
    }

    #[test]
    fn noise_rates_change_about_the_right_share() {
        let text: String = (0..2000).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let n = Noise { word_drop: 0.1, copies: 1, fraction: 1.0, ..Default::default() };
        let out = noisy(&text, &n, &mut ChaCha8Rng::seed_from_u64(3));
        let left = out.split(' ').count();
        assert!((1720..=1880).contains(&left), "{left} words left of 2000 at 10% drop");
        let zero = Noise { copies: 1, fraction: 1.0, ..Default::default() };
        assert_eq!(noisy(&text, &zero, &mut ChaCha8Rng::seed_from_u64(3)), text);
    }

    #[test]
    fn balancing_reaches_the_target_and_is_deterministic() {
        let mut rows: Vec<_> = (0..9).map(|i| row(&format!("a{i}"), "q", "a")).collect();
        rows.extend((0..3).map(|i| row(&format!("b{i}"), "q", "b")));
        let p: Params = toml::from_str("balance = { target = \"uniform\", mode = \"over\" }").unwrap();
        let (out, rep) = augment(rows.clone(), &p, 5);
        assert_eq!(rep["labels_after"]["a"], 9);
        assert_eq!(rep["labels_after"]["b"], 9);
        assert_eq!(out.iter().filter(|s| s.augmented).count(), 6);
        assert_eq!(augment(rows.clone(), &p, 5).0, out);
        let p: Params = toml::from_str("balance = { target = \"uniform\", mode = \"under\" }").unwrap();
        let (out, rep) = augment(rows, &p, 5);
        assert_eq!(out.len(), 6);
        assert_eq!(rep["undersampled"], 6);
    }

    /// Issue: a uniform target came out 5/8/4 once noise and paraphrase copies were added after
    /// balancing, and some noised copies equalled their source.
    #[test]
    fn balance_holds_for_the_final_output_with_noise_and_paraphrase() {
        let mut rows: Vec<_> = (0..5).map(|i| row(&format!("a{i}"), &format!("who are you number {i}"), "a")).collect();
        rows.extend((0..8).map(|i| row(&format!("b{i}"), &format!("what is your name {i} please"), "b")));
        rows.extend((0..4).map(|i| row(&format!("c{i}"), "hi", "c")));
        for mode in ["over", "under", "both"] {
            let p: Params = toml::from_str(&format!(
                "noise = {{ char_drop = 0.05, copies = 2 }}\nparaphrase = {{ copies = 1, fraction = 0.5 }}\n\
                 balance = {{ target = \"uniform\", mode = \"{mode}\" }}"
            ))
            .unwrap();
            let (out, rep) = augment(rows.clone(), &p, 11);
            let mut counts = BTreeMap::new();
            for s in &out {
                *counts.entry(label_key(s).unwrap()).or_insert(0usize) += 1;
            }
            let (lo, hi) = (counts.values().min().unwrap(), counts.values().max().unwrap());
            assert!(hi - lo <= 1, "{mode}: {counts:?}");
            assert_eq!(serde_json::to_value(&counts).unwrap(), rep["labels_after"], "{mode}");
            let by_id: BTreeMap<&str, &Sample> = rows.iter().map(|s| (s.id.as_str(), s)).collect();
            for s in out.iter().filter(|s| s.id.contains(":aug-noise") && !s.id.contains(":aug-over")) {
                let src = by_id[s.id.rsplit_once(":aug-noise").unwrap().0];
                assert_ne!(s.messages, src.messages, "{mode}: {} equals its source", s.id);
            }
            assert_eq!(augment(rows.clone(), &p, 11).0, out, "{mode}: deterministic");
        }
        // "hi" at 5% character drop usually survives unchanged: such copies are counted, not emitted.
        let p: Params = toml::from_str("noise = { char_drop = 0.05, copies = 4 }").unwrap();
        let (out, rep) = augment(rows, &p, 11);
        let unchanged = rep["noise_unchanged"].as_u64().unwrap() as usize;
        assert!(unchanged > 0);
        assert_eq!(out.len(), 17 + 17 * 4 - unchanged);
    }
}
