//! `pipeline plan` and `pipeline explain`: freshness without running anything.

use std::path::PathBuf;

use pipeline_cache::Store;
use pipeline_engine::{exec, Freshness};

use crate::graph::{self, Graph};

use crate::common::{load_plan, CacheArgs, Usage};
use crate::report::LogFormat;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    pub recipe: PathBuf,
    /// Show the plan as if these stages were forced.
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// `text` (numbered lines), `dot` (Graphviz: `| dot -Tsvg`), `mermaid` (a Markdown
    /// viewer's flowchart) or `json`.
    #[arg(long, value_enum, default_value = "text")]
    pub format: PlanFormat,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanFormat {
    Text,
    Dot,
    Mermaid,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    pub recipe: PathBuf,
    pub stage: String,
    #[command(flatten)]
    pub cache: CacheArgs,
}

fn open(cache: &CacheArgs, recipe: &std::path::Path) -> Option<Store> {
    Store::open_existing(&cache.resolve(Some(recipe)))
}

pub fn plan(args: PlanArgs, fmt: LogFormat) -> anyhow::Result<()> {
    let plan = load_plan(&args.recipe)?;
    for id in &args.force {
        plan.require(id).map_err(|e| Usage(e.to_string()))?;
    }
    let statuses = match open(&args.cache, &args.recipe) {
        Some(store) => exec::statuses(&plan, &store, &args.force),
        None => {
            let tmp = std::env::temp_dir().join(format!("pipeline-empty-cache-{}", std::process::id()));
            let store = Store::open(&tmp)?;
            let s = exec::statuses(&plan, &store, &args.force);
            let _ = std::fs::remove_dir_all(&tmp);
            s
        }
    };
    let g = Graph::from_plan(&plan, &statuses);
    // `--log-format json` asks for JSON unless a drawing format was chosen.
    let format = if fmt == LogFormat::Json && args.format == PlanFormat::Text { PlanFormat::Json } else { args.format };
    match format {
        PlanFormat::Text => print!("{}", graph::to_text(&g, &args.recipe.display().to_string())),
        PlanFormat::Dot => print!("{}", graph::to_dot(&g)),
        PlanFormat::Mermaid => print!("{}", graph::to_mermaid(&g)),
        // one line under `--log-format json` (one object per line, as every command), else indented
        PlanFormat::Json if fmt == LogFormat::Json => crate::report::print_json(graph::to_json(&g)),
        PlanFormat::Json => println!("{}", serde_json::to_string_pretty(&graph::to_json(&g))?),
    }
    Ok(())
}

/// `pipeline explain`'s answer: the status line and the detail lines under it (human), or one
/// JSON object with the same facts.
struct Explained<'a> {
    s: &'a pipeline_engine::PlannedStage,
    /// `cached`, `will_run` or `waiting`.
    status: &'static str,
    reason: Option<String>,
    key: Option<String>,
    waiting_on: Vec<String>,
    /// `None`: no previous entry to compare with.
    changes: Option<Vec<String>>,
}

impl Explained<'_> {
    fn print(&self, fmt: LogFormat) {
        let s = self.s;
        if fmt == LogFormat::Json {
            crate::report::print_json(serde_json::json!({
                "event": "explain", "stage": s.id, "kind": s.kind, "version": s.stage.version(),
                "status": self.status, "reason": self.reason, "key": self.key,
                "waiting_on": self.waiting_on, "changes": self.changes,
            }));
            return;
        }
        let head = format!("stage `{}` ({} v{})", s.id, s.kind, s.stage.version());
        match self.status {
            "cached" => {
                println!("{head}: cached");
                if let Some(k) = &self.key {
                    println!("  key {k}");
                }
                return;
            }
            "waiting" => println!(
                "{head}: upstream {} will run first; it re-runs only if their outputs change",
                self.waiting_on.join(", ")
            ),
            _ => println!("{head}: will run: {}", self.reason.as_deref().unwrap_or("")),
        }
        match &self.changes {
            None if self.reason.as_deref().is_some_and(|r| r.starts_with("no cache at")) => {}
            None => println!("  no previous entry of this stage in the cache"),
            Some(changes) if changes.is_empty() => {
                println!("  the key is unchanged since its last entry; that entry's outputs are missing or corrupt")
            }
            Some(changes) => {
                for c in changes {
                    println!("  dirty: {c}");
                }
            }
        }
    }
}

pub fn explain(args: ExplainArgs, fmt: LogFormat) -> anyhow::Result<()> {
    let plan = load_plan(&args.recipe)?;
    let idx = plan.require(&args.stage).map_err(|e| Usage(e.to_string()))?;
    let s = &plan.stages[idx];
    let mut e = Explained { s, status: "will_run", reason: None, key: None, waiting_on: vec![], changes: None };
    let Some(store) = open(&args.cache, &args.recipe) else {
        e.reason = Some(format!("no cache at {}", args.cache.resolve(Some(&args.recipe)).display()));
        e.print(fmt);
        return Ok(());
    };
    let st = exec::statuses(&plan, &store, &[]).swap_remove(idx);
    e.key = st.key_hex.clone();
    match &st.freshness {
        Freshness::Cached => e.status = "cached",
        Freshness::Dirty(why) => e.reason = Some(why.to_string()),
        Freshness::Waiting(up) => {
            e.status = "waiting";
            e.waiting_on = up.clone();
        }
        Freshness::Unkeyable(err) => {
            e.reason = Some(err.to_string());
            e.print(fmt);
            return Ok(());
        }
    }
    e.changes = st.changes.as_ref().map(|c| c.iter().map(|c| c.to_string()).collect());
    e.print(fmt);
    Ok(())
}
