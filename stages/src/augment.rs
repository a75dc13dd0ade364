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
//! Deterministic for a seed: one ChaCha8 stream, rows visited in order. Streams: the input is read
//! in batches once for the labels, once for the originals and once per noise / paraphrase pass;
//! memory holds one batch, the labels, and the rows that over-sampling copies.
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

/// The augmentation, streamed: `source` is read once for the labels, once for the originals (and
/// the rows over-sampling copies), then once per noise / paraphrase pass; `emit` receives the
/// output rows in order (originals, over-sampled, noised, paraphrased copies). Memory holds one
/// batch, the labels, and the rows over-sampling copies. The RNG is consumed in the same order
/// as visiting the rows in memory would, so the output is the same.
pub(crate) fn augment_stream<'a>(
    source: &mut dyn FnMut() -> Result<Batches<'a>, StageError>,
    emit: &mut dyn FnMut(Sample) -> Result<(), StageError>,
    p: &Params,
    seed: u64,
) -> Result<serde_json::Value, StageError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut labels: Vec<Option<String>> = Vec::new();
    each_row(source, |_, s| {
        labels.push(label_key(&s));
        Ok(())
    })?;
    let rows_in = labels.len();
    let mut before = BTreeMap::new();
    for l in labels.iter().flatten() {
        *before.entry(l.clone()).or_default() += 1usize;
    }
    let (mut noised, mut paraphrased, mut under) = (0usize, 0usize, 0usize);
    let mut dropped = vec![false; rows_in];
    // (original index, copy number) of each over-sampled copy, in output order.
    let mut over_picks: Vec<(usize, usize)> = Vec::new();
    if let Some(b) = &p.balance {
        let targets = balance_targets(&before, b);
        // Under-sampling: a seeded choice of rows to drop per label.
        if matches!(b.mode, Mode::Under | Mode::Both) {
            for (label, &want) in &targets {
                let mut idx: Vec<usize> = (0..rows_in).filter(|&i| labels[i].as_deref() == Some(label)).collect();
                if idx.len() > want {
                    idx.shuffle(&mut rng);
                    for &i in &idx[want..] {
                        dropped[i] = true;
                        under += 1;
                    }
                }
            }
        }
        if matches!(b.mode, Mode::Over | Mode::Both) {
            for (label, &want) in &targets {
                let idx: Vec<usize> =
                    (0..rows_in).filter(|&i| !dropped[i] && labels[i].as_deref() == Some(label)).collect();
                if idx.is_empty() {
                    continue;
                }
                for k in 0..want.saturating_sub(idx.len()) {
                    over_picks.push((idx[rng.gen_range(0..idx.len())], k + 1));
                }
            }
        }
    }
    let mut after: BTreeMap<String, usize> = BTreeMap::new();
    let mut rows_out = 0usize;
    let mut put = |s: Sample, after: &mut BTreeMap<String, usize>| -> Result<(), StageError> {
        if let Some(l) = label_key(&s) {
            *after.entry(l).or_default() += 1;
        }
        rows_out += 1;
        emit(s)
    };
    // Originals, and the rows over-sampling copies.
    let wanted: std::collections::BTreeSet<usize> = over_picks.iter().map(|&(i, _)| i).collect();
    let mut sources: std::collections::HashMap<usize, Sample> = std::collections::HashMap::new();
    each_row(source, |i, s| {
        if dropped[i] {
            return Ok(());
        }
        if wanted.contains(&i) {
            sources.insert(i, s.clone());
        }
        put(s, &mut after)
    })?;
    for &(i, k) in &over_picks {
        let mut s = sources[&i].clone();
        s.id = format!("{}:aug-over{k}", s.id);
        s.augmented = true;
        put(s, &mut after)?;
    }
    drop(sources);
    if let Some(n) = &p.noise {
        each_row(source, |i, s| {
            if dropped[i] {
                return Ok(());
            }
            for c in 0..n.copies {
                if !rng.gen_bool(n.fraction) {
                    continue;
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
                t.id = format!("{}:aug-noise{}", s.id, c + 1);
                t.augmented = true;
                put(t, &mut after)?;
                noised += 1;
            }
            Ok(())
        })?;
    }
    if let Some(pp) = &p.paraphrase {
        each_row(source, |i, s| {
            if dropped[i] {
                return Ok(());
            }
            let Some(qi) = s.messages.iter().rposition(|m| m.role == "user") else { return Ok(()) };
            let q = &s.messages[qi].content;
            let zh = guess_language(q).is_some_and(|(l, _)| l == "zh");
            let pool: Vec<&String> = (if zh { &pp.templates_zh } else { &pp.templates_en })
                .iter()
                .filter(|t| t.as_str() != "{query}")
                .collect();
            if pool.is_empty() {
                return Ok(());
            }
            for c in 0..pp.copies {
                if !rng.gen_bool(pp.fraction) {
                    continue;
                }
                let tpl = pool[rng.gen_range(0..pool.len())];
                let mut t = s.clone();
                t.messages[qi].content = tpl.replace("{query}", q);
                t.id = format!("{}:aug-para{}", s.id, c + 1);
                t.augmented = true;
                put(t, &mut after)?;
                paraphrased += 1;
            }
            Ok(())
        })?;
    }
    Ok(serde_json::json!({
        "rows_in": rows_in,
        "rows_out": rows_out,
        "noised": noised,
        "paraphrased": paraphrased,
        "oversampled": over_picks.len(),
        "undersampled": under,
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
        1
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
        let mut source = || -> Result<Batches<'_>, StageError> {
            ctx.check_cancelled()?;
            Ok(Box::new(DatasetReader::open(&input)?))
        };
        let mut emit = |s: Sample| w.push(s);
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
}
