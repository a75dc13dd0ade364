//! # collect
//!
//! ## What it does
//! Reads every dataset listed in `datasets`, recognises each row's format (SPECS.md §1: messages,
//! query-response with history, sharegpt in ms-swift's and LLaMA-Factory's spellings, alpaca,
//! multimodal, embedding pairs, sequence classification, KTO, DPO) and normalises it to the
//! canonical dataset (see [`crate::data`]). Self-cognition rows get `{{NAME}}` / `{{AUTHOR}}`
//! replaced (SPECS.md §2). A `#N` suffix samples N rows with ms-swift's semantics; the
//! concatenation is then shuffled with the recipe seed. A malformed row fails the stage with
//! `file:line: field ...`, or with `on_error = "quarantine"` goes to the quarantine artifact with
//! its reason; the report counts it. No row is ever dropped silently.
//!
//! Sources: `builtin:self-cognition`, `builtin:general-chat`, `builtin:corpus` (shipped in
//! `stages/assets/`), local `.jsonl` / `.json` (an array or one object per line) / `.csv` /
//! `.parquet` files, and directories (every data file inside, sorted; `.txt` / `.md` files become
//! one pretraining document each, in the `text` column).
//!
//! Memory: with `shuffle = false` and no `#N`, rows stream from the input to Parquet row groups.
//! Shuffling holds up to 256 MiB of rows in memory and spills the rest to scratch files, then
//! writes the seeded permutation bucket by bucket ([`crate::data::spill`]): bounded memory for any
//! input size, and the same output as an in-memory shuffle. `#N` sampling holds that one dataset's
//! rows while it samples.
//!
//! ## Inputs
//! None.
//!
//! ## Outputs
//! `data`: `data.parquet` (canonical rows). `quarantine`: `rows.jsonl`, one
//! `{source, path, line, field, reason, row}` per set-aside row (empty when none).
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `datasets` | required | list of `path-or-builtin[#N]` |
//! | `model_name`, `model_author` | unset | one string or a `[zh, en]` pair; required when a dataset uses the placeholders |
//! | `on_error` | `"fail"` | `"fail"` or `"quarantine"` |
//! | `shuffle` | `true` | shuffle the concatenation (seeded) |
//! | `seed` | recipe seed | overrides the recipe seed |
//! | `text_extensions` | `["txt", "md"]` | files in directories read as documents |
//!
//! ## Cache key
//! Params, the recipe seed, and the content of every local file listed (declared as files).
//!
//! ## Example
//! ```toml
//! [stages.collect]
//! kind = "collect"
//! params = { datasets = ["builtin:self-cognition#200", "data/alpaca.jsonl#100"], model_name = ["小派", "Pipo"], model_author = ["派派", "Pipeline"] }
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::data::formats::{normalise_row, Format, RowError};
use crate::data::spill::{ShuffleBuffer, SPILL_BYTES};
use crate::data::text::guess_language;
use crate::data::{write_jsonl, DatasetWriter, Sample};

pub(crate) const SELF_COGNITION: &str = include_str!("../assets/self_cognition.jsonl");
pub(crate) const GENERAL_CHAT: &str = include_str!("../assets/general_chat.jsonl");
pub(crate) const CORPUS: &str = include_str!("../assets/corpus.txt");

pub(crate) struct Collect;

/// One value or a `[zh, en]` pair.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub(crate) enum ZhEn {
    One(String),
    Pair([String; 2]),
}

