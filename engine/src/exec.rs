//! Execution of a [`Plan`] against a [`Store`]: key computation, cache lookup with corruption
//! checks, scheduling independent stages on up to `jobs` threads, atomic commit, and the
//! freshness report behind `pipeline plan` / `pipeline explain`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipeline_cache::{ArtifactCheck, Corruption, Entry, EntryOutput, FileMemo, Store};

use crate::device::Device;
use crate::dirty::{self, DirtyReason, KeyChange};
use crate::dist::DistEnv;
use crate::key::{self, FileKey, StageKey, KEY_SCHEMA, PENDING};
use crate::plan::{Plan, UnknownStage};
use crate::stage::{EventSink, RunCtx, RunParts, StageError, StageEvent};

/// Run-wide choices (from the command line).
#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub jobs: usize,
    /// Run only these stages (their inputs must be cached).
    pub only: Vec<String>,
    /// Run these stages and everything upstream of them.
    pub until: Vec<String>,
    /// Re-run these stages even when cached.
    pub force: Vec<String>,
    /// Where stages run model work (`RunCtx::device`); not part of any key.
    pub device: Device,
    /// After a failure, keep running (and caching) the stages that do not depend on it, as
    /// `make -k` does; without it the run starts nothing new after the first failure.
    pub keep_going: bool,
    pub cancel: Arc<AtomicBool>,
    /// This process's rank of a data-parallel run ([`crate::dist`]); one process by default. A
    /// follower (rank > 0) writes nothing to the store: the caller takes no lock for it.
    pub dist: DistEnv,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            jobs: 1,
            only: vec![],
            until: vec![],
            force: vec![],
            device: Device::Cpu,
            keep_going: false,
            cancel: Arc::new(AtomicBool::new(false)),
            dist: DistEnv::single(),
        }
    }
}

/// Final status of one stage in a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Ran,
    Cached,
    Failed(String),
    /// Not run: an upstream stage failed, was interrupted or is not cached.
    Skipped(String),
    Cancelled,
    /// Outside `--only` / `--until`.
    NotSelected,
}

impl Status {
    pub fn label(&self) -> &'static str {
        match self {
            Status::Ran => "ran",
            Status::Cached => "cached",
            Status::Failed(_) => "failed",
            Status::Skipped(_) => "skipped",
            Status::Cancelled => "interrupted",
            Status::NotSelected => "not selected",
        }
    }
}

/// What happened to one stage.
#[derive(Debug, Clone)]
pub struct StageOutcome {
    pub id: String,
    pub kind: String,
    pub status: Status,
    pub key: Option<String>,
    pub duration: Duration,
    pub outputs: BTreeMap<String, EntryOutput>,
    pub report: Option<serde_json::Value>,
}

impl StageOutcome {
    pub fn bytes(&self) -> u64 {
        self.outputs.values().map(|o| o.bytes).sum()
    }
}

/// A run's result.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// In plan order.
    pub outcomes: Vec<StageOutcome>,
    pub cancelled: bool,
    pub elapsed: Duration,
}

impl RunSummary {
    pub fn failed(&self) -> bool {
        self.outcomes.iter().any(|o| matches!(o.status, Status::Failed(_)))
    }
}

/// Receives execution events (the CLI draws bars and prints JSON from them). Stage events arrive
/// through the [`EventSink`] supertrait.
pub trait Reporter: EventSink {
    fn warning(&self, _msg: &str) {}
    /// A stage was dispatched, with why it is not cached.
    fn stage_started(&self, _id: &str, _kind: &str, _reason: &DirtyReason) {}
    fn stage_done(&self, _outcome: &StageOutcome) {}
}

/// A reporter that drops everything.
pub struct NullReporter;
impl EventSink for NullReporter {
    fn stage_event(&self, _: &str, _: StageEvent) {}
}
impl Reporter for NullReporter {}

/// Errors that stop a run before or outside any stage.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Cache(#[from] pipeline_cache::CacheError),
    /// `--only`, `--until` or `--force` named a stage the recipe does not have.
    #[error(transparent)]
    UnknownStage(#[from] UnknownStage),
}

/// A stage's key cannot be computed (the stage fails; `plan` says it will run).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A local file the stage declared (`Declared::files`) cannot be read.
    #[error("cannot read {}: {error}", path.display())]
    File { stage: String, path: PathBuf, error: std::io::Error },
    /// The merged params do not convert to JSON.
    #[error("params of stage `{stage}` cannot be keyed: {error}")]
    Params { stage: String, error: serde_json::Error },
}

