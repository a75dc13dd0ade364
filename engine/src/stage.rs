//! The contract between the engine and a stage: the [`Stage`] trait, what a stage declares at plan
//! time ([`Declared`]) and what it gets at run time ([`RunCtx`]).
//!
//! A stage never sees the cache: it reads its input artifacts (directories) and writes its output
//! artifacts into fresh directories the engine hands it. The engine hashes and commits them only
//! after `run` returns `Ok`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;

use crate::device::Device;
use crate::dist::DistEnv;

/// Everything that can go wrong inside a stage. Messages name the file, line or field at fault;
/// the engine prefixes the stage id.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The stage's `params` table is invalid (plan time or run time).
    #[error("invalid params: {0}")]
    Params(String),
    /// An input file is malformed: `path:line: field: message`.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Input { path: PathBuf, line: Option<usize>, message: String },
    /// An I/O error on a named path.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The run was interrupted (Ctrl-C); nothing is committed.
    #[error("cancelled")]
    Cancelled,
    /// `RunCtx::input` asked for an input the recipe does not bind.
    #[error("input `{name}` is not bound")]
    UnboundInput { name: String },
    /// `RunCtx::input` asked for one artifact of a list-valued input.
    #[error("input `{name}` is bound to {count} artifacts; expected one")]
    SeveralInputs { name: String, count: usize },
    /// `RunCtx::output` asked for an output the stage did not declare.
    #[error("output `{name}` was not declared")]
    UndeclaredOutput { name: String },
    /// Any other failure, already phrased for a user.
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    pub fn failed(msg: impl fmt::Display) -> Self {
        StageError::Failed(msg.to_string())
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StageError::Io { path: path.into(), source }
    }
    pub fn input(path: impl Into<PathBuf>, line: Option<usize>, message: impl fmt::Display) -> Self {
        StageError::Input { path: path.into(), line, message: message.to_string() }
    }
}

/// Deserialise a stage's `params` table into its typed config (which should be
/// `#[serde(deny_unknown_fields)]`). serde's message already lists the known fields.
pub fn parse_params<T: DeserializeOwned>(params: &toml::Table) -> Result<T, StageError> {
    toml::Value::Table(params.clone()).try_into::<T>().map_err(|e| StageError::Params(e.to_string().trim().to_string()))
}

/// What the planner tells a stage about its place in the recipe.
pub struct PlanCtx<'a> {
    pub stage_id: &'a str,
    pub params: &'a toml::Table,
    /// Input names bound in the recipe (`inputs.<name> = "stage.output"`).
    pub input_names: Vec<&'a str>,
    /// The recipe's directory; relative paths in params resolve against it.
    pub recipe_dir: &'a Path,
}

impl PlanCtx<'_> {
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, StageError> {
        parse_params(self.params)
    }
    /// Error unless every bound input is in `required` or `optional` and every `required` is bound.
    pub fn check_inputs(&self, required: &[&str], optional: &[&str]) -> Result<(), StageError> {
        for name in &self.input_names {
            if !required.contains(name) && !optional.contains(name) {
                let known: Vec<_> = required.iter().chain(optional).copied().collect();
                return Err(StageError::Params(format!(
                    "unknown input `{name}`; this stage takes: {}",
                    if known.is_empty() { "no inputs".to_string() } else { known.join(", ") }
                )));
            }
        }
        for name in required {
            if !self.input_names.contains(name) {
                return Err(StageError::Params(format!("missing required input `{name}`")));
            }
        }
        Ok(())
    }
    pub fn resolve(&self, p: impl AsRef<Path>) -> PathBuf {
        self.recipe_dir.join(p)
    }
}

/// What a stage declares once its params are known.
#[derive(Debug, Clone, Default)]
pub struct Declared {
    /// Named outputs; each is a directory artifact other stages refer to as `<stage>.<name>`.
    pub outputs: Vec<String>,
    /// Local files or directories the stage reads (absolute, resolved against the recipe dir).
    /// Their *content* enters the cache key, never their path or mtime.
    pub files: Vec<PathBuf>,
}