impl ZhEn {
    fn pick(&self, zh: bool) -> &str {
        match self {
            ZhEn::One(s) => s,
            ZhEn::Pair([a, b]) => {
                if zh {
                    a
                } else {
                    b
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnError {
    #[default]
    Fail,
    Quarantine,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    datasets: Vec<String>,
    #[serde(default)]
    model_name: Option<ZhEn>,
    #[serde(default)]
    model_author: Option<ZhEn>,
    #[serde(default)]
    on_error: OnError,
    #[serde(default = "yes")]
    shuffle: bool,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default = "default_exts")]
    text_extensions: Vec<String>,
}

fn yes() -> bool {
    true
}
fn default_exts() -> Vec<String> {
    vec!["txt".into(), "md".into()]
}

/// A dataset spec: `name#N`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Spec {
    pub name: String,
    pub count: Option<usize>,
}

/// The most rows a `name#N` spec may ask for (its row index alone takes 16 bytes a row).
const MAX_SAMPLE_ROWS: usize = 100_000_000;

fn human_bytes(b: f64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

pub(crate) fn parse_spec(s: &str) -> Result<Spec, StageError> {
    if let Some((name, n)) = s.rsplit_once('#') {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            let count: usize =
                n.parse().map_err(|_| StageError::Params(format!("dataset `{s}`: bad sample count `{n}`")))?;
            // Regression (issue 14, defect 6): `#999999999999` tried to allocate a 16 TB row index
            // and aborted the process.
            if count > MAX_SAMPLE_ROWS {
                return Err(StageError::Params(format!(
                    "dataset `{s}`: {count} rows need at least {} of memory for the sample's row index alone; at most {MAX_SAMPLE_ROWS} rows can be sampled",
                    human_bytes(count as f64 * 16.0)
                )));
            }
            return Ok(Spec { name: name.to_string(), count: Some(count) });
        }
    }
    if s.is_empty() {
        return Err(StageError::Params("empty dataset spec".into()));
    }
    Ok(Spec { name: s.to_string(), count: None })
}

const BUILTINS: [&str; 3] = ["builtin:self-cognition", "builtin:general-chat", "builtin:corpus"];

impl Stage for Collect {
    fn kind(&self) -> &'static str {
        "collect"
    }
    fn version(&self) -> u32 {
        // 2: quarantine rows name their file relative to the recipe, not by absolute path.
        // 3: ms-swift's `positive_messages` (embedding rows) is read as the pair's second text.
        3
    }
    fn summary(&self) -> &'static str {
        "Read local datasets and builtins in any ms-swift/LLaMA-Factory format into canonical Parquet rows"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&[], &[])?;
        let p: Params = ctx.params()?;
        if p.datasets.is_empty() {
            return Err(StageError::Params("`datasets` is empty".into()));
        }
        let mut files = Vec::new();
        for d in &p.datasets {
            let spec = parse_spec(d)?;
            if spec.name.starts_with("builtin:") {
                if !BUILTINS.contains(&spec.name.as_str()) {
                    return Err(StageError::Params(format!(
                        "unknown builtin dataset `{}`; known: {}",
                        spec.name,
                        BUILTINS.join(", ")
                    )));
                }
                if spec.name == "builtin:self-cognition" && (p.model_name.is_none() || p.model_author.is_none()) {
                    return Err(StageError::Params(
                        "`builtin:self-cognition` needs params `model_name` and `model_author`".into(),
                    ));
                }
            } else {
                let path = ctx.resolve(&spec.name);
                // Issue 14, defect 9: a missing dataset was found only at run time, after other
                // stages ran; it is a recipe error now, as for the `files` kind.
                if !path.exists() {
                    return Err(StageError::Params(format!(
                        "dataset `{}` not found: {} does not exist (neither a file nor a directory)",
                        spec.name,
                        path.display()
                    )));
                }
                files.push(path);
            }
        }
        Ok(Declared { outputs: vec!["data".into(), "quarantine".into()], files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let p: Params = ctx.params()?;
        let t0 = Instant::now();
        let seed = p.seed.unwrap_or(ctx.seed());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let out = ctx.output("data")?;
        let qdir = ctx.output("quarantine")?;
        std::fs::create_dir_all(qdir).map_err(|e| StageError::io(qdir, e))?;
        let mut writer = DatasetWriter::create(out)?;
        // Rows to sample or shuffle: in memory up to a budget, then spilled to scratch files.
        let mut held = ShuffleBuffer::new(&ctx.scratch_dir().join("collect-shuffle"), SPILL_BYTES);
        let mut quarantine: Vec<Value> = Vec::new();
        let mut per_dataset = Vec::new();
        let stream = !p.shuffle && p.datasets.iter().all(|d| parse_spec(d).map(|s| s.count.is_none()).unwrap_or(false));
        ctx.progress_start("collect", Some(p.datasets.len() as u64));
        for (di, d) in p.datasets.iter().enumerate() {
            ctx.check_cancelled()?;
            let spec = parse_spec(d)?;
            let mut st = SourceStats::default();
            let mut rows: Vec<Sample> = Vec::new();
            {
                let mut emit = |r: RowOutcome| -> Result<(), StageError> {
                    match r {
                        RowOutcome::Ok(fmt, s) => {
                            *st.formats.entry(fmt.name()).or_default() += 1;
                            st.rows_read += 1;
                            if stream {
                                writer.push(s)?;
                            } else if spec.count.is_none() {
                                held.push(s)?;
                            } else {
                                rows.push(s);
                            }
                        }
                        RowOutcome::Bad { path, line, error, raw } => {
                            if p.on_error == OnError::Fail {
                                return Err(StageError::input(path, line, error));
                            }
                            st.quarantined += 1;
                            // Relative to the recipe (issue 14, defect 5): an absolute path made
                            // the artifact's digest depend on where the project lives.
                            let shown = path.strip_prefix(ctx.recipe_dir()).unwrap_or(&path);
                            let shown: Vec<String> =
                                shown.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
                            quarantine.push(serde_json::json!({
                                "source": spec.name, "path": shown.join("/"), "line": line,
                                "field": error.field, "reason": error.message, "row": raw,
                            }));
                        }
                    }
                    Ok(())
                };
                let loader = Loader { ctx, params: &p, spec: &spec };
                loader.load(&mut emit)?;
            }
            match spec.count {
                Some(n) if !stream => {
                    rows = sample_n(rows, n, &mut rng);
                    st.rows_out = rows.len();
                    held.extend(rows)?;
                }
                _ => st.rows_out = st.rows_read,
            }
            if st.rows_read == 0 && st.quarantined == 0 {
                // Issue 14, defect 8: an empty dataset gave 0 rows without a word.
                ctx.message(format!("warning: dataset `{d}` has no rows"));
            }
            per_dataset.push(serde_json::json!({
                "dataset": d, "rows_read": st.rows_read, "rows_out": st.rows_out,
                "quarantined": st.quarantined, "formats": st.formats,
            }));
            ctx.progress_set(di as u64 + 1);
        }
        ctx.progress_finish();
        held.finish_into(&mut writer, p.shuffle, &mut rng)?;
        let rows_out = writer.finish()?;
        write_jsonl(&qdir.join("rows.jsonl"), &quarantine)?;
        if !quarantine.is_empty() {
            ctx.message(format!("{} malformed row(s) set aside in the quarantine artifact", quarantine.len()));
        }
        ctx.set_report(serde_json::json!({
            "rows_out": rows_out,
            "quarantined": quarantine.len(),
            "datasets": per_dataset,
            "seed": seed,
            "elapsed_ms": crate::data::ms_since(t0),
        }));
        Ok(())
    }
}

#[derive(Default)]
struct SourceStats {
    rows_read: usize,
    rows_out: usize,
    quarantined: usize,
    formats: BTreeMap<&'static str, usize>,
}

enum RowOutcome {
    Ok(Format, Sample),
    Bad { path: PathBuf, line: Option<usize>, error: RowError, raw: String },
}

/// ms-swift's `#N`: N < len → a seeded permutation's first N; N ≥ len → every row N / len times
/// plus N % len rows drawn without replacement. Repeats get `:r<k>` id suffixes.
pub(crate) fn sample_n(rows: Vec<Sample>, n: usize, rng: &mut ChaCha8Rng) -> Vec<Sample> {
    let len = rows.len();
    if len == 0 {
        return rows;
    }
    let mut idx: Vec<usize> = (0..len).collect();
    let mut picked = Vec::with_capacity(n);
    for k in 0..n / len {
        picked.extend(idx.iter().map(|&i| (i, k)));
    }
    idx.shuffle(rng);
    picked.extend(idx[..n % len].iter().map(|&i| (i, n / len)));
    picked
        .into_iter()
        .map(|(i, k)| {
            let mut s = rows[i].clone();
            if k > 0 {
                s.id = format!("{}:r{k}", s.id);
            }
            s
        })
        .collect()
}

struct Loader<'a> {
    ctx: &'a RunCtx,
    params: &'a Params,
    spec: &'a Spec,
}

