//! Built-in stage kinds that need no ML code: `files` (import local files as an artifact) and
//! `concat` (concatenate artifacts). `test-step` is a test-only kind for the engine's own tests
//! (sleep, fail, checkpoint, output independent of a param), registered only when the environment
//! has `PIPELINE_TEST_STAGES=1`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::stage::{Declared, PlanCtx, Registry, RunCtx, Stage, StageError};

/// Register the built-in kinds (and `test-step` when `PIPELINE_TEST_STAGES=1`).
pub fn register(r: &mut Registry) {
    r.register(Files);
    r.register(Concat);
    if std::env::var("PIPELINE_TEST_STAGES").as_deref() == Ok("1") {
        r.register(TestStep);
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<u64, StageError> {
    let meta = fs::metadata(from).map_err(|e| StageError::io(from, e))?;
    if meta.is_file() {
        fs::copy(from, to).map_err(|e| StageError::io(from, e))?;
        return Ok(1);
    }
    fs::create_dir_all(to).map_err(|e| StageError::io(to, e))?;
    let mut n = 0;
    for e in fs::read_dir(from).map_err(|e| StageError::io(from, e))? {
        let e = e.map_err(|e| StageError::io(from, e))?;
        n += copy_tree(&e.path(), &to.join(e.file_name()))?;
    }
    Ok(n)
}

/// Every file under `root`, sorted by relative path.
fn files_under(root: &Path) -> Result<Vec<PathBuf>, StageError> {
    let mut out = Vec::new();
    let meta = fs::metadata(root).map_err(|e| StageError::io(root, e))?;
    if meta.is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut names: Vec<PathBuf> =
        fs::read_dir(root).map_err(|e| StageError::io(root, e))?.flatten().map(|e| e.path()).collect();
    names.sort();
    for p in names {
        out.extend(files_under(&p)?);
    }
    Ok(out)
}

/// # `files`
/// **What it does:** imports local files or directories into the cache as one artifact.
/// **Inputs:** none. **Outputs:** `data` — each listed path copied under its file name.
/// **Parameters:** `paths` (list of paths, relative to the recipe's directory).
/// **Cache key:** the *content* of every listed file (not its path or mtime).
/// **Example:** `[stages.raw]` `kind = "files"` `params.paths = ["data/notes"]`.
pub struct Files;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesParams {
    paths: Vec<String>,
}

impl Stage for Files {
    fn kind(&self) -> &'static str {
        "files"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "import local files or directories as an artifact (their content enters the cache key)"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&[], &[])?;
        let p: FilesParams = ctx.params()?;
        if p.paths.is_empty() {
            return Err(StageError::Params("`paths` is empty; list at least one file or directory".into()));
        }
        let mut files = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for s in &p.paths {
            let path = ctx.resolve(s);
            if !path.exists() {
                return Err(StageError::Params(format!(
                    "for key `paths`: `{s}` does not exist (paths are relative to the recipe's directory)"
                )));
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !names.insert(name.clone()) {
                return Err(StageError::Params(format!("for key `paths`: two paths are named `{name}`")));
            }
            files.push(path);
        }
        Ok(Declared { outputs: vec!["data".into()], files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let p: FilesParams = ctx.params()?;
        let out = ctx.output("data")?;
        ctx.progress_start("copying", Some(p.paths.len() as u64));
        let mut n = 0;
        for (i, s) in p.paths.iter().enumerate() {
            ctx.check_cancelled()?;
            let src = ctx.resolve(s);
            let name = src.file_name().ok_or_else(|| StageError::failed(format!("`{s}` has no file name")))?;
            n += copy_tree(&src, &out.join(name))?;
            ctx.progress_set(i as u64 + 1);
        }
        ctx.progress_finish();
        ctx.set_report(serde_json::json!({ "files": n }));
        Ok(())
    }
}

/// # `concat`
/// **What it does:** concatenates every file of its input artifacts (in input order, then by
/// relative path) into one file.
/// **Inputs:** `parts` (one or more artifacts). **Outputs:** `data` with the file `file_name`.
/// **Parameters:** `file_name` (default `concat.txt`), `separator` (default empty; written between
/// files).
/// **Cache key:** params and the input digests.
/// **Example:** `inputs.parts = ["a.data", "b.data"]`.
pub struct Concat;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConcatParams {
    #[serde(default = "default_concat_name")]
    file_name: String,
    #[serde(default)]
    separator: String,
}
fn default_concat_name() -> String {
    "concat.txt".into()
}

impl Stage for Concat {
    fn kind(&self) -> &'static str {
        "concat"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "concatenate the files of one or more artifacts into one file"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&["parts"], &[])?;
        let p: ConcatParams = ctx.params()?;
        if p.file_name.is_empty() || p.file_name.contains(['/', '\\']) {
            return Err(StageError::Params(format!(
                "for key `file_name`: `{}` must be a plain file name",
                p.file_name
            )));
        }
        Ok(Declared { outputs: vec!["data".into()], files: vec![] })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let p: ConcatParams = ctx.params()?;
        let path = ctx.output("data")?.join(&p.file_name);
        let mut out = fs::File::create(&path).map_err(|e| StageError::io(&path, e))?;
        let mut files = Vec::new();
        for part in ctx.inputs("parts") {
            files.extend(files_under(part)?);
        }
        ctx.progress_start("concatenating", Some(files.len() as u64));
        let mut bytes = 0u64;
        for (i, f) in files.iter().enumerate() {
            ctx.check_cancelled()?;
            if i > 0 {
                out.write_all(p.separator.as_bytes()).map_err(|e| StageError::io(&path, e))?;
            }
            let b = fs::read(f).map_err(|e| StageError::io(f, e))?;
            bytes += b.len() as u64;
            out.write_all(&b).map_err(|e| StageError::io(&path, e))?;
            ctx.progress_set(i as u64 + 1);
        }
        ctx.progress_finish();
        ctx.set_report(serde_json::json!({ "files": files.len(), "bytes": bytes }));
        Ok(())
    }
}

/// Test-only kind (`PIPELINE_TEST_STAGES=1`). Output `data/out.txt` = `text` followed by the
/// content of every input file. `salt` enters the key but not the output (early cutoff);
/// `steps` × `step_ms` of cancellable work, checkpointed in the scratch dir when `checkpoint`;
/// `fail` makes it fail.
pub struct TestStep;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestParams {
    #[serde(default)]
    text: String,
    #[serde(default)]
    #[allow(dead_code)]
    salt: Option<toml::Value>,
    #[serde(default)]
    steps: u64,
    #[serde(default)]
    step_ms: u64,
    #[serde(default)]
    checkpoint: bool,
    #[serde(default)]
    fail: bool,
}

impl Stage for TestStep {
    fn kind(&self) -> &'static str {
        "test-step"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "(test only) write text plus inputs, optionally slowly, checkpointed or failing"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        let _: TestParams = ctx.params()?;
        Ok(Declared { outputs: vec!["data".into()], files: vec![] })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let p: TestParams = ctx.params()?;
        let ckpt = ctx.scratch_dir().join("step");
        let mut start = 0;
        if p.checkpoint {
            start = fs::read_to_string(&ckpt).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            if start > 0 {
                ctx.message(format!("resuming from checkpoint at step {start}"));
            }
        }
        let out = ctx.output("data")?.join("out.txt");
        // Write a partial output early: an interrupted run must never commit it.
        fs::write(&out, "partial").map_err(|e| StageError::io(&out, e))?;
        ctx.progress_start("working", Some(p.steps));
        for step in start..p.steps {
            ctx.check_cancelled()?;
            std::thread::sleep(std::time::Duration::from_millis(p.step_ms));
            if p.checkpoint {
                pipeline_cache::write_atomic(&ckpt, (step + 1).to_string().as_bytes())
                    .map_err(|e| StageError::io(&ckpt, e))?;
            }
            ctx.progress_set(step + 1);
            ctx.metric("step", step + 1, (step + 1) as f64);
        }
        ctx.progress_finish();
        if p.fail {
            return Err(StageError::failed("failing as asked (`fail = true`)"));
        }
        let mut text = p.text.clone();
        let names: Vec<String> = ctx.input_names().map(str::to_string).collect();
        for name in names {
            for part in ctx.inputs(&name) {
                for f in files_under(part)? {
                    text.push_str(&fs::read_to_string(&f).map_err(|e| StageError::io(&f, e))?);
                }
            }
        }
        fs::write(&out, &text).map_err(|e| StageError::io(&out, e))?;
        ctx.set_report(
            serde_json::json!({ "bytes": text.len(), "resumed_from": start, "device": ctx.option("device") }),
        );
        Ok(())
    }
}