/// Whether a stage's entry can be used, and why not.
#[derive(Debug)]
pub enum Freshness {
    Cached,
    /// Will run, with the reason.
    Dirty(DirtyReason),
    /// Some upstream stage will run first; the key is known only afterwards.
    Waiting(Vec<String>),
    /// Will run, and fail: its key cannot be computed.
    Unkeyable(KeyError),
}

/// Freshness of every stage, as `pipeline plan` shows it.
pub struct StageStatus {
    pub id: String,
    pub kind: String,
    pub freshness: Freshness,
    /// The key as far as it is known (`pending:<stage>` inputs while upstream stages will run);
    /// `None` when it cannot be computed.
    pub key: Option<StageKey>,
    pub key_hex: Option<String>,
    /// What differs from the latest entry of this stage (`None`: there is none), for `explain`.
    pub changes: Option<Vec<KeyChange>>,
}

pub(crate) struct Keyer<'a> {
    plan: &'a Plan,
    memo: Mutex<FileMemo>,
    store: &'a Store,
    /// Each stage's params as keyed and run: the plan's, or a distributed stage's at the world size.
    params: Vec<toml::Table>,
    /// A follower rank does not write the file-digest memo (rank 0 owns the store).
    read_only: bool,
}

impl<'a> Keyer<'a> {
    pub(crate) fn new(plan: &'a Plan, store: &'a Store) -> Self {
        Keyer::for_world(plan, store, 1)
    }
    /// Keys as a run at `world_size` ranks computes them ([`crate::Stage::distributed_params`]).
    pub(crate) fn for_world(plan: &'a Plan, store: &'a Store, world_size: usize) -> Self {
        let params = plan
            .stages
            .iter()
            .map(|s| match world_size {
                1 => s.params.clone(),
                w => s.stage.distributed_params(&s.params, w).unwrap_or_else(|| s.params.clone()),
            })
            .collect();
        Keyer { plan, memo: Mutex::new(FileMemo::load(&store.file_memo_path())), store, params, read_only: false }
    }
    fn save(&self) {
        if self.read_only {
            return;
        }
        let _ = self.memo.lock().unwrap_or_else(|e| e.into_inner()).save(&self.store.file_memo_path());
    }
    /// The key of stage `i`, given its upstream outputs (`None` = upstream not resolved).
    fn key(&self, i: usize, outs: &[Option<BTreeMap<String, EntryOutput>>]) -> Result<StageKey, KeyError> {
        let s = &self.plan.stages[i];
        let mut inputs = BTreeMap::new();
        for (name, refs) in &s.inputs {
            let v = refs
                .iter()
                .map(|r| match &outs[r.stage] {
                    Some(o) => o.get(&r.output).map(|e| e.digest.clone()).unwrap_or_default(),
                    None => format!("{PENDING}{}", self.plan.stages[r.stage].id),
                })
                .collect();
            inputs.insert(name.clone(), v);
        }
        let mut files = Vec::new();
        let mut memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
        for f in &s.declared.files {
            let digest =
                memo.digest(f).map_err(|error| KeyError::File { stage: s.id.clone(), path: f.clone(), error })?;
            files.push(FileKey { path: key::key_path(&self.plan.dir, f), digest });
        }
        Ok(StageKey {
            schema: KEY_SCHEMA,
            kind: s.kind.clone(),
            version: s.stage.version(),
            params: serde_json::to_value(&self.params[i])
                .map_err(|error| KeyError::Params { stage: s.id.clone(), error })?,
            inputs,
            files,
            seed: self.plan.seed,
        })
    }
}

fn hex_of(k: &StageKey) -> (String, serde_json::Value) {
    pipeline_cache::key_of(k).expect("a StageKey always serialises")
}

/// Why [`lookup`] found no usable entry.
enum Miss {
    NoEntry,
    Unusable(DirtyReason),
}

/// Look up a usable entry: present, readable, every output artifact passes the cheap check. An
/// unusable entry is a warning; it (and a corrupt artifact) is removed.
fn lookup(store: &Store, key: &str, warn: &dyn Fn(String)) -> Result<Entry, Miss> {
    let entry = match store.entry(key) {
        Ok(Some(e)) => e,
        Ok(None) => return Err(Miss::NoEntry),
        Err(e) => {
            warn(e.to_string());
            let _ = store.remove_entry(key);
            return Err(Miss::Unusable(DirtyReason::EntryUnreadable));
        }
    };
    for (name, out) in &entry.outputs {
        match store.check_artifact(&out.digest) {
            ArtifactCheck::Ok => {}
            ArtifactCheck::Missing => {
                warn(format!(
                    "artifact `{name}` ({}) of stage `{}` is missing; re-running",
                    short(&out.digest),
                    entry.stage
                ));
                let _ = store.remove_entry(key);
                return Err(Miss::Unusable(DirtyReason::ArtifactMissing { output: name.clone() }));
            }
            ArtifactCheck::Corrupt(why) => {
                warn(format!(
                    "artifact `{name}` ({}) of stage `{}` is corrupt ({why}); discarding it and re-running",
                    short(&out.digest),
                    entry.stage
                ));
                let _ = store.remove_artifact(&out.digest);
                let _ = store.remove_entry(key);
                return Err(Miss::Unusable(DirtyReason::ArtifactCorrupt { output: name.clone() }));
            }
        }
    }
    Ok(entry)
}