type Emit<'e> = dyn FnMut(RowOutcome) -> Result<(), StageError> + 'e;

impl Loader<'_> {
    /// Every row of the dataset, good or bad, to `emit`. Ctrl-C is checked before each row (an
    /// atomic load): every format stops within one row, however long the rows are.
    fn load(&self, emit: &mut Emit<'_>) -> Result<(), StageError> {
        let mut checked = |r: RowOutcome| -> Result<(), StageError> {
            self.ctx.check_cancelled()?;
            emit(r)
        };
        self.load_rows(&mut checked)
    }

    fn load_rows(&self, emit: &mut Emit<'_>) -> Result<(), StageError> {
        let name = &self.spec.name;
        match name.as_str() {
            "builtin:self-cognition" => {
                self.jsonl_str(SELF_COGNITION, Path::new("stages/assets/self_cognition.jsonl"), emit)
            }
            "builtin:general-chat" => self.jsonl_str(GENERAL_CHAT, Path::new("stages/assets/general_chat.jsonl"), emit),
            "builtin:corpus" => {
                for (i, doc) in CORPUS.split("\n\n").map(str::trim).filter(|d| !d.is_empty()).enumerate() {
                    let s = Sample {
                        id: format!("{name}:{}", i + 1),
                        source: name.clone(),
                        text: Some(doc.into()),
                        ..Default::default()
                    };
                    emit(RowOutcome::Ok(Format::Text, s))?;
                }
                Ok(())
            }
            _ => {
                let path = self.ctx.resolve(name);
                if path.is_dir() {
                    let mut files = Vec::new();
                    walk(&path, &mut files)?;
                    files.sort();
                    for f in files {
                        self.ctx.check_cancelled()?;
                        let rel = f.strip_prefix(&path).unwrap_or(&f).to_string_lossy().replace('\\', "/");
                        let ext = ext_of(&f);
                        if self.params.text_extensions.iter().any(|e| e.eq_ignore_ascii_case(&ext)) {
                            let text = std::fs::read_to_string(&f).map_err(|e| StageError::io(&f, e))?;
                            let s = Sample {
                                id: format!("{name}:{rel}"),
                                source: name.clone(),
                                text: Some(text),
                                ..Default::default()
                            };
                            emit(RowOutcome::Ok(Format::Text, s))?;
                        } else if matches!(ext.as_str(), "jsonl" | "json" | "csv" | "parquet") {
                            self.file(&f, &format!("{name}/{rel}"), emit)?;
                        }
                    }
                    Ok(())
                } else if path.is_file() {
                    self.file(&path, name, emit)
                } else {
                    Err(StageError::input(&path, None, "dataset not found (neither a file, a directory nor a builtin)"))
                }
            }
        }
    }

    fn file(&self, path: &Path, id_prefix: &str, emit: &mut Emit<'_>) -> Result<(), StageError> {
        match ext_of(path).as_str() {
            "jsonl" => {
                let f = std::fs::File::open(path).map_err(|e| StageError::io(path, e))?;
                self.jsonl(BufReader::with_capacity(1 << 20, f), path, id_prefix, emit)
            }
            "json" => {
                let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
                if text.trim_start().starts_with('[') {
                    self.json_array(&text, path, id_prefix, emit)
                } else {
                    self.jsonl(text.as_bytes(), path, id_prefix, emit)
                }
            }
            "csv" => self.csv(path, id_prefix, emit),
            "parquet" => self.parquet(path, id_prefix, emit),
            other => Err(StageError::input(
                path,
                None,
                format!("unsupported file type `.{other}` (expected jsonl, json, csv, parquet)"),
            )),
        }
    }

    fn jsonl_str(&self, text: &str, path: &Path, emit: &mut Emit<'_>) -> Result<(), StageError> {
        self.jsonl(text.as_bytes(), path, &self.spec.name, emit)
    }

    fn jsonl(&self, mut r: impl BufRead, path: &Path, id_prefix: &str, emit: &mut Emit<'_>) -> Result<(), StageError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let mut bytes = Vec::new();
        let mut no = 0usize;
        loop {
            bytes.clear();
            let n = r.read_until(b'\n', &mut bytes).map_err(|e| StageError::io(path, e))?;
            if n == 0 {
                return Ok(());
            }
            no += 1;
            // Regression (issue 14, defect 8): invalid UTF-8 failed the whole file without a line
            // number, whatever `on_error` said; it is now a bad row of its line.
            let line = match std::str::from_utf8(&bytes) {
                Ok(l) => l,
                Err(e) => {
                    emit(RowOutcome::Bad {
                        path: path.to_path_buf(),
                        line: Some(no),
                        error: RowError {
                            field: "(json)".into(),
                            message: format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1),
                        },
                        raw: String::from_utf8_lossy(&bytes).trim().to_string(),
                    })?;
                    continue;
                }
            };
            // A byte-order mark on the first line (Windows editors write one) is not data.
            let line = if no == 1 { line.strip_prefix('\u{feff}').unwrap_or(line) } else { line };
            let t = line.trim();
            if t.is_empty() {
                continue;
            }
            let parsed: Result<Map<String, Value>, _> = serde_json::from_str(t);
            let out = match parsed {
                Ok(obj) => self.row(&obj, base, path, no, id_prefix, || t.to_string()),
                Err(e) => RowOutcome::Bad {
                    path: path.to_path_buf(),
                    line: Some(no),
                    error: RowError { field: "(json)".into(), message: format!("invalid JSON object: {e}") },
                    raw: t.to_string(),
                },
            };
            emit(out)?;
        }
    }

    fn json_array(&self, text: &str, path: &Path, id_prefix: &str, emit: &mut Emit<'_>) -> Result<(), StageError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let items = split_json_array(text)
            .map_err(|(line, msg)| StageError::input(path, Some(line), format!("field `(json)`: {msg}")))?;
        let mut line_no = 1usize;
        let mut last = 0usize;
        for (start, end) in items {
            line_no += text.as_bytes()[last..start].iter().filter(|&&b| b == b'\n').count();
            last = start;
            let raw = &text[start..end];
            let out = match serde_json::from_str::<Map<String, Value>>(raw) {
                Ok(obj) => self.row(&obj, base, path, line_no, id_prefix, || raw.to_string()),
                Err(e) => RowOutcome::Bad {
                    path: path.to_path_buf(),
                    line: Some(line_no),
                    error: RowError { field: "(json)".into(), message: format!("expected a JSON object: {e}") },
                    raw: raw.to_string(),
                },
            };
            emit(out)?;
        }
        Ok(())
    }

    fn csv(&self, path: &Path, id_prefix: &str, emit: &mut Emit<'_>) -> Result<(), StageError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let mut rdr =
            csv::ReaderBuilder::new().flexible(false).from_path(path).map_err(|e| StageError::input(path, None, e))?;
        let headers = rdr.headers().map_err(|e| StageError::input(path, Some(1), e))?.clone();
        for rec in rdr.records() {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    let line = e.position().map(|p| p.line() as usize);
                    emit(RowOutcome::Bad {
                        path: path.to_path_buf(),
                        line,
                        error: RowError { field: "(csv)".into(), message: e.to_string() },
                        raw: String::new(),
                    })?;
                    continue;
                }
            };
            let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
            let mut obj = Map::new();
            for (h, v) in headers.iter().zip(rec.iter()) {
                if v.is_empty() {
                    continue;
                }
                let value = match h {
                    "label" | "label2" => csv_label(v),
                    "history" | "messages" | "conversations" | "conversation" | "images" | "audios" | "videos" => {
                        serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()))
                    }
                    _ => Value::String(v.to_string()),
                };
                obj.insert(h.to_string(), value);
            }
            let raw = rec.iter().collect::<Vec<_>>().join(",");
            let out = self.row(&obj, base, path, line, id_prefix, || raw);
            emit(out)?;
        }
        Ok(())
    }

    fn parquet(&self, path: &Path, id_prefix: &str, emit: &mut Emit<'_>) -> Result<(), StageError> {
        use polars::prelude::*;
        let base = path.parent().unwrap_or(Path::new("."));
        let bytes = crate::data::ParquetBytes::open(path)?;
        let df = bytes.reader().finish().map_err(|e| StageError::input(path, None, e))?;
        let cols = df.columns();
        for i in 0..df.height() {
            let mut obj = Map::new();
            for c in cols {
                let v = c.get(i).map_err(|e| StageError::input(path, Some(i + 1), e))?;
                let v = any_to_json(&v);
                if !v.is_null() {
                    obj.insert(c.name().to_string(), v);
                }
            }
            // Canonical files store typed labels as text plus a type column.
            for (k, ty) in [("label", "label_type"), ("label2", "label2_type")] {
                if let (Some(Value::String(t)), Some(Value::String(ty))) = (obj.get(k), obj.get(ty)) {
                    if let Some(l) = crate::data::Label::parse(t, ty) {
                        let v = serde_json::to_value(l).map_err(|e| StageError::input(path, Some(i + 1), e))?;
                        obj.insert(k.to_string(), v);
                    }
                }
            }
            let out = self.row(&obj, base, path, i + 1, id_prefix, || Value::Object(obj.clone()).to_string());
            emit(out)?;
        }
        Ok(())
    }

    fn row(
        &self,
        obj: &Map<String, Value>,
        base: &Path,
        path: &Path,
        line: usize,
        id_prefix: &str,
        raw: impl FnOnce() -> String,
    ) -> RowOutcome {
        let res = normalise_row(obj, base).and_then(|(f, mut s)| {
            let zh_tag = obj.get("tag").and_then(Value::as_str).map(|t| t == "zh");
            substitute(&mut s, zh_tag, self.params)?;
            Ok((f, s))
        });
        match res {
            Ok((f, mut s)) => {
                s.id = format!("{id_prefix}:{line}");
                s.source = self.spec.name.clone();
                RowOutcome::Ok(f, s)
            }
            Err(error) => RowOutcome::Bad { path: path.to_path_buf(), line: Some(line), error, raw: raw() },
        }
    }
}

