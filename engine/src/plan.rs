//! Recipe → validated plan: kinds exist, params are accepted by their stage (`Stage::declare`),
//! every input reference names an existing stage and output, the graph has no cycle. `plan` is a
//! pure function of the recipe text, the registry and the small files stages read at declare time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::recipe::{parse_wire, read_source, split_serde_message, RecipeError, Source};
use crate::stage::{Declared, PlanCtx, Registry, Stage, StageError};

/// One bound input artifact: output `output` of the stage at plan index `stage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    pub stage: usize,
    pub output: String,
}

/// A validated stage.
pub struct PlannedStage {
    pub id: String,
    pub kind: String,
    /// Line of the `[stages.<id>]` header (or first key) in the recipe.
    pub line: usize,
    pub stage: Arc<dyn Stage>,
    /// `[pipeline.defaults.<kind>]` merged under the stage's own params.
    pub params: toml::Table,
    pub inputs: BTreeMap<String, Vec<InputRef>>,
    pub declared: Declared,
    /// Plan indices of the stages this one reads from (sorted, unique).
    pub deps: Vec<usize>,
}

/// A validated recipe: stages in execution (topological) order; ties keep recipe order.
pub struct Plan {
    pub name: String,
    pub seed: u64,
    /// The recipe path as given.
    pub path: PathBuf,
    /// The recipe's directory, absolute.
    pub dir: PathBuf,
    pub stages: Vec<PlannedStage>,
    pub graph: DiGraph<usize, ()>,
}

impl Plan {
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.id == id)
    }
    /// Plan indices of `targets` and everything upstream of them.
    pub fn ancestors(&self, targets: &[usize]) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<usize> = targets.to_vec();
        while let Some(i) = stack.pop() {
            if seen.insert(i) {
                stack.extend(&self.stages[i].deps);
            }
        }
        seen
    }
    /// The plan index of stage `id`; an unknown id is an error listing the known ones.
    pub fn require(&self, id: &str) -> Result<usize, UnknownStage> {
        self.index_of(id).ok_or_else(|| UnknownStage {
            recipe: self.path.clone(),
            id: id.to_string(),
            known: self.stages.iter().map(|s| s.id.clone()).collect(),
        })
    }
}

