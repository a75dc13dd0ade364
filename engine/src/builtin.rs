//! Built-in stage kinds that need no ML code: `files` (import local files as an artifact) and
//! `concat` (concatenate artifacts). The engine's own behaviour tests (`engine/tests/engine/`)
//! register their test-only stages themselves; nothing here depends on the environment.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::stage::{Declared, PlanCtx, Registry, RunCtx, Stage, StageError};

/// Register the built-in kinds.
pub fn register(r: &mut Registry) {
    r.register(Files);
    r.register(Concat);
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