/// One stage kind. Implementations live in `stages/src/<kind>.rs`, one file each, and are listed
/// once in the registry.
pub trait Stage: Send + Sync + 'static {
    /// The `kind = "..."` name in recipes.
    fn kind(&self) -> &'static str;
    /// Bump when the implementation changes its outputs: invalidates cached entries of this kind.
    fn version(&self) -> u32;
    /// One line for `pipeline stages` and `--help`.
    fn summary(&self) -> &'static str;
    /// Validate params and inputs at plan time (nothing runs, nothing is read but small files).
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError>;
    /// Do the work: read inputs, write every declared output directory.
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError>;

    /// `Some` for a stage whose ranks work together in a data-parallel run (training): every rank
    /// runs it, rank 0 alone commits. The table is `params` as they read at `world_size` — what is
    /// keyed and what [`RunCtx::params`] gives — so the key holds what the result depends on, not
    /// the world size itself (the training stages scale `gradient_accumulation_steps` by it: the
    /// global batch). `None` (the default): rank 0 runs the stage, the other ranks wait for its entry.
    fn distributed_params(&self, _params: &toml::Table, _world_size: usize) -> Option<toml::Table> {
        None
    }
}

/// Events a running stage sends; the engine forwards them to its reporter (progress bars, JSON).
#[derive(Debug, Clone, PartialEq)]
pub enum StageEvent {
    /// A (possibly unsized) unit of work began; `total` is known for counted work.
    ProgressStart {
        label: String,
        total: Option<u64>,
    },
    ProgressSet {
        pos: u64,
    },
    ProgressFinish,
    /// A scalar metric at a step (loss, lr, accuracy...).
    Metric {
        name: String,
        step: u64,
        value: f64,
    },
    /// A line for the user (also logged through tracing).
    Message(String),
}

/// Receives stage events. The engine's reporter implements it; tests may collect them.
pub trait EventSink: Send + Sync {
    fn stage_event(&self, stage_id: &str, event: StageEvent);
}

/// Discards events.
pub struct NullSink;
impl EventSink for NullSink {
    fn stage_event(&self, _: &str, _: StageEvent) {}
}

/// The parts a [`RunCtx`] is made of (the engine fills it; stage tests build one by hand).
pub struct RunParts {
    pub stage_id: String,
    pub params: toml::Table,
    pub seed: u64,
    pub recipe_dir: PathBuf,
    /// Input name -> artifact directories (one, or several for list-valued inputs).
    pub inputs: BTreeMap<String, Vec<PathBuf>>,
    /// Output name -> an empty directory to fill.
    pub outputs: BTreeMap<String, PathBuf>,
    /// A directory that survives an interrupted run of the same cache key (checkpoints);
    /// the engine deletes it once the stage's entry is committed.
    pub scratch: PathBuf,
    pub sink: Arc<dyn EventSink>,
    pub cancel: Arc<AtomicBool>,
}

/// What a stage sees while it runs.
pub struct RunCtx {
    parts: RunParts,
    device: Device,
    dist: DistEnv,
    report: Mutex<Option<serde_json::Value>>,
}

