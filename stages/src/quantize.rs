//! # quantize
//!
//! ## What it does
//! Quantises a model's weights (ms-swift's `swift export --quant_method ... --quant_bits ...`).
//! `quant_method = "gguf"` writes a llama.cpp GGUF file of `gguf_type` with llama.cpp's
//! per-tensor choice (`pipeline_model::gguf::FileType`): Q4_K_M puts the output head and the
//! `use_more_bits` layers of `attn_v` / `ffn_down` in Q6_K and every other matrix in Q4_K, with
//! llama.cpp's fall-backs when a row is not a multiple of 256 (Q4_K → Q5_0, Q6_K → Q8_0); norms
//! and biases stay F32. The quantisers are llama.cpp's reference ones (Q8_0/Q4_0 byte-identical
//! to the PyPI `gguf` package's). A restricted vocabulary is expanded as `export` does.
//!
//! ## Inputs
//! `model` (optional when the `model` param is set): a model folder from an upstream stage, an
//! adapter folder, or an artifact holding one `.gguf` file.
//!
//! ## Outputs
//! `model`: `model.gguf` (the `evaluate` stage and `pipeline generate` load it). The report:
//! bytes on disk against the unquantised F32 size, bits per weight, tensors per ggml type.
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `quant_method` | required | `"gguf"` (`"bnb"`, `"hqq"` and `"eetq"` are not in this build: a plan-time error says so) |
//! | `gguf_type` | `"Q4_K_M"` | `"F16"`, `"BF16"`, `"Q8_0"`, `"Q4_0"` or `"Q4_K_M"` |
//! | `quant_bits` / `quantization_bit` | unset | ms-swift's bit count; for `gguf` the type sets the bits, so it must be unset |
//! | `model` | input `model` | HF folder, adapter folder or `.gguf` path (`${VAR}` expanded) |
//!
//! ## Cache key
//! Params, the `model` artifact, and the content of the `model` path when given as a param.
//!
//! ## Example
//! ```toml
//! [stages.quantize]
//! kind = "quantize"
//! inputs = { model = "align.model" }
//! params = { quant_method = "gguf", gguf_type = "Q4_K_M" }
//! ```

use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use pipeline_model::gguf::FileType;

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
    model: Option<String>,
}

/// The checked params.
struct Config {
    model: Option<String>,
    gguf_type: FileType,
}

const GGUF_TYPES: &str = "\"F16\", \"BF16\", \"Q8_0\", \"Q4_0\", \"Q4_K_M\"";

impl Params {
    fn parse(table: &toml::Table) -> Result<Config, StageError> {
        let p: Params = pipeline_engine::stage::parse_params(table)?;
        match p.quant_method {
            Method::Gguf => {}
            m @ (Method::Bnb | Method::Hqq | Method::Eetq) => {
                return Err(StageError::Params(format!(
                    "`quant_method = \"{}\"` is not built into this version of pipeline; use \"gguf\"",
                    format!("{m:?}").to_lowercase()
                )))
            }
        }
        if let Some(b) = p.quant_bits {
            return Err(StageError::Params(format!(
                "`quant_bits = {b}`: with quant_method = \"gguf\" the bits come from `gguf_type` ({GGUF_TYPES}); remove `quant_bits`"
            )));
        }
        let gguf_type = match p.gguf_type.as_deref() {
            None => FileType::Q4_K_M,
            Some(t) => match FileType::parse(t) {
                Some(FileType::F32) => {
                    return Err(StageError::Params(
                        "`gguf_type = \"F32\"` is not a quantisation; use the `export` stage with format = \"gguf\""
                            .into(),
                    ))
                }
                Some(ft) => ft,
                None => return Err(StageError::Params(format!("`gguf_type = \"{t}\"` is not one of {GGUF_TYPES}"))),
            },
        };
        Ok(Config { model: p.model, gguf_type })
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
        "Quantise a model's weights (GGUF F16/BF16/Q8_0/Q4_0/Q4_K_M with llama.cpp's per-tensor choice)"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&[], &["model"])?;
        let c = Params::parse(ctx.params)?;
        let files = training::declared_model_files(ctx, c.model.as_deref())?;
        Ok(Declared { outputs: vec!["model".into()], files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let c = Params::parse(ctx.raw_params())?;
        let src = training::model_path(ctx, c.model.as_deref())?;
        let loaded = crate::export::load_for_export(&src)?;
        let dir = ctx.output("model")?;
        let mut r = crate::export::write_gguf(&loaded.model, &dir.join("model.gguf"), c.gguf_type, ctx.stage_id())?;
        let params: usize = loaded.model.tensors.values().map(|t| t.numel()).sum();
        let f32_bytes = 4 * params as u64;
        r["quant_method"] = "gguf".into();
        r["f32_bytes"] = f32_bytes.into();
        if let Some(b) = r["bytes"].as_u64() {
            r["compression"] = ((f32_bytes as f64 / b as f64 * 100.0).round() / 100.0).into();
        }
        if let Some((from, to)) = loaded.model.expanded_vocab {
            r["vocab_rows"] = serde_json::json!({ "trained": from, "exported": to });
        }
        ctx.set_report(r);
        Ok(())
    }
}
