//! CLI integration tests: everything goes through the real `pipeline` binary, with the test-only
//! `test-step` kind enabled (`PIPELINE_TEST_STAGES=1`) and `--log-format json` to read what ran.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

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
        c.current_dir(self.path())
            .env("PIPELINE_TEST_STAGES", "1")
            .env_remove("PIPELINE_CACHE_DIR")
            .env_remove("RUST_LOG");
        c.args(args);
        c
    }
    fn pipeline(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
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
    fn output_digest(&self, stage: &str) -> String {
        self.events
            .iter()
            .find(|e| e["stage"] == stage && e["outputs"]["data"].is_string())
            .map(|e| e["outputs"]["data"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no output for {stage}"))
    }
    fn warnings(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["event"] == "warning")
            .map(|e| e["message"].as_str().unwrap().to_string())
            .collect()
    }
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "run failed: {:?}\n{}", self.events, self.stderr);
        self
    }
}

fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// a → b → c ; d ; (c, d) → e
const DIAMOND: &str = r#"
[pipeline]
name = "t"
seed = 1

[stages.a]
kind = "test-step"
params.text = "A"

[stages.b]
kind = "test-step"
inputs.x = "a.data"
params.text = "B"
params.salt = 1

[stages.c]
kind = "test-step"
inputs.x = "b.data"
params.text = "C"

[stages.d]
kind = "test-step"
params.text = "D"

[stages.e]
kind = "test-step"
inputs.x = ["c.data", "d.data"]
params.text = "E"
"#;

#[test]
fn cold_warm_edit_reruns_exactly_the_changed_stages() {
    let p = Project::new(DIAMOND);
    let cold = p.run(&[]).ok();
    assert_eq!(cold.with_status("ran"), v(&["a", "b", "c", "d", "e"]));
    let out = std::fs::read_to_string(p.artifact(&cold.output_digest("e")).join("out.txt")).unwrap();
    assert_eq!(out, "ECBAD");

    let warm = p.run(&[]).ok();
    assert_eq!(warm.with_status("cached"), v(&["a", "b", "c", "d", "e"]));

    p.edit("params.text = \"B\"", "params.text = \"B2\"");
    let edited = p.run(&[]).ok();
    assert_eq!(edited.with_status("ran"), v(&["b", "c", "e"]));
    assert_eq!(edited.with_status("cached"), v(&["a", "d"]));
    let out = std::fs::read_to_string(p.artifact(&edited.output_digest("e")).join("out.txt")).unwrap();
    assert_eq!(out, "ECB2AD");

    // Undoing the edit finds the old entries again.
    p.edit("params.text = \"B2\"", "params.text = \"B\"");
    assert_eq!(p.run(&[]).ok().with_status("cached").len(), 5);
}

#[test]
fn early_cutoff_keeps_downstream_cached() {
    let p = Project::new(DIAMOND);
    p.run(&[]).ok();
    p.edit("params.salt = 1", "params.salt = 2");
    let r = p.run(&[]).ok();
    assert_eq!(r.with_status("ran"), v(&["b"]), "b's output is byte-identical, so c and e stay cached");
    assert_eq!(r.with_status("cached"), v(&["a", "c", "d", "e"]));
}

