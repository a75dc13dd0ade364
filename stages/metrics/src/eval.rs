//! Running general_mcq / general_qa (and, in [`crate::perplexity`], plain text) against any model through the [`Predictor`] trait, producing
//! the report rows and one record per sample. Nothing here knows about a particular model: the
//! `evaluate` stage plugs the real one in, tests plug in a scripted one.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::mcq::{extract_answer, fewshot_examples, list_mcq_subsets, load_mcq_subset, mcq_prompt, LETTERS};
use crate::qa::{list_qa_subsets, load_qa_jsonl, Message};
use crate::report::ReportRow;
use crate::score::{mean_scores, score_pair, PairScores};
use crate::DataError;

/// What a model is asked: a conversation, and text the assistant turn starts with (for log-likelihood
/// scoring, e.g. `答案：`; empty for free generation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub assistant_prefix: String,
}

/// A model's failure, as its implementation phrases it.
pub type PredictError = Box<dyn std::error::Error + Send + Sync>;

/// A model as evaluation sees it. Implementations apply their own chat template.
pub trait Predictor {
    /// Shown in the `Model` column.
    fn name(&self) -> String;
    /// One completion per prompt (greedy unless the implementation says otherwise); called with
    /// batches of up to `batch_size` prompts.
    fn generate(&mut self, prompts: &[Prompt]) -> Result<Vec<String>, PredictError>;
    /// log P(continuation | prompt + assistant_prefix) for each continuation, summed over its tokens.
    fn loglik(&mut self, prompt: &Prompt, continuations: &[String]) -> Result<Vec<f64>, PredictError>;
    /// Token ids of plain text (no chat template, no special tokens), and the BOS id the model's
    /// tokenizer starts a sequence with, if it adds one (the `perplexity` scorer,
    /// [`crate::perplexity`]).
    fn text_tokens(&mut self, text: &str) -> Result<(Vec<u32>, Option<u32>), PredictError> {
        let _ = text;
        Err(format!("{} cannot score perplexity (no plain-text tokenizer)", self.name()).into())
    }
    /// `log P(ids[i + 1] | ids[..=i])` for `i` in `from .. ids.len() - 1`, from one forward pass
    /// over `ids`.
    fn next_token_logprobs(&mut self, ids: &[u32], from: usize) -> Result<Vec<f64>, PredictError> {
        let _ = (ids, from);
        Err(format!("{} cannot score perplexity (no next-token log-probabilities)", self.name()).into())
    }
}

/// How MCQ answers are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum McqScorer {
    /// Generate, then extract the letter (evalscope's way).
    #[default]
    Generate,
    /// Pick the option letter with the highest log-likelihood after `答案：`.
    Loglik,
}

impl McqScorer {
    pub fn as_str(self) -> &'static str {
        match self {
            McqScorer::Generate => "generate",
            McqScorer::Loglik => "loglik",
        }
    }
}

/// Failure of an evaluation run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("model failed: {0}")]
    Predict(String),
    #[error("cancelled")]
    Cancelled,
}

/// Options shared by both dataset kinds.
pub struct RunOptions<'a> {
    /// Subsets to run (all in the folder when empty).
    pub subsets: Vec<String>,
    /// At most this many samples per subset.
    pub limit: Option<usize>,
    pub batch_size: usize,
    /// Called with (samples done, total); return false to cancel.
    pub progress: &'a mut dyn FnMut(usize, usize) -> bool,
}

/// One MCQ sample as answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McqRecord {
    pub subset: String,
    pub id: String,
    pub prompt: String,
    pub completion: Option<String>,
    pub logliks: Option<Vec<f64>>,
    pub extracted: Option<String>,
    pub answer: String,
    pub correct: bool,
}

/// One QA sample as answered and scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaRecord {
    pub subset: String,
    pub id: String,
    pub messages: Vec<Message>,
    pub prediction: String,
    pub reference: String,
    pub scores: Map<String, Value>,
}

fn subsets_or(all: Vec<String>, wanted: &[String], dir: &Path) -> Result<Vec<String>, DataError> {
    if wanted.is_empty() {
        return Ok(all);
    }
    for w in wanted {
        if !all.contains(w) {
            return Err(DataError::new(dir, None, format!("no subset `{w}` (found: {})", all.join(", "))));
        }
    }
    Ok(wanted.to_vec())
}

