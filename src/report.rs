//! Reporters: indicatif bars + summary table for humans, one JSON event per line for machines.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipeline_engine::{DirtyReason, EventSink, Reporter, RunSummary, StageEvent, StageOutcome, Status};
use serde_json::json;

use crate::common::{human_bytes, human_duration, report_counts};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Progress bars on stderr (hidden when stderr is not a terminal) and one line per finished stage.
///
/// When stdout is not a terminal (`pipeline run ... > run.log`, CI, nohup, Slurm), the lines go
/// to stdout instead, plain, with one line per stage start and, for training stages, one line
/// per logging window (`logging_steps`): step/total, loss, learning rate, tokens/s and ETA, as
/// transformers' Trainer logs them.
pub struct Human {
    mp: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    /// Per-stage progress for the plain lines; `None` when stdout is a terminal.
    plain: Option<Mutex<HashMap<String, Plain>>>,
}

/// What a plain progress line needs to know about a running stage.
#[derive(Default)]
struct Plain {
    total: Option<u64>,
    /// The first position reported and when (the ETA is measured from there, so a resumed
    /// run's rate is not inflated by the steps it skipped).
    first: Option<(u64, Instant)>,
    started: Option<Instant>,
    /// Training figures of the window being reported: (step, name → value).
    pending: Option<(u64, BTreeMap<String, f64>)>,
}

impl Plain {
    fn eta(&self, pos: u64, now: Instant) -> Option<Duration> {
        let total = self.total?;
        let (p0, t0) = match self.first {
            Some((p0, t0)) if pos > p0 => (p0, t0),
            // Only one position seen: assume it is one step done since the start.
            _ => (pos.saturating_sub(1), self.started?),
        };
        let per_step = now.duration_since(t0).as_secs_f64() / (pos - p0).max(1) as f64;
        Some(Duration::from_secs_f64(per_step * total.saturating_sub(pos) as f64))
    }
}

/// The plain line of one logging window (`eta` from the steps done so far).
pub fn progress_line(
    stage: &str,
    step: u64,
    total: Option<u64>,
    figures: &BTreeMap<String, f64>,
    eta: Option<Duration>,
) -> String {
    let mut line = match total {
        Some(t) if t > 0 => format!("[{stage}] step {step}/{t} ({:.0}%)", step as f64 * 100.0 / t as f64),
        _ => format!("[{stage}] step {step}"),
    };
    let mut add = |name: &str, text: String| line.push_str(&format!(" | {name} {text}"));
    if let Some(v) = figures.get("loss") {
        add("loss", format!("{v:.4}"));
    }
    if let Some(v) = figures.get("learning_rate") {
        add("lr", format!("{v:.3e}"));
    }
    if let Some(v) = figures.get("grad_norm") {
        add("grad_norm", format!("{v:.3}"));
    }
    if let Some(v) = figures.get("tokens_per_second") {
        add("tokens/s", format!("{v:.0}"));
    }
    if let Some(v) = figures.get("eval_loss") {
        add("eval_loss", format!("{v:.4}"));
    }
    if let Some(e) = eta {
        add("eta", human_duration(e));
    }
    line
}