impl RunCtx {
    /// A context running on the CPU; see [`with_device`](Self::with_device).
    pub fn new(parts: RunParts) -> Self {
        RunCtx { parts, device: Device::Cpu, dist: DistEnv::single(), report: Mutex::new(None) }
    }
    /// Run as this rank of a data-parallel run (one process unless the run says otherwise).
    pub fn with_dist(mut self, dist: DistEnv) -> Self {
        self.dist = dist;
        self
    }
    /// This process's rank and the run's world size (see [`crate::dist`]).
    pub fn dist(&self) -> &DistEnv {
        &self.dist
    }
    /// Run model work on `device` (`--device`).
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }
    /// Where model work runs (`--device`; CPU unless the run asked otherwise). Not in the cache key.
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn stage_id(&self) -> &str {
        &self.parts.stage_id
    }
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, StageError> {
        parse_params(&self.parts.params)
    }
    pub fn raw_params(&self) -> &toml::Table {
        &self.parts.params
    }
    /// The recipe's global seed.
    pub fn seed(&self) -> u64 {
        self.parts.seed
    }
    pub fn recipe_dir(&self) -> &Path {
        &self.parts.recipe_dir
    }
    /// Resolve a path from params against the recipe directory.
    pub fn resolve(&self, p: impl AsRef<Path>) -> PathBuf {
        self.parts.recipe_dir.join(p)
    }
    /// The single artifact bound to input `name`.
    pub fn input(&self, name: &str) -> Result<&Path, StageError> {
        match self.parts.inputs.get(name).map(Vec::as_slice) {
            Some([one]) => Ok(one),
            Some([]) | None => Err(StageError::UnboundInput { name: name.into() }),
            Some(many) => Err(StageError::SeveralInputs { name: name.into(), count: many.len() }),
        }
    }
    pub fn input_opt(&self, name: &str) -> Option<&Path> {
        self.parts.inputs.get(name).and_then(|v| v.first()).map(PathBuf::as_path)
    }
    /// Every artifact bound to input `name` (list-valued inputs), in recipe order.
    pub fn inputs(&self, name: &str) -> &[PathBuf] {
        self.parts.inputs.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.parts.inputs.keys().map(String::as_str)
    }
    /// The empty directory to write output `name` into.
    pub fn output(&self, name: &str) -> Result<&Path, StageError> {
        self.parts
            .outputs
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| StageError::UndeclaredOutput { name: name.into() })
    }
    pub fn scratch_dir(&self) -> &Path {
        &self.parts.scratch
    }
    pub fn is_cancelled(&self) -> bool {
        self.parts.cancel.load(Ordering::Relaxed)
    }
    /// `Err(Cancelled)` once the user pressed Ctrl-C; call it between units of work.
    /// The run's Ctrl-C flag, for code that must poll it without a `RunCtx` (a generation loop).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.parts.cancel.clone()
    }
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.is_cancelled() {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }
    pub fn emit(&self, event: StageEvent) {
        self.parts.sink.stage_event(&self.parts.stage_id, event);
    }
    pub fn progress_start(&self, label: impl Into<String>, total: Option<u64>) {
        self.emit(StageEvent::ProgressStart { label: label.into(), total });
    }
    pub fn progress_set(&self, pos: u64) {
        self.emit(StageEvent::ProgressSet { pos });
    }
    pub fn progress_finish(&self) {
        self.emit(StageEvent::ProgressFinish);
    }
    pub fn metric(&self, name: &str, step: u64, value: f64) {
        self.emit(StageEvent::Metric { name: name.to_string(), step, value });
    }
    pub fn message(&self, msg: impl Into<String>) {
        self.emit(StageEvent::Message(msg.into()));
    }
    /// The stage's small JSON report (counts, per-rule numbers, timings): stored with the cache
    /// entry and shown in the run summary.
    pub fn set_report(&self, report: serde_json::Value) {
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
    }
    pub fn take_report(&self) -> Option<serde_json::Value> {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Kind name -> implementation. Built by `pipeline_stages::registry()`.
#[derive(Default, Clone)]
pub struct Registry {
    stages: BTreeMap<&'static str, Arc<dyn Stage>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn register(&mut self, stage: impl Stage) -> &mut Self {
        self.stages.insert(stage.kind(), Arc::new(stage));
        self
    }
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Stage>> {
        self.stages.get(kind)
    }
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.stages.keys().copied()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Stage>> {
        self.stages.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        lora_rank: u32,
    }

    #[test]
    fn unknown_param_names_the_known_keys() {
        let t: toml::Table = toml::from_str("lora_rnk = 8").unwrap();
        let err = parse_params::<Cfg>(&t).unwrap_err().to_string();
        assert!(err.contains("lora_rnk") && err.contains("lora_rank"), "{err}");
    }

    #[test]
    fn check_inputs_rejects_unknown_and_missing() {
        let params = toml::Table::new();
        let ctx = PlanCtx { stage_id: "s", params: &params, input_names: vec!["dta"], recipe_dir: Path::new(".") };
        let err = ctx.check_inputs(&["data"], &[]).unwrap_err().to_string();
        assert!(err.contains("unknown input `dta`") && err.contains("data"), "{err}");
        let ctx = PlanCtx { stage_id: "s", params: &params, input_names: vec![], recipe_dir: Path::new(".") };
        assert!(ctx.check_inputs(&["data"], &[]).unwrap_err().to_string().contains("missing required input `data`"));
    }
}