fn short(d: &str) -> &str {
    &d[..d.len().min(12)]
}

/// The name under which a recipe's "last run" pointers are kept (`last/<identity>/<stage>`): the
/// `[pipeline] name` for reading, then a digest of the recipe file's path relative to the cache
/// directory's parent (so two recipes that share a name never share pointers, and a project copied
/// or moved with its `.pipeline/` keeps them); a recipe outside that directory is named by its
/// absolute path. Pointers are a local memo, never part of a key.
pub fn recipe_identity(plan: &Plan, store: &Store) -> String {
    let file = plan.dir.join(plan.path.file_name().unwrap_or_default());
    let base = std::path::absolute(store.root()).ok().and_then(|r| r.parent().map(std::path::Path::to_path_buf));
    let rel = base.as_deref().and_then(|b| file.strip_prefix(b).ok()).unwrap_or(&file);
    let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let (digest, _) = pipeline_cache::key_of(&rel.join("/")).expect("a string serialises");
    format!("{}.{}", plan.name, &digest[..12])
}

/// The key JSON of the latest entry of stage `id` of this recipe.
fn previous_key(store: &Store, plan: &Plan, id: &str) -> Option<serde_json::Value> {
    store.last(&recipe_identity(plan, store), id).and_then(|k| store.entry(&k).ok().flatten()).map(|e| e.key_fields)
}

/// Why a stage whose key has no usable entry will run: compared with its latest entry.
fn dirty_reason(previous: Option<&serde_json::Value>, key: &StageKey) -> DirtyReason {
    match previous {
        None => DirtyReason::NeverRan,
        Some(p) => match dirty::changes(p, key) {
            c if c.is_empty() => DirtyReason::OutputsLost,
            c => DirtyReason::Changed(c),
        },
    }
}

/// Freshness of every stage without running anything (`pipeline plan`, `explain`).
pub fn statuses(plan: &Plan, store: &Store, force: &[String]) -> Vec<StageStatus> {
    let keyer = Keyer::new(plan, store);
    let mut outs: Vec<Option<BTreeMap<String, EntryOutput>>> = vec![None; plan.stages.len()];
    let mut result = Vec::new();
    for (i, s) in plan.stages.iter().enumerate() {
        let previous = previous_key(store, plan, &s.id);
        let status = |freshness, key: Option<StageKey>, key_hex| {
            let changes = previous.as_ref().zip(key.as_ref()).map(|(p, k)| dirty::changes(p, k));
            StageStatus { id: s.id.clone(), kind: s.kind.clone(), freshness, key, key_hex, changes }
        };
        let key = match keyer.key(i, &outs) {
            Ok(k) => k,
            Err(e) => {
                result.push(status(Freshness::Unkeyable(e), None, None));
                continue;
            }
        };
        if !key.is_complete() {
            let waiting: Vec<String> =
                s.deps.iter().filter(|&&d| outs[d].is_none()).map(|&d| plan.stages[d].id.clone()).collect();
            result.push(status(Freshness::Waiting(waiting), Some(key), None));
            continue;
        }
        let (hex, _) = hex_of(&key);
        let freshness = if force.contains(&s.id) {
            Freshness::Dirty(DirtyReason::Forced)
        } else {
            match lookup_quiet(store, &hex) {
                Some(e) => {
                    outs[i] = Some(e.outputs);
                    Freshness::Cached
                }
                None => Freshness::Dirty(dirty_reason(previous.as_ref(), &key)),
            }
        };
        result.push(status(freshness, Some(key), Some(hex)));
    }
    keyer.save();
    result
}

fn lookup_quiet(store: &Store, key: &str) -> Option<Entry> {
    let e = store.entry(key).ok().flatten()?;
    e.outputs.values().all(|o| store.check_artifact(&o.digest).is_ok()).then_some(e)
}

#[derive(Clone)]
enum State {
    Pending,
    Running,
    Done(BTreeMap<String, EntryOutput>),
    Failed,
    Blocked,
}

