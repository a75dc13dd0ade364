//! What a run leaves for people to look at, beside the cache: the run directory
//! `<cache dir>/runs/<pipeline name>/` with `report.html` and `tensorboard/<stage id>/` (each
//! stage's TensorBoard event files, copied out of its cached artifacts, so
//! `tensorboard --logdir <cache dir>/runs/<name>/tensorboard` shows the whole run). A stage's
//! `logging_dir` param puts its event files there instead (relative to the recipe).
//!
//! `pipeline run` writes both after executing; `pipeline report` rewrites them from the cache
//! alone. Every file is written atomically (temp file + rename). What they read of the cache
//! (`metrics.jsonl`, the event files) is checked against the artifact's digest while it is read
//! ([`pipeline_cache::checked`]): a corrupt artifact is left out of the report with a warning and
//! its entries are dropped, so the next `pipeline run` re-creates it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pipeline_cache::{Entry, EntryOutput, Store};
use pipeline_engine::{exec, Plan, RunSummary, Status};
use pipeline_stages::TENSORBOARD_DIR;
use pipeline_train::Record;

use crate::graph::{Graph, NodeStatus};
use crate::html_report::{self, RunView, StageView};

/// `<cache dir>/runs/<pipeline name>/`.
pub fn run_dir(store: &Store, plan: &Plan) -> PathBuf {
    store.root().join("runs").join(&plan.name)
}

/// One stage's data for the page and the TensorBoard copy.
struct Found {
    status: NodeStatus,
    view: StageView,
    outputs: BTreeMap<String, EntryOutput>,
}

fn view_of(
    store: &Store,
    outputs: &BTreeMap<String, EntryOutput>,
    entry_report: Option<serde_json::Value>,
) -> StageView {
    let mut v = StageView { report: entry_report, ..Default::default() };
    for (name, o) in outputs {
        let path = store.artifact_path(&o.digest);
        let metrics = path.join("metrics.jsonl");
        if v.history.is_empty() && metrics.is_file() && arm(store, &o.digest, &metrics) {
            if let Some(bytes) = checked_read(store, &o.digest, &metrics) {
                let text = String::from_utf8_lossy(&bytes);
                v.history = text.lines().filter_map(|l| serde_json::from_str::<Record>(l).ok()).collect();
            }
        }
        v.outputs.push((name.clone(), path, o.bytes));
    }
    v
}

/// Arms the cached artifact `digest` for checked reads ([`Store::expect_reads`]); `false` when
/// its stamp already shows it corrupt (then dropped, with a warning naming `what`).
fn arm(store: &Store, digest: &str, what: &Path) -> bool {
    match store.expect_reads(digest) {
        pipeline_cache::ArtifactCheck::Corrupt(why) => {
            drop_corrupt(store, digest, what, &why.to_string());
            false
        }
        _ => true,
    }
}

/// `file` of the armed artifact `digest`, read once and checked against the cache's digest while
/// read ([`pipeline_cache::checked::read`]). `None` when it cannot be read or is corrupt (then
/// dropped, with a warning naming the file).
fn checked_read(store: &Store, digest: &str, file: &Path) -> Option<Vec<u8>> {
    match pipeline_cache::checked::read(file) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            let _ = pipeline_cache::checked::take_corrupt_file(&store.artifact_path(digest));
            drop_corrupt(store, digest, file, &e.to_string());
            None
        }
        Err(e) => {
            eprintln!("warning: {}: {e}", file.display());
            None
        }
    }
}

/// A corrupt artifact left out of the report: its entries dropped as every command drops them
/// ([`crate::common::corrupt`]), said as a warning.
fn drop_corrupt(store: &Store, digest: &str, what: &Path, why: &str) {
    eprintln!("warning: {}: {} (left out of the report)", what.display(), crate::common::corrupt(store, digest, why));
}

fn entry_duration(e: &Entry) -> Duration {
    Duration::from_millis(e.duration_ms)
}

/// The stages as this run left them.
fn from_summary(store: &Store, summary: &RunSummary) -> Vec<Found> {
    summary
        .outcomes
        .iter()
        .map(|o| {
            let status = match &o.status {
                Status::Ran => NodeStatus::Ran,
                Status::Cached => NodeStatus::Cached,
                Status::Failed(e) => NodeStatus::Failed(e.clone()),
                Status::Skipped(w) => NodeStatus::NotRun(w.clone()),
                Status::Cancelled => NodeStatus::NotRun("interrupted".into()),
                Status::NotSelected => NodeStatus::NotRun("not selected (--only / --until)".into()),
            };
            let mut view = view_of(store, &o.outputs, o.report.clone());
            view.duration = match o.status {
                Status::Ran | Status::Failed(_) => Some(o.duration),
                // A cached stage's time is that of the run that made its entry.
                Status::Cached => {
                    o.key.as_deref().and_then(|k| store.entry(k).ok().flatten()).map(|e| entry_duration(&e))
                }
                _ => None,
            };
            Found { status, view, outputs: o.outputs.clone() }
        })
        .collect()
}

