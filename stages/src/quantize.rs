//! # quantize
//!
//! ## What it does
//! Quantises a model's weights (ms-swift's `swift export --quant_method ... --quant_bits ...`).
//! - `quant_method = "gguf"` writes a llama.cpp GGUF file of `gguf_type` with llama.cpp's
//!   per-tensor choice (`pipeline_model::gguf::FileType`): Q4_K_M puts the output head and the
//!   `use_more_bits` layers of `attn_v` / `ffn_down` in Q6_K and every other matrix in Q4_K, with
//!   llama.cpp's fall-backs when a row is not a multiple of 256 (Q4_K → Q5_0, Q6_K → Q8_0); norms
//!   and biases stay F32. The quantisers are llama.cpp's reference ones (Q8_0/Q4_0 byte-identical
//!   to the PyPI `gguf` package's).
//! - `"bnb"`, `"hqq"`, `"eetq"` write an HF folder the way transformers' `save_pretrained` writes
//!   a model quantised with that library (`pipeline_model::quant`): bitsandbytes NF4/FP4 in
//!   blocks of 64 (double quantisation of the scales by default, as ms-swift) or LLM.int8(); HQQ
//!   with its half-quadratic zero solver; EETQ int8 per output channel. The layers' linear
//!   projections are quantised; embedding, `lm_head`, norms and biases are kept (transformers'
//!   rule for these methods).
//!
//! A restricted vocabulary is expanded as `export` does.
//!
//! ## Inputs
//! `model` (optional when the `model` param is set): a model folder from an upstream stage, an
//! adapter folder, or an artifact holding one `.gguf` file. `data` (optional): a canonical dataset
//! of held-out conversations, each rendered with the model's chat template (and its trained-with
//! system prompt) and cut at `max_length` tokens, on which the quality cost is measured.
//!
//! ## Outputs
//! `model`: `model.gguf`, or the quantised HF folder (the `evaluate` stage and `pipeline
//! generate` load both; the folder is dequantised at load). The report: bytes of the weights file
//! against the unquantised F32 size, bits per weight (and, for the folders, over the quantised
//! linears alone), and with a `data` input the quality cost as llama.cpp's `perplexity
//! --kl-divergence` scoreboard measures it: perplexity of the unquantised and the quantised model
//! over the same next tokens, and the mean KL divergence KL(P_f32 ‖ P_quantised) of the next-token
//! distributions (both models over the full vocabulary, the quantised one loaded back from what
//! was written, so the figures are the cost of the stored codes).
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `quant_method` | required | `"gguf"`, `"bnb"`, `"hqq"` or `"eetq"` |
//! | `quant_bits` / `quantization_bit` | unset | bnb: 4 or 8 (required); hqq: 8, 4, 3 or 2 (required); eetq: 8; gguf: must be unset (the type sets the bits) |
//! | `gguf_type` | `"Q4_K_M"` | gguf: `"F16"`, `"BF16"`, `"Q8_0"`, `"Q4_0"` or `"Q4_K_M"` |
//! | `bnb_4bit_quant_type` | `"nf4"` | bnb 4-bit: `"nf4"` or `"fp4"` |
//! | `bnb_4bit_use_double_quant` | `true` | bnb 4-bit: quantise the block scales again (8-bit, blocks of 256) |
//! | `bnb_4bit_compute_dtype` | `"float32"` | bnb 4-bit: recorded in `quantization_config` (`"float32"`, `"float16"`, `"bfloat16"`) |
//! | `group_size` | 64 | hqq: values per scale/zero (axis 0) |
//! | `model` | input `model` | HF folder, adapter folder or `.gguf` path (`${VAR}` expanded) |
//! | `max_length` | 256 | tokens per held-out conversation for the perplexity / KL figures |
//!
//! A setting of another method (e.g. `gguf_type` with `"bnb"`) is a plan-time error.
//!
//! ## Cache key
//! Params, the `model` artifact, and the content of the `model` path when given as a param.
//!
//! ## Example
//! ```toml
//! [stages.quantize]
//! kind = "quantize"
//! inputs = { model = "align.model" }
//! params = { quant_method = "bnb", quant_bits = 4, bnb_4bit_quant_type = "nf4" }
//! ```