enum WorkResult {
    Committed(Box<Entry>),
    /// A follower rank found the entry rank 0 committed.
    Waited(Box<Entry>),
    Failed(String),
    Cancelled,
    /// An input artifact failed its digest check: plan index and output name of the producer, the
    /// warning.
    CorruptInput(usize, String, String),
}

struct Job {
    idx: usize,
    params: toml::Table,
    key: String,
    key_json: serde_json::Value,
    /// Input name → (producer's plan index, its output name, artifact digest).
    inputs: BTreeMap<String, Vec<(usize, String, String)>>,
}

/// Run the plan. Takes no lock: the caller holds [`Store::lock`] for the whole run.
pub fn run(
    plan: &Plan,
    store: &Store,
    opts: &ExecOptions,
    reporter: Arc<dyn Reporter>,
) -> Result<RunSummary, ExecError> {
    let started = Instant::now();
    let n = plan.stages.len();
    let resolve =
        |ids: &[String]| -> Result<Vec<usize>, ExecError> { ids.iter().map(|id| Ok(plan.require(id)?)).collect() };
    let only = resolve(&opts.only)?;
    let until = resolve(&opts.until)?;
    let force: BTreeSet<usize> = resolve(&opts.force)?.into_iter().collect();
    let selected: BTreeSet<usize> = if only.is_empty() && until.is_empty() {
        (0..n).collect()
    } else {
        let mut s: BTreeSet<usize> = only.iter().copied().collect();
        s.extend(plan.ancestors(&until));
        s
    };
    // Stages whose outputs we need: the selected ones and their ancestors (looked up, not run).
    let needed = plan.ancestors(&selected.iter().copied().collect::<Vec<_>>());

    // A follower rank (data-parallel, rank > 0) only reads the store: entries are rank 0's.
    let follower = opts.dist.is_follower();
    let mut keyer = Keyer::for_world(plan, store, opts.dist.world_size);
    keyer.read_only = follower;
    let keyer = keyer;
    let recipe_id = recipe_identity(plan, store);
    let warn = |m: String| {
        tracing::warn!("{m}");
        reporter.warning(&m);
    };
    let mut state: Vec<State> = vec![State::Pending; n];
    let mut outcomes: Vec<Option<StageOutcome>> = vec![None; n];
    let mut retries = vec![0u32; n];
    // Why a stage's entry was unusable when first looked up (the lookup removed it, so a later look
    // finds no entry at all).
    let mut misses: Vec<Option<DirtyReason>> = vec![None; n];
    let verified: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let mut failed = false;
    let (tx, rx) = mpsc::channel::<(usize, String, Duration, Option<serde_json::Value>, WorkResult)>();
    let mut running = 0usize;
    let cancel = opts.cancel.clone();

    let outcome = |i: usize,
                   status: Status,
                   key: Option<String>,
                   duration: Duration,
                   outputs: BTreeMap<String, EntryOutput>,
                   report: Option<serde_json::Value>| StageOutcome {
        id: plan.stages[i].id.clone(),
        kind: plan.stages[i].kind.clone(),
        status,
        key,
        duration,
        outputs,
        report,
    };

    std::thread::scope(|scope| -> Result<(), ExecError> {
        loop {
            let stop = (failed && !opts.keep_going) || cancel.load(std::sync::atomic::Ordering::Relaxed);
            let mut progressed = true;
            while progressed {
                progressed = false;
                for i in 0..n {
                    if !matches!(state[i], State::Pending) || !needed.contains(&i) {
                        continue;
                    }
                    let s = &plan.stages[i];
                    if let Some(&d) = s.deps.iter().find(|&&d| matches!(state[d], State::Failed | State::Blocked)) {
                        state[i] = State::Blocked;
                        let why = match &outcomes[d] {
                            Some(o)
                                if matches!(o.status, Status::Skipped(_) | Status::Cancelled)
                                    && !selected.contains(&d) =>
                            {
                                format!(
                                    "input from `{}` is not cached (run it first, e.g. with --until {})",
                                    plan.stages[d].id, s.id
                                )
                            }
                            _ => format!("upstream `{}` did not complete", plan.stages[d].id),
                        };
                        let o = outcome(i, Status::Skipped(why), None, Duration::ZERO, BTreeMap::new(), None);
                        reporter.stage_done(&o);
                        outcomes[i] = Some(o);
                        progressed = true;
                        continue;
                    }
                    if !s.deps.iter().all(|&d| matches!(state[d], State::Done(_))) {
                        continue;
                    }
                    let outs: Vec<Option<BTreeMap<String, EntryOutput>>> =
                        state.iter().map(|st| if let State::Done(o) = st { Some(o.clone()) } else { None }).collect();
                    let key = match keyer.key(i, &outs) {
                        Ok(k) => k,
                        Err(e) => {
                            state[i] = State::Failed;
                            failed = true;
                            let o =
                                outcome(i, Status::Failed(e.to_string()), None, Duration::ZERO, BTreeMap::new(), None);
                            reporter.stage_done(&o);
                            outcomes[i] = Some(o);
                            progressed = true;
                            continue;
                        }
                    };
                    let (hex, json) = hex_of(&key);
                    let distributed = opts.dist.world_size > 1 && s.stage.distributed_params(&s.params, 1).is_some();
                    // A follower re-runs a forced stage only when it trains with rank 0.
                    let forced = force.contains(&i) && outcomes[i].is_none() && (!follower || distributed);
                    let found = if follower {
                        lookup_quiet(store, &hex).ok_or(Miss::NoEntry)
                    } else {
                        lookup(store, &hex, &|m| warn(m))
                    };
                    let reason = if forced {
                        DirtyReason::Forced
                    } else {
                        match found {
                            Ok(entry) => {
                                if !follower {
                                    store.touch_entry(&hex);
                                    let _ = store.set_last(&recipe_id, &s.id, &hex);
                                }
                                let o = outcome(
                                    i,
                                    Status::Cached,
                                    Some(hex.clone()),
                                    Duration::ZERO,
                                    entry.outputs.clone(),
                                    entry.report.clone(),
                                );
                                reporter.stage_done(&o);
                                outcomes[i] = Some(o);
                                state[i] = State::Done(entry.outputs);
                                progressed = true;
                                continue;
                            }
                            Err(Miss::NoEntry) => misses[i]
                                .clone()
                                .unwrap_or_else(|| dirty_reason(previous_key(store, plan, &s.id).as_ref(), &key)),
                            Err(Miss::Unusable(why)) => {
                                misses[i] = Some(why.clone());
                                why
                            }
                        }
                    };
                    if !selected.contains(&i) {
                        state[i] = State::Blocked;
                        let o = outcome(
                            i,
                            Status::Skipped(format!("not selected and not cached ({reason})")),
                            Some(hex),
                            Duration::ZERO,
                            BTreeMap::new(),
                            None,
                        );
                        reporter.stage_done(&o);
                        outcomes[i] = Some(o);
                        progressed = true;
                        continue;
                    }
                    // A follower waiting for rank 0's entry of a stage it does not run takes no job slot.
                    let waits = follower && !distributed;
                    if stop || (!waits && running >= opts.jobs.max(1)) {
                        continue;
                    }
                    // Dispatch.
                    let inputs = s
                        .inputs
                        .iter()
                        .map(|(name, refs)| {
                            let v = refs
                                .iter()
                                .map(|r| {
                                    let d = match &state[r.stage] {
                                        State::Done(o) => {
                                            o.get(&r.output).map(|e| e.digest.clone()).unwrap_or_default()
                                        }
                                        _ => String::new(),
                                    };
                                    (r.stage, r.output.clone(), d)
                                })
                                .collect();
                            (name.clone(), v)
                        })
                        .collect();
                    let job = Job { idx: i, params: keyer.params[i].clone(), key: hex, key_json: json, inputs };
                    state[i] = State::Running;
                    running += 1;
                    progressed = true;
                    reporter.stage_started(&s.id, &s.kind, &reason);
                    let tx = tx.clone();
                    let reporter = reporter.clone();
                    let verified = verified.clone();
                    let cancel = cancel.clone();
                    let device = opts.device;
                    let dist = opts.dist.clone();
                    scope.spawn(move || {
                        let t0 = Instant::now();
                        let key = job.key.clone();
                        let (res, report) = if waits {
                            reporter.stage_event(
                                &plan.stages[job.idx].id,
                                StageEvent::Message(format!("rank {}: waiting for rank 0's entry", dist.rank)),
                            );
                            (wait_for_entry(store, &job.key, &cancel), None)
                        } else {
                            work(plan, store, job, reporter, verified, cancel, device, &dist)
                        };
                        let _ = tx.send((i, key, t0.elapsed(), report, res));
                    });
                }
            }
            if running == 0 {
                break;
            }
            let Ok((i, key, dur, report, res)) = rx.recv() else { break };
            running -= 1;
            match res {
                WorkResult::Waited(entry) => {
                    let o = outcome(i, Status::Cached, Some(key), dur, entry.outputs.clone(), entry.report.clone());
                    reporter.stage_done(&o);
                    outcomes[i] = Some(o);
                    state[i] = State::Done(entry.outputs);
                }
                WorkResult::Committed(entry) => {
                    if !follower {
                        let _ = store.set_last(&recipe_id, &plan.stages[i].id, &key);
                    }
                    let o = outcome(i, Status::Ran, Some(key), dur, entry.outputs.clone(), entry.report.clone());
                    reporter.stage_done(&o);
                    outcomes[i] = Some(o);
                    state[i] = State::Done(entry.outputs);
                }
                WorkResult::CorruptInput(p, output, msg) if retries[i] < 2 => {
                    warn(msg);
                    retries[i] += 1;
                    retries[p] += 1;
                    state[i] = State::Pending;
                    state[p] = State::Pending;
                    outcomes[p] = None;
                    misses[p] = Some(DirtyReason::ArtifactCorrupt { output });
                }
                WorkResult::CorruptInput(_, _, msg) | WorkResult::Failed(msg) => {
                    failed = true;
                    state[i] = State::Failed;
                    let o = outcome(i, Status::Failed(msg), Some(key), dur, BTreeMap::new(), report);
                    reporter.stage_done(&o);
                    outcomes[i] = Some(o);
                }
                WorkResult::Cancelled => {
                    state[i] = State::Failed;
                    let o = outcome(i, Status::Cancelled, Some(key), dur, BTreeMap::new(), None);
                    reporter.stage_done(&o);
                    outcomes[i] = Some(o);
                }
            }
        }
        Ok(())
    })?;
    keyer.save();
    let cancelled = cancel.load(std::sync::atomic::Ordering::Relaxed);
    let outcomes = outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            o.unwrap_or_else(|| {
                let status = if !needed.contains(&i) {
                    Status::NotSelected
                } else if cancelled {
                    Status::Cancelled
                } else {
                    Status::Skipped("not started: an earlier stage failed".into())
                };
                let o = outcome(i, status, None, Duration::ZERO, BTreeMap::new(), None);
                if o.status != Status::NotSelected {
                    reporter.stage_done(&o);
                }
                o
            })
        })
        .collect();
    Ok(RunSummary { outcomes, cancelled, elapsed: started.elapsed() })
}

