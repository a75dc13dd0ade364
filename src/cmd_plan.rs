//! `pipeline plan` and `pipeline explain`: freshness without running anything.

use std::path::PathBuf;

use pipeline_cache::Store;
use pipeline_engine::{exec, Freshness};

use crate::common::{load_plan, CacheArgs, Usage};

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    pub recipe: PathBuf,
    /// Show the plan as if these stages were forced.
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
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

pub fn plan(args: PlanArgs) -> anyhow::Result<()> {
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
    println!("plan for `{}` ({}), {} stages, seed {}:", plan.name, args.recipe.display(), plan.stages.len(), plan.seed);
    let w = plan.stages.iter().map(|s| s.id.len()).max().unwrap_or(0);
    let wk = plan.stages.iter().map(|s| s.kind.len()).max().unwrap_or(0);
    for (i, (s, st)) in plan.stages.iter().zip(&statuses).enumerate() {
        let inputs: Vec<String> = s
            .inputs
            .iter()
            .map(|(n, refs)| {
                let r: Vec<String> = refs.iter().map(|r| format!("{}.{}", plan.stages[r.stage].id, r.output)).collect();
                format!("{n}={}", r.join("+"))
            })
            .collect();
        let status = match &st.freshness {
            Freshness::Cached => "cached".to_string(),
            Freshness::Dirty(why) => format!("will run: {why}"),
            // Issue 14, defect 9: a stage that never ran was said to run only "if its inputs change".
            Freshness::Waiting(up) if st.changes.is_none() => {
                format!("will run: no cache entry (never ran); upstream {} will run first", up.join(", "))
            }
            Freshness::Waiting(up) => {
                format!("will run if its inputs change: upstream {} will run first", up.join(", "))
            }
            Freshness::Unkeyable(e) => format!("will run: {e}"),
        };
        let ins = if inputs.is_empty() { String::new() } else { format!(" <- {}", inputs.join(" ")) };
        println!("{:>3}. {:<w$}  {:<wk$}  {status}{ins}", i + 1, s.id, s.kind);
    }
    Ok(())
}

pub fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    let plan = load_plan(&args.recipe)?;
    let idx = plan.require(&args.stage).map_err(|e| Usage(e.to_string()))?;
    let s = &plan.stages[idx];
    let Some(store) = open(&args.cache, &args.recipe) else {
        println!(
            "stage `{}` ({} v{}): will run: no cache at {}",
            s.id,
            s.kind,
            s.stage.version(),
            args.cache.resolve(Some(&args.recipe)).display()
        );
        return Ok(());
    };
    let st = exec::statuses(&plan, &store, &[]).swap_remove(idx);
    match &st.freshness {
        Freshness::Cached => {
            println!("stage `{}` ({} v{}): cached", s.id, s.kind, s.stage.version());
            if let Some(k) = &st.key_hex {
                println!("  key {k}");
            }
            return Ok(());
        }
        Freshness::Dirty(why) => println!("stage `{}` ({} v{}): will run: {why}", s.id, s.kind, s.stage.version()),
        Freshness::Waiting(up) => println!(
            "stage `{}` ({} v{}): upstream {} will run first; it re-runs only if their outputs change",
            s.id,
            s.kind,
            s.stage.version(),
            up.join(", ")
        ),
        Freshness::Unkeyable(e) => {
            println!("stage `{}` ({} v{}): will run: {e}", s.id, s.kind, s.stage.version());
            return Ok(());
        }
    }
    match &st.changes {
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
    Ok(())
}
