//! `report.html`: one self-contained page for a run (no scripts, no fonts, no network fetches):
//! the DAG with each stage's status and timing (inline SVG), a stage table, each training stage's
//! loss and learning-rate curves (inline SVG, from its `metrics.jsonl`) with the best checkpoint
//! and early stop marked, each evaluate stage's table (evalscope's columns), and every other
//! stage's report figures and output paths (quantisation costs, export files).
//!
//! [`RunView`] is what the page is made of; `pipeline run` fills it from the run's outcomes and
//! `pipeline report` from the cache, so both write the same page.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use pipeline_train::Record;

use crate::common::{human_bytes, human_duration};
use crate::graph::Graph;

/// One stage as the page shows it.
#[derive(Debug, Clone, Default)]
pub struct StageView {
    /// How long it ran (this run, or the cached entry's run).
    pub duration: Option<Duration>,
    /// The stage's report (the cache entry's).
    pub report: Option<serde_json::Value>,
    /// Output name → (artifact path, bytes).
    pub outputs: Vec<(String, PathBuf, u64)>,
    /// The training records of a `metrics.jsonl` among its outputs.
    pub history: Vec<Record>,
    /// The figures are those of an older entry than the current key (`pipeline report` on a
    /// recipe edited since).
    pub stale: bool,
}

/// The whole page.
#[derive(Debug, Clone)]
pub struct RunView {
    pub graph: Graph,
    /// In plan order, one per graph node.
    pub stages: Vec<StageView>,
    pub recipe: String,
    /// `"run"` (written by `pipeline run`) or `"cache"` (by `pipeline report`).
    pub source: &'static str,
    pub elapsed: Option<Duration>,
    pub generated_unix: u64,
    pub tensorboard: Option<PathBuf>,
}

/// HTML text escaping (also for attribute values).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1200px}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}\
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}\
.status{display:inline-block;padding:0 6px;border-radius:4px;border:1px solid #999}\
.muted{color:#777}code{font-size:.92em}section.stage{margin-bottom:1.5em}svg{max-width:100%;height:auto}";

/// The page.
pub fn render(v: &RunView) -> String {
    let g = &v.graph;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>pipeline run report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        esc(&g.name)
    );
    let _ = writeln!(h, "<h1>Run report: <code>{}</code></h1>", esc(&g.name));
    let count = |w: &str| g.nodes.iter().filter(|n| n.status.word() == w).count();
    let _ = writeln!(
        h,
        "<p>Recipe <code>{}</code>, seed {}, {} stages: {} ran, {} cached, {} failed, {} will run, {} not run{}. \
         Written by <code>pipeline {}</code> at {} (Unix time).</p>",
        esc(&v.recipe),
        g.seed,
        g.nodes.len(),
        count("ran"),
        count("cached"),
        count("failed"),
        count("will-run") + count("waiting"),
        count("not-run"),
        v.elapsed.map(|e| format!(", in {}", human_duration(e))).unwrap_or_default(),
        v.source,
        v.generated_unix
    );
    if let Some(tb) = &v.tensorboard {
        let _ = writeln!(h, "<p>TensorBoard: <code>tensorboard --logdir {}</code></p>", esc(&tb.display().to_string()));
    }

    h.push_str("<h2 id=\"dag\">Stages</h2>\n");
    h.push_str(&dag_svg(v));
    h.push_str("\n<table id=\"stages\">\n<tr><th>#</th><th>stage</th><th>kind</th><th>status</th><th>duration</th><th>output</th></tr>\n");
    for (i, (n, s)) in g.nodes.iter().zip(&v.stages).enumerate() {
        let bytes: u64 = s.outputs.iter().map(|o| o.2).sum();
        let _ = writeln!(
            h,
            "<tr data-stage=\"{id}\"><td class=\"n\">{}</td><td><a href=\"#stage-{id}\">{id}</a></td><td>{}</td>\
             <td><span class=\"status\" style=\"background:{}\">{}</span></td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            i + 1,
            esc(&n.kind),
            n.status.colour(),
            esc(&n.status.text()),
            s.duration.map(human_duration).unwrap_or_else(|| "-".into()),
            if s.outputs.is_empty() { "-".into() } else { human_bytes(bytes) },
            id = esc(&n.id),
        );
    }
    h.push_str("</table>\n");

    for (n, s) in g.nodes.iter().zip(&v.stages) {
        let _ = writeln!(
            h,
            "<section class=\"stage\" id=\"stage-{id}\">\n<h2>{id} <span class=\"muted\">({})</span></h2>",
            esc(&n.kind),
            id = esc(&n.id)
        );
        let _ = writeln!(
            h,
            "<p><span class=\"status\" style=\"background:{}\">{}</span>{}{}</p>",
            n.status.colour(),
            esc(&n.status.text()),
            s.duration.map(|d| format!(" in {}", human_duration(d))).unwrap_or_default(),
            if s.stale { " <span class=\"muted\">(figures of its last cached run)</span>" } else { "" }
        );
        if !s.history.is_empty() {
            h.push_str(&training_charts(s));
        }
        if let Some(rows) = s.report.as_ref().and_then(|r| r.get("rows")).and_then(|r| r.as_array()) {
            h.push_str(&eval_table(rows));
        }
        if let Some(r) = &s.report {
            h.push_str(&figures(r));
        }
        if !s.outputs.is_empty() {
            h.push_str("<table class=\"outputs\"><tr><th>output</th><th>path</th><th>size</th></tr>\n");
            for (name, path, bytes) in &s.outputs {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td><code>{}</code></td><td class=\"n\">{}</td></tr>",
                    esc(name),
                    esc(&path.display().to_string()),
                    human_bytes(*bytes)
                );
            }
            h.push_str("</table>\n");
        }
        h.push_str("</section>\n");
    }
    h.push_str("</body>\n</html>\n");
    h
}