/// Forwards a stage's events to the reporter (and to tracing).
struct Sink(Arc<dyn Reporter>);
impl EventSink for Sink {
    fn stage_event(&self, stage_id: &str, event: StageEvent) {
        match &event {
            StageEvent::Message(m) => tracing::info!(stage = stage_id, "{m}"),
            StageEvent::Metric { name, step, value } => tracing::debug!(stage = stage_id, step, value, "{name}"),
            _ => {}
        }
        self.0.stage_event(stage_id, event);
    }
}

/// A follower rank: poll until rank 0 has committed `key` (or Ctrl-C). Rank 0's failure ends the
/// whole run through the launcher (`pipeline run --nproc-per-node`, torchrun, srun), which stops
/// the other ranks.
fn wait_for_entry(store: &Store, key: &str, cancel: &AtomicBool) -> WorkResult {
    loop {
        if let Some(e) = lookup_quiet(store, key) {
            return WorkResult::Waited(Box::new(e));
        }
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return WorkResult::Cancelled;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where a follower rank's copy of a distributed stage writes its outputs: a private directory,
/// discarded afterwards (rank 0's outputs are the entry).
struct FollowerOutputs {
    root: PathBuf,
    outputs: BTreeMap<String, PathBuf>,
}

impl FollowerOutputs {
    fn new(rank: usize, key: &str, names: &[String]) -> std::io::Result<FollowerOutputs> {
        let root = std::env::temp_dir().join(format!("pipeline-rank{rank}-{}-{}", std::process::id(), short(key)));
        let mut outputs = BTreeMap::new();
        for n in names {
            let d = root.join(n);
            std::fs::create_dir_all(&d)?;
            outputs.insert(n.clone(), d);
        }
        Ok(FollowerOutputs { root, outputs })
    }
}

impl Drop for FollowerOutputs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[allow(clippy::too_many_arguments)]
fn work(
    plan: &Plan,
    store: &Store,
    job: Job,
    reporter: Arc<dyn Reporter>,
    verified: Arc<Mutex<HashSet<String>>>,
    cancel: Arc<AtomicBool>,
    device: Device,
    dist: &DistEnv,
) -> (WorkResult, Option<serde_json::Value>) {
    if dist.is_follower() {
        return follower_work(plan, store, job, reporter, cancel, device, dist);
    }
    let s = &plan.stages[job.idx];
    let span = tracing::info_span!("stage", id = %s.id, kind = %s.kind);
    let _g = span.enter();
    // Every input armed for checked reads, once per process (`Store::expect_reads`: the stamp's
    // file hashes checked against the artifact's name, no file content read). The stage's loaders
    // hash what they read while they read it; after the run, `finish_reads` hashes the files no
    // checked read covered. So each input byte is checked once, before anything made from it is
    // committed (issue 14, defect 1).
    let mut inputs: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for (name, list) in &job.inputs {
        for (producer, output, digest) in list {
            let done = verified.lock().unwrap_or_else(|e| e.into_inner()).contains(digest);
            if !done {
                match store.expect_reads(digest) {
                    ArtifactCheck::Ok => {
                        verified.lock().unwrap_or_else(|e| e.into_inner()).insert(digest.clone());
                    }
                    bad => {
                        return (corrupt_input(plan, store, &verified, *producer, output, digest, &bad, None), None);
                    }
                }
            }
            inputs.entry(name.clone()).or_default().push(store.artifact_path(digest));
        }
    }
    let staging = match store.staging(&job.key, &s.declared.outputs) {
        Ok(st) => st,
        Err(e) => return (WorkResult::Failed(e.to_string()), None),
    };
    let scratch = match store.scratch_dir(&job.key) {
        Ok(d) => d,
        Err(e) => return (WorkResult::Failed(e.to_string()), None),
    };
    let ctx = RunCtx::new(RunParts {
        stage_id: s.id.clone(),
        params: job.params.clone(),
        seed: plan.seed,
        recipe_dir: plan.dir.clone(),
        inputs,
        outputs: staging.outputs().clone(),
        scratch,
        sink: Arc::new(Sink(reporter)),
        cancel,
    })
    .with_device(device)
    .with_dist(dist.clone());
    let t0 = Instant::now();
    tracing::info!(key = %short(&job.key), "running");
    let res = std::panic::catch_unwind(AssertUnwindSafe(|| s.stage.run(&ctx)));
    let report = ctx.take_report();
    tracing::info!(ok = matches!(res, Ok(Ok(()))), elapsed_ms = t0.elapsed().as_millis() as u64, "finished");
    // An input that a read found corrupt, or whose unread files differ: what the stage made is
    // dropped (whatever it returned) and its producer re-runs. Not after Ctrl-C (nothing commits).
    if !matches!(res, Ok(Err(StageError::Cancelled))) {
        for list in job.inputs.values() {
            for (producer, output, digest) in list {
                let check = store.finish_reads(digest);
                if !check.is_ok() {
                    staging.discard();
                    let why = corrupt_input(plan, store, &verified, *producer, output, digest, &check, Some(&s.id));
                    return (why, None);
                }
            }
        }
    }
    match res {
        Ok(Ok(())) => {
            let mut entry = Entry::new(&job.key, job.key_json, &plan.name, &s.id, &s.kind);
            entry.report = report.clone();
            entry.duration_ms = t0.elapsed().as_millis() as u64;
            match store.commit(staging, entry) {
                Ok(e) => {
                    store.remove_scratch(&job.key);
                    (WorkResult::Committed(Box::new(e)), report)
                }
                Err(e) => (WorkResult::Failed(format!("committing outputs: {e}")), report),
            }
        }
        Ok(Err(StageError::Cancelled)) => {
            staging.discard();
            (WorkResult::Cancelled, None)
        }
        Ok(Err(e)) => {
            staging.discard();
            (WorkResult::Failed(e.to_string()), report)
        }
        Err(panic) => {
            staging.discard();
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            (WorkResult::Failed(format!("the stage panicked: {msg}")), report)
        }
    }
}

/// Input `digest` (output `output` of stage `producer`) failed its check: drop the producer's
/// entry and the artifact so that it re-runs. `reader` is the stage that was reading it, when the
/// mismatch was found while it ran.
#[allow(clippy::too_many_arguments)]
fn corrupt_input(
    plan: &Plan,
    store: &Store,
    verified: &Mutex<HashSet<String>>,
    producer: usize,
    output: &str,
    digest: &str,
    check: &ArtifactCheck,
    reader: Option<&str>,
) -> WorkResult {
    let p = &plan.stages[producer];
    let why = match check {
        ArtifactCheck::Corrupt(w) => match (w, reader) {
            (Corruption::ReadMismatch { file }, Some(r)) => {
                format!("`{file}` did not match the cache's digest when `{r}` read it")
            }
            (w, Some(r)) => format!("{w}, found after `{r}` ran"),
            (w, None) => w.to_string(),
        },
        _ => "missing".to_string(),
    };
    verified.lock().unwrap_or_else(|e| e.into_inner()).remove(digest);
    if let Some(k) = store.last(&recipe_identity(plan, store), &p.id) {
        let _ = store.remove_entry(&k);
    }
    let _ = store.remove_artifact(digest);
    WorkResult::CorruptInput(
        producer,
        output.to_string(),
        format!("artifact {} (output of `{}`) is corrupt ({why}); re-running `{}`", short(digest), p.id, p.id),
    )
}

/// A follower rank's part in a distributed stage: run it beside rank 0 (same inputs, the shared
/// scratch directory for resuming, outputs into a private directory that is dropped), then use the
/// entry rank 0 commits.
fn follower_work(
    plan: &Plan,
    store: &Store,
    job: Job,
    reporter: Arc<dyn Reporter>,
    cancel: Arc<AtomicBool>,
    device: Device,
    dist: &DistEnv,
) -> (WorkResult, Option<serde_json::Value>) {
    let s = &plan.stages[job.idx];
    let inputs = job
        .inputs
        .iter()
        .map(|(name, list)| (name.clone(), list.iter().map(|(_, _, d)| store.artifact_path(d)).collect()))
        .collect();
    let outs = match FollowerOutputs::new(dist.rank, &job.key, &s.declared.outputs) {
        Ok(o) => o,
        Err(e) => return (WorkResult::Failed(format!("rank {}: creating its output directory: {e}", dist.rank)), None),
    };
    let ctx = RunCtx::new(RunParts {
        stage_id: s.id.clone(),
        params: job.params.clone(),
        seed: plan.seed,
        recipe_dir: plan.dir.clone(),
        inputs,
        outputs: outs.outputs.clone(),
        scratch: store.scratch_path(&job.key),
        sink: Arc::new(Sink(reporter)),
        cancel: cancel.clone(),
    })
    .with_device(device)
    .with_dist(dist.clone());
    let res = std::panic::catch_unwind(AssertUnwindSafe(|| s.stage.run(&ctx)));
    drop(outs);
    match res {
        Ok(Ok(())) => match wait_for_entry(store, &job.key, &cancel) {
            WorkResult::Waited(e) => (WorkResult::Committed(e), None),
            other => (other, None),
        },
        Ok(Err(StageError::Cancelled)) => (WorkResult::Cancelled, None),
        Ok(Err(e)) => (WorkResult::Failed(format!("rank {}: {e}", dist.rank)), None),
        Err(_) => (WorkResult::Failed(format!("rank {}: the stage panicked", dist.rank)), None),
    }
}

#[cfg(test)]
mod identity_tests {
    use std::path::Path;

    use pipeline_cache::Store;

    use crate::recipe::Source;
    use crate::stage::Registry;

    fn plan_at(dir: &Path, name: &str) -> crate::plan::Plan {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("x.txt"), dir.display().to_string()).unwrap();
        let text =
            format!("[pipeline]\nname = \"{name}\"\n\n[stages.a]\nkind = \"files\"\nparams.paths = [\"x.txt\"]\n");
        let path = dir.join("r.toml");
        std::fs::write(&path, &text).unwrap();
        let mut reg = Registry::new();
        crate::builtin::register(&mut reg);
        crate::plan::plan_source(&Source { path, text }, &reg).unwrap()
    }

    /// Regression (issue 14, defect 4): two recipes sharing a `[pipeline] name` (and a cache)
    /// overwrote each other's "last run" pointers, so gc dropped the other's entries. Pointers are
    /// keyed by recipe identity; a copied project keeps its identity.
    #[test]
    fn recipes_sharing_a_name_keep_separate_last_pointers() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(&root.path().join(".pipeline")).unwrap();
        let (a, b) = (plan_at(&root.path().join("a"), "same"), plan_at(&root.path().join("b"), "same"));
        assert_ne!(super::recipe_identity(&a, &store), super::recipe_identity(&b, &store));
        let opts = super::ExecOptions::default();
        for p in [&a, &b] {
            super::run(p, &store, &opts, std::sync::Arc::new(super::NullReporter)).unwrap();
        }
        let last = store.all_last();
        assert_eq!(last.len(), 2, "{last:?}");
        assert_ne!(last[0].2, last[1].2, "each recipe's own entry is its latest");

        // A copy of the project (recipe dirs and cache moved together) keeps the identities.
        let copy = tempfile::tempdir().unwrap();
        let store2 = Store::open(&copy.path().join(".pipeline")).unwrap();
        let a2 = plan_at(&copy.path().join("a"), "same");
        assert_eq!(super::recipe_identity(&a, &store), super::recipe_identity(&a2, &store2));
    }
}
