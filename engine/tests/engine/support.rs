//! What the engine tests share: a test-only stage kind registered by the tests themselves, a
//! project in a temp dir, a reporter that records what happened, and the child process that runs a
//! recipe for the kill -9 and lock tests.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use pipeline_cache::{ArtifactCheck, Store};
use pipeline_engine::{
    exec, Declared, DirtyReason, EventSink, ExecError, ExecOptions, Plan, PlanCtx, Registry, Reporter, RunCtx,
    RunSummary, Stage, StageError, StageEvent, StageOutcome,
};
use serde::Deserialize;

/// Test-only kind `step`. Output `data/out.txt` = `text` followed by the content of every input
/// file. `salt` enters the key but not the output (early cutoff); `steps` × `step_ms` of
/// cancellable work, checkpointed in the scratch dir when `checkpoint`; `fail` makes it fail;
/// `checked_reads` reads the inputs through the cache's checked reads. Its report records the
/// device it was given.
pub struct Step {
    pub kind: &'static str,
    pub version: u32,
}

pub const STEP: Step = Step { kind: "step", version: 1 };

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepParams {
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
    /// Read the inputs through `pipeline_cache::checked` (as the workspace's loaders do) instead
    /// of plain `std::fs`.
    #[serde(default)]
    checked_reads: bool,
}

fn read_plain(path: &Path) -> std::io::Result<String> {
    fs::read_to_string(path)
}

/// Every file under `root`, sorted by path.
fn files_under(root: &Path) -> Vec<PathBuf> {
    if root.is_file() {
        return vec![root.to_path_buf()];
    }
    let mut names: Vec<PathBuf> = fs::read_dir(root).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    names.iter().flat_map(|p| files_under(p)).collect()
}

impl Stage for Step {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn summary(&self) -> &'static str {
        "(test only) write text plus inputs, optionally slowly, checkpointed or failing"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        let _: StepParams = ctx.params()?;
        Ok(Declared { outputs: vec!["data".into()], files: vec![] })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let p: StepParams = ctx.params()?;
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
                for f in files_under(part) {
                    let read = if p.checked_reads { pipeline_cache::checked::read_to_string } else { read_plain };
                    text.push_str(&read(&f).map_err(|e| StageError::io(&f, e))?);
                }
            }
        }
        fs::write(&out, &text).map_err(|e| StageError::io(&out, e))?;
        ctx.set_report(serde_json::json!({
            "bytes": text.len(),
            "resumed_from": start,
            "device": ctx.device().to_string(),
        }));
        Ok(())
    }
}

/// The built-in kinds plus `step`.
pub fn registry() -> Registry {
    registry_with([STEP])
}

/// The built-in kinds plus the given `step`-like stages.
pub fn registry_with(steps: impl IntoIterator<Item = Step>) -> Registry {
    let mut r = Registry::new();
    pipeline_engine::builtin::register(&mut r);
    for s in steps {
        r.register(s);
    }
    r
}

pub fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// a → b → c ; d ; (c, d) → e
pub const DIAMOND: &str = r#"
[pipeline]
name = "t"
seed = 1

[stages.a]
kind = "step"
params.text = "A"

[stages.b]
kind = "step"
inputs.x = "a.data"
params.text = "B"
params.salt = 1

[stages.c]
kind = "step"
inputs.x = "b.data"
params.text = "C"

[stages.d]
kind = "step"
params.text = "D"

[stages.e]
kind = "step"
inputs.x = ["c.data", "d.data"]
params.text = "E"
"#;

/// a → slow (checkpointed, 20 × 50 ms) → after
pub const SLOW: &str = r#"
[pipeline]
name = "slow"
[stages.a]
kind = "step"
params.text = "A"
[stages.slow]
kind = "step"
inputs.x = "a.data"
params = { text = "S", steps = 20, step_ms = 50, checkpoint = true }
[stages.after]
kind = "step"
inputs.x = "slow.data"
params.text = "Z"
"#;

/// What a run reported, in order.
#[derive(Debug, Clone)]
pub enum Event {
    Warning(String),
    Started { id: String, reason: DirtyReason },
    Done { id: String },
    Stage { id: String, event: StageEvent },
}

