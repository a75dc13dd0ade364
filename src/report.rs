//! Reporters: indicatif bars + summary table for humans, one JSON event per line for machines.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

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
pub struct Human {
    mp: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Human {
    pub fn new() -> Self {
        Human { mp: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()), bars: Mutex::new(HashMap::new()) }
    }
    fn line(&self, s: String) {
        if self.mp.is_hidden() {
            eprintln!("{s}");
        } else {
            let _ = self.mp.println(s);
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
        self.line(format!("warning: {msg}"));
    }
    fn stage_started(&self, id: &str, kind: &str, reason: &DirtyReason) {
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
