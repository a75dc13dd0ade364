//! # label
//!
//! ## What it does
//! Adds or checks labels. Rule-based labelling: an ordered list of rules (keywords or a regex →
//! label); the first rule matching the row's text gives its label. A row without a `label` gets
//! the rule's label in `label`; a row that already has one keeps it, and the rule's label goes to
//! `label2` (unless `label2` is already set), so the original labels are never overwritten.
//! When rows carry both `label` and `label2`, the stage assesses label quality: agreement,
//! Cohen's kappa and the confusion table. It always reports the label distribution and balance
//! statistics (imbalance ratio, normalised entropy).
//!
//! ## Inputs
//! `data`: a canonical dataset.
//!
//! ## Outputs
//! `data`: the rows, labels added.
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `rules` | `[]` | `[{label, keywords = [...]} or {label, regex}]`, first match wins |
//! | `case_insensitive` | `true` | for keywords and regexes |
//! | `field` | `"all"` | text the rules read: `all`, `user`, `assistant`, `text` |
//! | `default` | unset | label for rows no rule matches (unset: leave them unlabelled) |
//!
//! ## Cache key
//! Params and the input artifact's digest.
//!
//! ## Example
//! ```toml
//! [stages.label]
//! kind = "label"
//! inputs.data = "clean.data"
//! params.rules = [{ label = "identity", keywords = ["who are you", "你是谁"] }, { label = "math", regex = '\d+\s*[-+*/]\s*\d+' }]
//! ```

use std::collections::BTreeMap;
use std::time::Instant;

use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use regex::{Regex, RegexBuilder};

use crate::data::{DatasetReader, DatasetWriter, Label, Sample};

pub(crate) struct LabelStage;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rule {
    pub label: String,
    #[serde(default)]
    pub keywords: Vec<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Field {
    #[default]
    All,
    User,
    Assistant,
    Text,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Params {
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default = "yes")]
    pub case_insensitive: bool,
    #[serde(default)]
    pub field: Field,
    pub default: Option<String>,
}

fn yes() -> bool {
    true
}

pub(crate) struct Rules {
    compiled: Vec<(String, Regex)>,
    field: Field,
    default: Option<String>,
}

impl Rules {
    pub(crate) fn new(p: &Params) -> Result<Self, StageError> {
        let mut compiled = Vec::new();
        for (i, r) in p.rules.iter().enumerate() {
            let pattern = match (&r.regex, r.keywords.is_empty()) {
                (Some(re), true) => re.clone(),
                (None, false) => r.keywords.iter().map(|k| regex::escape(k)).collect::<Vec<_>>().join("|"),
                _ => {
                    return Err(StageError::Params(format!(
                        "rules[{i}] (label `{}`): give exactly one of `keywords` or `regex`",
                        r.label
                    )))
                }
            };
            let re = RegexBuilder::new(&pattern)
                .case_insensitive(p.case_insensitive)
                .build()
                .map_err(|e| StageError::Params(format!("rules[{i}].regex: {e}")))?;
            compiled.push((r.label.clone(), re));
        }
        Ok(Rules { compiled, field: p.field, default: p.default.clone() })
    }

    pub(crate) fn label_of(&self, s: &Sample) -> Option<&str> {
        let text: String = match self.field {
            Field::All => s.joined_text(),
            Field::User | Field::Assistant => {
                let role = if matches!(self.field, Field::User) { "user" } else { "assistant" };
                s.messages.iter().filter(|m| m.role == role).map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")
            }
            Field::Text => s.text.clone().unwrap_or_default(),
        };
        self.compiled.iter().find(|(_, re)| re.is_match(&text)).map(|(l, _)| l.as_str()).or(self.default.as_deref())
    }
}

/// Agreement, Cohen's kappa and the confusion table of two labellings (pairs of label texts).
pub(crate) fn agreement(pairs: &[(String, String)]) -> serde_json::Value {
    let n = pairs.len() as f64;
    let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut a_counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut b_counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut agree = 0usize;
    for (a, b) in pairs {
        *confusion.entry(a.clone()).or_default().entry(b.clone()).or_default() += 1;
        *a_counts.entry(a).or_default() += 1;
        *b_counts.entry(b).or_default() += 1;
        agree += usize::from(a == b);
    }
    let po = agree as f64 / n;
    let pe: f64 =
        a_counts.iter().map(|(k, &ca)| ca as f64 / n * b_counts.get(k).copied().unwrap_or(0) as f64 / n).sum();
    let kappa = if (1.0 - pe).abs() < 1e-12 {
        if po >= 1.0 {
            1.0
        } else {
            0.0
        }
    } else {
        (po - pe) / (1.0 - pe)
    };
    let r = |x: f64| (x * 1e6).round() / 1e6;
    serde_json::json!({
        "rows": pairs.len(),
        "agreement": r(po),
        "cohen_kappa": r(kappa),
        "confusion": confusion,
    })
}