fn predict_err(e: PredictError) -> EvalError {
    EvalError::Predict(e.to_string())
}

/// (completion, option log-likelihoods, extracted letter) of one MCQ sample.
type Outcome = (Option<String>, Option<Vec<f64>>, Option<String>);

/// Run general_mcq on every selected subset of `dir`.
pub fn run_mcq(
    dir: &Path,
    few_shot_num: usize,
    scorer: McqScorer,
    opts: RunOptions<'_>,
    predictor: &mut dyn Predictor,
) -> Result<(Vec<ReportRow>, Vec<McqRecord>), EvalError> {
    let subsets = subsets_or(list_mcq_subsets(dir)?, &opts.subsets, dir)?;
    let mut loaded = Vec::new();
    for s in &subsets {
        let mut sub = load_mcq_subset(dir, s)?;
        if let Some(l) = opts.limit {
            sub.val.truncate(l);
        }
        fewshot_examples(&sub, few_shot_num)?;
        loaded.push(sub);
    }
    let total: usize = loaded.iter().map(|s| s.val.len()).sum();
    let model = predictor.name();
    let (mut rows, mut records, mut done) = (Vec::new(), Vec::new(), 0);
    for sub in &loaded {
        let shots = fewshot_examples(sub, few_shot_num)?;
        let mut correct = 0usize;
        for chunk in sub.val.chunks(opts.batch_size.max(1)) {
            let texts: Vec<String> = chunk.iter().map(|it| mcq_prompt(it, shots)).collect();
            let outcomes: Vec<Outcome> = match scorer {
                McqScorer::Generate => {
                    let prompts: Vec<Prompt> = texts
                        .iter()
                        .map(|t| Prompt {
                            messages: vec![Message::new("user", t.clone())],
                            assistant_prefix: String::new(),
                        })
                        .collect();
                    let outs = predictor.generate(&prompts).map_err(predict_err)?;
                    if outs.len() != prompts.len() {
                        return Err(EvalError::Predict(format!(
                            "{} completions for {} prompts",
                            outs.len(),
                            prompts.len()
                        )));
                    }
                    chunk
                        .iter()
                        .zip(outs)
                        .map(|(it, o)| (extract_answer(&o, it.choices.len()), None, Some(o)))
                        .map(|(e, l, o)| (o, l, e))
                        .collect()
                }
                McqScorer::Loglik => {
                    let mut v = Vec::new();
                    for (it, t) in chunk.iter().zip(&texts) {
                        let p = Prompt {
                            messages: vec![Message::new("user", t.clone())],
                            assistant_prefix: "答案：".to_string(),
                        };
                        let conts: Vec<String> = LETTERS[..it.choices.len()].iter().map(|s| s.to_string()).collect();
                        let ll = predictor.loglik(&p, &conts).map_err(predict_err)?;
                        if ll.len() != conts.len() {
                            return Err(EvalError::Predict(format!("{} scores for {} options", ll.len(), conts.len())));
                        }
                        // First maximum wins a tie.
                        let best = ll.iter().enumerate().fold(None, |b: Option<(usize, f64)>, (i, &x)| match b {
                            Some((_, bx)) if bx >= x => b,
                            _ => Some((i, x)),
                        });
                        v.push((None, Some(ll), best.map(|(i, _)| LETTERS[i].to_string())));
                    }
                    v
                }
            };
            for ((it, text), (completion, logliks, extracted)) in chunk.iter().zip(texts).zip(outcomes) {
                let ok = extracted.as_deref() == Some(it.answer.as_str());
                correct += usize::from(ok);
                records.push(McqRecord {
                    subset: sub.name.clone(),
                    id: it.id.clone(),
                    prompt: text,
                    completion,
                    logliks,
                    extracted,
                    answer: it.answer.clone(),
                    correct: ok,
                });
            }
            done += chunk.len();
            if !(opts.progress)(done, total) {
                return Err(EvalError::Cancelled);
            }
        }
        let n = sub.val.len();
        rows.push(ReportRow {
            model: model.clone(),
            dataset: "general_mcq".into(),
            metric: "AverageAccuracy".into(),
            subset: sub.name.clone(),
            num: n,
            score: if n == 0 { 0.0 } else { correct as f64 / n as f64 },
            cat0: "default".into(),
        });
    }
    Ok((rows, records))
}

