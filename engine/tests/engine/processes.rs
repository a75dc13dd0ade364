//! Tests with real processes: this test binary re-executes itself as a child that runs the recipe
//! (`support::child_process`), and the parent kills it or races it.

use pipeline_engine::{DirtyReason, Freshness};

use crate::support::{child_events, v, Project, SLOW};

#[test]
fn kill_9_mid_stage_resumes_from_checkpoint_without_corruption() {
    let p = Project::new(SLOW);
    let mut child = p.spawn_child();
    let mut seen = Vec::new();
    for e in child_events(&mut child) {
        seen.push(e.join(" "));
        if e[0] == "metric" && e[1] == "slow" && e[2].parse::<u64>().unwrap() >= 5 {
            break;
        }
    }
    assert!(seen.last().is_some_and(|l| l.starts_with("metric slow")), "the child never reached step 5: {seen:?}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Nothing of `slow` was committed (its partial output sits in tmp/), `a` was.
    let tmp = p.path().join(".pipeline/v1/tmp");
    assert!(std::fs::read_dir(&tmp).unwrap().next().is_some(), "the killed stage's staging dir is left in tmp/");
    let st = pipeline_engine::exec::statuses(&p.plan(), &p.store(), &[]);
    assert!(matches!(st[0].freshness, Freshness::Cached));
    assert!(matches!(st[1].freshness, Freshness::Dirty(DirtyReason::NeverRan)), "{:?}", st[1].freshness);

    let r = p.run().ok();
    assert_eq!(r.with_status("cached"), v(&["a"]));
    assert_eq!(r.with_status("ran"), v(&["after", "slow"]));
    let resumed = r.messages("slow");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    let step: u64 = resumed[0].strip_prefix("resuming from checkpoint at step ").unwrap().parse().unwrap();
    assert!(step >= 5, "{resumed:?}");
    assert_eq!(r.outcome("slow").report.as_ref().unwrap()["resumed_from"], step);
    assert_eq!(p.out_text(&r, "after"), "ZSA");
    assert!(std::fs::read_dir(&tmp).unwrap().next().is_none(), "tmp/ cleaned by the next run");
    assert!(
        std::fs::read_dir(p.path().join(".pipeline/v1/scratch")).unwrap().next().is_none(),
        "scratch removed after commit"
    );
    assert_eq!(p.run().ok().with_status("cached").len(), 3);
    assert_eq!(p.verify(), Vec::<String>::new());
}

#[test]
fn two_concurrent_runs_wait_for_each_other() {
    let p = Project::new(SLOW);
    let (mut c1, mut c2) = (p.spawn_child(), p.spawn_child());
    let events = |c: &mut std::process::Child| {
        let e: Vec<Vec<String>> = child_events(c).collect();
        assert!(c.wait().unwrap().success());
        e
    };
    let (e1, e2) = (events(&mut c1), events(&mut c2));
    let waited = [&e1, &e2].iter().filter(|e| e.iter().any(|l| l[0] == "waiting_for_lock")).count();
    assert_eq!(waited, 1, "exactly one run waited for the lock: {e1:?} {e2:?}");
    let done = |e: &[Vec<String>], status: &str| e.iter().filter(|l| l[0] == "done" && l[2] == status).count();
    let (first, second) = if done(&e1, "ran") == 3 { (&e1, &e2) } else { (&e2, &e1) };
    assert_eq!(done(first, "ran"), 3, "{first:?}");
    assert_eq!(done(second, "cached"), 3, "the second run found the first one's entries: {second:?}");
    assert!(second.iter().any(|l| l[0] == "waiting_for_lock"), "the run that waited is the one that found the cache");
    assert_eq!(p.verify(), Vec::<String>::new());
}