/// `{{NAME}}` / `{{AUTHOR}}` (and LLaMA-Factory's `{{name}}` / `{{author}}`) → the configured
/// values; zh rows (by `tag`, else by script) take the first of a pair.
fn substitute(s: &mut Sample, zh_tag: Option<bool>, p: &Params) -> Result<(), RowError> {
    let has = |t: &str| {
        t.contains("{{NAME}}") || t.contains("{{AUTHOR}}") || t.contains("{{name}}") || t.contains("{{author}}")
    };
    if !s.texts().any(has) {
        return Ok(());
    }
    let zh = zh_tag.unwrap_or_else(|| guess_language(&s.joined_text()).is_some_and(|(l, _)| l == "zh"));
    let (Some(name), Some(author)) = (&p.model_name, &p.model_author) else {
        return Err(RowError {
            field: "(self-cognition)".into(),
            message: "row uses {{NAME}}/{{AUTHOR}} but params `model_name` and `model_author` are not both set".into(),
        });
    };
    let (name, author) = (name.pick(zh), author.pick(zh));
    for t in s.texts_mut() {
        if has(t) {
            *t = t
                .replace("{{NAME}}", name)
                .replace("{{name}}", name)
                .replace("{{AUTHOR}}", author)
                .replace("{{author}}", author);
        }
    }
    Ok(())
}

