//! Helpers shared by the subcommands: cache-dir resolution, recipe loading, exit codes, formatting.

use std::path::{Path, PathBuf};

use pipeline_cache::Store;
use pipeline_engine::{Plan, Registry};
use pipeline_model::pretrained::ModelSource;

/// Exit codes: 0 ok, 1 a stage failed, 2 usage or recipe error.
#[derive(Debug)]
pub struct Exit(pub u8);
impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}
impl std::error::Error for Exit {}

/// A usage error (exit 2), already phrased for the user.
#[derive(Debug)]
pub struct Usage(pub String);
impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

/// `--cache-dir`, shared by every subcommand that touches the cache.
#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    /// Cache directory [default: `.pipeline/` next to the recipe].
    #[arg(long, env = "PIPELINE_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl CacheArgs {
    pub fn resolve(&self, recipe: Option<&Path>) -> PathBuf {
        if let Some(d) = &self.cache_dir {
            return d.clone();
        }
        match recipe.and_then(Path::parent) {
            Some(p) if !p.as_os_str().is_empty() => p.join(".pipeline"),
            _ => PathBuf::from(".pipeline"),
        }
    }
}

/// The stage registry the binary uses.
pub fn registry() -> Registry {
    pipeline_stages::registry()
}

/// Plan a recipe; a recipe error becomes exit code 2 with its diagnostic.
pub fn load_plan(path: &Path) -> anyhow::Result<Plan> {
    Ok(pipeline_engine::plan(path, &registry())?)
}

/// The `model` artifact of a recipe's stage, from the cache: `stage`, or the last stage (in execution
/// order) that declares a `model` output. Usage errors say which command to run first.
pub fn recipe_model(
    recipe: &std::path::Path,
    stage: Option<&str>,
    cache: &CacheArgs,
) -> anyhow::Result<(PathBuf, Store)> {
    let plan = load_plan(recipe)?;
    let id = match stage {
        Some(id) => {
            let i = plan.require(id).map_err(|e| Usage(e.to_string()))?;
            if !plan.stages[i].declared.outputs.iter().any(|o| o == "model") {
                return Err(Usage(format!("stage `{id}` has no `model` output")).into());
            }
            id.to_string()
        }
        None => plan
            .stages
            .iter()
            .rev()
            .find(|s| TRAINING_KINDS.contains(&s.kind.as_str()) && s.declared.outputs.iter().any(|o| o == "model"))
            .map(|s| s.id.clone())
            .ok_or_else(|| Usage(format!("{}: no training stage has a `model` output", recipe.display())))?,
    };
    let dir = cache.resolve(Some(recipe));
    let store = Store::open_existing(&dir).ok_or_else(|| {
        Usage(format!("no cache at {}: run `pipeline run {}` first", dir.display(), recipe.display()))
    })?;
    let entry = store
        .last(&pipeline_engine::exec::recipe_identity(&plan, &store), &id)
        .and_then(|k| store.entry(&k).ok().flatten())
        .ok_or_else(|| Usage(format!("stage `{id}` has not run yet: run `pipeline run {}` first", recipe.display())))?;
    let out = entry.outputs.get("model").ok_or_else(|| Usage(format!("stage `{id}`'s cache entry has no `model`")))?;
    // A `quantize` artifact holds one `.gguf` file.
    Ok((pipeline_stages::evaluate_model::checkpoint_path(&store.artifact_path(&out.digest)), store))
}

/// Every cache artifact a model source reads (the model, an adapter's base), armed for checked
/// reads ([`Store::expect_reads`]): a corrupt byte is an error while it is read, never output.
pub fn arm_checked_reads(store: &Store, src: &ModelSource) -> anyhow::Result<()> {
    let mut s = Some(src);
    while let Some(cur) = s {
        if let Some(d) = store.artifact_of(cur.path()) {
            if let pipeline_cache::ArtifactCheck::Corrupt(why) = store.expect_reads(&d) {
                return Err(corrupt(store, &d, &why.to_string()));
            }
        }
        s = match cur {
            ModelSource::Adapter { base, .. } => Some(base),
            _ => None,
        };
    }
    Ok(())
}

