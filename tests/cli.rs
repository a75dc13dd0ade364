//! CLI integration tests through the real `pipeline` binary: argument parsing, exit codes, the
//! messages and output formats users see (`--log-format json` events, the summary table, `plan`,
//! `explain`, `cache`), and the headline recipe end to end. Recipes here use the built-in `files` /
//! `concat` kinds or a real cheap stage; the engine's behaviour itself (caching, early cutoff,
//! corruption, kill -9, locking, selection semantics) is tested in `engine/tests/engine/` with
//! test-only stages.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pipeline");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(recipe: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.toml"), recipe).unwrap();
        Project { dir }
    }
    /// [`FIVE`] with its two data files.
    fn five() -> Project {
        let p = Project::new(FIVE);
        p.write("data/a.txt", "A");
        p.write("data/d.txt", "D");
        p
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn write(&self, name: &str, text: &str) {
        let p = self.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    fn edit(&self, from: &str, to: &str) {
        let p = self.path().join("r.toml");
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains(from), "recipe has no `{from}`");
        std::fs::write(p, t.replacen(from, to, 1)).unwrap();
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(self.path()).env_remove("PIPELINE_CACHE_DIR").env_remove("RUST_LOG");
        c.args(args);
        c
    }
    fn pipeline(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    fn stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.pipeline(args).stdout).into_owned()
    }
    /// `run --log-format json` + extra args → (exit code, events).
    fn run(&self, extra: &[&str]) -> Run {
        let mut args = vec!["--log-format", "json", "run", "r.toml"];
        args.extend(extra);
        let out = self.pipeline(&args);
        Run::from(out)
    }
    fn artifact(&self, digest: &str) -> PathBuf {
        self.path().join(".pipeline/v1/artifacts").join(digest)
    }
}

struct Run {
    code: i32,
    events: Vec<Value>,
    stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let events = stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
        Run { code: out.status.code().unwrap_or(-1), events, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
    }
}

impl Run {
    /// stage → final status label.
    fn statuses(&self) -> BTreeMap<String, String> {
        self.events
            .iter()
            .filter(|e| e["event"].as_str().is_some_and(|n| n.starts_with("stage_") && n != "stage_started"))
            .map(|e| (e["stage"].as_str().unwrap().to_string(), e["status"].as_str().unwrap().to_string()))
            .collect()
    }
    fn with_status(&self, status: &str) -> Vec<String> {
        self.statuses().into_iter().filter(|(_, s)| s == status).map(|(k, _)| k).collect()
    }
    fn event(&self, stage: &str, event: &str) -> &Value {
        self.events
            .iter()
            .find(|e| e["stage"] == stage && e["event"] == event)
            .unwrap_or_else(|| panic!("no {event} of {stage}: {:?}", self.events))
    }
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "run failed: {:?}\n{}", self.events, self.stderr);
        self
    }
}

/// A recipe `name` (seed 3): the built-in corpus and a tiny pretrain on it, with `params` (e.g.
/// `max_steps = 2`) beside the usual tiny settings.
fn corpus_pretrain(name: &str, params: &str) -> String {
    format!(
        r#"[pipeline]
name = "{name}"
seed = 3
[stages.corpus]
kind = "collect"
params = {{ datasets = ["builtin:corpus"] }}
[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "corpus.data" }}
params = {{ learning_rate = 3e-3, per_device_train_batch_size = 2, max_length = 32, warmup_ratio = 0.0, split_ratio = 0.0, {params} }}
"#
    )
}

/// `len` bytes in the middle of `file` replaced by `f(byte)`, its mtime restored (so the change is
/// invisible to a stat check: only the content's digest can see it).
fn corrupt_keeping_mtime(file: &Path, len: usize, f: impl Fn(u8) -> u8) {
    let mut bytes = std::fs::read(file).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + len] {
        *b = f(*b);
    }
    let mtime = std::fs::metadata(file).unwrap().modified().unwrap();
    std::fs::write(file, &bytes).unwrap();
    std::fs::File::options().write(true).open(file).unwrap().set_modified(mtime).unwrap();
}

fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// a → b → c ; d ; (c, d) → e, with the built-in kinds.
const FIVE: &str = r#"
[pipeline]
name = "t"
seed = 1

[stages.a]
kind = "files"
params.paths = ["data/a.txt"]

[stages.b]
kind = "concat"
inputs.parts = "a.data"
params.file_name = "b.txt"

[stages.c]
kind = "concat"
inputs.parts = "b.data"
params = { file_name = "c.txt", separator = "|" }

[stages.d]
kind = "files"
params.paths = ["data/d.txt"]

[stages.e]
kind = "concat"
inputs.parts = ["c.data", "d.data"]
params.file_name = "e.txt"
"#;

#[test]
fn json_events_name_every_stage_and_its_outputs() {
    let p = Project::five();
    let cold = p.run(&[]).ok();
    assert_eq!(cold.with_status("ran"), v(&["a", "b", "c", "d", "e"]));
    let started = cold.event("a", "stage_started");
    assert_eq!(
        (started["kind"].as_str(), started["reason"].as_str()),
        (Some("files"), Some("no cache entry (never ran)"))
    );
    let e = cold.event("e", "stage_finished");
    assert_eq!(e["report"]["files"], 2);
    let out = std::fs::read_to_string(p.artifact(e["outputs"]["data"].as_str().unwrap()).join("e.txt")).unwrap();
    assert_eq!(out, "AD");
    let end = cold.events.last().unwrap();
    assert_eq!(
        (end["event"].as_str(), end["ok"].as_bool(), end["ran"].as_u64()),
        (Some("run_finished"), Some(true), Some(5))
    );
    let warm = p.run(&[]).ok();
    assert_eq!(warm.with_status("cached"), v(&["a", "b", "c", "d", "e"]));
    assert_eq!(warm.events.last().unwrap()["cached"], 5);
}

#[test]
fn human_output_has_summary_table_and_plan_explains() {
    let p = Project::five();
    let out = p.pipeline(&["run", "r.toml"]);
    assert!(out.status.success());
    // stdout is not a terminal here: plain lines (one per stage start and end) come first, on
    // stdout like the table, so `pipeline run > run.log` has them (issue 15, point 11).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let at = stdout.find("stage  kind    status  duration  output  report").unwrap_or_else(|| panic!("{stdout}"));
    let (lines, table) = stdout.split_at(at);
    assert!(lines.contains(" start e (concat): no cache entry (never ran)\n"), "one line per stage start: {lines}");
    assert!(lines.contains("   ran e (concat) in "), "one line per finished stage: {lines}");
    assert!(table.contains("5 ran, 0 cached, 0 failed, 0 skipped"), "{table}");
    let report = p.path().join(".pipeline/runs/t/report.html");
    assert!(table.contains(&format!("\nreport: {}\n", Path::new(".pipeline/runs/t/report.html").display())), "{table}");
    assert!(report.is_file());
    assert!(p.stdout(&["run", "r.toml"]).contains("0 ran, 5 cached"));

    p.edit("separator = \"|\"", "separator = \"||\"");
    let plan = p.stdout(&["plan", "r.toml"]);
    insta::with_settings!({snapshot_path => "../snapshots/cli"}, { insta::assert_snapshot!("plan_after_edit", plan) });
    let explain = p.stdout(&["explain", "r.toml", "c"]);
    assert!(explain.contains("dirty: params.separator: \"|\" → \"||\""), "{explain}");
    let explain_e = p.stdout(&["explain", "r.toml", "e"]);
    assert!(explain_e.contains("upstream c will run first"), "{explain_e}");
    assert!(explain_e.contains("dirty: inputs.parts: [\""), "{explain_e}");
    assert!(explain_e.contains("\"new output of c\""), "{explain_e}");
    let explain_d = p.stdout(&["explain", "r.toml", "d"]);
    assert!(explain_d.starts_with("stage `d` (files v1): cached\n  key "), "{explain_d}");
}

