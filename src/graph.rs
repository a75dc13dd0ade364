//! The validated DAG as pictures and data: `pipeline plan --format text|dot|mermaid|json`, and the
//! layered layout the HTML run report draws it with.
//!
//! A [`Graph`] is the plan's stages in execution order, each with its status (cached / will run
//! and why / waiting on upstream / failed) and its input edges; every renderer works from it
//! alone, so `plan` and `report` draw the same picture.

use pipeline_engine::exec::{Freshness, StageStatus};
use pipeline_engine::Plan;
use serde_json::json;

/// A stage's status, as a picture colours it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeStatus {
    Cached,
    /// Will run, with why.
    WillRun(String),
    /// Will run if upstream outputs change.
    Waiting(Vec<String>),
    /// Ran in this run.
    Ran,
    /// Failed in this run, with why.
    Failed(String),
    /// Its key cannot be computed (an unreadable declared file): it will run and fail.
    Unkeyable(String),
    /// Not run: skipped, interrupted or not selected, with why.
    NotRun(String),
}

impl NodeStatus {
    /// One word: `cached`, `will-run`, `waiting`, `ran`, `failed`, `not-run`.
    pub fn word(&self) -> &'static str {
        match self {
            NodeStatus::Cached => "cached",
            NodeStatus::WillRun(_) => "will-run",
            NodeStatus::Waiting(_) => "waiting",
            NodeStatus::Ran => "ran",
            NodeStatus::Failed(_) | NodeStatus::Unkeyable(_) => "failed",
            NodeStatus::NotRun(_) => "not-run",
        }
    }
    /// The line `plan` prints.
    pub fn text(&self) -> String {
        match self {
            NodeStatus::Cached => "cached".into(),
            NodeStatus::WillRun(why) => format!("will run: {why}"),
            NodeStatus::Waiting(up) => {
                format!("will run if its inputs change: upstream {} will run first", up.join(", "))
            }
            NodeStatus::Ran => "ran".into(),
            NodeStatus::Failed(why) => format!("failed: {why}"),
            NodeStatus::Unkeyable(why) => format!("will run: {why}"),
            NodeStatus::NotRun(why) => format!("not run: {why}"),
        }
    }
    /// Fill colour of the node (the same in dot, mermaid and HTML).
    pub fn colour(&self) -> &'static str {
        match self {
            NodeStatus::Cached => "#d9ead3",
            NodeStatus::Ran => "#b6d7a8",
            NodeStatus::WillRun(_) => "#fff2cc",
            NodeStatus::Waiting(_) => "#fce5cd",
            NodeStatus::Failed(_) | NodeStatus::Unkeyable(_) => "#f4cccc",
            NodeStatus::NotRun(_) => "#eeeeee",
        }
    }
    pub fn from_status(st: &pipeline_engine::StageStatus) -> NodeStatus {
        match &st.freshness {
            Freshness::Cached => NodeStatus::Cached,
            Freshness::Dirty(why) => NodeStatus::WillRun(why.to_string()),
            // Issue 14, defect 9: a stage that never ran was said to run only "if its inputs change".
            Freshness::Waiting(up) if st.changes.is_none() => {
                NodeStatus::WillRun(format!("no cache entry (never ran); upstream {} will run first", up.join(", ")))
            }
            Freshness::Waiting(up) => NodeStatus::Waiting(up.clone()),
            Freshness::Unkeyable(e) => NodeStatus::Unkeyable(e.to_string()),
        }
    }
}

/// One input edge: `from.output` feeds input `input` of the stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub from: usize,
    pub output: String,
    pub input: String,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub kind: String,
    pub status: NodeStatus,
    /// Inputs, in the recipe's order.
    pub inputs: Vec<Edge>,
}

/// The DAG in execution order.
#[derive(Debug, Clone)]
pub struct Graph {
    pub name: String,
    pub seed: u64,
    pub nodes: Vec<Node>,
}

impl Graph {
    /// The plan's stages with the statuses `exec::statuses` gave them.
    pub fn from_plan(plan: &Plan, statuses: &[StageStatus]) -> Graph {
        Graph::with_statuses(plan, statuses.iter().map(NodeStatus::from_status).collect())
    }

    pub fn with_statuses(plan: &Plan, statuses: Vec<NodeStatus>) -> Graph {
        let nodes = plan
            .stages
            .iter()
            .zip(statuses)
            .map(|(s, status)| Node {
                id: s.id.clone(),
                kind: s.kind.clone(),
                status,
                inputs: s
                    .inputs
                    .iter()
                    .flat_map(|(name, refs)| {
                        refs.iter().map(|r| Edge { from: r.stage, output: r.output.clone(), input: name.clone() })
                    })
                    .collect(),
            })
            .collect();
        Graph { name: plan.name.clone(), seed: plan.seed, nodes }
    }

