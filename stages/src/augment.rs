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
//! Deterministic for a seed: one ChaCha8 stream, rows visited in order. Holds the dataset in
//! memory (balancing needs the class counts).
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
use crate::data::{read_dataset, write_dataset, Sample};

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

pub(crate) fn augment(rows: Vec<Sample>, p: &Params, seed: u64) -> (Vec<Sample>, serde_json::Value) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows_in = rows.len();
    let mut kept = rows;
    let mut extra: Vec<Sample> = Vec::new();
    let (mut noised, mut paraphrased, mut over, mut under) = (0usize, 0usize, 0usize, 0usize);
    let before = count_labels(&kept);
    if let Some(b) = &p.balance {
        let targets = balance_targets(&before, b);
        // Under-sampling: a seeded choice of rows to drop per label.
        if matches!(b.mode, Mode::Under | Mode::Both) {
            let mut drop = vec![false; kept.len()];
            for (label, &want) in &targets {
                let mut idx: Vec<usize> = (0..kept.len()).filter(|&i| label_key(&kept[i]).as_deref() == Some(label)).collect();
                if idx.len() > want {
                    idx.shuffle(&mut rng);
                    for &i in &idx[want..] {
                        drop[i] = true;
                        under += 1;
                    }
                }
            }
            let mut i = 0;
            kept.retain(|_| {
                i += 1;
                !drop[i - 1]
            });
        }
        if matches!(b.mode, Mode::Over | Mode::Both) {
            for (label, &want) in &targets {
                let idx: Vec<usize> = (0..kept.len()).filter(|&i| label_key(&kept[i]).as_deref() == Some(label)).collect();
                if idx.is_empty() {
                    continue;
                }
                for k in 0..want.saturating_sub(idx.len()) {
                    let mut s = kept[idx[rng.gen_range(0..idx.len())]].clone();
                    s.id = format!("{}:aug-over{}", s.id, k + 1);
                    s.augmented = true;
                    extra.push(s);
                    over += 1;
                }
            }
        }
    }
    if let Some(n) = &p.noise {
        for s in &kept {
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
                extra.push(t);
                noised += 1;
            }
        }
    }
    if let Some(pp) = &p.paraphrase {
        for s in &kept {
            let Some(qi) = s.messages.iter().rposition(|m| m.role == "user") else { continue };
            let q = &s.messages[qi].content;
            let zh = guess_language(q).is_some_and(|(l, _)| l == "zh");
            let pool: Vec<&String> = (if zh { &pp.templates_zh } else { &pp.templates_en })
                .iter()
                .filter(|t| t.as_str() != "{query}")
                .collect();
            if pool.is_empty() {
                continue;
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
                extra.push(t);
                paraphrased += 1;
            }
        }
    }
    kept.extend(extra);
    let after = count_labels(&kept);
    let report = serde_json::json!({
        "rows_in": rows_in,
        "rows_out": kept.len(),
        "noised": noised,
        "paraphrased": paraphrased,
        "oversampled": over,
        "undersampled": under,
        "labels_before": before,
        "labels_after": after,
    });
    (kept, report)
}

fn count_labels(rows: &[Sample]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in rows {
        if let Some(l) = label_key(s) {
            *m.entry(l).or_default() += 1;
        }
    }
    m
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
        let rows = read_dataset(ctx.input("data")?)?;
        ctx.check_cancelled()?;
        let (rows, mut report) = augment(rows, &p, p.seed.unwrap_or(ctx.seed()));
        write_dataset(ctx.output("data")?, &rows)?;
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
