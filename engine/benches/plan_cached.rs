//! Planning + all-cached run of a 200-stage synthetic recipe (target: under 100 ms).
//!
//! `cargo bench -p pipeline-engine --bench plan_cached` prints the cold run time and the median /
//! min / max of 20 warm iterations, each = read + parse + plan the recipe, then `exec::run` with
//! every stage a cache hit (keys, entry reads, stamp checks of every artifact).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline_cache::Store;
use pipeline_engine::{exec, plan, ExecOptions, NullReporter, Registry, Status};

const STAGES: usize = 200;

fn recipe() -> String {
    let mut r = String::from("[pipeline]\nname = \"bench\"\nseed = 7\n\n");
    for i in 0..4 {
        r.push_str(&format!("[stages.src{i}]\nkind = \"files\"\nparams.paths = [\"data/part{i}.txt\"]\n\n"));
    }
    // Each concat stage reads one or two earlier stages: a wide, deep DAG.
    for i in 4..STAGES {
        let a = if i < 8 { format!("src{}", i % 4) } else { format!("s{}", i - 4) };
        let b = if i < 8 { format!("src{}", (i + 1) % 4) } else { format!("s{}", i / 2) };
        r.push_str(&format!(
            "[stages.s{i}]\nkind = \"concat\"\ninputs.parts = [\"{a}.data\", \"{b}.data\"]\nparams.separator = \"|{i}|\"\n\n"
        ));
    }
    r
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("data")).expect("mkdir");
    for i in 0..4 {
        std::fs::write(dir.path().join(format!("data/part{i}.txt")), format!("part {i}\n").repeat(100)).expect("write");
    }
    let path = dir.path().join("bench.toml");
    std::fs::write(&path, recipe()).expect("write recipe");
    let mut reg = Registry::new();
    pipeline_engine::builtin::register(&mut reg);
    let store = Store::open(&dir.path().join(".pipeline")).expect("store");
    let opts = ExecOptions::default();

    let t = Instant::now();
    let p = plan(&path, &reg).expect("plan");
    let s = exec::run(&p, &store, &opts, Arc::new(NullReporter)).expect("run");
    assert!(s.outcomes.iter().all(|o| o.status == Status::Ran));
    println!("cold run of {STAGES} stages: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);

    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let p = plan(&path, &reg).expect("plan");
        let s = exec::run(&p, &store, &opts, Arc::new(NullReporter)).expect("run");
        times.push(t.elapsed());
        assert!(s.outcomes.iter().all(|o| o.status == Status::Cached));
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "plan + all-cached run, {STAGES} stages: median {:.1} ms, min {:.1} ms, max {:.1} ms (target < 100 ms)",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1])
    );
}