    /// Longest-path depth of each node (sources are 0): its column in a layered drawing.
    pub fn layers(&self) -> Vec<usize> {
        let mut depth = vec![0usize; self.nodes.len()];
        // Execution order is topological: every input comes earlier.
        for (i, n) in self.nodes.iter().enumerate() {
            depth[i] = n.inputs.iter().map(|e| depth[e.from] + 1).max().unwrap_or(0);
        }
        depth
    }
}

/// `"..."` with `"` and `\` escaped (dot and mermaid string syntax); newlines become `\n` in dot.
fn dot_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Graphviz: `pipeline plan --format dot | dot -Tsvg > plan.svg`.
pub fn to_dot(g: &Graph) -> String {
    let mut out = format!("digraph {} {{\n", dot_str(&g.name));
    out.push_str("  rankdir=LR;\n");
    out.push_str("  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];\n");
    out.push_str("  edge [fontname=\"Helvetica\", fontsize=10];\n");
    for n in &g.nodes {
        let label = format!("{}\n({})\n{}", n.id, n.kind, wrap(&n.status.text(), 48));
        out.push_str(&format!(
            "  {} [label={}, fillcolor={}, tooltip={}];\n",
            dot_str(&n.id),
            dot_str(&label),
            dot_str(n.status.colour()),
            dot_str(n.status.word())
        ));
    }
    for n in &g.nodes {
        for e in &n.inputs {
            out.push_str(&format!(
                "  {} -> {} [label={}];\n",
                dot_str(&g.nodes[e.from].id),
                dot_str(&n.id),
                dot_str(&edge_label(e))
            ));
        }
    }
    out.push_str("}\n");
    out
}

/// `output → input`, or just the name when both are the same.
fn edge_label(e: &Edge) -> String {
    if e.output == e.input {
        e.output.clone()
    } else {
        format!("{} → {}", e.output, e.input)
    }
}