use dfdx::prelude::Cpu;
use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use pipeline_model::chat::ChatTemplate;
use pipeline_model::export::ExportModel;
use pipeline_model::gguf::FileType;
use pipeline_model::{quant, Batch, Qwen2};

use crate::training;

pub(crate) struct Quantize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum Method {
    Gguf,
    Bnb,
    Hqq,
    Eetq,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    quant_method: Method,
    #[serde(default)]
    gguf_type: Option<String>,
    #[serde(default, alias = "quantization_bit")]
    quant_bits: Option<u32>,
    #[serde(default)]
    bnb_4bit_quant_type: Option<String>,
    #[serde(default)]
    bnb_4bit_use_double_quant: Option<bool>,
    #[serde(default)]
    bnb_4bit_compute_dtype: Option<String>,
    #[serde(default)]
    group_size: Option<usize>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default = "default_max_length")]
    max_length: usize,
}

fn default_max_length() -> usize {
    256
}

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Gguf(FileType),
    /// An HF folder quantised with bitsandbytes, EETQ or HQQ.
    Hf(quant::Method),
}

/// The checked params.
struct Config {
    model: Option<String>,
    target: Target,
    max_length: usize,
}

const GGUF_TYPES: &str = "\"F16\", \"BF16\", \"Q8_0\", \"Q4_0\", \"Q4_K_M\"";

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Gguf => "gguf",
        Method::Bnb => "bnb",
        Method::Hqq => "hqq",
        Method::Eetq => "eetq",
    }
}