impl Human {
    pub fn new() -> Self {
        let plain = (!std::io::stdout().is_terminal()).then(|| Mutex::new(HashMap::new()));
        Human {
            mp: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Mutex::new(HashMap::new()),
            plain,
        }
    }
    fn line(&self, s: String) {
        if self.plain.is_some() {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{s}");
            let _ = out.flush();
        } else if self.mp.is_hidden() {
            eprintln!("{s}");
        } else {
            let _ = self.mp.println(s);
        }
    }
    /// Plain-mode bookkeeping of a stage event; returns the line to print, if any.
    fn plain_event(&self, stage_id: &str, event: &StageEvent) -> Option<String> {
        let mut map = self.plain.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        let p = map.entry(stage_id.to_string()).or_default();
        let now = Instant::now();
        match event {
            StageEvent::ProgressStart { total, .. } => {
                *p = Plain { total: *total, started: Some(now), ..Default::default() };
                None
            }
            StageEvent::Metric { name, step, value } if name == "eval_loss" => {
                Some(progress_line(stage_id, *step, p.total, &BTreeMap::from([(name.clone(), *value)]), None))
            }
            StageEvent::Metric { name, step, value }
                if ["loss", "learning_rate", "grad_norm", "tokens_per_second"].contains(&name.as_str()) =>
            {
                match &mut p.pending {
                    Some((s, figures)) if s == step => {
                        figures.insert(name.clone(), *value);
                    }
                    _ => p.pending = Some((*step, BTreeMap::from([(name.clone(), *value)]))),
                }
                None
            }
            StageEvent::ProgressSet { pos } => {
                if p.first.is_none() {
                    p.first = Some((*pos, now));
                }
                match p.pending.take() {
                    Some((step, figures)) if step == *pos => {
                        Some(progress_line(stage_id, step, p.total, &figures, p.eta(step, now)))
                    }
                    other => {
                        p.pending = other;
                        None
                    }
                }
            }
            _ => None,
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} [{bar:30}] {pos}/{len} ({eta} left)")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl EventSink for Human {
    fn stage_event(&self, stage_id: &str, event: StageEvent) {
        if let Some(line) = self.plain_event(stage_id, &event) {
            self.line(line);
        }
        let bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bars.get(stage_id);
        match event {
            StageEvent::ProgressStart { label, total } => {
                if let Some(b) = bar {
                    b.set_message(label);
                    b.set_position(0);
                    match total {
                        Some(t) => {
                            b.set_length(t);
                            b.set_style(bar_style());
                        }
                        None => b.set_style(spinner_style()),
                    }
                }
            }
            StageEvent::ProgressSet { pos } => {
                if let Some(b) = bar {
                    b.set_position(pos);
                }
            }
            StageEvent::ProgressFinish => {}
            StageEvent::Metric { .. } => {}
            StageEvent::Message(m) => {
                drop(bars);
                self.line(format!("  [{stage_id}] {m}"));
            }
        }
    }
}

impl Reporter for Human {
    fn warning(&self, msg: &str) {
        if self.mp.is_hidden() {
            eprintln!("warning: {msg}");
        } else {
            let _ = self.mp.println(format!("warning: {msg}"));
        }
    }
    fn stage_started(&self, id: &str, kind: &str, reason: &DirtyReason) {
        if self.plain.is_some() {
            self.line(format!(" start {id} ({kind}): {reason}"));
        }
        let b = self.mp.add(ProgressBar::new_spinner());
        b.set_style(spinner_style());
        b.set_prefix(id.to_string());
        b.set_message(format!("({kind}) {reason}"));
        b.enable_steady_tick(Duration::from_millis(120));
        self.bars.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), b);
    }
    fn stage_done(&self, o: &StageOutcome) {
        if let Some(b) = self.bars.lock().unwrap_or_else(|e| e.into_inner()).remove(&o.id) {
            b.finish_and_clear();
            self.mp.remove(&b);
        }
        match &o.status {
            Status::Ran => self.line(format!("   ran {} ({}) in {}", o.id, o.kind, human_duration(o.duration))),
            Status::Failed(e) => self.line(format!("failed {} ({}): {e}", o.id, o.kind)),
            Status::Skipped(why) => self.line(format!("  skip {} ({}): {why}", o.id, o.kind)),
            Status::Cancelled => self.line(format!("  stop {} ({}): interrupted", o.id, o.kind)),
            Status::Cached | Status::NotSelected => {}
        }
    }
}