/// Report rows of general_qa scores for one subset (one row per metric).
pub fn qa_rows(model: &str, subset: &str, scores: &[PairScores]) -> Vec<ReportRow> {
    mean_scores(scores)
        .into_iter()
        .map(|(metric, num, score)| ReportRow {
            model: model.to_string(),
            dataset: "general_qa".into(),
            metric: metric.into(),
            subset: subset.into(),
            num,
            score,
            cat0: "default".into(),
        })
        .collect()
}

/// Run general_qa on every selected subset of `dir`: generate, then BLEU/ROUGE against `response`.
pub fn run_qa(
    dir: &Path,
    opts: RunOptions<'_>,
    predictor: &mut dyn Predictor,
) -> Result<(Vec<ReportRow>, Vec<QaRecord>), EvalError> {
    let subsets = subsets_or(list_qa_subsets(dir)?, &opts.subsets, dir)?;
    let mut loaded = Vec::new();
    for s in &subsets {
        let mut items = load_qa_jsonl(&dir.join(format!("{s}.jsonl")))?;
        if let Some(l) = opts.limit {
            items.truncate(l);
        }
        loaded.push((s.clone(), items));
    }
    let total: usize = loaded.iter().map(|(_, v)| v.len()).sum();
    let model = predictor.name();
    let (mut rows, mut records, mut done) = (Vec::new(), Vec::new(), 0);
    for (subset, items) in &loaded {
        let mut scores = Vec::new();
        for chunk in items.chunks(opts.batch_size.max(1)) {
            let prompts: Vec<Prompt> = chunk
                .iter()
                .map(|it| Prompt { messages: it.messages.clone(), assistant_prefix: String::new() })
                .collect();
            let outs = predictor.generate(&prompts).map_err(predict_err)?;
            if outs.len() != prompts.len() {
                return Err(EvalError::Predict(format!("{} completions for {} prompts", outs.len(), prompts.len())));
            }
            for (it, pred) in chunk.iter().zip(outs) {
                let s = score_pair(&pred, &it.reference);
                records.push(QaRecord {
                    subset: subset.clone(),
                    id: it.id.clone(),
                    messages: it.messages.clone(),
                    prediction: pred,
                    reference: it.reference.clone(),
                    scores: s.to_json(),
                });
                scores.push(s);
            }
            done += chunk.len();
            if !(opts.progress)(done, total) {
                return Err(EvalError::Cancelled);
            }
        }
        rows.extend(qa_rows(&model, subset, &scores));
    }
    Ok((rows, records))
}

/// One scored row of `pipeline eval score`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredPair {
    pub id: Value,
    pub scores: PairScores,
}

/// `pipeline eval score`: read `{"id", "prediction", "reference"}` rows from `input`, write
/// `{"id", "bleu-1", ..., "rouge-l-f"}` rows (ROUGE keys absent where evalscope gives none) to
/// `output` atomically, return the scores in input order.
pub fn score_jsonl(input: &Path, output: &Path) -> Result<Vec<ScoredPair>, DataError> {
    let text = crate::mcq::read_utf8(input)?;
    let mut out = Vec::new();
    let mut buf = String::new();
    for (k, line) in text.lines().enumerate() {
        let lineno = k + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| DataError::new(input, Some(lineno), format!("invalid JSON: {e}")))?;
        let field = |name: &str| -> Result<&str, DataError> {
            match v.get(name) {
                Some(Value::String(s)) => Ok(s),
                Some(Value::Null) | None => Err(DataError::new(input, Some(lineno), format!("missing `{name}`"))),
                Some(other) => {
                    Err(DataError::new(input, Some(lineno), format!("`{name}` must be a string, got {other}")))
                }
            }
        };
        let (p, r) = (field("prediction")?, field("reference")?);
        let id = v.get("id").cloned().unwrap_or_else(|| Value::from(lineno));
        let scores = score_pair(p, r);
        let mut row = Map::new();
        row.insert("id".into(), id.clone());
        row.extend(scores.to_json());
        buf.push_str(&Value::Object(row).to_string());
        buf.push('\n');
        out.push(ScoredPair { id, scores });
    }
    crate::report::write_atomic(output, buf.as_bytes())?;
    Ok(out)
}
