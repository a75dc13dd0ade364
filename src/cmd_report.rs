//! `pipeline report <recipe>`: rewrite the run's `report.html` (and the TensorBoard copies of
//! every stage's event files) from the cache, without running anything.

use std::path::PathBuf;

use anyhow::Context;
use pipeline_cache::Store;

use crate::common::{load_plan, CacheArgs, Usage};
use crate::run_outputs;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    pub recipe: PathBuf,
    /// Write the page here [default: `<cache dir>/runs/<pipeline name>/report.html`].
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let plan = load_plan(&args.recipe)?;
    let cache_dir = args.cache.resolve(Some(&args.recipe));
    let store = Store::open_existing(&cache_dir)
        .ok_or_else(|| Usage(format!("no cache at {}: run the recipe first", cache_dir.display())))?;
    let written = run_outputs::from_cache_only(&plan, &store, args.output.as_deref())
        .with_context(|| format!("writing the report of `{}`", plan.name))?;
    println!("report: {}", written.report.display());
    if let Some(tb) = &written.tensorboard {
        println!("tensorboard: tensorboard --logdir {}", tb.display());
    }
    Ok(())
}