/// The stages as the cache has them: the current entry when cached, else the stage's last
/// entry (marked stale), else nothing.
fn from_cache(plan: &Plan, store: &Store) -> Vec<Found> {
    exec::statuses(plan, store, &[])
        .into_iter()
        .zip(&plan.stages)
        .map(|(st, s)| {
            let status = NodeStatus::from_status(&st);
            let current = st.key_hex.as_deref().filter(|_| status == NodeStatus::Cached);
            let (entry, stale) = match current {
                Some(k) => (store.entry(k).ok().flatten(), false),
                None => (store.last(&plan.name, &s.id).and_then(|k| store.entry(&k).ok().flatten()), true),
            };
            match entry {
                Some(e) if e.outputs.values().all(|o| store.check_artifact(&o.digest).is_ok()) => {
                    let mut view = view_of(store, &e.outputs, e.report.clone());
                    view.duration = Some(entry_duration(&e));
                    view.stale = stale;
                    let outputs = if stale { BTreeMap::new() } else { e.outputs };
                    Found { status, view, outputs }
                }
                _ => Found { status, view: StageView::default(), outputs: BTreeMap::new() },
            }
        })
        .collect()
}

/// Copy each stage's event files (the `tensorboard/` folder of an output artifact) to its
/// `logging_dir`, or `<run dir>/tensorboard/<stage id>/`; event files of an earlier run left
/// there are removed. Returns the whole run's log directory when any stage has files in it.
fn place_tensorboard(plan: &Plan, store: &Store, found: &[Found], run_dir: &Path) -> io::Result<Option<PathBuf>> {
    let root = run_dir.join("tensorboard");
    let mut any = false;
    for (s, f) in plan.stages.iter().zip(found) {
        let sources: Vec<(&str, PathBuf)> = f
            .outputs
            .values()
            .map(|o| (o.digest.as_str(), store.artifact_path(&o.digest).join(TENSORBOARD_DIR)))
            .filter(|(_, p)| p.is_dir())
            .collect();
        if sources.is_empty() {
            continue;
        }
        let target = match s.params.get("logging_dir").and_then(|v| v.as_str()) {
            Some(dir) => plan.dir.join(dir),
            None => {
                any = true;
                root.join(&s.id)
            }
        };
        let mut written = Vec::new();
        for (digest, src) in sources {
            if !arm(store, digest, &src) {
                continue;
            }
            for file in std::fs::read_dir(&src)? {
                let file = file?;
                if !file.file_type()?.is_file() {
                    continue;
                }
                let name = file.file_name();
                // unreadable or corrupt (and then dropped): nothing more of this artifact is copied
                let Some(bytes) = checked_read(store, digest, &file.path()) else { break };
                pipeline_cache::fs::write_atomic(&target.join(&name), &bytes)?;
                written.push(name);
            }
        }
        if written.is_empty() {
            continue;
        }
        for old in std::fs::read_dir(&target)? {
            let old = old?;
            let name = old.file_name();
            if name.to_string_lossy().contains("tfevents") && !written.contains(&name) {
                std::fs::remove_file(old.path())?;
            }
        }
    }
    Ok(any.then_some(root))
}

/// Where the run's monitoring files went.
pub struct Written {
    pub report: PathBuf,
    pub tensorboard: Option<PathBuf>,
}

fn write(
    plan: &Plan,
    store: &Store,
    found: Vec<Found>,
    source: &'static str,
    elapsed: Option<Duration>,
    out: Option<&Path>,
) -> io::Result<Written> {
    let dir = run_dir(store, plan);
    let tensorboard = place_tensorboard(plan, store, &found, &dir)?;
    let (statuses, stages): (Vec<_>, Vec<_>) = found.into_iter().map(|f| (f.status, f.view)).unzip();
    let view = RunView {
        graph: Graph::with_statuses(plan, statuses),
        stages,
        recipe: plan.path.display().to_string(),
        source,
        elapsed,
        generated_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        tensorboard: tensorboard.clone(),
    };
    let report = out.map(Path::to_path_buf).unwrap_or_else(|| dir.join("report.html"));
    pipeline_cache::fs::write_atomic(&report, html_report::render(&view).as_bytes())?;
    Ok(Written { report, tensorboard })
}

/// After `pipeline run`: the page and the TensorBoard copies of what this run left.
pub fn after_run(plan: &Plan, store: &Store, summary: &RunSummary) -> io::Result<Written> {
    write(plan, store, from_summary(store, summary), "run", Some(summary.elapsed), None)
}

/// `pipeline report`: the same from the cache alone.
pub fn from_cache_only(plan: &Plan, store: &Store, out: Option<&Path>) -> io::Result<Written> {
    write(plan, store, from_cache(plan, store), "report", None, out)
}