impl Params {
    fn parse(table: &toml::Table) -> Result<Config, StageError> {
        let p: Params = pipeline_engine::stage::parse_params(table)?;
        let m = method_name(p.quant_method);
        let only = |key: &str, set: bool, for_method: &str| -> Result<(), StageError> {
            if set && m != for_method {
                return Err(StageError::Params(format!(
                    "`{key}` is a setting of quant_method = \"{for_method}\", not of \"{m}\"; remove it"
                )));
            }
            Ok(())
        };
        only("gguf_type", p.gguf_type.is_some(), "gguf")?;
        only("bnb_4bit_quant_type", p.bnb_4bit_quant_type.is_some(), "bnb")?;
        only("bnb_4bit_use_double_quant", p.bnb_4bit_use_double_quant.is_some(), "bnb")?;
        only("bnb_4bit_compute_dtype", p.bnb_4bit_compute_dtype.is_some(), "bnb")?;
        only("group_size", p.group_size.is_some(), "hqq")?;
        let target = match p.quant_method {
            Method::Gguf => {
                if let Some(b) = p.quant_bits {
                    return Err(StageError::Params(format!(
                        "`quant_bits = {b}`: with quant_method = \"gguf\" the bits come from `gguf_type` ({GGUF_TYPES}); remove `quant_bits`"
                    )));
                }
                Target::Gguf(match p.gguf_type.as_deref() {
                    None => FileType::Q4_K_M,
                    Some(t) => match FileType::parse(t) {
                        Some(FileType::F32) => {
                            return Err(StageError::Params(
                                "`gguf_type = \"F32\"` is not a quantisation; use the `export` stage with format = \"gguf\""
                                    .into(),
                            ))
                        }
                        Some(ft) => ft,
                        None => {
                            return Err(StageError::Params(format!("`gguf_type = \"{t}\"` is not one of {GGUF_TYPES}")))
                        }
                    },
                })
            }
            Method::Bnb => match p.quant_bits {
                Some(4) => {
                    let quant_type = match p.bnb_4bit_quant_type.as_deref() {
                        None => quant::bnb::QuantType::Nf4,
                        Some(t) => quant::bnb::QuantType::parse(t).ok_or_else(|| {
                            StageError::Params(format!(
                                "`bnb_4bit_quant_type = \"{t}\"` is not one of \"nf4\", \"fp4\""
                            ))
                        })?,
                    };
                    let compute_dtype = match p.bnb_4bit_compute_dtype.as_deref() {
                        None | Some("float32") => "float32",
                        Some("float16") => "float16",
                        Some("bfloat16") => "bfloat16",
                        Some(d) => {
                            return Err(StageError::Params(format!(
                            "`bnb_4bit_compute_dtype = \"{d}\"` is not one of \"float32\", \"float16\", \"bfloat16\""
                        )))
                        }
                    };
                    Target::Hf(quant::Method::Bnb4 {
                        quant_type,
                        double_quant: p.bnb_4bit_use_double_quant.unwrap_or(true),
                        compute_dtype,
                    })
                }
                Some(8) => {
                    for (key, set) in [
                        ("bnb_4bit_quant_type", p.bnb_4bit_quant_type.is_some()),
                        ("bnb_4bit_use_double_quant", p.bnb_4bit_use_double_quant.is_some()),
                        ("bnb_4bit_compute_dtype", p.bnb_4bit_compute_dtype.is_some()),
                    ] {
                        if set {
                            return Err(StageError::Params(format!(
                                "`{key}` is a 4-bit setting; with `quant_bits = 8` (LLM.int8()) remove it"
                            )));
                        }
                    }
                    Target::Hf(quant::Method::Bnb8)
                }
                other => return Err(bits_error("bnb", other, "4, 8")),
            },
            Method::Eetq => match p.quant_bits {
                None | Some(8) => Target::Hf(quant::Method::Eetq),
                other => return Err(bits_error("eetq", other, "8")),
            },
            Method::Hqq => match p.quant_bits {
                Some(bits @ (8 | 4 | 3 | 2)) => {
                    let group_size = p.group_size.unwrap_or(64);
                    if group_size == 0 {
                        return Err(StageError::Params(
                            "`group_size = 0` must be at least 1 (hqq's default is 64)".into(),
                        ));
                    }
                    Target::Hf(quant::Method::Hqq { nbits: bits, group_size })
                }
                other => return Err(bits_error("hqq", other, "8, 4, 3, 2")),
            },
        };
        if p.max_length < 2 {
            return Err(StageError::Params(format!("`max_length = {}` must be at least 2", p.max_length)));
        }
        Ok(Config { model: p.model, target, max_length: p.max_length })
    }
}

/// `quant_bits` missing or not one of `allowed` for `method`.
fn bits_error(method: &str, got: Option<u32>, allowed: &str) -> StageError {
    match got {
        None => StageError::Params(format!(
            "quant_method = \"{method}\" needs `quant_bits` (or `quantization_bit`): one of {allowed}"
        )),
        Some(b) => {
            StageError::Params(format!("`quant_bits = {b}` is not one of {allowed} for quant_method = \"{method}\""))
        }
    }
}