/// Break `s` into lines of at most about `width` characters at spaces.
fn wrap(s: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = 0;
    for word in s.split(' ') {
        if line > 0 && line + 1 + word.chars().count() > width {
            out.push('\n');
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.chars().count();
    }
    out
}

/// Mermaid (GitHub and most Markdown viewers draw it inside a ```` ```mermaid ```` block). Node
/// names are `s0`, `s1`, ... (stage ids may hold characters mermaid ids cannot); labels are
/// quoted with `#quot;` for `"`.
pub fn to_mermaid(g: &Graph) -> String {
    let q = |s: &str| s.replace('"', "#quot;").replace('\n', "<br/>");
    let mut out = String::from("flowchart LR\n");
    for (i, n) in g.nodes.iter().enumerate() {
        out.push_str(&format!(
            "  s{i}[\"{}<br/>({})<br/>{}\"]:::{}\n",
            q(&n.id),
            q(&n.kind),
            q(&n.status.text()),
            n.status.word().replace('-', "_")
        ));
    }
    for (i, n) in g.nodes.iter().enumerate() {
        for e in &n.inputs {
            out.push_str(&format!("  s{} -->|\"{}\"| s{i}\n", e.from, q(&edge_label(e))));
        }
    }
    for st in [
        NodeStatus::Cached,
        NodeStatus::Ran,
        NodeStatus::WillRun(String::new()),
        NodeStatus::Waiting(vec![]),
        NodeStatus::Failed(String::new()),
        NodeStatus::NotRun(String::new()),
    ] {
        out.push_str(&format!("  classDef {} fill:{},stroke:#555\n", st.word().replace('-', "_"), st.colour()));
    }
    out
}

/// Machine-readable: the stages in execution order with status, reason and inputs.
pub fn to_json(g: &Graph) -> serde_json::Value {
    let stages: Vec<serde_json::Value> = g
        .nodes
        .iter()
        .map(|n| {
            let reason = match &n.status {
                NodeStatus::WillRun(w) | NodeStatus::Failed(w) | NodeStatus::Unkeyable(w) | NodeStatus::NotRun(w) => {
                    json!(w)
                }
                NodeStatus::Waiting(up) => json!(format!("upstream {} will run first", up.join(", "))),
                NodeStatus::Cached | NodeStatus::Ran => serde_json::Value::Null,
            };
            json!({
                "id": n.id,
                "kind": n.kind,
                "status": n.status.word(),
                "reason": reason,
                "waiting_on": match &n.status { NodeStatus::Waiting(up) => json!(up), _ => json!([]) },
                "inputs": n.inputs.iter().map(|e| json!({
                    "input": e.input, "stage": g.nodes[e.from].id, "output": e.output,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "pipeline": g.name, "seed": g.seed, "stages": stages })
}

/// The text `plan` has always printed: one numbered line per stage.
pub fn to_text(g: &Graph, recipe: &str) -> String {
    let mut out = format!("plan for `{}` ({recipe}), {} stages, seed {}:\n", g.name, g.nodes.len(), g.seed);
    let w = g.nodes.iter().map(|s| s.id.len()).max().unwrap_or(0);
    let wk = g.nodes.iter().map(|s| s.kind.len()).max().unwrap_or(0);
    for (i, n) in g.nodes.iter().enumerate() {
        // Inputs grouped by name, as the recipe binds them (`parts=a.data+b.data`).
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for e in &n.inputs {
            let r = format!("{}.{}", g.nodes[e.from].id, e.output);
            match groups.iter_mut().find(|(name, _)| *name == e.input) {
                Some((_, v)) => v.push(r),
                None => groups.push((e.input.clone(), vec![r])),
            }
        }
        let ins: Vec<String> = groups.iter().map(|(n, r)| format!("{n}={}", r.join("+"))).collect();
        let ins = if ins.is_empty() { String::new() } else { format!(" <- {}", ins.join(" ")) };
        out.push_str(&format!("{:>3}. {:<w$}  {:<wk$}  {}{ins}\n", i + 1, n.id, n.kind, n.status.text()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph() -> Graph {
        let node = |id: &str, kind: &str, status, inputs| Node { id: id.into(), kind: kind.into(), status, inputs };
        let edge = |from, output: &str, input: &str| Edge { from, output: output.into(), input: input.into() };
        Graph {
            name: "t\"q".into(),
            seed: 1,
            nodes: vec![
                node("a", "files", NodeStatus::Cached, vec![]),
                node(
                    "b-2",
                    "concat",
                    NodeStatus::WillRun("params.x: \"1\" → \"2\"".into()),
                    vec![edge(0, "data", "parts")],
                ),
                node(
                    "c",
                    "sft",
                    NodeStatus::Failed("cannot read C:\\x".into()),
                    vec![edge(0, "data", "data"), edge(1, "data", "eval")],
                ),
            ],
        }
    }

    /// What Graphviz's grammar needs of our output: one statement per line, each a graph
    /// attribute, a node or an edge statement whose every string is closed.
    fn check_dot_syntax(dot: &str) {
        let lines: Vec<&str> = dot.lines().collect();
        assert!(lines[0].starts_with("digraph \"") && lines[0].ends_with(" {"), "{}", lines[0]);
        assert_eq!(*lines.last().unwrap(), "}");
        let string = r#""(?:[^"\\]|\\.)*""#;
        let attrs = format!(r#"\[(?:[a-z]+=(?:{string}|[a-z0-9]+)(?:, )?)+\]"#);
        let stmt = regex_lite(&format!(
            r#"^  (?:rankdir=LR|(?:node|edge) {attrs}|{string} {attrs}|{string} -> {string} {attrs});$"#
        ));
        for l in &lines[1..lines.len() - 1] {
            assert!(stmt.is_match(l), "not a dot statement: {l}");
        }
    }

    fn regex_lite(p: &str) -> regex::Regex {
        regex::Regex::new(p).unwrap()
    }

    #[test]
    fn dot_output_is_valid_graphviz_with_escaped_strings() {
        let dot = to_dot(&graph());
        check_dot_syntax(&dot);
        assert!(dot.contains(r#""a" -> "b-2" [label="data → parts"];"#), "{dot}");
        assert!(dot.contains(r#"C:\\x"#), "{dot}");
        // When Graphviz is installed, it must accept the file.
        if let Ok(mut child) = std::process::Command::new("dot")
            .arg("-Tsvg")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(dot.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "dot: {}", String::from_utf8_lossy(&out.stderr));
            assert!(String::from_utf8_lossy(&out.stdout).contains("<svg"));
        }
    }

    #[test]
    fn a_broken_dot_line_is_caught_by_the_syntax_check() {
        let dot = to_dot(&graph()).replace(r#""a" -> "b-2""#, r#""a -> "b-2""#);
        assert!(std::panic::catch_unwind(|| check_dot_syntax(&dot)).is_err());
    }

    #[test]
    fn layers_are_longest_path_depths() {
        assert_eq!(graph().layers(), vec![0, 1, 2]);
    }

    #[test]
    fn mermaid_and_json_name_every_stage_and_edge() {
        let g = graph();
        let m = to_mermaid(&g);
        assert!(m.starts_with("flowchart LR\n"));
        assert!(m.contains("s0 -->|\"data → parts\"| s1") && m.contains("s1 -->|\"data → eval\"| s2"), "{m}");
        assert!(m.contains("#quot;1#quot;"), "{m}");
        let j = to_json(&g);
        assert_eq!(j["stages"][2]["status"], "failed");
        assert_eq!(j["stages"][2]["inputs"][1], json!({"input": "eval", "stage": "b-2", "output": "data"}));
    }
}