/// The DAG as an inline SVG: columns by longest-path depth, one box per stage coloured by status.
fn dag_svg(v: &RunView) -> String {
    let g = &v.graph;
    let layers = g.layers();
    let (bw, bh, gx, gy, m) = (180.0, 58.0, 70.0, 22.0, 12.0);
    let mut row_of = vec![0usize; g.nodes.len()];
    let mut rows = vec![0usize; layers.iter().max().map_or(0, |d| d + 1)];
    for (i, &d) in layers.iter().enumerate() {
        row_of[i] = rows[d];
        rows[d] += 1;
    }
    let pos = |i: usize| (m + layers[i] as f64 * (bw + gx), m + row_of[i] as f64 * (bh + gy));
    let width = m * 2.0 + rows.len() as f64 * (bw + gx) - gx;
    let height = m * 2.0 + rows.iter().copied().max().unwrap_or(1) as f64 * (bh + gy) - gy;
    let mut s = format!(
        "<svg id=\"dag-svg\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" \
         orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#666\"/></marker></defs>\n"
    );
    for (i, n) in g.nodes.iter().enumerate() {
        let (x2, y2) = pos(i);
        for e in &n.inputs {
            let (x1, y1) = pos(e.from);
            let (sx, sy, tx, ty) = (x1 + bw, y1 + bh / 2.0, x2, y2 + bh / 2.0);
            let c = (tx - sx) / 2.0;
            let _ = writeln!(
                s,
                "<path d=\"M{sx:.1},{sy:.1} C{:.1},{sy:.1} {:.1},{ty:.1} {tx:.1},{ty:.1}\" fill=\"none\" stroke=\"#666\" \
                 marker-end=\"url(#arrow)\"><title>{}.{} → {}.{}</title></path>",
                sx + c,
                tx - c,
                esc(&g.nodes[e.from].id),
                esc(&e.output),
                esc(&n.id),
                esc(&e.input)
            );
        }
    }
    for (i, (n, st)) in g.nodes.iter().zip(&v.stages).enumerate() {
        let (x, y) = pos(i);
        let timing = st.duration.map(|d| format!(" · {}", human_duration(d))).unwrap_or_default();
        let _ = writeln!(
            s,
            "<a href=\"#stage-{id}\"><g class=\"node\" data-stage=\"{id}\"><title>{id} ({}): {}</title>\
             <rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw}\" height=\"{bh}\" rx=\"8\" fill=\"{}\" stroke=\"#555\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-weight=\"bold\">{}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#444\">{}{}</text></g></a>",
            esc(&n.kind),
            esc(&n.status.text()),
            n.status.colour(),
            x + 10.0,
            y + 18.0,
            esc(&clip(&n.id, 24)),
            x + 10.0,
            y + 34.0,
            esc(&clip(&n.kind, 26)),
            x + 10.0,
            y + 50.0,
            esc(n.status.word()),
            esc(&timing),
            id = esc(&n.id),
        );
    }
    s.push_str("</svg>\n");
    s
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}

