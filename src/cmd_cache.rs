//! `pipeline cache ls|gc|verify`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use pipeline_cache::{ArtifactCheck, Store};
use pipeline_engine::exec;

use crate::common::{human_bytes, load_plan, parse_age, CacheArgs, Exit, Usage};
use crate::report::LogFormat;

#[derive(clap::Subcommand, Debug)]
pub enum CacheCommand {
    /// List cache entries (newest last); `*` marks the latest entry of a recipe's stage.
    Ls {
        /// Use the cache next to this recipe.
        recipe: Option<PathBuf>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Drop entries no recipe references (or older than --older-than), then unreferenced artifacts.
    Gc {
        /// Keep only entries these recipes reference now. Without recipes: keep the latest entry of
        /// every stage of every recipe that used this cache.
        recipes: Vec<PathBuf>,
        /// Also drop entries not used for this long (e.g. 30d, 12h).
        #[arg(long, value_name = "AGE")]
        older_than: Option<String>,
        /// Print what would be removed.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Re-hash every artifact and report any whose content no longer matches its digest.
    Verify {
        recipe: Option<PathBuf>,
        #[command(flatten)]
        cache: CacheArgs,
    },
}

fn open(cache: &CacheArgs, recipe: Option<&std::path::Path>) -> anyhow::Result<Store> {
    let dir = cache.resolve(recipe);
    Store::open_existing(&dir).ok_or_else(|| Usage(format!("no cache at {}", dir.display())).into())
}

fn age(t: Option<SystemTime>) -> String {
    let secs = t.and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or(Duration::ZERO).as_secs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A line for people, or (with `--log-format json`) one JSON object per line.
struct Out(LogFormat);
impl Out {
    fn say(&self, human: impl FnOnce() -> String, json: impl FnOnce() -> serde_json::Value) {
        match self.0 {
            LogFormat::Human => println!("{}", human()),
            LogFormat::Json => crate::report::print_json(json()),
        }
    }
}

pub fn run(cmd: CacheCommand, fmt: LogFormat) -> anyhow::Result<()> {
    let out = Out(fmt);
    match cmd {
        CacheCommand::Ls { recipe, cache } => {
            let store = open(&cache, recipe.as_deref())?;
            let latest: BTreeSet<String> = store.all_last().into_iter().map(|(_, _, k)| k).collect();
            let mut rows = Vec::new();
            let (mut total, mut n) = (0u64, 0usize);
            for e in store.entries()? {
                match e {
                    Ok(e) => {
                        total += e.output_bytes();
                        n += 1;
                        rows.push((e.created_unix, e));
                    }
                    Err(err) => eprintln!("warning: {err}"),
                }
            }
            rows.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.stage.cmp(&b.1.stage)));
            if fmt == LogFormat::Human {
                println!(
                    "  {:<12}  {:<16}  {:<16}  {:<10}  {:>10}  {:>6}",
                    "key", "recipe", "stage", "kind", "output", "used"
                );
            }
            for (_, e) in rows {
                let last_used = store.entry_last_used(&e.key);
                out.say(
                    || {
                        let mark = if latest.contains(&e.key) { '*' } else { ' ' };
                        format!(
                            "{mark} {:<12}  {:<16}  {:<16}  {:<10}  {:>10}  {:>6}",
                            &e.key[..12],
                            e.recipe,
                            e.stage,
                            e.kind,
                            human_bytes(e.output_bytes()),
                            age(last_used)
                        )
                    },
                    || {
                        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                        serde_json::json!({
                            "event": "cache_entry", "key": e.key, "recipe": e.recipe, "stage": e.stage,
                            "kind": e.kind, "output_bytes": e.output_bytes(), "created_unix": e.created_unix,
                            "last_used_unix": last_used.map(unix), "latest": latest.contains(&e.key),
                        })
                    },
                );
            }
            out.say(
                || format!("{n} entries, {} of artifacts, in {}", human_bytes(total), store.root().display()),
                || serde_json::json!({"event": "cache_summary", "entries": n, "output_bytes": total, "root": store.root()}),
            );
            Ok(())
        }
        CacheCommand::Gc { recipes, older_than, dry_run, cache } => {
            let store = open(&cache, recipes.first().map(PathBuf::as_path))?;
            let max_age = older_than.as_deref().map(parse_age).transpose().map_err(Usage)?;
            let _lock = store.lock(|| eprintln!("waiting: another pipeline process is using the cache ..."))?;
            let keep: BTreeSet<String> = if recipes.is_empty() {
                store.all_last().into_iter().map(|(_, _, k)| k).collect()
            } else {
                let mut k = BTreeSet::new();
                for r in &recipes {
                    let plan = load_plan(r)?;
                    k.extend(exec::statuses(&plan, &store, &[]).into_iter().filter_map(|s| s.key_hex));
                    // Downstream of a stage that will run, the key is known only after it ran; early
                    // cutoff may reuse the latest entries, so they are kept too.
                    let id = exec::recipe_identity(&plan, &store);
                    k.extend(plan.stages.iter().filter_map(|s| store.last(&id, &s.id)));
                }
                k
            };
            let now = SystemTime::now();
            let older = |t: Option<SystemTime>| {
                max_age.is_some_and(|a| t.and_then(|t| now.duration_since(t).ok()).is_some_and(|d| d.as_secs() >= a))
            };
            let verb = if dry_run { "would drop" } else { "dropped" };
            let (mut dropped, mut kept, mut entry_bytes) = (0, 0, 0u64);
            for e in store.entries()? {
                let (key, what, why) = match e {
                    Ok(e) => {
                        let why = if older(store.entry_last_used(&e.key)) {
                            Some("older than --older-than")
                        } else if !keep.contains(&e.key) {
                            Some("not referenced")
                        } else {
                            None
                        };
                        let what = format!("{} / {}, {}", e.recipe, e.stage, human_bytes(e.output_bytes()));
                        if why.is_some() {
                            entry_bytes += e.output_bytes();
                        }
                        (e.key, what, why)
                    }
                    Err(pipeline_cache::CacheError::CorruptEntry { path, .. }) => (
                        path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
                        "unreadable entry".to_string(),
                        Some("unreadable"),
                    ),
                    Err(e) => return Err(e.into()),
                };
                match why {
                    Some(why) => {
                        dropped += 1;
                        out.say(
                            || format!("{verb} entry {} ({what}): {why}", &key[..key.len().min(12)]),
                            || serde_json::json!({"event": "cache_drop", "what": "entry", "key": key, "detail": what, "reason": why, "dry_run": dry_run}),
                        );
                        if !dry_run {
                            store.remove_entry(&key)?;
                        }
                    }
                    None => kept += 1,
                }
            }
            // Scratch directories hold the checkpoints of interrupted training (a committed stage's
            // is removed at its commit): kept unless older than asked.
            let (mut scratch_n, mut scratch_bytes) = (0, 0u64);
            for k in store.scratch_keys() {
                let Some((bytes, newest)) = store.scratch_usage(&k) else { continue };
                if older(Some(newest)) {
                    out.say(
                        || {
                            format!(
                                "{verb} scratch {} ({}, checkpoints of an interrupted run, last written {} ago)",
                                &k[..k.len().min(12)],
                                human_bytes(bytes),
                                age(Some(newest))
                            )
                        },
                        || serde_json::json!({"event": "cache_drop", "what": "scratch", "key": k, "bytes": bytes, "reason": "older than --older-than", "dry_run": dry_run}),
                    );
                    scratch_n += 1;
                    scratch_bytes += bytes;
                    if !dry_run {
                        store.remove_scratch(&k);
                    }
                }
            }
            if dry_run {
                out.say(
                    || {
                        format!(
                            "{dropped} entries ({}) and {scratch_n} scratch directories ({}) would be dropped, {kept} kept",
                            human_bytes(entry_bytes),
                            human_bytes(scratch_bytes)
                        )
                    },
                    || serde_json::json!({"event": "gc_finished", "dry_run": true, "entries_dropped": dropped, "entry_bytes": entry_bytes, "scratch_dropped": scratch_n, "scratch_bytes": scratch_bytes, "entries_kept": kept}),
                );
                return Ok(());
            }
            let (n, bytes) = store.sweep_artifacts()?;
            store.prune_last();
            out.say(
                || {
                    format!(
                        "dropped {dropped} entries and {n} artifacts ({}), {scratch_n} scratch directories ({}); kept {kept} entries",
                        human_bytes(bytes),
                        human_bytes(scratch_bytes)
                    )
                },
                || serde_json::json!({"event": "gc_finished", "dry_run": false, "entries_dropped": dropped, "artifacts_dropped": n, "artifact_bytes": bytes, "scratch_dropped": scratch_n, "scratch_bytes": scratch_bytes, "entries_kept": kept}),
            );
            Ok(())
        }
        CacheCommand::Verify { recipe, cache } => {
            let store = open(&cache, recipe.as_deref())?;
            let _lock = store.lock(|| eprintln!("waiting: another pipeline process is using the cache ..."))?;
            let mut bad = 0;
            let arts = store.artifacts()?;
            for d in &arts {
                if let ArtifactCheck::Corrupt(why) = store.verify_artifact(d) {
                    // Invalidated: the entries that produced it are dropped, so the next run
                    // re-creates it instead of trusting it.
                    let stages: Vec<String> = store.invalidate(d)?.iter().map(|e| format!("`{}`", e.stage)).collect();
                    let entries = if stages.is_empty() {
                        String::new()
                    } else {
                        format!(" and the entries of {} (they re-run next time)", stages.join(", "))
                    };
                    out.say(
                        || format!("corrupt: {d}: {why}; removed it{entries}"),
                        || serde_json::json!({"event": "verify_problem", "problem": "corrupt", "artifact": d, "detail": why.to_string(), "invalidated_stages": stages}),
                    );
                    bad += 1;
                }
            }
            for e in store.entries()? {
                match e {
                    Ok(e) => {
                        if let Some(name) =
                            e.outputs.iter().find(|(_, o)| !store.artifact_path(&o.digest).is_dir()).map(|(n, _)| n)
                        {
                            out.say(
                                || {
                                    format!(
                                        "missing: output `{name}` of {} ({}); removed the entry (it re-runs next time)",
                                        e.stage,
                                        &e.key[..12]
                                    )
                                },
                                || serde_json::json!({"event": "verify_problem", "problem": "missing", "stage": e.stage, "key": e.key, "output": name}),
                            );
                            store.remove_entry(&e.key)?;
                            bad += 1;
                        }
                    }
                    Err(err) => {
                        if let pipeline_cache::CacheError::CorruptEntry { path, .. } = &err {
                            if let Some(key) = path.file_stem() {
                                store.remove_entry(&key.to_string_lossy())?;
                            }
                        }
                        out.say(
                            || format!("unreadable: {err}; removed it"),
                            || serde_json::json!({"event": "verify_problem", "problem": "unreadable", "detail": err.to_string()}),
                        );
                        bad += 1;
                    }
                }
            }
            store.prune_last();
            out.say(
                || format!("{} artifacts checked, {bad} problems", arts.len()),
                || serde_json::json!({"event": "verify_finished", "artifacts": arts.len(), "problems": bad}),
            );
            if bad > 0 {
                return Err(Exit(1).into());
            }
            Ok(())
        }
    }
}