impl Stage for Quantize {
    fn kind(&self) -> &'static str {
        "quantize"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Quantise a model's weights (GGUF with llama.cpp's per-tensor choice; bitsandbytes nf4/fp4/int8, HQQ, EETQ folders)"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&[], &["model", "data"])?;
        let c = Params::parse(ctx.params)?;
        let files = training::declared_model_files(ctx, c.model.as_deref())?;
        Ok(Declared { outputs: vec!["model".into()], files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let c = Params::parse(ctx.raw_params())?;
        let src = training::model_path(ctx, c.model.as_deref())?;
        let loaded = crate::export::load_for_export(&src)?;
        let dir = ctx.output("model")?;
        let params: usize = loaded.model.tensors.values().map(|t| t.numel()).sum();
        let f32_bytes = 4 * params as u64;
        let (mut r, load_path) = match c.target {
            Target::Gguf(ft) => {
                let mut r = crate::export::write_gguf(&loaded.model, &dir.join("model.gguf"), ft, ctx.stage_id())?;
                r["quant_method"] = "gguf".into();
                (r, dir.join("model.gguf"))
            }
            Target::Hf(method) => (crate::export::write_hf_quantized(&loaded, dir, method)?, dir.to_path_buf()),
        };
        r["f32_bytes"] = f32_bytes.into();
        if let Some(b) = r["bytes"].as_u64() {
            r["compression"] = ((f32_bytes as f64 / b as f64 * 100.0).round() / 100.0).into();
        }
        if let Some((from, to)) = loaded.model.expanded_vocab {
            r["vocab_rows"] = serde_json::json!({ "trained": from, "exported": to });
        }
        if let Some(data) = ctx.input_opt("data") {
            let rows = crate::data::read_dataset(data)?;
            let q = crate::training::load(&load_path, &Cpu::default())?;
            r["quality"] = quality(&loaded.model, &q.model, &rows, c.max_length)?;
        }
        ctx.set_report(r);
        Ok(())
    }
}

/// log-softmax of one row of logits.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// Perplexity of the unquantised model `m` and of `quant`, and the mean KL(P_m ‖ P_quant), over
/// the next tokens of `rows` (module docs).
fn quality(
    m: &ExportModel,
    quant: &Qwen2<Cpu>,
    rows: &[crate::data::Sample],
    max_length: usize,
) -> Result<serde_json::Value, StageError> {
    let failed = |e: &dyn std::fmt::Display| StageError::failed(format!("perplexity: {e}"));
    let dev = Cpu::default();
    let base = Qwen2::<Cpu>::from_host(&m.config, &m.tensors, &dev).map_err(|e| failed(&e))?;
    let chat = ChatTemplate::from_tokenizer(&m.tokenizer).map_err(|e| failed(&e))?;
    let (mut nll_base, mut nll_quant, mut kl, mut n) = (0f64, 0f64, 0f64, 0usize);
    let mut texts = 0;
    for s in rows {
        let enc = chat.encode_chat(&m.tokenizer, &s.messages, m.system.as_deref()).map_err(|e| failed(&e))?;
        let ids: Vec<u32> = enc.ids.into_iter().take(max_length).collect();
        if ids.len() < 2 {
            continue;
        }
        texts += 1;
        let batch = Batch::new(ids.clone(), 1, ids.len()).map_err(|e| failed(&e))?;
        let a = base.forward(&batch).map_err(|e| failed(&e))?.as_vec();
        let b = quant.forward(&batch).map_err(|e| failed(&e))?.as_vec();
        let vocab = a.len() / ids.len();
        for pos in 0..ids.len() - 1 {
            let la = log_softmax(&a[pos * vocab..(pos + 1) * vocab]);
            let lb = log_softmax(&b[pos * vocab..(pos + 1) * vocab]);
            let next = ids[pos + 1] as usize;
            nll_base -= la[next];
            nll_quant -= lb[next];
            kl += la.iter().zip(&lb).map(|(x, y)| x.exp() * (x - y)).sum::<f64>();
            n += 1;
        }
    }
    if n == 0 {
        return Err(StageError::failed("perplexity: the `data` input has no conversation of 2 or more tokens"));
    }
    let round = |x: f64, d: i32| (x * 10f64.powi(d)).round() / 10f64.powi(d);
    let (ppl_base, ppl_quant) = ((nll_base / n as f64).exp(), (nll_quant / n as f64).exp());
    Ok(serde_json::json!({
        "texts": texts,
        "tokens": n,
        "perplexity_f32": round(ppl_base, 4),
        "perplexity": round(ppl_quant, 4),
        "delta_perplexity": round(ppl_quant - ppl_base, 4),
        "mean_kld": kl / n as f64,
    }))
}