/// The table printed after a human run.
pub fn summary_table(s: &RunSummary) -> String {
    let rows: Vec<[String; 6]> = s
        .outcomes
        .iter()
        .filter(|o| o.status != Status::NotSelected)
        .map(|o| {
            let dur = if o.status == Status::Ran || matches!(o.status, Status::Failed(_)) {
                human_duration(o.duration)
            } else {
                "-".into()
            };
            let size = if o.outputs.is_empty() { "-".into() } else { human_bytes(o.bytes()) };
            [o.id.clone(), o.kind.clone(), o.status.label().to_string(), dur, size, report_counts(o.report.as_ref())]
        })
        .collect();
    let header = ["stage", "kind", "status", "duration", "output", "report"];
    let mut w = header.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let fmt_row = |r: &[String]| {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        line.trim_end().to_string()
    };
    let mut out = fmt_row(&header.map(String::from));
    out.push('\n');
    for r in &rows {
        out.push_str(&fmt_row(r));
        out.push('\n');
    }
    let count = |f: &dyn Fn(&Status) -> bool| s.outcomes.iter().filter(|o| f(&o.status)).count();
    out.push_str(&format!(
        "{} ran, {} cached, {} failed, {} skipped{} in {}\n",
        count(&|s| *s == Status::Ran),
        count(&|s| *s == Status::Cached),
        count(&|s| matches!(s, Status::Failed(_))),
        count(&|s| matches!(s, Status::Skipped(_))),
        if s.cancelled { " (interrupted)" } else { "" },
        human_duration(s.elapsed)
    ));
    // Result tables stages report (`evaluate`: the evalscope table), cached ones included.
    for o in s.outcomes.iter().filter(|o| matches!(o.status, Status::Ran | Status::Cached)) {
        if let Some(table) = o.report.as_ref().and_then(|r| r.get("table")).and_then(|t| t.as_str()) {
            out.push_str(&format!("\n{} ({}):\n{}", o.id, o.kind, table));
            if !table.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    out
}

/// One JSON object per line on stdout.
pub struct Json {
    out: Mutex<std::io::Stdout>,
}

/// One JSON event on its own stdout line (`--log-format json` for the commands other than `run`).
pub fn print_json(v: serde_json::Value) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{v}");
    let _ = o.flush();
}

impl Json {
    pub fn new() -> Self {
        Json { out: Mutex::new(std::io::stdout()) }
    }
    pub fn emit(&self, v: serde_json::Value) {
        let mut o = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(o, "{v}");
        let _ = o.flush();
    }
}

pub fn outcome_json(o: &StageOutcome) -> serde_json::Value {
    let event = match o.status {
        Status::Ran => "stage_finished",
        Status::Cached => "stage_cached",
        Status::Failed(_) => "stage_failed",
        Status::Skipped(_) => "stage_skipped",
        Status::Cancelled => "stage_interrupted",
        Status::NotSelected => "stage_not_selected",
    };
    let mut v = json!({
        "event": event, "stage": o.id, "kind": o.kind, "status": o.status.label(),
        "key": o.key, "duration_ms": o.duration.as_millis() as u64, "bytes": o.bytes(),
        "outputs": o.outputs.iter().map(|(k, e)| (k.clone(), json!(e.digest))).collect::<serde_json::Map<_, _>>(),
        "report": o.report,
    });
    if let Status::Failed(e) | Status::Skipped(e) = &o.status {
        v["error"] = json!(e);
    }
    v
}

impl EventSink for Json {
    fn stage_event(&self, stage_id: &str, event: StageEvent) {
        let v = match event {
            StageEvent::ProgressStart { label, total } => {
                json!({"event": "progress_start", "stage": stage_id, "label": label, "total": total})
            }
            StageEvent::ProgressSet { .. } => return,
            StageEvent::ProgressFinish => json!({"event": "progress_finish", "stage": stage_id}),
            StageEvent::Metric { name, step, value } => {
                json!({"event": "metric", "stage": stage_id, "name": name, "step": step, "value": value})
            }
            StageEvent::Message(m) => json!({"event": "message", "stage": stage_id, "message": m}),
        };
        self.emit(v);
    }
}

impl Reporter for Json {
    fn warning(&self, msg: &str) {
        self.emit(json!({"event": "warning", "message": msg}));
    }
    fn stage_started(&self, id: &str, kind: &str, reason: &DirtyReason) {
        self.emit(json!({"event": "stage_started", "stage": id, "kind": kind, "reason": reason.to_string()}));
    }
    fn stage_done(&self, o: &StageOutcome) {
        self.emit(outcome_json(o));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_progress_lines_read_like_the_trainers_logs() {
        let figures = BTreeMap::from([
            ("loss".to_string(), 2.345_678),
            ("learning_rate".to_string(), 0.000_5),
            ("grad_norm".to_string(), 1.25),
            ("tokens_per_second".to_string(), 1234.4),
        ]);
        insta::assert_snapshot!(
            progress_line("sft", 10, Some(40), &figures, Some(Duration::from_secs(65))),
            @"[sft] step 10/40 (25%) | loss 2.3457 | lr 5.000e-4 | grad_norm 1.250 | tokens/s 1234 | eta 1m05s"
        );
        let eval = BTreeMap::from([("eval_loss".to_string(), 1.5)]);
        insta::assert_snapshot!(progress_line("sft", 40, Some(40), &eval, None), @"[sft] step 40/40 (100%) | eval_loss 1.5000");
    }

    /// The events a training stage sends (metrics of a window, then its step) make one line per
    /// window, with an ETA measured from the steps seen.
    #[test]
    fn a_line_per_logging_window_from_the_stage_events() {
        let h = Human {
            mp: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            bars: Mutex::new(HashMap::new()),
            plain: Some(Mutex::new(HashMap::new())),
        };
        let ev = |e: StageEvent| h.plain_event("sft", &e);
        let metric = |name: &str, step: u64, value: f64| StageEvent::Metric { name: name.into(), step, value };
        assert_eq!(ev(StageEvent::ProgressStart { label: "sft".into(), total: Some(4) }), None);
        assert_eq!(ev(StageEvent::ProgressSet { pos: 1 }), None, "no window ended at step 1");
        for (n, v) in [("loss", 2.0), ("learning_rate", 1e-3), ("grad_norm", 0.5), ("tokens_per_second", 99.0)] {
            assert_eq!(ev(metric(n, 2, v)), None);
        }
        let line = ev(StageEvent::ProgressSet { pos: 2 }).expect("the window of step 2 ends");
        assert!(
            line.starts_with("[sft] step 2/4 (50%) | loss 2.0000 | lr 1.000e-3 | grad_norm 0.500 | tokens/s 99 | eta "),
            "{line}"
        );
        assert_eq!(ev(StageEvent::ProgressSet { pos: 3 }), None);
        assert_eq!(ev(metric("eval_loss", 3, 1.25)).as_deref(), Some("[sft] step 3/4 (75%) | eval_loss 1.2500"));
        assert_eq!(ev(metric("samples_per_s", 3, 1.0)), None, "other figures make no line");
    }
}