/// The demo recipe's own suggestion: edit `separator`, then `plan` and `explain` say why.
#[test]
fn demo_recipe_separator_edit_is_explained() {
    let p = Project::new(&std::fs::read_to_string(repo().join("recipes/demo-files.toml")).unwrap());
    for f in ["greeting.txt", "facts.txt", "extra/a.txt", "extra/b.txt"] {
        p.write(&format!("data/demo/{f}"), &std::fs::read_to_string(repo().join("recipes/data/demo").join(f)).unwrap());
    }
    p.run(&[]).ok();
    p.edit("separator = \"\\n\"", "separator = \"\\n\\n\"");
    let plan = p.stdout(&["plan", "r.toml"]);
    assert!(plan.contains("  3. joined  concat  will run: changed: params.separator <- parts=notes.data"), "{plan}");
    let explain = p.stdout(&["explain", "r.toml", "joined"]);
    assert_eq!(
        explain,
        "stage `joined` (concat v1): will run: changed: params.separator\n  dirty: params.separator: \"\\n\" → \"\\n\\n\"\n"
    );
    let none = p.stdout(&["explain", "r.toml", "joined", "--cache-dir", "nowhere"]);
    assert!(none.starts_with("stage `joined` (concat v1): will run: no cache at nowhere"), "{none}");
}