/// One series of a chart.
struct Series<'a> {
    label: &'a str,
    colour: &'a str,
    points: Vec<(f64, f64)>,
    dots: bool,
}

/// A vertical marker line.
struct Mark {
    x: f64,
    label: String,
    colour: &'static str,
}

/// A line chart as inline SVG: axes with 5 ticks each, a legend, vertical marks.
fn line_chart(id: &str, title: &str, y_label: &str, series: &[Series<'_>], marks: &[Mark]) -> String {
    let (w, hgt, l, r, t, b) = (640.0, 300.0, 70.0, 20.0, 30.0, 40.0);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for p in pts {
        x0 = x0.min(p.0);
        x1 = x1.max(p.0);
        y0 = y0.min(p.1);
        y1 = y1.max(p.1);
    }
    for mk in marks {
        x0 = x0.min(mk.x);
        x1 = x1.max(mk.x);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    x0 = x0.min(0.0);
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(y1.abs() * 1e-3).max(1e-12);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let sy = |y: f64| t + (y1 - y) / (y1 - y0) * (hgt - t - b);
    let mut s = format!(
        "<svg id=\"{}\" class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" \
         viewBox=\"0 0 {w} {hgt}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"{w}\" height=\"{hgt}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" font-size=\"13\" font-weight=\"bold\">{}</text>\n",
        esc(id),
        l,
        esc(title)
    );
    let _ = writeln!(
        s,
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"#333\"/>",
        hgt - b,
        w - r,
        hgt - b,
        hgt - b
    );
    for k in 0..=4 {
        let fx = x0 + (x1 - x0) * k as f64 / 4.0;
        let fy = y0 + (y1 - y0) * k as f64 / 4.0;
        let _ = writeln!(
            s,
            "<line x1=\"{l}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            w - r,
            l - 6.0,
            sy(fy) + 4.0,
            num(fy),
            hgt - b + 16.0,
            num(fx),
            y = sy(fy),
            x = sx(fx),
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">step</text>\
         <text transform=\"translate(14,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        (l + w - r) / 2.0,
        hgt - 6.0,
        (t + hgt - b) / 2.0,
        esc(y_label)
    );
    for mk in marks {
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{t}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\">\
             <title>{}</title></line>",
            hgt - b,
            mk.colour,
            esc(&mk.label),
            x = sx(mk.x)
        );
    }
    for se in series {
        let path: Vec<String> = se
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
            se.colour,
            path.join(" ")
        );
        if se.dots {
            for p in &se.points {
                let _ =
                    write!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>", sx(p.0), sy(p.1), se.colour);
            }
            s.push('\n');
        }
    }
    // Legend: series, then marks.
    let mut ly = t + 8.0;
    let lx = w - r - 190.0;
    let items = series
        .iter()
        .map(|se| (se.label.to_string(), se.colour, false))
        .chain(marks.iter().map(|m| (m.label.clone(), m.colour, true)));
    for (label, colour, dashed) in items {
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"2\"{}/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            lx + 20.0,
            if dashed { " stroke-dasharray=\"4 3\"" } else { "" },
            lx + 26.0,
            ly + 4.0,
            esc(&label)
        );
        ly += 15.0;
    }
    s.push_str("</svg>\n");
    s
}