/// A reporter that records every event.
#[derive(Default)]
pub struct Recorder(Mutex<Vec<Event>>);

impl Recorder {
    fn push(&self, e: Event) {
        self.0.lock().unwrap().push(e);
    }
}
impl EventSink for Recorder {
    fn stage_event(&self, id: &str, event: StageEvent) {
        self.push(Event::Stage { id: id.into(), event });
    }
}
impl Reporter for Recorder {
    fn warning(&self, msg: &str) {
        self.push(Event::Warning(msg.into()));
    }
    fn stage_started(&self, id: &str, _kind: &str, reason: &DirtyReason) {
        self.push(Event::Started { id: id.into(), reason: reason.clone() });
    }
    fn stage_done(&self, o: &StageOutcome) {
        self.push(Event::Done { id: o.id.clone() });
    }
}

/// A finished run: its summary and what the reporter saw.
pub struct Run {
    pub summary: RunSummary,
    pub events: Vec<Event>,
}

impl Run {
    pub fn outcome(&self, id: &str) -> &StageOutcome {
        self.summary.outcomes.iter().find(|o| o.id == id).unwrap_or_else(|| panic!("no stage {id}"))
    }
    /// Sorted ids of the stages that ended with this status label (`ran`, `cached`, ...).
    pub fn with_status(&self, label: &str) -> Vec<String> {
        let mut ids: Vec<String> =
            self.summary.outcomes.iter().filter(|o| o.status.label() == label).map(|o| o.id.clone()).collect();
        ids.sort();
        ids
    }
    /// Sorted ids of the stages the reporter was told about (`stage_done`).
    pub fn reported(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .events
            .iter()
            .filter_map(|e| if let Event::Done { id, .. } = e { Some(id.clone()) } else { None })
            .collect();
        ids.sort();
        ids
    }
    pub fn output_digest(&self, id: &str) -> String {
        self.outcome(id).outputs.get("data").unwrap_or_else(|| panic!("no output for {id}")).digest.clone()
    }
    pub fn warnings(&self) -> Vec<String> {
        self.events.iter().filter_map(|e| if let Event::Warning(w) = e { Some(w.clone()) } else { None }).collect()
    }
    /// Why each dispatched stage ran, by id.
    pub fn reasons(&self) -> BTreeMap<String, DirtyReason> {
        self.events
            .iter()
            .filter_map(
                |e| if let Event::Started { id, reason } = e { Some((id.clone(), reason.clone())) } else { None },
            )
            .collect()
    }
    pub fn messages(&self, stage: &str) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Stage { id, event: StageEvent::Message(m) } if id == stage => Some(m.clone()),
                _ => None,
            })
            .collect()
    }
    pub fn ok(self) -> Self {
        assert!(!self.summary.failed() && !self.summary.cancelled, "run failed: {:?}", self.summary.outcomes);
        self
    }
}

/// A recipe `r.toml` in a temp dir, with its cache in `.pipeline/` beside it.
pub struct Project {
    pub dir: tempfile::TempDir,
    pub registry: Registry,
}

