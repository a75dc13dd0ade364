use pipeline_engine::{ExecError, ExecOptions, Status};

use crate::support::{v, Event, Project, DIAMOND};

#[test]
fn only_until_and_force() {
    let p = Project::new(DIAMOND);
    let r = p.run_with(&ExecOptions { until: v(&["b"]), ..Default::default() }).ok();
    assert_eq!(r.with_status("ran"), v(&["a", "b"]));
    assert_eq!(r.with_status("not selected"), v(&["c", "d", "e"]));
    assert_eq!(r.reported(), v(&["a", "b"]), "c, d, e are not selected: nothing is reported about them");

    let r = p.run_with(&ExecOptions { only: v(&["e"]), ..Default::default() });
    assert_eq!(r.with_status("skipped"), v(&["c", "d", "e"]));
    assert_eq!(r.with_status("cached"), v(&["a", "b"]));
    let Status::Skipped(why) = &r.outcome("e").status else { unreachable!() };
    assert_eq!(why, "input from `c` is not cached (run it first, e.g. with --until e)");
    let Status::Skipped(why) = &r.outcome("c").status else { unreachable!() };
    assert!(why.starts_with("not selected and not cached (no cache entry (never ran))"), "{why}");

    let r = p.run_with(&ExecOptions { only: v(&["c"]), ..Default::default() }).ok();
    assert_eq!(r.with_status("ran"), v(&["c"]));
    assert_eq!(r.with_status("cached"), v(&["a", "b"]));

    // Forcing `a` re-runs it; its output is identical, so only the never-run d and e follow.
    let r = p.run_with(&ExecOptions { force: v(&["a"]), jobs: 2, ..Default::default() }).ok();
    assert_eq!(r.with_status("ran"), v(&["a", "d", "e"]));
    assert_eq!(r.reasons()["a"], pipeline_engine::DirtyReason::Forced);

    let Err(e) = p.try_run(&ExecOptions { only: v(&["nope"]), ..Default::default() }) else { panic!("ran") };
    assert!(matches!(&e, ExecError::UnknownStage(u) if u.id == "nope" && u.known == v(&["a", "b", "c", "d", "e"])));
    assert!(e.to_string().ends_with("has no stage `nope`; its stages: a, b, c, d, e"), "{e}");
}

const TWO_SLOW: &str = r#"
[pipeline]
name = "par"
[stages.x]
kind = "step"
params = { steps = 5, step_ms = 100 }
[stages.y]
kind = "step"
params = { steps = 5, step_ms = 100 }
"#;

fn order(events: &[Event]) -> Vec<&'static str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Started { .. } => Some("started"),
            Event::Done { .. } => Some("done"),
            _ => None,
        })
        .collect()
}

#[test]
fn jobs_run_independent_branches_concurrently() {
    let p = Project::new(TWO_SLOW);
    let r = p.run_with(&ExecOptions { jobs: 2, ..Default::default() }).ok();
    assert_eq!(order(&r.events), ["started", "started", "done", "done"]);
    let r = p.run_with(&ExecOptions { jobs: 1, force: v(&["x", "y"]), ..Default::default() }).ok();
    assert_eq!(order(&r.events), ["started", "done", "started", "done"]);
}

#[test]
fn a_failing_stage_commits_nothing_and_skips_downstream() {
    let p = Project::new(DIAMOND);
    p.edit("params.text = \"C\"", "params.text = \"C\"\nparams.fail = true");
    let r = p.run();
    assert!(r.summary.failed());
    assert_eq!(r.with_status("failed"), v(&["c"]));
    let Status::Failed(why) = &r.outcome("c").status else { unreachable!() };
    assert_eq!(why, "failing as asked (`fail = true`)");
    assert_eq!(r.with_status("skipped"), v(&["d", "e"]), "the run stops at the first failure");
    let store = p.store();
    assert!(store.entries().unwrap().iter().all(|e| e.as_ref().unwrap().stage != "c"), "no entry for c");
    assert!(std::fs::read_dir(p.path().join(".pipeline/v1/tmp")).unwrap().next().is_none(), "staging discarded");
    p.edit("params.fail = true", "params.fail = false");
    let r = p.run().ok();
    assert_eq!(r.with_status("ran"), v(&["c", "d", "e"]));
}

/// Issue: one failed stage cancelled stages that do not depend on it.
#[test]
fn keep_going_finishes_independent_branches_after_a_failure() {
    let p = Project::new(DIAMOND);
    p.edit("params.text = \"C\"", "params.text = \"C\"\nparams.fail = true");
    let r = p.run_with(&ExecOptions { keep_going: true, ..Default::default() });
    assert!(r.summary.failed());
    assert_eq!(r.with_status("failed"), v(&["c"]));
    assert_eq!(r.with_status("ran"), v(&["a", "b", "d"]), "d does not depend on c");
    assert_eq!(r.with_status("skipped"), v(&["e"]));
    let Status::Skipped(why) = &r.outcome("e").status else { unreachable!() };
    assert_eq!(why, "upstream `c` did not complete");
    // What ran is cached: the next run (c fixed) runs only c and e.
    p.edit("params.fail = true", "params.fail = false");
    let r = p.run().ok();
    assert_eq!(r.with_status("ran"), v(&["c", "e"]));
    assert_eq!(r.with_status("cached"), v(&["a", "b", "d"]));
}