/// A tick label: 4 significant digits, scientific for tiny or huge values.
fn num(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".into()
        } else {
            s.to_string()
        }
    }
}

/// Loss (train and eval) and learning-rate curves, with the best checkpoint and early stop marked.
fn training_charts(s: &StageView) -> String {
    let mut train = Vec::new();
    let mut lr = Vec::new();
    let mut eval = Vec::new();
    for r in &s.history {
        match r {
            Record::Train(t) => {
                train.push((t.step as f64, t.loss));
                lr.push((t.step as f64, t.learning_rate));
            }
            Record::Eval(e) => eval.push((e.step as f64, e.eval_loss)),
        }
    }
    let rep = s.report.as_ref();
    let mut marks = Vec::new();
    if let Some(best) = rep.and_then(|r| r.get("best_step")).and_then(|v| v.as_u64()) {
        marks.push(Mark { x: best as f64, label: format!("best checkpoint (step {best})"), colour: "#009600" });
    }
    if rep.and_then(|r| r.get("stop")).and_then(|v| v.as_str()) == Some("early_stopped") {
        if let Some(step) = rep.and_then(|r| r.get("global_step")).and_then(|v| v.as_u64()) {
            marks.push(Mark { x: step as f64, label: format!("early stop (step {step})"), colour: "#000000" });
        }
    }
    let mut series = vec![Series { label: "train loss", colour: "#1f5fbf", points: train, dots: false }];
    if !eval.is_empty() {
        series.push(Series { label: "eval loss", colour: "#d62728", points: eval, dots: true });
    }
    let mut out = String::from("<div class=\"charts\">\n");
    out.push_str(&line_chart("loss-chart", "loss", "loss", &series, &marks));
    out.push_str(&line_chart(
        "lr-chart",
        "learning rate",
        "learning_rate",
        &[Series { label: "learning rate", colour: "#9467bd", points: lr, dots: false }],
        &[],
    ));
    out.push_str("</div>\n");
    out
}

/// An evaluate stage's rows in the seed's (evalscope's) columns.
fn eval_table(rows: &[serde_json::Value]) -> String {
    let mut s = String::from(
        "<table class=\"eval\"><tr><th>Model</th><th>Dataset</th><th>Metric</th><th>Subset</th><th>Num</th><th>Score</th><th>Cat.0</th></tr>\n",
    );
    let f = |r: &serde_json::Value, k: &str| esc(r.get(k).and_then(|v| v.as_str()).unwrap_or(""));
    for r in rows {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            f(r, "model"),
            f(r, "dataset"),
            f(r, "metric"),
            f(r, "subset"),
            r.get("num").and_then(|v| v.as_u64()).map(|n| n.to_string()).unwrap_or_default(),
            r.get("score").and_then(|v| v.as_f64()).map(|x| format!("{x:.4}")).unwrap_or_default(),
            f(r, "cat0")
        );
    }
    s.push_str("</table>\n");
    s
}