impl Project {
    pub fn new(recipe: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("r.toml"), recipe).unwrap();
        Project { dir, registry: registry() }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn recipe(&self) -> PathBuf {
        self.path().join("r.toml")
    }
    pub fn write(&self, name: &str, text: &str) {
        let p = self.path().join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    pub fn edit(&self, from: &str, to: &str) {
        let t = fs::read_to_string(self.recipe()).unwrap();
        assert!(t.contains(from), "recipe has no `{from}`");
        fs::write(self.recipe(), t.replacen(from, to, 1)).unwrap();
    }
    pub fn store(&self) -> Store {
        Store::open(&self.path().join(".pipeline")).unwrap()
    }
    pub fn plan(&self) -> Plan {
        pipeline_engine::plan(&self.recipe(), &self.registry).unwrap_or_else(|e| panic!("{e}"))
    }
    pub fn artifact(&self, digest: &str) -> PathBuf {
        self.store().artifact_path(digest)
    }
    /// The text a `step` stage wrote.
    pub fn out_text(&self, run: &Run, id: &str) -> String {
        fs::read_to_string(self.artifact(&run.output_digest(id)).join("out.txt")).unwrap()
    }
    /// Like `pipeline run`: take the cache lock, clean `tmp/`, run.
    pub fn try_run(&self, opts: &ExecOptions) -> Result<Run, ExecError> {
        let plan = self.plan();
        let store = self.store();
        let _lock = store.lock(|| {})?;
        store.clean_tmp()?;
        let rec = Arc::new(Recorder::default());
        let summary = exec::run(&plan, &store, opts, rec.clone())?;
        let events = rec.0.lock().unwrap().clone();
        Ok(Run { summary, events })
    }
    pub fn run_with(&self, opts: &ExecOptions) -> Run {
        self.try_run(opts).unwrap_or_else(|e| panic!("{e}"))
    }
    pub fn run(&self) -> Run {
        self.run_with(&ExecOptions::default())
    }
    /// Like `pipeline cache verify`: the problems found (corrupt or missing artifacts, unreadable entries).
    pub fn verify(&self) -> Vec<String> {
        let store = self.store();
        let mut bad = Vec::new();
        for d in store.artifacts().unwrap() {
            if let ArtifactCheck::Corrupt(why) = store.verify_artifact(&d) {
                bad.push(format!("corrupt {d}: {why}"));
            }
        }
        for e in store.entries().unwrap() {
            match e {
                Ok(e) => bad.extend(
                    e.outputs
                        .values()
                        .filter(|o| !store.artifact_path(&o.digest).is_dir())
                        .map(|o| format!("missing {}", o.digest)),
                ),
                Err(e) => bad.push(e.to_string()),
            }
        }
        bad
    }

    /// Start this test binary again as a child that runs the recipe like `pipeline run` (see
    /// [`child_process`]), its stdout piped.
    pub fn spawn_child(&self) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "support::child_process", "--nocapture", "--test-threads=1", "-q"])
            .env(CHILD_ENV, self.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// Set (to the project directory) only in the child processes [`Project::spawn_child`] starts.
const CHILD_ENV: &str = "PIPELINE_ENGINE_TEST_CHILD";

/// Lines the child prints on stdout, each after `EVENT `.
pub fn child_events(child: &mut Child) -> impl Iterator<Item = Vec<String>> {
    let out = BufReader::new(child.stdout.take().unwrap());
    out.lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("EVENT ").map(|rest| rest.split(' ').map(str::to_string).collect::<Vec<_>>()))
}

/// Prints the events the parent waits for: `EVENT waiting_for_lock`, `EVENT metric <stage> <step>`,
/// `EVENT done <stage> <status>`.
struct PrintReporter;
fn print_event(line: String) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "EVENT {line}").unwrap();
    out.flush().unwrap();
}
impl EventSink for PrintReporter {
    fn stage_event(&self, id: &str, event: StageEvent) {
        if let StageEvent::Metric { step, .. } = event {
            print_event(format!("metric {id} {step}"));
        }
    }
}
impl Reporter for PrintReporter {
    fn stage_done(&self, o: &StageOutcome) {
        print_event(format!("done {} {}", o.id, o.status.label()));
    }
}

/// Not a test: the body of the child process [`Project::spawn_child`] starts (it does nothing
/// unless [`CHILD_ENV`] is set). Like `pipeline run`: lock, clean `tmp/`, run, report on stdout.
#[test]
#[ignore = "run only as the child process of the kill -9 and lock tests"]
fn child_process() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let dir = PathBuf::from(dir);
    let plan = pipeline_engine::plan(&dir.join("r.toml"), &registry()).unwrap_or_else(|e| panic!("{e}"));
    let store = Store::open(&dir.join(".pipeline")).unwrap();
    let _lock = store.lock(|| print_event("waiting_for_lock".into())).unwrap();
    store.clean_tmp().unwrap();
    let summary = exec::run(&plan, &store, &ExecOptions::default(), Arc::new(PrintReporter)).unwrap();
    assert!(!summary.failed());
}
