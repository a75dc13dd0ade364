//! `pipeline run`: plan, lock the cache, execute, print the summary.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use pipeline_cache::Store;
use pipeline_engine::{exec, Device, DistEnv, ExecError, ExecOptions, Reporter};

use crate::common::{load_plan, CacheArgs, Exit, Usage};
use crate::report::{self, LogFormat};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The recipe to run.
    pub recipe: PathBuf,
    /// Run only this stage (repeatable); its inputs must already be cached.
    #[arg(long, value_name = "STAGE")]
    pub only: Vec<String>,
    /// Run this stage and everything upstream of it (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub until: Vec<String>,
    /// Re-run this stage even if it is cached (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// After a stage fails, still run the stages that do not depend on it (they are cached); the
    /// summary lists what failed and what was skipped. Without it nothing new starts after a failure.
    #[arg(long, short = 'k')]
    pub keep_going: bool,
    /// How many independent stages may run at once.
    #[arg(long, short = 'j', default_value_t = 1)]
    pub jobs: usize,
    /// Where training, generation and evaluation run: `cpu`, `cuda` (GPU 0) or `cuda:<N>`; `cuda`
    /// needs a binary built with `--features cuda`. Not part of the cache key.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: Device,
    /// Data-parallel training on N local ranks, as `torchrun --nproc_per_node N`: starts N copies
    /// of this command with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (a
    /// launcher of your own may set them instead). The training stages (pretrain, sft, align)
    /// train on all ranks, each on its shard of every batch, with gradients all-reduced (TCP on the
    /// CPU, NCCL on CUDA, where rank r uses GPU LOCAL_RANK, offset by `cuda:<N>`); rank 0 runs the
    /// other stages and alone writes the cache. `gradient_accumulation_steps` stays per device:
    /// the global batch is per_device_train_batch_size × gradient_accumulation_steps × N, and the
    /// result (and the cache key) is that of one process with N times the accumulation.
    /// Only rank 0's output is shown; other ranks' stderr is prefixed `[rank N]`.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nproc_per_node: usize,
    #[command(flatten)]
    pub cache: CacheArgs,
}

pub fn run(args: RunArgs, fmt: LogFormat) -> anyhow::Result<()> {
    if args.nproc_per_node == 0 {
        return Err(Usage("--nproc-per-node must be at least 1".into()).into());
    }
    let plan = load_plan(&args.recipe)?;
    if args.nproc_per_node > 1 {
        return crate::launch::launch(args.nproc_per_node);
    }
    let dist = DistEnv::from_env().map_err(|e| Usage(e.to_string()))?;
    if dist.is_follower() {
        return run_follower(args, plan, dist);
    }
    for id in args.only.iter().chain(&args.until).chain(&args.force) {
        plan.require(id).map_err(|e| Usage(e.to_string()))?;
    }
    if args.jobs == 0 {
        return Err(Usage("--jobs must be at least 1".into()).into());
    }
    let cache_dir = args.cache.resolve(Some(&args.recipe));
    let store = Store::open(&cache_dir).with_context(|| format!("opening cache {}", cache_dir.display()))?;
    let json = (fmt == LogFormat::Json).then(|| Arc::new(report::Json::new()));
    let _lock = store.lock(|| match &json {
        Some(j) => {
            j.emit(serde_json::json!({"event": "waiting_for_lock", "cache_dir": cache_dir.display().to_string()}))
        }
        None => eprintln!("waiting: another pipeline process is using the cache {} ...", cache_dir.display()),
    })?;
    // A read-only cache: one error naming the directory (issue 14, defect 9), before any stage.
    let not_writable = || format!("the cache {} is not writable", cache_dir.display());
    store.clean_tmp().with_context(not_writable)?;
    store.check_writable().with_context(not_writable)?;

    // First Ctrl-C (or SIGTERM): ask stages to stop; a second one exits at once.
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.clone())?;
        signal_hook::flag::register(sig, cancel.clone())?;
    }
    let opts = ExecOptions {
        jobs: args.jobs,
        only: args.only,
        until: args.until,
        force: args.force,
        keep_going: args.keep_going,
        cancel,
        device: rank_device(args.device, &dist),
        dist,
    };
    let reporter: Arc<dyn Reporter> = match &json {
        Some(j) => j.clone(),
        None => Arc::new(report::Human::new()),
    };
    let summary = match exec::run(&plan, &store, &opts, reporter) {
        Ok(s) => s,
        Err(ExecError::UnknownStage(u)) => return Err(Usage(u.to_string()).into()),
        Err(e) => return Err(e.into()),
    };
    // The page and the TensorBoard copies are for people: failing to write them is a warning.
    let written = match crate::run_outputs::after_run(&plan, &store, &summary) {
        Ok(w) => Some(w),
        Err(e) => {
            eprintln!(
                "warning: writing the run report in {}: {e}",
                crate::run_outputs::run_dir(&store, &plan).display()
            );
            None
        }
    };
    let ok = !summary.failed()
        && !summary.cancelled
        && !summary.outcomes.iter().any(|o| matches!(o.status, pipeline_engine::Status::Skipped(_)));
    match &json {
        Some(j) => j.emit(serde_json::json!({
            "event": "run_finished",
            "ok": ok,
            "interrupted": summary.cancelled,
            "elapsed_ms": summary.elapsed.as_millis() as u64,
            "ran": summary.outcomes.iter().filter(|o| o.status == pipeline_engine::Status::Ran).count(),
            "cached": summary.outcomes.iter().filter(|o| o.status == pipeline_engine::Status::Cached).count(),
            "report": written.as_ref().map(|w| w.report.display().to_string()),
            "tensorboard": written.as_ref().and_then(|w| w.tensorboard.as_ref()).map(|t| t.display().to_string()),
        })),
        None => {
            print!("{}", report::summary_table(&summary));
            if let Some(w) = &written {
                println!("\nreport: {}", w.report.display());
                if let Some(tb) = &w.tensorboard {
                    println!("tensorboard: tensorboard --logdir {}", tb.display());
                }
            }
        }
    }
    if summary.cancelled {
        // Exit 130 (128 + SIGINT) like any interrupted command, saying what the next run resumes from.
        for o in summary.outcomes.iter().filter(|o| o.status == pipeline_engine::Status::Cancelled) {
            let Some(key) = &o.key else { continue };
            let msg = match latest_checkpoint(&store.scratch_path(key)) {
                Some(step) => {
                    format!("interrupted: `{}` kept a checkpoint at step {step}; the next run resumes from it", o.id)
                }
                None => format!("interrupted: `{}` kept no checkpoint; the next run starts it over", o.id),
            };
            match &json {
                Some(j) => j.emit(serde_json::json!({"event": "interrupted", "stage": o.id, "message": msg})),
                None => eprintln!("{msg}"),
            }
        }
        return Err(Exit(130).into());
    }
    if !ok {
        return Err(Exit(1).into());
    }
    Ok(())
}

