//! Why a stage will run: the typed reasons the executor computes, rendered the way `pipeline plan`
//! (`will run: <reason>`) and `pipeline explain` (`dirty: <change>` lines) print them.

use std::fmt::Write as _;
use std::path::Path;

use pipeline_engine::{exec, DirtyReason, ExecOptions, Freshness, KeyChange, Status};

use crate::support::{registry_with, v, Project, Step, DIAMOND};

fn snapshot(name: &str, text: &str) {
    insta::with_settings!({
        snapshot_path => Path::new(env!("CARGO_MANIFEST_DIR")).join("../snapshots/engine"),
        prepend_module_to_snapshot => false,
    }, {
        insta::assert_snapshot!(name, text);
    });
}

/// Each stage's freshness as `plan` words it, and the changes `explain` lists under it.
fn render(p: &Project) -> String {
    let mut out = String::new();
    for s in exec::statuses(&p.plan(), &p.store(), &[]) {
        let line = match &s.freshness {
            Freshness::Cached => "cached".to_string(),
            Freshness::Dirty(why) => format!("will run: {why}"),
            Freshness::Waiting(up) => {
                format!("will run if its inputs change: upstream {} will run first", up.join(", "))
            }
            Freshness::Unkeyable(e) => format!("will run: {e}"),
        };
        writeln!(out, "{}: {line}", s.id).unwrap();
        if !matches!(s.freshness, Freshness::Cached) {
            for c in s.changes.iter().flatten() {
                writeln!(out, "  dirty: {c}").unwrap();
            }
        }
    }
    out
}

const JOIN: &str = r#"
[pipeline]
name = "demo"
seed = 42
[pipeline.defaults.concat]
separator = "\n"
[stages.notes]
kind = "files"
params.paths = ["data/a.txt", "data/b.txt"]
[stages.joined]
kind = "concat"
inputs.parts = "notes.data"
[stages.bundle]
kind = "concat"
inputs.parts = ["joined.data", "notes.data"]
params.separator = "---"
"#;

#[test]
fn a_param_edit_is_named_with_its_old_and_new_value() {
    let p = Project::new(JOIN);
    p.write("data/a.txt", "alpha");
    p.write("data/b.txt", "beta");
    snapshot("cold", &render(&p));
    p.run().ok();
    snapshot("warm", &render(&p));
    p.edit("separator = \"\\n\"", "separator = \"\\n\\n\"");
    let text = render(&p);
    assert!(text.contains("joined: will run: changed: params.separator\n"), "{text}");
    assert!(text.contains("  dirty: params.separator: \"\\n\" → \"\\n\\n\"\n"), "{text}");
    snapshot("separator_edit", &text);
    let r = p.run().ok();
    let DirtyReason::Changed(c) = &r.reasons()["joined"] else { panic!("{:?}", r.reasons()) };
    assert_eq!(
        c,
        &[KeyChange::Param {
            path: "separator".into(),
            old: Some(serde_json::json!("\n")),
            new: Some(serde_json::json!("\n\n")),
        }]
    );
    let DirtyReason::Changed(c) = &r.reasons()["bundle"] else { panic!("{:?}", r.reasons()) };
    assert!(matches!(&c[..], [KeyChange::Input { name, .. }] if name == "parts"), "{c:?}");
}