fn csv_label(v: &str) -> Value {
    match v {
        "true" | "True" => Value::Bool(true),
        "false" | "False" => Value::Bool(false),
        _ => {
            if let Ok(i) = v.parse::<i64>() {
                Value::from(i)
            } else if let Ok(f) = v.parse::<f64>() {
                Value::from(f)
            } else {
                Value::String(v.to_string())
            }
        }
    }
}

fn any_to_json(v: &polars::prelude::AnyValue<'_>) -> Value {
    use polars::prelude::AnyValue as A;
    match v {
        A::Null => Value::Null,
        A::Boolean(b) => Value::Bool(*b),
        A::String(s) => Value::String(s.to_string()),
        A::StringOwned(s) => Value::String(s.to_string()),
        A::Int8(x) => Value::from(*x),
        A::Int16(x) => Value::from(*x),
        A::Int32(x) => Value::from(*x),
        A::Int64(x) => Value::from(*x),
        A::UInt8(x) => Value::from(*x),
        A::UInt16(x) => Value::from(*x),
        A::UInt32(x) => Value::from(*x),
        A::UInt64(x) => Value::from(*x),
        A::Float32(x) => Value::from(*x as f64),
        A::Float64(x) => Value::from(*x),
        A::List(s) => Value::Array(s.iter().map(|x| any_to_json(&x)).collect()),
        A::StructOwned(b) => {
            let (vals, fields) = &**b;
            Value::Object(fields.iter().zip(vals).map(|(f, v)| (f.name().to_string(), any_to_json(v))).collect())
        }
        A::Struct(..) => any_to_json(&v.clone().into_static()),
        other => Value::String(other.to_string()),
    }
}