#[test]
fn human_output_has_summary_table_and_plan_explains() {
    let p = Project::new(DIAMOND);
    let out = p.pipeline(&["run", "r.toml"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("stage  kind       status  duration  output  report"), "{table}");
    assert!(table.contains("5 ran, 0 cached, 0 failed, 0 skipped"), "{table}");
    let out = p.pipeline(&["run", "r.toml"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 ran, 5 cached"));

    p.edit("params.text = \"C\"", "params.text = \"C2\"");
    let plan = String::from_utf8_lossy(&p.pipeline(&["plan", "r.toml"]).stdout).into_owned();
    insta::with_settings!({snapshot_path => "../snapshots/cli"}, { insta::assert_snapshot!("plan_after_edit", plan) });
    let explain = String::from_utf8_lossy(&p.pipeline(&["explain", "r.toml", "c"]).stdout).into_owned();
    assert!(explain.contains("dirty: params.text: \"C\" → \"C2\""), "{explain}");
    let explain_e = String::from_utf8_lossy(&p.pipeline(&["explain", "r.toml", "e"]).stdout).into_owned();
    assert!(explain_e.contains("upstream c will run first"), "{explain_e}");
    assert!(explain_e.contains("dirty: inputs.x: ["), "{explain_e}");
}

#[test]
fn files_enter_the_key_by_content_and_a_copied_project_stays_cached() {
    let p = Project::new(
        r#"
[pipeline]
name = "f"
[stages.raw]
kind = "files"
params.paths = ["data/in.txt"]
[stages.all]
kind = "concat"
inputs.parts = "raw.data"
"#,
    );
    p.write("data/in.txt", "one\n");
    assert_eq!(p.run(&[]).ok().with_status("ran"), v(&["all", "raw"]));
    // Same content, new mtime: cached.
    std::thread::sleep(Duration::from_millis(20));
    p.write("data/in.txt", "one\n");
    assert_eq!(p.run(&[]).ok().with_status("cached"), v(&["all", "raw"]));
    p.write("data/in.txt", "two\n");
    assert_eq!(p.run(&[]).ok().with_status("ran"), v(&["all", "raw"]));
    // Copy the whole project (cache included) elsewhere: still valid.
    let other = tempfile::tempdir().unwrap();
    let status =
        Command::new("cp").arg("-r").arg(format!("{}/.", p.path().display())).arg(other.path()).status().unwrap();
    assert!(status.success());
    let moved = Project { dir: other };
    assert_eq!(moved.run(&[]).ok().with_status("cached"), v(&["all", "raw"]));
}

#[test]
fn corrupt_artifact_is_detected_and_rerun() {
    let p = Project::new(DIAMOND);
    let cold = p.run(&[]).ok();
    // Same size, different bytes.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(p.artifact(&cold.output_digest("d")).join("out.txt"), "X").unwrap();
    // Truncated.
    std::fs::write(p.artifact(&cold.output_digest("c")).join("out.txt"), "").unwrap();
    let r = p.run(&[]).ok();
    assert_eq!(r.with_status("ran"), v(&["c", "d"]), "{:?}", r.events);
    assert_eq!(r.warnings().len(), 2, "{:?}", r.warnings());
    assert!(r.warnings()[0].contains("corrupt"), "{:?}", r.warnings());
    let out = std::fs::read_to_string(p.artifact(&r.output_digest("e")).join("out.txt")).unwrap();
    assert_eq!(out, "ECBAD");
    assert!(p.pipeline(&["cache", "verify", "r.toml"]).status.success());
}

#[test]
fn corruption_hidden_from_stat_is_caught_when_the_artifact_is_an_input() {
    let p = Project::new(DIAMOND);
    let cold = p.run(&[]).ok();
    let f = p.artifact(&cold.output_digest("a")).join("out.txt");
    let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
    std::fs::write(&f, "Z").unwrap();
    std::fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
    // a looks fine to the stat check; b runs (forced) and digests its input first.
    let r = p.run(&["--force", "b"]).ok();
    assert!(r.warnings().iter().any(|w| w.contains("output of `a`")), "{:?}", r.warnings());
    assert_eq!(r.with_status("ran"), v(&["a", "b"]));
    let out = std::fs::read_to_string(p.artifact(&r.output_digest("e")).join("out.txt")).unwrap();
    assert_eq!(out, "ECBAD");
}

const SLOW: &str = r#"
[pipeline]
name = "slow"
[stages.a]
kind = "test-step"
params.text = "A"
[stages.slow]
kind = "test-step"
inputs.x = "a.data"
params = { text = "S", steps = 30, step_ms = 60, checkpoint = true }
[stages.after]
kind = "test-step"
inputs.x = "slow.data"
params.text = "Z"
"#;

#[test]
fn kill_9_mid_stage_resumes_from_checkpoint_without_corruption() {
    let p = Project::new(SLOW);
    let mut child = p.cmd(&["--log-format", "json", "run", "r.toml"]).stdout(Stdio::piped()).spawn().unwrap();
    let reader = BufReader::new(child.stdout.take().unwrap());
    for line in reader.lines() {
        let e: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if e["event"] == "metric" && e["stage"] == "slow" && e["step"].as_u64().unwrap() >= 5 {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Nothing of `slow` was committed; a partial output sits in tmp/.
    let r = p.run(&[]).ok();
    assert_eq!(r.with_status("cached"), v(&["a"]));
    assert_eq!(r.with_status("ran"), v(&["after", "slow"]));
    let resumed = r.events.iter().find(|e| e["event"] == "message" && e["stage"] == "slow").expect("resume message");
    let step: u64 = resumed["message"].as_str().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(step >= 5, "{resumed}");
    let out = std::fs::read_to_string(p.artifact(&r.output_digest("after")).join("out.txt")).unwrap();
    assert_eq!(out, "ZSA");
    assert!(
        std::fs::read_dir(p.path().join(".pipeline/v1/scratch")).unwrap().next().is_none(),
        "scratch removed after commit"
    );
    assert_eq!(p.run(&[]).ok().with_status("cached").len(), 3);
    assert!(p.pipeline(&["cache", "verify", "r.toml"]).status.success());
}

#[test]
fn two_concurrent_runs_wait_for_each_other() {
    let p = Project::new(SLOW);
    let spawn = || p.cmd(&["--log-format", "json", "run", "r.toml"]).stdout(Stdio::piped()).spawn().unwrap();
    let (c1, c2) = (spawn(), spawn());
    let (r1, r2) = (Run::from(c1.wait_with_output().unwrap()).ok(), Run::from(c2.wait_with_output().unwrap()).ok());
    let waited = [&r1, &r2].iter().filter(|r| r.events.iter().any(|e| e["event"] == "waiting_for_lock")).count();
    assert_eq!(waited, 1, "exactly one run waited for the lock");
    let (first, second) = if r1.with_status("ran").len() == 3 { (r1, r2) } else { (r2, r1) };
    assert_eq!(first.with_status("ran").len(), 3);
    assert_eq!(second.with_status("cached").len(), 3);
    assert!(p.pipeline(&["cache", "verify", "r.toml"]).status.success());
}

#[test]
fn only_until_force_and_jobs() {
    let p = Project::new(DIAMOND);
    let r = p.run(&["--until", "b"]).ok();
    assert_eq!(r.with_status("ran"), v(&["a", "b"]));
    assert_eq!(r.statuses().len(), 2, "c, d, e are not selected: no events");
    let r = p.run(&["--only", "e"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.with_status("skipped"), v(&["c", "d", "e"]));
    let r = p.run(&["--only", "c"]).ok();
    assert_eq!(r.with_status("ran"), v(&["c"]));
    assert_eq!(r.with_status("cached"), v(&["a", "b"]));
    let r = p.run(&["--force", "a", "--jobs", "2"]).ok();
    assert_eq!(r.with_status("ran"), v(&["a", "d", "e"]));
    let bad = p.pipeline(&["run", "r.toml", "--only", "nope"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("has no stage `nope`; its stages: a, b, c, d, e"));
}

#[test]
fn jobs_run_independent_branches_concurrently() {
    let p = Project::new(
        r#"
[pipeline]
name = "par"
[stages.x]
kind = "test-step"
params = { steps = 5, step_ms = 100 }
[stages.y]
kind = "test-step"
params = { steps = 5, step_ms = 100 }
"#,
    );
    let r = p.run(&["--jobs", "2"]).ok();
    let order: Vec<&str> =
        r.events.iter().filter_map(|e| e["event"].as_str()).filter(|n| n.starts_with("stage_")).collect();
    assert_eq!(order, ["stage_started", "stage_started", "stage_finished", "stage_finished"]);
}

#[test]
fn failing_stage_exits_1_commits_nothing_and_skips_downstream() {
    let p = Project::new(DIAMOND);
    p.edit("params.text = \"C\"", "params.text = \"C\"\nparams.fail = true");
    let r = p.run(&[]);
    assert_eq!(r.code, 1);
    assert_eq!(r.with_status("failed"), v(&["c"]));
    assert_eq!(r.with_status("skipped"), v(&["d", "e"]), "the run stops at the first failure");
    p.edit("params.fail = true", "params.fail = false");
    let r = p.run(&[]).ok();
    assert_eq!(r.with_status("ran"), v(&["c", "d", "e"]));
}

#[test]
fn gc_drops_unreferenced_entries() {
    let p = Project::new(DIAMOND);
    p.run(&[]).ok();
    p.edit("params.text = \"A\"", "params.text = \"A2\"");
    p.run(&[]).ok();
    let gc = p.pipeline(&["cache", "gc", "r.toml"]);
    assert!(gc.status.success());
    let msg = String::from_utf8_lossy(&gc.stdout);
    assert!(msg.starts_with("dropped 4 entries and 4 artifacts"), "{msg}");
    assert_eq!(p.run(&[]).ok().with_status("cached").len(), 5);
    let ls = String::from_utf8_lossy(&p.pipeline(&["cache", "ls", "r.toml"]).stdout).into_owned();
    assert!(ls.contains("5 entries"), "{ls}");
    let gc = p.pipeline(&["cache", "gc", "r.toml", "--older-than", "0s"]);
    assert!(String::from_utf8_lossy(&gc.stdout).starts_with("dropped 5 entries"));
}

#[test]
fn cache_dir_flag_and_env_and_device_option() {
    let p = Project::new(DIAMOND);
    let r = p.run(&["--cache-dir", "elsewhere", "--device", "cuda", "--until", "a"]).ok();
    let a = r.events.iter().find(|e| e["stage"] == "a" && e["event"] == "stage_finished").unwrap();
    assert_eq!(a["report"]["device"], "cuda");
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
fn every_invalid_recipe_gives_its_snapshotted_message() {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(repo().join("recipes/invalid")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 15);
    for f in files {
        let rel = format!("recipes/invalid/{}", f.file_name().unwrap().to_string_lossy());
        let out = Command::new(BIN)
            .current_dir(repo())
            .args(["plan", &rel])
            .env_remove("PIPELINE_TEST_STAGES")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{rel}");
        let name = format!("invalid__{}", f.file_stem().unwrap().to_string_lossy());
        insta::with_settings!({snapshot_path => "../snapshots/cli", prepend_module_to_snapshot => false, input_file => &f}, {
            insta::assert_snapshot!(name, String::from_utf8_lossy(&out.stderr));
        });
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
    let stages = ["collect", "corpus", "prefs", "dedupe", "clean", "pretrain", "sft", "align", "eval", "eval-mcq"];
    assert_eq!(cold.with_status("ran"), {
        let mut s = v(&stages);
        s.sort();
        s
    });
    for (stage, metric, num) in [("eval", "rouge-l-f", 12), ("eval-mcq", "AverageAccuracy", 2)] {
        let e = cold.events.iter().find(|e| e["stage"] == stage && e["event"] == "stage_finished").unwrap();
        eprintln!(
            "{stage}: {:.1}s\n{}",
            e["report"]["seconds"].as_f64().unwrap(),
            e["report"]["table"].as_str().unwrap()
        );
        let row = e["report"]["rows"].as_array().unwrap().iter().find(|r| r["metric"] == metric).unwrap();
        assert_eq!((row["model"].as_str(), row["num"].as_u64()), (Some("swift-robot"), Some(num)), "{stage}");
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
}
