//! Data-parallel runs (issue 17): rank 0 runs the pipeline and writes the cache; a follower rank
//! takes no lock, waits for rank 0's entries of ordinary stages, runs the distributed ones beside
//! it (into a private directory) and commits nothing; a distributed stage is keyed by its params
//! as they read at the world size, never by the world size itself.

use std::fs;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pipeline_engine::{exec, Declared, DistEnv, ExecOptions, PlanCtx, RunCtx, Stage, StageError};

use crate::support::{v, Project, Recorder};

/// Test-only distributed kind `team`: `n` reads as `n × world size`; records which ranks ran it.
struct Team(Arc<Mutex<Vec<usize>>>);

impl Stage for Team {
    fn kind(&self) -> &'static str {
        "team"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "(test only) a stage every rank runs"
    }
    fn declare(&self, _ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        Ok(Declared { outputs: vec!["data".into()], files: vec![] })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        self.0.lock().unwrap().push(ctx.dist().rank);
        std::thread::sleep(Duration::from_millis(300));
        let n = ctx.raw_params()["n"].as_integer().unwrap();
        let out = ctx.output("data")?.join("out.txt");
        fs::write(&out, format!("n={n} by rank {}", ctx.dist().rank)).map_err(|e| StageError::io(&out, e))
    }
    fn distributed_params(&self, params: &toml::Table, world_size: usize) -> Option<toml::Table> {
        let mut p = params.clone();
        let n = p["n"].as_integer().unwrap();
        p.insert("n".into(), toml::Value::Integer(n * world_size as i64));
        Some(p)
    }
}

const TEAM: &str = r#"
[pipeline]
name = "dp"
[stages.a]
kind = "step"
params = { text = "A", steps = 4, step_ms = 100 }
[stages.t]
kind = "team"
inputs.x = "a.data"
params.n = 2
[stages.after]
kind = "step"
inputs.x = "t.data"
params.text = "Z"
"#;

fn rank(r: usize) -> DistEnv {
    DistEnv { rank: r, world_size: 2, ..DistEnv::single() }
}

#[test]
fn a_follower_waits_for_rank_0s_entries_joins_distributed_stages_and_writes_nothing() {
    let ran = Arc::new(Mutex::new(Vec::new()));
    let mut p = Project::new(TEAM);
    p.registry.register(Team(ran.clone()));
    let p = p;
    let (lead, follower) = std::thread::scope(|s| {
        let f = s.spawn(|| {
            // Started first: it must wait for `a` rather than run it.
            let plan = p.plan();
            let store = p.store();
            let opts = ExecOptions { dist: rank(1), ..Default::default() };
            exec::run(&plan, &store, &opts, Arc::new(Recorder::default())).unwrap()
        });
        std::thread::sleep(Duration::from_millis(100));
        let l = s.spawn(|| p.run_with(&ExecOptions { dist: rank(0), ..Default::default() }).ok());
        (l.join().unwrap(), f.join().unwrap())
    });
    assert_eq!(lead.with_status("ran"), v(&["a", "after", "t"]));
    let status = |id: &str| follower.outcomes.iter().find(|o| o.id == id).unwrap().status.label();
    assert_eq!((status("a"), status("t"), status("after")), ("cached", "ran", "cached"));
    let mut who = ran.lock().unwrap().clone();
    who.sort();
    assert_eq!(who, vec![0, 1], "both ranks ran the distributed stage, once each");
    // One entry per stage, rank 0's; the key holds n as read at world size 2.
    let store = p.store();
    let entries: Vec<_> = store.entries().unwrap().into_iter().map(Result::unwrap).collect();
    assert_eq!(entries.len(), 3);
    let t = entries.iter().find(|e| e.stage == "t").unwrap();
    assert_eq!(t.key_fields["params"]["n"], 4);
    assert_eq!(p.out_text(&lead, "t"), "n=4 by rank 0");
    assert_eq!(lead.outcome("t").key, follower.outcomes.iter().find(|o| o.id == "t").unwrap().key);

    // One process with the params that world size 2 keyed (n = 4) finds the same entry.
    p.edit("params.n = 2", "params.n = 4");
    let one = p.run();
    assert_eq!(one.with_status("cached"), v(&["a", "after", "t"]));
}