/// A report's scalar figures (counts, losses, quantisation errors, export paths...) as a table.
fn figures(r: &serde_json::Value) -> String {
    let Some(m) = r.as_object() else { return String::new() };
    let rows: Vec<(String, String)> = m
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "rows" | "table"))
        .filter_map(|(k, v)| {
            let text = match v {
                serde_json::Value::Null => return None,
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => match n.as_f64() {
                    Some(f) if f.fract() != 0.0 => format!("{f:.6}"),
                    _ => n.to_string(),
                },
                other => other.to_string(),
            };
            Some((k.clone(), text))
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from("<table class=\"figures\"><tr><th>figure</th><th>value</th></tr>\n");
    for (k, v) in rows {
        let _ = writeln!(s, "<tr><td>{}</td><td><code>{}</code></td></tr>", esc(&k), esc(&clip(&v, 400)));
    }
    s.push_str("</table>\n");
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use pipeline_train::{EvalRecord, TrainRecord};

    use super::*;
    use crate::graph::{Edge, Node, NodeStatus};

    fn view() -> RunView {
        let node = |id: &str, kind: &str, status, inputs| Node { id: id.into(), kind: kind.into(), status, inputs };
        let graph = Graph {
            name: "demo <x>".into(),
            seed: 3,
            nodes: vec![
                node("data", "files", NodeStatus::Cached, vec![]),
                node(
                    "sft",
                    "sft",
                    NodeStatus::Ran,
                    vec![Edge { from: 0, output: "data".into(), input: "data".into() }],
                ),
                node(
                    "eval",
                    "evaluate",
                    NodeStatus::Failed("boom & <bang>".into()),
                    vec![Edge { from: 1, output: "model".into(), input: "model".into() }],
                ),
            ],
        };
        let history = (1..=4)
            .map(|s| {
                Record::Train(TrainRecord {
                    step: s,
                    epoch: s as f64 / 4.0,
                    loss: 4.0 / s as f64,
                    learning_rate: 1e-3,
                    grad_norm: 1.0,
                    tokens_per_second: 10.0,
                    metrics: BTreeMap::new(),
                })
            })
            .chain([Record::Eval(EvalRecord { step: 4, epoch: 1.0, eval_loss: 1.5, metrics: BTreeMap::new() })])
            .collect();
        RunView {
            graph,
            stages: vec![
                StageView { duration: Some(Duration::from_millis(5)), ..Default::default() },
                StageView {
                    duration: Some(Duration::from_secs(70)),
                    report: Some(serde_json::json!({"best_step": 4, "stop": "early_stopped", "global_step": 4})),
                    outputs: vec![("metrics".into(), PathBuf::from("/c/a/b"), 2048)],
                    history,
                    stale: false,
                },
                StageView {
                    report: Some(
                        serde_json::json!({"rows": [{"model": "m", "dataset": "general_qa", "metric": "bleu-4",
                        "subset": "s", "num": 3, "score": 0.5, "cat0": "default"}]}),
                    ),
                    ..Default::default()
                },
            ],
            recipe: "r.toml".into(),
            source: "run",
            elapsed: Some(Duration::from_secs(75)),
            generated_unix: 0,
            tensorboard: Some(PathBuf::from(".pipeline/runs/demo/tensorboard")),
        }
    }

    #[test]
    fn the_page_shows_every_stage_escaped_with_curves_and_tables() {
        let html = render(&view());
        for id in ["data", "sft", "eval"] {
            assert!(html.contains(&format!("id=\"stage-{id}\"")), "{id}");
            assert!(html.contains(&format!("<g class=\"node\" data-stage=\"{id}\">")), "{id}");
        }
        assert!(html.contains("demo &lt;x&gt;") && html.contains("boom &amp; &lt;bang&gt;"));
        assert!(!html.contains("<bang>"));
        assert!(html.contains("id=\"loss-chart\"") && html.contains("id=\"lr-chart\""));
        assert!(html.contains("best checkpoint (step 4)") && html.contains("early stop (step 4)"));
        assert!(html.contains("<td>general_qa</td><td>bleu-4</td>") && html.contains("0.5000"));
        assert!(html.contains("1m10s"), "timings shown");
        // Self-contained: nothing is fetched.
        for bad in ["src=", "href=\"http", "<script", "@import", "url(http"] {
            assert!(!html.contains(bad), "{bad}");
        }
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(2.0), "2");
        assert_eq!(num(0.00012), "1.20e-4");
        assert_eq!(num(0.0), "0");
    }
}