/// Label counts plus balance statistics.
pub(crate) fn distribution(counts: &BTreeMap<String, usize>) -> serde_json::Value {
    let total: usize = counts.values().sum();
    let (max, min) = (counts.values().max().copied().unwrap_or(0), counts.values().min().copied().unwrap_or(0));
    let k = counts.len();
    let entropy: f64 = counts
        .values()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    let r = |x: f64| (x * 1e6).round() / 1e6;
    serde_json::json!({
        "counts": counts,
        "classes": k,
        "imbalance_ratio": if min > 0 { r(max as f64 / min as f64) } else { 0.0 },
        "normalised_entropy": if k > 1 { r(entropy / (k as f64).ln()) } else { 1.0 },
    })
}

impl Stage for LabelStage {
    fn kind(&self) -> &'static str {
        "label"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Rule-based labelling, label agreement (Cohen's kappa, confusion) and balance statistics"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&["data"], &[])?;
        let p: Params = ctx.params()?;
        Rules::new(&p)?;
        Ok(Declared { outputs: vec!["data".into()], files: vec![] })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let p: Params = ctx.params()?;
        let rules = Rules::new(&p)?;
        let t0 = Instant::now();
        let reader = DatasetReader::open(ctx.input("data")?)?;
        let total = reader.len();
        let mut w = DatasetWriter::create(ctx.output("data")?)?;
        let mut per_rule: BTreeMap<String, usize> = BTreeMap::new();
        let (mut to_label, mut to_label2, mut unmatched) = (0usize, 0usize, 0usize);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut unlabelled = 0usize;
        for batch in reader {
            ctx.check_cancelled()?;
            for mut s in batch? {
                ctx.check_cancelled()?;
                if !rules.compiled.is_empty() || rules.default.is_some() {
                    match rules.label_of(&s) {
                        Some(l) => {
                            *per_rule.entry(l.to_string()).or_default() += 1;
                            if s.label.is_none() {
                                s.label = Some(Label::Text(l.to_string()));
                                to_label += 1;
                            } else if s.label2.is_none() {
                                s.label2 = Some(Label::Text(l.to_string()));
                                to_label2 += 1;
                            }
                        }
                        None => unmatched += 1,
                    }
                }
                match &s.label {
                    Some(l) => *counts.entry(l.text()).or_default() += 1,
                    None => unlabelled += 1,
                }
                if let (Some(a), Some(b)) = (&s.label, &s.label2) {
                    pairs.push((a.text(), b.text()));
                }
                w.push(s)?;
            }
        }
        let rows_out = w.finish()?;
        let mut report = serde_json::json!({
            "rows_in": total,
            "rows_out": rows_out,
            "rules": {"matched": per_rule, "unmatched": unmatched, "wrote_label": to_label, "wrote_label2": to_label2},
            "unlabelled": unlabelled,
            "distribution": distribution(&counts),
            "elapsed_ms": crate::data::ms_since(t0),
        });
        if !pairs.is_empty() {
            report["quality"] = agreement(&pairs);
        }
        ctx.set_report(report);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kappa_matches_a_worked_example() {
        // Classic example (Wikipedia "Cohen's kappa"): 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no → κ = 0.4.
        let mut pairs = Vec::new();
        for (a, b, n) in [("yes", "yes", 20), ("yes", "no", 5), ("no", "yes", 10), ("no", "no", 15)] {
            pairs.extend((0..n).map(|_| (a.to_string(), b.to_string())));
        }
        let v = agreement(&pairs);
        assert_eq!(v["agreement"], 0.7);
        assert_eq!(v["cohen_kappa"], 0.4);
        assert_eq!(v["confusion"]["yes"]["no"], 5);
    }

    #[test]
    fn first_matching_rule_wins() {
        let p: Params = toml::from_str(
            r#"rules = [{ label = "id", keywords = ["WHO ARE YOU"] }, { label = "math", regex = '\d+\s*\+\s*\d+' }]"#,
        )
        .unwrap();
        let r = Rules::new(&p).unwrap();
        let s = |t: &str| Sample { messages: vec![crate::data::Message::new("user", t)], ..Default::default() };
        assert_eq!(r.label_of(&s("who are you? 1+1")), Some("id"));
        assert_eq!(r.label_of(&s("what is 1 + 1")), Some("math"));
        assert_eq!(r.label_of(&s("hello")), None);
    }
}