#[test]
fn every_kind_of_key_change() {
    let p = Project::new(
        r#"
[pipeline]
name = "kinds"
seed = 1
[stages.src]
kind = "files"
params.paths = ["data/in.txt"]
[stages.up]
kind = "step"
inputs.x = "src.data"
params = { text = "U", salt = { depth = 2, tags = ["a"] } }
[stages.down]
kind = "step"
inputs.x = "up.data"
params.text = "D"
"#,
    );
    p.write("data/in.txt", "one");
    p.run().ok();
    let mut text = String::new();
    let mut case = |title: &str, p: &mut Project, edit: &dyn Fn(&mut Project)| {
        edit(p);
        writeln!(text, "## {title}\n{}", render(p)).unwrap();
        p.run().ok();
    };
    let mut p = p;
    case("a local file's content", &mut p, &|p| p.write("data/in.txt", "two"));
    case("params added, changed and removed", &mut p, &|p| {
        p.edit("salt = { depth = 2, tags = [\"a\"] }", "salt = { depth = 3, tags = [\"a\", \"b\"], extra = 7 }")
    });
    case("a param removed", &mut p, &|p| p.edit(", extra = 7", ""));
    case("the stage version", &mut p, &|p| p.registry = registry_with([Step { kind: "step", version: 2 }]));
    case("the stage kind", &mut p, &|p| {
        p.registry = registry_with([Step { kind: "step", version: 2 }, Step { kind: "other", version: 2 }]);
        p.edit("kind = \"step\"\ninputs.x = \"up.data\"", "kind = \"other\"\ninputs.x = \"up.data\"");
    });
    case("the seed", &mut p, &|p| p.edit("seed = 1", "seed = 2"));
    case("an input bound to another artifact", &mut p, &|p| {
        p.edit("inputs.x = \"up.data\"", "inputs.x = \"src.data\"")
    });
    case("an input added", &mut p, &|p| {
        p.edit(
            "inputs.x = \"src.data\"\nparams.text = \"D\"",
            "inputs.x = \"src.data\"\ninputs.y = \"up.data\"\nparams.text = \"D\"",
        )
    });
    snapshot("every_kind_of_key_change", &text);
}

#[test]
fn why_each_dispatched_stage_runs() {
    let p = Project::new(DIAMOND);
    let mut text = String::new();
    let mut log = |title: &str, r: &crate::support::Run| {
        writeln!(text, "## {title}").unwrap();
        for (id, why) in r.reasons() {
            writeln!(text, "{id}: {why}").unwrap();
        }
    };
    let cold = p.run().ok();
    log("cold", &cold);
    log("--force b", &p.run_with(&ExecOptions { force: v(&["b"]), ..Default::default() }).ok());
    // A corrupt artifact, a missing one, an unreadable entry.
    std::fs::write(p.artifact(&cold.output_digest("a")).join("out.txt"), "?").unwrap();
    std::fs::remove_dir_all(p.artifact(&cold.output_digest("d"))).unwrap();
    let entry = p.path().join(".pipeline/v1/entries").join(format!("{}.json", cold.outcome("c").key.as_ref().unwrap()));
    std::fs::write(&entry, "{ truncated").unwrap();
    let r = p.run().ok();
    assert_eq!(r.warnings().len(), 3, "{:?}", r.warnings());
    log("damaged cache", &r);
    snapshot("why_each_dispatched_stage_runs", &text);
}

#[test]
fn plan_after_corruption_says_the_outputs_are_lost() {
    let p = Project::new(DIAMOND);
    let cold = p.run().ok();
    std::fs::write(p.artifact(&cold.output_digest("d")).join("out.txt"), "?").unwrap();
    let text = render(&p);
    // The key itself is unchanged: no `dirty:` line under d.
    assert!(text.contains("d: will run: cached output missing or corrupt\ne: "), "{text}");
}

#[test]
fn an_unreadable_local_file_is_named_in_plan_and_in_the_failure() {
    let p = Project::new(
        "[pipeline]\nname = \"u\"\n[stages.raw]\nkind = \"files\"\nparams.paths = [\"data\"]\n[stages.all]\nkind = \"concat\"\ninputs.parts = \"raw.data\"\n",
    );
    p.write("data/ok.txt", "fine");
    std::os::unix::fs::symlink(p.path().join("nowhere"), p.path().join("data/broken")).unwrap();
    let dir = p.path().join("data");
    let st = exec::statuses(&p.plan(), &p.store(), &[]);
    let Freshness::Unkeyable(e) = &st[0].freshness else { panic!("{:?}", st[0].freshness) };
    assert!(matches!(e, exec::KeyError::File { stage, path, .. } if stage == "raw" && path == &dir), "{e:?}");
    assert!(e.to_string().starts_with(&format!("cannot read {}: ", dir.display())), "{e}");
    let r = p.run();
    assert!(r.summary.failed());
    assert_eq!(r.outcome("raw").status, Status::Failed(e.to_string()));
    assert_eq!(r.with_status("skipped"), v(&["all"]));
}