/// The GPU of this rank: `cuda:<N>` is the first GPU of the node, rank `LOCAL_RANK` uses the
/// one `LOCAL_RANK` places after it (torchrun's convention with `cuda` = `cuda:0`).
fn rank_device(device: Device, dist: &DistEnv) -> Device {
    match device {
        Device::Cuda { ordinal } if dist.world_size > 1 => Device::Cuda { ordinal: ordinal + dist.local_rank },
        d => d,
    }
}

/// A rank above 0: no lock and no writes to the cache (rank 0 holds the lock and commits); waits
/// for rank 0's entries and joins the training stages. Says only what failed.
fn run_follower(args: RunArgs, plan: pipeline_engine::Plan, dist: DistEnv) -> anyhow::Result<()> {
    let cache_dir = args.cache.resolve(Some(&args.recipe));
    let store = Store::open(&cache_dir).with_context(|| format!("opening cache {}", cache_dir.display()))?;
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.clone())?;
        signal_hook::flag::register(sig, cancel.clone())?;
    }
    let rank = dist.rank;
    let opts = ExecOptions {
        jobs: args.jobs.max(1),
        only: args.only,
        until: args.until,
        force: args.force,
        keep_going: args.keep_going,
        cancel,
        device: rank_device(args.device, &dist),
        dist,
    };
    let summary = match exec::run(&plan, &store, &opts, Arc::new(pipeline_engine::NullReporter)) {
        Ok(s) => s,
        Err(ExecError::UnknownStage(u)) => return Err(Usage(u.to_string()).into()),
        Err(e) => return Err(e.into()),
    };
    for o in &summary.outcomes {
        if let pipeline_engine::Status::Failed(m) = &o.status {
            eprintln!("rank {rank}: stage `{}` failed: {m}", o.id);
        }
    }
    if summary.cancelled {
        return Err(Exit(130).into());
    }
    if summary.failed() {
        return Err(Exit(1).into());
    }
    Ok(())
}

/// The highest step of a complete `checkpoint-<step>` directory (one holding `trainer_state.json`)
/// anywhere in a stage's scratch directory.
fn latest_checkpoint(scratch: &std::path::Path) -> Option<u64> {
    let mut best = None;
    let mut stack = vec![scratch.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            match name.strip_prefix("checkpoint-").and_then(|s| s.parse::<u64>().ok()) {
                Some(step) if p.join("trainer_state.json").is_file() => best = best.max(Some(step)),
                _ => stack.push(p),
            }
        }
    }
    best
}