#[test]
fn selection_flags_and_their_exit_codes() {
    let p = Project::five();
    let r = p.run(&["--until", "b"]).ok();
    assert_eq!(r.with_status("ran"), v(&["a", "b"]));
    assert_eq!(r.statuses().len(), 2, "c, d, e are not selected: no events");
    let r = p.run(&["--only", "e"]);
    assert_eq!(r.code, 1, "skipped stages make the run unsuccessful");
    assert_eq!(r.with_status("skipped"), v(&["c", "d", "e"]));
    assert_eq!(
        r.event("e", "stage_skipped")["error"],
        "input from `c` is not cached (run it first, e.g. with --until e)"
    );
    let r = p.run(&["--force", "a", "--jobs", "2"]).ok();
    assert_eq!(r.with_status("ran"), v(&["a", "c", "d", "e"]));
    assert_eq!(r.event("a", "stage_started")["reason"], "forced (--force)");
    for flag in ["--only", "--until", "--force"] {
        let bad = p.pipeline(&["run", "r.toml", flag, "nope"]);
        assert_eq!(bad.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains("error: recipe r.toml has no stage `nope`; its stages: a, b, c, d, e"), "{flag}: {err}");
    }
    let bad = p.pipeline(&["explain", "r.toml", "nope"]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = p.pipeline(&["run", "r.toml", "--jobs", "0"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--jobs must be at least 1"));
}

#[test]
fn a_failing_stage_exits_1_and_skips_downstream() {
    let p = Project::new(
        "[pipeline]\nname = \"u\"\n[stages.raw]\nkind = \"files\"\nparams.paths = [\"data\"]\n[stages.all]\nkind = \"concat\"\ninputs.parts = \"raw.data\"\n",
    );
    p.write("data/ok.txt", "fine");
    std::os::unix::fs::symlink(p.path().join("nowhere"), p.path().join("data/broken")).unwrap();
    let r = p.run(&[]);
    assert_eq!(r.code, 1);
    let failed = r.event("raw", "stage_failed");
    let dir = p.path().join("data");
    assert!(failed["error"].as_str().unwrap().starts_with(&format!("cannot read {}: ", dir.display())), "{failed}");
    assert_eq!(r.with_status("skipped"), v(&["all"]));
    assert_eq!(r.events.last().unwrap()["ok"], false);
    let human = p.pipeline(&["run", "r.toml"]);
    assert_eq!(human.status.code(), Some(1));
    // stdout is not a terminal: the per-stage lines are on it, before the table.
    let out = String::from_utf8_lossy(&human.stdout);
    assert!(out.contains(&format!("failed raw (files): cannot read {}: ", dir.display())), "{out}");
    assert!(out.contains("  skip all (concat): upstream `raw` did not complete"), "{out}");
    assert!(out.contains("0 ran, 0 cached, 1 failed, 1 skipped"), "{out}");
    let plan = p.stdout(&["plan", "r.toml"]);
    assert!(plan.contains(&format!("raw  files   will run: cannot read {}: ", dir.display())), "{plan}");
}

#[test]
fn waiting_for_the_cache_lock_is_reported() {
    let p = Project::five();
    let store = pipeline_cache::Store::open(&p.path().join(".pipeline")).unwrap();
    let lock = store.lock(|| panic!("nobody else holds it")).unwrap();
    let mut child = p.cmd(&["--log-format", "json", "run", "r.toml"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "waiting_for_lock");
    assert!(first["cache_dir"].as_str().unwrap().ends_with(".pipeline"), "{first}");
    drop(lock);
    let rest: Vec<Value> = lines.map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
    assert!(child.wait().unwrap().success());
    assert_eq!(rest.iter().filter(|e| e["event"] == "stage_finished").count(), 5);

    let lock = store.lock(|| panic!("nobody else holds it")).unwrap();
    let mut child = p.cmd(&["run", "r.toml"]).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.starts_with("waiting: another pipeline process is using the cache "), "{line}");
    drop(lock);
    std::io::Read::read_to_string(&mut err, &mut line).unwrap();
    assert!(child.wait().unwrap().success(), "{line}");
}

#[test]
fn gc_drops_unreferenced_entries() {
    let p = Project::five();
    p.run(&[]).ok();
    p.write("data/a.txt", "A2");
    assert_eq!(p.run(&[]).ok().with_status("ran"), v(&["a", "b", "c", "e"]));
    let gc = p.pipeline(&["cache", "gc", "r.toml"]);
    assert!(gc.status.success());
    let msg = String::from_utf8_lossy(&gc.stdout);
    // One line per dropped entry (what, with bytes), then the totals.
    assert_eq!(
        msg.lines().filter(|l| l.starts_with("dropped entry ") && l.ends_with(": not referenced")).count(),
        4,
        "{msg}"
    );
    assert!(msg.lines().last().unwrap().starts_with("dropped 4 entries and 4 artifacts"), "{msg}");
    assert_eq!(p.run(&[]).ok().with_status("cached").len(), 5);
    let ls = p.stdout(&["cache", "ls", "r.toml"]);
    assert!(ls.contains("5 entries"), "{ls}");
    assert!(p.pipeline(&["cache", "verify", "r.toml"]).status.success());
    let gc = p.pipeline(&["cache", "gc", "r.toml", "--older-than", "0s"]);
    assert!(String::from_utf8_lossy(&gc.stdout).lines().last().unwrap().starts_with("dropped 5 entries"));
}

/// Regression (issue 14, defect 5): an adapter trained from a model folder outside the cache (a
/// folder of the project) recorded that base by absolute path, so a copied project's artifacts
/// depended on where it lived and a moved project's adapter no longer loaded. Copied to another,
/// deeper directory and the original deleted, the project is fully cached for `plan`, `run` and
/// `cache verify`, and its adapter folder loads (`generate --model <artifact>/adapter`).
#[test]
fn a_copied_project_with_a_model_folder_stays_cached_and_its_adapter_loads() {
    let p = Project::new(&corpus_pretrain("base", "max_steps = 2"));
    let base = p.run(&[]).ok();
    let digest = base.event("pretrain", "stage_finished")["outputs"]["model"].as_str().unwrap().to_string();
    std::fs::create_dir_all(p.path().join("models")).unwrap();
    let status = Command::new("cp").arg("-r").arg(p.artifact(&digest)).arg(p.path().join("models/base")).status();
    assert!(status.unwrap().success());
    for f in ["example_val.csv", "example_dev.csv"] {
        let text = std::fs::read_to_string(repo().join("recipes/data/self-cognition/eval-mcq").join(f)).unwrap();
        p.write(&format!("data/mcq/{f}"), &text);
    }
    p.write(
        "r.toml",
        r#"[pipeline]
name = "copied"
seed = 3
[stages.data]
kind = "collect"
params = { datasets = ["builtin:self-cognition"], model_author = "swift", model_name = "swift-robot" }
[stages.sft]
kind = "sft"
inputs = { data = "data.data" }
params = { model = "models/base", train_type = "lora", lora_rank = 4, lora_alpha = 8, max_steps = 2, per_device_train_batch_size = 2, max_length = 512, warmup_ratio = 0.0, split_ratio = 0.0 }
[stages.eval]
kind = "evaluate"
inputs = { model = "sft.model" }
params = { dataset = "general_mcq", local_path = "data/mcq", scorer = "loglik", model_name = "tiny-sft" }
"#,
    );
    let first = p.run(&[]).ok();
    assert_eq!(first.with_status("ran"), v(&["data", "eval", "sft"]));
    let sft = first.event("sft", "stage_finished")["outputs"]["model"].as_str().unwrap().to_string();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(p.artifact(&sft).join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    let named = cfg["base_model_name_or_path"].as_str().unwrap();
    assert!(!Path::new(named).is_absolute(), "absolute base path in the artifact: {named}");

    // What `cache ls` and `cache gc --dry-run` say, by key (the same after the copy).
    let cache_view = |p: &Project| {
        let events = |args: &[&str], event: &str, field: &str| -> Vec<String> {
            let out = p.pipeline(args);
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
            let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .filter(|e| e["event"] == event)
                .map(|e| format!("{} {}", e["key"], e[field]))
                .collect();
            v.sort();
            v
        };
        (
            events(&["--log-format", "json", "cache", "ls", "r.toml"], "cache_entry", "latest"),
            events(&["--log-format", "json", "cache", "gc", "r.toml", "--dry-run"], "cache_drop", "reason"),
        )
    };
    let view = cache_view(&p);
    assert!(!view.0.is_empty());

    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("a/b")).unwrap();
    let copy = Project { dir: tempfile::TempDir::new_in(other.path().join("a/b")).unwrap() };
    let src = format!("{}/.", p.path().display());
    assert!(Command::new("cp").arg("-a").arg(src).arg(copy.path()).status().unwrap().success());
    std::fs::remove_dir_all(p.path()).unwrap();
    let plan = copy.pipeline(&["plan", "r.toml"]);
    let plan_text = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.status.success(), "{plan_text}");
    assert!(!plan_text.contains("will run"), "the copied project's plan:\n{plan_text}");
    let again = copy.run(&[]).ok();
    assert_eq!(again.with_status("cached"), v(&["data", "eval", "sft"]), "plan:\n{plan_text}");
    let verify = copy.pipeline(&["cache", "verify", "r.toml"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    assert_eq!(cache_view(&copy), view, "`cache ls` / `cache gc --dry-run` differ in the copy");
    let adapter = copy.artifact(&sft).join("adapter");
    let out = copy
        .cmd(&["generate", "--prompt", "Who are you?", "--max-tokens", "4"])
        .arg("--model")
        .arg(&adapter)
        .output()
        .unwrap();
    assert!(out.status.success(), "the moved adapter does not load: {}", String::from_utf8_lossy(&out.stderr));
}

/// Regression (issue 14, defect 4): recipes sharing a `[pipeline] name` overwrote each other's
/// "last run" pointers, so `cache gc` dropped the other recipe's entries; and `cache gc <recipe>`
/// while an upstream stage was due to re-run dropped the downstream entries that early cutoff
/// reuses once that stage's output comes out the same.
#[test]
fn gc_keeps_entries_of_recipes_sharing_a_name_and_those_early_cutoff_reuses() {
    let p = Project::five();
    p.write("data/a2.txt", "A2");
    p.write("r2.toml", &FIVE.replace("data/a.txt", "data/a2.txt"));
    let run2 = || Run::from(p.pipeline(&["--log-format", "json", "run", "r2.toml"]));
    p.run(&[]).ok();
    assert_eq!(run2().ok().with_status("ran"), v(&["a", "b", "c", "e"]));
    let gc = p.pipeline(&["cache", "gc"]);
    assert!(gc.status.success());
    assert!(
        String::from_utf8_lossy(&gc.stdout).contains("dropped 0 entries"),
        "{}",
        String::from_utf8_lossy(&gc.stdout)
    );
    assert_eq!(p.run(&[]).ok().with_status("cached").len(), 5);
    assert_eq!(run2().ok().with_status("cached").len(), 5);

    // `c`'s separator joins nothing (one part): a new key, the same output. Before `c` re-runs,
    // `e`'s key is unknown; gc keeps its latest entry, which early cutoff then reuses.
    p.edit(r#"separator = "|""#, r#"separator = "+""#);
    let gc = p.pipeline(&["cache", "gc", "r.toml"]);
    assert!(gc.status.success());
    let r = p.run(&[]).ok();
    assert_eq!(r.with_status("ran"), v(&["c"]), "gc said:\n{}", String::from_utf8_lossy(&gc.stdout));
    assert_eq!(r.with_status("cached"), v(&["a", "b", "d", "e"]));
}

/// Regression (issue 14, defect 3): gc deleted the checkpoints of interrupted training (a scratch
/// directory survived only when its key was committed, and `--older-than` dropped every one).
/// In-progress checkpoints are kept unless older than asked, and gc says what it drops, with bytes.
#[test]
fn gc_keeps_checkpoints_of_interrupted_training() {
    let p = Project::five();
    p.run(&[]).ok();
    let ck = p.path().join(".pipeline/v1/scratch/0123456789abcdef/checkpoints/checkpoint-5");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("trainer_state.json"), vec![b'x'; 2048]).unwrap();
    for args in [&["cache", "gc", "r.toml"][..], &["cache", "gc"], &["cache", "gc", "r.toml", "--older-than", "1h"]] {
        let out = p.stdout(args);
        assert!(ck.is_dir(), "{args:?} dropped an in-progress checkpoint: {out}");
        assert!(out.contains(", 0 scratch directories"), "{out}");
    }
    let dry = p.stdout(&["cache", "gc", "--older-than", "0s", "--dry-run"]);
    assert!(dry.contains("would drop scratch 0123456789ab (2.0 KiB, checkpoints of an interrupted run"), "{dry}");
    assert!(ck.is_dir());
    let out = p.stdout(&["cache", "gc", "--older-than", "0s"]);
    assert!(out.contains("dropped scratch 0123456789ab (2.0 KiB"), "{out}");
    assert!(!ck.exists());
}

#[test]
fn cache_verify_reports_a_corrupt_artifact() {
    let p = Project::five();
    let r = p.run(&[]).ok();
    let d = r.event("d", "stage_finished")["outputs"]["data"].as_str().unwrap().to_string();
    std::fs::write(p.artifact(&d).join("d.txt"), "?").unwrap();
    let out = p.pipeline(&["cache", "verify", "r.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("corrupt: {d}: content digest is ")), "{text}");
    assert!(text.ends_with("5 artifacts checked, 1 problems\n"), "{text}");
    // Regression (issue 14, defect 1): verify left the corrupt entry valid, so the next run still
    // trusted it. It is invalidated now: the next run re-creates it, and verify is clean again.
    assert!(text.contains("; removed it and the entries of `d` (they re-run next time)"), "{text}");
    let r = p.run(&[]).ok();
    assert_eq!(r.with_status("ran"), v(&["d"]));
    assert!(p.pipeline(&["cache", "verify", "r.toml"]).status.success());
}

/// Regression (issue 14, defect 1), as filed: 4 KiB overwritten in the middle of a cached
/// `model.safetensors`, its mtime restored: `generate --recipe` printed an empty line with exit 0.
/// The model is checked while it is read: `generate` (and `generate --stream`, which loads through
/// `serve`'s and `chat`'s loader) fail naming the corrupt artifact and drop its entry; the next
/// run re-creates the same model, and generation works again.
#[test]
fn corrupt_model_artifact_is_an_error_for_generate_and_the_next_run_recreates_it() {
    let p = Project::new(&corpus_pretrain("model", "max_steps = 2"));
    let cold = p.run(&[]).ok();
    let digest = cold.event("pretrain", "stage_finished")["outputs"]["model"].as_str().unwrap().to_string();
    let generate = |stream: bool| {
        let mut args = vec!["generate", "--recipe", "r.toml", "--raw", "--prompt", "Hello", "--max-tokens", "4"];
        if stream {
            args.push("--stream");
        }
        p.pipeline(&args)
    };
    assert!(generate(false).status.success());
    for stream in [false, true] {
        corrupt_keeping_mtime(&p.artifact(&digest).join("model.safetensors"), 4096, |_| 0xAA);

        let out = generate(stream);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stream {stream}: {err}");
        assert!(out.stdout.is_empty(), "stream {stream}: output from a corrupt model: {:?}", out.stdout);
        let short = &digest[..12];
        assert!(
            err.contains(&format!("the cached artifact {short} is corrupt"))
                && err.contains("dropped it and the cache entries of `pretrain`: `pipeline run` re-creates them"),
            "stream {stream}: {err}"
        );
        let again = p.run(&[]).ok();
        assert_eq!(again.with_status("ran"), v(&["pretrain"]));
        assert_eq!(again.event("pretrain", "stage_finished")["outputs"]["model"], digest.as_str());
        assert!(generate(stream).status.success());
    }
}

/// Regression (issue 14, defect 1): datasets (Parquet, read through polars) were checked only by a
/// full digest pass before a stage ran, or by `cache verify`, never while they were read. Bytes
/// flipped in the middle of a cached `data.parquet`, its mtime restored (invisible to the stat
/// check): the next run that reads it finds the mismatch while reading, names the file and the
/// stage, drops the entry and re-creates the dataset; the reading stage's output is the clean
/// run's, byte for byte, and the cache verifies clean.
#[test]
fn corrupt_parquet_artifact_is_not_used() {
    let p = Project::new(
        r#"[pipeline]
name = "t"
seed = 1
[stages.data]
kind = "collect"
params = { datasets = ["builtin:self-cognition"], model_author = "swift", model_name = "swift-robot" }
[stages.dedupe]
kind = "dedupe"
inputs = { data = "data.data" }
"#,
    );
    let cold = p.run(&[]).ok();
    let output = |r: &Run, s: &str, o: &str| r.event(s, "stage_finished")["outputs"][o].as_str().unwrap().to_string();
    corrupt_keeping_mtime(&p.artifact(&output(&cold, "data", "data")).join("data.parquet"), 64, |b| b ^ 0x20);

    // Nothing reads it: everything is cached, nothing corrupt is output.
    assert_eq!(p.run(&[]).ok().with_status("cached"), v(&["data", "dedupe"]));
    // A stage that reads it finds the mismatch while reading, and the dataset is re-created.
    let r = p.run(&["--force", "dedupe"]).ok();
    let warnings: Vec<&str> =
        r.events.iter().filter(|e| e["event"] == "warning").filter_map(|e| e["message"].as_str()).collect();
    assert!(
        warnings.iter().any(|w| w.contains("(output of `data`) is corrupt (`data.parquet` did not match the cache's digest when `dedupe` read it); re-running `data`")),
        "{warnings:?}"
    );
    assert_eq!(r.with_status("ran"), v(&["data", "dedupe"]));
    assert_eq!(output(&r, "data", "data"), output(&cold, "data", "data"));
    assert_eq!(output(&r, "dedupe", "data"), output(&cold, "dedupe", "data"));
    assert!(p.pipeline(&["cache", "verify", "r.toml"]).status.success());
}

/// Regression (issue 14, defect 7): an interrupted run ignored SIGTERM for minutes (cancellation
/// was looked at between evaluate batches only) and exited 1. SIGTERM during training stops the
/// run within seconds, with exit 130 and a line saying which checkpoint was kept; the next run
/// says "resuming <stage> from step N" (defect 2) and resumes from that step.
#[test]
fn sigterm_stops_training_within_seconds_with_exit_130_and_the_rerun_resumes() {
    let p = Project::new(&corpus_pretrain("stop", "max_steps = 100000, logging_steps = 1"));
    // Runs until `until` holds for an event, then SIGTERM: (exit code, seconds to exit, events).
    let interrupt = |until: &dyn Fn(&Value) -> bool| {
        let mut child = p
            .cmd(&["--log-format", "json", "run", "r.toml"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut events: Vec<Value> = Vec::new();
        for l in lines.by_ref() {
            events.push(serde_json::from_str(&l.unwrap()).unwrap());
            if until(events.last().unwrap()) {
                break;
            }
        }
        assert!(events.last().is_some_and(until), "the run ended first: {events:?}");
        let t0 = std::time::Instant::now();
        assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
        events.extend(lines.map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap()));
        let code = child.wait().unwrap().code();
        (code, t0.elapsed().as_secs_f64(), events)
    };
    let trained = |e: &Value| e["event"] == "metric" && e["stage"] == "pretrain" && e["step"].as_u64() >= Some(3);
    let (code, secs, events) = interrupt(&trained);
    assert_eq!(code, Some(130), "{events:?}");
    assert!(secs < 5.0, "SIGTERM took {secs:.1} s to stop the run");
    let said =
        events.iter().find(|e| e["event"] == "interrupted" && e["stage"] == "pretrain").expect("an interrupted line");
    let said = said["message"].as_str().unwrap();
    let step: u64 =
        regex::Regex::new(r"^interrupted: `pretrain` kept a checkpoint at step (\d+); the next run resumes from it$")
            .unwrap()
            .captures(said)
            .unwrap_or_else(|| panic!("{said}"))[1]
            .parse()
            .unwrap();
    assert!(step >= 3, "{said}");

    let resuming = format!("resuming pretrain from step {step} (checkpoint-{step})");
    let (code, _, events) = interrupt(&|e: &Value| e["event"] == "message" && e["message"] == resuming.as_str());
    assert_eq!(code, Some(130), "{events:?}");
    let r = Run { code: code.unwrap_or(-1), events, stderr: String::new() };
    assert_eq!(r.with_status("cached"), v(&["corpus"]), "{:?}", r.events);
}

/// Regression (issue 14, defect 6): absurd sizes aborted the process (`lora_rank = 100000000`:
/// SIGABRT on a 25.6 GB allocation; `dataset#999999999999`: a 16 TB allocation;
/// `per_device_train_batch_size = 1e18`: a multiply-overflow panic). Each is a recipe error at plan
/// time (exit 2, before anything runs), with the estimate in the message.
#[test]
fn absurd_sizes_are_plan_time_errors_with_the_estimate_not_aborts() {
    let recipe = |corpus: &str, sft: &str| {
        format!(
            r#"[pipeline]
name = "absurd"
seed = 1
[stages.corpus]
kind = "collect"
params = {{ datasets = ["{corpus}"] }}
[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "corpus.data" }}
params = {{ max_steps = 2, max_length = 32 }}
[stages.sft]
kind = "sft"
inputs = {{ data = "corpus.data", model = "pretrain.model" }}
params = {{ train_type = "lora", max_steps = 2, max_length = 32, {sft} }}
"#
        )
    };
    for (corpus, sft, want) in [
        (
            "builtin:corpus",
            "lora_rank = 100000000",
            "`lora_rank = 100000000` is absurd: its A and B matrices alone take ",
        ),
        (
            "builtin:corpus",
            "lora_rank = 4, per_device_train_batch_size = 1000000000000000000",
            "`per_device_train_batch_size` 1000000000000000000 is absurd: at most 65536",
        ),
        ("builtin:corpus#999999999999", "lora_rank = 4", "999999999999 rows need at least 16.0 TB"),
    ] {
        let p = Project::new(&recipe(corpus, sft));
        for args in [&["plan", "r.toml"][..], &["run", "r.toml"]] {
            let out = p.pipeline(args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {sft}: {err}");
            assert!(err.contains(want) && !err.contains("panicked"), "{args:?} {sft}: {err}");
        }
        assert!(!p.path().join(".pipeline/v1/entries").is_dir() || p.stdout(&["cache", "ls"]).contains("0 entries"));
    }
}

/// Regression (issue 14, defects 6 and 7): sizes that only the model can bound. A LoRA rank
/// above every dimension of the model, and `max_new_tokens = 1000000000` (accepted, then a run
/// that ignored SIGTERM for minutes), are refused naming the model's sizes before any step or
/// token; `generate --max-tokens` past the context is a usage error (exit 2).
#[test]
fn sizes_past_the_models_dimensions_or_context_are_refused_before_any_work() {
    let p = Project::new(
        r#"[pipeline]
name = "bounds"
seed = 3
[stages.corpus]
kind = "collect"
params = { datasets = ["builtin:corpus"] }
[stages.chat]
kind = "collect"
params = { datasets = ["builtin:self-cognition"], model_author = "swift", model_name = "swift-robot" }
[stages.pretrain]
kind = "pretrain"
inputs = { data = "corpus.data" }
params = { learning_rate = 3e-3, max_steps = 2, per_device_train_batch_size = 2, max_length = 32, warmup_ratio = 0.0, split_ratio = 0.0 }
[stages.sft]
kind = "sft"
inputs = { data = "chat.data", model = "pretrain.model" }
params = { train_type = "lora", lora_rank = 10000, max_steps = 2, per_device_train_batch_size = 2, max_length = 512, split_ratio = 0.0 }
[stages.eval]
kind = "evaluate"
inputs = { model = "pretrain.model" }
params = { dataset = "general_qa", local_path = "data/qa", max_new_tokens = 1000000000 }
"#,
    );
    let qa = std::fs::read_to_string(repo().join("recipes/data/self-cognition/eval-qa/self_cognition.jsonl")).unwrap();
    p.write("data/qa/self_cognition.jsonl", &qa);
    let r = p.run(&["-k"]);
    assert_eq!(r.code, 1, "{:?}", r.events);
    assert_eq!(r.with_status("ran"), v(&["chat", "corpus", "pretrain"]), "{:?}", r.events);
    let error = |stage: &str| {
        r.events
            .iter()
            .find(|e| e["stage"] == stage && e["error"].is_string())
            .unwrap_or_else(|| panic!("no error of {stage}: {:?}", r.events))["error"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let sft = error("sft");
    assert!(sft.contains("`lora_rank = 10000` exceeds every dimension of the model (hidden_size "), "{sft}");
    let eval = error("eval");
    assert!(eval.contains("max_new_tokens = 1000000000 exceeds the context of "), "{eval}");
    let out = p.pipeline(&[
        "generate",
        "--recipe",
        "r.toml",
        "--stage",
        "pretrain",
        "--raw",
        "--prompt",
        "Hello",
        "--max-tokens",
        "1000000000",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--max-tokens 1000000000 after a prompt of ") && err.contains("exceeds the model's context"),
        "{err}"
    );
}

/// Regression (issue 14, defect 9): a read-only cache failed the first stage and then the run
/// report with the same OS error, printed twice. It is one error naming the cache, before any
/// stage starts, with the OS error once. (Permission bits do not stop root, the CI user: the
/// cache's `last` directory is made a link to `/proc/1/fdinfo`, a directory in which nobody can
/// create a file.)
#[test]
fn an_unwritable_cache_is_one_error_before_any_stage_runs() {
    let p = Project::five();
    p.run(&[]).ok();
    let last = p.path().join(".pipeline/v1/last");
    std::fs::remove_dir_all(&last).unwrap();
    std::os::unix::fs::symlink("/proc/1/fdinfo", &last).unwrap();
    p.write("data/a.txt", "A2");
    let out = p.pipeline(&["run", "r.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("is not writable").count(), 1, "{err}");
    assert!(err.starts_with("error: the cache ") && err.contains(".pipeline is not writable: "), "{err}");
    assert_eq!(err.matches("(os error ").count(), 1, "{err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "a stage started: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn cache_dir_flag_and_env() {
    let p = Project::five();
    let r = p.run(&["--cache-dir", "elsewhere", "--until", "a"]).ok();
    assert_eq!(r.with_status("ran"), v(&["a"]));
    assert!(p.path().join("elsewhere/v1/entries").is_dir());
    assert!(!p.path().join(".pipeline").exists());
    let out = p
        .cmd(&["--log-format", "json", "run", "r.toml", "--until", "a"])
        .env("PIPELINE_CACHE_DIR", "elsewhere")
        .output()
        .unwrap();
    assert_eq!(Run::from(out).ok().with_status("cached"), v(&["a"]));
    assert!(!p.path().join(".pipeline").exists());
}

#[test]
fn device_flag_is_parsed_once_and_stays_out_of_the_key() {
    let p = Project::five();
    p.run(&["--until", "a", "--device", "cuda:1"]).ok();
    assert_eq!(p.run(&["--until", "a"]).ok().with_status("cached"), v(&["a"]), "the device is not in the key");
    for args in [
        vec!["run", "r.toml", "--device", "tpu"],
        vec!["generate", "--model", "m", "--prompt", "hi", "--device", "tpu"],
        vec!["eval", "--model", "m", "--dataset", "general_qa", "--local-path", ".", "--device", "tpu"],
    ] {
        let out = p.pipeline(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("invalid value 'tpu' for '--device <DEVICE>': unknown device `tpu`; expected `cpu`, `cuda` (GPU 0) or `cuda:<N>` (GPU N)"),
            "{args:?}: {err}"
        );
    }
    let out = p.pipeline(&["run", "r.toml", "--device", "cuda:x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid GPU ordinal in `cuda:x`"));
}

/// Without the `cuda` feature, `--device cuda` reaches a real training stage (typed, through the
/// engine's run context) and fails there with the message that says how to rebuild; `generate`
/// says the same before loading anything.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_says_how_to_rebuild() {
    let p = Project::new(
        "[pipeline]\nname = \"g\"\n[stages.raw]\nkind = \"files\"\nparams.paths = [\"data/in.txt\"]\n[stages.lm]\nkind = \"pretrain\"\ninputs.data = \"raw.data\"\n",
    );
    p.write("data/in.txt", "text");
    let r = p.run(&["--device", "cuda"]);
    assert_eq!(r.code, 1);
    let rebuild =
        "this pipeline binary was built without CUDA support; rebuild with `cargo build --release --features cuda`";
    let err = r.event("lm", "stage_failed")["error"].as_str().unwrap().to_string();
    assert!(err.starts_with(&format!("--device cuda: {rebuild}")), "{err}");
    let r = p.run(&["--device", "cuda:1"]);
    let err = r.event("lm", "stage_failed")["error"].as_str().unwrap().to_string();
    assert!(err.starts_with(&format!("--device cuda:1: {rebuild}")), "{err}");
    let out = p.pipeline(&["generate", "--model", "m", "--prompt", "hi", "--device", "cuda"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with(&format!("error: --device cuda: {rebuild}")), "{err}");
}

#[test]
fn every_invalid_recipe_gives_its_snapshotted_message() {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(repo().join("recipes/invalid")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 15);
    for f in files {
        let rel = format!("recipes/invalid/{}", f.file_name().unwrap().to_string_lossy());
        let out = Command::new(BIN).current_dir(repo()).args(["plan", &rel]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{rel}");
        let name = format!("invalid__{}", f.file_stem().unwrap().to_string_lossy());
        insta::with_settings!({snapshot_path => "../snapshots/cli", prepend_module_to_snapshot => false, input_file => &f}, {
            insta::assert_snapshot!(name, String::from_utf8_lossy(&out.stderr));
        });
    }
}

/// `plan --format dot|mermaid|json`: the DAG with each stage's status (cached, will run and why,
/// waiting on upstream); Graphviz, when installed, accepts the dot text.
#[test]
fn plan_formats_draw_the_dag_with_statuses() {
    let p = Project::five();
    p.run(&[]).ok();
    p.edit("separator = \"|\"", "separator = \"||\"");
    for format in ["dot", "mermaid", "json"] {
        let out = p.pipeline(&["plan", "r.toml", "--format", format]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        insta::with_settings!({snapshot_path => "../snapshots/cli"}, {
            insta::assert_snapshot!(format!("plan_format_{format}"), text)
        });
        if format == "json" {
            let v: Value = serde_json::from_str(&text).unwrap();
            let status: Vec<&str> =
                v["stages"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
            assert_eq!(status, ["cached", "cached", "will-run", "cached", "waiting"]);
        }
        if format == "dot" {
            if let Ok(mut dot) = Command::new("dot").arg("-Tsvg").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn() {
                use std::io::Write;
                dot.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
                let svg = dot.wait_with_output().unwrap();
                assert!(svg.status.success() && String::from_utf8_lossy(&svg.stdout).contains("<svg"));
            }
        }
    }
    // `text` is the default and unchanged.
    assert_eq!(p.stdout(&["plan", "r.toml", "--format", "text"]), p.stdout(&["plan", "r.toml"]));
}

/// A short training recipe (pretrain with an eval split → DPO → evaluate), run as CI or a log
/// file sees it (stdout not a terminal): plain progress lines every `logging_steps`; TensorBoard
/// event files in each stage's artifact and copied to the run's log directory, one folder per
/// stage; `report.html` with every stage; `pipeline report` writes both again from the cache.
#[test]
fn training_run_logs_plain_progress_tensorboard_files_and_a_report() {
    let p = Project::new(&std::fs::read_to_string(repo().join("recipes/tiny-train-eval.toml")).unwrap());
    for f in [
        "data/self-cognition/dpo.jsonl",
        "data/self-cognition/eval-mcq/example_val.csv",
        "data/self-cognition/eval-mcq/example_dev.csv",
    ] {
        p.write(f, &std::fs::read_to_string(repo().join("recipes").join(f)).unwrap());
    }
    let out = p.pipeline(&["run", "r.toml"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" start pretrain (pretrain): no cache entry (never ran)\n"), "{stdout}");
    let re = regex::Regex::new(
        r"\[pretrain\] step 2/6 \(33%\) \| loss [0-9.]+ \| lr [0-9.e-]+ \| grad_norm [0-9.]+ \| tokens/s [0-9]+ \| eta [0-9ms.]+\n",
    )
    .unwrap();
    assert!(re.is_match(&stdout), "a line per logging window: {stdout}");
    assert!(stdout.contains("[pretrain] step 2/6 (33%) | eval_loss "), "{stdout}");
    assert!(stdout.contains("[align] step 3/3 (100%) | loss "), "logging_steps = 1: {stdout}");
    assert!(stdout.contains("   ran eval-mcq (evaluate) in "), "{stdout}");

    let run_dir = p.path().join(".pipeline/runs/tiny-train-eval");
    let logdir = run_dir.join("tensorboard");
    assert!(
        stdout.contains(&format!(
            "tensorboard: tensorboard --logdir {}",
            Path::new(".pipeline/runs/tiny-train-eval/tensorboard").display()
        )),
        "{stdout}"
    );
    let events = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."))
            .collect();
        v.sort();
        v
    };
    for stage in ["pretrain", "align", "eval-mcq"] {
        let files = events(&logdir.join(stage));
        assert_eq!(files.len(), 1, "{stage}: {files:?}");
        // The copy is the stage artifact's file, byte for byte.
        let json = p.run(&[]).ok();
        let e = json.event(stage, "stage_cached");
        let output = if stage == "eval-mcq" { "report" } else { "metrics" };
        let art = p.artifact(e["outputs"][output].as_str().unwrap()).join("tensorboard");
        let art_files = events(&art);
        assert_eq!(art_files.len(), 1, "{stage}");
        assert_eq!(std::fs::read(&files[0]).unwrap(), std::fs::read(&art_files[0]).unwrap(), "{stage}");
    }
    let html = std::fs::read_to_string(run_dir.join("report.html")).unwrap();
    for stage in ["corpus", "prefs", "pretrain", "align", "eval-mcq"] {
        assert!(html.contains(&format!("id=\"stage-{stage}\"")), "{stage} missing from the report");
    }
    assert!(html.contains("id=\"loss-chart\"") && html.contains("<td>general_mcq</td>"));

    // From the cache alone.
    std::fs::remove_dir_all(&logdir).unwrap();
    std::fs::remove_file(run_dir.join("report.html")).unwrap();
    let again = p.pipeline(&["report", "r.toml"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.starts_with("report: ") && text.contains("tensorboard: tensorboard --logdir "), "{text}");
    assert_eq!(std::fs::read_to_string(run_dir.join("report.html")).unwrap().matches("class=\"stage\"").count(), 5);
    for stage in ["pretrain", "align", "eval-mcq"] {
        assert_eq!(events(&logdir.join(stage)).len(), 1, "{stage}");
    }

    // Regression (issue 14, defect 1): `pipeline report` copied cached event files without
    // checking them. Bytes flipped in pretrain's event file, its mtime restored (invisible to the
    // stat check): the report leaves it out with a warning naming the file, never copies it, and
    // drops the entry, so the next run re-creates it.
    let json = p.run(&[]).ok();
    let art = p.artifact(json.event("pretrain", "stage_cached")["outputs"]["metrics"].as_str().unwrap());
    corrupt_keeping_mtime(&events(&art.join("tensorboard")).remove(0), 1, |b| b ^ 0x01);
    std::fs::remove_dir_all(&logdir).unwrap();
    let bad = p.pipeline(&["report", "r.toml"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(bad.status.success(), "{err}");
    assert!(err.contains("is corrupt") && err.contains("`pretrain`") && err.contains("tfevents"), "{err}");
    assert!(!logdir.join("pretrain").exists(), "the corrupt event file was copied");
    assert_eq!(events(&logdir.join("align")).len(), 1);
    let rerun = p.run(&[]).ok();
    assert!(rerun.with_status("ran").contains(&"pretrain".to_string()), "{:?}", rerun.with_status("ran"));
    assert!(p.pipeline(&["cache", "verify", "r.toml"]).status.success());
}

/// Issue 15, point 1: the seed's sequence-classification and embedding rows train under
/// `task_type = "seq_cls"` / `"embedding"` (the example recipes, seconds each): accuracy and
/// Spearman well above chance on the held-out rows, and the classifier folder is transformers'.
#[test]
fn seq_cls_and_embedding_recipes_train_and_report_their_eval_figures() {
    for (recipe, data, stage, figure, at_least) in [
        ("tiny-seq-cls.toml", "data/tasks/reviews.jsonl", "classify", "eval_accuracy", 0.8),
        ("tiny-embedding.toml", "data/tasks/pairs.jsonl", "embed", "eval_spearman", 0.5),
    ] {
        let p = Project::new(&std::fs::read_to_string(repo().join("recipes").join(recipe)).unwrap());
        p.write(data, &std::fs::read_to_string(repo().join("recipes").join(data)).unwrap());
        let run = p.run(&[]).ok();
        let done = run.event(stage, "stage_finished");
        let value = done["report"][figure].as_f64().unwrap_or_else(|| panic!("{recipe}: no {figure}: {done}"));
        assert!(value >= at_least, "{recipe}: {figure} = {value}");
        let model = p.artifact(done["outputs"]["model"].as_str().unwrap());
        if stage == "classify" {
            let cfg: Value =
                serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
            assert_eq!(cfg["architectures"][0], "Qwen2ForSequenceClassification", "{cfg}");
            assert_eq!(
                (cfg["num_labels"].as_u64(), cfg["problem_type"].as_str()),
                (Some(2), Some("single_label_classification"))
            );
        } else {
            assert!(model.join("1_Pooling/config.json").is_file());
        }
    }
}

#[test]
fn demo_recipe_plans() {
    let out = Command::new(BIN)
        .current_dir(repo())
        .args(["plan", "recipes/demo-files.toml", "--cache-dir", "/nonexistent/pipeline-cache"])
        .output()
        .unwrap();
    assert!(out.status.success());
    insta::with_settings!({snapshot_path => "../snapshots/cli"}, {
        insta::assert_snapshot!("plan_demo_cold", String::from_utf8_lossy(&out.stdout));
    });
}

/// The headline recipe end to end through the binary: cold (every stage runs: collect, dedupe,
/// clean, pretrain of the tiny Qwen2 from random init, LoRA SFT, DPO, evaluate), warm (every stage
/// cached; the human summary still prints the evaluation tables), then `pipeline generate --recipe`
/// answers the self-cognition questions as swift-robot by swift.
#[test]
fn headline_self_cognition_recipe_cold_warm_and_generate() {
    let p = Project::new(&std::fs::read_to_string(repo().join("recipes/qwen-self-cognition.toml")).unwrap());
    for f in [
        "data/self-cognition/dpo.jsonl",
        "data/self-cognition/eval-qa/self_cognition.jsonl",
        "data/self-cognition/eval-mcq/example_val.csv",
        "data/self-cognition/eval-mcq/example_dev.csv",
    ] {
        p.write(f, &std::fs::read_to_string(repo().join("recipes").join(f)).unwrap());
    }
    let t = std::time::Instant::now();
    let cold = p.run(&[]).ok();
    eprintln!("cold run: {:.1}s", t.elapsed().as_secs_f64());
    let stages = [
        "collect",
        "corpus",
        "prefs",
        "dedupe",
        "clean",
        "pretrain",
        "sft",
        "align",
        "eval",
        "eval-mcq",
        "export",
        "quantize",
        "eval-q4km",
    ];
    assert_eq!(cold.with_status("ran"), {
        let mut s = v(&stages);
        s.sort();
        s
    });
    for (stage, metric, num, model) in [
        ("eval", "rouge-l-f", 12, "swift-robot"),
        ("eval-mcq", "AverageAccuracy", 2, "swift-robot"),
        ("eval-q4km", "rouge-l-f", 12, "swift-robot-q4_k_m"),
    ] {
        let e = cold.events.iter().find(|e| e["stage"] == stage && e["event"] == "stage_finished").unwrap();
        eprintln!(
            "{stage}: {:.1}s\n{}",
            e["report"]["seconds"].as_f64().unwrap(),
            e["report"]["table"].as_str().unwrap()
        );
        let row = e["report"]["rows"].as_array().unwrap().iter().find(|r| r["metric"] == metric).unwrap();
        assert_eq!((row["model"].as_str(), row["num"].as_u64()), (Some(model), Some(num)), "{stage}");
    }
    // The deployment stages: a bf16 HF folder and an F16 GGUF, and a Q4_K_M GGUF about 4x
    // smaller than the F32 weights, whose answers `eval-q4km` scored above.
    let report = |stage: &str| {
        cold.events.iter().find(|e| e["stage"] == stage && e["event"] == "stage_finished").unwrap()["report"].clone()
    };
    let (export, quant) = (report("export"), report("quantize"));
    eprintln!("export: {export}\nquantize: {quant}");
    assert_eq!(export["hf"]["dtype"], "bfloat16");
    assert_eq!(export["gguf"]["file_type"], "F16");
    assert_eq!(quant["file_type"], "Q4_K_M");
    assert!(quant["compression"].as_f64().unwrap() > 3.0, "{quant}");
    let exported = |stage: &str, output: &str| {
        let e = cold.events.iter().find(|e| e["stage"] == stage && e["event"] == "stage_finished").unwrap();
        p.artifact(e["outputs"][output].as_str().unwrap())
    };
    for model in [
        exported("export", "model"),
        exported("export", "gguf").join("model.gguf"),
        exported("quantize", "model").join("model.gguf"),
    ] {
        let out = p
            .cmd(&[
                "generate",
                "--prompt",
                "Who are you?",
                "--max-tokens",
                "40",
                "--system",
                "You are a helpful assistant.",
            ])
            .arg("--model")
            .arg(&model)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("{} -> {text}", model.display());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("swift-robot"), "generate --model {}: {text}", model.display());
    }
    // `tensorboard --logdir` on the run's log directory finds every training and evaluate stage;
    // the run report shows every stage (issue 16).
    let run_dir = p.path().join(".pipeline/runs/qwen-self-cognition");
    for stage in ["pretrain", "sft", "align", "eval", "eval-mcq"] {
        let files: Vec<_> = std::fs::read_dir(run_dir.join("tensorboard").join(stage))
            .unwrap_or_else(|e| panic!("{stage}: {e}"))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(files.len() == 1 && files[0].starts_with("events.out.tfevents."), "{stage}: {files:?}");
    }
    let html = std::fs::read_to_string(run_dir.join("report.html")).unwrap();
    for stage in stages {
        assert!(html.contains(&format!("id=\"stage-{stage}\"")), "{stage} missing from report.html");
    }
    let t = std::time::Instant::now();
    let warm = p.run(&[]).ok();
    eprintln!("warm run: {:.3}s", t.elapsed().as_secs_f64());
    assert_eq!(warm.with_status("cached").len(), stages.len());
    let human = p.pipeline(&["run", "r.toml"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success());
    for want in [
        "eval (evaluate):",
        "eval-mcq (evaluate):",
        "| swift-robot | general_qa | rouge-l-f",
        "| swift-robot | general_mcq | AverageAccuracy",
    ] {
        assert!(text.contains(want), "summary lacks `{want}`:\n{text}");
    }
    for (prompt, stage) in [("你是谁？", None), ("Who are you?", None), ("Who are you?", Some("sft"))] {
        let mut args = vec!["generate", "--recipe", "r.toml", "--prompt", prompt, "--max-tokens", "40"];
        if let Some(s) = stage {
            args.extend(["--stage", s]);
        }
        let out = p.pipeline(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{prompt} ({stage:?}) -> {text}");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("swift-robot") && text.replace("swift-robot", "").contains("swift"), "{prompt}: {text}");
    }

    // The SFT stage's peft adapter folder (`model/adapter/`, base = the pretrain artifact) works as
    // a model path: `pipeline eval --model` scores it exactly like the merged folder beside it, and
    // `pipeline generate --model` answers with it.
    let sft = cold.events.iter().find(|e| e["stage"] == "sft" && e["event"] == "stage_finished").unwrap();
    let merged = p.artifact(sft["outputs"]["model"].as_str().unwrap());
    let adapter = merged.join("adapter");
    let eval = |model: &Path, extra: &[&str]| {
        let mut c = p.cmd(&["eval", "--model"]);
        c.arg(model).args([
            "--dataset",
            "general_qa",
            "--local-path",
            "data/self-cognition/eval-qa",
            "--model-name",
            "sft",
        ]);
        c.args(extra).output().unwrap()
    };
    let (a, m) = (eval(&adapter, &[]), eval(&merged, &[]));
    assert!(a.status.success() && m.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let table = String::from_utf8_lossy(&a.stdout).into_owned();
    eprintln!("sft adapter via pipeline eval --model:\n{table}");
    assert!(table.contains("| sft   | general_qa | rouge-l-f | self_cognition |  12 |"), "{table}");
    assert_eq!(table, String::from_utf8_lossy(&m.stdout), "adapter folder vs merged folder");
    let bad = eval(&adapter, &["--base", "no/such/base"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("base_model `"), "{}", String::from_utf8_lossy(&bad.stderr));
    let out = p
        .cmd(&["generate", "--prompt", "Who are you?", "--max-tokens", "40", "--model"])
        .arg(&adapter)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("swift-robot"), "generate --model <adapter>: {text}");

    // `--log-format json`: generate and eval print JSON objects only (issue 15, point 7).
    let lines = |out: Output| -> Vec<Value> {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let gen = lines(p.pipeline(&[
        "--log-format",
        "json",
        "generate",
        "--recipe",
        "r.toml",
        "--prompt",
        "Who are you?",
        "--max-tokens",
        "40",
    ]));
    assert_eq!(gen.len(), 1, "{gen:?}");
    assert_eq!(gen[0]["event"], "generation");
    assert!(gen[0]["text"].as_str().unwrap().contains("swift-robot"), "{gen:?}");
    assert!(gen[0]["completion_tokens"].as_u64().unwrap() > 0 && gen[0]["prompt_tokens"].as_u64().unwrap() > 0);
    let mut c = p.cmd(&["--log-format", "json", "eval", "--model"]);
    c.arg(&merged).args([
        "--dataset",
        "general_qa",
        "--local-path",
        "data/self-cognition/eval-qa",
        "--model-name",
        "sft",
    ]);
    let ev = lines(c.output().unwrap());
    let done = ev.last().unwrap();
    assert_eq!(done["event"], "eval_finished", "{ev:?}");
    assert_eq!(done["report"]["rows"][0]["model"], "sft");
    assert!(ev[..ev.len() - 1].iter().all(|e| e["event"] == "message"), "{ev:?}");
}

/// Issue 15, point 7: `--log-format json` worked for `run` only. Every command prints JSON objects,
/// one per line on stdout, errors included.
#[test]
fn every_command_honours_log_format_json() {
    let p = Project::five();
    p.run(&[]).ok();
    let json = |args: &[&str]| -> (i32, Vec<Value>) {
        let mut a = vec!["--log-format", "json"];
        a.extend(args);
        let out = p.pipeline(&a);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let v =
            stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?}: {e}: {l}"))).collect();
        (out.status.code().unwrap_or(-1), v)
    };
    let (code, plan) = json(&["plan", "r.toml"]);
    assert_eq!(code, 0);
    assert_eq!(plan.len(), 1);
    assert_eq!(plan[0]["stages"].as_array().unwrap().len(), 5, "{plan:?}");
    let (_, dot) = (0, p.stdout(&["--log-format", "json", "plan", "r.toml", "--format", "dot"]));
    assert!(dot.starts_with("digraph"), "an explicit drawing format wins: {dot}");
    p.edit("separator = \"|\"", "separator = \"||\"");
    let (code, ex) = json(&["explain", "r.toml", "c"]);
    assert_eq!(code, 0);
    assert_eq!(
        (ex[0]["event"].as_str(), ex[0]["stage"].as_str(), ex[0]["status"].as_str()),
        (Some("explain"), Some("c"), Some("will_run"))
    );
    assert_eq!(ex[0]["changes"][0], "params.separator: \"|\" → \"||\"");
    let (_, ex) = json(&["explain", "r.toml", "d"]);
    assert_eq!(ex[0]["status"], "cached");
    assert_eq!(ex[0]["key"].as_str().unwrap().len(), 64);
    let (code, kinds) = json(&["stages"]);
    assert_eq!(code, 0);
    assert!(kinds.iter().all(|k| k["event"] == "stage_kind" && k["version"].as_u64().is_some()));
    assert!(kinds.iter().any(|k| k["kind"] == "sft"), "{kinds:?}");
    let (code, ls) = json(&["cache", "ls", "r.toml"]);
    assert_eq!(code, 0);
    assert_eq!(ls.iter().filter(|e| e["event"] == "cache_entry").count(), 5, "{ls:?}");
    assert_eq!(ls.last().unwrap()["event"], "cache_summary");
    assert_eq!(ls.last().unwrap()["entries"], 5);
    let (code, v) = json(&["cache", "verify", "r.toml"]);
    assert_eq!(code, 0);
    assert_eq!((v[0]["event"].as_str(), v[0]["problems"].as_u64()), (Some("verify_finished"), Some(0)));
    let (code, gc) = json(&["cache", "gc", "--dry-run"]);
    assert_eq!(code, 0);
    assert_eq!(gc.last().unwrap()["event"], "gc_finished", "{gc:?}");
    let (code, err) = json(&["explain", "r.toml", "nope"]);
    assert_eq!(code, 2);
    assert_eq!((err[0]["event"].as_str(), err[0]["exit_code"].as_u64()), (Some("error"), Some(2)));
    assert!(err[0]["message"].as_str().unwrap().contains("nope"), "{err:?}");
}

/// A pretraining run small enough for data-parallel checks: collect → pretrain.
const DP: &str = r#"[pipeline]
name = "dp"
seed = 5

[stages.corpus]
kind = "collect"
params = { datasets = ["builtin:corpus"] }

[stages.pretrain]
kind = "pretrain"
inputs = { data = "corpus.data" }
params = { learning_rate = 3e-3, max_steps = 4, per_device_train_batch_size = 2, gradient_accumulation_steps = 1, max_length = 32, warmup_ratio = 0.0, logging_steps = 1, split_ratio = 0.0, report_to = "none" }
"#;

fn stage_done<'a>(r: &'a Run, stage: &str) -> &'a Value {
    r.events
        .iter()
        .find(|e| {
            e["stage"] == stage && e["event"].as_str().is_some_and(|n| n.starts_with("stage_") && n != "stage_started")
        })
        .unwrap_or_else(|| panic!("no outcome of {stage}: {:?}", r.events))
}

/// Issue 17: `--nproc-per-node 2` trains on two local ranks (TCP all-reduce on the CPU); rank 0
/// alone writes the cache, and the run is keyed — and trains — as one process with twice the
/// accumulation (the same global batch), whose entry a one-process run then reuses.
#[test]
fn nproc_per_node_trains_on_two_ranks_keyed_as_one_process_with_the_same_global_batch() {
    let two = Project::new(DP);
    let r = two.run(&["--nproc-per-node", "2"]).ok();
    assert_eq!(r.with_status("ran"), v(&["corpus", "pretrain"]), "{}", r.stderr);
    let pt = stage_done(&r, "pretrain");
    let entries = std::fs::read_dir(two.path().join(".pipeline/v1/entries")).unwrap().count();
    assert_eq!(entries, 2, "one entry per stage, written by rank 0");
    assert!(!r.stderr.contains("[rank 1] error"), "{}", r.stderr);

    let one = Project::new(&DP.replace("gradient_accumulation_steps = 1", "gradient_accumulation_steps = 2"));
    let r1 = one.run(&[]).ok();
    let pt1 = stage_done(&r1, "pretrain");
    assert_eq!(pt["key"], pt1["key"], "world size 2 × accumulation 1 is keyed as 1 × 2");
    let (a, b) =
        (pt["report"]["final_train_loss"].as_f64().unwrap(), pt1["report"]["final_train_loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "same training: {a} vs {b}");
    assert_eq!(pt["report"]["global_step"], pt1["report"]["global_step"]);

    // The one-process run with the same global batch reuses the two-rank entry.
    two.edit("gradient_accumulation_steps = 1", "gradient_accumulation_steps = 2");
    assert_eq!(two.run(&[]).ok().with_status("cached"), v(&["corpus", "pretrain"]));
}

/// A rank that never joins ends rank 0 quickly (PIPELINE_DIST_TIMEOUT) with an error naming it,
/// and malformed launcher variables are usage errors naming the variable.
#[test]
fn a_missing_rank_fails_the_training_stage_naming_it_and_bad_launcher_variables_are_usage_errors() {
    let p = Project::new(DP);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let t0 = std::time::Instant::now();
    let out = p
        .cmd(&["--log-format", "json", "run", "r.toml"])
        .envs([("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
        .env("PIPELINE_DIST_TIMEOUT", "2")
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.code, 1);
    let msg = stage_done(&r, "pretrain")["error"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("ranks 1 never connected"), "{:?}", stage_done(&r, "pretrain"));
    assert!(t0.elapsed() < std::time::Duration::from_secs(60));

    let out = p.cmd(&["run", "r.toml"]).envs([("RANK", "1"), ("WORLD_SIZE", "2")]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("WORLD_SIZE=2 but MASTER_ADDR is not set"));
    let out = p.pipeline(&["run", "r.toml", "--nproc-per-node", "0"]);
    assert_eq!(out.status.code(), Some(2));
}