/// Drop a corrupt artifact's entries and say so (exit 1, or a warning).
pub fn corrupt(store: &Store, digest: &str, why: &str) -> anyhow::Error {
    let stages: Vec<String> =
        store.invalidate(digest).unwrap_or_default().into_iter().map(|e| format!("`{}`", e.stage)).collect();
    anyhow::anyhow!(
        "the cached artifact {} is corrupt ({why}); dropped it and the cache entries of {}: \
         `pipeline run` re-creates them",
        &digest[..digest.len().min(12)],
        if stages.is_empty() { "no stage".to_string() } else { stages.join(", ") }
    )
}

/// After loading a model armed by [`arm_checked_reads`]: a cache artifact whose checked read found
/// corrupt content is dropped with its entries, and the command fails saying so (exit 1) —
/// whatever the loader made of the bytes (`load_error`, when it failed) is never used.
pub fn corrupt_reads(store: Option<&Store>, load_error: Option<&impl std::fmt::Display>) -> anyhow::Result<()> {
    if let (Some(store), Some(dir)) = (store, pipeline_cache::checked::take_corrupt().first()) {
        if let Some(d) = store.artifact_of(dir) {
            let why = load_error.map(|e| e.to_string()).unwrap_or_else(|| "a file differs".into());
            return Err(corrupt(store, &d, &why));
        }
    }
    Ok(())
}

/// The stage kinds whose `model` output `--recipe` picks by default (the last one in the plan).
const TRAINING_KINDS: [&str; 3] = ["pretrain", "sft", "align"];

/// The model a command was pointed at: `--model PATH`, or `--recipe R [--stage S]`'s trained model
/// from the cache (`pipeline generate`, `pipeline serve`, `pipeline chat`), with the cache it is in.
pub fn model_path(
    model: Option<&Path>,
    recipe: Option<&Path>,
    stage: Option<&str>,
    cache: &CacheArgs,
) -> anyhow::Result<(PathBuf, Option<Store>)> {
    match (model, recipe) {
        (Some(m), _) => Ok((m.to_path_buf(), None)),
        (None, Some(r)) => recipe_model(r, stage, cache).map(|(p, s)| (p, Some(s))),
        (None, None) => Err(Usage("give --model or --recipe".into()).into()),
    }
}

/// The system prompt a model was trained with (`chat_defaults.json`'s `system`, as the training
/// stages write it beside the model), used when the user gives none.
pub fn default_system(src: &ModelSource) -> Option<String> {
    let text = pipeline_cache::checked::read_to_string(&src.find_file("chat_defaults.json")?).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("system")?.as_str().map(str::to_string)
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn human_duration(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s as u64) % 60)
    }
}

/// `30d`, `12h`, `45m`, `10s`, `2w` → seconds.
pub fn parse_age(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid age `{s}`: expected e.g. 30d, 12h, 45m"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" | "" => 86400,
        "w" => 7 * 86400,
        _ => return Err(format!("invalid age unit in `{s}`: use s, m, h, d or w")),
    };
    Ok(n * mult)
}

/// Compact `k=v` rendering of a stage report's scalar fields (for the summary table).
pub fn report_counts(report: Option<&serde_json::Value>) -> String {
    let Some(serde_json::Value::Object(m)) = report else { return String::new() };
    m.iter()
        .filter(|(_, v)| v.is_number() || v.is_boolean() || v.as_str().is_some_and(|s| !s.contains('\n')))
        .take(4)
        .map(|(k, v)| match v {
            serde_json::Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() != 0.0) => {
                format!("{k}={:.4}", n.as_f64().unwrap_or_default())
            }
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}