/// A stage id (from `--only`, `--until`, `--force`, `explain`...) that the recipe does not define.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recipe {} has no stage `{id}`; its stages: {}", recipe.display(), known.join(", "))]
pub struct UnknownStage {
    pub recipe: PathBuf,
    pub id: String,
    /// The recipe's stage ids, in execution order.
    pub known: Vec<String>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Find the line of `key = ...` (also `params.key =`) inside stage `id`'s part of the recipe.
fn param_line(src: &Source, stage_line: usize, id: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = src.text.lines().collect();
    let own = [format!("[stages.{id}]"), format!("[stages.{id}.")];
    for (i, l) in lines.iter().enumerate().skip(stage_line.saturating_sub(1)) {
        let t = l.trim_start();
        if i + 1 > stage_line && t.starts_with('[') && !own.iter().any(|o| t.starts_with(o.as_str())) {
            break;
        }
        for prefix in ["", "params.", "inputs."] {
            if let Some(rest) = t.strip_prefix(prefix).and_then(|r| r.strip_prefix(key)) {
                if rest.trim_start().starts_with('=') {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

fn stage_error(src: &Source, line: usize, id: &str, kind: &str, err: StageError) -> RecipeError {
    let text = match &err {
        StageError::Params(m) => m.clone(),
        other => other.to_string(),
    }
    .replace('\n', " ");
    let (mut msg, mut hint) = split_serde_message(&text);
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        msg = format!("unknown param {rest}");
        hint = hint.map(|h| h.replace("known keys: ", "known params: "));
    }
    // Point at the offending key when the message names one.
    let named = ["unknown field `", "unknown input `", "missing required input `", "for key `", " in `"]
        .iter()
        .find_map(|p| text.find(p).map(|i| &text[i + p.len()..]))
        .and_then(|rest| rest.split('`').next())
        .map(|k| k.rsplit('.').next().unwrap_or(k).to_string());
    let at = named.and_then(|k| param_line(src, line, id, &k)).unwrap_or(line);
    src.error_at_line(at, format!("stage `{id}` (kind `{kind}`): {msg}"), hint)
}

/// Plan the recipe at `path`.
pub fn plan(path: &Path, registry: &Registry) -> Result<Plan, RecipeError> {
    let src = read_source(path)?;
    plan_source(&src, registry)
}

/// Plan a recipe already read.
pub fn plan_source(src: &Source, registry: &Registry) -> Result<Plan, RecipeError> {
    let wire = parse_wire(src)?;
    let Some(pipeline) = wire.pipeline else {
        return Err(src.error_at(
            0..0,
            "missing `[pipeline]` table",
            Some(
                "a recipe starts with `[pipeline]` and `name = \"...\"` (optional: seed, description, defaults)".into(),
            ),
        ));
    };
    let pspan = pipeline.span();
    let pipeline = pipeline.into_inner();
    let kinds_hint = || format!("known kinds: {}", registry.kinds().collect::<Vec<_>>().join(", "));
    for k in pipeline.defaults.keys() {
        if registry.get(k.get_ref()).is_none() {
            return Err(src.error_at(
                k.span(),
                format!("defaults for unknown stage kind `{}`", k.get_ref()),
                Some(kinds_hint()),
            ));
        }
    }
    if wire.stages.is_empty() {
        return Err(src.error_at(
            pspan,
            "the recipe has no stages",
            Some("add `[stages.<id>]` tables with a `kind`".into()),
        ));
    }
    let dir = src.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    let dir = std::path::absolute(&dir).unwrap_or(dir);

    // Recipe order = position of the stage id in the file.
    let mut wire_stages: Vec<_> = wire.stages.into_iter().collect();
    wire_stages.sort_by_key(|(id, _)| id.span().start);
    let ids: Vec<String> = wire_stages.iter().map(|(id, _)| id.get_ref().clone()).collect();

    struct Pre {
        id: String,
        kind: String,
        line: usize,
        stage: Arc<dyn Stage>,
        params: toml::Table,
        declared: Declared,
        inputs: Vec<(toml::Spanned<String>, toml::Spanned<toml::Value>)>,
    }
    let mut pre = Vec::new();
    for (id, st) in wire_stages {
        let id_span = id.span();
        let id = id.into_inner();
        let line = src.line_of(id_span.start);
        if !valid_id(&id) {
            return Err(src.error_at(
                id_span,
                format!("invalid stage id `{id}`"),
                Some(
                    "stage ids use letters, digits, `_` and `-` (a `.` separates stage and output in references)"
                        .into(),
                ),
            ));
        }
        let st = st.into_inner();
        let kind_span = st.kind.span();
        let kind = st.kind.into_inner();
        let Some(stage) = registry.get(&kind).cloned() else {
            return Err(src.error_at(
                kind_span,
                format!("stage `{id}`: unknown stage kind `{kind}`"),
                Some(kinds_hint()),
            ));
        };
        let mut params =
            pipeline.defaults.iter().find(|(k, _)| k.get_ref() == &kind).map(|(_, t)| t.clone()).unwrap_or_default();
        for (k, v) in st.params {
            params.insert(k, v);
        }
        let input_names: Vec<&str> = st.inputs.keys().map(|k| k.get_ref().as_str()).collect();
        let ctx = PlanCtx { stage_id: &id, params: &params, input_names, recipe_dir: &dir };
        let declared = stage.declare(&ctx).map_err(|e| stage_error(src, line, &id, &kind, e))?;
        pre.push(Pre { id, kind, line, stage, params, declared, inputs: st.inputs.into_iter().collect() });
    }

    // Resolve references.
    let mut resolved: Vec<BTreeMap<String, Vec<InputRef>>> = Vec::new();
    for p in &pre {
        let mut map = BTreeMap::new();
        for (name, value) in &p.inputs {
            let span = value.span();
            let refs: Vec<String> = match value.get_ref() {
                toml::Value::String(s) => vec![s.clone()],
                toml::Value::Array(a) if a.iter().all(|v| v.is_str()) && !a.is_empty() => {
                    a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
                }
                _ => {
                    return Err(src.error_at(
                        span,
                        format!(
                            "stage `{}`: input `{}` must be a reference or a list of references",
                            p.id,
                            name.get_ref()
                        ),
                        Some("write `inputs.<name> = \"<stage>.<output>\"` or a list of such strings".into()),
                    ))
                }
            };
            let mut list = Vec::new();
            for r in refs {
                let Some((sid, out)) = r.split_once('.') else {
                    return Err(src.error_at(
                        span,
                        format!("stage `{}`: malformed reference `{r}` for input `{}`", p.id, name.get_ref()),
                        Some("a reference is `<stage>.<output>`, e.g. `dedupe.data`".into()),
                    ));
                };
                let Some(si) = ids.iter().position(|i| i == sid) else {
                    return Err(src.error_at(
                        span,
                        format!("stage `{}`: input `{}` refers to unknown stage `{sid}`", p.id, name.get_ref()),
                        Some(format!("stages in this recipe: {}", ids.join(", "))),
                    ));
                };
                if !pre[si].declared.outputs.iter().any(|o| o == out) {
                    return Err(src.error_at(
                        span,
                        format!(
                            "stage `{}`: input `{}` refers to `{sid}.{out}`, but stage `{sid}` has no output `{out}`",
                            p.id,
                            name.get_ref()
                        ),
                        Some(format!(
                            "outputs of `{sid}` (kind `{}`): {}",
                            pre[si].kind,
                            pre[si].declared.outputs.join(", ")
                        )),
                    ));
                }
                list.push(InputRef { stage: si, output: out.to_string() });
            }
            map.insert(name.get_ref().clone(), list);
        }
        resolved.push(map);
    }

    // Graph, cycle check, order (Kahn; ties by recipe order).
    let mut graph = DiGraph::<usize, ()>::new();
    let nodes: Vec<NodeIndex> = (0..pre.len()).map(|i| graph.add_node(i)).collect();
    let deps: Vec<Vec<usize>> = resolved
        .iter()
        .map(|m| m.values().flatten().map(|r| r.stage).collect::<BTreeSet<_>>().into_iter().collect())
        .collect();
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            graph.add_edge(nodes[d], nodes[i], ());
        }
    }
    let mut indeg: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut ready: BTreeSet<usize> = (0..pre.len()).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::new();
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for n in graph.neighbors(nodes[i]) {
            let j = graph[n];
            indeg[j] -= 1;
            if indeg[j] == 0 {
                ready.insert(j);
            }
        }
    }
    if order.len() < pre.len() {
        let left: BTreeSet<usize> = (0..pre.len()).filter(|i| !order.contains(i)).collect();
        // Walk dependencies inside the remaining set until a stage repeats: that is a cycle.
        let start = *left.iter().next().unwrap_or(&0);
        let mut path = vec![start];
        let mut cur = start;
        let cycle = loop {
            let Some(&next) = deps[cur].iter().find(|d| left.contains(d)) else { break path.clone() };
            if let Some(pos) = path.iter().position(|&p| p == next) {
                let mut c = path[pos..].to_vec();
                c.reverse();
                c.push(c[0]);
                break c;
            }
            path.push(next);
            cur = next;
        };
        // Start the cycle at its first stage in recipe order.
        let mut cycle: Vec<usize> = cycle[..cycle.len() - 1].to_vec();
        let min = cycle.iter().enumerate().min_by_key(|(_, &s)| s).map(|(i, _)| i).unwrap_or(0);
        cycle.rotate_left(min);
        cycle.push(cycle[0]);
        let first = cycle[0];
        let names: Vec<&str> = cycle.iter().map(|&i| pre[i].id.as_str()).collect();
        return Err(src.error_at_line(
            pre[first].line,
            format!("the stages form a cycle: {}", names.join(" -> ")),
            Some(format!(
                "cycle: {} (each stage's output is an input of the next); remove one of these inputs",
                names.join(" -> ")
            )),
        ));
    }

    // Re-index into execution order.
    let mut new_index = vec![0; pre.len()];
    for (new, &old) in order.iter().enumerate() {
        new_index[old] = new;
    }
    type Slot = Option<(Pre, BTreeMap<String, Vec<InputRef>>)>;
    let mut slots: Vec<Slot> = pre.into_iter().zip(resolved).map(Some).collect();
    let mut stages = Vec::new();
    for &old in &order {
        let (p, mut inputs) = slots[old].take().expect("each stage once");
        for refs in inputs.values_mut() {
            for r in refs.iter_mut() {
                r.stage = new_index[r.stage];
            }
        }
        let mut d: Vec<usize> = deps[old].iter().map(|&x| new_index[x]).collect();
        d.sort();
        stages.push(PlannedStage {
            id: p.id,
            kind: p.kind,
            line: p.line,
            stage: p.stage,
            params: p.params,
            inputs,
            declared: p.declared,
            deps: d,
        });
    }
    let mut graph = DiGraph::<usize, ()>::new();
    let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
    for (i, s) in stages.iter().enumerate() {
        for &d in &s.deps {
            graph.add_edge(nodes[d], nodes[i], ());
        }
    }
    Ok(Plan { name: pipeline.name, seed: pipeline.seed, path: src.path.clone(), dir, stages, graph })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        let mut r = Registry::new();
        crate::builtin::register(&mut r);
        r
    }

    fn src(text: &str) -> Source {
        Source { path: "r.toml".into(), text: text.into() }
    }

    #[test]
    fn order_is_topological_and_keeps_recipe_order_for_ties() {
        let p = plan_source(
            &src(r#"
[pipeline]
name = "t"
[stages.z]
kind = "concat"
inputs.parts = ["b.data", "a.data"]
[stages.b]
kind = "concat"
inputs.parts = "a.data"
[stages.a]
kind = "files"
params.paths = ["Cargo.toml"]
[stages.c]
kind = "files"
params.paths = ["Cargo.toml"]
"#),
            &reg(),
        );
        let p = match p {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "z", "c"]);
        let z = &p.stages[2];
        assert_eq!(z.deps, vec![0, 1]);
        assert_eq!(
            z.inputs["parts"],
            vec![InputRef { stage: 1, output: "data".into() }, InputRef { stage: 0, output: "data".into() }]
        );
    }

    #[test]
    fn defaults_merge_under_stage_params() {
        let p = plan_source(
            &src(r#"
[pipeline]
name = "t"
[pipeline.defaults.concat]
separator = "-"
file_name = "x.txt"
[stages.a]
kind = "files"
params.paths = ["Cargo.toml"]
[stages.b]
kind = "concat"
inputs.parts = "a.data"
params.file_name = "y.txt"
"#),
            &reg(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let b = &p.stages[1].params;
        assert_eq!(b["separator"].as_str(), Some("-"));
        assert_eq!(b["file_name"].as_str(), Some("y.txt"));
    }

    #[test]
    fn self_reference_is_a_cycle() {
        let e = plan_source(
            &src("[pipeline]\nname = \"t\"\n[stages.a]\nkind = \"concat\"\ninputs.parts = \"a.data\"\n"),
            &reg(),
        )
        .err()
        .expect("a cycle");
        assert_eq!(e.message, "the stages form a cycle: a -> a");
        assert_eq!(e.line, 3);
    }
}