/// Byte ranges of the top-level elements of a JSON array (a scanner that tracks strings and
/// nesting; each element is parsed separately so errors name its line). Err: (line, message).
fn split_json_array(text: &str) -> Result<Vec<(usize, usize)>, (usize, String)> {
    let b = text.as_bytes();
    let line_at = |i: usize| b[..i.min(b.len())].iter().filter(|&&c| c == b'\n').count() + 1;
    let mut i = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    if b.get(i) != Some(&b'[') {
        return Err((line_at(i), "expected a JSON array".into()));
    }
    i += 1;
    let mut out = Vec::new();
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    let mut start: Option<usize> = None;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else {
            match c {
                b'"' => {
                    in_str = true;
                    start.get_or_insert(i);
                }
                b'{' | b'[' => {
                    depth += 1;
                    start.get_or_insert(i);
                }
                b'}' | b']' if depth > 0 => depth -= 1,
                b']' => {
                    if let Some(s) = start.take() {
                        out.push((s, i));
                    }
                    let rest = &text[i + 1..];
                    if !rest.trim().is_empty() {
                        return Err((line_at(i + 1), "trailing characters after the JSON array".into()));
                    }
                    return Ok(out.into_iter().map(|(s, e)| (s, s + text[s..e].trim_end().len())).collect());
                }
                b',' if depth == 0 => match start.take() {
                    Some(s) => out.push((s, i)),
                    None => return Err((line_at(i), "empty array element".into())),
                },
                c if c.is_ascii_whitespace() => {}
                _ => {
                    start.get_or_insert(i);
                }
            }
        }
        i += 1;
    }
    Err((line_at(b.len()), "unterminated JSON array".into()))
}

fn ext_of(p: &Path) -> String {
    p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), StageError> {
    for entry in std::fs::read_dir(dir).map_err(|e| StageError::io(dir, e))? {
        let entry = entry.map_err(|e| StageError::io(dir, e))?;
        let p = entry.path();
        if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str) -> Sample {
        Sample { id: id.into(), ..Default::default() }
    }

    #[test]
    fn sample_count_semantics() {
        let rows: Vec<_> = (0..4).map(|i| s(&i.to_string())).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let two = sample_n(rows.clone(), 2, &mut rng);
        assert_eq!(two.len(), 2);
        assert_ne!(two[0].id, two[1].id);
        let ten = sample_n(rows, 10, &mut rng);
        assert_eq!(ten.len(), 10);
        for i in 0..4 {
            let n = ten.iter().filter(|x| x.id.split(':').next() == Some(&i.to_string())).count();
            assert!(n == 2 || n == 3, "row {i} appears {n} times");
        }
        assert_eq!(ten.iter().filter(|x| x.id.ends_with(":r2")).count(), 2);
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(parse_spec("a.jsonl#12").unwrap(), Spec { name: "a.jsonl".into(), count: Some(12) });
        assert_eq!(parse_spec("dir/#x").unwrap(), Spec { name: "dir/#x".into(), count: None });
    }

    /// Regression (issue 14, defect 7): the data stages checked Ctrl-C every 65,536 JSONL lines
    /// (about a second at 3.7 KB rows, minutes with long rows, and never inside a CSV, JSON array
    /// or Parquet file); collect now stops at the row after it, whatever the format.
    #[test]
    fn collect_notices_ctrl_c_within_a_row() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let lines: String = (0..200).map(|i| format!("{{\"text\": \"row {i}\"}}\n")).collect();
        std::fs::write(dir.path().join("rows.jsonl"), &lines).unwrap();
        let csv: String = std::iter::once("text\n".to_string()).chain((0..200).map(|i| format!("row {i}\n"))).collect();
        std::fs::write(dir.path().join("rows.csv"), csv).unwrap();
        for name in ["rows.jsonl", "rows.csv", "builtin:self-cognition"] {
            let cancel = Arc::new(AtomicBool::new(false));
            let params: toml::Table = toml::from_str(&format!("datasets = [{name:?}]")).unwrap();
            let ctx = RunCtx::new(pipeline_engine::RunParts {
                stage_id: "collect".into(),
                params,
                seed: 1,
                recipe_dir: dir.path().to_path_buf(),
                inputs: BTreeMap::new(),
                outputs: BTreeMap::new(),
                scratch: dir.path().join("scratch"),
                sink: Arc::new(pipeline_engine::NullSink),
                cancel: cancel.clone(),
            });
            let p: Params = ctx.params().unwrap();
            let spec = parse_spec(name).unwrap();
            let mut seen = 0usize;
            let mut emit = |_: RowOutcome| -> Result<(), StageError> {
                seen += 1;
                if seen == 3 {
                    cancel.store(true, Ordering::Relaxed);
                }
                Ok(())
            };
            let r = Loader { ctx: &ctx, params: &p, spec: &spec }.load(&mut emit);
            assert!(matches!(r, Err(StageError::Cancelled)), "{name}: {r:?}");
            assert_eq!(seen, 3, "{name}: rows emitted after Ctrl-C");
        }
    }

    #[cfg(test)]
    mod absurd_sizes {
        /// Regression (issue 14, defect 6): `dataset#999999999999` aborted on a 16 TB allocation.
        #[test]
        fn absurd_sample_count_is_a_params_error_with_the_estimate() {
            let e = super::parse_spec("data.jsonl#999999999999").unwrap_err().to_string();
            assert!(e.contains("999999999999 rows need at least 16.0 TB"), "{e}");
            assert!(e.contains("at most 100000000 rows"), "{e}");
            assert_eq!(super::parse_spec("d.jsonl#500").unwrap().count, Some(500));
        }
    }
}
